//! End to end: a real agent process, real cgroups, real syscalls. Each test
//! applies a policy, makes the syscall from a process in a cgroup the policy
//! selects, checks the kernel's answer (EPERM, or SIGKILL on the tracepoint
//! backend), then changes the policy and checks the call succeeds again.

use nix::sys::signal::Signal;
use portcullis_tests::{
    Agent, Cgroup, EPERM, Listener, Outcome, TempDir, policy_header, probe, probe_as,
    require_kernel,
};

fn egress_policy(cg: &Cgroup, mode: &str, body: &str) -> String {
    format!(
        "{}  network:\n    egress:\n{body}",
        policy_header("egress", mode, &cg.path)
    )
}

#[test]
fn connect_deny_rule_blocks_only_the_selected_cgroup_until_removed() {
    require_kernel!();
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("connect");
    let other = Cgroup::create("bystander");
    let deny = egress_policy(
        &cg,
        "enforce",
        &format!(
            "      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"], protocol: tcp }}\n"
        ),
    );
    let mut agent = Agent::start(&deny);

    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    assert_eq!(
        probe(&other, &["connect", "127.0.0.1", &port]),
        Outcome::Ok(0)
    );
    // IPv4-mapped IPv6 reaches the same rule through connect6.
    assert_eq!(
        probe(&cg, &["connect", "::ffff:127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );

    let d = agent.wait_decision("connect deny line", |d| {
        d["action"] == "connect" && d["workload"]["cgroup"] == cg.path.as_str()
    });
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["policy"], "egress");
    assert!(
        d["rule"]
            .as_str()
            .unwrap()
            .starts_with("network.egress.deny[0] 127.0.0.1/32"),
        "{d}"
    );
    assert_eq!(d["target"]["ip"], "127.0.0.1");
    assert_eq!(d["target"]["port"], listener.port);
    assert_eq!(d["target"]["protocol"], "tcp");
    assert_eq!(d["backend"], "cgroup_sock_addr");
    assert_eq!(d["comm"], "portcullis-prob");
    for field in ["time", "pid", "exe", "workload"] {
        assert!(!d[field].is_null(), "missing {field} in {d}");
    }
    assert_eq!(d["workload"]["uid"], 0);

    assert!(agent.reload(&egress_policy(&cg, "enforce", "      default: allow\n")));
    assert_eq!(probe(&cg, &["connect", "127.0.0.1", &port]), Outcome::Ok(0));
}

#[test]
fn default_deny_egress_allows_listed_ports_and_blocks_udp_sendto() {
    require_kernel!();
    let open = Listener::new("127.0.0.1");
    let closed = Listener::new("127.0.0.1");
    let cg = Cgroup::create("default-deny");
    let policy = egress_policy(
        &cg,
        "enforce",
        &format!(
            "      default: deny\n      allow:\n        - {{ cidr: 127.0.0.0/8, ports: [\"{}\"], protocol: tcp }}\n",
            open.port
        ),
    );
    let mut agent = Agent::start(&policy);
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &open.port.to_string()]),
        Outcome::Ok(0)
    );
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &closed.port.to_string()]),
        Outcome::Errno(EPERM)
    );
    // Unconnected UDP goes through sendmsg4: no bypass.
    assert_eq!(
        probe(&cg, &["sendto", "127.0.0.1", "9"]),
        Outcome::Errno(EPERM)
    );
    let d = agent.wait_decision("default deny line", |d| d["target"]["protocol"] == "udp");
    assert_eq!(d["rule"], "default");

    assert!(agent.reload(&egress_policy(&cg, "enforce", "      default: allow\n")));
    assert_eq!(probe(&cg, &["sendto", "127.0.0.1", "9"]), Outcome::Ok(5));
}

