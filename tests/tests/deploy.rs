//! deploy/: the DaemonSet manifest, the Helm chart and the Containerfile.
//!
//! No cluster runs here, so what `kubectl apply --dry-run` and `helm
//! template` would check is checked this way:
//!
//! - Schema: every object goes through `kubernetes-validate --strict`
//!   (PyPI; it bundles the Kubernetes OpenAPI schemas, installed by `cargo
//!   xtask setup`): kinds, apiVersions, field names and types, required
//!   fields. The ServiceMonitor (a CRD the validator does not know) is
//!   checked field by field here.
//! - Helm: Helm itself is not installable here (not in Debian, no PyPI or
//!   npm package). The chart's templates use a small subset of Go template
//!   syntax (`.Values`/`.Release`/`.Chart` fields, `if`, `range $k, $v`,
//!   `quote`, `toYaml`, `nindent`); [`render`] implements exactly that
//!   subset and fails on anything else, so a template using more is caught
//!   rather than silently mis-rendered. The rendered chart must validate and
//!   match deploy/daemonset.yaml in everything that matters (privileges,
//!   mounts, probes, args).
//! - Privileges: the real agent runs with exactly the capabilities the
//!   DaemonSet grants (via `setpriv`), and must load, attach and enforce.
//! - Policy delivery: a directory laid out as the kubelet lays out a
//!   ConfigMap volume (`..data` symlink swapped atomically) is hot-reloaded.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portcullis_tests::{Cgroup, EPERM, Listener, Outcome, TempDir, probe, require_kernel};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Skips the calling test where the repository's deploy/ is not around
/// (the VM matrix runs the test executables without the source tree).
macro_rules! require_deploy_dir {
    () => {
        if !repo().join("deploy/daemonset.yaml").exists() {
            portcullis_tests::skip(
                "deploy/ is not present (test executable run outside the repository)",
            );
            return;
        }
    };
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap_or_else(|e| panic!("YAML: {e}\n{text}"))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {docs:#?}"))
}

fn validator() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let cached = home.join(".cache/portcullis/k8s-validate/bin/kubernetes-validate");
    if cached.exists() {
        return Some(cached);
    }
    Command::new("which")
        .arg("kubernetes-validate")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

/// Runs `kubernetes-validate --strict` on `text`; `Err` with its output on
/// failure.
fn validate(bin: &Path, text: &str, name: &str) -> Result<String, String> {
    let dir = TempDir::new("validate");
    let file = dir.path(name);
    std::fs::write(&file, text).unwrap();
    let out = Command::new(bin)
        .arg("--strict")
        .arg(&file)
        .output()
        .expect("running kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

// ---- a Go-template subset, exactly what the chart uses ---------------------

#[derive(Debug)]
enum Node {
    Text(String),
    Action(String),
    If(String, Vec<Node>),
    Range {
        key: String,
        value: String,
        expr: String,
        body: Vec<Node>,
    },
}

/// Splits a template into text and `{{ }}` actions, applying `{{-`/`-}}`
/// whitespace trimming as Go does.
fn lex(src: &str) -> Vec<(bool, String)> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = rest[..open].to_string();
        if trim_next {
            text = text.trim_start().to_string();
        }
        let after = &rest[open + 2..];
        let close = after.find("}}").expect("unclosed {{");
        let mut inner = &after[..close];
        if let Some(s) = inner.strip_prefix('-') {
            text = text.trim_end().to_string();
            inner = s;
        }
        trim_next = false;
        if let Some(s) = inner.strip_suffix('-') {
            trim_next = true;
            inner = s;
        }
        out.push((false, text));
        out.push((true, inner.trim().to_string()));
        rest = &after[close + 2..];
    }
    let mut text = rest.to_string();
    if trim_next {
        text = text.trim_start().to_string();
    }
    out.push((false, text));
    out
}

fn parse(tokens: &mut std::vec::IntoIter<(bool, String)>) -> Vec<Node> {
    let mut nodes = Vec::new();
    while let Some((is_action, s)) = tokens.next() {
        if !is_action {
            nodes.push(Node::Text(s));
        } else if s == "end" {
            return nodes;
        } else if let Some(cond) = s.strip_prefix("if ") {
            nodes.push(Node::If(cond.trim().into(), parse(tokens)));
        } else if let Some(spec) = s.strip_prefix("range ") {
            let (vars, expr) = spec.split_once(":=").expect("range needs `$k, $v := expr`");
            let (key, value) = vars.split_once(',').expect("range needs two variables");
            nodes.push(Node::Range {
                key: key.trim().into(),
                value: value.trim().into(),
                expr: expr.trim().into(),
                body: parse(tokens),
            });
        } else {
            assert!(
                !["else", "with", "define", "template", "include", "block"]
                    .iter()
                    .any(|k| s.starts_with(k)),
                "template uses `{s}`, which this checker does not implement"
            );
            nodes.push(Node::Action(s));
        }
    }
    nodes
}

fn lookup(ctx: &Value, vars: &BTreeMap<String, Value>, term: &str) -> Value {
    if let Some(lit) = term.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        return Value::String(lit.into());
    }
    if let Ok(n) = term.parse::<i64>() {
        return json!(n);
    }
    if term.starts_with('$') {
        return vars
            .get(term)
            .cloned()
            .unwrap_or_else(|| panic!("unknown variable {term}"));
    }
    let path = term
        .strip_prefix('.')
        .unwrap_or_else(|| panic!("unsupported term `{term}`"));
    let mut v = ctx;
    for part in path.split('.') {
        v = v
            .get(part)
            .unwrap_or_else(|| panic!("template reads `{term}`, which is not set"));
    }
    v.clone()
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::String(s)
            if !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
                && s.parse::<f64>().is_err()
                && !["true", "false", "null", "yes", "no", "on", "off", "~"]
                    .contains(&s.to_lowercase().as_str()) =>
        {
            s.clone()
        }
        Value::String(s) => serde_json::to_string(s).unwrap(),
        other => other.to_string(),
    }
}

