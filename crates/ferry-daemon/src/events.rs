//! What the event streams (`GET /api/sessions/{id}/events`, `GET /api/events`, ADR 0178) are
//! fed from: one bounded broadcast channel that the sessions publish into as they go. A log
//! line is numbered, stored in the catalog and sent under one lock, so the channel carries
//! every session's lines in order; a session's milestones (every `persist`) go out as its
//! whole view; and a sampler per running session reads the engine's in-memory progress every
//! `events-progress-ms` and sends the VMs whose figures changed. Nothing here reads files.

use crate::App;
use crate::catalog::Event;
use crate::config::ApplianceConfig;
use crate::jobs::LiveSession;
use crate::problem::{ApiResult, Problem};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Default of `[appliance] events-buffer`.
pub fn default_buffer() -> usize {
    1024
}

/// Default of `[appliance] events-progress-ms`.
pub fn default_progress_ms() -> u64 {
    500
}

/// Checks the `[appliance]` settings of the streams.
pub fn validate(a: &ApplianceConfig) -> ApiResult<()> {
    if !(4..=65536).contains(&a.events_buffer) {
        return Err(Problem::invalid(
            "appliance",
            "events-buffer must be 4 to 65536 events",
        ));
    }
    if !(10..=60_000).contains(&a.events_progress_ms) {
        return Err(Problem::invalid(
            "appliance",
            "events-progress-ms must be 10 to 60000",
        ));
    }
    Ok(())
}

/// What happened.
#[derive(Clone, Debug)]
pub enum What {
    /// A new line of the session's log.
    Log(Event),
    /// One VM's live figures (its view, as in `GET /api/sessions/{id}`).
    Progress(Value),
    /// The session's whole view, at a milestone (started, VMs chosen, a VM done, ended).
    State(Value),
}

/// One event of one session, numbered in the order of the channel.
#[derive(Clone, Debug)]
pub struct Published {
    /// Position in the channel since the service started, from 1.
    pub seq: u64,
    /// Session id.
    pub session: String,
    /// The event.
    pub what: What,
}

/// The publishing side.
pub struct Hub {
    tx: broadcast::Sender<Arc<Published>>,
    /// The channel's sequence; held while a log line is numbered, stored and sent.
    order: Mutex<u64>,
    sampling: Mutex<HashSet<String>>,
    progress_every: Duration,
    /// Cancelled when the HTTP server stops: open streams end.
    pub closing: CancellationToken,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("progress_every", &self.progress_every)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub keeping `buffer` events per receiver, sampling progress every `progress_every`.
    pub fn new(buffer: usize, progress_every: Duration) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(1));
        Self {
            tx,
            order: Mutex::new(0),
            sampling: Mutex::default(),
            progress_every,
            closing: CancellationToken::new(),
        }
    }

    /// The number of the last event published.
    pub fn position(&self) -> u64 {
        *self.order.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of everything published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }

    fn send_locked(&self, seq: &mut u64, session: &str, what: What) {
        *seq += 1;
        // No receiver is not an error: nobody is watching.
        let _ = self.tx.send(Arc::new(Published {
            seq: *seq,
            session: session.to_string(),
            what,
        }));
    }

    /// Publishes `what` of `session`.
    pub fn publish(&self, session: &str, what: What) {
        let mut seq = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.send_locked(&mut seq, session, what);
    }

    /// Runs `record` (which numbers and stores a log line) and publishes its line, under the
    /// hub's lock: lines leave in the order of their numbers.
    pub fn log(&self, session: &str, record: impl FnOnce() -> Event) {
        let mut seq = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let e = record();
        self.send_locked(&mut seq, session, What::Log(e));
    }

    /// Publishes a session's milestone and makes sure its progress is sampled while it runs.
    pub(crate) fn changed(self: &Arc<Self>, app: &App, view: &Value, done: bool) {
        let Some(id) = view["id"].as_str() else {
            return;
        };
        self.publish(id, What::State(view.clone()));
        if done {
            return;
        }
        let Some(s) = app
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
        else {
            return;
        };
        if !self
            .sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let hub = self.clone();
        rt.spawn(async move { hub.sample(s).await });
    }

    /// Sends the VMs of `s` whose live figures changed, every `progress_every`, until the
    /// session ends.
    async fn sample(self: Arc<Self>, s: Arc<LiveSession>) {
        let mut last: HashMap<String, Value> = HashMap::new();
        let mut tick = tokio::time::interval(self.progress_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.closing.cancelled() => break,
                _ = tick.tick() => {}
            }
            let v = s.view();
            if v.status.done() {
                break;
            }
            if self.tx.receiver_count() == 0 {
                // Nobody follows: a stream that opens later starts from the whole view.
                last.clear();
                continue;
            }
            for vm in &v.vms {
                let Ok(mut j) = serde_json::to_value(vm) else {
                    continue;
                };
                j["session"] = Value::String(s.id.clone());
                if last.get(&vm.vm_id) != Some(&j) {
                    last.insert(vm.vm_id.clone(), j.clone());
                    self.publish(&s.id, What::Progress(j));
                }
            }
        }
        self.sampling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&s.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: u64) -> Event {
        Event {
            seq,
            time: 0,
            level: "info".into(),
            vm: None,
            message: format!("line {seq}"),
        }
    }

    #[tokio::test]
    async fn lines_leave_in_order_and_a_slow_receiver_lags_boundedly() {
        let hub = Hub::new(4, Duration::from_millis(100));
        let mut rx = hub.subscribe();
        for i in 1..=3 {
            hub.log("s", || line(i));
        }
        hub.publish("s", What::State(serde_json::json!({"id": "s"})));
        for want in 1..=4u64 {
            let p = rx.recv().await.unwrap();
            assert_eq!(p.seq, want);
        }
        // Ten more than it can hold: the receiver is told it lagged, then gets the newest.
        for i in 4..14 {
            hub.log("s", || line(i));
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("{other:?}"),
        }
        let p = rx.recv().await.unwrap();
        assert!(matches!(&p.what, What::Log(e) if e.seq == 10), "{p:?}");
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let mut a = ApplianceConfig::default();
        validate(&a).unwrap();
        a.events_buffer = 2;
        assert!(validate(&a).unwrap_err().detail.contains("events-buffer"));
        a.events_buffer = 64;
        a.events_progress_ms = 5;
        assert!(
            validate(&a)
                .unwrap_err()
                .detail
                .contains("events-progress-ms")
        );
    }
}
