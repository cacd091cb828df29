//! Device rules against the real kernel, without a GPU: device nodes made
//! with `mknod` using NVIDIA's real numbers, and a stand-in for the driver's
//! procfs (`--host-proc`). With no driver behind the numbers an allowed open
//! fails with ENXIO and a denied one with EPERM, so the two are told apart.

use std::path::Path;

use portcullis_tests::{
    Agent, Cgroup, EPERM, Outcome, TempDir, policy_header, probe, require_kernel,
};

const ENXIO: i32 = libc::ENXIO;

/// A GPU node's procfs as the agent reads it: GPU 0 is minor 0
/// (GPU-bbbb), GPU 1 is minor 1 (GPU-aaaa), nvidia-uvm has major 509,
/// and GPU 1 is split into MIG instances 1 and 2, whose capability nodes
/// are nvidia-caps (major 510) minors 12 and 21.
fn fake_proc(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("devices"),
        "Character devices:\n  1 mem\n195 nvidia\n509 nvidia-uvm\n510 nvidia-caps\n\nBlock devices:\n  8 sd\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("driver/nvidia-caps")).unwrap();
    std::fs::write(
        dir.join("driver/nvidia-caps/mig-minors"),
        "config 1\nmonitor 2\ngpu1/gi1/access 12\ngpu1/gi2/access 21\n",
    )
    .unwrap();
    for (bus, minor, uuid) in [
        ("0000:17:00.0", 0, "GPU-bbbb"),
        ("0000:3b:00.0", 1, "GPU-aaaa"),
    ] {
        let g = dir.join("driver/nvidia/gpus").join(bus);
        std::fs::create_dir_all(&g).unwrap();
        std::fs::write(
            g.join("information"),
            format!("Model: \t\t Tesla T4\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"),
        )
        .unwrap();
    }
}

fn mknod(path: &Path, major: u64, minor: u64) {
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(major, minor),
    )
    .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
}

fn gpu_policy(cg: &Cgroup, allow: &str) -> String {
    format!(
        "{}  devices:\n    default: deny\n    allow:\n{allow}    deny:\n      - {{ kind: nvidia-uvm-tools }}\n",
        policy_header("gpus", "enforce", &cg.path)
    )
}

#[test]
fn a_workload_opens_only_the_gpus_its_policy_names_through_any_node() {
    require_kernel!();
    let tmp = TempDir::new("devices");
    fake_proc(&tmp.path("proc"));
    std::fs::create_dir_all(tmp.path("dev")).unwrap();
    std::fs::create_dir_all(tmp.path("scratch")).unwrap();
    for (name, major, minor) in [
        ("nvidia0", 195, 0),
        ("nvidia1", 195, 1),
        ("nvidiactl", 195, 255),
        ("nvidia-uvm", 509, 0),
        ("nvidia-uvm-tools", 509, 1),
    ] {
        mknod(&tmp.path(&format!("dev/{name}")), major, minor);
    }
    let cg = Cgroup::create("gpu");
    let other = Cgroup::create("gpu-bystander");
    let only_gpu0 = "      - { kind: nvidia-gpu, index: 0 }\n      - { kind: nvidiactl }\n      - { kind: nvidia-uvm }\n";
    let mut agent = Agent::start_with(
        &gpu_policy(&cg, only_gpu0),
        &["--host-proc", &tmp.str("proc")],
    );
    assert_eq!(agent.backend("device"), "cgroup_device");
    let open = |cg: &Cgroup, node: &str| probe(cg, &["read", &tmp.str(node)]);
    assert_eq!(open(&cg, "dev/nvidia1"), Outcome::Errno(EPERM), "GPU 1");
    assert_eq!(open(&cg, "dev/nvidia0"), Outcome::Errno(ENXIO), "GPU 0");
    assert_eq!(open(&cg, "dev/nvidiactl"), Outcome::Errno(ENXIO));
    assert_eq!(open(&cg, "dev/nvidia-uvm"), Outcome::Errno(ENXIO));
    assert_eq!(open(&cg, "dev/nvidia-uvm-tools"), Outcome::Errno(EPERM));
    assert_eq!(
        open(&other, "dev/nvidia1"),
        Outcome::Errno(ENXIO),
        "ungoverned"
    );

    // Device numbers, not inodes: a node re-created elsewhere is the same
    // device, and the workload cannot make one either.
    mknod(&tmp.path("scratch/gpu1-copy"), 195, 1);
    assert_eq!(open(&cg, "scratch/gpu1-copy"), Outcome::Errno(EPERM));
    let make = |name: &str, minor: &str| probe(&cg, &["mknod", &tmp.str(name), "195", minor]);
    assert_eq!(make("scratch/own-gpu1", "1"), Outcome::Errno(EPERM));
    assert_eq!(make("scratch/own-gpu0", "0"), Outcome::Ok(0));

    let d = agent.wait_decision("device deny line", |d| {
        d["action"] == "device" && d["target"]["device"] == "c 195:1"
    });
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["policy"], "gpus");
    assert_eq!(d["rule"], "default");
    assert_eq!(
        (
            &d["target"]["class"],
            &d["target"]["gpu_index"],
            &d["target"]["gpu_uuid"]
        ),
        (&"nvidia-gpu".into(), &1.into(), &"GPU-aaaa".into())
    );
    assert_eq!(d["target"]["access"], "read");
    assert_eq!(d["backend"], "cgroup_device");
    let tools = agent.wait_decision("uvm-tools deny line", |d| {
        d["target"]["class"] == "nvidia-uvm-tools"
    });
    assert!(
        tools["rule"]
            .as_str()
            .unwrap()
            .starts_with("devices.deny[0] nvidia-uvm-tools"),
        "{tools}"
    );
    assert!(
        agent.metric(r#"portcullis_decisions_total{action="device",verdict="deny",policy="gpus"}"#)
            >= 4.0
    );
    assert_eq!(agent.metric("portcullis_gpus"), 2.0);
}

