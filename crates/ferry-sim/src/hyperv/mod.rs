//! The Hyper-V simulator: a WS-Management endpoint (`/wsman`) as Windows' WinRM service speaks
//! it, in front of a small WMI `root/virtualization/v2` model (ADR 0111).
//!
//! - transport: HTTPS (self-signed, pinned by fingerprint) and optionally plain HTTP, as the
//!   5986 / 5985 listeners; NTLM with message encryption (required over HTTP) and Basic for
//!   labs, in [`auth`] (ADR 0112); a wrong password is a 401 with `WWW-Authenticate`, like WinRM;
//! - WS-Transfer Get, WS-Enumeration Enumerate/Pull (optimized enumeration, `MaxElements`
//!   paging, WQL `SELECT * FROM C [WHERE P = 'v' [AND …]]` filters), method invocation with
//!   `Msvm_ConcreteJob` jobs (return value 4096, `JobState` 7 when done);
//! - classes: the host and guests (`Msvm_ComputerSystem`), their settings
//!   (`Msvm_VirtualSystemSettingData`, realized and snapshot), `Msvm_VirtualSystemSnapshotService`
//!   (CreateSnapshot, DestroySnapshot, ConvertToReferencePoint), `Msvm_VirtualSystemReferencePoint`,
//!   `Msvm_ConcreteJob`; `Msvm_ComputerSystem.RequestStateChange`; `Msvm_ShutdownComponent` ([`shutdown`]);
//! - the WinRS `cmd` shell cycle (Create, Command, Receive, Signal, Delete) with `hostname`,
//!   `whoami`, `echo` and `exit N`, enough for pywinrm's `run_cmd`;
//! - faults as WinRM words them (`w:InvalidSelectors`, `w:ActionNotSupported`, …).
//!
//! Five guests are seeded, each with VHDX disks under `C:\\ClusterStorage\\Volume1` ([`disks`]):
//! a running Windows guest that qualifies for the child-VM (VSS) method, one that is off, a Linux
//! guest without the backup (VSS) integration service, one with a dynamic disk (its VSS fails
//! an application-consistent checkpoint) and one whose snapshot location is on another volume.
//! Checkpoints freeze the disks into `.avhdx` files, RCT ([`rct`]) answers
//! `GetVirtualDiskChanges`, and a side door ([`sidedoor`]) acts as the guest and injects faults.

mod agent;
mod auth;
mod cbt;
mod checkpoints;
mod cluster;
mod config;
mod controllers;
mod define;
mod disks;
mod kerberos;
mod lun;
mod migrate;
mod node_agent;
mod port_features;
mod rct;
mod shutdown;
mod sidedoor;
mod switches;

pub use cbt::Cbt;
pub use kerberos::HypervKerberos;

use axum::body::Bytes;
use axum::extract::{Extension, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferry_wsman::cim::{self, Epr, Instance, Value};
use ferry_wsman::envelope::{
    self as wsman, ACTION_CREATE, ACTION_DELETE, ACTION_ENUMERATE, ACTION_GET, ACTION_PULL,
    ACTION_RELEASE, ANONYMOUS, NS_ADDRESSING, NS_ENUMERATION, NS_MS_WSMAN, NS_SHELL, NS_SOAP,
    NS_TRANSFER, NS_WSMAN,
};
use ferry_wsman::xml::{self, Node, escape};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use agent::DataPathOptions;
pub use cluster::NodeInfo;

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum HypervSimError {
    /// Socket or file I/O.
    #[error("Hyper-V simulator: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error("Hyper-V simulator: {0}")]
    Other(String),
}

/// Settings.
#[derive(Debug, Clone)]
pub struct HypervSimConfig {
    /// Where the host's files live.
    pub dir: PathBuf,
    /// HTTPS listen address (WinRM's 5986).
    pub listen: SocketAddr,
    /// Plain HTTP listen address (WinRM's 5985), if any.
    pub listen_http: Option<SocketAddr>,
    /// Login user.
    pub username: String,
    /// Login password.
    pub password: String,
    /// The host's name.
    pub host_name: String,
    /// Size of each seeded disk in MiB.
    pub disk_mib: u64,
    /// Also accept Kerberos (ADR 0159).
    pub kerberos: Option<HypervKerberos>,
    /// The host agent's pins and snapshot LUNs ([`agent`]).
    pub data_paths: DataPathOptions,
    /// Nodes of a failover cluster (0 or 1: a standalone host; see [`cluster`]).
    pub cluster_nodes: usize,
    /// Extended Protection (channel binding) on the HTTPS listener ([`cbt`]).
    pub cbt: Cbt,
}

impl HypervSimConfig {
    /// Defaults: HTTPS on a free loopback port, no HTTP, user `Administrator`, password
    /// `hypervsim`, host `HV-SIM-01`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_http: None,
            username: "Administrator".into(),
            password: "hypervsim".into(),
            host_name: "HV-SIM-01".into(),
            disk_mib: 16,
            kerberos: None,
            data_paths: DataPathOptions::default(),
            cluster_nodes: 0,
            cbt: Cbt::None,
        }
    }
}

/// A running simulator.
#[derive(Debug)]
pub struct HypervSim {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    url: String,
    http_url: Option<String>,
    fingerprint: String,
    dir: PathBuf,
    agent: agent::SimAgent,
    nodes: Vec<cluster::NodeInfo>,
}

#[derive(Debug)]
struct Shared {
    username: String,
    password: String,
    host_name: String,
    auth: auth::Auth,
    state: std::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Class → instances.
    objects: BTreeMap<String, Vec<Instance>>,
    /// Open enumerations: context → what is left.
    enumerations: HashMap<String, VecDeque<Instance>>,
    /// Open shells: id → commands.
    shells: HashMap<String, HashMap<String, Cmd>>,
    next_id: u64,
    /// The guests' disks, checkpoints and RCT.
    storage: Option<disks::Storage>,
    /// Method → (calls to let through first, calls that fail then) (side door).
    fail_next: HashMap<String, (usize, usize)>,
    /// The host agent's pins and the snapshot LUNs.
    data_paths: agent::DataPaths,
    /// The failover cluster, when the host is one of its nodes.
    cluster: Option<cluster::Cluster>,
    /// The node serving the request being answered.
    viewer: Option<String>,
    /// A live migration armed to happen mid-backup ([`migrate`]).
    pending_move: Option<migrate::Pending>,
    /// Each cluster node's own agent address, one of which a test kills ([`node_agent`]).
    node_agents: node_agent::NodeAgents,
    /// The shutdown requests the guests received ([`shutdown`]).
    shutdowns: shutdown::Log,
}

#[derive(Debug, Clone)]
struct Cmd {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: i64,
}

/// One seeded guest.
struct Guest {
    name: &'static str,
    os: &'static str,
    running: bool,
    vss: bool,
    dynamic_disk: bool,
    snapshot_elsewhere: bool,
    disks: u32,
}

