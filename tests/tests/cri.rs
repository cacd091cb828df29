//! Kubernetes pod identity against real parts: a real containerd with its
//! CRI plugin, real runc, pod sandboxes and containers created through CRI
//! exactly as the kubelet creates them (labels, namespace, cgroup parent,
//! host network), a locally built image (no registry is reachable), and the
//! real agent asking that containerd for metadata over its socket.
//!
//! What stands in for the kubelet: this test calls RunPodSandbox /
//! CreateContainer / StartContainer itself, writes the service account
//! token the kubelet would project under a scratch `--kubelet-root`, and
//! uses the cgroupfs driver (no systemd runs here). No CNI: the pods use the
//! host network namespace.
//!
//! Exec and file rules name host inodes, so the files the policy names are
//! bind-mounted into both containers (as hostPath volumes would be).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use portcullis::pod::cri::{
    ContainerConfig, ContainerMetadata, CriClient, Device, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount,
    NAMESPACE_MODE_NODE, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
};
use portcullis_tests::{
    Agent, EPERM, Listener, Outcome, TempDir, cgroup_root, probe_dir, require_kernel, unique,
};

const IMAGE: &str = "localhost/portcullis/busybox:test";

/// One containerd at a time: each test runs its own runtime and agent, and
/// on two cores three of each at once only measures the scheduler.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why this machine cannot run a real containerd, if it cannot.
fn missing_parts() -> Option<String> {
    for bin in ["containerd", "ctr", "runc", "tar", "sha256sum"] {
        if Command::new("which")
            .arg(bin)
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Some(format!(
                "`{bin}` is not installed (cargo xtask setup installs containerd and runc)"
            ));
        }
    }
    let busybox = busybox_path()?;
    let bytes = std::fs::read(&busybox).ok()?;
    if has_interpreter(&bytes) {
        return Some(format!(
            "{} is dynamically linked (install busybox-static)",
            busybox.display()
        ));
    }
    None
}

/// Whether an ELF64 file has a PT_INTERP header (needs a dynamic loader,
/// which the image does not have).
fn has_interpreter(elf: &[u8]) -> bool {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        elf.get(phoff + i * phentsize..phoff + i * phentsize + 4) == Some(&3u32.to_le_bytes()[..])
    })
}

fn busybox_path() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> (String, u64) {
    let out = run(Command::new("sha256sum").arg(path));
    let digest = out.split_whitespace().next().unwrap().to_string();
    (digest, std::fs::metadata(path).unwrap().len())
}

