//! A throwaway MIT Kerberos realm: `kdb5_util create` in a temporary directory, principals and
//! keytabs through `kadmin.local`, and `krb5kdc -n` on a free loopback port (UDP and TCP), with
//! generated `kdc.conf`/`krb5.conf` (`KRB5_KDC_PROFILE`, `KRB5_CONFIG`). Debian's `krb5-kdc`,
//! `krb5-admin-server` and `krb5-user` (tests/peers/install.sh).

use crate::process::PeerProcess;
use crate::{free_port, scratch_dir, tool};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The realm every fixture creates.
pub const REALM: &str = "FERRY.TEST";

/// A running KDC for [`REALM`].
#[derive(Debug)]
pub struct MitKdc {
    process: PeerProcess,
    port: u16,
    dir: tempfile::TempDir,
}

/// A Kerberos admin program: Debian puts them in `/usr/sbin`, which a test's `PATH` may lack.
fn sbin(name: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(name);
    if p.exists() { p } else { tool(name) }
}

fn profile_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        (
            "KRB5_CONFIG".into(),
            dir.join("krb5.conf").display().to_string(),
        ),
        (
            "KRB5_KDC_PROFILE".into(),
            dir.join("kdc.conf").display().to_string(),
        ),
    ]
}

fn admin(env: &[(String, String)], program: &str, args: &[&str]) -> String {
    let out = Command::new(sbin(program))
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; run tests/peers/install.sh"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

impl MitKdc {
    /// Creates the realm and starts its KDC.
    ///
    /// # Panics
    /// When MIT Kerberos is not installed (naming tests/peers/install.sh) or the KDC does not
    /// start.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Like [`Self::start`], with the KDC's clock `offset` seconds off (`"+600"`), through
    /// libfaketime (Debian's `faketime`): a host and a KDC that disagree on the time.
    pub fn start_with_clock_offset(offset: &str) -> Self {
        Self::start_inner(Some(offset))
    }

    fn start_inner(offset: Option<&str>) -> Self {
        let dir = scratch_dir();
        let port = free_port();
        let d = dir.path();
        let kdc_conf = format!(
            "[kdcdefaults]\n kdc_ports = {port}\n kdc_tcp_ports = {port}\n\n[realms]\n {REALM} = {{\n  database_name = {db}\n  key_stash_file = {stash}\n  acl_file = {acl}\n  supported_enctypes = aes256-cts-hmac-sha1-96:normal\n  max_life = 1h\n }}\n\n[logging]\n kdc = FILE:{log}\n",
            db = d.join("principal").display(),
            stash = d.join("stash").display(),
            acl = d.join("kadm5.acl").display(),
            log = d.join("kdc.log").display(),
        );
        std::fs::write(d.join("kdc.conf"), kdc_conf).expect("write kdc.conf");
        std::fs::write(d.join("kadm5.acl"), "").expect("write kadm5.acl");
        let krb5_conf = format!(
            "[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n rdns = false\n dns_canonicalize_hostname = false\n udp_preference_limit = 1\n\n[realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{port}\n }}\n"
        );
        std::fs::write(d.join("krb5.conf"), krb5_conf).expect("write krb5.conf");
        let env = profile_env(d);
        admin(
            &env,
            "kdb5_util",
            &["create", "-s", "-r", REALM, "-P", "ferry-master-key"],
        );
        let mut cmd = match offset {
            Some(o) => {
                let mut c = Command::new(tool("faketime"));
                c.args(["-f", &format!("{o}s")]).arg(sbin("krb5kdc"));
                c
            }
            None => Command::new(sbin("krb5kdc")),
        };
        cmd.args(["-n", "-r", REALM]).envs(env);
        let mut process = PeerProcess::spawn("krb5kdc", cmd, &d.join("krb5kdc.out"));
        process.wait_until("answering on TCP", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { process, port, dir }
    }

    fn kadmin(&self, query: &str) -> String {
        let out = admin(&self.env(), "kadmin.local", &["-r", REALM, "-q", query]);
        assert!(
            !out.contains("rror") && !out.contains("while "),
            "kadmin.local -q {query:?}:\n{out}"
        );
        out
    }

    /// Adds user `name` with `password` (pre-authentication required, as in a domain).
    ///
    /// # Panics
    /// When `kadmin.local` fails.
    pub fn add_user(&self, name: &str, password: &str) {
        self.kadmin(&format!("addprinc +requires_preauth -pw {password} {name}"));
    }

    /// Adds service principal `spn` (`HTTP/127.0.0.1`) with a random key and writes its keytab.
    pub fn add_service(&self, spn: &str) -> PathBuf {
        let kt = self
            .dir
            .path()
            .join(format!("{}.keytab", spn.replace(['/', '@'], "_")));
        self.kadmin(&format!("addprinc -randkey {spn}"));
        self.kadmin(&format!("ktadd -k {} {spn}", kt.display()));
        kt
    }

    /// Writes a keytab with `name`'s keys (this changes them: kadmin's `ktadd` re-keys).
    pub fn keytab_for(&self, name: &str) -> PathBuf {
        let kt = self.dir.path().join(format!("{name}.keytab"));
        self.kadmin(&format!("ktadd -k {} {name}", kt.display()));
        kt
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        REALM
    }

    /// `127.0.0.1:PORT` (UDP and TCP).
    pub fn kdc(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The generated client profile.
    pub fn krb5_conf(&self) -> PathBuf {
        self.dir.path().join("krb5.conf")
    }

    /// `KRB5_CONFIG` and `KRB5_KDC_PROFILE` for programs that should use this realm.
    pub fn env(&self) -> Vec<(String, String)> {
        profile_env(self.dir.path())
    }

    /// The KDC's log (one line per AS/TGS request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kdc.log")).unwrap_or_default()
    }

    /// The KDC's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}
