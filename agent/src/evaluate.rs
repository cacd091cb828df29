//! The kernel's exec, file, connect, device and socket decisions, evaluated on the
//! host: the same rule steps and combining code (`portcullis_common::decide`)
//! over the same compiled map contents, walked over the same (dev, ino)
//! levels. `portcullis test`, `explain` and `replay` decide with it;
//! `agent/tests/kernel.rs` and `tests/tests/policy_test.rs` check that it
//! and the kernel agree.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::Ipv6Addr,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use portcullis_common::{
    ACCESS_CREATE, ACCESS_EXEC, DEVICE_ANY_MINOR, DEVICE_BLOCK, DEVICE_CHAR, DEVICE_CLASS_SOCKET,
    DEVICE_RULES_PER_KEY, DeviceKey, DeviceRuleSet, HAS_DEVICES, HAS_EXEC, HAS_FILES, HAS_NET,
    HAS_SOCKETS, IDENTITY_UNRESTRICTED, IdentityConfig, InodeKey, InodeRule, InodeRuleSet,
    MAX_PATH_DEPTH, MAX_POLICIES_PER_IDENTITY, NET_KEY_DATA_LEN, NET_RULES_PER_PREFIX, NetRule,
    NetRuleSet, RULE_ID_TOO_DEEP, RULE_LOG_ALLOW,
    decide::{
        Decision, Hit, Matches, allow, apply_device_rule, apply_inode_rule, apply_net_rule,
        fail_closed,
    },
};

use crate::{
    compile::{Compiled, kernel_dev},
    events::name_hit,
    generations::Names,
};

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
    decide_inode_traced(rules, only_from, req, &mut Vec::new())
}

/// [`decide_inode`], also adding to `matched` every rule that matched the
/// request before the walk ended, in walk order.
pub fn decide_inode_traced(
    rules: &BTreeMap<InodeKey, InodeRuleSet>,
    only_from: &BTreeSet<InodeKey>,
    req: &InodeRequest,
    matched: &mut Vec<Hit>,
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
            let depth = depth as u32;
            trace(matched, req.active, r.rule_id, |m| {
                let logged = InodeRule {
                    flags: r.flags | RULE_LOG_ALLOW,
                    ..*r
                };
                apply_inode_rule(m, &logged, depth, req.requested, exe_in);
            });
            if apply_inode_rule(&mut m, r, depth, req.requested, exe_in) {
                break;
            }
        }
        // As the kernel's `walk_level`: the walk ends at the level where an
        // enforce deny was recorded, the rule scan at the rule that made it.
        if m.enforce_denied() {
            break 'walk;
        }
    }
    if req.levels.len() > MAX_PATH_DEPTH as usize && !m.enforce_denied() {
        return fail_closed(RULE_ID_TOO_DEEP);
    }
    m.finish(req.deny_enforce, req.deny_audit)
}

/// Adds the rule `apply` applies to `matched` when it matched the request:
/// applied alone (and logged, were it an allow), it is what decides.
fn trace(matched: &mut Vec<Hit>, active: u32, rule_id: u32, apply: impl FnOnce(&mut Matches)) {
    let mut alone = Matches::new(active);
    apply(&mut alone);
    let d = alone.finish(0, 0);
    if d.hit.rule_id == rule_id && d.emits() {
        matched.push(d.hit);
    }
}

/// Decides a connect (or unconnected send) by `identity` to `addr`, as the
/// kernel's `connect` programs do: one longest-prefix lookup of
/// (identity, address) in the flattened egress map, whose set already
/// holds the rules of every containing network, scanned in order.
/// IPv4 addresses are given IPv4-mapped. Rules that matched are added to
/// `matched`, as in [`decide_inode_traced`].
#[allow(clippy::too_many_arguments)]
pub fn decide_net(
    net: &BTreeMap<(u32, [u8; NET_KEY_DATA_LEN]), NetRuleSet>,
    identity: u32,
    cfg: &IdentityConfig,
    uid: u32,
    addr: Ipv6Addr,
    port: u16,
    proto: u8,
    matched: &mut Vec<Hit>,
) -> Decision {
    if cfg.flags & HAS_NET == 0 {
        return allow();
    }
    let mut key = [0u8; NET_KEY_DATA_LEN];
    key[..4].copy_from_slice(&identity.to_be_bytes());
    key[4..].copy_from_slice(&addr.octets());
    let covers = |len: u32, data: &[u8; NET_KEY_DATA_LEN]| {
        let mask = |i: usize| match len.saturating_sub(8 * i as u32) {
            0 => 0u8,
            n if n >= 8 => 0xff,
            n => 0xffu8 << (8 - n),
        };
        (0..NET_KEY_DATA_LEN).all(|i| (data[i] ^ key[i]) & mask(i) == 0)
    };
    let active = active_policies(cfg, uid);
    let mut m = Matches::new(active);
    if let Some((_, set)) = net
        .iter()
        .filter(|((len, data), _)| covers(*len, data))
        .max_by_key(|((len, _), _)| *len)
    {
        for r in set
            .rules
            .iter()
            .take((set.count as usize).min(NET_RULES_PER_PREFIX))
        {
            trace(matched, active, r.rule_id, |m| {
                let logged = NetRule {
                    flags: r.flags | RULE_LOG_ALLOW,
                    ..*r
                };
                apply_net_rule(m, &logged, port, proto);
            });
            if apply_net_rule(&mut m, r, port, proto) {
                break;
            }
        }
    }
    m.finish(cfg.net_deny_enforce, cfg.net_deny_audit)
}

