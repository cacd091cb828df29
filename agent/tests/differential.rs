//! The compiled decision (policy YAML → compile → map contents → the
//! kernel's combining code on the host) against a reference model written
//! straight from the README's precedence rules over the parsed policies,
//! on random policy sets and requests: 30 000 requests per run. The
//! kernel itself is compared with the host evaluator by `kernel.rs` (random
//! file rules, real opens) and by `tests/tests/policy_test.rs` (policy
//! tests, real exec/open/connect).

use std::{
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock},
};

use portcullis::{
    compile::{self, CgroupInfo, Numbering, kernel_dev},
    evaluate::{self, Action},
    policy::{DefaultAction, FileAccess, Mode, Policy, parse_str},
};
use portcullis_common::{ACCESS_READ, ACCESS_WRITE, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY};
use proptest::prelude::*;

/// The files requests are about; policies name them, their directories and
/// subtrees.
const FILES: &[&str] = &["/a/x", "/a/b/y", "/a/b/z", "/c/w"];
const PATTERNS: &[&str] = &[
    "/a/x", "/a/b/y", "/a/b/z", "/c/w", "/a/**", "/a/b/**", "/c/**", "/**", "/a/b",
];
const CIDRS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.3/32",
    "0.0.0.0/0",
    "192.168.0.0/16",
];
const ADDRS: &[Ipv4Addr] = &[
    Ipv4Addr::new(10, 1, 2, 3),
    Ipv4Addr::new(10, 1, 9, 9),
    Ipv4Addr::new(10, 9, 9, 9),
    Ipv4Addr::new(192, 168, 1, 1),
    Ipv4Addr::new(8, 8, 8, 8),
];
const PORTS: &[u16] = &[22, 80, 443, 8000, 8001];
const UIDS: &[u32] = &[0, 1000, 1500, 2000];

/// A fixture tree standing for `/`, shared by every case.
static ROOT: LazyLock<PathBuf> = LazyLock::new(|| {
    let root = std::env::temp_dir().join(format!("portcullis-differential-{}", std::process::id()));
    for f in FILES {
        let p = root.join(&f[1..]);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }
    root
});

fn inode(path: &str) -> (u32, u64) {
    let m = std::fs::metadata(ROOT.join(&path[1..])).unwrap();
    (kernel_dev(m.dev()), m.ino())
}

fn levels(path: &str) -> Vec<(u32, u64)> {
    let mut l = evaluate::levels(&ROOT.join(&path[1..])).unwrap();
    let root = inode("/");
    let end = l.iter().position(|x| *x == root).unwrap();
    l.truncate(end + 1);
    l
}

fn pick<T: Clone + std::fmt::Debug + 'static>(of: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(of)
}

fn list(of: &'static [&'static str], max: usize) -> impl Strategy<Value = Vec<&'static str>> {
    proptest::collection::vec(pick(of), 0..=max)
}

