//! Parser and validator tests: the bundled policies, exact values, every
//! error kind (file, line, field and message), multi-document files and
//! directory loading.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use super::*;

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn mapped(a: u8, b: u8, c: u8, d: u8) -> Ipv6Addr {
    Ipv4Addr::new(a, b, c, d).to_ipv6_mapped()
}

fn rule(pattern: &str, line: usize) -> PathRule {
    PathRule {
        pattern: pattern.into(),
        line,
        until: None,
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "portcullis-policy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A minimal valid policy named `name`, 9 lines long.
fn minimal(name: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1
kind: HostPolicy
metadata:
  name: {name}
spec:
  selector:
    cgroupPath: /a/**
  exec:
    default: allow
"
    )
}

/// Lines 1-7 of a policy; a test's `spec` additions start at line 8,
/// indented by two spaces.
const HEAD: &str = "apiVersion: portcullis.dev/v1alpha1
kind: HostPolicy
metadata:
  name: p
spec:
  selector:
    cgroupPath: /a/**
";

const FILE: &str = "test.yaml";

fn errors_of(text: &str) -> Vec<PolicyError> {
    match parse_str(text, Path::new(FILE)) {
        Ok(p) => panic!("expected errors, parsed {p:#?}\n--- input ---\n{text}"),
        Err(e) => e,
    }
}

/// Asserts `text` fails with exactly one error, at `line`, on `field`, saying `message`.
#[track_caller]
fn assert_error(text: &str, line: usize, field: &str, message: &str) {
    let errors = errors_of(text);
    assert_eq!(
        errors.len(),
        1,
        "expected one error, got {errors:#?}\n--- input ---\n{text}"
    );
    let e = &errors[0];
    assert_eq!(
        (
            e.file.as_path(),
            e.line,
            e.field.as_str(),
            e.message.as_str()
        ),
        (Path::new(FILE), line, field, message),
        "--- input ---\n{text}"
    );
}

/// `HEAD` plus `spec` lines, for errors inside `spec`.
#[track_caller]
fn assert_spec_error(spec: &str, line: usize, field: &str, message: &str) {
    assert_error(&format!("{HEAD}{spec}"), line, field, message);
}

fn parse_one(text: &str) -> Policy {
    let mut policies = parse_str(text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(policies.len(), 1);
    policies.remove(0)
}

#[test]
fn inference_serving_example_parses_to_exact_policy() {
    let path = policies_dir().join("examples/inference-serving.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let policies = parse_str(&text, &path).unwrap_or_else(|e| panic!("{e:#?}"));
    let expected = Policy {
        name: "inference-serving".into(),
        source: path.clone(),
        mode: Mode::Enforce,
        selector: Selector {
            cgroup_path: Some("/kubepods.slice/**".into()),
            systemd_unit: Some("triton*.service".into()),
            ..Default::default()
        },
        exec: Some(ExecRules {
            default: DefaultAction::Deny,
            allow: vec![rule("/usr/bin/python3*", 17), rule("/opt/triton/**", 17)],
            deny: vec![],
        }),
        egress: Some(EgressRules {
            default: DefaultAction::Deny,
            allow: vec![NetRule {
                addr: mapped(10, 0, 0, 0),
                prefix_len: 104,
                ports: vec![(443, 443), (8000, 8002)],
                protocol: Some(6),
                log: false,
                text: "10.0.0.0/8 443,8000-8002/tcp".into(),
                line: 23,
                until: None,
            }],
            deny: vec![NetRule {
                addr: mapped(169, 254, 169, 254),
                prefix_len: 128,
                ports: vec![],
                protocol: None,
                log: false,
                text: "169.254.169.254/32".into(),
                line: 25,
                until: None,
            }],
        }),
        files: vec![
            FileRule {
                path: rule("/data/datasets/pii/**", 27),
                access: FileAccess::None,
                only_from: vec![],
            },
            FileRule {
                path: rule("/etc/ml/secrets/**", 28),
                access: FileAccess::Read,
                only_from: vec![rule("/opt/triton/bin/tritonserver", 28)],
            },
        ],
        devices: None,
        // Egress `default: deny` without a sockets section denies raw IP,
        // ICMP and the other IP sockets too.
        sockets: Some(SocketRules {
            default: DefaultAction::Deny,
            allow: vec![],
            deny: vec![],
        }),
    };
    assert_eq!(policies, vec![expected]);
}

#[test]
fn bundled_default_policy_is_safe_and_demonstrates_the_schema() {
    let path = policies_dir().join("default.yaml");
    let policies = load_paths(std::slice::from_ref(&path)).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(policies.len(), 1);
    let p = &policies[0];
    assert_eq!(p.name, "portcullis-default");
    assert_eq!(p.source, path);
    // Safe on any host: audit only, and only in a cgroup nothing uses by default.
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(
        p.selector,
        Selector {
            cgroup_path: Some("/portcullis-demo/**".into()),
            ..Default::default()
        }
    );
    assert!(!glob::glob_match(
        p.selector.cgroup_path.as_deref().unwrap(),
        "/"
    ));
    assert!(!glob::glob_match(
        p.selector.cgroup_path.as_deref().unwrap(),
        "/system.slice/sshd.service"
    ));
    assert!(glob::glob_match(
        p.selector.cgroup_path.as_deref().unwrap(),
        "/portcullis-demo/job"
    ));
    // Audits exec.
    let exec = p.exec.as_ref().expect("exec rules");
    assert_eq!(exec.default, DefaultAction::Deny);
    assert!(!exec.allow.is_empty());
    // Blocks cloud metadata egress.
    let egress = p.egress.as_ref().expect("egress rules");
    assert_eq!(egress.default, DefaultAction::Allow);
    assert!(
        egress
            .deny
            .iter()
            .any(|r| r.addr == mapped(169, 254, 169, 254)
                && r.prefix_len == 128
                && r.ports.is_empty())
    );
    // Denies reading a secrets path.
    assert!(
        p.files
            .iter()
            .any(|f| f.access == FileAccess::None && f.path.pattern.contains("secrets"))
    );
}

#[test]
fn policies_directory_loads_top_level_files_only() {
    let policies = load_paths(&[policies_dir()]).unwrap_or_else(|e| panic!("{e:#?}"));
    let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    // `examples/` is a subdirectory, so not read.
    assert_eq!(names, ["portcullis-default"]);

    let both = load_paths(&[policies_dir(), policies_dir().join("examples")]).unwrap();
    let names: Vec<&str> = both.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "portcullis-default",
            "gpu-inference",
            "inference-gpus",
            "inference-serving",
            "triton-pods",
            "triton-server-no-debuggers"
        ]
    );
}

#[test]
fn full_policy_in_block_style_with_every_field() {
    let text = "\
apiVersion: portcullis.dev/v1alpha1
kind: HostPolicy
metadata:
  name: full.example-1
  labels:
    team: ml
    tier: 1
spec:
  mode: audit
  selector:
    systemdUnit: nginx.service
  exec:
    deny:
      - /usr/bin/curl
      - /tmp/**
  network:
    egress:
      allow:
        - cidr: 2001:db8::/32
          ports: [53, \"1000-2000\", 65535]
          protocol: udp
          log: true
        - cidr: 0.0.0.0/0
          protocol: tcp
        - cidr: ::/0
          ports: [\" 80 - 81 \"]
  files:
    - path: /var/lib/app/**
      access: readwrite
      onlyFrom:
        - /usr/sbin/nginx
";
    let p = parse_one(text);
    assert_eq!(p.name, "full.example-1");
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(
        p.selector,
        Selector {
            systemd_unit: Some("nginx.service".into()),
            ..Default::default()
        }
    );
    assert_eq!(
        p.exec,
        Some(ExecRules {
            default: DefaultAction::Allow,
            allow: vec![],
            deny: vec![rule("/usr/bin/curl", 14), rule("/tmp/**", 15)],
        })
    );
    let egress = p.egress.unwrap();
    assert_eq!(egress.default, DefaultAction::Allow);
    assert!(egress.deny.is_empty());
    assert_eq!(
        egress.allow,
        vec![
            NetRule {
                addr: "2001:db8::".parse().unwrap(),
                prefix_len: 32,
                ports: vec![(53, 53), (1000, 2000), (65535, 65535)],
                protocol: Some(17),
                log: true,
                text: "2001:db8::/32 53,1000-2000,65535/udp".into(),
                line: 19,
                until: None,
            },
            NetRule {
                addr: mapped(0, 0, 0, 0),
                prefix_len: 96,
                ports: vec![],
                protocol: Some(6),
                log: false,
                text: "0.0.0.0/0 tcp".into(),
                line: 23,
                until: None,
            },
            NetRule {
                addr: Ipv6Addr::UNSPECIFIED,
                prefix_len: 0,
                ports: vec![(80, 81)],
                protocol: None,
                log: false,
                text: "::/0 80-81".into(),
                line: 25,
                until: None,
            },
        ]
    );
    assert_eq!(
        p.files,
        vec![FileRule {
            path: rule("/var/lib/app/**", 28),
            access: FileAccess::ReadWrite,
            only_from: vec![rule("/usr/sbin/nginx", 31)],
        }]
    );
}

#[test]
fn null_values_mean_absent_and_yaml_1_2_scalars() {
    // `labels:` and `deny:` are null; `0755` stays a string (no octal) and
    // so does a numeric-looking name.
    let text = "\
apiVersion: portcullis.dev/v1alpha1
kind: HostPolicy
metadata:
  name: 0755
  labels:
spec:
  mode:
  selector:
    cgroupPath: /
  exec:
    deny:
";
    let p = parse_one(text);
    assert_eq!(p.name, "0755");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.selector.cgroup_path.as_deref(), Some("/"));
    assert_eq!(
        p.exec,
        Some(ExecRules {
            default: DefaultAction::Allow,
            allow: vec![],
            deny: vec![]
        })
    );
}

#[test]
fn byte_order_mark_is_ignored_and_numbers_keep_their_spelling() {
    let text = format!("\u{feff}{}", minimal("1.10"));
    assert_eq!(parse_one(&text).name, "1.10");
}

#[test]
fn multi_document_file() {
    let text = format!(
        "---\n{}---\n# only a comment\n---\n{}...\n",
        minimal("first"),
        minimal("second")
    );
    let policies = parse_str(&text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e:#?}"));
    let names: Vec<&str> = policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    assert!(policies.iter().all(|p| p.source == Path::new(FILE)));
}

#[test]
fn multi_document_file_reports_errors_from_every_document() {
    // Document 1 (lines 1-9) is fine apart from its mode; document 2 starts
    // at line 11 and has an unknown field on line 19.
    let doc1 = minimal("one").replace("spec:\n", "spec:\n  mode: strict\n");
    let doc2 = format!("{}  bogus: 1\n", minimal("two"));
    let errors = errors_of(&format!("{doc1}---\n{doc2}"));
    let got: Vec<(usize, &str, &str)> = errors
        .iter()
        .map(|e| (e.line, e.field.as_str(), e.message.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (
                6,
                "spec.mode",
                "unknown mode 'strict', expected enforce or audit"
            ),
            (
                21,
                "spec.bogus",
                "unknown field 'bogus', expected one of: mode, selector, exec, network, files, devices"
            ),
        ]
    );
}

#[test]
fn every_error_in_a_document_is_reported_in_line_order() {
    let spec = "  mode: on
  exec:
    allow: [bin/sh, /ok, /a/../b]
  network:
    egress:
      deny:
        - { cidr: 10.0.0.0/33, ports: [70000] }
";
    let errors = errors_of(&format!("{HEAD}{spec}"));
    let got: Vec<(usize, usize, &str)> = errors
        .iter()
        .map(|e| (e.line, e.column, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (8, 9, "spec.mode"),
            (10, 13, "spec.exec.allow[0]"),
            (10, 26, "spec.exec.allow[2]"),
            (14, 19, "spec.network.egress.deny[0].cidr"),
            (14, 40, "spec.network.egress.deny[0].ports[0]"),
        ]
    );
    assert_eq!(
        errors[0].to_string(),
        "test.yaml:8:9: spec.mode: unknown mode 'on', expected enforce or audit"
    );
}

#[test]
fn document_level_errors() {
    let cases: &[(&str, usize, &str, &str)] = &[
        (
            "- a\n- b\n",
            1,
            "document",
            "expected a mapping, found a list",
        ),
        (
            "apiVersion: v1\nkind: HostPolicy\nmetadata: {name: p}\nspec: {selector: {cgroupPath: /**}, files: [{path: /x, access: none}]}\n",
            1,
            "apiVersion",
            "unsupported apiVersion 'v1', expected 'portcullis.dev/v1alpha1'",
        ),
        (
            "apiVersion: portcullis.dev/v1alpha1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {selector: {cgroupPath: /**}, files: [{path: /x, access: none}]}\n",
            2,
            "kind",
            "unsupported kind 'NetworkPolicy', expected 'HostPolicy'",
        ),
        (
            "kind: HostPolicy\nmetadata: {name: p}\nspec: {selector: {cgroupPath: /**}, files: [{path: /x, access: none}]}\n",
            1,
            "apiVersion",
            "missing required field 'apiVersion'",
        ),
        (
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\n",
            1,
            "spec",
            "missing required field 'spec'",
        ),
        (
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec: {selector: {cgroupPath: /**}, files: [{path: /x, access: none}]}\nstatus: {}\n",
            5,
            "status",
            "unknown field 'status', expected one of: apiVersion, kind, metadata, spec",
        ),
    ];
    for &(text, line, field, message) in cases {
        assert_error(text, line, field, message);
    }
}

#[test]
fn metadata_errors() {
    let with_meta = |meta: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n{meta}spec:\n  selector: {{cgroupPath: /a}}\n  files: [{{path: /x, access: none}}]\n"
        )
    };
    let long = "a".repeat(254);
    let cases: Vec<(String, usize, &str, String)> = vec![
        (with_meta("  labels: {}\n"), 3, "metadata.name", "missing required field 'name'".into()),
        (with_meta("  name: \"\"\n"), 4, "metadata.name", "name must not be empty".into()),
        (
            with_meta("  name: Triton_Serving\n"),
            4,
            "metadata.name",
            "name 'Triton_Serving' is invalid: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit".into(),
        ),
        (
            with_meta("  name: web-\n"),
            4,
            "metadata.name",
            "name 'web-' is invalid: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit".into(),
        ),
        (
            with_meta(&format!("  name: {long}\n")),
            4,
            "metadata.name",
            "name is 254 characters long, longer than the limit of 253".into(),
        ),
        (with_meta("  name: [a]\n"), 4, "metadata.name", "expected a string, found a list".into()),
        (
            with_meta("  name: p\n  namespace: default\n"),
            5,
            "metadata.namespace",
            "unknown field 'namespace', expected one of: name, labels".into(),
        ),
        (
            with_meta("  name: p\n  labels:\n    team: [ml]\n"),
            6,
            "metadata.labels.team",
            "expected a string, found a list".into(),
        ),
    ];
    for (text, line, field, message) in cases {
        assert_error(&text, line, field, &message);
    }
}

#[test]
fn spec_and_selector_errors() {
    let no_selector = "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {name: p}\nspec:\n  exec: {default: deny}\n";
    assert_error(
        no_selector,
        4,
        "spec.selector",
        "missing required field 'selector'",
    );

    let with_selector = |sel: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: p}}\nspec:\n  exec: {{default: deny}}\n  selector:{sel}\n"
        )
    };
    let empty = "selector is empty: give at least one of cgroupPath, systemdUnit, namespace, podLabels, serviceAccount, container or uid (cgroupPath: \"/**\" selects every workload)";
    assert_error(&with_selector(" {}"), 6, "spec.selector", empty);
    assert_error(
        &with_selector("\n    cgroupPath: kubepods.slice/**"),
        7,
        "spec.selector.cgroupPath",
        "path 'kubepods.slice/**' is not absolute (it must start with '/')",
    );
    assert_error(
        &with_selector("\n    systemdUnit: system.slice/x.service"),
        7,
        "spec.selector.systemdUnit",
        "unit pattern 'system.slice/x.service' must not contain '/' (it matches a unit name such as 'nginx.service')",
    );
    assert_error(
        &with_selector("\n    pod: x"),
        7,
        "spec.selector.pod",
        "unknown field 'pod', expected one of: cgroupPath, systemdUnit, namespace, podLabels, serviceAccount, container, uid",
    );

    assert_spec_error(
        "  mode: Enforce\n  exec: {}\n",
        8,
        "spec.mode",
        "unknown mode 'Enforce', expected enforce or audit",
    );
    assert_spec_error(
        "  files: []\n",
        5,
        "spec",
        "policy has no rules: give at least one of exec, network.egress, network.sockets, files or devices",
    );
    assert_spec_error(
        "  exec: [/bin/sh]\n",
        8,
        "spec.exec",
        "expected a mapping, found a list",
    );
}

#[test]
fn path_errors() {
    let cases = [
        (
            "  exec:\n    allow:\n      - /usr/bin/*\n      - bin/sh\n",
            11,
            "spec.exec.allow[1]",
            "path 'bin/sh' is not absolute (it must start with '/')",
        ),
        (
            "  exec:\n    deny: [/opt/../bin/sh]\n",
            9,
            "spec.exec.deny[0]",
            "path '/opt/../bin/sh' contains a '..' segment (write the path without it)",
        ),
        (
            "  exec:\n    deny: [/opt/**/bin]\n",
            9,
            "spec.exec.deny[0]",
            "path '/opt/**/bin': '**' is only allowed as the last segment (meaning everything below)",
        ),
        (
            "  exec:\n    default: block\n",
            9,
            "spec.exec.default",
            "unknown default action 'block', expected deny or allow",
        ),
        (
            "  exec:\n    allow: /usr/**\n",
            9,
            "spec.exec.allow",
            "expected a list, found string '/usr/**'",
        ),
        (
            "  files:\n    - path: /etc/ml/\n      access: none\n",
            9,
            "spec.files[0].path",
            "path '/etc/ml/' ends with '/' (write '/etc/ml/**' for everything below it, or '/etc/ml' for the path itself)",
        ),
        (
            "  files:\n    - { path: /x, access: read, onlyFrom: [usr/bin/cat] }\n",
            9,
            "spec.files[0].onlyFrom[0]",
            "path 'usr/bin/cat' is not absolute (it must start with '/')",
        ),
    ];
    for (spec, line, field, message) in cases {
        assert_spec_error(spec, line, field, message);
    }
}

