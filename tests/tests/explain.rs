//! `portcullis explain` and `portcullis replay` on a real trail: the
//! audit-to-enforce workflow, end to end.

use portcullis_tests::{Agent, Cgroup, Listener, Outcome, TempDir, policy_header, probe};

fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = portcullis_tests::agent_cli(args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn explain_agrees_with_the_kernels_log_and_replay_shows_what_enforce_would_deny() {
    portcullis_tests::require_kernel!();
    let tmp = TempDir::new("explain");
    std::fs::create_dir_all(tmp.path("secrets")).unwrap();
    std::fs::create_dir_all(tmp.path("bin")).unwrap();
    std::fs::write(tmp.path("secrets/token"), b"t0ken").unwrap();
    std::fs::copy("/bin/true", tmp.path("bin/tool")).unwrap();
    let l = Listener::new("127.0.0.1");
    let cg = Cgroup::create("explain");
    let policy = |mode: &str| {
        format!(
            "{}  exec:\n    deny: [\"{}\"]\n  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{}\"] }}\n  files:\n    - {{ path: \"{}/**\", access: none }}\n  devices:\n    deny:\n      - {{ device: \"c 195:1\", access: [mknod] }}\n",
            policy_header("explain", mode, &cg.path),
            tmp.str("bin/tool"),
            l.port,
            tmp.str("secrets")
        )
    };
    let (audit, enforce) = (tmp.str("audit.yaml"), tmp.str("enforce.yaml"));
    std::fs::write(&audit, policy("audit")).unwrap();
    std::fs::write(&enforce, policy("enforce")).unwrap();
    let port = l.port.to_string();
    let token = tmp.str("secrets/token");
    let tool = tmp.str("bin/tool");
    let gpu1 = tmp.str("gpu1");
    let calls: [(&str, Vec<&str>); 4] = [
        ("exec", vec!["exec", &tool]),
        ("open", vec!["read", &token]),
        ("connect", vec!["connect", "127.0.0.1", &port]),
        ("device", vec!["mknod", &gpu1, "195", "1"]),
    ];

    // A week in audit mode, in brief: everything runs, and is logged.
    let mut agent = Agent::start(&policy("audit"));
    for (action, args) in &calls {
        let got = probe(&cg, args);
        assert!(
            matches!(got, Outcome::Ok(_) | Outcome::Exited(0)),
            "{action} in audit mode: {got:?}"
        );
    }
    let mut lines = Vec::new();
    for (action, _) in &calls {
        lines.push(agent.wait_decision(action, |d| {
            d["action"] == *action && d["workload"]["cgroup"] == cg.path.as_str()
        }));
    }
    let log = tmp.path("decisions.jsonl");
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&log, &text).unwrap();
    let log = log.to_str().unwrap();

    // explain decides each line again and names what the kernel named.
    let (code, stdout, stderr) = cli(&["explain", "-p", &audit, "--log", log, "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let explained: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(explained.len(), 4, "{stdout}");
    for (e, logged) in explained.iter().zip(&lines) {
        assert_eq!(e["verdict"], logged["verdict"], "{e}\n{logged}");
        assert_eq!(e["verdict"], "audit");
        assert_eq!(e["rule"], logged["rule"], "{e}\n{logged}");
        assert_eq!(
            e["policies"][0].as_str().unwrap(),
            format!("explain ({audit})")
        );
        assert!(
            e["matched"][0]["at"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{audit}:")),
            "the matched rule's file:line: {e}"
        );
    }
    let (_, text_out, _) = cli(&["explain", "-p", &audit, "--log", log]);
    assert!(
        text_out.contains("why: an audit-mode rule denies"),
        "{text_out}"
    );

    // Replayed against the same policy nothing changes; against the enforce
    // version every line would now be denied.
    let (code, stdout, _) = cli(&["replay", "-p", &audit, log]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("4 decisions replayed: 0 newly denied"),
        "{stdout}"
    );
    let (code, stdout, _) = cli(&["replay", "-p", &enforce, log, "--json"]);
    assert_eq!(code, Some(1), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["replayed"], 4);
    let changes: Vec<&str> = r["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["change"].as_str().unwrap())
        .collect();
    assert_eq!(changes, ["newly_denied"; 4], "{r}");

    // And the kernel, under the enforce version, does what replay said.
    assert!(agent.reload(&policy("enforce")));
    // (a node that exists already would fail with EEXIST before the check)
    std::fs::remove_file(tmp.path("gpu1")).unwrap();
    for (action, args) in &calls {
        let denied = match *action {
            "connect" | "device" => Outcome::Errno(portcullis_tests::EPERM),
            hook => agent.denied(hook),
        };
        assert_eq!(probe(&cg, args), denied, "{action} under enforce");
    }
}
