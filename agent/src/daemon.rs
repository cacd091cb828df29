//! The running agent: loads the programs, applies policy, classifies
//! cgroups as they appear, reloads on change, and streams decisions.
//!
//! One task (this one) owns the policy maps and every change to them; the
//! ring-buffer reader and the metrics endpoint run beside it and only read.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{PerCpuArray, RingBuf};
use portcullis_common::{MAP_COUNTERS, MAP_DECISIONS, MAP_EVENTS, MAP_POLICY_DECISIONS};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    cgroup,
    compile::{self, CgroupInfo, Compiled, Numbering},
    events::{self, ReaderStats, Sink},
    generations::Generations,
    identity,
    loader::{self, LoadOptions, MapSizes},
    maps::{MapsError, PolicyMaps},
    metrics::{self, KernelCounters, Metrics},
    node_devices::NodeDevices,
    pin, pod,
    policy::{self, Policy},
    trail::Signer,
};

/// How long a replaced generation's rules stay in the maps after the flip,
/// so deletions are batched. What makes a deletion safe is not this time
/// but the wait `PolicyMaps::retire` does first (`hook_barrier`); where the
/// kernel refused the barrier, this grace is all there is.
const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// How long a changed policy file must hold still before the watcher
/// reloads it (`echo > file` truncates first, then writes).
const WATCH_SETTLE: Duration = Duration::from_millis(50);
/// Generations whose onlyFrom set ids are told apart (see
/// [`State::numbering`]); far more than can await retirement at once.
const ONLY_FROM_GENERATIONS: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{count} error(s) in the policy files; nothing was loaded")]
    InvalidPolicy { count: usize },
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
    #[error(transparent)]
    Trail(#[from] crate::trail::TrailError),
    #[error(transparent)]
    Compile(#[from] compile::CompileError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Events(#[from] events::EventsError),
    #[error("map {name} is missing or of the wrong type")]
    Map { name: &'static str },
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    #[error("installing the {0} signal handler")]
    Signal(&'static str, #[source] std::io::Error),
}

/// How the agent runs (`portcullis run` flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// Policy files and directories.
    pub policy_paths: Vec<PathBuf>,
    pub metrics_addr: SocketAddr,
    /// Decision log file; stdout when `None`.
    pub decisions_file: Option<PathBuf>,
    /// Size-based rotation of `decisions_file`.
    pub decisions_rotation: events::Rotation,
    /// Capacities of the kernel maps.
    pub map_sizes: MapSizes,
    /// Signed checkpoints of the decision trail; `None` leaves it unsigned.
    pub trail: Option<TrailConfig>,
    /// procfs to read the node's device classes from (`/proc`; the tests
    /// point it at a stand-in for a GPU node).
    pub host_proc: PathBuf,
    /// Name tables of recent generations (see `generations`); `None` keeps
    /// them in memory only.
    pub generations_dir: Option<PathBuf>,
    /// Use the tracepoint backends even where BPF-LSM works.
    pub force_fallback: bool,
    /// Refuse to start when an action has no backend (else: degraded).
    pub require_hooks: bool,
    /// Programs treated as refused (tests force a hook to fail with it).
    pub refuse_programs: Vec<String>,
    /// How often policy files are checked for changes.
    pub watch_interval: Duration,
    /// How often the cgroup tree is rescanned (safety net for lost
    /// `cgroup_mkdir` events).
    pub rescan_interval: Duration,
    /// bpffs directory for pins (enforcement outlives the agent); `None`
    /// pins nothing.
    pub pin_dir: Option<PathBuf>,
    /// Remove every pin on exit, so enforcement stops with the agent.
    pub detach_on_exit: bool,
    /// Where pod metadata comes from (CRI socket, kubelet root).
    pub pods: pod::ResolverConfig,
}

/// `--trail-key` and when to sign (see `trail`).
#[derive(Debug, Clone)]
pub struct TrailConfig {
    pub key: PathBuf,
    pub every_lines: u64,
    pub every: Duration,
}

/// The policy generation in force and what owns it.
struct State {
    root: PathBuf,
    policies: Vec<Policy>,
    /// The policy files as last parsed, reused while their text is unchanged.
    parsed: policy::ParseCache,
    compiled: Arc<Compiled>,
    names: events::SharedNames,
    maps: PolicyMaps,
    next_identity: u32,
    /// The generation number of the next compile (see `generations`); also
    /// numbers onlyFrom sets apart between generations.
    generation: u32,
    /// Replaced generations whose rules are deleted once their grace period
    /// ends (see [`RETIRE_GRACE`]).
    retiring: VecDeque<(Instant, Arc<Compiled>)>,
    metrics: Arc<Metrics>,
    fingerprint: Vec<(PathBuf, Option<SystemTime>, u64)>,
    paths: Vec<PathBuf>,
    /// Pod metadata for cgroups in pods (CRI).
    pods: pod::Resolver,
    /// What the kernel maps hold at most.
    map_sizes: MapSizes,
    /// Where device classes are read from (see `node_devices`).
    host_proc: PathBuf,
}

fn log_policy_errors(errors: &[policy::PolicyError]) {
    for e in errors {
        tracing::error!(file = %e.file.display(), line = e.line, column = e.column, field = %e.field, "{e}");
    }
}

/// Hands the heap's free pages back to the kernel. A reload builds the next
/// generation beside the one in force; once the old one is dropped, glibc
/// keeps its pages (measured: RSS 188 MB before and 363 MB after one reload
/// of 232 000 rules). Elsewhere a no-op.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Modification times and sizes of every policy file, to notice edits
/// (including files added to or removed from a policy directory).
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut files = Vec::new();
    for p in paths {
        match std::fs::read_dir(p) {
            Ok(entries) => files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path())),
            Err(_) => files.push(p.clone()),
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            (f, mtime, meta.map(|m| m.len()).unwrap_or(0))
        })
        .collect()
}

