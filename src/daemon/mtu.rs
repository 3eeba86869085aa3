//! The overlay MTU: the node's `mtu`, else the network config's `Backend.MTU`, else what the
//! underlay interface carries after the encapsulation overhead (flannel: iface MTU − 28 for
//! udp, − 50 for vxlan, as flannel computes it). An explicit value larger than
//! the underlay carries is refused, naming where it came from, rather than silently capped:
//! a capped MTU would differ from the one the operator wrote into every node's config and
//! `subnet.env`, and packets between the two sizes would be dropped or fragmented.

use weft_forwarder::EncapKind;

use super::DaemonError;
use super::netlink::UnderlayLink;
use crate::config::Config;

/// The MTU the TUN gets and `subnet.env` announces.
///
/// # Errors
/// [`DaemonError::Mtu`] naming `mtu` or `Backend.MTU` when the value exceeds what the underlay
/// carries, or when the underlay leaves less than IPv4's 576 bytes (1280 with IPv6 pods).
pub fn overlay_mtu(cfg: &Config, underlay: &UnderlayLink, kind: EncapKind) -> Result<u16, DaemonError> {
    let overhead = kind.overhead(cfg.node.public_ip.is_ipv6());
    let max = underlay.mtu.saturating_sub(u32::try_from(overhead).unwrap_or(u32::MAX));
    let max = u16::try_from(max).unwrap_or(u16::MAX);
    let mtu = match cfg.net.mtu {
        Some(m) if m > max => {
            return Err(DaemonError::Mtu(format!(
                "{}: {m} exceeds what {} (MTU {}) carries after {overhead} bytes of {} encapsulation: at most {max}",
                cfg.net.mtu_field,
                underlay.name,
                underlay.mtu,
                kind.as_str()
            )));
        }
        Some(m) => m,
        None => max,
    };
    let min = if cfg.net.subnet_v6.is_some() { 1280 } else { 576 };
    if mtu < min {
        return Err(DaemonError::Mtu(format!(
            "{}: underlay {} has MTU {}, leaving only {mtu} for the overlay (at least {min} needed)",
            cfg.net.mtu_field, underlay.name, underlay.mtu
        )));
    }
    Ok(mtu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Loaded, RawConfig};

    fn cfg(mtu: Option<u16>, field: &'static str) -> Config {
        let raw: RawConfig = toml::from_str(
            "node_name = \"n1\"\npublic_ip = \"198.18.0.1\"\nsubnet = \"10.244.1.0/24\"\nworkers = 1\nbackend = \"vxlan\"",
        )
        .unwrap();
        let Ok(Loaded::Static(c)) = Loaded::from_raw(raw) else { panic!("static config") };
        let mut c = *c;
        c.net.mtu = mtu;
        c.net.mtu_field = field;
        c
    }

    fn eth(mtu: u32) -> UnderlayLink {
        UnderlayLink { index: 2, name: "eth0".into(), mtu }
    }

    #[test]
    fn explicit_values_below_the_cap_win_and_above_it_are_refused_by_name() {
        assert_eq!(overlay_mtu(&cfg(None, "mtu"), &eth(1500), EncapKind::Vxlan).unwrap(), 1450);
        assert_eq!(overlay_mtu(&cfg(None, "mtu"), &eth(1500), EncapKind::FlannelUdp).unwrap(), 1472);
        assert_eq!(overlay_mtu(&cfg(Some(1400), "Backend.MTU"), &eth(1500), EncapKind::Vxlan).unwrap(), 1400);
        assert_eq!(overlay_mtu(&cfg(Some(1450), "Backend.MTU"), &eth(1500), EncapKind::Vxlan).unwrap(), 1450);
        let err = overlay_mtu(&cfg(Some(1451), "Backend.MTU"), &eth(1500), EncapKind::Vxlan).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Backend.MTU: 1451 exceeds what eth0 (MTU 1500) carries after 50 bytes of vxlan encapsulation: at most 1450"
        );
        assert_eq!(err.exit_code(), 3);
        let err = overlay_mtu(&cfg(Some(9000), "mtu"), &eth(1500), EncapKind::Vxlan).unwrap_err().to_string();
        assert!(err.starts_with("mtu: 9000 exceeds"), "{err}");
        // Jumbo frames raise the cap.
        assert_eq!(overlay_mtu(&cfg(Some(8950), "Backend.MTU"), &eth(9000), EncapKind::Vxlan).unwrap(), 8950);
        let err = overlay_mtu(&cfg(None, "mtu"), &eth(600), EncapKind::Vxlan).unwrap_err().to_string();
        assert!(err.contains("leaving only 550 for the overlay"), "{err}");
    }
}