#[test]
fn audit_mode_blocks_nothing_and_logs_would_deny() {
    require_kernel!();
    let l = Listener::new("127.0.0.1");
    let cg = Cgroup::create("audit");
    let tmp = TempDir::new("audit");
    std::fs::create_dir_all(tmp.path("secret")).unwrap();
    std::fs::write(tmp.path("secret/key"), b"hunter2").unwrap();
    let policy = format!(
        "{}  network:\n    egress:\n      default: deny\n  files:\n    - {{ path: \"{}/secret/**\", access: none }}\n",
        policy_header("audited", "audit", &cg.path),
        tmp.0.display()
    );
    let mut agent = Agent::start(&policy);
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &l.port.to_string()]),
        Outcome::Ok(0)
    );
    assert_eq!(
        probe(&cg, &["read", &tmp.str("secret/key")]),
        Outcome::Ok(7)
    );
    let c = agent.wait_decision("audit connect", |d| d["action"] == "connect");
    assert_eq!(c["verdict"], "audit");
    let o = agent.wait_decision("audit open", |d| d["action"] == "open");
    assert_eq!(o["verdict"], "audit");
    assert_eq!(o["target"]["path"], tmp.str("secret/key"));
}

#[test]
fn exec_default_deny_kills_unlisted_binaries_and_allows_listed_ones() {
    require_kernel!();
    let tmp = TempDir::new("exec");
    std::fs::create_dir_all(tmp.path("bin")).unwrap();
    std::fs::copy("/bin/true", tmp.path("bin/allowed")).unwrap();
    std::fs::copy("/bin/true", tmp.path("bin/denied")).unwrap();
    std::os::unix::fs::symlink(tmp.path("bin/denied"), tmp.path("alias")).unwrap();
    let cg = Cgroup::create("exec");
    let policy = format!(
        "{}  exec:\n    default: deny\n    allow: [\"{}\"]\n",
        policy_header("exec-allowlist", "enforce", &cg.path),
        tmp.str("bin/allowed")
    );
    let mut agent = Agent::start(&policy);
    let denied = agent.denied("exec");
    assert_eq!(
        probe(&cg, &["exec", &tmp.str("bin/allowed")]),
        Outcome::Exited(0)
    );
    assert_eq!(probe(&cg, &["exec", &tmp.str("bin/denied")]), denied);
    assert_eq!(
        probe(&cg, &["exec", &tmp.str("alias")]),
        denied,
        "symlink bypass"
    );
    let d = agent.wait_decision("exec deny line", |d| d["action"] == "exec");
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["rule"], "default");
    let per_policy =
        r#"portcullis_decisions_total{action="exec",verdict="deny",policy="exec-allowlist"}"#;
    // Counted in the kernel per deciding policy: the two denied execs.
    assert!(
        agent.metric(per_policy) >= 2.0,
        "{}",
        agent.metric(per_policy)
    );
    assert_eq!(d["target"]["access"], "exec");

    let allow_both = format!(
        "{}  exec:\n    default: deny\n    allow: [\"{}/bin/*\"]\n",
        policy_header("exec-allowlist", "enforce", &cg.path),
        tmp.0.display()
    );
    assert!(agent.reload(&allow_both));
    assert_eq!(
        probe(&cg, &["exec", &tmp.str("bin/denied")]),
        Outcome::Exited(0)
    );
}

fn files_policy(cg: &Cgroup, rules: &str) -> String {
    format!(
        "{}  files:\n{rules}",
        policy_header("datasets", "enforce", &cg.path)
    )
}

