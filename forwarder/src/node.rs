//! This node's place in the overlay: its subnets and the gateway addresses its TUN holds.

#![deny(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// This node's place in the overlay.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct LocalNode {
    /// Our IPv4 subnet.
    pub subnet_v4: Option<Ipv4Net>,
    /// Our IPv6 subnet.
    pub subnet_v6: Option<Ipv6Net>,
}

impl LocalNode {
    /// The gateway: the first usable address of the subnet, held by the TUN.
    pub fn gateway_v4(&self) -> Option<Ipv4Addr> {
        self.subnet_v4.map(|n| Ipv4Addr::from(u32::from(n.network()).wrapping_add(1)))
    }

    /// The IPv6 gateway, likewise.
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.subnet_v6.map(|n| Ipv6Addr::from(u128::from(n.network()).wrapping_add(1)))
    }

    /// Whether `ip` lies in one of our subnets.
    pub fn owns(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.subnet_v4.is_some_and(|n| n.contains(&a)),
            IpAddr::V6(a) => self.subnet_v6.is_some_and(|n| n.contains(&a)),
        }
    }

    /// A destination no overlay packet may be delivered to: loopback, multicast,
    /// unspecified, limited broadcast, or our subnet's own broadcast address.
    pub(crate) fn is_martian_dst(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                a.is_loopback()
                    || a.is_multicast()
                    || a.is_unspecified()
                    || a.is_broadcast()
                    || self.subnet_v4.is_some_and(|n| n.prefix_len() < 31 && a == n.broadcast())
            }
            IpAddr::V6(a) => a.is_loopback() || a.is_multicast() || a.is_unspecified(),
        }
    }
}
