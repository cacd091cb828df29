//! Which workload the current task belongs to.

use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_uid_gid,
    generated::{bpf_get_current_ancestor_cgroup_id, bpf_loop},
};
use portcullis_common::{
    COUNTER_UNCLASSIFIED, IDENTITY_UNRESTRICTED, IdentityConfig, MAX_CGROUP_DEPTH,
    MAX_POLICIES_PER_IDENTITY,
};

use crate::maps::{IDENTITIES, IDENTITY_CFG, count};

/// The current task's cgroup id and identity.
///
/// A cgroup missing from `IDENTITIES` (created since the agent's last scan)
/// takes the identity of its deepest classified ancestor, so a workload
/// cannot escape its policy by making a sub-cgroup. Only when no ancestor at
/// all is classified (the agent always classifies the root, so this means the
/// agent has not populated the map yet) does it fall back to unrestricted,
/// and that is counted in `COUNTER_UNCLASSIFIED`.
#[inline(always)]
pub fn current() -> (u64, u32) {
    // SAFETY: helper without pointer arguments.
    let cgid = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is a plain u32 copied out immediately.
    if let Some(id) = unsafe { IDENTITIES.get(&cgid) } {
        return (cgid, *id);
    }
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        level -= 1;
        // Returns 0 for levels below the current cgroup's own depth.
        // SAFETY: helper without pointer arguments.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if ancestor != 0 {
            // SAFETY: as above.
            if let Some(id) = unsafe { IDENTITIES.get(&ancestor) } {
                return (cgid, *id);
            }
        }
    }
    count(COUNTER_UNCLASSIFIED);
    (cgid, IDENTITY_UNRESTRICTED)
}

/// The identity's policies (bits) that apply to the current task: all of
/// them, except `uid`-scoped ones whose uid range excludes the task's uid.
#[inline(always)]
pub fn active_policies(cfg: &IdentityConfig) -> u32 {
    if cfg.uid_scoped == 0 {
        return u32::MAX;
    }
    let mut scan = UidScan {
        cfg,
        uid: bpf_get_current_uid_gid() as u32,
        active: u32::MAX,
    };
    // bpf_loop: an unrolled loop whose every iteration may clear a bit makes
    // the verifier walk 2^32 states.
    // SAFETY: `uid_bit` only touches `scan` through the pointer.
    unsafe {
        bpf_loop(
            MAX_POLICIES_PER_IDENTITY,
            uid_bit as *mut c_void,
            (&mut scan as *mut UidScan).cast(),
            0,
        )
    };
    scan.active
}

struct UidScan {
    cfg: *const IdentityConfig,
    uid: u32,
    active: u32,
}

/// Clears bit `i` of `active` when policy `i` is uid-scoped and the uid is
/// outside its range.
extern "C" fn uid_bit(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `UidScan`, `cfg` a live map value.
    let scan = unsafe { &mut *(ctx as *mut UidScan) };
    let cfg = unsafe { &*scan.cfg };
    if i >= MAX_POLICIES_PER_IDENTITY as u64 {
        return 1;
    }
    let i = i as usize;
    if cfg.uid_scoped & (1 << i) != 0 && (scan.uid < cfg.uid_lo[i] || scan.uid > cfg.uid_hi[i]) {
        scan.active &= !(1 << i);
    }
    0
}

/// The configuration of a restricted identity; `None` is an internal error
/// (the agent writes the config before it maps any cgroup to the identity).
#[inline(always)]
pub fn config(identity: u32) -> Option<&'static IdentityConfig> {
    // SAFETY: a reference into the map value, not a copy: the config is
    // too big for the 512-byte BPF stack. The kernel recycles a deleted
    // element of a preallocated hash map at once, so the agent deletes an
    // identity's entries only after waiting out every running hook
    // (`hook_barrier.rs`), and never rewrites a live one.
    unsafe { IDENTITY_CFG.get(&identity) }
}
