//! The CLI as security engineers use it in CI: `portcullis validate`.

use std::process::Command;

fn agent() -> Command {
    let bin = std::env::var("PORTCULLIS_BIN")
        .unwrap_or_else(|_| format!("{}/../target/debug/portcullis", env!("CARGO_MANIFEST_DIR")));
    Command::new(bin)
}

#[test]
fn validate_accepts_the_bundled_policies() {
    let root = format!("{}/..", env!("CARGO_MANIFEST_DIR"));
    for path in ["policies", "policies/examples"] {
        let out = agent()
            .arg("validate")
            .arg(format!("{root}/{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn validate_names_file_line_column_and_field_of_every_error() {
    let tmp = portcullis_tests::TempDir::new("validate");
    let file = tmp.path("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: bad\nspec:\n  selector:\n    cgroupPath: \"/x/**\"\n  network:\n    egress:\n      allow:\n        - { cidr: 10.0.0.0/33 }\n  colour: blue\n",
    )
    .unwrap();
    let out = agent().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    assert!(
        stderr.contains(&format!("{f}:11:")),
        "cidr error names line 11:\n{stderr}"
    );
    assert!(
        stderr.contains("spec.network.egress.allow[0].cidr"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{f}:12:")),
        "unknown field names line 12:\n{stderr}"
    );
    assert!(stderr.contains("colour"), "{stderr}");
}
