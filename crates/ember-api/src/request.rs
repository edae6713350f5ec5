//! Routing: an HTTP method, path and body become an [`ApiRequest`] (or the 400 answer
//! Firecracker gives), with Firecracker's paths, methods and error messages.

use serde::de::DeserializeOwned;

use crate::model::*;

/// One parsed API request.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `PUT /actions`.
    Action(ActionType),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfiguration),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigurationPatch),
    /// `PUT /cpu-config`.
    PutCpuConfig(CpuConfig),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `GET /balloon`.
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `PATCH /balloon`.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /serial`.
    PutSerial(SerialDevice),
    /// `PATCH /vm`.
    PatchVm(VmState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// `PUT /fork/template` (Ember): the paused microVM becomes a fork template, served on
    /// the VMM's fork socket.
    CreateForkTemplate,
    /// `PUT /fork/load` (Ember): the microVM is a fork of a template another VMM serves.
    LoadFork(ForkLoadParams),
}

impl ApiRequest {
    /// The metrics group and counter name of this request (`put_api_requests.drive_count`).
    pub fn metric(&self) -> (&'static str, &'static str) {
        use ApiRequest::*;
        match self {
            GetInstanceInfo => ("get_api_requests", "instance_info_count"),
            GetVersion => ("get_api_requests", "vmm_version_count"),
            GetMachineConfig => ("get_api_requests", "machine_cfg_count"),
            GetBalloon | GetBalloonStats => ("get_api_requests", "balloon_count"),
            GetVmConfig => ("get_api_requests", "vm_config_count"),
            Action(_) => ("put_api_requests", "actions_count"),
            PutBootSource(_) => ("put_api_requests", "boot_source_count"),
            PutMachineConfig(_) => ("put_api_requests", "machine_cfg_count"),
            PutCpuConfig(_) => ("put_api_requests", "cpu_cfg_count"),
            PutDrive(_) => ("put_api_requests", "drive_count"),
            PutNetworkInterface(_) => ("put_api_requests", "network_count"),
            PutVsock(_) => ("put_api_requests", "vsock_count"),
            PutEntropy(_) => ("put_api_requests", "entropy_count"),
            PutBalloon(_) => ("put_api_requests", "balloon_count"),
            PutLogger(_) => ("put_api_requests", "logger_count"),
            PutMetrics(_) => ("put_api_requests", "metrics_count"),
            PutSerial(_) => ("put_api_requests", "serial_count"),
            CreateSnapshot(_) => ("put_api_requests", "snapshot_create_count"),
            LoadSnapshot(_) => ("put_api_requests", "snapshot_load_count"),
            CreateForkTemplate => ("put_api_requests", "fork_template_count"),
            LoadFork(_) => ("put_api_requests", "fork_load_count"),
            PatchMachineConfig(_) => ("patch_api_requests", "machine_cfg_count"),
            PatchDrive(_) => ("patch_api_requests", "drive_count"),
            PatchNetworkInterface(_) => ("patch_api_requests", "network_count"),
            PatchBalloon(_) | PatchBalloonStats(_) => ("patch_api_requests", "balloon_count"),
            PatchVm(_) => ("patch_api_requests", "vm_count"),
        }
    }
}

/// An answer: a status code and, unless 204, a JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// JSON body (`None`: no body).
    pub body: Option<String>,
}

impl ApiResponse {
    /// 204 No Content.
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: None,
        }
    }

    /// 200 with `value` as JSON.
    pub fn ok<T: serde::Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => ApiResponse {
                status: 200,
                body: Some(body),
            },
            Err(e) => ApiResponse::error(500, format!("cannot encode the answer: {e}")),
        }
    }

    /// 400 with `fault_message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::error(400, message)
    }

    /// `status` with `fault_message`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = serde_json::to_string(&ApiError {
            fault_message: message.into(),
        })
        .unwrap_or_else(|_| "{\"fault_message\":\"\"}".into());
        ApiResponse {
            status,
            body: Some(body),
        }
    }
}

/// Why a request was refused before reaching the VMM (always answered 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No such path, or not with this method.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathOrMethod {
        /// The method.
        method: String,
        /// The path.
        path: String,
    },
    /// A PUT or PATCH without a body.
    #[error("Empty {0} request.")]
    EmptyBody(String),
    /// The body is not the JSON the path takes.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(String),
    /// The id in the path and in the body differ.
    #[error("The id from the path [{path}] does not match the id from the body [{body}]!")]
    IdMismatch {
        /// The path's.
        path: String,
        /// The body's.
        body: String,
    },
    /// An id with characters Firecracker does not allow.
    #[error("Invalid ID: {0:?} (1 to 64 characters: letters, digits and underscore)")]
    InvalidId(String),
    /// A Firecracker endpoint Ember does not implement.
    #[error("{0} is not supported by Ember.")]
    Unsupported(&'static str),
}

