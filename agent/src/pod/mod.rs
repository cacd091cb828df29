//! Kubernetes pod identity: which pod and container a cgroup belongs to.
//!
//! Node agents learn this without a central dependency (no API server
//! watch): the cgroup path gives the pod UID and container ID
//! ([`cgroup_path`]), and the container runtime's CRI socket on the node
//! ([`cri`]) turns them into namespace, pod name, labels and container
//! name/image. The service account is not part of CRI; it is read from the
//! token the kubelet projects for the pod under its root directory
//! ([`service_account`]).
//!
//! Timing, and why there is never a free pass (the README's Kubernetes
//! section has the whole sequence):
//!
//! - A cgroup with nothing known is left unclassified, so the kernel gives
//!   it its nearest classified ancestor's identity (the host default).
//! - The pod-level cgroup (made by the kubelet before the runtime knows the
//!   pod) gets [`Lookup::Partial`] metadata from the projected token: the
//!   namespace default.
//! - The sandbox's cgroup appears during `RunPodSandbox`, before CRI lists
//!   the pod; containerd's own record of the sandbox already has its labels
//!   ([`Resolver::lookup`]), so the pod-level cgroup gets the pod's identity
//!   before any of its containers can start. Answers that a later lookup
//!   should replace are tracked as provisional and settled at each rescan.
//! - Container cgroups are created in `StartContainer`, after
//!   `CreateContainer` registered the container: one `ContainerStatus`.
//! - With the CRI socket unreachable the agent logs it once, classifies by
//!   path, and re-reads every pod when the runtime answers again.

pub mod allocated;
pub mod cgroup_path;
pub mod cri;
pub mod service_account;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

pub use cgroup_path::{PodCgroup, Runtime};

use crate::compile::CgroupInfo;
pub use cri::{CriClient, CriError};

/// Labels the kubelet adds to every sandbox for its own bookkeeping; they
/// are not the pod's labels and are dropped so `podLabels` sees what the API
/// object has.
const KUBELET_SANDBOX_LABELS: [&str; 3] = [
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.uid",
];

/// What a policy selector can match on for a cgroup in a pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodMetadata {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// `None` when the kubelet's projected token could not be read.
    pub service_account: Option<String>,
    /// The container the cgroup belongs to; `None` for the pod-level cgroup
    /// and the sandbox (pause) container.
    pub container: Option<ContainerMetadata>,
    /// Read from containerd's own record of the sandbox while CRI did not
    /// report the pod yet (see [`Resolver::lookup`]); replaced by CRI's
    /// answer at the next rescan.
    pub provisional: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerMetadata {
    pub id: String,
    pub name: String,
    pub image: String,
    /// What the kubelet allocated to it (see [`allocated`]).
    pub allocated: Vec<allocated::AllocatedDevice>,
}

/// The answer for one cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Lookup {
    /// The path is not a pod's cgroup (or was not looked up).
    #[default]
    NotPod,
    Known(Arc<PodMetadata>),
    /// The runtime does not report the pod yet, but the kubelet has already
    /// projected its service account token, which names the namespace and
    /// the service account: policies selecting only by those (and by path)
    /// can apply — the namespace's default — while label and container
    /// selectors wait for the runtime. Looked up again at each rescan.
    Partial(Arc<PodMetadata>),
    /// A pod cgroup the runtime does not (yet) report: leave it unclassified
    /// so it keeps its ancestor's identity, and ask again later.
    Pending,
    /// No runtime to ask: classify by path only.
    Unavailable,
}

impl Lookup {
    /// The pod metadata known so far (complete or from the token only).
    pub fn metadata(&self) -> Option<Arc<PodMetadata>> {
        match self {
            Self::Known(m) | Self::Partial(m) => Some(Arc::clone(m)),
            _ => None,
        }
    }

    /// Classified from metadata that a later lookup should replace.
    pub fn is_provisional(&self) -> bool {
        match self {
            Lookup::Partial(_) => true,
            Lookup::Known(m) => m.provisional,
            _ => false,
        }
    }
}

