//! Types, names and wire constants shared by the kernel programs
//! (`portcullis-ebpf`) and the agent. Everything here is `#[repr(C)]`,
//! integers and fixed arrays only, with no implicit padding: the size asserts
//! at the bottom fail the build if a field change would break the layout the
//! other side expects.
#![no_std]

use core::mem::size_of;

pub mod decide;
mod device;
pub use device::*;
mod socket;
pub use socket::*;

// ---------------------------------------------------------------------------
// Map names (the names the eBPF object exports; userspace looks them up).
// ---------------------------------------------------------------------------

/// `HashMap<u64, u32>`: cgroup v2 id (inode of the cgroup directory) →
/// workload identity. Cgroups absent from the map take the identity of their
/// nearest classified ancestor (the root is always classified).
pub const MAP_IDENTITIES: &str = "IDENTITIES";
/// `HashMap<u32, IdentityConfig>`: identity → per-action default verdicts.
/// Identity [`IDENTITY_UNRESTRICTED`] is never stored: no policy selects it.
pub const MAP_IDENTITY_CFG: &str = "IDENTITY_CFG";
/// `LpmTrie<NetKey, NetRuleSet>`: (identity, address prefix) → port rules.
/// Each entry already holds the rules of every shorter prefix that contains
/// it, so one longest-prefix lookup sees every CIDR that matches.
pub const MAP_NET_RULES: &str = "NET_RULES";
/// `HashMap<InodeKey, InodeRuleSet>`: (identity, dev, ino) of a binary or of a
/// directory whose subtree is governed → exec rules.
pub const MAP_EXEC_RULES: &str = "EXEC_RULES";
/// `HashMap<InodeKey, InodeRuleSet>`: (identity, dev, ino) of a file or of a
/// directory whose subtree is governed → file-open rules.
pub const MAP_FILE_RULES: &str = "FILE_RULES";
/// `HashMap<InodeKey, u32>`: (onlyFrom set id, dev, ino) of a binary → 1.
/// The `identity` field of the key holds the set id.
pub const MAP_ONLY_FROM: &str = "ONLY_FROM";
/// `RingBuf`: [`Event`] records, one per deny or audit decision.
pub const MAP_EVENTS: &str = "EVENTS";
/// `PerCpuArray<u64>`: internal counters, indexed by `COUNTER_*`.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// `PerCpuArray<u64>`: decisions, indexed by [`decision_index`].
pub const MAP_DECISIONS: &str = "DECISIONS";
/// `PerCpuArray<u64>`: deny and audit decisions per deciding policy, indexed
/// by [`policy_decision_index`] (the policy's agent-wide slot comes from
/// `IdentityConfig::policy_slots`).
pub const MAP_POLICY_DECISIONS: &str = "POLICY_DECISIONS";

/// Maps the agent pins under `<pin dir>/maps-v<PIN_LAYOUT>/` so a restarted
/// agent adopts the policy in force instead of starting from empty maps.
pub const PINNED_MAPS: [&str; 11] = [
    MAP_IDENTITIES,
    MAP_IDENTITY_CFG,
    MAP_DEVICE_RULES,
    MAP_NET_RULES,
    MAP_EXEC_RULES,
    MAP_FILE_RULES,
    MAP_ONLY_FROM,
    MAP_EVENTS,
    MAP_COUNTERS,
    MAP_DECISIONS,
    MAP_POLICY_DECISIONS,
];
/// Layout version of the pinned maps: bump it whenever a key or value type
/// above changes, so an agent never adopts maps of another layout (aya reuses
/// a pinned map by name without comparing its definition).
pub const PIN_LAYOUT: u32 = 6;

/// Read-only global (`KernelOffsets`) the agent fills from the running
/// kernel's BTF with `EbpfLoader::override_global` before load.
pub const GLOBAL_OFFSETS: &str = "OFFSETS";

