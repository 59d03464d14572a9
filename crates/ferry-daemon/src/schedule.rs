//! Time-based logic: the scheduler loop, retries with backoff, and concurrency limits.
//!
//! Time comes from a [`Clock`] and every wait is a `tokio::time` sleep, so tests run them on
//! tokio's paused clock ([`TokioClock`]) in microseconds of real time.

use crate::config::Schedule;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that starts at `base` and advances with `tokio::time` (paused in tests).
#[derive(Debug, Clone)]
pub struct TokioClock {
    base: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Starting now at `base`.
    pub fn new(base: DateTime<Utc>) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let d = self.start.elapsed();
        self.base + chrono::Duration::from_std(d).unwrap_or_default()
    }
}

/// The wait before retry number `attempt` (1-based): `base`, then doubling, at most an hour.
pub fn retry_delay(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(Duration::from_secs(3600))
}

/// Runs `f` until it succeeds, at most `1 + retries` times, waiting [`retry_delay`] between
/// attempts; `on_retry(attempt, error, wait)` is told before each wait. Cancelling ends the
/// wait (the last error is returned). `f` gets the attempt number (1-based).
pub async fn with_retries<T, E, F, Fut>(
    retries: u32,
    base: Duration,
    cancel: &CancellationToken,
    mut on_retry: impl FnMut(u32, &E, Duration),
    mut f: F,
) -> Result<T, E>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match f(attempt).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt > retries || cancel.is_cancelled() => return Err(e),
            Err(e) => {
                let wait = retry_delay(base, attempt);
                on_retry(attempt, &e, wait);
                tokio::select! {
                    _ = cancel.cancelled() => return Err(e),
                    _ = tokio::time::sleep(wait) => {}
                }
                attempt += 1;
            }
        }
    }
}

/// Takes `n` permits of `sem`; when none are free says so through `on_wait(what)` first, then
/// waits. `None` when cancelled first.
pub(crate) async fn take(
    sem: Arc<Semaphore>,
    n: u32,
    what: &str,
    cancel: &CancellationToken,
    on_wait: &(dyn Fn(&str) + Send + Sync),
) -> Option<OwnedSemaphorePermit> {
    match sem.clone().try_acquire_many_owned(n) {
        Ok(p) => return Some(p),
        Err(tokio::sync::TryAcquireError::Closed) => return None,
        Err(tokio::sync::TryAcquireError::NoPermits) => on_wait(what),
    }
    tokio::select! {
        _ = cancel.cancelled() => None,
        p = sem.acquire_many_owned(n) => p.ok(),
    }
}

/// Concurrency limits: VMs at once on this appliance, per source, per hypervisor host and per
/// datastore/SR.
#[derive(Debug)]
pub struct Limits {
    appliance: Arc<Semaphore>,
    per_source: usize,
    per_host: Option<usize>,
    groups: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Held while a VM is being backed up.
#[derive(Debug)]
pub struct Slot {
    _permits: Vec<OwnedSemaphorePermit>,
}

impl Limits {
    /// `appliance` VMs at once in all, `per_source` from one source.
    pub fn new(appliance: usize, per_source: usize) -> Self {
        Self {
            appliance: Arc::new(Semaphore::new(appliance.max(1))),
            per_source: per_source.max(1),
            per_host: None,
            groups: Default::default(),
        }
    }

    /// Also at most `n` VMs at once from one hypervisor host.
    pub fn per_host(mut self, n: Option<usize>) -> Self {
        self.per_host = n.map(|n| n.max(1));
        self
    }

