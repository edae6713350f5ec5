//! The JSON bodies of Firecracker 1.16's API (its OpenAPI definitions), as plain serde types.
//!
//! Field names, required fields, defaults and enum spellings are Firecracker's. Unknown
//! fields are refused (`deny_unknown_fields`), as Firecracker refuses them.

use serde::{Deserialize, Serialize};

/// `InstanceInfo`: `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name.
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: InstanceState,
    /// The VMM's version.
    pub vmm_version: String,
}

/// The state in [`InstanceInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured, not started.
    #[serde(rename = "Not started")]
    NotStarted,
    /// Running.
    Running,
    /// Paused (`PATCH /vm`).
    Paused,
}

/// `FirecrackerVersion`: `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// The version (Ember answers with the Firecracker version whose API it implements).
    pub firecracker_version: String,
}

/// `Error`: the body of every 4xx/5xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub fault_message: String,
}

/// `InstanceActionInfo`: `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// The actions of [`InstanceActionInfo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the configured microVM.
    InstanceStart,
    /// Send Ctrl+Alt+Del through the i8042 keyboard controller.
    SendCtrlAltDel,
}

/// `BootSource`: `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel image.
    pub kernel_image_path: String,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// The deprecated static CPU templates of [`MachineConfiguration`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StaticCpuTemplate {
    /// Intel C3.
    C3,
    /// Intel T2.
    T2,
    /// Intel T2S.
    T2S,
    /// Intel T2CL.
    T2CL,
    /// AMD T2A.
    T2A,
    /// Arm V1N1.
    V1N1,
    /// No template.
    None,
}

/// Huge pages backing guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Regular pages.
    None,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    TwoMiB,
}

/// `MachineConfiguration`: `GET|PUT /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// vCPUs, 1 to 32.
    pub vcpu_count: u8,
    /// Guest memory, MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: bool,
    /// A static CPU template (deprecated by Firecracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Dirty page tracking (for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl Default for MachineConfiguration {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: None,
        }
    }
}

/// `PATCH /machine-config`: any subset of [`MachineConfiguration`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationPatch {
    /// vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// Memory, MiB.
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    /// SMT.
    #[serde(default)]
    pub smt: Option<bool>,
    /// Static CPU template.
    #[serde(default)]
    pub cpu_template: Option<StaticCpuTemplate>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages.
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
}

/// `TokenBucket`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens the bucket holds.
    pub size: u64,
    /// Extra tokens spent first, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

/// `RateLimiter`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// Block device caching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are not forwarded to the host.
    Unsafe,
    /// Flushes reach the host (`fdatasync`).
    Writeback,
}

/// Block device I/O engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O.
    Sync,
    /// io_uring.
    Async,
}

/// `Drive`: `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Its id (must equal the path's).
    pub drive_id: String,
    /// The root device (gets `root=/dev/vda` or `root=PARTUUID=..` on the command line).
    pub is_root_device: bool,
    /// The root partition's UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Caching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// The image on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// I/O engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// A vhost-user-block socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PartialDrive`: `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Its id.
    pub drive_id: String,
    /// A new image.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// A new rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `NetworkInterface`: `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Its id (must equal the path's).
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU offered to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Receive limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PartialNetworkInterface`: `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// Its id.
    pub iface_id: String,
    /// New receive limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `Vsock`: `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's CID (3 or more).
    pub guest_cid: u32,
    /// The host-side Unix socket.
    pub uds_path: String,
    /// Deprecated id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `EntropyDevice`: `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `Balloon`: `GET|PUT /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target size, MiB.
    pub amount_mib: u32,
    /// Deflate under guest memory pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics (0: none).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `BalloonUpdate`: `PATCH /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target, MiB.
    pub amount_mib: u32,
}

/// `BalloonStatsUpdate`: `PATCH /balloon/statistics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New polling interval, seconds.
    pub stats_polling_interval_s: u16,
}

/// `BalloonStats`: `GET /balloon/statistics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Target, pages.
    pub target_pages: u32,
    /// Held, pages.
    pub actual_pages: u32,
    /// Target, MiB.
    pub target_mib: u32,
    /// Held, MiB.
    pub actual_mib: u32,
    /// Bytes swapped in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    /// Free memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Total memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Available memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    /// Disk caches, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    /// hugetlb allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    /// hugetlb allocation failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

