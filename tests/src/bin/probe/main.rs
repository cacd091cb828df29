//! `portcullis-probe <cgroup-dir> <op> [args..]`: joins a cgroup, then makes
//! one real syscall and reports the outcome as one JSON line on stdout:
//! `{"ok":true,"bytes":N}` or `{"ok":false,"errno":E}`. For `exec` the
//! process is replaced; the caller reads the exit status instead.
//!
//! Ops: `connect IP PORT [tcp|udp]`, `sendto IP PORT`, `read PATH`,
//! `write PATH`, `read-in DIR RELPATH` (chdir, then a relative open),
//! `exec PATH [ARGS..]`, `mknod PATH MAJOR MINOR` (a character device
//! node), `raw-send IP PROTO PAYLOAD` (a raw IP socket of protocol PROTO
//! sends PAYLOAD to IP), `ping` (in a network namespace of its own, with
//! loopback up and ping sockets enabled, an ICMP datagram socket sends an
//! echo request to 127.0.0.1 and reads the reply), `packet-send PAYLOAD`
//! (a packet socket sends PAYLOAD as one frame out of loopback), `uring-open PATH`,
//! `uring-socket raw|raw6|icmp|tcp` and `uring-connect IP PORT` (the same
//! calls through io_uring, see `uring.rs`), `rename FROM TO`, `exchange A B`
//! (`renameat2` with `RENAME_EXCHANGE`), `link FROM TO`, and (with `PORTCULLIS_PROBE_UID=N` it switches to
//! uid and gid N after joining the cgroup)
//! `hammer SECS ALLOW_IP ALLOW_PORT DENY_IP DENY_PORT ALLOW_FILE`: for SECS
//! seconds, loops an allowed connect, a denied connect and an allowed read,
//! and prints `{"rounds":N,"violations":V,"first":"..."}` (V counts allowed
//! calls that failed and denied calls that did not get EPERM).

mod uring;

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
};

