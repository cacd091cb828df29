//! The pieces every configuration shares: the bench cgroup and tmpfs, the
//! rule files, the generated policies, the agent process and the
//! `bench-loop` runner.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The cgroup the loops run in, relative to the cgroup v2 root.
pub const CGROUP: &str = "portcullis-bench";
/// A tmpfs of our own: the fanotify peer marks this mount and nothing else.
pub const FS: &str = "/tmp/portcullis-bench-fs";
/// Allowed and denied connect targets (the loop's listener is on 0.0.0.0).
pub const ALLOWED_IP: &str = "127.0.0.1";
pub const DENIED_IP: &str = "127.0.0.2";
/// Net rules are capped here: the `NET_RULES` map holds 65 536 prefixes and
/// a reload writes the new generation beside the one in force, so at most
/// half of that can be reloaded.
pub const NET_RULES_MAX: usize = 32_000;
/// A policy file holds at most this many file rules: the YAML parser's node
/// budget (250 000 nodes) stops a single document at about 49 000.
const FILE_RULES_PER_POLICY: usize = 20_000;

/// Paths of the files the rules name.
pub struct Files {
    pub allowed: String,
    pub denied: String,
    pub audited: String,
    pub tiny: String,
    pub tiny_denied: String,
}

impl Files {
    pub fn new() -> Self {
        Self {
            allowed: format!("{FS}/allowed"),
            denied: format!("{FS}/denied"),
            audited: format!("{FS}/audited"),
            tiny: format!("{FS}/tiny"),
            tiny_denied: format!("{FS}/tiny-denied"),
        }
    }