    fn group(&self, key: String, n: usize) -> Arc<Semaphore> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(n)))
            .clone()
    }

    /// Waits for a slot for a VM of `source` (on `host`, if known; with disks on the
    /// datastores `stores`, at most `per_store` VMs per datastore when set); `on_wait` hears
    /// what it waits for. `None` when cancelled first.
    pub async fn acquire(
        &self,
        source: &str,
        host: Option<&str>,
        stores: &[String],
        per_store: Option<usize>,
        cancel: &CancellationToken,
        on_wait: &(dyn Fn(&str) + Send + Sync),
    ) -> Option<Slot> {
        // Narrow limits first, in one fixed order (no two VMs wait for each other's permits):
        // a VM waiting for a busy source, host or datastore holds no appliance slot.
        let mut sems = vec![(
            self.group(format!("source/{source}"), self.per_source),
            format!("source `{source}` (per-source-vms = {})", self.per_source),
        )];
        if let (Some(n), Some(h)) = (self.per_host, host) {
            sems.push((
                self.group(format!("host/{h}"), n),
                format!("host `{h}` (per-host-vms = {n})"),
            ));
        }
        if let Some(n) = per_store.map(|n| n.max(1)) {
            let mut stores = stores.to_vec();
            stores.sort();
            stores.dedup();
            for d in stores {
                // Jobs asking the same limit share one count per datastore (ADR 0142).
                sems.push((
                    self.group(format!("datastore/{source}/{d}/{n}"), n),
                    format!("datastore `{d}` (per-datastore-vms = {n})"),
                ));
            }
        }
        sems.push((
            self.appliance.clone(),
            "a slot of the appliance (max-concurrent-vms)".to_string(),
        ));
        let mut permits = Vec::with_capacity(sems.len());
        for (sem, what) in sems {
            permits.push(take(sem, 1, &what, cancel, on_wait).await?);
        }
        Some(Slot { _permits: permits })
    }
}

/// A job as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Scheduled {
    /// Job name.
    pub name: String,
    /// Its schedule (cron + zone); the key says when it changed.
    pub schedule: Schedule,
    /// Identifies the schedule's text, to notice edits.
    pub key: String,
}

/// Which jobs are due: keeps each job's next firing, fires those at or before `now` and moves
/// them on. A job new to the scheduler (or whose schedule changed) first fires at its next
/// time after `now`: a schedule set at 22:05 for 22:00 waits until tomorrow.
#[derive(Debug, Default)]
pub struct Planner {
    next: HashMap<String, (String, DateTime<Utc>)>,
    /// The planned time of each job's latest firing: appliances sharing a repository name
    /// their work window by it (ADR 0105).
    fired: HashMap<String, DateTime<Utc>>,
}

impl Planner {
    /// The jobs due at `now`, given the current list.
    pub fn due(&mut self, jobs: &[Scheduled], now: DateTime<Utc>) -> Vec<String> {
        self.next.retain(|k, _| jobs.iter().any(|j| &j.name == k));
        let mut out = Vec::new();
        for j in jobs {
            let e = self.next.get(&j.name);
            if e.is_none_or(|(k, _)| *k != j.key) {
                if let Some(t) = j.schedule.next_after(now) {
                    self.next.insert(j.name.clone(), (j.key.clone(), t));
                }
                continue;
            }
            if let Some((_, t)) = e
                && *t <= now
            {
                out.push(j.name.clone());
                self.fired.insert(j.name.clone(), *t);
                // Missed firings (the appliance was busy or asleep) collapse into one run.
                match j.schedule.next_after(now) {
                    Some(n) => {
                        self.next.insert(j.name.clone(), (j.key.clone(), n));
                    }
                    None => {
                        self.next.remove(&j.name);
                    }
                }
            }
        }
        out
    }

    /// The earliest next firing.
    pub fn earliest(&self) -> Option<DateTime<Utc>> {
        self.next.values().map(|(_, t)| *t).min()
    }

    /// The planned time of `job`'s latest firing.
    pub fn fired_at(&self, job: &str) -> Option<DateTime<Utc>> {
        self.fired.get(job).copied()
    }

    /// The next firing of `job`.
    pub fn next_of(&self, job: &str) -> Option<DateTime<Utc>> {
        self.next.get(job).map(|(_, t)| *t)
    }
}

