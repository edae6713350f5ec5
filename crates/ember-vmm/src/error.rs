//! The VMM's error type.

use std::path::PathBuf;

use ember_loader::BootProtocol;

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The memory size or layout is invalid, or guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] ember_memory::Error),
    /// The kernel command line is too long or invalid.
    #[error(transparent)]
    Cmdline(#[from] crate::cmdline::CmdlineError),
    /// The kernel, initramfs or command line could not be loaded.
    #[error(transparent)]
    Loader(#[from] ember_loader::Error),
    /// Boot structures could not be written.
    #[error(transparent)]
    Boot(#[from] ember_boot::Error),
    /// A disk could not be opened or set up.
    #[error("disk {index} of the configuration: {source}")]
    Disk {
        /// Its position in [`VmConfig::disks`](crate::VmConfig::disks), from 0.
        index: usize,
        /// Why.
        #[source]
        source: ember_devices::virtio::block::BlockError,
    },
    /// A network interface's TAP device could not be opened.
    #[error("network interface {id}: {source}")]
    Net {
        /// The interface's id.
        id: String,
        /// Why.
        #[source]
        source: ember_devices::virtio::net::TapError,
    },
    /// A virtio device could not be attached.
    #[error("virtio device {id}: {source}")]
    Device {
        /// The device's id.
        id: String,
        /// Why.
        #[source]
        source: ember_devices::virtio::Error,
    },
    /// Guest address space or interrupt lines ran out.
    #[error("cannot allocate {what}: {source}")]
    Allocate {
        /// What was being allocated.
        what: &'static str,
        /// The allocator's error.
        #[source]
        source: vm_allocator::Error,
    },
    /// A device could not be set up.
    #[error(transparent)]
    Devices(#[from] ember_devices::Error),
    /// A device could not be mapped on a bus.
    #[error(transparent)]
    Bus(#[from] ember_devices::BusError),
    /// vCPU set-up or run failed.
    #[error(transparent)]
    Vcpu(#[from] ember_vcpu::Error),
    /// The kernel does not offer the boot protocol that was asked for.
    #[error("kernel {} does not offer the {protocol:?} boot protocol", kernel.display())]
    ProtocolNotOffered {
        /// The protocol asked for.
        protocol: BootProtocol,
        /// The kernel.
        kernel: PathBuf,
    },
    /// The KVM device could not be opened.
    #[error("cannot open {}: {source} (is KVM enabled, and may this user read and write it?)", path.display())]
    KvmOpen {
        /// The device path.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability Ember needs.
    #[error("KVM lacks {0}, which Ember needs")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// An eventfd could not be created or cloned.
    #[error("eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The event loop's epoll failed.
    #[error("epoll: {0}")]
    Epoll(#[source] std::io::Error),
    /// The console output could not be set up.
    #[error("console output: {0}")]
    Console(#[source] std::io::Error),
    /// The VM is not running (it ended, or [`Vm::run`](crate::Vm::run) was not called).
    #[error("the VM is not running")]
    NotRunning,
    /// Parked vCPUs could not carry out a request (the VM is not paused, a vCPU failed).
    #[error("vCPU request: {0}")]
    VcpuRequest(String),
    /// A snapshot could not be written or read.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// A saved state does not fit this VM.
    #[error("the saved state does not fit this VM: {0}")]
    StateMismatch(String),
    /// The vsock device's socket could not be set up.
    #[error("vsock: {0}")]
    Vsock(#[source] ember_devices::virtio::vsock::VsockError),
    /// A prepared VM (`VmBuilder::prepared`, `VmPool`) cannot be made or does not fit.
    #[error("prepared VM: {0}")]
    Prepared(String),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The VMM's [`crate::ThreadHook`] failed on the event-loop thread.
    #[error("the event-loop thread's hook failed: {0}")]
    ThreadHook(String),
    /// The VM generation ID could not be made or written.
    #[error("VM generation ID: {0}")]
    VmGenId(String),
}
