//! Egress peer: nftables with a cgroup v2 socket match holding the same
//! allow set as the agent's egress policy (default deny).
//!
//! A dropped SYN on the output hook is retransmitted until the connect times
//! out (measured here: `ETIMEDOUT` after minutes), so a blocker that wants a
//! prompt failure rejects instead: `reject with tcp reset`, which the caller
//! sees as `ECONNREFUSED` (Portcullis returns `EPERM` without a packet).

use std::{fmt::Write as _, io::Write as _, path::Path, process::Command, process::Stdio};

use anyhow::{Context as _, Result, bail};

use super::super::workload::{ALLOWED_IP, filler_cidr};

const TABLE: &str = "portcullis_bench_peer";

/// nft resolves `socket cgroupv2` paths below `/sys/fs/cgroup` only; on a
/// hybrid host the v2 tree is at `/sys/fs/cgroup/unified`, so the path it
/// needs is the one relative to `/sys/fs/cgroup`.
pub fn cgroup_arg(cgroup_dir: &Path) -> Result<String> {
    let rel = cgroup_dir
        .strip_prefix("/sys/fs/cgroup")
        .context("nft matches cgroups below /sys/fs/cgroup only")?;
    Ok(rel.to_string_lossy().into_owned())
}

/// Loads the table: `n` filler /32s plus the loopback target allowed, every
/// other TCP destination of the cgroup (at `level`) rejected.
pub fn load(cgroup_rel: &str, level: u32, n: usize) -> Result<()> {
    let mut elems = format!("{ALLOWED_IP}/32");
    for i in 0..n {
        let _ = write!(elems, ", {}", filler_cidr(i));
    }
    let script = format!(
        "table inet {TABLE} {{\n\
         set allow4 {{ type ipv4_addr; flags interval; elements = {{ {elems} }} }}\n\
         chain out {{ type filter hook output priority 0; policy accept;\n\
         socket cgroupv2 level {level} \"{cgroup_rel}\" meta l4proto tcp ip daddr != @allow4 reject with tcp reset\n\
         }}\n}}\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (apt-get install -y nftables)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn unload() {
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", TABLE])
        .stderr(Stdio::null())
        .status();
}

pub fn version() -> String {
    Command::new("nft")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "nft not found".into())
}
