//! Exec: BPF-LSM `bprm_check_security` (the execve fails with EPERM) or,
//! where BPF-LSM is unavailable, the BTF tracepoint `sched_process_exec`
//! with SIGKILL (the new image never runs an instruction). Both call
//! `inode::decide` on `bprm->file`. The tracepoint program runs as twins
//! (`twins.rs`).
//!
//! Fail open: failed kernel reads or a missing identity config allow the
//! exec and are counted in `COUNTER_ERR_EXEC`.

use aya_ebpf::{
    helpers::generated::bpf_send_signal,
    macros::{btf_tracepoint, lsm},
    programs::{BtfTracePointContext, LsmContext},
};
use portcullis_common::{
    ACCESS_EXEC, ACTION_EXEC, BACKEND_LSM, BACKEND_TRACEPOINT_KILL, COUNTER_ERR_EXEC, HAS_EXEC,
    IDENTITY_UNRESTRICTED, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    identity,
    inode::{self, Request, RuleMap},
    kernel::{current_exe, offsets, read, read_ptr},
    maps::{count, count_decision},
    twins,
};

const SIGKILL: u32 = 9;

#[lsm(hook = "bprm_check_security")]
pub fn exec_lsm(ctx: LsmContext) -> i32 {
    // Argument 1 of an LSM program is the previous program's verdict.
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    let bprm: *const u8 = ctx.arg(0);
    match try_exec(bprm, BACKEND_LSM) {
        // An exact constant: 6.12's verifier rejected a computed negation.
        Ok(VERDICT_DENY) => -1,
        Ok(_) => 0,
        Err(_) => {
            count(COUNTER_ERR_EXEC);
            0
        }
    }
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn exec_tp(ctx: BtfTracePointContext) -> u32 {
    exec_tp_run(&ctx)
}

/// `exec_tp` again, as another program: see `twins.rs`.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn exec_tp_twin(ctx: BtfTracePointContext) -> u32 {
    exec_tp_run(&ctx)
}

#[inline(always)]
fn exec_tp_run(ctx: &BtfTracePointContext) -> u32 {
    let bprm: *const u8 = ctx.arg(2);
    if !twins::first(bprm as u64) {
        return 0;
    }
    match try_exec(bprm, BACKEND_TRACEPOINT_KILL) {
        Ok(VERDICT_DENY) => {
            // SAFETY: helper without pointer arguments; the signal is
            // delivered before the task returns to user space.
            unsafe { bpf_send_signal(SIGKILL) };
        }
        Ok(_) => {}
        Err(_) => count(COUNTER_ERR_EXEC),
    }
    0
}

#[inline(always)]
fn try_exec(bprm: *const u8, backend: u8) -> Result<u8, i64> {
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        count_decision(ACTION_EXEC, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(-1)?;
    if cfg.flags & HAS_EXEC == 0 {
        count_decision(ACTION_EXEC, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let o = offsets().ok_or(-1)?;
    let file = read_ptr(bprm, o.linux_binprm_file)?;
    // On the tracepoint backend the exec already happened, so the acting
    // executable is the new image, not the caller's.
    let exe = current_exe(&o)?;
    let req = Request {
        cgroup_id: cgid,
        identity: id,
        requested: ACCESS_EXEC,
        exe,
        deny_enforce: cfg.exec_deny_enforce,
        deny_audit: cfg.exec_deny_audit,
        active: identity::active_policies(&cfg),
        cfg,
    };
    let out = inode::decide(&o, RuleMap::Exec, file, &req)?;
    let filename = read::<u64>(bprm, o.linux_binprm_filename)
        .ok()
        .map(|p| p as *const u8);
    inode::report(
        &o,
        ACTION_EXEC,
        backend,
        &req,
        &out,
        Some(filename.unwrap_or(core::ptr::null())),
    );
    Ok(out.decision.verdict)
}