#[test]
fn denied_file_stays_denied_through_every_path_to_it() {
    require_kernel!();
    let tmp = TempDir::new("files");
    std::fs::create_dir_all(tmp.path("data/pii/sub")).unwrap();
    std::fs::create_dir_all(tmp.path("mnt")).unwrap();
    std::fs::write(tmp.path("data/pii/sub/rows.csv"), b"alice,bob").unwrap();
    std::fs::write(tmp.path("data/public.csv"), b"ok").unwrap();
    std::os::unix::fs::symlink(tmp.path("data/pii/sub/rows.csv"), tmp.path("link.csv")).unwrap();
    nix::mount::mount(
        Some(&tmp.path("data/pii")),
        &tmp.path("mnt"),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(tmp.path("mnt"));

    let cg = Cgroup::create("files");
    let other = Cgroup::create("files-bystander");
    let rule = format!(
        "    - {{ path: \"{}/data/pii/**\", access: none }}\n",
        tmp.0.display()
    );
    let mut agent = Agent::start(&files_policy(&cg, &rule));
    let denied = agent.denied("open");

    let direct = tmp.str("data/pii/sub/rows.csv");
    let via_proc_root = format!("/proc/self/root{direct}");
    let via_dotdot = format!("{}/data/public/../pii/sub/rows.csv", tmp.0.display());
    std::fs::create_dir_all(tmp.path("data/public")).unwrap();
    for path in [
        direct.as_str(),
        &tmp.str("link.csv"),
        &via_proc_root,
        &via_dotdot,
        &tmp.str("mnt/sub/rows.csv"),
    ] {
        assert_eq!(probe(&cg, &["read", path]), denied, "open {path}");
    }
    assert_eq!(
        probe(&cg, &["read-in", &tmp.str("data/pii"), "sub/rows.csv"]),
        denied,
        "relative path"
    );
    assert_eq!(
        probe(&cg, &["read", &tmp.str("data/public.csv")]),
        Outcome::Ok(2)
    );
    assert_eq!(probe(&other, &["read", &direct]), Outcome::Ok(9));

    let d = agent.wait_decision("open deny line", |d| d["action"] == "open");
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["policy"], "datasets");
    // Counted in the kernel per deciding policy: the six denied opens.
    let per_policy =
        r#"portcullis_decisions_total{action="open",verdict="deny",policy="datasets"}"#;
    assert!(
        agent.metric(per_policy) >= 6.0,
        "{}",
        agent.metric(per_policy)
    );
    assert_eq!(d["target"]["access"], "read");
    assert!(
        d["target"]["path"]
            .as_str()
            .unwrap()
            .ends_with("/sub/rows.csv"),
        "{d}"
    );

    // Removing the rule (the policy now protects an unrelated directory)
    // restores access.
    std::fs::create_dir_all(tmp.path("unrelated")).unwrap();
    let other_rule = format!(
        "    - {{ path: \"{}/unrelated/**\", access: none }}\n",
        tmp.0.display()
    );
    assert!(agent.reload(&files_policy(&cg, &other_rule)));
    assert_eq!(probe(&cg, &["read", &direct]), Outcome::Ok(9));
}

#[test]
fn read_only_and_only_from_rules() {
    require_kernel!();
    let tmp = TempDir::new("onlyfrom");
    std::fs::create_dir_all(tmp.path("secrets")).unwrap();
    std::fs::write(tmp.path("secrets/token"), b"t0ken").unwrap();
    let cg = Cgroup::create("onlyfrom");
    let probe_exe = std::fs::canonicalize(std::env::var("PORTCULLIS_PROBE").unwrap_or_else(|_| {
        format!(
            "{}/../target/debug/portcullis-probe",
            env!("CARGO_MANIFEST_DIR")
        )
    }))
    .unwrap();
    let read_only = format!(
        "    - {{ path: \"{}/secrets/**\", access: read }}\n",
        tmp.0.display()
    );
    let mut agent = Agent::start(&files_policy(&cg, &read_only));
    let denied = agent.denied("open");
    assert_eq!(
        probe(&cg, &["read", &tmp.str("secrets/token")]),
        Outcome::Ok(5)
    );
    assert_eq!(probe(&cg, &["write", &tmp.str("secrets/token")]), denied);

    let only_true = format!(
        "    - {{ path: \"{}/secrets/**\", access: read, onlyFrom: [\"/bin/true\"] }}\n",
        tmp.0.display()
    );
    assert!(agent.reload(&files_policy(&cg, &only_true)));
    assert_eq!(
        probe(&cg, &["read", &tmp.str("secrets/token")]),
        denied,
        "not from an onlyFrom binary"
    );

    // An onlyFrom binary that is not installed (yet) grants nobody access,
    // not everybody.
    let only_missing = format!(
        "    - {{ path: \"{}/secrets/**\", access: read, onlyFrom: [\"/nonexistent/portcullis-bin\"] }}\n",
        tmp.0.display()
    );
    assert!(agent.reload(&files_policy(&cg, &only_missing)));
    assert_eq!(
        probe(&cg, &["read", &tmp.str("secrets/token")]),
        denied,
        "onlyFrom matching no executable"
    );

    let only_probe = format!(
        "    - {{ path: \"{}/secrets/**\", access: read, onlyFrom: [\"{}\"] }}\n",
        tmp.0.display(),
        probe_exe.display()
    );
    assert!(agent.reload(&files_policy(&cg, &only_probe)));
    assert_eq!(
        probe(&cg, &["read", &tmp.str("secrets/token")]),
        Outcome::Ok(5)
    );
}

