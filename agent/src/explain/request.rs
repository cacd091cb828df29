//! A request as the decision log records it: read from a decision line or
//! from `explain`'s flags, and turned into the host evaluator's request on
//! this machine.

use std::{net::IpAddr, path::Path, sync::Arc};

use portcullis_common::{ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE, AF_INET, AF_INET6};
use serde::Serialize;
use serde_json::Value;

use crate::{
    compile::CgroupInfo,
    evaluate::{self, Action, Levels},
    pod::{ContainerMetadata, Lookup, PodMetadata},
};

/// A request as the decision log records it.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    pub action: String,
    pub cgroup: String,
    pub uid: u32,
    pub exe: String,
    /// Path (exec/open) or `ip:port/protocol` (connect).
    pub target: String,
    /// `read`, `write`, `read_write` (open).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<String>,
    #[serde(skip)]
    pub(super) pod: Option<PodMetadata>,
    #[serde(skip)]
    what: Action<LoggedPath>,
}

/// A path as logged, with the (dev, ino) the kernel saw: the level used
/// when the path is gone from this machine.
#[derive(Debug, Clone)]
struct LoggedPath {
    path: String,
    inode: Option<(u32, u64)>,
}

impl LoggedPath {
    fn levels(&self) -> Result<Levels, String> {
        match (evaluate::levels(Path::new(&self.path)), self.inode) {
            (Ok(l), _) => Ok(l),
            // Gone: its logged inode alone still meets a rule naming it,
            // not one of a directory above it.
            (Err(_), Some(l)) => Ok(vec![l]),
            (Err(e), None) => Err(format!("{}: {e}", self.path)),
        }
    }
}

/// `ACCESS_*` bits of a logged `access` (`read`, `write`, `read_write`,
/// `mknod`, `exec`).
fn access_bits(name: &str) -> u32 {
    match name {
        "mknod" => ACCESS_MKNOD,
        "write" => ACCESS_WRITE,
        "read_write" => ACCESS_READ | ACCESS_WRITE,
        _ => ACCESS_READ,
    }
}

