//! `portcullis test`: policy tests as security engineers run them in CI, and
//! proof that what they predict is what the kernel then does.

use std::process::Command;

use portcullis_tests::{Agent, Cgroup, Listener, Outcome, TempDir, policy_header, probe};

fn agent() -> Command {
    let bin = std::env::var("PORTCULLIS_BIN")
        .unwrap_or_else(|_| format!("{}/../target/debug/portcullis", env!("CARGO_MANIFEST_DIR")));
    Command::new(bin)
}

fn run_test(args: &[&str]) -> (Option<i32>, String, String) {
    let out = agent().arg("test").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const HEADER: &str = "apiVersion: portcullis.dev/v1alpha1\nkind: PolicyTest\n";

#[test]
fn the_bundled_policy_tests_pass() {
    let dir = format!("{}/../policies/tests", env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = run_test(&[&dir]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn a_failing_case_names_its_line_and_the_deciding_rule_in_text_junit_and_json() {
    let tmp = TempDir::new("ptest-fail");
    let policy = format!(
        "{}  files:\n    - {{ path: \"/srv/secrets/**\", access: none }}\n    - {{ path: \"/srv/unused\", access: none }}\n",
        policy_header("ptest", "enforce", "/jobs/**")
    );
    std::fs::write(tmp.path("policy.yaml"), policy).unwrap();
    let case = |name: &str, verdict: &str| {
        format!(
            "  - name: {name}\n    workload: {{cgroup: /jobs/a}}\n    open: {{path: /srv/secrets/key, access: read}}\n    expect: {{verdict: {verdict}}}\n"
        )
    };
    let file = tmp.path("t.yaml");
    std::fs::write(
        &file,
        format!(
            "{HEADER}policies: [policy.yaml]\ncases:\n{}{}",
            case("denied as expected", "deny"),
            case("wrongly expected allowed", "allow")
        ),
    )
    .unwrap();
    let (junit, json) = (tmp.str("out.xml"), tmp.str("out.json"));
    let (code, stdout, _) = run_test(&[
        file.to_str().unwrap(),
        "--junit",
        &junit,
        "--json",
        &json,
        "--coverage",
    ]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{}:9: FAIL wrongly expected allowed: expected allow, got deny by ptest: files[0] /srv/secrets/**",
            file.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("2 cases, 1 passed, 1 failed"), "{stdout}");
    assert!(
        stdout.contains("ptest: files[1] /srv/unused"),
        "coverage: {stdout}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
    assert!(
        xml.contains("<failure message=\"expected allow, got deny"),
        "{xml}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["failed"], 1);
    assert_eq!(v["cases"][1]["got"]["rule"], "files[0] /srv/secrets/**");
    assert_eq!(v["cases"][1]["line"], 9);
    assert_eq!(
        v["uncovered"],
        serde_json::json!(["ptest: files[1] /srv/unused"])
    );
}

#[test]
fn a_bad_test_file_names_file_line_and_field_and_runs_nothing() {
    let tmp = TempDir::new("ptest-bad");
    let file = tmp.path("t.yaml");
    std::fs::write(
        &file,
        format!(
            "{HEADER}policies: [/nonexistent.yaml]\ncases:\n  - name: two actions\n    workload: {{cgroup: /a}}\n    exec: /bin/x\n    open: {{path: /etc/x, access: read}}\n    expect: {{verdict: deny}}\n"
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run_test(&[file.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("{}:5:5: cases[0].exec:", file.display())),
        "{stderr}"
    );
    assert!(!stdout.contains("cases,"), "nothing ran: {stdout}");
    std::fs::write(
        &file,
        format!(
            "{HEADER}policies: []\ncases:\n  - name: typo\n    workload: {{cgroup: /a}}\n    exec: /bin/x\n    expect: {{verdikt: deny}}\n"
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_test(&[file.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!(
            "{}:8:14: yaml: unknown field `verdikt`",
            file.display()
        )),
        "{stderr}"
    );
}

/// What `portcullis test` predicts for a policy is what the kernel does
/// with it: the cases name real paths (the fixture recreates them), then
/// the same requests are made as real syscalls (exec, open, connect,
/// mknod) in a real cgroup.
#[test]
fn policy_test_predictions_match_the_kernel() {
    portcullis_tests::require_kernel!();
    let tmp = TempDir::new("ptest-kernel");
    for d in ["secrets", "data", "bin"] {
        std::fs::create_dir_all(tmp.path(d)).unwrap();
    }
    std::fs::write(tmp.path("secrets/token"), b"t0ken").unwrap();
    std::fs::write(tmp.path("data/ok"), b"ok").unwrap();
    std::fs::copy("/bin/true", tmp.path("bin/evil")).unwrap();
    std::fs::copy("/bin/true", tmp.path("bin/fine")).unwrap();
    let (denied_l, allowed_l) = (Listener::new("127.0.0.1"), Listener::new("127.0.0.1"));
    let cg = Cgroup::create("ptest-kernel");
    let t = |rel: &str| tmp.str(rel);
    let policy = format!(
        "{}  exec:\n    deny: [\"{}\"]\n  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{}\"], protocol: tcp }}\n  files:\n    - {{ path: \"{}/**\", access: none }}\n    - {{ path: \"{}/**\", access: read }}\n  devices:\n    deny:\n      - {{ device: \"c 195:1\", access: [mknod] }}\n",
        policy_header("ptest-kernel", "enforce", &cg.path),
        t("bin/evil"),
        denied_l.port,
        t("secrets"),
        t("data"),
    );
    std::fs::write(tmp.path("policy.yaml"), &policy).unwrap();
    // (test case action, probe arguments, hook)
    let cases: Vec<(String, Vec<String>, &str)> = vec![
        (
            format!("exec: {}", t("bin/evil")),
            vec!["exec".into(), t("bin/evil")],
            "exec",
        ),
        (
            format!("exec: {}", t("bin/fine")),
            vec!["exec".into(), t("bin/fine")],
            "exec",
        ),
        (
            format!("open: {{path: {}, access: read}}", t("secrets/token")),
            vec!["read".into(), t("secrets/token")],
            "open",
        ),
        (
            format!("open: {{path: {}, access: read}}", t("data/ok")),
            vec!["read".into(), t("data/ok")],
            "open",
        ),
        (
            format!("open: {{path: {}, access: write}}", t("data/ok")),
            vec!["write".into(), t("data/ok")],
            "open",
        ),
        (
            format!("connect: {{address: 127.0.0.1, port: {}}}", denied_l.port),
            vec![
                "connect".into(),
                "127.0.0.1".into(),
                denied_l.port.to_string(),
            ],
            "connect",
        ),
        (
            format!("connect: {{address: 127.0.0.1, port: {}}}", allowed_l.port),
            vec![
                "connect".into(),
                "127.0.0.1".into(),
                allowed_l.port.to_string(),
            ],
            "connect",
        ),
        (
            "device: {device: \"c 195:1\", access: [mknod]}".into(),
            vec!["mknod".into(), t("gpu1"), "195".into(), "1".into()],
            "device",
        ),
        (
            "device: {device: \"c 195:2\", access: [mknod]}".into(),
            vec!["mknod".into(), t("gpu2"), "195".into(), "2".into()],
            "device",
        ),
    ];
    let mut file = format!("{HEADER}policies: [policy.yaml]\ncases:\n");
    for (i, (action, _, _)) in cases.iter().enumerate() {
        // The expectation is only a placeholder: the prediction is what is
        // compared with the kernel.
        file.push_str(&format!(
            "  - name: case {i}\n    workload: {{cgroup: {}}}\n    {action}\n    expect: {{verdict: allow}}\n",
            cg.path
        ));
    }
    std::fs::write(tmp.path("t.yaml"), file).unwrap();
    let json = tmp.str("out.json");
    let (_, stdout, stderr) = run_test(&[&tmp.str("t.yaml"), "--json", &json]);
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}")),
    )
    .unwrap();
    let predicted: Vec<&str> = (0..cases.len())
        .map(|i| report["cases"][i]["got"]["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(
        predicted,
        [
            "deny", "allow", "deny", "allow", "deny", "deny", "allow", "deny", "allow"
        ],
        "{report}"
    );
    let agent = Agent::start(&policy);
    for ((action, args, hook), want) in cases.iter().zip(&predicted) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let got = probe(&cg, &args);
        // Connect and device access are refused with EPERM on every backend.
        let denied = match *hook {
            "connect" | "device" => Outcome::Errno(portcullis_tests::EPERM),
            _ => agent.denied(hook),
        };
        let kernel = if got == denied {
            "deny"
        } else {
            assert!(
                matches!(got, Outcome::Ok(_) | Outcome::Exited(0)),
                "{action}: {got:?}"
            );
            "allow"
        };
        assert_eq!(kernel, *want, "{action}: the kernel did {got:?}");
    }
}
