//! The HTTP endpoint under misbehaving clients: a request head that never
//! ends is cut off, and running out of file descriptors neither spins the
//! agent nor stops the endpoint for good.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use portcullis_tests::{Agent, Cgroup, policy_header, require_kernel};

fn policy() -> String {
    let cg = Cgroup::create("endpoint");
    format!(
        "{}  network:\n    egress:\n      deny:\n        - {{ cidr: 192.0.2.0/24 }}\n",
        policy_header("endpoint", "enforce", &cg.path)
    )
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the `(comm)`: state is 3rd, utime 14th, stime 15th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn an_unfinished_request_is_cut_off_and_the_endpoint_keeps_answering() {
    require_kernel!();
    let agent = Agent::start(&policy());
    let mut slow = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert_eq!(agent.http("/healthz").map(|r| r.0), Some(200));
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    // Closed by the server (EOF, or an error response then EOF).
    loop {
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => panic!("the half-sent request was never cut off: {e}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn out_of_file_descriptors_the_endpoint_waits_instead_of_spinning() {
    require_kernel!();
    let mut agent = Agent::start(&policy());
    let pid = agent.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 4,
        rlim_max: open + 4,
    };
    // SAFETY: plain syscall on another process's limits; `limit` outlives it.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    // Half-open clients take the few descriptors left; the ones after them
    // wait in the backlog while accept() fails with EMFILE.
    let clients: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(("127.0.0.1", agent.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(pid) - c0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = ticks as f64 / hz / t0.elapsed().as_secs_f64();
    assert!(
        share < 0.5,
        "the agent used {:.0} % of a core while accept() failed",
        share * 100.0
    );
    drop(clients);
    let limit = libc::rlimit {
        rlim_cur: 1 << 16,
        rlim_max: 1 << 16,
    };
    // SAFETY: as above.
    unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    agent.wait_until("the endpoint answers again", Duration::from_secs(20), |a| {
        a.http("/healthz").is_some_and(|r| r.0 == 200)
    });
    assert!(
        agent.log().contains("cannot accept connections"),
        "{}",
        agent.log()
    );
}
