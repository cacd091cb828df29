//! `cargo xtask vm`: prove BPF-LSM enforcement in real distribution kernels.
//!
//! The kernel of the build machines refuses BPF-LSM programs, so the LSM
//! backend is tested inside Debian's cloud kernels booted under QEMU (TCG:
//! `/dev/kvm` here cannot run a normal guest) with `bpf` in `lsm=`:
//!
//! 1. fetch the newest 6.1, the newest bookworm cloud kernel and the newest
//!    cloud kernel of Debian's newer suites into `~/.cache/portcullis/vm/`
//!    (see `kernels.rs`; cached: a second run downloads nothing);
//! 2. build the agent, the probe and the kernel/end-to-end test executables
//!    statically (`+crt-static`, `--target`, own target dir `target/vm`);
//! 3. pack them with busybox and `tests/vm/init` into an initramfs;
//! 4. boot each kernel with and without `bpf` in `lsm=`, run every test
//!    executable inside, and print a table of per-kernel results.
//!
//! A kernel that cannot be fetched or booted counts as failed, never skipped.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

const TARGET: &str = "x86_64-unknown-linux-gnu";
const INIT: &str = include_str!("../../tests/vm/init");
/// The Linux security modules of Debian's default `CONFIG_LSM`, plus `bpf`.
const LSM_WITH_BPF: &str = "lockdown,capability,landlock,yama,apparmor,bpf";
const LSM_WITHOUT_BPF: &str = "lockdown,capability,landlock,yama,apparmor";
/// Packages of the test executables run inside the guest.
const TEST_PACKAGES: &[&str] = &["portcullis", "portcullis-tests"];

/// One boot of the matrix.
struct Boot {
    kernel: String,
    vmlinuz: Result<PathBuf, String>,
    bpf_lsm: bool,
}

#[derive(Default)]
struct Outcome {
    passed: u32,
    failed: u32,
    skipped: u32,
    backend_exec: String,
    backend_open: String,
    notes: Vec<String>,
    /// libtest's `failures:` sections (panic message, agent log), shown
    /// above the table: CI keeps only the tail of what a run prints.
    failures: Vec<String>,
    /// The verifier-cost table `agent/tests/verifier_budget.rs` printed.
    verifier: Vec<String>,
    secs: f64,
}

pub fn run(root: &Path) -> Result<()> {
    let started = Instant::now();
    let cache = cache_dir();
    fs::create_dir_all(&cache)?;
    crate::setup::apt_tool("qemu-system-x86_64", "qemu-system-x86")?;
    if !is_static(Path::new("/bin/busybox")) {
        crate::setup::apt_install("busybox-static")?;
    }

    let kernels = crate::kernels::matrix(&cache);
    let work = root.join("target/vm");
    fs::create_dir_all(work.join("logs"))?;
    // One matrix at a time: two runs would overwrite each other's initramfs
    // and console logs (and share the CPU, skewing every timing).
    let lock = fs::File::create(work.join("run.lock"))?;
    if lock.try_lock().is_err() {
        eprintln!("vm: another VM matrix is running here; waiting for it to finish");
        lock.lock()?;
    }
    let t = Instant::now();
    let bins = build_static(root)?;
    eprintln!("vm: static build: {:.0} s", t.elapsed().as_secs_f64());
    let initramfs = work.join("initramfs.cpio.gz");
    build_initramfs(root, &bins, &initramfs)?;

    let mut boots = Vec::new();
    for (i, (name, vmlinuz)) in kernels.iter().enumerate() {
        boots.push(Boot {
            kernel: name.clone(),
            vmlinuz: vmlinuz.clone(),
            bpf_lsm: true,
        });
        // The newest kernel is also booted without BPF-LSM: the agent must
        // fall back to the tracepoint backend and the tests must still pass.
        if i + 1 == kernels.len() {
            boots.push(Boot {
                kernel: name.clone(),
                vmlinuz: vmlinuz.clone(),
                bpf_lsm: false,
            });
        }
    }

    // For iterating on one failure: `PORTCULLIS_VM_BOOTS=6.1.0-57-lsm-bpf`
    // keeps the boots whose log name contains one of the comma-separated
    // words; `PORTCULLIS_VM_TESTS` (executable names) and
    // `PORTCULLIS_VM_FILTER` (a libtest name filter) narrow the guest's run.
    // A narrowed run says so in the table; CI sets none of them.
    if let Ok(only) = std::env::var("PORTCULLIS_VM_BOOTS") {
        boots.retain(|b| only.split(',').any(|w| boot_name(b).contains(w)));
        eprintln!("vm: PARTIAL RUN: only boots matching {only:?}");
    }
    let mut results = Vec::new();
    for boot in &boots {
        let outcome = match &boot.vmlinuz {
            Err(e) => Outcome {
                failed: 1,
                notes: vec![format!("no kernel: {e}")],
                ..Default::default()
            },
            Ok(vmlinuz) => {
                let log = work.join(format!("logs/{}.log", boot_name(boot)));
                eprintln!(
                    "vm: booting {} (lsm={}), console log {}",
                    boot.kernel,
                    if boot.bpf_lsm {
                        LSM_WITH_BPF
                    } else {
                        LSM_WITHOUT_BPF
                    },
                    log.display()
                );
                boot_and_test(vmlinuz, &initramfs, boot.bpf_lsm, &log)
            }
        };
        results.push(outcome);
    }

    for (b, r) in boots.iter().zip(&results) {
        for f in &r.failures {
            print_failure(&boot_name(b), f);
        }
    }
    print_table(&boots, &results, started.elapsed());
    let failed: Vec<_> = boots
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.failed > 0)
        .map(|(b, _)| format!("{} (bpf in lsm={})", b.kernel, b.bpf_lsm))
        .collect();
    if !failed.is_empty() {
        bail!("VM matrix FAILED on: {}", failed.join(", "));
    }
    Ok(())
}

