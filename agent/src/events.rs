//! Kernel ring buffer → one JSON line per decision.
//!
//! The kernel sends ids (identity, rule id, policy bit, inode); this module
//! turns them back into names with the tables of the policy generation in
//! force (`Compiled`), and writes the line to stdout or the decisions file.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use portcullis_common::{
    ACCESS_EXEC, ACCESS_LINK, ACCESS_MKNOD, ACCESS_READ, ACCESS_RENAME, ACCESS_WRITE,
    ACTION_CONNECT, ACTION_DEVICE, ACTION_EXEC, ACTION_MOVE, ACTION_OPEN, ACTION_SOCKET, AF_INET6,
    AF_PACKET, DEVICE_BLOCK, EVENT_CGROUP_MKDIR, EVENT_DECISION, EVENT_NAMES, Event,
    MAX_PATH_DEPTH, RULE_ID_DEFAULT, RULE_ID_IO_URING, RULE_ID_NO_WALK_SLOT, RULE_ID_TOO_DEEP,
    VERDICT_ALLOW, VERDICT_AUDIT,
};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    chain::Chain,
    compile::Compiled,
    generations::{Generations, Names},
    loader::Backend,
    trail::Signer,
};

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("watching the events ring buffer")]
    Watch(#[source] std::io::Error),
    #[error("writing decisions to {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The name tables shared between the policy task (writer) and this one
/// (reader).
pub type SharedNames = Arc<RwLock<Generations>>;

/// One decision, as written to the log. Field names are part of the
/// product's interface (README "Decision log").
#[derive(Debug, Serialize, PartialEq)]
pub struct Decision {
    pub time: String,
    pub action: &'static str,
    pub verdict: &'static str,
    pub policy: String,
    pub rule: String,
    /// The policy generation that decided (`policy` and `rule` are its
    /// names).
    pub generation: u32,
    pub workload: Workload,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub exe: String,
    pub target: Target,
    pub backend: &'static str,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Workload {
    pub cgroup: String,
    pub cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub uid: u32,
    pub identity: u32,
    /// The Kubernetes pod (and container) of the cgroup, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// Which pod a decision's workload is (no labels: they can be many and
/// long; the namespace, name and uid find the pod).
#[derive(Debug, Serialize, PartialEq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Target {
    Net {
        ip: String,
        port: u16,
        protocol: &'static str,
    },
    Path {
        path: String,
        access: &'static str,
        dev: u32,
        ino: u64,
    },
    Device {
        /// `c MAJOR:MINOR` or `b MAJOR:MINOR`.
        device: String,
        /// `nvidia-gpu`, `nvidiactl`, `nvidia-uvm`, ... (`char` or `block`
        /// when the agent knows no class for the number).
        class: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        gpu_index: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        gpu_uuid: Option<String>,
        /// `read`, `write`, `read_write` or `mknod`.
        access: &'static str,
    },
    Socket {
        /// `raw`, `icmp` or `inet-other`: the kind a policy names.
        socket: &'static str,
        /// `inet`, `inet6` or `packet`.
        family: &'static str,
        /// `socket()`'s type (`SOCK_RAW` = 3, ...) and protocol, as called.
        socket_type: u32,
        ip_protocol: u16,
    },
}

/// Size-based rotation of a decision log file: when a line would take the
/// file past `max_bytes`, `F` becomes `F.1`, `F.1` becomes `F.2`, ... and
/// `F.<keep>` is dropped (as logrotate's `size` + `rotate N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// 0 disables rotation.
    pub max_bytes: u64,
    pub keep: u32,
}

/// Where decision lines go, each sealed into the hash chain (`chain.rs`),
/// with signed checkpoints between them when a key is given (`trail.rs`).
pub struct Sink {
    out: Out,
    chain: Chain,
    signer: Option<Signer>,
}

enum Out {
    Stdout,
    File {
        path: PathBuf,
        file: std::fs::File,
        /// Bytes in the current file.
        size: u64,
        rotation: Rotation,
    },
}

