//! A fixed pool of CPU threads for hashing, compression and encryption.
//!
//! Why not `spawn_blocking` behind a semaphore: a permit is only released when the async task
//! that holds it is polled again, so on 2 cores the CPU sat idle between jobs (11–31 % idle
//! in W16 backups); and jobs landed on whichever of the ~25 blocking threads was free, each
//! keeping its own zstd context and malloc arena (≈ 2 MiB of RSS apiece). Here `n` threads
//! take jobs from one queue the moment they finish the last one.

use crate::error::{EngineError, Result};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// `n` named threads draining one job queue. Dropping the pool lets them finish the queued
/// jobs and exit.
pub(crate) struct CpuPool {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl CpuPool {
    /// Starts `n` (at least one) threads.
    pub(crate) fn new(n: usize) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("ferry-cpu-{i}"))
                    .spawn(move || {
                        loop {
                            // The lock is held only while waiting for the next job.
                            let job = match rx.lock() {
                                Ok(r) => r.recv(),
                                Err(_) => return,
                            };
                            match job {
                                Ok(job) => job(),
                                Err(_) => return, // the pool was dropped
                            }
                        }
                    })
                    .map_err(|e| EngineError::Internal(format!("cannot start a CPU thread: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tx: Some(tx),
            threads,
        })
    }

    /// Runs `f` on the pool; returns its result and how long it ran.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<(T, Duration)> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let t = Instant::now();
            // A panic drops `tx` unsent (reported below) and leaves the thread serving.
            if let Ok(r) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                // The receiver is gone only if the backup was cancelled: nothing to report to.
                let _ = tx.send((r, t.elapsed()));
            }
        });
        self.tx
            .as_ref()
            .and_then(|s| s.send(job).ok())
            .ok_or_else(|| EngineError::Internal("the CPU pool has stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Internal("a CPU job panicked".into()))
    }
}

impl Drop for CpuPool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            // Blocking only for the jobs already queued, which are bounded by the chunks in
            // flight.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_on_named_threads_and_keeps_serving_after_a_panic() {
        let pool = CpuPool::new(2).unwrap();
        let (name, _) = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("ferry-cpu-"));
        let err = pool.run(|| panic!("boom")).await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        // Both threads still serve.
        for _ in 0..4 {
            let (v, _) = pool.run(|| 6 * 7).await.unwrap();
            assert_eq!(v, 42);
        }
    }
}
