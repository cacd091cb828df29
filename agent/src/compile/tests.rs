//! Compiler unit tests: precedence, identities, inode resolution.

use std::{net::Ipv6Addr, path::PathBuf};

use portcullis_common::{
    ACCESS_EXEC, ACCESS_READ, HAS_NET, IDENTITY_UNRESTRICTED, InodeKey, RULE_SUBTREE,
    VERDICT_ALLOW, VERDICT_DENY,
};

use super::*;
use crate::policy::{EgressRules, ExecRules, FileRule, Selector};

const N: Numbering = Numbering {
    generation: 5,
    first_identity: 10,
    only_from_base: 1 << 30,
};

fn policy(name: &str, cgroup: &str) -> Policy {
    Policy {
        name: name.into(),
        source: PathBuf::from("test.yaml"),
        mode: Mode::Enforce,
        selector: Selector {
            cgroup_path: Some(cgroup.into()),
            ..Default::default()
        },
        exec: None,
        egress: None,
        files: vec![],
        devices: None,
        sockets: None,
    }
}

fn v4(a: [u8; 4], len: u8, ports: Vec<(u16, u16)>) -> NetRule {
    NetRule {
        addr: std::net::Ipv4Addr::from(a).to_ipv6_mapped(),
        prefix_len: 96 + len,
        ports,
        protocol: None,
        log: false,
        text: format!("{}/{len}", std::net::Ipv4Addr::from(a)),
        line: 1,
        until: None,
    }
}

fn cgroups() -> Vec<CgroupInfo> {
    [(1, "/"), (2, "/a"), (3, "/a/x"), (4, "/b"), (5, "/b/y")]
        .into_iter()
        .map(|(id, path)| CgroupInfo::new(id, path))
        .collect()
}

fn path(p: &str) -> PathRule {
    PathRule {
        pattern: p.into(),
        line: 1,
        until: None,
    }
}

#[test]
fn identities_are_shared_by_policy_set() {
    let policies = [
        policy("pa", "/a/**"),
        policy("pb", "/b/y"),
        policy("both", "/**/y"),
    ];
    let c = compile(&policies, &cgroups(), N).unwrap();
    assert_eq!(
        c.cgroups[&1], IDENTITY_UNRESTRICTED,
        "root is selected by nothing"
    );
    // `/a/**` matches `/a` itself and below: one identity for both.
    assert_eq!(c.cgroups[&2], c.cgroups[&3]);
    assert_eq!(c.cgroups[&2], 10);
    assert_eq!(c.cgroups[&4], IDENTITY_UNRESTRICTED);
    let y = c.cgroups[&5];
    assert_eq!(c.identity_policies[&y], vec![1, 2]);
    assert_eq!(c.identity_cfg.len(), 2);
}

#[test]
fn a_uid_alone_selects_every_cgroup_and_narrows_with_a_path() {
    let mut only_uid = policy("only-uid", "unused");
    only_uid.selector = Selector {
        uid: Some((4242, 4242)),
        ..Default::default()
    };
    let mut uid_and_path = policy("uid-and-path", "/a/**");
    uid_and_path.selector.uid = Some((7, 9));
    let c = compile(&[only_uid, uid_and_path], &cgroups(), N).unwrap();
    for (id, set) in [
        (1, vec![0]),
        (2, vec![0, 1]),
        (3, vec![0, 1]),
        (4, vec![0]),
        (5, vec![0]),
    ] {
        assert_eq!(c.identity_policies[&c.cgroups[&id]], set, "cgroup {id}");
    }
    let cfg = c.identity_cfg[&c.cgroups[&2]];
    assert_eq!(cfg.uid_scoped, 0b11);
    assert_eq!((cfg.uid_lo[0], cfg.uid_hi[0]), (4242, 4242));
    assert_eq!((cfg.uid_lo[1], cfg.uid_hi[1]), (7, 9));
}

