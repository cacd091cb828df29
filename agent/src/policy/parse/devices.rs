//! Validation of `spec.devices` (see `policy::devices`).

use portcullis_common::{ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE};

use super::{Cx, Location, Node, SNode, line_of};
use crate::policy::{DeviceKind, DeviceRule, DeviceRules, DeviceTarget};

const ALL_ACCESS: u32 = ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD;

impl Cx<'_> {
    pub(super) fn devices(&mut self, at: Location, n: &SNode) -> Option<DeviceRules> {
        let mut f = self.map(n, "spec.devices", Some(&["default", "allow", "deny"]))?;
        f.at = at;
        let default = self.default_action(&f);
        let allow = self.device_list(f.get("allow"), &f.path("allow"), true);
        let deny = self.device_list(f.get("deny"), &f.path("deny"), false);
        Some(DeviceRules {
            default: default?,
            allow: allow?,
            deny: deny?,
        })
    }

    fn device_list(
        &mut self,
        n: Option<&SNode>,
        path: &str,
        is_allow: bool,
    ) -> Option<Vec<DeviceRule>> {
        let Some(n) = n else { return Some(Vec::new()) };
        let items = self.seq(n, path)?;
        let mut rules = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.device_rule(item, &format!("{path}[{i}]"), is_allow) {
                Some(rule) => rules.push(rule),
                None => ok = false,
            }
        }
        ok.then_some(rules)
    }

    fn device_rule(&mut self, n: &SNode, path: &str, is_allow: bool) -> Option<DeviceRule> {
        let f = self.map(
            n,
            path,
            Some(&[
                "kind",
                "index",
                "uuid",
                "device",
                "path",
                "allocated",
                "instance",
                "access",
                "log",
                "until",
            ]),
        )?;
        let before = self.errors.len();
        let named: Vec<&str> = ["kind", "device", "path", "allocated"]
            .into_iter()
            .filter(|k| f.get(k).is_some())
            .collect();
        if named.len() != 1 {
            self.err(
                f.at,
                path,
                format!(
                    "give exactly one of kind, device, path or allocated (found {})",
                    if named.is_empty() {
                        "none".to_owned()
                    } else {
                        named.join(", ")
                    }
                ),
            );
        }
        let target = if let Some(k) = f.get("kind") {
            let kind = self.choice(k, &f.path("kind"), "device kind", &DeviceKind::ALL);
            let index = f.get("index").and_then(|i| match &i.value {
                Node::Int(v) if (0..=254).contains(v) => Some(*v as u32),
                _ => {
                    self.expected(i, &f.path("index"), "a GPU index from 0 to 254");
                    None
                }
            });
            let uuid = f.get("uuid").and_then(|u| self.string(u, &f.path("uuid")));
            let instance = f.get("instance").and_then(|i| match &i.value {
                Node::Int(v) if (0..=254).contains(v) => Some(*v as u32),
                _ => {
                    self.expected(i, &f.path("instance"), "a GPU instance id from 0 to 254");
                    None
                }
            });
            if let Some(kind) = kind {
                for (key, node, valid) in [
                    (
                        "index",
                        f.get("index"),
                        &[DeviceKind::NvidiaGpu, DeviceKind::NvidiaMig][..],
                    ),
                    ("uuid", f.get("uuid"), &[DeviceKind::NvidiaGpu][..]),
                    ("instance", f.get("instance"), &[DeviceKind::NvidiaMig][..]),
                ] {
                    if let Some(node) = node
                        && !valid.contains(&kind)
                    {
                        let names: Vec<&str> = valid.iter().map(|k| k.name()).collect();
                        self.err(
                            node.referenced,
                            &f.path(key),
                            format!("{key} is only valid with kind {}", names.join(" or ")),
                        );
                    }
                }
                if kind == DeviceKind::NvidiaMig && instance.is_some() && index.is_none() {
                    self.err(
                        f.at,
                        &f.path("instance"),
                        "instance needs the GPU's index (instance ids are per GPU)",
                    );
                }
            }
            if f.get("index").is_some() && f.get("uuid").is_some() {
                self.err(f.at, &f.path("uuid"), "give index or uuid, not both");
            }
            kind.map(|kind| DeviceTarget::Kind {
                kind,
                index,
                uuid,
                instance,
            })
        } else if let Some(d) = f.get("device") {
            self.string(d, &f.path("device")).and_then(|s| {
                parse_device_number(&s)
                    .map_err(|msg| self.err(d.referenced, &f.path("device"), msg))
                    .ok()
            })
        } else if let Some(p) = f.get("path") {
            self.string(p, &f.path("path")).and_then(|s| {
                crate::policy::glob::validate_path_glob(&s)
                    .map(|()| DeviceTarget::Path(s))
                    .map_err(|msg| self.err(p.referenced, &f.path("path"), msg))
                    .ok()
            })
        } else if let Some(a) = f.get("allocated") {
            match self.boolean(a, &f.path("allocated")) {
                Some(true) if is_allow => Some(DeviceTarget::Allocated),
                Some(true) => {
                    self.err(
                        a.referenced,
                        &f.path("allocated"),
                        "allocated is only valid in devices.allow (deny the devices by kind or number)",
                    );
                    None
                }
                Some(false) => {
                    self.err(
                        a.referenced,
                        &f.path("allocated"),
                        "allocated must be true (omit the rule to allow nothing)",
                    );
                    None
                }
                None => None,
            }
        } else {
            None
        };
        if f.get("kind").is_none() {
            for key in ["index", "uuid", "instance"] {
                if let Some(node) = f.get(key) {
                    self.err(
                        node.referenced,
                        &f.path(key),
                        format!("{key} is only valid with a kind"),
                    );
                }
            }
        }
        let access = match f.get("access") {
            None => Some(ALL_ACCESS),
            Some(a) => self.device_access(a, &f.path("access")),
        };
        let (log, until) = self.allow_only(&f, is_allow);
        if self.errors.len() != before {
            return None;
        }
        let (target, access) = (target?, access?);
        let text = format!("{} {}", target_text(&target), access_text(access));
        Some(DeviceRule {
            target,
            access,
            log: log?,
            until: until?,
            text,
            line: line_of(n.referenced),
        })
    }

    /// `access: [read, write, mknod]` (any non-empty subset).
    fn device_access(&mut self, n: &SNode, path: &str) -> Option<u32> {
        let items = self.seq(n, path)?;
        if items.is_empty() {
            self.err(
                n.referenced,
                path,
                "access must not be empty (omit it for read, write and mknod)",
            );
            return None;
        }
        let mut mask = 0;
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.choice(
                item,
                &format!("{path}[{i}]"),
                "device access",
                &[
                    ("read", ACCESS_READ),
                    ("write", ACCESS_WRITE),
                    ("mknod", ACCESS_MKNOD),
                ],
            ) {
                Some(bit) => mask |= bit,
                None => ok = false,
            }
        }
        ok.then_some(mask)
    }
}