// ---------------------------------------------------------------------------
// Program names (the Rust function names in agent-ebpf).
// ---------------------------------------------------------------------------

pub const PROG_CONNECT4: &str = "connect4";
pub const PROG_CONNECT6: &str = "connect6";
pub const PROG_SENDMSG4: &str = "sendmsg4";
pub const PROG_SENDMSG6: &str = "sendmsg6";
/// BPF-LSM `bprm_check_security` (primary exec backend).
pub const PROG_EXEC_LSM: &str = "exec_lsm";
/// BTF tracepoint `sched_process_exec` + SIGKILL (fallback exec backend).
pub const PROG_EXEC_TP: &str = "exec_tp";
/// `exec_tp` again, attached beside it (see the eBPF crate's `twins.rs`).
pub const PROG_EXEC_TP_TWIN: &str = "exec_tp_twin";
/// BPF-LSM `file_open` (primary file backend).
pub const PROG_OPEN_LSM: &str = "open_lsm";
/// Tracepoints `syscalls/sys_exit_<open family>` + SIGKILL (fallback).
pub const PROG_OPEN_TP: &str = "open_tp";
/// BTF tracepoint `sys_exit` on the same calls, beside `open_tp`.
pub const PROG_OPEN_TP_TWIN: &str = "open_tp_twin";
/// BTF tracepoint `cgroup_mkdir`: tells the agent a cgroup appeared.
pub const PROG_CGROUP_MKDIR: &str = "cgroup_mkdir";
/// BPF-LSM `inode_rename` / `inode_link`: a governed file may not be moved
/// or linked out from under its rules (no fallback).
pub const PROG_RENAME_LSM: &str = "rename_lsm";
pub const PROG_LINK_LSM: &str = "link_lsm";
/// `Event.action` of a rename or link decision.
pub const ACTION_MOVE: u8 = 5;
/// `Event.access` of a move decision: which call it was. The walk itself
/// asks for read and write: a task may move a file only if it may do both.
pub const ACCESS_RENAME: u32 = 32;
pub const ACCESS_LINK: u32 = 64;

// ---------------------------------------------------------------------------
// Wire constants.
// ---------------------------------------------------------------------------

/// Identity of workloads no policy selects: everything is allowed, counted.
pub const IDENTITY_UNRESTRICTED: u32 = 0;
/// How many ancestors the kernel walks to find a classified cgroup.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// How many directory levels, the target included, the kernel walks looking
/// for subtree rules. A walk that has not reached the filesystem root by
/// then fails closed (`RULE_ID_TOO_DEEP`): never a free pass below a denied
/// subtree. The walk runs under `bpf_loop`, so the bound costs the verifier
/// nothing; 1024 levels is a path of at least 2048 bytes, half of PATH_MAX.
pub const MAX_PATH_DEPTH: u32 = 1024;
/// Policies that may select one identity (bits of the `*_mask` fields).
pub const MAX_POLICIES_PER_IDENTITY: u32 = 32;

pub const ACTION_EXEC: u8 = 0;
pub const ACTION_CONNECT: u8 = 1;
pub const ACTION_OPEN: u8 = 2;
// ACTION_DEVICE (3) is in `device`, ACTION_SOCKET (4) in `socket`.
pub const ACTIONS: u32 = 6;

pub const VERDICT_ALLOW: u8 = 0;
/// Would have been denied, but only audit-mode policies said so.
pub const VERDICT_AUDIT: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
pub const VERDICTS: u32 = 3;

/// Index into [`MAP_DECISIONS`].
pub const fn decision_index(action: u8, verdict: u8) -> u32 {
    action as u32 * VERDICTS + verdict as u32
}
pub const DECISION_SLOTS: u32 = ACTIONS * VERDICTS;
/// Agent-wide policy slots for per-policy counters; the last one collects
/// policies beyond it.
pub const POLICY_SLOTS: u32 = 256;
pub const POLICY_SLOT_OTHER: u8 = (POLICY_SLOTS - 1) as u8;
/// Index into [`MAP_POLICY_DECISIONS`].
pub const fn policy_decision_index(slot: u8, action: u8, verdict: u8) -> u32 {
    slot as u32 * DECISION_SLOTS + decision_index(action, verdict)
}
pub const POLICY_DECISION_SLOTS: u32 = POLICY_SLOTS * DECISION_SLOTS;