#[test]
fn file_rule_errors() {
    let cases = [
        (
            "  files:\n    - path: /x\n",
            9,
            "spec.files[0].access",
            "missing required field 'access'",
        ),
        (
            "  files:\n    - { access: none }\n",
            9,
            "spec.files[0].path",
            "missing required field 'path'",
        ),
        (
            "  files:\n    - { path: /x, access: write }\n",
            9,
            "spec.files[0].access",
            "unknown access 'write', expected none, read or readwrite",
        ),
        (
            "  files:\n    - path: /x\n      access: none\n      onlyFrom: [/bin/cat]\n",
            11,
            "spec.files[0].onlyFrom",
            "onlyFrom has no effect with access none (no process may open the path); use access read or readwrite",
        ),
        (
            "  files:\n    - { path: /x, access: read, onlyFrom: [] }\n",
            9,
            "spec.files[0].onlyFrom",
            "onlyFrom must not be empty (omit it to give every process the access)",
        ),
        (
            "  files:\n    - { path: /x/**, access: none }\n    - { path: /x/**, access: read }\n",
            10,
            "spec.files[1].path",
            "duplicate rule for path '/x/**' (first at line 9)",
        ),
        (
            "  files:\n    - { path: /x, access: none, mode: 0600 }\n",
            9,
            "spec.files[0].mode",
            "unknown field 'mode', expected one of: path, access, onlyFrom",
        ),
        (
            "  files: {path: /x}\n",
            8,
            "spec.files",
            "expected a list, found a mapping",
        ),
    ];
    for (spec, line, field, message) in cases {
        assert_spec_error(spec, line, field, message);
    }
    // onlyFrom with readwrite (and read) is fine.
    let p = parse_one(&format!(
        "{HEAD}  files:\n    - {{ path: /x, access: readwrite, onlyFrom: [/bin/a] }}\n"
    ));
    assert_eq!(p.files[0].access, FileAccess::ReadWrite);
    assert_eq!(p.files[0].only_from, vec![rule("/bin/a", 9)]);
}

