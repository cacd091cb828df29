//! Compiling validated policies into the contents of the kernel maps.
//!
//! Three ideas carry the design:
//!
//! - **Identities.** Every cgroup is classified by the set of policies whose
//!   selector matches it; each distinct set is one numeric identity (as
//!   Cilium's security identities). Rules are keyed by identity, so the
//!   kernel does one lookup per decision however many cgroups share a set.
//! - **Inodes, not path strings.** Exec and file rules are compiled to
//!   `(dev, ino)` of the files (and, for `dir/**`, of the directory, matched
//!   by the kernel walking `d_parent`). A symlink, a relative path, `..`,
//!   `/proc/self/root/...` or a bind mount all reach the same inode, so none
//!   of them escapes a rule.
//! - **Per-policy defaults as bit masks.** Each policy selecting an identity
//!   gets a bit; a `default: deny` policy denies unless one of *its own* allow
//!   rules matched. So an allow in one policy never widens another policy's
//!   default-deny (see `precedence` in the README).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use portcullis_common::{
    ACCESS_EXEC, ACCESS_READ, ACCESS_WRITE, DEVICE_RULES_PER_KEY, DeviceKey, DeviceRule,
    DeviceRuleSet, HAS_EXEC, HAS_FILES, HAS_NET, IDENTITY_UNRESTRICTED, INODE_RULES_PER_KEY,
    IdentityConfig, InodeKey, InodeRule, InodeRuleSet, MAX_POLICIES_PER_IDENTITY, MODE_AUDIT,
    MODE_ENFORCE, NET_KEY_DATA_LEN, NET_RULES_PER_PREFIX, NetRule as KNetRule, NetRuleSet,
    RULE_ID_DEFAULT, RULE_LOG_ALLOW, RULE_SUBTREE, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    node_devices::{DevNum, NodeDevices},
    pod::{Lookup, PodMetadata},
    policy::{DefaultAction, FileAccess, Mode, NetRule, PathRule, Policy, glob::glob_match},
};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "{count} policies select cgroup {cgroup} (at most {MAX_POLICIES_PER_IDENTITY}): {policies}"
    )]
    TooManyPolicies {
        cgroup: String,
        count: usize,
        policies: String,
    },
    #[error(
        "more than {INODE_RULES_PER_KEY} rules name {path} for the workloads of {policies}; merge them"
    )]
    TooManyInodeRules { path: String, policies: String },
    #[error(
        "more than {NET_RULES_PER_PREFIX} port rules apply to {cidr} for the workloads of {policies}; merge them"
    )]
    TooManyNetRules { cidr: String, policies: String },
    #[error(
        "more than {DEVICE_RULES_PER_KEY} rules name device {device} for the workloads of {policies}; merge them"
    )]
    TooManyDeviceRules { device: String, policies: String },
    #[error(
        "more than {DEVICE_RULES_PER_KEY} policies of the workloads of {policies} name socket kind {kind}; merge them"
    )]
    TooManySocketRules {
        kind: &'static str,
        policies: String,
    },
    #[error("too many identities")]
    IdentitySpace,
    #[error("the policies changed since the generation in force was compiled")]
    Stale,
}

/// A cgroup as the identity scan saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupInfo {
    pub id: u64,
    /// Path relative to the v2 root, starting with `/`.
    pub path: String,
    /// Pod metadata, when the cgroup belongs to a pod (see [`crate::pod`]).
    pub pod: Lookup,
}

impl CgroupInfo {
    /// A cgroup with no pod metadata (not a pod, or not looked up).
    pub fn new(id: u64, path: impl Into<String>) -> Self {
        Self {
            id,
            path: path.into(),
            pod: Lookup::NotPod,
        }
    }
}

/// What the decision log needs to name a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub policy: String,
    /// e.g. `network.egress.deny[0] 169.254.169.254/32`.
    pub rule: String,
}

