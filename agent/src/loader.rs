//! Loading the kernel programs and attaching each hook to the best backend
//! this kernel offers.
//!
//! One table ([`PROGRAMS`]) says, for every program, which hook it is, what
//! it attaches to, which backend it provides and what to fall back to. Exec
//! and open prefer BPF-LSM (the syscall fails with EPERM) and fall back to a
//! BTF tracepoint that SIGKILLs the offender where BPF-LSM is not enabled or
//! refuses to load (this host: `BPF_PROG_LOAD` returns EPERM for LSM).

use std::{
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupDevice, CgroupSockAddr, Lsm, ProgramError,
        TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use portcullis_common::{
    BACKEND_CGROUP_DEVICE, BACKEND_CGROUP_SOCK_ADDR, BACKEND_LSM, BACKEND_NONE,
    BACKEND_TRACEPOINT_KILL, GLOBAL_OFFSETS, MAP_DEVICE_RULES, MAP_EVENTS, MAP_EXEC_RULES,
    MAP_FILE_RULES, MAP_IDENTITIES, MAP_IDENTITY_CFG, MAP_NET_RULES, MAP_ONLY_FROM, PINNED_MAPS,
    PROG_CGROUP_MKDIR, PROG_CONNECT4, PROG_CONNECT6, PROG_DEVICE, PROG_EXEC_LSM, PROG_EXEC_TP,
    PROG_EXEC_TP_TWIN, PROG_OPEN_LSM, PROG_OPEN_TP, PROG_OPEN_TP_TWIN, PROG_SENDMSG4,
    PROG_SENDMSG6,
};

use crate::{
    btf::{self, BtfError},
    pin::{OldLinks, PinDir, PinError},
    verifier::Refusal,
};

/// The eBPF object built by `build.rs` (empty under `AYA_BUILD_SKIP`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

const SECURITYFS: &str = "/sys/kernel/security";
/// Where classic tracepoints are found (and tracefs is mounted when it is
/// not).
const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("the embedded ebpf object is empty: the agent was built with AYA_BUILD_SKIP")]
    EmptyObject,
    #[error(transparent)]
    Offsets(#[from] BtfError),
    #[error("parsing kernel btf {path}")]
    KernelBtf {
        path: PathBuf,
        #[source]
        source: aya::BtfError,
    },
    #[error("loading the ebpf object")]
    Object(#[source] aya::EbpfError),
    #[error("program {program} is missing from the ebpf object")]
    MissingProgram { program: &'static str },
    #[error("program {program} is not a {hook} program")]
    ProgramType {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    /// One line: the verifier's log is in a file (see [`Refusal`]).
    #[error("the kernel refused program {program} for {hook}: {refusal}")]
    Load {
        program: &'static str,
        hook: &'static str,
        refusal: Refusal,
    },
    #[error("attaching program {program} to {hook}")]
    Attach {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching program {program} to {hook}")]
    RawAttach {
        program: &'static str,
        hook: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} cannot be enforced on this kernel (--require-hooks): {program}: {reason}")]
    HookRequired {
        action: &'static str,
        program: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error("program {program}: its link cannot be pinned")]
    LinkNotPinnable {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("opening cgroup {path} for program {program}")]
    Cgroup {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LoaderError {
    /// Whether the kernel refused for want of privilege (EPERM, EACCES).
    fn is_privilege(&self) -> bool {
        use nix::errno::Errno;
        matches!(
            self,
            Self::Load { refusal, .. }
                if matches!(refusal.errno, Some(Errno::EPERM | Errno::EACCES))
        )
    }
}

/// What [`load`] needs to know.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// cgroup v2 directory the socket programs attach to (the v2 root).
    pub cgroup_root: PathBuf,
    /// Raw BTF of the running kernel.
    pub btf_path: PathBuf,
    /// Skip BPF-LSM even where it works (tests the fallback path).
    pub force_fallback: bool,
    pub map_sizes: MapSizes,
    /// Pin maps and links under this bpffs directory (enforcement outlives
    /// the agent; earlier instances' pins are adopted). `None`: nothing is
    /// pinned and everything detaches when [`Kernel`] drops.
    pub pin_dir: Option<PathBuf>,
    /// Refuse to start when an action has no backend at all, instead of
    /// enforcing what loaded (`--require-hooks`).
    pub require_hooks: bool,
    /// Programs to treat as refused by the kernel without trying them: how
    /// the tests force a hook to fail (`--test-refuse-program`).
    pub refuse_programs: Vec<String>,
}

impl LoadOptions {
    /// Defaults for a cgroup root: host BTF, LSM when available, default
    /// map sizes.
    pub fn new(cgroup_root: impl Into<PathBuf>) -> Self {
        Self {
            cgroup_root: cgroup_root.into(),
            btf_path: PathBuf::from(btf::VMLINUX_BTF),
            force_fallback: false,
            map_sizes: MapSizes::default(),
            pin_dir: None,
            require_hooks: false,
            refuse_programs: Vec::new(),
        }
    }
}

/// `max_entries` of the policy maps, and the ring buffer size in bytes (a
/// power of two, at least a page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub identities: u32,
    pub net_rules: u32,
    pub exec_rules: u32,
    pub file_rules: u32,
    pub only_from: u32,
    pub device_rules: u32,
    pub events_bytes: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            identities: 65536,
            net_rules: 65536,
            exec_rules: 262_144,
            file_rules: 262_144,
            only_from: 16384,
            device_rules: 16384,
            events_bytes: 16 << 20,
        }
    }
}

impl MapSizes {
    /// The policy maps' capacities, in `Compiled::rule_counts` order (the
    /// `map` label of the metrics).
    pub fn policy_caps(&self) -> [u32; 6] {
        [
            self.identities,
            self.net_rules,
            self.exec_rules,
            self.file_rules,
            self.only_from,
            self.device_rules,
        ]
    }

    /// Sets one policy map's capacity from `MAP=N`, `MAP` as the metrics
    /// name it (`identities`, `net_rules`, `exec_rules`, `file_rules`,
    /// `only_from`, `device_rules`).
    pub fn set(&mut self, spec: &str) -> Result<(), String> {
        let (map, n) = spec
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: expected MAP=N"))?;
        let n: u32 = n
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{spec:?}: N must be a positive number"))?;
        let slot = match map {
            "identities" => &mut self.identities,
            "net_rules" => &mut self.net_rules,
            "exec_rules" => &mut self.exec_rules,
            "file_rules" => &mut self.file_rules,
            "only_from" => &mut self.only_from,
            "device_rules" => &mut self.device_rules,
            _ => {
                return Err(format!(
                    "{map:?}: not a policy map (identities, net_rules, exec_rules, file_rules, only_from, device_rules)"
                ));
            }
        };
        *slot = n;
        Ok(())
    }
}

/// How a hook is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    None,
    CgroupSockAddr,
    CgroupDevice,
    Lsm,
    TracepointKill,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::CgroupSockAddr => "cgroup_sock_addr",
            Self::CgroupDevice => "cgroup_device",
            Self::Lsm => "lsm",
            Self::TracepointKill => "tracepoint_kill",
        }
    }

    /// The `BACKEND_*` value events carry.
    pub fn wire(self) -> u8 {
        match self {
            Self::None => BACKEND_NONE,
            Self::CgroupSockAddr => BACKEND_CGROUP_SOCK_ADDR,
            Self::CgroupDevice => BACKEND_CGROUP_DEVICE,
            Self::Lsm => BACKEND_LSM,
            Self::TracepointKill => BACKEND_TRACEPOINT_KILL,
        }
    }

    /// Inverse of [`Backend::wire`]; unknown values are `None`.
    pub fn from_wire(v: u8) -> Self {
        match v {
            BACKEND_CGROUP_SOCK_ADDR => Self::CgroupSockAddr,
            BACKEND_CGROUP_DEVICE => Self::CgroupDevice,
            BACKEND_LSM => Self::Lsm,
            BACKEND_TRACEPOINT_KILL => Self::TracepointKill,
            _ => Self::None,
        }
    }
}

