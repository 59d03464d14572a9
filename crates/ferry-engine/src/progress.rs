//! Live counters of a running job, shared with whoever draws a progress bar, and the
//! source/CPU/target time split that says where a job spent its time.

use serde::Serialize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters a job updates as it goes; read them from another task to show progress.
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
    current: Mutex<String>,
}

/// A consistent-enough copy of [`Progress`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProgressSnapshot {
    /// Virtual bytes the job covers (all disks).
    pub total: u64,
    /// Virtual bytes finished.
    pub done: u64,
    /// Bytes read from the source (backup) or repository (restore).
    pub read: u64,
    /// Bytes uploaded (backup) or written to the target (restore).
    pub written: u64,
    /// The disk being worked on.
    pub current: String,
}

impl Progress {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn set_current(&self, disk: &str) {
        *self.current.lock().expect("progress lock") = disk.to_string();
    }

    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            total: self.total.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            read: self.read.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            current: self.current.lock().expect("progress lock").clone(),
        }
    }
}

/// Busy time per stage, summed over every task (so with 8 reads in flight, one second of wall
/// time can hold eight seconds of source time). Only the proportions are meaningful.
#[derive(Debug, Default)]
pub(crate) struct StageClock {
    source: AtomicU64,
    cpu: AtomicU64,
    target: AtomicU64,
}

impl StageClock {
    pub(crate) fn source(&self, since: Instant) {
        self.source
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    pub(crate) fn cpu(&self, d: Duration) {
        self.cpu.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    pub(crate) fn target(&self, since: Instant) {
        self.target
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    pub(crate) fn split(&self) -> TimeSplit {
        let s = self.source.load(Ordering::Relaxed) as f64;
        let c = self.cpu.load(Ordering::Relaxed) as f64;
        let t = self.target.load(Ordering::Relaxed) as f64;
        let sum = s + c + t;
        if sum == 0.0 {
            return TimeSplit::default();
        }
        let pct = |x: f64| (x * 1000.0 / sum).round() / 10.0;
        TimeSplit {
            source_pct: pct(s),
            cpu_pct: pct(c),
            target_pct: pct(t),
        }
    }
}

/// Where a job spent its time, Veeam-style: the largest share is the bottleneck.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TimeSplit {
    /// Waiting on the source (reads; for a restore, repository fetches).
    pub source_pct: f64,
    /// Hashing, compressing, encrypting (restore: decrypting, decompressing, verifying).
    pub cpu_pct: f64,
    /// Waiting on the target (uploads; for a restore, writes).
    pub target_pct: f64,
}

impl TimeSplit {
    /// The stage with the largest share.
    pub fn bottleneck(&self) -> &'static str {
        if self.source_pct >= self.cpu_pct && self.source_pct >= self.target_pct {
            "source"
        } else if self.cpu_pct >= self.target_pct {
            "cpu"
        } else {
            "target"
        }
    }
}

/// Caps a byte rate (`--limit-rate`): callers ask for `n` bytes and are delayed so that the
/// running total never gets ahead of `rate × elapsed` by more than one request.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    state: tokio::sync::Mutex<(tokio::time::Instant, u64)>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (must be > 0).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            rate: bytes_per_sec.max(1),
            state: tokio::sync::Mutex::new((tokio::time::Instant::now(), 0)),
        }
    }

    /// Waits until `n` more bytes fit in the budget.
    pub async fn acquire(&self, n: u64) {
        let wait = {
            let mut st = self.state.lock().await;
            let due = Duration::from_secs_f64(st.1 as f64 / self.rate as f64);
            st.1 += n;
            due.checked_sub(st.0.elapsed())
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_paces_requests() {
        let l = RateLimiter::new(1000);
        let t = tokio::time::Instant::now();
        for _ in 0..5 {
            l.acquire(500).await;
        }
        // 2000 bytes were granted before the 5th request: it waited until t+2s.
        assert!(
            t.elapsed() >= Duration::from_millis(1990),
            "{:?}",
            t.elapsed()
        );
        assert!(
            t.elapsed() < Duration::from_millis(2600),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn split_names_the_bottleneck() {
        let c = StageClock::default();
        c.cpu(Duration::from_millis(300));
        c.target.store(100_000_000, Ordering::Relaxed);
        let s = c.split();
        assert_eq!(s.bottleneck(), "cpu");
        assert!((s.cpu_pct - 75.0).abs() < 0.01, "{s:?}");
        assert_eq!(StageClock::default().split(), TimeSplit::default());
    }
}
