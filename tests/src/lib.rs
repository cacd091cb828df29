//! Helpers for the end-to-end tests: real cgroups, a real agent process, a
//! probe that makes real syscalls from inside a cgroup.
//!
//! Everything here panics on failure (tests panic rather than return
//! `Result`), and every resource is an RAII guard.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test or run uses.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Why a test cannot run here, or `None` when it can. Callers print the
/// reason with [`skip`] and return, so the skip is visible in the output.
pub fn missing_requirement() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root (loads eBPF programs, creates cgroups)".into());
    }
    if portcullis_root().is_none() {
        return Some("no cgroup2 mount in /proc/self/mountinfo".into());
    }
    None
}

#[path = "../../agent/tests/support/skip.rs"]
mod skip;
pub use skip::skip;

/// Skips the calling test, loudly, when the machine cannot run it.
#[macro_export]
macro_rules! require_kernel {
    () => {
        if let Some(why) = $crate::missing_requirement() {
            $crate::skip(&why);
            return;
        }
    };
}

fn portcullis_root() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap_or_default()))
    })
}

/// The cgroup v2 mount point.
pub fn cgroup_root() -> PathBuf {
    portcullis_root().expect("cgroup2 mounted")
}

/// A cgroup that exists for the life of the guard.
pub struct Cgroup {
    pub dir: PathBuf,
    /// Path as policies see it (`/name`).
    pub path: String,
}

impl Cgroup {
    pub fn create(tag: &str) -> Self {
        Self::create_in(&cgroup_root(), &unique(&format!("portcullis-e2e-{tag}")))
    }

    /// A top-level cgroup with exactly this name.
    pub fn create_named(name: &str) -> Self {
        Self::create_in(&cgroup_root(), name)
    }

    /// A child of this cgroup.
    pub fn child(&self, name: &str) -> Self {
        Self::create_in(&self.dir, name)
    }

