//! Reading `PolicyTest` YAML: the cases of one test file, each checked and
//! located, so a bad case is named by file, line and field like a bad
//! policy.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use portcullis_common::{
    ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE, AF_INET, AF_INET6, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DENY,
};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::policy::{API_VERSION, PolicyError, parse::strip_location};

pub const KIND: &str = "PolicyTest";

/// A policy test file: cases run against the policies it names.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "PolicyTest")]
struct Raw {
    #[schemars(with = "crate::policy::schema::ApiVersion")]
    api_version: Spanned<String>,
    #[schemars(with = "Kind")]
    kind: Spanned<String>,
    /// Policy files or directories, relative to this file.
    policies: Vec<String>,
    /// More paths that exist in the fixture (a trailing `/`: a directory).
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    fixture: Vec<Spanned<String>>,
    /// A directory standing for `/proc`, relative to the test file: where
    /// device kinds (`nvidia-gpu`, ...) find their numbers.
    node_proc: Option<String>,
    #[schemars(with = "Vec<RawCase>")]
    cases: Vec<Spanned<RawCase>>,
}

/// The one `kind` of a test file (for the schema; parsing checks the text).
#[derive(JsonSchema)]
#[allow(dead_code)]
enum Kind {
    PolicyTest,
}

/// The JSON Schema of `PolicyTest` files, pretty-printed.
pub fn schema() -> String {
    crate::policy::schema::pretty(schemars::schema_for!(Raw))
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCase {
    name: String,
    workload: Workload,
    exec: Option<String>,
    open: Option<RawOpen>,
    connect: Option<RawConnect>,
    device: Option<RawDevice>,
    socket: Option<RawSocket>,
    expect: RawExpect,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    /// `c 195:0`, `b 8:0`, or `195:0` (char).
    device: String,
    /// Default: read and write (an open for both).
    access: Option<Vec<DeviceAccess>>,
}

/// A `socket()` of a kind beyond TCP and UDP.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawSocket {
    kind: crate::policy::SocketKind,
    #[serde(default)]
    family: Family,
}

#[derive(Deserialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Family {
    #[default]
    Inet,
    Inet6,
}

#[derive(Deserialize, JsonSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum DeviceAccess {
    Read,
    Write,
    Mknod,
}

/// Who acts. `exe` is only asked by `onlyFrom` rules; without it the task
/// runs no executable any `onlyFrom` names.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub cgroup: String,
    #[serde(default)]
    pub uid: u32,
    pub exe: Option<String>,
    pub pod: Option<Pod>,
}

/// Pod metadata as the CRI runtime would report it.
#[derive(Deserialize, JsonSchema, Debug, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Pod {
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub container: Option<String>,
    /// What the kubelet allocated to the container, as device numbers
    /// (`c 195:0`), each granted read, write and mknod: what `allocated`
    /// device rules allow.
    #[serde(default)]
    pub allocated_devices: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawOpen {
    path: String,
    access: Access,
}

#[derive(Deserialize, JsonSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Access {
    Read,
    Write,
    Readwrite,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawConnect {
    address: IpAddr,
    port: u16,
    #[serde(default)]
    protocol: Protocol,
}

#[derive(Deserialize, JsonSchema, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct RawExpect {
    verdict: Verdict,
    policy: Option<String>,
    rule: Option<String>,
}

#[derive(Deserialize, JsonSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Allow,
    Deny,
    Audit,
}

/// One request of a case, paths as the workload sees them.
pub type Request = crate::evaluate::Action<String>;

/// What a case requires of the decision.
#[derive(Debug, Clone)]
pub struct Expect {
    pub verdict: u8,
    pub policy: Option<String>,
    /// The rule as the decision log names it (`files[0] /etc/shadow`), or
    /// only its place (`files[0]`, `default`).
    pub rule: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Case {
    pub line: usize,
    pub name: String,
    pub workload: Workload,
    pub request: Request,
    pub expect: Expect,
}

#[derive(Debug)]
pub struct TestFile {
    pub path: PathBuf,
    /// Resolved against the test file's directory.
    pub policies: Vec<PathBuf>,
    /// Paths that exist in the fixture besides those the cases name; one
    /// ending in `/` is a directory.
    pub fixture: Vec<String>,
    /// Stands for `/proc` in device-kind resolution (resolved against the
    /// test file's directory); none: a node without device drivers.
    pub node_proc: Option<PathBuf>,
    pub cases: Vec<Case>,
}

fn error(file: &Path, at: Location, field: String, message: impl Into<String>) -> PolicyError {
    PolicyError {
        file: file.to_owned(),
        line: usize::try_from(at.line()).unwrap_or(usize::MAX),
        column: usize::try_from(at.column()).unwrap_or(usize::MAX),
        field,
        message: message.into(),
    }
}

/// Fixture paths are absolute and plain: no `.`, `..` or empty segment
/// could then escape the fixture root.
fn plain_absolute(p: &str) -> bool {
    let inner = p.strip_suffix('/').unwrap_or(p);
    inner.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
    })
}