/// Block-style YAML, as Helm's `toYaml` (no trailing newline).
fn to_yaml(v: &Value, indent: usize) -> String {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if m.is_empty() => format!("{pad}{{}}"),
        Value::Array(a) if a.is_empty() => format!("{pad}[]"),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::Object(i) if !i.is_empty() => {
                    format!("{pad}{k}:\n{}", to_yaml(v, indent + 2))
                }
                Value::Array(i) if !i.is_empty() => format!("{pad}{k}:\n{}", to_yaml(v, indent)),
                _ => format!("{pad}{k}: {}", to_yaml(v, 0)),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Array(a) => a
            .iter()
            .map(|item| {
                let body = to_yaml(item, indent + 2);
                format!("{pad}- {}", body.trim_start())
            })
            .collect::<Vec<_>>()
            .join("\n"),
        other => format!("{pad}{}", yaml_scalar(other)),
    }
}

fn indent(n: usize, s: &str) -> String {
    let pad = " ".repeat(n);
    format!("{pad}{}", s.replace('\n', &format!("\n{pad}")))
}

fn eval(ctx: &Value, vars: &BTreeMap<String, Value>, expr: &str) -> Value {
    let mut value: Option<Value> = None;
    for command in expr.split('|').map(str::trim) {
        let mut words: Vec<&str> = command.split_whitespace().collect();
        let f = words.remove(0);
        let mut args: Vec<Value> = words.iter().map(|w| lookup(ctx, vars, w)).collect();
        if let Some(v) = value.take() {
            args.push(v);
        }
        value = Some(match f {
            "quote" => Value::String(format!("\"{}\"", scalar(&args[0]))),
            "toYaml" => Value::String(to_yaml(&args[0], 0)),
            "nindent" => Value::String(format!(
                "\n{}",
                indent(args[0].as_u64().unwrap() as usize, &scalar(&args[1]))
            )),
            "indent" => Value::String(indent(
                args[0].as_u64().unwrap() as usize,
                &scalar(&args[1]),
            )),
            term if args.is_empty() => lookup(ctx, vars, term),
            other => panic!("template calls `{other}`, which this checker does not implement"),
        });
    }
    value.unwrap_or(Value::Null)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
    }
}

