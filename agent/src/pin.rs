//! Pins under bpffs, so enforcement outlives the agent.
//!
//! Layout of a pin directory (default `/sys/fs/bpf/portcullis`):
//!
//! - `maps-v<PIN_LAYOUT>/<MAP>`: the policy maps, ring buffer and counters.
//!   A restarted agent loads its programs against these same maps, so the
//!   policy in force never goes away while it starts.
//! - `links/<program>@<instance>`: one pinned link per attached program. A
//!   pinned link stays attached with no process holding it.
//!
//! Restart is make-before-break: the new agent attaches and pins its links
//! under a fresh `<instance>`, applies its policy, and only then unpins the
//! previous instance's links ([`OldLinks::retire`]). A crash at any point
//! leaves at least one complete set attached; the next start retires every
//! set but its own, so sets never pile up.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::programs::links::PinnedLink;
use portcullis_common::PIN_LAYOUT;

use crate::loader::AttachedLink;

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";
/// `statfs` f_type of bpffs (`linux/magic.h`); x86_64 `__fsword_t` is i64.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pin directory {path} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("creating pin directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading pin directory {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening pinned link {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link of program {program} at {path}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("pinning link of program {program} at {path}")]
    PinRaw {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A pin directory and this agent instance's name within it.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    instance: String,
}

impl PinDir {
    /// Prepares `root` (creating it on bpffs, mounting nothing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, PinError> {
        let root = root.into();
        mount_bpffs_if_needed(&root);
        for dir in [root.join("links"), maps_dir(&root)] {
            std::fs::create_dir_all(&dir).map_err(|source| PinError::Create {
                path: dir.clone(),
                source,
            })?;
        }
        if !is_bpffs(&root) {
            return Err(PinError::NotBpffs { path: root });
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let instance = format!("{}-{nanos}", std::process::id());
        Ok(Self { root, instance })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        maps_dir(&self.root).join(name)
    }

    /// Pins `link`, the `n`th attachment of `program` (a program may attach
    /// to several hooks), under this instance's name.
    pub fn pin_link(
        &self,
        program: &'static str,
        n: usize,
        link: AttachedLink,
    ) -> Result<PinnedLink, PinError> {
        let name = match n {
            0 => format!("{program}@{}", self.instance),
            // bpffs refuses names with a dot.
            n => format!("{program}-{n}@{}", self.instance),
        };
        let path = self.root.join("links").join(name);
        match link {
            AttachedLink::Aya(link) => link.pin(&path).map_err(|source| PinError::Pin {
                program,
                path,
                source,
            }),
            AttachedLink::Raw(fd) => {
                crate::bpf_sys::obj_pin(fd.as_fd(), &path).map_err(|source| PinError::PinRaw {
                    program,
                    path: path.clone(),
                    source,
                })?;
                PinnedLink::from_pin(&path).map_err(|source| PinError::Open { path, source })
            }
        }
    }

    /// Opens every pinned link of earlier instances, so they can be retired
    /// once this instance enforces.
    pub fn old_links(&self) -> Result<OldLinks, PinError> {
        let mut links = Vec::new();
        for path in self.link_paths()? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !name.ends_with(&format!("@{}", self.instance)) {
                let link = PinnedLink::from_pin(&path)
                    .map_err(|source| PinError::Open { path, source })?;
                links.push(link);
            }
        }
        Ok(OldLinks(links))
    }

    /// Every pinned link path, sorted.
    pub fn link_paths(&self) -> Result<Vec<PathBuf>, PinError> {
        let dir = self.root.join("links");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| PinError::Read {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        Ok(paths)
    }

    /// Unpins maps of other layout versions (`maps-v<N>` of an older
    /// agent). Call once no link of that agent is left: its programs were
    /// the maps' last users.
    pub fn remove_stale_maps(&self) -> Result<usize, PinError> {
        let current = maps_dir(&self.root);
        let entries = std::fs::read_dir(&self.root).map_err(|source| PinError::Read {
            path: self.root.clone(),
            source,
        })?;
        let mut removed = 0;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let stale =
                entry.file_name().to_string_lossy().starts_with("maps-v") && path != current;
            if stale {
                removed += uninstall(&path)?;
            }
        }
        Ok(removed)
    }

    /// Unpins this instance's links (they detach when the agent's own file
    /// descriptors close at exit). Used by `--detach-on-exit`.
    pub fn remove_own_links(&self) -> Result<(), PinError> {
        for path in self.link_paths()? {
            if path
                .to_string_lossy()
                .ends_with(&format!("@{}", self.instance))
            {
                std::fs::remove_file(&path).map_err(|source| PinError::Remove { path, source })?;
            }
        }
        Ok(())
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Mounts bpffs at `/sys/fs/bpf` when the pin directory is below it and
/// nothing is mounted there yet (a fresh machine; Kubernetes nodes mount it).
fn mount_bpffs_if_needed(root: &Path) {
    let bpffs = Path::new("/sys/fs/bpf");
    if root.starts_with(bpffs) && !is_bpffs(bpffs) {
        crate::mounts::mount_pseudo_fs("bpf", bpffs);
    }
}

fn maps_dir(root: &Path) -> PathBuf {
    root.join(format!("maps-v{PIN_LAYOUT}"))
}

/// Links of earlier agent instances, still attached until retired.
#[derive(Debug, Default)]
pub struct OldLinks(Vec<PinnedLink>);

impl OldLinks {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Unpins the old links; each detaches as its last reference (the file
    /// descriptor held here) closes.
    pub fn retire(self) -> Result<usize, PinError> {
        let n = self.0.len();
        for link in self.0 {
            match link.unpin() {
                Ok(fd_link) => drop(fd_link),
                Err(source) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(PinError::Remove {
                        path: PathBuf::from("<pinned link>"),
                        source,
                    });
                }
            }
        }
        Ok(n)
    }
}

/// Removes everything pinned under `root`: links detach, maps are freed once
/// no program uses them. What `portcullis uninstall` does.
pub fn uninstall(root: &Path) -> Result<usize, PinError> {
    if !root.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    let mut all_dirs = Vec::new();
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| PinError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(path);
            } else {
                std::fs::remove_file(&path).map_err(|source| PinError::Remove { path, source })?;
                removed += 1;
            }
        }
        all_dirs.push(dir);
    }
    // Deepest first.
    for dir in all_dirs.into_iter().rev() {
        std::fs::remove_dir(&dir).map_err(|source| PinError::Remove { path: dir, source })?;
    }
    Ok(removed)
}
