//! The device classes of this node: which device numbers a policy's
//! `devices:` kinds stand for here. Read once per compile from procfs:
//! `<proc>/devices` (dynamic majors: nvidia-uvm, nvidia-caps, kfd),
//! `<proc>/misc` (rdma_cm), `<proc>/driver/nvidia/gpus/*/information`
//! (each GPU's minor and UUID) and `<proc>/driver/nvidia-caps/mig-minors`
//! (the capability minor of each MIG instance). `--host-proc` points it at
//! another tree, which is how the tests stand in for a GPU node.

use std::{
    collections::BTreeMap,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::policy::{DeviceKind, DeviceTarget};

/// The NVIDIA driver's fixed character major.
pub const NVIDIA_MAJOR: u32 = 195;
const NVIDIACTL_MINOR: u32 = 255;
const NVIDIA_MODESET_MINOR: u32 = 254;
const INFINIBAND_MAJOR: u32 = 231;
const MISC_MAJOR: u32 = 10;
const DRM_MAJOR: u32 = 226;

/// One device number, or every minor of a major (`minor: None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DevNum {
    pub block: bool,
    pub major: u32,
    pub minor: Option<u32>,
}

impl DevNum {
    /// The device a node at `path` stands for (`None`: not a device node,
    /// or not there).
    pub fn of_node(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        let ft = meta.file_type();
        (ft.is_char_device() || ft.is_block_device()).then(|| DevNum {
            block: ft.is_block_device(),
            major: libc::major(meta.rdev()),
            minor: Some(libc::minor(meta.rdev())),
        })
    }

    const fn char(major: u32, minor: u32) -> Self {
        Self {
            block: false,
            major,
            minor: Some(minor),
        }
    }
}

/// `gpu0/gi1/access 12` or `gpu0/gi1/ci0/access 13` → ((0, 1), minor).
/// `config` and `monitor` are no instance's, and give `None`.
fn parse_mig_line(line: &str) -> Option<((u32, u32), u32)> {
    let (name, minor) = line.trim().split_once(' ')?;
    let mut parts = name.split('/');
    let gpu = parts.next()?.strip_prefix("gpu")?.parse().ok()?;
    let gi = parts.next()?.strip_prefix("gi")?.parse().ok()?;
    Some(((gpu, gi), minor.trim().parse().ok()?))
}

/// An NVIDIA GPU the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Position in PCI bus order, as `nvidia-smi` numbers GPUs.
    pub index: u32,
    pub minor: u32,
    pub uuid: Option<String>,
    pub bus: String,
}

/// What a decision line says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceClass {
    pub class: &'static str,
    pub gpu: Option<Gpu>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeDevices {
    /// Character driver name → major (`<proc>/devices`).
    char_majors: BTreeMap<String, u32>,
    /// Misc device name → minor (`<proc>/misc`).
    misc: BTreeMap<String, u32>,
    /// In index order. Empty without the NVIDIA driver.
    pub gpus: Vec<Gpu>,
    /// Whether `<proc>/driver/nvidia/gpus` exists (the driver is loaded).
    pub nvidia_driver: bool,
    /// MIG capability nodes: `gpu<G>/gi<I>[/ci<C>]/access <minor>` lines of
    /// `mig-minors`, as ((G, I), minor). G is the GPU's device minor.
    mig: Vec<((u32, u32), u32)>,
}

