//! The kernel programs against the real kernel: real cgroups, real
//! syscalls, no mocks. Run as root:
//! `cargo test -p portcullis --test kernel -- --test-threads=1`.
//!
//! Each test makes its own cgroup (random name), loads its own copy of the
//! programs and maps identity 7 to its cgroup only, so tests do not see each
//! other's policies. Children are forked, move themselves into the cgroup
//! and make the syscall; the test synchronises on their exit status and on
//! the ring buffer, never on sleeps.

#[path = "support/skip.rs"]
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs,
    net::{Ipv4Addr, TcpListener},
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::maps::{HashMap, LpmTrie, MapData, RingBuf, lpm_trie::Key};
use nix::{
    sys::{
        signal::Signal,
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Uid, fork},
};
use portcullis::{
    compile::kernel_dev,
    evaluate,
    loader::{self, Backend, Kernel, LoadOptions},
};
use portcullis_common::{
    ACCESS_READ, ACCESS_WRITE, ACTION_CONNECT, ACTION_EXEC, ACTION_OPEN, BACKEND_CGROUP_SOCK_ADDR,
    BACKEND_TRACEPOINT_KILL, EVENT_DECISION, Event, HAS_EXEC, HAS_FILES, HAS_NET, IdentityConfig,
    InodeKey, InodeRule, InodeRuleSet, MAP_EVENTS, MAP_EXEC_RULES, MAP_FILE_RULES, MAP_IDENTITIES,
    MAP_IDENTITY_CFG, MAP_NET_RULES, MAP_ONLY_FROM, MODE_ENFORCE, NET_KEY_DATA_LEN, NetRule,
    NetRuleSet, PROG_CGROUP_MKDIR, PROG_CONNECT4, PROG_CONNECT6, PROG_DEVICE, PROG_EXEC_TP,
    PROG_EXEC_TP_TWIN, PROG_OPEN_TP, PROG_OPEN_TP_TWIN, PROG_SENDMSG4, PROG_SENDMSG6,
    PROG_SOCK_CREATE, RULE_ID_DEFAULT, RULE_LOG_ALLOW, RULE_SUBTREE, VERDICT_ALLOW, VERDICT_DENY,
};

const IDENTITY: u32 = 7;

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Skips (loudly) when not root: loading programs needs it.
fn require_root() -> bool {
    if !Uid::effective().is_root() {
        support::skip("kernel tests need root");
        return false;
    }
    true
}

/// A cgroup v2 directory removed on drop (its processes moved to the root).
struct TestCgroup {
    root: PathBuf,
    path: PathBuf,
    id: u64,
}

impl TestCgroup {
    fn new() -> Self {
        let root = portcullis::cgroup::v2_root().expect("cgroup v2 is mounted");
        Self::under(&root, &root, &unique("portcullis-test"))
    }

    fn under(root: &Path, parent: &Path, name: &str) -> Self {
        let path = parent.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let id = fs::metadata(&path).unwrap().ino();
        Self {
            root: root.into(),
            path,
            id,
        }
    }

    fn child(&self, name: &str) -> Self {
        Self::under(&self.root, &self.path, name)
    }