/// An OCI image archive holding static busybox, built from nothing: one
/// layer, a config whose entrypoint sleeps (it is also the sandbox image,
/// the "pause" container), a manifest and an index naming it [`IMAGE`].
fn build_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    let blobs = dir.join("oci/blobs/sha256");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    std::fs::create_dir_all(rootfs.join("mnt/shared")).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::copy(busybox_path().unwrap(), rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "nc", "sleep", "true", "echo"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();

    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    let (layer_digest, layer_size) = sha256(&layer);
    std::fs::rename(&layer, blobs.join(&layer_digest)).unwrap();

    let blob = |name: &str, value: serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, value.to_string()).unwrap();
        let (digest, size) = sha256(&path);
        std::fs::rename(&path, blobs.join(&digest)).unwrap();
        (digest, size)
    };
    let (config_digest, config_size) = blob(
        "config.json",
        serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/bin/sleep", "1000000"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        }),
    );
    let (manifest_digest, manifest_size) = blob(
        "manifest.json",
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{config_digest}"), "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
        }),
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
                       "annotations": {"io.containerd.image.name": IMAGE,
                                       "org.opencontainers.image.ref.name": "test"}}],
    });
    std::fs::write(dir.join("oci/index.json"), index.to_string()).unwrap();
    std::fs::write(
        dir.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join("image.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(dir.join("oci"))
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    archive
}

/// A private containerd (own root, state and socket) with the CRI plugin.
struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    client: CriClient,
    sandboxes: Vec<String>,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  # This machine withholds CAP_SYS_RESOURCE, so the sandbox's default
  # oom_score_adj of -998 cannot be written (runc: "can't get final child's
  # PID from pipe: EOF"; crun: "write to /proc/self/oom_score_adj:
  # Permission denied"). Clamp to containerd's own, as rootless setups do.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{runtime}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
            d = dir.display(),
            sock = socket.display(),
            runtime = std::env::var("PORTCULLIS_OCI_RUNTIME").unwrap_or_else(|_| "runc".into()),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (child, client) = Self::launch(dir, &socket, &rt);
        Self {
            child,
            socket,
            dir: dir.to_path_buf(),
            rt,
            client,
            sandboxes: Vec::new(),
        }
    }

    /// Starts containerd on the config in `dir` and waits for its CRI.
    fn launch(dir: &Path, socket: &Path, rt: &tokio::runtime::Runtime) -> (Child, CriClient) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("containerd.log"))
            .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let start = Instant::now();
        let client = loop {
            let attempt = rt.block_on(async {
                let mut c = CriClient::connect(socket.to_path_buf(), Duration::from_secs(30))
                    .await
                    .ok()?;
                c.version().await.ok()?;
                Some(c)
            });
            if let Some(c) = attempt {
                break c;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "containerd's CRI did not answer on {}:\n{}",
                socket.display(),
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        (child, client)
    }

    /// Stops containerd (SIGTERM); the pods' shims and containers keep
    /// running, as on a node where the runtime restarts.
    fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }

    /// Starts containerd again on the same root and state: it recovers the
    /// running pods.
    fn restart(&mut self) {
        let (child, client) = Self::launch(&self.dir, &self.socket, &self.rt);
        self.child = child;
        self.client = client;
    }

    fn import(&self, archive: &Path) {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(archive));
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let mut client = self.client.clone();
        for id in std::mem::take(&mut self.sandboxes) {
            let _ = self.rt.block_on(client.stop_pod_sandbox(&id));
            let _ = self.rt.block_on(client.remove_pod_sandbox(&id));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // A test that failed while containerd was stopped leaves its pods'
        // shims behind (the containers go with the cgroup tree, see
        // `CgroupTree`): end the shims this containerd started (their
        // command line names our socket), then detach the rootfs mounts.
        let socket = self.socket.display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("/usr/bin/containerd-shim") && cmdline.contains(&socket) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let dir = self.dir.display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .filter(|m| m.starts_with(&dir))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// One pod with one container, created as the kubelet would.
struct Pod {
    uid: String,
    sandbox: String,
    container: String,
    cgroup_parent: String,
}

struct PodSpec<'a> {
    name: &'a str,
    namespace: &'a str,
    service_account: &'a str,
    labels: &'a [(&'a str, &'a str)],
    container: &'a str,
    /// The container's command, run by `sh -c`.
    script: String,
    /// A pod UID chosen by the caller (a pod the "kubelet" already set up).
    uid: Option<String>,
    /// A privileged pod (its container sees every host device).
    privileged: bool,
    /// Device nodes "the kubelet" passes in (a device plugin's allocation).
    devices: Vec<Device>,
}

fn pod_uid() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let h = format!(
        "{:032x}",
        n ^ (u128::from(std::process::id()) << 64) ^ rand_bits()
    );
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn rand_bits() -> u128 {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u128::from_le_bytes(b)
}