/// Where the resolver gets its answers.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// CRI socket; `None` disables pod metadata.
    pub cri_socket: Option<PathBuf>,
    /// The kubelet's root directory (`/var/lib/kubelet`), for service
    /// account tokens.
    pub kubelet_root: PathBuf,
    /// Bound on each CRI call.
    pub timeout: Duration,
    /// How long a container cgroup's lookup keeps asking before it is left
    /// pending for the next rescan.
    pub settle: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            cri_socket: Some("/run/containerd/containerd.sock".into()),
            kubelet_root: "/var/lib/kubelet".into(),
            timeout: Duration::from_secs(2),
            settle: Duration::from_millis(500),
        }
    }
}

struct Pod {
    sandbox_ids: Vec<String>,
    meta: PodMetadata,
}

/// Pod and container metadata from the CRI runtime, cached between
/// refreshes. A refresh replaces the whole cache, so a deleted pod's entry
/// goes with the next refresh after its removal.
pub struct Resolver {
    cfg: ResolverConfig,
    client: Option<CriClient>,
    /// Last failed connect, to retry at most every few seconds and log once.
    down_since: Option<Instant>,
    logged_down: bool,
    /// The runtime answered again after being unreachable: cgroups
    /// classified by path meanwhile should be looked at again.
    recovered: bool,
    pods: HashMap<String, Pod>,
    containers: HashMap<String, cri::Container>,
    /// Each container's allocated devices, read once (they never change for
    /// a container's life); kept across refreshes.
    allocations: HashMap<String, Vec<allocated::AllocatedDevice>>,
    /// Cgroups classified from [`Lookup::Partial`] metadata, by id: looked
    /// up again until the runtime reports them.
    provisional: HashMap<u64, String>,
}

impl Resolver {
    pub fn new(cfg: ResolverConfig) -> Self {
        Self {
            cfg,
            client: None,
            down_since: None,
            logged_down: false,
            recovered: false,
            pods: HashMap::new(),
            containers: HashMap::new(),
            allocations: HashMap::new(),
            provisional: HashMap::new(),
        }
    }

    /// Whether a CRI socket is configured at all.
    pub fn enabled(&self) -> bool {
        self.cfg.cri_socket.is_some()
    }

