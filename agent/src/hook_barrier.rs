//! Waiting until no hook that started before a map write is still running.
//!
//! A hook reads its cgroup's identity first and that identity's rules after.
//! Once the agent has pointed every cgroup at a new generation, a hook that
//! read an old identity just before may still be about to look up the old
//! rules, so those may be deleted only when every such hook has finished. A
//! wall-clock grace cannot promise that: a preemptible kernel (7.x Debian
//! builds) or a host that stalls a virtual CPU can hold a hook in the middle
//! of its run for longer than any grace chosen in advance.
//!
//! The kernel has the barrier needed: updating a map-in-map from user space
//! returns only after `synchronize_rcu()`, that is after every non-sleepable
//! BPF program that was running has returned (`maybe_wait_bpf_programs` in
//! `kernel/bpf/syscall.c`, there since 4.x). Every Portcullis hook is
//! non-sleepable, so one update of a one-slot array of maps is the wait.

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};

use crate::bpf_sys;

/// `enum bpf_map_type`.
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// A one-slot array of maps and the map it holds; used only for the wait.
pub struct HookBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl HookBarrier {
    pub fn new() -> std::io::Result<Self> {
        let inner = bpf_sys::map_create(BPF_MAP_TYPE_ARRAY, 1, None)?;
        let outer = bpf_sys::map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, 1, Some(inner.as_fd()))?;
        Ok(Self { outer, inner })
    }

    /// Returns once every BPF program running at the call has returned
    /// (milliseconds; it blocks the calling thread).
    pub fn wait(&self) -> std::io::Result<()> {
        bpf_sys::map_update(self.outer.as_fd(), 0, self.inner.as_raw_fd() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The barrier is real syscalls: the kernel must accept an array of
    /// maps and its update (root only; other users skip).
    #[test]
    fn the_kernel_accepts_the_barrier() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating BPF maps needs root");
            return;
        }
        let b = HookBarrier::new().expect("array of maps");
        b.wait().expect("first wait");
        b.wait().expect("second wait");
    }
}