const GUESTS: &[Guest] = &[
    Guest {
        name: "win-sql-01",
        os: "Windows Server 2022",
        running: true,
        vss: true,
        dynamic_disk: false,
        snapshot_elsewhere: false,
        disks: 2,
    },
    Guest {
        name: "win-file-01",
        os: "Windows Server 2019",
        running: false,
        vss: true,
        dynamic_disk: false,
        snapshot_elsewhere: false,
        disks: 1,
    },
    Guest {
        name: "linux-web-01",
        os: "Debian GNU/Linux 12",
        running: true,
        vss: false,
        dynamic_disk: false,
        snapshot_elsewhere: false,
        disks: 1,
    },
    Guest {
        name: "win-dyn-01",
        os: "Windows Server 2016",
        running: true,
        vss: true,
        dynamic_disk: true,
        snapshot_elsewhere: false,
        disks: 1,
    },
    Guest {
        name: "win-split-01",
        os: "Windows Server 2022",
        running: true,
        vss: true,
        dynamic_disk: false,
        snapshot_elsewhere: true,
        disks: 1,
    },
];

/// The volume the guests' disks live on.
const VHD_ROOT: &str = "C:\\ClusterStorage\\Volume1";

fn text(v: impl Into<String>) -> Value {
    Value::Text(v.into())
}

fn inst(class: &str, props: &[(&str, Value)]) -> Instance {
    Instance {
        class: class.to_string(),
        props: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    }
}

/// A stable GUID-shaped id from a name (the simulator's VMs keep their ids across restarts).
fn guid(seed: &str) -> String {
    let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let g = h.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
    format!(
        "{:08X}-{:04X}-{:04X}-{:04X}-{:012X}",
        h >> 32,
        (h >> 16) & 0xffff,
        0x4000 | (h & 0x0fff),
        0x8000 | (g & 0x3fff),
        g >> 16
    )
}

impl State {
    fn seed(host: &str, dir: &std::path::Path, disk_size: u64) -> Result<Self, String> {
        let mut st = State::default();
        let mut storage = disks::Storage::new(dir);
        let mut add = |i: Instance| {
            st.objects.entry(i.class.clone()).or_default().push(i);
        };
        add(inst(
            "Msvm_ComputerSystem",
            &[
                ("CreationClassName", text("Msvm_ComputerSystem")),
                ("Name", text(host)),
                ("ElementName", text(host)),
                ("Caption", text("Hosting Computer System")),
                ("EnabledState", text("2")),
            ],
        ));
        add(inst(
            "Msvm_VirtualSystemSnapshotService",
            &[
                (
                    "CreationClassName",
                    text("Msvm_VirtualSystemSnapshotService"),
                ),
                ("Name", text("vssnapsvc")),
                ("SystemCreationClassName", text("Msvm_ComputerSystem")),
                ("SystemName", text(host)),
                (
                    "ElementName",
                    text("Microsoft Hyper-V Virtual System Snapshot Service"),
                ),
            ],
        ));
        for (class, name, element) in [
            (
                "Msvm_ImageManagementService",
                "vhdsvc",
                "Microsoft Hyper-V Image Management Service",
            ),
            (
                "Msvm_VirtualSystemReferencePointService",
                "vsrefsvc",
                "Microsoft Hyper-V Virtual System Reference Point Service",
            ),
            (
                "Msvm_VirtualSystemManagementService",
                "vmms",
                "Microsoft Hyper-V Virtual System Management Service",
            ),
            (
                switches::SERVICE,
                "nvspwmi",
                "Microsoft Hyper-V Virtual Ethernet Switch Management Service",
            ),
        ] {
            add(inst(
                class,
                &[
                    ("CreationClassName", text(class)),
                    ("Name", text(name)),
                    ("SystemCreationClassName", text("Msvm_ComputerSystem")),
                    ("SystemName", text(host)),
                    ("ElementName", text(element)),
                ],
            ));
        }
        for (name, id) in config::switches() {
            add(inst(
                "Msvm_VirtualEthernetSwitch",
                &[
                    ("CreationClassName", text("Msvm_VirtualEthernetSwitch")),
                    ("Name", text(id)),
                    ("ElementName", text(name)),
                ],
            ));
        }
        for (n, g) in GUESTS.iter().enumerate() {
            let id = guid(g.name);
            add(inst(
                "Msvm_ComputerSystem",
                &[
                    ("CreationClassName", text("Msvm_ComputerSystem")),
                    ("Name", text(&id)),
                    ("ElementName", text(g.name)),
                    ("Caption", text("Virtual Machine")),
                    ("EnabledState", text(if g.running { "2" } else { "3" })),
                    ("HealthState", text("5")),
                    ("OperationalStatus", text("2")),
                ],
            ));
            let root = format!("{VHD_ROOT}\\{}", g.name);
            let snap_root = if g.snapshot_elsewhere {
                format!("E:\\Checkpoints\\{}", g.name)
            } else {
                root.clone()
            };
            add(inst(
                "Msvm_VirtualSystemSettingData",
                &[
                    ("InstanceID", text(format!("Microsoft:{id}"))),
                    ("ElementName", text(g.name)),
                    ("VirtualSystemIdentifier", text(&id)),
                    (
                        "VirtualSystemType",
                        text("Microsoft:Hyper-V:System:Realized"),
                    ),
                    (
                        "VirtualSystemSubType",
                        text(if config::is_linux(g.name) {
                            "Microsoft:Hyper-V:SubType:1"
                        } else {
                            "Microsoft:Hyper-V:SubType:2"
                        }),
                    ),
                    (
                        "SecureBootEnabled",
                        text((!config::is_linux(g.name)).to_string()),
                    ),
                    ("Version", text("10.0")),
                    ("ConfigurationDataRoot", text(&root)),
                    ("SnapshotDataRoot", text(snap_root)),
                    ("Notes", text(g.os)),
                    ("Parent", Value::Null),
                ],
            ));
            for i in config::hardware(n, g.name, &id, host) {
                add(i);
            }
            add(shutdown::component(&id, true));
            // The backup (VSS) integration service: disabled in the Linux guest.
            add(inst(
                "Msvm_VssComponent",
                &[
                    ("CreationClassName", text("Msvm_VssComponent")),
                    ("DeviceID", text(format!("Microsoft:{id}\\VSS"))),
                    ("SystemCreationClassName", text("Msvm_ComputerSystem")),
                    ("SystemName", text(&id)),
                    ("ElementName", text("Backup (volume shadow copy)")),
                    ("EnabledState", text(if g.vss { "2" } else { "3" })),
                    ("OperationalStatus", text(if g.vss { "2" } else { "12" })),
                ],
            ));
            let folder = format!("{VHD_ROOT}\\{}", g.name);
            // Generation 1 (the Linux guests) boots from IDE 0:0; generation 2 has SCSI only.
            let (devices, places) = controllers::seed(&id, host, config::is_linux(g.name), g.disks);
            for d in devices {
                add(d);
            }
            for k in 0..g.disks {
                let name = format!("disk{k}");
                let disk_id = storage.create(
                    &id,
                    g.name,
                    &folder,
                    &name,
                    disk_size,
                    (n as u64) << 8 | u64::from(k),
                )?;
                add(inst(
                    "Msvm_StorageAllocationSettingData",
                    &[
                        (
                            "InstanceID",
                            text(format!("Microsoft:{id}\\{disk_id}\\0\\{k}\\L")),
                        ),
                        ("ElementName", text("Hard Disk Image")),
                        ("ResourceType", text("31")),
                        (
                            "ResourceSubType",
                            text("Microsoft:Hyper-V:Virtual Hard Disk"),
                        ),
                        (
                            "HostResource",
                            Value::Array(vec![text(format!("{folder}\\{name}.vhdx"))]),
                        ),
                        ("Parent", text(&places[k as usize].0)),
                        ("AddressOnParent", text(places[k as usize].1.to_string())),
                        ("VirtualQuantity", text(disk_size.to_string())),
                    ],
                ));
            }
        }
        st.storage = Some(storage);
        Ok(st)
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{:08X}", self.next_id)
    }