    fn create_in(parent: &Path, name: &str) -> Self {
        let dir = parent.join(name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let root = cgroup_root();
        let path = format!("/{}", dir.strip_prefix(&root).unwrap().display());
        Self { dir, path }
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Probes exit before we get here; a leftover process (a bug) is
        // moved to the root so the directory can go.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(cgroup_root().join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What a probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The syscall succeeded (`bytes` read/written, 0 for connect).
    Ok(usize),
    /// The syscall failed with this errno.
    Errno(i32),
    /// The process was killed by this signal.
    Killed(i32),
    /// An exec'd program exited with this code.
    Exited(i32),
}

pub const EPERM: i32 = libc::EPERM;
pub const SIGKILL: i32 = libc::SIGKILL;

fn probe_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_PROBE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/portcullis-probe"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs the probe in `cg` with `args` (see `src/bin/probe.rs`).
pub fn probe(cg: &Cgroup, args: &[&str]) -> Outcome {
    probe_as(cg, None, args)
}

/// [`probe`], acting as `uid` (and gid) after joining the cgroup.
pub fn probe_as(cg: &Cgroup, uid: Option<u32>, args: &[&str]) -> Outcome {
    probe_dir(Path::new(cg.dir_str()), uid, args)
}

/// [`probe_as`] in a cgroup directory this harness did not create (a pod's).
pub fn probe_dir(cgroup_dir: &Path, uid: Option<u32>, args: &[&str]) -> Outcome {
    let mut cmd = Command::new(probe_bin());
    if let Some(uid) = uid {
        cmd.env("PORTCULLIS_PROBE_UID", uid.to_string());
    }
    let out = cmd
        .arg(cgroup_dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", probe_bin().display()));
    if let Some(sig) = out.status.signal() {
        return Outcome::Killed(sig);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    match serde_json::from_str::<serde_json::Value>(last) {
        Ok(v) if v["ok"] == true => Outcome::Ok(v["bytes"].as_u64().unwrap_or(0) as usize),
        Ok(v) if v["ok"] == false => Outcome::Errno(v["errno"].as_i64().unwrap_or(-1) as i32),
        _ => {
            let code = out.status.code().unwrap_or(-1);
            assert!(
                !(2..=3).contains(&code) || args.first() == Some(&"exec"),
                "probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Outcome::Exited(code)
        }
    }
}

/// Runs the probe's `hammer` op in `cg` on a thread: for `secs` seconds an
/// allowed connect to 127.0.0.1:`allowed`, a denied one to `denied` and an
/// allowed read of `file`; the thread returns the probe's output.
pub fn spawn_hammer(
    cg: std::sync::Arc<Cgroup>,
    secs: u64,
    allowed: u16,
    denied: u16,
    file: String,
) -> std::thread::JoinHandle<std::process::Output> {
    std::thread::spawn(move || {
        probe_output(
            &cg,
            &[
                "hammer",
                &secs.to_string(),
                "127.0.0.1",
                &allowed.to_string(),
                "127.0.0.1",
                &denied.to_string(),
                &file,
            ],
        )
    })
}

/// Runs the probe in `cg` and returns its raw output (for ops with their
/// own report, e.g. `hammer`).
pub fn probe_output(cg: &Cgroup, args: &[&str]) -> std::process::Output {
    Command::new(probe_bin())
        .arg(cg.dir_str())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", probe_bin().display()))
}

/// A fresh pin directory on bpffs, for agents that must pin (the default)
/// without meeting another test's pins.
pub fn pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(unique("portcullis-test"))
}

/// Runs `portcullis ARGS..` to completion (e.g. `validate`, `uninstall`).
pub fn agent_cli(args: &[&str]) -> std::process::Output {
    Command::new(agent_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", agent_bin().display()))
}

/// A running agent with its own policy directory, decision log and metrics
/// port. Killed on drop.
pub struct Agent {
    child: Child,
    pub dir: PathBuf,
    pub port: u16,
    reloads_seen: f64,
    /// The pin directory the harness chose (removed on drop, even if the
    /// agent crashed).
    own_pins: Option<PathBuf>,
}

fn agent_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug/portcullis"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("portcullis-{tag}")));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
    pub fn str(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    /// Starts the agent on `policy` (YAML text) and waits until `/readyz`
    /// answers 200.
    pub fn start(policy: &str) -> Self {
        Self::start_with(policy, &[])
    }

    /// Starts the agent with extra `portcullis run` flags. Unless they name
    /// a pin directory (or `--no-pin`), it pins under a fresh directory and
    /// removes its pins on exit, so tests never share pins.
    pub fn start_with(policy: &str, extra: &[&str]) -> Self {
        Self::start_until(policy, extra, "agent ready", |code, _| code == 200)
    }

    /// Starts the agent with extra flags and waits until `/readyz` answers
    /// what `ready(status, body)` accepts (e.g. a degraded 503).
    pub fn start_until(
        policy: &str,
        extra: &[&str],
        what: &str,
        ready: impl Fn(u16, &str) -> bool,
    ) -> Self {
        let dir = std::env::temp_dir().join(unique("portcullis-agent"));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        std::fs::write(dir.join("policies/policy.yaml"), policy).unwrap();
        let port = free_port();
        let own_pins = pin_dir();
        let mut pin_args = vec![];
        if !extra.iter().any(|a| *a == "--pin-dir" || *a == "--no-pin") {
            pin_args = vec![
                "--pin-dir".to_owned(),
                own_pins.display().to_string(),
                "--detach-on-exit".to_owned(),
            ];
        }
        let child = Command::new(agent_bin())
            .args(["run", "--policy"])
            .arg(dir.join("policies"))
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .arg("--decisions-file")
            .arg(dir.join("decisions.jsonl"))
            .args(["--watch-interval", "3600"])
            .args(&pin_args)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", agent_bin().display()));
        let own_pins = (!pin_args.is_empty()).then_some(own_pins);
        let mut agent = Self {
            child,
            dir,
            port,
            reloads_seen: 0.0,
            own_pins,
        };
        agent.wait_until(what, Duration::from_secs(60), |a| {
            a.http("/readyz")
                .is_some_and(|(code, body)| ready(code, &body))
        });
        agent.reloads_seen = agent.metric("portcullis_policy_reloads_total{result=\"success\"}");
        agent
    }

    /// The agent's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to the agent (SIGSTOP to take user space out of a test).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid());
        nix::sys::signal::kill(pid, sig).expect("signalling the agent");
    }

    /// Stops the agent with SIGTERM (a clean shutdown) and waits for it;
    /// its directory stays until drop.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }

    /// Kills the agent with SIGKILL (no cleanup runs) and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Polls `cond` until it holds; panics with the agent's log otherwise.
    pub fn wait_until(
        &mut self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&mut Self) -> bool,
    ) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if cond(self) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited ({status}) while waiting for {what}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "timed out after {limit:?} waiting for {what}; agent log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `GET path` → (status, body).
    pub fn http(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        // Under QEMU TCG a busy guest answers slowly.
        let limit = if std::env::var_os("PORTCULLIS_VM").is_some() {
            30
        } else {
            5
        };
        s.set_read_timeout(Some(Duration::from_secs(limit))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let code = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((code, body))
    }

    /// The value of one sample (see [`sample_value`]).
    pub fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.http("/metrics").expect("metrics endpoint");
        sample_value(&body, sample)
    }

    /// Replaces the policy, sends SIGHUP, and waits for the reload's result.
    /// Returns true if the agent accepted it.
    pub fn reload(&mut self, policy: &str) -> bool {
        let failures = self.metric("portcullis_policy_reloads_total{result=\"failure\"}");
        std::fs::write(self.dir.join("policies/policy.yaml"), policy).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        let before = self.reloads_seen;
        let mut ok = false;
        self.wait_until("policy reload", Duration::from_secs(30), |a| {
            let s = a.metric("portcullis_policy_reloads_total{result=\"success\"}");
            let f = a.metric("portcullis_policy_reloads_total{result=\"failure\"}");
            ok = s > before;
            ok || f > failures
        });
        self.reloads_seen = self.metric("portcullis_policy_reloads_total{result=\"success\"}");
        ok
    }

    /// Every decision line logged so far.
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        let Ok(mut f) = std::fs::File::open(self.dir.join("decisions.jsonl")) else {
            return vec![];
        };
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        // The agent may be mid-write: a last line without its newline is not
        // yet a line. Every complete line must parse.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad decision line {l}: {e}"))
            })
            .collect()
    }

