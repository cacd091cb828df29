//! Operating the agent: enforcement that outlives it (pins), and reloads
//! that never open a gap.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use portcullis_tests::{
    Agent, Cgroup, EPERM, Listener, Outcome, TempDir, agent_cli, pin_dir, pin_hash_map,
    policy_header, probe, require_kernel, spawn_hammer,
};

/// Removes a pin directory on drop (`portcullis uninstall`), so a failed
/// test never leaves programs enforcing.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = agent_cli(&["uninstall", "--pin-dir", &self.0.display().to_string()]);
    }
}

fn link_pins(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("links"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Unpinned links detach from a kernel work item, a moment after the pin
/// goes: poll for the effect, for at most a few seconds.
fn eventually_connects(cg: &Cgroup, port: &str) {
    let start = std::time::Instant::now();
    while probe(cg, &["connect", "127.0.0.1", port]) != Outcome::Ok(0) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still denied 5 s after the pins went"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn egress(cg: &Cgroup, body: &str) -> String {
    format!(
        "{}  network:\n    egress:\n{body}",
        policy_header("egress", "enforce", &cg.path)
    )
}

/// A policy denying `cg` connects to 127.0.0.1:`port`.
fn deny_port(cg: &Cgroup, port: &str) -> String {
    egress(
        cg,
        &format!("      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"] }}\n"),
    )
}

#[test]
fn enforcement_survives_kill_and_a_restart_adopts_the_pins() {
    require_kernel!();
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("pinned");
    let pins = Pins(pin_dir());
    let pin_arg = pins.0.display().to_string();
    let deny = deny_port(&cg, &port);

    // Maps an agent of another map layout left behind: removed once no
    // program of that agent is left.
    let stale = pins.0.join("maps-v0");
    std::fs::create_dir_all(&stale).unwrap();
    pin_hash_map(&stale.join("OLD"));

    let mut first = Agent::start_with(&deny, &["--pin-dir", &pin_arg]);
    assert!(!stale.exists(), "stale maps of another layout removed");
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    let links_first = link_pins(&pins.0);
    assert!(
        links_first.len() >= 7,
        "one pinned link per attached program: {links_first:?}"
    );

    // A crash: no cleanup runs. The pinned programs keep enforcing.
    first.kill9();
    for _ in 0..3 {
        assert_eq!(
            probe(&cg, &["connect", "127.0.0.1", &port]),
            Outcome::Errno(EPERM)
        );
    }
    assert_eq!(link_pins(&pins.0), links_first);

    // A restart adopts the pinned maps and replaces the links: as many as
    // before, none of the old instance's left (no duplicates attached).
    let mut second = Agent::start_with(&deny, &["--pin-dir", &pin_arg]);
    assert!(
        second.log().contains("adopting the pinned maps"),
        "{}",
        second.log()
    );
    let links_second = link_pins(&pins.0);
    assert_eq!(links_second.len(), links_first.len(), "{links_second:?}");
    assert!(
        links_second.iter().all(|l| !links_first.contains(l)),
        "old links retired: {links_second:?}"
    );
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    let d = second.wait_decision("deny logged after restart", |d| {
        d["workload"]["cgroup"] == cg.path.as_str()
    });
    assert_eq!(d["verdict"], "deny");

    // Reload still works on the adopted maps, and the log says what changed.
    assert!(second.reload(&egress(&cg, "      default: allow\n")));
    assert!(
        second.log().contains("rules_added=0 rules_removed=1"),
        "{}",
        second.log()
    );
    assert_eq!(probe(&cg, &["connect", "127.0.0.1", &port]), Outcome::Ok(0));
    assert!(second.reload(&deny));
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );

    // A clean stop without --detach-on-exit keeps enforcing too ...
    drop(second);
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    // ... until `portcullis uninstall` removes the pins.
    let out = agent_cli(&["uninstall", "--pin-dir", &pin_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.0.exists());
    eventually_connects(&cg, &port);
}

#[test]
fn detach_on_exit_stops_enforcement_with_the_agent() {
    require_kernel!();
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("detach");
    let pins = Pins(pin_dir());
    let pin_arg = pins.0.display().to_string();
    let deny = deny_port(&cg, &port);
    let agent = Agent::start_with(&deny, &["--pin-dir", &pin_arg, "--detach-on-exit"]);
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &port]),
        Outcome::Errno(EPERM)
    );
    drop(agent);
    assert!(!pins.0.exists(), "pins removed on exit");
    eventually_connects(&cg, &port);
}

