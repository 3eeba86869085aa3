//! IP masquerade, flannel's `--ip-masq`: pod traffic from the cluster network that leaves it
//! is SNATed to the address of the interface it leaves by (`masquerade`); traffic that stays
//! inside the cluster network keeps its pod addresses. Done with nftables over netlink
//! (`NETLINK_NETFILTER`, the messages built here), never with an `nft` or `iptables`
//! subprocess, in a table of weft's own, one per TUN (two daemons in one network namespace
//! have two TUNs):
//!
//! ```text
//! table ip weft-weft0 {
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     meta mark & 0x00004000 == 0x00004000 return             comment "weft: kube-proxy masquerades it"
//!     ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return     comment "weft: from our pods to pods"
//!     ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return     comment "weft: from pods to our pods"
//!     ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return  comment "weft: from outside to our pods"
//!     ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random  comment "weft: from pods to the outside"
//!     ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random comment "weft: from the host to pods"
//!   }
//! }
//! ```
//!
//! These are flannel's rules (its iptables backend; its nftables backend returns for `saddr !=
//! <our subnet>` in the fourth rule, which leaves the last one dead). The last rule matters to
//! weft in particular: traffic forwarded into the overlay from outside the network (a
//! NodePort to a remote pod) would otherwise be dropped by the data plane as
//! `tx_foreign_source`.
//!
//! Lifecycle:
//! - **start**: the table is replaced in one transaction (create it if absent, delete it,
//!   create it with its chain and rules), so there is no moment without rules, nor with an
//!   older run's rules next to ours (another subnet after a moved lease, say). Without
//!   `ip_masq`, a table left by an earlier run is removed, so turning it off takes effect.
//! - **every [`RESYNC`]** (flannel's `--iptables-resync` default): the rules are read back (by
//!   the comments that name them) and the table replaced if it is gone or differs, an admin's
//!   `nft flush ruleset` say; each repair is counted (`weft_masq_repairs_total`).
//! - **leave** (`weft leave`, `release_on_exit`): the table is removed.
//! - **plain stop** (restart, crash): the table stays. Rules that only masquerade do no harm
//!   while weft is down, and removing them would let pods open connections to the outside
//!   with their pod addresses during a restart, whose replies never come back: the same
//!   reason the fail-closed route stays. The next start replaces the table.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use rtnetlink::sys::protocols::NETLINK_NETFILTER;
use rtnetlink::sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use tracing::{error, info, warn};

/// How often the rules are read back and repaired.
pub const RESYNC: Duration = Duration::from_secs(5);

/// How long one netlink exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The chain's name.
pub const CHAIN: &str = "postrouting";

/// The table for the daemon whose TUN is `tun`: `weft-<tun>`.
pub fn table_name(tun: &str) -> String {
    format!("weft-{tun}")
}

// Netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nfnetlink.h,
// linux/netfilter/nf_tables.h, linux/netfilter.h).
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR_LEN: usize = 16;
const NFGEN_LEN: usize = 4;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFPROTO_IPV4: u8 = 2;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_MASQ_FLAGS: u16 = 1;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_MARK: u32 = 3;
const NFT_RETURN: i32 = -5;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: i32 = 100;
const NF_ACCEPT: u32 = 1;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 1 << 4;
/// libnftnl's rule comment in `NFTA_RULE_USERDATA` (what `nft list` shows as `comment`).
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
/// kube-proxy's masquerade mark: it masquerades those packets itself.
const KUBE_PROXY_MARK: u32 = 0x4000;
/// Offsets of the IPv4 source and destination addresses.
const IP_SADDR: u32 = 12;
const IP_DADDR: u32 = 16;

/// A netlink failure while installing, checking or removing the rules.
#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    /// The netfilter netlink socket could not be opened or used.
    #[error("nftables: netlink socket: {0} (is nf_tables in the kernel?)")]
    Socket(std::io::Error),
    /// The kernel refused a request.
    #[error("nftables: {what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel {
        /// What was being done.
        what: &'static str,
        /// The errno the kernel answered.
        errno: i32,
    },
    /// No complete answer in time.
    #[error("nftables: {0}: no answer from the kernel within 5 s")]
    Timeout(&'static str),
}