pub const BACKEND_NONE: u8 = 0;
/// cgroup `connect4/6` + `sendmsg4/6`: the syscall returns EPERM.
pub const BACKEND_CGROUP_SOCK_ADDR: u8 = 1;
/// BPF-LSM: the syscall returns EPERM.
pub const BACKEND_LSM: u8 = 2;
/// BTF tracepoint + `bpf_send_signal(SIGKILL)`: the process dies before it
/// returns to user space.
pub const BACKEND_TRACEPOINT_KILL: u8 = 3;

pub const MODE_AUDIT: u8 = 0;
pub const MODE_ENFORCE: u8 = 1;

/// Access bits (requested by an open/exec, allowed by a rule).
pub const ACCESS_READ: u32 = 1;
pub const ACCESS_WRITE: u32 = 2;
pub const ACCESS_EXEC: u32 = 4;

/// `InodeRule.flags`: the rule also governs everything below this directory.
pub const RULE_SUBTREE: u32 = 1;
/// `InodeRule.flags` / `NetRule.flags`: log allows that match this rule.
pub const RULE_LOG_ALLOW: u32 = 2;

/// `rule_id` of a decision that came from a policy default, not a rule.
pub const RULE_ID_DEFAULT: u32 = 0;
/// `rule_id` of a deny no rule made: the target is more than
/// `MAX_PATH_DEPTH` levels below its filesystem root, so the rules above it
/// were not all seen.
pub const RULE_ID_TOO_DEEP: u32 = u32::MAX;
/// `rule_id` of a deny no rule made: every walk slot of this CPU was held
/// by a walk preempted mid-way (see the kernel's `inode::claim`).
pub const RULE_ID_NO_WALK_SLOT: u32 = u32::MAX - 1;
/// `rule_id` of the tracepoint fallback's `io_uring_setup` refusal: the
/// ring would open files the fallback never sees (`IdentityConfig.ring_*`).
pub const RULE_ID_IO_URING: u32 = u32::MAX - 2;

pub const COUNTER_LOST_EVENTS: u32 = 0;
pub const COUNTER_ERR_CONNECT: u32 = 1;
pub const COUNTER_ERR_EXEC: u32 = 2;
pub const COUNTER_ERR_OPEN: u32 = 3;
/// Lookups that found no classified cgroup on the way to the root.
pub const COUNTER_UNCLASSIFIED: u32 = 4;
pub const COUNTER_MKDIR_LOST: u32 = 5;
pub const COUNTER_ERR_DEVICE: u32 = 6;
pub const COUNTER_ERR_SOCKET: u32 = 7;
pub const COUNTER_ERR_MOVE: u32 = 8;
pub const COUNTERS: u32 = 9;

pub const NET_RULES_PER_PREFIX: usize = 16;
pub const INODE_RULES_PER_KEY: usize = 4;
pub const EVENT_NAMES: usize = 4;
pub const EVENT_NAME_LEN: usize = 64;
pub const TASK_COMM_LEN: usize = 16;

/// Event kinds on the ring buffer.
pub const EVENT_DECISION: u32 = 1;
/// A cgroup was created; `names` (all of it, read as one NUL-terminated
/// buffer of `EVENT_NAMES * EVENT_NAME_LEN` bytes) holds the start of its
/// path (relative to its hierarchy root). The agent classifies it.
pub const EVENT_CGROUP_MKDIR: u32 = 2;

// ---------------------------------------------------------------------------
// Map keys and values.
// ---------------------------------------------------------------------------