/// The scheduler loop: every wake-up (at the earliest next firing, at most every 30 s, or when
/// `wake` is notified after a configuration change) it asks `jobs` for the list and calls
/// `fire` for each due job, until `shutdown`.
pub async fn run_scheduler(
    clock: Arc<dyn Clock>,
    jobs: impl Fn() -> Vec<Scheduled>,
    fire: impl Fn(&str),
    planner: Arc<std::sync::Mutex<Planner>>,
    wake: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let now = clock.now();
        let list = jobs();
        let (due, earliest) = {
            let mut p = planner.lock().unwrap_or_else(|p| p.into_inner());
            let due = p.due(&list, now);
            (due, p.earliest())
        };
        for j in due {
            fire(&j);
        }
        let mut wait = Duration::from_secs(30);
        if let Some(t) = earliest {
            let until = (t - now).to_std().unwrap_or_default();
            wait = wait.min(until.max(Duration::from_millis(10)));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn job(name: &str, expr: &str, tz: &str) -> Scheduled {
        Scheduled {
            name: name.into(),
            schedule: Schedule::parse(expr, Some(tz)).unwrap(),
            key: format!("{expr}@{tz}"),
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(60);
        assert_eq!(retry_delay(b, 1), b);
        assert_eq!(retry_delay(b, 2), b * 2);
        assert_eq!(retry_delay(b, 3), b * 4);
        assert_eq!(retry_delay(b, 30), Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_wait_with_backoff_and_stop_on_cancel() {
        let start = tokio::time::Instant::now();
        let cancel = CancellationToken::new();
        let mut told = Vec::new();
        let r: Result<u32, String> = with_retries(
            3,
            Duration::from_secs(10),
            &cancel,
            |a, _, w| told.push((a, w)),
            |a| async move {
                if a < 3 {
                    Err(format!("fail {a}"))
                } else {
                    Ok(a)
                }
            },
        )
        .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(
            told,
            vec![(1, Duration::from_secs(10)), (2, Duration::from_secs(20))]
        );
        // Out of retries: the last error.
        let r: Result<(), String> = with_retries(
            1,
            Duration::from_secs(1),
            &cancel,
            |_, _, _| {},
            |a| async move { Err(format!("fail {a}")) },
        )
        .await;
        assert_eq!(r.unwrap_err(), "fail 2");
        // Cancelled while waiting: returns at once.
        let c2 = cancel.clone();
        let t = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            c2.cancel();
        });
        let r: Result<(), String> = with_retries(
            5,
            Duration::from_secs(100),
            &cancel,
            |_, _, _| {},
            |_| async { Err("x".to_string()) },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(t.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn limits_hold_per_source_and_per_appliance() {
        let limits = Arc::new(Limits::new(3, 2));
        let cancel = CancellationToken::new();
        let running: Arc<std::sync::Mutex<HashMap<String, usize>>> = Default::default();
        let max_total = Arc::new(AtomicUsize::new(0));
        let max_src = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..12 {
            let src = if i % 3 == 0 { "a" } else { "b" }.to_string();
            let (l, c, r, mt, ms) = (
                limits.clone(),
                cancel.clone(),
                running.clone(),
                max_total.clone(),
                max_src.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _slot = l.acquire(&src, None, &[], None, &c, &|_| {}).await.unwrap();
                {
                    let mut m = r.lock().unwrap();
                    *m.entry(src.clone()).or_default() += 1;
                    mt.fetch_max(m.values().sum(), Ordering::SeqCst);
                    ms.fetch_max(m[&src], Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                *r.lock().unwrap().get_mut(&src).unwrap() -= 1;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max_src.load(Ordering::SeqCst), 2);
        assert_eq!(max_total.load(Ordering::SeqCst), 3);
        // A waiter gives up when cancelled.
        let l = Limits::new(1, 1);
        let held = l
            .acquire("a", None, &[], None, &cancel, &|_| {})
            .await
            .unwrap();
        let c = CancellationToken::new();
        c.cancel();
        assert!(l.acquire("a", None, &[], None, &c, &|_| {}).await.is_none());
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_hold_per_host_across_sources() {
        let l = Limits::new(4, 4).per_host(Some(1));
        let cancel = CancellationToken::new();
        let h1 = l
            .acquire("a", Some("host-1"), &[], None, &cancel, &|_| {})
            .await
            .unwrap();
        // Another source's VM on the same host waits; one on another host does not.
        let other = l
            .acquire("b", Some("host-2"), &[], None, &cancel, &|_| {})
            .await
            .unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_secs(5),
            l.acquire("b", Some("host-1"), &[], None, &cancel, &|_| {}),
        )
        .await;
        assert!(waiting.is_err(), "a second VM of host-1 must wait");
        drop(h1);
        let again = tokio::time::timeout(
            Duration::from_secs(5),
            l.acquire("b", Some("host-1"), &[], None, &cancel, &|_| {}),
        )
        .await;
        assert!(again.is_ok_and(|s| s.is_some()));
        // VMs whose host is unknown are limited by source and appliance only.
        assert!(
            l.acquire("c", None, &[], None, &cancel, &|_| {})
                .await
                .is_some()
        );
        drop(other);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_hold_per_datastore_and_say_what_they_wait_for() {
        let l = Limits::new(8, 8);
        let cancel = CancellationToken::new();
        let st = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let heard = std::sync::Mutex::new(Vec::<String>::new());
        let hear = |w: &str| heard.lock().unwrap().push(w.to_string());
        // A VM with disks on sr-1 and sr-2 holds both.
        let a = l
            .acquire(
                "x",
                None,
                &st(&["sr-2", "sr-1", "sr-2"]),
                Some(1),
                &cancel,
                &hear,
            )
            .await
            .unwrap();
        assert!(heard.lock().unwrap().is_empty(), "nothing was busy");
        // One on sr-3 runs; one on sr-1 waits, saying so.
        let b = l
            .acquire("x", None, &st(&["sr-3"]), Some(1), &cancel, &hear)
            .await
            .unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_secs(5),
            l.acquire("x", None, &st(&["sr-1"]), Some(1), &cancel, &hear),
        )
        .await;
        assert!(waiting.is_err(), "a second VM on sr-1 must wait");
        assert_eq!(
            *heard.lock().unwrap(),
            ["datastore `sr-1` (per-datastore-vms = 1)"]
        );
        // Without a datastore limit, the same VM does not wait; with it, it runs once freed.
        let c = l
            .acquire("x", None, &st(&["sr-1"]), None, &cancel, &hear)
            .await;
        assert!(c.is_some());
        drop(a);
        let d = tokio::time::timeout(
            Duration::from_secs(5),
            l.acquire("x", None, &st(&["sr-1"]), Some(1), &cancel, &hear),
        )
        .await;
        assert!(d.is_ok_and(|s| s.is_some()));
        drop((b, c));
    }

    #[test]
    fn planner_fires_once_per_time_and_notices_edits() {
        let mut p = Planner::default();
        let at = |h, m| Utc.with_ymd_and_hms(2026, 3, 3, h, m, 0).unwrap();
        let jobs = vec![job("nightly", "0 22 * * *", "UTC")];
        // Added at 22:05: not run for today's 22:00.
        assert!(p.due(&jobs, at(22, 5)).is_empty());
        assert_eq!(
            p.next_of("nightly"),
            Some(at(22, 0) + chrono::Duration::days(1))
        );
        assert!(p.due(&jobs, at(23, 0)).is_empty());
        let next = at(22, 0) + chrono::Duration::days(1);
        assert_eq!(
            p.due(&jobs, next + chrono::Duration::seconds(2)),
            vec!["nightly".to_string()]
        );
        // The window is named by the planned time, not by when the loop woke up.
        assert_eq!(p.fired_at("nightly"), Some(next));
        assert!(p.due(&jobs, next + chrono::Duration::minutes(1)).is_empty());
        // Edited: re-planned from now.
        let jobs = vec![job("nightly", "30 * * * *", "UTC")];
        let t = next + chrono::Duration::minutes(1);
        assert!(p.due(&jobs, t).is_empty());
        assert_eq!(
            p.next_of("nightly"),
            Some(next + chrono::Duration::minutes(30))
        );
        // Removed: forgotten.
        p.due(&[], t);
        assert_eq!(p.next_of("nightly"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_fires_on_time_in_paused_time() {
        let base = Utc.with_ymd_and_hms(2026, 3, 3, 10, 0, 30).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::new(base));
        type Fired = Vec<(String, DateTime<Utc>)>;
        let fired: Arc<std::sync::Mutex<Fired>> = Default::default();
        let (f2, c2) = (fired.clone(), clock.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_scheduler(
            clock.clone(),
            || vec![job("every5", "*/5 * * * *", "Asia/Kolkata")],
            move |j| f2.lock().unwrap().push((j.to_string(), c2.now())),
            Default::default(),
            Default::default(),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(21 * 60)).await;
        shutdown.cancel();
        task.await.unwrap();
        let f = fired.lock().unwrap();
        // 10:05, 10:10, 10:15, 10:20 (Kolkata is UTC+5:30: minutes still divisible by 5).
        assert_eq!(f.len(), 4, "{f:?}");
        for (i, (_, t)) in f.iter().enumerate() {
            let want = Utc
                .with_ymd_and_hms(2026, 3, 3, 10, 5 * (i as u32 + 1), 0)
                .unwrap();
            assert!(
                *t >= want && *t < want + chrono::Duration::seconds(1),
                "{t} vs {want}"
            );
        }
    }
}