fn open_append(path: &Path) -> Result<(std::fs::File, u64), EventsError> {
    let err = |source| EventsError::Write {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    Ok((file, size))
}

/// `path` with `.n` appended.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Sink {
    pub fn open(
        path: Option<PathBuf>,
        rotation: Rotation,
        signer: Option<Signer>,
    ) -> Result<Self, EventsError> {
        let Some(path) = path else {
            return Ok(Self {
                out: Out::Stdout,
                chain: Chain::default(),
                signer,
            });
        };
        let (file, size) = open_append(&path)?;
        let chain = Chain::resume(&path);
        Ok(Self {
            out: Out::File {
                path,
                file,
                size,
                rotation,
            },
            chain,
            signer,
        })
    }

    /// Shifts the numbered files up one and starts a new, empty file.
    fn rotate(path: &Path, keep: u32) -> Result<(std::fs::File, u64), EventsError> {
        if keep == 0 {
            let _ = std::fs::remove_file(path);
        } else {
            for n in (1..keep).rev() {
                let _ = std::fs::rename(numbered(path, n), numbered(path, n + 1));
            }
            std::fs::rename(path, numbered(path, 1)).map_err(|source| EventsError::Write {
                path: path.display().to_string(),
                source,
            })?;
        }
        open_append(path)
    }

    /// Writes one decision line, and a checkpoint when one is due by
    /// count. A file about to rotate gets its checkpoint first, so every
    /// rotated file ends signed, and the new file opens with one, so it
    /// verifies on its own once the files before it are gone.
    pub fn write_line(&mut self, line: &str) -> Result<(), EventsError> {
        if let Out::File { size, rotation, .. } = &self.out
            && rotation.max_bytes > 0
            && *size > 0
            && *size + self.chain.sealed_len(line) as u64 + 1 > rotation.max_bytes
        {
            self.checkpoint(false)?;
            if let Out::File {
                path,
                file,
                size,
                rotation,
            } = &mut self.out
            {
                (*file, *size) = Self::rotate(path, rotation.keep)?;
            }
            self.checkpoint(true)?;
        }
        self.emit(line)?;
        if self.signer.as_mut().is_some_and(Signer::wrote) {
            self.checkpoint(false)?;
        }
        Ok(())
    }

    /// A checkpoint when lines wait for one and its interval has passed.
    pub fn tick(&mut self) -> Result<(), EventsError> {
        if self.signer.as_ref().is_some_and(Signer::due_by_time) {
            self.checkpoint(false)?;
        }
        Ok(())
    }

    /// Signs the chain so far, if a key is set and lines wait for it (or
    /// `always`: the opening line of a new file). Checkpoints never rotate:
    /// a file may end one checkpoint line past `max_bytes`.
    fn checkpoint(&mut self, always: bool) -> Result<(), EventsError> {
        let Some(signer) = self.signer.as_mut().filter(|s| always || s.pending()) else {
            return Ok(());
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let line = signer.checkpoint(&self.chain, &rfc3339(now));
        self.emit(&line)
    }

    fn emit(&mut self, line: &str) -> Result<(), EventsError> {
        let line = &self.chain.seal(line);
        let (res, path) = match &mut self.out {
            Out::Stdout => {
                let mut out = std::io::stdout().lock();
                (
                    writeln!(out, "{line}").and_then(|()| out.flush()),
                    "stdout".to_owned(),
                )
            }
            Out::File {
                path, file, size, ..
            } => {
                let res = writeln!(file, "{line}");
                if res.is_ok() {
                    *size += line.len() as u64 + 1;
                }
                (res, path.display().to_string())
            }
        };
        res.map_err(|source| EventsError::Write { path, source })
    }
}

impl Drop for Sink {
    /// A clean shutdown (the reader task dropped) signs what is left.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint(false) {
            tracing::warn!(error = %e, "final trail checkpoint not written");
        }
    }
}

/// Wall-clock time of boot, to turn `bpf_ktime_get_boot_ns` into UTC.
fn boot_epoch_ns() -> i128 {
    use nix::time::{ClockId, clock_gettime};
    let ns = |c| clock_gettime(c).map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128);
    match (ns(ClockId::CLOCK_REALTIME), ns(ClockId::CLOCK_BOOTTIME)) {
        (Ok(real), Ok(boot)) => real - boot,
        _ => 0,
    }
}

/// RFC 3339 UTC with microseconds, from nanoseconds since the epoch.
pub fn rfc3339(epoch_ns: i128) -> String {
    let secs = epoch_ns.div_euclid(1_000_000_000) as i64;
    let micros = (epoch_ns.rem_euclid(1_000_000_000) / 1000) as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn action_name(action: u8) -> &'static str {
    match action {
        ACTION_EXEC => "exec",
        ACTION_CONNECT => "connect",
        ACTION_OPEN => "open",
        ACTION_DEVICE => "device",
        ACTION_SOCKET => "socket",
        ACTION_MOVE => "move",
        _ => "unknown",
    }
}

fn verdict_name(verdict: u8) -> &'static str {
    match verdict {
        VERDICT_ALLOW => "allow",
        VERDICT_AUDIT => "audit",
        _ => "deny",
    }
}

