//! File opens: BPF-LSM `file_open` (open fails with EPERM) or, where BPF-LSM
//! is unavailable, the BTF tracepoint `sys_exit` on the open family with
//! SIGKILL: the process dies before it returns to user space holding the fd.
//! Both call `inode::decide`; files have no policy default, only rules deny.
//! The tracepoint program runs as twins (`twins.rs`).
//!
//! Fail open: failed kernel reads, an fd beyond the table or a missing
//! identity config allow the open and are counted in `COUNTER_ERR_OPEN`.

use aya_ebpf::{
    helpers::generated::bpf_send_signal,
    macros::{btf_tracepoint, lsm},
    programs::{BtfTracePointContext, LsmContext},
};
use portcullis_common::{
    ACCESS_READ, ACCESS_WRITE, ACTION_OPEN, BACKEND_LSM, BACKEND_TRACEPOINT_KILL, COUNTER_ERR_OPEN,
    HAS_FILES, IDENTITY_UNRESTRICTED, KernelOffsets, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    identity,
    inode::{self, Request, RuleMap},
    kernel::{current_exe, offsets, read, read_ptr},
    maps::{count, count_decision},
    twins,
};

const SIGKILL: u32 = 9;
const FMODE_READ: u32 = 1;
const FMODE_WRITE: u32 = 2;

/// x86_64 syscall numbers that return a new fd for a path.
const NR_OPEN: u64 = 2;
const NR_CREAT: u64 = 85;
const NR_OPENAT: u64 = 257;
const NR_OPEN_BY_HANDLE_AT: u64 = 304;
const NR_OPENAT2: u64 = 437;

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

#[btf_tracepoint(function = "sys_exit")]
pub fn open_tp(ctx: BtfTracePointContext) -> u32 {
    open_tp_run(&ctx)
}

/// `open_tp` again, as another program: see `twins.rs`.
#[btf_tracepoint(function = "sys_exit")]
pub fn open_tp_twin(ctx: BtfTracePointContext) -> u32 {
    open_tp_run(&ctx)
}

#[inline(always)]
fn open_tp_run(ctx: &BtfTracePointContext) -> u32 {
    let regs: *const u8 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    if ret < 0 {
        return 0;
    }
    match try_open_tp(regs, ret as u64) {
        Ok(VERDICT_DENY) => {
            // SAFETY: helper without pointer arguments; the signal is
            // delivered before the task returns to user space.
            unsafe { bpf_send_signal(SIGKILL) };
        }
        Ok(_) => {}
        Err(_) => count(COUNTER_ERR_OPEN),
    }
    0
}

#[inline(always)]
fn try_open_tp(regs: *const u8, fd: u64) -> Result<u8, i64> {
    let Some(o) = offsets() else {
        return Err(-1);
    };
    let nr = read::<u64>(regs, o.pt_regs_orig_ax)?;
    if !matches!(
        nr,
        NR_OPEN | NR_CREAT | NR_OPENAT | NR_OPEN_BY_HANDLE_AT | NR_OPENAT2
    ) {
        return Ok(VERDICT_ALLOW);
    }
    let file = fd_file(&o, fd)?;
    if !twins::first(file as u64) {
        return Ok(VERDICT_ALLOW);
    }
    try_open(file, BACKEND_TRACEPOINT_KILL)
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