    /// Forks a child that joins this cgroup and runs `f`, whose return
    /// value is its exit code. `f` must only make async-signal-safe calls
    /// (the test process is multi-threaded).
    fn run(&self, f: impl FnOnce() -> i32) -> WaitStatus {
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        // SAFETY: the child only makes raw syscalls before _exit.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                // SAFETY: raw syscalls on valid buffers.
                unsafe {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    // "0" moves the writing process.
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        libc::_exit(120);
                    }
                    libc::close(fd);
                    libc::_exit(f())
                }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique("portcullis-kt"));
        fs::create_dir(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A bind mount undone on drop.
struct BindMount(PathBuf);

impl BindMount {
    fn new(src: &Path, dst: &Path) -> Self {
        fs::create_dir_all(dst).unwrap();
        nix::mount::mount(
            Some(src),
            dst,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount");
        Self(dst.into())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn load(cg: &TestCgroup, cfg: IdentityConfig) -> Kernel {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut opts = LoadOptions::new(&cg.root);
    // The LSM path is tested under QEMU (VM-HARNESS.md); here the fallback
    // is the one that must work.
    opts.force_fallback = true;
    let mut k = loader::load(&opts).expect("programs load and attach");
    assert_eq!(k.backends.connect, Backend::CgroupSockAddr);
    assert_eq!(k.backends.exec, Backend::TracepointKill);
    assert_eq!(k.backends.open, Backend::TracepointKill);
    let mut ids: HashMap<_, u64, u32> =
        HashMap::try_from(k.ebpf.map_mut(MAP_IDENTITIES).unwrap()).unwrap();
    ids.insert(cg.id, IDENTITY, 0).unwrap();
    let mut cfgs: HashMap<_, u32, IdentityConfig> =
        HashMap::try_from(k.ebpf.map_mut(MAP_IDENTITY_CFG).unwrap()).unwrap();
    cfgs.insert(IDENTITY, cfg, 0).unwrap();
    k
}

/// The kernel's encoding of a device number (`MKDEV`), as map keys use it.
fn inode_key(path: &Path) -> InodeKey {
    let m = fs::metadata(path).unwrap();
    InodeKey {
        identity: IDENTITY,
        dev: kernel_dev(m.dev()),
        ino: m.ino(),
    }
}

fn deny_all_rule(rule_id: u32) -> InodeRuleSet {
    let mut set = InodeRuleSet::default();
    set.count = 1;
    set.rules[0] = InodeRule {
        allow_mask: 0,
        rule_id,
        mode: MODE_ENFORCE,
        ..InodeRule::default()
    };
    set
}

fn add_inode_rule(k: &mut Kernel, map: &str, path: &Path, set: InodeRuleSet) {
    let mut rules: HashMap<_, InodeKey, InodeRuleSet> =
        HashMap::try_from(k.ebpf.map_mut(map).unwrap()).unwrap();
    rules.insert(inode_key(path), set, 0).unwrap();
}

/// Decision events of this test's identity (drains the ring buffer).
fn decisions(k: &mut Kernel) -> Vec<Event> {
    let mut rb = RingBuf::try_from(k.ebpf.map_mut(MAP_EVENTS).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        assert_eq!(item.len(), size_of::<Event>());
        // SAFETY: the programs write whole `Event`s; read unaligned.
        let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        if e.kind == EVENT_DECISION && e.identity == IDENTITY {
            out.push(e);
        }
    }
    out
}

fn name(n: &[u8]) -> &str {
    std::str::from_utf8(&n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())]).unwrap()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Exit code of a child that ran `connect_v4`.
fn connect_v4(addr: Ipv4Addr, port: u16) -> i32 {
    // SAFETY: raw syscalls on a stack sockaddr.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return 100;
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.octets()),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        if r == 0 { 0 } else { errno() }
    }
}

fn net_key(addr: Ipv4Addr, prefix: u32) -> Key<[u8; NET_KEY_DATA_LEN]> {
    let mut data = [0u8; NET_KEY_DATA_LEN];
    data[..4].copy_from_slice(&IDENTITY.to_be_bytes());
    data[14] = 0xff;
    data[15] = 0xff;
    data[16..].copy_from_slice(&addr.octets());
    Key::new(32 + 96 + prefix, data)
}

fn deny_port_rule(port: u16, rule_id: u32) -> NetRuleSet {
    let mut set = NetRuleSet::default();
    set.count = 1;
    set.rules[0] = NetRule {
        port_lo: port,
        port_hi: port,
        proto: libc::IPPROTO_TCP as u8,
        verdict: VERDICT_DENY,
        mode: MODE_ENFORCE,
        policy_bit: 0,
        rule_id,
        flags: 0,
    };
    set
}

#[test]
fn programs_load_and_attach() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let k = load(&cg, IdentityConfig::default());
    // Counted in the kernel: the programs it holds for us and the links
    // that attach them, not what the object file declares.
    let ours: std::collections::HashMap<u32, String> = k
        .ebpf
        .programs()
        .filter_map(|(name, p)| Some((p.info().ok()?.id(), name.to_owned())))
        .collect();
    let mut attached: Vec<&str> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter_map(|l| ours.get(&l.program_id()).map(String::as_str))
        .collect();
    attached.sort_unstable();
    assert_eq!(
        attached,
        [
            PROG_CGROUP_MKDIR,
            PROG_CONNECT4,
            PROG_CONNECT6,
            PROG_DEVICE,
            PROG_EXEC_TP,
            PROG_EXEC_TP_TWIN,
            PROG_OPEN_TP,
            PROG_OPEN_TP,
            PROG_OPEN_TP,
            PROG_OPEN_TP,
            PROG_OPEN_TP,
            PROG_OPEN_TP,
            PROG_OPEN_TP_TWIN,
            PROG_SENDMSG4,
            PROG_SENDMSG6,
            PROG_SOCK_CREATE
        ],
        "each fallback program loaded and attached once per hook (open_tp: the five open calls and io_uring_setup)"
    );
    drop(k);
    // A test running beside this one may fork between our attach and this
    // drop: its child holds a copy of every link fd until it execs (they
    // are close-on-exec), so the last reference can outlive the drop by a
    // moment. A pinned or leaked link would outlive any wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let still_attached = || {
        aya::programs::loaded_links()
            .filter_map(Result::ok)
            .any(|l| ours.contains_key(&l.program_id()))
    };
    while still_attached() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!still_attached(), "unpinned links detach with the agent");
}

