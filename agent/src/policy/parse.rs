//! Reading `HostPolicy` YAML into validated [`Policy`] values.
//!
//! # Schema
//!
//! ```yaml
//! apiVersion: portcullis.dev/v1alpha1   # required, exactly this
//! kind: HostPolicy                      # required, exactly this
//! metadata:
//!   name: inference-serving   # required; [a-z0-9]([-a-z0-9.]*[a-z0-9])?, at most 253
//!                             # characters; unique across every loaded file
//!   labels: {}                # optional map of string values, ignored by enforcement
//! spec:
//!   mode: enforce             # enforce | audit (default enforce); audit logs what
//!                             # enforce would deny, and denies nothing
//!   selector:                 # required, at least one field; every given field must match
//!     cgroupPath: "/kubepods.slice/**"   # glob over the cgroup v2 path; `**` may be any
//!                                        # whole segment; "/**" selects every workload
//!     systemdUnit: "triton*.service"     # glob over the unit name (no '/')
//!     namespace: "ml-*"                  # glob over the pod's namespace
//!     podLabels: {app: triton}           # plain map = matchLabels; or the full
//!                                        # Kubernetes LabelSelector:
//!                                        #   {matchLabels: {...}, matchExpressions:
//!                                        #    [{key, operator: In|NotIn|Exists|DoesNotExist, values}]}
//!     serviceAccount: "triton"           # glob over the pod's service account
//!     container: "server"                # glob over the container name
//!                                        # (the four pod fields match only cgroups
//!                                        # whose pod metadata is known; see crate::pod)
//!   exec:                     # optional
//!     default: deny           # deny | allow (default allow)
//!     allow: ["/usr/bin/python3*", "/opt/triton/**"]
//!     deny: []
//!   network:                  # optional
//!     egress:                 # optional
//!       default: deny         # deny | allow (default allow)
//!       allow:
//!         - cidr: 10.0.0.0/8          # required; IPv4 or IPv6 network, host bits zero
//!           ports: ["443", "8000-8002"]  # optional, non-empty; integers or "a-b"
//!                                        # ranges, 1-65535; omitted = any port
//!           protocol: tcp             # tcp | udp | any (default any)
//!           log: true                 # log connections this rule allows (default false)
//!       deny:
//!         - cidr: 169.254.169.254/32  # same fields, except `log` (denies are always logged)
//!   files:                    # optional
//!     - path: "/data/datasets/pii/**"
//!       access: none          # required: none | read | readwrite
//!     - path: "/etc/ml/secrets/**"
//!       access: read
//!       onlyFrom: ["/opt/triton/bin/tritonserver"]   # optional, non-empty; only these
//!                             # executables get `access`, every other process gets none
//! ```
//!
//! Rules for every value:
//!
//! - Unknown fields are errors, at any depth (a misspelt `egres:` must not
//!   silently drop a rule). `null` (or an empty value, `exec:`) means "not
//!   given".
//! - Exec, file and `onlyFrom` patterns are absolute globs (see
//!   [`super::glob`]): no `.`/`..` or empty segments, no trailing `/`, and `**`
//!   only as the whole last segment.
//! - CIDRs must have their host bits clear: `10.0.0.1/8` is an error naming
//!   the network `10.0.0.0/8`, as Kubernetes `NetworkPolicy` `ipBlock` does —
//!   silently widening a typo is worse than refusing it. A bare address needs
//!   an explicit `/32` or `/128`. IPv4 networks become IPv4-mapped IPv6
//!   (`::ffff:a.b.c.d`, prefix 96 + n).
//! - `onlyFrom` with `access: none` is an error (nobody would get access, so
//!   the list would be meaningless); with `read` and `readwrite` it is allowed.
//! - Two `files` rules with the same path are an error.
//! - A spec must contain at least one of `exec`, `network.egress` or a
//!   non-empty `files`; a policy that enforces nothing is almost always a
//!   mis-indented one.
//! - YAML 1.2 scalars: only `true`/`false` are booleans (`yes` is a string),
//!   and `0755` is the string `0755`, never octal.
//!
//! A file may hold several documents separated by `---`; empty documents are
//! skipped. Every error is reported, not only the first: all semantic errors
//! in every document, every unknown field, and the first syntax error of a
//! file (after a syntax error the parser cannot resynchronise, so the rest of
//! that file is not read).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt, fs,
    io::Cursor,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

mod devices;
mod sockets;

use super::{
    API_VERSION, DefaultAction, DeviceRules, EgressRules, ExecRules, FileAccess, FileRule, KIND,
    LabelOperator, LabelRequirement, LabelSelector, Mode, NetRule, PathRule, Policy, Selector,
    SocketRules,
    glob::{validate_cgroup_glob, validate_path_glob, validate_unit_glob},
    labels,
};

/// One problem in a policy file, located at the offending value.
///
/// `line` and `column` are 1-based; both are 0 when the problem has no place
/// in the file (it cannot be read). `field` is the dotted path of the value,
/// e.g. `spec.network.egress.allow[0].cidr`; it is `yaml` for syntax errors
/// and `file` for I/O errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {field}: {message}", file.display())]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub field: String,
    pub message: String,
}

/// Longest `metadata.name` accepted (a Kubernetes DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// Parse every `HostPolicy` document in `text`, which was read from `file`
/// (used for error messages and [`Policy::source`]).
///
/// Names must be unique within `text`. Returns every error found, in file
/// order.
pub fn parse_str(text: &str, file: &Path) -> Result<Vec<Policy>, Vec<PolicyError>> {
    let (policies, mut errors) = parse_located(text, file);
    check_unique_names(&policies, &mut errors);
    finish(policies, errors)
}

