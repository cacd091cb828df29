//! Host policies: the YAML schema security engineers write (`parse`), glob
//! matching (`glob`), and the validated form the rest of the agent compiles
//! into kernel maps (the types below).
//!
//! Everything in this module is pure: no kernel, no filesystem walks beyond
//! reading the policy files themselves.

pub mod devices;
pub mod glob;
pub mod labels;
pub mod parse;
pub mod schema;
pub mod sockets;
#[cfg(test)]
mod tests;

use std::{net::Ipv6Addr, path::PathBuf};

pub use devices::{DeviceKind, DeviceRule, DeviceRules, DeviceTarget};
pub use labels::{LabelOperator, LabelRequirement, LabelSelector};
pub use parse::{ParseCache, PolicyError, load_paths, load_paths_cached, parse_str};
pub use sockets::{SocketKind, SocketRule, SocketRules};

/// `apiVersion` every policy must carry.
pub const API_VERSION: &str = "portcullis.dev/v1alpha1";
/// `kind` every policy must carry.
pub const KIND: &str = "HostPolicy";

/// One validated `HostPolicy` document.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `metadata.name`; unique across all loaded files.
    pub name: String,
    /// File the policy came from.
    pub source: PathBuf,
    pub mode: Mode,
    pub selector: Selector,
    pub exec: Option<ExecRules>,
    pub egress: Option<EgressRules>,
    /// `network.sockets`, or what a `default: deny` egress implies.
    pub sockets: Option<SocketRules>,
    pub files: Vec<FileRule>,
    pub devices: Option<DeviceRules>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// Which workloads a policy governs; every given field must match. An empty
/// selector is rejected by validation (a host-wide policy must say
/// `cgroupPath: "/**"`).
///
/// The Kubernetes fields (`namespace`, `pod_labels`, `service_account`,
/// `container`) match only cgroups whose pod metadata the agent knows (from
/// the CRI socket); a cgroup whose metadata is not known yet is governed by
/// its nearest classified ancestor's identity meanwhile, never left free.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selector {
    /// Glob over the cgroup v2 path (as in `/proc/<pid>/cgroup`, starting
    /// with `/`). `**` matches any number of segments, including none.
    pub cgroup_path: Option<String>,
    /// Glob over the systemd unit the cgroup belongs to (the innermost
    /// `*.service` / `*.scope` segment of its path).
    pub systemd_unit: Option<String>,
    /// Glob over the pod's namespace.
    pub namespace: Option<String>,
    /// Kubernetes label selector over the pod's labels.
    pub pod_labels: Option<LabelSelector>,
    /// Glob over the pod's service account name.
    pub service_account: Option<String>,
    /// Glob over the container name (as in the pod spec). A policy with this
    /// field selects container cgroups only, not the pod's sandbox.
    pub container: Option<String>,
    /// Inclusive uid range of the acting task. Unlike the other fields it is
    /// checked in the kernel per syscall (a cgroup holds tasks of many
    /// uids); alone it selects every cgroup, for tasks of those uids.
    pub uid: Option<(u32, u32)>,
}

impl Selector {
    /// Whether any field needs pod metadata to match.
    pub fn needs_pod(&self) -> bool {
        self.namespace.is_some()
            || self.pod_labels.is_some()
            || self.service_account.is_some()
            || self.container.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExecRules {
    pub default: DefaultAction,
    pub allow: Vec<PathRule>,
    pub deny: Vec<PathRule>,
}

/// An absolute path glob: `*` and `?` match within one segment, and `**` may
/// only be the last segment, meaning "this directory and everything below".
#[derive(Debug, Clone, PartialEq)]
pub struct PathRule {
    pub pattern: String,
    /// Line of the rule in its file (for the decision log and errors).
    pub line: usize,
    /// A time-bound approval (exec `allow` entries only): the rule is in
    /// force until this Unix time (seconds), then as if absent.
    pub until: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EgressRules {
    pub default: DefaultAction,
    pub allow: Vec<NetRule>,
    pub deny: Vec<NetRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetRule {
    /// Network address, IPv4 given as IPv4-mapped IPv6, host bits zeroed.
    pub addr: Ipv6Addr,
    /// Prefix length over the 128-bit (mapped) address: a v4 /n is 96 + n.
    pub prefix_len: u8,
    /// Inclusive port ranges; empty means any port.
    pub ports: Vec<(u16, u16)>,
    /// IP protocol (6 tcp, 17 udp); `None` for any.
    pub protocol: Option<u8>,
    /// Log allows that match this rule (denies are always logged).
    pub log: bool,
    /// The rule as the user wrote it, e.g. `10.0.0.0/8 443,8000-8002/tcp`.
    pub text: String,
    pub line: usize,
    /// A time-bound approval (allow rules only): in force until this Unix
    /// time (seconds), then as if absent.
    pub until: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAccess {
    /// No open at all.
    None,
    /// Read-only opens.
    Read,
    /// Read and write opens (useful with `onlyFrom`).
    ReadWrite,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileRule {
    pub path: PathRule,
    pub access: FileAccess,
    /// When non-empty, only these executables get `access`; every other
    /// process gets no access at all.
    pub only_from: Vec<PathRule>,
}

/// Unix time now, in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whether a time-bound rule has lapsed at `now` (Unix seconds).
pub fn expired(until: Option<i64>, now: i64) -> bool {
    until.is_some_and(|u| u <= now)
}

/// The earliest `until` after `now` among the policies' approvals: when the
/// agent must recompile to drop a lapsing approval.
pub fn next_expiry(policies: &[Policy], now: i64) -> Option<i64> {
    let exec = policies
        .iter()
        .filter_map(|p| p.exec.as_ref())
        .flat_map(|e| e.allow.iter().map(|r| r.until));
    let net = policies
        .iter()
        .filter_map(|p| p.egress.as_ref())
        .flat_map(|e| e.allow.iter().map(|r| r.until));
    let devices = policies
        .iter()
        .filter_map(|p| p.devices.as_ref())
        .flat_map(|d| d.allow.iter().map(|r| r.until));
    exec.chain(net)
        .chain(devices)
        .flatten()
        .filter(|&u| u > now)
        .min()
}

/// How long the agent waits before recompiling for the next lapsing
/// approval, or `None` when none is in force. Counted from `judged_at`, the
/// second the policy in force was compiled at: an approval that lapsed since
/// (the agent woke up late) is due at once, never skipped as already past.
pub fn lapse_wait(
    policies: &[Policy],
    judged_at: i64,
    now: std::time::SystemTime,
) -> Option<std::time::Duration> {
    let at = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(next_expiry(policies, judged_at)?.max(0) as u64);
    Some(at.duration_since(now).unwrap_or_default())
}

/// Parses an RFC 3339 timestamp (`2026-12-01T12:00:00Z`, fractional
/// seconds and `+hh:mm` offsets allowed) to Unix seconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let bad = || format!("'{s}' is not an RFC 3339 time like 2026-12-01T12:00:00Z");
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r)
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let oh: i64 = rest[1..3].parse().map_err(|_| bad())?;
            let om: i64 = rest[4..6].parse().map_err(|_| bad())?;
            sign * (oh * 3600 + om * 60)
        }
        _ => return Err(bad()),
    };
    let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [
        31,
        if leap(y) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d < 1
        || d > mdays[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || se > 60
    {
        return Err(format!("'{s}' is not a valid date and time"));
    }
    // Days from civil (Howard Hinnant).
    let (yy, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}