    pub fn filler(i: usize) -> String {
        format!("{FS}/f/{i}")
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split(' ').next() == Some("cgroup2"))
                .then(|| pre.split(' ').nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// Mounts the tmpfs, creates the rule files (`max_rules` fillers) and the
/// tiny static binaries the exec loop runs.
pub fn prepare_fs(out: &Path, max_rules: usize) -> Result<()> {
    std::fs::create_dir_all(format!("{FS}/f"))?;
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(FS));
    if !mounted {
        run(Command::new("mount").args(["-t", "tmpfs", "-o", "size=256m", "tmpfs", FS]))?;
        std::fs::create_dir_all(format!("{FS}/f"))?;
    }
    let f = Files::new();
    for p in [&f.allowed, &f.denied, &f.audited] {
        std::fs::write(p, b"bench\n")?;
    }
    for i in 0..max_rules {
        let p = Files::filler(i);
        if !Path::new(&p).exists() {
            std::fs::write(&p, b"")?;
        }
    }
    // A static binary whose only instruction is exit(0): exec cost without
    // a dynamic loader or libc start-up in the measurement.
    let src = out.join("tiny.c");
    std::fs::write(
        &src,
        "void _start(void){__asm__ volatile(\"mov $60,%%eax; xor %%edi,%%edi; syscall\":::\"memory\");}\n",
    )?;
    run(Command::new("gcc")
        .args(["-static", "-nostdlib", "-O2", "-o"])
        .arg(&f.tiny)
        .arg(&src))?;
    std::fs::copy(&f.tiny, &f.tiny_denied)?;
    Ok(())
}

pub fn cleanup_fs() {
    let _ = Command::new("umount").arg(FS).status();
    let _ = std::fs::remove_dir(FS);
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many net rules a configuration with `n` rules gets.
pub fn net_rules(n: usize) -> usize {
    n.min(NET_RULES_MAX)
}

/// The i-th filler CIDR: a /32 in 10.0.0.0/8, never the loopback target.
pub fn filler_cidr(i: usize) -> String {
    format!("10.{}.{}.{}/32", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn header(out: &mut String, name: &str, mode: &str) {
    let _ = write!(
        out,
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: {name}\n\
         spec:\n  mode: {mode}\n  selector:\n    cgroupPath: \"/{CGROUP}/**\"\n"
    );
}

/// The egress policy: default deny, `n` filler /32s allowed, plus the
/// loopback target unless `deny_target` (what a reload flips).
pub fn net_policy(n: usize, allow_target: bool) -> String {
    let mut s = String::new();
    header(&mut s, "bench-net", "enforce");
    s.push_str("  network:\n    egress:\n      default: deny\n      allow:\n");
    if allow_target {
        let _ = writeln!(s, "        - cidr: {ALLOWED_IP}/32");
    }
    for i in 0..net_rules(n) {
        let _ = writeln!(s, "        - cidr: {}", filler_cidr(i));
    }
    s
}

/// Writes the policy directory for `n` rules per kind: `n` exec allows
/// (the tiny binary + fillers), `n` file rules (`access: read` on fillers,
/// `allowed` read, `denied` none), `net_rules(n)` egress allows, and an
/// audit-mode policy on `audited`. Split over files to stay inside the
/// YAML parser's budget.
pub fn write_policies(dir: &Path, n: usize) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let f = Files::new();
    std::fs::write(dir.join("net.yaml"), net_policy(n, true))?;

    let mut s = String::new();
    header(&mut s, "bench-exec", "enforce");
    let _ = writeln!(
        s,
        "  exec:\n    default: deny\n    allow:\n      - \"{}\"",
        f.tiny
    );
    for i in 0..n.saturating_sub(1) {
        let _ = writeln!(s, "      - \"{}\"", Files::filler(i));
    }
    std::fs::write(dir.join("exec.yaml"), s)?;

    let fillers = n.saturating_sub(2);
    for (chunk, start) in (0..fillers.max(1))
        .step_by(FILE_RULES_PER_POLICY)
        .enumerate()
    {
        let mut s = String::new();
        header(&mut s, &format!("bench-files-{chunk}"), "enforce");
        s.push_str("  files:\n");
        if chunk == 0 {
            let _ = writeln!(s, "    - path: \"{}\"\n      access: read", f.allowed);
            let _ = writeln!(s, "    - path: \"{}\"\n      access: none", f.denied);
        }
        for i in start..fillers.min(start + FILE_RULES_PER_POLICY) {
            let _ = writeln!(
                s,
                "    - path: \"{}\"\n      access: read",
                Files::filler(i)
            );
        }
        std::fs::write(dir.join(format!("files-{chunk:02}.yaml")), s)?;
    }

    let mut s = String::new();
    header(&mut s, "bench-audit", "audit");
    let _ = writeln!(
        s,
        "  files:\n    - path: \"{}\"\n      access: none",
        f.audited
    );
    std::fs::write(dir.join("audit.yaml"), s)?;
    Ok(())
}

/// Replaces a file atomically (rename from a sibling outside the watched
/// directory's `*.yaml` pattern), so the agent never reads half a policy.
pub fn replace_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Result line of one `bench-loop` run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    pub ns: f64,
    pub ok: u64,
    pub failed: u64,
    pub errno: i64,
    pub killed: u64,
}

pub struct Loop {
    pub bin: PathBuf,
    pub cgroup: PathBuf,
}

impl Loop {
    pub fn run(&self, op: &str, arg: &str, n: u64) -> Result<Outcome> {
        let out = Command::new(&self.bin)
            .arg(&self.cgroup)
            .args([op, arg, &n.to_string()])
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("bench-loop {op} {arg}: {} / {line:?}", out.status))?;
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(Outcome {
            ns: v["ns"].as_f64().unwrap_or(f64::NAN),
            ok: u("ok"),
            failed: u("failed"),
            errno: v["errno"].as_i64().unwrap_or(0),
            killed: u("killed"),
        })
    }

    /// Starts `until-eperm` and waits for its `ready`.
    pub fn until_eperm(&self, secs: u64) -> Result<(Child, BufReader<ChildStdout>)> {
        let mut child = Command::new(&self.bin)
            .arg(&self.cgroup)
            .args(["until-eperm", ALLOWED_IP, &secs.to_string()])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("until-eperm did not start: {line:?}");
        }
        Ok((child, out))
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bench-loop` stamps with.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A running agent.
pub struct Agent {
    child: Child,
    port: u16,
    /// Time from spawn to `/readyz` answering 200.
    pub ready_after: Duration,
}

impl Agent {
    pub fn start(
        bin: &Path,
        policy: &Path,
        decisions: &Path,
        log: &Path,
        port: u16,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(decisions);
        let t0 = Instant::now();
        let child = Command::new(bin)
            .args(["run", "--policy"])
            .arg(policy)
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--decisions-file",
            ])
            .arg(decisions)
            .args(["--watch-interval", "0.05", "--log-format", "text"])
            // No pins: the programs must go with the agent, or the next
            // "no agent" baseline would still pay for them.
            .args(["--no-pin", "--no-cri"])
            // One decisions file, so its lines can be counted.
            .args(["--decisions-max-bytes", "0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = Self {
            child,
            port,
            ready_after: Duration::ZERO,
        };
        while t0.elapsed() < Duration::from_secs(600) {
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent exited during start-up ({status}); see {}",
                    log.display()
                );
            }
            if agent
                .get("/readyz")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                agent.ready_after = t0.elapsed();
                return Ok(agent);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("agent not ready after 600 s")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn get(&self, path: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    }

    /// Sum of the samples of metric `name` carrying every `labels` pair
    /// (other labels summed over); 0 when absent (label sets appear on first
    /// use).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let body = self.get("/metrics")?;
        Ok(body
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let (labelset, value) = match rest.strip_prefix('{') {
                    Some(r) => r.split_once("} ")?,
                    None => ("", rest.strip_prefix(' ')?),
                };
                labels
                    .iter()
                    .all(|(k, v)| labelset.contains(&format!("{k}=\"{v}\"")))
                    .then(|| value.trim().parse::<f64>().ok())?
            })
            .sum())
    }

    /// Waits (up to 20 s) until the decision log stops moving: a backlog
    /// of events being written would otherwise take the second core from
    /// the next measurement.
    pub fn settle(&self) -> Result<()> {
        let read = || -> Result<f64> {
            Ok(self.metric("portcullis_decisions_logged_total", &[])?
                + self.metric("portcullis_events_lost_total", &[])?)
        };
        let t0 = Instant::now();
        let mut last = read()?;
        while t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(100));
            let now = read()?;
            if now == last {
                break;
            }
            last = now;
        }
        Ok(())
    }

    pub fn metrics_text(&self) -> Result<String> {
        self.get("/metrics")
    }

    pub fn stop(self) -> Result<()> {
        drop(self);
        Ok(())
    }
}

/// An agent left running would tax every later configuration (and its
/// programs would govern the "no agent" baseline): stop it on every path,
/// errors included.
impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (utime + stime in clock ticks, VmRSS in KiB, VmHWM in KiB) of a process.
pub fn proc_usage(pid: i32) -> Result<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may hold spaces: utime is field 14.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((ticks, kb("VmRSS:"), kb("VmHWM:")))
}

/// Kernel clock ticks per second (for utime/stime).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}
