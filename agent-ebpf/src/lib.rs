//! Exists so `agent` can name this crate as a build-dependency (which makes
//! cargo rebuild the agent when the programs change). The programs are in
//! `main.rs`, built for the BPF target.
#![no_std]