/// The backend each enforced action ended up on.
#[derive(Clone, Copy, Debug)]
pub struct Backends {
    pub connect: Backend,
    pub exec: Backend,
    pub open: Backend,
    pub device: Backend,
}

/// An action the agent does not enforce on this node because none of its
/// programs loaded or attached.
#[derive(Clone, Debug)]
pub struct MissingHook {
    /// `connect`, `exec` or `open` (the `hook` label of the metrics).
    pub action: &'static str,
    pub program: &'static str,
    /// The last refusal, in one line.
    pub reason: String,
    /// Only a twin is missing: its sibling enforces, except the events the
    /// kernel skips for it.
    pub with_gaps: bool,
}

/// The loaded programs. Unpinned, the links live inside `ebpf` (aya keeps
/// them with their program) and dropping this detaches everything; pinned,
/// they stay attached until their pins are removed.
pub struct Kernel {
    pub ebpf: Ebpf,
    pub backends: Backends,
    /// Actions left unenforced (degraded mode; empty when all loaded).
    pub missing: Vec<MissingHook>,
    /// Where this instance pinned its maps and links.
    pub pins: Option<PinDir>,
    /// Links of earlier agent instances, still attached: retire them once
    /// this instance's policy is in force.
    pub old_links: OldLinks,
    /// True when the policy maps were adopted from an earlier instance (they
    /// hold its policy).
    pub adopted_maps: bool,
    /// This instance's pinned links (kept so their fds live as long as the
    /// agent).
    pinned: Vec<PinnedLink>,
    /// Unpinned links: they detach when this drops.
    #[expect(
        dead_code,
        reason = "held, never read: dropping them detaches the programs"
    )]
    links: Vec<AttachedLink>,
}