fn report(result: std::io::Result<usize>) -> ExitCode {
    let line = match &result {
        Ok(n) => format!("{{\"ok\":true,\"bytes\":{n}}}"),
        Err(e) => format!(
            "{{\"ok\":false,\"errno\":{}}}",
            e.raw_os_error().unwrap_or(-1)
        ),
    };
    println!("{line}");
    let _ = std::io::stdout().flush();
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn join_cgroup(dir: &str) -> std::io::Result<()> {
    std::fs::write(format!("{dir}/cgroup.procs"), b"0")
}

fn addr(ip: &str, port: &str) -> SocketAddr {
    let ip: std::net::IpAddr = ip.parse().expect("ip");
    SocketAddr::new(ip, port.parse().expect("port"))
}

/// `renameat2(2)` with `flags`, by raw syscall (no libc wrapper needed).
fn rename(from: &str, to: &str, flags: libc::c_uint) -> std::io::Result<usize> {
    let (from, to) = (CString::new(from)?, CString::new(to)?);
    // SAFETY: both paths are NUL-terminated and live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(0)
}

fn read_all(path: &str) -> std::io::Result<usize> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut buf)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, op, rest @ ..] = args.as_slice() else {
        eprintln!("usage: portcullis-probe CGROUP_DIR OP [ARGS..]");
        return ExitCode::from(2);
    };
    if let Err(e) = join_cgroup(cgroup) {
        eprintln!("joining cgroup {cgroup}: {e}");
        return ExitCode::from(3);
    }
    // Act as another user (uid selectors): after joining, which needs root.
    if let Some(uid) = std::env::var("PORTCULLIS_PROBE_UID")
        .ok()
        .and_then(|u| u.parse::<u32>().ok())
    {
        let id = nix::unistd::Uid::from_raw(uid);
        if let Err(e) = nix::unistd::setgid(nix::unistd::Gid::from_raw(uid))
            .and_then(|()| nix::unistd::setuid(id))
        {
            eprintln!("becoming uid {uid}: {e}");
            return ExitCode::from(3);
        }
    }
    let result = match (op.as_str(), rest) {
        ("connect", [ip, port]) | ("connect", [ip, port, _])
            if rest.get(2).is_none_or(|p| p == "tcp") =>
        {
            TcpStream::connect(addr(ip, port)).map(|_| 0)
        }
        ("connect", [ip, port, _udp]) => {
            let a = addr(ip, port);
            let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            UdpSocket::bind(bind).and_then(|s| s.connect(a)).map(|_| 0)
        }
        ("sendto", [ip, port]) => {
            let a = addr(ip, port);
            let bind = if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            UdpSocket::bind(bind).and_then(|s| s.send_to(b"probe", a))
        }
        ("read", [path]) => read_all(path),
        ("write", [path]) => std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|mut f| f.write(b"probe")),
        ("hammer", [secs, aip, aport, dip, dport, file]) => {
            hammer(
                secs.parse().expect("secs"),
                addr(aip, aport),
                addr(dip, dport),
                file,
            );
            return ExitCode::SUCCESS;
        }
        ("mknod", [path, major, minor]) => {
            let dev = nix::sys::stat::makedev(
                major.parse().expect("major"),
                minor.parse().expect("minor"),
            );
            nix::sys::stat::mknod(
                path.as_str(),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                dev,
            )
            .map(|()| 0)
            .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        }
        ("raw-send", [ip, proto, payload]) => raw_send(
            ip.parse().expect("ip"),
            proto.parse().expect("proto"),
            payload.as_bytes(),
        ),
        ("ping", []) => ping(),
        ("packet-send", [payload]) => packet_send(payload.as_bytes()),
        ("uring-open", [path]) => uring::open(path),
        ("rename", [from, to]) => rename(from, to, 0),
        ("exchange", [a, b]) => rename(a, b, libc::RENAME_EXCHANGE),
        ("link", [from, to]) => std::fs::hard_link(from, to).map(|()| 0),
        ("uring-socket", [kind]) => {
            let (domain, ty, protocol) = match kind.as_str() {
                "raw" => (libc::AF_INET, libc::SOCK_RAW, 253),
                "raw6" => (libc::AF_INET6, libc::SOCK_RAW, 253),
                "icmp" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
                _ => (libc::AF_INET, libc::SOCK_STREAM, 0),
            };
            uring::socket(domain, ty, protocol)
        }
        ("uring-connect", [ip, port]) => uring::connect(addr(ip, port)),
        ("read-in", [dir, rel]) => std::env::set_current_dir(dir).and_then(|()| read_all(rel)),
        ("exec", [path, argv @ ..]) => {
            let c = |s: &str| CString::new(s).expect("nul in arg");
            let prog = c(path);
            let mut all = vec![prog.clone()];
            all.extend(argv.iter().map(|a| c(a)));
            let err = nix::unistd::execv(&prog, &all).unwrap_err();
            Err(std::io::Error::from_raw_os_error(err as i32))
        }
        _ => {
            eprintln!("unknown op {op} {rest:?}");
            return ExitCode::from(2);
        }
    };
    report(result)
}

fn hammer(secs: f64, allowed: SocketAddr, denied: SocketAddr, file: &str) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    let (mut rounds, mut violations, mut first) = (0u64, 0u64, String::new());
    // A pause between rounds (PORTCULLIS_HAMMER_PAUSE_MS) keeps an emulated
    // guest's CPU from being all ours and none the agent's.
    let pause = std::env::var("PORTCULLIS_HAMMER_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    let mut note = |what: String| {
        violations += 1;
        if first.is_empty() {
            first = what;
        }
    };
    while std::time::Instant::now() < end {
        rounds += 1;
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
        if let Err(e) = TcpStream::connect(allowed) {
            note(format!("allowed connect {allowed} failed: {e}"));
        }
        match TcpStream::connect(denied) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
            other => note(format!("denied connect {denied} gave {other:?}")),
        }
        if let Err(e) = read_all(file) {
            note(format!("allowed read {file} failed: {e}"));
        }
    }
    println!("{{\"rounds\":{rounds},\"violations\":{violations},\"first\":{first:?}}}");
}

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn check_len(rc: isize) -> std::io::Result<usize> {
    usize::try_from(rc).map_err(|_| std::io::Error::last_os_error())
}