fn create_pod(
    ctrd: &mut Containerd,
    top: &str,
    spec: &PodSpec,
    shared: &Path,
    kubelet_root: &Path,
) -> Pod {
    let uid = spec.uid.clone().unwrap_or_else(pod_uid);
    // The kubelet sets up the pod's volumes (the token among them) before
    // it asks the runtime for the sandbox.
    project_token(kubelet_root, &uid, spec.namespace, spec.service_account);
    let cgroup_parent = format!("/{top}/kubepods/besteffort/pod{uid}");
    let mut labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // What the kubelet adds to every sandbox.
    labels.insert("io.kubernetes.pod.name".into(), spec.name.into());
    labels.insert("io.kubernetes.pod.namespace".into(), spec.namespace.into());
    labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
    let host_ns = NamespaceOption {
        network: NAMESPACE_MODE_NODE,
        pid: 0,
        ipc: 0,
    };
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: spec.name.into(),
            uid: uid.clone(),
            namespace: spec.namespace.into(),
            attempt: 0,
        }),
        // Host-network pods keep the node's hostname (no UTS namespace).
        hostname: String::new(),
        labels,
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.clone(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(host_ns.clone()),
                privileged: spec.privileged,
            }),
        }),
        ..Default::default()
    };
    let mut client = ctrd.client.clone();
    let sandbox = ctrd
        .rt
        .block_on(client.run_pod_sandbox(sandbox_config.clone()))
        .unwrap_or_else(|e| panic!("RunPodSandbox {}: {e}\n{}", spec.name, ctrd.log()));
    ctrd.sandboxes.push(sandbox.clone());
    let container_config = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: spec.container.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
        }),
        command: vec!["/bin/sh".into(), "-c".into(), spec.script.clone()],
        mounts: vec![Mount {
            container_path: "/mnt/shared".into(),
            host_path: shared.display().to_string(),
            readonly: true,
        }],
        devices: spec.devices.clone(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(host_ns),
                privileged: spec.privileged,
            }),
        }),
        ..Default::default()
    };
    let container = ctrd
        .rt
        .block_on(client.create_container(&sandbox, container_config, sandbox_config))
        .unwrap_or_else(|e| panic!("CreateContainer {}: {e}\n{}", spec.container, ctrd.log()));
    ctrd.rt
        .block_on(client.start_container(&container))
        .unwrap_or_else(|e| panic!("StartContainer {}: {e}\n{}", spec.container, ctrd.log()));
    Pod {
        uid,
        sandbox,
        container,
        cgroup_parent,
    }
}

