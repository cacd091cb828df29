//! The kernels of the QEMU matrix: the newest 6.1 and the newest cloud
//! kernel of the machine's own suites (bookworm), plus the newest cloud
//! kernel of Debian's newer suites (trixie-backports, sid), so a verifier
//! change is met in CI before a user's node meets it. The newer suites are
//! read through a private apt configuration under the cache: the machine's
//! own sources stay as they are.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::vm::{output, status};

/// Where newer kernels come from. `deb.debian.org` is reachable from these
/// machines (it is the package registry); trixie-backports carries the
/// newest stable-line kernel, sid the newest of all.
const NEWER_SOURCES: &str = "deb http://deb.debian.org/debian trixie-backports main\n\
                             deb http://deb.debian.org/debian sid main\n";

/// An apt configuration: the system's, or a private one reading only
/// [`NEWER_SOURCES`].
struct Apt {
    opts: Vec<String>,
}

impl Apt {
    fn system() -> Self {
        Self { opts: Vec::new() }
    }

    fn newer(cache: &Path) -> Self {
        let dir = cache.join("apt-newer");
        let _ = fs::create_dir_all(dir.join("lists/partial"));
        let _ = fs::write(dir.join("sources.list"), NEWER_SOURCES);
        Self {
            opts: vec![
                "-o".into(),
                format!(
                    "Dir::Etc::sourcelist={}",
                    dir.join("sources.list").display()
                ),
                "-o".into(),
                "Dir::Etc::sourceparts=/nonexistent".into(),
                "-o".into(),
                format!("Dir::State::Lists={}", dir.join("lists").display()),
            ],
        }
    }

    fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(&self.opts);
        c
    }

    /// `(version, package)` of every cloud image whose name matches
    /// `pattern` (an `apt-cache search` regex), refreshing the lists once
    /// when nothing is found.
    fn cloud_kernels(&self, pattern: &str, suffix: &str) -> Vec<(String, String)> {
        let search = || {
            output(
                self.cmd("apt-cache")
                    .args(["search", "--names-only", pattern]),
            )
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let pkg = l.split_whitespace().next()?;
                let v = pkg.strip_prefix("linux-image-")?.strip_suffix(suffix)?;
                Some((v.to_owned(), pkg.to_owned()))
            })
            .collect::<Vec<_>>()
        };
        let mut found = search();
        if found.is_empty() {
            let _ = status(self.cmd("apt-get").args(["update", "-q"]));
            found = search();
        }
        found
    }
}

/// Numeric parts of a Debian kernel version, for ordering:
/// `6.12.117+deb12` → [6, 12, 117, 12], `6.1.0-56` → [6, 1, 0, 56].
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// The kernels of the matrix, oldest first. Each is `Err` (counted as
/// failed) when it cannot be had.
pub fn matrix(cache: &Path) -> Vec<(String, Result<PathBuf, String>)> {
    let system = Apt::system();
    let mut offered = system.cloud_kernels(
        "^linux-image-.*-cloud-amd64-unsigned$",
        "-cloud-amd64-unsigned",
    );
    if offered.is_empty() {
        // Offline: fall back to what an earlier run cached.
        offered = fs::read_dir(cache)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("vmlinuz").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|v| !v.contains("+deb13") && !v.contains("+deb14"))
            .map(|v| {
                let pkg = format!("linux-image-{v}-cloud-amd64-unsigned");
                (v, pkg)
            })
            .collect();
    }
    offered.sort_by_key(|(v, _)| version_key(v));
    let newest_61 = offered
        .iter()
        .rev()
        .find(|(v, _)| v.starts_with("6.1.0-"))
        .cloned();
    let newest = offered.last().cloned();
    let newer = Apt::newer(cache);
    let mut newer_offered =
        newer.cloud_kernels("^linux-image-[0-9].*-cloud-amd64$", "-cloud-amd64");
    newer_offered.sort_by_key(|(v, _)| version_key(v));
    // Since 7.x `linux-image-*` is a meta package; the image is in
    // `linux-binary-*`.
    let newest_newer = newer_offered
        .last()
        .cloned()
        .filter(|(v, _)| {
            newest
                .as_ref()
                .is_none_or(|(n, _)| version_key(v) > version_key(n))
        })
        .map(|(v, pkg)| {
            let binary = format!("linux-binary-{v}-cloud-amd64");
            let has_binary = output(newer.cmd("apt-cache").args(["show", &binary]))
                .is_some_and(|o| !o.is_empty());
            (v, if has_binary { binary } else { pkg })
        });
    let mut wanted = vec![
        newest_61.map(|k| (k, &system)).ok_or_else(|| {
            "6.1 (no linux-image-6.1.0-*-cloud-amd64-unsigned offered by apt)".to_owned()
        }),
        newest.map(|k| (k, &system)).ok_or_else(|| {
            "newest (no linux-image-*-cloud-amd64-unsigned offered by apt)".to_owned()
        }),
        newest_newer.map(|k| (k, &newer)).ok_or_else(|| {
            "newer (no linux-image-*-cloud-amd64 in trixie-backports or sid)".to_owned()
        }),
    ];
    wanted.dedup_by(|a, b| match (a, b) {
        (Ok((ka, _)), Ok((kb, _))) => ka == kb,
        _ => false,
    });
    wanted
        .into_iter()
        .map(|w| match w {
            Ok(((v, pkg), apt)) => {
                let k = fetch(apt, cache, &v, &pkg).map_err(|e| format!("{e:#}"));
                if let Err(e) = &k {
                    eprintln!("vm: KERNEL {v} UNAVAILABLE: {e}");
                }
                (v, k)
            }
            Err(e) => {
                eprintln!("vm: KERNEL UNAVAILABLE: {e}");
                ("missing".to_owned(), Err(e))
            }
        })
        .collect()
}

/// `apt-get download` + `dpkg -x`, keeping only the kernel image.
fn fetch(apt: &Apt, cache: &Path, version: &str, package: &str) -> Result<PathBuf> {
    let dir = cache.join(version);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        eprintln!("vm: kernel {version}: cached at {}", vmlinuz.display());
        return Ok(vmlinuz);
    }
    let tmp = cache.join(format!("{version}.partial"));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    status(
        apt.cmd("apt-get")
            .args(["download", "-q", package])
            .current_dir(&tmp),
    )?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let root = tmp.join("root");
    status(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let Some(image) = kernel_image(&root, version) else {
        bail!(
            "{} has neither boot/vmlinuz-* nor usr/lib/modules/*/vmlinuz",
            deb.display()
        );
    };
    fs::create_dir_all(&dir)?;
    fs::copy(&image, &vmlinuz)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(vmlinuz)
}

/// Until 6.x the image is `boot/vmlinuz-<v>`; the 7.x `linux-binary-*`
/// packages ship it as `usr/lib/modules/<v>/vmlinuz` only.
fn kernel_image(root: &Path, version: &str) -> Option<PathBuf> {
    let release = format!("{version}-cloud-amd64");
    [
        root.join(format!("boot/vmlinuz-{release}")),
        root.join(format!("usr/lib/modules/{release}/vmlinuz")),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::version_key;

    #[test]
    fn versions_order_numerically() {
        assert!(version_key("7.3.4+deb13") > version_key("6.12.117+deb12"));
        assert!(version_key("6.12.117+deb12") > version_key("6.1.0-57"));
    }
}
