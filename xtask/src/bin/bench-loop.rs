//! `bench-loop CGROUP_DIR OP ARGS..`: the workload side of `cargo xtask
//! bench`. It joins the governed cgroup first, then times a tight loop of
//! one kind of syscall with `clock_gettime(CLOCK_MONOTONIC)` around all
//! iterations, and prints one JSON line:
//! `{"ns":<ns per call>,"ok":N,"failed":N,"errno":E,"killed":N}`.
//!
//! Ops (ITERS iterations each, after a short untimed warm-up):
//! - `connect IP ITERS`: TCP connect to a listener this process owns on
//!   `0.0.0.0:<ephemeral>`, then close with `SO_LINGER 0` (an RST) so no
//!   TIME_WAIT sockets pile up and exhaust ports across rounds.
//! - `open PATH ITERS`: `open(O_RDONLY)` + `close`.
//! - `openfork PATH ITERS`: fork; the child opens and `_exit`s. For opens
//!   the fallback backend denies by killing the process, so a denied open
//!   can only be timed as "a process that opens once".
//! - `exec PATH ITERS`: fork + `execv(PATH)` + wait.
//! - `flood PATH SECS`: open + close until SECS have passed; `ok` is the
//!   number of opens.
//! - `until-eperm IP SECS`: prints `ready`, then connects in a loop until
//!   one fails with EPERM; prints the `CLOCK_MONOTONIC` time (ns) of that
//!   failure (reload latency; the caller reads the clock before its change).
//!
//! Plain libc, no allocations in the timed loops: the loop must cost the
//! syscall and nothing else.

use std::{
    ffi::CString,
    io::Write as _,
    net::{Ipv4Addr, TcpListener},
    os::fd::AsRawFd as _,
    process::ExitCode,
};

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    errno: i32,
    killed: u64,
}

impl Tally {
    fn fail(&mut self, e: i32) {
        self.failed += 1;
        self.errno = e;
    }
}

/// One TCP connect + RST close. Returns 0 or the errno.
fn connect_once(addr: &libc::sockaddr_in) -> i32 {
    // SAFETY: plain syscalls on a socket this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return errno();
        }
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        );
        let r = libc::connect(
            fd,
            (addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let e = if r < 0 { errno() } else { 0 };
        libc::close(fd);
        e
    }
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A listener that accepts and drops connections on its own thread. The
/// backlog is deep (std's is 128): when the accept thread falls behind, a
/// full queue drops SYNs and the client waits a full 1 s retransmit, which
/// would swamp the per-connect cost being measured.
fn listener() -> u16 {
    let l = TcpListener::bind("0.0.0.0:0").expect("bind listener");
    // SAFETY: re-listen on our own socket with a longer queue.
    unsafe { libc::listen(l.as_raw_fd(), 65535) };
    let port = l.local_addr().expect("listener addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    port
}

fn open_once(path: &CString) -> i32 {
    // SAFETY: valid C string; the fd is closed at once.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return errno();
        }
        libc::close(fd);
    }
    0
}

/// Forks; the child runs `child` and `_exit`s with its result. Tallies how
/// the child ended.
fn fork_wait(t: &mut Tally, child: impl Fn() -> i32) {
    // SAFETY: the child only makes async-signal-safe calls, then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = child();
        // SAFETY: leave the child without running destructors.
        unsafe { libc::_exit(code) };
    }
    if pid < 0 {
        t.fail(errno());
        return;
    }
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        t.killed += 1;
    } else if libc::WEXITSTATUS(status) == 0 {
        t.ok += 1;
    } else {
        t.fail(libc::WEXITSTATUS(status));
    }
}

fn timed(iters: u64, mut f: impl FnMut(&mut Tally)) -> (f64, Tally) {
    let mut warm = Tally::default();
    for _ in 0..(iters / 20).max(1) {
        f(&mut warm);
    }
    let mut t = Tally::default();
    let start = now_ns();
    for _ in 0..iters {
        f(&mut t);
    }
    ((now_ns() - start) as f64 / iters as f64, t)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cgroup, op, a, b] = args.as_slice() else {
        eprintln!("usage: bench-loop CGROUP_DIR OP ARG ITERS|SECS");
        return ExitCode::from(2);
    };
    // Listener first (it must not be governed by a file or exec rule), then
    // the cgroup: every thread of the process moves with the write.
    let port = if op == "connect" || op == "until-eperm" {
        listener()
    } else {
        0
    };
    if let Err(e) = std::fs::write(format!("{cgroup}/cgroup.procs"), b"0") {
        eprintln!("bench-loop: joining {cgroup}: {e}");
        return ExitCode::from(3);
    }
    let n: u64 = b.parse().expect("ITERS/SECS");
    let (ns, t) = match op.as_str() {
        "connect" => {
            let addr = sockaddr(a.parse().expect("IPv4 address"), port);
            timed(n, |t| match connect_once(&addr) {
                0 => t.ok += 1,
                e => t.fail(e),
            })
        }
        "open" => {
            let p = CString::new(a.as_str()).expect("path");
            timed(n, |t| match open_once(&p) {
                0 => t.ok += 1,
                e => t.fail(e),
            })
        }
        "openfork" => {
            let p = CString::new(a.as_str()).expect("path");
            timed(n, |t| fork_wait(t, || open_once(&p)))
        }
        "exec" => {
            let p = CString::new(a.as_str()).expect("path");
            let argv = [p.as_ptr(), std::ptr::null()];
            timed(n, |t| {
                fork_wait(t, || {
                    // SAFETY: NULL-terminated argv of live C strings.
                    unsafe { libc::execv(p.as_ptr(), argv.as_ptr()) };
                    // An exec refused with an errno (fanotify) exits 126.
                    126
                })
            })
        }
        "flood" => {
            let p = CString::new(a.as_str()).expect("path");
            let end = now_ns() + n * 1_000_000_000;
            let mut t = Tally::default();
            let start = now_ns();
            while now_ns() < end {
                for _ in 0..1000 {
                    match open_once(&p) {
                        0 => t.ok += 1,
                        e => t.fail(e),
                    }
                }
            }
            (
                (now_ns() - start) as f64 / (t.ok + t.failed).max(1) as f64,
                t,
            )
        }
        "until-eperm" => {
            let addr = sockaddr(a.parse().expect("IPv4 address"), port);
            println!("ready");
            let _ = std::io::stdout().flush();
            let end = now_ns() + n * 1_000_000_000;
            let mut t = Tally::default();
            loop {
                let e = connect_once(&addr);
                let at = now_ns();
                if e == libc::EPERM {
                    println!("{{\"at\":{at},\"tries\":{}}}", t.ok);
                    return ExitCode::SUCCESS;
                }
                t.ok += 1;
                if at > end {
                    println!("{{\"at\":null,\"tries\":{}}}", t.ok);
                    return ExitCode::from(1);
                }
            }
        }
        _ => {
            eprintln!("bench-loop: unknown op {op}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{{\"ns\":{ns:.1},\"ok\":{},\"failed\":{},\"errno\":{},\"killed\":{}}}",
        t.ok, t.failed, t.errno, t.killed
    );
    ExitCode::SUCCESS
}