#[test]
fn new_cgroups_are_governed_child_inherits_at_once_and_new_top_level_is_classified_fast() {
    require_kernel!();
    let l = Listener::new("127.0.0.1");
    let port = l.port.to_string();
    let parent = Cgroup::create("late-parent");
    let late_name = portcullis_tests::unique("portcullis-e2e-late");
    let two = format!(
        "{}  network:\n    egress:\n      default: deny\n---\n{}  network:\n    egress:\n      default: deny\n",
        policy_header("late-a", "enforce", &format!("{}/**", parent.path)),
        policy_header("late-b", "enforce", &format!("/{late_name}/**"))
    );
    let mut agent = Agent::start(&two);
    // A child created after start inherits its parent's identity in the
    // kernel from its first syscall: no window. The agent is stopped
    // meanwhile, so the answer is the kernel's ancestor walk alone, never
    // the agent classifying the new cgroup first.
    agent.signal(Signal::SIGSTOP);
    let child = parent.child("child");
    let first = probe(&child, &["connect", "127.0.0.1", &port]);
    agent.signal(Signal::SIGCONT);
    assert_eq!(first, Outcome::Errno(EPERM));
    // A new top-level cgroup is classified from the cgroup_mkdir event.
    let late = Cgroup::create_named(&late_name);
    let started = std::time::Instant::now();
    agent.wait_until(
        "new cgroup classified",
        std::time::Duration::from_secs(2),
        |_| probe(&late, &["connect", "127.0.0.1", &port]) == Outcome::Errno(EPERM),
    );
    eprintln!(
        "new top-level cgroup governed after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_bad_policy_is_rejected_and_the_enforced_one_stays() {
    require_kernel!();
    let l = Listener::new("127.0.0.1");
    let port = l.port.to_string();
    let cg = Cgroup::create("bad-reload");
    let mut agent = Agent::start(&egress_policy(&cg, "enforce", "      default: deny\n"));
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    let bad = egress_policy(&cg, "enforce", "      default: deny\n      bogus: 1\n");
    assert!(
        !agent.reload(&bad),
        "a policy with an unknown field must be rejected"
    );
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    assert!(
        agent.log().contains("bogus"),
        "the log names the bad field:\n{}",
        agent.log()
    );
}

/// A time-bound approval: an allow rule with `until` lets the workload
/// connect until then, and the agent withdraws it at that time with no
/// change to the policy file.
#[test]
fn time_bound_approval_lapses_on_its_own() {
    require_kernel!();
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("approval");
    let with_until = |until: u64| {
        let stamp = std::process::Command::new("date")
            .args(["-u", "-d", &format!("@{until}"), "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .unwrap();
        let stamp = String::from_utf8(stamp.stdout).unwrap().trim().to_owned();
        egress_policy(
            &cg,
            "enforce",
            &format!(
                "      default: deny\n      allow:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"], until: \"{stamp}\" }}\n"
            ),
        )
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    // Start with an approval that lapsed long ago (compiled as absent), then
    // grant a short one by reload: the agent's start-up time (slow under
    // load or TCG) does not eat into it.
    let mut agent = Agent::start(&with_until(now() - 3600));
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    let margin = if std::env::var_os("PORTCULLIS_VM").is_some() {
        20
    } else {
        5
    };
    let until = now() + margin;
    assert!(agent.reload(&with_until(until)));
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Ok(0),
        "approval in force"
    );
    agent.wait_until(
        "the approval to lapse",
        std::time::Duration::from_secs(margin + 15),
        |_| probe(&cg, &["connect", "127.0.0.1", &port]) == Outcome::Errno(EPERM),
    );
    let lapsed_at = now();
    assert!(
        lapsed_at >= until,
        "denied at {lapsed_at}, before the approval's end {until}"
    );
    // The kernel denies from the map write on; the line saying so is
    // written just after it (long after, on a busy TCG guest).
    agent.wait_until(
        "the lapse to be logged",
        std::time::Duration::from_secs(15),
        |a| {
            let log = a.log();
            log.contains("a time-bound approval lapsed") && log.contains("rules_removed=1")
        },
    );
    let d = agent.wait_decision("deny after the approval", |d| {
        d["workload"]["cgroup"] == cg.path.as_str()
    });
    assert_eq!(d["rule"], "default");
}

/// A `uid` selector scopes a policy to the tasks of some users inside the
/// selected cgroups: checked in the kernel per syscall, so root and uid
/// 4242 in the same cgroup get different answers.
#[test]
fn uid_selector_applies_only_to_that_users_tasks() {
    require_kernel!();
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("uid");
    let policy = |uid: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: by-uid\nspec:\n  selector:\n    cgroupPath: \"{}\"\n    uid: {uid}\n  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"] }}\n",
            cg.path
        )
    };
    let mut agent = Agent::start(&policy("4242"));
    assert_eq!(
        probe_as(&cg, Some(4242), &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    assert_eq!(
        probe_as(&cg, None, &["connect", "127.0.0.1", &port]),
        Outcome::Ok(0)
    );
    assert_eq!(
        probe_as(&cg, Some(4243), &["connect", "127.0.0.1", &port]),
        Outcome::Ok(0)
    );
    let d = agent.wait_decision("uid deny line", |d| {
        d["workload"]["cgroup"] == cg.path.as_str()
    });
    assert_eq!(
        (d["verdict"].as_str(), d["workload"]["uid"].as_u64()),
        (Some("deny"), Some(4242))
    );

    // A range covers both users; root stays outside it.
    assert!(agent.reload(&policy("\"4242-4243\"")));
    assert_eq!(
        probe_as(&cg, Some(4243), &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    assert_eq!(
        probe_as(&cg, None, &["connect", "127.0.0.1", &port]),
        Outcome::Ok(0)
    );
}

/// A deny of a uid-scoped policy that does not apply to the caller must not
/// hide another policy's deny met after it in the same rule set (the same
/// file; the same network).
#[test]
fn a_uid_scoped_deny_does_not_hide_another_policys_deny_from_other_users() {
    require_kernel!();
    let tmp = TempDir::new("uid-walk");
    std::fs::create_dir_all(tmp.path("data")).unwrap();
    std::fs::write(tmp.path("data/secret"), b"s").unwrap();
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("uid-walk");
    let for_uid = format!(
        "{}    uid: 4242\n  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"] }}\n  files:\n    - {{ path: \"{}\", access: none }}\n",
        policy_header("only-4242", "enforce", &cg.path),
        tmp.str("data/secret")
    );
    let for_all = format!(
        "{}  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32 }}\n  files:\n    - {{ path: \"{}\", access: none }}\n",
        policy_header("everyone", "enforce", &cg.path),
        tmp.str("data/secret")
    );
    let mut agent = Agent::start(&format!("{for_uid}---\n{for_all}"));
    let denied = agent.denied("open");
    let read = ["read", &tmp.str("data/secret")];
    let connect = ["connect", "127.0.0.1", port.as_str()];
    assert_eq!(
        probe_as(&cg, None, &read),
        denied,
        "root, by everyone's rule"
    );
    assert_eq!(
        probe_as(&cg, None, &connect),
        Outcome::Errno(EPERM),
        "root, by everyone's rule"
    );
    assert_eq!(probe_as(&cg, Some(4242), &read), denied);
    // Without the policy for everyone, root may again.
    assert!(agent.reload(&for_uid));
    assert_eq!(probe_as(&cg, None, &read), Outcome::Ok(1));
    assert_eq!(probe_as(&cg, None, &connect), Outcome::Ok(0));
    assert_eq!(probe_as(&cg, Some(4242), &connect), Outcome::Errno(EPERM));
}

/// A `uid` alone selects every cgroup, for that user's tasks: a cgroup the
/// policy never names is governed, other users in it are not, and the
/// connect succeeds once the policy no longer denies it.
#[test]
fn a_uid_only_selector_governs_that_user_in_every_cgroup() {
    require_kernel!();
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    // Unnamed by the policy; the uid is one no other test uses, since this
    // policy reaches every cgroup on the host.
    let cg = Cgroup::create("uid-only");
    let policy = |deny: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: only-uid\nspec:\n  selector:\n    uid: 4317\n  network:\n    egress:\n      deny:\n{deny}"
        )
    };
    let mut agent = Agent::start(&policy(&format!(
        "        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"] }}\n"
    )));
    let connect = |uid| probe_as(&cg, uid, &["connect", "127.0.0.1", &port]);
    assert_eq!(connect(Some(4317)), Outcome::Errno(EPERM));
    assert_eq!(connect(Some(4318)), Outcome::Ok(0));
    assert_eq!(connect(None), Outcome::Ok(0));
    let d = agent.wait_decision("uid-only deny line", |d| {
        d["workload"]["cgroup"] == cg.path.as_str()
    });
    assert_eq!(
        (
            d["verdict"].as_str(),
            d["policy"].as_str(),
            d["workload"]["uid"].as_u64()
        ),
        (Some("deny"), Some("only-uid"), Some(4317))
    );

    assert!(agent.reload(&policy("        - { cidr: 192.0.2.0/24 }\n")));
    assert_eq!(connect(Some(4317)), Outcome::Ok(0));
}