#[test]
fn network_errors() {
    let egress = |rule: &str| format!("  network:\n    egress:\n      allow:\n        - {rule}\n");
    let deny = |rule: &str| format!("  network:\n    egress:\n      deny:\n        - {rule}\n");
    let at = "spec.network.egress.allow[0]";
    let cases: Vec<(String, &str, String)> = vec![
        (
            egress("{ cidr: 10.0.0.0/33 }"),
            "cidr",
            "cidr '10.0.0.0/33': prefix length 33 exceeds 32".into(),
        ),
        (
            egress("{ cidr: \"2001:db8::/129\" }"),
            "cidr",
            "cidr '2001:db8::/129': prefix length 129 exceeds 128".into(),
        ),
        (
            egress("{ cidr: 10.0.0.1/8 }"),
            "cidr",
            "cidr '10.0.0.1/8' has host bits set (the network is 10.0.0.0/8)".into(),
        ),
        (
            egress("{ cidr: \"2001:db8::1/32\" }"),
            "cidr",
            "cidr '2001:db8::1/32' has host bits set (the network is 2001:db8::/32)".into(),
        ),
        (
            egress("{ cidr: 10.0.0.256/32 }"),
            "cidr",
            "cidr '10.0.0.256/32': '10.0.0.256' is not a valid IPv4 or IPv6 address".into(),
        ),
        (
            egress("{ cidr: 10.0.0.1 }"),
            "cidr",
            "cidr '10.0.0.1' has no prefix length (write '10.0.0.1/32' for a single address)"
                .into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/x }"),
            "cidr",
            "cidr '10.0.0.0/x': prefix length 'x' is not a number".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: [70000] }"),
            "ports[0]",
            "port 70000 is out of range 1-65535".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: [443, 0] }"),
            "ports[1]",
            "port 0 is out of range 1-65535".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: [\"9-3\"] }"),
            "ports[0]",
            "port range '9-3': start 9 is greater than end 3".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: [\"1-70000\"] }"),
            "ports[0]",
            "port range '1-70000': port 70000 is out of range 1-65535".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: [https] }"),
            "ports[0]",
            "port 'https' is not a number or a range (write e.g. 443 or \"8000-8002\")".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: [4.5] }"),
            "ports[0]",
            "expected a port number or a range like \"8000-8002\", found number 4.5".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: [] }"),
            "ports",
            "ports must not be empty (omit it to match any port)".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, ports: 443 }"),
            "ports",
            "expected a list, found integer 443".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, protocol: icmp }"),
            "protocol",
            "unknown protocol 'icmp', expected tcp, udp or any".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, log: yes }"),
            "log",
            "expected true or false, found string 'yes'".into(),
        ),
        (
            egress("{ ports: [443] }"),
            "cidr",
            "missing required field 'cidr'".into(),
        ),
        (
            egress("{ cidr: 10.0.0.0/8, port: 443 }"),
            "port",
            "unknown field 'port', expected one of: cidr, ports, protocol, log, until".into(),
        ),
    ];
    for (spec, field, message) in cases {
        assert_spec_error(&spec, 11, &format!("{at}.{field}"), &message);
    }
    assert_spec_error(
        &deny("{ cidr: 169.254.169.254/32, log: false }"),
        11,
        "spec.network.egress.deny[0].log",
        "log is only valid on allow rules (denies are always logged)",
    );
    assert_spec_error(
        "  network:\n    egres:\n      default: deny\n",
        9,
        "spec.network.egres",
        "unknown field 'egres', expected one of: egress, sockets",
    );
    assert_spec_error(
        "  network:\n    egress:\n      default: block\n",
        10,
        "spec.network.egress.default",
        "unknown default action 'block', expected deny or allow",
    );
}