/// A program's attachment: aya's link, or a link the agent made through
/// `bpf()` itself where aya gives none it can pin (`bpf_sys`).
#[derive(Debug)]
pub enum AttachedLink {
    Aya(FdLink),
    Raw(OwnedFd),
}

impl MissingHook {
    /// The gap, logged once as an error.
    fn said(action: Action, program: &'static str, reason: String, with_gaps: bool) -> Self {
        let action = action.label();
        if with_gaps {
            tracing::error!(action, program, error = %reason, "{action} is enforced with gaps: {program} did not attach beside its twin");
        } else {
            tracing::error!(action, program, error = %reason, "{action} is NOT enforced on this node: no backend loaded");
        }
        Self {
            action,
            program,
            reason,
            with_gaps,
        }
    }
}

impl Kernel {
    /// How many links this instance pinned.
    pub fn pinned_links(&self) -> usize {
        self.pinned.len()
    }
}

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hook {
    /// A cgroup sock_addr program at the cgroup root.
    SockAddr,
    /// A cgroup device program at the cgroup root.
    Device,
    /// A BPF-LSM hook.
    Lsm(&'static str),
    /// A BTF tracepoint.
    BtfTracepoint(&'static str),
    /// Classic (tracefs) tracepoints: one attachment per event of
    /// `category`; `label` names them all.
    Tracepoint {
        label: &'static str,
        category: &'static str,
        events: &'static [&'static str],
    },
}

impl Hook {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::SockAddr => "cgroup_sock_addr",
            Self::Device => "cgroup_device",
            Self::Lsm(h) | Self::BtfTracepoint(h) => h,
            Self::Tracepoint { label, .. } => label,
        }
    }
}

/// Which [`Backends`] field a program serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Connect,
    Exec,
    Open,
    Device,
    /// Not enforcement (cgroup_mkdir).
    Observe,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Exec => "exec",
            Self::Open => "open",
            Self::Device => "device",
            Self::Observe => "observe",
        }
    }
}

pub(crate) struct ProgramSpec {
    pub(crate) program: &'static str,
    pub(crate) hook: Hook,
    action: Action,
    backend: Backend,
    /// Program to use when this one cannot load or attach.
    fallback: Option<&'static str>,
    /// Only attached as some other program's fallback or twin.
    fallback_only: bool,
    /// Another program attached for the same events beside this one, so
    /// an event the kernel skips for one is decided by the other (the eBPF
    /// crate's `twins.rs`).
    twin: Option<&'static str>,
}

impl ProgramSpec {
    const fn with_twin(mut self, twin: &'static str) -> Self {
        self.twin = Some(twin);
        self
    }
}

const fn spec(
    program: &'static str,
    hook: Hook,
    action: Action,
    backend: Backend,
    fallback: Option<&'static str>,
    fallback_only: bool,
) -> ProgramSpec {
    ProgramSpec {
        program,
        hook,
        action,
        backend,
        fallback,
        fallback_only,
        twin: None,
    }
}