#[test]
fn mknod_and_gpus_by_uuid_follow_the_policy_and_a_reload() {
    require_kernel!();
    let tmp = TempDir::new("devices-mknod");
    fake_proc(&tmp.path("proc"));
    std::fs::create_dir_all(tmp.path("scratch")).unwrap();
    mknod(&tmp.path("nvidia1"), 195, 1);
    let cg = Cgroup::create("gpu-mknod");
    // GPU 1 by UUID, to read and write only: making its node is denied.
    let by_uuid = "      - { kind: nvidia-gpu, uuid: GPU-aaaa, access: [read, write] }\n";
    let mut agent = Agent::start_with(
        &gpu_policy(&cg, by_uuid),
        &["--host-proc", &tmp.str("proc")],
    );
    assert_eq!(
        probe(&cg, &["read", &tmp.str("nvidia1")]),
        Outcome::Errno(ENXIO)
    );
    assert_eq!(
        probe(&cg, &["mknod", &tmp.str("scratch/n1"), "195", "1"]),
        Outcome::Errno(EPERM)
    );
    // Every GPU, every access: the mknod goes through.
    assert!(agent.reload(&gpu_policy(&cg, "      - { kind: nvidia-gpu }\n")));
    assert_eq!(
        probe(&cg, &["mknod", &tmp.str("scratch/n1"), "195", "1"]),
        Outcome::Ok(0)
    );
    let d = agent.wait_decision("mknod deny line", |d| d["target"]["access"] == "mknod");
    assert_eq!(d["target"]["device"], "c 195:1");
}

/// MIG: a workload given one GPU instance (its parent GPU and that
/// instance's capability node) cannot open the neighbouring instance's
/// capability, on any node made for it; the decision line names it.
#[test]
fn a_mig_instance_is_allowed_by_gpu_index_and_instance() {
    require_kernel!();
    let tmp = TempDir::new("devices-mig");
    fake_proc(&tmp.path("proc"));
    mknod(&tmp.path("nvidia1"), 195, 1);
    mknod(&tmp.path("cap-gi1"), 510, 12);
    mknod(&tmp.path("cap-gi2"), 510, 21);
    let cg = Cgroup::create("gpu-mig");
    let one_instance = "      - { kind: nvidia-gpu, index: 1 }\n      - { kind: nvidia-mig, index: 1, instance: 1 }\n";
    let mut agent = Agent::start_with(
        &gpu_policy(&cg, one_instance),
        &["--host-proc", &tmp.str("proc")],
    );
    let open = |node: &str| probe(&cg, &["read", &tmp.str(node)]);
    assert_eq!(open("nvidia1"), Outcome::Errno(ENXIO));
    assert_eq!(open("cap-gi1"), Outcome::Errno(ENXIO), "its own instance");
    assert_eq!(open("cap-gi2"), Outcome::Errno(EPERM), "the neighbour's");
    let d = agent.wait_decision("MIG deny line", |d| {
        d["action"] == "device" && d["target"]["device"] == "c 510:21"
    });
    assert_eq!(d["target"]["class"], "nvidia-mig", "{d}");
    // Every instance of GPU 1.
    assert!(agent.reload(&gpu_policy(&cg, "      - { kind: nvidia-mig, index: 1 }\n")));
    assert_eq!(open("cap-gi2"), Outcome::Errno(ENXIO));
}
