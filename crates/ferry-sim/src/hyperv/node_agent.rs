//! Per-node host agents of a simulated cluster, one of which dies mid-read (ADR 0180).
//!
//! The simulator runs one in-process `ferry-agent` for every node (one model, one CSV). A test
//! that needs the nodes' agents apart asks the side door for node `N`'s own address: a TCP
//! relay in front of that agent, which counts the bytes it serves (TLS passes through, so the
//! pins stay the agent's). Arming a relay makes it die like a killed agent once it has served
//! so many more bytes: its connections are cut and it stops listening (reconnects are
//! refused). A VM given when arming is live-migrated (RCT kept) to the next node at that
//! moment, before the next WMI request is answered, as when a node drains and its agent stops.
//!
//! | method | parameters | effect |
//! |---|---|---|
//! | `NodeAgent` | `Node` | starts node `Node`'s relay (once); out: `Address` (`127.0.0.1:PORT`) |
//! | `NodeAgentFailAfter` | `Node`, `Bytes`[, `VirtualSystem`] | the relay dies after `Bytes` more bytes served; the VM moves then |
//! | `NodeAgentStats` | `Node` | out: `BytesServed`, `Connections`, `Stopped` (`true`/`false`) |

use super::sidedoor::CLASS;
use super::{Fault, State, fault, set_rv, text};
use ferry_wsman::cim::Instance;
use ferry_wsman::xml::Node;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The relays, by node name (lower case), and the moves their deaths armed.
#[derive(Debug, Default)]
pub(super) struct NodeAgents {
    relays: HashMap<String, Arc<Relay>>,
    moves: Arc<Mutex<Vec<String>>>,
}

#[derive(Debug)]
struct Relay {
    node: String,
    addr: SocketAddr,
    agent: SocketAddr,
    served: AtomicU64,
    conns: AtomicU64,
    arm: Mutex<Option<Arm>>,
    dead: CancellationToken,
    moves: Arc<Mutex<Vec<String>>>,
}

#[derive(Debug)]
struct Arm {
    left: u64,
    vm: Option<String>,
}

impl Relay {
    /// Counts `n` bytes served; whether the relay must die now.
    fn count(&self, n: u64) -> bool {
        self.served.fetch_add(n, Ordering::Relaxed);
        let mut arm = self.arm.lock().unwrap_or_else(|p| p.into_inner());
        let Some(a) = arm.as_mut() else {
            return false;
        };
        a.left = a.left.saturating_sub(n);
        if a.left > 0 {
            return false;
        }
        if let Some(vm) = arm.take().and_then(|a| a.vm) {
            self.moves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(vm);
        }
        tracing::info!(node = %self.node, served = self.served.load(Ordering::Relaxed), "the node's host agent dies (NodeAgentFailAfter)");
        self.dead.cancel();
        true
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let conn = tokio::select! {
                () = self.dead.cancelled() => return,
                c = listener.accept() => c,
            };
            let Ok((client, _)) = conn else { continue };
            self.conns.fetch_add(1, Ordering::Relaxed);
            let me = self.clone();
            tokio::spawn(async move {
                let dead = me.dead.clone();
                tokio::select! {
                    () = dead.cancelled() => {}
                    () = me.relay(client) => {}
                }
            });
        }
    }

    /// Passes one connection through to the agent, counting what the agent sends.
    async fn relay(&self, client: tokio::net::TcpStream) {
        let Ok(agent) = tokio::net::TcpStream::connect(self.agent).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut ar, mut aw) = agent.into_split();
        let up = async {
            let _ = tokio::io::copy(&mut cr, &mut aw).await;
            let _ = aw.shutdown().await;
        };
        let down = async {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match ar.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if self.count(n as u64) || cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = cw.shutdown().await;
        };
        tokio::join!(up, down);
    }
}

impl NodeAgents {
    /// Node `node`'s relay, started on first use in front of the agent at `agent`.
    fn relay(&mut self, node: &str, agent: SocketAddr) -> Result<Arc<Relay>, String> {
        if let Some(r) = self.relays.get(&node.to_lowercase()) {
            return Ok(r.clone());
        }
        let std = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("cannot listen for node {node}'s agent: {e}"))?;
        let addr = std.local_addr().map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(std).map_err(|e| e.to_string())?;
        let r = Arc::new(Relay {
            node: node.to_string(),
            addr,
            agent,
            served: AtomicU64::new(0),
            conns: AtomicU64::new(0),
            arm: Mutex::new(None),
            dead: CancellationToken::new(),
            moves: self.moves.clone(),
        });
        tokio::spawn(r.clone().serve(listener));
        self.relays.insert(node.to_lowercase(), r.clone());
        Ok(r)
    }
}

/// Before a request is answered: the moves that dying agents armed happen.
pub(super) fn before(st: &mut State) {
    let vms: Vec<String> = std::mem::take(
        &mut *st
            .node_agents
            .moves
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    for vm in vms {
        st.migrate_to_next(&vm, "NodeAgentFailAfter");
    }
}

/// The `NodeAgent*` side-door methods, or `None` for the others.
pub(super) fn sidedoor(
    st: &mut State,
    method: &str,
    body: &Node,
) -> Option<Result<Instance, Fault>> {
    if !matches!(
        method,
        "NodeAgent" | "NodeAgentFailAfter" | "NodeAgentStats"
    ) {
        return None;
    }
    let r = (|| {
        let bad = |m: String| fault("InvalidParameter", m);
        let node = body
            .text_at("Node")
            .map(str::trim)
            .ok_or_else(|| bad(format!("{CLASS}.{method} needs Node.")))?;
        let known = st
            .cluster
            .as_ref()
            .ok_or_else(|| bad("the host is not a cluster node".into()))?
            .nodes
            .iter()
            .find(|n| n.eq_ignore_ascii_case(node))
            .cloned()
            .ok_or_else(|| bad(format!("no cluster node `{node}`")))?;
        let agent = st
            .data_paths
            .agent
            .ok_or_else(|| bad("the host runs no agent".into()))?;
        let relay = st.node_agents.relay(&known, agent).map_err(bad)?;
        let mut out = Instance::default();
        match method {
            "NodeAgent" => {
                out.props
                    .insert("Address".into(), text(relay.addr.to_string()));
            }
            "NodeAgentFailAfter" => {
                let bytes = body
                    .text_at("Bytes")
                    .and_then(|b| b.trim().parse::<u64>().ok())
                    .filter(|b| *b > 0)
                    .ok_or_else(|| bad("Bytes must be a number above 0.".into()))?;
                let vm = body.text_at("VirtualSystem").map(|v| v.trim().to_string());
                *relay.arm.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Arm { left: bytes, vm });
            }
            _ => {
                let n = |a: &AtomicU64| text(a.load(Ordering::Relaxed).to_string());
                out.props.insert("BytesServed".into(), n(&relay.served));
                out.props.insert("Connections".into(), n(&relay.conns));
                out.props.insert(
                    "Stopped".into(),
                    text(relay.dead.is_cancelled().to_string()),
                );
            }
        }
        set_rv(&mut out, 0);
        Ok(out)
    })();
    Some(r)
}
