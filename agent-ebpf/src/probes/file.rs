//! File opens: BPF-LSM `file_open` (open fails with EPERM) or, where BPF-LSM
//! is unavailable, the tracepoints `syscalls/sys_exit_<open family>` and
//! `sys_exit` (twins, see `open_tp`) with SIGKILL: the process dies before
//! it returns to user space holding the fd.
//! Both call `inode::decide`; files have no policy default, only rules deny.
//!
//! io_uring opens (`IORING_OP_OPENAT`) reach `file_open` but make no open
//! syscall, so the fallback would never see them: there, an identity with
//! file rules may not set up a ring at all (`try_ring`).
//!
//! Fail open: failed kernel reads, an fd beyond the table or a missing
//! identity config allow the open and are counted in `COUNTER_ERR_OPEN`.

use aya_ebpf::{
    helpers::generated::bpf_send_signal,
    macros::{btf_tracepoint, lsm, tracepoint},
    programs::{BtfTracePointContext, LsmContext, TracePointContext},
};
use portcullis_common::{
    ACCESS_READ, ACCESS_WRITE, ACTION_OPEN, BACKEND_LSM, BACKEND_TRACEPOINT_KILL, COUNTER_ERR_OPEN,
    HAS_FILES, IDENTITY_UNRESTRICTED, KernelOffsets, RULE_ID_IO_URING, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    decision::{self, Matches},
    identity,
    inode::{self, Request, RuleMap},
    kernel::{current_exe, offsets, read, read_ptr},
    maps::{count, count_decision},
    twins,
};

const SIGKILL: u32 = 9;
const FMODE_READ: u32 = 1;
const FMODE_WRITE: u32 = 2;

/// Offsets of `__syscall_nr` and `ret` in a `syscalls/sys_exit_*` record.
const SYS_EXIT_NR: usize = 8;
const SYS_EXIT_RET: usize = 16;
/// x86_64 syscall numbers that return a new fd for a path.
const NR_OPEN: u64 = 2;
const NR_CREAT: u64 = 85;
const NR_OPENAT: u64 = 257;
const NR_OPEN_BY_HANDLE_AT: u64 = 304;
const NR_OPENAT2: u64 = 437;
/// Returns a ring's fd; decided by `try_ring`.
const NR_IO_URING_SETUP: u64 = 425;

#[lsm(hook = "file_open")]
pub fn open_lsm(ctx: LsmContext) -> i32 {
    // Argument 1 of an LSM program is the previous program's verdict.
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    let file: *const u8 = ctx.arg(0);
    match try_open(file, BACKEND_LSM) {
        // An exact constant: 6.12's verifier rejected a computed negation.
        Ok(VERDICT_DENY) => -1,
        Ok(_) => 0,
        Err(_) => {
            count(COUNTER_ERR_OPEN);
            0
        }
    }
}

/// On the classic tracepoints `syscalls/sys_exit_<open family>` (the agent
/// attaches it to each, see the loader), with `open_tp_twin` on the raw
/// `sys_exit` beside it (`twins.rs`): the kernel may skip either, but for
/// unrelated reasons, so an open goes undecided only when both are skipped
/// at once.
///
/// - This one fires only for opens, and its programs run with preemption
///   disabled (the perf path's per-CPU buffers need it). The kernel skips
///   it while `bpf_prog_active` is held on the CPU: by another kprobe or
///   perf-tracepoint program, or by a task inside a BPF map syscall, which
///   is preemptible (the agent's own reloads, seen on 7.3 under QEMU).
/// - `open_tp_twin` fires on every syscall, and 7.3 runs its programs
///   preemptibly: the kernel skips it on a CPU while another task is
///   preempted inside it (`prog->active`); map syscalls do not block it.
#[tracepoint]
pub fn open_tp(ctx: TracePointContext) -> u32 {
    // `struct trace_event_raw_sys_exit`: 8 bytes of common fields, the
    // syscall number, then the return value.
    // SAFETY: reads of the event record at fixed offsets.
    let nr = unsafe { ctx.read_at::<i32>(SYS_EXIT_NR) };
    match (nr, unsafe { ctx.read_at::<i64>(SYS_EXIT_RET) }) {
        (Ok(nr), Ok(ret)) => decide_new_fd(ret, nr as u64 == NR_IO_URING_SETUP),
        _ => count(COUNTER_ERR_OPEN),
    }
    0
}