#[test]
fn yaml_syntax_and_duplicate_key_errors_have_positions() {
    let errors = errors_of(&format!("{HEAD}  exec:\n    allow: [/a\n"));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert_eq!(
        (e.file.as_path(), e.field.as_str()),
        (Path::new(FILE), "yaml")
    );
    assert!(e.line >= 9 && e.column > 0, "{e}");
    assert!(
        !e.message.is_empty() && !e.message.contains(" at line "),
        "{e}"
    );

    let errors = errors_of(&format!(
        "{HEAD}  mode: audit\n  mode: enforce\n  exec: {{}}\n"
    ));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert_eq!((e.line, e.field.as_str()), (9, "yaml"), "{e}");
    assert!(e.message.contains("mode"), "{e}");
}

#[test]
fn duplicate_names_within_one_file() {
    let text = format!("{}---\n{}", minimal("same"), minimal("same"));
    let errors = errors_of(&text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(
        (
            errors[0].line,
            errors[0].field.as_str(),
            errors[0].message.as_str()
        ),
        (
            14,
            "metadata.name",
            "duplicate policy name 'same' (first defined at test.yaml:4)"
        )
    );
}

#[test]
fn directory_loading_is_sorted_non_recursive_and_filtered() {
    let dir = TempDir::new();
    dir.write("b.yaml", &minimal("b"));
    dir.write("a.yml", &format!("{}---\n{}", minimal("a1"), minimal("a2")));
    dir.write("c.txt", &minimal("not-yaml"));
    dir.write(".swap.yaml", "not: [valid");
    dir.write("sub/d.yaml", &minimal("nested"));
    let explicit = dir.write("extra.conf", &minimal("explicit"));

    let policies =
        load_paths(&[dir.0.clone(), explicit.clone()]).unwrap_or_else(|e| panic!("{e:#?}"));
    let got: Vec<(&str, PathBuf)> = policies
        .iter()
        .map(|p| (p.name.as_str(), p.source.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("a1", dir.0.join("a.yml")),
            ("a2", dir.0.join("a.yml")),
            ("b", dir.0.join("b.yaml")),
            ("explicit", explicit),
        ]
    );

    // A file reached both directly and through its directory is read once.
    let twice = load_paths(&[dir.0.join("b.yaml"), dir.0.clone()]).unwrap();
    assert_eq!(twice.len(), 3);
}

#[test]
fn duplicate_names_across_files_name_both_files() {
    let dir = TempDir::new();
    let first = dir.write("10-first.yaml", &minimal("shared"));
    let second = dir.write(
        "20-second.yaml",
        &format!("{}---\n{}", minimal("other"), minimal("shared")),
    );
    let errors = load_paths(std::slice::from_ref(&dir.0)).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert_eq!(e.file, second);
    assert_eq!((e.line, e.field.as_str()), (14, "metadata.name"));
    assert_eq!(
        e.message,
        format!(
            "duplicate policy name 'shared' (first defined at {}:4)",
            first.display()
        )
    );
}

#[test]
fn load_errors_from_every_file_are_collected() {
    let dir = TempDir::new();
    dir.write("a.yaml", &format!("{}  bogus: 1\n", minimal("a")));
    dir.write("b.yaml", &minimal("b").replace("/a/**", "a"));
    let missing = dir.0.join("missing.yaml");
    let errors = load_paths(&[dir.0.clone(), missing.clone()]).unwrap_err();
    let got: Vec<(PathBuf, usize, &str)> = errors
        .iter()
        .map(|e| (e.file.clone(), e.line, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (missing.clone(), 0, "file"),
            (dir.0.join("a.yaml"), 10, "spec.bogus"),
            (dir.0.join("b.yaml"), 7, "spec.selector.cgroupPath"),
        ]
    );
    assert!(
        errors[0].message.starts_with("cannot read policy path: "),
        "{}",
        errors[0]
    );
}

fn with_pod_selector(sel: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: p}}\nspec:\n  exec: {{default: deny}}\n  selector:\n{sel}"
    )
}

