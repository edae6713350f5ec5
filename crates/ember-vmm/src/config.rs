//! [`VmConfig`]: the plain-data description of one microVM.

use std::path::{Path, PathBuf};

use ember_vcpu::template::CpuTemplate;
use serde::{Deserialize, Serialize};

pub use crate::device_config::{
    BalloonConfig, DiskConfig, MacAddr, NetConfig, RateLimitConfig, RngConfig, TokenBucket,
    VsockConfig,
};

/// Command line used when the configuration does not give one.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Guest memory used when the configuration does not give a size.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub use ember_memory::MAX_VCPUS;

/// Largest VM configuration file [`VmConfig::from_file`] reads (1 MiB).
pub const MAX_CONFIG_FILE_SIZE: u64 = 1 << 20;

/// Longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_DISK_ID_LEN: usize = 20;
/// Most virtio devices one VM can have, of all kinds together (one GSI each, 5..=23).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// Most virtio-mmio disks one VM can have (all its virtio devices).
pub const MAX_DISKS: usize = MAX_VIRTIO_DEVICES;

/// Boot protocol a user can ask for instead of the kernel's preferred one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocolChoice {
    /// Xen PVH entry: 32-bit protected mode, `hvm_start_info` in EBX.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, zero page in RSI.
    Linux64,
}

/// Everything needed to build one microVM.
///
/// Deserializes from JSON with unknown fields refused:
///
/// ```
/// let cfg = ember_vmm::VmConfig::from_json(r#"{"kernel": "/k", "memory_mib": 256}"#).unwrap();
/// assert_eq!(cfg.memory_mib, 256);
/// assert_eq!(cfg.vcpus, 1);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VmConfig {
    /// Kernel image: an ELF `vmlinux` (with or without a PVH note) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs, loaded high in low RAM.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// CPU template: a built-in name (`host`, `minimal`, `emulated-ring0`) or the path of a
    /// JSON template file. Default `host`.
    #[serde(default)]
    pub cpu_template: Option<String>,
    /// virtio-blk disks, in the order the guest finds them (by MMIO address).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces on host TAP devices, attached after the disks.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-rng entropy device.
    #[serde(default)]
    pub rng: Option<RngConfig>,
    /// A virtio-balloon device.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// Create the in-kernel i8254 PIT (off by default). The FADT declares hardware-reduced
    /// ACPI, under which Linux uses neither PIT nor PIC; a kernel booted through the MP table
    /// alone may want it. Tearing a VM down with a PIT waits ~15 ms longer on PVM hosts.
    #[serde(default)]
    pub pit: bool,
    /// Describe the machine with ACPI tables (default). Without them the guest finds its CPUs
    /// in the MP table and its virtio-mmio devices on the command line.
    #[serde(default = "default_true")]
    pub acpi: bool,
    /// Force a boot protocol; by default PVH is used when the kernel offers it.
    #[serde(default)]
    pub boot_protocol: Option<BootProtocolChoice>,
    /// Turn on KVM's dirty log of guest memory, and give guest memory the dirty bitmap of the
    /// VMM's writes, so that diff snapshots can be taken ([`crate::VmHandle::diff_snapshot`];
    /// Firecracker's `track_dirty_pages`). Off by default: each first guest write to a page
    /// after a snapshot then costs a write-protection fault, and each VMM write an update of
    /// the bitmap.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}
fn default_vcpus() -> u8 {
    1
}
fn default_true() -> bool {
    true
}