/// Load policies from files and directories.
///
/// A directory contributes its `*.yaml` and `*.yml` files, sorted by name and
/// not recursing into subdirectories; names starting with `.` are skipped
/// (editor swap files, and the `..data` entries of a Kubernetes ConfigMap
/// mount). A file given directly is read whatever its extension. A file
/// reached twice (named directly and through its directory) is read once.
/// `metadata.name` must be unique across everything loaded; the error points
/// at the second definition and names the first.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<Policy>, Vec<PolicyError>> {
    load_paths_cached(paths, &mut ParseCache::default())
}

/// Files parsed by an earlier load, by path and SHA-256 of their text: a
/// reload re-parses only the files whose text changed (parsing is most of a
/// reload's time at 100 000 rules, and a change usually touches one file).
/// Only files that parsed without error are kept.
#[derive(Default)]
pub struct ParseCache {
    files: HashMap<PathBuf, CachedFile>,
}

/// A parsed file: the SHA-256 of its text and its policies.
type CachedFile = ([u8; 32], Vec<(Policy, Location)>);

impl ParseCache {
    /// Files held.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// [`load_paths`], reusing `cache` for files whose text is unchanged and
/// leaving in it what this load parsed.
pub fn load_paths_cached(
    paths: &[PathBuf],
    cache: &mut ParseCache,
) -> Result<Vec<Policy>, Vec<PolicyError>> {
    use sha2::{Digest as _, Sha256};
    let mut kept = HashMap::new();
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        match fs::metadata(path) {
            Err(e) => errors.push(io_error(path, format!("cannot read policy path: {e}"))),
            Ok(meta) if meta.is_dir() => match list_dir(path) {
                Ok(found) => files.extend(found),
                Err(e) => errors.push(io_error(path, format!("cannot list policy directory: {e}"))),
            },
            Ok(_) => files.push(path.clone()),
        }
    }

    let mut seen = HashSet::new();
    let mut policies = Vec::new();
    for file in files {
        let key = fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
        if !seen.insert(key) {
            continue;
        }
        match fs::read_to_string(&file) {
            Ok(text) => {
                let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
                let found = match cache.files.remove(&file) {
                    Some((d, found)) if d == digest => found,
                    _ => {
                        let (found, errs) = parse_located(&text, &file);
                        if !errs.is_empty() {
                            errors.extend(errs);
                            policies.extend(found);
                            continue;
                        }
                        found
                    }
                };
                policies.extend(found.iter().cloned());
                kept.insert(file, (digest, found));
            }
            Err(e) => errors.push(io_error(&file, format!("cannot read policy file: {e}"))),
        }
    }
    cache.files = kept;
    check_unique_names(&policies, &mut errors);
    finish(policies, errors)
}

fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        // `fs::metadata` follows symlinks, so ConfigMap-style links to files count.
        if is_yaml && !name.starts_with('.') && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn io_error(path: &Path, message: String) -> PolicyError {
    PolicyError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        field: "file".into(),
        message,
    }
}

fn finish(
    policies: Vec<(Policy, Location)>,
    errors: Vec<PolicyError>,
) -> Result<Vec<Policy>, Vec<PolicyError>> {
    if errors.is_empty() {
        Ok(policies.into_iter().map(|(p, _)| p).collect())
    } else {
        Err(errors)
    }
}

/// Reports each repeated name at its later definition.
fn check_unique_names(policies: &[(Policy, Location)], errors: &mut Vec<PolicyError>) {
    let mut first: HashMap<&str, (&Path, Location)> = HashMap::new();
    for (policy, at) in policies {
        match first.get(policy.name.as_str()) {
            Some((file, prev)) => errors.push(PolicyError {
                file: policy.source.clone(),
                line: line_of(*at),
                column: column_of(*at),
                field: "metadata.name".into(),
                message: format!(
                    "duplicate policy name '{}' (first defined at {}:{})",
                    policy.name,
                    file.display(),
                    prev.line()
                ),
            }),
            None => {
                first.insert(&policy.name, (&policy.source, *at));
            }
        }
    }
}

/// Parse all documents of one file; each policy comes with the location of
/// its name, for the uniqueness check.
fn parse_located(text: &str, file: &Path) -> (Vec<(Policy, Location)>, Vec<PolicyError>) {
    let options = serde_saphyr::options! {
        // YAML 1.2 core schema: `yes`/`on` stay strings, and `0755` is not octal.
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        with_snippet: false,
    };
    // Spans count characters from the start of what the parser sees; drop a
    // BOM here so they index `text` exactly.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut cx = Cx {
        file,
        text,
        errors: Vec::new(),
    };
    let mut policies = Vec::new();
    let mut reader = Cursor::new(text.as_bytes());
    for doc in serde_saphyr::read_with_options::<_, Spanned<Node>>(&mut reader, options) {
        match doc {
            Ok(doc) => {
                let before = cx.errors.len();
                let parsed = cx.policy(&doc);
                if let Some(parsed) = parsed.filter(|_| cx.errors.len() == before) {
                    policies.push(parsed);
                }
            }
            Err(e) => {
                let (line, column) = e.location().map_or((0, 0), |l| (line_of(l), column_of(l)));
                cx.errors.push(PolicyError {
                    file: file.to_path_buf(),
                    line,
                    column,
                    field: "yaml".into(),
                    message: strip_location(&e.without_snippet().to_string()),
                });
            }
        }
    }
    cx.errors.sort_by_key(|e| (e.line, e.column));
    (policies, cx.errors)
}