impl MasqError {
    /// Whether the kernel refused for lack of privilege.
    pub fn is_permission(&self) -> bool {
        match self {
            Self::Kernel { errno, .. } => *errno == libc::EPERM || *errno == libc::EACCES,
            Self::Socket(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
            Self::Timeout(_) => false,
        }
    }
}

/// One netlink attribute: length, type, payload, padding to 4 bytes.
fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    nla(kind | NLA_F_NESTED, &parts.concat())
}

fn nla_str(kind: u16, s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    nla(kind, &v)
}

/// nf_tables integers are big-endian.
fn be32(kind: u16, v: u32) -> Vec<u8> {
    nla(kind, &v.to_be_bytes())
}

/// One netlink message: header (host order), `nfgenmsg` (family, version 0, big-endian
/// resource id), attributes.
fn nlmsg(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
    let body = attrs.concat();
    let len = NLMSG_HDR_LEN + NFGEN_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// An nf_tables request of type `msg` for the ip family, asking for an acknowledgement.
fn nft_msg(msg: u16, flags: u16, seq: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
    nlmsg((NFNL_SUBSYS_NFTABLES << 8) | msg, NLM_F_REQUEST | NLM_F_ACK | flags, seq, NFPROTO_IPV4, 0, attrs)
}

fn expr(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
    nest(NFTA_LIST_ELEM, &[nla_str(NFTA_EXPR_NAME, name), nest(NFTA_EXPR_DATA, data)])
}

/// `ip saddr|daddr [!=] net`: load the address, mask it, compare it.
fn ip_match(offset: u32, net: Ipv4Net, equal: bool) -> [Vec<u8>; 3] {
    [
        expr(
            "payload",
            &[
                be32(NFTA_PAYLOAD_DREG, NFT_REG_1),
                be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER),
                be32(NFTA_PAYLOAD_OFFSET, offset),
                be32(NFTA_PAYLOAD_LEN, 4),
            ],
        ),
        bitwise(net.netmask().octets()),
        cmp(if equal { NFT_CMP_EQ } else { NFT_CMP_NEQ }, net.network().octets()),
    ]
}

fn bitwise(mask: [u8; 4]) -> Vec<u8> {
    expr(
        "bitwise",
        &[
            be32(NFTA_BITWISE_SREG, NFT_REG_1),
            be32(NFTA_BITWISE_DREG, NFT_REG_1),
            be32(NFTA_BITWISE_LEN, 4),
            nest(NFTA_BITWISE_MASK, &[nla(NFTA_DATA_VALUE, &mask)]),
            nest(NFTA_BITWISE_XOR, &[nla(NFTA_DATA_VALUE, &[0; 4])]),
        ],
    )
}

fn cmp(op: u32, data: [u8; 4]) -> Vec<u8> {
    expr(
        "cmp",
        &[be32(NFTA_CMP_SREG, NFT_REG_1), be32(NFTA_CMP_OP, op), nest(NFTA_CMP_DATA, &[nla(NFTA_DATA_VALUE, &data)])],
    )
}

/// `meta mark & 0x4000 == 0x4000` (the mark is a host-order integer in the register).
fn kube_proxy_marked() -> [Vec<u8>; 3] {
    [
        expr("meta", &[be32(NFTA_META_DREG, NFT_REG_1), be32(NFTA_META_KEY, NFT_META_MARK)]),
        bitwise(KUBE_PROXY_MARK.to_ne_bytes()),
        cmp(NFT_CMP_EQ, KUBE_PROXY_MARK.to_ne_bytes()),
    ]
}

fn verdict_return() -> Vec<u8> {
    expr(
        "immediate",
        &[
            be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT),
            nest(NFTA_IMMEDIATE_DATA, &[nest(NFTA_DATA_VERDICT, &[nla(NFTA_VERDICT_CODE, &NFT_RETURN.to_be_bytes())])]),
        ],
    )
}

fn masquerade(fully_random: bool) -> Vec<u8> {
    if fully_random {
        expr("masq", &[be32(NFTA_MASQ_FLAGS, NF_NAT_RANGE_PROTO_RANDOM_FULLY)])
    } else {
        expr("masq", &[])
    }
}

