//! Which workload the current task belongs to.

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, generated::bpf_get_current_ancestor_cgroup_id};
use portcullis_common::{
    COUNTER_UNCLASSIFIED, IDENTITY_UNRESTRICTED, IdentityConfig, MAX_CGROUP_DEPTH,
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

/// The configuration of a restricted identity; `None` is an internal error
/// (the agent writes the config before it maps any cgroup to the identity).
#[inline(always)]
pub fn config(identity: u32) -> Option<IdentityConfig> {
    // SAFETY: copied out of the map value immediately.
    unsafe { IDENTITY_CFG.get(&identity).copied() }
}
