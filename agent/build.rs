//! Builds the eBPF programs (`agent-ebpf`) for the BPF target with the nightly
//! toolchain and bpf-linker, and leaves the object in `OUT_DIR/portcullis`,
//! which `loader.rs` embeds. `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("agent-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // With AYA_BUILD_SKIP=1 (clippy, docs, pure unit tests) aya-build builds
    // nothing; leave an empty object so the crate still compiles. The loader
    // refuses an empty object with a clear error.
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?).join("portcullis");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        && !out.exists()
    {
        std::fs::write(&out, []).with_context(|| format!("writing {}", out.display()))?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "portcullis-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