/// Parses one test file; every case error is reported, not only the first.
pub fn parse(path: &Path, text: &str) -> Result<TestFile, Vec<PolicyError>> {
    // The policy parser's YAML 1.2 reading, so both kinds of file mean the
    // same by `yes` and `0755`.
    let options = serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        with_snippet: false,
    };
    let raw: Raw = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        let at = e.location().unwrap_or(Location::UNKNOWN);
        let message = strip_location(&e.without_snippet().to_string());
        vec![error(path, at, "yaml".into(), message)]
    })?;
    let mut errors = Vec::new();
    if raw.api_version.value != API_VERSION {
        errors.push(error(
            path,
            raw.api_version.referenced,
            "apiVersion".into(),
            format!("must be {API_VERSION}"),
        ));
    }
    if raw.kind.value != KIND {
        errors.push(error(
            path,
            raw.kind.referenced,
            "kind".into(),
            format!("must be {KIND}"),
        ));
    }
    for (i, f) in raw.fixture.iter().enumerate() {
        if !plain_absolute(&f.value) {
            errors.push(error(
                path,
                f.referenced,
                format!("fixture[{i}]"),
                "must be an absolute path without `.`, `..` or empty segments",
            ));
        }
    }
    let mut cases = Vec::new();
    for (i, c) in raw.cases.into_iter().enumerate() {
        let at = c.referenced;
        let c = c.value;
        let mut bad = |field: &str, message: &str| {
            errors.push(error(path, at, format!("cases[{i}].{field}"), message));
        };
        let allocated = c.workload.pod.iter().flat_map(|p| &p.allocated_devices);
        for (j, d) in allocated.enumerate() {
            if crate::evaluate::parse_device(d).is_none() {
                bad(
                    &format!("workload.pod.allocatedDevices[{j}]"),
                    "expected `c MAJOR:MINOR`, `b MAJOR:MINOR` or `MAJOR:MINOR`",
                );
            }
        }
        let request = match (c.exec, c.open, c.connect, c.device, c.socket) {
            (None, None, None, Some(d), None) => {
                let Some((kind, major, minor)) = crate::evaluate::parse_device(&d.device) else {
                    bad(
                        "device.device",
                        "expected `c MAJOR:MINOR`, `b MAJOR:MINOR` or `MAJOR:MINOR`",
                    );
                    continue;
                };
                let access = d.access.map_or(ACCESS_READ | ACCESS_WRITE, |a| {
                    a.iter().fold(0, |m, x| {
                        m | match x {
                            DeviceAccess::Read => ACCESS_READ,
                            DeviceAccess::Write => ACCESS_WRITE,
                            DeviceAccess::Mknod => ACCESS_MKNOD,
                        }
                    })
                });
                Request::Device {
                    kind,
                    major,
                    minor,
                    access,
                }
            }
            (Some(path), None, None, None, None) => Request::Exec { path },
            (None, Some(o), None, None, None) => Request::Open {
                path: o.path,
                access: match o.access {
                    Access::Read => ACCESS_READ,
                    Access::Write => ACCESS_WRITE,
                    Access::Readwrite => ACCESS_READ | ACCESS_WRITE,
                },
            },
            (None, None, Some(c), None, None) => Request::Connect {
                addr: match c.address {
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                    IpAddr::V6(a) => a,
                },
                port: c.port,
                proto: match c.protocol {
                    Protocol::Tcp => libc::IPPROTO_TCP as u8,
                    Protocol::Udp => libc::IPPROTO_UDP as u8,
                },
            },
            (None, None, None, None, Some(sk)) => Request::Socket {
                // A packet socket has one family; `family` is for IP kinds.
                family: match (sk.kind.families(), sk.family) {
                    (&[only], _) => only,
                    (_, Family::Inet) => AF_INET,
                    (_, Family::Inet6) => AF_INET6,
                },
                kind: sk.kind.wire(),
            },
            _ => {
                bad(
                    "exec",
                    "a case makes exactly one of exec, open, connect, device and socket",
                );
                continue;
            }
        };
        let named = [
            match &request {
                Request::Exec { path } => Some(("exec", path)),
                Request::Open { path, .. } => Some(("open.path", path)),
                Request::Connect { .. } | Request::Device { .. } | Request::Socket { .. } => None,
            },
            c.workload.exe.as_ref().map(|e| ("workload.exe", e)),
        ];
        for (field, p) in named.into_iter().flatten() {
            if !plain_absolute(p) || p.ends_with('/') {
                bad(
                    field,
                    "must be an absolute file path without `.`, `..` or empty segments",
                );
            }
        }
        if !c.workload.cgroup.starts_with('/') {
            bad(
                "workload.cgroup",
                "must be a cgroup v2 path starting with `/`",
            );
        }
        cases.push(Case {
            line: usize::try_from(at.line()).unwrap_or(usize::MAX),
            name: c.name,
            workload: c.workload,
            request,
            expect: Expect {
                verdict: match c.expect.verdict {
                    Verdict::Allow => VERDICT_ALLOW,
                    Verdict::Deny => VERDICT_DENY,
                    Verdict::Audit => VERDICT_AUDIT,
                },
                policy: c.expect.policy,
                rule: c.expect.rule,
            },
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(TestFile {
        path: path.to_owned(),
        policies: raw.policies.iter().map(|p| dir.join(p)).collect(),
        fixture: raw.fixture.into_iter().map(|f| f.value).collect(),
        node_proc: raw.node_proc.map(|p| dir.join(p)),
        cases,
    })
}