    /// The instance of `class` matching every selector that names one of its properties.
    fn find(&self, class: &str, selectors: &[(String, String)]) -> Option<&Instance> {
        if selectors.is_empty() {
            return None;
        }
        self.objects.get(class)?.iter().find(|i| {
            self.visible(i)
                && selectors
                    .iter()
                    .filter(|(k, _)| i.props.contains_key(k) || k == "__cimnamespace")
                    .all(|(k, v)| k == "__cimnamespace" || i.text(k) == Some(v.as_str()))
                && selectors.iter().any(|(k, _)| i.props.contains_key(k))
        })
    }

    fn find_mut(&mut self, class: &str, selectors: &[(String, String)]) -> Option<&mut Instance> {
        let at = {
            let found = self.find(class, selectors)?;
            self.objects.get(class)?.iter().position(|i| i == found)?
        };
        self.objects.get_mut(class)?.get_mut(at)
    }

    /// A completed job (the simulator's work is instant; clients still poll it).
    fn job(&mut self, kind: &str, error: Option<(u64, String)>) -> Epr {
        let id = self.id("JOB-");
        // 7 = completed, 10 = exception.
        let (state, code, desc) = match error {
            None => ("7", 0, String::new()),
            Some((c, d)) => ("10", c, d),
        };
        self.objects
            .entry("Msvm_ConcreteJob".into())
            .or_default()
            .push(inst(
                "Msvm_ConcreteJob",
                &[
                    ("InstanceID", text(&id)),
                    ("Caption", text(kind)),
                    ("JobState", text(state)),
                    ("PercentComplete", text("100")),
                    ("ErrorCode", text(code.to_string())),
                    ("ErrorDescription", text(desc)),
                ],
            ));
        Epr::new("Msvm_ConcreteJob", &[("InstanceID", id.as_str())])
    }
}

fn vssd_epr(i: &Instance) -> Epr {
    Epr::new(
        "Msvm_VirtualSystemSettingData",
        &[("InstanceID", i.text("InstanceID").unwrap_or(""))],
    )
}

/// A fault reply (HTTP 500), worded like WinRM.
struct Fault {
    subcode: &'static str,
    reason: String,
}

fn fault(subcode: &'static str, reason: impl Into<String>) -> Fault {
    Fault {
        subcode,
        reason: reason.into(),
    }
}

