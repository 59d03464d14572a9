//! A throwaway CA and server certificate for TLS tests, laid out the way qemu-nbd
//! (`tls-creds-x509,dir=`) and nbdkit (`--tls-certificates=`) read them.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use std::path::Path;

/// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (and a client pair) in a temporary directory.
#[derive(Debug)]
pub struct TlsFiles {
    dir: tempfile::TempDir,
    ca_cert_pem: String,
    server_cert_pem: String,
    server_cert_der: Vec<u8>,
}

impl TlsFiles {
    /// Makes a CA and a server certificate valid for `localhost`, `127.0.0.1` and `::1`.
    pub fn generate() -> Self {
        let dir = crate::scratch_dir();

        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Ferry test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");

        let leaf = |cn: &str, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
            ])
            .expect("leaf params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("sign leaf");
            (cert, key)
        };
        let (server, server_key) = leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let (client, client_key) = leaf("ferry-test-client", ExtendedKeyUsagePurpose::ClientAuth);

        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write TLS file");
        };
        write("ca-cert.pem", &ca_cert.pem());
        write("server-cert.pem", &server.pem());
        write("server-key.pem", &server_key.serialize_pem());
        write("client-cert.pem", &client.pem());
        write("client-key.pem", &client_key.serialize_pem());

        Self {
            ca_cert_pem: ca_cert.pem(),
            server_cert_pem: server.pem(),
            server_cert_der: server.der().to_vec(),
            dir,
        }
    }

    /// The directory holding the PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM).
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The server certificate (PEM), as XenAPI's `VDI.get_nbd_info` hands it out.
    pub fn server_cert_pem(&self) -> &str {
        &self.server_cert_pem
    }

    /// The server certificate (DER).
    pub fn server_cert_der(&self) -> &[u8] {
        &self.server_cert_der
    }

    /// SHA-256 fingerprint of the server certificate, `sha256:AB:CD:…`.
    pub fn fingerprint_sha256(&self) -> String {
        let hex: Vec<String> = Sha256::digest(&self.server_cert_der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        format!("sha256:{}", hex.join(":"))
    }
}