impl State {
    fn numbering(&self) -> Numbering {
        Numbering {
            generation: self.generation,
            first_identity: self.next_identity,
            // Rule ids stay below 2^24; each live generation gets its own
            // 2^24 block, so no two share a set id.
            only_from_base: (self.generation % ONLY_FROM_GENERATIONS + 1) << 24,
        }
    }

    /// Schedules `old`'s rules for deletion after the grace period.
    fn schedule_retire(&mut self, old: Arc<Compiled>) {
        self.retiring
            .push_back((Instant::now() + RETIRE_GRACE, old));
        // Bound what waits (reloads faster than the grace period): the
        // oldest goes at once; it was replaced long ago.
        while self.retiring.len() >= ONLY_FROM_GENERATIONS as usize / 2 {
            self.retire_due(true);
        }
    }

    /// Before `new` is written beside the generation in force: if the
    /// generations still waiting out their grace period would leave too
    /// little room in some map, waits for them (at most [`RETIRE_GRACE`])
    /// and deletes them first. Reloads in quick succession would otherwise
    /// need room for three or more generations at once.
    fn make_room(&mut self, new: &Compiled) {
        if self.retiring.is_empty() {
            return;
        }
        let caps = self.map_sizes.policy_caps();
        let count = |c: &Compiled| c.rule_counts().map(|(_, n)| n);
        let mut need = count(new);
        for c in std::iter::once(&*self.compiled).chain(self.retiring.iter().map(|(_, c)| &**c)) {
            for (n, m) in need.iter_mut().zip(count(c)) {
                *n += m;
            }
        }
        if need.iter().zip(caps).all(|(&n, cap)| n <= cap as usize) {
            return;
        }
        if let Some((due, _)) = self.retiring.back() {
            // Blocks this task only: decisions and metrics run on their own.
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        while !self.retiring.is_empty() {
            self.retire_due(true);
        }
    }

    /// Deletes the rules of generations whose grace period is over (or the
    /// oldest one, when `force`).
    fn retire_due(&mut self, force: bool) {
        let mut retired = false;
        while let Some((due, _)) = self.retiring.front() {
            if !force && *due > Instant::now() {
                break;
            }
            let Some((_, old)) = self.retiring.pop_front() else {
                break;
            };
            self.maps.retire(&old, &self.compiled);
            retired = true;
            if force {
                break;
            }
        }
        if retired {
            release_free_memory();
        }
    }

    fn names_mut(&self) -> std::sync::RwLockWriteGuard<'_, Generations> {
        self.names.write().unwrap_or_else(|e| e.into_inner())
    }

