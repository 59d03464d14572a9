//! A disk read that fails mid-stream because the VM moved (ADR 0180).
//!
//! On a cluster the checkpoint's disks are read through the agent of the node that ran the VM
//! when the session opened (or through `san-paths`). A live migration after that keeps the
//! checkpoint on the CSV, but the old node's agent may go away (the node drained, rebooted,
//! its agent stopped): the reads fail with a reset connection or a refused reconnect. A
//! [`Reopening`] source then asks `root/MSCluster` where the VM runs now; when it moved, the
//! same export (the same checkpoint image, so the same RCT extents) is opened again through
//! the new node's data path, and the failed read is made again there, at the same offset.
//! Each read request fills its buffer once, from one source, so nothing is read twice into
//! the restore point and nothing is skipped. When the VM did not move the error stands; at
//! most [`MAX_REOPENS`] reopens per disk.

use super::{Inner, open_disk};
use crate::transport::CheckpointDisk;
use async_trait::async_trait;
use bytes::Bytes;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use std::ops::Range;
use std::sync::Arc;

/// How many times one disk is reopened on another node before a read error stands.
pub const MAX_REOPENS: u32 = 3;

/// What a disk is read from now.
struct Current {
    source: Arc<dyn BlockSource>,
    /// The view of the node whose data path `source` is.
    inner: Arc<Inner>,
    /// Bumped at each reopen, so that reads failing together reopen once.
    generation: u64,
    reopens: u32,
}

/// A checkpoint disk read through the node that runs the VM, reopened on its new node when a
/// read fails after a move.
pub(super) struct Reopening {
    disk: CheckpointDisk,
    label: String,
    vm_name: String,
    size: u64,
    name: String,
    preferred: u64,
    current: tokio::sync::Mutex<Current>,
}

impl std::fmt::Debug for Reopening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reopening")
            .field("disk", &self.label)
            .field("host_path", &self.disk.host_path)
            .finish()
    }
}

impl Reopening {
    /// `source`, opened for `disk` on the node of `inner`; only cluster nodes reopen.
    pub(super) fn wrap(
        inner: Arc<Inner>,
        disk: CheckpointDisk,
        label: &str,
        vm_name: &str,
        source: Arc<dyn BlockSource>,
    ) -> Arc<dyn BlockSource> {
        if inner.node.is_none() {
            return source;
        }
        Arc::new(Self {
            size: source.size(),
            name: source.name(),
            preferred: source.preferred_read_size(),
            disk,
            label: label.into(),
            vm_name: vm_name.into(),
            current: tokio::sync::Mutex::new(Current {
                source,
                inner,
                generation: 0,
                reopens: 0,
            }),
        })
    }

    async fn now(&self) -> (Arc<dyn BlockSource>, u64) {
        let c = self.current.lock().await;
        (c.source.clone(), c.generation)
    }

    /// After `e` from the source of `generation`: `Ok` to read again (the disk was reopened
    /// on the VM's new node, now or by a read that failed at the same time), else the error.
    async fn reopen(&self, generation: u64, what: &str, e: BlockError) -> Result<(), BlockError> {
        let why = match self.try_reopen(generation, what, &e).await {
            Ok(()) => return Ok(()),
            Err(why) => why,
        };
        let c = self.current.lock().await;
        let node = c.inner.node.as_ref().map_or("", |n| n.name.as_str());
        Err(BlockError::Other {
            disk: self.label.clone(),
            message: format!("{what} through node {node} failed ({why}): {e}"),
            // A new backup may succeed (the agent restarted); this one does not retry.
            retryable: e.is_retryable(),
            source: Some(Box::new(e)),
        })
    }

    /// Reopens the disk where the VM runs now, or says why not.
    async fn try_reopen(&self, generation: u64, what: &str, e: &BlockError) -> Result<(), String> {
        let mut c = self.current.lock().await;
        if c.generation != generation {
            return Ok(());
        }
        let from = c
            .inner
            .node
            .as_ref()
            .map_or_else(String::new, |n| n.name.clone());
        if c.reopens >= MAX_REOPENS {
            return Err(format!("the disk was already reopened {MAX_REOPENS} times"));
        }
        let Some(next) = c.inner.moved(&self.disk.vm).await else {
            return Err(format!("the VM still runs on node {from}"));
        };
        let to = next
            .node
            .as_ref()
            .map_or_else(String::new, |n| n.name.clone());
        let node = if next.cfg.agent.is_some() {
            match crate::agent::owner_node(&next.client, &self.disk.vm).await {
                Ok(n) => Some(n),
                Err(err) => {
                    tracing::warn!(source = %next.name, node = %to, error = %err, "cannot tell the node's name: its agent is looked for at the source's host");
                    None
                }
            }
        } else {
            None
        };
        tracing::warn!(source = %next.name, vm = %self.vm_name, disk = %self.label, from = %from, to = %to, error = %e, "{what} failed after the VM moved from {from} to {to}: reopening the disk on {to}");
        let opened = open_disk(&next, &self.label, &self.disk, node.as_ref()).await;
        match opened {
            Ok((source, mode)) if source.size() == self.size => {
                tracing::warn!(source = %next.name, disk = %self.label, node = %to, transport = %mode, "reading the rest of disk {} through node {to} ({mode})", self.label);
                c.source = source;
                c.inner = next;
                c.generation += 1;
                c.reopens += 1;
                Ok(())
            }
            Ok((source, _)) => Err(format!(
                "the VM moved to {to}, where the disk has {} bytes instead of {}",
                source.size(),
                self.size
            )),
            Err(err) => Err(format!(
                "the VM moved to {to}, where the disk cannot be opened: {err}"
            )),
        }
    }
}

#[async_trait]
impl BlockSource for Reopening {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        loop {
            let (src, generation) = self.now().await;
            match src.read_at(offset, buf).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let what = format!("the read of {} bytes at offset {offset}", buf.len());
                    self.reopen(generation, &what, e).await?;
                }
            }
        }
    }

    async fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Bytes>, BlockError> {
        loop {
            let (src, generation) = self.now().await;
            match src.read_shared(offset, len).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    let what = format!("the read of {len} bytes at offset {offset}");
                    self.reopen(generation, &what, e).await?;
                }
            }
        }
    }

    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        loop {
            let (src, generation) = self.now().await;
            match src.allocated(range.clone()).await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    let what = format!("the allocation map of {}..{}", range.start, range.end);
                    self.reopen(generation, &what, e).await?;
                }
            }
        }
    }

    fn preferred_read_size(&self) -> u64 {
        // The data paths of every node read the same image.
        self.preferred
    }
}
