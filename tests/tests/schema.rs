//! The published JSON Schemas (`schemas/`) are what `portcullis schema`
//! derives from the Rust types, and they agree with `portcullis validate`:
//! every bundled policy and policy test passes both, and broken documents
//! fail both. Checked with Python's `jsonschema` (the Draft 2020-12
//! validator editors' tooling uses), from the venv `cargo xtask setup`
//! makes for kubernetes-validate.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Skips where the repository's schemas/ is not around (the VM matrix runs
/// the test executables without the source tree).
fn schemas_dir() -> Option<PathBuf> {
    let d = repo().join("schemas");
    if d.join("host-policy.schema.json").exists() {
        Some(d)
    } else {
        portcullis_tests::skip(
            "schemas/ is not present (test executable run outside the repository)",
        );
        None
    }
}

#[test]
fn the_published_schemas_are_the_generated_ones() {
    let Some(dir) = schemas_dir() else { return };
    for kind in ["host-policy", "policy-test"] {
        let out = portcullis_tests::agent_cli(&["schema", kind]);
        assert!(out.status.success());
        let published = std::fs::read_to_string(dir.join(format!("{kind}.schema.json"))).unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout) == published,
            "schemas/{kind}.schema.json is stale: run `portcullis schema {kind} > schemas/{kind}.schema.json`"
        );
    }
}

fn python() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let py = home.join(".cache/portcullis/k8s-validate/bin/python");
    if py.exists() {
        Some(py)
    } else {
        portcullis_tests::skip("no Python jsonschema (run `cargo xtask setup`)");
        None
    }
}

/// For each YAML document of `file`: `None` when `schema` accepts it, or
/// the validator's first complaint.
fn schema_check(py: &Path, schema: &Path, file: &Path) -> Vec<Option<String>> {
    const CHECK: &str = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
v = jsonschema.Draft202012Validator(schema)
for doc in yaml.safe_load_all(open(sys.argv[2])):
    if doc is None:
        continue
    errs = sorted(v.iter_errors(doc), key=lambda e: list(e.path))
    print(json.dumps(None if not errs else "%s: %s" % ("/".join(map(str, errs[0].path)), errs[0].message)))
"#;
    let out = Command::new(py)
        .args(["-c", CHECK])
        .arg(schema)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn schemas_and_validate_agree_on_the_bundled_and_on_broken_documents() {
    let (Some(dir), Some(py)) = (schemas_dir(), python()) else {
        return;
    };
    let host = dir.join("host-policy.schema.json");
    let tests = dir.join("policy-test.schema.json");
    let root = repo().join("policies");
    let mut policies = yaml_files(&root);
    policies.extend(yaml_files(&root.join("examples")));
    for f in &policies {
        assert!(
            portcullis_tests::agent_cli(&["validate", f.to_str().unwrap()])
                .status
                .success(),
            "{f:?}"
        );
        for (i, r) in schema_check(&py, &host, f).into_iter().enumerate() {
            assert_eq!(r, None, "{f:?} document {i}");
        }
    }
    for f in yaml_files(&root.join("tests")) {
        for r in schema_check(&py, &tests, &f) {
            assert_eq!(r, None, "{f:?}");
        }
    }

    // Broken in shape: validate and the schema both refuse each.
    let head = "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: broken\n";
    let sel = "spec:\n  selector:\n    cgroupPath: \"/x/**\"\n";
    let broken = [
        format!("{head}{sel}  egres:\n    default: deny\n"),
        format!(
            "{head}spec:\n  mode: enforcing\n  selector:\n    cgroupPath: \"/x/**\"\n  exec:\n    default: deny\n"
        ),
        format!("{head}spec:\n  exec:\n    default: deny\n"),
        format!("{head}{sel}  files:\n    - {{ path: /etc/x, access: write }}\n"),
        format!(
            "{head}{sel}  network:\n    egress:\n      deny:\n        - {{ cidr: 10.0.0.0/8, ports: [0] }}\n"
        ),
        format!("{head}{sel}  devices:\n    allow:\n      - {{ kind: nvidia-gpus }}\n"),
        format!("{head}{sel}  network:\n    sockets:\n      allow: [netlink]\n"),
        format!("{head}{sel}  exec:\n    default: sometimes\n"),
        format!(
            "apiVersion: portcullis.dev/v2\nkind: HostPolicy\nmetadata:\n  name: broken\n{sel}  exec:\n    default: deny\n"
        ),
        format!("{head}{sel}  files:\n    - {{ path: /etc/x, access: read, onlyFrom: [] }}\n"),
    ];
    let tmp = portcullis_tests::TempDir::new("schema-broken");
    for (i, doc) in broken.iter().enumerate() {
        let f = tmp.path(&format!("broken-{i}.yaml"));
        std::fs::write(&f, doc).unwrap();
        assert!(
            !portcullis_tests::agent_cli(&["validate", f.to_str().unwrap()])
                .status
                .success(),
            "validate accepted broken {i}:\n{doc}"
        );
        let r = schema_check(&py, &host, &f);
        assert!(r[0].is_some(), "the schema accepted broken {i}:\n{doc}");
    }
}
