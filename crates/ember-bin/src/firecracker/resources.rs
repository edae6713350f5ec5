//! What a Firecracker client configures before `InstanceStart`, checked as Firecracker checks
//! it, and turned into an Ember [`VmConfig`].

use std::path::{Path, PathBuf};

use ember_api::model::{
    Balloon, BootSource, CpuConfig, Drive, EntropyDevice, FullVmConfiguration, HugePages, IoEngine,
    MachineConfiguration, MachineConfigurationPatch, NetworkInterface, RateLimiter, SerialDevice,
    StaticCpuTemplate, TokenBucket, Vsock,
};
use ember_vcpu::template::CpuTemplate;
use ember_vmm::{
    BalloonConfig, DiskConfig, NetConfig, RateLimitConfig, RngConfig, VmConfig, VsockConfig,
};

/// Firecracker's kernel command line when `boot_args` is not given.
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// The pre-boot configuration.
#[derive(Clone, Debug, Default)]
pub struct VmResources {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfiguration,
    pub cpu_config: Option<CpuConfig>,
    pub cpu_template: Option<CpuTemplate>,
    /// In the order they were first configured.
    pub drives: Vec<Drive>,
    pub nets: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
    pub entropy: Option<EntropyDevice>,
    pub balloon: Option<Balloon>,
    pub serial: Option<SerialDevice>,
}

fn check_file(what: &str, path: &str) -> Result<(), String> {
    ember_loader::open_regular_file(Path::new(path))
        .map(drop)
        .map_err(|e| format!("The {what} file cannot be opened: {e} ({path})"))
}

pub(crate) fn bucket(b: &TokenBucket) -> ember_vmm::TokenBucket {
    ember_vmm::TokenBucket {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time: b.refill_time,
    }
}

pub(crate) fn limiter(r: &Option<RateLimiter>) -> Option<RateLimitConfig> {
    r.as_ref().map(|r| RateLimitConfig {
        bandwidth: r.bandwidth.as_ref().map(bucket),
        ops: r.ops.as_ref().map(bucket),
    })
}

impl VmResources {
    /// Takes over what a restored snapshot's configuration says (for `GET /vm/config`, the
    /// machine and balloon requests and the network `PATCH`es after a load).
    pub fn adopt(&mut self, c: &VmConfig) {
        self.machine.vcpu_count = c.vcpus;
        self.machine.mem_size_mib = c.memory_mib;
        self.machine.track_dirty_pages = c.track_dirty_pages;
        self.nets = c
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| NetworkInterface {
                iface_id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                host_dev_name: n.tap.clone(),
                guest_mac: n.mac.map(|m| m.to_string()),
                mtu: n.mtu,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect();
        self.vsock = c.vsock.as_ref().map(|v| Vsock {
            guest_cid: u32::try_from(v.cid).unwrap_or(u32::MAX),
            uds_path: v.uds_path.display().to_string(),
            vsock_id: None,
        });
        self.balloon = c.balloon.as_ref().map(|b| Balloon {
            amount_mib: u32::try_from(b.amount_mib).unwrap_or(u32::MAX),
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: u16::try_from(b.stats_polling_interval_s).unwrap_or(u16::MAX),
            free_page_hinting: false,
            free_page_reporting: b.free_page_reporting,
        });
    }

    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), String> {
        check_file("kernel", &b.kernel_image_path)?;
        if let Some(i) = &b.initrd_path {
            check_file("initrd", i)?;
        }
        self.boot_source = Some(b);
        Ok(())
    }

    pub fn set_machine(&mut self, m: MachineConfiguration) -> Result<(), String> {
        if m.vcpu_count == 0 || m.vcpu_count > ember_vmm::MAX_VCPUS {
            return Err(format!(
                "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled. (got {}; Ember allows 1 to {})",
                m.vcpu_count,
                ember_vmm::MAX_VCPUS
            ));
        }
        if m.smt {
            return Err("SMT is not supported by Ember (every vCPU is a core).".into());
        }
        if m.mem_size_mib < 16 {
            return Err(format!(
                "The memory size (MiB) is invalid: {} (at least 16).",
                m.mem_size_mib
            ));
        }
        match m.cpu_template {
            None | Some(StaticCpuTemplate::None) => {}
            Some(t) => {
                return Err(format!(
                    "The static CPU template {t:?} is not supported by Ember; use PUT /cpu-config with a custom template."
                ))
            }
        }
        if m.huge_pages == Some(HugePages::TwoMiB) {
            return Err("Huge pages (2M) are not supported by Ember yet.".into());
        }
        self.machine = m;
        Ok(())
    }