    /// Whether the runtime became reachable again since the last call (pod
    /// cgroups classified by path while it was down need a full pass).
    /// Retries an unreachable runtime (at most every few seconds) first, so
    /// recovery is noticed even when no new pod cgroup asks.
    pub fn take_recovered(&mut self) -> bool {
        if self.enabled() && self.client.is_none() && self.down_since.is_some() {
            let handle = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let _ = self.client().await;
                })
            });
        }
        std::mem::take(&mut self.recovered)
    }

    /// Whether `id` was classified from metadata to be replaced (and stops
    /// being tracked as such: the caller re-classifies it now).
    pub fn forget_provisional(&mut self, id: u64) -> bool {
        self.provisional.remove(&id).is_some()
    }

    /// Records a cgroup classified from partial metadata.
    pub fn provisional(&mut self, id: u64, path: String) {
        self.provisional.insert(id, path);
    }

    /// Cgroups classified from partial metadata whose full metadata is now
    /// known (one refresh for all of them), removed from the provisional
    /// set; cgroups that are gone are dropped from it too.
    pub fn settle_provisional_blocking(&mut self, root: &std::path::Path) -> Vec<CgroupInfo> {
        if self.provisional.is_empty() {
            return Vec::new();
        }
        let mut cgroups: Vec<CgroupInfo> = Vec::new();
        self.provisional
            .retain(|_, path| match crate::identity::lookup(root, path) {
                Some(cg) => {
                    cgroups.push(cg);
                    true
                }
                None => false,
            });
        self.annotate_blocking(&mut cgroups);
        cgroups.retain(|cg| matches!(cg.pod, Lookup::Known(_)));
        for cg in &cgroups {
            self.provisional.remove(&cg.id);
        }
        cgroups
    }

    /// Number of pods in the cache (for logs and tests).
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    async fn client(&mut self) -> Option<&mut CriClient> {
        let socket = self.cfg.cri_socket.clone()?;
        if self.client.is_none() {
            if self
                .down_since
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
            {
                return None;
            }
            match CriClient::connect(socket.clone(), self.cfg.timeout).await {
                Ok(mut c) => match c.version().await {
                    Ok(v) => {
                        tracing::info!(
                            socket = %socket.display(),
                            runtime = %v.runtime_name,
                            version = %v.runtime_version,
                            api = %v.runtime_api_version,
                            "pod metadata from the CRI runtime"
                        );
                        self.client = Some(c);
                        self.recovered |= self.down_since.is_some();
                        self.down_since = None;
                        self.logged_down = false;
                    }
                    Err(e) => self.down(&e),
                },
                Err(e) => self.down(&e),
            }
        }
        self.client.as_mut()
    }

    fn down(&mut self, e: &CriError) {
        self.client = None;
        self.down_since = Some(Instant::now());
        if !self.logged_down {
            // Once: a node without a runtime socket (or a dev box) would
            // otherwise log every few seconds forever.
            tracing::warn!(error = %e, "CRI runtime unavailable; pod selectors match nothing, cgroups are classified by path (retrying quietly)");
            self.logged_down = true;
        }
    }

    /// Re-reads every sandbox and container from the runtime.
    pub async fn refresh(&mut self) -> Result<(), ()> {
        let Some(client) = self.client().await else {
            return Err(());
        };
        let mut client = client.clone();
        let listed = async {
            let sandboxes = client.list_pod_sandbox().await?;
            let containers = client.list_containers().await?;
            Ok::<_, CriError>((sandboxes, containers))
        }
        .await;
        let (sandboxes, containers) = match listed {
            Ok(x) => x,
            Err(e) => {
                self.down(&e);
                return Err(());
            }
        };
        let mut pods: HashMap<String, Pod> = HashMap::new();
        // Newest sandbox last, so a pod's metadata is that of its newest
        // attempt (labels can change between attempts).
        let mut sandboxes = sandboxes;
        sandboxes.sort_by_key(|s| s.created_at);
        for s in sandboxes {
            let Some(md) = s.metadata.as_ref() else {
                continue;
            };
            let uid = md.uid.clone();
            let labels = s
                .labels
                .iter()
                .filter(|(k, _)| !KUBELET_SANDBOX_LABELS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let service_account =
                service_account::read(&self.cfg.kubelet_root, &uid).map(|t| t.name);
            let entry = pods.entry(uid.clone()).or_insert_with(|| Pod {
                sandbox_ids: Vec::new(),
                meta: PodMetadata::default(),
            });
            entry.sandbox_ids.push(s.id.clone());
            entry.meta = PodMetadata {
                uid,
                namespace: md.namespace.clone(),
                name: md.name.clone(),
                labels,
                service_account,
                container: None,
                provisional: false,
            };
        }
        self.pods = pods;
        self.containers = containers.into_iter().map(|c| (c.id.clone(), c)).collect();
        self.allocations
            .retain(|id, _| self.containers.contains_key(id));
        let unread: Vec<String> = self
            .containers
            .keys()
            .filter(|id| !self.allocations.contains_key(*id))
            .cloned()
            .collect();
        for id in unread {
            if let Ok(r) = client.container_status(&id).await {
                self.allocations
                    .insert(id, allocated::from_status_info(&r.info).unwrap_or_default());
            }
        }
        Ok(())
    }

    /// What the kubelet's files say about a pod the runtime does not report
    /// yet (see [`Lookup::Partial`]); [`Lookup::Pending`] without a token.
    fn partial(&self, pc: &PodCgroup) -> Lookup {
        match service_account::read(&self.cfg.kubelet_root, &pc.pod_uid) {
            Some(t) => Lookup::Partial(Arc::new(PodMetadata {
                uid: pc.pod_uid.clone(),
                namespace: t.namespace,
                service_account: Some(t.name),
                ..Default::default()
            })),
            None => Lookup::Pending,
        }
    }

    fn answer(&self, pc: &PodCgroup) -> Option<PodMetadata> {
        let pod = self.pods.get(&pc.pod_uid)?;
        let mut meta = pod.meta.clone();
        if let Some(id) = &pc.container_id
            && !pod.sandbox_ids.contains(id)
        {
            let c = self.containers.get(id)?;
            // Not answered without it: an identity computed without the
            // container's devices would stay wrong for its life.
            let allocated = self.allocations.get(id)?.clone();
            meta.container = Some(ContainerMetadata {
                allocated,
                id: id.clone(),
                name: c
                    .metadata
                    .as_ref()
                    .map(|m| m.name.clone())
                    .unwrap_or_default(),
                image: c
                    .image
                    .as_ref()
                    .map(|i| i.image.clone())
                    .unwrap_or_default(),
            });
        }
        Some(meta)
    }

    /// One `ContainerStatus` call for a container of a pod already known: a
    /// single round trip instead of listing everything, because this runs
    /// while the new container's first process is starting.
    async fn fetch_container(&mut self, id: &str) -> bool {
        let Some(client) = self.client().await else {
            return false;
        };
        let mut client = client.clone();
        match client.container_status(id).await {
            Ok(r) if r.status.as_ref().is_some_and(|st| st.id == id) => {
                self.allocations.insert(
                    id.to_string(),
                    allocated::from_status_info(&r.info).unwrap_or_default(),
                );
                let st = r.status.unwrap_or_default();
                let c = cri::Container {
                    id: st.id.clone(),
                    metadata: st.metadata,
                    image: st.image,
                    image_ref: st.image_ref,
                    state: st.state,
                    labels: st.labels,
                    ..Default::default()
                };
                self.containers.insert(id.to_string(), c);
                true
            }
            _ => false,
        }
    }

    /// A sandbox (pause) container's cgroup appears while `RunPodSandbox` is
    /// still running, when CRI does not list the pod yet. containerd has
    /// already recorded the container with the sandbox's labels, though:
    /// reading them lets the pod-level cgroup be classified before the
    /// kubelet can start the pod's first container. The record's labels
    /// also carry the image's own labels (containerd merges them), so this
    /// answer is provisional and CRI's replaces it at the next rescan.
    /// `None` for anything else (CRI-O has no such API; app containers are
    /// answered by CRI).
    async fn sandbox_from_containerd(&mut self, pc: &PodCgroup, id: &str) -> Option<PodMetadata> {
        let client = self.client().await?;
        let mut client = client.clone();
        let record = client.containerd_container(id).await.ok()?;
        let l = &record.labels;
        if l.get("io.cri-containerd.kind").map(String::as_str) != Some("sandbox")
            || l.get("io.kubernetes.pod.uid") != Some(&pc.pod_uid)
        {
            return None;
        }
        let labels = l
            .iter()
            .filter(|(k, _)| {
                !KUBELET_SANDBOX_LABELS.contains(&k.as_str())
                    && !k.starts_with("io.cri-containerd.")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Some(PodMetadata {
            uid: pc.pod_uid.clone(),
            namespace: l.get("io.kubernetes.pod.namespace")?.clone(),
            name: l.get("io.kubernetes.pod.name").cloned().unwrap_or_default(),
            labels,
            service_account: service_account::read(&self.cfg.kubelet_root, &pc.pod_uid)
                .map(|t| t.name),
            container: None,
            provisional: true,
        })
    }

    /// The pod-level cgroup of the pod `path` belongs to, when `path` is
    /// below it: once any of a pod's cgroups resolves, the pod-level cgroup
    /// can be classified too, so containers created in the pod later inherit
    /// the pod's identity (namespace, labels and service account are
    /// pod-wide) from their first instruction, before their own lookup.
    pub fn pod_level(
        &self,
        root: &std::path::Path,
        path: &str,
        meta: &PodMetadata,
    ) -> Option<CgroupInfo> {
        let pc = cgroup_path::parse(path)?;
        if pc.pod_path == path {
            return None;
        }
        let mut cg = crate::identity::lookup(root, &pc.pod_path)?;
        cg.pod = Lookup::Known(Arc::new(PodMetadata {
            container: None,
            ..meta.clone()
        }));
        Some(cg)
    }

    /// Metadata for the cgroup at `path` (relative to the v2 root).
    pub async fn lookup(&mut self, path: &str) -> Lookup {
        let Some(pc) = cgroup_path::parse(path) else {
            return Lookup::NotPod;
        };
        if !self.enabled() {
            return Lookup::Unavailable;
        }
        if let Some(meta) = self.answer(&pc) {
            return Lookup::Known(Arc::new(meta));
        }
        // Only containers of known pods are worth waiting for (below): the
        // runtime knows a container before it creates its cgroup, while a
        // pod-level cgroup can precede its sandbox by seconds (network
        // setup) and a sandbox's cgroup precedes its listing.
        let deadline = Instant::now() + self.cfg.settle;
        if let Some(id) = &pc.container_id
            && self.pods.contains_key(&pc.pod_uid)
            && self.fetch_container(id).await
            && let Some(meta) = self.answer(&pc)
        {
            return Lookup::Known(Arc::new(meta));
        }
        if let Some(id) = &pc.container_id
            && !self.pods.contains_key(&pc.pod_uid)
            && let Some(meta) = self.sandbox_from_containerd(&pc, id).await
        {
            return Lookup::Known(Arc::new(meta));
        }
        loop {
            if self.refresh().await.is_err() {
                return Lookup::Unavailable;
            }
            if let Some(meta) = self.answer(&pc) {
                return Lookup::Known(Arc::new(meta));
            }
            // Waiting is worth it only for a container of a pod the runtime
            // reports (it registers containers before creating their
            // cgroups); a pod it does not know (yet, or at all: another
            // runtime's) must not stall the classification of others.
            if pc.container_id.is_none()
                || !self.pods.contains_key(&pc.pod_uid)
                || Instant::now() >= deadline
            {
                return self.partial(&pc);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fills in [`CgroupInfo::pod`] for a whole scan with one refresh (a
    /// full scan must not ask the runtime once per cgroup).
    pub async fn annotate(&mut self, cgroups: &mut [CgroupInfo]) {
        let parsed: Vec<Option<PodCgroup>> = cgroups
            .iter()
            .map(|c| cgroup_path::parse(&c.path))
            .collect();
        if parsed.iter().all(Option::is_none) {
            return;
        }
        let available = self.enabled() && self.refresh().await.is_ok();
        for (cg, pc) in cgroups.iter_mut().zip(parsed) {
            cg.pod = match pc {
                None => Lookup::NotPod,
                Some(_) if !available => Lookup::Unavailable,
                Some(pc) => match self.answer(&pc) {
                    Some(meta) => Lookup::Known(Arc::new(meta)),
                    None => self.partial(&pc),
                },
            };
            if cg.pod.is_provisional() {
                self.provisional.insert(cg.id, cg.path.clone());
            }
        }
    }

    /// [`Resolver::annotate`] from synchronous code; see
    /// [`Resolver::lookup_blocking`].
    pub fn annotate_blocking(&mut self, cgroups: &mut [CgroupInfo]) {
        if cgroups
            .iter()
            .all(|c| cgroup_path::parse(&c.path).is_none())
        {
            return;
        }
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| handle.block_on(self.annotate(cgroups)));
    }

    /// [`Resolver::lookup`] from synchronous code running on the agent's
    /// multi-threaded runtime (the daemon's classification path), without
    /// stalling the runtime's other tasks.
    pub fn lookup_blocking(&mut self, path: &str) -> Lookup {
        if cgroup_path::parse(path).is_none() {
            return Lookup::NotPod;
        }
        let handle = tokio::runtime::Handle::current();
        let start = Instant::now();
        let answer = tokio::task::block_in_place(|| handle.block_on(self.lookup(path)));
        tracing::debug!(cgroup = path, ?answer, elapsed = ?start.elapsed(), "pod metadata lookup");
        answer
    }
}
