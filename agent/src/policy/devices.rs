//! The `devices:` section: which device nodes a workload may open or create.
//! Rules name devices by kind (resolved to device numbers on the node, see
//! `node_devices`), by number, or by a path glob resolved to numbers.

/// A device class the agent knows how to find on a node. Its names in
/// policies are the variants in kebab case (see [`DeviceKind::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, schemars::JsonSchema)]
#[schemars(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// `/dev/nvidiaN` (195:N), by index or UUID.
    NvidiaGpu,
    /// `/dev/nvidiactl` (195:255).
    Nvidiactl,
    /// `/dev/nvidia-modeset` (195:254).
    NvidiaModeset,
    /// `/dev/nvidia-uvm` (dynamic major, minor 0).
    NvidiaUvm,
    /// `/dev/nvidia-uvm-tools` (dynamic major, minor 1).
    NvidiaUvmTools,
    /// `/dev/nvidia-caps/*` (dynamic major, MIG capabilities).
    NvidiaCaps,
    /// One GPU's MIG instances, by GPU `index` and optionally `instance`:
    /// their capability nodes in `/dev/nvidia-caps`, whose minors the driver
    /// lists in `/proc/driver/nvidia-caps/mig-minors`.
    NvidiaMig,
    /// `/dev/infiniband/uverbsN` (231:192-255).
    RdmaUverbs,
    /// `/dev/infiniband/rdma_cm` (misc 10, dynamic minor).
    RdmaCm,
    /// `/dev/infiniband/issmN` (231:64-127).
    RdmaIssm,
    /// `/dev/infiniband/umadN` (231:0-63).
    RdmaUmad,
    /// `/dev/dri/renderD*` (226:128-255).
    DrmRender,
    /// `/dev/kfd` (AMD, dynamic major).
    AmdKfd,
}

impl DeviceKind {
    /// The names policies use.
    pub const ALL: [(&'static str, DeviceKind); 13] = [
        ("nvidia-gpu", Self::NvidiaGpu),
        ("nvidiactl", Self::Nvidiactl),
        ("nvidia-modeset", Self::NvidiaModeset),
        ("nvidia-uvm", Self::NvidiaUvm),
        ("nvidia-uvm-tools", Self::NvidiaUvmTools),
        ("nvidia-caps", Self::NvidiaCaps),
        ("nvidia-mig", Self::NvidiaMig),
        ("rdma-uverbs", Self::RdmaUverbs),
        ("rdma-cm", Self::RdmaCm),
        ("rdma-issm", Self::RdmaIssm),
        ("rdma-umad", Self::RdmaUmad),
        ("drm-render", Self::DrmRender),
        ("amd-kfd", Self::AmdKfd),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("device", |(n, _)| n)
    }
}

/// What a device rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTarget {
    /// A kind; for `nvidia-gpu`, optionally one GPU by index or UUID; for
    /// `nvidia-mig`, optionally one GPU by index and one of its GPU
    /// instances.
    Kind {
        kind: DeviceKind,
        index: Option<u32>,
        uuid: Option<String>,
        instance: Option<u32>,
    },
    /// `c 195:0`, `195:*`, `b 8:0`: a number, `minor: None` for all minors.
    Number {
        block: bool,
        major: u32,
        minor: Option<u32>,
    },
    /// A glob over device node paths, resolved with `stat` to numbers.
    Path(String),
    /// The devices the kubelet allocated to the acting container: the
    /// device list of its CRI config (see `compile::devices::allocated`).
    Allocated,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRule {
    pub target: DeviceTarget,
    /// `ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD` bits: what an allow rule
    /// allows, what a deny rule denies.
    pub access: u32,
    /// Log allows that match this rule (allow rules only).
    pub log: bool,
    /// A time-bound approval (allow rules only).
    pub until: Option<i64>,
    /// The rule as the log shows it, e.g. `nvidia-gpu index 1 read,write`.
    pub text: String,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRules {
    pub default: super::DefaultAction,
    pub allow: Vec<DeviceRule>,
    pub deny: Vec<DeviceRule>,
}
