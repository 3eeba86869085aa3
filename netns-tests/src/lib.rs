//! Harness for weft's network-namespace integration tests: RAII namespaces, an underlay
//! topology, the real `weft` daemon, and traffic tools (ping, iperf3, tcpdump, crafted
//! datagrams), all on addresses that never leave the namespaces.
//!
//! Underlay addresses are in 198.18.0.0/15, overlay addresses in 10.244.0.0/16. Every external
//! command has a deadline, and every namespace and daemon is removed on drop, also when a test
//! fails.

#![warn(missing_docs)]

pub mod capture;
pub mod cmd;
pub mod cni;
pub mod craft;
pub mod etcd;
pub mod flannel;
pub mod http;
pub mod lease;
pub mod netns;
pub mod root;
pub mod topology;
pub mod traffic;
pub mod weft;
pub mod wireguard_go;

pub use capture::{Capture, Pcap};
pub use cmd::{CmdOutput, Proc};
pub use etcd::Etcd;
pub use lease::{
    LeaseRecord, LeaseSettings, LeaseStatus, NetworkInit, PodAddr, PodEntry, StoreConfig, lease_status, peer_by_subnet,
    peer_subnets, status_mode,
};
pub use netns::Netns;
pub use root::skip_unless_root;
pub use topology::{Host, Topology};
pub use traffic::{
    IperfRun, IperfServer, UdpRun, iperf3_tcp, iperf3_tcp_run, iperf3_udp, ping, ping_all, ping_all_with, ping_with,
};
pub use weft::{NodeConfig, PeerConfig, WeftNode, gateway_of, json_path, json_u64, peer_status, vtep_mac};

/// Prints a line on the process's stderr, bypassing libtest's output capture, for results that
/// belong in the CI log even when the test passes (a throughput figure, a skip reason).
pub fn report(line: &str) {
    use std::io::Write as _;
    // Nothing useful can be done if stderr is gone.
    let _ = writeln!(std::io::stderr(), "{line}");
}
