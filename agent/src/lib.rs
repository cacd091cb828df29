//! Portcullis agent library: everything `main.rs` wires together, exposed so
//! integration tests and benchmarks can drive the same code.

pub mod bpf_sys;
pub mod btf;
pub mod cgroup;
pub mod chain;
pub mod compile;
pub mod daemon;
pub mod evaluate;
pub mod events;
pub mod explain;
pub mod generations;
pub mod hook_barrier;
pub mod http_server;
pub mod identity;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod mounts;
pub mod node_devices;
pub mod pin;
pub mod pod;
pub mod policy;
pub mod policy_test;
pub mod replay;
pub mod slots;
pub mod trail;
pub mod verifier;
