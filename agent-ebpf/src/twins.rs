//! The tracepoint fallbacks run as twins: two programs for the same event,
//! where the first of the two to run decides it and the second stands
//! down.
//!
//! The kernel skips a tracing program's run, silently but for a counter
//! (`bpf_prog_info.recursion_misses`, exported as
//! `portcullis_hook_runs_skipped_total`), when its recursion guard is
//! taken on the CPU. Seen on 7.3 under QEMU: a BTF-tracepoint program on
//! the raw `sys_exit` is skipped while another task is preempted inside it
//! (`prog->active`), and a classic-tracepoint program while any task is
//! inside a BPF map syscall (`bpf_prog_active`). A skipped open is an open
//! that succeeds undecided. Each twin has its own guard, so a twin still
//! runs when the other is skipped; an event goes undecided only when both
//! are skipped at once. The open twins sit behind different guards
//! (`probes/file.rs`); the exec twins are two BTF-tracepoint programs on
//! `sched_process_exec`, which 7.3 still runs with preemption disabled (no
//! skips measured), as insurance for kernels that change that.

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::LruHashMap};

/// Thread → the event object (`struct file *`, `struct linux_binprm *`) the
/// first twin decided. Each twin either finds its thread's mark for this
/// object and takes it away, or decides and leaves one. A mark is left
/// behind only when the second twin was skipped; it is harmless unless the
/// thread's next event has the same object and the first twin is skipped
/// for it, the same double skip as above. LRU: an evicted mark makes the
/// second twin decide again, never not at all. Not pinned.
#[map]
static TWIN_MARKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// Whether this run is the first of the twins for `object` on the current
/// thread, and so must decide.
#[inline(always)]
pub fn first(object: u64) -> bool {
    let thread = bpf_get_current_pid_tgid();
    // SAFETY: the value is a plain u64 copied out at once.
    if unsafe { TWIN_MARKS.get(&thread) }.copied() == Some(object) {
        let _ = TWIN_MARKS.remove(&thread);
        return false;
    }
    // A failed insert leaves no mark: the second twin decides again.
    let _ = TWIN_MARKS.insert(&thread, &object, 0);
    true
}
