//! The one decision over a `struct file *` shared by exec and open, on every
//! backend: walk the dentry and its ancestors, look each (dev, ino) up in the
//! rule map, combine.

use aya_ebpf::{helpers::bpf_probe_read_kernel_str_bytes, maps::HashMap};
use portcullis_common::{
    EVENT_DECISION, EVENT_NAME_LEN, EVENT_NAMES, Event, INODE_RULES_PER_KEY, InodeKey,
    InodeRuleSet, KernelOffsets, MAX_PATH_DEPTH, RULE_LOG_ALLOW, RULE_SUBTREE,
};

use crate::{
    decision::{Decision, Hit, Matches, fill_common, fill_decision, reserve_decision},
    kernel::{dentry_id, read_ptr},
    maps::{ONLY_FROM, count_decision},
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
}

/// What was decided about which inode.
pub struct Outcome {
    pub decision: Decision,
    pub dentry: *const u8,
    pub dev: u32,
    pub ino: u64,
}

/// Decides `req` on `file`. Errors are kernel reads that failed; callers
/// count them and fail open.
#[inline(always)]
pub fn decide(
    o: &KernelOffsets,
    rules: &HashMap<InodeKey, InodeRuleSet>,
    file: *const u8,
    req: &Request,
) -> Result<Outcome, i64> {
    let leaf = read_ptr(file, o.file_dentry)?;
    let (dev, ino) = dentry_id(o, leaf)?;
    let mut m = Matches::new();
    let mut dentry = leaf;
    let (mut cur_dev, mut cur_ino) = (dev, ino);
    let mut depth = 0u32;
    while depth < MAX_PATH_DEPTH {
        let key = InodeKey { identity: req.identity, dev: cur_dev, ino: cur_ino };
        if let Some(set) = rules.get_ptr(&key) {
            // SAFETY: map value pointer valid for this program run.
            let set = unsafe { &*set };
            apply(set, depth, req, &mut m);
            if m.enforce_denied() {
                break;
            }
        }
        // d_parent of a filesystem root is itself; the walk stops there
        // (it does not cross mount points).
        let parent = read_ptr(dentry, o.dentry_d_parent)?;
        if parent == dentry {
            break;
        }
        dentry = parent;
        (cur_dev, cur_ino) = dentry_id(o, dentry)?;
        depth += 1;
    }
    Ok(Outcome { decision: m.finish(req.deny_enforce, req.deny_audit), dentry: leaf, dev, ino })
}

#[inline(always)]
fn apply(set: &InodeRuleSet, depth: u32, req: &Request, m: &mut Matches) {
    let mut i = 0;
    while i < INODE_RULES_PER_KEY {
        if i as u32 >= set.count {
            break;
        }
        let r = &set.rules[i];
        i += 1;
        if depth > 0 && r.flags & RULE_SUBTREE == 0 {
            continue;
        }
        let hit = Hit { rule_id: r.rule_id, policy_bit: r.policy_bit, depth };
        let denied = req.requested & !r.allow_mask != 0
            || (r.only_from != 0 && {
                let key = InodeKey { identity: r.only_from, dev: req.exe.0, ino: req.exe.1 };
                ONLY_FROM.get_ptr(&key).is_none()
            });
        if denied {
            m.deny(r.mode, hit);
        } else {
            m.allow(hit, r.flags & RULE_LOG_ALLOW != 0);
        }
    }
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
    if !d.emits() {
        return;
    }
    let Some(mut entry) = reserve_decision() else { return };
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry.
    unsafe {
        fill_common(e, EVENT_DECISION, req.identity, req.cgroup_id);
        fill_decision(e, action, backend, d);
        (*e).ino = out.ino;
        (*e).dev = out.dev;
        (*e).exe_dev = req.exe.0;
        (*e).exe_ino = req.exe.1;
        (*e).access = req.requested;
        let slots = if filename.is_some() { EVENT_NAMES - 1 } else { EVENT_NAMES };
        let mut dentry = out.dentry;
        let mut i = 0;
        while i < EVENT_NAMES {
            if i >= slots {
                break;
            }
            let Ok(name) = read_ptr(dentry, o.dentry_d_name) else { break };
            let dst: &mut [u8; EVENT_NAME_LEN] = &mut (*e).names[i];
            if bpf_probe_read_kernel_str_bytes(name, dst).is_err() {
                dst[0] = 0;
            }
            let Ok(parent) = read_ptr(dentry, o.dentry_d_parent) else { break };
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
