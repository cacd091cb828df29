//! `cargo xtask bench [--quick]`: per-syscall cost, decision-stream rate,
//! reload latency and footprint of the agent, with nftables and fanotify
//! peers side by side, written to `bench/REPORT.md` with SVG plots
//! (`--quick`: `bench/out/quick/`). Raw numbers go to `bench/out/`.
//!
//! Configurations are interleaved (baseline, ours, nft, fanotify, then the
//! next round) so slow drift of the machine lands on all of them alike; each
//! cell reports the median and the min–max over rounds.

mod peers;
mod report;
mod svg;
mod workload;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use peers::{fanotify, nft};
use workload::{ALLOWED_IP, Agent, CGROUP, DENIED_IP, Files, Loop, Outcome};

/// Sizes of one run.
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub rules: Vec<usize>,
    pub connects: u64,
    pub opens: u64,
    pub forks: u64,
    pub execs: u64,
    pub flood_secs: u64,
    pub reloads: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 2,
                rules: vec![10, 10_000],
                connects: 3_000,
                opens: 30_000,
                forks: 100,
                execs: 100,
                flood_secs: 2,
                reloads: 1,
            }
        } else {
            Self {
                quick,
                rounds: 7,
                rules: vec![10, 1_000, 100_000],
                connects: 20_000,
                opens: 100_000,
                forks: 400,
                execs: 400,
                flood_secs: 5,
                reloads: 3,
            }
        }
    }
}

/// What a measurement must have observed for its number to mean anything.
#[derive(Clone, Copy)]
enum Expect {
    Ok,
    Failed,
    Killed,
}

/// Everything measured, keyed for the report.
#[derive(Default)]
pub struct Results {
    /// (family, config, rules in the map) → ns per call, one per round.
    /// (family, config, rules in the map) → (round, ns per call).
    pub cost: BTreeMap<(String, String, usize), Vec<(usize, f64)>>,
    /// The round being measured.
    pub round: usize,
    /// (round, rules) slots during which another agent's programs were
    /// attached: left out of the medians.
    pub dirty: BTreeSet<(usize, usize)>,
    /// Rules per family for a nominal rule count (connect is capped).
    pub family_rules: BTreeMap<(String, usize), usize>,
    /// Measurements whose outcome was not the expected one.
    pub anomalies: Vec<String>,
    /// Outcome details per (family, config), from the last round.
    pub outcomes: BTreeMap<(String, String), String>,
    /// Nominal rules → agent start-up (spawn → /readyz) in ms, per round.
    pub startup_ms: BTreeMap<usize, Vec<f64>>,
    /// (trigger, rules) → ms from file change to the new policy in force.
    pub reload_ms: BTreeMap<(String, usize), Vec<f64>>,
    /// Nominal rules → agent RSS (KiB) once ready.
    pub rss_ready_kb: BTreeMap<usize, Vec<u64>>,
    pub stream: Option<report::Stream>,
    pub maps: Vec<report::MapMem>,
    pub machine: Vec<(String, String)>,
    pub wall_secs: f64,
}

impl Results {
    fn record(
        &mut self,
        family: &str,
        config: &str,
        n: usize,
        o: Outcome,
        iters: u64,
        want: Expect,
    ) {
        let good = match want {
            Expect::Ok => o.ok == iters,
            Expect::Failed => o.failed == iters,
            Expect::Killed => o.killed == iters,
        };
        let detail = format!(
            "ok {} / failed {} (last errno {}) / killed {} of {iters}",
            o.ok, o.failed, o.errno, o.killed
        );
        if !good {
            self.anomalies
                .push(format!("{family} / {config} / {n} rules: {detail}"));
        }
        self.outcomes.insert((family.into(), config.into()), detail);
        self.cost
            .entry((family.into(), config.into(), n))
            .or_default()
            .push((self.round, o.ns));
    }
}

/// One configuration's measurements at one rule count.
type Phase = fn(&Ctx, &mut Results, usize) -> Result<()>;

struct Ctx {
    out: PathBuf,
    agent_bin: PathBuf,
    peer_bin: PathBuf,
    lp: Loop,
    cgroup_dir: PathBuf,
    plan: Plan,
    port: u16,
}