/// Log levels (case-insensitive in requests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings.
    Warning,
    /// Information.
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(format!(
                    "unknown log level `{s}` (Error, Warning, Info, Debug, Trace or Off)"
                ))
            }
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `Logger`: `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Level (default Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// A file or named pipe for the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Show the level on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Show file and line on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only messages from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `Metrics`: `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// A file or named pipe for the metrics.
    pub metrics_path: String,
}

/// `CpuidRegisterModifier`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// `eax`, `ebx`, `ecx` or `edx`.
    pub register: String,
    /// `0b` and 32 characters, `0` = clear, `1` = set, `x` = leave.
    pub bitmap: String,
}

/// `CpuidLeafModifier`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf (hex, binary or decimal string).
    pub leaf: String,
    /// Subleaf.
    pub subleaf: String,
    /// KVM flags for the leaf.
    pub flags: i32,
    /// Register modifiers.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// `MsrModifier`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// MSR address (hex, binary or decimal string).
    pub addr: String,
    /// `0b` and 64 characters.
    pub bitmap: String,
}

/// `CpuConfig`: `PUT /cpu-config` (a custom CPU template).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// KVM capabilities to add (`"121"`) or remove (`"!121"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    /// CPUID modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
    /// aarch64 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<serde_json::Value>,
    /// aarch64 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<serde_json::Value>,
}

/// `SerialDevice`: `PUT /serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// A file or named pipe for the guest's serial output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Output bandwidth limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// `Vm`: `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateRequest {
    /// `Paused` or `Resumed`.
    pub state: VmState,
}

/// The states of [`VmStateRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// Snapshot kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
    /// Only what changed since the last snapshot.
    Diff,
}

/// `SnapshotCreateParams`: `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// Where the microVM state goes.
    pub snapshot_path: String,
    /// Full (default) or diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `MemoryBackend` of [`SnapshotLoadParams`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// `File` or `Uffd`.
    pub backend_type: String,
    /// The file, or the userfaultfd handler's socket.
    pub backend_path: String,
}

/// `NetworkOverride`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP.
    pub host_dev_name: String,
}

/// `VsockOverride`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new Unix socket.
    pub uds_path: String,
}

/// `SnapshotLoadParams`: `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The microVM state.
    pub snapshot_path: String,
    /// Guest memory (deprecated form).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Guest memory.
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Dirty page tracking after the load.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Resume at once.
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// TAP changes.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// vsock socket change.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot.
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}

/// A writable disk's own image for a fork ([`ForkLoadParams`]; an Ember extension).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive.
    pub drive_id: String,
    /// The fork's copy of its image.
    pub path_on_host: String,
}

/// `PUT /fork/load` (an Ember extension): this VMM's microVM becomes a fork of the template
/// another Ember VMM serves on `template_socket` (`PUT /fork/template` there), instead of
/// booting. The fork's guest memory is a copy-on-write view of the template's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkLoadParams {
    /// The template VMM's fork socket (its `--fork-socket`).
    pub template_socket: String,
    /// Resume at once (default: stay paused, as `PUT /snapshot/load`).
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// Dirty page tracking in the fork (for its diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Each network interface's TAP for this fork (every interface needs its own).
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// The vsock device's Unix socket for this fork (needed if the template has one).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Each writable drive's image for this fork (needed for every writable drive).
    #[serde(default)]
    pub drive_overrides: Vec<DriveOverride>,
}

/// `FullVmConfiguration`: `GET /vm/config`, and the `--config-file` format.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// Balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// Drives.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Kernel, command line, initrd.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// Custom CPU template.
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<CpuConfig>,
    /// Logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// vCPUs and memory.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfiguration>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// virtio-mem (not supported by Ember).
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<serde_json::Value>,
    /// MMDS (not supported by Ember).
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<serde_json::Value>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// virtio-pmem (not supported by Ember).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<serde_json::Value>,
    /// vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// Entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    /// Serial console (Firecracker's config file accepts it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialDevice>,
}
