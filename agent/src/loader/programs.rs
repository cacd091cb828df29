//! Every program the agent loads: the hook it attaches to, the action and
//! backend it provides, its fallback and its twin.

use portcullis_common::{
    PROG_CGROUP_MKDIR, PROG_CONNECT4, PROG_CONNECT6, PROG_DEVICE, PROG_EXEC_LSM, PROG_EXEC_TP,
    PROG_EXEC_TP_TWIN, PROG_LINK_LSM, PROG_OPEN_LSM, PROG_OPEN_TP, PROG_OPEN_TP_TWIN,
    PROG_RENAME_LSM, PROG_SENDMSG4, PROG_SENDMSG6, PROG_SOCK_CREATE, PROG_SOCKET_LSM,
};

use super::{Backend, LoaderError};

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Hook {
    /// A cgroup sock_addr program at the cgroup root.
    SockAddr,
    /// A cgroup device program at the cgroup root.
    Device,
    /// A cgroup `sock_create` program at the cgroup root.
    SockCreate,
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
            Self::SockCreate => "cgroup_sock_create",
            Self::Lsm(h) | Self::BtfTracepoint(h) => h,
            Self::Tracepoint { label, .. } => label,
        }
    }
}

/// Which [`Backends`](super::Backends) field a program serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    Connect,
    Exec,
    Open,
    Device,
    Socket,
    /// Packet sockets (BPF-LSM only; `Socket` is the inet kinds).
    Packet,
    /// Renames and links of governed files.
    Move,
    /// Not enforcement (cgroup_mkdir).
    Observe,
}

impl Action {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Exec => "exec",
            Self::Open => "open",
            Self::Device => "device",
            Self::Socket => "socket",
            Self::Packet => "packet",
            Self::Move => "move",
            Self::Observe => "observe",
        }
    }
}

pub(crate) struct ProgramSpec {
    pub(crate) program: &'static str,
    pub(crate) hook: Hook,
    pub(super) action: Action,
    pub(super) backend: Backend,
    /// Program to use when this one cannot load or attach.
    pub(super) fallback: Option<&'static str>,
    /// Only attached as some other program's fallback or twin.
    pub(super) fallback_only: bool,
    /// Another program attached for the same events beside this one, so
    /// an event the kernel skips for one is decided by the other (the eBPF
    /// crate's `twins.rs`).
    pub(super) twin: Option<&'static str>,
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
                // Not an open, but a ring's opens are invisible here: see
                // `try_ring` in the kernel program.
                "sys_exit_io_uring_setup",
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
        PROG_SOCK_CREATE,
        Hook::SockCreate,
        Action::Socket,
        Backend::CgroupSock,
        None,
        false,
    ),
    spec(
        PROG_SOCKET_LSM,
        Hook::Lsm("socket_create"),
        Action::Packet,
        Backend::Lsm,
        None,
        false,
    ),
    spec(
        PROG_RENAME_LSM,
        Hook::Lsm("inode_rename"),
        Action::Move,
        Backend::Lsm,
        None,
        false,
    ),
    spec(
        PROG_LINK_LSM,
        Hook::Lsm("inode_link"),
        Action::Move,
        Backend::Lsm,
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

pub(super) fn find_spec(program: &'static str) -> Result<&'static ProgramSpec, LoaderError> {
    PROGRAMS
        .iter()
        .find(|s| s.program == program)
        .ok_or(LoaderError::MissingProgram { program })
}

#[cfg(test)]
mod tests {
    use super::*;

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
