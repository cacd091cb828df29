//! Socket creation: a cgroup `sock_create` program at the cgroup v2 root,
//! asked by the kernel for every `socket()` of the IPv4 and IPv6 families
//! by a task below it (io_uring's `IORING_OP_SOCKET` included). Returning 0
//! fails the call with EPERM, on every kernel, LSM or not. TCP and UDP
//! sockets pass untouched: their traffic is decided at connect and send.
//!
//! Packet sockets (`AF_PACKET`) are made outside the inet families, so
//! `sock_create` never sees them: BPF-LSM `socket_create` (`socket_lsm`)
//! decides those, by the same rules. Without BPF-LSM they are not governed.
//!
//! Fail open: a missing identity config allows and is counted in
//! `COUNTER_ERR_SOCKET`, as the other cgroup hooks do.

use aya_ebpf::{
    macros::{cgroup_sock, lsm},
    programs::{LsmContext, SockContext},
};
use portcullis_common::{
    ACCESS_CREATE, ACTION_SOCKET, AF_PACKET, BACKEND_CGROUP_SOCK, BACKEND_LSM, COUNTER_ERR_SOCKET,
    DEVICE_CLASS_SOCKET, DeviceKey, HAS_SOCKETS, IDENTITY_UNRESTRICTED, IdentityConfig,
    SOCKET_PACKET, VERDICT_ALLOW, VERDICT_DENY, inet_kind,
};

use crate::{
    decision::{self, Decision, Matches, allow},
    identity,
    maps::{count, count_decision},
    probes::device::RuleScan,
};

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    match try_sock_create(&ctx) {
        Ok(VERDICT_DENY) => 0,
        Ok(_) => 1,
        Err(()) => {
            count(COUNTER_ERR_SOCKET);
            1
        }
    }
}

#[inline(always)]
fn try_sock_create(ctx: &SockContext) -> Result<u8, ()> {
    // SAFETY: the context pointer is valid for the whole program run.
    let sk = unsafe { &*ctx.sock };
    let (family, ty, protocol) = (sk.family, sk.type_, sk.protocol);
    let Some(kind) = inet_kind(ty, protocol) else {
        return Ok(VERDICT_ALLOW);
    };
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        count_decision(ACTION_SOCKET, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(())?;
    let d = decide(id, cfg, family, kind);
    report(
        BACKEND_CGROUP_SOCK,
        cgid,
        id,
        cfg,
        &d,
        family,
        ty,
        protocol,
        kind,
    );
    Ok(d.verdict)
}

/// `socket_create(family, type, protocol, kern)`: packet sockets.
#[lsm(hook = "socket_create")]
pub fn socket_lsm(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    let (family, ty, protocol, kern): (i32, i32, i32, i32) =
        (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    // The kernel's own sockets are not the workload's doing.
    if kern != 0 || family as u32 != AF_PACKET {
        return 0;
    }
    match try_packet(ty as u32, protocol as u32) {
        // An exact constant, as in `open_lsm`.
        Ok(VERDICT_DENY) => -1,
        Ok(_) => 0,
        Err(()) => {
            count(COUNTER_ERR_SOCKET);
            0
        }
    }
}

#[inline(always)]
fn try_packet(ty: u32, protocol: u32) -> Result<u8, ()> {
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        count_decision(ACTION_SOCKET, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(())?;
    let d = decide(id, cfg, AF_PACKET, SOCKET_PACKET);
    report(
        BACKEND_LSM,
        cgid,
        id,
        cfg,
        &d,
        AF_PACKET,
        ty,
        protocol,
        SOCKET_PACKET,
    );
    Ok(d.verdict)
}

/// The verdict of the identity's socket rules for `kind` of `family`.
#[inline(always)]
pub fn decide(id: u32, cfg: &IdentityConfig, family: u32, kind: u8) -> Decision {
    if cfg.flags & HAS_SOCKETS == 0 {
        return allow();
    }
    let key = DeviceKey {
        identity: id,
        kind: DEVICE_CLASS_SOCKET,
        major: family,
        minor: u32::from(kind),
    };
    let mut scan = RuleScan::new(ACCESS_CREATE, Matches::new(identity::active_policies(cfg)));
    scan.scan(&key);
    scan.m.finish(cfg.sock_deny_enforce, cfg.sock_deny_audit)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn report(
    backend: u8,
    cgid: u64,
    id: u32,
    cfg: &IdentityConfig,
    d: &Decision,
    family: u32,
    ty: u32,
    protocol: u32,
    kind: u8,
) {
    decision::report(ACTION_SOCKET, backend, id, cgid, cfg, d, |e| {
        e.family = family as u8;
        e.proto = kind;
        e.access = ty;
        e.port = protocol as u16;
    });
}
