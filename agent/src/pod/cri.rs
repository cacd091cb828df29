//! A minimal client for the CRI `runtime.v1.RuntimeService` over the node's
//! runtime socket (containerd: `/run/containerd/containerd.sock`, CRI-O:
//! `/var/run/crio/crio.sock`).
//!
//! The messages are hand-written `prost` structs carrying only the fields we
//! read or send, with the field numbers of `k8s.io/cri-api/pkg/apis/runtime/
//! v1/api.proto`. Protobuf skips fields a message does not declare, so a
//! newer runtime's extra fields are harmless, and no `protoc` is needed to
//! build. The request side (RunPodSandbox, CreateContainer, ...) is here too
//! because the end-to-end tests drive a real containerd through it, exactly
//! as the kubelet would.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use tonic::{
    client::Grpc,
    transport::{Channel, Endpoint, Uri},
};
use tonic_prost::ProstCodec;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connecting to the CRI socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI call {method} on {path}: {status}")]
    Call {
        method: &'static str,
        path: PathBuf,
        status: Box<tonic::Status>,
    },
    #[error("CRI call {method} on {path} timed out after {after:?}")]
    Timeout {
        method: &'static str,
        path: PathBuf,
        after: Duration,
    },
}

// ---- messages (field numbers from runtime/v1/api.proto) -------------------

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

/// `NamespaceMode`: POD = 0, CONTAINER = 1, NODE = 2, TARGET = 3.
pub const NAMESPACE_MODE_NODE: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
    /// Needed for any privileged container in the pod.
    #[prost(bool, tag = "6")]
    pub privileged: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// Stop and Remove requests share this shape.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    /// `PodSandboxState`: SANDBOX_READY = 0, SANDBOX_NOTREADY = 1.
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(map = "string, string", tag = "7")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "8")]
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxFilter {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(map = "string, string", tag = "3")]
    pub label_selector: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<PodSandboxFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    #[prost(map = "string, string", tag = "5")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "6")]
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerSecurityContext {
    #[prost(bool, tag = "2")]
    pub privileged: bool,
    #[prost(message, optional, tag = "3")]
    pub namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerConfig {
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxContainerSecurityContext>,
}

/// A device node the kubelet passes into a container (a device plugin's
/// `DeviceSpec`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Device {
    #[prost(string, tag = "1")]
    pub container_path: String,
    #[prost(string, tag = "2")]
    pub host_path: String,
    /// cgroup permissions, `rwm` letters.
    #[prost(string, tag = "3")]
    pub permissions: String,
}

/// A bind mount from the host into a container.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mount {
    #[prost(string, tag = "1")]
    pub container_path: String,
    #[prost(string, tag = "2")]
    pub host_path: String,
    #[prost(bool, tag = "3")]
    pub readonly: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub args: Vec<String>,
    #[prost(message, repeated, tag = "7")]
    pub mounts: Vec<Mount>,
    #[prost(message, repeated, tag = "8")]
    pub devices: Vec<Device>,
    #[prost(map = "string, string", tag = "9")]
    pub labels: HashMap<String, String>,
    #[prost(string, tag = "11")]
    pub log_path: String,
    #[prost(message, optional, tag = "15")]
    pub linux: Option<LinuxContainerConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerResponse {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

/// Start and Remove requests share this shape.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerIdRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StopContainerRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(int64, tag = "2")]
    pub timeout: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerFilter {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "3")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<ContainerFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Container {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "3")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<ImageSpec>,
    #[prost(string, tag = "5")]
    pub image_ref: String,
    /// `ContainerState`: CREATED = 0, RUNNING = 1, EXITED = 2, UNKNOWN = 3.
    #[prost(int32, tag = "6")]
    pub state: i32,
    #[prost(map = "string, string", tag = "8")]
    pub labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListContainersResponse {
    #[prost(message, repeated, tag = "1")]
    pub containers: Vec<Container>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int32, tag = "7")]
    pub exit_code: i32,
    #[prost(message, optional, tag = "8")]
    pub image: Option<ImageSpec>,
    #[prost(string, tag = "9")]
    pub image_ref: String,
    #[prost(map = "string, string", tag = "12")]
    pub labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<ContainerStatus>,
    /// Verbose answers only: runtime-specific JSON (see `allocated`).
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecSyncRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(string, repeated, tag = "2")]
    pub cmd: Vec<String>,
    /// Seconds; 0 means none.
    #[prost(int64, tag = "3")]
    pub timeout: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecSyncResponse {
    #[prost(bytes = "vec", tag = "1")]
    pub stdout: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub stderr: Vec<u8>,
    #[prost(int32, tag = "3")]
    pub exit_code: i32,
}

// ---- containerd's native API (containerd.services.containers.v1) ----------

/// containerd's record of a container. The CRI plugin writes it, with the
/// sandbox's labels, before it starts the container's task (which creates
/// the cgroup), so it answers while `RunPodSandbox` is still running.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerdContainer {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(map = "string, string", tag = "2")]
    pub labels: HashMap<String, String>,
    #[prost(string, tag = "3")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerRequest {
    #[prost(string, tag = "1")]
    pub id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetContainerResponse {
    #[prost(message, optional, tag = "1")]
    pub container: Option<ContainerdContainer>,
}

/// The containerd namespace the CRI plugin uses.
pub const CONTAINERD_CRI_NAMESPACE: &str = "k8s.io";

// ---- client ----------------------------------------------------------------