/// The rule set: a comment naming each rule (how it is recognised when read back) and its
/// expressions.
pub fn rules(network: Ipv4Net, subnet: Ipv4Net, fully_random: bool) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let multicast = Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4).unwrap_or_default();
    let chain = |parts: &[&[Vec<u8>]], last: Vec<u8>| {
        let mut v: Vec<Vec<u8>> = parts.iter().flat_map(|p| p.iter().cloned()).collect();
        v.push(last);
        v
    };
    vec![
        ("weft: kube-proxy masquerades it", chain(&[&kube_proxy_marked()], verdict_return())),
        (
            "weft: from our pods to pods",
            chain(&[&ip_match(IP_SADDR, subnet, true), &ip_match(IP_DADDR, network, true)], verdict_return()),
        ),
        (
            "weft: from pods to our pods",
            chain(&[&ip_match(IP_SADDR, network, true), &ip_match(IP_DADDR, subnet, true)], verdict_return()),
        ),
        (
            "weft: from outside to our pods",
            chain(&[&ip_match(IP_SADDR, network, false), &ip_match(IP_DADDR, subnet, true)], verdict_return()),
        ),
        (
            "weft: from pods to the outside",
            chain(
                &[&ip_match(IP_SADDR, network, true), &ip_match(IP_DADDR, multicast, false)],
                masquerade(fully_random),
            ),
        ),
        (
            "weft: from the host to pods",
            chain(&[&ip_match(IP_SADDR, network, false), &ip_match(IP_DADDR, network, true)], masquerade(fully_random)),
        ),
    ]
}

/// libnftnl's userdata TLV holding a rule comment.
fn comment_udata(comment: &str) -> Vec<u8> {
    let mut v = vec![NFTNL_UDATA_RULE_COMMENT, u8::try_from(comment.len() + 1).unwrap_or(u8::MAX)];
    v.extend_from_slice(comment.as_bytes());
    v.push(0);
    v
}

/// A transaction: batch begin, `msgs` (numbered from `seq + 1`), batch end.
fn batch(seq: u32, msgs: impl FnOnce(&mut dyn FnMut() -> u32) -> Vec<Vec<u8>>) -> (Vec<u8>, std::ops::Range<u32>) {
    let mut next = seq;
    let mut take = || {
        next = next.wrapping_add(1);
        next
    };
    let body = msgs(&mut take);
    let first = seq.wrapping_add(1);
    let last = next;
    let mut out = nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, &[]);
    out.extend(body.concat());
    out.extend(nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, last.wrapping_add(1), 0, NFNL_SUBSYS_NFTABLES, &[]));
    (out, first..last.wrapping_add(1))
}

/// The transaction that replaces the table with the rule set: create it (a no-op if it
/// exists), delete it (with every chain and rule in it), create it with our chain and rules.
pub fn replace_batch(
    seq: u32,
    table: &str,
    network: Ipv4Net,
    subnet: Ipv4Net,
    fully_random: bool,
) -> (Vec<u8>, std::ops::Range<u32>) {
    batch(seq, |next| {
        let mut m = vec![
            nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, next(), &[nla_str(NFTA_TABLE_NAME, table)]),
            nft_msg(NFT_MSG_DELTABLE, 0, next(), &[nla_str(NFTA_TABLE_NAME, table)]),
            nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, next(), &[nla_str(NFTA_TABLE_NAME, table)]),
            nft_msg(
                NFT_MSG_NEWCHAIN,
                NLM_F_CREATE,
                next(),
                &[
                    nla_str(NFTA_CHAIN_TABLE, table),
                    nla_str(NFTA_CHAIN_NAME, CHAIN),
                    nest(
                        NFTA_CHAIN_HOOK,
                        &[
                            be32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING),
                            nla(NFTA_HOOK_PRIORITY, &NF_IP_PRI_NAT_SRC.to_be_bytes()),
                        ],
                    ),
                    be32(NFTA_CHAIN_POLICY, NF_ACCEPT),
                    nla_str(NFTA_CHAIN_TYPE, "nat"),
                ],
            ),
        ];
        for (comment, exprs) in rules(network, subnet, fully_random) {
            m.push(nft_msg(
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                next(),
                &[
                    nla_str(NFTA_RULE_TABLE, table),
                    nla_str(NFTA_RULE_CHAIN, CHAIN),
                    nest(NFTA_RULE_EXPRESSIONS, &exprs),
                    nla(NFTA_RULE_USERDATA, &comment_udata(comment)),
                ],
            ));
        }
        m
    })
}

