//! New cgroups: the BTF tracepoint `cgroup_mkdir` tells the agent within
//! milliseconds, so it can classify the cgroup before the ancestor fallback
//! matters for long. Observe only; a full ring buffer is counted in
//! `COUNTER_MKDIR_LOST` (the agent's periodic rescan catches up).

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_probe_read_kernel_str_bytes},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use portcullis_common::{
    COUNTER_MKDIR_LOST, EVENT_CGROUP_MKDIR, EVENT_NAME_LEN, EVENT_NAMES, Event,
};

use crate::decision::{fill_common, reserve};

#[btf_tracepoint(function = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: BtfTracePointContext) -> u32 {
    let path: *const u8 = ctx.arg(1);
    let Some(mut entry) = reserve(COUNTER_MKDIR_LOST) else {
        return 0;
    };
    let e: *mut Event = entry.as_mut_ptr();
    // SAFETY: `e` is the reserved entry; `path` is a kernel string.
    unsafe {
        fill_common(e, EVENT_CGROUP_MKDIR, 0, bpf_get_current_cgroup_id());
        // The whole `names` array as one buffer: pod and container cgroup
        // paths run to ~200 bytes (systemd driver), far past one name slot,
        // and a truncated path names no cgroup. Longer paths still fall to
        // the rescan.
        let buf = &mut *((*e)
            .names
            .as_mut_ptr()
            .cast::<[u8; EVENT_NAMES * EVENT_NAME_LEN]>());
        if bpf_probe_read_kernel_str_bytes(path, buf).is_err() {
            (*e).names[0][0] = 0;
        }
    }
    entry.submit(0);
    0
}