#[test]
fn default_deny_is_per_policy_bit() {
    let mut deny = policy("deny", "/a/**");
    deny.egress = Some(EgressRules {
        default: DefaultAction::Deny,
        allow: vec![v4([10, 0, 0, 0], 8, vec![(443, 443)])],
        deny: vec![],
    });
    let mut audit = policy("audit", "/a/**");
    audit.mode = Mode::Audit;
    audit.egress = Some(EgressRules {
        default: DefaultAction::Deny,
        allow: vec![],
        deny: vec![],
    });
    let c = compile(&[deny, audit], &cgroups(), N).unwrap();
    let cfg = c.identity_cfg[&10];
    assert_eq!(cfg.net_deny_enforce, 0b01);
    assert_eq!(cfg.net_deny_audit, 0b10);
    assert_eq!(cfg.flags & HAS_NET, HAS_NET);
    let set = c.net[&net_key(10, "::ffff:10.0.0.0".parse().unwrap(), 104)];
    assert_eq!(set.count, 1);
    assert_eq!(set.rules[0].policy_bit, 0);
    assert_eq!((set.rules[0].port_lo, set.rules[0].port_hi), (443, 443));
}

#[test]
fn longer_prefixes_carry_their_ancestors_rules_denies_first() {
    let mut p = policy("p", "/a");
    p.egress = Some(EgressRules {
        default: DefaultAction::Allow,
        allow: vec![v4([10, 0, 0, 0], 8, vec![(443, 443)])],
        deny: vec![v4([10, 1, 0, 0], 16, vec![])],
    });
    let c = compile(&[p], &cgroups(), N).unwrap();
    let inner = c.net[&net_key(10, "::ffff:10.1.0.0".parse().unwrap(), 112)];
    assert_eq!(inner.count, 2);
    assert_eq!(inner.rules[0].verdict, VERDICT_DENY);
    assert_eq!(inner.rules[1].verdict, VERDICT_ALLOW);
    let outer = c.net[&net_key(10, "::ffff:10.0.0.0".parse().unwrap(), 104)];
    assert_eq!(
        outer.count, 1,
        "a shorter prefix does not inherit longer ones"
    );
    assert_eq!(
        c.rules[inner.rules[0].rule_id as usize].rule,
        "network.egress.deny[0] 10.1.0.0/16"
    );
}

#[test]
fn too_many_port_rules_is_an_error_naming_the_cidr() {
    let mut p = policy("p", "/a");
    let ports: Vec<(u16, u16)> = (1..=17).map(|i| (i, i)).collect();
    p.egress = Some(EgressRules {
        default: DefaultAction::Allow,
        allow: vec![v4([10, 0, 0, 0], 8, ports)],
        deny: vec![],
    });
    let e = compile(&[p], &cgroups(), N).unwrap_err();
    assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
}

