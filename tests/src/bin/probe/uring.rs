//! The same calls made through io_uring instead of their syscalls: the
//! route around syscall hooks that the kernel's own hooks must still see.
//! Each op sets up a ring of one entry, submits one operation and returns
//! its completion: the result, or the errno the kernel put in it.

use std::{
    ffi::CString,
    io::{Error, Result},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use io_uring::{IoUring, opcode, squeue, types};

/// Submits `entry` on a new ring and waits for its completion.
fn run(entry: squeue::Entry) -> Result<i32> {
    let mut ring = IoUring::new(1)?;
    // SAFETY: the entry's buffers (paths, addresses) outlive the wait below.
    unsafe { ring.submission().push(&entry) }.map_err(|_| Error::other("queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| Error::other("no completion"))?;
    match cqe.result() {
        r if r < 0 => Err(Error::from_raw_os_error(-r)),
        r => Ok(r),
    }
}

fn own(fd: i32) -> OwnedFd {
    // SAFETY: `fd` is a descriptor the completion just handed us.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `IORING_OP_OPENAT` of `path` for reading.
pub fn open(path: &str) -> Result<usize> {
    let c = CString::new(path).map_err(Error::other)?;
    let fd = run(opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c.as_ptr())
        .flags(libc::O_RDONLY)
        .build())?;
    drop(own(fd));
    Ok(0)
}

/// `IORING_OP_SOCKET` of (domain, type, protocol).
pub fn socket(domain: i32, ty: i32, protocol: i32) -> Result<usize> {
    let fd = run(opcode::Socket::new(domain, ty, protocol).build())?;
    drop(own(fd));
    Ok(0)
}

/// A TCP socket, then `IORING_OP_CONNECT` to `to`.
pub fn connect(to: SocketAddr) -> Result<usize> {
    let sock = socket2_stream(to)?;
    let addr = crate::sockaddr(to);
    run(opcode::Connect::new(
        types::Fd(sock.as_raw_fd()),
        (&raw const addr.0).cast(),
        addr.1,
    )
    .build())?;
    Ok(0)
}

fn socket2_stream(to: SocketAddr) -> Result<OwnedFd> {
    let domain = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    Ok(own(fd))
}
