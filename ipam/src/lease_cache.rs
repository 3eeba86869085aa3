//! The last known lease set, kept on disk so that a node restarting while its store is down
//! brings its data plane up at once, with its own subnet and its peers' routes, instead of
//! waiting for the store with no TUN (and pod traffic with nowhere to go).
//!
//! ```text
//! /var/lib/weft/leases/<node>.json   (written atomically: temp + fsync + rename + fsync dir)
//! {"Version":1,"Store":"etcd http://…|/coreos.com/network","Network":{…net-conf…},
//!  "Lease":{"Subnet":"10.244.1.0/24","Attrs":{…},"ExpirationUnixMs":…,"CreatedRevision":…},
//!  "Peers":[…same shape…]}
//! ```
//!
//! The cache is a hint, never an authority: the daemon still acquires its lease from the store
//! and follows the store's watch once it answers, and exits to restart cleanly if the store's
//! network config or our subnet turn out different. `Store` names the store the cache came
//! from, so a cache written against another store (a lab re-created with a fresh directory) is
//! not used. Everything read back is validated like any input: the network config as
//! [`NetworkConfig::from_json`] does, our lease against it; the peers go through the same checks
//! as leases read from the store.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::config::NetworkConfig;
use crate::durable;
use crate::lease::{LeaseAttrs, SubnetLease};
use crate::store::Revision;

/// The format version written; others are refused (an older weft reading a newer cache, or
/// the reverse, starts as if there were none).
const VERSION: u32 = 1;

/// Largest cache file read (64 MiB: 20 000 leases of about 300 bytes fit many times over).
const MAX_BYTES: u64 = 64 << 20;

/// What the daemon last knew: the store it came from, the network config, our lease and every
/// other lease.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseCache {
    /// The store this was read from (`file:/var/lib/weft/store`, `etcd:<endpoints>|<prefix>`).
    pub store: String,
    /// The network config.
    pub network: NetworkConfig,
    /// Our lease.
    pub lease: SubnetLease,
    /// Everyone else's leases (unvalidated: they are checked like store records when used).
    pub peers: Vec<SubnetLease>,
}

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LeaseCacheError {
    /// A file operation failed.
    #[error("lease cache {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is there but unusable; the daemon starts as if there were none.
    #[error("lease cache {path}: {reason} (ignored; the daemon waits for the store instead)")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field.
        reason: String,
    },
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "Version")]
    version: u32,
    #[serde(rename = "Store")]
    store: String,
    #[serde(rename = "Network")]
    network: serde_json::Value,
    #[serde(rename = "Lease")]
    lease: Record,
    #[serde(rename = "Peers")]
    peers: Vec<Record>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[serde(rename = "Subnet")]
    subnet: Ipv4Net,
    #[serde(rename = "Attrs")]
    attrs: LeaseAttrs,
    #[serde(rename = "ExpirationUnixMs")]
    expiration_unix_ms: Option<u64>,
    #[serde(rename = "CreatedRevision", default)]
    created_revision: u64,
}