/// Errors in a configuration file or value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read VM config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The JSON is malformed or has unknown/mistyped fields.
    #[error("invalid VM config: {0}")]
    Json(#[from] serde_json::Error),
    /// A disk description is invalid.
    #[error("invalid disk: {0}")]
    Disk(String),
    /// A network interface description is invalid.
    #[error("invalid network interface: {0}")]
    Net(String),
    /// The vsock description is invalid.
    #[error("invalid vsock: {0}")]
    Vsock(String),
    /// The entropy device description is invalid.
    #[error("invalid entropy device: {0}")]
    Rng(String),
    /// The balloon description is invalid.
    #[error("invalid balloon: {0}")]
    Balloon(String),
    /// More virtio devices than interrupt lines.
    #[error("{count} virtio devices configured; at most {MAX_VIRTIO_DEVICES} fit (one interrupt line each)")]
    TooManyDevices {
        /// Devices configured.
        count: usize,
    },
    /// The CPU template is unknown or invalid.
    #[error("CPU template `{name}`: {reason}")]
    CpuTemplate {
        /// The name or path given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file path in the configuration is empty.
    #[error("the {what} path is empty")]
    EmptyPath {
        /// Which path (`kernel`, `initrd`, `disk`).
        what: &'static str,
    },
    /// The vCPU count is outside what Ember supports.
    #[error("{requested} vCPUs requested; Ember supports 1 to {max}")]
    VcpuCount {
        /// What was asked for.
        requested: u8,
        /// The limit.
        max: u8,
    },
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            memory_mib: default_memory_mib(),
            vcpus: default_vcpus(),
            cpu_template: None,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: None,
            balloon: None,
            pit: false,
            acpi: true,
            track_dirty_pages: false,
            boot_protocol: None,
        }
    }

    /// The CPU template this configuration selects (built-in name or JSON file).
    pub fn cpu_template(&self) -> Result<CpuTemplate, ConfigError> {
        let name = self.cpu_template.as_deref().unwrap_or("host");
        if let Some(t) = CpuTemplate::builtin(name) {
            return Ok(t);
        }
        let reason = if name.ends_with(".json") || name.contains('/') {
            match CpuTemplate::from_file(Path::new(name)) {
                Ok(t) => return Ok(t),
                Err(e) => e.to_string(),
            }
        } else {
            "no built-in template has that name (host, minimal, emulated-ring0) and it is not a .json file".to_string()
        };
        Err(ConfigError::CpuTemplate {
            name: name.to_string(),
            reason,
        })
    }

    /// Parses a JSON configuration and validates it.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let cfg: VmConfig = serde_json::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a JSON configuration file: a regular file of at most
    /// [`MAX_CONFIG_FILE_SIZE`] bytes (a FIFO or device is refused at once, never waited on).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let bytes = ember_loader::read_small_file(path, MAX_CONFIG_FILE_SIZE).map_err(read_err)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| read_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let mut cfg = Self::from_json(&text)?;
        if let Some(dir) = path.parent() {
            cfg.resolve_relative_to(dir);
        }
        Ok(cfg)
    }

    /// Takes relative file paths (kernel, initrd, disks, a CPU template file) as relative to
    /// `dir`, as [`from_file`](Self::from_file) does with the configuration file's folder.
    pub fn resolve_relative_to(&mut self, dir: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        };
        resolve(&mut self.kernel);
        if let Some(initrd) = &mut self.initrd {
            resolve(initrd);
        }
        for d in &mut self.disks {
            resolve(&mut d.path);
        }
        if let Some(t) = &mut self.cpu_template {
            if CpuTemplate::builtin(t).is_none() {
                let mut p = PathBuf::from(&*t);
                resolve(&mut p);
                *t = p.to_string_lossy().into_owned();
            }
        }
    }

    /// Checks the values that do not need any file or KVM to judge.
    ///
    /// Memory size, kernel and command line are checked when the VM is built, by the crates
    /// that own them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let empty = |p: &Path| p.as_os_str().is_empty();
        if empty(&self.kernel) {
            return Err(ConfigError::EmptyPath { what: "kernel" });
        }
        if self.initrd.as_deref().is_some_and(empty) {
            return Err(ConfigError::EmptyPath { what: "initrd" });
        }
        if self.disks.iter().any(|d| empty(&d.path)) {
            return Err(ConfigError::EmptyPath { what: "disk" });
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount {
                requested: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        self.cpu_template()?;
        let count = self.disks.len()
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng.is_some())
            + usize::from(self.balloon.is_some());
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices { count });
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, n) in self.nets.iter().enumerate() {
            if n.tap.is_empty() || n.tap.len() >= libc::IFNAMSIZ {
                return Err(ConfigError::Net(format!(
                    "TAP name `{}` must be 1 to {} bytes",
                    n.tap,
                    libc::IFNAMSIZ - 1
                )));
            }
            let id = n.id.clone().unwrap_or_else(|| format!("net{i}"));
            if !ids.insert(id.clone()) {
                return Err(ConfigError::Net(format!(
                    "two interfaces have the id `{id}`"
                )));
            }
            if let Some(mtu) = n.mtu {
                if !(68..=65_500).contains(&mtu) {
                    return Err(ConfigError::Net(format!(
                        "{id}: MTU {mtu} outside 68..=65500"
                    )));
                }
            }
            if self.nets[..i].iter().any(|o| o.tap == n.tap) {
                return Err(ConfigError::Net(format!("TAP `{}` is given twice", n.tap)));
            }
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid > u64::from(u32::MAX) {
                return Err(ConfigError::Vsock(format!(
                    "guest CID {} is reserved or too large: use 3 to {}",
                    v.cid,
                    u32::MAX
                )));
            }
            if v.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::EmptyPath {
                    what: "vsock socket",
                });
            }
        }
        if let Some(b) = &self.balloon {
            if b.amount_mib > self.memory_mib {
                return Err(ConfigError::Balloon(format!(
                    "a balloon of {} MiB in a guest of {} MiB",
                    b.amount_mib, self.memory_mib
                )));
            }
        }
        for d in &self.disks {
            if let Some(id) = &d.id {
                if id.len() > MAX_DISK_ID_LEN {
                    return Err(ConfigError::Disk(format!(
                        "{}: id `{id}` is {} bytes; at most {MAX_DISK_ID_LEN}",
                        d.path.display(),
                        id.len()
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let cfg = VmConfig::from_json(r#"{"kernel":"/boot/vmlinux"}"#).unwrap();
        assert_eq!(cfg, VmConfig::new("/boot/vmlinux"));
        let text = serde_json::to_string(&cfg).unwrap();
        assert_eq!(VmConfig::from_json(&text).unwrap(), cfg);
    }

    #[test]
    fn unknown_field_refused() {
        let err = VmConfig::from_json(r#"{"kernel":"/k","memroy_mib":5}"#).unwrap_err();
        assert!(err.to_string().contains("memroy_mib"), "{err}");
    }

    #[test]
    fn protocol_names() {
        let cfg = VmConfig::from_json(r#"{"kernel":"/k","boot_protocol":"linux64"}"#).unwrap();
        assert_eq!(cfg.boot_protocol, Some(BootProtocolChoice::Linux64));
        assert!(VmConfig::from_json(r#"{"kernel":"/k","boot_protocol":"efi"}"#).is_err());
    }

    #[test]
    fn vcpu_count_checked() {
        for n in [0u8, 33, 200] {
            let err =
                VmConfig::from_json(&format!(r#"{{"kernel":"/k","vcpus":{n}}}"#)).unwrap_err();
            assert!(matches!(err, ConfigError::VcpuCount { requested, .. } if requested == n));
        }
    }

    #[test]
    fn disk_strings() {
        let d: DiskConfig = "/a.img".parse().unwrap();
        assert_eq!((d.read_only, d.id), (false, None));
        let d: DiskConfig = "/a.img,id=x,ro".parse().unwrap();
        assert_eq!((d.read_only, d.id.as_deref()), (true, Some("x")));
        assert!("".parse::<DiskConfig>().is_err());
        assert!("/a.img,cache=none".parse::<DiskConfig>().is_err());
        let mut cfg = VmConfig::new("/k");
        cfg.disks.push(DiskConfig {
            path: "/a".into(),
            id: Some("x".repeat(21)),
            ..Default::default()
        });
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vm.json"));
    }
}