/// The transaction that removes the table if it exists (create, then delete: never ENOENT).
pub fn delete_batch(seq: u32, table: &str) -> (Vec<u8>, std::ops::Range<u32>) {
    batch(seq, |next| {
        vec![
            nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE, next(), &[nla_str(NFTA_TABLE_NAME, table)]),
            nft_msg(NFT_MSG_DELTABLE, 0, next(), &[nla_str(NFTA_TABLE_NAME, table)]),
        ]
    })
}

/// A dump of the rules of our chain.
fn dump_rules_request(seq: u32, table: &str) -> Vec<u8> {
    nlmsg(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_IPV4,
        0,
        &[nla_str(NFTA_RULE_TABLE, table), nla_str(NFTA_RULE_CHAIN, CHAIN)],
    )
}

/// One received netlink message.
#[derive(Debug, Eq, PartialEq)]
struct Reply<'a> {
    kind: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The messages in one datagram; stops at the first malformed one.
fn replies(mut b: &[u8]) -> Vec<Reply<'_>> {
    let mut out = Vec::new();
    while let (Some(len), Some(kind), Some(flags), Some(seq)) = (u32_at(b, 0), u16_at(b, 4), u16_at(b, 6), u32_at(b, 8))
    {
        let len = len as usize;
        let Some(payload) = b.get(NLMSG_HDR_LEN..len) else { break };
        out.push(Reply { kind, flags, seq, payload });
        b = b.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

/// The attributes of `b`: (type without flags, value).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while let (Some(len), Some(kind)) = (u16_at(b, 0), u16_at(b, 2)) {
        let len = usize::from(len);
        let Some(value) = b.get(4..len) else { break };
        out.push((kind & NLA_TYPE_MASK, value));
        b = b.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

/// The comment of a rule message (`NEWRULE` payload, after the `nfgenmsg`).
fn rule_comment(payload: &[u8]) -> Option<String> {
    let (_, udata) = attrs(payload.get(NFGEN_LEN..)?).into_iter().find(|(k, _)| *k == NFTA_RULE_USERDATA)?;
    let mut u = udata;
    while let (Some(&kind), Some(&len)) = (u.first(), u.get(1)) {
        let value = u.get(2..2 + usize::from(len))?;
        if kind == NFTNL_UDATA_RULE_COMMENT {
            let end = value.iter().position(|c| *c == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(value.get(..end)?).into_owned());
        }
        u = u.get(2 + usize::from(len)..)?;
    }
    None
}

/// The errno of an `NLMSG_ERROR` (0: an acknowledgement).
fn error_code(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

/// Whether the rules read back (their comments, in order) are exactly the rule set's.
pub fn in_sync(read_back: &[String], network: Ipv4Net, subnet: Ipv4Net) -> bool {
    let want = rules(network, subnet, false);
    read_back.len() == want.len() && read_back.iter().zip(&want).all(|(a, (b, _))| a == b)
}

/// A netfilter netlink socket.
struct Nft {
    sock: TokioSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl Nft {
    fn open() -> Result<Self, MasqError> {
        let mut sock = TokioSocket::new(NETLINK_NETFILTER).map_err(MasqError::Socket)?;
        sock.socket_mut().bind_auto().map_err(MasqError::Socket)?;
        // Start far from 0, so that answers to an earlier socket of the same port are told apart.
        let seq = std::process::id().wrapping_mul(65_536);
        Ok(Self { sock, seq, buf: Vec::with_capacity(64 * 1024) })
    }

    async fn send(&mut self, msg: &[u8]) -> Result<(), MasqError> {
        self.sock.send_to(msg, &SocketAddr::new(0, 0)).await.map_err(MasqError::Socket).map(|_| ())
    }

    async fn recv(&mut self) -> Result<(), MasqError> {
        self.buf.clear();
        self.sock.recv(&mut self.buf).await.map_err(MasqError::Socket)
    }

    /// Sends one transaction and waits for the acknowledgement of every message in it.
    async fn transact(
        &mut self,
        what: &'static str,
        build: impl FnOnce(u32) -> (Vec<u8>, std::ops::Range<u32>),
    ) -> Result<(), MasqError> {
        let (msg, seqs) = build(self.seq);
        self.seq = seqs.end.wrapping_add(1);
        self.send(&msg).await?;
        let mut acked = 0usize;
        let want = seqs.len();
        let wait = async {
            while acked < want {
                self.recv().await?;
                for r in replies(&self.buf) {
                    if r.kind != NLMSG_ERROR || !seqs.contains(&r.seq) {
                        continue; // a late answer to an earlier exchange
                    }
                    match error_code(r.payload) {
                        Some(0) => acked += 1,
                        Some(e) => return Err(MasqError::Kernel { what, errno: -e }),
                        None => return Err(MasqError::Kernel { what, errno: libc::EPROTO }),
                    }
                }
            }
            Ok(())
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, wait).await.map_err(|_| MasqError::Timeout(what))?
    }

    /// The comments of the rules in our chain, in order; empty when the table or the chain
    /// is gone.
    async fn read_back(&mut self, table: &str) -> Result<Vec<String>, MasqError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        self.send(&dump_rules_request(seq, table)).await?;
        let mut comments = Vec::new();
        let wait = async {
            loop {
                self.recv().await?;
                for r in replies(&self.buf) {
                    if r.seq != seq {
                        continue;
                    }
                    match r.kind {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            return match error_code(r.payload) {
                                Some(0) => Ok(()),
                                Some(e) if -e == libc::ENOENT => Ok(()),
                                Some(e) => Err(MasqError::Kernel { what: "read back the rules", errno: -e }),
                                None => Err(MasqError::Kernel { what: "read back the rules", errno: libc::EPROTO }),
                            };
                        }
                        k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
                            comments.push(rule_comment(r.payload).unwrap_or_default());
                            if r.flags & NLM_F_MULTI == 0 {
                                return Ok(());
                            }
                        }
                        _ => {}
                    }
                }
            }
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, wait).await.map_err(|_| MasqError::Timeout("read back the rules"))??;
        Ok(comments)
    }
}