/// Everything the kernel maps hold for one policy generation, plus the
/// tables that turn kernel ids back into names for the decision log.
///
/// The per-rule tables sit behind `Arc`s: classifying a new cgroup clones a
/// `Compiled` to publish the next version, and at 100 000 rules a deep copy
/// took ~0.1 s per cgroup (and memory). Only the per-cgroup tables are
/// copied; [`add_identity`] copies a rule table only when it writes to it.
#[derive(Debug, Default, Clone)]
pub struct Compiled {
    /// Every known cgroup → identity (unrestricted ones included, so the
    /// kernel's ancestor walk stops at the nearest known cgroup).
    pub cgroups: BTreeMap<u64, u32>,
    pub cgroup_paths: BTreeMap<u64, String>,
    /// Pod metadata of the cgroups that belong to a known pod (for the
    /// decision log).
    pub cgroup_pods: BTreeMap<u64, Arc<PodMetadata>>,
    pub identity_cfg: BTreeMap<u32, IdentityConfig>,
    /// Identity → indexes into `policies` (bit `i` is `policies[i]`).
    pub identity_policies: BTreeMap<u32, Vec<usize>>,
    /// Identity of each [`IdentityKey`] seen.
    pub identity_of: BTreeMap<IdentityKey, u32>,
    /// LPM key (prefix length over identity + address, data) → rules.
    pub net: Arc<BTreeMap<(u32, [u8; NET_KEY_DATA_LEN]), NetRuleSet>>,
    pub exec: Arc<BTreeMap<InodeKey, InodeRuleSet>>,
    pub files: Arc<BTreeMap<InodeKey, InodeRuleSet>>,
    pub only_from: Arc<BTreeSet<InodeKey>>,
    pub devices: Arc<BTreeMap<DeviceKey, DeviceRuleSet>>,
    /// The node's device classes the device rules were resolved with (also
    /// what names a device in the decision log).
    pub node: Arc<NodeDevices>,
    /// `rules[rule_id]`; index 0 is `RULE_ID_DEFAULT`.
    pub rules: Arc<Vec<RuleInfo>>,
    /// Policy names, by index.
    pub policies: Vec<String>,
    /// `(dev, ino)` → a path that named it in a policy (for the log).
    pub inode_paths: Arc<BTreeMap<(u32, u64), PathBuf>>,
    /// Each policy's rules as resolved by the full compile: a policy set
    /// first seen later is compiled from these, so every identity of a
    /// generation sees the same files and rule ids (re-resolving would stat
    /// every path again and register every rule a second time).
    pub(crate) per_policy: Arc<Vec<PolicyRules>>,
    /// Non-fatal findings, e.g. a glob that matched no file.
    pub warnings: Vec<String>,
    /// See [`Numbering::only_from_base`].
    pub only_from_base: u32,
    /// See [`Numbering::generation`].
    pub generation: u32,
    /// The Unix second time-bound approvals were judged at: one lapsing at
    /// or before it is absent. The daemon's lapse timer counts from here,
    /// not from its own "now", so a lapse it woke up late for is not lost.
    pub judged_at: i64,
}

impl Compiled {
    /// Number of entries per kernel map, for metrics and logs.
    pub fn rule_counts(&self) -> [(&'static str, usize); 6] {
        [
            ("identities", self.cgroups.len()),
            ("net_rules", self.net.len()),
            ("exec_rules", self.exec.len()),
            ("file_rules", self.files.len()),
            ("only_from", self.only_from.len()),
            ("device_rules", self.devices.len()),
        ]
    }
}

/// Kernel `dev_t` encoding (`MKDEV`: major << 20 | minor), which is what
/// `inode->i_sb->s_dev` holds; `stat`'s `st_dev` uses glibc's encoding.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let (major, minor) = (nix::sys::stat::major(st_dev), nix::sys::stat::minor(st_dev));
    ((major as u32) << 20) | (minor as u32 & 0xfffff)
}

/// A file or directory a path glob resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPath {
    pub path: PathBuf,
    pub dev: u32,
    pub ino: u64,
    /// The rule covers everything below this directory (`dir/**`).
    pub subtree: bool,
}

/// Resolves an absolute path glob against the live filesystem, following
/// symlinks (so `/usr/bin/python3` → the inode of `python3.11`). `**` may
/// only be the last segment (validation guarantees it).
pub fn resolve_glob(pattern: &str) -> Vec<ResolvedPath> {
    resolve_glob_under(Path::new("/"), pattern)
}