impl Request {
    /// Reads one decision-log line. Checkpoint lines are not requests
    /// (`Ok(None)`).
    pub fn from_log_line(line: &str) -> Result<Option<Self>, String> {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
        let Some(action) = s("/action") else {
            return Ok(None);
        };
        let w = |f: &str| format!("/workload/{f}");
        let cgroup = s(&w("cgroup")).ok_or("no workload.cgroup")?;
        let uid = v.pointer(&w("uid")).and_then(Value::as_u64).unwrap_or(0) as u32;
        let pod = v.pointer(&w("pod")).map(|p| PodMetadata {
            uid: p["uid"].as_str().unwrap_or_default().into(),
            namespace: p["namespace"].as_str().unwrap_or_default().into(),
            name: p["name"].as_str().unwrap_or_default().into(),
            labels: Default::default(),
            service_account: None,
            container: p["container"].as_str().map(|c| ContainerMetadata {
                id: String::new(),
                name: c.into(),
                image: p["image"].as_str().unwrap_or_default().into(),
                // Not in the log: an `allocated` rule cannot be judged.
                allocated: Vec::new(),
            }),
            provisional: false,
        });
        let access = s("/target/access");
        let bits = access_bits(access.as_deref().unwrap_or("read"));
        let (what, target) = match action.as_str() {
            "connect" => {
                let ip: IpAddr = s("/target/ip")
                    .ok_or("no target.ip")?
                    .parse()
                    .map_err(|e| format!("target.ip: {e}"))?;
                let port = v.pointer("/target/port").and_then(Value::as_u64);
                let port = port.ok_or("no target.port")? as u16;
                let protocol = s("/target/protocol").unwrap_or_else(|| "tcp".into());
                let addr = match ip {
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                    IpAddr::V6(a) => a,
                };
                let proto = match protocol.as_str() {
                    "udp" => libc::IPPROTO_UDP as u8,
                    _ => libc::IPPROTO_TCP as u8,
                };
                let ip = if ip.is_ipv6() {
                    format!("[{ip}]")
                } else {
                    ip.to_string()
                };
                (
                    Action::Connect { addr, port, proto },
                    format!("{ip}:{port}/{protocol}"),
                )
            }
            "exec" | "open" => {
                let num = |f: &str| v.pointer(&format!("/target/{f}")).and_then(Value::as_u64);
                let path = LoggedPath {
                    path: s("/target/path").ok_or("no target.path")?,
                    inode: num("dev").zip(num("ino")).map(|(d, i)| (d as u32, i)),
                };
                let target = path.path.clone();
                let a = if action == "exec" {
                    Action::Exec { path }
                } else {
                    Action::Open { path, access: bits }
                };
                (a, target)
            }
            "device" => {
                let dev = s("/target/device").ok_or("no target.device")?;
                let (kind, major, minor) = evaluate::parse_device(&dev)
                    .ok_or_else(|| format!("target.device {dev}: expected `c MAJOR:MINOR`"))?;
                let a = Action::Device {
                    kind,
                    major,
                    minor,
                    access: bits,
                };
                (a, dev)
            }
            "socket" => {
                let name = s("/target/socket").ok_or("no target.socket")?;
                let kind = crate::policy::SocketKind::from_name(&name).ok_or_else(|| {
                    format!("target.socket {name}: expected raw, icmp, inet-other or packet")
                })?;
                let named = s("/target/family");
                let family = match (kind.families(), named.as_deref()) {
                    (&[only], _) => only,
                    (_, Some("inet6")) => AF_INET6,
                    _ => AF_INET,
                };
                let a = Action::Socket {
                    family,
                    kind: kind.wire(),
                };
                let shown = match family {
                    AF_INET6 => "inet6",
                    AF_INET => "inet",
                    _ => "packet",
                };
                (a, format!("{name} ({shown})"))
            }
            _ => return Ok(None),
        };
        Ok(Some(Self {
            access: access.filter(|_| !matches!(action.as_str(), "exec" | "connect" | "socket")),
            action,
            cgroup,
            uid,
            exe: s("/exe").unwrap_or_default(),
            target,
            pod,
            what,
        }))
    }

    /// A request given on the command line: `target` is a path, or
    /// `IP:PORT` (`[v6]:PORT`) for connect.
    pub fn from_args(
        action: &str,
        cgroup: &str,
        uid: u32,
        exe: &str,
        target: &str,
        access: &str,
        udp: bool,
    ) -> Result<Self, String> {
        let line = match action {
            "connect" => {
                let sa: std::net::SocketAddr = target
                    .parse()
                    .map_err(|e| format!("{target}: {e} (want IP:PORT)"))?;
                serde_json::json!({"action": action, "workload": {"cgroup": cgroup, "uid": uid}, "exe": exe,
                    "target": {"ip": sa.ip().to_string(), "port": sa.port(), "protocol": if udp { "udp" } else { "tcp" }}})
            }
            "socket" => {
                // `raw`, or `raw/inet6`.
                let (kind, family) = target.split_once('/').unwrap_or((target, "inet"));
                serde_json::json!({"action": action, "workload": {"cgroup": cgroup, "uid": uid},
                    "exe": exe, "target": {"socket": kind, "family": family}})
            }
            "exec" | "open" | "device" => {
                let key = if action == "device" { "device" } else { "path" };
                serde_json::json!({"action": action, "workload": {"cgroup": cgroup, "uid": uid},
                "exe": exe, "target": {key: target, "access": access}})
            }
            other => {
                return Err(format!(
                    "unknown action {other}: exec, open, connect, device or socket"
                ));
            }
        };
        Self::from_log_line(&line.to_string()).map(|r| r.expect("an action was given"))
    }

    pub(super) fn cgroup_info(&self) -> CgroupInfo {
        let mut cg = CgroupInfo::new(1, self.cgroup.clone());
        if let Some(p) = &self.pod {
            cg.pod = Lookup::Known(Arc::new(p.clone()));
        }
        cg
    }

    pub(super) fn action(&self) -> Result<Action, String> {
        self.what.try_map_path(LoggedPath::levels)
    }
}