type NetRuleArgs = (&'static str, Option<(u16, u16)>, u8);

fn net_rule() -> impl Strategy<Value = NetRuleArgs> {
    (
        pick(CIDRS),
        proptest::option::of((pick(PORTS), 0u16..200)),
        0u8..3,
    )
}

/// One random policy's YAML.
fn policy_yaml(i: usize) -> impl Strategy<Value = String> {
    let exec = (
        any::<bool>(),
        any::<bool>(),
        list(PATTERNS, 2),
        list(PATTERNS, 2),
    );
    let net = (
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(net_rule(), 0..=2),
        proptest::collection::vec(net_rule(), 0..=2),
    );
    let file = (pick(PATTERNS), 0u8..3, proptest::option::of(pick(FILES)));
    let files = proptest::collection::vec(file, 0..=3);
    let uid = proptest::option::of((pick(UIDS), 0u32..800));
    (any::<bool>(), uid, exec, net, files).prop_map(move |(audit, uid, exec, net, files)| {
        let mut y = format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: p{i}\nspec:\n  mode: {}\n  selector:\n    cgroupPath: \"/w/**\"\n",
            if audit { "audit" } else { "enforce" }
        );
        if let Some((lo, span)) = uid {
            y += &format!("    uid: \"{lo}-{}\"\n", lo + span);
        }
        let q = |v: &[&str]| v.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ");
        let (has_exec, exec_deny_default, allow, deny) = exec;
        if has_exec {
            y += &format!(
                "  exec:\n    default: {}\n    allow: [{}]\n    deny: [{}]\n",
                if exec_deny_default { "deny" } else { "allow" },
                q(&allow),
                q(&deny)
            );
        }
        let (has_net, net_deny_default, allow, deny) = net;
        if has_net {
            let rules = |v: &[NetRuleArgs]| {
                v.iter()
                    .map(|(cidr, ports, proto)| {
                        let mut r = format!("{{ cidr: {cidr}");
                        if let Some((lo, span)) = ports {
                            r += &format!(", ports: [\"{lo}-{}\"]", lo.saturating_add(*span));
                        }
                        r += match proto {
                            1 => ", protocol: tcp",
                            2 => ", protocol: udp",
                            _ => "",
                        };
                        r + " }"
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            y += &format!(
                "  network:\n    egress:\n      default: {}\n      allow: [{}]\n      deny: [{}]\n",
                if net_deny_default { "deny" } else { "allow" },
                rules(&allow),
                rules(&deny)
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        let files: Vec<_> = files.into_iter().filter(|(p, ..)| seen.insert(*p)).collect();
        if !files.is_empty() {
            y += "  files:\n";
            for (path, access, only) in files {
                let access = ["none", "read", "readwrite"][access as usize];
                y += &format!("    - {{ path: \"{path}\", access: {access}");
                if let (Some(exe), false) = (only, access == "none") {
                    y += &format!(", onlyFrom: [\"{exe}\"]");
                }
                y += " }\n";
            }
        }
        if !has_exec && !has_net && seen.is_empty() {
            y += "  exec:\n    default: allow\n";
        }
        y
    })
}

#[derive(Debug, Clone)]
enum Req {
    Exec(&'static str),
    Open(&'static str, u32),
    Connect(Ipv4Addr, u16, u8),
}

fn request() -> impl Strategy<Value = (u32, &'static str, Req)> {
    let req = prop_oneof![
        pick(FILES).prop_map(Req::Exec),
        (pick(FILES), 1u32..4).prop_map(|(f, a)| Req::Open(f, a)),
        (pick(ADDRS), pick(PORTS), prop_oneof![Just(6u8), Just(17u8)])
            .prop_map(|(a, p, t)| Req::Connect(a, p, t)),
    ];
    (pick(UIDS), pick(FILES), req)
}

/// `pattern` names `path` (exactly, or a `dir/**` above or at it).
fn covers(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix("/**") {
        Some("") => true,
        Some(dir) => path == dir || path.starts_with(&format!("{dir}/")),
        None => pattern == path,
    }
}

fn in_cidr(cidr: &str, a: Ipv4Addr) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let (net, len): (Ipv4Addr, u32) = (net.parse().unwrap(), len.parse().unwrap());
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(a) & mask == u32::from(net) & mask
}

/// The README's precedence, applied to the parsed policies directly:
/// returns the verdict and the policies that could have decided it.
fn reference(policies: &[Policy], uid: u32, exe: &str, req: &Req) -> (u8, Vec<String>) {
    let (mut enforce_deny, mut audit_deny) = (vec![], vec![]);
    let (mut enforce_default, mut audit_default) = (vec![], vec![]);
    for p in policies {
        if p.selector.uid.is_some_and(|(lo, hi)| uid < lo || uid > hi) {
            continue;
        }
        let deny = |v: &mut Vec<String>, w: &mut Vec<String>| {
            if p.mode == Mode::Enforce {
                v.push(p.name.clone())
            } else {
                w.push(p.name.clone())
            }
        };
        // (this policy has a rule for the action and defaults to deny, an
        // own allow matched, a deny matched)
        let (default_deny, allowed, denied) = match req {
            Req::Exec(path) => match &p.exec {
                None => continue,
                Some(e) => (
                    e.default == DefaultAction::Deny,
                    e.allow.iter().any(|r| covers(&r.pattern, path)),
                    e.deny.iter().any(|r| covers(&r.pattern, path)),
                ),
            },
            Req::Open(path, access) => {
                let denied = p.files.iter().any(|f| {
                    if !covers(&f.path.pattern, path) {
                        return false;
                    }
                    let mask = match f.access {
                        FileAccess::None => 0,
                        FileAccess::Read => ACCESS_READ,
                        FileAccess::ReadWrite => ACCESS_READ | ACCESS_WRITE,
                    };
                    access & !mask != 0
                        || (!f.only_from.is_empty()
                            && !f.only_from.iter().any(|o| o.pattern == exe))
                });
                (false, false, denied)
            }
            Req::Connect(addr, port, proto) => match &p.egress {
                None => continue,
                Some(e) => {
                    let hit = |r: &portcullis::policy::NetRule| {
                        in_cidr(r.text.split(' ').next().unwrap(), *addr)
                            && (r.ports.is_empty()
                                || r.ports.iter().any(|(lo, hi)| lo <= port && port <= hi))
                            && r.protocol.is_none_or(|t| t == *proto)
                    };
                    (
                        e.default == DefaultAction::Deny,
                        e.allow.iter().any(hit),
                        e.deny.iter().any(hit),
                    )
                }
            },
        };
        if denied {
            deny(&mut enforce_deny, &mut audit_deny);
        } else if default_deny && !allowed {
            deny(&mut enforce_default, &mut audit_default);
        }
    }
    for (verdict, who) in [
        (VERDICT_DENY, enforce_deny),
        (VERDICT_DENY, enforce_default),
        (VERDICT_AUDIT, audit_deny),
        (VERDICT_AUDIT, audit_default),
    ] {
        if !who.is_empty() {
            return (verdict, who);
        }
    }
    (VERDICT_ALLOW, vec![])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// 500 random policy sets × 60 requests = 30 000 requests.
    #[test]
    fn the_compiled_decision_is_the_documented_precedence(
        yamls in proptest::collection::vec(0usize..1, 1..=4)
            .prop_flat_map(|v| (0..v.len()).map(policy_yaml).collect::<Vec<_>>()),
        requests in proptest::collection::vec(request(), 60),
    ) {
        let text = yamls.join("---\n");
        let policies = parse_str(&text, Path::new("random.yaml"))
            .unwrap_or_else(|e| panic!("generated an invalid policy: {e:?}\n{text}"));
        let cgroups = [CgroupInfo::new(1, "/w/job")];
        let c = compile::compile_under(&policies, &cgroups, Numbering::OFFLINE, Arc::default(), &ROOT);
        // More rules on one inode than a map value holds is refused by the
        // compiler (and so by validate-time reload), not decided.
        prop_assume!(!matches!(c, Err(compile::CompileError::TooManyInodeRules { .. })));
        let c = c.unwrap();
        for (uid, exe, req) in &requests {
            let action = match req {
                Req::Exec(p) => Action::Exec { path: levels(p) },
                Req::Open(p, a) => Action::Open { path: levels(p), access: *a },
                Req::Connect(a, p, t) => Action::Connect { addr: a.to_ipv6_mapped(), port: *p, proto: *t },
            };
            let got = evaluate::evaluate(&c, 1, *uid, inode(exe), &action);
            let (verdict, deciders) = reference(&policies, *uid, exe, req);
            prop_assert_eq!(got.decision.verdict, verdict, "{:?} uid {} exe {}: {:?}\n{}", req, uid, exe, got, text);
            if verdict != VERDICT_ALLOW {
                prop_assert!(deciders.contains(&got.policy), "{:?}: decided by {:?}, expected one of {:?}\n{}", req, got, deciders, text);
            }
        }
    }
}
