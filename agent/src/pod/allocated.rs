//! The devices the kubelet allocated to a container, as the runtime reports
//! them: the device list of the container's CRI config, in the verbose
//! `ContainerStatus` (containerd puts the config it was created with under
//! `info["info"].config`).
//!
//! That list is what device plugins hand the kubelet (`DeviceSpec`s, e.g.
//! the NVIDIA plugin with `PASS_DEVICE_SPECS=true`) and nothing else: a
//! privileged container's full `/dev` is added later by the runtime, and an
//! image's `NVIDIA_VISIBLE_DEVICES=all` never reaches it. The environment
//! the kubelet passes is not read: a pod spec can set
//! `NVIDIA_VISIBLE_DEVICES` itself, so it would let a tenant name another
//! tenant's GPU.

use std::collections::HashMap;

use portcullis_common::{ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE};
use serde::Deserialize;

use crate::node_devices::DevNum;

/// One device of a container's CRI config.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AllocatedDevice {
    /// The node on the host (what the device numbers are read from).
    pub host_path: String,
    /// The numbers, when known without reading a node (a policy test's
    /// workload states them).
    pub number: Option<DevNum>,
    /// `ACCESS_*` bits from the kubelet's `permissions` (`rwm`).
    pub access: u32,
}

#[derive(Deserialize)]
struct Info {
    #[serde(default)]
    config: Option<Config>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    devices: Vec<Device>,
}

#[derive(Deserialize)]
struct Device {
    #[serde(default)]
    host_path: String,
    #[serde(default)]
    permissions: String,
}

/// The allocated devices in a verbose `ContainerStatus` info map; `None`
/// when the runtime gave no config to read them from (CRI-O's verbose info
/// differs, and a non-verbose answer has none).
pub fn from_status_info(info: &HashMap<String, String>) -> Option<Vec<AllocatedDevice>> {
    let info: Info = serde_json::from_str(info.get("info")?).ok()?;
    let mut devices: Vec<AllocatedDevice> = info
        .config?
        .devices
        .into_iter()
        .filter(|d| !d.host_path.is_empty())
        .map(|d| AllocatedDevice {
            access: access(&d.permissions),
            host_path: d.host_path,
            number: None,
        })
        .collect();
    devices.sort();
    devices.dedup();
    Some(devices)
}

/// `rwm` letters as `ACCESS_*` bits; the kubelet's default, when empty, is
/// all three.
fn access(permissions: &str) -> u32 {
    if permissions.is_empty() {
        return ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD;
    }
    permissions.chars().fold(0, |a, c| match c {
        'r' => a | ACCESS_READ,
        'w' => a | ACCESS_WRITE,
        'm' => a | ACCESS_MKNOD,
        _ => a,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape containerd 1.6 answers a verbose `ContainerStatus` with.
    #[test]
    fn reads_the_cri_config_device_list_only() {
        let info = r#"{"sandboxID":"abc","pid":42,"config":{"metadata":{"name":"c"},
            "envs":[{"key":"NVIDIA_VISIBLE_DEVICES","value":"all"}],
            "devices":[{"container_path":"/dev/nvidia0","host_path":"/dev/nvidia0","permissions":"rw"},
                       {"container_path":"/dev/nvidiactl","host_path":"/dev/nvidiactl"}]},
            "runtimeSpec":{"linux":{"devices":[{"path":"/dev/nvidia1","type":"c","major":195,"minor":1}]}}}"#;
        let got = from_status_info(&HashMap::from([("info".to_owned(), info.to_owned())]));
        assert_eq!(
            got,
            Some(vec![
                AllocatedDevice {
                    host_path: "/dev/nvidia0".into(),
                    number: None,
                    access: ACCESS_READ | ACCESS_WRITE,
                },
                AllocatedDevice {
                    host_path: "/dev/nvidiactl".into(),
                    number: None,
                    access: ACCESS_READ | ACCESS_WRITE | ACCESS_MKNOD,
                },
            ])
        );
        assert_eq!(from_status_info(&HashMap::new()), None);
        let no_devices = r#"{"config":{"metadata":{"name":"c"}}}"#;
        assert_eq!(
            from_status_info(&HashMap::from([("info".to_owned(), no_devices.to_owned())])),
            Some(vec![])
        );
    }
}