/// [`resolve_glob`] with `root` standing for `/` (a policy test's
/// fixture); the paths returned are as the policy names them, without
/// `root`.
pub fn resolve_glob_under(root: &Path, pattern: &str) -> Vec<ResolvedPath> {
    let segments: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    let (segments, subtree) = match segments.split_last() {
        Some((&"**", rest)) => (rest.to_vec(), true),
        _ => (segments, false),
    };
    let mut current = vec![root.to_path_buf()];
    for seg in segments {
        let mut next = Vec::new();
        for dir in &current {
            if !seg.contains(['*', '?', '[']) {
                let p = dir.join(seg);
                if p.symlink_metadata().is_ok() {
                    next.push(p);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<_> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| glob_match(&format!("/{seg}"), &format!("/{name}")))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| dir.join(n)));
        }
        current = next;
    }
    current
        .into_iter()
        .filter_map(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            Some(ResolvedPath {
                dev: kernel_dev(meta.dev()),
                ino: meta.ino(),
                subtree,
                path: Path::new("/").join(path.strip_prefix(root).unwrap_or(&path)),
            })
        })
        .collect()
}

/// Which policies select a cgroup by its path alone (indexes into
/// `policies`); policies with pod fields select nothing here.
pub fn select(policies: &[Policy], cgroup_path: &str) -> Vec<usize> {
    select_pod(policies, cgroup_path, None)
}

/// What makes cgroups share an identity: the policies that select them
/// and, when one of those allows `allocated` devices, the devices the
/// kubelet allocated to the container (so each such container has rules of
/// its own, and a neighbour from the same image and pod spec does not
/// share them).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdentityKey {
    /// Sorted indexes into the policies.
    pub policies: Vec<usize>,
    /// `(device, ACCESS_* the kubelet granted)`, sorted; empty unless a
    /// policy of the set has an `allocated` rule.
    pub allocated: Vec<(DevNum, u32)>,
}

impl IdentityKey {
    /// The key of `cg`, selected by `set` (from [`select_cgroup`]) among
    /// the policies `c` was compiled from. Allocated device nodes are read
    /// under `root` (`/` but in policy tests).
    pub fn of(c: &Compiled, cg: &CgroupInfo, set: Vec<usize>, root: &Path) -> Self {
        let wants_allocated = set
            .iter()
            .any(|&i| c.per_policy.get(i).is_some_and(|p| !p.allocated.is_empty()));
        let allocated = match cg.pod.metadata() {
            Some(meta) if wants_allocated => meta
                .container
                .as_ref()
                .map(|ct| devices::allocated(&ct.allocated, root))
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Self {
            policies: set,
            allocated,
        }
    }
}

/// Which policies select `cg`, pod metadata included.
pub fn select_cgroup(policies: &[Policy], cg: &CgroupInfo) -> Vec<usize> {
    match &cg.pod {
        Lookup::Known(meta) => select_pod(policies, &cg.path, Some(meta)),
        // Labels and container unknown: only policies that do not ask for
        // them can match.
        Lookup::Partial(meta) => select_pod(policies, &cg.path, Some(meta))
            .into_iter()
            .filter(|&i| {
                policies[i].selector.pod_labels.is_none()
                    && policies[i].selector.container.is_none()
            })
            .collect(),
        _ => select_pod(policies, &cg.path, None),
    }
}

/// Every given selector field must match; a pod field needs known metadata
/// (a cgroup without it is not selected, and meanwhile keeps its nearest
/// classified ancestor's identity in the kernel).
pub fn select_pod(policies: &[Policy], cgroup_path: &str, pod: Option<&PodMetadata>) -> Vec<usize> {
    let name_ok = |g: &Option<String>, v: Option<&str>| {
        g.as_deref()
            .is_none_or(|g| v.is_some_and(|v| glob_match(&format!("/{g}"), &format!("/{v}"))))
    };
    policies
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            let s = &p.selector;
            let path_ok = s
                .cgroup_path
                .as_deref()
                .is_none_or(|g| glob_match(g, cgroup_path));
            let unit_ok = s.systemd_unit.as_deref().is_none_or(|g| {
                crate::cgroup::systemd_unit(cgroup_path)
                    .is_some_and(|unit| glob_match(&format!("/{g}"), &format!("/{unit}")))
            });
            let pod_ok = !s.needs_pod()
                || pod.is_some_and(|m| {
                    name_ok(&s.namespace, Some(&m.namespace))
                        && name_ok(&s.service_account, m.service_account.as_deref())
                        && name_ok(&s.container, m.container.as_ref().map(|c| c.name.as_str()))
                        && s.pod_labels.as_ref().is_none_or(|l| l.matches(&m.labels))
                });
            path_ok
                && unit_ok
                && pod_ok
                // A uid alone selects every cgroup; the kernel then narrows
                // the policy to that user's tasks per syscall.
                && (s.cgroup_path.is_some()
                    || s.systemd_unit.is_some()
                    || s.needs_pod()
                    || s.uid.is_some())
        })
        .map(|(i, _)| i)
        .collect()
}

