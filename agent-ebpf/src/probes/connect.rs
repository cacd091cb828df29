//! Outbound connections: cgroup `connect4/6` and `sendmsg4/6` (unconnected
//! UDP). Returning 0 makes the syscall fail with EPERM.
//!
//! Fail open: an internal error (a missing identity config) allows the call
//! and is counted in `COUNTER_ERR_CONNECT`. A cgroup missing from the
//! identity map is not an error: it takes its ancestor's identity.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_loop, macros::cgroup_sock_addr, maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use portcullis_common::{
    ACTION_CONNECT, BACKEND_CGROUP_SOCK_ADDR, COUNTER_ERR_CONNECT, HAS_NET, IDENTITY_UNRESTRICTED,
    IdentityConfig, NET_KEY_DATA_LEN, NET_RULES_PER_PREFIX, NetRuleSet, VERDICT_ALLOW,
    VERDICT_DENY, decide::apply_net_rule,
};

use crate::{
    decision::{self, Decision, Matches, allow},
    identity,
    maps::{NET_RULES, count, count_decision},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, false))
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, true))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, false))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, true))
}

#[inline(always)]
fn verdict(r: Result<u8, ()>) -> i32 {
    match r {
        Ok(VERDICT_DENY) => DENY,
        Ok(_) => ALLOW,
        Err(()) => {
            count(COUNTER_ERR_CONNECT);
            ALLOW
        }
    }
}

#[inline(always)]
fn try_sock_addr(ctx: &SockAddrContext, v6: bool) -> Result<u8, ()> {
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        count_decision(ACTION_CONNECT, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(())?;
    // SAFETY: the context pointer is valid for the whole program run; the
    // verifier only allows the user_ip6 words in the v6 attach types, which
    // is why `v6` is a constant per program after inlining.
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    if v6 {
        let w = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
        addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
        addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
        addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
    } else {
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..16].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    }
    let port = u16::from_be(sa.user_port as u16);
    let proto = sa.protocol as u8;

    let d = if cfg.flags & HAS_NET == 0 {
        allow()
    } else {
        let mut data = [0u8; NET_KEY_DATA_LEN];
        data[0..4].copy_from_slice(&id.to_be_bytes());
        data[4..20].copy_from_slice(&addr);
        let key = Key::new((NET_KEY_DATA_LEN * 8) as u32, data);
        let mut scan = NetScan {
            set: core::ptr::null(),
            port,
            proto,
            m: Matches::new(identity::active_policies(&cfg)),
        };
        if let Some(set) = NET_RULES.get(&key) {
            scan.set = set;
            // bpf_loop: the verifier checks the body once instead of every
            // combination of matches over 16 unrolled iterations (which blew
            // the 1M instruction budget).
            // SAFETY: `net_rule` only touches `scan` through the pointer.
            unsafe {
                bpf_loop(
                    NET_RULES_PER_PREFIX as u32,
                    net_rule as *mut c_void,
                    (&mut scan as *mut NetScan).cast(),
                    0,
                )
            };
        }
        let m = scan.m;
        m.finish(cfg.net_deny_enforce, cfg.net_deny_audit)
    };
    report(
        cgid,
        id,
        cfg,
        &d,
        &addr,
        port,
        proto,
        if v6 { 6 } else { 4 },
    );
    Ok(d.verdict)
}

struct NetScan {
    set: *const NetRuleSet,
    port: u16,
    proto: u8,
    m: Matches,
}

/// One rule of a `NetRuleSet`; returns 1 to stop the loop.
#[inline(never)]
extern "C" fn net_rule(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `NetScan`, `set` a live map value.
    let scan = unsafe { &mut *(ctx as *mut NetScan) };
    let set = unsafe { &*scan.set };
    if i >= NET_RULES_PER_PREFIX as u64 || i as u32 >= set.count {
        return 1;
    }
    apply_net_rule(&mut scan.m, &set.rules[i as usize], scan.port, scan.proto) as i64
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report(
    cgid: u64,
    id: u32,
    cfg: &IdentityConfig,
    d: &Decision,
    addr: &[u8; 16],
    port: u16,
    proto: u8,
    family: u8,
) {
    decision::report(
        ACTION_CONNECT,
        BACKEND_CGROUP_SOCK_ADDR,
        id,
        cgid,
        cfg,
        d,
        |e| {
            e.addr = *addr;
            e.port = port;
            e.proto = proto;
            e.family = family;
        },
    );
}
