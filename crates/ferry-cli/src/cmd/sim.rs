//! `ferry sim xen|vmware|hyperv --listen HOST:PORT --dir DIR`: runs the XenAPI or vSphere simulator with a seeded
//! inventory until killed, after printing one JSON line (`url`, `username`, `password`,
//! `tls_fingerprint`, `dir`) on stdout.

use anyhow::Context;
use ferry_sim::xen::{XenSim, XenSimConfig};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// `ferry sim …`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// A Citrix Hypervisor / XCP-ng pool: XenAPI over HTTPS, NBD with TLS, VHD storage.
    Xen(XenArgs),
    /// A vCenter: govmomi's vcsim behind an HTTPS front that adds disks, VMDK files on a
    /// datastore directory and changed block tracking.
    Vmware(VmwareArgs),
    /// A Hyper-V host: WS-Management (WinRM) with Basic authentication over HTTPS (and HTTP on
    /// request), WMI `root/virtualization/v2` with snapshots, reference points and jobs.
    Hyperv(HypervArgs),
}

/// Arguments of `ferry sim hyperv`.
#[derive(Debug, clap::Args)]
pub struct HypervArgs {
    /// HTTPS address, WinRM's 5986 (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:5986")]
    listen: SocketAddr,
    /// Plain HTTP address, WinRM's 5985 (off unless given).
    #[arg(long)]
    listen_http: Option<SocketAddr>,
    /// Where the host's files are stored.
    #[arg(long)]
    dir: PathBuf,
    /// Login user.
    #[arg(long, default_value = "Administrator")]
    username: String,
    /// Login password (the simulator is a test tool; it prints it).
    #[arg(long, default_value = "hypervsim")]
    password: String,
    /// Size of each seeded virtual disk in MiB.
    #[arg(long, default_value_t = 16)]
    disk_mib: u64,
    /// Also accept Kerberos with the service key in this keytab (ADR 0159).
    #[arg(long)]
    kerberos_keytab: Option<PathBuf>,
    /// The Kerberos service principal, without realm.
    #[arg(long, default_value = "HTTP/127.0.0.1")]
    kerberos_service: String,
    /// An appliance client certificate (`sha256:…`, from `ferry source agent-pin`) the host
    /// agent admits (repeatable; more through the side door).
    #[arg(long = "agent-client-pin")]
    agent_client_pins: Vec<String>,
    /// Present a snapshot LUN (NTFS volume image, ntfs-3g) per VM folder, refreshed at each
    /// checkpoint; printed as `san_luns`.
    #[arg(long)]
    san_luns: bool,
    /// A failover cluster of N nodes (each its own WinRM listener; the disks on a shared CSV).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=8))]
    cluster: Option<u8>,
    /// Extended Protection on the HTTPS listener (WinRM's CbtHardeningLevel): `strict` refuses
    /// NTLM logins without the channel binding, `relaxed` checks one that is sent.
    #[arg(long, default_value = "none")]
    cbt: ferry_sim::hyperv::Cbt,
}

/// Arguments of `ferry sim vmware`.
#[derive(Debug, clap::Args)]
pub struct VmwareArgs {
    /// HTTPS address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8444")]
    listen: SocketAddr,
    /// Where disks and datastore files are stored.
    #[arg(long)]
    dir: PathBuf,
    /// VMs per resource pool.
    #[arg(long, default_value_t = 2)]
    vms: u32,
    /// Size of the second disk of the first VM, MiB.
    #[arg(long, default_value_t = 16)]
    disk_mib: u64,
    /// Window of one QueryChangedDiskAreas answer, KiB.
    #[arg(long, default_value_t = 4096)]
    cbt_page_kib: u64,
    /// The vcsim program (default: $FERRY_VCSIM, $FERRY_PEERS_DIR/bin/vcsim, PATH).
    #[arg(long)]
    vcsim: Option<PathBuf>,
}

/// Arguments of `ferry sim xen`.
#[derive(Debug, clap::Args)]
pub struct XenArgs {
    /// HTTPS address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Where VDIs are stored.
    #[arg(long)]
    dir: PathBuf,
    /// Size of each seeded disk in MiB.
    #[arg(long, default_value_t = 64)]
    disk_mib: u64,
    /// Small VMs (`vm-01` …, one disk of --disk-mib each) seeded beside the two.
    #[arg(long, default_value_t = 0)]
    extra_vms: u32,
    /// Login user.
    #[arg(long, default_value = "root")]
    username: String,
    /// Login password (the simulator is a test tool; it prints it).
    #[arg(long, default_value = "xensim")]
    password: String,
}

/// Runs a simulator.
pub async fn run(cmd: Command, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let a = match cmd {
        Command::Xen(a) => a,
        Command::Vmware(a) => return run_vmware(a).await,
        Command::Hyperv(a) => return run_hyperv(a).await,
    };
    let mut cfg = XenSimConfig::new(&a.dir);
    cfg.listen = a.listen;
    cfg.disk_mib = a.disk_mib;
    cfg.extra_vms = a.extra_vms;
    cfg.username = a.username;
    cfg.password = a.password;
    let sim = XenSim::start(cfg)
        .await
        .context("cannot start the XenAPI simulator")?;
    announce_and_wait(&sim.info_json(), || sim.shutdown()).await
}

async fn run_vmware(a: VmwareArgs) -> anyhow::Result<ExitCode> {
    use ferry_sim::vmware::{VmwareSim, VmwareSimConfig};
    let mut cfg = VmwareSimConfig::new(&a.dir);
    cfg.listen = a.listen;
    cfg.vms = a.vms;
    cfg.disk_mib = a.disk_mib;
    cfg.cbt_page = a.cbt_page_kib << 10;
    if let Some(v) = a.vcsim {
        cfg.vcsim = v;
    }
    let sim = VmwareSim::start(cfg)
        .await
        .context("cannot start the vSphere simulator")?;
    announce_and_wait(&sim.info_json(), || sim.shutdown()).await
}

async fn run_hyperv(a: HypervArgs) -> anyhow::Result<ExitCode> {
    use ferry_sim::hyperv::{HypervSim, HypervSimConfig};
    let mut cfg = HypervSimConfig::new(&a.dir);
    cfg.listen = a.listen;
    cfg.listen_http = a.listen_http;
    cfg.username = a.username;
    cfg.password = a.password;
    cfg.disk_mib = a.disk_mib;
    cfg.kerberos = a
        .kerberos_keytab
        .map(|k| ferry_sim::hyperv::HypervKerberos::new(k, &a.kerberos_service));
    cfg.data_paths.agent_client_pins = a.agent_client_pins;
    cfg.data_paths.san_luns = a.san_luns;
    cfg.cluster_nodes = a.cluster.map_or(0, usize::from);
    cfg.cbt = a.cbt;
    let sim = HypervSim::start(cfg)
        .await
        .context("cannot start the Hyper-V simulator")?;
    announce_and_wait(&sim.info_json(), || sim.shutdown()).await
}

/// Prints the simulator's JSON line (what tests and scripts wait for), then runs until Ctrl-C.
async fn announce_and_wait(
    info: &impl std::fmt::Display,
    shutdown: impl FnOnce(),
) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{info}")?;
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c().await?;
    shutdown();
    Ok(ExitCode::SUCCESS)
}
