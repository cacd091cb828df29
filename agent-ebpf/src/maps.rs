//! Every map the programs share with the agent. Names are the `MAP_*`
//! constants of `portcullis-common` (the static's name is the map name).

use crate::inode::Walk;
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use portcullis_common::{
    COUNTERS as COUNTER_SLOTS, DECISION_SLOTS, DeviceKey, DeviceRuleSet, IdentityConfig, InodeKey,
    InodeRuleSet, NET_KEY_DATA_LEN, NetRuleSet, POLICY_DECISION_SLOTS, VERDICT_ALLOW,
    decision_index, policy_decision_index,
};

/// cgroup v2 id (inode of the cgroup directory) → workload identity.
/// Cgroups absent here take their nearest classified ancestor's identity.
/// Sized by the agent at load time (`MapSizes::identities`).
#[map]
pub static IDENTITIES: HashMap<u64, u32> = HashMap::with_max_entries(1, 0);

/// identity → per-action default-deny masks and `HAS_*` flags.
#[map]
pub static IDENTITY_CFG: HashMap<u32, IdentityConfig> = HashMap::with_max_entries(1, 0);

/// (identity big-endian ++ IPv6 or IPv4-mapped address, prefix) → port rules
/// of every CIDR that contains the prefix (the agent flattens them).
#[map]
pub static NET_RULES: LpmTrie<[u8; NET_KEY_DATA_LEN], NetRuleSet> = LpmTrie::with_max_entries(1, 0);

/// (identity, dev, ino) of a binary or governed directory → exec rules.
#[map]
pub static EXEC_RULES: HashMap<InodeKey, InodeRuleSet> = HashMap::with_max_entries(1, 0);

/// (identity, dev, ino) of a file or governed directory → open rules.
#[map]
pub static FILE_RULES: HashMap<InodeKey, InodeRuleSet> = HashMap::with_max_entries(1, 0);

/// (onlyFrom set id in `identity`, dev, ino) of an executable → 1 when that
/// executable belongs to the set.
#[map]
pub static ONLY_FROM: HashMap<InodeKey, u32> = HashMap::with_max_entries(1, 0);

/// (identity, type, major, minor or any) → device rules.
#[map]
pub static DEVICE_RULES: HashMap<DeviceKey, DeviceRuleSet> = HashMap::with_max_entries(1, 0);

/// `Event` records: deny/audit decisions (and logged allows), cgroup mkdirs.
/// The agent sets the byte size at load time (`MapSizes::events_bytes`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);

/// Per-CPU scratch of the dentry walk (`inode::Walk`), `WALK_SLOTS` slots
/// each claimed by one walk at a time (see `inode::claim`). Not pinned: it
/// holds nothing between program runs.
#[map]
pub static WALKS: PerCpuArray<Walk> = PerCpuArray::with_max_entries(WALK_SLOTS, 0);

/// Walks that can be in progress on one CPU at once: programs run with
/// migration disabled but, on a preemptible kernel, not with preemption
/// disabled, so tasks preempted mid-walk on one CPU each hold a slot.
pub const WALK_SLOTS: u32 = 8;

/// Internal counters indexed by `COUNTER_*` (lost events, internal errors,
/// unclassified cgroups), summed over CPUs by the agent.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Decisions indexed by `decision_index(action, verdict)`.
#[map]
pub static DECISIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECISION_SLOTS, 0);

/// Deny/audit decisions by (deciding policy's slot, action, verdict).
#[map]
pub static POLICY_DECISIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(POLICY_DECISION_SLOTS, 0);

/// Adds one to counter `index` (`COUNTER_*`).
#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds one to the decision counter of (`action`, `verdict`).
#[inline(always)]
pub fn count_decision(action: u8, verdict: u8) {
    if let Some(slot) = DECISIONS.get_ptr_mut(decision_index(action, verdict)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds one to the per-policy counter of a deny or audit decision whose
/// deciding policy is the `policy_bit`-th of the acting identity, whose
/// config (already looked up by every caller) is `cfg`.
/// Allows are not attributed (several policies may have agreed).
#[inline(always)]
pub fn count_policy_decision(cfg: &IdentityConfig, action: u8, verdict: u8, policy_bit: u8) {
    if verdict == VERDICT_ALLOW {
        return;
    }
    let slot = cfg.policy_slots[(policy_bit & 31) as usize];
    if let Some(p) = POLICY_DECISIONS.get_ptr_mut(policy_decision_index(slot, action, verdict)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}