impl From<RequestError> for ApiResponse {
    fn from(e: RequestError) -> Self {
        ApiResponse::bad_request(e.to_string())
    }
}

/// `{}` and nothing else.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyObject {}

fn json<T: DeserializeOwned>(method: &str, body: &[u8]) -> Result<T, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::EmptyBody(method.to_string()));
    }
    serde_json::from_slice(body).map_err(|e| RequestError::Json(e.to_string()))
}

/// Firecracker's ids: 1 to 64 of `[A-Za-z0-9_]`.
fn check_id(id: &str) -> Result<(), RequestError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(RequestError::InvalidId(id.to_string()));
    }
    Ok(())
}

fn same_id(path: &str, body: &str) -> Result<(), RequestError> {
    check_id(path)?;
    if path != body {
        return Err(RequestError::IdMismatch {
            path: path.to_string(),
            body: body.to_string(),
        });
    }
    Ok(())
}

/// Parses one request. `path` may carry a query string (ignored).
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, RequestError> {
    let clean = path.split('?').next().unwrap_or("");
    let trimmed = clean.trim_end_matches('/');
    let parts: Vec<&str> = trimmed.split('/').skip(1).collect();
    let invalid = || RequestError::InvalidPathOrMethod {
        method: method.to_string(),
        path: clean.to_string(),
    };
    use ApiRequest::*;
    let req = match (method, parts.as_slice()) {
        ("GET", []) => GetInstanceInfo,
        ("GET", ["version"]) => GetVersion,
        ("PUT", ["actions"]) => Action(json::<InstanceActionInfo>(method, body)?.action_type),
        ("PUT", ["boot-source"]) => PutBootSource(json(method, body)?),
        ("GET", ["machine-config"]) => GetMachineConfig,
        ("PUT", ["machine-config"]) => PutMachineConfig(json(method, body)?),
        ("PATCH", ["machine-config"]) => PatchMachineConfig(json(method, body)?),
        ("PUT", ["cpu-config"]) => PutCpuConfig(json(method, body)?),
        ("PUT", ["drives", id]) => {
            let d: Drive = json(method, body)?;
            same_id(id, &d.drive_id)?;
            PutDrive(d)
        }
        ("PATCH", ["drives", id]) => {
            let d: PartialDrive = json(method, body)?;
            same_id(id, &d.drive_id)?;
            PatchDrive(d)
        }
        ("PUT", ["network-interfaces", id]) => {
            let n: NetworkInterface = json(method, body)?;
            same_id(id, &n.iface_id)?;
            PutNetworkInterface(n)
        }
        ("PATCH", ["network-interfaces", id]) => {
            let n: PartialNetworkInterface = json(method, body)?;
            same_id(id, &n.iface_id)?;
            PatchNetworkInterface(n)
        }
        ("PUT", ["vsock"]) => PutVsock(json(method, body)?),
        ("PUT", ["entropy"]) => PutEntropy(json(method, body)?),
        ("GET", ["balloon"]) => GetBalloon,
        ("PUT", ["balloon"]) => PutBalloon(json(method, body)?),
        ("PATCH", ["balloon"]) => PatchBalloon(json(method, body)?),
        ("GET", ["balloon", "statistics"]) => GetBalloonStats,
        ("PATCH", ["balloon", "statistics"]) => PatchBalloonStats(json(method, body)?),
        ("PATCH", ["balloon", "hinting", "start" | "stop"])
        | ("GET", ["balloon", "hinting", "status"]) => {
            return Err(RequestError::Unsupported("Free page hinting"))
        }
        ("PUT", ["logger"]) => PutLogger(json(method, body)?),
        ("PUT", ["metrics"]) => PutMetrics(json(method, body)?),
        ("PUT", ["serial"]) => PutSerial(json(method, body)?),
        ("PATCH", ["vm"]) => PatchVm(json::<VmStateRequest>(method, body)?.state),
        ("GET", ["vm", "config"]) => GetVmConfig,
        ("PUT", ["snapshot", "create"]) => CreateSnapshot(json(method, body)?),
        ("PUT", ["snapshot", "load"]) => LoadSnapshot(json(method, body)?),
        ("PUT", ["fork", "template"]) => {
            // No parameters: an empty body or an empty object.
            if !body.iter().all(u8::is_ascii_whitespace) {
                json::<EmptyObject>(method, body)?;
            }
            CreateForkTemplate
        }
        ("PUT", ["fork", "load"]) => LoadFork(json(method, body)?),
        ("PUT" | "PATCH" | "GET", ["mmds"] | ["mmds", "config"]) => {
            return Err(RequestError::Unsupported("MMDS"))
        }
        ("PUT" | "PATCH" | "GET", ["hotplug", "memory"]) => {
            return Err(RequestError::Unsupported("Memory hotplug (virtio-mem)"))
        }
        ("PUT" | "PATCH", ["pmem", _]) => return Err(RequestError::Unsupported("virtio-pmem")),
        _ => return Err(invalid()),
    };
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse("GET", "/", b"").unwrap(), ApiRequest::GetInstanceInfo);
        assert_eq!(
            parse("GET", "/version", b"").unwrap(),
            ApiRequest::GetVersion
        );
        assert_eq!(
            parse("PUT", "/actions", br#"{"action_type":"InstanceStart"}"#).unwrap(),
            ApiRequest::Action(ActionType::InstanceStart)
        );
        let d = parse(
            "PUT",
            "/drives/rootfs",
            br#"{"drive_id":"rootfs","path_on_host":"/r.img","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap();
        assert!(matches!(d, ApiRequest::PutDrive(ref d) if d.drive_id == "rootfs"));
        assert_eq!(
            parse("PATCH", "/vm", br#"{"state":"Paused"}"#).unwrap(),
            ApiRequest::PatchVm(VmState::Paused)
        );
        assert_eq!(
            parse("GET", "/machine-config?x=1", b"").unwrap(),
            ApiRequest::GetMachineConfig
        );
    }

    #[test]
    fn errors_read_like_firecrackers() {
        let e = parse("GET", "/nope", b"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid request method and/or path: GET /nope."
        );
        let e = parse("DELETE", "/drives/x", b"").unwrap_err();
        assert!(matches!(e, RequestError::InvalidPathOrMethod { .. }));
        assert_eq!(
            parse("PUT", "/boot-source", b"").unwrap_err(),
            RequestError::EmptyBody("PUT".into())
        );
        let e = parse(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path":"/k","bogus":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        let e = parse(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":"two","mem_size_mib":1}"#,
        )
        .unwrap_err();
        assert!(matches!(e, RequestError::Json(_)), "{e}");
        let e = parse(
            "PUT",
            "/drives/a",
            br#"{"drive_id":"b","is_root_device":false,"path_on_host":"/x"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "The id from the path [a] does not match the id from the body [b]!"
        );
        let e = parse(
            "PUT",
            "/drives/a-b",
            br#"{"drive_id":"a-b","is_root_device":false}"#,
        )
        .unwrap_err();
        assert!(matches!(e, RequestError::InvalidId(_)));
        assert!(matches!(
            parse("PUT", "/mmds", b"{}").unwrap_err(),
            RequestError::Unsupported(_)
        ));
        let r: ApiResponse = e.into();
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().starts_with("{\"fault_message\":"));
    }

    #[test]
    fn fork_routes_take_their_parameters_and_nothing_else() {
        for body in [&b""[..], b"  ", b"{}"] {
            assert_eq!(
                parse("PUT", "/fork/template", body).unwrap(),
                ApiRequest::CreateForkTemplate
            );
        }
        assert!(matches!(
            parse("PUT", "/fork/template", br#"{"x":1}"#),
            Err(RequestError::Json(_))
        ));
        assert!(matches!(
            parse("GET", "/fork/template", b""),
            Err(RequestError::InvalidPathOrMethod { .. })
        ));
        let r = parse(
            "PUT",
            "/fork/load",
            br#"{"template_socket":"/t.sock","resume_vm":true,
                "network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],
                "vsock_override":{"uds_path":"/v1.sock"},
                "drive_overrides":[{"drive_id":"rootfs","path_on_host":"/r1.img"}]}"#,
        )
        .unwrap();
        let ApiRequest::LoadFork(p) = r else {
            panic!("{r:?}")
        };
        assert_eq!(p.template_socket, "/t.sock");
        assert_eq!(p.resume_vm, Some(true));
        assert_eq!(p.network_overrides[0].host_dev_name, "tap1");
        assert_eq!(p.drive_overrides[0].path_on_host, "/r1.img");
        assert_eq!(r#"/v1.sock"#, p.vsock_override.unwrap().uds_path);
        assert_eq!(
            parse("PUT", "/fork/load", b"").unwrap_err(),
            RequestError::EmptyBody("PUT".into())
        );
        let e = parse("PUT", "/fork/load", br#"{"snapshot_path":"/s"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn log_levels_are_case_insensitive() {
        let l: Logger = serde_json::from_str(r#"{"level":"warning"}"#).unwrap();
        assert_eq!(l.level, Some(LogLevel::Warning));
        let l: Logger = serde_json::from_str(r#"{"level":"DEBUG"}"#).unwrap();
        assert_eq!(l.level, Some(LogLevel::Debug));
        assert!(serde_json::from_str::<Logger>(r#"{"level":"loud"}"#).is_err());
    }
}
