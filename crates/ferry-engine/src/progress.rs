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
    /// Busy time per stage, live (ADR 0141): read while the job runs, not only at its end.
    pub(crate) clock: StageClock,
    /// Each disk begun, with the clock's totals when it began.
    disk_starts: Mutex<Vec<(String, [u64; 3])>>,
}

/// A consistent-enough copy of [`Progress`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
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
    /// Where the time went so far (all disks).
    pub time: TimeSplit,
    /// Where each disk's time went, in the order they were begun (the last one live).
    pub disks: Vec<DiskTime>,
}

/// The time split of one disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DiskTime {
    /// Disk name.
    pub name: String,
    /// Its shares.
    pub time: TimeSplit,
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
        self.disk_starts
            .lock()
            .expect("progress lock")
            .push((disk.to_string(), self.clock.raw()));
    }

    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            total: self.total.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            read: self.read.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            current: self.current.lock().expect("progress lock").clone(),
            time: self.clock.split(),
            disks: self.disk_times(),
        }
    }

    /// Each disk's share of the clock: from its start to the next disk's (or now).
    fn disk_times(&self) -> Vec<DiskTime> {
        let starts = self.disk_starts.lock().expect("progress lock").clone();
        let now = self.clock.raw();
        starts
            .iter()
            .enumerate()
            .map(|(i, (name, from))| {
                let to = starts.get(i + 1).map_or(now, |n| n.1);
                DiskTime {
                    name: name.clone(),
                    time: TimeSplit::between(*from, to),
                }
            })
            .collect()
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
    /// Nanoseconds so far: source, CPU, target.
    pub(crate) fn raw(&self) -> [u64; 3] {
        [
            self.source.load(Ordering::Relaxed),
            self.cpu.load(Ordering::Relaxed),
            self.target.load(Ordering::Relaxed),
        ]
    }
    pub(crate) fn split(&self) -> TimeSplit {
        TimeSplit::between([0; 3], self.raw())
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
    /// The shares of what a clock added between two readings.
    pub(crate) fn between(from: [u64; 3], to: [u64; 3]) -> Self {
        let d: Vec<f64> = (0..3)
            .map(|i| to[i].saturating_sub(from[i]) as f64)
            .collect();
        let sum: f64 = d.iter().sum();
        if sum == 0.0 {
            return TimeSplit::default();
        }
        let pct = |x: f64| (x * 1000.0 / sum).round() / 10.0;
        TimeSplit {
            source_pct: pct(d[0]),
            cpu_pct: pct(d[1]),
            target_pct: pct(d[2]),
        }
    }

    /// Whether any busy time was measured.
    pub fn measured(&self) -> bool {
        self.source_pct + self.cpu_pct + self.target_pct > 0.0
    }

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

    #[test]
    fn progress_splits_time_per_disk_while_it_runs() {
        let p = Progress::new();
        p.set_current("a");
        p.clock.cpu(Duration::from_millis(100));
        p.set_current("b");
        p.clock.target.fetch_add(300_000_000, Ordering::Relaxed);
        let s = p.snapshot();
        assert_eq!(s.disks.len(), 2);
        assert_eq!(
            (s.disks[0].name.as_str(), s.disks[0].time.bottleneck()),
            ("a", "cpu")
        );
        assert!((s.disks[0].time.cpu_pct - 100.0).abs() < 0.01, "{s:?}");
        assert_eq!(s.disks[1].time.bottleneck(), "target");
        assert!((s.time.target_pct - 75.0).abs() < 0.01, "{s:?}");
        assert!(s.time.measured() && !TimeSplit::default().measured());
    }
}