/// Every program, its hook, the backend it provides and its fallback.
pub(crate) const PROGRAMS: &[ProgramSpec] = &[
    spec(
        PROG_CONNECT4,
        Hook::SockAddr,
        Action::Connect,
        Backend::CgroupSockAddr,
        None,
        false,
    ),
    spec(
        PROG_CONNECT6,
        Hook::SockAddr,
        Action::Connect,
        Backend::CgroupSockAddr,
        None,
        false,
    ),
    spec(
        PROG_SENDMSG4,
        Hook::SockAddr,
        Action::Connect,
        Backend::CgroupSockAddr,
        None,
        false,
    ),
    spec(
        PROG_SENDMSG6,
        Hook::SockAddr,
        Action::Connect,
        Backend::CgroupSockAddr,
        None,
        false,
    ),
    spec(
        PROG_EXEC_LSM,
        Hook::Lsm("bprm_check_security"),
        Action::Exec,
        Backend::Lsm,
        Some(PROG_EXEC_TP),
        false,
    ),
    spec(
        PROG_EXEC_TP,
        Hook::BtfTracepoint("sched_process_exec"),
        Action::Exec,
        Backend::TracepointKill,
        None,
        true,
    )
    .with_twin(PROG_EXEC_TP_TWIN),
    spec(
        PROG_EXEC_TP_TWIN,
        Hook::BtfTracepoint("sched_process_exec"),
        Action::Exec,
        Backend::TracepointKill,
        None,
        true,
    ),
    spec(
        PROG_OPEN_LSM,
        Hook::Lsm("file_open"),
        Action::Open,
        Backend::Lsm,
        Some(PROG_OPEN_TP),
        false,
    ),
    spec(
        PROG_OPEN_TP,
        // Every x86_64 syscall that returns a new fd for a path.
        Hook::Tracepoint {
            label: "sys_exit_open*",
            category: "syscalls",
            events: &[
                "sys_exit_open",
                "sys_exit_creat",
                "sys_exit_openat",
                "sys_exit_open_by_handle_at",
                "sys_exit_openat2",
            ],
        },
        Action::Open,
        Backend::TracepointKill,
        None,
        true,
    )
    .with_twin(PROG_OPEN_TP_TWIN),
    spec(
        PROG_OPEN_TP_TWIN,
        Hook::BtfTracepoint("sys_exit"),
        Action::Open,
        Backend::TracepointKill,
        None,
        true,
    ),
    spec(
        PROG_DEVICE,
        Hook::Device,
        Action::Device,
        Backend::CgroupDevice,
        None,
        false,
    ),
    spec(
        PROG_CGROUP_MKDIR,
        Hook::BtfTracepoint("cgroup_mkdir"),
        Action::Observe,
        Backend::None,
        None,
        false,
    ),
];

/// Parses the kernel BTF and opens the object with offsets from it and maps
/// sized by `opts.map_sizes` (pinned under `pins` when given). No program
/// is loaded yet.
pub(crate) fn open_object(
    opts: &LoadOptions,
    pins: Option<&PinDir>,
) -> Result<(Ebpf, Btf), LoaderError> {
    let offsets = btf::kernel_offsets(&opts.btf_path)?;
    let kbtf = Btf::parse_file(&opts.btf_path, Endianness::default()).map_err(|source| {
        LoaderError::KernelBtf {
            path: opts.btf_path.clone(),
            source,
        }
    })?;
    let s = opts.map_sizes;
    let mut loader = EbpfLoader::new();
    if let Some(pins) = pins {
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pins.map(name));
        }
    }
    let ebpf = loader
        .btf(Some(&kbtf))
        .override_global(GLOBAL_OFFSETS, &offsets, true)
        .map_max_entries(MAP_IDENTITIES, s.identities)
        // At most one config per identity.
        .map_max_entries(MAP_IDENTITY_CFG, s.identities)
        .map_max_entries(MAP_NET_RULES, s.net_rules)
        .map_max_entries(MAP_EXEC_RULES, s.exec_rules)
        .map_max_entries(MAP_FILE_RULES, s.file_rules)
        .map_max_entries(MAP_ONLY_FROM, s.only_from)
        .map_max_entries(MAP_DEVICE_RULES, s.device_rules)
        .map_max_entries(MAP_EVENTS, s.events_bytes)
        .load(OBJECT)
        .map_err(LoaderError::Object)?;
    Ok((ebpf, kbtf))
}

