//! Test certificates, generated in-process with rcgen (no openssl CLI needed): a CA, an etcd
//! server certificate for 127.0.0.1, a client certificate, and a second, untrusted CA with a
//! client certificate of its own. PEM files in a temporary directory.

#![allow(clippy::unwrap_used, dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every file a TLS test needs (removed with `dir`).
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The CA that signed `server` and `client`.
    pub ca: PathBuf,
    /// etcd's certificate: SAN IP 127.0.0.1 and DNS localhost, server auth.
    pub server: Pair,
    /// A client certificate from `ca` (CN weft).
    pub client: Pair,
    /// A CA etcd does not trust.
    pub other_ca: PathBuf,
    /// A client certificate from `other_ca`.
    pub other_client: Pair,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    dir: &Path,
    name: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    sans: &[&str],
    eku: ExtendedKeyUsagePurpose,
) -> Pair {
    let mut p = CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    let pair = Pair { cert: dir.join(format!("{name}.crt")), key: dir.join(format!("{name}.key")) };
    std::fs::write(&pair.cert, cert.pem()).unwrap();
    std::fs::write(&pair.key, key.serialize_pem()).unwrap();
    pair
}

impl Pki {
    /// Generates everything into a fresh temporary directory.
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (ca_issuer, other_issuer) = (ca("weft test CA"), ca("some other CA"));
        let ca = d.join("ca.crt");
        std::fs::write(&ca, ca_issuer.pem()).unwrap();
        let other_ca = d.join("other-ca.crt");
        std::fs::write(&other_ca, other_issuer.pem()).unwrap();
        let server = leaf(d, "etcd", &ca_issuer, &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        let client = leaf(d, "weft", &ca_issuer, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let other_client = leaf(d, "intruder", &other_issuer, &[], ExtendedKeyUsagePurpose::ClientAuth);
        Self { dir, ca, server, client, other_ca, other_client }
    }

    /// etcd's flags for serving clients over TLS and requiring a certificate from `ca`.
    pub fn etcd_args(&self) -> Vec<OsString> {
        vec![
            "--cert-file".into(),
            self.server.cert.clone().into(),
            "--key-file".into(),
            self.server.key.clone().into(),
            "--trusted-ca-file".into(),
            self.ca.clone().into(),
            "--client-cert-auth".into(),
        ]
    }
}