#[test]
fn connect_denied_by_rule_gets_eperm_and_logs() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let other = TestCgroup::new();
    let mut k = load(
        &cg,
        IdentityConfig {
            flags: HAS_NET,
            ..Default::default()
        },
    );
    let denied = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dport = denied.local_addr().unwrap().port();
    let aport = allowed.local_addr().unwrap().port();
    {
        let mut rules: LpmTrie<&mut MapData, [u8; NET_KEY_DATA_LEN], NetRuleSet> =
            LpmTrie::try_from(k.ebpf.map_mut(MAP_NET_RULES).unwrap()).unwrap();
        rules
            .insert(
                &net_key(Ipv4Addr::LOCALHOST, 32),
                deny_port_rule(dport, 42),
                0,
            )
            .unwrap();
    }
    let lo = Ipv4Addr::LOCALHOST;
    assert_eq!(exit_code(cg.run(|| connect_v4(lo, dport))), libc::EPERM);
    // Unrelated port: allowed.
    assert_eq!(exit_code(cg.run(|| connect_v4(lo, aport))), 0);
    // Another cgroup: unaffected.
    assert_eq!(exit_code(other.run(|| connect_v4(lo, dport))), 0);
    // A sub-cgroup nobody classified takes its parent's identity.
    let sub = cg.child("sub");
    assert_eq!(exit_code(sub.run(|| connect_v4(lo, dport))), libc::EPERM);

    let events = decisions(&mut k);
    assert_eq!(events.len(), 2, "one event per deny");
    let e = events[0];
    assert_eq!(
        (e.action, e.verdict, e.backend),
        (ACTION_CONNECT, VERDICT_DENY, BACKEND_CGROUP_SOCK_ADDR)
    );
    assert_eq!((e.rule_id, e.port, e.proto, e.family), (42, dport, 6, 4));
    assert_eq!(e.cgroup_id, cg.id);
    assert_eq!(e.addr[10..], [0xff, 0xff, 127, 0, 0, 1]);
    assert_eq!(events[1].cgroup_id, sub.id);
    drop(sub);
}

#[test]
fn connect_default_deny_allows_only_listed() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let mut k = load(
        &cg,
        IdentityConfig {
            flags: HAS_NET,
            net_deny_enforce: 1 << 3,
            ..Default::default()
        },
    );
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let aport = allowed.local_addr().unwrap().port();
    let oport = other.local_addr().unwrap().port();
    {
        let mut set = deny_port_rule(aport, 5);
        set.rules[0].verdict = VERDICT_ALLOW;
        set.rules[0].policy_bit = 3;
        let mut rules: LpmTrie<&mut MapData, [u8; NET_KEY_DATA_LEN], NetRuleSet> =
            LpmTrie::try_from(k.ebpf.map_mut(MAP_NET_RULES).unwrap()).unwrap();
        rules
            .insert(&net_key(Ipv4Addr::new(127, 0, 0, 0), 8), set, 0)
            .unwrap();
    }
    let lo = Ipv4Addr::LOCALHOST;
    assert_eq!(exit_code(cg.run(|| connect_v4(lo, aport))), 0);
    assert_eq!(exit_code(cg.run(|| connect_v4(lo, oport))), libc::EPERM);
    let events = decisions(&mut k);
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].rule_id, events[0].policy_bit),
        (RULE_ID_DEFAULT, 3)
    );
}

fn exit_code(s: WaitStatus) -> i32 {
    match s {
        WaitStatus::Exited(_, c) => c,
        other => panic!("child did not exit normally: {other:?}"),
    }
}

fn killed(s: WaitStatus) -> bool {
    matches!(s, WaitStatus::Signaled(_, Signal::SIGKILL, _))
}