    pub fn patch_machine(&mut self, p: MachineConfigurationPatch) -> Result<(), String> {
        let mut m = self.machine.clone();
        if let Some(v) = p.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = p.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = p.smt {
            m.smt = v;
        }
        if p.cpu_template.is_some() {
            m.cpu_template = p.cpu_template;
        }
        if let Some(v) = p.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if p.huge_pages.is_some() {
            m.huge_pages = p.huge_pages;
        }
        self.set_machine(m)
    }

    pub fn set_cpu_config(&mut self, c: CpuConfig) -> Result<(), String> {
        self.cpu_template = Some(super::cpu_config::to_template(&c)?);
        self.cpu_config = Some(c);
        Ok(())
    }

    pub fn set_drive(&mut self, d: Drive) -> Result<(), String> {
        if d.socket.is_some() {
            return Err("vhost-user block devices are not supported by Ember.".into());
        }
        if d.io_engine == Some(IoEngine::Async) {
            return Err(
                "The Async (io_uring) I/O engine is not supported by Ember; use Sync.".into(),
            );
        }
        let path = d
            .path_on_host
            .as_deref()
            .ok_or("path_on_host is required for a virtio-block drive.")?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(d.is_read_only != Some(true))
            .custom_flags_nonblock()
            .open(path)
            .map_err(|e| format!("Unable to open the block device backing file: {e} ({path})"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("Unable to read the block device backing file: {e}"))?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(format!(
                "The block device backing file {path} is neither a regular file nor a block device."
            ));
        }
        if d.is_root_device {
            if let Some(other) = self
                .drives
                .iter()
                .find(|o| o.is_root_device && o.drive_id != d.drive_id)
            {
                return Err(format!(
                    "A root block device already exists! ({})",
                    other.drive_id
                ));
            }
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(o) => *o = d,
            None => {
                if self.drives.len() >= ember_vmm::MAX_DISKS {
                    return Err(format!("At most {} drives.", ember_vmm::MAX_DISKS));
                }
                self.drives.push(d);
            }
        }
        Ok(())
    }