    /// Waits for a decision line matching `pred` and returns it.
    pub fn wait_decision(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut found = None;
        self.wait_until(what, Duration::from_secs(10), |a| {
            found = a.decisions().into_iter().find(|d| pred(d));
            found.is_some()
        });
        found.unwrap()
    }

    /// The backend the agent chose for a hook (from its metrics).
    pub fn backend(&self, hook: &str) -> String {
        let (_, body) = self.http("/metrics").expect("metrics endpoint");
        let prefix = format!("portcullis_backend{{hook=\"{hook}\",backend=\"");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(&prefix)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }

    /// What a denied exec/open looks like on this agent's backend: EPERM
    /// with BPF-LSM, SIGKILL with the tracepoint fallback.
    pub fn denied(&self, hook: &str) -> Outcome {
        match self.backend(hook).as_str() {
            "lsm" => Outcome::Errno(EPERM),
            _ => Outcome::Killed(SIGKILL),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        if let Some(pins) = &self.own_pins {
            let _ = std::fs::remove_dir_all(pins);
        }
        if std::thread::panicking() {
            eprintln!("agent log ({}):\n{}", self.dir.display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback TCP listener that accepts in the background.
pub struct Listener {
    pub port: u16,
}

impl Listener {
    pub fn new(ip: &str) -> Self {
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || for _ in l.incoming() {});
        Self { port }
    }
}

/// Header every test policy starts with.
pub fn policy_header(name: &str, mode: &str, cgroup_glob: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: {name}\nspec:\n  mode: {mode}\n  selector:\n    cgroupPath: \"{cgroup_glob}\"\n"
    )
}

/// Creates a one-entry hash map and pins it at `path` (on a bpffs), through
/// `bpf()` itself: no bpftool, which the VM guests do not have.
pub fn pin_hash_map(path: &Path) {
    // `union bpf_attr`, as BPF_MAP_CREATE and BPF_OBJ_PIN read it.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[1 /* BPF_MAP_TYPE_HASH */, 4, 4, 1]);
    let bpf = |cmd: libc::c_long, attr: &[u32; 32]| {
        // SAFETY: `attr` is a zero-filled bpf_attr of the size passed.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), size_of_val(attr)) }
    };
    let fd = bpf(0 /* BPF_MAP_CREATE */, &attr);
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u32; 32];
    let ptr = name.as_ptr() as u64;
    pin[0] = ptr as u32;
    pin[1] = (ptr >> 32) as u32;
    pin[2] = fd as u32;
    let pinned = bpf(6 /* BPF_OBJ_PIN */, &pin);
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` is the map fd created above, closed once.
    unsafe { libc::close(fd as i32) };
    assert!(pinned == 0, "BPF_OBJ_PIN {}: {err}", path.display());
}

/// The value of one sample (`name{labels}` exactly as exposed) in a
/// Prometheus text body. A labelled sample not yet emitted reads 0 while its
/// family is declared (`# TYPE`), so a counter that never moved compares
/// as 0; a family the body does not declare at all panics, so a renamed or
/// removed metric fails the test instead of reading as 0.
pub fn sample_value(body: &str, sample: &str) -> f64 {
    let found = body.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    });
    if let Some(v) = found {
        return v;
    }
    let name = sample.split('{').next().unwrap_or(sample);
    let family = name.strip_suffix("_total").unwrap_or(name);
    let declared = body.lines().any(|l| {
        l.strip_prefix("# TYPE ")
            .and_then(|t| t.split_whitespace().next())
            .is_some_and(|f| f == family || f == name)
    });
    assert!(declared, "metric {name} is not exposed:\n{body}");
    0.0
}

#[cfg(test)]
mod tests {
    use super::sample_value;

    const BODY: &str = "# TYPE portcullis_events_lost counter\nportcullis_events_lost_total 0\n# TYPE portcullis_decisions counter\nportcullis_decisions_total{action=\"open\"} 7\n";

    #[test]
    fn a_sample_reads_its_value_and_an_unemitted_label_reads_zero() {
        assert_eq!(
            sample_value(BODY, "portcullis_decisions_total{action=\"open\"}"),
            7.0
        );
        assert_eq!(
            sample_value(BODY, "portcullis_decisions_total{action=\"exec\"}"),
            0.0
        );
        assert_eq!(sample_value(BODY, "portcullis_events_lost_total"), 0.0);
    }

    #[test]
    #[should_panic(expected = "portcullis_events_dropped_total is not exposed")]
    fn a_renamed_metric_fails_instead_of_reading_zero() {
        sample_value(BODY, "portcullis_events_dropped_total");
    }
}