fn access_name(access: u32) -> &'static str {
    if access & ACCESS_MKNOD != 0 {
        return "mknod";
    }
    if access & ACCESS_RENAME != 0 {
        return "rename";
    }
    if access & ACCESS_LINK != 0 {
        return "link";
    }
    match (
        access & ACCESS_READ != 0,
        access & ACCESS_WRITE != 0,
        access & ACCESS_EXEC != 0,
    ) {
        (_, _, true) => "exec",
        (true, true, _) => "read_write",
        (false, true, _) => "write",
        _ => "read",
    }
}

/// The path of the target: the inode's own path if a policy named it,
/// otherwise the deciding directory's path plus the dentry names the kernel
/// collected on its way up.
fn target_path(ev: &Event, names: &Names) -> String {
    if let Some(p) = names.inode_paths.get(&(ev.dev, ev.ino)) {
        return p.display().to_string();
    }
    let collected: Vec<String> = ev.names[..EVENT_NAMES - 1]
        .iter()
        .map(|n| cstr(n))
        .take_while(|n| !n.is_empty())
        .collect();
    let depth = ev.depth as usize;
    // Find the deciding directory by walking `depth` names up from the leaf.
    let dir = (depth > 0)
        .then(|| names.rules.get(ev.rule_id as usize))
        .flatten()
        .and_then(|r| r.rule.split_whitespace().nth(1))
        .map(|pat| pat.trim_end_matches("/**").to_owned());
    match dir {
        Some(dir) => {
            let shown = depth.min(collected.len());
            let below: Vec<&str> = collected[..shown]
                .iter()
                .rev()
                .map(String::as_str)
                .collect();
            // The kernel sends the names of the lowest levels only; the
            // levels between them and the deciding directory show as `...`.
            let gap = if shown < depth { "/..." } else { "" };
            format!("{dir}{gap}/{}", below.join("/"))
        }
        None if ev.action == ACTION_EXEC && !cstr(&ev.names[EVENT_NAMES - 1]).is_empty() => {
            cstr(&ev.names[EVENT_NAMES - 1])
        }
        None => collected.first().cloned().unwrap_or_default(),
    }
}

/// The tables of a generation this agent does not know: they name nothing.
static NO_NAMES: std::sync::LazyLock<Names> = std::sync::LazyLock::new(Names::default);

/// The policy and the rule text that made a decision of `identity` with
/// (`policy_bit`, `rule_id`), in the tables of generation `generation`
/// (`names`; `None` when this agent does not know it: the decision then
/// names no policy rather than another generation's). The log and the
/// host evaluator name decisions with this, so the two read alike.
pub fn name_hit(
    names: Option<&Names>,
    identity: u32,
    policy_bit: u8,
    rule_id: u32,
    generation: u32,
) -> (String, String) {
    // The kernel's own fail-closed denies belong to no policy.
    let unnamed = match rule_id {
        RULE_ID_TOO_DEEP => Some(format!(
            "fail-closed: more than {MAX_PATH_DEPTH} levels below the filesystem root"
        )),
        RULE_ID_NO_WALK_SLOT => {
            Some("fail-closed: every walk slot of this CPU was taken by a preempted walk".into())
        }
        _ if names.is_none() => Some(format!(
            "unknown: generation {} is not known to this agent",
            generation
        )),
        _ => None,
    };
    let names = names.unwrap_or(&NO_NAMES);
    let policy = names
        .identity_policies
        .get(&identity)
        .filter(|_| unnamed.is_none())
        .and_then(|set| set.get(usize::from(policy_bit)))
        .and_then(|&i| names.policies.get(i))
        .cloned()
        .unwrap_or_default();
    let rule = if let Some(why) = unnamed {
        why
    } else if rule_id == RULE_ID_IO_URING {
        // The policy's file rules refused it; no one rule did.
        "files: io_uring_setup refused (the tracepoint fallback cannot see io_uring opens)"
            .to_owned()
    } else if rule_id == RULE_ID_DEFAULT {
        "default".to_owned()
    } else {
        names
            .rules
            .get(rule_id as usize)
            .map(|r| r.rule.clone())
            .unwrap_or_default()
    };
    (policy, rule)
}

