//! Device access: a cgroup device program at the cgroup v2 root, asked by
//! the kernel on every open of a device node and every `mknod` by a task
//! below it. Returning 0 makes the call fail with EPERM, on every kernel,
//! LSM or not. Attached with multi-attach, so the verdict is ANDed with the
//! container runtime's own per-container device programs.
//!
//! Fail open: a missing identity config allows and is counted in
//! `COUNTER_ERR_DEVICE`.

use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_loop, macros::cgroup_device, programs::DeviceContext};
use portcullis_common::{
    ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE, ACTION_DEVICE, BACKEND_CGROUP_DEVICE,
    COUNTER_ERR_DEVICE, DEVICE_ANY_MINOR, DEVICE_RULES_PER_KEY, DeviceKey, DeviceRuleSet,
    HAS_DEVICES, IDENTITY_UNRESTRICTED, IdentityConfig, VERDICT_ALLOW, VERDICT_DENY,
    decide::apply_device_rule,
};

use crate::{
    decision::{self, Decision, Matches, allow},
    identity,
    maps::{DEVICE_RULES, count, count_decision},
};

/// `BPF_DEVCG_ACC_*`, in the upper half of `access_type`.
const DEVCG_ACC_MKNOD: u32 = 1;
const DEVCG_ACC_READ: u32 = 2;
const DEVCG_ACC_WRITE: u32 = 4;

#[cgroup_device]
pub fn device(ctx: DeviceContext) -> i32 {
    match try_device(&ctx) {
        Ok(VERDICT_DENY) => 0,
        Ok(_) => 1,
        Err(()) => {
            count(COUNTER_ERR_DEVICE);
            1
        }
    }
}

#[inline(always)]
fn try_device(ctx: &DeviceContext) -> Result<u8, ()> {
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        count_decision(ACTION_DEVICE, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(())?;
    // SAFETY: the context pointer is valid for the whole program run.
    let dev = unsafe { &*ctx.device };
    let kind = dev.access_type & 0xffff;
    let acc = dev.access_type >> 16;
    let requested = (if acc & DEVCG_ACC_READ != 0 {
        ACCESS_READ
    } else {
        0
    }) | (if acc & DEVCG_ACC_WRITE != 0 {
        ACCESS_WRITE
    } else {
        0
    }) | (if acc & DEVCG_ACC_MKNOD != 0 {
        ACCESS_MKNOD
    } else {
        0
    });
    let d = if cfg.flags & HAS_DEVICES == 0 {
        allow()
    } else {
        let mut scan = RuleScan::new(requested, Matches::new(identity::active_policies(cfg)));
        for minor in [dev.minor, DEVICE_ANY_MINOR] {
            scan.scan(&DeviceKey {
                identity: id,
                kind,
                major: dev.major,
                minor,
            });
        }
        scan.m.finish(cfg.dev_deny_enforce, cfg.dev_deny_audit)
    };
    report(cgid, id, cfg, &d, kind, dev.major, dev.minor, requested);
    Ok(d.verdict)
}

/// A request for `requested` access, matched against the rule sets stored
/// under one or more keys (device or socket rules). The matches live in
/// place across keys: copying them in and out per key cost the verifier
/// half again the instructions.
pub struct RuleScan {
    set: *const DeviceRuleSet,
    requested: u32,
    pub m: Matches,
}

impl RuleScan {
    #[inline(always)]
    pub fn new(requested: u32, m: Matches) -> Self {
        Self {
            set: core::ptr::null(),
            requested,
            m,
        }
    }

    /// Applies the rules stored under `key`, if any.
    #[inline(always)]
    pub fn scan(&mut self, key: &DeviceKey) {
        // SAFETY: a reference into a map value, live for the run.
        let Some(set) = (unsafe { DEVICE_RULES.get(key) }) else {
            return;
        };
        self.set = set;
        // bpf_loop, as for the network rules: the verifier checks one rule
        // once, not every combination of matches.
        // SAFETY: `device_rule` only touches `self` through the pointer.
        unsafe {
            bpf_loop(
                DEVICE_RULES_PER_KEY as u32,
                device_rule as *mut c_void,
                (self as *mut RuleScan).cast(),
                0,
            )
        };
    }
}

/// One rule of a `DeviceRuleSet`; returns 1 to stop the loop.
#[inline(never)]
extern "C" fn device_rule(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `RuleScan`, `set` a live map value.
    let scan = unsafe { &mut *(ctx as *mut RuleScan) };
    let set = unsafe { &*scan.set };
    if i >= DEVICE_RULES_PER_KEY as u64 || i as u32 >= set.count {
        return 1;
    }
    apply_device_rule(&mut scan.m, &set.rules[i as usize], scan.requested) as i64
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn report(
    cgid: u64,
    id: u32,
    cfg: &IdentityConfig,
    d: &Decision,
    kind: u32,
    major: u32,
    minor: u32,
    requested: u32,
) {
    decision::report(
        ACTION_DEVICE,
        BACKEND_CGROUP_DEVICE,
        id,
        cgid,
        cfg,
        d,
        |e| {
            // The kernel's dev_t encoding, as for inode targets.
            e.dev = (major << 20) | (minor & 0xfffff);
            e.proto = kind as u8;
            e.access = requested;
        },
    );
}