/// What the masquerade keeper did, for readiness and metrics.
#[derive(Debug, Default)]
pub struct MasqState {
    /// The table: `ip weft-<tun>`.
    pub table: String,
    /// The rules are in place as far as the last check knows.
    pub installed: AtomicBool,
    /// Whether `masquerade fully-random` is used (off where the kernel refuses it).
    pub fully_random: AtomicBool,
    /// Times the table was found gone or changed and put back.
    pub repairs: AtomicU64,
    /// Checks or repairs that failed.
    pub failures: AtomicU64,
    /// The last failure, until a check succeeds.
    pub last_error: Mutex<Option<String>>,
}

/// The masquerade rules of one daemon, kept in place.
pub struct Masq {
    nft: Nft,
    network: Ipv4Net,
    subnet: Ipv4Net,
    state: Arc<MasqState>,
}

impl Masq {
    /// Replaces the table with the rule set for `network` and our `subnet`.
    ///
    /// # Errors
    /// [`MasqError`]: the kernel has no nf_tables, we lack CAP_NET_ADMIN, …
    pub async fn install(table: String, network: Ipv4Net, subnet: Ipv4Net) -> Result<Self, MasqError> {
        let nft = Nft::open()?;
        let state = Arc::new(MasqState { table, ..MasqState::default() });
        let mut m = Self { nft, network, subnet, state };
        m.state.fully_random.store(true, Ordering::Relaxed);
        match m.replace().await {
            Err(MasqError::Kernel { errno, .. }) if errno == libc::EINVAL || errno == libc::EOPNOTSUPP => {
                warn!(table = %m.state.table, "the kernel refuses masquerade fully-random; using plain masquerade");
                m.state.fully_random.store(false, Ordering::Relaxed);
                m.replace().await?;
            }
            r => r?,
        }
        m.state.installed.store(true, Ordering::Relaxed);
        info!(table = %format!("ip {}", m.state.table), network = %network, subnet = %subnet, "ip masquerade rules installed");
        Ok(m)
    }

    /// The shared state.
    pub fn state(&self) -> Arc<MasqState> {
        Arc::clone(&self.state)
    }

    async fn replace(&mut self) -> Result<(), MasqError> {
        let (table, network, subnet) = (self.state.table.clone(), self.network, self.subnet);
        let fully_random = self.state.fully_random.load(Ordering::Relaxed);
        self.nft
            .transact("replace the masquerade table", |seq| replace_batch(seq, &table, network, subnet, fully_random))
            .await
    }

