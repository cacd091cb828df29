//! The red-team suite: a root attacker inside a governed cgroup tries the
//! routes around the policy that the README's "Threat model" lists, each
//! with a real packet and a real listener, and must be refused (or, where
//! the README says the kernel cannot refuse it, recorded).

use std::time::Duration;

use portcullis_tests::{
    Agent, Cgroup, EPERM, Listener, Outcome, TempDir, policy_header, probe, require_kernel,
};

/// An experimental IP protocol number (RFC 3692): nothing else on the host
/// speaks it, so what the listener hears came from the probe.
const PROTO: &str = "253";

/// A raw listener in this (ungoverned) test process: IPv4 protocol 253 on
/// loopback, or (`packet`) frames of the probe's experimental ethertype.
struct RawListener(std::os::fd::OwnedFd);

impl RawListener {
    fn new() -> Self {
        Self::open(libc::AF_INET, libc::SOCK_RAW, 253)
    }

    fn packet() -> Self {
        Self::open(
            libc::AF_PACKET,
            libc::SOCK_DGRAM,
            i32::from(0x88b5u16.to_be()),
        )
    }

    fn open(domain: i32, ty: i32, protocol: i32) -> Self {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain syscalls; the descriptor is owned from here on.
        unsafe {
            let fd = libc::socket(domain, ty, protocol);
            assert!(fd >= 0, "raw listener: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            let rc = libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
            assert_eq!(rc, 0);
            Self(fd)
        }
    }

    /// Whether a packet carrying `payload` arrives within `wait`.
    fn heard(&self, payload: &str, wait: Duration) -> bool {
        let end = std::time::Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < end {
            // SAFETY: `buf` outlives the call.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(&self.0),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if let Ok(n) = usize::try_from(n)
                && buf[..n]
                    .windows(payload.len())
                    .any(|w| w == payload.as_bytes())
            {
                return true;
            }
        }
        false
    }
}

fn network_policy(cg: &Cgroup, network: &str) -> String {
    format!(
        "{}  network:\n    egress:\n      default: deny\n{network}",
        policy_header("redteam", "enforce", &cg.path)
    )
}

#[test]
fn default_deny_egress_refuses_raw_and_icmp_sockets_until_allowed_by_name() {
    require_kernel!();
    let listener = RawListener::new();
    let cg = Cgroup::create("redteam-raw");
    let bystander = Cgroup::create("redteam-raw-bystander");
    let nonce = portcullis_tests::unique("raw");
    let mut agent = Agent::start(&network_policy(&cg, ""));

    // A raw IP socket sends past connect4/sendmsg4, so creating one fails.
    let denied = format!("{nonce}-denied");
    assert_eq!(
        probe(&cg, &["raw-send", "127.0.0.1", PROTO, &denied]),
        Outcome::Errno(EPERM)
    );
    assert_eq!(
        probe(&cg, &["raw-send", "::1", PROTO, &denied]),
        Outcome::Errno(EPERM)
    );
    // An ICMP echo socket too.
    assert_eq!(probe(&cg, &["ping"]), Outcome::Errno(EPERM));
    // The neighbour's policy is not this one: its packet and echo get through.
    let neighbour = format!("{nonce}-neighbour");
    assert!(matches!(
        probe(&bystander, &["raw-send", "127.0.0.1", PROTO, &neighbour]),
        Outcome::Ok(_)
    ));
    assert!(listener.heard(&neighbour, Duration::from_secs(2)));
    assert!(matches!(probe(&bystander, &["ping"]), Outcome::Ok(_)));
    assert!(!listener.heard(&denied, Duration::from_millis(300)));

    let d = agent.wait_decision("raw socket deny line", |d| {
        d["action"] == "socket" && d["target"]["socket"] == "raw"
    });
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["rule"], "default");
    assert_eq!(d["backend"], "cgroup_sock");
    assert_eq!(d["target"]["socket_type"], libc::SOCK_RAW);
    assert_eq!(d["target"]["ip_protocol"], 253);
    assert_eq!(d["workload"]["cgroup"], cg.path.as_str());
    let d = agent.wait_decision("ICMP socket deny line", |d| {
        d["action"] == "socket" && d["target"]["socket"] == "icmp"
    });
    assert_eq!(d["target"]["family"], "inet");
    assert!(
        agent.metric(
            r#"portcullis_decisions_total{action="socket",verdict="deny",policy="redteam"}"#
        ) >= 3.0
    );

    // Allowed by name, the raw packet reaches the listener; ICMP, not named,
    // stays refused.
    assert!(agent.reload(&network_policy(&cg, "    sockets:\n      allow: [raw]\n")));
    let allowed = format!("{nonce}-allowed");
    assert!(matches!(
        probe(&cg, &["raw-send", "127.0.0.1", PROTO, &allowed]),
        Outcome::Ok(_)
    ));
    assert!(listener.heard(&allowed, Duration::from_secs(2)));
    assert_eq!(probe(&cg, &["ping"]), Outcome::Errno(EPERM));

