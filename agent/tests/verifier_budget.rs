//! The verifier's cost of every program the agent may use, on the running
//! kernel: each must load where the kernel accepts its type and stay within
//! `verifier::BUDGET_INSNS` and a second of verification. Runs on the host
//! and in every QEMU boot of `cargo xtask vm`, which prints the table.

#[path = "support/skip.rs"]
mod support;

use std::{path::Path, time::Duration};

use nix::unistd::Uid;
use portcullis::{
    loader::LoadOptions,
    verifier::{self, BUDGET_INSNS},
};

#[test]
fn every_program_verifies_within_budget() {
    if !Uid::effective().is_root() {
        support::skip("loading programs needs root");
        return;
    }
    let root = portcullis::cgroup::v2_root().expect("cgroup v2 is mounted");
    let costs = verifier::costs(&LoadOptions::new(root)).expect("the object opens");
    let table = verifier::table(&costs);
    // One marker per line so the VM harness can lift the table out of the
    // console.
    for line in table.lines() {
        println!("PORTCULLIS-VERIFIER {line}");
    }
    // libtest hides a passing test's output: `cargo xtask test` prints this
    // file after the host suite. Best effort (the directory is the build
    // machine's, absent in the QEMU guests, which read the console).
    let _ = std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("verifier-budget.txt"),
        &table,
    );
    let mut over = Vec::new();
    for c in &costs {
        match &c.outcome {
            Ok(m) => {
                if m.insns.is_some_and(|n| n > BUDGET_INSNS) {
                    over.push(format!("{}: {:?} insns", c.program, m.insns));
                }
                // Generous under QEMU's emulation, which runs the verifier
                // some 10-20 times slower than the host.
                let limit = if std::env::var_os("PORTCULLIS_VM").is_some() {
                    Duration::from_secs(10)
                } else {
                    Duration::from_secs(1)
                };
                if m.time > limit {
                    over.push(format!("{}: verified in {:?}", c.program, m.time));
                }
            }
            Err(e) if e.starts_with("skipped:") => {}
            Err(e) => over.push(format!("{}: refused: {e}", c.program)),
        }
    }
    assert!(
        over.is_empty(),
        "over budget or refused:\n{}\n{table}",
        over.join("\n")
    );
    // The table must say something: at least the cgroup and tracepoint
    // programs load on every supported kernel.
    assert!(
        costs.iter().filter(|c| c.outcome.is_ok()).count() >= 5,
        "{table}"
    );
}