fn boot_name(b: &Boot) -> String {
    format!(
        "{}-{}",
        b.kernel,
        if b.bpf_lsm { "lsm-bpf" } else { "lsm-nobpf" }
    )
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORTCULLIS_VM_CACHE") {
        return dir.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/portcullis/vm")
}

// ---------------------------------------------------------------- tools

pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    eprintln!("vm: {}", crate::describe(cmd));
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{} failed ({st})", crate::describe(cmd));
    }
    Ok(())
}

/// True when `path` is an ELF with no program interpreter (static or
/// static-pie), read from its program headers.
fn is_static(path: &Path) -> bool {
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= elf.len() && u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) != 3 // PT_INTERP
    })
}

// ---------------------------------------------------------------- build

struct Bins {
    agent: PathBuf,
    probe: PathBuf,
    tests: Vec<(String, PathBuf)>,
}

/// Builds the agent, the probe and the test executables statically, for the
/// explicit host target (so build scripts, and aya-build's eBPF build, stay
/// as they are), into `target/vm`.
fn build_static(root: &Path) -> Result<Bins> {
    let mut cmd = crate::cargo_cmd(root);
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "--target",
        TARGET,
    ])
    .arg("--target-dir")
    .arg(root.join("target/vm"));
    for p in TEST_PACKAGES {
        cmd.args(["--package", p]);
    }
    cmd.env(
        format!(
            "CARGO_TARGET_{}_RUSTFLAGS",
            TARGET.to_uppercase().replace('-', "_")
        ),
        "-C target-feature=+crt-static",
    )
    .stdout(Stdio::piped());
    eprintln!("vm: {}", crate::describe(&cmd));
    let out = cmd.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        // `output()` captured the rendered diagnostics too: show them.
        let stderr = String::from_utf8_lossy(&out.stderr);
        for l in stderr
            .lines()
            .filter(|l| !l.trim_start().starts_with("Compiling"))
        {
            eprintln!("  | {l}");
        }
        bail!("static build failed ({})", out.status);
    }
    let (mut agent, mut probe, mut tests) = (None, None, Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let is_test = msg["profile"]["test"] == true;
        match (is_test, name) {
            (false, "portcullis") => agent = Some(PathBuf::from(exe)),
            (false, "portcullis-probe") => probe = Some(PathBuf::from(exe)),
            (true, _) => {
                let pkg = msg["package_id"].as_str().unwrap_or_default();
                let pkg = if pkg.contains("portcullis-tests") {
                    "e2e"
                } else {
                    "agent"
                };
                let kind = msg["target"]["kind"][0].as_str().unwrap_or("test");
                tests.push((format!("{pkg}-{kind}-{name}"), PathBuf::from(exe)));
            }
            _ => {}
        }
    }
    let bins = Bins {
        agent: agent.context("cargo built no portcullis binary")?,
        probe: probe.context("cargo built no portcullis-probe binary")?,
        tests,
    };
    for p in [&bins.agent, &bins.probe]
        .into_iter()
        .chain(bins.tests.iter().map(|(_, p)| p))
    {
        if !is_static(p) {
            bail!("{} is not statically linked", p.display());
        }
    }
    eprintln!(
        "vm: static executables: agent, probe and {} test executables",
        bins.tests.len()
    );
    Ok(bins)
}