fn exec(nodes: &[Node], ctx: &Value, vars: &mut BTreeMap<String, Value>, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Action(e) => out.push_str(&scalar(&eval(ctx, vars, e))),
            Node::If(cond, body) => {
                if truthy(&eval(ctx, vars, cond)) {
                    exec(body, ctx, vars, out);
                }
            }
            Node::Range {
                key,
                value,
                expr,
                body,
            } => {
                // Go ranges over a map in key order; serde_json's map is sorted.
                let Value::Object(m) = eval(ctx, vars, expr) else {
                    panic!("range over a non-map")
                };
                for (k, v) in m {
                    vars.insert(key.clone(), Value::String(k));
                    vars.insert(value.clone(), v);
                    exec(body, ctx, vars, out);
                }
            }
        }
    }
}

/// Renders every template of the chart with `values` merged over
/// values.yaml, as `helm template <release> -n <namespace>` would.
fn render(release: &str, namespace: &str, overrides: Value) -> String {
    let chart_dir = repo().join("deploy/helm/portcullis");
    let chart: Value = serde_saphyr::from_str(&read("deploy/helm/portcullis/Chart.yaml")).unwrap();
    let mut values: Value =
        serde_saphyr::from_str(&read("deploy/helm/portcullis/values.yaml")).unwrap();
    merge(&mut values, overrides);
    let ctx = json!({
        "Values": values,
        "Release": {"Name": release, "Namespace": namespace},
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
    });
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = String::new();
    for file in files {
        let src = std::fs::read_to_string(&file).unwrap();
        let mut tokens = lex(&src).into_iter();
        let tree = parse(&mut tokens);
        let mut text = String::new();
        exec(&tree, &ctx, &mut BTreeMap::new(), &mut text);
        if !text.trim().is_empty() {
            out.push_str(&format!(
                "---\n# Source: {}\n{text}\n",
                file.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    out
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

#[test]
fn template_subset_renders_like_helm() {
    let ctx = json!({"Values": {"a": {"b": "x y"}, "on": true, "off": false, "list": [{"operator": "Exists"}], "m": {"k2": "2", "k1": "one\ntwo\n"}}});
    let mut out = String::new();
    let src = "v: {{ .Values.a.b | quote }}\n{{- if .Values.on }}\non: yes\n{{- end }}\n{{- if .Values.off }}\noff: yes\n{{- end }}\nt:\n{{- toYaml .Values.list | nindent 2 }}\ndata:\n{{- range $k, $v := .Values.m }}\n  {{ $k }}: |\n{{- $v | nindent 4 }}\n{{- end }}\n";
    exec(
        &parse(&mut lex(src).into_iter()),
        &ctx,
        &mut BTreeMap::new(),
        &mut out,
    );
    // As in Helm, `{{- end }}` trims text, not the action's output: the
    // body's trailing newline leaves a blank indented line in the block.
    assert_eq!(
        out,
        "v: \"x y\"\non: yes\nt:\n  - operator: Exists\ndata:\n  k1: |\n    one\n    two\n    \n  k2: |\n    2\n"
    );
}

#[test]
fn daemonset_and_chart_pass_the_kubernetes_schema_and_agree() {
    require_deploy_dir!();
    let Some(bin) = validator() else {
        portcullis_tests::skip(
            "deploy schema: kubernetes-validate is not installed (cargo xtask setup installs it)",
        );
        return;
    };
    // The validator must catch what it is here for.
    let bad = read("deploy/daemonset.yaml").replace("hostPID: true", "hostPid: true");
    let err =
        validate(&bin, &bad, "bad.yaml").expect_err("a misspelt field must fail strict validation");
    assert!(err.contains("hostPid"), "{err}");

    let plain = read("deploy/daemonset.yaml");
    validate(&bin, &plain, "daemonset.yaml")
        .unwrap_or_else(|e| panic!("deploy/daemonset.yaml:\n{e}"));
    let rendered = render("portcullis", "portcullis", json!({}));
    validate(&bin, &rendered, "chart.yaml")
        .unwrap_or_else(|e| panic!("rendered chart:\n{e}\n{rendered}"));

    let plain_docs = yaml_docs(&plain);
    let chart_docs = yaml_docs(&rendered);
    let mut kinds: Vec<&str> = chart_docs
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["ConfigMap", "DaemonSet", "ServiceAccount"],
        "default chart objects"
    );

    let ds = kind(&plain_docs, "DaemonSet");
    let cds = kind(&chart_docs, "DaemonSet");
    for pointer in [
        "/spec/template/spec/hostPID",
        "/spec/template/spec/hostNetwork",
        "/spec/template/spec/tolerations",
        "/spec/template/spec/priorityClassName",
        "/spec/template/spec/automountServiceAccountToken",
        "/spec/template/spec/containers/0/args",
        "/spec/template/spec/containers/0/securityContext",
        "/spec/template/spec/containers/0/livenessProbe",
        "/spec/template/spec/containers/0/readinessProbe",
        "/spec/template/spec/containers/0/resources",
        "/spec/template/spec/containers/0/volumeMounts",
        "/spec/template/spec/containers/0/ports",
        "/spec/template/metadata/annotations",
        "/spec/template/spec/volumes",
    ] {
        let mut a = ds.pointer(pointer).cloned().unwrap_or(Value::Null);
        let mut b = cds.pointer(pointer).cloned().unwrap_or(Value::Null);
        // Only the ConfigMap's name follows the release.
        if pointer.ends_with("volumes") {
            a = Value::String(
                a.to_string()
                    .replace("portcullis-policies", "RELEASE-policies"),
            );
            b = Value::String(
                b.to_string()
                    .replace("portcullis-policies", "RELEASE-policies"),
            );
        }
        assert_eq!(
            a, b,
            "{pointer} differs between deploy/daemonset.yaml and the chart"
        );
    }
    assert_eq!(
        kind(&plain_docs, "ConfigMap")["data"],
        kind(&chart_docs, "ConfigMap")["data"],
        "bundled policies differ"
    );

    // What the issue asks of the DaemonSet, spelled out.
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        json!(["BPF", "PERFMON", "NET_ADMIN"])
    );
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["requests"]["memory"].is_string()
    );
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(
        pod["tolerations"],
        json!([{"operator": "Exists"}]),
        "lands on tainted (GPU) nodes"
    );
    let host_paths: Vec<&str> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for needed in [
        "/sys/fs/bpf",
        "/sys/kernel/btf",
        "/sys/fs/cgroup",
        "/run/containerd/containerd.sock",
    ] {
        assert!(
            host_paths.contains(&needed),
            "{needed} not mounted: {host_paths:?}"
        );
    }
    // The bundled policies are valid HostPolicy documents.
    let dir = TempDir::new("cm-policies");
    for (name, body) in kind(&plain_docs, "ConfigMap")["data"].as_object().unwrap() {
        std::fs::write(dir.path(name), body.as_str().unwrap()).unwrap();
    }
    portcullis::policy::load_paths(std::slice::from_ref(&dir.0))
        .unwrap_or_else(|e| panic!("ConfigMap policies: {e:#?}"));

    // The ServiceMonitor variant: built-in objects validated, the CRD
    // object checked by hand.
    let with_sm = render(
        "edge",
        "security",
        json!({"serviceMonitor": {"enabled": true}}),
    );
    let docs = yaml_docs(&with_sm);
    let builtin: Vec<String> = with_sm
        .split("\n---\n")
        .filter(|d| !d.contains("kind: ServiceMonitor"))
        .map(str::to_string)
        .collect();
    validate(&bin, &builtin.join("\n---\n"), "chart-sm.yaml").unwrap_or_else(|e| panic!("{e}"));
    let sm = kind(&docs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["namespace"], "security");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    let svc = kind(&docs, "Service");
    assert_eq!(
        svc["spec"]["selector"],
        sm["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        svc["spec"]["selector"],
        kind(&docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    );
}

#[test]
fn containerfile_builds_the_binary_the_daemonset_runs() {
    require_deploy_dir!();
    let cf = read("deploy/Containerfile");
    let froms: Vec<&str> = cf.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "build and runtime stages: {froms:?}");
    assert!(cf.contains("cargo build --release --locked --bin portcullis"));
    assert!(cf.contains("ENTRYPOINT [\"/usr/bin/portcullis\"]"));
    // The DaemonSet's args are a `portcullis run` command line.
    let docs = yaml_docs(&read("deploy/daemonset.yaml"));
    let args = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "run");
    let args: Vec<String> = args
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let out = Command::new(agent_bin())
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the DaemonSet's flags must parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- the real agent with the DaemonSet's privileges ------------------------

fn agent_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN")
        .map_or_else(|| repo().join("target/debug/portcullis"), PathBuf::from)
}

struct Running {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Running {
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        // Under QEMU TCG a busy guest answers slowly (as in the shared Agent).
        let limit = if std::env::var_os("PORTCULLIS_VM").is_some() {
            30
        } else {
            5
        };
        s.set_read_timeout(Some(Duration::from_secs(limit))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((
            code,
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        ))
    }

    fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics").expect("metrics endpoint");
        portcullis_tests::sample_value(&body, sample)
    }

    fn wait(&mut self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if cond(self) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "agent exited ({st}) waiting for {what}:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out waiting for {what}:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Writes `files` as the kubelet's atomic writer lays out a ConfigMap
/// volume: `..<timestamp>/<file>`, `..data -> ..<timestamp>`, and
/// `<file> -> ..data/<file>`; an update builds a new timestamp directory
/// and renames a fresh `..data` link over the old one.
fn write_configmap(dir: &Path, files: &[(&str, &str)], generation: u32) {
    let ts = format!("..2026_12_01_00_00_0{generation}.{}", std::process::id());
    std::fs::create_dir_all(dir.join(&ts)).unwrap();
    for (name, body) in files {
        std::fs::write(dir.join(&ts).join(name), body).unwrap();
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&ts, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// util-linux's setpriv; busybox's (as in the VM images) has no
/// `--bounding-set`.
fn util_linux_setpriv() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("util-linux"))
}

fn deny_policy(cg: &Cgroup, port: u16) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: cm}}\nspec:\n  selector: {{cgroupPath: \"{}\"}}\n  network:\n    egress:\n      deny: [{{cidr: 127.0.0.1/32, ports: [\"{port}\"]}}]\n",
        cg.path
    )
}

#[test]
fn daemonset_capabilities_suffice_and_configmap_edits_hot_reload() {
    require_deploy_dir!();
    require_kernel!();
    if !util_linux_setpriv() {
        portcullis_tests::skip(
            "deploy privileges: util-linux setpriv (with --bounding-set) is not installed",
        );
        return;
    }
    let docs = yaml_docs(&read("deploy/daemonset.yaml"));
    let caps = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        ["capabilities"]["add"];
    let caps: Vec<String> = caps
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect();
    let bounding = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );

    let cg = Cgroup::create("deploy-caps");
    let listener = Listener::new("127.0.0.1");
    let tmp = TempDir::new("configmap");
    let cm = tmp.path("policies");
    std::fs::create_dir_all(&cm).unwrap();
    write_configmap(&cm, &[("policy.yaml", &deny_policy(&cg, listener.port))], 1);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = tmp.path("agent.log");
    let child = Command::new("setpriv")
        .arg(format!("--bounding-set={bounding}"))
        .args(["--inh-caps=-all", "--"])
        .arg(agent_bin())
        .args(["run", "--policy"])
        .arg(&cm)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--no-pin", "--no-cri", "--watch-interval", "0.2"])
        .arg("--decisions-file")
        .arg(tmp.path("decisions.jsonl"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("setpriv");
    let mut agent = Running { child, port, log };
    agent.wait("ready with the DaemonSet's capabilities", |a| {
        a.get("/readyz").is_some_and(|(c, _)| c == 200)
    });

    // The agent runs with exactly those capabilities, no more.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    let eff = u64::from_str_radix(eff, 16).unwrap();
    let bit = |name: &str| match name {
        "net_admin" => 1u64 << 12,
        "perfmon" => 1 << 38,
        "bpf" => 1 << 39,
        "sys_admin" => 1 << 21,
        other => panic!("unexpected capability {other}"),
    };
    let want = caps.iter().map(|c| bit(c)).fold(0, |a, b| a | b);
    assert_eq!(
        eff, want,
        "agent CapEff {eff:#x}, DaemonSet grants {caps:?}"
    );
    assert_eq!(eff & bit("sys_admin"), 0);

    // And they lose nothing: the same backends (BPF-LSM where the kernel
    // allows it) as an agent with every capability.
    let backends = |a: &Running| -> Vec<String> {
        let body = a.get("/metrics").map(|(_, b)| b).unwrap_or_default();
        let mut lines: Vec<String> = body
            .lines()
            .filter(|l| l.starts_with("portcullis_backend{"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let restricted = backends(&agent);
    let full_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let full_log = tmp.path("full.log");
    let child = Command::new(agent_bin())
        .args(["run", "--policy"])
        .arg(&cm)
        .args(["--metrics-addr", &format!("127.0.0.1:{full_port}")])
        .args(["--no-pin", "--no-cri"])
        .arg("--decisions-file")
        .arg(tmp.path("full-decisions.jsonl"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&full_log).unwrap())
        .spawn()
        .unwrap();
    let mut full = Running {
        child,
        port: full_port,
        log: full_log,
    };
    full.wait("ready with every capability", |a| {
        a.get("/readyz").is_some_and(|(c, _)| c == 200)
    });
    assert!(!restricted.is_empty());
    assert_eq!(
        restricted,
        backends(&full),
        "backends with the DaemonSet's capabilities vs all"
    );
    eprintln!("backends with the DaemonSet's capabilities: {restricted:?}");
    drop(full);

    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &listener.port.to_string()]),
        Outcome::Errno(EPERM)
    );

    // A ConfigMap edit (atomic ..data swap) reloads without a restart.
    let ok_before = agent.metric("portcullis_policy_reloads_total{result=\"success\"}");
    let other = Listener::new("127.0.0.1");
    write_configmap(&cm, &[("policy.yaml", &deny_policy(&cg, other.port))], 2);
    agent.wait("reload after the ConfigMap update", |a| {
        a.metric("portcullis_policy_reloads_total{result=\"success\"}") > ok_before
    });
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &listener.port.to_string()]),
        Outcome::Ok(0)
    );
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &other.port.to_string()]),
        Outcome::Errno(EPERM)
    );

    // A broken edit is rejected; the policy in force stays.
    let failed_before = agent.metric("portcullis_policy_reloads_total{result=\"failure\"}");
    write_configmap(
        &cm,
        &[(
            "policy.yaml",
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {name: cm}\nspec: {colour: red}\n",
        )],
        3,
    );
    agent.wait("rejected reload", |a| {
        a.metric("portcullis_policy_reloads_total{result=\"failure\"}") > failed_before
    });
    assert_eq!(
        probe(&cg, &["connect", "127.0.0.1", &other.port.to_string()]),
        Outcome::Errno(EPERM)
    );
}