/// Builds the log record for a decision event.
///
/// `names` are the tables of the generation that decided (`ev.generation`),
/// `None` when this agent does not know it: the line then names no policy
/// rather than another generation's. `workloads` (the generation in force)
/// names the cgroup and pod.
pub fn decode(
    ev: &Event,
    names: Option<&Names>,
    workloads: &Compiled,
    boot_epoch_ns: i128,
) -> Decision {
    let (policy, rule) = name_hit(names, ev.identity, ev.policy_bit, ev.rule_id, ev.generation);
    let names = names.unwrap_or(&NO_NAMES);
    let cgroup = workloads
        .cgroup_paths
        .get(&ev.cgroup_id)
        .cloned()
        .unwrap_or_default();
    let target = if ev.action == ACTION_CONNECT {
        let v6 = Ipv6Addr::from(ev.addr);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) if ev.family == 4 => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        let protocol = match ev.proto {
            6 => "tcp",
            17 => "udp",
            _ => "other",
        };
        Target::Net {
            ip: ip.to_string(),
            port: ev.port,
            protocol,
        }
    } else if ev.action == ACTION_DEVICE {
        let block = u32::from(ev.proto) == DEVICE_BLOCK;
        let (major, minor) = (ev.dev >> 20, ev.dev & 0xfffff);
        let class = workloads.node.describe(block, major, minor);
        Target::Device {
            device: format!("{} {major}:{minor}", if block { "b" } else { "c" }),
            class: class.class,
            gpu_index: class.gpu.as_ref().map(|g| g.index),
            gpu_uuid: class.gpu.and_then(|g| g.uuid),
            access: access_name(ev.access),
        }
    } else if ev.action == ACTION_SOCKET {
        Target::Socket {
            socket: crate::compile::sockets::kind_name(ev.proto),
            family: match u32::from(ev.family) {
                AF_INET6 => "inet6",
                AF_PACKET => "packet",
                _ => "inet",
            },
            socket_type: ev.access,
            ip_protocol: ev.port,
        }
    } else if ev.rule_id == RULE_ID_IO_URING {
        Target::Path {
            path: "anon_inode:[io_uring]".to_owned(),
            access: access_name(ev.access),
            dev: 0,
            ino: 0,
        }
    } else {
        Target::Path {
            path: target_path(ev, names),
            access: access_name(ev.access),
            dev: ev.dev,
            ino: ev.ino,
        }
    };
    let comm = cstr(&ev.comm);
    let exe = std::fs::read_link(format!("/proc/{}/exe", ev.tgid))
        .ok()
        .map(|p| p.display().to_string())
        .or_else(|| {
            names
                .inode_paths
                .get(&(ev.exe_dev, ev.exe_ino))
                .map(|p| p.display().to_string())
        })
        .unwrap_or_else(|| comm.clone());
    Decision {
        time: rfc3339(boot_epoch_ns + i128::from(ev.ts_ns)),
        action: action_name(ev.action),
        verdict: verdict_name(ev.verdict),
        policy,
        rule,
        generation: ev.generation,
        workload: Workload {
            unit: crate::cgroup::systemd_unit(&cgroup).map(str::to_owned),
            cgroup,
            cgroup_id: ev.cgroup_id,
            uid: ev.uid,
            identity: ev.identity,
            pod: workloads.cgroup_pods.get(&ev.cgroup_id).map(|m| PodRef {
                namespace: m.namespace.clone(),
                name: m.name.clone(),
                uid: m.uid.clone(),
                container: m.container.as_ref().map(|c| c.name.clone()),
                image: m
                    .container
                    .as_ref()
                    .map(|c| c.image.clone())
                    .filter(|i| !i.is_empty()),
            }),
        },
        pid: ev.tgid,
        tid: ev.pid,
        comm,
        exe,
        target,
        backend: Backend::from_wire(ev.backend).as_str(),
    }
}

/// Counters the reader keeps (exported as metrics).
#[derive(Debug, Default)]
pub struct ReaderStats {
    pub logged: std::sync::atomic::AtomicU64,
    pub write_errors: std::sync::atomic::AtomicU64,
    pub malformed: std::sync::atomic::AtomicU64,
}

