//! Socket rules: which kinds of socket a workload may create besides the
//! TCP and UDP sockets whose traffic the egress rules govern. A raw IP
//! socket or an ICMP datagram ("ping") socket sends what it likes past
//! `connect4`/`sendmsg4`, so a policy whose egress is `default: deny`
//! refuses them unless it allows them by name. (Packet sockets do the same
//! but are made outside the inet families `sock_create` sees.)
//!
//! The rules live in the device rule map under [`DEVICE_CLASS_SOCKET`]:
//! (identity, socket class, family, kind) → up to 8 rules. The layout and
//! the matching (`decide::apply_device_rule` with [`ACCESS_CREATE`]) are
//! the device rules' own, which is why the map is shared rather than a
//! copy of it made.

/// cgroup `sock_create` program at the cgroup v2 root: sees every `socket()`
/// of the IPv4 and IPv6 families, and refuses with EPERM.
pub const PROG_SOCK_CREATE: &str = "sock_create";
/// `Event.backend` of a `sock_create` decision: the call returns EPERM.
pub const BACKEND_CGROUP_SOCK: u8 = 5;
/// `Event.action` of a socket decision.
pub const ACTION_SOCKET: u8 = 4;
/// `IdentityConfig.flags`: some policy of the identity restricts sockets.
pub const HAS_SOCKETS: u32 = 16;
/// `DeviceKey.kind` of a socket rule (devices use 1 and 2).
pub const DEVICE_CLASS_SOCKET: u32 = 16;
/// The one access bit of a socket rule: creating the socket.
pub const ACCESS_CREATE: u32 = 16;

/// Socket kinds (`DeviceKey.minor` of a socket rule, `Event.proto` of a
/// socket decision). TCP and UDP are not among them: they are always
/// created, and governed where they connect or send.
pub const SOCKET_RAW: u8 = 1;
/// `SOCK_DGRAM` with `IPPROTO_ICMP` or `IPPROTO_ICMPV6`.
pub const SOCKET_ICMP: u8 = 2;
/// Any other IP protocol: SCTP, MPTCP, UDP-Lite, ...
pub const SOCKET_INET_OTHER: u8 = 3;
/// A packet socket (`AF_PACKET`): link-layer frames, addressed at will.
/// Seen only by BPF-LSM `socket_create` ([`PROG_SOCKET_LSM`]).
pub const SOCKET_PACKET: u8 = 4;

/// BPF-LSM `socket_create`: packet sockets, which `sock_create` (inet only)
/// never sees. No fallback.
pub const PROG_SOCKET_LSM: &str = "socket_lsm";

/// `socket()`'s address families the hooks tell apart.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
pub const AF_PACKET: u32 = 17;
/// `socket()` types.
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;
pub const IPPROTO_ICMP: u32 = 1;
pub const IPPROTO_TCP: u32 = 6;
pub const IPPROTO_UDP: u32 = 17;
pub const IPPROTO_ICMPV6: u32 = 58;

/// The kind of an IP socket, or `None` for TCP and UDP.
#[inline(always)]
pub fn inet_kind(ty: u32, protocol: u32) -> Option<u8> {
    match (ty, protocol) {
        (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP) => None,
        (SOCK_RAW, _) => Some(SOCKET_RAW),
        (SOCK_DGRAM, IPPROTO_ICMP | IPPROTO_ICMPV6) => Some(SOCKET_ICMP),
        _ => Some(SOCKET_INET_OTHER),
    }
}