/// A policy's rules with globs resolved and CIDRs split per port range,
/// independent of any identity (so each is resolved once per compile).
#[derive(Debug)]
pub(crate) struct PolicyRules {
    mode: u8,
    exec: Vec<(
        ResolvedPath,
        u32, /* allow mask */
        u32, /* rule id */
    )>,
    files: Vec<(ResolvedPath, u32, Vec<ResolvedPath>, u32)>,
    net: Vec<(Ipv6Addr, u8, KNetRule)>,
    /// Resolved device numbers and their rule (policy bit unset).
    devices: Vec<(DevNum, DeviceRule)>,
    /// `allocated` rules (policy bit unset): expanded per container, over
    /// its [`IdentityKey::allocated`].
    allocated: Vec<DeviceRule>,
    /// Socket rules (policy bit unset).
    sockets: Vec<(crate::policy::SocketKind, DeviceRule)>,
    cfg: IdentityConfig,
}

struct Builder<'a> {
    out: Compiled,
    policies: &'a [Policy],
    node: &'a NodeDevices,
    /// What policy paths are resolved under: `/`, or a policy test's fixture.
    root: &'a Path,
}

impl Builder<'_> {
    fn rule(&mut self, policy: &Policy, rule: String) -> u32 {
        let rules = Arc::make_mut(&mut self.out.rules);
        rules.push(RuleInfo {
            policy: policy.name.clone(),
            rule,
        });
        (rules.len() - 1) as u32
    }

    fn resolve(&mut self, policy: &Policy, rule: &PathRule) -> Vec<ResolvedPath> {
        let found = resolve_glob_under(self.root, &rule.pattern);
        if found.is_empty() {
            self.out.warnings.push(format!(
                "{}:{}: policy {}: path {} matches no file now; it is re-resolved on every reload",
                policy.source.display(),
                rule.line,
                policy.name,
                rule.pattern
            ));
        }
        let inode_paths = Arc::make_mut(&mut self.out.inode_paths);
        for r in &found {
            inode_paths
                .entry((r.dev, r.ino))
                .or_insert_with(|| r.path.clone());
        }
        found
    }

    fn policy_rules(&mut self, policy: &Policy) -> PolicyRules {
        let mode = match policy.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        };
        let mut pr = PolicyRules {
            mode,
            exec: vec![],
            files: vec![],
            devices: vec![],
            allocated: vec![],
            sockets: vec![],
            net: vec![],
            cfg: IdentityConfig::default(),
        };
        // Time-bound approvals that have lapsed are compiled as absent (the
        // daemon recompiles when the next one lapses). Rule numbers keep
        // their place in the file, so the log names the rule as written.
        let now = self.out.judged_at;
        if let Some(exec) = &policy.exec {
            pr.cfg.flags |= HAS_EXEC;
            pr.cfg.exec_deny_enforce = (exec.default == DefaultAction::Deny) as u32;
            for (list, mask, name) in [(&exec.allow, ACCESS_EXEC, "allow"), (&exec.deny, 0, "deny")]
            {
                for (i, r) in list.iter().enumerate() {
                    if crate::policy::expired(r.until, now) {
                        continue;
                    }
                    let id = self.rule(policy, format!("exec.{name}[{i}] {}", r.pattern));
                    for resolved in self.resolve(policy, r) {
                        pr.exec.push((resolved, mask, id));
                    }
                }
            }
        }
        if let Some(egress) = &policy.egress {
            pr.cfg.flags |= HAS_NET;
            pr.cfg.net_deny_enforce = (egress.default == DefaultAction::Deny) as u32;
            for (list, verdict, name) in [
                (&egress.allow, VERDICT_ALLOW, "allow"),
                (&egress.deny, VERDICT_DENY, "deny"),
            ] {
                for (i, r) in list.iter().enumerate() {
                    if crate::policy::expired(r.until, now) {
                        continue;
                    }
                    let id = self.rule(policy, format!("network.egress.{name}[{i}] {}", r.text));
                    pr.net.extend(net_entries(r, verdict, mode, id));
                }
            }
        }
        pr.cfg.ring_deny_enforce = u32::from(!policy.files.is_empty());
        for (i, f) in policy.files.iter().enumerate() {
            pr.cfg.flags |= HAS_FILES;
            let id = self.rule(policy, format!("files[{i}] {}", f.path.pattern));
            let mut mask = match f.access {
                FileAccess::None => 0,
                FileAccess::Read => ACCESS_READ,
                FileAccess::ReadWrite => ACCESS_READ | ACCESS_WRITE,
            };
            let only: Vec<ResolvedPath> = f
                .only_from
                .iter()
                .flat_map(|b| self.resolve(policy, b))
                .collect();
            if !f.only_from.is_empty() && only.is_empty() {
                self.out.warnings.push(format!(
                    "policy {}: files[{i}] onlyFrom matches no executable: nobody gets access",
                    policy.name
                ));
                // No set to check against: say "none" outright, or the rule
                // would read as "any executable" and grant `access` to all.
                mask = 0;
            }
            for resolved in self.resolve(policy, &f.path) {
                pr.files.push((resolved, mask, only.clone(), id));
            }
        }
        self.device_rules(policy, &mut pr);
        self.socket_rules(policy, &mut pr);
        if policy.mode == Mode::Audit {
            pr.cfg.exec_deny_audit = pr.cfg.exec_deny_enforce;
            pr.cfg.net_deny_audit = pr.cfg.net_deny_enforce;
            pr.cfg.dev_deny_audit = pr.cfg.dev_deny_enforce;
            pr.cfg.sock_deny_audit = pr.cfg.sock_deny_enforce;
            pr.cfg.ring_deny_audit = pr.cfg.ring_deny_enforce;
            pr.cfg.sock_deny_enforce = 0;
            pr.cfg.ring_deny_enforce = 0;
            pr.cfg.exec_deny_enforce = 0;
            pr.cfg.net_deny_enforce = 0;
            pr.cfg.dev_deny_enforce = 0;
        }
        pr
    }
}

