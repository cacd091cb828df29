//! Host policies: the YAML schema security engineers write (`parse`), glob
//! matching (`glob`), and the validated form the rest of the agent compiles
//! into kernel maps (the types below).
//!
//! Everything in this module is pure: no kernel, no filesystem walks beyond
//! reading the policy files themselves.

pub mod glob;
pub mod labels;
pub mod parse;
#[cfg(test)]
mod tests;

use std::{net::Ipv6Addr, path::PathBuf};

pub use labels::{LabelOperator, LabelRequirement, LabelSelector};
pub use parse::{PolicyError, load_paths, parse_str};

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
    pub files: Vec<FileRule>,
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