#[test]
fn pod_selector_fields_parse() {
    let p = parse_one(&with_pod_selector(
        "    namespace: ml-*\n    serviceAccount: triton\n    container: server\n    podLabels: {app: triton, app.kubernetes.io/part-of: serving}\n",
    ));
    let s = &p.selector;
    assert_eq!(s.namespace.as_deref(), Some("ml-*"));
    assert_eq!(s.service_account.as_deref(), Some("triton"));
    assert_eq!(s.container.as_deref(), Some("server"));
    let labels = s.pod_labels.as_ref().unwrap();
    assert_eq!(
        labels.match_labels.get("app").map(String::as_str),
        Some("triton")
    );
    assert_eq!(labels.match_labels.len(), 2);
    assert!(labels.match_expressions.is_empty());
    assert!(s.needs_pod() && s.cgroup_path.is_none());

    let p = parse_one(&with_pod_selector(
        "    podLabels:\n      matchLabels: {app: triton}\n      matchExpressions:\n        - {key: tier, operator: In, values: [gpu, cpu]}\n        - {key: canary, operator: DoesNotExist}\n",
    ));
    let l = p.selector.pod_labels.unwrap();
    assert_eq!(l.match_labels.len(), 1);
    assert_eq!(
        l.match_expressions,
        vec![
            LabelRequirement {
                key: "tier".into(),
                operator: LabelOperator::In,
                values: vec!["gpu".into(), "cpu".into()]
            },
            LabelRequirement {
                key: "canary".into(),
                operator: LabelOperator::DoesNotExist,
                values: vec![]
            },
        ]
    );

    // `podLabels: {}` is the empty selector: every pod whose metadata is known.
    let p = parse_one(&with_pod_selector("    podLabels: {}\n"));
    assert_eq!(p.selector.pod_labels, Some(LabelSelector::default()));
}