/// `195:0`, `c 195:*`, `b 8:0`.
fn parse_device_number(s: &str) -> Result<DeviceTarget, String> {
    let bad = || {
        format!(
            "'{s}' is not a device number: expected MAJOR:MINOR, e.g. \"195:0\", \"c 195:*\" or \"b 8:0\""
        )
    };
    let (block, rest) = match s.split_once(' ') {
        Some(("c", rest)) => (false, rest.trim()),
        Some(("b", rest)) => (true, rest.trim()),
        Some(_) => return Err(bad()),
        None => (false, s),
    };
    let (major, minor) = rest.split_once(':').ok_or_else(bad)?;
    let major: u32 = major.parse().map_err(|_| bad())?;
    let minor = match minor {
        "*" => None,
        m => Some(m.parse::<u32>().map_err(|_| bad())?),
    };
    if major >= 1 << 12 || minor.is_some_and(|m| m >= 1 << 20) {
        return Err(format!(
            "'{s}': major must be below 4096 and minor below 1048576"
        ));
    }
    Ok(DeviceTarget::Number {
        block,
        major,
        minor,
    })
}

fn target_text(t: &DeviceTarget) -> String {
    match t {
        DeviceTarget::Kind {
            kind,
            index: Some(i),
            instance: Some(gi),
            ..
        } => format!("{} index {i} instance {gi}", kind.name()),
        DeviceTarget::Kind {
            kind,
            index: Some(i),
            ..
        } => format!("{} index {i}", kind.name()),
        DeviceTarget::Kind {
            kind,
            uuid: Some(u),
            ..
        } => format!("{} uuid {u}", kind.name()),
        DeviceTarget::Kind { kind, .. } => kind.name().to_owned(),
        DeviceTarget::Number {
            block,
            major,
            minor,
        } => format!(
            "{} {major}:{}",
            if *block { "b" } else { "c" },
            minor.map_or("*".to_owned(), |m| m.to_string())
        ),
        DeviceTarget::Path(p) => p.clone(),
        DeviceTarget::Allocated => "allocated".to_owned(),
    }
}

fn access_text(mask: u32) -> String {
    [
        (ACCESS_READ, "read"),
        (ACCESS_WRITE, "write"),
        (ACCESS_MKNOD, "mknod"),
    ]
    .iter()
    .filter(|(b, _)| mask & b != 0)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join(",")
}
