//! The decision trail against an attacker who can write the file: with a
//! trail key, signed checkpoints make a rewritten trail with a recomputed
//! hash chain fail `verify-log --public-key`, where the chain alone passes.

use portcullis::chain::Chain;
use portcullis_tests::{
    Agent, Cgroup, EPERM, Listener, Outcome, TempDir, agent_cli, policy_header, probe,
    require_kernel,
};

#[test]
fn a_recomputed_chain_fails_the_signed_checkpoints() {
    require_kernel!();
    let tmp = TempDir::new("trail");
    let key = tmp.str("trail.key");
    let made = agent_cli(&["keygen", "--out", &key]);
    assert!(made.status.success(), "{made:?}");
    let listener = Listener::new("127.0.0.1");
    let port = listener.port.to_string();
    let cg = Cgroup::create("trail");
    let policy = format!(
        "{}  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"] }}\n",
        policy_header("trail", "enforce", &cg.path)
    );
    let mut agent = Agent::start_with(&policy, &["--trail-key", &key, "--checkpoint-lines", "2"]);
    for _ in 0..5 {
        assert_eq!(
            probe(&cg, &["connect", "127.0.0.1", &port]),
            Outcome::Errno(EPERM)
        );
    }
    agent.wait_until("five deny lines", std::time::Duration::from_secs(10), |a| {
        a.decisions()
            .iter()
            .filter(|d| d["verdict"] == "deny")
            .count()
            >= 5
    });
    // A clean stop signs the tail too.
    agent.stop();
    let log = agent.dir.join("decisions.jsonl");
    let public = format!("{key}.pub");
    let verify = |file: &std::path::Path, signed: bool| {
        let file = file.display().to_string();
        let mut args = vec!["verify-log", file.as_str()];
        if signed {
            args.extend(["--public-key", public.as_str()]);
        }
        agent_cli(&args)
    };
    let out = verify(&log, true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(" 0 lines after it not signed yet"),
        "{stdout}"
    );
    let checkpoints = agent
        .decisions()
        .iter()
        .filter(|d| d.get("checkpoint").is_some())
        .count();
    assert!(checkpoints >= 3, "{checkpoints} checkpoints");

    // The attacker: turn a deny into an allow and recompute every chain.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut chain = Chain::default();
    let mut edited = false;
    let forged: Vec<String> = text
        .lines()
        .map(|l| {
            let mut body = l.rsplit_once(",\"seq\":").unwrap().0.to_owned() + "}";
            if !edited && body.contains("\"verdict\":\"deny\"") {
                body = body.replacen("\"verdict\":\"deny\"", "\"verdict\":\"allow\"", 1);
                edited = true;
            }
            chain.seal(&body)
        })
        .collect();
    let forged_path = tmp.path("forged.jsonl");
    std::fs::write(&forged_path, forged.join("\n") + "\n").unwrap();
    assert!(
        verify(&forged_path, false).status.success(),
        "the chain alone cannot tell"
    );
    let out = verify(&forged_path, true);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a line before it was rewritten"),
        "{out:?}"
    );
}