pub fn run(root: &Path, quick: bool) -> Result<()> {
    let t0 = Instant::now();
    let plan = Plan::new(quick);
    let rel = root.join("target/release");
    let bins = ["portcullis", "bench-loop", "fanotify-peer"].map(|b| rel.join(b));
    if let Err(e) = crate::cargo(root, &["build", "--release", "--bins"]) {
        // The tree is shared with concurrent work; a transient build break
        // elsewhere should not stop a benchmark of the last good build.
        if !bins.iter().all(|b| b.exists()) {
            return Err(e);
        }
        eprintln!("xtask bench: build failed ({e:#}); benchmarking the existing release binaries");
    }
    let out = root.join("bench/out");
    let report_dir = if quick {
        out.join("quick")
    } else {
        root.join("bench")
    };
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&report_dir)?;

    let cg_root = workload::cgroup2_root()?;
    let cgroup_dir = cg_root.join(CGROUP);
    std::fs::create_dir_all(&cgroup_dir)
        .with_context(|| format!("creating {}", cgroup_dir.display()))?;
    let max_rules = plan.rules.iter().copied().max().unwrap_or(10);
    eprintln!(
        "xtask bench: preparing {max_rules} rule files on a tmpfs at {}",
        workload::FS
    );
    workload::prepare_fs(&out, max_rules)?;
    for n in &plan.rules {
        workload::write_policies(&out.join(format!("policy-{n}")), *n)?;
    }

    let ctx = Ctx {
        agent_bin: rel.join("portcullis"),
        peer_bin: rel.join("fanotify-peer"),
        lp: Loop {
            bin: rel.join("bench-loop"),
            cgroup: cgroup_dir.clone(),
        },
        cgroup_dir,
        plan,
        port: 19_391,
        out,
    };
    let mut res = Results {
        machine: report::machine(&ctx.agent_bin),
        ..Default::default()
    };
    measure(&ctx, &mut res);
    nft::unload();
    workload::cleanup_fs();
    let _ = std::fs::remove_dir(&ctx.cgroup_dir);
    res.wall_secs = t0.elapsed().as_secs_f64();
    report::write(&report_dir, &ctx.out, &ctx.plan, &res)?;
    eprintln!(
        "xtask bench: done in {:.0} s; report at {}",
        res.wall_secs,
        report_dir.join("REPORT.md").display()
    );
    Ok(())
}

fn measure(ctx: &Ctx, res: &mut Results) {
    let p = &ctx.plan;
    for round in 0..p.rounds {
        for &n in &p.rules {
            eprintln!("xtask bench: round {}/{} at {n} rules", round + 1, p.rounds);
            wait_quiet(Duration::from_secs(if p.quick { 5 } else { 20 }));
            res.round = round;
            let at = format!("round {} at {n} rules", round + 1);
            let dirty_before = foreign_agents(res, &format!("{at}, before"));
            res.family_rules
                .insert(("connect".into(), n), workload::net_rules(n));
            for fam in ["open", "open, fork per call", "exec"] {
                res.family_rules.insert((fam.into(), n), n);
            }
            let phases: [(&str, Phase); 4] = [
                ("baseline", baseline),
                ("Portcullis", ours),
                ("nftables peer", nft_peer),
                ("fanotify peer", fanotify_peer),
            ];
            for (name, phase) in phases {
                if let Err(e) = phase(ctx, res, n) {
                    res.anomalies
                        .push(format!("{name}, round {}, {n} rules: {e:#}", round + 1));
                }
            }
            if foreign_agents(res, &format!("{at}, after")) || dirty_before {
                res.dirty.insert((round, n));
            }
        }
    }
    // A failure in these phases is reported, and the rest still runs.
    if let Err(e) = stream(ctx, res) {
        res.anomalies.push(format!("decision stream: {e:#}"));
    }
    for &n in &ctx.plan.rules {
        if let Err(e) = reload(ctx, res, n) {
            res.anomalies.push(format!("reload at {n} rules: {e:#}"));
        }
    }
    agent_errors(ctx, res);
}

/// Portcullis tracepoint programs attached by anyone (we attach none
/// between phases).
fn foreign_programs() -> usize {
    workload::run(std::process::Command::new("bpftool").args(["prog", "show", "-j"]))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|p| matches!(p["name"].as_str(), Some("open_tp" | "exec_tp")))
        .count()
}

