//! `fanotify-peer MOUNT_DIR RULES_FILE`: a **peer model** for the benchmark,
//! not part of Portcullis. It is the smallest honest userspace blocker built
//! on fanotify permission events, deciding the same file and exec rules the
//! agent is given:
//!
//! - `fanotify_init(FAN_CLASS_CONTENT)`, and one `FAN_MARK_MOUNT` mark with
//!   `FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM` on the mount holding the bench
//!   files (a dedicated tmpfs, so nothing else on the host pays for it).
//! - Each event: `fstat` the event fd, look `(dev, ino)` up in a `HashSet`,
//!   write `FAN_ALLOW` or `FAN_DENY`, close the fd.
//!
//! RULES_FILE lines: `deny-open PATH` (open of that file is denied),
//! `allow-open PATH` (a rule that allows; fanotify does not say whether the
//! open is for reading or writing, so an `access: read` rule can only be
//! kept as "allowed") and `allow-exec PATH` (exec allowed; every other exec
//! on the mount is denied, as the agent's `exec.default: deny`).
//!
//! It does not check which cgroup the acting process is in (that would cost
//! a `/proc/<pid>/cgroup` read per event); scoping by mount favours the peer.
//! Prints `ready` once the mark is in place; runs until killed.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    process::ExitCode,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mount, rules] = args.as_slice() else {
        eprintln!("usage: fanotify-peer MOUNT_DIR RULES_FILE");
        return ExitCode::from(2);
    };
    // (dev, ino) → open allowed; and the exec allow list.
    let mut open_rules = HashMap::new();
    let mut allow_exec = HashSet::new();
    for line in std::fs::read_to_string(rules).expect("rules file").lines() {
        let Some((kind, path)) = line.split_once(' ') else {
            continue;
        };
        let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let key = (m.dev(), m.ino());
        match kind {
            "allow-exec" => {
                allow_exec.insert(key);
            }
            // Deny beats allow, as in the agent.
            "deny-open" => {
                open_rules.insert(key, false);
            }
            _ => {
                open_rules.entry(key).or_insert(true);
            }
        }
    }

    // SAFETY: plain syscalls; every buffer below is owned and sized.
    let fan = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC,
            (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32,
        )
    };
    if fan < 0 {
        eprintln!("fanotify_init: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    let dir = CString::new(mount.as_str()).expect("path");
    // SAFETY: valid fd and C string.
    let r = unsafe {
        libc::fanotify_mark(
            fan,
            libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT,
            libc::FAN_OPEN_PERM | libc::FAN_OPEN_EXEC_PERM,
            libc::AT_FDCWD,
            dir.as_ptr(),
        )
    };
    if r < 0 {
        eprintln!("fanotify_mark {mount}: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    println!("ready");
    let _ = std::io::stdout().flush();

    let meta_len = size_of::<libc::fanotify_event_metadata>();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is ours and large enough.
        let n = unsafe { libc::read(fan, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let mut off = 0usize;
        while off + meta_len <= n as usize {
            // SAFETY: the kernel writes whole, aligned-enough records; read unaligned to be safe.
            let ev: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(off).cast()) };
            off += ev.event_len as usize;
            if ev.fd < 0 {
                continue;
            }
            // SAFETY: zeroed stat is a valid out-buffer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: ev.fd is an fd the kernel opened for us.
            let known = unsafe { libc::fstat(ev.fd, &mut st) } == 0;
            let key = (st.st_dev, st.st_ino);
            // An exec is checked against the exec allow list; a plain open
            // against the open deny list. Fail open if fstat failed.
            let allow = if ev.mask & libc::FAN_OPEN_EXEC_PERM != 0 {
                known && allow_exec.contains(&key)
            } else {
                !known || open_rules.get(&key) != Some(&false)
            };
            let resp = libc::fanotify_response {
                fd: ev.fd,
                response: if allow {
                    libc::FAN_ALLOW
                } else {
                    libc::FAN_DENY
                },
            };
            // SAFETY: writes a whole response struct; closes the event fd.
            unsafe {
                libc::write(
                    fan,
                    (&resp as *const libc::fanotify_response).cast(),
                    size_of::<libc::fanotify_response>(),
                );
                libc::close(ev.fd);
            }
        }
    }
}
