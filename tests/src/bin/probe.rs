//! `portcullis-probe <cgroup-dir> <op> [args..]`: joins a cgroup, then makes
//! one real syscall and reports the outcome as one JSON line on stdout:
//! `{"ok":true,"bytes":N}` or `{"ok":false,"errno":E}`. For `exec` the
//! process is replaced; the caller reads the exit status instead.
//!
//! Ops: `connect IP PORT [tcp|udp]`, `sendto IP PORT`, `read PATH`,
//! `write PATH`, `read-in DIR RELPATH` (chdir, then a relative open),
//! `exec PATH [ARGS..]`, `mknod PATH MAJOR MINOR` (a character device
//! node), and (with `PORTCULLIS_PROBE_UID=N` it switches to
//! uid and gid N after joining the cgroup)
//! `hammer SECS ALLOW_IP ALLOW_PORT DENY_IP DENY_PORT ALLOW_FILE`: for SECS
//! seconds, loops an allowed connect, a denied connect and an allowed read,
//! and prints `{"rounds":N,"violations":V,"first":"..."}` (V counts allowed
//! calls that failed and denied calls that did not get EPERM).

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
