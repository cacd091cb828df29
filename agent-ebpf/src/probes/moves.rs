//! Renames and hard links of governed files: BPF-LSM `inode_rename` and
//! `inode_link`. A `dir/**` file rule is matched by walking the opened
//! file's dentries up to `dir`, so a file renamed or linked out of the
//! subtree would then open under a name no rule covers. So a task may
//! rename or link a file only if its file rules let it both read and write
//! that file where it is; otherwise the call fails with EPERM. The kernel
//! asks `inode_rename` a second time, source and target swapped, for
//! `RENAME_EXCHANGE`, so each file of an exchange is checked as it moves.
//!
//! No fallback: without BPF-LSM, renames and links are not governed (the
//! README says so). Fail open, as for opens: a failed kernel read or a
//! missing identity config allows and is counted in `COUNTER_ERR_MOVE`.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use portcullis_common::{
    ACCESS_LINK, ACCESS_READ, ACCESS_RENAME, ACCESS_WRITE, ACTION_MOVE, BACKEND_LSM,
    COUNTER_ERR_MOVE, HAS_FILES, IDENTITY_UNRESTRICTED, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::{
    identity,
    inode::{self, Request, RuleMap},
    kernel::{current_exe, offsets},
    maps::{count, count_decision},
};

/// `inode_rename(old_dir, old_dentry, new_dir, new_dentry)`.
#[lsm(hook = "inode_rename")]
pub fn rename_lsm(ctx: LsmContext) -> i32 {
    // The argument after the hook's own is the previous program's verdict.
    let previous: i32 = ctx.arg(4);
    if previous != 0 {
        return previous;
    }
    verdict(try_move(ctx.arg(1), ACCESS_RENAME))
}

/// `inode_link(old_dentry, dir, new_dentry)`.
#[lsm(hook = "inode_link")]
pub fn link_lsm(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(3);
    if previous != 0 {
        return previous;
    }
    verdict(try_move(ctx.arg(0), ACCESS_LINK))
}

#[inline(always)]
fn verdict(decided: Result<u8, i64>) -> i32 {
    match decided {
        // An exact constant, as in `open_lsm`.
        Ok(VERDICT_DENY) => -1,
        Ok(_) => 0,
        Err(_) => {
            count(COUNTER_ERR_MOVE);
            0
        }
    }
}

/// Decides moving the file of `dentry` (`call`: `ACCESS_RENAME` or
/// `ACCESS_LINK`, for the decision line).
#[inline(always)]
fn try_move(dentry: *const u8, call: u32) -> Result<u8, i64> {
    let (cgid, id) = identity::current();
    if id == IDENTITY_UNRESTRICTED {
        count_decision(ACTION_MOVE, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let cfg = identity::config(id).ok_or(-1)?;
    if cfg.flags & HAS_FILES == 0 {
        count_decision(ACTION_MOVE, VERDICT_ALLOW);
        return Ok(VERDICT_ALLOW);
    }
    let o = offsets().ok_or(-1)?;
    let req = Request {
        cgroup_id: cgid,
        identity: id,
        requested: ACCESS_READ | ACCESS_WRITE,
        exe: current_exe(&o)?,
        deny_enforce: 0,
        deny_audit: 0,
        active: identity::active_policies(cfg),
        cfg,
    };
    let out = inode::decide_dentry(&o, RuleMap::File, dentry, &req)?;
    let logged = Request {
        requested: call,
        ..req
    };
    inode::report(&o, ACTION_MOVE, BACKEND_LSM, &logged, &out, None);
    Ok(out.decision.verdict)
}