/// Per-identity defaults. Each `*_mask` has bit `i` set when the identity's
/// `i`-th policy (the agent keeps the list) has `default: deny` for that
/// action in that mode. A policy in the enforce mask that matched no allow
/// rule denies; likewise audit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityConfig {
    pub exec_deny_enforce: u32,
    pub exec_deny_audit: u32,
    pub net_deny_enforce: u32,
    pub net_deny_audit: u32,
    /// `HAS_*` bits: lets hooks skip map lookups for actions no policy names.
    pub flags: u32,
    /// The policy generation that wrote this identity; copied into every
    /// decision event, so the log names its rule with that generation's
    /// tables (rule ids restart with every compile).
    pub generation: u32,
    /// Bit `i` set when the identity's `i`-th policy has a `uid` selector:
    /// it applies only to tasks whose uid is in `uid_lo[i]..=uid_hi[i]`.
    pub uid_scoped: u32,
    /// Like `exec_deny_*`, for device rules.
    pub dev_deny_enforce: u32,
    pub dev_deny_audit: u32,
    /// Like `exec_deny_*`, for socket rules.
    pub sock_deny_enforce: u32,
    pub sock_deny_audit: u32,
    /// Bit `i` set when the identity's `i`-th policy has file rules, in
    /// enforce (`_enforce`) or audit mode: on the tracepoint fallback, which
    /// cannot see io_uring's opens, those policies refuse `io_uring_setup`.
    pub ring_deny_enforce: u32,
    pub ring_deny_audit: u32,
    pub _pad2: u32,
    pub uid_lo: [u32; MAX_POLICIES_PER_IDENTITY as usize],
    pub uid_hi: [u32; MAX_POLICIES_PER_IDENTITY as usize],
    /// Agent-wide counter slot of the identity's `i`-th policy.
    pub policy_slots: [u8; MAX_POLICIES_PER_IDENTITY as usize],
}
pub const HAS_EXEC: u32 = 1;
pub const HAS_NET: u32 = 2;
pub const HAS_FILES: u32 = 4;

/// Key of [`MAP_NET_RULES`]: `data` is the identity (big endian, always
/// fully covered by the prefix) followed by the IPv6 address; IPv4 is stored
/// IPv4-mapped (`::ffff:a.b.c.d`), so a v4 /n is prefix `32 + 96 + n`.
pub const NET_KEY_DATA_LEN: usize = 20;

/// One port/protocol rule under a CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRule {
    /// Inclusive port range; `0..=65535` for any.
    pub port_lo: u16,
    pub port_hi: u16,
    /// IP protocol number (6 tcp, 17 udp), 0 for any.
    pub proto: u8,
    /// `VERDICT_ALLOW` or `VERDICT_DENY`.
    pub verdict: u8,
    /// `MODE_*` of the policy the rule came from.
    pub mode: u8,
    /// Bit index of that policy within the identity's policy list.
    pub policy_bit: u8,
    /// Agent-wide rule id (for the decision log); never `RULE_ID_DEFAULT`.
    pub rule_id: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRuleSet {
    pub count: u32,
    pub _pad: u32,
    pub rules: [NetRule; NET_RULES_PER_PREFIX],
}

impl Default for NetRuleSet {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            rules: [NetRule::default(); NET_RULES_PER_PREFIX],
        }
    }
}

/// Key of [`MAP_EXEC_RULES`], [`MAP_FILE_RULES`] and [`MAP_ONLY_FROM`].
/// `dev` uses the kernel's encoding (`major << 20 | minor`), not glibc's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeKey {
    pub identity: u32,
    pub dev: u32,
    pub ino: u64,
}