/// saphyr appends " at line N, column M" to some messages; `PolicyError`
/// already leads with the position.
pub(crate) fn strip_location(msg: &str) -> String {
    if let Some(i) = msg.rfind(" at line ") {
        let tail = &msg[i + " at line ".len()..];
        if let Some((l, c)) = tail.split_once(", column ")
            && l.bytes().all(|b| b.is_ascii_digit())
            && c.bytes().all(|b| b.is_ascii_digit())
        {
            return msg[..i].to_string();
        }
    }
    msg.to_string()
}

fn line_of(at: Location) -> usize {
    usize::try_from(at.line()).unwrap_or(usize::MAX)
}

fn column_of(at: Location) -> usize {
    usize::try_from(at.column()).unwrap_or(usize::MAX)
}

/// A YAML node with its location, kept as written so every error can be
/// collected (serde's derive stops at the first) and point at its line.
#[derive(Debug)]
enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float,
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(v.into()))
    }
    fn visit_i128<E>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u128<E>(self, v: u128) -> Result<Node, E> {
        Ok(i128::try_from(v).map_or(Node::Float, Node::Int))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Float)
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key()? {
            entries.push((key, map.next_value()?));
        }
        Ok(Node::Map(entries))
    }
}

type SNode = Spanned<Node>;

/// The entries of a mapping whose keys were checked against the allowed set.
struct Fields<'n> {
    path: String,
    /// Where "missing field" errors point: the key holding this mapping
    /// (`selector:`) when there is one, else the mapping itself.
    at: Location,
    entries: Vec<(&'n str, Location, &'n SNode)>,
}

impl<'n> Fields<'n> {
    /// The value of `key`, treating `null` as absent.
    fn get(&self, key: &str) -> Option<&'n SNode> {
        self.entry(key).map(|(_, v)| v)
    }

    /// The key's location and the value of `key`, treating `null` as absent.
    fn entry(&self, key: &str) -> Option<(Location, &'n SNode)> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, at, v)| (*at, *v))
            .filter(|(_, v)| !matches!(v.value, Node::Null))
    }

    fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

/// A validated `spec`.
struct Spec {
    mode: Mode,
    selector: Selector,
    exec: Option<ExecRules>,
    egress: Option<EgressRules>,
    sockets: Option<SocketRules>,
    files: Vec<FileRule>,
    devices: Option<DeviceRules>,
}

