//! Pod addresses from the weft daemon, over its API socket: the plugin keeps no IPAM state of
//! its own, so only the daemon ever writes the store.
//!
//! Daemon answers map to CNI codes: unreachable or `not_ready` is 11 (try again later: the
//! daemon is starting or its lease is not held), `exhausted` is 102, anything else 103. DEL
//! alone takes an unreachable daemon as an answer ([`Ipam::try_release`]): it cannot wait for
//! one, so it records the release for later instead.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde_json::Value;
use weft_ipam::{ContainerId, IfName};

use super::types::CniError;
use crate::daemon::api::{self, AttachmentRef, ClientError, Request};

/// An address the daemon holds for an attachment.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct PodAddr {
    /// The address with the node subnet's prefix length, as the daemon hands it out.
    pub address: Ipv4Net,
    /// The node's gateway (its TUN address).
    pub gateway: Ipv4Addr,
}

/// What ADD needs from the daemon's status.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Overlay {
    /// The overlay MTU: every pod interface gets it, so no pod sends what the tunnel cannot
    /// carry.
    pub mtu: u32,
}

/// How a release went: a daemon that could not be reached is told apart from one that answered.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Release {
    /// The daemon answered and freed these addresses (none: the attachment held nothing).
    Done(Vec<String>),
    /// No answer: no socket, nobody listening, a timeout, or the daemon went away mid-request.
    /// Nothing is known to be freed (the request may still have run). The reason, for messages.
    Unreachable(String),
}

/// The daemon at one socket.
#[derive(Clone, Debug)]
pub struct Ipam {
    socket: PathBuf,
}

fn attachment(cid: &ContainerId, ifname: &IfName) -> AttachmentRef {
    AttachmentRef { container_id: cid.as_str().to_owned(), ifname: ifname.as_str().to_owned() }
}

