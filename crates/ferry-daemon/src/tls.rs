//! The appliance's HTTPS identity: `STATE/tls/cert.pem` and `key.pem`. On first start a
//! self-signed pair is generated there; an administrator replaces it by putting their own
//! files in its place (the next start uses them).

use crate::DaemonError;
use crate::fsutil::write_atomic;
use std::path::Path;
use std::sync::Arc;

/// The loaded identity.
pub struct Identity {
    /// The rustls configuration serving it.
    pub config: Arc<rustls::ServerConfig>,
    /// `sha256:AB:…` of the leaf certificate, for clients to pin.
    pub fingerprint: String,
    /// Whether it was generated just now.
    pub generated: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

/// Loads `STATE/tls/{cert,key}.pem`, generating a self-signed pair for `names` when neither
/// exists. One without the other is refused (a half-replaced identity must not be
/// regenerated over the admin's file).
pub fn load_or_generate(state_dir: &Path, names: &[&str]) -> Result<Identity, DaemonError> {
    let dir = state_dir.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let err = |m: String| DaemonError::Tls(m);
    let generated = match (cert.exists(), key.exists()) {
        (true, true) => false,
        (false, false) => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
            let pair = ferry_tls::SelfSigned::generate(names).map_err(|e| err(e.to_string()))?;
            write_atomic(&key, pair.key_pem.as_bytes(), 0o600)
                .map_err(|e| err(format!("cannot write {}: {e}", key.display())))?;
            write_atomic(&cert, pair.cert_pem.as_bytes(), 0o644)
                .map_err(|e| err(format!("cannot write {}: {e}", cert.display())))?;
            true
        }
        (c, _) => {
            return Err(err(format!(
                "{} exists but {} does not: put both files there, or remove both to have a self-signed pair generated",
                if c { cert.display() } else { key.display() },
                if c { key.display() } else { cert.display() }
            )));
        }
    };
    let cert_pem = std::fs::read_to_string(&cert)
        .map_err(|e| err(format!("cannot read {}: {e}", cert.display())))?;
    let key_pem = std::fs::read_to_string(&key)
        .map_err(|e| err(format!("cannot read {}: {e}", key.display())))?;
    let config = ferry_tls::server_config(&cert_pem, &key_pem)
        .map_err(|e| err(format!("{} / {}: {e}", cert.display(), key.display())))?;
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| err(format!("{}: no certificate", cert.display())))?;
    Ok(Identity {
        config,
        fingerprint: ferry_tls::fingerprint_of(&der),
        generated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_keeps_and_refuses_half_pairs() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_generate(d.path(), &["localhost"]).unwrap();
        assert!(a.generated);
        let b = load_or_generate(d.path(), &["localhost"]).unwrap();
        assert!(!b.generated);
        assert_eq!(a.fingerprint, b.fingerprint);
        // The admin's own pair replaces it.
        let own = ferry_tls::SelfSigned::generate(&["backup.example"]).unwrap();
        std::fs::write(d.path().join("tls/cert.pem"), &own.cert_pem).unwrap();
        std::fs::write(d.path().join("tls/key.pem"), &own.key_pem).unwrap();
        let c = load_or_generate(d.path(), &["localhost"]).unwrap();
        assert_eq!(c.fingerprint, own.fingerprint());
        std::fs::remove_file(d.path().join("tls/key.pem")).unwrap();
        let e = load_or_generate(d.path(), &["localhost"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key.pem") && e.contains("does not"), "{e}");
        // A key that does not match is named.
        let other = ferry_tls::SelfSigned::generate(&["x"]).unwrap();
        std::fs::write(d.path().join("tls/key.pem"), &other.key_pem).unwrap();
        std::fs::write(d.path().join("tls/cert.pem"), "garbage").unwrap();
        let e = load_or_generate(d.path(), &["localhost"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cert.pem"), "{e}");
    }
}