/// Validation state for one file.
struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl<'a> Cx<'a> {
    fn err(&mut self, at: Location, field: &str, message: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_path_buf(),
            line: line_of(at),
            column: column_of(at),
            field: if field.is_empty() {
                "document".into()
            } else {
                field.into()
            },
            message: message.into(),
        });
    }

    /// The scalar exactly as written (spans count characters, not bytes).
    fn raw(&self, n: &SNode) -> String {
        let span = n.referenced.span();
        let (Ok(start), Ok(len)) = (usize::try_from(span.offset()), usize::try_from(span.len()))
        else {
            return String::new();
        };
        self.text.chars().skip(start).take(len).collect()
    }

    fn describe(&self, n: &SNode) -> String {
        match &n.value {
            Node::Null => "null".into(),
            Node::Bool(b) => format!("boolean {b}"),
            Node::Int(_) => format!("integer {}", self.raw(n)),
            Node::Float => format!("number {}", self.raw(n)),
            Node::Str(s) => format!("string '{s}'"),
            Node::Seq(_) => "a list".into(),
            Node::Map(_) => "a mapping".into(),
        }
    }

    fn expected(&mut self, n: &SNode, field: &str, what: &str) {
        let found = self.describe(n);
        self.err(
            n.referenced,
            field,
            format!("expected {what}, found {found}"),
        );
    }

    /// A mapping; with `allowed`, every other key is reported as unknown.
    fn map<'n>(
        &mut self,
        n: &'n SNode,
        path: &str,
        allowed: Option<&[&str]>,
    ) -> Option<Fields<'n>> {
        let Node::Map(entries) = &n.value else {
            self.expected(n, path, "a mapping");
            return None;
        };
        let mut fields = Fields {
            path: path.to_string(),
            at: n.referenced,
            entries: Vec::new(),
        };
        for (key, value) in entries {
            match allowed {
                Some(allowed) if !allowed.contains(&key.value.as_str()) => {
                    let expected = allowed.join(", ");
                    self.err(
                        key.referenced,
                        &join(path, &key.value),
                        format!("unknown field '{}', expected one of: {expected}", key.value),
                    );
                }
                _ => fields
                    .entries
                    .push((key.value.as_str(), key.referenced, value)),
            }
        }
        Some(fields)
    }

    fn required<'n>(&mut self, f: &Fields<'n>, key: &str) -> Option<&'n SNode> {
        self.required_entry(f, key).map(|(_, v)| v)
    }

    fn required_entry<'n>(&mut self, f: &Fields<'n>, key: &str) -> Option<(Location, &'n SNode)> {
        let v = f.entry(key);
        if v.is_none() {
            self.err(
                f.at,
                &f.path(key),
                format!("missing required field '{key}'"),
            );
        }
        v
    }

    fn seq<'n>(&mut self, n: &'n SNode, path: &str) -> Option<&'n [SNode]> {
        match &n.value {
            Node::Seq(items) => Some(items),
            _ => {
                self.expected(n, path, "a list");
                None
            }
        }
    }

    /// A string; plain numbers are taken as written (`name: 1.0` is "1.0").
    fn string(&mut self, n: &SNode, path: &str) -> Option<String> {
        match &n.value {
            Node::Str(s) => Some(s.clone()),
            Node::Int(_) | Node::Float => Some(self.raw(n)),
            _ => {
                self.expected(n, path, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, n: &SNode, path: &str) -> Option<bool> {
        match &n.value {
            Node::Bool(b) => Some(*b),
            _ => {
                self.expected(n, path, "true or false");
                None
            }
        }
    }

    /// One of a fixed set of words, e.g. `mode: enforce`.
    fn choice<T: Copy>(
        &mut self,
        n: &SNode,
        path: &str,
        what: &str,
        choices: &[(&str, T)],
    ) -> Option<T> {
        let s = self.string(n, path)?;
        if let Some((_, v)) = choices.iter().find(|(name, _)| *name == s) {
            return Some(*v);
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let expected = match names.split_last() {
            Some((last, [])) => (*last).to_string(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.err(
            n.referenced,
            path,
            format!("unknown {what} '{s}', expected {expected}"),
        );
        None
    }

    fn policy(&mut self, doc: &SNode) -> Option<(Policy, Location)> {
        let top = self.map(doc, "", Some(&["apiVersion", "kind", "metadata", "spec"]))?;

        if let Some(n) = self.required(&top, "apiVersion")
            && let Some(v) = self.string(n, "apiVersion")
            && v != API_VERSION
        {
            self.err(
                n.referenced,
                "apiVersion",
                format!("unsupported apiVersion '{v}', expected '{API_VERSION}'"),
            );
        }
        if let Some(n) = self.required(&top, "kind")
            && let Some(v) = self.string(n, "kind")
            && v != KIND
        {
            self.err(
                n.referenced,
                "kind",
                format!("unsupported kind '{v}', expected '{KIND}'"),
            );
        }

        let name = self
            .required_entry(&top, "metadata")
            .and_then(|(at, m)| self.metadata(at, m));
        let spec = self
            .required_entry(&top, "spec")
            .and_then(|(at, s)| self.spec(at, s));
        let ((name, name_at), spec) = (name?, spec?);
        let policy = Policy {
            name,
            source: self.file.to_path_buf(),
            mode: spec.mode,
            selector: spec.selector,
            exec: spec.exec,
            egress: spec.egress,
            sockets: spec.sockets,
            files: spec.files,
            devices: spec.devices,
        };
        Some((policy, name_at))
    }

    fn metadata(&mut self, at: Location, n: &SNode) -> Option<(String, Location)> {
        let mut f = self.map(n, "metadata", Some(&["name", "labels"]))?;
        f.at = at;
        if let Some(labels) = f.get("labels")
            && let Some(labels) = self.map(labels, "metadata.labels", None)
        {
            for (key, _, value) in &labels.entries {
                self.string(value, &labels.path(key));
            }
        }
        let name_node = self.required(&f, "name")?;
        let name = self.string(name_node, "metadata.name")?;
        if let Err(msg) = validate_name(&name) {
            self.err(name_node.referenced, "metadata.name", msg);
            return None;
        }
        Some((name, name_node.referenced))
    }

    fn spec(&mut self, at: Location, n: &SNode) -> Option<Spec> {
        let mut f = self.map(
            n,
            "spec",
            Some(&["mode", "selector", "exec", "network", "files", "devices"]),
        )?;
        f.at = at;
        let before = self.errors.len();

        let mode = match f.get("mode") {
            Some(m) => self.choice(
                m,
                "spec.mode",
                "mode",
                &[("enforce", Mode::Enforce), ("audit", Mode::Audit)],
            ),
            None => Some(Mode::default()),
        };
        let selector = self
            .required_entry(&f, "selector")
            .and_then(|(at, s)| self.selector(at, s));
        let exec = f.entry("exec").and_then(|(at, e)| self.exec(at, e));

        let mut egress = None;
        let mut has_egress = false;
        let mut sockets = Some(None);
        if let Some(net) = f.get("network")
            && let Some(net) = self.map(net, "spec.network", Some(&["egress", "sockets"]))
        {
            if let Some((at, e)) = net.entry("egress") {
                has_egress = true;
                egress = self.egress(at, e);
            }
            has_egress |= net.entry("sockets").is_some();
            sockets = self.sockets(net.entry("sockets"), egress.as_ref().map(|e| e.default));
        }

        let mut files = Vec::new();
        let mut has_files = false;
        if let Some(list) = f.get("files")
            && let Some(items) = self.seq(list, "spec.files")
        {
            has_files = !items.is_empty();
            let mut seen: HashMap<String, usize> = HashMap::new();
            for (i, item) in items.iter().enumerate() {
                let path = format!("spec.files[{i}]");
                if let Some(rule) = self.file_rule(item, &path) {
                    if let Some(first) = seen.get(&rule.path.pattern) {
                        let msg = format!(
                            "duplicate rule for path '{}' (first at line {first})",
                            rule.path.pattern
                        );
                        self.err(item.referenced, &format!("{path}.path"), msg);
                    } else {
                        seen.insert(rule.path.pattern.clone(), rule.path.line);
                    }
                    files.push(rule);
                }
            }
        }

        let devices = f.entry("devices").and_then(|(at, d)| self.devices(at, d));

        // Only when nothing else is wrong: a misspelt `egres:` already says why.
        if self.errors.len() == before
            && f.get("exec").is_none()
            && !has_egress
            && !has_files
            && f.get("devices").is_none()
        {
            self.err(
                f.at,
                "spec",
                "policy has no rules: give at least one of exec, network.egress, network.sockets, files or devices",
            );
        }
        if self.errors.len() != before {
            return None;
        }
        Some(Spec {
            mode: mode?,
            selector: selector?,
            exec,
            egress,
            sockets: sockets?,
            files,
            devices,
        })
    }

    fn selector(&mut self, at: Location, n: &SNode) -> Option<Selector> {
        let before = self.errors.len();
        let mut f = self.map(
            n,
            "spec.selector",
            Some(&[
                "cgroupPath",
                "systemdUnit",
                "namespace",
                "podLabels",
                "serviceAccount",
                "container",
                "uid",
            ]),
        )?;
        f.at = at;
        let mut ok = true;
        let mut glob = |cx: &mut Self, key: &str, check: fn(&str) -> Result<(), String>| {
            let node = f.get(key)?;
            let path = f.path(key);
            let Some(s) = cx.string(node, &path) else {
                ok = false;
                return None;
            };
            if let Err(msg) = check(&s) {
                cx.err(node.referenced, &path, msg);
                ok = false;
                return None;
            }
            Some(s)
        };
        let cgroup_path = glob(self, "cgroupPath", validate_cgroup_glob);
        let systemd_unit = glob(self, "systemdUnit", validate_unit_glob);
        // Namespace, service account and container names never contain '/',
        // so the unit-name glob rules fit them exactly.
        let namespace = glob(self, "namespace", validate_unit_glob);
        let service_account = glob(self, "serviceAccount", validate_unit_glob);
        let container = glob(self, "container", validate_unit_glob);
        let pod_labels = match f.get("podLabels") {
            Some(n) => {
                let sel = self.label_selector(n, &f.path("podLabels"));
                ok &= sel.is_some();
                sel
            }
            None => None,
        };
        let uid = match f.get("uid") {
            Some(n) => {
                let range = match &n.value {
                    Node::Int(v) => u32::try_from(*v)
                        .map(|u| (u, u))
                        .map_err(|_| format!("uid {v} is out of range 0-4294967295")),
                    Node::Str(s) => parse_uid_range(s),
                    _ => Err(format!(
                        "expected a uid or a range like \"1000-1999\", found {}",
                        self.describe(n)
                    )),
                };
                match range {
                    Ok(r) => Some(r),
                    Err(msg) => {
                        self.err(n.referenced, &f.path("uid"), msg);
                        ok = false;
                        None
                    }
                }
            }
            None => None,
        };
        let any = [
            "cgroupPath",
            "systemdUnit",
            "namespace",
            "podLabels",
            "serviceAccount",
            "container",
            "uid",
        ]
        .iter()
        .any(|k| f.get(k).is_some());
        if !any {
            // An unknown field (`pod: x`) already explains why it is empty.
            if self.errors.len() != before {
                return None;
            }
            self.err(
                f.at,
                "spec.selector",
                "selector is empty: give at least one of cgroupPath, systemdUnit, namespace, podLabels, serviceAccount, container or uid (cgroupPath: \"/**\" selects every workload)",
            );
            return None;
        }
        ok.then_some(Selector {
            cgroup_path,
            systemd_unit,
            namespace,
            pod_labels,
            service_account,
            container,
            uid,
        })
    }

    /// `podLabels`: a Kubernetes `LabelSelector` (`matchLabels` and/or
    /// `matchExpressions`), or a plain label map as shorthand for
    /// `matchLabels`. A mapping with either of the two selector keys is the
    /// full form, so a misspelt `matchExpresions` next to `matchLabels` is an
    /// unknown field rather than a label named `matchExpresions`.
    fn label_selector(&mut self, n: &SNode, path: &str) -> Option<LabelSelector> {
        let Node::Map(entries) = &n.value else {
            self.expected(
                n,
                path,
                "a mapping of labels or matchLabels/matchExpressions",
            );
            return None;
        };
        let full = entries
            .iter()
            .any(|(k, _)| k.value == "matchLabels" || k.value == "matchExpressions");
        if !full {
            let match_labels = self.label_map(n, path)?;
            return Some(LabelSelector {
                match_labels,
                match_expressions: Vec::new(),
            });
        }
        let before = self.errors.len();
        let f = self.map(n, path, Some(&["matchLabels", "matchExpressions"]))?;
        let match_labels = match f.get("matchLabels") {
            Some(m) => self.label_map(m, &f.path("matchLabels")),
            None => Some(BTreeMap::new()),
        };
        let mut match_expressions = Vec::new();
        if let Some(e) = f.get("matchExpressions")
            && let Some(items) = self.seq(e, &f.path("matchExpressions"))
        {
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{}[{i}]", f.path("matchExpressions"));
                if let Some(r) = self.label_requirement(item, &ipath) {
                    match_expressions.push(r);
                }
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(LabelSelector {
            match_labels: match_labels?,
            match_expressions,
        })
    }

    fn label_map(&mut self, n: &SNode, path: &str) -> Option<BTreeMap<String, String>> {
        let before = self.errors.len();
        let f = self.map(n, path, None)?;
        let mut out = BTreeMap::new();
        for (key, at, value) in &f.entries {
            let kpath = join(path, key);
            if let Err(msg) = labels::validate_key(key) {
                self.err(*at, &kpath, msg);
                continue;
            }
            // `null` would be a label that exists with no value; Kubernetes
            // spells that `""`, and a bare `app:` is more likely a mistake.
            if matches!(value.value, Node::Null) {
                self.err(
                    value.referenced,
                    &kpath,
                    "expected a label value (write \"\" for an empty one), found null",
                );
                continue;
            }
            let Some(v) = self.string(value, &kpath) else {
                continue;
            };
            match labels::validate_value(&v) {
                Ok(()) => {
                    out.insert((*key).to_string(), v);
                }
                Err(msg) => self.err(value.referenced, &kpath, msg),
            }
        }
        (self.errors.len() == before).then_some(out)
    }

    fn label_requirement(&mut self, n: &SNode, path: &str) -> Option<LabelRequirement> {
        let before = self.errors.len();
        let f = self.map(n, path, Some(&["key", "operator", "values"]))?;
        let key = self.required(&f, "key").and_then(|k| {
            let s = self.string(k, &f.path("key"))?;
            labels::validate_key(&s)
                .map_err(|msg| self.err(k.referenced, &f.path("key"), msg))
                .ok()
                .map(|()| s)
        });
        let op_node = self.required(&f, "operator");
        let operator = op_node.and_then(|o| {
            self.choice(
                o,
                &f.path("operator"),
                "operator",
                &[
                    ("In", LabelOperator::In),
                    ("NotIn", LabelOperator::NotIn),
                    ("Exists", LabelOperator::Exists),
                    ("DoesNotExist", LabelOperator::DoesNotExist),
                ],
            )
        });
        let mut values = Vec::new();
        let values_node = f.get("values");
        if let Some(v) = values_node
            && let Some(items) = self.seq(v, &f.path("values"))
        {
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{}[{i}]", f.path("values"));
                if let Some(s) = self.string(item, &ipath) {
                    match labels::validate_value(&s) {
                        Ok(()) => values.push(s),
                        Err(msg) => self.err(item.referenced, &ipath, msg),
                    }
                }
            }
        }
        // As the API server: In/NotIn need values, Exists/DoesNotExist take none.
        match operator {
            Some(LabelOperator::In | LabelOperator::NotIn)
                if values_node.is_none() || values.is_empty() =>
            {
                let at = values_node.map_or(f.at, |v| v.referenced);
                self.err(
                    at,
                    &f.path("values"),
                    "values must be non-empty when operator is In or NotIn",
                );
            }
            Some(LabelOperator::Exists | LabelOperator::DoesNotExist)
                if values_node
                    .is_some_and(|v| !matches!(&v.value, Node::Seq(s) if s.is_empty())) =>
            {
                let at = values_node.map_or(f.at, |v| v.referenced);
                self.err(
                    at,
                    &f.path("values"),
                    "values must be empty when operator is Exists or DoesNotExist",
                );
            }
            _ => {}
        }
        if self.errors.len() != before {
            return None;
        }
        Some(LabelRequirement {
            key: key?,
            operator: operator?,
            values,
        })
    }

    fn default_action(&mut self, f: &Fields<'_>) -> Option<DefaultAction> {
        match f.get("default") {
            Some(d) => self.choice(
                d,
                &f.path("default"),
                "default action",
                &[
                    ("deny", DefaultAction::Deny),
                    ("allow", DefaultAction::Allow),
                ],
            ),
            None => Some(DefaultAction::default()),
        }
    }

    fn exec(&mut self, at: Location, n: &SNode) -> Option<ExecRules> {
        let mut f = self.map(n, "spec.exec", Some(&["default", "allow", "deny"]))?;
        f.at = at;
        let default = self.default_action(&f);
        let allow = self.approval_list(f.get("allow"), &f.path("allow"));
        let deny = self.path_list(f.get("deny"), &f.path("deny"));
        Some(ExecRules {
            default: default?,
            allow: allow?,
            deny: deny?,
        })
    }

    /// A list of path globs; absent is empty. `None` if any item is invalid.
    fn path_list(&mut self, n: Option<&SNode>, path: &str) -> Option<Vec<PathRule>> {
        let Some(n) = n else { return Some(Vec::new()) };
        let items = self.seq(n, path)?;
        let mut rules = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.path_rule(item, &format!("{path}[{i}]")) {
                Some(rule) => rules.push(rule),
                None => ok = false,
            }
        }
        ok.then_some(rules)
    }

    fn path_rule(&mut self, n: &SNode, path: &str) -> Option<PathRule> {
        let pattern = self.string(n, path)?;
        if let Err(msg) = validate_path_glob(&pattern) {
            self.err(n.referenced, path, msg);
            return None;
        }
        Some(PathRule {
            pattern,
            line: line_of(n.referenced),
            until: None,
        })
    }

    /// Exec `allow` entries: a path glob, or `{ path, until }` for a
    /// time-bound approval.
    fn approval_list(&mut self, n: Option<&SNode>, path: &str) -> Option<Vec<PathRule>> {
        let Some(n) = n else { return Some(Vec::new()) };
        let items = self.seq(n, path)?;
        let mut rules = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let ipath = format!("{path}[{i}]");
            let rule = if matches!(item.value, Node::Str(_)) {
                self.path_rule(item, &ipath)
            } else {
                self.map(item, &ipath, Some(&["path", "until"]))
                    .and_then(|f| {
                        let until = self.until(&f);
                        let mut rule = self
                            .required(&f, "path")
                            .and_then(|p| self.path_rule(p, &f.path("path")));
                        if let Some(r) = rule.as_mut() {
                            r.until = until?;
                        }
                        rule
                    })
            };
            match rule {
                Some(rule) => rules.push(rule),
                None => ok = false,
            }
        }
        ok.then_some(rules)
    }

    /// The optional `until` of an approval (`Some(None)` when absent).
    fn until(&mut self, f: &Fields<'_>) -> Option<Option<i64>> {
        let Some(u) = f.get("until") else {
            return Some(None);
        };
        let s = self.string(u, &f.path("until"))?;
        match super::parse_rfc3339(&s) {
            Ok(t) => Some(Some(t)),
            Err(msg) => {
                self.err(u.referenced, &f.path("until"), msg);
                None
            }
        }
    }

    /// `log` and `until` of a rule: valid on allow rules only.
    fn allow_only(
        &mut self,
        f: &Fields<'_>,
        is_allow: bool,
    ) -> (Option<bool>, Option<Option<i64>>) {
        let log = match f.get("log") {
            Some(l) if !is_allow => {
                self.err(
                    l.referenced,
                    &f.path("log"),
                    "log is only valid on allow rules (denies are always logged)",
                );
                None
            }
            Some(l) => self.boolean(l, &f.path("log")),
            None => Some(false),
        };
        let until = match f.get("until") {
            Some(u) if !is_allow => {
                self.err(
                    u.referenced,
                    &f.path("until"),
                    "until is only valid on allow rules (a time-bound approval); a deny never lapses",
                );
                None
            }
            _ => self.until(f),
        };
        (log, until)
    }

    fn egress(&mut self, at: Location, n: &SNode) -> Option<EgressRules> {
        let mut f = self.map(
            n,
            "spec.network.egress",
            Some(&["default", "allow", "deny"]),
        )?;
        f.at = at;
        let default = self.default_action(&f);
        let allow = self.net_list(f.get("allow"), &f.path("allow"), true);
        let deny = self.net_list(f.get("deny"), &f.path("deny"), false);
        Some(EgressRules {
            default: default?,
            allow: allow?,
            deny: deny?,
        })
    }

    fn net_list(&mut self, n: Option<&SNode>, path: &str, is_allow: bool) -> Option<Vec<NetRule>> {
        let Some(n) = n else { return Some(Vec::new()) };
        let items = self.seq(n, path)?;
        let mut rules = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.net_rule(item, &format!("{path}[{i}]"), is_allow) {
                Some(rule) => rules.push(rule),
                None => ok = false,
            }
        }
        ok.then_some(rules)
    }

    fn net_rule(&mut self, n: &SNode, path: &str, is_allow: bool) -> Option<NetRule> {
        let f = self.map(
            n,
            path,
            Some(&["cidr", "ports", "protocol", "log", "until"]),
        )?;
        let before = self.errors.len();

        let cidr = self.required(&f, "cidr").and_then(|c| {
            let s = self.string(c, &f.path("cidr"))?;
            parse_cidr(&s)
                .map_err(|msg| self.err(c.referenced, &f.path("cidr"), msg))
                .ok()
        });

        let mut ports = Vec::new();
        if let Some(p) = f.get("ports")
            && let Some(items) = self.seq(p, &f.path("ports"))
        {
            if items.is_empty() {
                self.err(
                    p.referenced,
                    &f.path("ports"),
                    "ports must not be empty (omit it to match any port)",
                );
            }
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{}[{i}]", f.path("ports"));
                let range = match &item.value {
                    Node::Int(v) => check_port(*v).map(|p| (p, p)),
                    Node::Str(s) => parse_port_range(s),
                    _ => Err(format!(
                        "expected a port number or a range like \"8000-8002\", found {}",
                        self.describe(item)
                    )),
                };
                match range {
                    Ok(r) => ports.push(r),
                    Err(msg) => self.err(item.referenced, &ipath, msg),
                }
            }
        }

        let protocol = match f.get("protocol") {
            Some(p) => self.choice(
                p,
                &f.path("protocol"),
                "protocol",
                &[("tcp", Some(6u8)), ("udp", Some(17u8)), ("any", None)],
            ),
            None => Some(None),
        };

        let (log, until) = self.allow_only(&f, is_allow);

        if self.errors.len() != before {
            return None;
        }
        let (addr, prefix_len, display) = cidr?;
        let protocol = protocol?;
        let text = net_rule_text(&display, &ports, protocol);
        Some(NetRule {
            addr,
            prefix_len,
            ports,
            protocol,
            log: log?,
            text,
            line: line_of(n.referenced),
            until: until?,
        })
    }

    fn file_rule(&mut self, n: &SNode, path: &str) -> Option<FileRule> {
        let f = self.map(n, path, Some(&["path", "access", "onlyFrom"]))?;
        let before = self.errors.len();
        let rule_path = self
            .required(&f, "path")
            .and_then(|p| self.path_rule(p, &f.path("path")));
        let access_node = self.required(&f, "access");
        let access = access_node.and_then(|a| {
            self.choice(
                a,
                &f.path("access"),
                "access",
                &[
                    ("none", FileAccess::None),
                    ("read", FileAccess::Read),
                    ("readwrite", FileAccess::ReadWrite),
                ],
            )
        });
        let only_from = self.path_list(f.get("onlyFrom"), &f.path("onlyFrom"));
        if let Some(of) = f.get("onlyFrom") {
            if matches!(&of.value, Node::Seq(items) if items.is_empty()) {
                self.err(
                    of.referenced,
                    &f.path("onlyFrom"),
                    "onlyFrom must not be empty (omit it to give every process the access)",
                );
            } else if access == Some(FileAccess::None) {
                self.err(
                    of.referenced,
                    &f.path("onlyFrom"),
                    "onlyFrom has no effect with access none (no process may open the path); use access read or readwrite",
                );
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(FileRule {
            path: rule_path?,
            access: access?,
            only_from: only_from?,
        })
    }
}

/// `metadata.name`: a lowercase DNS subdomain, as Kubernetes object names.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name is {} characters long, longer than the limit of {MAX_NAME_LEN}",
            name.len()
        ));
    }
    let edge_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let inner_ok = |c: char| edge_ok(c) || c == '-' || c == '.';
    let first = name.chars().next().is_some_and(edge_ok);
    let last = name.chars().last().is_some_and(edge_ok);
    if !(first && last && name.chars().all(inner_ok)) {
        return Err(format!(
            "name '{name}' is invalid: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn check_port(v: i128) -> Result<u16, String> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {v} is out of range 1-65535"))
}

