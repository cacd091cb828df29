//! Device rules: which workload may open or create which device node.
//! Keyed by device number, not by inode, so a node re-created with `mknod`
//! anywhere is governed like the original.

use core::mem::size_of;

/// `HashMap<DeviceKey, DeviceRuleSet>`: (identity, type, major, minor) →
/// device rules. A rule for every minor of a major sits under
/// [`DEVICE_ANY_MINOR`]; the kernel looks up the exact minor, then that.
pub const MAP_DEVICE_RULES: &str = "DEVICE_RULES";
/// cgroup device program at the cgroup v2 root (multi-attach, so the
/// container runtime's own device programs keep working).
pub const PROG_DEVICE: &str = "device";
/// `Event.backend` of a device decision: the syscall returns EPERM.
pub const BACKEND_CGROUP_DEVICE: u8 = 4;
/// `Event.action` of a device decision (`open` of a device node, or
/// `mknod`).
pub const ACTION_DEVICE: u8 = 3;
/// `IdentityConfig.flags`: some policy of the identity has device rules.
pub const HAS_DEVICES: u32 = 8;
/// `Event.access` / `DeviceRule.access` bit for creating a device node (the
/// read and write bits are `ACCESS_READ` and `ACCESS_WRITE`).
pub const ACCESS_MKNOD: u32 = 8;

/// `DeviceKey.kind` (the kernel's `BPF_DEVCG_DEV_*`).
pub const DEVICE_BLOCK: u32 = 1;
pub const DEVICE_CHAR: u32 = 2;
/// `DeviceKey.minor` of a rule for every minor of its major.
pub const DEVICE_ANY_MINOR: u32 = u32::MAX;
pub const DEVICE_RULES_PER_KEY: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceKey {
    pub identity: u32,
    /// `DEVICE_CHAR` or `DEVICE_BLOCK`.
    pub kind: u32,
    pub major: u32,
    /// A minor, or `DEVICE_ANY_MINOR`.
    pub minor: u32,
}

/// One device rule. An allow rule matches a request whose access bits are
/// all in `access`; a deny rule one that asks for any of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceRule {
    /// `ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD` bits.
    pub access: u32,
    /// Agent-wide rule id (for the decision log).
    pub rule_id: u32,
    /// `VERDICT_ALLOW` or `VERDICT_DENY`.
    pub verdict: u8,
    /// `MODE_*` of the policy the rule came from.
    pub mode: u8,
    /// Bit index of that policy within the identity's policy list.
    pub policy_bit: u8,
    /// `RULE_LOG_ALLOW` when allows are logged.
    pub flags: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRuleSet {
    pub count: u32,
    pub rules: [DeviceRule; DEVICE_RULES_PER_KEY],
}

impl Default for DeviceRuleSet {
    fn default() -> Self {
        Self {
            count: 0,
            rules: [DeviceRule::default(); DEVICE_RULES_PER_KEY],
        }
    }
}

const _: () = assert!(size_of::<DeviceKey>() == 16);
const _: () = assert!(size_of::<DeviceRule>() == 12);
const _: () = assert!(size_of::<DeviceRuleSet>() == 4 + 12 * DEVICE_RULES_PER_KEY);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), integers and arrays only, no padding (size asserts).
    unsafe impl aya::Pod for DeviceKey {}
    unsafe impl aya::Pod for DeviceRuleSet {}
}