    /// See [`Generations::announce`].
    fn announce(&self, c: &Compiled) {
        self.names_mut().announce(c);
    }

    fn publish(&mut self, mut compiled: Compiled) {
        // Warnings are logged once, by the compile that found them; cgroups
        // classified later republish the same generation.
        for w in compiled.warnings.drain(..) {
            tracing::warn!("{w}");
        }
        self.next_identity = compiled
            .identity_cfg
            .keys()
            .max()
            .map_or(self.next_identity, |m| m + 1);
        self.compiled = Arc::new(compiled);
        let store = self.names_mut().publish(Arc::clone(&self.compiled));
        store.run();
        for ((name, n), cap) in self
            .compiled
            .rule_counts()
            .into_iter()
            .zip(self.map_sizes.policy_caps())
        {
            self.metrics.set_map(name, n, cap);
        }
        self.metrics.policies.set(self.policies.len() as i64);
        self.metrics.gpus.set(self.compiled.node.gpus.len() as i64);
    }

    /// Loads, compiles and swaps in the policy files; on any error the
    /// generation in force stays untouched.
    fn reload(&mut self, why: &str) {
        self.fingerprint = fingerprint(&self.paths);
        // Where a reload's time goes, for the log (large rule sets).
        let started = Instant::now();
        let mut phase = started;
        let mut lap = || {
            let ms = phase.elapsed().as_millis() as u64;
            phase = Instant::now();
            ms
        };
        let policies = match policy::load_paths_cached(&self.paths, &mut self.parsed) {
            Ok(p) => p,
            Err(errors) => {
                log_policy_errors(&errors);
                tracing::error!(
                    reason = why,
                    errors = errors.len(),
                    "policy reload rejected; the policy in force stays"
                );
                self.metrics.reload(false);
                return;
            }
        };
        let parse_ms = lap();
        let mut cgroups = identity::scan(&self.root);
        self.pods.annotate_blocking(&mut cgroups);
        self.generation += 1;
        let mut compile_ms = 0;
        let node = Arc::new(NodeDevices::discover(&self.host_proc));
        let result = compile::compile_on(&policies, &cgroups, self.numbering(), node)
            .map(|c| self.metrics.with_policy_slots(c))
            .map_err(DaemonError::from)
            .and_then(|new| {
                compile_ms = lap();
                self.make_room(&new);
                self.announce(&new);
                let applied = self.maps.apply(Some(&self.compiled), &new);
                if applied.is_err() {
                    self.names_mut().withdraw(new.generation);
                }
                match applied {
                    Ok(()) => Ok(new),
                    Err(e @ MapsError::Flip { .. }) => {
                        // Undone, but its rules are in the maps and a hook
                        // may hold one of its identities: retire it after
                        // the grace period, and never hand out its numbers.
                        self.next_identity = self
                            .next_identity
                            .max(new.identity_cfg.keys().max().map_or(0, |m| m + 1));
                        self.schedule_retire(Arc::new(new));
                        Err(e.into())
                    }
                    Err(e) => Err(e.into()),
                }
            });
        let write_ms = lap();
        if result.is_ok() {
            let old = Arc::clone(&self.compiled);
            self.schedule_retire(old);
        }
        match result {
            Ok(new) => {
                let old: Vec<&str> = self.policies.iter().map(|p| p.name.as_str()).collect();
                let now: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
                let added: Vec<&str> = now.iter().filter(|n| !old.contains(n)).copied().collect();
                let removed: Vec<&str> = old.iter().filter(|n| !now.contains(n)).copied().collect();
                let (rules_added, rules_removed) = compile::rule_changes(&self.compiled, &new);
                tracing::info!(
                    reason = why,
                    policies = now.len(),
                    ?added,
                    ?removed,
                    rules_added = rules_added.len(),
                    rules_removed = rules_removed.len(),
                    rules_before = self.compiled.rules.len().saturating_sub(1),
                    rules_after = new.rules.len().saturating_sub(1),
                    identities = new.identity_cfg.len(),
                    cgroups = new.cgroups.len(),
                    parse_ms,
                    compile_ms,
                    write_ms,
                    total_ms = started.elapsed().as_millis() as u64,
                    "policy applied"
                );
                // The rules themselves at debug: a 100k-rule reload must not
                // flood the log at the default level.
                tracing::debug!(added = ?rules_added, removed = ?rules_removed, "rules changed");
                self.policies = policies;
                self.publish(new);
                self.metrics.reload(true);
            }
            Err(e) => {
                tracing::error!(reason = why, error = %e, "policy reload rejected; the policy in force stays");
                self.metrics.reload(false);
            }
        }
    }