#[test]
fn pod_selector_errors() {
    assert_error(
        &with_pod_selector("    podLabels: {\"-app\": triton}\n"),
        7,
        "spec.selector.podLabels.-app",
        "label key '-app' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
    );
    assert_error(
        &with_pod_selector("    podLabels: {app: \"a b\"}\n"),
        7,
        "spec.selector.podLabels.app",
        "label value 'a b' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
    );
    assert_error(
        &with_pod_selector(
            "    podLabels:\n      matchLabels: {app: x}\n      matchExpresions: []\n",
        ),
        9,
        "spec.selector.podLabels.matchExpresions",
        "unknown field 'matchExpresions', expected one of: matchLabels, matchExpressions",
    );
    assert_error(
        &with_pod_selector(
            "    podLabels:\n      matchExpressions:\n        - {key: tier, operator: In}\n",
        ),
        9,
        "spec.selector.podLabels.matchExpressions[0].values",
        "values must be non-empty when operator is In or NotIn",
    );
    assert_error(
        &with_pod_selector(
            "    podLabels:\n      matchExpressions:\n        - {key: tier, operator: Exists, values: [a]}\n",
        ),
        9,
        "spec.selector.podLabels.matchExpressions[0].values",
        "values must be empty when operator is Exists or DoesNotExist",
    );
    assert_error(
        &with_pod_selector(
            "    podLabels:\n      matchExpressions:\n        - {key: tier, operator: in, values: [a]}\n",
        ),
        9,
        "spec.selector.podLabels.matchExpressions[0].operator",
        "unknown operator 'in', expected In, NotIn, Exists or DoesNotExist",
    );
    assert_error(
        &with_pod_selector("    namespace: kube/system\n"),
        7,
        "spec.selector.namespace",
        "unit pattern 'kube/system' must not contain '/' (it matches a unit name such as 'nginx.service')",
    );
    assert_error(
        &with_pod_selector("    podLabels: [app]\n"),
        7,
        "spec.selector.podLabels",
        "expected a mapping of labels or matchLabels/matchExpressions, found a list",
    );
}

#[test]
fn rfc3339_times_parse_to_unix_seconds() {
    use crate::policy::parse_rfc3339;
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
    assert_eq!(parse_rfc3339("2026-12-01T12:00:00Z"), Ok(1_796_126_400));
    assert_eq!(
        parse_rfc3339("2026-12-01T13:30:00.250+01:30"),
        Ok(1_796_126_400)
    );
    assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Ok(1_709_164_800));
    assert!(parse_rfc3339("2025-02-29T00:00:00Z").is_err());
    assert!(parse_rfc3339("2026-12-01 12:00:00").is_err());
    assert!(parse_rfc3339("tomorrow").is_err());
}