/// On a shared machine, waits (up to `max`) for other agents' programs to go
/// before a round starts, so the baseline is a real "no agent".
fn wait_quiet(max: Duration) {
    let t = Instant::now();
    while foreign_programs() > 0 && t.elapsed() < max {
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Other agents (e.g. a concurrent test run), or pinned programs an agent
/// left behind, attach programs that every syscall of the benchmark then
/// pays too: say so.
fn foreign_agents(res: &mut Results, when: &str) -> bool {
    let ours = foreign_programs();
    if ours > 0 {
        res.anomalies.push(format!(
            "{when}: {ours} Portcullis tracepoint programs from another agent were attached; round left out of the medians"
        ));
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return ours > 0;
    };
    let mut found = ours > 0;
    for e in dir.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "portcullis" {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            res.anomalies.push(format!(
                "{when}: another agent was running (pid {}: {}); round left out of the medians",
                e.file_name().to_string_lossy(),
                cmd.chars().take(120).collect::<String>()
            ));
            found = true;
        }
    }
    found
}

/// ERROR lines the agent logged during the benchmark.
fn agent_errors(ctx: &Ctx, res: &mut Results) {
    let Ok(dir) = std::fs::read_dir(&ctx.out) else {
        return;
    };
    let mut seen = std::collections::BTreeSet::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("agent-") && name.ends_with(".log")) {
            continue;
        }
        for line in std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .lines()
        {
            if let Some((_, msg)) = line.split_once(" ERROR ")
                && seen.insert(msg.to_string())
            {
                res.anomalies
                    .push(format!("agent logged ({name}): `{}`", msg.trim()));
            }
        }
    }
}

fn baseline(ctx: &Ctx, res: &mut Results, n: usize) -> Result<()> {
    let (p, lp, f) = (&ctx.plan, &ctx.lp, Files::new());
    let b = "baseline (no agent)";
    res.record(
        "connect",
        b,
        n,
        lp.run("connect", ALLOWED_IP, p.connects)?,
        p.connects,
        Expect::Ok,
    );
    res.record(
        "open",
        b,
        n,
        lp.run("open", &f.allowed, p.opens)?,
        p.opens,
        Expect::Ok,
    );
    res.record(
        "open, fork per call",
        b,
        n,
        lp.run("openfork", &f.allowed, p.forks)?,
        p.forks,
        Expect::Ok,
    );
    res.record(
        "exec",
        b,
        n,
        lp.run("exec", &f.tiny, p.execs)?,
        p.execs,
        Expect::Ok,
    );
    Ok(())
}

/// One measured loop: report family, report row, `bench-loop` operation,
/// its argument, iterations, and the outcome the loop must see.
type Case<'a> = (&'a str, &'a str, &'a str, &'a str, u64, Expect);

/// Runs each case at `n` rules and records it; `after` runs after each one.
fn run_cases(
    lp: &Loop,
    res: &mut Results,
    n: usize,
    cases: &[Case],
    mut after: impl FnMut() -> Result<()>,
) -> Result<()> {
    for &(family, config, op, arg, iters, want) in cases {
        res.record(family, config, n, lp.run(op, arg, iters)?, iters, want);
        after()?;
    }
    Ok(())
}

fn start_agent(ctx: &Ctx, phase: &str, n: usize) -> Result<Agent> {
    Agent::start(
        &ctx.agent_bin,
        &ctx.out.join(format!("policy-{n}")),
        &ctx.out.join("decisions.jsonl"),
        &ctx.out.join(format!("agent-{phase}-{n}.log")),
        ctx.port,
    )
}

