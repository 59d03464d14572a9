//! The seeded inventory (see [`super::XenSim`]) and its "realistic" disk contents: a boot
//! sector, syslog-like text, incompressible binary, repeated patterns and holes, generated
//! deterministically so runs are reproducible.

use super::api::{self, Failure, NULL, State};
use super::storage::CBT_BLOCK;
use super::value::Value;
use std::collections::BTreeMap;

fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

/// Pool, host, SRs, network, control domain and proxy VM.
pub(crate) fn base(st: &mut State) -> Result<(), Failure> {
    let host = st.add(
        "host",
        api::rec([
            ("name_label", s("sim-host-1")),
            ("name_description", s("Simulated host")),
            ("hostname", s("sim-host-1")),
            ("address", s(st.nbd_host.clone())),
            ("API_version_major", Value::Int(2)),
            ("API_version_minor", Value::Int(21)),
            ("API_version_vendor", s("XenSource")),
            ("enabled", Value::Bool(true)),
            ("resident_VMs", Value::Array(vec![])),
            (
                "software_version",
                Value::Struct(BTreeMap::from([
                    ("product_brand".to_string(), s("XCP-ng")),
                    ("product_version".to_string(), s("8.3.0")),
                    ("xapi".to_string(), s("24.19")),
                ])),
            ),
            ("other_config", Value::Struct(BTreeMap::new())),
            ("tags", Value::Array(vec![])),
        ]),
    );
    st.host = host.clone();
    let mut srs = Vec::new();
    for (name, kind) in [("Local storage", "ext"), ("Shared LVM storage", "lvm")] {
        let sr = st.add(
            "SR",
            api::rec([
                ("name_label", s(name)),
                ("name_description", s("")),
                ("type", s(kind)),
                ("content_type", s("user")),
                ("shared", Value::Bool(kind == "lvm")),
                ("VDIs", Value::Array(vec![])),
                ("PBDs", Value::Array(vec![])),
                ("physical_size", Value::Int(100 << 30)),
                ("physical_utilisation", Value::Int(0)),
                ("virtual_allocation", Value::Int(0)),
                ("other_config", Value::Struct(BTreeMap::new())),
                ("sm_config", Value::Struct(BTreeMap::new())),
                ("tags", Value::Array(vec![])),
            ]),
        );
        let uuid = st.fstr("SR", &sr, "uuid")?;
        std::fs::create_dir_all(st.dir.join(uuid))
            .map_err(|e| Failure::new("SR_BACKEND_FAILURE", &["", "", &e.to_string()]))?;
        srs.push(sr);
    }
    st.add(
        "network",
        api::rec([
            ("name_label", s("Pool-wide network associated with eth0")),
            ("name_description", s("")),
            ("bridge", s("xenbr0")),
            ("MTU", Value::Int(1500)),
            ("VIFs", Value::Array(vec![])),
            ("PIFs", Value::Array(vec![])),
            ("purpose", Value::strs(&["nbd"])),
            ("other_config", Value::Struct(BTreeMap::new())),
            ("tags", Value::Array(vec![])),
        ]),
    );
    let pool = st.add(
        "pool",
        api::rec([
            ("name_label", s("ferry-sim-pool")),
            ("name_description", s("")),
            ("master", s(host.clone())),
            ("default_SR", s(srs[0].clone())),
            ("other_config", Value::Struct(BTreeMap::new())),
            ("tags", Value::Array(vec![])),
        ]),
    );
    st.pool = pool;
    let mut dom0 = api::vm_defaults();
    dom0.insert("name_label".into(), s("Control domain on host: sim-host-1"));
    dom0.insert("is_control_domain".into(), Value::Bool(true));
    dom0.insert("power_state".into(), s("Running"));
    dom0.insert("resident_on".into(), s(host.clone()));
    st.add("VM", dom0);
    let proxy = st.vm_create(api::rec([
        ("name_label", s("ferry-proxy")),
        (
            "name_description",
            s("Ferry backup proxy appliance (hot-add target)"),
        ),
        ("VCPUs_max", Value::Int(2)),
        ("VCPUs_at_startup", Value::Int(2)),
    ]))?;
    st.set("VM", &proxy, "power_state", s("Running"))?;
    st.set("VM", &proxy, "resident_on", s(host))?;
    Ok(())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Deterministic, varied disk content of `size` bytes for disk `seed`.
pub fn disk_content(seed: u64, size: u64) -> Vec<(u64, Vec<u8>)> {
    const WORDS: &[&str] = &[
        "kernel:",
        "sshd[812]:",
        "Accepted",
        "publickey",
        "for",
        "root",
        "from",
        "10.0.4.17",
        "systemd[1]:",
        "Started",
        "Session",
        "nginx:",
        "GET",
        "/index.html",
        "200",
        "postgres[991]:",
        "checkpoint",
        "complete",
        "wrote",
        "buffers",
        "eth0:",
        "link",
        "up",
    ];
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::new();
    let mut mbr = vec![0u8; 512];
    mbr[..3].copy_from_slice(&[0xEB, 0x63, 0x90]);
    mbr[3..11].copy_from_slice(b"FERRYSIM");
    mbr[446 + 4] = 0x83;
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    out.push((0, mbr));
    let blocks = size / CBT_BLOCK;
    for b in 1..blocks {
        let kind = rng.next() % 10;
        let mut data = vec![0u8; CBT_BLOCK as usize];
        match kind {
            0..=3 => continue, // hole
            4..=6 => {
                let mut t = String::new();
                while t.len() < data.len() {
                    t.push_str(&format!(
                        "Nov 22 02:{:02}:{:02} sim ",
                        rng.next() % 60,
                        rng.next() % 60
                    ));
                    for _ in 0..8 {
                        t.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
                        t.push(' ');
                    }
                    t.push('\n');
                }
                let n = data.len();
                data.copy_from_slice(&t.as_bytes()[..n]);
            }
            7..=8 => {
                for c in data.chunks_mut(8) {
                    c.copy_from_slice(&rng.next().to_le_bytes()[..c.len()]);
                }
            }
            _ => {
                let pat = rng.next().to_le_bytes();
                for (i, x) in data.iter_mut().enumerate() {
                    *x = pat[i % 8];
                }
            }
        }
        out.push((b * CBT_BLOCK, data));
    }
    out
}

/// The two seeded guest VMs with their disks and VIFs, then `extra` small ones (`vm-01`, …:
/// one disk of `disk_size` on local storage each) for tests of many VMs.
pub(crate) fn vms(st: &mut State, disk_size: u64, extra: u32) -> Result<(), Failure> {
    let srs = st.all_of("SR");
    let sr_of = |st: &State, kind: &str| {
        srs.iter()
            .find(|r| st.fstr("SR", r, "type").ok().as_deref() == Some(kind))
            .cloned()
            .unwrap_or_default()
    };
    let (ext, lvm) = (sr_of(st, "ext"), sr_of(st, "lvm"));
    let net = st.all_of("network").into_iter().next().unwrap_or_default();
    let mut specs = vec![
        (
            "debian-web".to_string(),
            2,
            2u64 << 30,
            vec![(ext.clone(), disk_size), (lvm.clone(), disk_size / 2)],
        ),
        (
            "win-db".to_string(),
            4,
            4u64 << 30,
            vec![(lvm.clone(), disk_size), (lvm.clone(), disk_size / 2)],
        ),
    ];
    for n in 1..=extra {
        specs.push((
            format!("vm-{n:02}"),
            1,
            1u64 << 30,
            vec![(ext.clone(), disk_size)],
        ));
    }
    let mut seed = 1;
    for (i, (name, cpus, mem, disks)) in specs.into_iter().enumerate() {
        let mut r = api::vm_defaults();
        for (k, v) in [
            ("name_label", s(name.clone())),
            ("name_description", s(format!("Seeded test VM {name}"))),
            ("VCPUs_max", Value::Int(cpus)),
            ("VCPUs_at_startup", Value::Int(cpus)),
            ("memory_static_max", Value::Int(mem as i64)),
            ("memory_dynamic_max", Value::Int(mem as i64)),
            ("memory_dynamic_min", Value::Int(mem as i64)),
            ("memory_static_min", Value::Int(mem as i64 / 2)),
            ("tags", Value::strs(&["production", name.as_str()])),
        ] {
            r.insert(k.into(), v);
        }
        let vm = st.vm_create(r)?;
        for (d, (sr, size)) in disks.into_iter().enumerate() {
            let vdi = st.vdi_create(api::rec([
                ("SR", s(sr)),
                ("name_label", s(format!("{name} disk {d}"))),
                ("virtual_size", Value::Int(size as i64)),
            ]))?;
            for (off, data) in disk_content(seed, size) {
                st.write_vdi(&vdi, off, &data)?;
            }
            seed += 1;
            let mut b = BTreeMap::new();
            for (k, v) in [
                ("VM", s(vm.clone())),
                ("VDI", s(vdi)),
                ("userdevice", s(d.to_string())),
                ("bootable", Value::Bool(d == 0)),
                ("mode", s("RW")),
                ("type", s("Disk")),
                ("empty", Value::Bool(false)),
            ] {
                b.insert(k.to_string(), v);
            }
            st.call_vbd_create(b)?;
        }
        st.call_vif_create(api::rec([
            ("VM", s(vm.clone())),
            ("network", s(net.clone())),
            ("device", s("0")),
            (
                "MAC",
                s(format!(
                    "00:16:3e:5e:{:02x}:{:02x}",
                    (i + 1) >> 8,
                    (i + 1) & 0xff
                )),
            ),
            ("MTU", Value::Int(1500)),
        ]))?;
        st.set("VM", &vm, "power_state", s("Running"))?;
        st.set("VM", &vm, "resident_on", s(st.host.clone()))?;
        for vbd in st.frefs("VM", &vm, "VBDs")? {
            st.set("VBD", &vbd, "currently_attached", Value::Bool(true))?;
            st.set(
                "VBD",
                &vbd,
                "device",
                s(format!(
                    "xvd{}",
                    (b'a'
                        + st.fstr("VBD", &vbd, "userdevice")?
                            .parse::<u8>()
                            .unwrap_or(0)) as char
                )),
            )?;
        }
    }
    let _ = NULL;
    Ok(())
}