#[test]
fn time_bound_approvals_parse_and_are_checked() {
    let p = parse_one(&format!(
        "{HEAD}  exec:
    default: deny
    allow:
      - /usr/bin/*
      - {{ path: /opt/debug/gdb, until: \"2026-12-01T12:00:00Z\" }}
  network:
    egress:
      default: deny
      allow:
        - {{ cidr: 10.0.0.0/8, until: \"2026-12-01T13:00:00Z\" }}
"
    ));
    let exec = p.exec.as_ref().unwrap();
    assert_eq!(exec.allow[0].until, None);
    assert_eq!(
        (exec.allow[1].pattern.as_str(), exec.allow[1].until),
        ("/opt/debug/gdb", Some(1_796_126_400))
    );
    let net = &p.egress.as_ref().unwrap().allow[0];
    assert_eq!(net.until, Some(1_796_130_000));
    let policies = [p];
    assert_eq!(
        crate::policy::next_expiry(&policies, 0),
        Some(1_796_126_400)
    );
    assert_eq!(
        crate::policy::next_expiry(&policies, 1_796_126_400),
        Some(1_796_130_000)
    );
    assert_eq!(crate::policy::next_expiry(&policies, 1_796_130_000), None);
    // The wait counts from when the policy in force was compiled: woken
    // after an approval's end (another event came first), the agent
    // recompiles at once instead of skipping that lapse.
    let at = |t: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
    let wait = |judged, now| crate::policy::lapse_wait(&policies, judged, at(now));
    assert_eq!(
        wait(1_796_126_000, 1_796_126_390),
        Some(std::time::Duration::from_secs(10))
    );
    assert_eq!(
        wait(1_796_126_000, 1_796_126_401),
        Some(std::time::Duration::ZERO)
    );
    assert_eq!(
        wait(1_796_126_400, 1_796_126_401),
        Some(std::time::Duration::from_secs(3599))
    );
    assert_eq!(wait(1_796_130_000, 1_796_130_001), None);

    assert_spec_error(
        "  network:\n    egress:\n      deny:\n        - { cidr: 10.0.0.0/8, until: \"2026-12-01T12:00:00Z\" }\n",
        11,
        "spec.network.egress.deny[0].until",
        "until is only valid on allow rules (a time-bound approval); a deny never lapses",
    );
    assert_spec_error(
        "  exec:\n    allow:\n      - { path: /bin/sh, until: friday }\n",
        10,
        "spec.exec.allow[0].until",
        "'friday' is not an RFC 3339 time like 2026-12-01T12:00:00Z",
    );
    assert_spec_error(
        "  exec:\n    deny:\n      - { path: /bin/sh }\n",
        10,
        "spec.exec.deny[0]",
        "expected a string, found a mapping",
    );
}

#[test]
fn uid_selector_parses_numbers_and_ranges() {
    let text = |uid: &str| {
        format!(
            "{}  exec:\n    default: allow\n",
            HEAD.replace(
                "    cgroupPath: /a/**\n",
                &format!("    cgroupPath: /a/**\n    uid: {uid}\n")
            )
        )
    };
    assert_eq!(parse_one(&text("1000")).selector.uid, Some((1000, 1000)));
    assert_eq!(
        parse_one(&text("\"1000-1999\"")).selector.uid,
        Some((1000, 1999))
    );
    let only_uid = "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: p\nspec:\n  selector:\n    uid: 0\n  exec:\n    default: allow\n";
    assert_eq!(parse_one(only_uid).selector.uid, Some((0, 0)));
    for (uid, message) in [
        ("\"9-3\"", "uid range '9-3': start 9 is greater than end 3"),
        ("-1", "uid -1 is out of range 0-4294967295"),
        (
            "root",
            "uid 'root' is not a number or a range (write e.g. 1000 or \"1000-1999\")",
        ),
    ] {
        assert_error(&text(uid), 8, "spec.selector.uid", message);
    }
}

/// A reload reuses the parse of files whose text did not change, and sees
/// every change, error and removal as a fresh load would.
#[test]
fn cached_loads_match_fresh_loads() {
    let dir = TempDir::new();
    dir.write("a.yaml", &minimal("a"));
    dir.write("b.yaml", &minimal("b"));
    let paths = [dir.0.clone()];
    let mut cache = ParseCache::default();
    let names = |r: &Result<Vec<Policy>, Vec<PolicyError>>| -> Vec<String> {
        r.as_ref().unwrap().iter().map(|p| p.name.clone()).collect()
    };
    let first = load_paths_cached(&paths, &mut cache);
    assert_eq!(names(&first), ["a", "b"]);
    assert_eq!(cache.len(), 2);

    // A broken file fails the load with the same errors; the good one stays cached.
    dir.write("b.yaml", "apiVersion: [");
    let broken = load_paths_cached(&paths, &mut cache);
    assert_eq!(broken.unwrap_err(), load_paths(&paths).unwrap_err());
    assert_eq!(cache.len(), 1);

    dir.write("b.yaml", &minimal("b2"));
    assert_eq!(names(&load_paths_cached(&paths, &mut cache)), ["a", "b2"]);
    std::fs::remove_file(dir.0.join("a.yaml")).unwrap();
    let after = load_paths_cached(&paths, &mut cache);
    assert_eq!(after, load_paths(&paths));
    assert_eq!((names(&after), cache.len()), (vec!["b2".to_owned()], 1));
}

#[test]
fn device_rules_parse_and_bad_ones_name_line_and_field() {
    let doc = |devices: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: p\nspec:\n  selector:\n    cgroupPath: /a/**\n  devices:\n{devices}"
        )
    };
    let p = parse_one(&doc(
        "    default: deny\n    allow:\n      - { kind: nvidia-gpu, index: 0, access: [read, write] }\n      - { device: \"c 195:*\", log: true }\n      - { path: /dev/dri/renderD* }\n      - { allocated: true, access: [read, write] }\n    deny:\n      - { kind: nvidia-uvm-tools }\n",
    ));
    let d = p.devices.expect("devices");
    assert_eq!(d.default, DefaultAction::Deny);
    assert_eq!(
        d.allow.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
        [
            "nvidia-gpu index 0 read,write",
            "c 195:* read,write,mknod",
            "/dev/dri/renderD* read,write,mknod",
            "allocated read,write"
        ]
    );
    assert_eq!(d.allow[0].line, 11);
    assert!(d.allow[1].log);
    assert_eq!(
        d.deny[0].target,
        DeviceTarget::Kind {
            kind: DeviceKind::NvidiaUvmTools,
            index: None,
            uuid: None,
            instance: None,
        }
    );
    for (devices, line, field, message) in [
        (
            "    allow:\n      - { kind: nvidia-gpus }\n",
            10,
            "spec.devices.allow[0].kind",
            "unknown device kind 'nvidia-gpus', expected nvidia-gpu, nvidiactl, nvidia-modeset, nvidia-uvm, nvidia-uvm-tools, nvidia-caps, nvidia-mig, rdma-uverbs, rdma-cm, rdma-issm, rdma-umad, drm-render or amd-kfd",
        ),
        (
            "    allow:\n      - { device: \"195\" }\n",
            10,
            "spec.devices.allow[0].device",
            "'195' is not a device number: expected MAJOR:MINOR, e.g. \"195:0\", \"c 195:*\" or \"b 8:0\"",
        ),
        (
            "    deny:\n      - { allocated: true }\n",
            10,
            "spec.devices.deny[0].allocated",
            "allocated is only valid in devices.allow (deny the devices by kind or number)",
        ),
        (
            "    allow:\n      - { allocated: false }\n",
            10,
            "spec.devices.allow[0].allocated",
            "allocated must be true (omit the rule to allow nothing)",
        ),
        (
            "    allow:\n      - { allocated: true, kind: nvidiactl }\n",
            10,
            "spec.devices.allow[0]",
            "give exactly one of kind, device, path or allocated (found kind, allocated)",
        ),
        (
            "    deny:\n      - { kind: nvidiactl, index: 1 }\n",
            10,
            "spec.devices.deny[0].index",
            "index is only valid with kind nvidia-gpu or nvidia-mig",
        ),
        (
            "    deny:\n      - { kind: nvidia-gpu, instance: 1 }\n",
            10,
            "spec.devices.deny[0].instance",
            "instance is only valid with kind nvidia-mig",
        ),
        (
            "    deny:\n      - { kind: nvidia-mig, instance: 1 }\n",
            10,
            "spec.devices.deny[0].instance",
            "instance needs the GPU's index (instance ids are per GPU)",
        ),
        (
            "    deny:\n      - { kind: nvidiactl, log: true }\n",
            10,
            "spec.devices.deny[0].log",
            "log is only valid on allow rules (denies are always logged)",
        ),
        (
            "    allow:\n      - { kind: nvidia-gpu, access: [execute] }\n",
            10,
            "spec.devices.allow[0].access[0]",
            "unknown device access 'execute', expected read, write or mknod",
        ),
    ] {
        assert_error(&doc(devices), line, field, message);
    }
    let both = errors_of(&doc(
        "    allow:\n      - { kind: nvidiactl, device: \"195:255\" }\n",
    ));
    assert_eq!(
        (both[0].field.as_str(), both[0].message.as_str()),
        (
            "spec.devices.allow[0]",
            "give exactly one of kind, device, path or allocated (found kind, device)"
        )
    );
}

#[test]
fn sockets_follow_the_egress_default_unless_written() {
    let net = |network: &str| parse_one(&format!("{HEAD}  network:\n{network}")).sockets;
    let deny_all = Some(SocketRules {
        default: DefaultAction::Deny,
        allow: vec![],
        deny: vec![],
    });
    assert_eq!(net("    egress: {default: deny}\n"), deny_all);
    assert_eq!(net("    egress: {default: allow}\n"), None);
    assert_eq!(
        net("    egress: {default: deny}\n    sockets:\n      allow: [raw, icmp]\n"),
        Some(SocketRules {
            default: DefaultAction::Deny,
            allow: vec![
                SocketRule {
                    kind: SocketKind::Raw,
                    line: 11
                },
                SocketRule {
                    kind: SocketKind::Icmp,
                    line: 11
                },
            ],
            deny: vec![],
        })
    );
    // On its own, the section defaults to allow, as egress does.
    assert_eq!(
        net("    sockets:\n      deny: [inet-other]\n"),
        Some(SocketRules {
            default: DefaultAction::Allow,
            allow: vec![],
            deny: vec![SocketRule {
                kind: SocketKind::InetOther,
                line: 10
            }],
        })
    );
    assert_spec_error(
        "  network:\n    sockets:\n      allow: [netlink]\n",
        10,
        "spec.network.sockets.allow[0]",
        "unknown socket kind 'netlink', expected raw, icmp, inet-other or packet",
    );
}