    // Egress allowing everything allows every socket kind.
    assert!(agent.reload(&format!(
        "{}  network:\n    egress:\n      default: allow\n",
        policy_header("redteam", "enforce", &cg.path)
    )));
    assert!(matches!(probe(&cg, &["ping"]), Outcome::Ok(_)));
}

#[test]
fn io_uring_sockets_and_connects_get_the_answers_of_their_syscalls() {
    require_kernel!();
    let allowed = Listener::new("127.0.0.1");
    let denied = Listener::new("127.0.0.1");
    let cg = Cgroup::create("redteam-uring-net");
    let bystander = Cgroup::create("redteam-uring-net-bystander");
    let allow = format!(
        "      allow:\n        - {{cidr: 127.0.0.1/32, ports: [\"{}\"], protocol: tcp}}\n",
        allowed.port
    );
    let mut agent = Agent::start(&network_policy(&cg, &allow));
    let (ok, no) = (allowed.port.to_string(), denied.port.to_string());

    // io_uring makes the socket and the connect in the kernel, on behalf
    // of the task: the same cgroup hooks decide them.
    assert_eq!(probe(&cg, &["uring-socket", "raw"]), Outcome::Errno(EPERM));
    assert_eq!(probe(&cg, &["uring-socket", "raw6"]), Outcome::Errno(EPERM));
    assert_eq!(
        probe(&cg, &["uring-connect", "127.0.0.1", &no]),
        Outcome::Errno(EPERM)
    );
    assert_eq!(
        probe(&cg, &["uring-connect", "127.0.0.1", &ok]),
        Outcome::Ok(0)
    );
    assert_eq!(probe(&cg, &["uring-socket", "tcp"]), Outcome::Ok(0));
    assert_eq!(probe(&bystander, &["uring-socket", "raw"]), Outcome::Ok(0));
    assert_eq!(
        probe(&bystander, &["uring-connect", "127.0.0.1", &no]),
        Outcome::Ok(0)
    );

    let d = agent.wait_decision("io_uring connect deny line", |d| {
        d["action"] == "connect" && d["target"]["port"] == denied.port
    });
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["workload"]["cgroup"], cg.path.as_str());
    agent.wait_decision("io_uring raw socket deny line", |d| {
        d["action"] == "socket" && d["target"]["family"] == "inet6"
    });
}

fn file_policy(cg: &Cgroup, mode: &str, secret: &str) -> String {
    format!(
        "{}  files:\n    - {{ path: \"{secret}\", access: none }}\n",
        policy_header("redteam-files", mode, &cg.path)
    )
}

#[test]
fn io_uring_opens_are_refused_under_file_rules_on_either_backend() {
    require_kernel!();
    let tmp = TempDir::new("redteam-uring-open");
    std::fs::write(tmp.path("secret"), "s").unwrap();
    std::fs::write(tmp.path("public"), "p").unwrap();
    let (secret, public) = (tmp.str("secret"), tmp.str("public"));
    let cg = Cgroup::create("redteam-uring-open");
    let bystander = Cgroup::create("redteam-uring-open-bystander");
    let mut agent = Agent::start(&file_policy(&cg, "enforce", &secret));

    assert_eq!(probe(&bystander, &["uring-open", &secret]), Outcome::Ok(0));
    if agent.backend("open") == "lsm" {
        // `file_open` sees the ring's open as it sees open(2).
        assert_eq!(probe(&cg, &["uring-open", &secret]), Outcome::Errno(EPERM));
        assert_eq!(probe(&cg, &["uring-open", &public]), Outcome::Ok(0));
    } else {
        // The fallback never sees a ring's open: no ring for this identity.
        assert_eq!(
            probe(&cg, &["uring-open", &public]),
            Outcome::Killed(libc::SIGKILL)
        );
        let d = agent.wait_decision("io_uring_setup deny line", |d| {
            d["action"] == "open" && d["target"]["path"] == "anon_inode:[io_uring]"
        });
        assert_eq!(d["verdict"], "deny");
        assert_eq!(d["policy"], "redteam-files");
        assert_eq!(d["backend"], "tracepoint_kill");
        assert!(d["rule"].as_str().unwrap().contains("io_uring_setup"));
        assert_eq!(d["workload"]["cgroup"], cg.path.as_str());

        // In audit mode the ring is made, and the line says it would not be.
        assert!(agent.reload(&file_policy(&cg, "audit", &secret)));
        assert_eq!(probe(&cg, &["uring-open", &secret]), Outcome::Ok(0));
        agent.wait_decision("io_uring_setup audit line", |d| {
            d["verdict"] == "audit" && d["target"]["path"] == "anon_inode:[io_uring]"
        });
    }

    // Without file rules the identity's rings are its own business.
    assert!(agent.reload(&network_policy(
        &cg,
        "      allow:\n        - {cidr: 0.0.0.0/0}\n"
    )));
    assert_eq!(probe(&cg, &["uring-open", &secret]), Outcome::Ok(0));
}