fn net_entries(r: &NetRule, verdict: u8, mode: u8, rule_id: u32) -> Vec<(Ipv6Addr, u8, KNetRule)> {
    let ports: Vec<(u16, u16)> = if r.ports.is_empty() {
        vec![(0, u16::MAX)]
    } else {
        r.ports.clone()
    };
    ports
        .into_iter()
        .map(|(lo, hi)| {
            let rule = KNetRule {
                port_lo: lo,
                port_hi: hi,
                proto: r.protocol.unwrap_or(0),
                verdict,
                mode,
                policy_bit: 0,
                rule_id,
                flags: if r.log { RULE_LOG_ALLOW } else { 0 },
            };
            (r.addr, r.prefix_len, rule)
        })
        .collect()
}

fn prefix_mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

/// `addr` with the bits past `len` cleared: the network of `addr`/`len`
/// (the form every key of the flattening map has; the parser rejects host
/// bits).
fn network(addr: Ipv6Addr, len: u8) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(addr) & prefix_mask(len))
}

fn cidr_text(addr: Ipv6Addr, len: u8) -> String {
    match addr.to_ipv4_mapped() {
        Some(v4) if len >= 96 => format!("{v4}/{}", len - 96),
        _ => format!("{addr}/{len}"),
    }
}

/// Numbering of one policy generation. Two generations are in the kernel at
/// once during a swap (see `maps.rs`), so their numbers must not overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbering {
    /// This compile's generation number, written into every identity it
    /// makes (see `IdentityConfig::generation`); never reused by a later
    /// compile or agent instance.
    pub generation: u32,
    /// First identity number to hand out.
    pub first_identity: u32,
    /// Added to a rule id to make its onlyFrom set id.
    pub only_from_base: u32,
}

