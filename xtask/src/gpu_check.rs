//! `cargo xtask gpu-check`: the device rules on a real NVIDIA node, where
//! the test suite (which has no GPU) cannot reach. Lists the GPUs the
//! driver reports, runs the agent with a policy that allows GPU 0 only to a
//! scratch cgroup, and opens every `/dev/nvidiaN` from that cgroup: GPU 0
//! must not get EPERM, every other GPU must.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

struct Gpu {
    bus: String,
    minor: u32,
    uuid: String,
}

fn gpus() -> Result<Vec<Gpu>> {
    let dir = Path::new("/proc/driver/nvidia/gpus");
    let mut buses: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "no NVIDIA driver here ({} is missing): run this on a GPU node",
                dir.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    buses.sort();
    let mut out = Vec::new();
    for bus in buses {
        let info = std::fs::read_to_string(bus.join("information"))?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == name).then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        };
        out.push(Gpu {
            bus: bus.file_name().unwrap_or_default().to_string_lossy().into(),
            minor: field("Device Minor").parse().context("Device Minor")?,
            uuid: field("GPU UUID"),
        });
    }
    Ok(out)
}

fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.starts_with("HTTP/1.1 200")
}

pub fn run(root: &Path) -> Result<()> {
    let gpus = gpus()?;
    if gpus.is_empty() {
        bail!("the NVIDIA driver reports no GPU");
    }
    for (i, g) in gpus.iter().enumerate() {
        eprintln!(
            "gpu-check: GPU {i}: bus {} minor {} {}",
            g.bus, g.minor, g.uuid
        );
    }
    crate::cargo(root, &["build", "--bins"])?;
    let scratch = std::env::temp_dir().join(format!("portcullis-gpu-check-{}", std::process::id()));
    std::fs::create_dir_all(scratch.join("policies"))?;
    let cgroup = Path::new("/sys/fs/cgroup/portcullis-gpu-check");
    std::fs::create_dir_all(cgroup).context("creating the scratch cgroup (needs root)")?;
    // Deny beats allow, so the other GPUs are denied by number rather than
    // all GPUs denied and GPU 0 allowed.
    let others: String = gpus
        .iter()
        .skip(1)
        .map(|g| format!("      - {{ device: \"195:{}\" }}\n", g.minor))
        .collect();
    std::fs::write(
        scratch.join("policies/gpu-check.yaml"),
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata:\n  name: gpu-check\nspec:\n  selector:\n    cgroupPath: /portcullis-gpu-check\n  devices:\n    default: allow\n    deny:\n{}",
            if others.is_empty() {
                "      []\n".into()
            } else {
                others
            }
        ),
    )?;
    let port = 19_090;
    let mut agent = Command::new(root.join("target/debug/portcullis"))
        .args(["run", "--no-pin", "--policy"])
        .arg(scratch.join("policies"))
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .arg("--decisions-file")
        .arg(scratch.join("decisions.jsonl"))
        .stdin(Stdio::null())
        .spawn()
        .context("starting the agent")?;
    let started = Instant::now();
    while !ready(port) {
        if started.elapsed() > Duration::from_secs(60) {
            let _ = agent.kill();
            bail!("the agent did not become ready");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut wrong = 0;
    for (i, g) in gpus.iter().enumerate() {
        let node = format!("/dev/nvidia{}", g.minor);
        let out = Command::new(root.join("target/debug/portcullis-probe"))
            .arg(cgroup)
            .args(["read", &node])
            .output()?;
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let eperm = serde_json::from_str::<serde_json::Value>(&line)
            .is_ok_and(|v| v["errno"] == libc::EPERM);
        let expected = i != 0;
        let verdict = if eperm == expected { "ok" } else { "WRONG" };
        eprintln!(
            "gpu-check: open {node} (GPU {i}) from the cgroup: {line}: {} expected, {verdict}",
            if expected { "EPERM" } else { "no EPERM" }
        );
        wrong += usize::from(eperm != expected);
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = std::fs::remove_dir(cgroup);
    eprintln!(
        "gpu-check: decision lines in {}",
        scratch.join("decisions.jsonl").display()
    );
    if wrong > 0 {
        bail!("{wrong} GPU opens got the wrong answer");
    }
    eprintln!("gpu-check: every GPU got the answer the policy gives");
    Ok(())
}
