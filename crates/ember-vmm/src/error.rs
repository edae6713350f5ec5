//! The VMM's error type.

use std::path::PathBuf;

use ember_loader::BootProtocol;

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The memory size or layout is invalid, or guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] ember_memory::Error),
    /// A guest memory access failed while setting up the VM.
    #[error("guest memory access failed: {0}")]
    GuestMemory(vm_memory::GuestMemoryError),
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
    #[error("disk {}: {source}", path.display())]
    Disk {
        /// The image file.
        path: PathBuf,
        /// Why.
        source: ember_devices::virtio::Error,
    },
    /// Guest address space or interrupt lines ran out.
    #[error("cannot allocate {what}: {reason}")]
    Allocate {
        /// What was being allocated.
        what: &'static str,
        /// The allocator's error.
        reason: String,
    },
    /// A device could not be set up.
    #[error(transparent)]
    Devices(#[from] ember_devices::Error),
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
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability Ember needs.
    #[error("KVM lacks {0}, which Ember needs")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// An eventfd could not be created or cloned.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// The event loop's epoll failed.
    #[error("epoll: {0}")]
    Epoll(std::io::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
}
