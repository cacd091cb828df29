//! The `HostPolicy` schema as Rust types, for the JSON Schema editors use
//! (`portcullis schema host-policy`, `schemas/host-policy.schema.json`).
//!
//! Policies are not parsed through these types: the parser (`parse.rs`)
//! walks a located YAML tree so that every error names its line and field.
//! These types say the same schema for schemars to derive from, and
//! `tests/tests/schema.rs` keeps the two in agreement: every bundled policy
//! passes both, and a set of broken ones fails both. The schema checks
//! shape (fields, types, enumerations); what needs more than shape (CIDR
//! host bits, duplicate paths, glob rules) only `validate` checks.

#![allow(dead_code)] // The fields exist for the derive only.

use std::collections::BTreeMap;

use schemars::JsonSchema;

use super::{DeviceKind, SocketKind};

/// `apiVersion` of every Portcullis document.
#[derive(JsonSchema)]
pub enum ApiVersion {
    #[schemars(rename = "portcullis.dev/v1alpha1")]
    V1alpha1,
}

#[derive(JsonSchema)]
pub enum HostPolicyKind {
    HostPolicy,
}

/// A host policy: which workloads it selects and what they may do.
#[derive(JsonSchema)]
#[schemars(rename_all = "camelCase", deny_unknown_fields, title = "HostPolicy")]
pub struct HostPolicy {
    api_version: ApiVersion,
    kind: HostPolicyKind,
    metadata: Metadata,
    spec: Spec,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Metadata {
    /// Unique across every loaded file; a Kubernetes DNS subdomain.
    #[schemars(
        length(max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    name: String,
    /// Ignored by enforcement.
    labels: Option<BTreeMap<String, String>>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Spec {
    /// `audit` logs what `enforce` would deny, and denies nothing.
    mode: Option<Mode>,
    selector: Selector,
    exec: Option<Exec>,
    network: Option<Network>,
    files: Option<Vec<FileRule>>,
    devices: Option<Devices>,
}

#[derive(JsonSchema)]
#[schemars(rename_all = "lowercase")]
enum Mode {
    Enforce,
    Audit,
}

#[derive(JsonSchema)]
#[schemars(rename_all = "lowercase")]
enum DefaultAction {
    Deny,
    Allow,
}

/// Every given field must match; at least one is required.
#[derive(JsonSchema)]
#[schemars(rename_all = "camelCase", deny_unknown_fields, extend("minProperties" = 1))]
struct Selector {
    /// Glob over the cgroup v2 path (`/kubepods.slice/**`).
    cgroup_path: Option<String>,
    /// Glob over the systemd unit name (`triton*.service`).
    systemd_unit: Option<String>,
    /// Glob over the pod's namespace.
    namespace: Option<String>,
    pod_labels: Option<PodLabels>,
    /// Glob over the pod's service account.
    service_account: Option<String>,
    /// Glob over the container name.
    container: Option<String>,
    /// A uid or an inclusive range `"1000-1999"`.
    uid: Option<Uid>,
}

/// A plain map (matchLabels), or a Kubernetes LabelSelector.
#[derive(JsonSchema)]
#[schemars(untagged)]
enum PodLabels {
    Selector(LabelSelector),
    Labels(BTreeMap<String, String>),
}

#[derive(JsonSchema)]
#[schemars(rename_all = "camelCase", deny_unknown_fields)]
struct LabelSelector {
    match_labels: Option<BTreeMap<String, String>>,
    match_expressions: Option<Vec<LabelRequirement>>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct LabelRequirement {
    key: String,
    operator: LabelOperator,
    values: Option<Vec<String>>,
}

#[derive(JsonSchema)]
enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(JsonSchema)]
#[schemars(untagged)]
enum Uid {
    One(u32),
    Range(#[schemars(regex(pattern = r"^[0-9]+-[0-9]+$"))] String),
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Exec {
    default: Option<DefaultAction>,
    allow: Option<Vec<ExecAllow>>,
    /// Absolute path globs.
    deny: Option<Vec<String>>,
}

/// An absolute path glob, or a time-bound approval of one.
#[derive(JsonSchema)]
#[schemars(untagged)]
enum ExecAllow {
    Path(String),
    Approval(Approval),
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Approval {
    path: String,
    /// RFC 3339; the rule is as if absent from then on.
    until: String,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Network {
    egress: Option<Egress>,
    /// Socket kinds beyond TCP and UDP; without it, an egress
    /// `default: deny` denies them all.
    sockets: Option<Sockets>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Sockets {
    /// Default: the egress default.
    default: Option<DefaultAction>,
    allow: Option<Vec<SocketKind>>,
    deny: Option<Vec<SocketKind>>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Egress {
    default: Option<DefaultAction>,
    allow: Option<Vec<NetRule>>,
    deny: Option<Vec<NetRule>>,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct NetRule {
    /// An IPv4 or IPv6 network with its host bits clear (`10.0.0.0/8`).
    cidr: String,
    /// Ports (`443`) or ranges (`"8000-8002"`); omitted: any port.
    #[schemars(length(min = 1))]
    ports: Option<Vec<Port>>,
    protocol: Option<Protocol>,
    /// Log the connections this allow rule allows.
    log: Option<bool>,
    /// RFC 3339 (allow rules only).
    until: Option<String>,
}

#[derive(JsonSchema)]
#[schemars(untagged)]
enum Port {
    Number(#[schemars(range(min = 1, max = 65535))] u16),
    Range(#[schemars(regex(pattern = r"^[0-9]+(-[0-9]+)?$"))] String),
}

#[derive(JsonSchema)]
#[schemars(rename_all = "lowercase")]
enum Protocol {
    Tcp,
    Udp,
    Any,
}

#[derive(JsonSchema)]
#[schemars(rename_all = "camelCase", deny_unknown_fields)]
struct FileRule {
    /// An absolute path glob.
    path: String,
    access: FileAccess,
    /// Only these executables get `access`; every other process none.
    #[schemars(length(min = 1))]
    only_from: Option<Vec<String>>,
}

#[derive(JsonSchema)]
#[schemars(rename_all = "lowercase")]
enum FileAccess {
    None,
    Read,
    Readwrite,
}

#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct Devices {
    default: Option<DefaultAction>,
    allow: Option<Vec<DeviceRule>>,
    deny: Option<Vec<DeviceRule>>,
}

/// Exactly one of `kind`, `device`, `path` and `allocated`.
#[derive(JsonSchema)]
#[schemars(deny_unknown_fields)]
struct DeviceRule {
    kind: Option<DeviceKind>,
    /// `nvidia-gpu` and `nvidia-mig` only: the GPU's index.
    index: Option<u32>,
    /// `nvidia-gpu` only: the GPU's UUID.
    uuid: Option<String>,
    /// `nvidia-mig` only, with `index`: the GPU instance id.
    instance: Option<u32>,
    /// `"195:0"`, `"c 195:*"`, `"b 8:0"`.
    device: Option<String>,
    /// A glob over device nodes, resolved with stat at load.
    path: Option<String>,
    /// `true` (allow rules only): the devices the kubelet allocated to the
    /// acting container.
    allocated: Option<bool>,
    /// All three when absent.
    access: Option<Vec<DeviceAccess>>,
    log: Option<bool>,
    until: Option<String>,
}

#[derive(JsonSchema)]
#[schemars(rename_all = "lowercase")]
enum DeviceAccess {
    Read,
    Write,
    Mknod,
}

/// The JSON Schema of `HostPolicy`, pretty-printed.
pub fn host_policy() -> String {
    pretty(schemars::schema_for!(HostPolicy))
}

pub(crate) fn pretty(s: schemars::Schema) -> String {
    let mut out = serde_json::to_string_pretty(&s).unwrap_or_default();
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use crate::policy::DeviceKind;

    #[test]
    fn the_schema_knows_every_device_kind_the_parser_does() {
        let schema = super::host_policy();
        for (name, _) in DeviceKind::ALL {
            assert!(schema.contains(&format!("\"{name}\"")), "{name}");
        }
    }
}