/// Runs `script` with `sh -c` in the container (CRI ExecSync, which joins
/// the container's cgroups as `kubectl exec` does) and returns its stdout
/// and stderr.
fn exec(ctrd: &Containerd, pod: &Pod, script: &str) -> String {
    let mut client = ctrd.client.clone();
    let r = ctrd
        .rt
        .block_on(client.exec_sync(&pod.container, &["/bin/sh", "-c", script], 20))
        .unwrap_or_else(|e| panic!("ExecSync {script}: {e}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    )
}

/// The service account token the kubelet would project for `uid`.
fn project_token(kubelet_root: &Path, uid: &str, namespace: &str, account: &str) {
    let dir = kubelet_root.join(format!(
        "pods/{uid}/volumes/kubernetes.io~projected/kube-api-access-test"
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("token"),
        portcullis::pod::service_account::fake_token(namespace, account),
    )
    .unwrap();
}

/// The test's cgroup tree in every hierarchy, removed on drop (runc leaves
/// the pod-level parents it created). Declared before [`Containerd`] so it
/// drops after the pods are gone.
struct CgroupTree(String);

impl Drop for CgroupTree {
    fn drop(&mut self) {
        // Ends any container process a failed test left (cgroup.kill, Linux
        // 5.14+, kills the whole subtree) so the directories can go.
        let v2 = cgroup_root().join(&self.0);
        if std::fs::write(v2.join("cgroup.kill"), "1").is_ok() {
            let start = Instant::now();
            while std::fs::read_to_string(v2.join("cgroup.events"))
                .is_ok_and(|e| e.contains("populated 1"))
                && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        remove_cgroups(&self.0);
    }
}

/// Removes `top` from every cgroup hierarchy, deepest first.
fn remove_cgroups(top: &str) {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(top))
        .collect();
    roots.push(cgroup_root().join(top));
    for root in roots {
        let mut dirs = Vec::new();
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(
                    rd.filter_map(|e| e.ok())
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
                dirs.push(d);
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The real parts one CRI test needs: a scratch directory, a cgroup subtree
/// of its own, a kubelet root, the directory shared into containers, and a
/// containerd with the test image imported. Fields drop in this order: the
/// runtime first, then the cgroups, then the scratch directory.
struct Node {
    ctrd: Containerd,
    _tree: CgroupTree,
    top: String,
    kubelet_root: PathBuf,
    shared: PathBuf,
    _tmp: TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Node {
    /// `None`, after printing SKIP and why, when a part is missing here.
    fn start(name: &str) -> Option<Self> {
        if let Some(why) = missing_parts() {
            portcullis_tests::skip(&format!("cri: {why}"));
            return None;
        }
        let serial = serial();
        let tmp = TempDir::new(name);
        eprintln!("scratch: {}", tmp.0.display());
        let top = unique("portcullis-k8s");
        let tree = CgroupTree(top.clone());
        let (kubelet_root, shared) = (tmp.path("kubelet"), tmp.path("shared"));
        std::fs::create_dir_all(&kubelet_root).unwrap();
        std::fs::create_dir_all(&shared).unwrap();
        let image = build_image(&tmp.path("image"));
        let ctrd_dir = tmp.path("containerd");
        std::fs::create_dir_all(&ctrd_dir).unwrap();
        let ctrd = Containerd::start(&ctrd_dir);
        ctrd.import(&image);
        Some(Node {
            ctrd,
            _tree: tree,
            top,
            kubelet_root,
            shared,
            _tmp: tmp,
            _serial: serial,
        })
    }

    /// (cgroup subtree, shared directory, kubelet root).
    fn paths(&self) -> (String, PathBuf, PathBuf) {
        (
            self.top.clone(),
            self.shared.clone(),
            self.kubelet_root.clone(),
        )
    }
}

/// The agent on `policy`, reading pods from `ctrd` and tokens from
/// `kubelet_root`, rescanning every second.
fn cri_agent(policy: &str, ctrd: &Containerd, kubelet_root: &Path) -> Agent {
    let socket = ctrd.socket.display().to_string();
    let kubelet = kubelet_root.display().to_string();
    Agent::start_with(
        policy,
        &[
            "--cri-socket",
            &socket,
            "--kubelet-root",
            &kubelet,
            "--rescan-interval",
            "1",
        ],
    )
}

#[test]
fn pod_label_selector_blocks_connect_exec_open_in_the_selected_container_only() {
    require_kernel!();
    let Some(mut node) = Node::start("cri") else {
        return;
    };
    let (top, shared, kubelet_root) = node.paths();
    let ctrd = &mut node.ctrd;
    std::fs::write(shared.join("secret.txt"), "model weights\n").unwrap();
    // Busybox picks its applet by the name it runs under, hence `true`.
    std::fs::create_dir_all(shared.join("bin")).unwrap();
    std::fs::copy(busybox_path().unwrap(), shared.join("bin/true")).unwrap();
    let listener = Listener::new("127.0.0.1");
    let second = Listener::new("127.0.0.1");

    let policy = format!(
        r#"apiVersion: portcullis.dev/v1alpha1
kind: HostPolicy
metadata: {{name: triton-lockdown}}
spec:
  selector:
    podLabels: {{app: triton}}
  network:
    egress:
      deny:
        - {{cidr: 127.0.0.1/32, ports: ["{port}"], protocol: tcp}}
  exec:
    deny: ["{shared}/bin/true"]
  files:
    - {{path: "{shared}/secret.txt", access: none}}
---
apiVersion: portcullis.dev/v1alpha1
kind: HostPolicy
metadata: {{name: builders}}
spec:
  selector:
    namespace: ml
    serviceAccount: builder
    container: worker
    podLabels:
      matchExpressions:
        - {{key: app, operator: NotIn, values: [triton]}}
  network:
    egress:
      deny:
        - {{cidr: 127.0.0.1/32, ports: ["{second}"], protocol: tcp}}
"#,
        port = listener.port,
        second = second.port,
        shared = shared.display(),
    );
    let mut agent = cri_agent(&policy, ctrd, &kubelet_root);
    let identities_before = agent.metric("portcullis_map_entries{map=\"identities\"}");

    // Both pods start after the agent: governed from their first exec. The
    // container's own first act is the connect the policy denies (no exec
    // from outside, no waiting): it must already be denied.
    let first_connect = format!(
        "nc -w 2 127.0.0.1 {} </dev/null >/tmp/first 2>&1; echo rc=$? >>/tmp/first; exec sleep 1000000",
        listener.port
    );
    let triton_spec = PodSpec {
        name: "triton-0",
        namespace: "ml",
        service_account: "triton",
        labels: &[("app", "triton")],
        container: "server",
        script: first_connect.clone(),
        uid: None,
        privileged: false,
        devices: vec![],
    };
    let neighbour_spec = PodSpec {
        name: "builder-0",
        namespace: "ml",
        service_account: "builder",
        labels: &[("app", "builder")],
        container: "worker",
        script: first_connect.clone(),
        uid: None,
        privileged: false,
        devices: vec![],
    };
    let triton = create_pod(ctrd, &top, &triton_spec, &shared, &kubelet_root);
    let neighbour = create_pod(ctrd, &top, &neighbour_spec, &shared, &kubelet_root);
    eprintln!(
        "triton pod {} container {} (cgroup parent {})",
        triton.uid, triton.container, triton.cgroup_parent
    );

    let connect = |pod: &Pod, port: u16| {
        exec(
            ctrd,
            pod,
            &format!("nc -w 2 127.0.0.1 {port} </dev/null; echo rc=$?"),
        )
    };
    let open = |pod: &Pod| exec(ctrd, pod, "cat /mnt/shared/secret.txt; echo rc=$?");
    let run_forbidden = |pod: &Pod| exec(ctrd, pod, "/mnt/shared/bin/true; echo rc=$?");

    let first = |pod: &Pod| {
        let start = Instant::now();
        loop {
            let out = exec(ctrd, pod, "cat /tmp/first 2>/dev/null");
            if out.contains("rc=") || start.elapsed() > Duration::from_secs(10) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let out = first(&triton);
    assert!(
        out.contains("Operation not permitted") && out.contains("rc=1"),
        "triton's entrypoint connect: {out}\n{}",
        agent.log()
    );
    assert!(
        first(&neighbour).ends_with("rc=0\n"),
        "neighbour's entrypoint connect"
    );

    // Operations from `kubectl exec`-style processes.
    let out = connect(&triton, listener.port);
    assert!(
        out.contains("Operation not permitted") && out.contains("rc=1"),
        "triton connect: {out}\n{}",
        agent.log()
    );
    let out = connect(&neighbour, listener.port);
    assert!(out.ends_with("rc=0\n"), "neighbour connect: {out}");

    let denied_backend = agent.backend("open");
    let out = open(&triton);
    if denied_backend == "lsm" {
        assert!(
            out.contains("Operation not permitted") && out.contains("rc=1"),
            "triton open: {out}"
        );
    } else {
        assert!(
            out.contains("rc=137") && !out.contains("model weights"),
            "triton open: {out}"
        );
    }
    let out = open(&neighbour);
    assert!(
        out.contains("model weights") && out.ends_with("rc=0\n"),
        "neighbour open: {out}"
    );

    let out = run_forbidden(&triton);
    if agent.backend("exec") == "lsm" {
        assert!(out.contains("rc=126"), "triton exec: {out}");
    } else {
        assert!(out.contains("rc=137"), "triton exec: {out}");
    }
    let out = run_forbidden(&neighbour);
    assert!(out.ends_with("rc=0\n"), "neighbour exec: {out}");

    // The decision log names the container's cgroup.
    let d = agent.wait_decision("triton connect deny", |d| {
        d["action"] == "connect"
            && d["workload"]["cgroup"]
                .as_str()
                .is_some_and(|c| c.contains(&triton.container))
    });
    assert_eq!(d["policy"], "triton-lockdown");
    // ... and the pod and container, from the runtime's metadata.
    let pod = &d["workload"]["pod"];
    assert_eq!(
        (
            pod["namespace"].as_str(),
            pod["name"].as_str(),
            pod["uid"].as_str()
        ),
        (Some("ml"), Some("triton-0"), Some(triton.uid.as_str())),
        "{d}"
    );
    assert_eq!(pod["container"], "server", "{d}");

    // namespace + serviceAccount + container + NotIn: the neighbour's worker
    // container, and never triton.
    let out = connect(&neighbour, second.port);
    assert!(
        out.contains("Operation not permitted") && out.contains("rc=1"),
        "neighbour to the builders' port: {out}\n{}",
        agent.log()
    );
    let out = connect(&triton, second.port);
    assert!(
        out.ends_with("rc=0\n"),
        "triton to the builders' port: {out}"
    );

    // Deleting the pods frees their identity mappings.
    let mut client = ctrd.client.clone();
    for id in std::mem::take(&mut ctrd.sandboxes) {
        ctrd.rt.block_on(client.stop_pod_sandbox(&id)).unwrap();
        ctrd.rt.block_on(client.remove_pod_sandbox(&id)).unwrap();
    }
    remove_cgroups(&top);
    agent.wait_until(
        "identity mappings of deleted pods dropped",
        Duration::from_secs(10),
        |a| a.metric("portcullis_map_entries{map=\"identities\"}") <= identities_before,
    );
    let _ = (&triton.sandbox, &neighbour.sandbox);
}

/// "Only the GPUs the scheduler gave it": two privileged pods (so the
/// runtime's own device rules allow everything and only ours decide), each
/// with one GPU passed in by "the kubelet" as a device plugin would. The
/// policy allows each container its allocated devices and lets it create
/// any GPU node, nothing more: in each pod its own GPU opens (ENXIO: no
/// driver behind the number) through the node the runtime made and a node
/// made with mknod, and the other pod's GPU is EPERM, however it is reached.
/// A reload allowing every GPU opens it.
#[test]
fn allocated_devices_rule_admits_exactly_the_containers_own_devices() {
    require_kernel!();
    let Some(mut node) = Node::start("cri-gpu") else {
        return;
    };
    let (top, shared, kubelet_root) = node.paths();
    let ctrd = &mut node.ctrd;
    for minor in [0, 1] {
        let path = shared.join(format!("nvidia{minor}"));
        nix::sys::stat::mknod(
            &path,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(195, minor),
        )
        .unwrap();
    }
    let policy = |extra: &str| {
        format!(
            r#"apiVersion: portcullis.dev/v1alpha1
kind: HostPolicy
metadata: {{name: gpu-tenants}}
spec:
  selector:
    podLabels: {{app: gpu-tenant}}
  devices:
    default: deny
    allow:
      - {{allocated: true}}
      - {{device: "c 195:*", access: [mknod]}}
      # What every container needs: /dev/null and friends, ttys, ptys.
      - {{device: "c 1:*"}}
      - {{device: "c 5:*"}}
      - {{device: "c 136:*"}}
{extra}"#
        )
    };
    let mut agent = cri_agent(&policy(""), ctrd, &kubelet_root);
    let tenant = |name: &'static str, minor: u32| PodSpec {
        name,
        namespace: "ml",
        service_account: "trainer",
        labels: &[("app", "gpu-tenant")],
        container: "trainer",
        script: "exec sleep 1000000".into(),
        uid: None,
        privileged: true,
        devices: vec![Device {
            container_path: format!("/dev/nvidia{minor}"),
            host_path: shared.join(format!("nvidia{minor}")).display().to_string(),
            permissions: "rw".into(),
        }],
    };
    let a = create_pod(ctrd, &top, &tenant("tenant-a", 0), &shared, &kubelet_root);
    let b = create_pod(ctrd, &top, &tenant("tenant-b", 1), &shared, &kubelet_root);
    // `cat` says why it cannot open: ENXIO is an allowed open of a number
    // with no driver behind it, EPERM our deny.
    let try_open = |pod: &Pod, path: &str| {
        exec(
            ctrd,
            pod,
            &format!("cat {path} 2>&1 </dev/null; echo rc=$?"),
        )
    };
    let allowed = "No such device or address";
    let denied = "Operation not permitted";
    for (pod, own, other) in [(&a, 0, 1), (&b, 1, 0)] {
        let out = exec(
            ctrd,
            pod,
            "busybox mknod /tmp/g0 c 195 0 && busybox mknod /tmp/g1 c 195 1; echo rc=$?",
        );
        assert!(out.ends_with("rc=0\n"), "mknod: {out}\n{}", agent.log());
        for path in [format!("/dev/nvidia{own}"), format!("/tmp/g{own}")] {
            let out = try_open(pod, &path);
            assert!(
                out.contains(allowed),
                "own GPU {path}: {out}\n{}",
                agent.log()
            );
        }
        let out = try_open(pod, &format!("/tmp/g{other}"));
        assert!(
            out.contains(denied),
            "the other pod's GPU: {out}\n{}",
            agent.log()
        );
    }
    let d = agent.wait_decision("a device deny in tenant-a", |d| {
        d["action"] == "device"
            && d["target"]["device"] == "c 195:1"
            && d["workload"]["pod"]["name"] == "tenant-a"
    });
    assert_eq!(d["policy"], "gpu-tenants", "{d}");

    assert!(agent.reload(&policy("      - {kind: nvidia-gpu}\n")));
    let out = try_open(&a, "/tmp/g1");
    assert!(
        out.contains(allowed),
        "every GPU allowed now: {out}\n{}",
        agent.log()
    );

    let mut client = ctrd.client.clone();
    for id in std::mem::take(&mut ctrd.sandboxes) {
        ctrd.rt.block_on(client.stop_pod_sandbox(&id)).unwrap();
        ctrd.rt.block_on(client.remove_pod_sandbox(&id)).unwrap();
    }
    remove_cgroups(&top);
}

/// The agent starts while the runtime is down (a node where containerd
/// restarts): pods are governed by path meanwhile (their ancestors'
/// identity), and once the runtime answers again the agent re-reads every
/// pod and their pod selectors apply, without a restart or a policy edit.
#[test]
fn pod_selectors_apply_once_an_unreachable_runtime_answers_again() {
    require_kernel!();
    let Some(mut node) = Node::start("cri-restart") else {
        return;
    };
    let (top, shared, kubelet_root) = node.paths();
    let ctrd = &mut node.ctrd;
    let listener = Listener::new("127.0.0.1");
    let spec = PodSpec {
        name: "triton-1",
        namespace: "ml",
        service_account: "triton",
        labels: &[("app", "triton")],
        container: "server",
        script: "exec sleep 1000000".into(),
        uid: None,
        privileged: false,
        devices: vec![],
    };
    let pod = create_pod(ctrd, &top, &spec, &shared, &kubelet_root);
    let container_cgroup = cgroup_root()
        .join(pod.cgroup_parent.trim_start_matches('/'))
        .join(&pod.container);
    assert!(container_cgroup.is_dir(), "{}", container_cgroup.display());

    ctrd.stop();
    let policy = format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: triton}}\nspec:\n  selector:\n    podLabels: {{app: triton}}\n  network:\n    egress:\n      deny: [{{cidr: 127.0.0.1/32, ports: [\"{}\"]}}]\n",
        listener.port
    );
    let agent = cri_agent(&policy, ctrd, &kubelet_root);
    // A process in the container's cgroup (joined from the host, as the
    // kernel sees it the same).
    let connect = || {
        probe_dir(
            &container_cgroup,
            None,
            &["connect", "127.0.0.1", &listener.port.to_string()],
        )
    };
    let out = connect();
    assert_eq!(out, Outcome::Ok(0), "runtime down: classified by path only");
    assert!(
        agent.log().contains("CRI runtime unavailable"),
        "{}",
        agent.log()
    );

    ctrd.restart();
    let start = Instant::now();
    loop {
        let out = connect();
        if out == Outcome::Errno(EPERM) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "pod selector never applied after the runtime came back: {out:?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        agent.log().contains("CRI runtime reachable again"),
        "{}",
        agent.log()
    );
}

/// The kubelet creates a pod's cgroup and projects its service account token
/// before it asks the runtime for the sandbox. In that gap the pod gets its
/// namespace's policies (namespace and service account come from the
/// token), never a free pass; label selectors apply once the runtime
/// reports the pod.
#[test]
fn namespace_default_applies_before_the_runtime_reports_the_pod() {
    require_kernel!();
    let Some(mut node) = Node::start("cri-ns") else {
        return;
    };
    let (top, shared, kubelet_root) = node.paths();
    let ctrd = &mut node.ctrd;
    let (ns_port, label_port) = (Listener::new("127.0.0.1"), Listener::new("127.0.0.1"));
    let policy = format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: ml-namespace}}\nspec:\n  selector: {{namespace: ml, serviceAccount: triton}}\n  network:\n    egress:\n      deny: [{{cidr: 127.0.0.1/32, ports: [\"{}\"]}}]\n---\napiVersion: portcullis.dev/v1alpha1\nkind: HostPolicy\nmetadata: {{name: triton}}\nspec:\n  selector: {{podLabels: {{app: triton}}}}\n  network:\n    egress:\n      deny: [{{cidr: 127.0.0.1/32, ports: [\"{}\"]}}]\n",
        ns_port.port, label_port.port
    );
    let agent = cri_agent(&policy, ctrd, &kubelet_root);

    // The kubelet's part: token, then the pod-level cgroup.
    let uid = pod_uid();
    project_token(&kubelet_root, &uid, "ml", "triton");
    let pod_cgroup = cgroup_root().join(format!("{top}/kubepods/besteffort/pod{uid}"));
    std::fs::create_dir_all(&pod_cgroup).unwrap();
    let connect = |port: u16| {
        probe_dir(
            &pod_cgroup,
            None,
            &["connect", "127.0.0.1", &port.to_string()],
        )
    };
    let eperm = Outcome::Errno(EPERM);
    let start = Instant::now();
    while connect(ns_port.port) != eperm {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "namespace policy never applied to the pod-level cgroup\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        connect(label_port.port),
        Outcome::Ok(0),
        "labels are not known yet"
    );

    // The runtime's part: the sandbox, in the cgroup the kubelet made.
    let spec = PodSpec {
        name: "triton-2",
        namespace: "ml",
        service_account: "triton",
        labels: &[("app", "triton")],
        container: "server",
        script: "exec sleep 1000000".into(),
        uid: Some(uid.clone()),
        privileged: false,
        devices: vec![],
    };
    create_pod(ctrd, &top, &spec, &shared, &kubelet_root);
    let start = Instant::now();
    while connect(label_port.port) != eperm {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "label policy never applied once the runtime reported the pod\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        connect(ns_port.port),
        eperm,
        "namespace policy still applies"
    );
}
