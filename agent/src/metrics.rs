//! Prometheus metrics (`prometheus-client`, OpenMetrics text) and the small
//! HTTP endpoint that serves them with `/healthz` and `/readyz`.
//!
//! Kernel-side counters live in per-CPU arrays; they are summed at scrape
//! time and the difference since the last scrape is added to the exported
//! counters, so the exported values are monotonic like any counter. What
//! the maps held when the agent started (pinned maps outlive it) is the
//! baseline, not growth. Label sets are bounded: action × verdict × policy
//! (at most `POLICY_SLOTS` policies, see `slots.rs`), hook, map, result — no
//! pid, path or pod labels.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use aya::maps::{MapData, PerCpuArray};
use portcullis_common::{
    ACTIONS, COUNTER_ERR_CONNECT, COUNTER_ERR_DEVICE, COUNTER_ERR_EXEC, COUNTER_ERR_MOVE,
    COUNTER_ERR_OPEN, COUNTER_ERR_SOCKET, COUNTER_LOST_EVENTS, COUNTER_MKDIR_LOST,
    COUNTER_UNCLASSIFIED, COUNTERS, DECISION_SLOTS, POLICY_DECISION_SLOTS, VERDICTS,
    policy_decision_index,
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::http_server::Reply;

use crate::{bpf_sys, events::ReaderStats, loader::Backends, slots::PolicySlots};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics endpoint on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    action: &'static str,
    verdict: &'static str,
    /// Deciding policy of a deny or audit; empty for allows (and for
    /// decisions of an earlier instance's adopted policy).
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    hook: &'static str,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The per-CPU kernel counter maps, taken out of the loaded object.
pub struct KernelCounters {
    pub counters: PerCpuArray<MapData, u64>,
    pub decisions: PerCpuArray<MapData, u64>,
    pub policy_decisions: PerCpuArray<MapData, u64>,
}

fn sum(map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

const ACTION_NAMES: [&str; ACTIONS as usize] =
    ["exec", "connect", "open", "device", "socket", "move"];
const VERDICT_NAMES: [&str; VERDICTS as usize] = ["allow", "audit", "deny"];

/// Every metric the agent exports. Cheap to share (`Arc`).
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    lost_events: Counter,
    kernel_errors: Family<HookLabels, Counter>,
    runs_skipped: Family<ProgramLabels, Counter>,
    /// The attached programs, with the skip count last read.
    programs: Mutex<Vec<(&'static str, OwnedFd, u64)>>,
    unclassified: Counter,
    mkdir_lost: Counter,
    decisions_logged: Counter,
    decision_write_errors: Counter,
    reloads: Family<ResultLabels, Counter>,
    pub last_reload_success: Gauge<f64, AtomicU64>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    pub policies: Gauge,
    pub gpus: Gauge,
    pub cgroups_classified: Counter,
    backend: Family<BackendLabels, Gauge>,
    kernel: Mutex<Option<KernelCounters>>,
    /// Last kernel sums, to add only the difference.
    last: Mutex<Vec<u64>>,
    /// Last per-policy sums, by `policy_decision_index`.
    last_policy: Mutex<HashMap<u32, u64>>,
    /// Agent-wide policy slots (the daemon assigns them; labels come from
    /// here).
    pub policy_slots: Mutex<PolicySlots>,
    reader: Mutex<Option<Arc<ReaderStats>>>,
    last_reader: Mutex<[u64; 2]>,
    /// Programs attached and a policy in force.
    pub ready: AtomicBool,
    /// Actions no backend enforces (see `loader::MissingHook`): `/readyz`
    /// answers 503 naming them while this is not empty.
    degraded: Mutex<Vec<String>>,
    /// Twins missing beside their sibling (see `loader::MissingHook`).
    gaps: Mutex<Vec<String>>,
    twin_missing: Family<ProgramLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let m = Self {
            decisions: Family::default(),
            lost_events: Counter::default(),
            kernel_errors: Family::default(),
            runs_skipped: Family::default(),
            programs: Mutex::new(Vec::new()),
            unclassified: Counter::default(),
            mkdir_lost: Counter::default(),
            decisions_logged: Counter::default(),
            decision_write_errors: Counter::default(),
            reloads: Family::default(),
            last_reload_success: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            policies: Gauge::default(),
            gpus: Gauge::default(),
            cgroups_classified: Counter::default(),
            backend: Family::default(),
            kernel: Mutex::new(None),
            last: Mutex::new(vec![0; (COUNTERS + DECISION_SLOTS) as usize]),
            last_policy: Mutex::new(HashMap::new()),
            policy_slots: Mutex::new(PolicySlots::default()),
            reader: Mutex::new(None),
            last_reader: Mutex::new([0; 2]),
            ready: AtomicBool::new(false),
            degraded: Mutex::new(Vec::new()),
            gaps: Mutex::new(Vec::new()),
            twin_missing: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "decisions",
            "Decisions made in the kernel by action, verdict and deciding policy, allows included (per-CPU counters)",
            m.decisions.clone(),
        );
        registry.register(
            "events_lost",
            "Decision events dropped because the ring buffer was full",
            m.lost_events.clone(),
        );
        registry.register(
            "kernel_errors",
            "Internal errors in the kernel programs, by hook (each one failed open)",
            m.kernel_errors.clone(),
        );
        registry.register(
            "hook_runs_skipped",
            "Runs of a program the kernel skipped because its recursion guard was taken on the CPU (bpf_prog_info.recursion_misses)",
            m.runs_skipped.clone(),
        );
        registry.register(
            "hook_twin_missing",
            "1 for a twin program that did not attach: its sibling enforces alone, and events the kernel skips for that one go undecided",
            m.twin_missing.clone(),
        );
        registry.register(
            "unclassified_lookups",
            "Kernel lookups that found no classified cgroup up to the root",
            m.unclassified.clone(),
        );
        registry.register(
            "cgroup_events_lost",
            "cgroup creation events dropped (the periodic rescan still classifies them)",
            m.mkdir_lost.clone(),
        );
        registry.register(
            "decisions_logged",
            "Decision lines written to the decision log",
            m.decisions_logged.clone(),
        );
        registry.register(
            "decision_log_errors",
            "Decision lines that could not be written",
            m.decision_write_errors.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy loads by result",
            m.reloads.clone(),
        );
        registry.register(
            "policy_last_reload_success_timestamp_seconds",
            "Unix time of the last successful policy load",
            m.last_reload_success.clone(),
        );
        registry.register(
            "map_entries",
            "Entries in each policy map",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity of each policy map",
            m.map_capacity.clone(),
        );
        registry.register("policies", "Policies in force", m.policies.clone());
        registry.register(
            "gpus",
            "NVIDIA GPUs found on this node (each governed by device rules that name it)",
            m.gpus.clone(),
        );
        registry.register(
            "cgroups_classified",
            "Cgroups classified after creation (via the cgroup_mkdir tracepoint or rescan)",
            m.cgroups_classified.clone(),
        );
        registry.register(
            "backend",
            "Enforcement backend in use per hook (value 1)",
            m.backend.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self { registry, ..m }
    }

    pub fn set_kernel(&self, kernel: KernelCounters, reader: Arc<ReaderStats>) {
        // Pinned counters may already hold an earlier instance's counts:
        // they are the baseline.
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..COUNTERS {
                last[i as usize] = sum(&kernel.counters, i);
            }
            for i in 0..DECISION_SLOTS {
                last[(COUNTERS + i) as usize] = sum(&kernel.decisions, i);
            }
            let mut last_policy = self.last_policy.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..POLICY_DECISION_SLOTS {
                let now = sum(&kernel.policy_decisions, i);
                if now > 0 {
                    last_policy.insert(i, now);
                }
            }
        }
        *self.kernel.lock().unwrap_or_else(|e| e.into_inner()) = Some(kernel);
        *self.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader);
    }

    /// The attached programs whose skipped runs are exported.
    pub fn set_programs(&self, programs: Vec<(&'static str, OwnedFd)>) {
        let with_base = programs
            .into_iter()
            .map(|(name, fd)| {
                let base = bpf_sys::prog_recursion_misses(fd.as_fd()).unwrap_or(0);
                (name, fd, base)
            })
            .collect();
        *self.programs.lock().unwrap_or_else(|e| e.into_inner()) = with_base;
    }

    pub fn set_backends(&self, b: &Backends) {
        for (hook, backend) in [
            ("connect", b.connect),
            ("exec", b.exec),
            ("open", b.open),
            ("device", b.device),
            ("socket", b.socket),
            ("packet", b.packet),
            ("move", b.moves),
        ] {
            self.backend
                .get_or_create(&BackendLabels {
                    hook,
                    backend: backend.as_str(),
                })
                .set(1);
        }
    }

    /// Records the actions left unenforced (degraded mode) and the twins
    /// missing beside their sibling (gaps).
    pub fn set_missing(&self, missing: &[crate::loader::MissingHook]) {
        let said = |gaps: bool| -> Vec<String> {
            missing
                .iter()
                .filter(|m| m.with_gaps == gaps)
                .map(|m| {
                    let what = if gaps {
                        "enforced with gaps"
                    } else {
                        "not enforced"
                    };
                    format!("{} {what} ({}: {})", m.action, m.program, m.reason)
                })
                .collect()
        };
        *self.degraded.lock().unwrap_or_else(|e| e.into_inner()) = said(false);
        *self.gaps.lock().unwrap_or_else(|e| e.into_inner()) = said(true);
        for m in missing.iter().filter(|m| m.with_gaps) {
            self.twin_missing
                .get_or_create(&ProgramLabels { program: m.program })
                .set(1);
        }
    }

    /// `/readyz`: status line and body. Degraded (an action unenforced) is
    /// 503 too, so a DaemonSet pod shows as not ready, with the body naming
    /// what is missing; it is said only once the policy is in force. A gap
    /// (a twin missing, its sibling enforcing) is said but ready: that is
    /// every Debian node without BPF-LSM whose agent lacks CAP_SYS_ADMIN
    /// (see the README's "Twin programs").
    fn readiness(&self) -> (u16, String) {
        if !self.ready.load(Relaxed) {
            return (503, "not ready\n".into());
        }
        let degraded = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        let gaps = self.gaps.lock().unwrap_or_else(|e| e.into_inner());
        match (degraded.is_empty(), gaps.is_empty()) {
            (true, true) => (200, "ready\n".into()),
            (true, false) => (200, format!("ready; {}\n", gaps.join("; "))),
            (false, _) => (
                503,
                format!(
                    "degraded: {}\n",
                    degraded
                        .iter()
                        .chain(gaps.iter())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ),
        }
    }

    /// Adds the kernel counters' growth since the last call.
    fn refresh(&self) {
        for (program, fd, last) in self
            .programs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            let now = bpf_sys::prog_recursion_misses(fd.as_fd()).unwrap_or(*last);
            self.runs_skipped
                .get_or_create(&ProgramLabels { program })
                .inc_by(now.saturating_sub(*last));
            *last = now.max(*last);
        }
        let kernel = self.kernel.lock().unwrap_or_else(|e| e.into_inner());
        let Some(k) = kernel.as_ref() else { return };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut grow = |slot: usize, now: u64| {
            let d = now.saturating_sub(last[slot]);
            last[slot] = last[slot].max(now);
            d
        };
        let c = |i: u32| sum(&k.counters, i);
        self.lost_events
            .inc_by(grow(COUNTER_LOST_EVENTS as usize, c(COUNTER_LOST_EVENTS)));
        self.unclassified
            .inc_by(grow(COUNTER_UNCLASSIFIED as usize, c(COUNTER_UNCLASSIFIED)));
        self.mkdir_lost
            .inc_by(grow(COUNTER_MKDIR_LOST as usize, c(COUNTER_MKDIR_LOST)));
        for (hook, idx) in [
            ("connect", COUNTER_ERR_CONNECT),
            ("exec", COUNTER_ERR_EXEC),
            ("open", COUNTER_ERR_OPEN),
            ("device", COUNTER_ERR_DEVICE),
            ("socket", COUNTER_ERR_SOCKET),
            ("move", COUNTER_ERR_MOVE),
        ] {
            self.kernel_errors
                .get_or_create(&HookLabels { hook })
                .inc_by(grow(idx as usize, c(idx)));
        }
        let labels = self
            .policy_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .labels();
        let mut last_policy = self.last_policy.lock().unwrap_or_else(|e| e.into_inner());
        for (a, action) in ACTION_NAMES.iter().enumerate() {
            for (v, verdict) in VERDICT_NAMES.iter().enumerate() {
                let idx = a as u32 * VERDICTS + v as u32;
                let total = grow((COUNTERS + idx) as usize, sum(&k.decisions, idx));
                let mut attributed = 0;
                for (slot, name) in &labels {
                    let pidx = policy_decision_index(*slot, a as u8, v as u8);
                    let now = sum(&k.policy_decisions, pidx);
                    let prev = last_policy.entry(pidx).or_insert(0);
                    let d = now.saturating_sub(*prev);
                    *prev = (*prev).max(now);
                    if d > 0 {
                        attributed += d;
                        self.decisions
                            .get_or_create(&DecisionLabels {
                                action,
                                verdict,
                                policy: name.clone(),
                            })
                            .inc_by(d);
                    }
                }
                self.decisions
                    .get_or_create(&DecisionLabels {
                        action,
                        verdict,
                        policy: String::new(),
                    })
                    .inc_by(total.saturating_sub(attributed));
            }
        }
        drop(last_policy);
        drop(last);
        if let Some(r) = self
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let mut lr = self.last_reader.lock().unwrap_or_else(|e| e.into_inner());
            let (logged, errors) = (r.logged.load(Relaxed), r.write_errors.load(Relaxed));
            self.decisions_logged.inc_by(logged.saturating_sub(lr[0]));
            self.decision_write_errors
                .inc_by(errors.saturating_sub(lr[1]));
            *lr = [logged.max(lr[0]), errors.max(lr[1])];
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        self.refresh();
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Fills in the per-policy counter slots of a compiled generation.
    pub fn with_policy_slots(&self, mut c: crate::compile::Compiled) -> crate::compile::Compiled {
        self.policy_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fill(&mut c);
        c
    }

    pub fn set_map(&self, map: &'static str, entries: usize, capacity: u32) {
        self.map_entries
            .get_or_create(&MapLabels { map })
            .set(entries as i64);
        self.map_capacity
            .get_or_create(&MapLabels { map })
            .set(i64::from(capacity));
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default();
            self.last_reload_success.set(now);
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    crate::http_server::serve(listener, move |path| match path {
        "/metrics" => Reply {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: metrics.render(),
        },
        "/healthz" => Reply {
            status: 200,
            content_type: "text/plain",
            body: "ok\n".into(),
        },
        "/readyz" => {
            let (status, body) = metrics.readiness();
            Reply {
                status,
                content_type: "text/plain",
                body,
            }
        }
        _ => Reply {
            status: 404,
            content_type: "text/plain",
            body: "not found\n".into(),
        },
    })
    .await;
}

/// Binds the endpoint (before any task starts, so a bad address fails start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}