fn parse_port(s: &str, whole: &str) -> Result<u16, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "port '{whole}' is not a number or a range (write e.g. 443 or \"8000-8002\")"
        ));
    }
    // Digits only, so the only parse failure left is overflow.
    check_port(s.parse::<i128>().unwrap_or(i128::MAX)).map_err(|_| {
        if s == whole {
            format!("port {s} is out of range 1-65535")
        } else {
            format!("port range '{whole}': port {s} is out of range 1-65535")
        }
    })
}

/// `"443"` or `"8000-8002"` (inclusive).
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let t = s.trim();
    match t.split_once('-') {
        None => parse_port(t, s).map(|p| (p, p)),
        Some((lo, hi)) => {
            let (lo, hi) = (parse_port(lo.trim(), s)?, parse_port(hi.trim(), s)?);
            if lo > hi {
                return Err(format!(
                    "port range '{s}': start {lo} is greater than end {hi}"
                ));
            }
            Ok((lo, hi))
        }
    }
}

/// Parse `addr/len` into the mapped 128-bit form, plus the canonical text.
fn parse_cidr(s: &str) -> Result<(Ipv6Addr, u8, String), String> {
    let Some((addr, len)) = s.trim().split_once('/') else {
        let hint = match s.trim().parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => format!(" (write '{}/32' for a single address)", s.trim()),
            Ok(IpAddr::V6(_)) => format!(" (write '{}/128' for a single address)", s.trim()),
            Err(_) => String::new(),
        };
        return Err(format!("cidr '{s}' has no prefix length{hint}"));
    };
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("cidr '{s}': '{addr}' is not a valid IPv4 or IPv6 address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("cidr '{s}': prefix length '{len}' is not a number"));
    }
    let len: u32 = len.parse().unwrap_or(u32::MAX);
    if len > max {
        return Err(format!("cidr '{s}': prefix length {len} exceeds {max}"));
    }
    let (mapped, prefix) = match ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped(), 96 + len),
        IpAddr::V6(v6) => (v6, len),
    };
    let bits = u128::from(mapped);
    let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
    if bits & !mask != 0 {
        let net = Ipv6Addr::from(bits & mask);
        let net_text = match ip {
            IpAddr::V4(_) => net
                .to_ipv4_mapped()
                .map_or(net.to_string(), |v4| v4.to_string()),
            IpAddr::V6(_) => net.to_string(),
        };
        return Err(format!(
            "cidr '{s}' has host bits set (the network is {net_text}/{len})"
        ));
    }
    let prefix = u8::try_from(prefix)
        .map_err(|_| format!("cidr '{s}': prefix length {len} exceeds {max}"))?;
    Ok((mapped, prefix, format!("{ip}/{len}")))
}

