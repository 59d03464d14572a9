//! Per-chunk tasks, at most `n` at once, for backup and restore.
//!
//! Each chunk that needs I/O is its own Tokio task rather than a future inside one stream: file
//! I/O is a `block_in_place` `pread`/`pwrite`, which inside a single stream would stall the
//! polling of every other chunk (ADR 0040).

use crate::error::{EngineError, Result};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// A bounded set of chunk tasks. Dropping it (e.g. on an early error return or cancellation)
/// aborts the tasks still running.
pub(crate) struct ChunkTasks {
    slots: Arc<Semaphore>,
    tasks: JoinSet<Result<()>>,
}

impl ChunkTasks {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(n.max(1))),
            tasks: JoinSet::new(),
        }
    }

    /// Waits for a free slot, reports the first failure among finished tasks (so a failed
    /// chunk surfaces before the whole disk is scheduled), then starts `task`.
    pub(crate) async fn spawn(
        &mut self,
        task: impl Future<Output = Result<()>> + Send + 'static,
    ) -> Result<()> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Internal("chunk slots closed".into()))?;
        while let Some(r) = self.tasks.try_join_next() {
            joined(r)?;
        }
        self.tasks.spawn(async move {
            let _permit = permit;
            task.await
        });
        Ok(())
    }

    /// Waits for every task; the first failure wins.
    pub(crate) async fn finish(mut self) -> Result<()> {
        while let Some(r) = self.tasks.join_next().await {
            joined(r)?;
        }
        Ok(())
    }
}

/// A panicked or aborted task becomes an internal error.
fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(|e| EngineError::Internal(format!("chunk task failed: {e}")))?
}
