//! Pod UID and container ID from a cgroup path, for every layout the
//! kubelet and the common runtimes produce:
//!
//! | driver | runtime | container cgroup |
//! | --- | --- | --- |
//! | systemd | containerd | `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope` |
//! | systemd | CRI-O | `…/kubepods-burstable-pod<uid>.slice/crio-<id>.scope` (and `crio-conmon-<id>.scope` for its monitor) |
//! | systemd | Docker (cri-dockerd) | `…/kubepods-pod<uid>.slice/docker-<id>.scope` |
//! | cgroupfs | containerd | `/kubepods/besteffort/pod<uid>/<id>` |
//! | cgroupfs | CRI-O | `/kubepods/burstable/pod<uid>/crio-<id>` |
//!
//! Guaranteed pods have no QoS level (`kubepods-pod<uid>.slice`,
//! `/kubepods/pod<uid>`). The pod segment is looked for anywhere in the
//! path, so a kubelet with a `--cgroup-root` (kind, k3s: `/kubelet.slice/
//! kubelet-kubepods.slice/…`) parses too. Cgroups nested inside a
//! container's cgroup belong to that container.
//!
//! Parsing is only the first half of identity: a cgroup path can be created
//! by anyone with cgroup write access, so the UID and ID found here are only
//! keys to look up in the runtime (CRI), never trusted as metadata.

/// Which runtime's naming the container segment used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A bare 64-hex ID (cgroupfs driver): containerd, or anything else that
    /// names the cgroup after the container.
    Unknown,
}

/// What a cgroup path says about the pod it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// Pod UID in its API form (dashes, not the systemd underscores).
    pub pod_uid: String,
    /// The container this cgroup (or an ancestor of it) belongs to; `None`
    /// for the pod-level cgroup itself and for CRI-O's conmon.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// The pod-level cgroup's path (up to and including the pod segment).
    pub pod_path: String,
}

/// Parses `path` (relative to the cgroup v2 root, starting with `/`).
/// `None` when no segment is a pod cgroup.
pub fn parse(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (i, pod_uid) = segments
        .iter()
        .enumerate()
        .find_map(|(i, seg)| pod_uid(seg).map(|uid| (i, uid)))?;
    let (container_id, runtime) = match segments.get(i + 1).and_then(|s| container(s)) {
        Some((id, rt)) => (id, Some(rt)),
        None => (None, None),
    };
    let pod_path = format!("/{}", segments[..=i].join("/"));
    Some(PodCgroup {
        pod_uid,
        container_id,
        runtime,
        pod_path,
    })
}

/// `kubepods-besteffort-pod<uid_>.slice` (systemd) or `pod<uid>` (cgroupfs).
fn pod_uid(seg: &str) -> Option<String> {
    if let Some(unit) = seg.strip_suffix(".slice") {
        // The kubelet escapes '-' in the UID as '_' because '-' nests slices.
        let at = unit.rfind("-pod")?;
        let uid = unit[at + "-pod".len()..].replace('_', "-");
        return valid_uid(&uid).then_some(uid);
    }
    let uid = seg.strip_prefix("pod")?;
    valid_uid(uid).then(|| uid.to_string())
}

/// A pod UID: a UUID for API pods, a 32-hex hash for static pods.
fn valid_uid(uid: &str) -> bool {
    (32..=36).contains(&uid.len())
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && uid.bytes().filter(|b| b.is_ascii_hexdigit()).count() == 32
}

/// The container segment right below the pod segment.
fn container(seg: &str) -> Option<(Option<String>, Runtime)> {
    let (name, scope) = match seg.strip_suffix(".scope") {
        Some(name) => (name, true),
        None => (seg, false),
    };
    if name.starts_with("crio-conmon-") {
        // CRI-O's monitor process: part of the pod, runs no workload code.
        return Some((None, Runtime::CriO));
    }
    let (id, runtime) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (id, Runtime::Containerd)
    } else if let Some(id) = name.strip_prefix("crio-") {
        (id, Runtime::CriO)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (id, Runtime::Docker)
    } else if !scope {
        (name, Runtime::Unknown)
    } else {
        return None;
    };
    valid_container_id(id).then(|| (Some(id.to_string()), runtime))
}

