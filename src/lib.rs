//! weft: a userspace overlay network for containers.
//!
//! The binary's pieces: [`config`] (TOML + flags, validated), [`daemon`] (start-up, netlink,
//! the API socket, reloads) and [`status`] (what `weft status` shows). The data plane lives
//! in the `weft-forwarder` crate.

#![forbid(unsafe_code)]

pub mod cni;
pub mod config;
pub mod daemon;
pub mod status;
