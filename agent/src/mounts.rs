//! Mounting the pseudo filesystems the agent needs (securityfs to read the
//! active LSM list, bpffs to pin) when a fresh machine lacks them.
//! Kubernetes nodes and systemd hosts usually have both mounted.

use std::path::Path;

/// Mounts a pseudo filesystem `fstype` (source name = type) at `target`.
/// Failures are logged, not fatal: the caller's next step reports what is
/// missing with a clearer error.
pub fn mount_pseudo_fs(fstype: &str, target: &Path) {
    let r = nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    if let Err(e) = r {
        tracing::warn!(error = %e, "mounting {fstype} at {}", target.display());
    }
}
