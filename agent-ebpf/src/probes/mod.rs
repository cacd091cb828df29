//! One module per hook family.
pub mod cgroup;
pub mod connect;
pub mod device;
pub mod exec;
pub mod file;
pub mod moves;
pub mod socket;