// ------------------------------------------------------------ initramfs

/// A `cpio -H newc` archive, written in memory.
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A directory and all its parents (repeats are harmless).
    fn dir(&mut self, path: &str) {
        let mut so_far = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            so_far.push('/');
            so_far.push_str(part);
            let p = so_far.clone();
            self.entry(&p, 0o040755, &[]);
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100000 | mode, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.buf
    }
}

/// The smallest static x86-64 program that exits 0: `/bin/true` must be a
/// real file of its own (a busybox applet is a symlink, and copies of busybox
/// pick their applet from argv[0]).
fn true_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let code: &[u8] = &[0x31, 0xff, 0xb8, 0x3c, 0, 0, 0, 0x0f, 0x05]; // xor edi,edi; mov eax,60; syscall
    let size = (64 + 56 + code.len()) as u64;
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + 120).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0, BASE, BASE, size, size, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(code);
    e
}

/// A copy of `path` without debug info (keeps the initramfs small).
fn stripped(path: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let out = scratch.join(path.file_name().unwrap());
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    fs::read(if ok { &out } else { path }).with_context(|| format!("reading {}", path.display()))
}

fn build_initramfs(root: &Path, bins: &Bins, dest: &Path) -> Result<()> {
    let scratch = root.join("target/vm/strip");
    fs::create_dir_all(&scratch)?;
    let mut cpio = Cpio::new();
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/usr/sbin",
    ] {
        cpio.dir(d);
    }
    cpio.file("/init", 0o755, INIT.as_bytes());
    cpio.file(
        "/bin/busybox",
        0o755,
        &fs::read("/bin/busybox").context("reading /bin/busybox")?,
    );
    cpio.file("/bin/true", 0o755, &true_elf());
    // Tools the tests run whose busybox applets lack what they need
    // (busybox's setpriv has no --bounding-set, and busybox's timeout runs
    // its own applets, not PATH's), with their shared
    // libraries, ahead of busybox in the guest's PATH.
    for tool in GUEST_TOOLS {
        add_dynamic(&mut cpio, Path::new(tool))?;
    }
    cpio.file(
        "/opt/portcullis/portcullis",
        0o755,
        &stripped(&bins.agent, &scratch)?,
    );
    cpio.file(
        "/opt/portcullis/portcullis-probe",
        0o755,
        &stripped(&bins.probe, &scratch)?,
    );
    for (name, exe) in &bins.tests {
        cpio.file(
            &format!("/opt/portcullis/tests/{name}"),
            0o755,
            &stripped(exe, &scratch)?,
        );
    }
    // The tests read repository files through paths compiled in as
    // `CARGO_MANIFEST_DIR/../policies`: the kernel resolves `..` only through
    // a directory that exists, so every package directory is created at the
    // absolute path it was built at, and the data directories tests read
    // (`policies/`, and `deploy/` where it exists) are copied there.
    for e in fs::read_dir(root)? {
        let p = e?.path();
        if p.join("Cargo.toml").is_file() {
            cpio.dir(&p.display().to_string());
        }
    }
    for data in ["policies", "deploy"] {
        let dir = root.join(data);
        if dir.is_dir() {
            add_tree(&mut cpio, &dir, &dir.display().to_string())?;
        }
    }
    let policies = root.join("policies");
    cpio.file(
        "/etc/portcullis-vm/policies/default.yaml",
        0o644,
        &fs::read(policies.join("default.yaml")).context("reading policies/default.yaml")?,
    );
    let archive = cpio.finish();
    let mut gz = Command::new("gzip")
        .arg("-1")
        .stdin(Stdio::piped())
        .stdout(fs::File::create(dest)?)
        .spawn()
        .context("running gzip")?;
    gz.stdin.take().unwrap().write_all(&archive)?;
    if !gz.wait()?.success() {
        bail!("gzip failed");
    }
    eprintln!(
        "vm: initramfs {} ({} MB, {} MB unpacked)",
        dest.display(),
        fs::metadata(dest)?.len() >> 20,
        archive.len() >> 20
    );
    Ok(())
}

/// Host executables copied into the guest's `/bin` (see `add_dynamic`).
const GUEST_TOOLS: &[&str] = &["/usr/bin/setpriv", "/usr/bin/timeout"];