/// `10.0.0.0/8 443,8000-8002/tcp`, `169.254.169.254/32`, `::/0 53`, `10.0.0.0/8 udp`.
fn net_rule_text(cidr: &str, ports: &[(u16, u16)], protocol: Option<u8>) -> String {
    let mut text = cidr.to_string();
    if !ports.is_empty() {
        let list: Vec<String> = ports
            .iter()
            .map(|&(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect();
        text.push(' ');
        text.push_str(&list.join(","));
    }
    let proto = match protocol {
        Some(6) => Some("tcp"),
        Some(17) => Some("udp"),
        _ => None,
    };
    if let Some(proto) = proto {
        text.push(if ports.is_empty() { ' ' } else { '/' });
        text.push_str(proto);
    }
    text
}

/// `"1000"` or `"1000-1999"` (inclusive).
fn parse_uid_range(s: &str) -> Result<(u32, u32), String> {
    let num = |t: &str| {
        t.trim().parse::<u32>().map_err(|_| {
            format!("uid '{s}' is not a number or a range (write e.g. 1000 or \"1000-1999\")")
        })
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(s)?, num(s)?),
    };
    if lo > hi {
        return Err(format!(
            "uid range '{s}': start {lo} is greater than end {hi}"
        ));
    }
    Ok((lo, hi))
}
