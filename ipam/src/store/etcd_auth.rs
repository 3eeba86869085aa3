//! Who we are to etcd: TLS files (flannel's `--etcd-cafile`, `--etcd-certfile`,
//! `--etcd-keyfile`) and etcd's own user and password (`--etcd-username`, `--etcd-password`).
//!
//! Without them any host that reaches etcd's client port can write leases:
//! a lease with another node's `PublicIP` hijacks its traffic. The files are read and checked
//! up front ([`EtcdTls::check`]) so that a typo stops `weft run` with the file named, instead of
//! every later call failing as "unavailable".
//!
//! Trust decisions:
//! - `https://` endpoints with a CA file trust that CA only (flanneld does the same).
//! - `https://` endpoints without one are verified against the system trust store
//!   (`rustls-native-certs`, i.e. `/etc/ssl/certs`), as flanneld's Go TLS stack does.
//! - A client certificate and its key come together or not at all.
//! - TLS files with an `http://` endpoint are refused by the caller's validation (weft's
//!   config), not ignored: ignoring them would send the leases in clear while the operator
//!   believes they are protected.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The TLS files for talking to etcd. All `None`: plain `http://`, or `https://` verified
/// against the system trust store without a client certificate.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct EtcdTls {
    /// PEM bundle of the CAs that may sign etcd's server certificate (`--etcd-cafile`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for etcd's `--client-cert-auth` (`--etcd-certfile`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (`--etcd-keyfile`).
    pub key_file: Option<PathBuf>,
}

/// Which of the TLS files an error is about.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TlsFile {
    /// [`EtcdTls::ca_file`].
    Ca,
    /// [`EtcdTls::cert_file`].
    Cert,
    /// [`EtcdTls::key_file`].
    Key,
}

