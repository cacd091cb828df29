//! Portcullis kernel programs. Hooks live in `probes/` (one file per
//! family), maps in `maps.rs`, the shared decision logic in `decision.rs`
//! and `inode.rs`, identity lookup in `identity.rs`, the tracepoint
//! fallbacks' twins in `twins.rs`.
#![no_std]
#![no_main]
// `inode::claim` needs a compare-and-swap, and the BPF target's `core` has
// no `AtomicU64::compare_exchange`; the intrinsic lowers to BPF's cmpxchg.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod decision;
mod identity;
mod inode;
mod kernel;
mod maps;
mod probes;
mod twins;

/// GPL-compatible: bpf_probe_read_kernel and bpf_send_signal are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