impl Numbering {
    /// For a compile that is never written to the kernel (`portcullis
    /// test`, `explain`, `replay`): nothing else is numbered beside it.
    pub const OFFLINE: Numbering = Numbering {
        generation: 1,
        first_identity: 1,
        only_from_base: 1 << 20,
    };
}

/// Compiles `policies` for the cgroups in `cgroups`, on a node without
/// device drivers (see [`compile_on`]).
pub fn compile(
    policies: &[Policy],
    cgroups: &[CgroupInfo],
    numbering: Numbering,
) -> Result<Compiled, CompileError> {
    compile_on(policies, cgroups, numbering, Arc::default())
}

/// Compiles `policies` for the cgroups in `cgroups`, with device kinds
/// resolved against `node`.
pub fn compile_on(
    policies: &[Policy],
    cgroups: &[CgroupInfo],
    numbering: Numbering,
    node: Arc<NodeDevices>,
) -> Result<Compiled, CompileError> {
    compile_under(policies, cgroups, numbering, node, Path::new("/"))
}

/// [`compile_on`] with policy paths resolved under `root` instead of `/`.
pub fn compile_under(
    policies: &[Policy],
    cgroups: &[CgroupInfo],
    numbering: Numbering,
    node: Arc<NodeDevices>,
    root: &Path,
) -> Result<Compiled, CompileError> {
    let first_identity = numbering.first_identity;
    let mut b = Builder {
        out: Compiled {
            node: Arc::clone(&node),
            ..Compiled::default()
        },
        policies,
        node: &node,
        root,
    };
    b.out.only_from_base = numbering.only_from_base;
    b.out.generation = numbering.generation;
    b.out.judged_at = crate::policy::unix_now();
    b.out.rules = Arc::new(vec![RuleInfo {
        policy: String::new(),
        rule: "default".into(),
    }]);
    debug_assert_eq!(b.out.rules.len() - 1, RULE_ID_DEFAULT as usize);
    b.out.policies = policies.iter().map(|p| p.name.clone()).collect();
    let per_policy: Vec<PolicyRules> = policies.iter().map(|p| b.policy_rules(p)).collect();
    let per_policy = Arc::new(per_policy);
    b.out.per_policy = Arc::clone(&per_policy);

    let mut next = first_identity.max(1);
    for cg in cgroups {
        b.out.cgroup_paths.insert(cg.id, cg.path.clone());
        if let Some(meta) = cg.pod.metadata() {
            b.out.cgroup_pods.insert(cg.id, meta);
        }
        if cg.pod == Lookup::Pending {
            // No map entry: the kernel's ancestor walk gives it the nearest
            // classified ancestor's identity until its metadata is known.
            continue;
        }
        let set = select_cgroup(b.policies, cg);
        if set.is_empty() {
            b.out.cgroups.insert(cg.id, IDENTITY_UNRESTRICTED);
            continue;
        }
        if set.len() > MAX_POLICIES_PER_IDENTITY as usize {
            return Err(CompileError::TooManyPolicies {
                cgroup: cg.path.clone(),
                count: set.len(),
                policies: names(policies, &set),
            });
        }
        let key = IdentityKey::of(&b.out, cg, set, root);
        let identity = match b.out.identity_of.get(&key) {
            Some(&id) => id,
            None => {
                let id = next;
                next = next.checked_add(1).ok_or(CompileError::IdentitySpace)?;
                emit_identity(&mut b.out, policies, &per_policy, &key, id)?;
                b.out.identity_of.insert(key, id);
                id
            }
        };
        b.out.cgroups.insert(cg.id, identity);
    }
    Ok(b.out)
}