/// `ip` as the `sockaddr` the raw calls take (port 0: raw and ICMP
/// sockets have none).
fn sockaddr(to: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let port = to.port().to_be();
    let len = match to.ip() {
        std::net::IpAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        std::net::IpAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: port,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// One datagram through a raw IP socket: what a workload with CAP_NET_RAW
/// sends past the connect and sendmsg hooks.
fn raw_send(ip: std::net::IpAddr, proto: i32, payload: &[u8]) -> std::io::Result<usize> {
    let family = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls on a descriptor this function owns.
    unsafe {
        let fd = check(libc::socket(family, libc::SOCK_RAW, proto))?;
        let (sa, len) = sockaddr(SocketAddr::new(ip, 0));
        let sent = check_len(libc::sendto(
            fd,
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const sa).cast(),
            len,
        ));
        libc::close(fd);
        sent
    }
}

/// An experimental ethertype (IEEE 802 local use): nothing else on the
/// host sends it, so what a packet listener hears came from the probe.
const ETH_P_EXPERIMENTAL: u16 = 0x88b5;

/// A packet socket (`AF_PACKET`, cooked) sends `payload` as one frame of
/// `ETH_P_EXPERIMENTAL` out of loopback.
fn packet_send(payload: &[u8]) -> std::io::Result<usize> {
    let proto = ETH_P_EXPERIMENTAL.to_be();
    // SAFETY: plain syscalls on a descriptor this function owns; the
    // address is a zeroed sockaddr_ll with the fields sendto reads set.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM,
            i32::from(proto),
        ))?;
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = libc::if_nametoindex(c"lo".as_ptr()) as i32;
        sa.sll_halen = 6;
        let sent = check_len(libc::sendto(
            fd,
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const sa).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ));
        libc::close(fd);
        sent
    }
}

/// An ICMP echo round trip through a ping socket, in a network namespace of
/// the probe's own so that enabling ping sockets and raising loopback touch
/// nothing of the host's. The cgroup, and so the identity, stay the same.
fn ping() -> std::io::Result<usize> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
    std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")?;
    loopback_up()?;
    // An echo request: type 8, code 0; the kernel fills the id and checksum.
    let request = [8u8, 0, 0, 0, 0, 0, 0, 1, b'p', b'c'];
    // SAFETY: plain syscalls on a descriptor this function owns.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM,
            libc::IPPROTO_ICMP,
        ))?;
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        let (sa, len) = sockaddr(SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 0));
        let result = check_len(libc::sendto(
            fd,
            request.as_ptr().cast(),
            request.len(),
            0,
            (&raw const sa).cast(),
            len,
        ))
        .and_then(|_| {
            let mut reply = [0u8; 64];
            let n = check_len(libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0))?;
            // Type 0: an echo reply came back.
            if n > 0 && reply[0] == 0 {
                Ok(n)
            } else {
                Err(std::io::Error::other("no echo reply"))
            }
        });
        libc::close(fd);
        result
    }
}

/// `ip link set lo up`, without the tool (the VM guests have busybox).
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: all-zero is a valid ifreq; plain ioctls on a descriptor this
    // function owns (a UDP socket, which no socket rule governs).
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        let fd = check(libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0))?;
        let result = check(libc::ioctl(fd, libc::SIOCGIFFLAGS, &raw mut req)).and_then(|_| {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw mut req))
        });
        libc::close(fd);
        result.map(|_| ())
    }
}