/// A denied subtree holds however deep the file sits: at 17 and 40 levels
/// below it (the walk used to stop after 16 levels and allow). A file
/// deeper below its filesystem root than the kernel walks at all is denied
/// by no rule (fail closed), and is readable again once the workload has no
/// file rules.
#[test]
fn a_denied_subtree_holds_at_any_depth_and_a_deeper_walk_fails_closed() {
    require_kernel!();
    let tmp = TempDir::new("deep");
    // `base/d/d/.../f`, `levels` directory levels below `base`.
    let nested = |base: &str, levels: usize| {
        let mut p = tmp.str(base);
        for _ in 1..levels {
            p.push_str("/d");
        }
        std::fs::create_dir_all(&p).unwrap();
        p.push_str("/f");
        std::fs::write(&p, b"deep").unwrap();
        p
    };
    let (at17, at40) = (nested("secret", 17), nested("secret", 40));
    // Past the kernel's walk (`MAX_PATH_DEPTH`, 1024 levels), in a
    // directory no rule names.
    let beyond_walk = nested("open", 1024 + 8);
    let cg = Cgroup::create("deep");
    let other = Cgroup::create("deep-bystander");
    let deny = format!(
        "    - {{ path: \"{}/secret/**\", access: none }}\n",
        tmp.0.display()
    );
    let mut agent = Agent::start(&files_policy(&cg, &deny));
    let denied = agent.denied("open");
    for path in [&at17, &at40, &beyond_walk] {
        assert_eq!(probe(&cg, &["read", path]), denied, "{} bytes", path.len());
        assert_eq!(probe(&other, &["read", path]), Outcome::Ok(4));
    }
    let deep = agent.wait_decision("depth-40 deny line", |d| {
        d["target"]["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/d/d/f"))
            && d["rule"].as_str().is_some_and(|r| r.contains("/secret/**"))
    });
    assert_eq!(deep["policy"], "datasets");
    let closed = agent.wait_decision("fail-closed line", |d| {
        d["rule"]
            .as_str()
            .is_some_and(|r| r.starts_with("fail-closed"))
    });
    assert_eq!(
        (closed["policy"].as_str(), closed["verdict"].as_str()),
        (Some(""), Some("deny"))
    );

    // The deny rule gone, the subtree reads again; with no file rule left,
    // so does the path beyond the walk.
    assert!(agent.reload(&egress_policy(
        &cg,
        "enforce",
        "      deny:\n        - { cidr: 192.0.2.0/24 }\n"
    )));
    for path in [&at17, &at40, &beyond_walk] {
        assert_eq!(probe(&cg, &["read", path]), Outcome::Ok(4));
    }
}
