//! The `bpf()` commands the agent issues itself: aya 0.14 attaches a cgroup
//! device program but gives no `FdLink` for it (it converts only its sock,
//! sock_addr and skb links), and an `FdLink` is what pinning needs; and it
//! has no map-in-map type, which the hook barrier (`hook_barrier`) needs;
//! and its `ProgramInfo` does not say how many runs the kernel skipped.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`.
pub const BPF_CGROUP_DEVICE: u32 = 6;

/// `union bpf_attr`, zero-filled, as 32-bit words.
type Attr = [u32; 32];

fn bpf(cmd: libc::c_long, attr: &Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-filled bpf_attr of the size passed; the
    // kernel reads only the fields of `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), size_of_val(attr)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `BPF_LINK_CREATE` of `prog` on the cgroup `cgroup` (links coexist with
/// every other program there: multi-attach semantics).
pub fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 32];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = cgroup.as_raw_fd() as u32;
    attr[2] = attach_type;
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN` of a map, program or link fd at `path` (on a bpffs).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let name = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let ptr = name.as_ptr() as u64;
    let mut attr: Attr = [0; 32];
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    attr[2] = fd.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

/// `BPF_MAP_CREATE` with 4-byte keys and values (`inner` is the template map
/// of a map-in-map type, or none).
pub fn map_create(
    map_type: u32,
    max_entries: u32,
    inner: Option<BorrowedFd<'_>>,
) -> io::Result<OwnedFd> {
    let mut attr: Attr = [0; 32];
    attr[0] = map_type;
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = max_entries;
    attr[5] = inner.map_or(0, |fd| fd.as_raw_fd() as u32);
    let fd = bpf(BPF_MAP_CREATE, &attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_MAP_UPDATE_ELEM` of a 4-byte key and value (`BPF_ANY`).
pub fn map_update(map: BorrowedFd<'_>, key: u32, value: u32) -> io::Result<()> {
    let (key_ptr, value_ptr) = (&raw const key as u64, &raw const value as u64);
    let mut attr: Attr = [0; 32];
    attr[0] = map.as_raw_fd() as u32;
    attr[2] = key_ptr as u32;
    attr[3] = (key_ptr >> 32) as u32;
    attr[4] = value_ptr as u32;
    attr[5] = (value_ptr >> 32) as u32;
    bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
}

/// Runs of `prog` the kernel skipped because its recursion guard was
/// taken on that CPU (`bpf_prog_info.recursion_misses`, kernel >= 5.12;
/// always 0 before): for a BTF tracepoint program, the same program
/// running there (preempted, on 7.x); for a classic tracepoint one, any
/// kprobe or tracepoint program, or a task inside a BPF map syscall.
pub fn prog_recursion_misses(prog: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: a plain C struct for which all zeroes is valid.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let ptr = &raw mut info as u64;
    let mut attr: Attr = [0; 32];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = size_of_val(&info) as u32;
    attr[2] = ptr as u32;
    attr[3] = (ptr >> 32) as u32;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    Ok(info.recursion_misses)
}
