//! `portcullis test`: policy tests as security engineers run them in CI, and
//! proof that what they predict is what the kernel then does.

use portcullis_tests::{Agent, Cgroup, Listener, Outcome, TempDir, policy_header, probe};

fn run_test(args: &[&str]) -> (Option<i32>, String, String) {
    let out = portcullis_tests::agent_cli(&[&["test"], args].concat());
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
        "{}  exec:\n    deny: [\"{}\"]\n  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{}\"], protocol: tcp }}\n    sockets:\n      deny: [raw]\n  files:\n    - {{ path: \"{}/**\", access: none }}\n    - {{ path: \"{}/**\", access: read }}\n  devices:\n    deny:\n      - {{ device: \"c 195:1\", access: [mknod] }}\n",
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
        (
            "socket: {kind: raw}".into(),
            vec![
                "raw-send".into(),
                "127.0.0.1".into(),
                "253".into(),
                "x".into(),
            ],
            "socket",
        ),
        (
            "socket: {kind: icmp, family: inet}".into(),
            vec!["ping".into()],
            "socket",
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
            "deny", "allow", "deny", "allow", "deny", "deny", "allow", "deny", "allow", "deny",
            "allow"
        ],
        "{report}"
    );
    let agent = Agent::start(&policy);
    for ((action, args, hook), want) in cases.iter().zip(&predicted) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let got = probe(&cg, &args);
        // Connects, devices and sockets are refused with EPERM on every
        // backend.
        let denied = match *hook {
            "connect" | "device" | "socket" => Outcome::Errno(portcullis_tests::EPERM),
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

/// A small xorshift generator: random policies without another dependency,
/// reproducible from the seed the failure message prints.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
    fn pick<'a>(&mut self, of: &'a [&'a str]) -> &'a str {
        of[self.below(of.len())]
    }
}

/// The kernel's sample of the host differential (`agent/tests/differential.rs`
/// checks 30 000 requests on the host): random policy sets over real files,
/// binaries and listeners, each decided by `portcullis test` and then by the
/// kernel under the agent, as root and as uid 4242. Verdicts must agree, and
/// for every logged decision the policy and rule too.
#[test]
fn random_policies_decide_alike_in_portcullis_test_and_in_the_kernel() {
    portcullis_tests::require_kernel!();
    // PORTCULLIS_TEST_SEED=0x… replays a failure's seed.
    let seed = std::env::var("PORTCULLIS_TEST_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    let mut rng = Rng(seed);
    let tmp = TempDir::new("ptest-random");
    for d in ["a/b", "c", "bin"] {
        std::fs::create_dir_all(tmp.path(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt as _;
    for f in ["a/x", "a/b/y", "c/w"] {
        std::fs::write(tmp.path(f), b"data").unwrap();
        // uid 4242 may read and write them: what the agent decides is
        // then all that stands in the way.
        std::fs::set_permissions(tmp.path(f), std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    for b in ["bin/t1", "bin/t2"] {
        std::fs::copy("/bin/true", tmp.path(b)).unwrap();
    }
    let probe_exe = std::fs::canonicalize(std::env::var("PORTCULLIS_PROBE").unwrap_or_else(|_| {
        format!(
            "{}/../target/debug/portcullis-probe",
            env!("CARGO_MANIFEST_DIR")
        )
    }))
    .unwrap();
    let probe_exe = probe_exe.to_str().unwrap().to_owned();
    let (l1, l2) = (Listener::new("127.0.0.1"), Listener::new("127.0.0.1"));
    let (p1, p2) = (l1.port.to_string(), l2.port.to_string());
    let cg = Cgroup::create("ptest-random");
    let t = |rel: &str| tmp.str(rel);
    let paths = [
        t("a/**"),
        t("a/x"),
        t("a/b/**"),
        t("a/b/y"),
        t("c/w"),
        t("c/**"),
    ];
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let bins = [t("bin/**"), t("bin/t1"), t("bin/t2")];
    let bins: Vec<&str> = bins.iter().map(String::as_str).collect();

    let mut agent: Option<Agent> = None;
    let (mut checked, mut refused) = (0, 0);
    for round in 0..8 {
        let mut policy = String::new();
        for i in 0..1 + rng.below(3) {
            let mode = rng.pick(&["enforce", "audit"]);
            policy += &policy_header(&format!("r{round}-p{i}"), mode, &cg.path);
            if rng.below(3) == 0 {
                policy += "    uid: 4242\n";
            }
            if rng.below(2) == 0 {
                policy += &format!(
                    "  exec:\n    default: {}\n    allow: [\"{}\"]\n    deny: [\"{}\"]\n",
                    rng.pick(&["deny", "allow"]),
                    rng.pick(&bins),
                    rng.pick(&bins)
                );
            }
            if rng.below(2) == 0 {
                let rule = |rng: &mut Rng| {
                    let ports = match rng.below(3) {
                        0 => String::new(),
                        1 => format!(", ports: [\"{p1}\"]"),
                        _ => format!(", ports: [\"{p2}\"]"),
                    };
                    format!(
                        "{{ cidr: {}{ports} }}",
                        rng.pick(&["127.0.0.1/32", "127.0.0.0/8"])
                    )
                };
                policy += &format!(
                    "  network:\n    egress:\n      default: {}\n      allow: [{}]\n      deny: [{}]\n",
                    rng.pick(&["deny", "allow"]),
                    rule(&mut rng),
                    rule(&mut rng)
                );
            }
            let mut seen = Vec::new();
            let mut files = String::new();
            for _ in 0..rng.below(3) {
                let p = rng.pick(&paths);
                if seen.contains(&p) {
                    continue;
                }
                seen.push(p);
                let access = rng.pick(&["none", "read", "readwrite"]);
                let only = if access != "none" && rng.below(3) == 0 {
                    format!(
                        ", onlyFrom: [\"{}\"]",
                        rng.pick(&[probe_exe.as_str(), bins[1]])
                    )
                } else {
                    String::new()
                };
                files += &format!("    - {{ path: \"{p}\", access: {access}{only} }}\n");
            }
            if !files.is_empty() {
                policy += &format!("  files:\n{files}");
            }
            if policy.ends_with(&format!("cgroupPath: \"{}\"\n", cg.path))
                || policy.ends_with("uid: 4242\n")
            {
                // No section drawn: a policy must enforce something.
                policy += "  exec:\n    default: allow\n";
            }
            policy += "---\n";
        }
        std::fs::write(tmp.path("policy.yaml"), &policy).unwrap();

        // (action for the test file, probe arguments, hook, uid)
        let mut requests: Vec<(String, Vec<String>, &str, Option<u32>)> = Vec::new();
        for _ in 0..10 {
            let uid = [None, Some(4242)][rng.below(2)];
            requests.push(match rng.below(4) {
                0 => {
                    let b = rng.pick(&["bin/t1", "bin/t2"]);
                    (
                        format!("exec: {}", t(b)),
                        vec!["exec".into(), t(b)],
                        "exec",
                        uid,
                    )
                }
                1 | 2 => {
                    let f = rng.pick(&["a/x", "a/b/y", "c/w"]);
                    let (access, op) = [("read", "read"), ("write", "write")][rng.below(2)];
                    (
                        format!("open: {{path: {}, access: {access}}}", t(f)),
                        vec![op.into(), t(f)],
                        "open",
                        uid,
                    )
                }
                _ => {
                    let p = [&p1, &p2][rng.below(2)];
                    (
                        format!("connect: {{address: 127.0.0.1, port: {p}}}"),
                        vec!["connect".into(), "127.0.0.1".into(), p.clone()],
                        "connect",
                        uid,
                    )
                }
            });
        }
        // Every file the policies may name exists in the fixture as on disk,
        // whether a case names it or not.
        let fixture: Vec<String> = ["a/x", "a/b/y", "c/w", "bin/t1", "bin/t2"]
            .iter()
            .map(|f| t(f))
            .collect();
        let mut file = format!(
            "{HEADER}policies: [policy.yaml]\nfixture: [{}]\ncases:\n",
            fixture.join(", ")
        );
        for (i, (action, _, _, uid)) in requests.iter().enumerate() {
            file += &format!(
                "  - name: r{round} case {i}\n    workload: {{cgroup: {}, uid: {}, exe: {probe_exe}}}\n    {action}\n    expect: {{verdict: allow}}\n",
                cg.path,
                uid.unwrap_or(0)
            );
        }
        std::fs::write(tmp.path("t.yaml"), &file).unwrap();
        let json = tmp.str("out.json");
        let _ = std::fs::remove_file(&json);
        let (_, stdout, stderr) = run_test(&[&tmp.str("t.yaml"), "--json", &json]);
        if stderr.contains("no case was run") {
            // A policy set the compiler refuses (more rules on one file
            // than a map value holds): the agent must refuse it too, and
            // keep what it enforces.
            assert!(
                stderr.contains("merge them"),
                "seed {seed:#x}: {stderr}\n{policy}"
            );
            if let Some(a) = &mut agent {
                assert!(
                    !a.reload(&policy),
                    "seed {seed:#x}: the agent took\n{policy}"
                );
            }
            refused += 1;
            continue;
        }
        let report: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&json)
                .unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}\n{policy}")),
        )
        .unwrap();

        let agent = match &mut agent {
            Some(a) => {
                assert!(a.reload(&policy), "seed {seed:#x}: reload of\n{policy}");
                a
            }
            None => agent.insert(Agent::start(&policy)),
        };
        for (i, (action, args, hook, uid)) in requests.iter().enumerate() {
            let got = &report["cases"][i]["got"];
            let predicted = got["verdict"].as_str().unwrap();
            let before = agent
                .decisions()
                .iter()
                .filter_map(|d| d["seq"].as_u64())
                .max()
                .unwrap_or(0);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let outcome = portcullis_tests::probe_as(&cg, *uid, &args);
            let denied = match *hook {
                "connect" => Outcome::Errno(portcullis_tests::EPERM),
                _ => agent.denied(hook),
            };
            let case = format!(
                "seed {seed:#x} round {round} case {i}: {action} as uid {uid:?}: predicted {got}, kernel {outcome:?}\n{policy}"
            );
            if predicted == "deny" {
                assert_eq!(outcome, denied, "{case}");
            } else {
                assert!(
                    matches!(outcome, Outcome::Ok(_) | Outcome::Exited(0)),
                    "{case}"
                );
            }
            if predicted != "allow" {
                let line = agent.wait_decision(&case, |d| {
                    d["seq"].as_u64() > Some(before) && d["workload"]["cgroup"] == cg.path.as_str()
                });
                assert_eq!(line["verdict"], got["verdict"], "{case}");
                let named = (&line["policy"], &line["rule"]);
                if named != (&got["policy"], &got["rule"]) {
                    // Verifiers before 6.7 (Debian's 6.1) drop the check that
                    // keeps the first audit deny of a scan that goes on, so
                    // a later matching audit rule may be the one named. An
                    // enforce deny ends the scan and is always the first.
                    let text = format!(
                        "{}: {}",
                        line["policy"].as_str().unwrap_or_default(),
                        line["rule"].as_str().unwrap_or_default()
                    );
                    assert!(
                        predicted == "audit"
                            && got["matched"]
                                .as_array()
                                .is_some_and(|m| m.iter().any(|r| r.as_str() == Some(&text))),
                        "{case}\nlogged: {line}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 40,
        "{checked} requests checked, {refused} policy sets refused"
    );
}