/// Compiles one more identity (a policy set first seen on a cgroup created
/// after the last full compile) into `out`, from the rules that compile
/// resolved. `policies` must be the ones `out` was compiled from.
pub fn add_identity(
    out: &mut Compiled,
    policies: &[Policy],
    key: &IdentityKey,
    identity: u32,
) -> Result<(), CompileError> {
    let per_policy = Arc::clone(&out.per_policy);
    if per_policy.len() != policies.len() {
        return Err(CompileError::Stale);
    }
    emit_identity(out, policies, &per_policy, key, identity)?;
    out.identity_of.insert(key.clone(), identity);
    Ok(())
}

/// The rules `new` adds to and removes from `old`, as `policy: rule` text
/// without the rule's position (`exec.allow /usr/bin/gdb`): a rule inserted
/// at the top of a list shows as one added rule, not as every rule below it
/// renumbered. A changed CIDR or path shows as one removed and one added.
pub fn rule_changes(old: &Compiled, new: &Compiled) -> (Vec<String>, Vec<String>) {
    let set = |c: &Compiled| -> BTreeSet<String> {
        c.rules
            .iter()
            .skip(1)
            .map(|r| format!("{}: {}", r.policy, unnumbered(&r.rule)))
            .collect()
    };
    let (before, after) = (set(old), set(new));
    (
        after.difference(&before).cloned().collect(),
        before.difference(&after).cloned().collect(),
    )
}

/// `network.egress.allow[3] 10.0.0.0/8` → `network.egress.allow 10.0.0.0/8`.
pub fn unnumbered(rule: &str) -> String {
    match rule.split_once(' ') {
        Some((place, what)) => {
            let place = place.split_once('[').map_or(place, |(p, _)| p);
            format!("{place} {what}")
        }
        None => rule.to_owned(),
    }
}