impl NodeDevices {
    /// Reads the tree under `proc_root` (normally `/proc`). Missing files
    /// mean no such driver here, not an error.
    pub fn discover(proc_root: &Path) -> Self {
        let read = |rel: &str| std::fs::read_to_string(proc_root.join(rel)).unwrap_or_default();
        let mut char_majors = BTreeMap::new();
        let devices = read("devices");
        let chars = devices
            .split("Block devices:")
            .next()
            .unwrap_or_default()
            .lines();
        for line in chars {
            if let Some((num, name)) = line.trim().split_once(' ')
                && let Ok(num) = num.parse()
            {
                char_majors.insert(name.trim().to_owned(), num);
            }
        }
        let misc = read("misc")
            .lines()
            .filter_map(|l| {
                let (num, name) = l.trim().split_once(' ')?;
                Some((name.trim().to_owned(), num.parse().ok()?))
            })
            .collect();
        let mig = read("driver/nvidia-caps/mig-minors")
            .lines()
            .filter_map(parse_mig_line)
            .collect();
        let gpu_dir = proc_root.join("driver/nvidia/gpus");
        let mut buses: Vec<PathBuf> = std::fs::read_dir(&gpu_dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        buses.sort();
        let gpus = buses
            .iter()
            .enumerate()
            .filter_map(|(i, dir)| {
                let info = std::fs::read_to_string(dir.join("information")).ok()?;
                let field = |name: &str| {
                    info.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.trim() == name).then(|| v.trim().to_owned())
                    })
                };
                Some(Gpu {
                    index: i as u32,
                    minor: field("Device Minor")?.parse().ok()?,
                    uuid: field("GPU UUID"),
                    bus: dir.file_name()?.to_string_lossy().into_owned(),
                })
            })
            .collect();
        Self {
            char_majors,
            misc,
            gpus,
            nvidia_driver: gpu_dir.is_dir(),
            mig,
        }
    }

    fn dynamic(&self, driver: &str) -> Result<u32, String> {
        self.char_majors
            .get(driver)
            .copied()
            .ok_or_else(|| format!("no '{driver}' driver on this node (not in /proc/devices)"))
    }

    /// The device numbers `t` stands for on this node. An error says why it
    /// stands for none here (the rule is then compiled as absent and the
    /// reason logged as a warning).
    pub fn resolve(&self, t: &DeviceTarget) -> Result<Vec<DevNum>, String> {
        let range = |major, minors: std::ops::Range<u32>| {
            minors.map(|m| DevNum::char(major, m)).collect::<Vec<_>>()
        };
        Ok(match t {
            DeviceTarget::Number {
                block,
                major,
                minor,
            } => vec![DevNum {
                block: *block,
                major: *major,
                minor: *minor,
            }],
            DeviceTarget::Path(glob) => {
                let found: Vec<DevNum> = crate::compile::resolve_glob(glob)
                    .iter()
                    .filter_map(|r| DevNum::of_node(&r.path))
                    .collect();
                if found.is_empty() {
                    return Err(format!("path {glob} matches no device node now"));
                }
                found
            }
            // Per container, from what the kubelet allocated to it
            // (`compile::devices`): nothing node-wide.
            DeviceTarget::Allocated => Vec::new(),
            DeviceTarget::Kind {
                kind,
                index,
                uuid,
                instance,
            } => match kind {
                DeviceKind::NvidiaGpu => self.gpu_minors(*index, uuid.as_deref())?,
                DeviceKind::Nvidiactl => vec![DevNum::char(NVIDIA_MAJOR, NVIDIACTL_MINOR)],
                DeviceKind::NvidiaModeset => {
                    vec![DevNum::char(NVIDIA_MAJOR, NVIDIA_MODESET_MINOR)]
                }
                DeviceKind::NvidiaUvm => vec![DevNum::char(self.dynamic("nvidia-uvm")?, 0)],
                DeviceKind::NvidiaUvmTools => vec![DevNum::char(self.dynamic("nvidia-uvm")?, 1)],
                DeviceKind::NvidiaCaps => vec![DevNum {
                    block: false,
                    major: self.dynamic("nvidia-caps")?,
                    minor: None,
                }],
                DeviceKind::NvidiaMig => self.mig_minors(*index, *instance)?,
                DeviceKind::RdmaUmad => range(INFINIBAND_MAJOR, 0..64),
                DeviceKind::RdmaIssm => range(INFINIBAND_MAJOR, 64..128),
                DeviceKind::RdmaUverbs => range(INFINIBAND_MAJOR, 192..256),
                DeviceKind::RdmaCm => {
                    let minor =
                        self.misc.get("rdma_cm").copied().ok_or_else(|| {
                            "no rdma_cm on this node (not in /proc/misc)".to_owned()
                        })?;
                    vec![DevNum::char(MISC_MAJOR, minor)]
                }
                DeviceKind::DrmRender => range(DRM_MAJOR, 128..256),
                DeviceKind::AmdKfd => vec![DevNum::char(self.dynamic("kfd")?, 0)],
            },
        })
    }

    /// The capability nodes of GPU `index`'s MIG instance `instance` (and
    /// of its compute instances), or of all of them when one is absent.
    fn mig_minors(&self, index: Option<u32>, instance: Option<u32>) -> Result<Vec<DevNum>, String> {
        let major = self.dynamic("nvidia-caps")?;
        let gpu = match index {
            Some(i) => Some(
                self.gpu_minors(Some(i), None)?
                    .first()
                    .and_then(|d| d.minor)
                    .unwrap_or(i),
            ),
            None => None,
        };
        let minors: Vec<DevNum> = self
            .mig
            .iter()
            .filter(|((g, gi), _)| gpu.is_none_or(|x| x == *g) && instance.is_none_or(|x| x == *gi))
            .map(|(_, minor)| DevNum::char(major, *minor))
            .collect();
        if minors.is_empty() {
            return Err(
                "no such MIG instance on this node (not in /proc/driver/nvidia-caps/mig-minors)"
                    .to_owned(),
            );
        }
        Ok(minors)
    }

    /// GPU minors: every GPU's, or one by index or UUID. Without the
    /// driver's tree, index N is minor N (the driver's own numbering when
    /// GPUs come up in bus order) and "every GPU" is minors 0-15.
    fn gpu_minors(&self, index: Option<u32>, uuid: Option<&str>) -> Result<Vec<DevNum>, String> {
        if let Some(uuid) = uuid {
            let gpu = self
                .gpus
                .iter()
                .find(|g| g.uuid.as_deref() == Some(uuid))
                .ok_or_else(|| format!("no NVIDIA GPU with UUID {uuid} on this node"))?;
            return Ok(vec![DevNum::char(NVIDIA_MAJOR, gpu.minor)]);
        }
        match index {
            Some(i) if self.nvidia_driver => {
                let gpu = self
                    .gpus
                    .iter()
                    .find(|g| g.index == i)
                    .ok_or_else(|| format!("no NVIDIA GPU with index {i} on this node"))?;
                Ok(vec![DevNum::char(NVIDIA_MAJOR, gpu.minor)])
            }
            Some(i) => Ok(vec![DevNum::char(NVIDIA_MAJOR, i)]),
            None if self.nvidia_driver => Ok(self
                .gpus
                .iter()
                .map(|g| DevNum::char(NVIDIA_MAJOR, g.minor))
                .collect()),
            None => Ok((0..16).map(|m| DevNum::char(NVIDIA_MAJOR, m)).collect()),
        }
    }

    /// The class of a device number, for the decision log.
    pub fn describe(&self, block: bool, major: u32, minor: u32) -> DeviceClass {
        let class = |class| DeviceClass { class, gpu: None };
        if block {
            return class("block");
        }
        let dynamic = |name: &str| self.char_majors.get(name) == Some(&major);
        match (major, minor) {
            (NVIDIA_MAJOR, NVIDIACTL_MINOR) => class("nvidiactl"),
            (NVIDIA_MAJOR, NVIDIA_MODESET_MINOR) => class("nvidia-modeset"),
            (NVIDIA_MAJOR, m) => DeviceClass {
                class: "nvidia-gpu",
                gpu: self
                    .gpus
                    .iter()
                    .find(|g| g.minor == m)
                    .cloned()
                    .or_else(|| {
                        (!self.nvidia_driver).then(|| Gpu {
                            index: m,
                            minor: m,
                            uuid: None,
                            bus: String::new(),
                        })
                    }),
            },
            (_, 0) if dynamic("nvidia-uvm") => class("nvidia-uvm"),
            (_, 1) if dynamic("nvidia-uvm") => class("nvidia-uvm-tools"),
            _ if dynamic("nvidia-caps") && self.mig.iter().any(|(_, m)| *m == minor) => {
                class("nvidia-mig")
            }
            _ if dynamic("nvidia-caps") => class("nvidia-caps"),
            _ if dynamic("kfd") => class("amd-kfd"),
            (INFINIBAND_MAJOR, 0..64) => class("rdma-umad"),
            (INFINIBAND_MAJOR, 64..128) => class("rdma-issm"),
            (INFINIBAND_MAJOR, 192..256) => class("rdma-uverbs"),
            (MISC_MAJOR, m) if self.misc.get("rdma_cm") == Some(&m) => class("rdma-cm"),
            (DRM_MAJOR, 128..256) => class("drm-render"),
            _ => class("char"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for a GPU node's procfs: two GPUs whose minors are not
    /// their indexes, nvidia-uvm at 509, rdma_cm at misc 58.
    pub(crate) fn fake_proc(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("devices"),
            "Character devices:\n  1 mem\n195 nvidia\n509 nvidia-uvm\n510 nvidia-caps\n\nBlock devices:\n  8 sd\n",
        )
        .unwrap();
        std::fs::write(dir.join("misc"), " 58 rdma_cm\n200 tun\n").unwrap();
        std::fs::create_dir_all(dir.join("driver/nvidia-caps")).unwrap();
        std::fs::write(
            dir.join("driver/nvidia-caps/mig-minors"),
            "config 1\nmonitor 2\ngpu1/gi1/access 12\ngpu1/gi1/ci0/access 13\ngpu1/gi2/access 21\n",
        )
        .unwrap();
        for (bus, minor, uuid) in [
            ("0000:3b:00.0", 1, "GPU-aaaa"),
            ("0000:17:00.0", 0, "GPU-bbbb"),
        ] {
            let g = dir.join("driver/nvidia/gpus").join(bus);
            std::fs::create_dir_all(&g).unwrap();
            std::fs::write(
                g.join("information"),
                format!("Model: \t\t Tesla T4\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"),
            )
            .unwrap();
        }
    }

    #[test]
    fn kinds_resolve_to_this_nodes_numbers() {
        let dir = std::env::temp_dir().join(format!("portcullis-proc-{}", std::process::id()));
        fake_proc(&dir);
        let node = NodeDevices::discover(&dir);
        let kind = |kind, index, uuid: Option<&str>| DeviceTarget::Kind {
            kind,
            index,
            uuid: uuid.map(str::to_owned),
            instance: None,
        };
        // MIG: GPU 1 (minor 1) has instances 1 and 2, instance 1 with one
        // compute instance; `config` is no instance's.
        let mig = |index, instance| {
            node.resolve(&DeviceTarget::Kind {
                kind: DeviceKind::NvidiaMig,
                index,
                uuid: None,
                instance,
            })
        };
        assert_eq!(
            mig(Some(1), Some(1)),
            Ok(vec![DevNum::char(510, 12), DevNum::char(510, 13)])
        );
        assert_eq!(mig(Some(1), Some(2)), Ok(vec![DevNum::char(510, 21)]));
        assert_eq!(mig(None, None).map(|v| v.len()), Ok(3));
        assert!(mig(Some(0), None).is_err(), "GPU 0 has no MIG instance");
        // Index in bus order: 0000:17 is GPU 0 (minor 0), 0000:3b GPU 1.
        assert_eq!(
            node.resolve(&kind(DeviceKind::NvidiaGpu, Some(1), None)),
            Ok(vec![DevNum::char(195, 1)])
        );
        assert_eq!(
            node.resolve(&kind(DeviceKind::NvidiaGpu, None, Some("GPU-bbbb"))),
            Ok(vec![DevNum::char(195, 0)])
        );
        assert!(
            node.resolve(&kind(DeviceKind::NvidiaGpu, Some(2), None))
                .is_err()
        );
        assert_eq!(
            node.resolve(&kind(DeviceKind::NvidiaUvmTools, None, None)),
            Ok(vec![DevNum::char(509, 1)])
        );
        assert_eq!(
            node.resolve(&kind(DeviceKind::RdmaCm, None, None)),
            Ok(vec![DevNum::char(10, 58)])
        );
        assert!(node.resolve(&kind(DeviceKind::AmdKfd, None, None)).is_err());
        let gpu1 = node.describe(false, 195, 1);
        assert_eq!(
            (gpu1.class, gpu1.gpu.map(|g| (g.index, g.uuid))),
            ("nvidia-gpu", Some((1, Some("GPU-aaaa".into()))))
        );
        assert_eq!(node.describe(false, 509, 1).class, "nvidia-uvm-tools");
        std::fs::remove_dir_all(&dir).unwrap();

        // No driver: index N is minor N, and uvm is unknown here.
        let bare = NodeDevices::default();
        assert_eq!(
            bare.resolve(&kind(DeviceKind::NvidiaGpu, Some(3), None)),
            Ok(vec![DevNum::char(195, 3)])
        );
        assert!(
            bare.resolve(&kind(DeviceKind::NvidiaUvm, None, None))
                .is_err()
        );
    }
}