/// Execs `path` with no arguments; 127 if the exec itself failed.
fn execv(path: &CString) -> i32 {
    let argv = [path.as_ptr(), std::ptr::null()];
    // SAFETY: NUL-terminated argv of valid C strings.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    127
}

/// A copy of `/bin/true` at `<dir>/bin/t` and the exec hook loaded for `cg`.
fn exec_fixture(cg: &TestCgroup) -> (TempDir, PathBuf, Kernel) {
    let dir = TempDir::new();
    fs::create_dir(dir.0.join("bin")).unwrap();
    let bin = dir.0.join("bin/t");
    fs::copy("/bin/true", &bin).unwrap();
    let k = load(
        cg,
        IdentityConfig {
            flags: HAS_EXEC,
            ..Default::default()
        },
    );
    (dir, bin, k)
}

#[test]
fn exec_of_denied_binary_is_killed() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let dir = TempDir::new();
    let denied = dir.0.join("denied-true");
    let allowed = dir.0.join("allowed-true");
    fs::copy("/bin/true", &denied).unwrap();
    fs::copy("/bin/true", &allowed).unwrap();
    let mut k = load(
        &cg,
        IdentityConfig {
            flags: HAS_EXEC,
            ..Default::default()
        },
    );
    add_inode_rule(&mut k, MAP_EXEC_RULES, &denied, deny_all_rule(77));

    let exec = |p: &Path| {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        move || execv(&c)
    };
    let s = cg.run(exec(&denied));
    assert!(killed(s), "denied exec: {s:?}");
    assert_eq!(exit_code(cg.run(exec(&allowed))), 0);

    let events = decisions(&mut k);
    assert_eq!(events.len(), 1);
    let e = events[0];
    let key = inode_key(&denied);
    assert_eq!(
        (e.action, e.verdict, e.backend),
        (ACTION_EXEC, VERDICT_DENY, BACKEND_TRACEPOINT_KILL)
    );
    assert_eq!(
        (e.rule_id, e.dev, e.ino, e.depth),
        (77, key.dev, key.ino, 0)
    );
    assert_eq!(name(&e.names[0]), "denied-true");
    assert_eq!(name(&e.names[3]), denied.to_str().unwrap());
}

#[test]
fn exec_subtree_rule_applies_below_directory() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let (dir, bin, mut k) = exec_fixture(&cg);
    let mut set = deny_all_rule(9);
    add_inode_rule(&mut k, MAP_EXEC_RULES, &dir.0, set);
    let c = CString::new(bin.as_os_str().as_bytes()).unwrap();
    let run = || execv(&c);
    // Without RULE_SUBTREE a directory rule does not govern its contents.
    assert_eq!(exit_code(cg.run(run)), 0);
    set.rules[0].flags = portcullis_common::RULE_SUBTREE;
    add_inode_rule(&mut k, MAP_EXEC_RULES, &dir.0, set);
    assert!(killed(cg.run(run)));
    let events = decisions(&mut k);
    assert_eq!(events.last().map(|e| (e.rule_id, e.depth)), Some((9, 2)));
}

/// Several enforce rules of one level deny: the first one is reported, and
/// the walk stops there (the subtree rule above is not consulted), on every
/// kernel. Several *audit* denies: the first is reported on every kernel
/// too (before the walk state moved into a map, verifiers older than 6.7
/// dropped the "nothing recorded yet" check and 6.1 reported the last).
#[test]
fn first_denying_rule_is_reported() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let (dir, bin, mut k) = exec_fixture(&cg);
    let mut set = deny_all_rule(31);
    set.count = 2;
    set.rules[1] = InodeRule {
        rule_id: 32,
        ..set.rules[0]
    };
    add_inode_rule(&mut k, MAP_EXEC_RULES, &bin, set);
    let mut dir_set = deny_all_rule(33);
    dir_set.rules[0].flags = portcullis_common::RULE_SUBTREE;
    add_inode_rule(&mut k, MAP_EXEC_RULES, &dir.0, dir_set);
    let c = CString::new(bin.as_os_str().as_bytes()).unwrap();
    let s = cg.run(|| execv(&c));
    assert!(killed(s), "{s:?}");
    let events = decisions(&mut k);
    assert_eq!(
        events
            .iter()
            .map(|e| (e.rule_id, e.depth))
            .collect::<Vec<_>>(),
        vec![(31, 0)]
    );

    // Audit mode: allowed, logged with verdict audit.
    let mut audit = deny_all_rule(41);
    audit.rules[0].mode = portcullis_common::MODE_AUDIT;
    audit.count = 2;
    audit.rules[1] = InodeRule {
        rule_id: 42,
        ..audit.rules[0]
    };
    add_inode_rule(&mut k, MAP_EXEC_RULES, &bin, audit);
    let mut empty = InodeRuleSet::default();
    empty.count = 0;
    add_inode_rule(&mut k, MAP_EXEC_RULES, &dir.0, empty);
    let s = cg.run(|| execv(&c));
    assert_eq!(exit_code(s), 0);
    let reported = 41;
    assert_eq!(
        decisions(&mut k)
            .iter()
            .map(|e| (e.verdict, e.rule_id))
            .collect::<Vec<_>>(),
        vec![(portcullis_common::VERDICT_AUDIT, reported)]
    );
}

