//! Every decision line names the policy and rule of the generation that
//! decided it: across a reload storm under a decision flood (events decided
//! before a flip and read after it) and across a restart (events left in
//! the pinned ring buffer by the instance before).

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use nix::sys::signal::Signal;
use portcullis_tests::{
    Agent, Cgroup, EPERM, Listener, Outcome, TempDir, agent_cli, pin_dir, policy_header, probe,
    require_kernel, spawn_hammer,
};
use serde_json::Value;

/// Removes a pin directory the agents under test shared.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = agent_cli(&["uninstall", "--pin-dir", &self.0.display().to_string()]);
    }
}

/// Which deny rule of `policy` the hammered connect hits. Each policy puts
/// it at another index, so a line named with another generation's tables
/// shows a mismatch.
fn deny_index(policy: &str) -> Option<usize> {
    match policy {
        "names-a" => Some(0),
        "names-b" => Some(1),
        "names-c" => Some(2),
        _ => None,
    }
}

/// Checks every deny line of `cg` and returns how many there were per
/// policy. The same generation must always carry the same policy.
fn check_lines(
    lines: &[Value],
    cg: &str,
    port: u16,
    by_generation: &mut BTreeMap<u64, String>,
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for d in lines
        .iter()
        .filter(|d| d["action"] == "connect" && d["workload"]["cgroup"] == cg)
    {
        let policy = d["policy"].as_str().unwrap_or_default();
        let index =
            deny_index(policy).unwrap_or_else(|| panic!("line names policy {policy:?}: {d}"));
        let expected = format!("network.egress.deny[{index}] 127.0.0.1/32");
        let rule = d["rule"].as_str().unwrap_or_default();
        assert!(
            rule.starts_with(&expected),
            "{rule:?} is not {expected:?}: {d}"
        );
        assert_eq!(d["target"]["port"], port, "{d}");
        let generation = d["generation"].as_u64().expect("generation field");
        let first = by_generation
            .entry(generation)
            .or_insert_with(|| policy.to_owned());
        assert_eq!(first, policy, "generation {generation} named two policies");
        *seen.entry(policy.to_owned()).or_insert(0) += 1;
    }
    seen
}

#[test]
fn every_line_names_the_generation_that_decided_it_across_reloads_and_a_restart() {
    require_kernel!();
    let allowed = Listener::new("127.0.0.1");
    let denied = Listener::new("127.0.0.1");
    let cg = Arc::new(Cgroup::create("names"));
    let tmp = TempDir::new("names");
    std::fs::write(tmp.path("open.txt"), "open").unwrap();
    let pins = Pins(pin_dir());
    let shared = [
        "--pin-dir".to_owned(),
        pins.0.display().to_string(),
        "--generations-dir".to_owned(),
        tmp.str("generations"),
    ];
    let shared: Vec<&str> = shared.iter().map(String::as_str).collect();
    let variant = |name: &str, before: &[&str], port: u16| {
        let mut deny: String = before
            .iter()
            .map(|c| format!("        - {{ cidr: {c} }}\n"))
            .collect();
        deny += &format!("        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"] }}\n");
        format!(
            "{}  network:\n    egress:\n      deny:\n{deny}",
            policy_header(name, "enforce", &cg.path)
        )
    };
    let a = variant("names-a", &[], denied.port);
    let b = variant("names-b", &["192.0.2.0/24"], denied.port);
    let c = variant("names-c", &["192.0.2.0/24", "198.51.100.0/24"], denied.port);
    let secs: u64 = if std::env::var_os("PORTCULLIS_VM").is_some() {
        20
    } else {
        8
    };

    let mut first = Agent::start_with(&a, &shared);
    let hammer = spawn_hammer(
        cg.clone(),
        secs,
        allowed.port,
        denied.port,
        tmp.str("open.txt"),
    );
    let start = std::time::Instant::now();
    let mut reloads = 0;
    while start.elapsed() < Duration::from_secs(secs - 2) && reloads < 200 {
        assert!(first.reload(if reloads % 2 == 0 { &b } else { &a }));
        reloads += 1;
    }
    let out = hammer.join().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).expect("hammer report");
    assert_eq!(report["violations"], 0, "{report}");
    // Let the first instance drain what the flood left in the ring buffer,
    // so the denials below find room in it.
    let mut logged = usize::MAX;
    while logged != first.decisions().len() {
        logged = first.decisions().len();
        std::thread::sleep(Duration::from_millis(500));
    }

    // Stopped, the first instance reads nothing more: these denials wait in
    // the pinned ring buffer for the next instance, decided by the first
    // one's generation.
    first.signal(Signal::SIGSTOP);
    for _ in 0..5 {
        assert_eq!(
            probe(&cg, &["connect", "127.0.0.1", &denied.port.to_string()]),
            Outcome::Errno(EPERM)
        );
    }
    first.kill9();

    let mut by_generation = BTreeMap::new();
    let before = check_lines(
        &first.decisions(),
        &cg.path,
        denied.port,
        &mut by_generation,
    );
    eprintln!("{reloads} reloads; first instance logged {before:?}");
    assert!(
        reloads >= 2 && before.len() == 2,
        "both generations logged: {before:?}"
    );

    let mut second = Agent::start_with(&c, &shared);
    second.wait_until("the leftover events logged", Duration::from_secs(10), |s| {
        s.decisions()
            .iter()
            .filter(|d| d["workload"]["cgroup"] == cg.path.as_str())
            .count()
            >= 5
    });
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &denied.port.to_string()]),
        Outcome::Errno(EPERM)
    );
    second.wait_decision("the second instance's own line", |d| {
        d["policy"] == "names-c"
    });
    let after = check_lines(
        &second.decisions(),
        &cg.path,
        denied.port,
        &mut by_generation,
    );
    eprintln!("second instance logged {after:?}");
    let leftovers: usize = after
        .iter()
        .filter(|(p, _)| p.as_str() != "names-c")
        .map(|(_, n)| n)
        .sum();
    assert!(
        leftovers >= 5,
        "leftover lines named by the first instance's generation: {after:?}"
    );

    // Allowed once the policy no longer denies the port.
    assert!(second.reload(&variant(
        "names-c",
        &["192.0.2.0/24", "198.51.100.0/24"],
        allowed.port
    )));
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &denied.port.to_string()]),
        Outcome::Ok(0)
    );
}
