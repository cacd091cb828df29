//! A reload that fails half-way through the flip (the cgroup map is full)
//! leaves every cgroup on the generation in force, and a reload that fits
//! goes through afterwards.

use portcullis_tests::{
    Agent, Cgroup, EPERM, Listener, Outcome, cgroup_root, policy_header, probe, require_kernel,
};

/// Cgroups on the host right now (every one takes a slot in the agent's
/// cgroup map, restricted or not).
fn cgroups_on_host() -> u32 {
    let mut stack = vec![cgroup_root()];
    let mut n = 0;
    while let Some(dir) = stack.pop() {
        n += 1;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    n
}

#[test]
fn a_flip_that_fills_the_cgroup_map_leaves_every_cgroup_on_the_old_generation() {
    require_kernel!();
    let (first, second) = (Listener::new("127.0.0.1"), Listener::new("127.0.0.1"));
    let cg = Cgroup::create("flip");
    let deny = |port: u16| {
        format!(
            "{}  network:\n    egress:\n      deny:\n        - {{ cidr: 127.0.0.1/32, ports: [\"{port}\"] }}\n",
            policy_header("flip", "enforce", &cg.path)
        )
    };
    let connect = |port: u16| probe(&cg, &["connect", "127.0.0.1", &port.to_string()]);
    // Room for what exists now and a margin for other tests' cgroups.
    let capacity = cgroups_on_host() + 40;
    let mut agent = Agent::start_with(
        &deny(first.port),
        &["--map-capacity", &format!("identities={capacity}")],
    );
    assert_eq!(connect(first.port), Outcome::Errno(EPERM));
    assert_eq!(connect(second.port), Outcome::Ok(0));

    // More cgroups than the map has room for: the agent classifies them one
    // by one until it is full; the rest only reach the map with the next
    // flip, which therefore fails after flipping the older cgroups (`cg`
    // among them: lower ids come first).
    let extra: Vec<Cgroup> = (0..100)
        .map(|i| Cgroup::create(&format!("flip-extra{i}")))
        .collect();
    agent.wait_until(
        "the cgroup map full",
        std::time::Duration::from_secs(10),
        |a| a.log().contains("cannot classify new cgroup"),
    );
    assert!(
        !agent.reload(&deny(second.port)),
        "a reload that does not fit is rejected"
    );
    assert!(
        agent.log().contains("then undone"),
        "the failed flip is reported: {}",
        agent.log()
    );
    // Still the old generation, whole: without the undo `cg` was left on
    // the new one.
    assert_eq!(connect(first.port), Outcome::Errno(EPERM));
    assert_eq!(connect(second.port), Outcome::Ok(0));

    drop(extra);
    assert!(
        agent.reload(&deny(second.port)),
        "a reload that fits goes through"
    );
    assert_eq!(connect(second.port), Outcome::Errno(EPERM));
    assert_eq!(connect(first.port), Outcome::Ok(0));
}
