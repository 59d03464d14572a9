//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the proptests that run the
//! same code on mutated images in CI. Not part of the stable API.

use crate::open::{NoFiles, open_source_as};
use crate::{Format, ImageError};
use ferry_core::{BlockSource, MemSource};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// Most bytes of the virtual disk read per input, so a header claiming terabytes stays cheap.
pub const READ_LIMIT: u64 = 64 << 20;

/// Drives a future that never waits on anything external (everything here reads memory).
fn block_on<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

/// Opens `data` as an image (`format` forced, or detected when `None`) with no access to other
/// files, then reads everything its allocation map reports within [`READ_LIMIT`], plus the
/// first unallocated ranges. Returns the number of bytes read; errors are fine, panics are bugs.
pub fn open_and_read(format: Option<Format>, data: &[u8]) -> Result<u64, ImageError> {
    block_on(run(format, data)).unwrap_or(Ok(0))
}

async fn run(format: Option<Format>, data: &[u8]) -> Result<u64, ImageError> {
    let src: Arc<dyn BlockSource> = Arc::new(MemSource::with_allocation(
        "fuzz-input",
        data.to_vec(),
        ferry_core::ExtentMap::from_range(0..data.len() as u64),
    ));
    let img = open_source_as(src, &NoFiles, format).await?;
    let disk = img.source;
    let limit = disk.size().min(READ_LIMIT);
    let map = disk.allocated(0..limit).await?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for e in map.iter().chain(map.complement(0..limit).iter().take(4)) {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(buf.len() as u64) as usize;
            disk.read_at(pos, &mut buf[..n]).await?;
            pos += n as u64;
            total += n as u64;
        }
    }
    Ok(total)
}

/// Parses a VMDK text descriptor.
pub fn parse_vmdk_descriptor(text: &str) -> bool {
    crate::vmdk::parse_descriptor("fuzz-input", text).is_ok()
}

/// Loads `data` as a VHDX for an in-place update (the updater's parser); errors are fine,
/// panics are bugs. Returns the number of payload blocks.
pub fn load_vhdx_for_update(data: &[u8]) -> Result<u64, ImageError> {
    let l = crate::vhdx_update::load_layout("fuzz-input", data.len() as u64, |off, n| {
        Ok(data[off as usize..off as usize + n].to_vec())
    })?;
    // Every block's state must be answerable without a panic.
    let blocks = l.geo.data_blocks.min(1 << 16);
    for b in 0..blocks {
        let _ = l.state(b);
    }
    let _ = l.next_header(true);
    Ok(l.geo.data_blocks)
}
