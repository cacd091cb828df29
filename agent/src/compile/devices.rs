//! Device rules: resolved to this node's device numbers once per compile,
//! then written per identity under (identity, type, major, minor).

use std::sync::Arc;

use portcullis_common::{
    DEVICE_ANY_MINOR, DEVICE_BLOCK, DEVICE_CHAR, DEVICE_RULES_PER_KEY, DeviceKey, DeviceRule,
    HAS_DEVICES, RULE_LOG_ALLOW, VERDICT_ALLOW, VERDICT_DENY,
};

use super::{Builder, CompileError, Compiled, PolicyRules, names};
use crate::{
    node_devices::DevNum,
    policy::{DefaultAction, Policy},
};

impl Builder<'_> {
    /// `policy.devices` into `pr`: each rule resolved on this node; one that
    /// stands for no device here is a warning, not an error (the driver may
    /// not be loaded yet; the next reload resolves it again).
    pub(super) fn device_rules(&mut self, policy: &Policy, pr: &mut PolicyRules) {
        let Some(devices) = &policy.devices else {
            return;
        };
        pr.cfg.flags |= HAS_DEVICES;
        pr.cfg.dev_deny_enforce = (devices.default == DefaultAction::Deny) as u32;
        let now = self.out.judged_at;
        for (list, verdict, name) in [
            (&devices.allow, VERDICT_ALLOW, "allow"),
            (&devices.deny, VERDICT_DENY, "deny"),
        ] {
            for (i, r) in list.iter().enumerate() {
                if crate::policy::expired(r.until, now) {
                    continue;
                }
                let id = self.rule(policy, format!("devices.{name}[{i}] {}", r.text));
                let found = match self.node.resolve(&r.target) {
                    Ok(found) => found,
                    Err(why) => {
                        self.out.warnings.push(format!(
                            "{}:{}: policy {}: devices.{name}[{i}]: {why}; it is resolved again on every reload",
                            policy.source.display(),
                            r.line,
                            policy.name,
                        ));
                        continue;
                    }
                };
                let rule = DeviceRule {
                    access: r.access,
                    rule_id: id,
                    verdict,
                    mode: pr.mode,
                    policy_bit: 0,
                    flags: if r.log { RULE_LOG_ALLOW as u8 } else { 0 },
                };
                pr.devices.extend(found.into_iter().map(|d| (d, rule)));
            }
        }
    }
}

/// Writes the device rules of the policy at `bit` of identity `identity`.
pub(super) fn emit(
    out: &mut Compiled,
    pr: &PolicyRules,
    bit: usize,
    identity: u32,
    policies: &[Policy],
    set: &[usize],
) -> Result<(), CompileError> {
    for (d, rule) in &pr.devices {
        let key = device_key(identity, d);
        let entry = Arc::make_mut(&mut out.devices).entry(key).or_default();
        let rule = DeviceRule {
            policy_bit: bit as u8,
            ..*rule
        };
        if entry.rules[..entry.count as usize].contains(&rule) {
            continue;
        }
        if entry.count as usize == DEVICE_RULES_PER_KEY {
            return Err(CompileError::TooManyDeviceRules {
                device: format!(
                    "{} {}:{}",
                    if d.block { "b" } else { "c" },
                    d.major,
                    d.minor.map_or("*".into(), |m| m.to_string())
                ),
                policies: names(policies, set),
            });
        }
        entry.rules[entry.count as usize] = rule;
        entry.count += 1;
    }
    Ok(())
}

fn device_key(identity: u32, d: &DevNum) -> DeviceKey {
    DeviceKey {
        identity,
        kind: if d.block { DEVICE_BLOCK } else { DEVICE_CHAR },
        major: d.major,
        minor: d.minor.unwrap_or(DEVICE_ANY_MINOR),
    }
}