impl Record {
    fn of(l: &SubnetLease) -> Self {
        Self {
            subnet: l.subnet,
            attrs: l.attrs.clone(),
            expiration_unix_ms: l.expiration.map(|t| {
                t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
            created_revision: l.created.0,
        }
    }

    fn lease(self, field: &str) -> Result<SubnetLease, String> {
        if self.subnet.trunc() != self.subnet {
            return Err(format!("{field}.Subnet: {} has host bits set", self.subnet));
        }
        let expiration = match self.expiration_unix_ms {
            None => None,
            Some(ms) => Some(
                SystemTime::UNIX_EPOCH
                    .checked_add(Duration::from_millis(ms))
                    .ok_or_else(|| format!("{field}.ExpirationUnixMs: {ms} is out of range"))?,
            ),
        };
        Ok(SubnetLease { subnet: self.subnet, attrs: self.attrs, expiration, created: Revision(self.created_revision) })
    }
}

impl LeaseCache {
    /// Reads the cache at `path`: `Ok(None)` when there is none.
    ///
    /// # Errors
    /// [`LeaseCacheError::Io`] when it cannot be read, [`LeaseCacheError::Invalid`] when it does
    /// not parse, has another version, or our lease does not fit its network config.
    pub fn read(path: &Path) -> Result<Option<Self>, LeaseCacheError> {
        let invalid = |reason: String| LeaseCacheError::Invalid { path: path.into(), reason };
        let Some(bytes) =
            durable::read_optional(path).map_err(|e| LeaseCacheError::Io { path: e.path, source: e.source })?
        else {
            return Ok(None);
        };
        if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_BYTES {
            return Err(invalid(format!("{} bytes, more than the {MAX_BYTES} read", bytes.len())));
        }
        let file: File = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if file.version != VERSION {
            return Err(invalid(format!("Version: {} is not {VERSION}", file.version)));
        }
        let network =
            NetworkConfig::from_json(&file.network.to_string()).map_err(|e| invalid(format!("Network: {e}")))?;
        let lease = file.lease.lease("Lease").map_err(invalid)?;
        if !network.network.contains(&lease.subnet) || lease.subnet.prefix_len() != network.subnet_len {
            return Err(invalid(format!(
                "Lease.Subnet: {} is not a /{} of {}",
                lease.subnet, network.subnet_len, network.network
            )));
        }
        let peers = file
            .peers
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.lease(&format!("Peers[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        Ok(Some(Self { store: file.store, network, lease, peers }))
    }

    /// Writes the cache to `path` atomically and durably, creating its directory (mode 0700:
    /// state of the node's root daemon, nobody else's business).
    ///
    /// # Errors
    /// [`LeaseCacheError::Io`].
    pub fn write(&self, path: &Path) -> Result<(), LeaseCacheError> {
        let io = |source| LeaseCacheError::Io { path: path.into(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        }
        let network: serde_json::Value = serde_json::from_str(&self.network.to_json())
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let file = File {
            version: VERSION,
            store: self.store.clone(),
            network,
            lease: Record::of(&self.lease),
            peers: self.peers.iter().map(Record::of).collect(),
        };
        let bytes =
            serde_json::to_vec(&file).map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        durable::write_atomic(path, &bytes).map_err(|e| LeaseCacheError::Io { path: e.path, source: e.source })
    }

    /// Removes the cache (a node that leaves must not come back up on a released subnet).
    /// Absent is fine.
    ///
    /// # Errors
    /// [`LeaseCacheError::Io`].
    pub fn remove(path: &Path) -> Result<(), LeaseCacheError> {
        durable::remove(path).map(|_| ()).map_err(|e| LeaseCacheError::Io { path: e.path, source: e.source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lease(third: u8, host: u8) -> SubnetLease {
        SubnetLease {
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, host), "udp"),
            expiration: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            created: Revision(u64::from(third)),
        }
    }

    fn cache() -> LeaseCache {
        LeaseCache {
            store: "file:/var/lib/weft/store".into(),
            network: NetworkConfig::from_json(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#).unwrap(),
            lease: lease(1, 1),
            peers: vec![lease(2, 2), SubnetLease { expiration: None, ..lease(3, 3) }],
        }
    }

    #[test]
    fn round_trip_and_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases/n1.json");
        assert!(LeaseCache::read(&path).unwrap().is_none());
        cache().write(&path).unwrap();
        assert_eq!(LeaseCache::read(&path).unwrap(), Some(cache()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        LeaseCache::remove(&path).unwrap();
        LeaseCache::remove(&path).unwrap();
        assert!(LeaseCache::read(&path).unwrap().is_none());
    }

    #[test]
    fn bad_caches_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let good = {
            cache().write(&path).unwrap();
            std::fs::read_to_string(&path).unwrap()
        };
        let cases = [
            ("garbage", "{".to_owned()),
            ("Version", good.replace("\"Version\":1", "\"Version\":7")),
            ("Network", good.replace("10.244.0.0/16", "10.244.0.0/33")),
            ("Lease.Subnet", good.replace("\"Subnet\":\"10.244.1.0/24\"", "\"Subnet\":\"10.99.1.0/24\"")),
            ("Lease.Subnet", good.replace("\"Subnet\":\"10.244.1.0/24\"", "\"Subnet\":\"10.244.0.0/16\"")),
            ("host bits", good.replace("\"Subnet\":\"10.244.2.0/24\"", "\"Subnet\":\"10.244.2.7/24\"")),
            ("unknown field", good.replace("\"Version\":1", "\"Version\":1,\"Extra\":2")),
        ];
        for (what, text) in cases {
            std::fs::write(&path, &text).unwrap();
            let e = LeaseCache::read(&path).expect_err(what);
            assert!(matches!(e, LeaseCacheError::Invalid { .. }), "{what}: {e}");
            if what.starts_with("Lease") || what == "Version" || what == "Network" {
                assert!(e.to_string().contains(what), "{what}: {e}");
            }
        }
    }
}