fn names(policies: &[Policy], set: &[usize]) -> String {
    set.iter()
        .map(|&i| policies[i].name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn emit_identity(
    out: &mut Compiled,
    policies: &[Policy],
    per_policy: &[PolicyRules],
    key: &IdentityKey,
    identity: u32,
) -> Result<(), CompileError> {
    let set = &key.policies[..];
    let mut cfg = IdentityConfig {
        generation: out.generation,
        ..IdentityConfig::default()
    };
    let mut net: BTreeMap<(u8, Ipv6Addr), Vec<KNetRule>> = BTreeMap::new();
    for (bit, &pi) in set.iter().enumerate() {
        let pr = &per_policy[pi];
        let shift = |m: u32| m << bit;
        cfg.exec_deny_enforce |= shift(pr.cfg.exec_deny_enforce);
        cfg.exec_deny_audit |= shift(pr.cfg.exec_deny_audit);
        cfg.net_deny_enforce |= shift(pr.cfg.net_deny_enforce);
        cfg.net_deny_audit |= shift(pr.cfg.net_deny_audit);
        cfg.dev_deny_enforce |= shift(pr.cfg.dev_deny_enforce);
        cfg.dev_deny_audit |= shift(pr.cfg.dev_deny_audit);
        cfg.sock_deny_enforce |= shift(pr.cfg.sock_deny_enforce);
        cfg.sock_deny_audit |= shift(pr.cfg.sock_deny_audit);
        cfg.ring_deny_enforce |= shift(pr.cfg.ring_deny_enforce);
        cfg.ring_deny_audit |= shift(pr.cfg.ring_deny_audit);
        cfg.flags |= pr.cfg.flags;
        if let Some((lo, hi)) = policies[pi].selector.uid {
            cfg.uid_scoped |= 1 << bit;
            cfg.uid_lo[bit] = lo;
            cfg.uid_hi[bit] = hi;
        }
        let rule = |allow_mask, only_from, subtree: bool, rule_id| InodeRule {
            allow_mask,
            only_from,
            flags: if subtree { RULE_SUBTREE } else { 0 },
            rule_id,
            mode: pr.mode,
            policy_bit: bit as u8,
            _pad: [0; 2],
        };
        for (r, mask, id) in &pr.exec {
            let key = InodeKey {
                identity,
                dev: r.dev,
                ino: r.ino,
            };
            push_inode(
                Arc::make_mut(&mut out.exec),
                key,
                rule(*mask, 0, r.subtree, *id),
                &r.path,
                policies,
                set,
            )?;
        }
        for (r, mask, only, id) in &pr.files {
            let only_from = if only.is_empty() {
                0
            } else {
                // One set per rule: the rule id, made unique per generation.
                let set_id = out.only_from_base + id;
                for b in only {
                    Arc::make_mut(&mut out.only_from).insert(InodeKey {
                        identity: set_id,
                        dev: b.dev,
                        ino: b.ino,
                    });
                }
                set_id
            };
            let key = InodeKey {
                identity,
                dev: r.dev,
                ino: r.ino,
            };
            push_inode(
                Arc::make_mut(&mut out.files),
                key,
                rule(*mask, only_from, r.subtree, *id),
                &r.path,
                policies,
                set,
            )?;
        }
        devices::emit(out, pr, bit, identity, policies, key)?;
        sockets::emit(out, pr, bit, identity, policies, set)?;
        for (addr, len, r) in &pr.net {
            net.entry((*len, network(*addr, *len)))
                .or_default()
                .push(KNetRule {
                    policy_bit: bit as u8,
                    ..*r
                });
        }
    }
    // Flatten: every prefix also carries the rules of the shorter prefixes
    // that contain it, so the kernel's single longest-prefix match sees all.
    // The containing prefixes are found by masking the address to each
    // shorter length and looking that up: at most 129 lookups per prefix,
    // instead of comparing every pair (quadratic: minutes at 65 000 CIDRs).
    for &(len, addr) in net.keys() {
        let mut all: Vec<KNetRule> = (0..=len)
            .filter_map(|l| net.get(&(l, network(addr, l))))
            .flat_map(|r| r.iter().copied())
            .collect();
        // Denies first: the kernel stops at the first enforce deny.
        all.sort_by_key(|r| (r.verdict != VERDICT_DENY, r.mode != MODE_ENFORCE));
        if all.len() > NET_RULES_PER_PREFIX {
            return Err(CompileError::TooManyNetRules {
                cidr: cidr_text(addr, len),
                policies: names(policies, set),
            });
        }
        let mut value = NetRuleSet {
            count: all.len() as u32,
            ..Default::default()
        };
        value.rules[..all.len()].copy_from_slice(&all);
        Arc::make_mut(&mut out.net).insert(net_key(identity, addr, len), value);
    }
    out.identity_cfg.insert(identity, cfg);
    out.identity_policies.insert(identity, set.to_vec());
    Ok(())
}

fn push_inode(
    map: &mut BTreeMap<InodeKey, InodeRuleSet>,
    key: InodeKey,
    rule: InodeRule,
    path: &Path,
    policies: &[Policy],
    set: &[usize],
) -> Result<(), CompileError> {
    let entry = map.entry(key).or_default();
    if entry.rules[..entry.count as usize].contains(&rule) {
        return Ok(());
    }
    if entry.count as usize == INODE_RULES_PER_KEY {
        return Err(CompileError::TooManyInodeRules {
            path: path.display().to_string(),
            policies: names(policies, set),
        });
    }
    entry.rules[entry.count as usize] = rule;
    entry.count += 1;
    Ok(())
}

/// The LPM trie key for `addr/len` (over 128 bits) of `identity`.
pub fn net_key(identity: u32, addr: Ipv6Addr, len: u8) -> (u32, [u8; NET_KEY_DATA_LEN]) {
    let mut data = [0u8; NET_KEY_DATA_LEN];
    data[..4].copy_from_slice(&identity.to_be_bytes());
    data[4..].copy_from_slice(&addr.octets());
    (32 + u32::from(len), data)
}

mod devices;
pub mod sockets;
#[cfg(test)]
mod tests;