/// `exe` at `/bin/<name>`, and every shared object `ldd` lists for it at
/// its own path. A tool missing on the host is left out (the test that
/// needs it says why it cannot run).
fn add_dynamic(cpio: &mut Cpio, exe: &Path) -> Result<()> {
    if !exe.is_file() {
        eprintln!(
            "vm: {} is not installed here; the guest goes without it",
            exe.display()
        );
        return Ok(());
    }
    let name = exe.file_name().unwrap().to_string_lossy();
    cpio.file(&format!("/bin/{name}"), 0o755, &fs::read(exe)?);
    if is_static(exe) {
        return Ok(());
    }
    let ldd =
        output(Command::new("ldd").arg(exe)).with_context(|| format!("ldd {}", exe.display()))?;
    for line in ldd.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no path.
        let path = line
            .split("=>")
            .last()
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            cpio.file(
                path,
                0o755,
                &fs::read(path).with_context(|| format!("reading {path}"))?,
            );
        }
    }
    Ok(())
}

fn add_tree(cpio: &mut Cpio, dir: &Path, at: &str) -> Result<()> {
    cpio.dir(at);
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let name = format!("{at}/{}", e.file_name().to_string_lossy());
        if p.is_dir() {
            add_tree(cpio, &p, &name)?;
        } else {
            let mode = fs::metadata(&p)?.permissions().mode() & 0o777;
            cpio.file(&name, mode, &fs::read(&p)?);
        }
    }
    Ok(())
}

// ----------------------------------------------------------------- boot

fn boot_timeout() -> Duration {
    let secs = std::env::var("PORTCULLIS_VM_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);
    Duration::from_secs(secs)
}

/// `PORTCULLIS_VM_TESTS` / `PORTCULLIS_VM_FILTER` for the guest's `/init`
/// (kernel command-line words reach it as environment variables; a word
/// with a dot would be taken for a module parameter, so none may have one).
fn guest_narrowing() -> String {
    let mut extra = String::new();
    for var in [
        "PORTCULLIS_VM_TESTS",
        "PORTCULLIS_VM_FILTER",
        "PORTCULLIS_VM_WATCH",
    ] {
        if let Ok(v) = std::env::var(var) {
            eprintln!("vm: PARTIAL RUN: {var}={v}");
            extra.push_str(&format!(" {var}={v}"));
        }
    }
    // The agent's log level in the guest, for debugging (`debug`, not
    // `portcullis=debug`: one `=` per word).
    if let Ok(v) = std::env::var("PORTCULLIS_VM_RUST_LOG") {
        eprintln!("vm: guest RUST_LOG={v}");
        extra.push_str(&format!(" RUST_LOG={v}"));
    }
    extra
}

fn boot_and_test(vmlinuz: &Path, initramfs: &Path, bpf_lsm: bool, log: &Path) -> Outcome {
    let start = Instant::now();
    let lsm = if bpf_lsm {
        LSM_WITH_BPF
    } else {
        LSM_WITHOUT_BPF
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    // Multi-threaded TCG once panicked a guest while programs attached
    // (VM-HARNESS.md pitfall 2): one host thread for both vCPUs.
    cmd.args([
        "-accel",
        "tcg,thread=single",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "1G",
    ])
    .args(["-nographic", "-no-reboot", "-nic", "none", "-kernel"])
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet panic=-1 rdinit=/init lsm={lsm} PORTCULLIS_VM=1{}",
        guest_narrowing()
    ))
    .stdin(Stdio::null());
    let mut outcome = Outcome::default();
    let spawned = fs::File::create(log)
        .map_err(anyhow::Error::from)
        .and_then(|f| {
            let f2 = f.try_clone()?;
            Ok(cmd.stdout(f).stderr(f2).spawn()?)
        });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            outcome.failed = 1;
            outcome.notes.push(format!("cannot start qemu: {e:#}"));
            return outcome;
        }
    };
    let limit = boot_timeout();
    let exit = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(_) => break None,
        }
    };
    outcome.secs = start.elapsed().as_secs_f64();
    let console = fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    parse_console(&console, &mut outcome);
    if outcome.passed + outcome.failed + outcome.skipped == 0 {
        outcome.failed += 1;
        outcome
            .notes
            .push("no test result could be read from the console".into());
    }
    match exit {
        None => outcome
            .notes
            .push(format!("TIMEOUT after {limit:?}: guest killed")),
        Some(st) if !st.success() => outcome.notes.push(format!("qemu exited with {st}")),
        _ => {}
    }
    if !console.contains("PORTCULLIS-VM-DONE") {
        outcome.failed += 1;
        outcome
            .notes
            .push("the guest did not finish its test run (no PORTCULLIS-VM-DONE)".into());
        let tail: Vec<_> = console.lines().rev().take(40).collect();
        eprintln!("vm: last console lines:");
        for l in tail.iter().rev() {
            eprintln!("  | {l}");
        }
    }
    // Which backend the agent chose must match the kernel's LSM list.
    let (want, ok) = if bpf_lsm {
        (
            "lsm",
            outcome.backend_exec == "lsm" && outcome.backend_open == "lsm",
        )
    } else {
        (
            "a fallback",
            !outcome.backend_exec.is_empty()
                && outcome.backend_exec != "lsm"
                && outcome.backend_open != "lsm",
        )
    };
    if !ok {
        outcome.failed += 1;
        outcome.notes.push(format!(
            "agent chose exec={:?} open={:?}, expected {want}",
            outcome.backend_exec, outcome.backend_open
        ));
        print_section(
            &console,
            "PORTCULLIS-VM-AGENT-LOG-BEGIN",
            "PORTCULLIS-VM-AGENT-LOG-END",
            "agent log",
        );
    }
    outcome
}