/// Opens `path` read-only (relative to `cwd` when given) and reads a byte.
fn open_read(path: &CString, cwd: Option<&CString>) -> i32 {
    // SAFETY: raw syscalls on valid buffers.
    unsafe {
        if let Some(d) = cwd
            && libc::chdir(d.as_ptr()) != 0
        {
            return 101;
        }
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return 102;
        }
        let mut b = [0u8; 1];
        if libc::read(fd, b.as_mut_ptr().cast(), 1) != 1 {
            return 103;
        }
        // Reaching here means the process survived with the data.
        0
    }
}

#[test]
fn open_of_denied_file_is_killed_by_every_path() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let dir = TempDir::new();
    let data = dir.0.join("data");
    fs::create_dir(&data).unwrap();
    let secret = data.join("secret");
    let public = data.join("public");
    fs::write(&secret, "s").unwrap();
    fs::write(&public, "p").unwrap();
    let link = dir.0.join("link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let bind = BindMount::new(&data, &dir.0.join("bind"));
    let mut k = load(
        &cg,
        IdentityConfig {
            flags: HAS_FILES,
            ..Default::default()
        },
    );
    add_inode_rule(&mut k, MAP_FILE_RULES, &secret, deny_all_rule(55));

    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let (secret_c, public_c, link_c) = (c(&secret), c(&public), c(&link));
    let bind_c = c(&bind.0.join("secret"));
    let rel = CString::new("secret").unwrap();
    let data_c = c(&data);

    assert_eq!(exit_code(cg.run(|| open_read(&public_c, None))), 0);
    for (what, p, cwd) in [
        ("absolute", &secret_c, None),
        ("symlink", &link_c, None),
        ("bind mount", &bind_c, None),
        ("relative", &rel, Some(&data_c)),
    ] {
        let s = cg.run(|| open_read(p, cwd));
        assert!(killed(s), "open through {what}: {s:?}");
    }
    // Outside the cgroup the same file opens.
    let other = TestCgroup::new();
    assert_eq!(exit_code(other.run(|| open_read(&secret_c, None))), 0);

    let events = decisions(&mut k);
    assert_eq!(events.len(), 4, "one event per denied open");
    let key = inode_key(&secret);
    for e in events {
        assert_eq!(
            (e.action, e.verdict, e.backend),
            (ACTION_OPEN, VERDICT_DENY, BACKEND_TRACEPOINT_KILL)
        );
        assert_eq!(
            (e.rule_id, e.dev, e.ino, e.access),
            (55, key.dev, key.ino, ACCESS_READ)
        );
        assert_eq!(name(&e.names[0]), "secret");
        assert_eq!(name(&e.names[1]), "data");
    }
}

