//! Socket rules: written per identity into the device rule map under
//! (identity, `DEVICE_CLASS_SOCKET`, family, kind), see
//! `portcullis_common::socket`.

use std::sync::Arc;

use portcullis_common::{
    ACCESS_CREATE, DEVICE_CLASS_SOCKET, DEVICE_RULES_PER_KEY, DeviceKey, DeviceRule, HAS_SOCKETS,
    VERDICT_ALLOW, VERDICT_DENY,
};

use super::{Builder, CompileError, Compiled, PolicyRules, names};
use crate::policy::{DefaultAction, Policy, SocketKind};

impl Builder<'_> {
    /// `policy.sockets` into `pr`.
    pub(super) fn socket_rules(&mut self, policy: &Policy, pr: &mut PolicyRules) {
        let Some(sockets) = &policy.sockets else {
            return;
        };
        pr.cfg.flags |= HAS_SOCKETS;
        pr.cfg.sock_deny_enforce = (sockets.default == DefaultAction::Deny) as u32;
        for (list, verdict, name) in [
            (&sockets.allow, VERDICT_ALLOW, "allow"),
            (&sockets.deny, VERDICT_DENY, "deny"),
        ] {
            for (i, r) in list.iter().enumerate() {
                let id = self.rule(
                    policy,
                    format!("network.sockets.{name}[{i}] {}", r.kind.name()),
                );
                let rule = DeviceRule {
                    access: ACCESS_CREATE,
                    rule_id: id,
                    verdict,
                    mode: pr.mode,
                    policy_bit: 0,
                    flags: 0,
                };
                pr.sockets.push((r.kind, rule));
            }
        }
    }
}

/// Writes the socket rules of the policy at `bit` of identity `identity`.
pub(super) fn emit(
    out: &mut Compiled,
    pr: &PolicyRules,
    bit: usize,
    identity: u32,
    policies: &[Policy],
    set: &[usize],
) -> Result<(), CompileError> {
    for (kind, rule) in &pr.sockets {
        let rule = DeviceRule {
            policy_bit: bit as u8,
            ..*rule
        };
        for &family in kind.families() {
            let key = DeviceKey {
                identity,
                kind: DEVICE_CLASS_SOCKET,
                major: family,
                minor: u32::from(kind.wire()),
            };
            let entry = Arc::make_mut(&mut out.devices).entry(key).or_default();
            // A kind named twice in one list decides as once.
            if entry.rules[..entry.count as usize]
                .iter()
                .any(|r| r.policy_bit == rule.policy_bit && r.verdict == rule.verdict)
            {
                continue;
            }
            if entry.count as usize == DEVICE_RULES_PER_KEY {
                return Err(CompileError::TooManySocketRules {
                    kind: kind.name(),
                    policies: names(policies, set),
                });
            }
            entry.rules[entry.count as usize] = rule;
            entry.count += 1;
        }
    }
    Ok(())
}

/// The policy name of a socket kind the kernel reported.
pub fn kind_name(wire: u8) -> &'static str {
    SocketKind::from_wire(wire).map_or("unknown", SocketKind::name)
}
