//! `spec.network.sockets`: the kinds of socket a workload may create beyond
//! TCP and UDP (whose traffic `network.egress` governs). Without the
//! section, a policy whose egress is `default: deny` denies every kind:
//! "nothing leaves except what egress allows" then holds for raw IP and
//! ICMP sockets too, which pass the connect and send hooks unseen.

use portcullis_common::{SOCKET_ICMP, SOCKET_INET_OTHER, SOCKET_PACKET, SOCKET_RAW};

use super::DefaultAction;

/// A kind of socket, as policies name it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    schemars::JsonSchema,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SocketKind {
    /// `SOCK_RAW` of IPv4 or IPv6: any IP packet, addressed at will.
    Raw,
    /// ICMP datagram ("ping") sockets.
    Icmp,
    /// Any other IP protocol: SCTP, MPTCP, UDP-Lite.
    InetOther,
    /// Packet sockets (`AF_PACKET`): link-layer frames. Refused with
    /// BPF-LSM only.
    Packet,
}

impl SocketKind {
    pub const ALL: [(&'static str, SocketKind); 4] = [
        ("raw", Self::Raw),
        ("icmp", Self::Icmp),
        ("inet-other", Self::InetOther),
        ("packet", Self::Packet),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("unknown", |(n, _)| n)
    }

    /// The kernel's number for the kind (`SOCKET_*`).
    pub fn wire(self) -> u8 {
        match self {
            Self::Raw => SOCKET_RAW,
            Self::Icmp => SOCKET_ICMP,
            Self::InetOther => SOCKET_INET_OTHER,
            Self::Packet => SOCKET_PACKET,
        }
    }

    /// The kind a policy (or a decision line) names `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
    }

    pub fn from_wire(v: u8) -> Option<Self> {
        Self::ALL.iter().map(|(_, k)| *k).find(|k| k.wire() == v)
    }

    /// The address families the kind's rules are written under.
    pub fn families(self) -> &'static [u32] {
        use portcullis_common::{AF_INET, AF_INET6, AF_PACKET};
        match self {
            Self::Packet => &[AF_PACKET],
            _ => &[AF_INET, AF_INET6],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SocketRules {
    /// `network.sockets.default`, else `network.egress.default`.
    pub default: DefaultAction,
    pub allow: Vec<SocketRule>,
    pub deny: Vec<SocketRule>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SocketRule {
    pub kind: SocketKind,
    pub line: usize,
}