    /// Classifies one cgroup created since the last full compile.
    fn classify(&mut self, mut cg: CgroupInfo) {
        if self.compiled.cgroups.contains_key(&cg.id) {
            return;
        }
        if cg.pod == pod::Lookup::NotPod {
            cg.pod = self.pods.lookup_blocking(&cg.path);
        }
        if cg.pod == pod::Lookup::Pending {
            // Unmapped, it keeps its nearest classified ancestor's identity;
            // the next rescan asks again.
            tracing::debug!(cgroup = %cg.path, "pod metadata not known yet; cgroup keeps its ancestor's identity");
            return;
        }
        // The pod-level cgroup first, so the pod's later containers inherit
        // its identity from their first instruction.
        if let pod::Lookup::Known(meta) = &cg.pod
            && let Some(pod_cg) = self.pods.pod_level(&self.root, &cg.path, meta)
        {
            // Classified from the token alone so far: labels are known now.
            if self.pods.forget_provisional(pod_cg.id) {
                let mut compiled = (*self.compiled).clone();
                compiled.cgroups.remove(&pod_cg.id);
                self.compiled = Arc::new(compiled);
            }
            self.classify(pod_cg);
        }
        let set = compile::select_cgroup(&self.policies, &cg);
        let mut compiled = (*self.compiled).clone();
        let key = compile::IdentityKey::of(&compiled, &cg, set, std::path::Path::new("/"));
        let identity = if key.policies.is_empty() {
            portcullis_common::IDENTITY_UNRESTRICTED
        } else if let Some(&id) = compiled.identity_of.get(&key) {
            id
        } else {
            let id = self.next_identity;
            if let Err(e) = compile::add_identity(&mut compiled, &self.policies, &key, id)
                .map(|()| {
                    compiled = self
                        .metrics
                        .with_policy_slots(std::mem::take(&mut compiled))
                })
                .map_err(DaemonError::from)
                .and_then(|()| Ok(self.maps.add_identities(&self.compiled, &compiled)?))
            {
                tracing::error!(cgroup = %cg.path, error = %e, "cannot classify new cgroup; it keeps its parent's identity");
                return;
            }
            id
        };
        // The reader must know a new identity's names before the kernel
        // can decide under it.
        self.announce(&compiled);
        if let Err(e) = self.maps.set_cgroup(cg.id, identity) {
            tracing::error!(cgroup = %cg.path, error = %e, "cannot classify new cgroup");
            return;
        }
        tracing::debug!(cgroup = %cg.path, identity, pod = ?cg.pod, "classified new cgroup");
        if cg.pod.is_provisional() {
            self.pods.provisional(cg.id, cg.path.clone());
        }
        compiled.cgroups.insert(cg.id, identity);
        if let Some(meta) = cg.pod.metadata() {
            compiled.cgroup_pods.insert(cg.id, meta);
        }
        compiled.cgroup_paths.insert(cg.id, cg.path);
        self.metrics.cgroups_classified.inc();
        self.publish(compiled);
    }

