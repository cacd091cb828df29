//! `cargo xtask setup`: make a fresh machine of this kind able to build, run
//! and test the agent. Every step checks first and does nothing when the piece
//! is already there, so it is safe to run before every `run` and `test`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The bpf-linker line the eBPF build needs (LLVM 22, as rustc nightly).
const BPF_LINKER_VERSION: &str = "0.13";

pub fn run(_root: &Path) -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    apt_tool("bpftool", "bpftool")?;
    // tests/cri.rs runs a real containerd (CRI plugin) with runc, and builds
    // its image from static busybox: no registry is reachable here.
    apt_tool("containerd", "containerd")?;
    apt_tool("runc", "runc")?;
    apt_package("busybox-static")?;
    // deploy/ manifests are checked against the Kubernetes OpenAPI schemas
    // bundled in the kubernetes-validate package (no cluster runs here).
    // Not fatal: without it tests/deploy.rs prints SKIP for the schema check.
    if let Err(e) = k8s_validator() {
        eprintln!(
            "setup: warning: kubernetes-validate not installed ({e:#}); the deploy schema test will SKIP"
        );
    }
    mount_if_missing("bpf", "/sys/fs/bpf")?;
    mount_if_missing("securityfs", "/sys/kernel/security")?;
    mount_if_missing("tracefs", "/sys/kernel/tracing")?;
    Ok(())
}

/// `PATH` with cargo's bin directory first (where bpf-linker is installed).
pub fn path_with_cargo_bin() -> OsString {
    let mut dirs = vec![cargo_home().join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.env("PATH", path_with_cargo_bin()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> Result<()> {
    cmd.env("PATH", path_with_cargo_bin());
    eprintln!("setup: {}", crate::describe(cmd));
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context(
        "`rustup component list --toolchain nightly` failed: is the nightly toolchain installed?",
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: rust-src for nightly: present");
        return Ok(());
    }
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Builds bpf-linker against the libLLVM that ships inside the nightly
/// toolchain (no prebuilt binaries can be downloaded here and Debian has no
/// LLVM 22). The LLVM prefix must stay where it is: the linker finds libLLVM
/// through an rpath into it.
fn bpf_linker() -> Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(BPF_LINKER_VERSION))
        {
            eprintln!("setup: {}: present", v.trim());
            return Ok(());
        }
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot failed")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let soname = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = home().join(".cache/portcullis/llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&soname), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// Installs `package` unless `binary` is on PATH.
pub(crate) fn apt_tool(binary: &str, package: &str) -> Result<()> {
    if output(Command::new("which").arg(binary)).is_some() {
        eprintln!("setup: {binary}: present");
        return Ok(());
    }
    apt_install(package)
}

/// `apt-get install`, refreshing the package lists first only when the
/// install fails (a fresh machine's lists may be stale or missing).
pub(crate) fn apt_install(package: &str) -> Result<()> {
    let install = || {
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install().is_ok() {
        return Ok(());
    }
    status(Command::new("apt-get").args(["update", "-q"]))?;
    install()
}

/// Installs a Debian package unless dpkg already has it (for packages whose
/// binary name another package can also provide, as busybox).
fn apt_package(package: &str) -> Result<()> {
    let installed = output(Command::new("dpkg-query").args(["-W", "-f", "${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"));
    if installed {
        eprintln!("setup: {package}: present");
        return Ok(());
    }
    apt_install(package)
}

/// Where `kubernetes-validate` lives: a venv of its own, so the system
/// Python stays untouched. tests/deploy.rs looks here.
pub fn k8s_validator_bin() -> PathBuf {
    home().join(".cache/portcullis/k8s-validate/bin/kubernetes-validate")
}

fn k8s_validator() -> Result<()> {
    let bin = k8s_validator_bin();
    if bin.exists() {
        eprintln!("setup: kubernetes-validate: present");
        return Ok(());
    }
    let venv = bin
        .parent()
        .and_then(Path::parent)
        .context("validator path")?
        .to_path_buf();
    status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    status(Command::new(venv.join("bin/pip")).args([
        "install",
        "-q",
        "kubernetes-validate==1.37.0",
    ]))
}

fn mount_if_missing(fstype: &str, target: &str) -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mountinfo.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(4) == Some(target)
            && l.split_once(" - ")
                .and_then(|(_, r)| r.split_whitespace().next())
                == Some(fstype)
    });
    if mounted {
        eprintln!("setup: {fstype} on {target}: mounted");
        return Ok(());
    }
    std::fs::create_dir_all(target).ok();
    status(Command::new("mount").args(["-t", fstype, fstype, target]))
}