fn print_section(console: &str, begin: &str, end: &str, what: &str) {
    let Some((_, rest)) = console.split_once(begin) else {
        return;
    };
    let body = rest.split_once(end).map_or(rest, |(b, _)| b);
    eprintln!("vm: {what}:");
    for l in body.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("  | {l}");
    }
}

/// Reads libtest's per-test lines (`test NAME ... ok|FAILED|ignored`) and the
/// `SKIP:` lines the tests print (shown by `--show-output` under
/// `---- NAME stdout ----`), per test executable.
fn parse_console(console: &str, out: &mut Outcome) {
    let mut current = String::new();
    let mut status: BTreeMap<String, &str> = BTreeMap::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut section = String::new();
    let mut ended = Vec::new();
    // Inside libtest's first `failures:` heading of an executable (the
    // second one only lists names).
    let mut failure: Option<String> = None;
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r');
        if line == "failures:" {
            match failure.take() {
                Some(f) => out.failures.push(f),
                None => failure = Some(format!("{current}:\n")),
            }
            continue;
        }
        if let Some(f) = failure.as_mut() {
            f.push_str(line);
            f.push('\n');
        }
        if let Some(row) = line.strip_prefix("PORTCULLIS-VERIFIER ") {
            out.verifier.push(row.to_owned());
            continue;
        }
        if let Some(b) = line.strip_prefix("PORTCULLIS-VM-BACKEND ") {
            let value = |hook: &str| {
                b.strip_prefix(&format!("portcullis_backend{{hook=\"{hook}\",backend=\""))
                    .and_then(|r| r.split('"').next())
                    .map(str::to_owned)
            };
            if let Some(v) = value("exec") {
                out.backend_exec = v;
            }
            if let Some(v) = value("open") {
                out.backend_open = v;
            }
        } else if let Some(n) = line.strip_prefix("PORTCULLIS-VM-TEST-BEGIN ") {
            current = n.to_owned();
        } else if let Some(r) = line.strip_prefix("PORTCULLIS-VM-TEST-END ") {
            ended.push(r.to_owned());
            let rc = r.rsplit_once("rc=").map(|(_, rc)| rc).unwrap_or("?");
            let name = r.split_whitespace().next().unwrap_or_default();
            let any = status.keys().any(|k| k.starts_with(&format!("{name}::")));
            if rc != "0" && !any {
                out.failed += 1;
                out.notes
                    .push(format!("{name}: exited rc={rc} before running tests"));
            } else if rc != "0"
                && !status
                    .iter()
                    .any(|(k, v)| k.starts_with(&format!("{name}::")) && *v == "FAILED")
            {
                out.failed += 1;
                out.notes.push(format!("{name}: exited rc={rc}"));
            }
        } else if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, result)) = rest.rsplit_once(" ... ") {
                let result = result.split_whitespace().next().unwrap_or_default();
                let result = match result {
                    "ok" => "ok",
                    "FAILED" => "FAILED",
                    r if r.starts_with("ignored") => "ignored",
                    _ => continue,
                };
                status.insert(format!("{current}::{name}"), result);
            }
        } else if let Some(n) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            section = format!("{current}::{n}");
        } else if line.contains("SKIP:") && !section.is_empty() {
            skipped.push(section.clone());
        }
    }
    for (name, s) in &status {
        match *s {
            "FAILED" => {
                out.failed += 1;
                out.notes.push(format!("FAILED {name}"));
            }
            "ignored" => out.skipped += 1,
            _ if skipped.contains(name) => {
                out.skipped += 1;
                out.notes.push(format!("SKIPPED {name}"));
            }
            _ => out.passed += 1,
        }
    }
}

