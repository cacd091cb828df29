//! Loading the kernel programs and attaching each hook to the best backend
//! this kernel offers.
//!
//! One table ([`PROGRAMS`], in `programs.rs`) says, for every program,
//! which hook it is, what it attaches to, which backend it provides, what
//! to fall back to and which twin runs beside it; `attach.rs` loads and
//! attaches one program. Exec and open prefer BPF-LSM (the syscall fails
//! with EPERM) and fall back to tracepoints that SIGKILL the offender where
//! BPF-LSM is not enabled or refuses to load (this host: `BPF_PROG_LOAD`
//! returns EPERM for LSM).

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    programs::{
        ProgramError,
        links::{FdLink, PinnedLink},
    },
};
use portcullis_common::{
    BACKEND_CGROUP_DEVICE, BACKEND_CGROUP_SOCK, BACKEND_CGROUP_SOCK_ADDR, BACKEND_LSM,
    BACKEND_NONE, BACKEND_TRACEPOINT_KILL, GLOBAL_OFFSETS, MAP_DEVICE_RULES, MAP_EVENTS,
    MAP_EXEC_RULES, MAP_FILE_RULES, MAP_IDENTITIES, MAP_IDENTITY_CFG, MAP_NET_RULES, MAP_ONLY_FROM,
    PINNED_MAPS,
};

mod attach;
mod programs;

pub(crate) use attach::load_program;
use attach::try_attach;
use programs::{Action, find_spec};
pub(crate) use programs::{Hook, PROGRAMS, ProgramSpec};

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
    CgroupSock,
    Lsm,
    TracepointKill,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::CgroupSockAddr => "cgroup_sock_addr",
            Self::CgroupDevice => "cgroup_device",
            Self::CgroupSock => "cgroup_sock",
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
            Self::CgroupSock => BACKEND_CGROUP_SOCK,
            Self::Lsm => BACKEND_LSM,
            Self::TracepointKill => BACKEND_TRACEPOINT_KILL,
        }
    }

    /// Inverse of [`Backend::wire`]; unknown values are `None`.
    pub fn from_wire(v: u8) -> Self {
        match v {
            BACKEND_CGROUP_SOCK_ADDR => Self::CgroupSockAddr,
            BACKEND_CGROUP_DEVICE => Self::CgroupDevice,
            BACKEND_CGROUP_SOCK => Self::CgroupSock,
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
    pub socket: Backend,
    /// Packet sockets (BPF-LSM only).
    pub packet: Backend,
    /// Renames and links of governed files (BPF-LSM only).
    pub moves: Backend,
}

impl Backends {
    /// The field of the action labelled `action` (`Action::label`).
    fn of(&mut self, action: &str) -> Option<&mut Backend> {
        match action {
            "connect" => Some(&mut self.connect),
            "exec" => Some(&mut self.exec),
            "open" => Some(&mut self.open),
            "device" => Some(&mut self.device),
            "socket" => Some(&mut self.socket),
            "packet" => Some(&mut self.packet),
            "move" => Some(&mut self.moves),
            _ => None,
        }
    }
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
        socket: Backend::None,
        packet: Backend::None,
        moves: Backend::None,
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
            // An action only BPF-LSM enforces, on a kernel where no LSM
            // program attached: a limit of the kernel (the README's table),
            // not a hook that failed, so the node is not degraded for it.
            let lsm_only = matches!(spec.hook, Hook::Lsm(_)) && spec.fallback.is_none();
            if lsm_only && backends.exec != Backend::Lsm && backends.open != Backend::Lsm {
                tracing::info!(
                    program,
                    hook = spec.hook.name(),
                    "{} is not enforced on this kernel, which has no BPF-LSM: {reason}",
                    spec.action.label()
                );
                continue;
            }
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
        if let Some(b) = backends.of(used.action.label()) {
            *b = used.backend;
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
        if let Some(b) = backends.of(m.action) {
            *b = Backend::None;
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
}
