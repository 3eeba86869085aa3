//! The lab a netns test runs in: one underlay namespace with a bridge, and host namespaces
//! plugged into it by veth pairs.
//!
//! ```text
//! ┌─ n1 ────────────┐ ┌─ n2 ────────────┐ ┌─ n3 ────────────┐
//! │ eth0 198.18.0.1 │ │ eth0 198.18.0.2 │ │ eth0 198.18.0.3 │
//! └────────┬────────┘ └────────┬────────┘ └────────┬────────┘
//!          │ v1                │ v2                │ v3
//! ┌────────┴───────────────────┴───────────────────┴────────┐
//! │  u: bridge br0                                          │
//! └─────────────────────────────────────────────────────────┘
//!    namespaces are wt<pid>-<test>-<node>; more hosts via Topology::add_host
//! ```
//!
//! Veths are created directly in their target namespaces (`ip link add eth0 netns A type veth
//! peer name vN netns U`), so nothing ever appears in the root namespace, and every address is in
//! 198.18.0.0/15 (RFC 2544 benchmarking space), so no packet can leave for a real network.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::netns::{self, Netns};

/// The first three octets of every underlay address (RFC 2544 benchmarking space).
pub const UNDERLAY_NET: [u8; 3] = [198, 18, 0];

/// Prefix length of the underlay subnet.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;

/// Name of the bridge inside the underlay namespace.
pub const BRIDGE: &str = "br0";

/// Name of each host's underlay interface.
pub const HOST_IF: &str = "eth0";

/// The underlay address `198.18.0.<octet>`.
pub fn underlay_ip(octet: u8) -> Ipv4Addr {
    let [a, b, c] = UNDERLAY_NET;
    Ipv4Addr::new(a, b, c, octet)
}

/// A namespace on the underlay bridge, like a machine on a LAN.
#[derive(Debug)]
pub struct Host {
    name: String,
    octet: u8,
    ip: Ipv4Addr,
    ns: Netns,
}

impl Host {
    /// Short name, `n1`, `n2`, ... for numbered hosts.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Last octet of the underlay address.
    pub fn octet(&self) -> u8 {
        self.octet
    }

    /// Its underlay address: `198.18.0.<octet>` on the bridge, `198.18.<net>.<octet>` for a
    /// host behind a router ([`Topology::add_routed_host`]).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The host's namespace.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }
}

/// An underlay bridge plus hosts; `Drop` deletes every namespace (hosts first) and, unless the
/// test is panicking, the scratch directory.
#[derive(Debug)]
pub struct Topology {
    test: String,
    dir: PathBuf,
    hosts: Vec<Host>,
    underlay: Netns,
}