impl HypervSim {
    /// Seeds the host and starts the listeners.
    pub async fn start(cfg: HypervSimConfig) -> Result<Self, HypervSimError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|source| HypervSimError::Io {
            what: format!("create {}", cfg.dir.display()),
            source,
        })?;
        let disk_size = cfg.disk_mib.max(1) << 20;
        let (host, dir) = (cfg.host_name.clone(), cfg.dir.clone());
        let mut state = tokio::task::spawn_blocking(move || State::seed(&host, &dir, disk_size))
            .await
            .map_err(|e| HypervSimError::Other(e.to_string()))?
            .map_err(|e| HypervSimError::Other(format!("seeding the disks: {e}")))?;
        let shutdown = CancellationToken::new();
        let (sim_agent, data_paths) =
            agent::start(&cfg.dir, &cfg.data_paths, shutdown.clone()).await?;
        state.data_paths = data_paths;
        let node_names = cluster::node_names(&cfg.host_name, cfg.cluster_nodes.max(1));
        if node_names.len() > 1 {
            state.seed_cluster("HV-CLUSTER", &node_names);
        }
        let shared = Arc::new(Shared {
            username: cfg.username.clone(),
            password: cfg.password.clone(),
            host_name: cfg.host_name.clone(),
            auth: auth::Auth::new(&cfg.username, &cfg.password)
                .with_kerberos(cfg.kerberos.as_ref())
                .map_err(HypervSimError::Other)?,
            state: std::sync::Mutex::new(state),
        });
        let cert = ferry_tls::SelfSigned::generate(&["localhost", "127.0.0.1"])
            .map_err(|e| HypervSimError::Other(e.to_string()))?;
        let fingerprint = cert.fingerprint();
        shared
            .auth
            .set_cbt(cbt::CbtCheck::new(cfg.cbt, &cert.cert_der).map_err(HypervSimError::Other)?);
        let tls = cert
            .server_config()
            .map_err(|e| HypervSimError::Other(e.to_string()))?;
        let app = axum::Router::new()
            .route("/wsman", axum::routing::post(handle))
            .with_state(shared.clone())
            .layer(Extension(cluster::Viewer(
                (node_names.len() > 1).then(|| node_names[0].clone()),
            )));
        let bind = |a: SocketAddr| async move {
            tokio::net::TcpListener::bind(a)
                .await
                .map_err(|source| HypervSimError::Io {
                    what: format!("bind {a}"),
                    source,
                })
        };
        let l = bind(cfg.listen).await?;
        let addr = l.local_addr().map_err(|source| HypervSimError::Io {
            what: "local address".into(),
            source,
        })?;
        let server = ferry_http::Server::new(l)
            .tls(tls)
            .grace(std::time::Duration::ZERO);
        let https_app = app.clone().layer(Extension(auth::Channel::Tls));
        tokio::spawn(server.run(https_app, shutdown.clone()));
        let http_url = match cfg.listen_http {
            Some(a) => {
                let l = bind(a).await?;
                let addr = l.local_addr().map_err(|source| HypervSimError::Io {
                    what: "local address".into(),
                    source,
                })?;
                let server = ferry_http::Server::new(l).grace(std::time::Duration::ZERO);
                let app = app.layer(Extension(auth::Channel::Plain));
                tokio::spawn(server.run(app, shutdown.clone()));
                Some(format!("http://{addr}/wsman"))
            }
            None => None,
        };
        let url = format!("https://{addr}/wsman");
        let nodes = cluster::start_nodes(
            &shared,
            &node_names,
            addr.ip(),
            &url,
            &fingerprint,
            &shutdown,
        )
        .await?;
        Ok(Self {
            shared,
            shutdown,
            url,
            http_url,
            fingerprint,
            dir: cfg.dir,
            agent: sim_agent,
            nodes,
        })
    }

    /// The HTTPS endpoint, `https://127.0.0.1:PORT/wsman`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The plain HTTP endpoint, when one was asked for.
    pub fn http_url(&self) -> Option<&str> {
        self.http_url.as_deref()
    }

    /// `sha256:…` of the HTTPS certificate.
    pub fn tls_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Login user.
    pub fn username(&self) -> &str {
        &self.shared.username
    }

    /// Login password.
    pub fn password(&self) -> &str {
        &self.shared.password
    }

    /// How many instances of `class` exist (tests: snapshots left, jobs run).
    pub fn count(&self, class: &str, filter: impl Fn(&Instance) -> bool) -> usize {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.objects
            .get(class)
            .map(|v| v.iter().filter(|i| filter(i)).count())
            .unwrap_or(0)
    }

    /// One JSON line for `ferry sim hyperv`.
    pub fn info_json(&self) -> String {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let vms: Vec<serde_json::Value> = st
            .objects
            .get("Msvm_ComputerSystem")
            .map(|v| {
                v.iter()
                    .filter(|i| i.text("Caption") == Some("Virtual Machine"))
                    .map(|i| {
                        let id = i.text("Name").unwrap_or("");
                        let disks: Vec<serde_json::Value> = st
                            .storage
                            .iter()
                            .flat_map(|s| {
                                s.disks
                                    .iter()
                                    .filter(|d| d.vm_id == id)
                                    .map(move |d| (s, d))
                            })
                            .map(|(s, d)| {
                                serde_json::json!({
                                    "name": d.name,
                                    "id": d.id,
                                    "path": d.host_path,
                                    "size": d.size,
                                    "live": s.live_path(d),
                                })
                            })
                            .collect();
                        serde_json::json!({
                            "name": i.text("ElementName"),
                            "id": id,
                            "state": i.text("EnabledState"),
                            "disks": disks,
                            "owner": st.cluster.as_ref().and_then(|c| c.owners.get(id)),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut v = serde_json::json!({
            "url": self.url,
            "http_url": self.http_url,
            "username": self.shared.username,
            "password": self.shared.password,
            "tls_fingerprint": self.fingerprint,
            "host": self.shared.host_name,
            "dir": self.dir,
            // Where the proxy sees the host's volumes (a source's `san-paths`).
            "san_paths": { "C:\\": self.dir.join("volumes").join("C") },
            // The host agent (`network`) and the snapshot LUNs (`san-luns`).
            "agent": self.agent.info(),
            "san_luns": agent::lun_files(&st.data_paths, st.storage.as_ref()),
            "vms": vms,
        });
        if let Some(c) = cluster::info(&st, &self.nodes) {
            v["cluster"] = c;
        }
        v.to_string()
    }

    /// NTLM logins completed so far (tests: a client keeps its session).
    pub fn ntlm_logins(&self) -> u64 {
        self.shared.auth.logins()
    }

    /// Kerberos logins completed so far.
    pub fn kerberos_logins(&self) -> u64 {
        self.shared.auth.kerberos_logins()
    }

    /// Tests: the next sealed reply gets one bit flipped (a tampered message).
    pub fn tamper_next_reply(&self) {
        self.shared.auth.tamper_next_reply();
    }

    /// Stops the listeners.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for HypervSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(chan): Extension<auth::Channel>,
    Extension(conn): Extension<ferry_http::Connection>,
    Extension(viewer): Extension<cluster::Viewer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = match shared.auth.admit(chan, &conn, &headers, body) {
        Err(r) => *r,
        Ok(auth::Admitted::Empty) => StatusCode::OK.into_response(),
        Ok(auth::Admitted::Clear(body)) => answer(&shared, &viewer, &body),
        Ok(auth::Admitted::Sealed(body, key)) => {
            let reply = answer(&shared, &viewer, &body);
            shared.auth.seal(key, reply).await
        }
    };
    shared.auth.mutual(chan, &conn, r)
}

/// Serves one (authenticated, unsealed) SOAP request.
fn answer(shared: &Shared, viewer: &cluster::Viewer, body: &[u8]) -> Response {
    let req = match xml::parse(body) {
        Ok(n) if n.name == "Envelope" => n,
        Ok(_) | Err(_) => {
            return reply_fault(
                "",
                "",
                fault(
                    "InvalidMessageInformationHeader",
                    "The request is not a SOAP envelope.",
                ),
            );
        }
    };
    let h = |p: &str| {
        req.text_at(&format!("Header/{p}"))
            .unwrap_or("")
            .to_string()
    };
    let action = h("Action");
    let message_id = h("MessageID");
    let resource = h("ResourceURI");
    let selectors: Vec<(String, String)> = req
        .at("Header/SelectorSet")
        .map(|s| {
            s.all("Selector")
                .map(|x| {
                    (
                        x.attr("Name").unwrap_or("").to_string(),
                        x.text.trim().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let empty = Node::default();
    let body = req
        .child("Body")
        .and_then(|b| b.children.first())
        .unwrap_or(&empty);
    let result = {
        let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.viewer = viewer.0.clone();
        node_agent::before(&mut st);
        let r = dispatch(shared, &mut st, &action, &resource, &selectors, body);
        migrate::after(&mut st, &action, &resource);
        r
    };
    match result {
        Ok((resp_action, xml)) => reply_ok(&resp_action, &message_id, &xml),
        Err(f) => reply_fault(&action, &message_id, f),
    }
}

fn envelope(action: &str, relates_to: &str, body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><s:Envelope xml:lang="en-US" xmlns:s="{NS_SOAP}" xmlns:a="{NS_ADDRESSING}" xmlns:x="{NS_TRANSFER}" xmlns:w="{NS_WSMAN}" xmlns:n="{NS_ENUMERATION}" xmlns:rsp="{NS_SHELL}" xmlns:p="{NS_MS_WSMAN}"><s:Header><a:Action>{}</a:Action><a:MessageID>uuid:{}</a:MessageID><a:To>{ANONYMOUS}</a:To><a:RelatesTo>{}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>"#,
        escape(action),
        wsman::new_uuid().to_uppercase(),
        escape(relates_to)
    )
}

fn soap_response(status: StatusCode, xml: String) -> Response {
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/soap+xml;charset=UTF-8",
        )],
        xml,
    )
        .into_response()
}

fn reply_ok(action: &str, relates_to: &str, body: &str) -> Response {
    soap_response(StatusCode::OK, envelope(action, relates_to, body))
}

fn reply_fault(_action: &str, relates_to: &str, f: Fault) -> Response {
    let body = format!(
        r#"<s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>w:{}</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">{}</s:Text></s:Reason><s:Detail><f:WSManFault xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault" Code="2150858778" Machine="localhost"><f:Message>{}</f:Message></f:WSManFault></s:Detail></s:Fault>"#,
        f.subcode,
        escape(&f.reason),
        escape(&f.reason)
    );
    soap_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        envelope(
            "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault",
            relates_to,
            &body,
        ),
    )
}

const SHELL_CMD: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd";

type Outcome = Result<(String, String), Fault>;

fn dispatch(
    shared: &Shared,
    st: &mut State,
    action: &str,
    resource: &str,
    selectors: &[(String, String)],
    body: &Node,
) -> Outcome {
    let respond = |suffix: &str, xml: String| Ok((format!("{action}{suffix}"), xml));
    if resource == SHELL_CMD {
        return shell(shared, st, action, selectors, body);
    }
    let Some(class) = resource
        .strip_prefix(cim::VIRTUALIZATION_V2)
        .or_else(|| st.cluster_class(resource))
    else {
        return Err(fault(
            "DestinationUnreachable",
            format!(
                "The WS-Management service cannot process the request. The resource URI {resource} is not supported by this simulator."
            ),
        ));
    };
    match action {
        ACTION_GET => {
            let i = st.find(class, selectors).ok_or_else(not_found)?;
            respond("Response", i.to_xml(resource))
        }
        ACTION_ENUMERATE => {
            let items = enumerate(st, class, body)?;
            let optimize = body.child("OptimizeEnumeration").is_some();
            let max = body
                .text_at("MaxElements")
                .and_then(|m| m.parse::<usize>().ok())
                .unwrap_or(1)
                .max(1);
            let mut left: VecDeque<Instance> = items.into();
            let mut first = String::new();
            if optimize {
                first.push_str("<w:Items>");
                for i in left.drain(..max.min(left.len())) {
                    first.push_str(&i.to_xml(&cim::class_uri(&i.class)));
                }
                first.push_str("</w:Items>");
            }
            let ctx = st.id("uuid:ENUM-");
            let end = if optimize && left.is_empty() {
                "<w:EndOfSequence/>"
            } else {
                st.enumerations.insert(ctx.clone(), left);
                ""
            };
            respond(
                "Response",
                format!(
                    "<n:EnumerateResponse><n:EnumerationContext>{ctx}</n:EnumerationContext>{first}{end}</n:EnumerateResponse>"
                ),
            )
        }
        ACTION_PULL => {
            let ctx = body.text_at("EnumerationContext").unwrap_or("").to_string();
            let max = body
                .text_at("MaxElements")
                .and_then(|m| m.parse::<usize>().ok())
                .unwrap_or(1)
                .max(1);
            let mut left = st.enumerations.remove(&ctx).ok_or_else(|| {
                fault(
                    "InvalidEnumerationContext",
                    "The enumeration context supplied in the message is not valid.",
                )
            })?;
            let mut items = String::from("<n:Items>");
            for i in left.drain(..max.min(left.len())) {
                items.push_str(&i.to_xml(&cim::class_uri(&i.class)));
            }
            items.push_str("</n:Items>");
            let tail = if left.is_empty() {
                "<n:EndOfSequence/>".to_string()
            } else {
                st.enumerations.insert(ctx.clone(), left);
                format!("<n:EnumerationContext>{ctx}</n:EnumerationContext>")
            };
            respond(
                "Response",
                format!("<n:PullResponse>{tail}{items}</n:PullResponse>"),
            )
        }
        ACTION_RELEASE => {
            let ctx = body.text_at("EnumerationContext").unwrap_or("");
            st.enumerations.remove(ctx);
            respond("Response", String::new())
        }
        a if a.starts_with(resource) && a.len() > resource.len() + 1 => {
            let method = &a[resource.len() + 1..];
            let out = invoke(st, class, selectors, method, body)?;
            let mut o = out;
            o.class = format!("{method}_OUTPUT");
            respond("Response", o.to_xml(resource))
        }
        other => Err(fault(
            "ActionNotSupported",
            format!("The action {other} is not supported by the service."),
        )),
    }
}

fn not_found() -> Fault {
    fault(
        "InvalidSelectors",
        "The WS-Management service cannot process the request because the request contained invalid selectors for the resource.",
    )
}

/// Instances of `class`, through a WQL filter when the body carries one.
fn enumerate(st: &State, class: &str, body: &Node) -> Result<Vec<Instance>, Fault> {
    let Some(filter) = body.child("Filter") else {
        if class == "*" {
            return Err(fault(
                "InvalidParameter",
                "An enumeration of the namespace needs a filter.",
            ));
        }
        return Ok(st
            .objects
            .get(class)
            .map(|v| v.iter().filter(|i| st.visible(i)).cloned().collect())
            .unwrap_or_default());
    };
    let q = filter.text.trim();
    let bad = || {
        fault(
            "CannotProcessFilter",
            format!("The WQL query `{q}` is not valid."),
        )
    };
    let (from, cond) = match q.find(" WHERE ").or_else(|| q.find(" where ")) {
        Some(w) => (&q[..w], Some(&q[w + 7..])),
        None => (q, None),
    };
    let words: Vec<&str> = from.split_whitespace().collect();
    let [select, star, fromkw, cls] = words.as_slice() else {
        return Err(bad());
    };
    if !select.eq_ignore_ascii_case("select")
        || *star != "*"
        || !fromkw.eq_ignore_ascii_case("from")
    {
        return Err(bad());
    }
    let mut conds = Vec::new();
    if let Some(c) = cond {
        for part in c.split(" AND ").flat_map(|p| p.split(" and ")) {
            let (k, v) = part.split_once('=').ok_or_else(bad)?;
            let v = v.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(v);
            conds.push((k.trim().to_string(), v.to_string()));
        }
    }
    Ok(st
        .objects
        .get(*cls)
        .map(|v| {
            v.iter()
                .filter(|i| st.visible(i))
                .filter(|i| conds.iter().all(|(k, v)| i.text(k) == Some(v.as_str())))
                .cloned()
                .collect()
        })
        .unwrap_or_default())
}

fn param_ref(body: &Node, name: &str) -> Option<Epr> {
    body.child(name).and_then(Epr::from_node)
}

/// Ranges one `GetVirtualDiskChanges` answer holds at most (callers continue from
/// `ByteOffset + ProcessedByteLength`).
const CHANGES_PAGE: usize = 16;

fn set_rv(out: &mut Instance, v: u64) {
    out.props.insert("ReturnValue".into(), text(v.to_string()));
}

/// Answers with a job that ended as `result` says (the simulator's work is instant).
fn job_out(st: &mut State, out: &mut Instance, kind: &str, result: Result<(), String>) {
    let job = st.job(kind, result.err().map(|m| (32768, m)));
    out.props.insert("Job".into(), Value::Ref(job));
    set_rv(out, 4096);
}

/// The instances of `class` whose InstanceID starts with `prefix` go.
fn remove_by_prefix(st: &mut State, class: &str, prefix: &str) {
    if let Some(v) = st.objects.get_mut(class) {
        v.retain(|i| !i.text("InstanceID").is_some_and(|x| x.starts_with(prefix)));
    }
}

fn invoke(
    st: &mut State,
    class: &str,
    selectors: &[(String, String)],
    method: &str,
    body: &Node,
) -> Result<Instance, Fault> {
    if class == sidedoor::CLASS {
        if let Some(r) = cluster::sidedoor(st, method, body) {
            return r;
        }
        if let Some(r) = migrate::sidedoor(st, method, body) {
            return r;
        }
        if let Some(r) = node_agent::sidedoor(st, method, body) {
            return r;
        }
        if let Some(r) = shutdown::sidedoor(st, method, body) {
            return r;
        }
        return sidedoor::invoke(st, method, body);
    }
    if st.find(class, selectors).is_none() {
        return Err(not_found());
    }
    let mut out = Instance::default();
    let call = format!("{class}.{method}");
    let fail = match st.fail_next.get_mut(&call) {
        Some((skip, _)) if *skip > 0 => {
            *skip -= 1;
            false
        }
        Some((_, n)) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    };
    if fail {
        job_out(
            st,
            &mut out,
            method,
            Err(format!(
                "{call} failed (injected by the simulator's side door)"
            )),
        );
        return Ok(out);
    }
    match (class, method) {
        (define::SERVICE, m) => define::invoke(st, m, body, &mut out)?,
        (shutdown::CLASS, m) => shutdown::invoke(st, selectors, m, body, &mut out)?,
        (switches::SERVICE, m) => switches::invoke(st, m, body, &mut out)?,
        ("Msvm_VirtualSystemSnapshotService", "CreateSnapshot")
            if checkpoints::is_standard(body) =>
        {
            checkpoints::create(st, body, &mut out)?;
        }
        ("Msvm_VirtualSystemSnapshotService", "ApplySnapshot") => {
            checkpoints::apply(st, body, &mut out)?;
        }
        ("Msvm_VirtualSystemSnapshotService", "CreateSnapshot") => {
            create_snapshot(st, body, &mut out)?;
        }
        ("Msvm_VirtualSystemSnapshotService", "DestroySnapshot")
        | ("Msvm_VirtualSystemSnapshotService", "ConvertToReferencePoint") => {
            let snap = param_ref(body, "AffectedSnapshot").ok_or_else(|| {
                fault(
                    "InvalidParameter",
                    format!("{method} needs AffectedSnapshot."),
                )
            })?;
            let convert = method == "ConvertToReferencePoint";
            let found = st
                .find("Msvm_VirtualSystemSettingData", &snap.selectors)
                .filter(|i| {
                    let t = i.text("VirtualSystemType").unwrap_or("");
                    // Only recovery snapshots can be converted.
                    if convert {
                        t == "Microsoft:Hyper-V:Snapshot:Recovery"
                    } else {
                        t.contains(":Snapshot:")
                    }
                })
                .cloned();
            let Some(found) = found else {
                if convert {
                    set_rv(&mut out, 32773);
                } else {
                    let job = st.job(method, Some((32775, "The snapshot does not exist.".into())));
                    out.props.insert("Job".into(), Value::Ref(job));
                    set_rv(&mut out, 4096);
                }
                return Ok(out);
            };
            if !convert && found.text("VirtualSystemType") == Some(checkpoints::STANDARD) {
                checkpoints::destroy(st, &found, &mut out);
                return Ok(out);
            }
            let id = found.text("InstanceID").unwrap_or("").to_string();
            let vm = found
                .text("VirtualSystemIdentifier")
                .unwrap_or("")
                .to_string();
            if let Some(v) = st.objects.get_mut("Msvm_VirtualSystemSettingData") {
                v.retain(|i| i != &found);
            }
            remove_by_prefix(st, "Msvm_StorageAllocationSettingData", &format!("{id}\\"));
            let storage = st.storage.as_mut().ok_or_else(no_storage)?;
            let frozen = storage.frozen.get(&id).cloned().unwrap_or_default();
            let merged = storage.release(&vm, &id);
            if convert {
                // The reference point keeps the checkpoint's InstanceID (ADR 0115).
                let disks: Vec<Value> = frozen.iter().map(|f| text(&f.disk_id)).collect();
                let rcts: Vec<Value> = frozen.iter().map(|f| text(&f.rct_id)).collect();
                st.objects
                    .entry("Msvm_VirtualSystemReferencePoint".into())
                    .or_default()
                    .push(inst(
                        "Msvm_VirtualSystemReferencePoint",
                        &[
                            ("InstanceID", text(&id)),
                            ("VirtualSystemIdentifier", text(vm)),
                            ("ReferencePointType", text("2")),
                            (
                                "ConsistencyLevel",
                                text(found.text("ConsistencyLevel").unwrap_or("1")),
                            ),
                            ("VirtualDiskIdentifiers", Value::Array(disks)),
                            ("ResilientChangeTrackingIdentifiers", Value::Array(rcts)),
                        ],
                    ));
                out.props.insert(
                    "ResultingReferencePoint".into(),
                    Value::Ref(Epr::new(
                        "Msvm_VirtualSystemReferencePoint",
                        &[("InstanceID", id.as_str())],
                    )),
                );
            }
            job_out(st, &mut out, method, merged);
        }
        ("Msvm_VirtualSystemReferencePointService", "DestroyReferencePoint") => {
            let rp = param_ref(body, "AffectedReferencePoint").ok_or_else(|| {
                fault(
                    "InvalidParameter",
                    "DestroyReferencePoint needs AffectedReferencePoint.",
                )
            })?;
            let found = st
                .find("Msvm_VirtualSystemReferencePoint", &rp.selectors)
                .cloned();
            let r = match found {
                Some(f) => {
                    if let Some(v) = st.objects.get_mut("Msvm_VirtualSystemReferencePoint") {
                        v.retain(|i| i != &f);
                    }
                    Ok(())
                }
                None => Err("The reference point does not exist.".to_string()),
            };
            job_out(st, &mut out, method, r);
        }
        ("Msvm_ImageManagementService", "GetVirtualDiskChanges") => {
            let path = body.text_at("Path").unwrap_or("").to_string();
            if let Err(m) = st.image_reachable(&path) {
                job_out(st, &mut out, method, Err(m));
                return Ok(out);
            }
            let since = body
                .text_at("TargetSnapshotId")
                .or_else(|| body.text_at("LimitId"))
                .unwrap_or("")
                .to_string();
            let num = |k: &str| body.text_at(k).and_then(|v| v.parse::<u64>().ok());
            let (Some(off), Some(len)) = (num("ByteOffset"), num("ByteLength")) else {
                set_rv(&mut out, 32773);
                return Ok(out);
            };
            let storage = st.storage.as_ref().ok_or_else(no_storage)?;
            match storage.changes(&path, &since, off, len, CHANGES_PAGE) {
                Ok((ranges, processed)) => {
                    out.props
                        .insert("ProcessedByteLength".into(), text(processed.to_string()));
                    out.props.insert(
                        "ChangedByteOffsets".into(),
                        Value::Array(ranges.iter().map(|r| text(r.0.to_string())).collect()),
                    );
                    out.props.insert(
                        "ChangedByteLengths".into(),
                        Value::Array(ranges.iter().map(|r| text(r.1.to_string())).collect()),
                    );
                    set_rv(&mut out, 0);
                }
                Err(m) => job_out(st, &mut out, method, Err(m)),
            }
        }
        ("Msvm_ImageManagementService", "GetVirtualHardDiskSettingData") => {
            let path = body.text_at("Path").unwrap_or("").to_string();
            if let Err(m) = st.image_reachable(&path) {
                job_out(st, &mut out, method, Err(m));
                return Ok(out);
            }
            let storage = st.storage.as_ref().ok_or_else(no_storage)?;
            match storage.describe(&path) {
                Some((size, parent)) => {
                    let (kind, parent) = match &parent {
                        Some(p) => ("4", p.as_str()),
                        None => ("3", ""),
                    };
                    let size = size.to_string();
                    let data = cim::embedded_instance(
                        "Msvm_VirtualHardDiskSettingData",
                        &[
                            ("Path", "string", &path),
                            ("ParentPath", "string", parent),
                            ("Format", "uint16", "3"),
                            ("Type", "uint16", kind),
                            ("MaxInternalSize", "uint64", &size),
                            ("BlockSize", "uint32", "1048576"),
                            ("LogicalSectorSize", "uint32", "512"),
                        ],
                    );
                    out.props.insert("SettingData".into(), text(data));
                    set_rv(&mut out, 0);
                }
                None => {
                    let r = Err(format!(
                        "The system cannot find the file specified: '{path}'."
                    ));
                    job_out(st, &mut out, method, r);
                }
            }
        }
        ("Msvm_ComputerSystem", "RequestStateChange") => {
            let want = body.text_at("RequestedState").unwrap_or("");
            let now = st
                .find(class, selectors)
                .and_then(|v| v.text("EnabledState"))
                .unwrap_or("")
                .to_string();
            let state = match want {
                // Saving needs a running VM.
                "32769" if now != "2" => {
                    set_rv(&mut out, 32775);
                    return Ok(out);
                }
                "2" | "3" | "6" | "9" | "32769" => want.to_string(),
                _ => {
                    set_rv(&mut out, 32773);
                    return Ok(out);
                }
            };
            // 32769 is "saved"; it shows as EnabledState 6 (enabled but offline).
            let shown = if state == "32769" {
                "6".to_string()
            } else {
                state
            };
            if let Some(vm) = st.find_mut(class, selectors) {
                vm.props.insert("EnabledState".into(), text(shown));
            }
            job_out(st, &mut out, method, Ok(()));
        }
        _ => {
            return Err(fault(
                "ActionNotSupported",
                format!("The method {class}.{method} is not supported by this simulator."),
            ));
        }
    }
    Ok(out)
}

fn no_storage() -> Fault {
    fault("InternalError", "The host's storage is not available.")
}

/// Why a running guest cannot take an application-consistent checkpoint, if it cannot.
fn vss_refusal(vm_name: &str) -> Option<&'static str> {
    let g = GUESTS.iter().find(|g| g.name == vm_name)?;
    if !g.vss {
        Some("the Backup (volume shadow copy) integration service is not running in the guest")
    } else if g.dynamic_disk {
        Some(
            "the guest's volume shadow copy failed: the VM has dynamic disks, which the child VM snapshot cannot include",
        )
    } else {
        None
    }
}

fn create_snapshot(st: &mut State, body: &Node, out: &mut Instance) -> Result<(), Fault> {
    let vm = param_ref(body, "AffectedSystem")
        .ok_or_else(|| fault("InvalidParameter", "CreateSnapshot needs AffectedSystem."))?;
    let Some(sys) = st.find("Msvm_ComputerSystem", &vm.selectors).cloned() else {
        set_rv(out, 32773);
        return Ok(());
    };
    let vm_id = sys.text("Name").unwrap_or("").to_string();
    let vm_name = sys.text("ElementName").unwrap_or("").to_string();
    let kind = body.text_at("SnapshotType").unwrap_or("2");
    let settings = body
        .text_at("SnapshotSettings")
        .and_then(cim::parse_embedded);
    if let Some((c, _)) = &settings
        && c != "Msvm_VirtualSystemSnapshotSettingData"
    {
        set_rv(out, 32773);
        return Ok(());
    }
    let vtype = match kind {
        "32768" => "Microsoft:Hyper-V:Snapshot:Recovery",
        "2" => "Microsoft:Hyper-V:Snapshot:Realized",
        _ => {
            set_rv(out, 32773);
            return Ok(());
        }
    };
    let prop = |k: &str| {
        settings
            .as_ref()
            .and_then(|(_, p)| p.get(k).cloned())
            .filter(|v| !v.is_empty())
    };
    let consistency = prop("ConsistencyLevel").unwrap_or_else(|| "1".into());
    // Application consistency is the guest's VSS through the integration services.
    if consistency == "1"
        && sys.text("EnabledState") == Some("2")
        && let Some(why) = vss_refusal(&vm_name)
    {
        let m = format!(
            "Could not create an application-consistent checkpoint of '{vm_name}': {why}. (Virtual machine ID {vm_id})"
        );
        job_out(st, out, "CreateSnapshot", Err(m));
        return Ok(());
    }
    let snap_guid = guid(&st.id(&vm_id));
    let snap_id = format!("Microsoft:{snap_guid}");
    let storage = st.storage.as_mut().ok_or_else(no_storage)?;
    let frozen = match storage.freeze(&vm_id, &snap_id, &snap_guid) {
        Ok(f) => f,
        Err(m) => {
            job_out(st, out, "CreateSnapshot", Err(m));
            return Ok(());
        }
    };
    // A snapshot LUN shows the checkpoint's files as an array snapshot taken now would.
    if let Some(l) = &st.data_paths.luns
        && let Err(m) = l.checkpoint_taken(storage, &vm_id, &frozen)
    {
        let _ = storage.release(&vm_id, &snap_id);
        job_out(st, out, "CreateSnapshot", Err(m));
        return Ok(());
    }
    let name = prop("ElementName").unwrap_or_else(|| format!("{vm_name} - checkpoint"));
    let snap = inst(
        "Msvm_VirtualSystemSettingData",
        &[
            ("InstanceID", text(&snap_id)),
            ("ElementName", text(name)),
            ("VirtualSystemIdentifier", text(&vm_id)),
            ("VirtualSystemType", text(vtype)),
            ("ConsistencyLevel", text(consistency)),
            ("Parent", Value::Null),
        ],
    );
    let epr = vssd_epr(&snap);
    st.objects
        .entry("Msvm_VirtualSystemSettingData".into())
        .or_default()
        .push(snap);
    for (k, f) in frozen.iter().enumerate() {
        st.objects
            .entry("Msvm_StorageAllocationSettingData".into())
            .or_default()
            .push(inst(
                "Msvm_StorageAllocationSettingData",
                &[
                    (
                        "InstanceID",
                        text(format!("{snap_id}\\{}\\0\\{k}\\L", f.disk_id)),
                    ),
                    ("ElementName", text("Hard Disk Image")),
                    ("ResourceType", text("31")),
                    (
                        "ResourceSubType",
                        text("Microsoft:Hyper-V:Virtual Hard Disk"),
                    ),
                    ("HostResource", Value::Array(vec![text(&f.host_path)])),
                    ("AddressOnParent", text(k.to_string())),
                ],
            ));
    }
    job_out(st, out, "CreateSnapshot", Ok(()));
    out.props
        .insert("ResultingSnapshot".into(), Value::Ref(epr));
    Ok(())
}

fn shell(
    shared: &Shared,
    st: &mut State,
    action: &str,
    selectors: &[(String, String)],
    body: &Node,
) -> Outcome {
    let shell_id = selectors
        .iter()
        .find(|(k, _)| k == "ShellId")
        .map(|(_, v)| v.clone());
    let no_shell = || fault("InvalidSelectors", "The shell was not found on the server.");
    let respond = |a: &str, xml: String| Ok((a.to_string(), xml));
    match action {
        ACTION_CREATE => {
            let id = wsman::new_uuid().to_uppercase();
            st.shells.insert(id.clone(), HashMap::new());
            respond(
                "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse",
                format!(
                    "<x:ResourceCreated><a:Address>{ANONYMOUS}</a:Address><a:ReferenceParameters><w:ResourceURI>{SHELL_CMD}</w:ResourceURI><w:SelectorSet><w:Selector Name=\"ShellId\">{id}</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated><rsp:Shell><rsp:ShellId>{id}</rsp:ShellId><rsp:ResourceUri>{SHELL_CMD}</rsp:ResourceUri><rsp:Owner>{}</rsp:Owner></rsp:Shell>",
                    escape(&shared.username)
                ),
            )
        }
        ACTION_DELETE => {
            let id = shell_id.ok_or_else(no_shell)?;
            st.shells.remove(&id).ok_or_else(no_shell)?;
            respond(
                "http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse",
                String::new(),
            )
        }
        a if a == format!("{NS_SHELL}/Command") => {
            let id = shell_id.ok_or_else(no_shell)?;
            let command = body.text_at("Command").unwrap_or("").to_string();
            let args: Vec<String> = body
                .all("Arguments")
                .map(|a| a.text.trim().to_string())
                .collect();
            let cmd = run(shared, &command, &args);
            let cid = wsman::new_uuid().to_uppercase();
            st.shells
                .get_mut(&id)
                .ok_or_else(no_shell)?
                .insert(cid.clone(), cmd);
            respond(
                &format!("{NS_SHELL}/CommandResponse"),
                format!(
                    "<rsp:CommandResponse><rsp:CommandId>{cid}</rsp:CommandId></rsp:CommandResponse>"
                ),
            )
        }
        a if a == format!("{NS_SHELL}/Receive") => {
            let id = shell_id.ok_or_else(no_shell)?;
            let cid = body
                .child("DesiredStream")
                .and_then(|d| d.attr("CommandId"))
                .unwrap_or("")
                .to_string();
            let cmd = st
                .shells
                .get(&id)
                .ok_or_else(no_shell)?
                .get(&cid)
                .cloned()
                .ok_or_else(|| fault("InvalidParameter", "The command was not found."))?;
            let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
            respond(
                &format!("{NS_SHELL}/ReceiveResponse"),
                format!(
                    "<rsp:ReceiveResponse><rsp:Stream Name=\"stdout\" CommandId=\"{cid}\">{}</rsp:Stream><rsp:Stream Name=\"stderr\" CommandId=\"{cid}\">{}</rsp:Stream><rsp:Stream Name=\"stdout\" CommandId=\"{cid}\" End=\"true\"></rsp:Stream><rsp:Stream Name=\"stderr\" CommandId=\"{cid}\" End=\"true\"></rsp:Stream><rsp:CommandState CommandId=\"{cid}\" State=\"{NS_SHELL}/CommandState/Done\"><rsp:ExitCode>{}</rsp:ExitCode></rsp:CommandState></rsp:ReceiveResponse>",
                    b64(&cmd.stdout),
                    b64(&cmd.stderr),
                    cmd.exit
                ),
            )
        }
        a if a == format!("{NS_SHELL}/Signal") => {
            let id = shell_id.ok_or_else(no_shell)?;
            let cid = body.attr("CommandId").unwrap_or("").to_string();
            if let Some(s) = st.shells.get_mut(&id) {
                s.remove(&cid);
            }
            respond(
                &format!("{NS_SHELL}/SignalResponse"),
                "<rsp:SignalResponse/>".to_string(),
            )
        }
        other => Err(fault(
            "ActionNotSupported",
            format!("The action {other} is not supported by the shell."),
        )),
    }
}

/// The few commands the simulated host's `cmd` knows.
fn run(shared: &Shared, command: &str, args: &[String]) -> Cmd {
    let ok = |s: String| Cmd {
        stdout: format!("{s}\r\n").into_bytes(),
        stderr: Vec::new(),
        exit: 0,
    };
    // pywinrm sends `cmd` and its arguments either split or as one command line.
    let line = std::iter::once(command.to_string())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or("").to_ascii_lowercase();
    let rest: Vec<&str> = words.collect();
    match verb.as_str() {
        "hostname" => ok(shared.host_name.clone()),
        "whoami" => ok(format!("{}\\{}", shared.host_name.to_lowercase(), shared.username.to_lowercase())),
        "echo" => ok(rest.join(" ")),
        "exit" => Cmd {
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: rest.first().and_then(|c| c.parse().ok()).unwrap_or(0),
        },
        _ => Cmd {
            stdout: Vec::new(),
            stderr: format!(
                "'{verb}' is not recognized as an internal or external command,\r\noperable program or batch file.\r\n"
            )
            .into_bytes(),
            exit: 1,
        },
    }
}
