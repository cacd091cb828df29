//! `cargo xtask <command>`: the project's automation.
//!
//! - `setup`: installs what a fresh machine lacks (idempotent).
//! - `run`:   set-up, build, and run the agent on `policies/default.yaml`.
//! - `test`:  set-up, build, and run every test, then the VM matrix.
//! - `bench`: benchmarks against no agent and peers; writes `bench/REPORT.md`.
//! - `gpu-check`: on a real NVIDIA node, checks the device rules on its GPUs.
//! - `vm`:    boot Debian kernels under QEMU and run the kernel tests inside
//!            (BPF-LSM on and off); see `vm.rs`.

mod bench;
mod gpu_check;
mod kernels;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Portcullis build, run and test automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing toolchain pieces and mount bpffs/securityfs/tracefs.
    Setup,
    /// Set up, build, and run the agent on the bundled default policy.
    Run {
        /// Extra arguments for `portcullis run` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the whole test suite.
    Test {
        /// Extra arguments for the test harness (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Boot Debian kernels under QEMU (BPF-LSM on and off) and run the
    /// kernel and end-to-end tests inside each.
    Vm,
    /// On a node with NVIDIA GPUs: list them, allow GPU 0 only to a scratch
    /// cgroup, and check every GPU's open from it (needs root).
    GpuCheck,
    /// Benchmark the agent against no agent and against nftables/fanotify
    /// peers; writes bench/REPORT.md and SVG plots (needs root).
    Bench {
        /// A reduced run (under 2 minutes) written to bench/out/quick/.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Cmd::Setup => setup::run(&root),
        Cmd::Run { args } => {
            setup::run(&root)?;
            cargo(
                &root,
                &["build", "--package", "portcullis", "--bin", "portcullis"],
            )?;
            let agent = root.join("target/debug/portcullis");
            let mut cmd = Command::new(&agent);
            cmd.current_dir(&root)
                .args(["run", "--policy", "policies/default.yaml"])
                .args(&args);
            eprintln!("xtask: running {}", describe(&cmd));
            let status = cmd
                .status()
                .with_context(|| format!("starting {}", agent.display()))?;
            if !status.success() {
                bail!("agent exited with {status}");
            }
            Ok(())
        }
        Cmd::Test { args } => {
            setup::run(&root)?;
            let host = test(&root, &args);
            if let Err(e) = &host {
                eprintln!("xtask: host tests FAILED: {e:#}; running the VM matrix anyway");
            }
            let vms = vm::run(&root);
            host?;
            vms
        }
        Cmd::Vm => vm::run(&root),
        Cmd::GpuCheck => gpu_check::run(&root),
        Cmd::Bench { quick } => bench::run(&root, quick),
    }
}

/// Builds everything (the agent build also builds the eBPF programs), then
/// runs unit and end-to-end tests. The end-to-end tests need root and a
/// cgroup v2 mount; they find the agent binary through `PORTCULLIS_BIN`.
fn test(root: &Path, args: &[String]) -> Result<()> {
    cargo(root, &["build", "--bins"])?;
    let mut cmd = cargo_cmd(root);
    cmd.args(["test", "--no-fail-fast", "--"]).args(args);
    cmd.env("PORTCULLIS_BIN", root.join("target/debug/portcullis"));
    cmd.env(
        "PORTCULLIS_PROBE",
        root.join("target/debug/portcullis-probe"),
    );
    // cargo counts a test that returned early as passed: the tests append
    // their skips here (tests/support/skip.rs) and they are listed below.
    let skip_log = root.join("target/tmp/skipped.txt");
    cmd.env("PORTCULLIS_SKIP_LOG", &skip_log);
    eprintln!("xtask: {}", describe(&cmd));
    // Written afresh by agent/tests/verifier_budget.rs: never show a stale one.
    let _ = std::fs::remove_file(root.join("target/tmp/verifier-budget.txt"));
    let _ = std::fs::create_dir_all(root.join("target/tmp"));
    let _ = std::fs::remove_file(&skip_log);
    let status = cmd.status().context("running cargo test")?;
    match std::fs::read_to_string(root.join("target/tmp/verifier-budget.txt")) {
        Ok(table) => eprintln!("xtask: verifier costs on this host:\n{table}"),
        Err(e) => eprintln!("xtask: verifier costs on this host: not written ({e})"),
    }
    let skipped = std::fs::read_to_string(&skip_log).unwrap_or_default();
    eprintln!(
        "xtask: {} tests skipped on this host (cargo counted them as passed){}",
        skipped.lines().count(),
        skipped
            .lines()
            .map(|l| format!("\n  SKIPPED {l}"))
            .collect::<String>()
    );
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

fn cargo_cmd(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    // bpf-linker is installed into cargo's bin directory, which a fresh
    // non-login shell may not have on PATH.
    cmd.env("PATH", setup::path_with_cargo_bin());
    cmd
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = cargo_cmd(root);
    cmd.args(args);
    eprintln!("xtask: {}", describe(&cmd));
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// A command as a shell would show it (no environment noise).
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