/// Decides a device open or `mknod` as the kernel's `device` program does:
/// the rules of the exact (kind, major, minor), then those of (kind, major,
/// any minor). `requested`: `ACCESS_READ`, `ACCESS_WRITE`, `ACCESS_MKNOD`.
#[allow(clippy::too_many_arguments)]
pub fn decide_device(
    devices: &BTreeMap<DeviceKey, DeviceRuleSet>,
    identity: u32,
    cfg: &IdentityConfig,
    uid: u32,
    (kind, major, minor): (u32, u32, u32),
    requested: u32,
    matched: &mut Vec<Hit>,
) -> Decision {
    if cfg.flags & HAS_DEVICES == 0 {
        return allow();
    }
    let scan = RuleScan {
        devices,
        identity,
        active: active_policies(cfg, uid),
        requested,
    };
    scan.decide(
        (kind, major),
        &[minor, DEVICE_ANY_MINOR],
        (cfg.dev_deny_enforce, cfg.dev_deny_audit),
        matched,
    )
}

/// Decides a `socket()` of `kind` (`SOCKET_*`) in `family` (`AF_INET`,
/// `AF_INET6`) as the kernel's `sock_create` program does: the socket
/// class's rules for (family, kind). TCP and UDP are not asked.
pub fn decide_socket(
    rules: &BTreeMap<DeviceKey, DeviceRuleSet>,
    identity: u32,
    cfg: &IdentityConfig,
    uid: u32,
    (family, kind): (u32, u8),
    matched: &mut Vec<Hit>,
) -> Decision {
    if cfg.flags & HAS_SOCKETS == 0 {
        return allow();
    }
    let scan = RuleScan {
        devices: rules,
        identity,
        active: active_policies(cfg, uid),
        requested: ACCESS_CREATE,
    };
    scan.decide(
        (DEVICE_CLASS_SOCKET, family),
        &[u32::from(kind)],
        (cfg.sock_deny_enforce, cfg.sock_deny_audit),
        matched,
    )
}

/// The device rule map's scan (shared by device and socket rules, as in
/// the kernel's `RuleScan`).
struct RuleScan<'a> {
    devices: &'a BTreeMap<DeviceKey, DeviceRuleSet>,
    identity: u32,
    active: u32,
    requested: u32,
}

impl RuleScan<'_> {
    fn decide(
        &self,
        (kind, major): (u32, u32),
        minors: &[u32],
        (deny_enforce, deny_audit): (u32, u32),
        matched: &mut Vec<Hit>,
    ) -> Decision {
        let (devices, identity, active, requested) =
            (self.devices, self.identity, self.active, self.requested);
        let mut m = Matches::new(active);
        for &minor in minors {
            let key = DeviceKey {
                identity,
                kind,
                major,
                minor,
            };
            let Some(set) = devices.get(&key) else {
                continue;
            };
            for r in set
                .rules
                .iter()
                .take((set.count as usize).min(DEVICE_RULES_PER_KEY))
            {
                trace(matched, active, r.rule_id, |m| {
                    let logged = portcullis_common::DeviceRule {
                        flags: r.flags | RULE_LOG_ALLOW as u8,
                        ..*r
                    };
                    apply_device_rule(m, &logged, requested);
                });
                if apply_device_rule(&mut m, r, requested) {
                    break;
                }
            }
        }
        m.finish(deny_enforce, deny_audit)
    }
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

/// `c 195:0` → (`DEVICE_CHAR`, 195, 0); `b 8:0` a block device; no letter
/// is a char device. How policy tests and decision logs name a device.
pub fn parse_device(s: &str) -> Option<(u32, u32, u32)> {
    let (kind, num) = match s.split_once(' ') {
        Some(("c", n)) => (DEVICE_CHAR, n),
        Some(("b", n)) => (DEVICE_BLOCK, n),
        Some(_) => return None,
        None => (DEVICE_CHAR, s),
    };
    let (major, minor) = num.split_once(':')?;
    Some((kind, major.parse().ok()?, minor.parse().ok()?))
}

/// The (dev, ino) levels of a path, from the target up: what the walk sees.
pub type Levels = Vec<(u32, u64)>;