/// One exec or file rule on an inode.
///
/// It denies a request when the requested access has a bit outside
/// `allow_mask`, or when `only_from` is non-zero and the acting process's
/// executable is not in that set; otherwise it is an explicit allow for
/// `policy_bit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeRule {
    pub allow_mask: u32,
    /// Set id in [`MAP_ONLY_FROM`], 0 for any executable.
    pub only_from: u32,
    /// `RULE_*` flags.
    pub flags: u32,
    pub rule_id: u32,
    pub mode: u8,
    pub policy_bit: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InodeRuleSet {
    pub count: u32,
    pub rules: [InodeRule; INODE_RULES_PER_KEY],
}

/// Offsets (bytes) into kernel structs, read from the running kernel's BTF
/// by the agent and written into the `OFFSETS` global before load. Rust eBPF
/// has no CO-RE relocations, so these replace them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `file.f_path` + `path.dentry`.
    pub file_dentry: u32,
    pub file_f_mode: u32,
    pub file_f_inode: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    /// `dentry.d_name` + `qstr.name`.
    pub dentry_d_name: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub super_block_s_dev: u32,
    pub linux_binprm_file: u32,
    pub linux_binprm_filename: u32,
    pub task_struct_files: u32,
    pub task_struct_mm: u32,
    pub files_struct_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub mm_struct_exe_file: u32,
    pub pt_regs_orig_ax: u32,
    /// Non-zero once the agent filled the struct; hooks fail open otherwise.
    pub valid: u32,
    pub _pad: u32,
}

/// A decision (or cgroup creation) record on the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `EVENT_*`.
    pub kind: u32,
    pub identity: u32,
    /// `bpf_ktime_get_boot_ns()`.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Target inode (exec/open).
    pub ino: u64,
    /// Inode of the acting process's executable.
    pub exe_ino: u64,
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub rule_id: u32,
    /// Target device (kernel encoding).
    pub dev: u32,
    pub exe_dev: u32,
    /// Levels between the target and the directory whose rule decided (0 =
    /// the target itself).
    pub depth: u32,
    /// Access requested (`ACCESS_*`).
    pub access: u32,
    /// `IdentityConfig::generation` of the deciding identity (0 when the
    /// workload is unrestricted).
    pub generation: u32,
    pub _pad: u32,
    pub action: u8,
    pub verdict: u8,
    pub backend: u8,
    /// Bit of the deciding policy in the identity's policy list.
    pub policy_bit: u8,
    pub proto: u8,
    /// 4 or 6 for connect, 0 otherwise.
    pub family: u8,
    /// Host byte order.
    pub port: u16,
    /// IPv6, or IPv4-mapped IPv6.
    pub addr: [u8; 16],
    pub comm: [u8; TASK_COMM_LEN],
    /// Dentry names from the target upwards (`names[0]` is the file itself);
    /// for exec, `names[EVENT_NAMES-1]` holds the start of the path as given
    /// to execve.
    pub names: [[u8; EVENT_NAME_LEN]; EVENT_NAMES],
}

const _: () = assert!(size_of::<IdentityConfig>() == 56 + 9 * MAX_POLICIES_PER_IDENTITY as usize);
const _: () = assert!(size_of::<NetRule>() == 16);
const _: () = assert!(size_of::<NetRuleSet>() == 8 + 16 * NET_RULES_PER_PREFIX);
const _: () = assert!(size_of::<InodeKey>() == 16);
const _: () = assert!(size_of::<InodeRule>() == 20);
const _: () = assert!(size_of::<InodeRuleSet>() == 4 + 20 * INODE_RULES_PER_KEY);
const _: () = assert!(size_of::<KernelOffsets>() == 80);
const _: () = assert!(size_of::<Event>() == 120 + EVENT_NAMES * EVENT_NAME_LEN);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), integers and arrays only, with no
    // padding (checked by the size asserts above).
    unsafe impl aya::Pod for IdentityConfig {}
    unsafe impl aya::Pod for NetRule {}
    unsafe impl aya::Pod for NetRuleSet {}
    unsafe impl aya::Pod for InodeKey {}
    unsafe impl aya::Pod for InodeRule {}
    unsafe impl aya::Pod for InodeRuleSet {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for Event {}
}
