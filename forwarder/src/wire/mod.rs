//! Typed views over packet bytes, in smoltcp's style: no allocation, no I/O.
//!
//! # The no-panic contract
//!
//! Every view has a `new_checked` constructor that validates the lengths its accessors rely on.
//! After `new_checked` returns `Ok`, no accessor of that view can panic, whatever the bytes
//! are. Untrusted input (anything read from the TUN or the underlay) always enters through
//! `new_checked`; `new_unchecked` is only for buffers the caller has just sized itself.
//! Indexing is allowed inside this module, after the length check that covers it, and
//! nowhere else in the data path.
//!
//! Each view keeps its field offsets in a private `field` module, as smoltcp does, so the
//! layout reads like the RFC's header diagram.

#![deny(unsafe_code)]

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod ndp;
pub mod vxlan;

/// Why a view refused its bytes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum WireError {
    /// The buffer is shorter than the header (or a length field) says it must be.
    Truncated,
    /// A field holds a value the format forbids (bad version, header length too small, …).
    Malformed,
}
