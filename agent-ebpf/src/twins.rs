//! The tracepoint fallbacks run as twins: two programs on the same
//! tracepoint, where the first of the two to run for an event decides it.
//!
//! The kernel skips a tracepoint program's run while that same program is
//! already running on the CPU (`__bpf_trace_run`'s `prog->active` guard,
//! counted in `bpf_prog_info.recursion_misses`). Where tracepoint programs
//! run preemptibly (seen on 7.3: a task is preempted in the middle of
//! `open_tp` on a CPU), every other task's event on that CPU until it
//! resumes is skipped, undecided: a denied open that succeeds. Each program
//! has its own guard, so a twin still runs for those events. An event goes
//! undecided only when both are skipped: two other tasks preempted on its
//! CPU, one inside each twin. Skips of either are exported
//! (`portcullis_hook_runs_skipped_total`).

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