/// What a workload does. `P` is how a path is given: as the walk's
/// [`Levels`] (what [`evaluate`] takes), or as text where requests are read
/// (policy tests, decision-log lines).
#[derive(Debug, Clone)]
pub enum Action<P = Levels> {
    Exec {
        path: P,
    },
    /// `access`: `ACCESS_READ` and/or `ACCESS_WRITE`.
    Open {
        path: P,
        access: u32,
    },
    /// `proto`: 6 tcp, 17 udp; `addr` IPv4-mapped for IPv4.
    Connect {
        addr: Ipv6Addr,
        port: u16,
        proto: u8,
    },
    /// `kind`: `DEVICE_CHAR` or `DEVICE_BLOCK`; `access`: `ACCESS_READ`,
    /// `ACCESS_WRITE` and/or `ACCESS_MKNOD`.
    Device {
        kind: u32,
        major: u32,
        minor: u32,
        access: u32,
    },
    /// A `socket()` of `kind` (`SOCKET_*`) in `family` (`AF_INET`/`AF_INET6`).
    Socket {
        family: u32,
        kind: u8,
    },
}

impl<P> Action<P> {
    /// The same action with its path turned into a `Q` by `f`.
    pub fn try_map_path<Q, E>(&self, f: impl FnOnce(&P) -> Result<Q, E>) -> Result<Action<Q>, E> {
        Ok(match self {
            Action::Exec { path } => Action::Exec { path: f(path)? },
            Action::Open { path, access } => Action::Open {
                path: f(path)?,
                access: *access,
            },
            &Action::Connect { addr, port, proto } => Action::Connect { addr, port, proto },
            &Action::Device {
                kind,
                major,
                minor,
                access,
            } => Action::Device {
                kind,
                major,
                minor,
                access,
            },
            &Action::Socket { family, kind } => Action::Socket { family, kind },
        })
    }

    pub fn path(&self) -> Option<&P> {
        match self {
            Action::Exec { path } | Action::Open { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// The decision on one request, named as the decision log names it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `IDENTITY_UNRESTRICTED` when no policy selects the cgroup.
    pub identity: u32,
    pub decision: Decision,
    /// Empty for an allow no policy made.
    pub policy: String,
    pub rule: String,
    /// `(policy, rule)` of every rule that matched, deciding or not, in the
    /// order the kernel met them.
    pub matched: Vec<(String, String)>,
}

/// Decides `action` by a task of cgroup `cgroup_id` running as `uid` from
/// the executable `exe` (dev, ino), against the compiled map contents of
/// `c`: the kernel's lookups (cgroup → identity → config) followed by the
/// hook's decision.
pub fn evaluate(
    c: &Compiled,
    cgroup_id: u64,
    uid: u32,
    exe: (u32, u64),
    action: &Action,
) -> Outcome {
    let identity = c
        .cgroups
        .get(&cgroup_id)
        .copied()
        .unwrap_or(IDENTITY_UNRESTRICTED);
    let cfg = c.identity_cfg.get(&identity).copied().unwrap_or_default();
    let active = active_policies(&cfg, uid);
    let mut hits = Vec::new();
    let mut inode = |rules, requested, deny_enforce, deny_audit, levels: &[(u32, u64)]| {
        decide_inode_traced(
            rules,
            &c.only_from,
            &InodeRequest {
                identity,
                requested,
                exe,
                active,
                deny_enforce,
                deny_audit,
                levels,
            },
            &mut hits,
        )
    };
    let decision = match action {
        _ if identity == IDENTITY_UNRESTRICTED => allow(),
        Action::Exec { path: levels } if cfg.flags & HAS_EXEC != 0 => inode(
            &c.exec,
            ACCESS_EXEC,
            cfg.exec_deny_enforce,
            cfg.exec_deny_audit,
            levels,
        ),
        Action::Open {
            path: levels,
            access,
        } if cfg.flags & HAS_FILES != 0 => inode(&c.files, *access, 0, 0, levels),
        Action::Connect { addr, port, proto } => {
            decide_net(&c.net, identity, &cfg, uid, *addr, *port, *proto, &mut hits)
        }
        &Action::Device {
            kind,
            major,
            minor,
            access,
        } => decide_device(
            &c.devices,
            identity,
            &cfg,
            uid,
            (kind, major, minor),
            access,
            &mut hits,
        ),
        &Action::Socket { family, kind } => {
            decide_socket(&c.devices, identity, &cfg, uid, (family, kind), &mut hits)
        }
        _ => allow(),
    };
    let names = Names::of(c);
    let name = |h: &Hit| {
        name_hit(
            Some(&names),
            identity,
            h.policy_bit,
            h.rule_id,
            c.generation,
        )
    };
    let (policy, rule) = name(&decision.hit);
    let matched = hits.iter().map(name).collect();
    Outcome {
        identity,
        decision,
        // An allow nothing made belongs to no policy.
        policy: if decision.hit.rule_id == portcullis_common::RULE_ID_DEFAULT
            && decision.verdict == portcullis_common::VERDICT_ALLOW
        {
            String::new()
        } else {
            policy
        },
        rule,
        matched,
    }
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