/// Reads the ring buffer until the task is dropped: decisions go to `sink`,
/// new cgroup paths to `mkdir_tx`.
pub async fn run(
    ring: RingBuf<MapData>,
    names: SharedNames,
    mut sink: Sink,
    mkdir_tx: mpsc::UnboundedSender<String>,
    stats: Arc<ReaderStats>,
) -> Result<(), EventsError> {
    use std::sync::atomic::Ordering::Relaxed;
    let epoch = boot_epoch_ns();
    // Earlier instances' generations, read from disk once each.
    let mut stored = std::collections::BTreeMap::new();
    // SAFETY: the RingBuf owns its map fd and the mmap; both live exactly as
    // long as the AsyncFd that owns the RingBuf, and the fd never changes.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| EventsError::Watch(std::io::Error::other(e.to_string())))?;
    loop {
        // Wakes at least once a second, so a checkpoint due by time is
        // written even when no event comes.
        let ready = tokio::time::timeout(Duration::from_secs(1), fd.readable_mut()).await;
        let Ok(ready) = ready else {
            if let Err(e) = sink.tick() {
                tracing::warn!(error = %e, "trail checkpoint not written");
            }
            continue;
        };
        let mut guard = ready.map_err(EventsError::Watch)?;
        let ring = guard.get_inner_mut();
        let mut snapshot = names.read().map(|n| n.clone()).unwrap_or_default();
        let mut batch = 0;
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<Event>() {
                stats.malformed.fetch_add(1, Relaxed);
                continue;
            }
            // SAFETY: the kernel writes whole `Event`s (same repr(C) type);
            // read_unaligned copes with the ring's 8-byte alignment.
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            match ev.kind {
                EVENT_DECISION => {
                    // Generations count from 1; 0 is a workload no policy
                    // selects, which the tables in force describe.
                    let generation = match ev.generation {
                        0 => snapshot.current.generation,
                        g => g,
                    };
                    let mut gen_names = snapshot.names(generation, &mut stored);
                    let named = |n: &Option<Arc<Names>>| {
                        n.as_ref()
                            .is_some_and(|n| n.identity_policies.contains_key(&ev.identity))
                    };
                    if ev.generation != 0 && !named(&gen_names) {
                        // Announced since this batch began: a flip, or a
                        // new cgroup's identity, while the batch was read.
                        snapshot = names.read().map(|n| n.clone()).unwrap_or_default();
                        gen_names = snapshot.names(generation, &mut stored);
                    }
                    let record = decode(&ev, gen_names.as_deref(), &snapshot.current, epoch);
                    let line = serde_json::to_string(&record).unwrap_or_default();
                    match sink.write_line(&line) {
                        Ok(()) => stats.logged.fetch_add(1, Relaxed),
                        Err(e) => {
                            tracing::warn!(error = %e, "decision not written");
                            stats.write_errors.fetch_add(1, Relaxed)
                        }
                    };
                }
                EVENT_CGROUP_MKDIR => {
                    // The kernel side fills all of `names` with the path.
                    let _ = mkdir_tx.send(cstr(ev.names.as_flattened()));
                }
                _ => {
                    stats.malformed.fetch_add(1, Relaxed);
                }
            }
            batch += 1;
            if batch == READ_BATCH {
                break;
            }
        }
        if batch < READ_BATCH {
            // Drained: replaced generations' names may go (see
            // `Generations::publish`).
            snapshot.mark_caught_up();
        }
        if batch == READ_BATCH {
            // A flood refills the ring as fast as it drains: without a pause
            // this task would never yield, starving the tasks queued on its
            // worker (the metrics endpoint among them). Readiness stays set,
            // so the next round comes at once.
            drop(guard);
            tokio::task::yield_now().await;
            continue;
        }
        guard.clear_ready();
    }
}

/// Events handled before the reader lets other tasks run.
const READ_BATCH: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_file_rotates_by_size_keeps_n_and_the_chain_spans_files() {
        let dir = std::env::temp_dir().join(format!("portcullis-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        // Sealed lines are 104 bytes ({"i":N} + seq + chain): two fit.
        let rotation = Rotation {
            max_bytes: 220,
            keep: 2,
        };
        let mut sink = Sink::open(Some(path.clone()), rotation, None).unwrap();
        for i in 0..7 {
            sink.write_line(&format!("{{\"i\":{i}}}")).unwrap();
        }
        let ids = |p: PathBuf| -> Vec<u64> {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["i"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        };
        assert_eq!(ids(path.clone()), [6]);
        assert_eq!(ids(numbered(&path, 1)), [4, 5]);
        assert_eq!(ids(numbered(&path, 2)), [2, 3]);
        assert!(!numbered(&path, 3).exists(), "only `keep` rotated files");
        // Reopening appends, counts what is there and continues the chain.
        drop(sink);
        let mut sink = Sink::open(Some(path.clone()), rotation, None).unwrap();
        sink.write_line("{\"i\":7}").unwrap();
        assert_eq!(ids(path.clone()), [6, 7]);
        let files = [numbered(&path, 2), numbered(&path, 1), path.clone()];
        assert_eq!(crate::chain::verify(&files), Ok((6, 3)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_795_000_000_123_456_789),
            "2026-11-18T11:06:40.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn access_names() {
        assert_eq!(access_name(ACCESS_READ), "read");
        assert_eq!(access_name(ACCESS_WRITE), "write");
        assert_eq!(access_name(ACCESS_READ | ACCESS_WRITE), "read_write");
        assert_eq!(access_name(ACCESS_EXEC), "exec");
    }
}