#[test]
fn exec_and_file_globs_resolve_to_inodes_through_symlinks() {
    let dir = std::env::temp_dir().join(format!("portcullis-compile-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("data/pii")).unwrap();
    std::fs::write(dir.join("bin/python3.11"), b"").unwrap();
    std::fs::write(dir.join("bin/other"), b"").unwrap();
    let _ = std::fs::remove_file(dir.join("bin/python3"));
    std::os::unix::fs::symlink("python3.11", dir.join("bin/python3")).unwrap();
    let d = dir.display();

    let mut p = policy("p", "/a");
    p.exec = Some(ExecRules {
        default: DefaultAction::Deny,
        allow: vec![path(&format!("{d}/bin/python3*"))],
        deny: vec![],
    });
    p.files = vec![FileRule {
        path: path(&format!("{d}/data/pii/**")),
        access: FileAccess::Read,
        only_from: vec![path(&format!("{d}/bin/python3"))],
    }];
    let c = compile(&[p], &cgroups(), N).unwrap();
    let meta = std::fs::metadata(dir.join("bin/python3.11")).unwrap();
    let key = InodeKey {
        identity: 10,
        dev: kernel_dev(meta.dev()),
        ino: meta.ino(),
    };
    // python3 and python3.11 are one inode: one key, one rule.
    assert_eq!(c.exec.len(), 1);
    let set = c.exec[&key];
    assert_eq!(
        (set.count, set.rules[0].allow_mask, set.rules[0].flags),
        (1, ACCESS_EXEC, 0)
    );
    assert_eq!(c.identity_cfg[&10].exec_deny_enforce, 1);

    let pii = std::fs::metadata(dir.join("data/pii")).unwrap();
    let fkey = InodeKey {
        identity: 10,
        dev: kernel_dev(pii.dev()),
        ino: pii.ino(),
    };
    let rule = c.files[&fkey].rules[0];
    assert_eq!((rule.allow_mask, rule.flags), (ACCESS_READ, RULE_SUBTREE));
    assert_ne!(rule.only_from, 0);
    assert!(c.only_from.contains(&InodeKey {
        identity: rule.only_from,
        ..key
    }));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kernel_dev_uses_mkdev_encoding() {
    let dev = nix::sys::stat::makedev(259, 3);
    assert_eq!(kernel_dev(dev), (259 << 20) | 3);
}

#[test]
fn v4_prefix_containment() {
    let net: Ipv6Addr = "::ffff:10.0.0.0".parse().unwrap();
    let addr = |s: &str| s.parse::<Ipv6Addr>().unwrap();
    assert_eq!(network(addr("::ffff:10.9.8.7"), 104), net);
    assert_ne!(network(addr("::ffff:11.0.0.1"), 104), net);
    assert_eq!(network(addr("2001:db8::1"), 0), addr("::"));
    assert_eq!(network(addr("2001:db8::1"), 128), addr("2001:db8::1"));
}

#[test]
fn pod_selectors_need_known_metadata_and_pending_cgroups_stay_unmapped() {
    use std::{collections::BTreeMap, sync::Arc};

    use crate::{
        pod::{ContainerMetadata, Lookup, PodMetadata},
        policy::LabelSelector,
    };

    let mut triton = policy("triton", "/unused");
    triton.selector = Selector {
        pod_labels: Some(LabelSelector {
            match_labels: BTreeMap::from([("app".into(), "triton".into())]),
            ..Default::default()
        }),
        namespace: Some("ml-*".into()),
        ..Default::default()
    };
    let mut server = policy("server", "/unused");
    server.selector = Selector {
        container: Some("server".into()),
        ..Default::default()
    };
    let kube = policy("kube", "/kubepods/**");
    let policies = [triton, server, kube];

    let meta = |labels: &[(&str, &str)], container: Option<&str>| {
        Lookup::Known(Arc::new(PodMetadata {
            uid: "u".into(),
            namespace: "ml-prod".into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            service_account: None,
            container: container.map(|n| ContainerMetadata {
                id: "c".into(),
                name: n.into(),
                image: "i".into(),
                allocated: vec![],
            }),
            provisional: false,
        }))
    };
    let cg = |id, path: &str, pod| CgroupInfo {
        id,
        path: path.into(),
        pod,
    };
    let cgroups = [
        cg(1, "/kubepods", Lookup::NotPod),
        cg(2, "/kubepods/podA", meta(&[("app", "triton")], None)),
        cg(
            3,
            "/kubepods/podA/c1",
            meta(&[("app", "triton")], Some("server")),
        ),
        cg(
            4,
            "/kubepods/podB/c2",
            meta(&[("app", "vllm")], Some("sidecar")),
        ),
        cg(5, "/kubepods/podC/c3", Lookup::Pending),
        cg(6, "/kubepods/podD/c4", Lookup::Unavailable),
    ];
    assert_eq!(select_cgroup(&policies, &cgroups[1]), vec![0, 2]);
    assert_eq!(select_cgroup(&policies, &cgroups[2]), vec![0, 1, 2]);
    assert_eq!(select_cgroup(&policies, &cgroups[3]), vec![2]);
    assert_eq!(
        select_cgroup(&policies, &cgroups[5]),
        vec![2],
        "no metadata: path policies only"
    );
    assert_eq!(
        select(&policies, "/kubepods/podA"),
        vec![2],
        "path-only select ignores pod policies"
    );
    // Partial (token only): namespace policies apply, label/container ones wait.
    let mut ns_only = policy("ns", "/unused");
    ns_only.selector = Selector {
        namespace: Some("ml-*".into()),
        ..Default::default()
    };
    let with_ns = [policies[0].clone(), ns_only];
    let partial = Lookup::Partial(Arc::new(PodMetadata {
        namespace: "ml-prod".into(),
        labels: BTreeMap::from([("app".into(), "triton".into())]),
        ..Default::default()
    }));
    assert_eq!(
        select_cgroup(&with_ns, &cg(7, "/kubepods/podE", partial)),
        vec![1]
    );

    let c = compile(&policies, &cgroups, N).unwrap();
    assert!(
        !c.cgroups.contains_key(&5),
        "pending: inherits its ancestor in the kernel"
    );
    assert_eq!(c.cgroup_paths[&5], "/kubepods/podC/c3");
    assert_eq!(
        c.cgroups[&1], c.cgroups[&4],
        "same policy set, same identity"
    );
    assert_ne!(c.cgroups[&2], c.cgroups[&3]);
}

/// A policy set first seen after the compile gets its identity from the
/// generation's resolved rules: the rule table is not registered again, the
/// new identity's rules carry the same rule ids, and a copy made to publish
/// the next version shares the rule tables until one is written.
#[test]
fn a_later_policy_set_reuses_the_generations_rules() {
    let exe = std::env::current_exe().unwrap();
    let mut pa = policy("pa", "/a/**");
    pa.exec = Some(ExecRules {
        default: DefaultAction::Deny,
        allow: vec![path(&exe.display().to_string())],
        deny: vec![],
    });
    pa.egress = Some(EgressRules {
        default: DefaultAction::Allow,
        allow: vec![],
        deny: vec![v4([10, 0, 0, 0], 8, vec![])],
    });
    let policies = [pa, policy("pb", "/b/**")];
    let c = compile(&policies, &cgroups(), N).unwrap();
    let rules = c.rules.len();

    let mut next = c.clone();
    assert!(Arc::ptr_eq(&next.rules, &c.rules) && Arc::ptr_eq(&next.exec, &c.exec));
    let key = IdentityKey {
        policies: vec![0, 1],
        allocated: vec![],
    };
    add_identity(&mut next, &policies, &key, 42).unwrap();
    assert_eq!(next.rules.len(), rules, "no rule registered twice");
    assert_eq!(next.identity_of[&key], 42);
    let id_of = |c: &Compiled, identity| {
        c.exec
            .iter()
            .find(|(k, _)| k.identity == identity)
            .map(|(_, v)| v.rules[0].rule_id)
    };
    assert_eq!(id_of(&next, 42), id_of(&c, c.cgroups[&2]));
    assert!(
        next.net
            .keys()
            .any(|(_, data)| data[..4] == 42u32.to_be_bytes())
    );
    assert!(!Arc::ptr_eq(&next.exec, &c.exec), "written: copied");
    assert!(
        c.exec.keys().all(|k| k.identity != 42),
        "the published version is untouched"
    );

    // Policies from another generation are refused, not mixed in.
    assert!(matches!(
        add_identity(
            &mut next,
            &policies[..1],
            &IdentityKey {
                policies: vec![0],
                allocated: vec![]
            },
            43
        ),
        Err(CompileError::Stale)
    ));
}

/// The reload log counts rules by what they say, not where they stand: a
/// CIDR inserted at the top of a list is one added rule.
#[test]
fn rule_changes_ignore_renumbering() {
    let with = |cidrs: &[[u8; 4]]| {
        let mut p = policy("egress", "/a/**");
        p.egress = Some(EgressRules {
            default: DefaultAction::Deny,
            allow: cidrs.iter().map(|&a| v4(a, 32, vec![])).collect(),
            deny: vec![],
        });
        compile(&[p], &cgroups(), N).unwrap()
    };
    let old = with(&[[10, 0, 0, 1], [10, 0, 0, 2]]);
    let new = with(&[[192, 168, 0, 1], [10, 0, 0, 1]]);
    let (added, removed) = rule_changes(&old, &new);
    assert_eq!(added, ["egress: network.egress.allow 192.168.0.1/32"]);
    assert_eq!(removed, ["egress: network.egress.allow 10.0.0.2/32"]);
    assert_eq!(rule_changes(&new, &new), (vec![], vec![]));
}

/// An `allocated` rule gives each container the devices the kubelet
/// allocated to it, with the access it granted: containers with different
/// devices get identities of their own, and one without any (or whose
/// device node is gone) gets no device rule, only the default deny.
#[test]
fn allocated_device_rules_are_per_container() {
    use crate::pod::{ContainerMetadata, allocated::AllocatedDevice};
    use portcullis_common::{ACCESS_MKNOD, ACCESS_WRITE, DEVICE_CHAR, DeviceKey};
    let text = "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: gpus\nspec:\n  selector:\n    cgroupPath: /pods/**\n  devices:\n    default: deny\n    allow:\n      - { allocated: true, access: [read, write] }\n";
    let policies = crate::policy::parse_str(text, std::path::Path::new("p.yaml")).unwrap();
    let container = |id: &str, devices: &[(&str, u32)]| {
        let mut cg = CgroupInfo::new(0, format!("/pods/{id}"));
        cg.pod = Lookup::Known(Arc::new(PodMetadata {
            container: Some(ContainerMetadata {
                id: id.into(),
                allocated: devices
                    .iter()
                    .map(|&(p, access)| AllocatedDevice {
                        host_path: p.into(),
                        number: None,
                        access,
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }));
        cg
    };
    let rwm = ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD;
    let mut cgroups = vec![
        container("a", &[("/dev/null", rwm)]),
        container("b", &[("/dev/zero", ACCESS_READ)]),
        container("c", &[("/dev/null", rwm)]),
        container("none", &[]),
        container("gone", &[("/dev/portcullis-no-such-node", rwm)]),
    ];
    for (i, cg) in cgroups.iter_mut().enumerate() {
        cg.id = i as u64 + 1;
    }
    let c = compile(&policies, &cgroups, N).unwrap();
    let id = |cg: u64| c.cgroups[&cg];
    assert_eq!(id(1), id(3), "same devices, same identity");
    assert_ne!(id(1), id(2));
    assert_eq!(id(4), id(5), "no device node: as no allocation");
    assert_ne!(id(1), id(4));
    let rule = |identity, minor| {
        c.devices.get(&DeviceKey {
            identity,
            kind: DEVICE_CHAR,
            major: 1,
            minor,
        })
    };
    // /dev/null is 1:3 and /dev/zero 1:5 on every Linux.
    let null = rule(id(1), 3).expect("a's /dev/null");
    assert_eq!(null.count, 1);
    assert_eq!(
        null.rules[0].access,
        ACCESS_READ | ACCESS_WRITE,
        "rule ∩ kubelet"
    );
    assert!(rule(id(1), 5).is_none(), "b's device is not a's");
    assert_eq!(
        rule(id(2), 5).expect("b's /dev/zero").rules[0].access,
        ACCESS_READ
    );
    assert!(c.devices.keys().all(|k| k.identity != id(4)));
    // The identity config still says default deny for devices.
    assert_eq!(c.identity_cfg[&id(4)].dev_deny_enforce, 1);
}

#[test]
fn socket_rules_are_per_policy_bit_and_family() {
    use crate::policy::{SocketKind, SocketRule, SocketRules};
    use portcullis_common::{AF_INET, AF_INET6, DEVICE_CLASS_SOCKET, DeviceKey, HAS_SOCKETS};
    let rule = |kind| SocketRule { kind, line: 1 };
    let mut deny = policy("deny", "/a/**");
    deny.sockets = Some(SocketRules {
        default: DefaultAction::Deny,
        // Twice in one list decides as once.
        allow: vec![rule(SocketKind::Icmp), rule(SocketKind::Icmp)],
        deny: vec![],
    });
    let mut audit = policy("audit", "/a/**");
    audit.mode = Mode::Audit;
    audit.sockets = Some(SocketRules {
        default: DefaultAction::Allow,
        allow: vec![],
        deny: vec![rule(SocketKind::Raw)],
    });
    let c = compile(&[deny, audit], &cgroups(), N).unwrap();
    let cfg = c.identity_cfg[&10];
    assert_eq!(cfg.flags & HAS_SOCKETS, HAS_SOCKETS);
    assert_eq!(
        cfg.sock_deny_enforce, 0b01,
        "only the enforcing default-deny policy"
    );
    assert_eq!(cfg.sock_deny_audit, 0);
    let key = |family, kind: SocketKind| DeviceKey {
        identity: 10,
        kind: DEVICE_CLASS_SOCKET,
        major: family,
        minor: u32::from(kind.wire()),
    };
    for family in [AF_INET, AF_INET6] {
        let icmp = c.devices[&key(family, SocketKind::Icmp)];
        assert_eq!(icmp.count, 1);
        assert_eq!(
            (icmp.rules[0].policy_bit, icmp.rules[0].verdict),
            (0, VERDICT_ALLOW)
        );
        let raw = c.devices[&key(family, SocketKind::Raw)];
        assert_eq!(raw.count, 1);
        assert_eq!(
            (raw.rules[0].policy_bit, raw.rules[0].verdict),
            (1, VERDICT_DENY)
        );
        assert_eq!(raw.rules[0].mode, portcullis_common::MODE_AUDIT);
    }
    assert!(!c.devices.contains_key(&key(AF_INET, SocketKind::InetOther)));
}
