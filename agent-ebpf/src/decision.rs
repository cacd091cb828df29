//! The common part of the event record. How matches combine into a verdict
//! is `portcullis_common::decide`, shared with the agent's host evaluator;
//! it is re-exported here for the hooks.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_ktime_get_boot_ns,
    },
    maps::ring_buf::RingBufEntry,
};
pub use portcullis_common::decide::{Decision, Matches, allow, fail_closed};
use portcullis_common::{
    COUNTER_LOST_EVENTS, EVENT_DECISION, Event, IdentityConfig, RULE_ID_DEFAULT,
};

use crate::maps::{EVENTS, count, count_decision, count_policy_decision};

/// Reserves an event; a full ring buffer is counted in `lost`, never silent.
#[inline(always)]
pub fn reserve(lost: u32) -> Option<RingBufEntry<Event>> {
    let entry = EVENTS.reserve::<Event>(0);
    if entry.is_none() {
        count(lost);
    }
    entry
}

/// Reserves an event for a decision (lost ones go to `COUNTER_LOST_EVENTS`).
#[inline(always)]
pub fn reserve_decision() -> Option<RingBufEntry<Event>> {
    reserve(COUNTER_LOST_EVENTS)
}

/// Counts decision `d` of `action` by identity `id` (cgroup `cgid`) and,
/// when it is to be logged, sends its event: the common and decision fields
/// filled here, the target's by `target`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn report(
    action: u8,
    backend: u8,
    id: u32,
    cgid: u64,
    cfg: &IdentityConfig,
    d: &Decision,
    target: impl FnOnce(&mut Event),
) {
    count_decision(action, d.verdict);
    count_policy_decision(cfg, action, d.verdict, d.hit.policy_bit);
    if !d.emits() {
        return;
    }
    let Some(mut entry) = reserve_decision() else {
        return;
    };
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry.
    unsafe {
        fill_common(e, EVENT_DECISION, id, cgid);
        fill_decision(e, action, backend, d, cfg);
        target(&mut *e);
    }
    entry.submit(0);
}

/// Fills the fields every event has and zeroes the rest that hooks may
/// leave unset.
///
/// # Safety
/// `e` must point at a reserved ring buffer entry.
#[inline(always)]
pub unsafe fn fill_common(e: *mut Event, kind: u32, identity: u32, cgroup_id: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `e` is a reserved entry of `size_of::<Event>()` bytes.
    unsafe {
        (*e).kind = kind;
        (*e).identity = identity;
        (*e).ts_ns = bpf_ktime_get_boot_ns();
        (*e).cgroup_id = cgroup_id;
        (*e).ino = 0;
        (*e).exe_ino = 0;
        (*e).pid = pid_tgid as u32;
        (*e).tgid = (pid_tgid >> 32) as u32;
        (*e).uid = bpf_get_current_uid_gid() as u32;
        (*e).rule_id = RULE_ID_DEFAULT;
        (*e).dev = 0;
        (*e).exe_dev = 0;
        (*e).depth = 0;
        (*e).access = 0;
        (*e).generation = 0;
        (*e)._pad = 0;
        (*e).action = 0;
        (*e).verdict = 0;
        (*e).backend = 0;
        (*e).policy_bit = 0;
        (*e).proto = 0;
        (*e).family = 0;
        (*e).port = 0;
        (*e).addr = [0; 16];
        (*e).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        let mut i = 0;
        while i < portcullis_common::EVENT_NAMES {
            (*e).names[i][0] = 0;
            i += 1;
        }
    }
}

/// Writes a decision's fields into an event.
///
/// # Safety
/// `e` must point at a reserved ring buffer entry.
#[inline(always)]
pub unsafe fn fill_decision(
    e: *mut Event,
    action: u8,
    backend: u8,
    d: &Decision,
    cfg: &IdentityConfig,
) {
    // SAFETY: see above.
    unsafe {
        (*e).generation = cfg.generation;
        (*e).action = action;
        (*e).backend = backend;
        (*e).verdict = d.verdict;
        (*e).rule_id = d.hit.rule_id;
        (*e).policy_bit = d.hit.policy_bit;
        (*e).depth = d.hit.depth;
    }
}
