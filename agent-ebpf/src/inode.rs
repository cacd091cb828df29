//! The one decision over a `struct file *` shared by exec and open, on every
//! backend: walk the dentry and its ancestors, look each (dev, ino) up in the
//! rule map, combine.

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xchg},
};

use aya_ebpf::helpers::{bpf_probe_read_kernel_str_bytes, generated::bpf_loop};
use portcullis_common::{
    COUNTER_ERR_EXEC, COUNTER_ERR_OPEN, EVENT_DECISION, EVENT_NAME_LEN, EVENT_NAMES, Event,
    INODE_RULES_PER_KEY, IdentityConfig, InodeKey, InodeRuleSet, KernelOffsets, MAX_PATH_DEPTH,
    RULE_ID_NO_WALK_SLOT, RULE_ID_TOO_DEEP, decide::apply_inode_rule,
};

use crate::{
    decision::{Decision, Matches, fail_closed, fill_common, fill_decision, reserve_decision},
    kernel::{dentry_id, offsets, read_ptr},
    maps::{
        EXEC_RULES, FILE_RULES, ONLY_FROM, WALK_SLOTS, WALKS, count, count_decision,
        count_policy_decision,
    },
};

/// Who is asking and for what.
pub struct Request {
    pub cgroup_id: u64,
    pub identity: u32,
    /// `ACCESS_*` bits.
    pub requested: u32,
    /// (dev, ino) of the acting executable.
    pub exe: (u32, u64),
    pub deny_enforce: u32,
    pub deny_audit: u32,
    /// `identity::active_policies` of the acting task.
    pub active: u32,
    /// The identity's config (a map value, valid for the program run).
    pub cfg: &'static IdentityConfig,
}

/// What was decided about which inode.
pub struct Outcome {
    pub decision: Decision,
    pub dentry: *const u8,
    pub dev: u32,
    pub ino: u64,
}

/// Which rule map a walk consults.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RuleMap {
    Exec,
    File,
}

/// State of the dentry walk. It lives in the per-CPU map `WALKS`, not on
/// the stack: the verifier tracks every stack scalar precisely and, since
/// 6.7, re-checks a `bpf_loop` callback until its state repeats, so a walk
/// state on the stack (depth, match flags, allow bits) grew a new state per
/// level and per rule combination until 6.18.44 refused the program at 1M
/// instructions. Map contents are unknown to the verifier, so the callback
/// converges after one pass whatever the policy.
pub struct Walk {
    /// Non-zero while a walk holds the slot: set and cleared atomically, so
    /// a walk preempted on this CPU keeps its state whatever other walks run
    /// in between (see `claim`).
    busy: u64,
    identity: u32,
    requested: u32,
    exe_dev: u32,
    exe_ino: u64,
    dentry: u64,
    dev: u32,
    ino: u64,
    depth: u32,
    /// Set when the walk met the filesystem root; a walk that ran out of
    /// levels first fails closed.
    reached_root: u32,
    err: i64,
    m: Matches,
}

/// What the walk callbacks get on the stack: pointers only, so nothing in
/// it varies between iterations.
struct WalkCtx {
    walk: *mut Walk,
    map: RuleMap,
}

/// Decides `req` on `file`. Errors are kernel reads that failed; callers
/// count them and fail open.
#[inline(always)]
pub fn decide(
    o: &KernelOffsets,
    map: RuleMap,
    file: *const u8,
    req: &Request,
) -> Result<Outcome, i64> {
    decide_dentry(o, map, read_ptr(file, o.file_dentry)?, req)
}