    /// Classifies cgroups the mkdir events missed.
    fn rescan(&mut self) {
        let scanned = identity::scan(&self.root);
        // Cgroups removed since (a deleted pod's): drop their mapping.
        let live: std::collections::HashSet<u64> = scanned.iter().map(|c| c.id).collect();
        let gone: Vec<u64> = self
            .compiled
            .cgroups
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        if !gone.is_empty() {
            let mut compiled = (*self.compiled).clone();
            for id in &gone {
                self.maps.remove_cgroup(*id);
                compiled.cgroups.remove(id);
                compiled.cgroup_paths.remove(id);
            }
            tracing::debug!(
                removed = gone.len(),
                "dropped the identity mappings of removed cgroups"
            );
            self.publish(compiled);
        }
        let mut fresh: Vec<CgroupInfo> = scanned
            .into_iter()
            .filter(|cg| !self.compiled.cgroups.contains_key(&cg.id))
            .collect();
        // One CRI refresh for the whole batch, not one per cgroup.
        self.pods.annotate_blocking(&mut fresh);
        for cg in fresh {
            self.classify(cg);
        }
        // Cgroups classified from the kubelet's token alone (namespace and
        // service account) get their full identity once the runtime
        // reports their pod.
        for cg in self.pods.settle_provisional_blocking(&self.root) {
            let mut compiled = (*self.compiled).clone();
            compiled.cgroups.remove(&cg.id);
            self.compiled = Arc::new(compiled);
            self.classify(cg);
        }
        // Pod cgroups classified by path while the runtime was unreachable
        // get their pod selectors now: a full pass re-reads every pod.
        if self.pods.take_recovered() {
            self.reload("CRI runtime reachable again");
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let mut parsed = policy::ParseCache::default();
    let policies = policy::load_paths_cached(&cfg.policy_paths, &mut parsed).map_err(|errors| {
        log_policy_errors(&errors);
        DaemonError::InvalidPolicy {
            count: errors.len(),
        }
    })?;
    // A bad key stops the start before anything is loaded or pinned.
    let signer = match &cfg.trail {
        Some(t) => {
            let s = Signer::load(&t.key, t.every_lines, t.every)?;
            tracing::info!(public_key = s.public_key(), "signing trail checkpoints");
            Some(s)
        }
        None => {
            tracing::warn!(
                "no --trail-key: the decision trail is hash-chained but unsigned, so whoever can write it can recompute it"
            );
            None
        }
    };
    let root = cgroup::v2_root()?;
    tracing::info!(cgroup_root = %root.display(), policies = policies.len(), "starting");
    let mut kernel = loader::load(&LoadOptions {
        cgroup_root: root.clone(),
        btf_path: "/sys/kernel/btf/vmlinux".into(),
        force_fallback: cfg.force_fallback,
        map_sizes: cfg.map_sizes,
        pin_dir: cfg.pin_dir.clone(),
        require_hooks: cfg.require_hooks,
        refuse_programs: cfg.refuse_programs.clone(),
    })?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_backends(&kernel.backends);
    metrics.set_missing(&kernel.missing);
    metrics.set_programs(loader::attached_programs(&kernel));

    let maps = PolicyMaps::take(&mut kernel.ebpf)?;
    let take = |ebpf: &mut aya::Ebpf, name| ebpf.take_map(name).ok_or(DaemonError::Map { name });
    let ring = RingBuf::try_from(take(&mut kernel.ebpf, MAP_EVENTS)?)
        .map_err(|_| DaemonError::Map { name: MAP_EVENTS })?;
    let counters = KernelCounters {
        counters: PerCpuArray::try_from(take(&mut kernel.ebpf, MAP_COUNTERS)?)
            .map_err(|_| DaemonError::Map { name: MAP_COUNTERS })?,
        decisions: PerCpuArray::try_from(take(&mut kernel.ebpf, MAP_DECISIONS)?).map_err(|_| {
            DaemonError::Map {
                name: MAP_DECISIONS,
            }
        })?,
        policy_decisions: PerCpuArray::try_from(take(&mut kernel.ebpf, MAP_POLICY_DECISIONS)?)
            .map_err(|_| DaemonError::Map {
                name: MAP_POLICY_DECISIONS,
            })?,
    };
    let stats = Arc::new(ReaderStats::default());
    metrics.set_kernel(counters, Arc::clone(&stats));

    let mut state = State {
        root: root.clone(),
        policies: Vec::new(),
        parsed,
        compiled: Arc::new(Compiled::default()),
        names: Arc::new(RwLock::new(Generations::new(cfg.generations_dir.clone()))),
        maps,
        next_identity: 1,
        generation: 0,
        retiring: VecDeque::new(),
        metrics: Arc::clone(&metrics),
        fingerprint: Vec::new(),
        paths: cfg.policy_paths.clone(),
        pods: pod::Resolver::new(cfg.pods.clone()),
        map_sizes: cfg.map_sizes,
        host_proc: cfg.host_proc.clone(),
    };
    // Pinned maps of an earlier instance still hold its policy, which stays
    // in force until ours replaces it like any reload; our numbers must not
    // collide with its.
    let adopted = kernel.adopted_maps.then(|| state.maps.snapshot());
    // Generation numbers name events (see `generations`), so they are never
    // reused: ours start above what an earlier instance stored or left in
    // the adopted maps, and count from 1 (0 marks unrestricted workloads).
    let stored = state
        .names
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .stored_max();
    let in_maps = adopted
        .iter()
        .flat_map(|old| old.identity_cfg.values().map(|c| c.generation))
        .max();
    state.generation = stored.max(in_maps).unwrap_or(0) + 1;
    if let Some(old) = &adopted {
        let ids = old.identity_cfg.keys().chain(old.cgroups.values());
        state.next_identity = ids.max().map_or(1, |m| m + 1);
        let bases: std::collections::BTreeSet<u32> =
            old.only_from.iter().map(|k| k.identity >> 24).collect();
        while bases.contains(&(state.generation % ONLY_FROM_GENERATIONS + 1)) {
            state.generation += 1;
        }
        tracing::info!(
            pin_dir = ?cfg.pin_dir,
            cgroups = old.cgroups.len(),
            identities = old.identity_cfg.len(),
            old_links = kernel.old_links.len(),
            "adopting the pinned maps of an earlier instance; its policy stays in force until this one applies"
        );
    }
    // The first load must succeed: there is nothing in force to fall back to.
    let mut cgroups = identity::scan(&root);
    state.pods.annotate_blocking(&mut cgroups);
    let first = metrics.with_policy_slots(compile::compile_on(
        &policies,
        &cgroups,
        state.numbering(),
        Arc::new(NodeDevices::discover(&cfg.host_proc)),
    )?);
    state.announce(&first);
    state.maps.apply(adopted.as_ref(), &first)?;
    if let Some(old) = adopted {
        state.schedule_retire(Arc::new(old));
    }
    // Make before break: the earlier instance's programs detach only now
    // that ours enforce the new policy.
    let retired = std::mem::take(&mut kernel.old_links).retire()?;
    if retired > 0 {
        tracing::info!(
            links = retired,
            "detached the programs of an earlier instance"
        );
    }
    if let Some(pins) = &kernel.pins {
        let stale = pins.remove_stale_maps()?;
        if stale > 0 {
            tracing::info!(
                maps = stale,
                "removed maps an agent of another map layout pinned"
            );
        }
    }
    state.policies = policies;
    state.fingerprint = fingerprint(&cfg.policy_paths);
    tracing::info!(
        policies = state.policies.len(),
        rules = first.rules.len() - 1,
        identities = first.identity_cfg.len(),
        cgroups = first.cgroups.len(),
        "policy applied"
    );
    state.publish(first);
    metrics.reload(true);
    // The parsed files and the compile's scratch are gone now.
    release_free_memory();

    let (mkdir_tx, mut mkdir_rx) = mpsc::unbounded_channel();
    let sink = Sink::open(cfg.decisions_file.clone(), cfg.decisions_rotation, signer)?;
    let reader = tokio::spawn(events::run(
        ring,
        Arc::clone(&state.names),
        sink,
        mkdir_tx,
        stats,
    ));
    let listener = metrics::bind(cfg.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(cfg.metrics_addr), "serving /metrics, /healthz, /readyz");
    let server = tokio::spawn(metrics::serve(listener, Arc::clone(&metrics)));
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        connect = kernel.backends.connect.as_str(),
        exec = kernel.backends.exec.as_str(),
        open = kernel.backends.open.as_str(),
        device = kernel.backends.device.as_str(),
        socket = kernel.backends.socket.as_str(),
        packet = kernel.backends.packet.as_str(),
        moves = kernel.backends.moves.as_str(),
        "enforcing"
    );

    let sig = |kind, name| signal(kind).map_err(|e| DaemonError::Signal(name, e));
    let mut hup = sig(SignalKind::hangup(), "SIGHUP")?;
    let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
    let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut watch = tokio::time::interval(cfg.watch_interval);
    let mut rescan = tokio::time::interval(cfg.rescan_interval);
    let mut retire = tokio::time::interval(RETIRE_GRACE / 4);
    loop {
        // The next time-bound approval to lapse: recompile then, so it stops
        // applying with no file change. Counted from when the policy in
        // force was compiled: another branch winning the select at the
        // lapse second must not make the loop skip past it (a wait of zero
        // reloads at once).
        let lapse =
            policy::lapse_wait(&state.policies, state.compiled.judged_at, SystemTime::now());
        let until_lapse = async move {
            match lapse {
                Some(wait) => tokio::time::sleep(wait + Duration::from_millis(20)).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = hup.recv() => state.reload("SIGHUP"),
            _ = until_lapse => state.reload("a time-bound approval lapsed"),
            _ = watch.tick() => {
                let seen = fingerprint(&state.paths);
                if seen != state.fingerprint {
                    // A file caught mid-write (truncated, half written) must
                    // not be applied: reload once it holds still briefly.
                    tokio::time::sleep(WATCH_SETTLE).await;
                    if fingerprint(&state.paths) == seen {
                        state.reload("policy files changed");
                    }
                }
            }
            _ = rescan.tick() => state.rescan(),
            _ = retire.tick() => state.retire_due(false),
            Some(path) = mkdir_rx.recv() => {
                if let Some(cg) = identity::lookup(&state.root, &path) {
                    state.classify(cg);
                }
            }
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
        if reader.is_finished() {
            tracing::error!("decision reader stopped");
            break;
        }
    }
    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    reader.abort();
    server.abort();
    match (&kernel.pins, cfg.detach_on_exit) {
        (Some(pins), false) => tracing::info!(
            pin_dir = %pins.root().display(),
            "stopping; enforcement continues from the pinned programs (`portcullis uninstall` removes them)"
        ),
        (Some(pins), true) => {
            let removed = pin::uninstall(pins.root())?;
            tracing::info!(pin_dir = %pins.root().display(), removed, "stopping; pins removed, programs detach");
        }
        (None, _) => tracing::info!("stopping; programs detach"),
    }
    drop(kernel);
    Ok(())
}