/// Each capability the DaemonSet grants is needed: without any one of them
/// the agent fails to load (and says why).
#[test]
fn each_daemonset_capability_is_needed() {
    require_deploy_dir!();
    require_kernel!();
    if !util_linux_setpriv() {
        portcullis_tests::skip(
            "deploy privileges: util-linux setpriv (with --bounding-set) is not installed",
        );
        return;
    }
    let docs = yaml_docs(&read("deploy/daemonset.yaml"));
    let caps = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        ["capabilities"]["add"];
    let caps: Vec<String> = caps
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect();
    let tmp = TempDir::new("caps");
    std::fs::write(
        tmp.path("p.yaml"),
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  selector: {cgroupPath: \"/portcullis-caps-none\"}\n  exec: {deny: [/nonexistent]}\n",
    )
    .unwrap();
    for missing in &caps {
        let keep: Vec<String> = caps
            .iter()
            .filter(|c| *c != missing)
            .map(|c| format!("+{c}"))
            .collect();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tmp.path(&format!("without-{missing}.log"));
        let mut child = Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{}", keep.join(",")))
            .args(["--inh-caps=-all", "--"])
            .arg(agent_bin())
            .args(["run", "--policy"])
            .arg(tmp.path("p.yaml"))
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--no-pin",
                "--no-cri",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "without {missing} the agent kept running:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: std::fs::read(&log).unwrap(),
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "without {missing} the agent must fail:\n{err}"
        );
        assert!(
            err.contains("Operation not permitted") || err.contains("Permission denied"),
            "without {missing}: {err}"
        );
    }
}