/// Decides `req` on the file of dentry `leaf`, as `decide` does.
#[inline(always)]
pub fn decide_dentry(
    o: &KernelOffsets,
    map: RuleMap,
    leaf: *const u8,
    req: &Request,
) -> Result<Outcome, i64> {
    let (dev, ino) = dentry_id(o, leaf)?;
    let Some(walk) = claim() else {
        // More walks preempted on this CPU than there are slots: decided
        // closed and counted, never walked in another task's state.
        return Ok(no_walk_slot(map, leaf, dev, ino));
    };
    // SAFETY: `walk` is this CPU's slot of `WALKS`, claimed by this run and
    // live for it.
    unsafe {
        *walk = Walk {
            busy: 1,
            identity: req.identity,
            requested: req.requested,
            exe_dev: req.exe.0,
            exe_ino: req.exe.1,
            dentry: leaf as u64,
            dev,
            ino,
            depth: 0,
            reached_root: 0,
            err: 0,
            m: Matches::new(req.active),
        };
    }
    let mut ctx = WalkCtx { walk, map };
    // SAFETY: `walk_level` only touches `ctx` through the pointer.
    unsafe {
        bpf_loop(
            MAX_PATH_DEPTH,
            walk_level as *mut c_void,
            (&mut ctx as *mut WalkCtx).cast(),
            0,
        )
    };
    // SAFETY: as above.
    let w = unsafe { &*walk };
    if w.err != 0 {
        let err = w.err;
        release(walk);
        return Err(err);
    }
    // Read back from the map, so the verifier cannot fold this test away
    // (see `Walk`).
    let decision = if w.reached_root == 0 && !w.m.enforce_denied() {
        fail_closed(RULE_ID_TOO_DEEP)
    } else {
        w.m.finish(req.deny_enforce, req.deny_audit)
    };
    release(walk);
    Ok(Outcome {
        decision,
        dentry: leaf,
        dev,
        ino,
    })
}

/// A free slot of this CPU's `WALKS`, claimed with a compare-and-swap (a
/// plain test-then-set could be preempted between the two). The slots are
/// tried in a `bpf_loop` callback, which the verifier checks once instead
/// of once per slot.
#[inline(always)]
fn claim() -> Option<*mut Walk> {
    let mut found: *mut Walk = core::ptr::null_mut();
    // SAFETY: `claim_slot` only touches `found` through the pointer.
    unsafe {
        bpf_loop(
            WALK_SLOTS,
            claim_slot as *mut c_void,
            (&mut found as *mut *mut Walk).cast(),
            0,
        )
    };
    (!found.is_null()).then_some(found)
}

#[inline(never)]
extern "C" fn claim_slot(i: u64, ctx: *mut c_void) -> i64 {
    let Some(walk) = WALKS.get_ptr_mut(i as u32) else {
        return 1;
    };
    // SAFETY: `busy` is an aligned u64 in a live map value. The intrinsic,
    // since the BPF target's `core` offers no atomic read-modify-write (BPF
    // before v3 had none; this builds for v3).
    let (_, claimed) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Acquire }, { AtomicOrdering::Relaxed }>(
            &raw mut (*walk).busy,
            0,
            1,
        )
    };
    if !claimed {
        return 0;
    }
    // SAFETY: `ctx` is the caller's `found`.
    unsafe { *(ctx as *mut *mut Walk) = walk };
    1
}

#[inline(always)]
fn release(walk: *mut Walk) {
    // SAFETY: as in `claim`.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::Release }>(&raw mut (*walk).busy, 0) };
}

/// The decision of a walk that found every walk slot of its CPU taken:
/// counted as the hook's internal error, but decided closed, since letting
/// it allow would let a flood of preempted walks open what is denied.
#[inline(always)]
fn no_walk_slot(map: RuleMap, dentry: *const u8, dev: u32, ino: u64) -> Outcome {
    count(match map {
        RuleMap::Exec => COUNTER_ERR_EXEC,
        RuleMap::File => COUNTER_ERR_OPEN,
    });
    Outcome {
        decision: fail_closed(RULE_ID_NO_WALK_SLOT),
        dentry,
        dev,
        ino,
    }
}

/// One directory level: look (dev, ino) up, apply its rules, step to the
/// parent. Returns 1 to stop. The walk stops at the filesystem root (whose
/// d_parent is itself); it does not cross mount points. Past
/// `MAX_PATH_DEPTH` levels `bpf_loop` ends it with `reached_root` unset.
#[inline(never)]
extern "C" fn walk_level(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `WalkCtx`, `walk` a live map value.
    let c = unsafe { &*(ctx as *const WalkCtx) };
    let w = unsafe { &mut *c.walk };
    // Every earlier level stepped up exactly once, so the level is the loop
    // index. Taking it from the index rather than from a count kept between
    // iterations matters on kernels before 6.7: their verifier checks a
    // bpf_loop callback as if it ran once (seen on Debian's 6.1).
    w.depth = i as u32;
    let Some(o) = offsets() else {
        w.err = -1;
        return 1;
    };
    let key = InodeKey {
        identity: w.identity,
        dev: w.dev,
        ino: w.ino,
    };
    let set = match c.map {
        RuleMap::Exec => EXEC_RULES.get_ptr(&key),
        RuleMap::File => FILE_RULES.get_ptr(&key),
    };
    if let Some(set) = set {
        apply(set, c.walk);
        if w.m.enforce_denied() {
            return 1;
        }
    }
    let dentry = w.dentry as *const u8;
    let parent = match read_ptr(dentry, o.dentry_d_parent) {
        Ok(p) => p,
        Err(e) => {
            w.err = e;
            return 1;
        }
    };
    if parent == dentry {
        w.reached_root = 1;
        return 1;
    }
    match dentry_id(&o, parent) {
        Ok((dev, ino)) => {
            w.dentry = parent as u64;
            w.dev = dev;
            w.ino = ino;
            0
        }
        Err(e) => {
            w.err = e;
            1
        }
    }
}

