//! Agent-wide counter slots of policies, for the per-policy decision
//! counters the kernel keeps (`POLICY_DECISIONS`).
//!
//! A policy keeps its slot for the life of the agent, whatever reloads do,
//! so a counter never moves to another policy's label. Slots are bounded
//! (`POLICY_SLOTS`); policies beyond the last share the `other` slot, which
//! also bounds the metric's label cardinality.

use std::collections::BTreeMap;

use portcullis_common::POLICY_SLOT_OTHER;

use crate::compile::Compiled;

/// Label of the shared overflow slot.
pub const OTHER: &str = "(other)";

#[derive(Debug, Default)]
pub struct PolicySlots {
    by_name: BTreeMap<String, u8>,
}

impl PolicySlots {
    /// The slot of policy `name`, assigning the next free one.
    pub fn slot(&mut self, name: &str) -> u8 {
        if let Some(&s) = self.by_name.get(name) {
            return s;
        }
        let next = self.by_name.len();
        if next >= POLICY_SLOT_OTHER as usize {
            return POLICY_SLOT_OTHER;
        }
        self.by_name.insert(name.to_owned(), next as u8);
        next as u8
    }

    /// Every assigned slot with its label, the overflow slot included.
    pub fn labels(&self) -> Vec<(u8, String)> {
        let mut v: Vec<(u8, String)> = self.by_name.iter().map(|(n, &s)| (s, n.clone())).collect();
        v.push((POLICY_SLOT_OTHER, OTHER.to_owned()));
        v
    }

    /// Writes the slot of each identity's `i`-th policy into its config.
    pub fn fill(&mut self, c: &mut Compiled) {
        for (identity, cfg) in c.identity_cfg.iter_mut() {
            let Some(indexes) = c.identity_policies.get(identity) else {
                continue;
            };
            for (bit, &idx) in indexes.iter().enumerate().take(cfg.policy_slots.len()) {
                if let Some(name) = c.policies.get(idx) {
                    cfg.policy_slots[bit] = self.slot(name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_and_bounded() {
        let mut s = PolicySlots::default();
        assert_eq!(s.slot("a"), 0);
        assert_eq!(s.slot("b"), 1);
        assert_eq!(s.slot("a"), 0);
        for i in 0..300 {
            s.slot(&format!("p{i}"));
        }
        assert_eq!(s.slot("late"), POLICY_SLOT_OTHER);
        assert_eq!(s.labels().len(), POLICY_SLOT_OTHER as usize + 1);
    }
}