/// A connected `RuntimeService` client. Cheap to clone (one HTTP/2
/// connection, multiplexed).
#[derive(Clone)]
pub struct CriClient {
    grpc: Grpc<Channel>,
    path: PathBuf,
    timeout: Duration,
}

impl CriClient {
    /// Connects to the unix socket at `path`. Each call is bounded by
    /// `timeout`, so a wedged runtime cannot stall the agent.
    pub async fn connect(path: PathBuf, timeout: Duration) -> Result<Self, CriError> {
        let socket = path.clone();
        // The URI is required by the HTTP/2 layer but never resolved: every
        // connection goes to the unix socket.
        let channel = Endpoint::from_static("http://cri.invalid")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| CriError::Connect {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            grpc: Grpc::new(channel),
            path,
            timeout,
        })
    }

    async fn call<Req, Resp>(&mut self, method: &'static str, req: Req) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.call_in(method, req, None).await
    }

    /// A unary call; `namespace` sets containerd's namespace header (its
    /// native API, unlike CRI, is namespaced).
    async fn call_in<Req, Resp>(
        &mut self,
        method: &'static str,
        req: Req,
        namespace: Option<&'static str>,
    ) -> Result<Resp, CriError>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut request = tonic::Request::new(req);
        if let Some(ns) = namespace {
            request.metadata_mut().insert(
                "containerd-namespace",
                tonic::metadata::MetadataValue::from_static(ns),
            );
        }
        let path = self.path.clone();
        let status = |status| CriError::Call {
            method,
            path: path.clone(),
            status: Box::new(status),
        };
        let fut = async {
            self.grpc
                .ready()
                .await
                .map_err(|e| status(tonic::Status::unavailable(e.to_string())))?;
            let rpc = PathAndQuery::from_static(method);
            self.grpc
                .unary(request, rpc, ProstCodec::<Req, Resp>::default())
                .await
                .map(tonic::Response::into_inner)
                .map_err(status)
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CriError::Timeout {
                method,
                path: self.path.clone(),
                after: self.timeout,
            }),
        }
    }

    pub async fn version(&mut self) -> Result<VersionResponse, CriError> {
        self.call(
            "/runtime.v1.RuntimeService/Version",
            VersionRequest {
                version: "v1".into(),
            },
        )
        .await
    }

    pub async fn list_pod_sandbox(&mut self) -> Result<Vec<PodSandbox>, CriError> {
        let r: ListPodSandboxResponse = self
            .call(
                "/runtime.v1.RuntimeService/ListPodSandbox",
                ListPodSandboxRequest { filter: None },
            )
            .await?;
        Ok(r.items)
    }

    pub async fn pod_sandbox_status(&mut self, id: &str) -> Result<PodSandboxStatus, CriError> {
        let r: PodSandboxStatusResponse = self
            .call(
                "/runtime.v1.RuntimeService/PodSandboxStatus",
                PodSandboxStatusRequest {
                    pod_sandbox_id: id.into(),
                    verbose: false,
                },
            )
            .await?;
        Ok(r.status.unwrap_or_default())
    }

    pub async fn list_containers(&mut self) -> Result<Vec<Container>, CriError> {
        let r: ListContainersResponse = self
            .call(
                "/runtime.v1.RuntimeService/ListContainers",
                ListContainersRequest { filter: None },
            )
            .await?;
        Ok(r.containers)
    }

    /// The container's status, with the runtime's verbose info (where
    /// containerd keeps the CRI config the container was created with).
    pub async fn container_status(
        &mut self,
        id: &str,
    ) -> Result<ContainerStatusResponse, CriError> {
        self.call(
            "/runtime.v1.RuntimeService/ContainerStatus",
            ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            },
        )
        .await
    }

    /// containerd only (CRI-O has no such API): the container record in
    /// the CRI plugin's namespace.
    pub async fn containerd_container(
        &mut self,
        id: &str,
    ) -> Result<ContainerdContainer, CriError> {
        let r: GetContainerResponse = self
            .call_in(
                "/containerd.services.containers.v1.Containers/Get",
                GetContainerRequest { id: id.into() },
                Some(CONTAINERD_CRI_NAMESPACE),
            )
            .await?;
        Ok(r.container.unwrap_or_default())
    }

    pub async fn run_pod_sandbox(&mut self, config: PodSandboxConfig) -> Result<String, CriError> {
        let r: RunPodSandboxResponse = self
            .call(
                "/runtime.v1.RuntimeService/RunPodSandbox",
                RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                },
            )
            .await?;
        Ok(r.pod_sandbox_id)
    }

    pub async fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        let _: Empty = self
            .call(
                "/runtime.v1.RuntimeService/StopPodSandbox",
                PodSandboxIdRequest {
                    pod_sandbox_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        let _: Empty = self
            .call(
                "/runtime.v1.RuntimeService/RemovePodSandbox",
                PodSandboxIdRequest {
                    pod_sandbox_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn create_container(
        &mut self,
        pod_sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: PodSandboxConfig,
    ) -> Result<String, CriError> {
        let r: CreateContainerResponse = self
            .call(
                "/runtime.v1.RuntimeService/CreateContainer",
                CreateContainerRequest {
                    pod_sandbox_id: pod_sandbox_id.into(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                },
            )
            .await?;
        Ok(r.container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<(), CriError> {
        let _: Empty = self
            .call(
                "/runtime.v1.RuntimeService/StartContainer",
                ContainerIdRequest {
                    container_id: id.into(),
                },
            )
            .await?;
        Ok(())
    }

    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<ExecSyncResponse, CriError> {
        self.call(
            "/runtime.v1.RuntimeService/ExecSync",
            ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_secs,
            },
        )
        .await
    }
}