/// Applies the rules of one level, through a nested `bpf_loop` so the
/// verifier checks one rule once.
#[inline(always)]
fn apply(set: *const InodeRuleSet, walk: *mut Walk) {
    let mut scan = RuleScan { set, walk };
    // SAFETY: `inode_rule` only touches `scan` through the pointer.
    unsafe {
        bpf_loop(
            INODE_RULES_PER_KEY as u32,
            inode_rule as *mut c_void,
            (&mut scan as *mut RuleScan).cast(),
            0,
        )
    };
}

struct RuleScan {
    set: *const InodeRuleSet,
    walk: *mut Walk,
}

#[inline(never)]
extern "C" fn inode_rule(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `RuleScan`; `set` and `walk` are live
    // map values.
    let scan = unsafe { &*(ctx as *const RuleScan) };
    let set = unsafe { &*scan.set };
    let w = unsafe { &mut *scan.walk };
    if i >= INODE_RULES_PER_KEY as u64 || i as u32 >= set.count {
        return 1;
    }
    let r = &set.rules[i as usize];
    let (exe_dev, exe_ino) = (w.exe_dev, w.exe_ino);
    let stop = apply_inode_rule(&mut w.m, r, w.depth, w.requested, |set| {
        let key = InodeKey {
            identity: set,
            dev: exe_dev,
            ino: exe_ino,
        };
        ONLY_FROM.get_ptr(&key).is_some()
    });
    stop as i64
}

/// Counts the decision and, when it should be logged, emits its event with
/// the dentry names from the target upwards. `filename` (exec only) goes to
/// the last name slot.
#[inline(always)]
pub fn report(
    o: &KernelOffsets,
    action: u8,
    backend: u8,
    req: &Request,
    out: &Outcome,
    filename: Option<*const u8>,
) {
    let d = &out.decision;
    count_decision(action, d.verdict);
    count_policy_decision(req.cfg, action, d.verdict, d.hit.policy_bit);
    if !d.emits() {
        return;
    }
    let Some(mut entry) = reserve_decision() else {
        return;
    };
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry.
    unsafe {
        fill_common(e, EVENT_DECISION, req.identity, req.cgroup_id);
        fill_decision(e, action, backend, d, req.cfg);
        (*e).ino = out.ino;
        (*e).dev = out.dev;
        (*e).exe_dev = req.exe.0;
        (*e).exe_ino = req.exe.1;
        (*e).access = req.requested;
        let slots = if filename.is_some() {
            EVENT_NAMES - 1
        } else {
            EVENT_NAMES
        };
        let mut dentry = out.dentry;
        let mut i = 0;
        while i < EVENT_NAMES {
            if i >= slots {
                break;
            }
            let Ok(name) = read_ptr(dentry, o.dentry_d_name) else {
                break;
            };
            let dst: &mut [u8; EVENT_NAME_LEN] = &mut (*e).names[i];
            if bpf_probe_read_kernel_str_bytes(name, dst).is_err() {
                dst[0] = 0;
            }
            let Ok(parent) = read_ptr(dentry, o.dentry_d_parent) else {
                break;
            };
            if parent == dentry {
                break;
            }
            dentry = parent;
            i += 1;
        }
        if let Some(f) = filename {
            let dst: &mut [u8; EVENT_NAME_LEN] = &mut (*e).names[EVENT_NAMES - 1];
            if bpf_probe_read_kernel_str_bytes(f, dst).is_err() {
                dst[0] = 0;
            }
        }
    }
    entry.submit(0);
}
