//! Finding the cgroup v2 hierarchy and naming cgroups.
//!
//! The cgroup v2 mount point differs between hosts (`/sys/fs/cgroup` on
//! unified hosts, `/sys/fs/cgroup/unified` on hybrid ones), so it is read from
//! `/proc/self/mountinfo`, never hard-coded.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NotMounted,
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The mount point of the cgroup v2 hierarchy.
pub fn v2_root() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.into(),
        source,
    })?;
    mountinfo_cgroup2(&text).ok_or(CgroupError::NotMounted)
}

/// Parses mountinfo text for the first cgroup2 mount point.
fn mountinfo_cgroup2(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [tags] - <fstype> <src> <opts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`) for a
/// cgroup directory: its inode number.
pub fn id_of(dir: &Path) -> Result<u64, CgroupError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            path: dir.into(),
            source,
        })
}

/// The cgroup path of `dir` as policies see it: relative to the v2 root,
/// starting with `/` (the root itself is `/`).
pub fn display_path(root: &Path, dir: &Path) -> String {
    match dir.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => "/".to_owned(),
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

/// The innermost systemd unit (`*.service`, `*.scope`, `*.socket`, ...) named
/// in a cgroup path, if any.
pub fn systemd_unit(cgroup_path: &str) -> Option<&str> {
    const SUFFIXES: [&str; 5] = [".service", ".scope", ".socket", ".mount", ".swap"];
    cgroup_path
        .rsplit('/')
        .find(|seg| SUFFIXES.iter().any(|s| seg.ends_with(s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mountinfo_cgroup2(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        let unified = "30 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(mountinfo_cgroup2(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            mountinfo_cgroup2("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
        let escaped = "30 23 0:26 / /mnt/a\\040b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(mountinfo_cgroup2(escaped), Some("/mnt/a b".into()));
    }

    #[test]
    fn names_paths_and_units() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(display_path(root, root), "/");
        assert_eq!(
            display_path(root, &root.join("system.slice/x.service")),
            "/system.slice/x.service"
        );
        assert_eq!(
            systemd_unit("/system.slice/nginx.service"),
            Some("nginx.service")
        );
        assert_eq!(
            systemd_unit("/user.slice/user-0.slice/session-1.scope/x"),
            Some("session-1.scope")
        );
        assert_eq!(systemd_unit("/kubepods/pod1/abc"), None);
    }
}