/// One failed test executable's `failures:` section, the first lines of
/// each test's output (the panic message comes first; an agent log after it
/// can be long, the full text is in the console log).
fn print_failure(boot: &str, text: &str) {
    const MAX_LINES: usize = 40;
    eprintln!(
        "vm: {boot}: failure output of {}",
        text.lines().next().unwrap_or_default()
    );
    for section in text.split("\n---- ").skip(1) {
        eprintln!("  | ---- {}", section.lines().next().unwrap_or_default());
        for l in section
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .take(MAX_LINES)
        {
            let cut: String = l.chars().take(240).collect();
            eprintln!("  | {cut}");
        }
    }
}

fn print_table(boots: &[Boot], results: &[Outcome], total: Duration) {
    for (b, r) in boots.iter().zip(results) {
        eprintln!("\nverifier costs on {}:", boot_name(b));
        if r.verifier.is_empty() {
            eprintln!("  (not printed: the budget test did not run)");
        }
        for row in &r.verifier {
            eprintln!("  {row}");
        }
    }
    eprintln!();
    eprintln!("VM matrix (QEMU TCG, Debian cloud kernels):");
    eprintln!(
        "{:<18} {:<8} {:<17} {:<17} {:>6} {:>6} {:>7} {:>7}  {}",
        "kernel",
        "bpf-lsm",
        "exec backend",
        "open backend",
        "passed",
        "failed",
        "skipped",
        "seconds",
        "result"
    );
    for (b, r) in boots.iter().zip(results) {
        eprintln!(
            "{:<18} {:<8} {:<17} {:<17} {:>6} {:>6} {:>7} {:>7.0}  {}",
            b.kernel,
            if b.bpf_lsm { "on" } else { "off" },
            if r.backend_exec.is_empty() {
                "-"
            } else {
                &r.backend_exec
            },
            if r.backend_open.is_empty() {
                "-"
            } else {
                &r.backend_open
            },
            r.passed,
            r.failed,
            r.skipped,
            r.secs,
            if r.failed == 0 { "ok" } else { "FAILED" }
        );
        for n in &r.notes {
            eprintln!("    {n}");
        }
    }
    eprintln!("VM matrix total: {:.0} s", total.as_secs_f64());
    for var in [
        "PORTCULLIS_VM_BOOTS",
        "PORTCULLIS_VM_TESTS",
        "PORTCULLIS_VM_FILTER",
    ] {
        if let Ok(v) = std::env::var(var) {
            eprintln!("VM matrix PARTIAL: {var}={v}");
        }
    }
    for (b, r) in boots.iter().zip(results) {
        println!(
            "PORTCULLIS-VM-RESULT kernel={} bpf_lsm={} passed={} failed={} skipped={} seconds={:.0}",
            b.kernel,
            if b.bpf_lsm { "on" } else { "off" },
            r.passed,
            r.failed,
            r.skipped,
            r.secs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_test_is_counted_and_its_panic_kept() {
        let console = "PORTCULLIS-VM-TEST-BEGIN e2e-test-enforce\n\
            test a ... ok\ntest b ... FAILED\n\nsuccesses:\n    a\n\nfailures:\n\n\
            ---- b stdout ----\nthread 'b' panicked at tests/enforce.rs:1:1:\nboom\n\n\
            failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\n\
            PORTCULLIS-VM-TEST-END e2e-test-enforce rc=101\n";
        let mut out = Outcome::default();
        parse_console(console, &mut out);
        assert_eq!((out.passed, out.failed), (1, 1));
        assert_eq!(out.failures.len(), 1);
        assert!(
            out.failures[0].starts_with("e2e-test-enforce:"),
            "{:?}",
            out.failures
        );
        assert!(out.failures[0].contains("---- b stdout ----\nthread 'b' panicked"));
        assert!(out.failures[0].contains("boom") && !out.failures[0].contains("test result"));
    }
}