fn ours(ctx: &Ctx, res: &mut Results, n: usize) -> Result<()> {
    let (p, lp, f) = (&ctx.plan, &ctx.lp, Files::new());
    let agent = start_agent(ctx, "cost", n)?;
    res.startup_ms
        .entry(n)
        .or_default()
        .push(agent.ready_after.as_secs_f64() * 1e3);
    if let Ok((_, rss, _)) = workload::proc_usage(agent.pid()) {
        res.rss_ready_kb.entry(n).or_default().push(rss);
    }
    if !res.machine.iter().any(|(k, _)| k == "backends") {
        let text = agent.metrics_text()?;
        let backends: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("portcullis_backend{") && l.ends_with(" 1"))
            .filter_map(|l| {
                let hook = l.split("hook=\"").nth(1)?.split('"').next()?;
                let backend = l.split("backend=\"").nth(1)?.split('"').next()?;
                Some(format!("{hook}: {backend}"))
            })
            .collect();
        res.machine.push(("backends".into(), backends.join(", ")));
    }
    if n == *p.rules.iter().max().unwrap_or(&n) && res.maps.is_empty() {
        res.maps = report::map_memory(&agent)?;
    }
    let (a, d) = ("Portcullis allow", "Portcullis deny");
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("connect", a, "connect", ALLOWED_IP, p.connects, Expect::Ok),
        ("connect", d, "connect", DENIED_IP, p.connects, Expect::Failed),
        ("open", a, "open", &f.allowed, p.opens, Expect::Ok),
        ("open, fork per call", a, "openfork", &f.allowed, p.forks, Expect::Ok),
        ("open, fork per call", d, "openfork", &f.denied, p.forks, Expect::Killed),
        ("exec", a, "exec", &f.tiny, p.execs, Expect::Ok),
        ("exec", d, "exec", &f.tiny_denied, p.execs, Expect::Killed),
        // Enforce-mode denial kills the process (fallback backend), so the
        // in-loop denied open is measured on the audit policy's file: the
        // same lookup plus the ring-buffer event, without the kill.
        ("open", "Portcullis audit (would deny)", "open", &f.audited, p.opens, Expect::Ok),
    ];
    // Denials are logged; let the writer finish before the next loop.
    run_cases(lp, res, n, cases, || agent.settle())?;
    agent.stop()?;
    let _ = std::fs::remove_file(ctx.out.join("decisions.jsonl"));
    Ok(())
}

fn nft_peer(ctx: &Ctx, res: &mut Results, n: usize) -> Result<()> {
    let (p, lp) = (&ctx.plan, &ctx.lp);
    let rel = nft::cgroup_arg(&ctx.cgroup_dir)?;
    nft::load(&rel, 1, workload::net_rules(n))?;
    let r = (|| -> Result<()> {
        let (a, d) = ("nftables allow (peer)", "nftables deny (peer)");
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("connect", a, "connect", ALLOWED_IP, p.connects, Expect::Ok),
            ("connect", d, "connect", DENIED_IP, p.connects, Expect::Failed),
        ];
        run_cases(lp, res, n, cases, || Ok(()))
    })();
    nft::unload();
    r
}

fn fanotify_peer(ctx: &Ctx, res: &mut Results, n: usize) -> Result<()> {
    let (p, lp, f) = (&ctx.plan, &ctx.lp, Files::new());
    let peer = fanotify::Peer::start(&ctx.peer_bin, &ctx.out.join("fanotify-rules.txt"), n)?;
    let r = (|| -> Result<()> {
        let (a, d) = ("fanotify allow (peer)", "fanotify deny (peer)");
        #[rustfmt::skip]
        let cases: &[Case] = &[
            ("open", a, "open", &f.allowed, p.opens, Expect::Ok),
            ("open", d, "open", &f.denied, p.opens, Expect::Failed),
            ("open, fork per call", a, "openfork", &f.allowed, p.forks, Expect::Ok),
            ("open, fork per call", d, "openfork", &f.denied, p.forks, Expect::Failed),
            ("exec", a, "exec", &f.tiny, p.execs, Expect::Ok),
            ("exec", d, "exec", &f.tiny_denied, p.execs, Expect::Failed),
        ];
        run_cases(lp, res, n, cases, || Ok(()))
    })();
    peer.stop();
    r
}

