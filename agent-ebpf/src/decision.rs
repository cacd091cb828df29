//! Combining rule matches and policy defaults into one verdict, shared by
//! every hook, and the common part of the event record.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_ktime_get_boot_ns,
    },
    maps::ring_buf::RingBufEntry,
};
use portcullis_common::{
    COUNTER_LOST_EVENTS, Event, IdentityConfig, MODE_ENFORCE, RULE_ID_DEFAULT, VERDICT_ALLOW,
    VERDICT_AUDIT, VERDICT_DENY,
};

use crate::maps::{EVENTS, count};

/// The rule (or default) that decided.
#[derive(Clone, Copy)]
pub struct Hit {
    pub rule_id: u32,
    pub policy_bit: u8,
    /// Directory levels above the target (0 for connect).
    pub depth: u32,
}

/// A verdict and what produced it.
#[derive(Clone, Copy)]
pub struct Decision {
    pub verdict: u8,
    pub hit: Hit,
    /// Emit an event even for an allow (the allow rule had `RULE_LOG_ALLOW`).
    pub log: bool,
}

impl Decision {
    /// Whether this decision goes to the ring buffer.
    #[inline(always)]
    pub fn emits(&self) -> bool {
        self.verdict != VERDICT_ALLOW || self.log
    }
}

/// Rule matches gathered while scanning the rules that apply to a request.
#[derive(Clone, Copy)]
pub struct Matches {
    enforce_deny: Option<Hit>,
    audit_deny: Option<Hit>,
    logged_allow: Option<Hit>,
    /// Bit `policy_bit` set for every policy that had a matching allow rule.
    allowed_by: u32,
    /// Policies that apply to the acting task (see
    /// `identity::active_policies`); rules of the others are ignored.
    active: u32,
}

impl Matches {
    #[inline(always)]
    pub const fn new(active: u32) -> Self {
        Self {
            enforce_deny: None,
            audit_deny: None,
            logged_allow: None,
            allowed_by: 0,
            active,
        }
    }

    #[inline(always)]
    fn applies(&self, hit: &Hit) -> bool {
        self.active & (1u32 << (hit.policy_bit as u32 & 31)) != 0
    }

    /// Records a rule that denies the request.
    #[inline(always)]
    pub fn deny(&mut self, mode: u8, hit: Hit) {
        if !self.applies(&hit) {
            return;
        }
        if mode == MODE_ENFORCE {
            if self.enforce_deny.is_none() {
                self.enforce_deny = Some(hit);
            }
        } else if self.audit_deny.is_none() {
            self.audit_deny = Some(hit);
        }
    }

    /// Records a rule that explicitly allows the request.
    #[inline(always)]
    pub fn allow(&mut self, hit: Hit, log: bool) {
        if !self.applies(&hit) {
            return;
        }
        self.allowed_by |= 1u32 << (hit.policy_bit as u32 & 31);
        if log && self.logged_allow.is_none() {
            self.logged_allow = Some(hit);
        }
    }

    /// Whether an enforce-mode rule already denied (later rules cannot
    /// change the outcome).
    #[inline(always)]
    pub fn enforce_denied(&self) -> bool {
        self.enforce_deny.is_some()
    }

    /// An enforce deny rule wins; then a default-deny policy (in
    /// `deny_enforce`) that allowed nothing; then the same two in audit
    /// mode; otherwise allow.
    #[inline(always)]
    pub fn finish(self, deny_enforce: u32, deny_audit: u32) -> Decision {
        let (deny_enforce, deny_audit) = (deny_enforce & self.active, deny_audit & self.active);
        if let Some(hit) = self.enforce_deny {
            return Decision {
                verdict: VERDICT_DENY,
                hit,
                log: false,
            };
        }
        let unmet = deny_enforce & !self.allowed_by;
        if unmet != 0 {
            return Decision {
                verdict: VERDICT_DENY,
                hit: default_hit(unmet),
                log: false,
            };
        }
        if let Some(hit) = self.audit_deny {
            return Decision {
                verdict: VERDICT_AUDIT,
                hit,
                log: false,
            };
        }
        let unmet = deny_audit & !self.allowed_by;
        if unmet != 0 {
            return Decision {
                verdict: VERDICT_AUDIT,
                hit: default_hit(unmet),
                log: false,
            };
        }
        match self.logged_allow {
            Some(hit) => Decision {
                verdict: VERDICT_ALLOW,
                hit,
                log: true,
            },
            None => allow(),
        }
    }
}

/// An allow that no rule produced and nobody logs.
#[inline(always)]
pub const fn allow() -> Decision {
    Decision {
        verdict: VERDICT_ALLOW,
        hit: Hit {
            rule_id: RULE_ID_DEFAULT,
            policy_bit: 0,
            depth: 0,
        },
        log: false,
    }
}

/// A deny no rule produced (`why` is `RULE_ID_TOO_DEEP` or
/// `RULE_ID_RACED`).
#[inline(always)]
pub const fn fail_closed(why: u32) -> Decision {
    Decision {
        verdict: VERDICT_DENY,
        hit: Hit {
            rule_id: why,
            policy_bit: 0,
            depth: 0,
        },
        log: false,
    }
}

/// The default of the lowest policy in `mask` (non-zero).
#[inline(always)]
fn default_hit(mask: u32) -> Hit {
    Hit {
        rule_id: RULE_ID_DEFAULT,
        policy_bit: lowest_bit(mask),
        depth: 0,
    }
}

/// Index of the lowest set bit of a non-zero mask, without a branch: the
/// bit count of the ones below it (SWAR popcount). A binary search split
/// the verifier's state five ways, and every later use of the policy bit as
/// an index kept the splits apart (6.1 walked the event code 32 times, ~290k
/// instructions for exec); branch-free, it is one state with a bounded
/// value. `trailing_zeros` may lower to a table load BPF cannot express.
#[inline(always)]
fn lowest_bit(mask: u32) -> u8 {
    let mut x = (mask & mask.wrapping_neg()).wrapping_sub(1);
    x = x - ((x >> 1) & 0x5555_5555);
    x = (x & 0x3333_3333) + ((x >> 2) & 0x3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101) >> 24) as u8
}

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
