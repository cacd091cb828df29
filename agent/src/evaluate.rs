//! The kernel's exec and file decision, evaluated on the host: the same
//! combining code (`portcullis_common::decide`) over the same compiled map
//! contents, walked over the same (dev, ino) levels. This is what policy
//! tests and `explain` build on; `agent/tests/kernel.rs` checks that it and
//! the kernel agree on randomly generated rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use portcullis_common::{
    IdentityConfig, InodeKey, InodeRuleSet, MAX_PATH_DEPTH, MAX_POLICIES_PER_IDENTITY,
    RULE_ID_TOO_DEEP,
    decide::{Decision, Matches, apply_inode_rule, fail_closed},
};

use crate::compile::kernel_dev;

/// One exec or open, as the kernel's `inode::Request` sees it.
pub struct InodeRequest<'a> {
    pub identity: u32,
    /// `ACCESS_*` bits.
    pub requested: u32,
    /// (dev, ino) of the acting executable.
    pub exe: (u32, u64),
    /// Policy bits that apply to the acting task ([`active_policies`]).
    pub active: u32,
    pub deny_enforce: u32,
    pub deny_audit: u32,
    /// (dev, ino) of the target, then of each ancestor up to the root of its
    /// filesystem ([`levels`]).
    pub levels: &'a [(u32, u64)],
}

/// Decides `req` against one rule map (exec or file) and the `onlyFrom`
/// sets, as the kernel's dentry walk does: level by level from the target
/// up, the first enforce deny ending the walk, a walk deeper than
/// `MAX_PATH_DEPTH` failing closed.
pub fn decide_inode(
    rules: &BTreeMap<InodeKey, InodeRuleSet>,
    only_from: &BTreeSet<InodeKey>,
    req: &InodeRequest,
) -> Decision {
    let mut m = Matches::new(req.active);
    let exe_in = |set: u32| {
        only_from.contains(&InodeKey {
            identity: set,
            dev: req.exe.0,
            ino: req.exe.1,
        })
    };
    'walk: for (depth, &(dev, ino)) in req.levels.iter().take(MAX_PATH_DEPTH as usize).enumerate() {
        let key = InodeKey {
            identity: req.identity,
            dev,
            ino,
        };
        let Some(set) = rules.get(&key) else {
            continue;
        };
        for r in set.rules.iter().take(set.count as usize) {
            if apply_inode_rule(&mut m, r, depth as u32, req.requested, exe_in) {
                break 'walk;
            }
        }
    }
    if req.levels.len() > MAX_PATH_DEPTH as usize && !m.enforce_denied() {
        return fail_closed(RULE_ID_TOO_DEEP);
    }
    m.finish(req.deny_enforce, req.deny_audit)
}

/// The policies of `cfg` that apply to a task running as `uid`: all but the
/// uid-scoped ones whose range excludes it (the kernel's
/// `identity::active_policies`).
pub fn active_policies(cfg: &IdentityConfig, uid: u32) -> u32 {
    (0..MAX_POLICIES_PER_IDENTITY as usize)
        .filter(|&i| cfg.uid_scoped & (1 << i) != 0 && (uid < cfg.uid_lo[i] || uid > cfg.uid_hi[i]))
        .fold(u32::MAX, |active, i| active & !(1 << i))
}

/// (dev, ino) of `path` and of each ancestor up to the root of its
/// filesystem, the levels the kernel's walk visits. The kernel stops where a
/// dentry is its own parent, the root of the mounted filesystem; here that
/// is where the device number changes or `/` is reached. A bind mount of a
/// subdirectory is where the two differ: the kernel walks on past the
/// mount point into the source filesystem's directories.
pub fn levels(path: &Path) -> io::Result<Vec<(u32, u64)>> {
    let path = path.canonicalize()?;
    let mut out = Vec::new();
    let mut dev = None;
    for p in path.ancestors() {
        let m = std::fs::metadata(p)?;
        if dev.is_some_and(|d| d != m.dev()) {
            break;
        }
        dev = Some(m.dev());
        out.push((kernel_dev(m.dev()), m.ino()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use portcullis_common::{
        ACCESS_READ, InodeRule, MODE_ENFORCE, RULE_SUBTREE, VERDICT_ALLOW, VERDICT_DENY,
    };

    use super::*;

    fn set(rules: &[InodeRule]) -> InodeRuleSet {
        let mut s = InodeRuleSet {
            count: rules.len() as u32,
            ..Default::default()
        };
        s.rules[..rules.len()].copy_from_slice(rules);
        s
    }

    fn request(levels: &[(u32, u64)]) -> InodeRequest<'_> {
        InodeRequest {
            identity: 1,
            requested: ACCESS_READ,
            exe: (9, 9),
            active: u32::MAX,
            deny_enforce: 0,
            deny_audit: 0,
            levels,
        }
    }

    #[test]
    fn a_subtree_deny_above_the_target_decides_with_its_depth() {
        let deny = InodeRule {
            rule_id: 5,
            mode: MODE_ENFORCE,
            flags: RULE_SUBTREE,
            ..Default::default()
        };
        let key = |ino| InodeKey {
            identity: 1,
            dev: 3,
            ino,
        };
        let rules = BTreeMap::from([(key(20), set(&[deny]))]);
        let d = decide_inode(
            &rules,
            &BTreeSet::new(),
            &request(&[(3, 10), (3, 20), (3, 2)]),
        );
        assert_eq!(
            (d.verdict, d.hit.rule_id, d.hit.depth),
            (VERDICT_DENY, 5, 1)
        );
        // Another identity's rules do not apply.
        let other = InodeRequest {
            identity: 2,
            ..request(&[(3, 10), (3, 20)])
        };
        assert_eq!(
            decide_inode(&rules, &BTreeSet::new(), &other).verdict,
            VERDICT_ALLOW
        );
    }

    #[test]
    fn a_walk_deeper_than_the_kernels_fails_closed() {
        let deep: Vec<_> = (0..=MAX_PATH_DEPTH as u64).map(|i| (3, i + 10)).collect();
        let d = decide_inode(&BTreeMap::new(), &BTreeSet::new(), &request(&deep));
        assert_eq!((d.verdict, d.hit.rule_id), (VERDICT_DENY, RULE_ID_TOO_DEEP));
        let d = decide_inode(
            &BTreeMap::new(),
            &BTreeSet::new(),
            &request(&deep[..MAX_PATH_DEPTH as usize]),
        );
        assert_eq!(d.verdict, VERDICT_ALLOW);
    }

    #[test]
    fn uid_scoped_policies_apply_only_inside_their_range() {
        let mut cfg = IdentityConfig {
            uid_scoped: 0b10,
            ..Default::default()
        };
        cfg.uid_lo[1] = 1000;
        cfg.uid_hi[1] = 1999;
        assert_eq!(active_policies(&cfg, 1500), u32::MAX);
        assert_eq!(active_policies(&cfg, 0), !0b10);
        assert_eq!(active_policies(&cfg, 2000), !0b10);
    }

    #[test]
    fn levels_run_from_the_target_to_its_filesystem_root() {
        let l = levels(Path::new("/proc/self/status")).unwrap();
        // /proc/<pid>/status, /proc/<pid>, /proc: procfs ends at its root.
        assert_eq!(l.len(), 3, "{l:?}");
        let root = std::fs::metadata("/proc").unwrap();
        assert_eq!(l[2], (kernel_dev(root.dev()), root.ino()));
    }
}
