//! Workload identity: which cgroups exist and which policies select them.
//!
//! The agent classifies every cgroup at start and again on every reload;
//! between reloads, cgroups created later are reported by the kernel
//! (`cgroup_mkdir` tracepoint → ring buffer) and classified one by one, with
//! a periodic rescan as a safety net. Until a new cgroup is classified the
//! kernel gives it the identity of its nearest classified ancestor.

use std::path::{Path, PathBuf};

use crate::{cgroup, compile::CgroupInfo};

/// Every cgroup under the v2 root (the root itself included), parents
/// before children. Cgroups that vanish during the walk are skipped.
pub fn scan(root: &Path) -> Vec<CgroupInfo> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(id) = cgroup::id_of(&dir) else {
            continue;
        };
        out.push(CgroupInfo::new(id, cgroup::display_path(root, &dir)));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut children: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        children.sort();
        stack.extend(children.into_iter().rev());
    }
    out
}

/// Looks up one cgroup by its path relative to the v2 root (as the
/// `cgroup_mkdir` tracepoint reports it). `None` if it is already gone or
/// is not a v2 cgroup (the tracepoint also fires for v1 hierarchies).
pub fn lookup(root: &Path, rel: &str) -> Option<CgroupInfo> {
    let dir = root.join(rel.trim_start_matches('/'));
    let id = cgroup::id_of(&dir).ok()?;
    Some(CgroupInfo::new(id, cgroup::display_path(root, &dir)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_lists_root_first_and_nested_dirs() {
        let tmp = std::env::temp_dir().join(format!("portcullis-scan-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("a/b")).unwrap();
        std::fs::create_dir_all(tmp.join("c")).unwrap();
        std::fs::write(tmp.join("a/file"), b"").unwrap();
        let paths: Vec<String> = scan(&tmp).into_iter().map(|c| c.path).collect();
        assert_eq!(paths, ["/", "/a", "/a/b", "/c"]);
        assert_eq!(lookup(&tmp, "/a/b").map(|c| c.path), Some("/a/b".into()));
        assert_eq!(lookup(&tmp, "missing"), None);
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