/// Runtimes name containers by 64 lowercase hex digits.
fn valid_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f2c3b1e-7a4d-4c8e-9b1a-2d3e4f5a6b7c";
    const UID_: &str = "0f2c3b1e_7a4d_4c8e_9b1a_2d3e4f5a6b7c";
    const ID: &str = "3b1f0c2e4d5a6978b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d";

    /// [`parse`] without `pod_path` (checked on its own below).
    fn parsed(path: &str) -> Option<PodCgroup> {
        parse(path).map(|p| PodCgroup {
            pod_path: String::new(),
            ..p
        })
    }

    #[test]
    fn pod_level_path() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        );
        assert_eq!(
            parse(&format!("{p}/cri-containerd-{ID}.scope/x"))
                .unwrap()
                .pod_path,
            p
        );
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}/{ID}")).unwrap().pod_path,
            format!("/kubepods/pod{UID}")
        );
    }

    fn pod(container: Option<&str>, runtime: Option<Runtime>) -> Option<PodCgroup> {
        Some(PodCgroup {
            pod_uid: UID.into(),
            container_id: container.map(Into::into),
            runtime,
            pod_path: String::new(),
        })
    }

    #[test]
    fn systemd_driver_containerd_crio_docker() {
        let base = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        );
        assert_eq!(parsed(&base), pod(None, None));
        assert_eq!(
            parsed(&format!("{base}/cri-containerd-{ID}.scope")),
            pod(Some(ID), Some(Runtime::Containerd))
        );
        assert_eq!(
            parsed(&format!("{base}/crio-{ID}.scope")),
            pod(Some(ID), Some(Runtime::CriO))
        );
        assert_eq!(
            parsed(&format!("{base}/crio-conmon-{ID}.scope")),
            pod(None, Some(Runtime::CriO))
        );
        assert_eq!(
            parsed(&format!("{base}/docker-{ID}.scope")),
            pod(Some(ID), Some(Runtime::Docker))
        );
        // Guaranteed QoS: no QoS slice.
        assert_eq!(
            parsed(&format!(
                "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
            )),
            pod(Some(ID), Some(Runtime::Containerd))
        );
    }

    #[test]
    fn cgroupfs_driver() {
        assert_eq!(
            parsed(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
            pod(Some(ID), Some(Runtime::Unknown))
        );
        assert_eq!(
            parsed(&format!("/kubepods/burstable/pod{UID}/crio-{ID}")),
            pod(Some(ID), Some(Runtime::CriO))
        );
        assert_eq!(parsed(&format!("/kubepods/pod{UID}")), pod(None, None));
    }

    #[test]
    fn kubelet_cgroup_root_and_nested_cgroups() {
        let p = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope/init.scope"
        );
        assert_eq!(parsed(&p), pod(Some(ID), Some(Runtime::Containerd)));
        // Static pods have a 32-hex UID.
        let static_uid = "6f1c0e0d8a5b4b2c9e7f1a2b3c4d5e6f";
        assert_eq!(
            parsed(&format!("/kubepods/burstable/pod{static_uid}")).map(|p| p.pod_uid),
            Some(static_uid.to_string())
        );
    }

    #[test]
    fn non_pod_paths() {
        for p in [
            "/",
            "/system.slice/containerd.service",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-besteffort.slice",
            "/kubepods/besteffort",
            "/user.slice/pod-manager.slice",
            "/podcast",
            "/kubepods/besteffort/podnot-a-uid",
        ] {
            assert_eq!(parsed(p), None, "{p}");
        }
        // A pod cgroup with an unrecognised child is still the pod.
        assert_eq!(
            parsed(&format!("/kubepods/pod{UID}/something-else.scope")),
            pod(None, None)
        );
        assert_eq!(
            parsed(&format!("/kubepods/pod{UID}/{}", &ID[..12])),
            pod(None, None)
        );
    }
}