/// Loads the programs with offsets from `opts.btf_path` and maps sized by
/// `opts.map_sizes`, and attaches every hook (see [`PROGRAMS`]). Needs
/// CAP_BPF/CAP_SYS_ADMIN (root).
pub fn load(opts: &LoadOptions) -> Result<Kernel, LoaderError> {
    if OBJECT.is_empty() {
        return Err(LoaderError::EmptyObject);
    }
    let pins = opts.pin_dir.as_ref().map(PinDir::open).transpose()?;
    let old_links = match &pins {
        Some(pins) => pins.old_links()?,
        None => OldLinks::default(),
    };
    // Before loading: loading creates the pins it does not find.
    let adopted_maps = pins
        .as_ref()
        .is_some_and(|p| p.map(MAP_IDENTITIES).exists());
    let (mut ebpf, kbtf) = open_object(opts, pins.as_ref())?;

    let lsm_enabled = bpf_lsm_enabled();
    let mut backends = Backends {
        connect: Backend::None,
        exec: Backend::None,
        open: Backend::None,
        device: Backend::None,
    };
    let mut pinned = Vec::new();
    let mut links = Vec::new();
    let mut missing: Vec<MissingHook> = Vec::new();
    for spec in PROGRAMS.iter().filter(|s| !s.fallback_only) {
        let skip_reason = match spec.hook {
            Hook::Lsm(_) if opts.force_fallback => Some("fallback forced"),
            Hook::Lsm(_) if !lsm_enabled => Some("bpf is not an active LSM"),
            _ => None,
        };
        let mut result = match skip_reason {
            Some(reason) => Err(reason.to_owned()),
            None => try_attach(&mut ebpf, spec, opts, &kbtf)?,
        };
        let mut used = spec;
        if let (Err(reason), Some(fallback)) = (&result, spec.fallback) {
            let fb = find_spec(fallback)?;
            tracing::warn!(
                program = spec.program,
                hook = spec.hook.name(),
                fallback = fb.program,
                error = %reason,
                "backend {} unavailable, falling back to {}",
                spec.backend.as_str(),
                fb.backend.as_str(),
            );
            used = fb;
            result = try_attach(&mut ebpf, fb, opts, &kbtf)?;
        }
        // A program with a twin enforces when either of the two attaches;
        // the other one missing is a gap, said as such.
        let mut attached = Vec::new();
        let mut failed = Vec::new();
        let mut keep =
            |program: &'static str, result: Result<Vec<AttachedLink>, String>| match result {
                Ok(links) => {
                    attached.extend(links.into_iter().enumerate().map(|(n, l)| (program, n, l)))
                }
                Err(reason) => failed.push((program, reason)),
            };
        keep(used.program, result);
        if let Some(twin) = used.twin {
            keep(twin, try_attach(&mut ebpf, find_spec(twin)?, opts, &kbtf)?);
        }
        if attached.is_empty() {
            let (program, reason) = failed.swap_remove(0);
            if spec.action == Action::Observe || opts.require_hooks {
                return Err(LoaderError::HookRequired {
                    action: spec.action.label(),
                    program,
                    reason,
                });
            }
            // Degraded, not down: what loaded keeps enforcing, and the gap
            // is said once here, in /readyz and in the metrics.
            missing.push(MissingHook::said(spec.action, program, reason, false));
            continue;
        }
        for (program, reason) in failed {
            // Its twin alone still enforces, but events the kernel skips
            // for that one go undecided.
            missing.push(MissingHook::said(spec.action, program, reason, true));
        }
        for (program, n, link) in attached {
            if let Some(pins) = &pins {
                pinned.push(pins.pin_link(program, n, link)?);
            } else {
                // Unpinned: the link detaches when `Kernel` drops.
                links.push(link);
            }
        }
        match used.action {
            Action::Connect => backends.connect = used.backend,
            Action::Exec => backends.exec = used.backend,
            Action::Open => backends.open = used.backend,
            Action::Device => backends.device = used.backend,
            Action::Observe => {}
        }
        tracing::info!(
            program = used.program,
            twin = used.twin.unwrap_or("none"),
            hook = used.hook.name(),
            backend = used.backend.as_str(),
            "attached"
        );
    }
    // One program of an action missing leaves the action unenforced (e.g.
    // connect6 without connect4 still lets IPv4 through).
    for m in missing.iter().filter(|m| !m.with_gaps) {
        match m.action {
            "connect" => backends.connect = Backend::None,
            "exec" => backends.exec = Backend::None,
            "open" => backends.open = Backend::None,
            "device" => backends.device = Backend::None,
            _ => {}
        }
    }
    Ok(Kernel {
        ebpf,
        backends,
        missing,
        pins,
        old_links,
        adopted_maps,
        pinned,
        links,
    })
}

