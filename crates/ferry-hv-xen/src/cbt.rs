//! Sans-I/O decoding of XenAPI answers: the `VDI.list_changed_blocks` bitmap (one bit per
//! 64 KiB, most significant bit first) and the PEM certificate of `VDI.get_nbd_info`.

use base64::Engine as _;
use ferry_core::{Extent, ExtentMap};

/// Bytes covered by one bit of the CBT bitmap.
pub const CBT_BLOCK: u64 = 64 * 1024;

/// A bitmap that does not fit the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "CBT bitmap of {len} bytes does not fit a disk of {size} bytes ({expected} bytes expected)"
)]
pub struct BitmapError {
    /// Bitmap length.
    pub len: usize,
    /// Disk size.
    pub size: u64,
    /// Expected length.
    pub expected: u64,
}

/// Decodes a changed-block bitmap of a disk of `size` bytes into changed extents (clipped to
/// the disk). The bitmap must hold at least one bit per block and at most 8 spare bytes.
pub fn decode(bits: &[u8], size: u64) -> Result<ExtentMap, BitmapError> {
    let blocks = size.div_ceil(CBT_BLOCK);
    let expected = blocks.div_ceil(8);
    let len = bits.len() as u64;
    if len < expected || len > expected + 8 {
        return Err(BitmapError {
            len: bits.len(),
            size,
            expected,
        });
    }
    let mut out = Vec::new();
    let mut run: Option<u64> = None;
    for i in 0..=blocks {
        let set = i < blocks && bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0;
        match (set, run) {
            (true, None) => run = Some(i),
            (false, Some(start)) => {
                let off = start * CBT_BLOCK;
                out.push(Extent::new(off, (i * CBT_BLOCK).min(size) - off));
                run = None;
            }
            _ => {}
        }
    }
    Ok(ExtentMap::from_extents(out))
}

/// SHA-256 fingerprint (`sha256:AB:…`) of the first certificate of a PEM text.
pub fn pem_fingerprint(pem: &str) -> Option<String> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + pem[start..].find("-----END CERTIFICATE-----")?;
    let b64: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    use sha2::Digest;
    let d: [u8; 32] = sha2::Sha256::digest(&der).into();
    Some(ferry_nbd::uri::format_fingerprint(&d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn msb_first_and_clipped() {
        // Disk of 10 blocks minus 100 bytes; blocks 0, 1 and 9 changed.
        let size = 10 * CBT_BLOCK - 100;
        let m = decode(&[0b1100_0000, 0b0100_0000], size).unwrap();
        assert_eq!(
            m.as_slice(),
            &[
                Extent::new(0, 2 * CBT_BLOCK),
                Extent::new(9 * CBT_BLOCK, CBT_BLOCK - 100)
            ]
        );
        assert!(
            decode(&[0xff], size)
                .unwrap_err()
                .to_string()
                .contains("2 bytes expected")
        );
        assert!(decode(&[0; 100], size).is_err());
    }

    proptest! {
        #[test]
        fn matches_a_naive_decoder(bits in prop::collection::vec(any::<u8>(), 0..40), size in 1u64..(300 * CBT_BLOCK)) {
            match decode(&bits, size) {
                Ok(m) => {
                    for blk in 0..size.div_ceil(CBT_BLOCK) {
                        let set = bits[(blk / 8) as usize] & (0x80 >> (blk % 8)) != 0;
                        prop_assert_eq!(m.contains(blk * CBT_BLOCK), set);
                    }
                    prop_assert!(m.iter().all(|e| e.end() <= size));
                }
                Err(e) => prop_assert!(e.len as u64 != e.expected),
            }
        }
    }
}