/// Reloads hundreds of times while a process in the governed cgroup
/// hammers allowed and denied connects and allowed reads, and (one process
/// per attempt, since the fallback kills) denied opens, denied execs and
/// allowed execs. No denied call may ever succeed and no allowed call may
/// ever fail.
#[test]
fn hundreds_of_reloads_never_let_a_denied_call_through_or_fail_an_allowed_one() {
    require_kernel!();
    let allowed = Listener::new("127.0.0.1");
    let denied = Listener::new("127.0.0.1");
    let cg = Arc::new(Cgroup::create("hammer"));
    let tmp = TempDir::new("hammer");
    std::fs::create_dir_all(tmp.path("secret")).unwrap();
    std::fs::create_dir_all(tmp.path("other")).unwrap();
    std::fs::create_dir_all(tmp.path("other2")).unwrap();
    std::fs::write(tmp.path("secret/key"), "secret").unwrap();
    std::fs::write(tmp.path("open.txt"), "open").unwrap();
    std::fs::copy("/bin/true", tmp.path("allowed-true")).unwrap();
    std::fs::copy("/bin/true", tmp.path("denied-true")).unwrap();
    let (allowed_exe, denied_exe) = (tmp.str("allowed-true"), tmp.str("denied-true"));
    let secret = tmp.str("secret/key");
    let open = tmp.str("open.txt");

    // Two policies that decide every hammered call the same way but differ
    // in other rules, so each reload writes a genuinely new generation.
    let policy = |extra_cidr: &str, extra_dir: &str| {
        format!(
            "{}  exec:\n    deny: [\"{}\"]\n  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{}\"], protocol: tcp }}\n        - {{ cidr: {extra_cidr} }}\n  files:\n    - {{ path: \"{}/secret/**\", access: none }}\n    - {{ path: \"{}/{extra_dir}/**\", access: none }}\n",
            policy_header("hammer", "enforce", &cg.path),
            denied_exe,
            denied.port,
            tmp.0.display(),
            tmp.0.display(),
        )
    };
    let a = policy("10.99.0.0/16", "other");
    let b = policy("192.0.2.0/24", "other2");
    // Under QEMU TCG (`cargo xtask vm` sets PORTCULLIS_VM) one reload takes
    // ~1.4 s instead of tens of ms: hammer longer, expect fewer reloads.
    let (secs, min_reloads) = if std::env::var_os("PORTCULLIS_VM").is_some() {
        (30, 10)
    } else {
        (20, 100)
    };
    let mut agent = Agent::start(&a);
    let killed_or_eperm = agent.denied("open");
    let exec_denied = agent.denied("exec");
    assert_eq!(probe(&cg, &["read", &secret]), killed_or_eperm);
    assert_eq!(probe(&cg, &["exec", &denied_exe]), exec_denied);
    assert_eq!(probe(&cg, &["exec", &allowed_exe]), Outcome::Exited(0));

    let stop = Arc::new(AtomicBool::new(false));
    let (opens, bad_opens) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let opener = {
        let (stop, opens, bad_opens, cg, secret) = (
            stop.clone(),
            opens.clone(),
            bad_opens.clone(),
            cg.clone(),
            secret.clone(),
        );
        let checks = [
            (vec!["read".to_owned(), secret], killed_or_eperm.clone()),
            (
                vec!["exec".to_owned(), denied_exe.clone()],
                exec_denied.clone(),
            ),
            (
                vec!["exec".to_owned(), allowed_exe.clone()],
                Outcome::Exited(0),
            ),
        ];
        std::thread::spawn(move || {
            let vm = std::env::var_os("PORTCULLIS_VM").is_some();
            for (args, expected) in checks.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if vm {
                    // Leave the emulated guest's CPU to the agent too.
                    std::thread::sleep(Duration::from_millis(20));
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                opens.fetch_add(1, Ordering::Relaxed);
                let got = probe(&cg, &args);
                if got != *expected {
                    eprintln!("{args:?}: expected {expected:?}, got {got:?}");
                    bad_opens.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let hammer = spawn_hammer(cg.clone(), secs, allowed.port, denied.port, open.clone());

    let mut reloads = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(secs - 2) && reloads < 300 {
        assert!(
            agent.reload(if reloads % 2 == 0 { &b } else { &a }),
            "reload {reloads} rejected"
        );
        reloads += 1;
    }
    let out = hammer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    opener.join().unwrap();

    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "hammer report: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!(
        "{reloads} reloads; hammer {report}; {} denied opens and denied/allowed execs, {} wrong",
        opens.load(Ordering::Relaxed),
        bad_opens.load(Ordering::Relaxed)
    );
    if report["violations"] != 0 || bad_opens.load(Ordering::Relaxed) != 0 {
        // What the agent decided about the hammered files, and why.
        for d in agent.decisions().iter().filter(|d| {
            let line = d.to_string();
            line.contains("open.txt") || line.contains("secret/key")
        }) {
            eprintln!("decision: {d}");
        }
    }
    // Hook runs the kernel skipped, and errors: what to look at first when
    // a call went wrong.
    if let Some((_, body)) = agent.http("/metrics") {
        for l in body.lines().filter(|l| {
            l.starts_with("portcullis_kernel_errors")
                || l.starts_with("portcullis_hook_runs_skipped")
        }) {
            eprintln!("{l}");
        }
    }
    assert!(
        reloads >= min_reloads,
        "only {reloads} reloads in the time allowed"
    );
    assert!(report["rounds"].as_u64().unwrap() > 100, "{report}");
    assert_eq!(report["violations"], 0, "{report}");
    assert!(opens.load(Ordering::Relaxed) > 10);
    assert_eq!(bad_opens.load(Ordering::Relaxed), 0);
}

/// Scrapes a running agent: the kernel's per-CPU decision counters move
/// with real syscalls, per deciding policy for denies, and the health and
/// map gauges are there.
#[test]
fn metrics_move_with_real_syscalls() {
    require_kernel!();
    let listener = Listener::new("127.0.0.1");
    let other = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("metrics");
    let deny = deny_port(&cg, &port);
    let agent = Agent::start(&deny);
    assert_eq!(agent.http("/healthz").map(|r| r.0), Some(200));
    assert_eq!(agent.http("/readyz").map(|r| r.0), Some(200));

    let denied = r#"portcullis_decisions_total{action="connect",verdict="deny",policy="egress"}"#;
    let allowed = r#"portcullis_decisions_total{action="connect",verdict="allow",policy=""}"#;
    let (d0, a0) = (agent.metric(denied), agent.metric(allowed));
    for _ in 0..3 {
        assert_eq!(
            probe(&cg, &["connect", "127.0.0.1", &port]),
            Outcome::Errno(EPERM)
        );
        assert_eq!(
            probe(&cg, &["connect", "127.0.0.1", &other.port.to_string()]),
            Outcome::Ok(0)
        );
    }
    assert_eq!(agent.metric(denied) - d0, 3.0);
    // Every connect on the host counts, so at least ours.
    assert!(agent.metric(allowed) - a0 >= 3.0);
    assert!(agent.metric("portcullis_decisions_logged_total") >= 3.0);
    assert_eq!(agent.metric("portcullis_events_lost_total"), 0.0);
    assert_eq!(agent.metric("portcullis_policies"), 1.0);
    assert!(agent.metric(r#"portcullis_map_entries{map="net_rules"}"#) >= 1.0);
    assert!(agent.metric(r#"portcullis_map_capacity{map="net_rules"}"#) >= 1024.0);
    assert_eq!(
        agent.metric(r#"portcullis_backend{hook="connect",backend="cgroup_sock_addr"}"#),
        1.0
    );
    assert!(agent.metric("portcullis_policy_last_reload_success_timestamp_seconds") > 1.7e9);
    let (_, body) = agent.http("/metrics").unwrap();
    assert!(body.contains("portcullis_build_info{version="), "{body}");

    // The decision trail is hash-chained: it verifies, and an edited line
    // is named.
    let log = agent.dir.join("decisions.jsonl");
    let verify = |p: &Path| agent_cli(&["verify-log", &p.display().to_string()]);
    let out = verify(&log);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let forged = log.with_extension("forged");
    std::fs::write(
        &forged,
        text.replacen("\"verdict\":\"deny\"", "\"verdict\":\"allow\"", 1),
    )
    .unwrap();
    let out = verify(&forged);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 1 (seq 1): chain mismatch"),
        "{out:?}"
    );
    assert!(
        body.contains(r#"portcullis_kernel_errors_total{hook="open"} 0"#),
        "{body}"
    );
}

/// A scratch directory with `bin/denied` (a copy of `true`) and `secret`,
/// a cgroup, and a policy `name` denying that cgroup both.
fn denying_a_binary_and_a_file(name: &str) -> (TempDir, Cgroup, String) {
    let tmp = TempDir::new(name);
    std::fs::create_dir_all(tmp.path("bin")).unwrap();
    std::fs::copy("/bin/true", tmp.path("bin/denied")).unwrap();
    std::fs::write(tmp.path("secret"), b"hunter2").unwrap();
    let cg = Cgroup::create(name);
    let policy = format!(
        "{}  exec:\n    deny: [\"{}\"]\n  files:\n    - {{ path: \"{}\", access: none }}\n",
        policy_header(name, "enforce", &cg.path),
        tmp.str("bin/denied"),
        tmp.str("secret"),
    );
    (tmp, cg, policy)
}

/// The tracepoint fallbacks run as twins, two programs per event so that
/// one decides what the kernel skips for the other (see the eBPF crate's
/// `twins.rs`): each denied open and exec is still killed, counted and
/// logged exactly once, every program's skips are exported, and a twin
/// that cannot attach is said as a gap while its sibling keeps enforcing.
#[test]
fn twin_hooks_decide_each_event_once_and_a_missing_twin_is_a_gap() {
    require_kernel!();
    let (tmp, cg, policy) = denying_a_binary_and_a_file("twins");
    let (secret, denied) = (tmp.str("secret"), tmp.str("bin/denied"));
    let agent = Agent::start_with(&policy, &["--force-fallback"]);
    for action in ["open", "exec"] {
        assert_eq!(agent.backend(action), "tracepoint_kill");
    }
    for _ in 0..3 {
        assert_eq!(probe(&cg, &["read", &secret]), Outcome::Killed(9));
        assert_eq!(probe(&cg, &["exec", &denied]), Outcome::Killed(9));
    }
    for action in ["open", "exec"] {
        let sample = format!(
            r#"portcullis_decisions_total{{action="{action}",verdict="deny",policy="twins"}}"#
        );
        assert_eq!(
            agent.metric(&sample),
            3.0,
            "{action}: one decision per event"
        );
    }
    let logged = |agent: &Agent, action: &str| {
        agent
            .decisions()
            .iter()
            .filter(|d| d["action"] == action && d["verdict"] == "deny")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (logged(&agent, "open") < 3 || logged(&agent, "exec") < 3)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        logged(&agent, "open"),
        3,
        "one decision line per denied open"
    );
    assert_eq!(
        logged(&agent, "exec"),
        3,
        "one decision line per denied exec"
    );
    let (_, body) = agent.http("/metrics").unwrap();
    for program in ["open_tp", "open_tp_twin", "exec_tp", "exec_tp_twin"] {
        assert!(
            body.contains(&format!(
                r#"portcullis_hook_runs_skipped_total{{program="{program}"}}"#
            )),
            "{body}"
        );
    }
    drop(agent);

    // Either twin alone still enforces (a node without tracefs has no
    // classic tracepoints, for one), and says the gap.
    for refused in ["open_tp_twin", "open_tp"] {
        let refuse = ["--force-fallback", "--test-refuse-program", refused];
        // Ready (the action is enforced), and the gap said.
        let agent = Agent::start_until(
            &policy,
            &refuse,
            "a ready /readyz saying the gap",
            |code, body| code == 200 && body.contains("gaps"),
        );
        let (_, body) = agent.http("/readyz").unwrap();
        assert!(
            body.contains(&format!("open enforced with gaps ({refused}: ")),
            "{body}"
        );
        assert_eq!(
            agent.metric(&format!(
                r#"portcullis_hook_twin_missing{{program="{refused}"}}"#
            )),
            1.0
        );
        assert_eq!(agent.backend("open"), "tracepoint_kill");
        assert!(
            agent.log().contains(&format!(
                "open is enforced with gaps: {refused} did not attach"
            )),
            "{}",
            agent.log()
        );
        assert_eq!(probe(&cg, &["read", &secret]), Outcome::Killed(9));
    }
}

/// A hook that cannot load on any backend: the agent enforces what loaded
/// and says what is missing (log ERROR, `/readyz` 503 naming it,
/// `backend="none"`); with `--require-hooks` it refuses to start.
#[test]
fn a_hook_without_any_backend_degrades_loudly_and_the_rest_still_enforces() {
    require_kernel!();
    let (tmp, cg, policy) = denying_a_binary_and_a_file("degraded");
    let refuse = [
        "--test-refuse-program",
        "open_lsm",
        "--test-refuse-program",
        "open_tp",
        "--test-refuse-program",
        "open_tp_twin",
    ];
    let agent = Agent::start_until(&policy, &refuse, "a degraded /readyz", |code, body| {
        code == 503 && body.starts_with("degraded:")
    });
    let (_, body) = agent.http("/readyz").unwrap();
    assert!(body.contains("open not enforced"), "{body}");
    assert_eq!(agent.backend("open"), "none");
    assert_ne!(agent.backend("exec"), "none");
    assert_eq!(
        agent
            .log()
            .matches("open is NOT enforced on this node")
            .count(),
        1,
        "{}",
        agent.log()
    );
    // What loaded enforces; what did not, does not.
    assert_eq!(
        probe(&cg, &["exec", &tmp.str("bin/denied")]),
        agent.denied("exec")
    );
    assert_eq!(probe(&cg, &["read", &tmp.str("secret")]), Outcome::Ok(7));
    drop(agent);

    let mut args = vec!["run", "--policy", "/nonexistent-is-never-read", "--no-pin"];
    args.extend(refuse);
    args.push("--require-hooks");
    let dir = TempDir::new("required");
    let p = dir.path("p.yaml");
    std::fs::write(&p, &policy).unwrap();
    args[2] = p.to_str().unwrap();
    let out = agent_cli(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("open cannot be enforced on this kernel (--require-hooks)"),
        "{err}"
    );
}
