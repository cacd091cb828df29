//! Device rules: resolved to this node's device numbers once per compile,
//! then written per identity under (identity, type, major, minor). An
//! `allocated` rule stands for the devices of the container itself, so it
//! is expanded per identity (see `IdentityKey`).

use std::sync::Arc;

use portcullis_common::{
    DEVICE_ANY_MINOR, DEVICE_BLOCK, DEVICE_CHAR, DEVICE_RULES_PER_KEY, DeviceKey, DeviceRule,
    HAS_DEVICES, RULE_LOG_ALLOW, VERDICT_ALLOW, VERDICT_DENY,
};

use super::{Builder, CompileError, Compiled, IdentityKey, PolicyRules, names};
use crate::{
    node_devices::DevNum,
    pod::allocated::AllocatedDevice,
    policy::{DefaultAction, DeviceTarget, Policy},
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
                let rule = DeviceRule {
                    access: r.access,
                    rule_id: id,
                    verdict,
                    mode: pr.mode,
                    policy_bit: 0,
                    flags: if r.log { RULE_LOG_ALLOW as u8 } else { 0 },
                };
                if r.target == DeviceTarget::Allocated {
                    pr.allocated.push(rule);
                    continue;
                }
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
                pr.devices.extend(found.into_iter().map(|d| (d, rule)));
            }
        }
    }
}

/// The device numbers of a container's allocated device nodes, with the
/// access the kubelet granted each (nodes read under `root`). A node that
/// is gone or is no device stands for nothing.
pub fn allocated(devices: &[AllocatedDevice], root: &std::path::Path) -> Vec<(DevNum, u32)> {
    let mut out: Vec<(DevNum, u32)> = devices
        .iter()
        .filter_map(|d| {
            let number = d
                .number
                .or_else(|| DevNum::of_node(&root.join(d.host_path.trim_start_matches('/'))))?;
            Some((number, d.access))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Writes the device rules of the policy at `bit` of identity `identity`
/// (its `allocated` rules over `key.allocated`).
pub(super) fn emit(
    out: &mut Compiled,
    pr: &PolicyRules,
    bit: usize,
    identity: u32,
    policies: &[Policy],
    key: &IdentityKey,
) -> Result<(), CompileError> {
    let set = &key.policies[..];
    // An allocated rule allows what both it and the kubelet grant.
    let allocated = pr.allocated.iter().flat_map(|rule| {
        key.allocated.iter().filter_map(move |(d, granted)| {
            let access = rule.access & granted;
            (access != 0).then_some((*d, DeviceRule { access, ..*rule }))
        })
    });
    let all: Vec<(DevNum, DeviceRule)> = pr.devices.iter().copied().chain(allocated).collect();
    for (d, rule) in &all {
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