    pub fn set_net(&mut self, n: NetworkInterface) -> Result<(), String> {
        if let Some(mac) = &n.guest_mac {
            mac.parse::<ember_vmm::MacAddr>()
                .map_err(|e| format!("Invalid guest MAC: {e}"))?;
        }
        if let Some(mtu) = n.mtu {
            if mtu < 68 {
                return Err(format!("The MTU {mtu} is below 68."));
            }
        }
        if let Some(o) = self
            .nets
            .iter()
            .find(|o| o.host_dev_name == n.host_dev_name && o.iface_id != n.iface_id)
        {
            return Err(format!(
                "The host device {} is already used by interface {}.",
                n.host_dev_name, o.iface_id
            ));
        }
        match self.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
            Some(o) => *o = n,
            None => self.nets.push(n),
        }
        Ok(())
    }

    pub fn set_vsock(&mut self, v: Vsock) -> Result<(), String> {
        if v.guest_cid < 3 {
            return Err(format!("Invalid guest CID {} (3 or above).", v.guest_cid));
        }
        self.vsock = Some(v);
        Ok(())
    }

    pub fn set_balloon(&mut self, b: Balloon) -> Result<(), String> {
        if b.free_page_hinting {
            return Err(
                "Free page hinting is not supported by Ember (free page reporting is).".into(),
            );
        }
        if u64::from(b.amount_mib) > self.machine.mem_size_mib {
            return Err(format!(
                "Amount of pages requested is too large: {} MiB for a {} MiB guest.",
                b.amount_mib, self.machine.mem_size_mib
            ));
        }
        self.balloon = Some(b);
        Ok(())
    }

    pub fn set_serial(&mut self, s: SerialDevice) -> Result<(), String> {
        if s.rate_limiter.is_some() {
            return Err("A serial console rate limiter is not supported by Ember.".into());
        }
        self.serial = Some(s);
        Ok(())
    }

    /// Applies a Firecracker config file, in Firecracker's order.
    pub fn apply_file(&mut self, f: &FullVmConfiguration) -> Result<(), String> {
        if f.mmds_config.is_some() {
            return Err("mmds-config: MMDS is not supported by Ember.".into());
        }
        if f.memory_hotplug.is_some() {
            return Err("memory-hotplug: virtio-mem is not supported by Ember.".into());
        }
        if !f.pmem.is_empty() {
            return Err("pmem: virtio-pmem is not supported by Ember.".into());
        }
        if let Some(m) = &f.machine_config {
            self.set_machine(m.clone())?;
        }
        if let Some(c) = &f.cpu_config {
            self.set_cpu_config(c.clone())?;
        }
        if let Some(b) = &f.boot_source {
            self.set_boot_source(b.clone())?;
        }
        for d in &f.drives {
            self.set_drive(d.clone())?;
        }
        for n in &f.network_interfaces {
            self.set_net(n.clone())?;
        }
        if let Some(v) = &f.vsock {
            self.set_vsock(v.clone())?;
        }
        if let Some(e) = &f.entropy {
            self.entropy = Some(e.clone());
        }
        if let Some(b) = &f.balloon {
            self.set_balloon(b.clone())?;
        }
        if let Some(s) = &f.serial {
            self.set_serial(s.clone())?;
        }
        Ok(())
    }

    /// The drives in the order the guest sees them: the root device first (`/dev/vda`), as
    /// Firecracker orders them.
    fn ordered_drives(&self) -> Vec<&Drive> {
        let mut v: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        v.extend(self.drives.iter().filter(|d| !d.is_root_device));
        v
    }

    /// The Ember configuration of this microVM.
    pub fn vm_config(&self) -> Result<VmConfig, String> {
        let boot = self
            .boot_source
            .as_ref()
            .ok_or("Cannot start microvm that was not configured: the boot source is missing.")?;
        let mut cfg = VmConfig::new(PathBuf::from(&boot.kernel_image_path));
        cfg.initrd = boot.initrd_path.as_ref().map(PathBuf::from);
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        if let Some(root) = self.drives.iter().find(|d| d.is_root_device) {
            let rw = if root.is_read_only == Some(true) {
                "ro"
            } else {
                "rw"
            };
            match &root.partuuid {
                Some(p) => cmdline.push_str(&format!(" root=PARTUUID={p} {rw}")),
                None => cmdline.push_str(&format!(" root=/dev/vda {rw}")),
            }
        }
        cfg.cmdline = cmdline;
        cfg.memory_mib = self.machine.mem_size_mib;
        cfg.vcpus = self.machine.vcpu_count;
        cfg.track_dirty_pages = self.machine.track_dirty_pages;
        for d in self.ordered_drives() {
            cfg.disks.push(DiskConfig {
                path: PathBuf::from(d.path_on_host.clone().unwrap_or_default()),
                read_only: d.is_read_only == Some(true),
                // The guest's serial (GET_ID) is the drive id, as Firecracker gives it.
                id: Some(
                    d.drive_id
                        .chars()
                        .take(ember_vmm::MAX_DISK_ID_LEN)
                        .collect(),
                ),
                rate_limiter: limiter(&d.rate_limiter),
            });
        }
        for n in &self.nets {
            cfg.nets.push(NetConfig {
                tap: n.host_dev_name.clone(),
                mac: n
                    .guest_mac
                    .as_ref()
                    .map(|m| m.parse().map_err(|e: String| e))
                    .transpose()?,
                id: Some(n.iface_id.clone()),
                mtu: n.mtu,
                rx_rate_limiter: limiter(&n.rx_rate_limiter),
                tx_rate_limiter: limiter(&n.tx_rate_limiter),
                ..NetConfig::default()
            });
        }
        if let Some(v) = &self.vsock {
            cfg.vsock = Some(VsockConfig {
                cid: u64::from(v.guest_cid),
                uds_path: PathBuf::from(&v.uds_path),
            });
        }
        if let Some(e) = &self.entropy {
            cfg.rng = Some(RngConfig {
                rate_limiter: limiter(&e.rate_limiter),
            });
        }
        if let Some(b) = &self.balloon {
            cfg.balloon = Some(BalloonConfig {
                amount_mib: u64::from(b.amount_mib),
                stats_polling_interval_s: u64::from(b.stats_polling_interval_s),
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
            });
        }
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// `GET /vm/config`.
    pub fn full(
        &self,
        logger: Option<ember_api::model::Logger>,
        metrics: Option<ember_api::model::Metrics>,
    ) -> FullVmConfiguration {
        FullVmConfiguration {
            balloon: self.balloon.clone(),
            drives: self.drives.clone(),
            boot_source: self.boot_source.clone(),
            cpu_config: self.cpu_config.clone(),
            logger,
            machine_config: Some(self.machine.clone()),
            metrics,
            network_interfaces: self.nets.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            ..FullVmConfiguration::default()
        }
    }
}

/// `OpenOptions` opened without blocking (a FIFO or device never stalls the API).
trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
    }
}