impl TlsFile {
    fn what(self) -> &'static str {
        match self {
            Self::Ca => "CA certificate",
            Self::Cert => "client certificate",
            Self::Key => "client key",
        }
    }
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.what())
    }
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdTlsError {
    /// The file could not be read.
    #[error("{}: cannot read the {file}: {source}", path.display())]
    Read {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file holds no usable PEM block of the expected kind.
    #[error("{}: not a PEM {file}: {reason}", path.display())]
    Invalid {
        /// Which file.
        file: TlsFile,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A client certificate without its key, or a key without its certificate.
    #[error("{}: the {missing} is missing: a client certificate and its key must be given together", given.display())]
    Unpaired {
        /// The file that is not set.
        missing: TlsFile,
        /// The one that is.
        given: PathBuf,
    },
}

impl EtcdTlsError {
    /// The file the error is about.
    pub fn file(&self) -> TlsFile {
        match self {
            Self::Read { file, .. } | Self::Invalid { file, .. } => *file,
            Self::Unpaired { missing, .. } => *missing,
        }
    }

    /// The file the error is about, or for [`EtcdTlsError::Unpaired`] the one that is set.
    pub fn path(&self) -> &Path {
        match self {
            Self::Read { path, .. } | Self::Invalid { path, .. } => path,
            Self::Unpaired { given, .. } => given,
        }
    }
}

/// The PEM bytes of a checked [`EtcdTls`].
struct TlsPem {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, EtcdTlsError> {
    std::fs::read(path).map_err(|source| EtcdTlsError::Read { file, path: path.to_path_buf(), source })
}

fn certificates(file: TlsFile, path: &Path, pem: &[u8]) -> Result<(), EtcdTlsError> {
    let invalid = |reason: String| EtcdTlsError::Invalid { file, path: path.to_path_buf(), reason };
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| invalid(e.to_string()))?;
        n += 1;
    }
    if n == 0 { Err(invalid("no \"BEGIN CERTIFICATE\" block".into())) } else { Ok(()) }
}

impl EtcdTls {
    /// Whether any file is set.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Reads the files and checks that each holds what it should: certificates in the CA and
    /// certificate files, a private key in the key file, and that certificate and key come
    /// together. (Whether the key matches the certificate is checked when connecting.)
    ///
    /// # Errors
    /// The first problem, naming the file.
    pub fn check(&self) -> Result<(), EtcdTlsError> {
        self.read_checked().map(drop)
    }

    fn read_checked(&self) -> Result<TlsPem, EtcdTlsError> {
        let ca = match &self.ca_file {
            Some(path) => {
                let pem = read(TlsFile::Ca, path)?;
                certificates(TlsFile::Ca, path, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(cert), None) => return Err(EtcdTlsError::Unpaired { missing: TlsFile::Key, given: cert.clone() }),
            (None, Some(key)) => return Err(EtcdTlsError::Unpaired { missing: TlsFile::Cert, given: key.clone() }),
            (Some(cert_path), Some(key_path)) => {
                let cert = read(TlsFile::Cert, cert_path)?;
                certificates(TlsFile::Cert, cert_path, &cert)?;
                let key = read(TlsFile::Key, key_path)?;
                PrivateKeyDer::from_pem_slice(&key).map_err(|e| EtcdTlsError::Invalid {
                    file: TlsFile::Key,
                    path: key_path.clone(),
                    reason: format!("no private key ({e})"),
                })?;
                Some((cert, key))
            }
        };
        Ok(TlsPem { ca, identity })
    }

    /// The client TLS configuration for `https://` endpoints: our CA or the system roots, our
    /// identity if set, and a handshake deadline so that a peer that accepts TCP but never
    /// finishes TLS fails the call instead of hanging it.
    pub(crate) fn client_config(&self, handshake_timeout: Duration) -> Result<TlsOptions, EtcdTlsError> {
        let pem = self.read_checked()?;
        let mut tls = TlsOptions::new().timeout(handshake_timeout);
        tls = match pem.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = pem.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(tls)
    }
}

/// A secret that never appears in `Debug` output or logs.
#[derive(Clone, Eq, PartialEq, serde::Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// An etcd user (etcd's `auth enable` role-based access), flannel's `--etcd-username` and
/// `--etcd-password`.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct EtcdCredentials {
    /// The etcd user.
    pub username: String,
    /// Its password.
    pub password: Password,
}

/// What to add to a failed call's message when TLS is in use and the failure is about a
/// certificate: etcd's that we do not trust, or ours that etcd refused. With TLS 1.3 the server checks the client certificate only
/// after the client considers the handshake done, so the client sees either etcd's alert
/// (`BadCertificate`, `CertificateRequired`, `UnknownCA`) or, when the connection is gone
/// before the alert is read, only "connection closed". Either way, the raw message does not
/// tell an operator what to fix.
pub(crate) fn tls_hint(description: &str, tls: &EtcdTls) -> Option<String> {
    let d = description.to_ascii_lowercase();
    if d.contains("invalid peer certificate") {
        let trusted = match &tls.ca_file {
            Some(ca) => format!("the CA in {}", ca.display()),
            None => "the system trust store (set --etcd-cafile to trust etcd's CA)".to_owned(),
        };
        return Some(format!("etcd's server certificate is not one {trusted} vouches for"));
    }
    let alert = ["badcertificate", "certificaterequired", "unknownca", "certificateunknown", "unsupportedcertificate"]
        .iter()
        .any(|a| d.contains(a));
    let closed = ["connection closed", "operation was canceled", "broken pipe", "connection reset"]
        .iter()
        .any(|c| d.contains(c));
    if !(alert || closed) {
        return None;
    }
    let maybe = if alert { "etcd rejected" } else { "etcd closed the TLS connection; it may have rejected" };
    Some(match &tls.cert_file {
        Some(cert) => format!(
            "{maybe} our client certificate {} (is it signed by a CA in etcd's --trusted-ca-file, and still valid?)",
            cert.display()
        ),
        None => format!(
            "{maybe} the connection for want of a client certificate (etcd runs with --client-cert-auth?): \
             set --etcd-certfile and --etcd-keyfile"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Only the PEM framing is checked up front; the DER inside is parsed when connecting.
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBXjCCAQSgAwIBAgIUJ3o2\n-----END CERTIFICATE-----\n";

    fn files(dir: &Path, entries: &[(&str, &str)]) -> Vec<PathBuf> {
        entries
            .iter()
            .map(|(name, body)| {
                let p = dir.join(name);
                std::fs::write(&p, body).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = files(dir.path(), &[("empty.pem", ""), ("junk.pem", "hello\n"), ("cert.pem", CERT)]);
        let (empty, junk, cert) = (&p[0], &p[1], &p[2]);
        let missing = dir.path().join("missing.pem");
        let cases: Vec<(EtcdTls, TlsFile, String)> = vec![
            (
                EtcdTls { ca_file: Some(missing.clone()), ..EtcdTls::default() },
                TlsFile::Ca,
                format!("{}: cannot read the CA certificate: No such file", missing.display()),
            ),
            (
                EtcdTls { ca_file: Some(junk.clone()), ..EtcdTls::default() },
                TlsFile::Ca,
                format!("{}: not a PEM CA certificate: no \"BEGIN CERTIFICATE\" block", junk.display()),
            ),
            (
                EtcdTls { cert_file: Some(cert.clone()), ..EtcdTls::default() },
                TlsFile::Key,
                format!(
                    "{}: the client key is missing: a client certificate and its key must be given together",
                    cert.display()
                ),
            ),
            (
                EtcdTls { key_file: Some(cert.clone()), ..EtcdTls::default() },
                TlsFile::Cert,
                format!("{}: the client certificate is missing", cert.display()),
            ),
            (
                EtcdTls { cert_file: Some(empty.clone()), key_file: Some(cert.clone()), ..EtcdTls::default() },
                TlsFile::Cert,
                format!("{}: not a PEM client certificate", empty.display()),
            ),
            (
                EtcdTls { cert_file: Some(cert.clone()), key_file: Some(cert.clone()), ..EtcdTls::default() },
                TlsFile::Key,
                format!("{}: not a PEM client key: no private key", cert.display()),
            ),
        ];
        for (tls, file, want) in cases {
            let err = tls.check().unwrap_err();
            assert_eq!(err.file(), file, "{tls:?}");
            assert!(err.to_string().starts_with(&want), "{tls:?}: got {err}, want {want}");
        }
        assert!(EtcdTls::default().check().is_ok());
        assert!(!EtcdTls::default().is_set());
    }

    #[test]
    fn password_never_shows_in_debug() {
        let c = EtcdCredentials { username: "weft".into(), password: Password::new("hunter2") };
        let shown = format!("{c:?}");
        assert!(shown.contains("weft") && !shown.contains("hunter2"), "{shown}");
        assert_eq!(c.password.expose(), "hunter2");
    }

    #[test]
    fn hint_only_for_what_looks_like_a_certificate_problem() {
        let with_cert = EtcdTls {
            ca_file: Some("/etc/weft/ca.crt".into()),
            cert_file: Some("/etc/weft/etcd.crt".into()),
            key_file: Some("/etc/weft/etcd.key".into()),
        };
        let alert = "transport error: connection error: received fatal alert: BadCertificate";
        let hint = tls_hint(alert, &with_cert).unwrap();
        assert!(hint.starts_with("etcd rejected our client certificate /etc/weft/etcd.crt"), "{hint}");
        for closed in ["operation was canceled: connection closed", "stream closed because of a broken pipe"] {
            let hint = tls_hint(closed, &EtcdTls::default()).unwrap();
            assert!(hint.contains("may have rejected") && hint.contains("--etcd-certfile"), "{hint}");
        }
        assert_eq!(tls_hint("tcp connect error: Connection refused (os error 111)", &with_cert), None);
        let hint = tls_hint("invalid peer certificate: UnknownIssuer", &with_cert).unwrap();
        assert!(hint.contains("/etc/weft/ca.crt"), "{hint}");
        let hint = tls_hint("invalid peer certificate: UnknownIssuer", &EtcdTls::default()).unwrap();
        assert!(hint.contains("system trust store"), "{hint}");
    }
}