/// The host evaluator (`portcullis::evaluate`, used by policy tests and
/// `explain`) and the kernel decide alike: random rule sets over a small
/// tree, real opens from the cgroup, the same verdict, rule, policy and
/// level from both, and an event exactly when the host says one is due.
#[test]
fn host_evaluator_and_kernel_agree_on_random_file_rules() {
    if !require_root() {
        return;
    }
    let cg = TestCgroup::new();
    let dir = TempDir::new();
    let mut nodes = vec![dir.0.clone()];
    let mut files = Vec::new();
    let mut here = dir.0.clone();
    for level in 0..3 {
        here = here.join(format!("d{level}"));
        fs::create_dir(&here).unwrap();
        let f = here.join("f");
        fs::write(&f, "x").unwrap();
        nodes.push(here.clone());
        nodes.push(f.clone());
        files.push(f);
    }
    let mut k = load(
        &cg,
        IdentityConfig {
            flags: HAS_FILES,
            ..Default::default()
        },
    );
    // The forked children run this test binary: onlyFrom set 1 holds it,
    // set 2 another file.
    let exe = fs::metadata("/proc/self/exe").unwrap();
    let exe = (kernel_dev(exe.dev()), exe.ino());
    let other = inode_key(&files[0]);
    let only_from = BTreeSet::from([
        InodeKey {
            identity: 1,
            dev: exe.0,
            ino: exe.1,
        },
        InodeKey {
            identity: 2,
            ..other
        },
    ]);
    {
        let mut of: HashMap<_, InodeKey, u32> =
            HashMap::try_from(k.ebpf.map_mut(MAP_ONLY_FROM).unwrap()).unwrap();
        for key in &only_from {
            of.insert(key, 1, 0).unwrap();
        }
    }
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
    let targets: Vec<_> = files
        .iter()
        .map(|f| (c(f), evaluate::levels(f).unwrap()))
        .collect();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut x = seed;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut compared, mut logged, mut denied) = (0, 0, 0);
    for round in 0..150 {
        let mut rules = BTreeMap::new();
        let mut rule_id = 1;
        for node in &nodes {
            let n = next(6).saturating_sub(2) as usize;
            if n == 0 {
                continue;
            }
            let mut set = InodeRuleSet {
                count: n as u32,
                ..Default::default()
            };
            for r in &mut set.rules[..n] {
                *r = InodeRule {
                    allow_mask: [
                        0,
                        ACCESS_READ,
                        ACCESS_READ | ACCESS_WRITE,
                        ACCESS_READ | ACCESS_WRITE,
                    ][next(4) as usize],
                    only_from: [0, 0, 0, 1, 2][next(5) as usize],
                    flags: (next(2) as u32 * RULE_SUBTREE)
                        | if next(4) == 0 { RULE_LOG_ALLOW } else { 0 },
                    rule_id,
                    mode: next(2) as u8,
                    policy_bit: next(3) as u8,
                    _pad: [0; 2],
                };
                rule_id += 1;
            }
            rules.insert(inode_key(node), set);
        }
        {
            let mut map: HashMap<_, InodeKey, InodeRuleSet> =
                HashMap::try_from(k.ebpf.map_mut(MAP_FILE_RULES).unwrap()).unwrap();
            let stale: Vec<_> = map.keys().map(Result::unwrap).collect();
            for key in stale {
                map.remove(&key).unwrap();
            }
            for (key, set) in &rules {
                map.insert(key, set, 0).unwrap();
            }
        }
        for (path, levels) in &targets {
            for (flags, requested) in [
                (libc::O_RDONLY, ACCESS_READ),
                (libc::O_RDWR, ACCESS_READ | ACCESS_WRITE),
            ] {
                let host = evaluate::decide_inode(
                    &rules,
                    &only_from,
                    &evaluate::InodeRequest {
                        identity: IDENTITY,
                        requested,
                        exe,
                        active: u32::MAX,
                        deny_enforce: 0,
                        deny_audit: 0,
                        levels,
                    },
                );
                let case = format!(
                    "seed {seed:#x} round {round} {path:?} access {requested}: host {host:?}, rules {rules:?}"
                );
                // SAFETY: raw syscalls on a valid path.
                let status = cg.run(|| unsafe {
                    if libc::open(path.as_ptr(), flags) < 0 {
                        102
                    } else {
                        0
                    }
                });
                assert_eq!(killed(status), host.verdict == VERDICT_DENY, "{case}");
                denied += killed(status) as u32;
                if !killed(status) {
                    assert_eq!(exit_code(status), 0, "{case}");
                }
                let events = decisions(&mut k);
                if host.emits() {
                    assert_eq!(events.len(), 1, "{case}");
                    let e = &events[0];
                    assert_eq!(
                        (e.verdict, e.rule_id, e.policy_bit, e.depth),
                        (
                            host.verdict,
                            host.hit.rule_id,
                            host.hit.policy_bit,
                            host.hit.depth
                        ),
                        "{case}"
                    );
                    logged += 1;
                } else {
                    assert!(events.is_empty(), "{case}: {} events", events.len());
                }
                compared += 1;
            }
        }
    }
    eprintln!("seed {seed:#x}: {compared} opens compared, {logged} with an event, {denied} denied");
    // Both outcomes, and silent allows, each well represented.
    assert!(
        denied > compared / 5 && logged < compared * 9 / 10,
        "seed {seed:#x}"
    );
}