/// See `open_tp`.
#[btf_tracepoint(function = "sys_exit")]
pub fn open_tp_twin(ctx: BtfTracePointContext) -> u32 {
    let regs: *const u8 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    let Some(o) = offsets() else {
        count(COUNTER_ERR_OPEN);
        return 0;
    };
    match read::<u64>(regs, o.pt_regs_orig_ax) {
        Ok(NR_OPEN | NR_CREAT | NR_OPENAT | NR_OPEN_BY_HANDLE_AT | NR_OPENAT2) => {
            decide_new_fd(ret, false)
        }
        Ok(NR_IO_URING_SETUP) => decide_new_fd(ret, true),
        Ok(_) => {}
        Err(_) => count(COUNTER_ERR_OPEN),
    }
    0
}

/// Decides the file an open-family syscall returned as fd `ret` (or, with
/// `ring`, the io_uring `io_uring_setup` returned: `try_ring`), unless the
/// other twin did, and kills the caller on deny.
#[inline(always)]
fn decide_new_fd(ret: i64, ring: bool) {
    if ret < 0 {
        return;
    }
    let decided = offsets()
        .ok_or(-1)
        .and_then(|o| fd_file(&o, ret as u64).map(|file| (o, file)))
        .and_then(|(o, file)| {
            if !twins::first(file as u64) {
                Ok(VERDICT_ALLOW)
            } else if ring {
                try_ring(&o)
            } else {
                try_open(file, BACKEND_TRACEPOINT_KILL)
            }
        });
    match decided {
        Ok(VERDICT_DENY) => {
            // SAFETY: helper without pointer arguments; the signal is
            // delivered before the task returns to user space.
            unsafe { bpf_send_signal(SIGKILL) };
        }
        Ok(_) => {}
        Err(_) => count(COUNTER_ERR_OPEN),
    }
}

/// The verdict on a new io_uring: denied when an enforcing policy of the
/// caller's identity has file rules, since the ring's opens would pass
/// unseen. The caller is killed as `io_uring_setup` returns, before the
/// ring exists for user space, as a denied open is killed.
#[inline(always)]
fn try_ring(o: &KernelOffsets) -> Result<u8, i64> {
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(-1)?;
    if cfg.flags & HAS_FILES == 0 {
        return Ok(VERDICT_ALLOW);
    }
    let mut d = Matches::new(identity::active_policies(&cfg))
        .finish(cfg.ring_deny_enforce, cfg.ring_deny_audit);
    if d.verdict == VERDICT_ALLOW {
        return Ok(VERDICT_ALLOW);
    }
    d.hit.rule_id = RULE_ID_IO_URING;
    // With no rule scanned, LLVM sees the policy bit is a popcount below 32
    // and drops the `& 31` that bounds it for the verifier, which then
    // refuses the counter index. A volatile re-read hides what LLVM knows.
    // SAFETY: a read of a live local.
    d.hit.policy_bit = unsafe { core::ptr::read_volatile(&d.hit.policy_bit) };
    let exe = current_exe(o)?;
    decision::report(
        ACTION_OPEN,
        BACKEND_TRACEPOINT_KILL,
        id,
        cgid,
        &cfg,
        &d,
        |e| {
            (e.exe_dev, e.exe_ino) = exe;
            e.access = ACCESS_READ | ACCESS_WRITE;
        },
    );
    Ok(d.verdict)
}

/// `current->files->fdt->fd[fd]`.
#[inline(always)]
fn fd_file(o: &KernelOffsets, fd: u64) -> Result<*const u8, i64> {
    // SAFETY: helper without arguments.
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task() } as *const u8;
    let files = read_ptr(task, o.task_struct_files)?;
    let fdt = read_ptr(files, o.files_struct_fdt)?;
    let max = read::<u32>(fdt, o.fdtable_max_fds)? as u64;
    if fd >= max {
        return Err(-1);
    }
    let fds = read_ptr(fdt, o.fdtable_fd)?;
    read_ptr(fds, (fd * 8) as u32)
}

#[inline(always)]
fn try_open(file: *const u8, backend: u8) -> Result<u8, i64> {
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        count_decision(ACTION_OPEN, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(-1)?;
    if cfg.flags & HAS_FILES == 0 {
        count_decision(ACTION_OPEN, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let o = offsets().ok_or(-1)?;
    let mode = read::<u32>(file, o.file_f_mode)?;
    let mut requested = 0;
    if mode & FMODE_READ != 0 {
        requested |= ACCESS_READ;
    }
    if mode & FMODE_WRITE != 0 {
        requested |= ACCESS_WRITE;
    }
    let exe = current_exe(&o)?;
    let req = Request {
        cgroup_id: cgid,
        identity: id,
        requested,
        exe,
        deny_enforce: 0,
        deny_audit: 0,
        active: identity::active_policies(&cfg),
        cfg,
    };
    let out = inode::decide(&o, RuleMap::File, file, &req)?;
    inode::report(&o, ACTION_OPEN, backend, &req, &out, None);
    Ok(out.decision.verdict)
}
