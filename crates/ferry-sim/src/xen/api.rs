//! The XenAPI object model and method dispatch.
//!
//! Every object is kept as its XenAPI record (`BTreeMap<field, Value>`), so the generic calls
//! (`get_all_records`, `get_record`, `get_by_uuid`, `get_<field>`, `add_to_other_config`, …) come
//! for free and always agree with what the specific calls changed. Simulator-only state (disk
//! files, CBT stamps, sessions, faults) lives beside the records.

use super::storage::{self, CBT_BLOCK, DiskData};
use super::value::Value;
use base64::Engine as _;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

/// The null reference.
pub const NULL: &str = "OpaqueRef:NULL";

/// A XenAPI failure: `ErrorDescription` = `[code, params…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub Vec<String>);

impl Failure {
    pub(crate) fn new(code: &str, params: &[&str]) -> Self {
        let mut v = vec![code.to_string()];
        v.extend(params.iter().map(|s| s.to_string()));
        Self(v)
    }
    /// The error code.
    pub fn code(&self) -> &str {
        self.0.first().map_or("", |s| s.as_str())
    }
}

type R<T> = Result<T, Failure>;
pub(crate) type Rec = BTreeMap<String, Value>;

/// One object.
#[derive(Debug, Clone)]
pub(crate) struct Obj {
    pub class: &'static str,
    pub rec: Rec,
}

/// A logged-in session.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub user: String,
    pub originator: String,
}

/// Faults injected through the side door.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Per method, error descriptions to return for its next calls.
    pub fail_next: HashMap<String, VecDeque<Vec<String>>>,
    /// How long every `Async.*` task stays pending.
    pub task_delay: Duration,
    /// Drop each NBD connection after this many bytes sent.
    pub nbd_drop_after: Option<u64>,
}

/// The whole simulated pool.
pub(crate) struct State {
    pub objs: HashMap<String, Obj>,
    pub disks: HashMap<String, DiskData>,
    pub sessions: HashMap<String, Session>,
    /// Tasks created by each session (destroyed with it, as xapi does).
    pub session_tasks: HashMap<String, Vec<String>>,
    pub generation: u64,
    pub faults: Faults,
    pub dir: PathBuf,
    pub host: String,
    pub pool: String,
    pub username: String,
    pub password: String,
    pub nbd_host: String,
    pub nbd_port: u16,
    pub cert_pem: String,
    /// VDIs of `nbd` SRs: ref → the NBD URI their data is served at.
    pub nbd_vdis: HashMap<String, String>,
    /// Running guests of VMs booted from an NBD VDI: VM ref → qemu.
    pub guests: HashMap<String, tokio::process::Child>,
    seq: u64,
    seed: u64,
}

pub(crate) fn now_iso() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let (h, m, s) = ((secs % 86400) / 3600, (secs % 3600) / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}{mo:02}{d:02}T{h:02}:{m:02}:{s:02}Z")
}

fn s(v: impl Into<String>) -> Value {
    Value::Str(v.into())
}