fn find_spec(program: &'static str) -> Result<&'static ProgramSpec, LoaderError> {
    PROGRAMS
        .iter()
        .find(|s| s.program == program)
        .ok_or(LoaderError::MissingProgram { program })
}

/// A copy of the fd of every loaded program, by name (for their run
/// statistics).
pub fn attached_programs(kernel: &Kernel) -> Vec<(&'static str, OwnedFd)> {
    PROGRAMS
        .iter()
        .filter_map(|spec| {
            let fd = kernel.ebpf.program(spec.program)?.fd().ok()?;
            Some((spec.program, fd.as_fd().try_clone_to_owned().ok()?))
        })
        .collect()
}

/// An error with its sources, for a log line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// [`attach`], with a refusal said in one line, and the programs named in
/// `opts.refuse_programs` refused without trying. A privilege error is
/// passed on as it is: it means the agent lacks a capability, which is a
/// deployment error to stop on, not a kernel limit to degrade around.
fn try_attach(
    ebpf: &mut Ebpf,
    spec: &ProgramSpec,
    opts: &LoadOptions,
    kbtf: &Btf,
) -> Result<Result<Vec<AttachedLink>, String>, LoaderError> {
    if opts.refuse_programs.iter().any(|p| p == spec.program) {
        return Ok(Err("refused by --test-refuse-program".into()));
    }
    match attach(ebpf, spec, opts, kbtf) {
        Ok(link) => Ok(Ok(link)),
        Err(e @ LoaderError::Load { .. }) if e.is_privilege() && spec.fallback.is_none() => Err(e),
        Err(e) => Ok(Err(error_chain(&e))),
    }
}

/// Loads (verifies) `spec`'s program without attaching it.
pub(crate) fn load_program(
    ebpf: &mut Ebpf,
    spec: &ProgramSpec,
    kbtf: &Btf,
) -> Result<(), LoaderError> {
    let program = spec.program;
    let hook = spec.hook.name();
    let prog = ebpf
        .program_mut(program)
        .ok_or(LoaderError::MissingProgram { program })?;
    let wrong_type = |source| LoaderError::ProgramType {
        program,
        hook,
        source,
    };
    let result = match spec.hook {
        Hook::SockAddr => <&mut CgroupSockAddr>::try_from(prog)
            .map_err(wrong_type)?
            .load(),
        Hook::Device => <&mut CgroupDevice>::try_from(prog)
            .map_err(wrong_type)?
            .load(),
        Hook::Lsm(name) => <&mut Lsm>::try_from(prog)
            .map_err(wrong_type)?
            .load(name, kbtf),
        Hook::BtfTracepoint(name) => <&mut BtfTracePoint>::try_from(prog)
            .map_err(wrong_type)?
            .load(name, kbtf),
        Hook::Tracepoint { .. } => <&mut TracePoint>::try_from(prog)
            .map_err(wrong_type)?
            .load(),
    };
    result.map_err(|e| LoaderError::Load {
        program,
        hook,
        refusal: Refusal::new(program, &e),
    })
}

fn attach(
    ebpf: &mut Ebpf,
    spec: &ProgramSpec,
    opts: &LoadOptions,
    kbtf: &Btf,
) -> Result<Vec<AttachedLink>, LoaderError> {
    load_program(ebpf, spec, kbtf)?;
    let program = spec.program;
    let hook = spec.hook.name();
    let prog = ebpf
        .program_mut(program)
        .ok_or(LoaderError::MissingProgram { program })?;
    let wrong_type = |source| LoaderError::ProgramType {
        program,
        hook,
        source,
    };
    let attach_err = |source| LoaderError::Attach {
        program,
        hook,
        source,
    };
    match spec.hook {
        Hook::SockAddr => {
            let p: &mut CgroupSockAddr = prog.try_into().map_err(wrong_type)?;
            let cgroup = File::open(&opts.cgroup_root).map_err(|source| LoaderError::Cgroup {
                program,
                path: opts.cgroup_root.clone(),
                source,
            })?;
            // aya attaches with bpf_link_create (kernel >= 5.7), and cgroup
            // links always coexist with other programs (multi semantics);
            // that syscall rejects BPF_F_ALLOW_MULTI with EINVAL, so the
            // mode must be the default here.
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = p.take_link(id).map_err(attach_err)?;
            FdLink::try_from(link)
                .map(|l| vec![AttachedLink::Aya(l)])
                .map_err(|source| LoaderError::LinkNotPinnable { program, source })
        }
        Hook::Device => {
            let p: &mut CgroupDevice = prog.try_into().map_err(wrong_type)?;
            let cgroup = File::open(&opts.cgroup_root).map_err(|source| LoaderError::Cgroup {
                program,
                path: opts.cgroup_root.clone(),
                source,
            })?;
            let prog_fd = p.fd().map_err(attach_err)?;
            // A link, so it coexists with the runtime's per-container device
            // programs and the kernel ANDs their verdicts.
            crate::bpf_sys::cgroup_link_create(
                prog_fd.as_fd(),
                cgroup.as_fd(),
                crate::bpf_sys::BPF_CGROUP_DEVICE,
            )
            .map(|l| vec![AttachedLink::Raw(l)])
            .map_err(|source| LoaderError::RawAttach {
                program,
                hook,
                source,
            })
        }
        Hook::Lsm(_) => {
            let p: &mut Lsm = prog.try_into().map_err(wrong_type)?;
            let id = p.attach().map_err(attach_err)?;
            Ok(vec![AttachedLink::Aya(
                p.take_link(id).map_err(attach_err)?.into(),
            )])
        }
        Hook::BtfTracepoint(_) => {
            let p: &mut BtfTracePoint = prog.try_into().map_err(wrong_type)?;
            let id = p.attach().map_err(attach_err)?;
            Ok(vec![AttachedLink::Aya(
                p.take_link(id).map_err(attach_err)?.into(),
            )])
        }
        Hook::Tracepoint {
            category, events, ..
        } => {
            if !Path::new(TRACEFS).join("events").exists() {
                crate::mounts::mount_pseudo_fs("tracefs", Path::new(TRACEFS));
            }
            let p: &mut TracePoint = prog.try_into().map_err(wrong_type)?;
            let mut links = Vec::with_capacity(events.len());
            for event in events {
                let id = p.attach(category, event).map_err(attach_err)?;
                let link = p.take_link(id).map_err(attach_err)?;
                let link = FdLink::try_from(link)
                    .map_err(|source| LoaderError::LinkNotPinnable { program, source })?;
                links.push(AttachedLink::Aya(link));
            }
            Ok(links)
        }
    }
}

/// Whether `bpf` is in the active LSM list (mounting securityfs if needed).
pub(crate) fn bpf_lsm_enabled() -> bool {
    let list = Path::new(SECURITYFS).join("lsm");
    if !list.exists() {
        crate::mounts::mount_pseudo_fs("securityfs", Path::new(SECURITYFS));
    }
    match std::fs::read_to_string(&list) {
        Ok(s) => s.trim().split(',').any(|l| l == "bpf"),
        Err(e) => {
            tracing::warn!(error = %e, path = %list.display(), "cannot read the active LSM list");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_wire_round_trips() {
        for b in [
            Backend::None,
            Backend::CgroupSockAddr,
            Backend::Lsm,
            Backend::TracepointKill,
        ] {
            assert_eq!(Backend::from_wire(b.wire()), b);
        }
        assert_eq!(Backend::TracepointKill.as_str(), "tracepoint_kill");
    }

    #[test]
    fn every_fallback_is_in_the_table() {
        for s in PROGRAMS {
            if let Some(fb) = s.fallback {
                let f = PROGRAMS
                    .iter()
                    .find(|p| p.program == fb)
                    .expect("fallback listed");
                assert!(f.fallback_only && f.action == s.action, "{fb}");
            }
            if let Some(twin) = s.twin {
                let t = find_spec(twin).expect("twin listed");
                // Same event, not necessarily the same hook (the open twins
                // sit behind different kernel guards).
                assert!(t.fallback_only && t.action == s.action && t.twin.is_none());
                assert_eq!(t.backend, s.backend, "{twin}");
            }
        }
    }
}
