//! The underlay UDP sockets: one per worker on the same address and port
//! (`SO_REUSEPORT`), large buffers, and DF on every outer packet (RFC 7348 §4.3: a tunnel
//! endpoint must not fragment; weft sends frag-needed inward instead).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked for (with `SO_*BUFFORCE` as root, else capped by the sysctls).
/// Deep buffers keep io_uring sends from hitting `EAGAIN`, which would reorder packets.
pub const SOCKET_BUFFER_BYTES: usize = 16 << 20;

/// How outer UDP checksums are sent.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum OuterChecksum {
    /// Computed (the kernel default for UDP).
    #[default]
    On,
    /// Zero on an IPv4 underlay (`SO_NO_CHECK`), as Linux vxlan sends by default (RFC 7348
    /// §5 allows it). IPv6 always carries a checksum.
    Zero,
}

/// Binds `count` sockets to `addr` with `SO_REUSEPORT`.
///
/// A probe bind without `SO_REUSEPORT` goes first, so another process holding the port is
/// reported as `AddrInUse` instead of silently sharing it.
///
/// # Errors
/// `AddrInUse` if the port is taken, `AddrNotAvailable` if `addr` is not local, or other
/// socket errors.
pub fn bind(addr: SocketAddr, count: usize, csum: OuterChecksum) -> io::Result<Vec<UdpSocket>> {
    drop(UdpSocket::bind(addr)?);
    let first = bind_one(addr, true, csum)?;
    // With port 0 the kernel picked one; the other queues must share it.
    let addr = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..count.max(1) {
        out.push(bind_one(addr, true, csum)?);
    }
    Ok(out)
}

/// Binds `count` send-only sockets on ephemeral ports of `ip`: the kernel picks each port
/// from `ip_local_port_range` (32768–60999 by default), the range Linux vxlan's flow-hashed
/// source ports come from.
///
/// # Errors
/// Socket errors.
pub fn bind_senders(ip: IpAddr, count: usize, csum: OuterChecksum) -> io::Result<Vec<UdpSocket>> {
    (0..count).map(|_| bind_one(SocketAddr::new(ip, 0), false, csum)).collect()
}

fn bind_one(addr: SocketAddr, reuse_port: bool, csum: OuterChecksum) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if csum == OuterChecksum::Zero && addr.is_ipv4() {
        setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_NO_CHECK, 1)?;
    }
    set_buffer(&s, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    set_buffer(&s, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    // PMTUDISC_PROBE: DF set, never fragment locally, ignore learned PMTU (the forwarder owns MTU).
    let (level, opt, val) = match addr {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_PROBE),
    };
    setsockopt_int(&s, level, opt, val)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Asks for UDP GRO on `s` (`UDP_GRO`, Linux ≥ 5.0): the kernel may hand over a train of
/// equal-sized datagrams from one sender in one receive, with their size in a cmsg.
/// `getsockopt` reads it back (≥ 5.12), so an older kernel reports no GRO.
///
/// # Errors
/// The kernel refused or does not report it: receive one datagram at a time.
pub fn enable_gro(s: &UdpSocket) -> io::Result<()> {
    let sock = socket2::SockRef::from(s);
    setsockopt_int(&sock, libc::SOL_UDP, libc::UDP_GRO, 1)?;
    match getsockopt_int(&sock, libc::SOL_UDP, libc::UDP_GRO)? {
        0 => Err(io::Error::new(io::ErrorKind::Unsupported, "UDP_GRO did not stick")),
        _ => Ok(()),
    }
}

/// Whether the kernel knows `UDP_SEGMENT` (Linux ≥ 4.18). Whether the underlay device
/// accepts GSO sends is only known at the first send (`EIO` without checksum offload).
pub fn gso_supported(s: &UdpSocket) -> bool {
    getsockopt_int(&socket2::SockRef::from(s), libc::SOL_UDP, libc::UDP_SEGMENT).is_ok()
}

fn getsockopt_int(s: &Socket, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: passes a pointer to a live c_int and its exact size, which the kernel updates.
    let rc = unsafe { libc::getsockopt(s.as_raw_fd(), level, opt, (&mut val as *mut libc::c_int).cast(), &mut len) };
    if rc == 0 { Ok(val) } else { Err(io::Error::last_os_error()) }
}

fn set_buffer(s: &Socket, force: libc::c_int, plain: libc::c_int) {
    let bytes = libc::c_int::try_from(SOCKET_BUFFER_BYTES).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(s, libc::SOL_SOCKET, force, bytes).is_err() {
        // Without CAP_NET_ADMIN the kernel caps this at net.core.[rw]mem_max; best effort.
        let _ = setsockopt_int(s, libc::SOL_SOCKET, plain, bytes);
    }
}

fn setsockopt_int(s: &Socket, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_bind_reports_address_in_use() {
        let a = bind("127.0.0.1:0".parse().unwrap(), 2, OuterChecksum::On).unwrap();
        let port = a[0].local_addr().unwrap();
        assert_eq!(a[1].local_addr().unwrap(), port, "reuseport sockets share the port");
        let err = bind(port, 1, OuterChecksum::Zero).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn senders_get_distinct_ephemeral_ports() {
        let s = bind_senders("127.0.0.1".parse().unwrap(), 4, OuterChecksum::Zero).unwrap();
        let mut ports: Vec<u16> = s.iter().map(|s| s.local_addr().unwrap().port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 4);
        assert!(ports.iter().all(|p| *p >= 1024));
    }
}