    /// Reads the rules back and puts the table back if it is gone or differs. `Ok(true)`: it
    /// was repaired.
    ///
    /// # Errors
    /// [`MasqError`].
    pub async fn check(&mut self) -> Result<bool, MasqError> {
        let table = self.state.table.clone();
        let read = self.nft.read_back(&table).await?;
        if in_sync(&read, self.network, self.subnet) {
            return Ok(false);
        }
        warn!(table = %format!("ip {table}"), rules_found = read.len(), "masquerade rules gone or changed; putting them back");
        self.replace().await?;
        self.state.repairs.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Checks every [`RESYNC`] and repairs, forever (a task under the daemon's supervision).
    pub async fn keep(mut self) {
        let mut failing = false;
        loop {
            tokio::time::sleep(RESYNC).await;
            match self.check().await {
                Ok(_) => {
                    self.state.installed.store(true, Ordering::Relaxed);
                    if let Ok(mut e) = self.state.last_error.lock() {
                        *e = None;
                    }
                    if failing {
                        info!(table = %self.state.table, "masquerade rules in place again");
                        failing = false;
                    }
                }
                Err(e) => {
                    self.state.failures.fetch_add(1, Ordering::Relaxed);
                    self.state.installed.store(false, Ordering::Relaxed);
                    if !failing {
                        error!(table = %self.state.table, error = %e, "cannot check or repair the masquerade rules; retrying");
                        failing = true;
                    }
                    if let Ok(mut last) = self.state.last_error.lock() {
                        *last = Some(e.to_string());
                    }
                    // A socket that failed may be unusable: start afresh next time.
                    if let Ok(nft) = Nft::open() {
                        self.nft = nft;
                    }
                }
            }
        }
    }
}

/// Removes the table `table` if it exists.
///
/// # Errors
/// [`MasqError`].
pub async fn remove(table: &str) -> Result<(), MasqError> {
    let mut nft = Nft::open()?;
    nft.transact("remove the masquerade table", |seq| delete_batch(seq, table)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// Walks a batch back: every message's type, flags and sequence number, and the
    /// attributes of the rules, to check the framing the kernel parses.
    #[test]
    fn replace_batch_frames_one_transaction() {
        let (msg, seqs) = replace_batch(100, "weft-weft0", net("10.244.0.0/16"), net("10.244.1.0/24"), true);
        let r = replies(&msg);
        let kinds: Vec<u16> = r.iter().map(|r| r.kind).collect();
        let nft = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
        let mut want = vec![
            NFNL_MSG_BATCH_BEGIN,
            nft(NFT_MSG_NEWTABLE),
            nft(NFT_MSG_DELTABLE),
            nft(NFT_MSG_NEWTABLE),
            nft(NFT_MSG_NEWCHAIN),
        ];
        want.extend([nft(NFT_MSG_NEWRULE); 6]);
        want.push(NFNL_MSG_BATCH_END);
        assert_eq!(kinds, want);
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), (100..=111).collect::<Vec<_>>());
        assert_eq!(seqs, 101..111, "every message but begin and end is acknowledged");
        for m in &r[1..r.len() - 1] {
            assert_eq!(m.flags & (NLM_F_REQUEST | NLM_F_ACK), NLM_F_REQUEST | NLM_F_ACK, "{m:?}");
            assert_eq!(m.payload[0], NFPROTO_IPV4);
        }
        // Batch begin names the nf_tables subsystem, big-endian.
        assert_eq!(&r[0].payload[..4], &[0, 0, 0, 10]);
        // Every message is 4-aligned and the whole batch parses back completely.
        let total: usize = r.iter().map(|m| (NLMSG_HDR_LEN + m.payload.len()).next_multiple_of(4)).sum();
        assert_eq!(total, msg.len());

        // A rule: table, chain, expressions, and its comment read back as written.
        let rule = &r[5];
        let a = attrs(&rule.payload[NFGEN_LEN..]);
        assert_eq!(a[0], (NFTA_RULE_TABLE, &b"weft-weft0\0"[..]));
        assert_eq!(a[1], (NFTA_RULE_CHAIN, &b"postrouting\0"[..]));
        assert_eq!(rule_comment(rule.payload).as_deref(), Some("weft: kube-proxy masquerades it"));
        let exprs = attrs(a[2].1);
        let names: Vec<String> = exprs
            .iter()
            .map(|(_, e)| String::from_utf8_lossy(attrs(e)[0].1).trim_end_matches('\0').to_owned())
            .collect();
        assert_eq!(names, ["meta", "bitwise", "cmp", "immediate"]);

        // "from pods to the outside": saddr 10.244.0.0/16, daddr != 224.0.0.0/4, masquerade.
        let rule = &r[9];
        assert_eq!(rule_comment(rule.payload).as_deref(), Some("weft: from pods to the outside"));
        let a = attrs(&rule.payload[NFGEN_LEN..]);
        let exprs = attrs(a[2].1);
        let data = |i: usize| attrs(attrs(exprs[i].1)[1].1);
        // payload: network header, offset 12 (saddr), 4 bytes
        assert_eq!(data(0)[2], (NFTA_PAYLOAD_OFFSET, &12u32.to_be_bytes()[..]));
        // bitwise mask /16, cmp eq 10.244.0.0
        assert_eq!(attrs(data(1)[3].1)[0].1, &[255, 255, 0, 0]);
        assert_eq!(data(2)[1], (NFTA_CMP_OP, &NFT_CMP_EQ.to_be_bytes()[..]));
        assert_eq!(attrs(data(2)[2].1)[0].1, &[10, 244, 0, 0]);
        // daddr != 224.0.0.0/4
        assert_eq!(data(3)[2], (NFTA_PAYLOAD_OFFSET, &16u32.to_be_bytes()[..]));
        assert_eq!(attrs(data(4)[3].1)[0].1, &[240, 0, 0, 0]);
        assert_eq!(data(5)[1], (NFTA_CMP_OP, &NFT_CMP_NEQ.to_be_bytes()[..]));
        assert_eq!(attrs(data(5)[2].1)[0].1, &[224, 0, 0, 0]);
        assert_eq!(data(6), [(NFTA_MASQ_FLAGS, &NF_NAT_RANGE_PROTO_RANDOM_FULLY.to_be_bytes()[..])]);

        // The chain: nat, postrouting hook, srcnat priority, policy accept.
        let chain = attrs(&r[4].payload[NFGEN_LEN..]);
        let hook = attrs(chain[2].1);
        assert_eq!(hook[0].1, &NF_INET_POST_ROUTING.to_be_bytes());
        assert_eq!(hook[1].1, &100i32.to_be_bytes());
        assert_eq!(chain[4], (NFTA_CHAIN_TYPE, &b"nat\0"[..]));
    }

    #[test]
    fn delete_batch_creates_then_deletes() {
        let (msg, seqs) = delete_batch(7, "weft-weft0");
        let kinds: Vec<u16> = replies(&msg).iter().map(|r| r.kind & 0xff).collect();
        assert_eq!(kinds, [NFNL_MSG_BATCH_BEGIN, NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFNL_MSG_BATCH_END]);
        assert_eq!(seqs, 8..10);
    }

    #[test]
    fn read_back_is_checked_by_comment_and_order() {
        let (n, s) = (net("10.244.0.0/16"), net("10.244.1.0/24"));
        let names: Vec<String> = rules(n, s, true).iter().map(|(c, _)| (*c).to_owned()).collect();
        assert!(in_sync(&names, n, s));
        assert!(!in_sync(&[], n, s), "table gone (nft flush ruleset)");
        assert!(!in_sync(&names[1..], n, s), "a rule deleted");
        let mut swapped = names.clone();
        swapped.swap(1, 2);
        assert!(!in_sync(&swapped, n, s), "rules reordered");
        let mut extra = names.clone();
        extra.push("someone else's".into());
        assert!(!in_sync(&extra, n, s), "a rule added to our chain");
    }

    #[test]
    fn acks_and_errors_parse() {
        // An NLMSG_ERROR carrying -ENOENT for sequence 5, then an ack for 6.
        let mut b = Vec::new();
        for (seq, err) in [(5u32, -libc::ENOENT), (6, 0)] {
            b.extend_from_slice(&36u32.to_ne_bytes());
            b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&err.to_ne_bytes());
            b.extend_from_slice(&[0; 16]);
        }
        let r = replies(&b);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].seq, error_code(r[0].payload)), (5, Some(-libc::ENOENT)));
        assert_eq!((r[1].seq, error_code(r[1].payload)), (6, Some(0)));
        assert!(replies(&b[..20]).is_empty(), "a truncated message is not read");
    }

    #[test]
    fn table_names_follow_the_tun() {
        assert_eq!(table_name("weft0"), "weft-weft0");
    }
}