/// Decision stream and footprint: audit-mode would-deny opens as fast as
/// one core makes them, at the smallest rule count.
fn stream(ctx: &Ctx, res: &mut Results) -> Result<()> {
    let n = ctx.plan.rules[0];
    eprintln!(
        "xtask bench: decision stream ({} s flood)",
        ctx.plan.flood_secs
    );
    let agent = start_agent(ctx, "stream", n)?;
    let hz = workload::ticks_per_sec();
    std::thread::sleep(Duration::from_secs(1));
    let idle_secs = 3.0;
    let (t0, _, _) = workload::proc_usage(agent.pid())?;
    std::thread::sleep(Duration::from_secs_f64(idle_secs));
    let (t1, idle_rss, _) = workload::proc_usage(agent.pid())?;

    let series: [(&str, &[(&str, &str)]); 3] = [
        (
            "portcullis_decisions_total",
            &[("action", "open"), ("verdict", "audit")],
        ),
        ("portcullis_decisions_logged_total", &[]),
        ("portcullis_events_lost_total", &[]),
    ];
    let read = || -> Result<Vec<f64>> { series.iter().map(|(n, l)| agent.metric(n, l)).collect() };
    let before = read()?;
    let start = Instant::now();
    let flood = ctx
        .lp
        .run("flood", &Files::new().audited, ctx.plan.flood_secs)?;
    let flood_secs = start.elapsed().as_secs_f64();
    let (t2, flood_rss, hwm) = workload::proc_usage(agent.pid())?;
    // Let the reader drain what the ring buffer still holds, then count.
    let mut after = read()?;
    let drain = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = read()?;
        let settled = now == after;
        after = now;
        if settled || drain.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let drain_secs = drain.elapsed().as_secs_f64();
    let (t3, _, _) = workload::proc_usage(agent.pid())?;
    let lines = std::fs::read(ctx.out.join("decisions.jsonl"))
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0);
    agent.stop()?;
    let _ = std::fs::remove_file(ctx.out.join("decisions.jsonl"));
    res.stream = Some(report::Stream {
        rules: n,
        flood_secs,
        opens: flood.ok + flood.failed,
        kernel_decisions: (after[0] - before[0]) as u64,
        logged: (after[1] - before[1]) as u64,
        lost: (after[2] - before[2]) as u64,
        file_lines: lines,
        drain_secs,
        idle_cpu: (t1 - t0) as f64 / hz / idle_secs,
        flood_cpu: (t2 - t1) as f64 / hz / flood_secs,
        drain_cpu_secs: (t3 - t2) as f64 / hz,
        idle_rss_kb: idle_rss,
        flood_rss_kb: flood_rss,
        hwm_kb: hwm,
    });
    Ok(())
}

/// Time from a policy file change to the new policy in force, seen from the
/// workload: `until-eperm` connects to the allowed target in a loop, the
/// change removes that target from the allow list, and the first EPERM ends
/// the clock. Triggered by the file watcher (`--watch-interval 0.05`) and,
/// to show the reload work alone, by SIGHUP right after the write. Each
/// measurement gets a freshly started agent, so one failed reload cannot
/// poison the next; the last one also reloads back and checks that too.
fn reload(ctx: &Ctx, res: &mut Results, n: usize) -> Result<()> {
    eprintln!("xtask bench: reload at {n} rules");
    let net = ctx.out.join(format!("policy-{n}")).join("net.yaml");
    let count = ctx.plan.reloads * 2;
    for i in 0..count {
        let trigger = if i % 2 == 0 {
            "file watch (0.05 s poll)"
        } else {
            "file change + SIGHUP"
        };
        workload::replace_file(&net, &workload::net_policy(n, true))?;
        let agent = start_agent(ctx, "reload", n)?;
        let r = (|| -> Result<()> {
            let (mut child, mut out) = ctx.lp.until_eperm(120)?;
            let t0 = workload::mono_ns();
            workload::replace_file(&net, &workload::net_policy(n, false))?;
            if i % 2 == 1 {
                // SAFETY: signals the agent we started.
                unsafe { libc::kill(agent.pid(), libc::SIGHUP) };
            }
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line)?;
            let _ = child.wait();
            let v: serde_json::Value = serde_json::from_str(line.trim())
                .with_context(|| format!("until-eperm said {line:?}"))?;
            let Some(at) = v["at"].as_u64() else {
                anyhow::bail!("{trigger}: the changed policy was not in force after 120 s");
            };
            let ms = at.saturating_sub(t0) as f64 / 1e6;
            res.reload_ms
                .entry((trigger.into(), n))
                .or_default()
                .push(ms);
            if i + 1 == count {
                // A second reload on the same agent: back to allowed, seen
                // when the target connects again.
                workload::replace_file(&net, &workload::net_policy(n, true))?;
                let t = Instant::now();
                while ctx.lp.run("connect", ALLOWED_IP, 1)?.ok < 1 {
                    if t.elapsed() > Duration::from_secs(30) {
                        anyhow::bail!(
                            "a second reload on the same agent (restoring the allow rule) was not in force after 30 s"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Ok(())
        })();
        agent.stop()?;
        r?;
    }
    workload::replace_file(&net, &workload::net_policy(n, true))?;
    Ok(())
}