impl Topology {
    /// Builds the underlay and hosts `n1..=n<hosts>` at `198.18.0.1..=<hosts>`.
    ///
    /// Stale namespaces of killed runs are removed first ([`netns::sweep_stale`]).
    ///
    /// # Errors
    ///
    /// Fails if any namespace, link or address cannot be set up; whatever was created is
    /// removed again.
    pub fn new(test: &str, hosts: u8) -> Result<Self> {
        netns::sweep_stale()?;
        let dir = netns::scratch_dir(test)?;
        let underlay = Netns::create(&netns::ns_name(test, "u"))?;
        underlay.exec_ok("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        underlay.exec_ok("ip", &["link", "set", BRIDGE, "up"])?;
        let mut topo = Self { test: test.to_owned(), dir, hosts: Vec::new(), underlay };
        for i in 1..=hosts {
            topo.add_host(&format!("n{i}"), i)?;
        }
        Ok(topo)
    }

    /// For a `#[test]` named `test`: `None` if it must be skipped (not root, and not `CI=true`;
    /// the reason is printed), else [`Topology::new`] with namespaces named after `tag`.
    ///
    /// # Errors
    ///
    /// Fails if not root under `CI=true`, or if the topology cannot be built.
    pub fn for_test(test: &str, tag: &str, hosts: u8) -> Result<Option<Self>> {
        if !crate::root::skip_unless_root(test)? {
            return Ok(None);
        }
        Self::new(tag, hosts).map(Some)
    }

    /// Adds a host `name` at `198.18.0.<octet>` (an attacker, say), and returns it.
    ///
    /// # Errors
    ///
    /// Fails if the name or octet is taken, or the namespace or links cannot be set up.
    pub fn add_host(&mut self, name: &str, octet: u8) -> Result<&Host> {
        if octet == 0 || octet == 255 {
            bail!("host octet {octet} is the network or broadcast address");
        }
        if self.hosts.iter().any(|h| h.name == name || h.octet == octet) {
            bail!("host {name} or octet {octet} already in topology {}", self.test);
        }
        let ns = Netns::create(&netns::ns_name(&self.test, name))?;
        let port = format!("v{octet}");
        // Create both ends in their final namespaces: nothing lands in the root namespace.
        crate::cmd::run(
            "ip",
            &[
                "link",
                "add",
                HOST_IF,
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                self.underlay.name(),
            ],
            crate::cmd::DEFAULT_TIMEOUT,
        )?
        .ok()?;
        let u = &self.underlay;
        u.exec_ok("ip", &["link", "set", &port, "master", BRIDGE])?;
        u.exec_ok("ip", &["link", "set", &port, "up"])?;
        let cidr = format!("{}/{UNDERLAY_PREFIX_LEN}", underlay_ip(octet));
        ns.exec_ok("ip", &["addr", "add", &cidr, "dev", HOST_IF])?;
        ns.exec_ok("ip", &["link", "set", HOST_IF, "up"])?;
        self.hosts.push(Host { name: name.to_owned(), octet, ip: underlay_ip(octet), ns });
        self.hosts.last().context("host vanished right after being added")
    }

    /// Adds host `name` on another underlay subnet, `198.18.<net>.0/24`, at
    /// `198.18.<net>.<octet>`, behind a router: host `r<net>` on the bridge at `198.18.0.254`
    /// (created with the first routed host of `net`), forwarding to its `eth1`
    /// `198.18.<net>.254`. The new host's default route points at the router, and every host
    /// already on the bridge gets a route to `198.18.<net>.0/24` through it, so add the bridge
    /// hosts first. Such a host is reachable from the bridge hosts, but not on their L2 subnet.
    ///
    /// # Errors
    ///
    /// Fails if `net` is 0 (the bridge's own subnet), a name is taken, or a namespace, link,
    /// address or route cannot be set up.
    pub fn add_routed_host(&mut self, name: &str, net: u8, octet: u8) -> Result<&Host> {
        if net == 0 || octet == 0 || octet >= 254 {
            bail!("routed host {name}: net {net} must not be 0 and octet {octet} must be 1..=253");
        }
        if self.hosts.iter().any(|h| h.name == name) {
            bail!("host {name} already in topology {}", self.test);
        }
        let [a, b, _] = UNDERLAY_NET;
        let router = format!("r{net}");
        let router_leg = format!("eth{net}");
        let router_ip = Ipv4Addr::new(a, b, net, 254);
        if self.hosts.iter().all(|h| h.name != router) {
            let bridge_hosts: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
            self.add_host(&router, 254)?;
            self.host(&router)?.ns.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            for h in &bridge_hosts {
                let host = self.host(h)?;
                host.ns.exec_ok(
                    "ip",
                    &["route", "add", &format!("{a}.{b}.{net}.0/24"), "via", &underlay_ip(254).to_string()],
                )?;
            }
        }
        let r_ns = self.host(&router)?.ns.name().to_owned();
        let ns = Netns::create(&netns::ns_name(&self.test, name))?;
        crate::cmd::run(
            "ip",
            &["link", "add", HOST_IF, "netns", ns.name(), "type", "veth", "peer", "name", &router_leg, "netns", &r_ns],
            crate::cmd::DEFAULT_TIMEOUT,
        )?
        .ok()?;
        let r = &self.host(&router)?.ns;
        if !r.exec_ok("ip", &["-o", "addr", "show", "dev", &router_leg])?.stdout.contains(&router_ip.to_string()) {
            r.exec_ok("ip", &["addr", "add", &format!("{router_ip}/24"), "dev", &router_leg])?;
        }
        r.exec_ok("ip", &["link", "set", &router_leg, "up"])?;
        let ip = Ipv4Addr::new(a, b, net, octet);
        ns.exec_ok("ip", &["addr", "add", &format!("{ip}/24"), "dev", HOST_IF])?;
        ns.exec_ok("ip", &["link", "set", HOST_IF, "up"])?;
        ns.exec_ok("ip", &["route", "add", "default", "via", &router_ip.to_string()])?;
        self.hosts.push(Host { name: name.to_owned(), octet, ip, ns });
        self.hosts.last().context("host vanished right after being added")
    }

    /// Host `n<i>` (1-based), as created by [`Topology::new`].
    ///
    /// # Panics
    ///
    /// Panics if `i` is 0 or larger than the number of hosts.
    pub fn n(&self, i: usize) -> &Host {
        &self.hosts[i - 1]
    }

    /// The host called `name`.
    ///
    /// # Errors
    ///
    /// Fails if there is no such host.
    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts.iter().find(|h| h.name == name).with_context(|| format!("no host {name} in topology {}", self.test))
    }

    /// All hosts, in creation order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The underlay (bridge) namespace.
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// The test's scratch directory, for configs, logs and captures.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The test name the topology was built for.
    pub fn test(&self) -> &str {
        &self.test
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Hosts before the underlay, so no veth outlives its bridge port for long.
        self.hosts.clear();
        if std::thread::panicking() {
            eprintln!("test {} failed: configs, logs and captures kept in {}", self.test, self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}