#[test]
fn a_governed_file_cannot_be_renamed_or_linked_out_of_its_subtree() {
    require_kernel!();
    let tmp = TempDir::new("redteam-move");
    for d in ["pii", "out"] {
        std::fs::create_dir_all(tmp.path(d)).unwrap();
    }
    for f in ["pii/a", "pii/b", "pii/c", "out/decoy", "free"] {
        std::fs::write(tmp.path(f), f).unwrap();
    }
    let t = |rel: &str| tmp.str(rel);
    let cg = Cgroup::create("redteam-move");
    let bystander = Cgroup::create("redteam-move-bystander");
    let policy = |access: &str| {
        format!(
            "{}  files:\n    - {{ path: \"{}/**\", access: {access} }}\n",
            policy_header("redteam-move", "enforce", &cg.path),
            t("pii")
        )
    };
    let mut agent = Agent::start(&policy("none"));
    if agent.backend("move") != "lsm" {
        portcullis_tests::skip("renames and links are governed with BPF-LSM only");
        return;
    }

    // Moved or linked out of pii/, the file would open under a name no rule
    // covers: each way out is refused, an exchange included.
    assert_eq!(
        probe(&cg, &["rename", &t("pii/a"), &t("out/a")]),
        Outcome::Errno(EPERM)
    );
    assert_eq!(
        probe(&cg, &["link", &t("pii/a"), &t("out/a")]),
        Outcome::Errno(EPERM)
    );
    assert_eq!(
        probe(&cg, &["exchange", &t("out/decoy"), &t("pii/b")]),
        Outcome::Errno(EPERM)
    );
    assert!(tmp.path("pii/a").exists() && !tmp.path("out/a").exists());
    assert_eq!(std::fs::read_to_string(tmp.path("pii/b")).unwrap(), "pii/b");
    assert_eq!(probe(&cg, &["read", &t("pii/a")]), Outcome::Errno(EPERM));
    // A file no rule covers moves freely; another workload's policy is its own.
    assert_eq!(
        probe(&cg, &["rename", &t("free"), &t("out/free")]),
        Outcome::Ok(0)
    );
    assert_eq!(
        probe(&bystander, &["link", &t("pii/c"), &t("out/c")]),
        Outcome::Ok(0)
    );

    let d = agent.wait_decision("rename deny line", |d| {
        d["action"] == "move" && d["target"]["access"] == "rename"
    });
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["backend"], "lsm");
    assert_eq!(d["policy"], "redteam-move");
    assert!(d["rule"].as_str().unwrap().starts_with("files[0]"), "{d}");
    agent.wait_decision("link deny line", |d| {
        d["action"] == "move" && d["target"]["access"] == "link"
    });

    // A workload that may read and write the file may move it.
    assert!(agent.reload(&policy("readwrite")));
    assert_eq!(
        probe(&cg, &["rename", &t("pii/a"), &t("out/a")]),
        Outcome::Ok(0)
    );
}

#[test]
fn default_deny_egress_refuses_packet_sockets_with_bpf_lsm() {
    require_kernel!();
    let listener = RawListener::packet();
    let cg = Cgroup::create("redteam-packet");
    let bystander = Cgroup::create("redteam-packet-bystander");
    let nonce = portcullis_tests::unique("frame");
    let mut agent = Agent::start(&network_policy(&cg, ""));
    if agent.backend("packet") != "lsm" {
        portcullis_tests::skip("packet sockets are governed with BPF-LSM only");
        return;
    }

    // A packet socket sends frames below IP, past every egress hook.
    let denied = format!("{nonce}-denied");
    assert_eq!(probe(&cg, &["packet-send", &denied]), Outcome::Errno(EPERM));
    let neighbour = format!("{nonce}-neighbour");
    assert!(matches!(
        probe(&bystander, &["packet-send", &neighbour]),
        Outcome::Ok(_)
    ));
    assert!(listener.heard(&neighbour, Duration::from_secs(2)));
    assert!(!listener.heard(&denied, Duration::from_millis(300)));
    let d = agent.wait_decision("packet socket deny line", |d| {
        d["action"] == "socket" && d["target"]["socket"] == "packet"
    });
    assert_eq!(d["verdict"], "deny");
    assert_eq!(d["backend"], "lsm");
    assert_eq!(d["target"]["family"], "packet");
    assert_eq!(d["rule"], "default");

    // Allowed by name, the frame goes out.
    assert!(agent.reload(&network_policy(
        &cg,
        "    sockets:\n      allow: [packet]\n"
    )));
    let allowed = format!("{nonce}-allowed");
    assert!(matches!(
        probe(&cg, &["packet-send", &allowed]),
        Outcome::Ok(_)
    ));
    assert!(listener.heard(&allowed, Duration::from_secs(2)));
}