impl State {
    pub fn new(dir: PathBuf, username: String, password: String) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Self {
            objs: HashMap::new(),
            disks: HashMap::new(),
            sessions: HashMap::new(),
            session_tasks: HashMap::new(),
            generation: 0,
            faults: Faults::default(),
            dir,
            host: String::new(),
            pool: String::new(),
            username,
            password,
            nbd_host: "127.0.0.1".into(),
            nbd_port: 0,
            cert_pem: String::new(),
            nbd_vdis: HashMap::new(),
            guests: HashMap::new(),
            seq: 0,
            seed,
        }
    }

    /// A fresh UUID (random version 4 layout).
    pub fn uuid(&mut self) -> String {
        let mut next = || {
            // splitmix64: good enough for unique ids in one process.
            self.seq = self.seq.wrapping_add(1);
            let mut z = self
                .seed
                .wrapping_add(self.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let (a, b) = (next(), next());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    /// Adds an object of `class` with `rec` (a `uuid` is added) and returns its ref.
    pub fn add(&mut self, class: &'static str, mut rec: Rec) -> String {
        let uuid = self.uuid();
        let r = format!("OpaqueRef:{}", self.uuid());
        rec.insert("uuid".into(), s(uuid));
        self.objs.insert(r.clone(), Obj { class, rec });
        r
    }

    pub fn obj(&self, class: &str, r: &str) -> R<&Obj> {
        match self.objs.get(r) {
            Some(o) if o.class == class => Ok(o),
            _ => Err(Failure::new("HANDLE_INVALID", &[class, r])),
        }
    }
    fn rec_mut(&mut self, class: &str, r: &str) -> R<&mut Rec> {
        match self.objs.get_mut(r) {
            Some(o) if o.class == class => Ok(&mut o.rec),
            _ => Err(Failure::new("HANDLE_INVALID", &[class, r])),
        }
    }
    pub fn field(&self, class: &str, r: &str, f: &str) -> R<Value> {
        Ok(self
            .obj(class, r)?
            .rec
            .get(f)
            .cloned()
            .unwrap_or(Value::s("")))
    }
    pub fn fstr(&self, class: &str, r: &str, f: &str) -> R<String> {
        Ok(match self.field(class, r, f)? {
            Value::Str(s) => s,
            _ => String::new(),
        })
    }
    pub fn fbool(&self, class: &str, r: &str, f: &str) -> R<bool> {
        Ok(matches!(self.field(class, r, f)?, Value::Bool(true)))
    }
    pub fn frefs(&self, class: &str, r: &str, f: &str) -> R<Vec<String>> {
        Ok(match self.field(class, r, f)? {
            Value::Array(a) => a
                .into_iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => vec![],
        })
    }
    pub fn set(&mut self, class: &str, r: &str, f: &str, v: Value) -> R<()> {
        self.rec_mut(class, r)?.insert(f.into(), v);
        Ok(())
    }
    pub(crate) fn push_ref(&mut self, class: &str, r: &str, f: &str, item: &str) -> R<()> {
        let mut v = self.frefs(class, r, f)?;
        v.push(item.into());
        self.set(class, r, f, Value::strs(&v))
    }
    pub(crate) fn drop_ref(&mut self, class: &str, r: &str, f: &str, item: &str) {
        if let Ok(mut v) = self.frefs(class, r, f) {
            v.retain(|x| x != item);
            let _ = self.set(class, r, f, Value::strs(&v));
        }
    }
    pub fn all_of(&self, class: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .objs
            .iter()
            .filter(|(_, o)| o.class == class)
            .map(|(r, _)| r.clone())
            .collect();
        v.sort();
        v
    }
    pub fn by_uuid(&self, class: &str, uuid: &str) -> R<String> {
        self.objs
            .iter()
            .find(|(_, o)| {
                o.class == class && o.rec.get("uuid").and_then(Value::as_str) == Some(uuid)
            })
            .map(|(r, _)| r.clone())
            .ok_or_else(|| Failure::new("UUID_INVALID", &[class, uuid]))
    }

    fn check_session(&self, sref: &str) -> R<()> {
        if self.sessions.contains_key(sref) {
            Ok(())
        } else {
            Err(Failure::new("SESSION_INVALID", &[sref]))
        }
    }

    pub fn login(&mut self, user: &str, pass: &str, originator: &str) -> R<String> {
        if user != self.username || pass != self.password {
            return Err(Failure::new(
                "SESSION_AUTHENTICATION_FAILED",
                &[user, "Authentication failure"],
            ));
        }
        let r = format!("OpaqueRef:{}", self.uuid());
        self.sessions.insert(
            r.clone(),
            Session {
                user: user.into(),
                originator: originator.into(),
            },
        );
        Ok(r)
    }

    pub fn logout(&mut self, sref: &str) {
        self.sessions.remove(sref);
        for t in self.session_tasks.remove(sref).unwrap_or_default() {
            self.objs.remove(&t);
        }
    }

    pub fn session_valid(&self, sref: &str) -> bool {
        self.sessions.contains_key(sref)
    }

    /// `user/originator` of a session (for logs and tests).
    pub fn originator(&self, sref: &str) -> Option<String> {
        self.sessions
            .get(sref)
            .map(|s| format!("{}/{}", s.user, s.originator))
    }

    /// Creates a pending task for `name` owned by session `sref`.
    pub fn new_task(&mut self, sref: &str, name: &str) -> String {
        let t = self.add(
            "task",
            rec([
                ("name_label", s(name)),
                ("name_description", s("")),
                ("status", s("pending")),
                ("progress", Value::Double(0.0)),
                ("result", s("")),
                ("error_info", Value::Array(vec![])),
                ("created", Value::DateTime(now_iso())),
                ("finished", Value::DateTime("19700101T00:00:00Z".into())),
                ("resident_on", s(self.host.clone())),
                ("type", s("<none/>")),
                ("other_config", Value::Struct(BTreeMap::new())),
                ("allowed_operations", Value::Array(vec![s("cancel")])),
                ("current_operations", Value::Struct(BTreeMap::new())),
            ]),
        );
        self.session_tasks
            .entry(sref.to_string())
            .or_default()
            .push(t.clone());
        t
    }

    /// Completes a task with the result of its call.
    pub fn finish_task(&mut self, task: &str, result: R<Value>) {
        if self.obj("task", task).is_err() {
            return; // destroyed meanwhile
        }
        let _ = self.set("task", task, "progress", Value::Double(1.0));
        let _ = self.set("task", task, "finished", Value::DateTime(now_iso()));
        match result {
            Ok(v) => {
                // task.result is an XML-RPC value document, whatever protocol asked.
                // xapi writes refs untyped: `<value>OpaqueRef:…</value>`.
                let mut x = String::new();
                match &v {
                    Value::Str(t) => {
                        x.push_str("<value>");
                        super::value::escape(t, &mut x);
                        x.push_str("</value>");
                    }
                    other => other.to_xml(&mut x),
                }
                let _ = self.set("task", task, "result", s(x));
                let _ = self.set("task", task, "status", s("success"));
            }
            Err(f) => {
                let _ = self.set("task", task, "error_info", Value::strs(&f.0));
                let _ = self.set("task", task, "status", s("failure"));
            }
        }
    }

    /// Runs one call. `params` includes the session ref except for `session.login*`.
    pub async fn call(&mut self, method: &str, params: Vec<Value>) -> R<Value> {
        if let Some(q) = self.faults.fail_next.get_mut(method) {
            if let Some(e) = q.pop_front() {
                return Err(Failure(e));
            }
        }
        let strs: Vec<String> = params
            .iter()
            .map(|v| match v {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => String::new(),
            })
            .collect();
        let arg = |i: usize| -> R<&str> {
            strs.get(i).map(|s| s.as_str()).ok_or_else(|| {
                Failure::new(
                    "MESSAGE_PARAMETER_COUNT_MISMATCH",
                    &[method, &(i + 1).to_string(), &params.len().to_string()],
                )
            })
        };
        match method {
            "session.login_with_password" | "session.slave_local_login_with_password" => {
                let orig = strs.get(3).cloned().unwrap_or_default();
                return self.login(arg(0)?, arg(1)?, &orig).map(s);
            }
            "session.logout" | "session.local_logout" => {
                self.logout(arg(0)?);
                return Ok(s(""));
            }
            _ => {}
        }
        let sref = arg(0)?.to_string();
        self.check_session(&sref)?;
        let (class, name) = method
            .split_once('.')
            .ok_or_else(|| Failure::new("MESSAGE_METHOD_UNKNOWN", &[method]))?;
        let class: &'static str = match class {
            "session" => "session",
            "pool" => "pool",
            "host" => "host",
            "SR" => "SR",
            "network" => "network",
            "VM" => "VM",
            "VBD" => "VBD",
            "VDI" => "VDI",
            "VIF" => "VIF",
            "task" => "task",
            "sim" => return self.side_door(name, &strs, &params),
            _ => return Err(Failure::new("MESSAGE_METHOD_UNKNOWN", &[method])),
        };
        let rec_param = |i: usize| -> R<Rec> {
            match params.get(i) {
                Some(Value::Struct(m)) => Ok(m.clone()),
                _ => Err(Failure::new("FIELD_TYPE_ERROR", &["record"])),
            }
        };
        match (class, name) {
            ("session", "get_this_host") => return Ok(s(self.host.clone())),
            ("session", "get_uuid") => return Ok(s(arg(1)?)),
            ("VM", "snapshot") => {
                let ignore = match params.get(3) {
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect(),
                    _ => vec![],
                };
                return self.vm_snapshot(arg(1)?, arg(2)?, &ignore).map(s);
            }
            ("VM", "destroy") => return self.vm_destroy(arg(1)?).map(|_| s("")),
            ("VM", "create") => return self.vm_create(rec_param(1)?).map(s),
            ("VM", "start") => {
                let vm = arg(1)?;
                self.vm_power(vm, true)?;
                if let Err(f) = self.boot_guest(vm) {
                    let _ = self.vm_power(vm, false);
                    return Err(f);
                }
                return Ok(s(""));
            }
            ("VM", "hard_shutdown" | "clean_shutdown") => {
                let vm = arg(1)?;
                self.vm_power(vm, false)?;
                self.stop_guest(vm).await;
                return Ok(s(""));
            }
            ("VM", "clone" | "copy") => return self.vm_clone(arg(1)?, arg(2)?).await.map(s),
            ("VM", "revert") => return self.vm_revert(arg(1)?).await.map(|_| s("")),
            ("VDI", "clone") => return self.vdi_clone(arg(1)?).await.map(s),
            ("VIF", "move") => return self.vif_move(arg(1)?, arg(2)?).map(|_| s("")),
            ("network", "create") => return self.network_create(rec_param(1)?).map(s),
            ("network", "destroy") => return self.network_destroy(arg(1)?).map(|_| s("")),
            ("SR", "create") => return self.sr_create(&strs, &params).await.map(s),
            ("SR", "forget" | "destroy") => return self.sr_forget(arg(1)?).map(|_| s("")),
            ("SR", "scan") => return self.obj("SR", arg(1)?).map(|_| s("")),
            ("VDI", "create") => return self.vdi_create(rec_param(1)?).map(s),
            ("VDI", "destroy") => return self.vdi_destroy(arg(1)?).map(|_| s("")),
            ("VDI", "enable_cbt") => return self.vdi_cbt(arg(1)?, true).map(|_| s("")),
            ("VDI", "disable_cbt") => return self.vdi_cbt(arg(1)?, false).map(|_| s("")),
            ("VDI", "data_destroy") => return self.vdi_data_destroy(arg(1)?).map(|_| s("")),
            ("VDI", "list_changed_blocks") => {
                return self.list_changed_blocks(arg(1)?, arg(2)?).map(s);
            }
            ("VDI", "get_nbd_info") => return self.get_nbd_info(&sref, arg(1)?),
            ("VBD", "create") => return self.vbd_create(rec_param(1)?).map(s),
            ("VBD", "plug") => return self.vbd_plug(arg(1)?).await.map(|_| s("")),
            ("VBD", "unplug" | "unplug_force") => return self.vbd_unplug(arg(1)?).map(|_| s("")),
            ("VBD", "destroy") => return self.vbd_destroy(arg(1)?).map(|_| s("")),
            ("VIF", "create") => return self.vif_create(rec_param(1)?).map(s),
            ("VIF", "destroy") => {
                let r = arg(1)?;
                let vm = self.fstr("VIF", r, "VM")?;
                self.drop_ref("VM", &vm, "VIFs", r);
                let net = self.fstr("VIF", r, "network")?;
                self.drop_ref("network", &net, "VIFs", r);
                self.objs.remove(r);
                return Ok(s(""));
            }
            ("network", "add_purpose") => {
                let (r, p) = (arg(1)?, arg(2)?);
                let mut v = self.frefs("network", r, "purpose")?;
                if !v.iter().any(|x| x == p) {
                    v.push(p.into());
                }
                self.set("network", r, "purpose", Value::strs(&v))?;
                return Ok(s(""));
            }
            ("network", "remove_purpose") => {
                let r = arg(1)?.to_string();
                self.obj("network", &r)?;
                self.drop_ref("network", &r, "purpose", arg(2)?);
                return Ok(s(""));
            }
            ("task", "destroy") => {
                let r = arg(1)?;
                self.obj("task", r)?;
                self.objs.remove(r);
                for v in self.session_tasks.values_mut() {
                    v.retain(|t| t != r);
                }
                return Ok(s(""));
            }
            ("task", "cancel") => {
                let r = arg(1)?;
                if self.fstr("task", r, "status")? == "pending" {
                    self.set("task", r, "status", s("cancelled"))?;
                }
                return Ok(s(""));
            }
            _ => {}
        }
        self.generic(class, name, &strs, &params)
    }

    fn generic(
        &mut self,
        class: &'static str,
        name: &str,
        strs: &[String],
        params: &[Value],
    ) -> R<Value> {
        let method = format!("{class}.{name}");
        let arg = |i: usize| -> R<&str> {
            strs.get(i).map(|s| s.as_str()).ok_or_else(|| {
                Failure::new(
                    "MESSAGE_PARAMETER_COUNT_MISMATCH",
                    &[&method, &(i + 1).to_string(), &params.len().to_string()],
                )
            })
        };
        match name {
            "get_all" => return Ok(Value::strs(&self.all_of(class))),
            "get_all_records" => {
                return Ok(Value::Struct(
                    self.all_of(class)
                        .into_iter()
                        .map(|r| {
                            let rec = Value::Struct(self.objs[&r].rec.clone());
                            (r, rec)
                        })
                        .collect(),
                ));
            }
            "get_record" => return Ok(Value::Struct(self.obj(class, arg(1)?)?.rec.clone())),
            "get_by_uuid" => return self.by_uuid(class, arg(1)?).map(s),
            "get_by_name_label" => {
                let n = arg(1)?;
                let v: Vec<String> = self
                    .all_of(class)
                    .into_iter()
                    .filter(|r| {
                        self.objs[r].rec.get("name_label").and_then(Value::as_str) == Some(n)
                    })
                    .collect();
                return Ok(Value::strs(&v));
            }
            _ => {}
        }
        if let Some(f) = name.strip_prefix("get_") {
            let o = self.obj(class, arg(1)?)?;
            return o
                .rec
                .get(f)
                .cloned()
                .ok_or_else(|| Failure::new("MESSAGE_METHOD_UNKNOWN", &[&method]));
        }
        if let Some(f) = name.strip_prefix("set_") {
            const SETTABLE: &[&str] = &[
                "name_label",
                "name_description",
                "other_config",
                "tags",
                "VCPUs_max",
                "VCPUs_at_startup",
                "memory_static_max",
                "memory_dynamic_max",
                "memory_dynamic_min",
                "memory_static_min",
                "is_a_template",
            ];
            let r = arg(1)?.to_string();
            self.obj(class, &r)?;
            if !SETTABLE.contains(&f) {
                return Err(Failure::new("MESSAGE_METHOD_UNKNOWN", &[&method]));
            }
            let v = params.get(2).cloned().ok_or_else(|| {
                Failure::new(
                    "MESSAGE_PARAMETER_COUNT_MISMATCH",
                    &[&method, "3", &params.len().to_string()],
                )
            })?;
            self.set(class, &r, f, v)?;
            return Ok(s(""));
        }
        if let Some(f) = name.strip_prefix("add_to_") {
            let (r, k, v) = (
                arg(1)?.to_string(),
                arg(2)?.to_string(),
                arg(3)?.to_string(),
            );
            let rec = self.rec_mut(class, &r)?;
            match rec
                .entry(f.to_string())
                .or_insert_with(|| Value::Struct(BTreeMap::new()))
            {
                Value::Struct(m) => {
                    if m.contains_key(&k) {
                        return Err(Failure::new("MAP_DUPLICATE_KEY", &[class, f, &r, &k]));
                    }
                    m.insert(k, s(v));
                }
                _ => return Err(Failure::new("MESSAGE_METHOD_UNKNOWN", &[&method])),
            }
            return Ok(s(""));
        }
        if let Some(f) = name.strip_prefix("remove_from_") {
            let (r, k) = (arg(1)?.to_string(), arg(2)?.to_string());
            if let Some(Value::Struct(m)) = self.rec_mut(class, &r)?.get_mut(f) {
                m.remove(&k);
            }
            return Ok(s(""));
        }
        match name {
            "add_tags" => {
                let (r, t) = (arg(1)?.to_string(), arg(2)?.to_string());
                let mut v = self.frefs(class, &r, "tags")?;
                if !v.contains(&t) {
                    v.push(t);
                }
                self.set(class, &r, "tags", Value::strs(&v))?;
                Ok(s(""))
            }
            "remove_tags" => {
                let (r, t) = (arg(1)?.to_string(), arg(2)?.to_string());
                self.obj(class, &r)?;
                self.drop_ref(class, &r, "tags", &t);
                Ok(s(""))
            }
            _ => Err(Failure::new("MESSAGE_METHOD_UNKNOWN", &[&method])),
        }
    }

    fn sr_file(&self, sr: &str, uuid: &str, live: bool) -> R<PathBuf> {
        let dir = self.dir.join(self.fstr("SR", sr, "uuid")?);
        let lvm = self.fstr("SR", sr, "type")? == "lvm";
        Ok(dir.join(match (lvm, live) {
            (false, false) => format!("{uuid}.vhd"),
            (true, false) => format!("VHD-{uuid}"),
            (false, true) => format!("{uuid}.raw"),
            (true, true) => format!("LV-{uuid}.raw"),
        }))
    }

    pub(crate) fn backend(e: impl std::fmt::Display) -> Failure {
        Failure::new("SR_BACKEND_FAILURE", &["", "", &e.to_string()])
    }

    /// `VDI.create`: a new, empty live VDI.
    pub fn vdi_create(&mut self, r: Rec) -> R<String> {
        let get = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let sr = get("SR");
        self.obj("SR", &sr)?;
        let size = match r.get("virtual_size") {
            Some(Value::Int(i)) => *i as u64,
            Some(Value::Str(s)) => s
                .parse()
                .map_err(|_| Failure::new("FIELD_TYPE_ERROR", &["virtual_size"]))?,
            _ => return Err(Failure::new("FIELD_TYPE_ERROR", &["virtual_size"])),
        };
        if size == 0 || size % 512 != 0 || size > 2040 << 30 {
            return Err(Failure::new("VDI_TOO_LARGE", &[&size.to_string()]));
        }
        let other = r
            .get("other_config")
            .cloned()
            .unwrap_or(Value::Struct(BTreeMap::new()));
        let vdi = self.add(
            "VDI",
            rec([
                ("name_label", s(get("name_label"))),
                ("name_description", s(get("name_description"))),
                ("SR", s(sr.clone())),
                ("VBDs", Value::Array(vec![])),
                ("virtual_size", Value::Int(size as i64)),
                ("physical_utilisation", Value::Int(0)),
                (
                    "type",
                    s(if get("type").is_empty() {
                        "user".into()
                    } else {
                        get("type")
                    }),
                ),
                ("sharable", Value::Bool(false)),
                ("read_only", Value::Bool(false)),
                ("other_config", other),
                ("is_a_snapshot", Value::Bool(false)),
                ("snapshot_of", s(NULL)),
                ("snapshots", Value::Array(vec![])),
                (
                    "snapshot_time",
                    Value::DateTime("19700101T00:00:00Z".into()),
                ),
                ("cbt_enabled", Value::Bool(false)),
                ("managed", Value::Bool(true)),
                ("missing", Value::Bool(false)),
                ("tags", Value::Array(vec![])),
                ("sm_config", Value::Struct(BTreeMap::new())),
                ("xenstore_data", Value::Struct(BTreeMap::new())),
                ("allowed_operations", Value::Array(vec![])),
                ("current_operations", Value::Struct(BTreeMap::new())),
            ]),
        );
        let uuid = self.fstr("VDI", &vdi, "uuid")?;
        let file = self.sr_file(&sr, &uuid, true)?;
        storage::create_live(&file, size).map_err(Self::backend)?;
        self.set("VDI", &vdi, "location", s(uuid))?;
        self.push_ref("SR", &sr, "VDIs", &vdi)?;
        self.disks.insert(
            vdi.clone(),
            DiskData {
                lineage: vdi.clone(),
                file: Some(file),
                live: true,
                size,
                gens: vec![0; DiskData::blocks(size)],
                snap_gen: 0,
                cbt_epoch: 0,
                cbt_valid: false,
                parent: None,
            },
        );
        Ok(vdi)
    }

    /// Writes into a live VDI (a guest write or an import) and stamps CBT.
    pub fn write_vdi(&mut self, vdi: &str, offset: u64, data: &[u8]) -> R<()> {
        self.write_live_vdi(vdi, offset, data, true)
    }

    /// Writes into a live VDI, stamping CBT unless `tracked` is false (a write change
    /// tracking misses: the silent corruption trust-but-verify exists for).
    pub fn write_live_vdi(&mut self, vdi: &str, offset: u64, data: &[u8], tracked: bool) -> R<()> {
        self.generation += 1;
        let g = self.generation;
        let d = self
            .disks
            .get_mut(vdi)
            .ok_or_else(|| Failure::new("HANDLE_INVALID", &["VDI", vdi]))?;
        if !d.live {
            return Err(Failure::new("VDI_READ_ONLY", &[vdi]));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= d.size);
        if end.is_none() {
            return Err(Failure::new(
                "VDI_IO_ERROR",
                &["write beyond the end of the disk"],
            ));
        }
        let file = d
            .file
            .clone()
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", vdi]))?;
        storage::write_live(&file, offset, data).map_err(Self::backend)?;
        if !data.is_empty() {
            let first = offset / CBT_BLOCK;
            let last = (offset + data.len() as u64 - 1) / CBT_BLOCK;
            for b in first..=last {
                let stamp = &mut d.gens[b as usize];
                // A stamp also says "written at all" (snapshots copy only such blocks): an
                // untracked write gets the oldest one, older than any snapshot.
                *stamp = if tracked { g } else { (*stamp).max(1) };
            }
        }
        Ok(())
    }

    fn snapshot_vdi(&mut self, vdi: &str, now: &str) -> R<String> {
        let d = self
            .disks
            .get(vdi)
            .cloned()
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", vdi]))?;
        let live_file = d
            .file
            .clone()
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", vdi]))?;
        let mut rec = self.obj("VDI", vdi)?.rec.clone();
        let sr = self.fstr("VDI", vdi, "SR")?;
        let cbt = self.fbool("VDI", vdi, "cbt_enabled")?;
        rec.insert("is_a_snapshot".into(), Value::Bool(true));
        rec.insert("snapshot_of".into(), s(vdi));
        rec.insert("snapshots".into(), Value::Array(vec![]));
        rec.insert("snapshot_time".into(), Value::DateTime(now.into()));
        rec.insert("VBDs".into(), Value::Array(vec![]));
        rec.insert("read_only".into(), Value::Bool(true));
        let snap = self.add("VDI", rec);
        let uuid = self.fstr("VDI", &snap, "uuid")?;
        self.set("VDI", &snap, "location", s(uuid.clone()))?;
        let out = self.sr_file(&sr, &uuid, false)?;
        // Difference against the newest snapshot of this disk that still holds data.
        let parent = self
            .frefs("VDI", vdi, "snapshots")?
            .into_iter()
            .filter_map(|p| self.disks.get(&p).map(|pd| (p, pd.clone())))
            .filter(|(_, pd)| pd.file.is_some())
            .max_by_key(|(_, pd)| pd.snap_gen);
        let pinfo = parent
            .as_ref()
            .map(|(_, pd)| (pd.file.clone().unwrap_or_default(), pd.snap_gen));
        storage::write_snapshot_vhd(
            &live_file,
            d.size,
            &d.gens,
            &out,
            pinfo.as_ref().map(|(p, g)| (p.as_path(), *g)),
        )
        .map_err(Self::backend)?;
        let used = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        self.set(
            "VDI",
            &snap,
            "physical_utilisation",
            Value::Int(used as i64),
        )?;
        self.push_ref("SR", &sr, "VDIs", &snap)?;
        self.push_ref("VDI", vdi, "snapshots", &snap)?;
        self.disks.insert(
            snap.clone(),
            DiskData {
                lineage: vdi.into(),
                file: Some(out),
                live: false,
                size: d.size,
                gens: d.gens.clone(),
                snap_gen: self.generation,
                cbt_epoch: d.cbt_epoch,
                cbt_valid: cbt,
                parent: parent.map(|(p, _)| p),
            },
        );
        Ok(snap)
    }

    /// `VM.snapshot`.
    pub fn vm_snapshot(&mut self, vm: &str, name: &str, ignore: &[String]) -> R<String> {
        let vrec = self.obj("VM", vm)?.rec.clone();
        if self.fbool("VM", vm, "is_a_snapshot")? || self.fbool("VM", vm, "is_control_domain")? {
            return Err(Failure::new(
                "OPERATION_NOT_ALLOWED",
                &["cannot snapshot this VM"],
            ));
        }
        let now = now_iso();
        let mut rec = vrec.clone();
        rec.insert("name_label".into(), s(name));
        rec.insert("is_a_snapshot".into(), Value::Bool(true));
        rec.insert("snapshot_of".into(), s(vm));
        rec.insert("snapshots".into(), Value::Array(vec![]));
        rec.insert("snapshot_time".into(), Value::DateTime(now.clone()));
        rec.insert("power_state".into(), s("Halted"));
        rec.insert("resident_on".into(), s(NULL));
        rec.insert("VBDs".into(), Value::Array(vec![]));
        rec.insert("VIFs".into(), Value::Array(vec![]));
        rec.insert("other_config".into(), Value::Struct(BTreeMap::new()));
        let snap = self.add("VM", rec);
        self.push_ref("VM", vm, "snapshots", &snap)?;
        for vbd in self.frefs("VM", vm, "VBDs")? {
            let mut brec = self.obj("VBD", &vbd)?.rec.clone();
            let vdi = self.fstr("VBD", &vbd, "VDI")?;
            let is_disk = self.fstr("VBD", &vbd, "type")? == "Disk" && vdi != NULL;
            if is_disk && ignore.contains(&vdi) {
                continue;
            }
            let new_vdi = if is_disk {
                self.snapshot_vdi(&vdi, &now)?
            } else {
                vdi
            };
            brec.insert("VM".into(), s(snap.clone()));
            brec.insert("VDI".into(), s(new_vdi.clone()));
            brec.insert("currently_attached".into(), Value::Bool(false));
            let nb = self.add("VBD", brec);
            self.push_ref("VM", &snap, "VBDs", &nb)?;
            if new_vdi != NULL {
                self.push_ref("VDI", &new_vdi, "VBDs", &nb)?;
            }
        }
        for vif in self.frefs("VM", vm, "VIFs")? {
            let mut frec = self.obj("VIF", &vif)?.rec.clone();
            frec.insert("VM".into(), s(snap.clone()));
            frec.insert("currently_attached".into(), Value::Bool(false));
            let net = self.fstr("VIF", &vif, "network")?;
            let nv = self.add("VIF", frec);
            self.push_ref("VM", &snap, "VIFs", &nv)?;
            let _ = self.push_ref("network", &net, "VIFs", &nv);
        }
        Ok(snap)
    }

    /// `VM.destroy`: the VM, its VBDs and VIFs (never its VDIs).
    pub fn vm_destroy(&mut self, vm: &str) -> R<()> {
        if self.fstr("VM", vm, "power_state")? != "Halted" {
            return Err(Failure::new(
                "VM_BAD_POWER_STATE",
                &[
                    vm,
                    "halted",
                    &self.fstr("VM", vm, "power_state")?.to_lowercase(),
                ],
            ));
        }
        for vbd in self.frefs("VM", vm, "VBDs")? {
            let vdi = self.fstr("VBD", &vbd, "VDI")?;
            self.drop_ref("VDI", &vdi, "VBDs", &vbd);
            self.objs.remove(&vbd);
        }
        for vif in self.frefs("VM", vm, "VIFs")? {
            let net = self.fstr("VIF", &vif, "network")?;
            self.drop_ref("network", &net, "VIFs", &vif);
            self.objs.remove(&vif);
        }
        let of = self.fstr("VM", vm, "snapshot_of")?;
        self.drop_ref("VM", &of, "snapshots", vm);
        self.objs.remove(vm);
        Ok(())
    }

    pub(crate) fn vm_power(&mut self, vm: &str, on: bool) -> R<()> {
        let st = self.fstr("VM", vm, "power_state")?;
        if self.fbool("VM", vm, "is_a_snapshot")? || self.fbool("VM", vm, "is_a_template")? {
            return Err(Failure::new("VM_IS_TEMPLATE", &[vm]));
        }
        match (on, st.as_str()) {
            (true, "Halted") | (false, "Running") => {}
            (true, _) => {
                return Err(Failure::new(
                    "VM_BAD_POWER_STATE",
                    &[vm, "halted", &st.to_lowercase()],
                ));
            }
            (false, _) => {
                return Err(Failure::new(
                    "VM_BAD_POWER_STATE",
                    &[vm, "running", &st.to_lowercase()],
                ));
            }
        }
        self.set(
            "VM",
            vm,
            "power_state",
            s(if on { "Running" } else { "Halted" }),
        )?;
        self.set(
            "VM",
            vm,
            "resident_on",
            s(if on { self.host.clone() } else { NULL.into() }),
        )?;
        for vbd in self.frefs("VM", vm, "VBDs")? {
            self.set("VBD", &vbd, "currently_attached", Value::Bool(on))?;
        }
        for vif in self.frefs("VM", vm, "VIFs")? {
            self.set("VIF", &vif, "currently_attached", Value::Bool(on))?;
        }
        Ok(())
    }

    /// `VM.create` from a record (unknown fields are kept, missing ones defaulted).
    pub fn vm_create(&mut self, r: Rec) -> R<String> {
        let mut rec = vm_defaults();
        for (k, v) in r {
            if !matches!(
                k.as_str(),
                "uuid" | "VBDs" | "VIFs" | "snapshots" | "power_state" | "resident_on"
            ) {
                rec.insert(k, v);
            }
        }
        rec.insert("is_a_snapshot".into(), Value::Bool(false));
        rec.insert("snapshot_of".into(), s(NULL));
        rec.insert("is_control_domain".into(), Value::Bool(false));
        Ok(self.add("VM", rec))
    }

    pub(crate) fn call_vbd_create(&mut self, r: Rec) -> R<String> {
        self.vbd_create(r)
    }

    pub(crate) fn call_vif_create(&mut self, r: Rec) -> R<String> {
        self.vif_create(r)
    }

    pub(crate) fn vbd_create(&mut self, r: Rec) -> R<String> {
        let get = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (vm, vdi) = (get("VM"), get("VDI"));
        self.obj("VM", &vm)?;
        let empty = matches!(r.get("empty"), Some(Value::Bool(true)));
        if !empty {
            self.obj("VDI", &vdi)?;
            if !self.nbd_vdis.contains_key(&vdi)
                && self.disks.get(&vdi).is_none_or(|d| d.file.is_none())
            {
                return Err(Failure::new(
                    "VDI_INCOMPATIBLE_TYPE",
                    &[&vdi, "cbt_metadata"],
                ));
            }
        }
        let vbd = self.add(
            "VBD",
            rec([
                ("VM", s(vm.clone())),
                ("VDI", s(if empty { NULL.to_string() } else { vdi.clone() })),
                ("device", s("")),
                ("userdevice", s(get("userdevice"))),
                (
                    "bootable",
                    r.get("bootable").cloned().unwrap_or(Value::Bool(false)),
                ),
                (
                    "mode",
                    s(if get("mode").is_empty() {
                        "RW".into()
                    } else {
                        get("mode")
                    }),
                ),
                (
                    "type",
                    s(if get("type").is_empty() {
                        "Disk".into()
                    } else {
                        get("type")
                    }),
                ),
                ("empty", Value::Bool(empty)),
                ("unpluggable", Value::Bool(true)),
                ("currently_attached", Value::Bool(false)),
                (
                    "other_config",
                    r.get("other_config")
                        .cloned()
                        .unwrap_or(Value::Struct(BTreeMap::new())),
                ),
                ("qos_algorithm_type", s("")),
                ("allowed_operations", Value::Array(vec![])),
                ("current_operations", Value::Struct(BTreeMap::new())),
            ]),
        );
        self.push_ref("VM", &vm, "VBDs", &vbd)?;
        if !empty {
            self.push_ref("VDI", &vdi, "VBDs", &vbd)?;
        }
        Ok(vbd)
    }

    /// Path of the "block device" a VBD plugged into a VM shows up as.
    pub fn device_path(&self, device: &str) -> PathBuf {
        self.dir.join("dev").join(device)
    }

    async fn vbd_plug(&mut self, vbd: &str) -> R<()> {
        let vm = self.fstr("VBD", vbd, "VM")?;
        if self.fstr("VM", &vm, "power_state")? != "Running" {
            return Err(Failure::new(
                "VM_BAD_POWER_STATE",
                &[&vm, "running", "halted"],
            ));
        }
        if self.fbool("VBD", vbd, "currently_attached")? {
            return Err(Failure::new("DEVICE_ALREADY_ATTACHED", &[vbd]));
        }
        let vdi = self.fstr("VBD", vbd, "VDI")?;
        let d = self
            .disks
            .get(&vdi)
            .cloned()
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", &vdi]))?;
        let file = d
            .file
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", &vdi]))?;
        let used: Vec<String> = self
            .frefs("VM", &vm, "VBDs")?
            .iter()
            .filter_map(|b| self.fstr("VBD", b, "device").ok())
            .collect();
        let device = (b'b'..=b'z')
            .map(|c| format!("xvd{}", c as char))
            .find(|d| !used.contains(d))
            .ok_or_else(|| Failure::new("VBD_TOO_MANY", &[&vm]))?;
        // The guest sees a block device: materialize the VDI's virtual content as a raw file.
        let devdir = self.dir.join("dev");
        std::fs::create_dir_all(&devdir).map_err(Self::backend)?;
        let src = storage::open(&file, d.live).await.map_err(Self::backend)?;
        storage::materialize(src.as_ref(), &self.device_path(&device))
            .await
            .map_err(Self::backend)?;
        self.set("VBD", vbd, "device", s(device))?;
        self.set("VBD", vbd, "currently_attached", Value::Bool(true))?;
        Ok(())
    }

    fn vbd_unplug(&mut self, vbd: &str) -> R<()> {
        if !self.fbool("VBD", vbd, "currently_attached")? {
            return Err(Failure::new("DEVICE_ALREADY_DETACHED", &[vbd]));
        }
        let dev = self.fstr("VBD", vbd, "device")?;
        if !dev.is_empty() {
            let _ = std::fs::remove_file(self.device_path(&dev));
        }
        self.set("VBD", vbd, "currently_attached", Value::Bool(false))?;
        Ok(())
    }

    fn vbd_destroy(&mut self, vbd: &str) -> R<()> {
        if self.fbool("VBD", vbd, "currently_attached")? {
            return Err(Failure::new(
                "OPERATION_NOT_ALLOWED",
                &["VBD is currently attached"],
            ));
        }
        let vm = self.fstr("VBD", vbd, "VM")?;
        let vdi = self.fstr("VBD", vbd, "VDI")?;
        self.drop_ref("VM", &vm, "VBDs", vbd);
        self.drop_ref("VDI", &vdi, "VBDs", vbd);
        self.objs.remove(vbd);
        Ok(())
    }

    pub(crate) fn vif_create(&mut self, r: Rec) -> R<String> {
        let get = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let (vm, net) = (get("VM"), get("network"));
        self.obj("VM", &vm)?;
        self.obj("network", &net)?;
        let vif = self.add(
            "VIF",
            rec([
                ("VM", s(vm.clone())),
                ("network", s(net.clone())),
                ("device", s(get("device"))),
                ("MAC", s(get("MAC"))),
                ("MTU", r.get("MTU").cloned().unwrap_or(Value::Int(1500))),
                ("currently_attached", Value::Bool(false)),
                (
                    "other_config",
                    r.get("other_config")
                        .cloned()
                        .unwrap_or(Value::Struct(BTreeMap::new())),
                ),
            ]),
        );
        self.push_ref("VM", &vm, "VIFs", &vif)?;
        self.push_ref("network", &net, "VIFs", &vif)?;
        Ok(vif)
    }

    fn attached(&self, vdi: &str) -> R<bool> {
        Ok(self
            .frefs("VDI", vdi, "VBDs")?
            .iter()
            .any(|b| self.fbool("VBD", b, "currently_attached").unwrap_or(false)))
    }

    /// Deletes a VDI's data file unless another snapshot's VHD still needs it as a parent
    /// (then it lingers hidden, as on a VHD SR, until its last child goes).
    fn release_data(&mut self, vdi: &str) {
        let Some(file) = self.disks.get_mut(vdi).and_then(|d| d.file.take()) else {
            return;
        };
        let needed = self
            .disks
            .values()
            .any(|d| d.parent.as_deref() == Some(vdi) && d.file.is_some());
        if needed {
            self.disks
                .entry(format!("hidden:{vdi}"))
                .or_insert(DiskData {
                    lineage: String::new(),
                    file: Some(file),
                    live: false,
                    size: 0,
                    gens: vec![],
                    snap_gen: 0,
                    cbt_epoch: 0,
                    cbt_valid: false,
                    parent: None,
                });
        } else {
            let _ = std::fs::remove_file(&file);
        }
        // Hidden parents whose children are all gone can go now.
        let hidden: Vec<String> = self
            .disks
            .keys()
            .filter(|k| k.starts_with("hidden:"))
            .cloned()
            .collect();
        for h in hidden {
            let of = &h["hidden:".len()..];
            if !self
                .disks
                .values()
                .any(|d| d.parent.as_deref() == Some(of) && d.file.is_some())
            {
                if let Some(d) = self.disks.remove(&h) {
                    if let Some(f) = d.file {
                        let _ = std::fs::remove_file(f);
                    }
                }
            }
        }
    }

    pub(crate) fn vdi_destroy(&mut self, vdi: &str) -> R<()> {
        self.obj("VDI", vdi)?;
        if self.attached(vdi)? {
            return Err(Failure::new("VDI_IN_USE", &[vdi, "destroy"]));
        }
        for vbd in self.frefs("VDI", vdi, "VBDs")? {
            let vm = self.fstr("VBD", &vbd, "VM")?;
            self.drop_ref("VM", &vm, "VBDs", &vbd);
            self.objs.remove(&vbd);
        }
        self.release_data(vdi);
        self.nbd_vdis.remove(vdi);
        let sr = self.fstr("VDI", vdi, "SR")?;
        self.drop_ref("SR", &sr, "VDIs", vdi);
        let of = self.fstr("VDI", vdi, "snapshot_of")?;
        self.drop_ref("VDI", &of, "snapshots", vdi);
        self.disks.remove(vdi);
        self.objs.remove(vdi);
        Ok(())
    }

    fn vdi_cbt(&mut self, vdi: &str, on: bool) -> R<()> {
        self.obj("VDI", vdi)?;
        let was = self.fbool("VDI", vdi, "cbt_enabled")?;
        let d = self
            .disks
            .get_mut(vdi)
            .ok_or_else(|| Failure::new("VDI_MISSING", &["", vdi]))?;
        if !d.live {
            return Err(Failure::new("VDI_INCOMPATIBLE_TYPE", &[vdi, "snapshot"]));
        }
        if was != on {
            d.cbt_epoch += 1;
        }
        self.set("VDI", vdi, "cbt_enabled", Value::Bool(on))
    }

    fn vdi_data_destroy(&mut self, vdi: &str) -> R<()> {
        self.obj("VDI", vdi)?;
        if !self.fbool("VDI", vdi, "cbt_enabled")? {
            return Err(Failure::new("VDI_NO_CBT_METADATA", &[vdi]));
        }
        if self.attached(vdi)? {
            return Err(Failure::new("VDI_IN_USE", &[vdi, "data_destroy"]));
        }
        if !self.fbool("VDI", vdi, "is_a_snapshot")? {
            return Err(Failure::new("VDI_INCOMPATIBLE_TYPE", &[vdi, "user"]));
        }
        self.release_data(vdi);
        self.set("VDI", vdi, "type", s("cbt_metadata"))?;
        self.set("VDI", vdi, "physical_utilisation", Value::Int(0))?;
        Ok(())
    }

    fn list_changed_blocks(&mut self, from: &str, to: &str) -> R<String> {
        self.obj("VDI", from)?;
        self.obj("VDI", to)?;
        if self.attached(to)? {
            return Err(Failure::new("VDI_IN_USE", &[to, "list_changed_blocks"]));
        }
        let (a, b) = match (self.disks.get(from), self.disks.get(to)) {
            (Some(a), Some(b)) => (a.clone(), b.clone()),
            _ => return Err(Failure::new("VDI_MISSING", &["", from])),
        };
        let live_ok =
            |d: &DiskData, r: &str| !d.live || self.fbool("VDI", r, "cbt_enabled").unwrap_or(false);
        let valid = |d: &DiskData| d.live || d.cbt_valid;
        if a.lineage != b.lineage
            || !valid(&a)
            || !valid(&b)
            || !live_ok(&a, from)
            || !live_ok(&b, to)
            || a.cbt_epoch != b.cbt_epoch
        {
            // The CBT log does not cover the interval (disabled, reset, or another disk).
            return Err(Failure::new("VDI_NO_CBT_METADATA", &[from]));
        }
        let base = if a.live { self.generation } else { a.snap_gen };
        let mut bits = vec![0u8; a.gens.len().div_ceil(8)];
        for (i, g) in b.gens.iter().enumerate() {
            if *g > base {
                bits[i / 8] |= 0x80 >> (i % 8);
            }
        }
        Ok(base64::engine::general_purpose::STANDARD.encode(bits))
    }

    fn get_nbd_info(&self, sref: &str, vdi: &str) -> R<Value> {
        self.obj("VDI", vdi)?;
        let has_data = self.disks.get(vdi).is_some_and(|d| d.file.is_some());
        let purposes: Vec<String> = self
            .all_of("network")
            .iter()
            .flat_map(|n| self.frefs("network", n, "purpose").unwrap_or_default())
            .collect();
        let tls = purposes.iter().any(|p| p == "nbd");
        if !has_data || !(tls || purposes.iter().any(|p| p == "insecure_nbd")) {
            return Ok(Value::Array(vec![]));
        }
        let uuid = self.fstr("VDI", vdi, "uuid")?;
        Ok(Value::Array(vec![Value::record([
            ("exportname", s(format!("/{uuid}?session_id={sref}"))),
            ("address", s(self.nbd_host.clone())),
            ("port", Value::Int(i64::from(self.nbd_port))),
            (
                "cert",
                s(if tls {
                    self.cert_pem.clone()
                } else {
                    String::new()
                }),
            ),
            ("subject", s(if tls { "localhost" } else { "" })),
        ])]))
    }
}

pub(crate) fn rec<I: IntoIterator<Item = (&'static str, Value)>>(pairs: I) -> Rec {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

pub(crate) fn vm_defaults() -> Rec {
    rec([
        ("name_label", s("")),
        ("name_description", s("")),
        ("power_state", s("Halted")),
        ("is_a_template", Value::Bool(false)),
        ("is_a_snapshot", Value::Bool(false)),
        ("is_control_domain", Value::Bool(false)),
        ("snapshot_of", s(NULL)),
        ("snapshots", Value::Array(vec![])),
        (
            "snapshot_time",
            Value::DateTime("19700101T00:00:00Z".into()),
        ),
        ("VCPUs_max", Value::Int(1)),
        ("VCPUs_at_startup", Value::Int(1)),
        ("memory_static_max", Value::Int(1 << 30)),
        ("memory_static_min", Value::Int(1 << 30)),
        ("memory_dynamic_max", Value::Int(1 << 30)),
        ("memory_dynamic_min", Value::Int(1 << 30)),
        ("VBDs", Value::Array(vec![])),
        ("VIFs", Value::Array(vec![])),
        ("other_config", Value::Struct(BTreeMap::new())),
        ("tags", Value::Array(vec![])),
        ("resident_on", s(NULL)),
        ("affinity", s(NULL)),
        ("HVM_boot_policy", s("BIOS order")),
        (
            "HVM_boot_params",
            Value::Struct(BTreeMap::from([("order".to_string(), s("cd"))])),
        ),
        ("platform", Value::Struct(BTreeMap::new())),
        ("domain_type", s("hvm")),
        ("PV_bootloader", s("")),
        ("actions_after_shutdown", s("destroy")),
        ("actions_after_reboot", s("restart")),
        ("actions_after_crash", s("restart")),
        ("allowed_operations", Value::Array(vec![])),
        ("current_operations", Value::Struct(BTreeMap::new())),
        ("blocked_operations", Value::Struct(BTreeMap::new())),
        ("user_version", Value::Int(1)),
    ])
}