impl Ipam {
    /// The daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into() }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn call(&self, req: &Request) -> Result<Value, CniError> {
        api::request(&self.socket, req).map_err(|e| self.error(e))
    }

    fn error(&self, e: ClientError) -> CniError {
        match e {
            ClientError::Connect { .. } | ClientError::Io { .. } => {
                CniError::new(CniError::TRY_AGAIN_LATER, format!("weft daemon not reachable: {e}"))
            }
            ClientError::Refused(r) => {
                let code = match r.code.as_str() {
                    "not_ready" => CniError::TRY_AGAIN_LATER,
                    "exhausted" => CniError::ADDRESS_EXHAUSTED,
                    _ => CniError::DAEMON,
                };
                CniError::new(code, format!("weft daemon ({}): {}", self.socket.display(), r.message))
                    .with_details(format!("daemon error code {}", r.code))
            }
            ClientError::Decode { .. } => CniError::new(CniError::DAEMON, e.to_string()),
        }
    }

    fn decode(&self, what: &str, v: &Value) -> CniError {
        CniError::new(
            CniError::DAEMON,
            format!("weft daemon ({}): unexpected {what} answer: {v}", self.socket.display()),
        )
    }

    fn pod_addr(&self, v: &Value) -> Result<PodAddr, CniError> {
        let address = v.get("address").and_then(Value::as_str).and_then(|s| s.parse().ok());
        let gateway = v.get("gateway").and_then(Value::as_str).and_then(|s| s.parse().ok());
        match (address, gateway) {
            (Some(address), Some(gateway)) => Ok(PodAddr { address, gateway }),
            _ => Err(self.decode("allocation", v)),
        }
    }

    /// Whether the daemon can hand out addresses now.
    ///
    /// # Errors
    /// Code 11 while it is unreachable or not ready.
    pub fn ready(&self) -> Result<(), CniError> {
        self.call(&Request::Ready).map(|_| ())
    }

    /// The overlay's parameters.
    ///
    /// # Errors
    /// Code 11 if the daemon is unreachable, 103 if the answer lacks them.
    pub fn overlay(&self) -> Result<Overlay, CniError> {
        let v = self.call(&Request::Status)?;
        let mtu = v.get("mtu").and_then(Value::as_u64).and_then(|m| u32::try_from(m).ok());
        mtu.map(|mtu| Overlay { mtu }).ok_or_else(|| self.decode("status", &v))
    }

    /// The attachment's address, or the next free one.
    ///
    /// # Errors
    /// 11 (not ready), 102 (subnet full), 103.
    pub fn allocate(&self, cid: &ContainerId, ifname: &IfName) -> Result<PodAddr, CniError> {
        let v = self.call(&Request::Allocate(attachment(cid, ifname)))?;
        self.pod_addr(&v)
    }

    /// The address the daemon holds for the attachment, if any.
    ///
    /// # Errors
    /// 11, 103.
    pub fn get(&self, cid: &ContainerId, ifname: &IfName) -> Result<Option<PodAddr>, CniError> {
        match self.call(&Request::Get(attachment(cid, ifname)))? {
            Value::Null => Ok(None),
            v => self.pod_addr(&v).map(Some),
        }
    }

    /// Frees the attachment's address; nothing to free is fine. Returns what was freed.
    ///
    /// # Errors
    /// 11, 103.
    pub fn release(&self, cid: &ContainerId, ifname: &IfName) -> Result<Vec<String>, CniError> {
        let v = self.call(&Request::Release(attachment(cid, ifname)))?;
        Ok(strings(v.get("released")))
    }

    /// Frees the attachment's address like [`Self::release`], but answers
    /// [`Release::Unreachable`] instead of failing when the daemon cannot be reached.
    ///
    /// # Errors
    /// The daemon refused (103) or answered something that does not parse (103).
    pub fn try_release(&self, cid: &ContainerId, ifname: &IfName) -> Result<Release, CniError> {
        match api::request(&self.socket, &Request::Release(attachment(cid, ifname))) {
            Ok(v) => Ok(Release::Done(strings(v.get("released")))),
            Err(e @ (ClientError::Connect { .. } | ClientError::Io { .. })) => Ok(Release::Unreachable(e.to_string())),
            Err(e) => Err(self.error(e)),
        }
    }

    /// Frees every allocation not in `valid` (the daemon spares very young ones). Returns the
    /// freed addresses.
    ///
    /// # Errors
    /// 11, 103.
    pub fn gc(&self, valid: Vec<AttachmentRef>) -> Result<Vec<String>, CniError> {
        let v = self.call(&Request::Gc { valid })?;
        Ok(strings(v.get("freed")))
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::api::ApiError;

    #[test]
    fn daemon_refusals_map_to_cni_codes() {
        let ipam = Ipam::new("/run/weft/test.sock");
        let refused =
            |code: &str| ipam.error(ClientError::Refused(ApiError { code: code.into(), message: "m".into() })).code;
        assert_eq!(refused("not_ready"), CniError::TRY_AGAIN_LATER);
        assert_eq!(refused("exhausted"), CniError::ADDRESS_EXHAUSTED);
        assert_eq!(refused("store"), CniError::DAEMON);
        assert_eq!(refused("invalid"), CniError::DAEMON);
        let connect = ClientError::Connect {
            path: "/run/weft/test.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let e = ipam.error(connect);
        assert_eq!(e.code, CniError::TRY_AGAIN_LATER);
        assert!(e.msg.contains("/run/weft/test.sock"), "{e}");
    }

    #[test]
    fn unreachable_daemon_is_try_again_later() {
        let ipam = Ipam::new("/nonexistent/weft-cni-test.sock");
        assert_eq!(ipam.ready().unwrap_err().code, CniError::TRY_AGAIN_LATER);
        let (cid, ifname) = (ContainerId::new("c").unwrap(), IfName::new("eth0").unwrap());
        assert_eq!(ipam.allocate(&cid, &ifname).unwrap_err().code, CniError::TRY_AGAIN_LATER);
    }

    #[test]
    fn allocation_answers_parse() {
        let ipam = Ipam::new("/x");
        let a = ipam.pod_addr(&serde_json::json!({"address": "10.244.7.2/24", "gateway": "10.244.7.1"})).unwrap();
        assert_eq!(a.address, "10.244.7.2/24".parse().unwrap());
        assert_eq!(a.gateway, Ipv4Addr::new(10, 244, 7, 1));
        assert_eq!(ipam.pod_addr(&serde_json::json!({"address": "x"})).unwrap_err().code, CniError::DAEMON);
    }
}
