//! How rule matches and policy defaults combine into one verdict. The kernel
//! programs run this code in every hook, and the agent runs the same code on
//! the host (`portcullis` evaluates requests against the compiled map
//! contents with it), so the two cannot drift apart. Everything here must
//! stay `#[inline(always)]` and branch-light: it is verified inside the
//! hooks' `bpf_loop` callbacks (see `lowest_bit`).

use crate::{
    DeviceRule, InodeRule, MODE_ENFORCE, NetRule, RULE_ID_DEFAULT, RULE_LOG_ALLOW, RULE_SUBTREE,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};

/// The rule (or default) that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub rule_id: u32,
    pub policy_bit: u8,
    /// Directory levels above the target (0 for connect).
    pub depth: u32,
}

/// A verdict and what produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug)]
pub struct Matches {
    enforce_deny: Option<Hit>,
    audit_deny: Option<Hit>,
    logged_allow: Option<Hit>,
    /// Bit `policy_bit` set for every policy that had a matching allow rule.
    allowed_by: u32,
    /// Policies that apply to the acting task (the kernel's
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

/// Applies one exec or file rule met `depth` levels above the target.
/// `exe_in` answers whether the acting executable is in an `onlyFrom` set
/// (asked only for a rule that has one). Returns true when the walk should
/// stop: the first enforce deny decides. Stopping here, rather than relying
/// on `Matches::deny` keeping the first, matters on verifiers before 6.7:
/// they take state carried between `bpf_loop` iterations for its first
/// value and drop that check, so later denies would overwrite the reported
/// rule (seen on 6.1).
#[inline(always)]
pub fn apply_inode_rule(
    m: &mut Matches,
    r: &InodeRule,
    depth: u32,
    requested: u32,
    exe_in: impl FnOnce(u32) -> bool,
) -> bool {
    if depth > 0 && r.flags & RULE_SUBTREE == 0 {
        return false;
    }
    let hit = Hit {
        rule_id: r.rule_id,
        policy_bit: r.policy_bit,
        depth,
    };
    let denied = requested & !r.allow_mask != 0 || (r.only_from != 0 && !exe_in(r.only_from));
    record(m, denied, r.mode, hit, r.flags & RULE_LOG_ALLOW != 0)
}

/// Applies one egress rule of the prefix set the address fell in, to a
/// connect or send to `port` over IP protocol `proto`. Returns true when
/// the scan should stop, as [`apply_inode_rule`].
#[inline(always)]
pub fn apply_net_rule(m: &mut Matches, r: &NetRule, port: u16, proto: u8) -> bool {
    if port < r.port_lo || port > r.port_hi || (r.proto != 0 && r.proto != proto) {
        return false;
    }
    let hit = Hit {
        rule_id: r.rule_id,
        policy_bit: r.policy_bit,
        depth: 0,
    };
    record(
        m,
        r.verdict == VERDICT_DENY,
        r.mode,
        hit,
        r.flags & RULE_LOG_ALLOW != 0,
    )
}

/// Applies one device rule of the (kind, major, minor) or (kind, major, any)
/// set to a request for `requested` (`ACCESS_*` bits). An allow rule
/// matches when all of the request is in its access, a deny rule when any
/// of it is. Returns true when the scan should stop, as
/// [`apply_inode_rule`].
#[inline(always)]
pub fn apply_device_rule(m: &mut Matches, r: &DeviceRule, requested: u32) -> bool {
    let deny = r.verdict == VERDICT_DENY;
    let matched = if deny {
        requested & r.access != 0
    } else {
        requested & !r.access == 0
    };
    if !matched {
        return false;
    }
    let hit = Hit {
        rule_id: r.rule_id,
        policy_bit: r.policy_bit,
        depth: 0,
    };
    record(m, deny, r.mode, hit, r.flags as u32 & RULE_LOG_ALLOW != 0)
}

/// Records a rule that matched as a deny or an allow; true when the scan
/// should stop. A deny of a policy that does not apply to this task
/// (uid-scoped) stops nothing: another policy's deny may come after it.
#[inline(always)]
fn record(m: &mut Matches, deny: bool, mode: u8, hit: Hit, log: bool) -> bool {
    if deny {
        let applies = m.applies(&hit);
        m.deny(mode, hit);
        applies && mode == MODE_ENFORCE
    } else {
        m.allow(hit, log);
        false
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
/// `RULE_ID_NO_WALK_SLOT`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ACCESS_READ, ACCESS_WRITE, MODE_AUDIT};

    const ALL: u32 = u32::MAX;

    fn hit(rule_id: u32, policy_bit: u8) -> Hit {
        Hit {
            rule_id,
            policy_bit,
            depth: 0,
        }
    }

    fn rule(rule_id: u32, policy_bit: u8, mode: u8, allow_mask: u32, flags: u32) -> InodeRule {
        InodeRule {
            allow_mask,
            only_from: 0,
            flags,
            rule_id,
            mode,
            policy_bit,
            _pad: [0; 2],
        }
    }

    #[test]
    fn a_deny_of_a_policy_that_does_not_apply_does_not_end_the_walk() {
        // Policy 1 is scoped to other uids: its enforce deny is skipped, and
        // the walk must go on to find policy 0's.
        let mut m = Matches::new(!0b10);
        let other = rule(3, 1, MODE_ENFORCE, 0, 0);
        assert!(!apply_inode_rule(&mut m, &other, 0, ACCESS_READ, |_| false));
        let net = NetRule {
            port_lo: 0,
            port_hi: u16::MAX,
            proto: 0,
            verdict: VERDICT_DENY,
            mode: MODE_ENFORCE,
            policy_bit: 1,
            rule_id: 4,
            flags: 0,
        };
        assert!(!apply_net_rule(&mut m, &net, 80, 6));
        let ours = rule(5, 0, MODE_ENFORCE, 0, RULE_SUBTREE);
        assert!(apply_inode_rule(&mut m, &ours, 1, ACCESS_READ, |_| false));
        assert_eq!(
            m.finish(0, 0).hit,
            Hit {
                depth: 1,
                ..hit(5, 0)
            }
        );
    }

    #[test]
    fn a_net_rule_matches_only_its_ports_and_protocol_and_an_enforce_deny_stops() {
        let r = |verdict, mode, proto| NetRule {
            port_lo: 443,
            port_hi: 444,
            proto,
            verdict,
            mode,
            policy_bit: 1,
            rule_id: 7,
            flags: 0,
        };
        let deny = r(VERDICT_DENY, MODE_ENFORCE, 6);
        for (port, proto, hits) in [
            (443, 6, true),
            (444, 6, true),
            (445, 6, false),
            (443, 17, false),
        ] {
            let mut m = Matches::new(ALL);
            assert_eq!(apply_net_rule(&mut m, &deny, port, proto), hits);
            assert_eq!(m.enforce_denied(), hits);
        }
        // Any protocol; an audit deny does not stop the scan.
        let mut m = Matches::new(ALL);
        assert!(!apply_net_rule(
            &mut m,
            &r(VERDICT_DENY, MODE_AUDIT, 0),
            443,
            17
        ));
        assert_eq!(m.finish(0, 0).verdict, VERDICT_AUDIT);
        // An allow meets its policy's default deny.
        let mut m = Matches::new(ALL);
        assert!(!apply_net_rule(
            &mut m,
            &r(VERDICT_ALLOW, MODE_ENFORCE, 0),
            443,
            6
        ));
        assert_eq!(m.finish(0b10, 0).verdict, VERDICT_ALLOW);
        assert_eq!(
            Matches::new(ALL).finish(0b10, 0).hit,
            hit(RULE_ID_DEFAULT, 1)
        );
    }

    #[test]
    fn lowest_bit_is_trailing_zeros_for_every_single_and_mixed_mask() {
        for b in 0..32 {
            assert_eq!(lowest_bit(1 << b), b as u8);
            assert_eq!(lowest_bit(u32::MAX << b), b as u8);
            assert_eq!(lowest_bit((1 << b) | 0x8000_0000), b as u8);
        }
        let mut x = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if x != 0 {
                assert_eq!(lowest_bit(x) as u32, x.trailing_zeros(), "{x:#x}");
            }
        }
    }

    #[test]
    fn nothing_matched_allows_unless_a_policy_defaults_to_deny() {
        assert_eq!(Matches::new(ALL).finish(0, 0), allow());
        let d = Matches::new(ALL).finish(0b100, 0);
        assert_eq!(d.verdict, VERDICT_DENY);
        assert_eq!(d.hit, hit(RULE_ID_DEFAULT, 2));
        let d = Matches::new(ALL).finish(0, 0b1000);
        assert_eq!(d.verdict, VERDICT_AUDIT);
        assert_eq!(d.hit, hit(RULE_ID_DEFAULT, 3));
    }

    #[test]
    fn an_allow_meets_only_its_own_policys_default() {
        let mut m = Matches::new(ALL);
        m.allow(hit(7, 0), false);
        assert_eq!(m.finish(0b01, 0), allow());
        // Policy 1 defaults to deny and allowed nothing: it decides.
        let d = m.finish(0b11, 0);
        assert_eq!((d.verdict, d.hit), (VERDICT_DENY, hit(RULE_ID_DEFAULT, 1)));
    }

    #[test]
    fn deny_beats_allow_and_enforce_beats_audit() {
        let mut m = Matches::new(ALL);
        m.allow(hit(1, 0), true);
        m.deny(MODE_AUDIT, hit(2, 1));
        assert_eq!(m.finish(0, 0).verdict, VERDICT_AUDIT);
        m.deny(MODE_ENFORCE, hit(3, 2));
        m.deny(MODE_ENFORCE, hit(4, 2));
        let d = m.finish(0, 0);
        assert_eq!((d.verdict, d.hit, d.log), (VERDICT_DENY, hit(3, 2), false));
        // An enforce default deny beats an audit rule deny.
        let mut m = Matches::new(ALL);
        m.deny(MODE_AUDIT, hit(2, 1));
        assert_eq!(m.finish(0b1, 0).hit, hit(RULE_ID_DEFAULT, 0));
    }

    #[test]
    fn a_logged_allow_is_reported_when_nothing_denies() {
        let mut m = Matches::new(ALL);
        m.allow(hit(5, 0), false);
        m.allow(hit(6, 0), true);
        m.allow(hit(8, 0), true);
        let d = m.finish(0, 0);
        assert_eq!((d.verdict, d.hit, d.log), (VERDICT_ALLOW, hit(6, 0), true));
        assert!(d.emits());
        assert!(!allow().emits());
    }

    #[test]
    fn policies_that_do_not_apply_to_the_task_are_ignored() {
        let mut m = Matches::new(0b01);
        m.deny(MODE_ENFORCE, hit(9, 1));
        assert!(!m.enforce_denied());
        m.allow(hit(10, 1), false);
        // Policy 1's default does not count either; policy 0's does.
        assert_eq!(m.finish(0b10, 0), allow());
        assert_eq!(m.finish(0b11, 0).hit, hit(RULE_ID_DEFAULT, 0));
    }

    #[test]
    fn an_inode_rule_above_the_target_applies_only_to_a_subtree() {
        let mut m = Matches::new(ALL);
        let r = rule(1, 0, MODE_ENFORCE, 0, 0);
        assert!(!apply_inode_rule(&mut m, &r, 1, ACCESS_READ, |_| true));
        assert_eq!(m.finish(0, 0), allow());
        let r = rule(1, 0, MODE_ENFORCE, 0, RULE_SUBTREE);
        assert!(apply_inode_rule(&mut m, &r, 3, ACCESS_READ, |_| true));
        let d = m.finish(0, 0);
        assert_eq!((d.verdict, d.hit.depth), (VERDICT_DENY, 3));
    }

    #[test]
    fn an_inode_rule_denies_access_outside_its_mask_or_from_another_binary() {
        let read_only = rule(2, 0, MODE_ENFORCE, ACCESS_READ, 0);
        let mut m = Matches::new(ALL);
        assert!(!apply_inode_rule(
            &mut m,
            &read_only,
            0,
            ACCESS_READ,
            |_| true
        ));
        assert!(apply_inode_rule(
            &mut m,
            &read_only,
            0,
            ACCESS_READ | ACCESS_WRITE,
            |_| true
        ));
        let only_from = InodeRule {
            only_from: 4,
            ..read_only
        };
        let mut asked = 0;
        let mut m = Matches::new(ALL);
        assert!(apply_inode_rule(
            &mut m,
            &only_from,
            0,
            ACCESS_READ,
            |set| {
                asked = set;
                false
            }
        ));
        assert_eq!(asked, 4);
        let mut m = Matches::new(ALL);
        assert!(!apply_inode_rule(
            &mut m,
            &only_from,
            0,
            ACCESS_READ,
            |_| true
        ));
        assert_eq!(m.finish(0b1, 0), allow());
        // An audit deny does not stop the walk.
        let audit = rule(3, 0, MODE_AUDIT, 0, 0);
        assert!(!apply_inode_rule(&mut m, &audit, 0, ACCESS_READ, |_| true));
        assert_eq!(m.finish(0, 0).verdict, VERDICT_AUDIT);
    }
}
