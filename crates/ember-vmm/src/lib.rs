//! Ember's VMM: composes `ember-memory`, `ember-loader`, `ember-boot`, `ember-devices` and
//! `ember-vcpu` into a running microVM.
//!
//! A [`VmConfig`] (plain data, serde) describes the VM; a [`VmBuilder`] turns it into a [`Vm`]:
//! guest memory, kernel and initramfs, boot parameters (PVH or the Linux 64-bit protocol), a KVM
//! VM with the in-kernel irqchip (and an i8254 PIT only if [`VmConfig::pit`] asks for one), the
//! legacy devices (COM1, i8042, boot timer, pvpanic, ACPI PM registers) on a port bus, the
//! virtio devices on the MMIO bus, and the vCPUs. [`Vm::run`] starts one thread per vCPU, runs
//! an event loop for the console and device events in the calling thread, and returns a
//! [`VmOutcome`] once the guest resets, powers off, panics, fails, or the VM is stopped through
//! a [`VmHandle`]. With the VM paused, the handle takes and applies the machine's state
//! ([`MachineState`]).
//!
//! ```no_run
//! use ember_vmm::{Vm, VmConfig};
//!
//! let mut config = VmConfig::new("target/probe/probe.elf");
//! config.cmdline = "probe=cmdline".into();
//! let vm = Vm::builder(config).build()?;
//! let outcome = vm.run()?;
//! assert!(outcome.exit.is_clean());
//! # Ok::<(), ember_vmm::Error>(())
//! ```
#![deny(missing_docs)]

mod cmdline;
mod config;
mod console;
mod control;
mod cpu;
mod device_config;
mod devices;
mod error;
mod event_loop;
mod exit;
mod fork;
mod handle;
mod kvm;
mod outcome;
mod pool;
mod snapshot;
mod state;
#[cfg(feature = "uffd")]
mod uffd;
mod vm;
mod vmgenid;

use std::sync::OnceLock;
use std::time::Instant;

pub use cmdline::{CmdlineError, KernelCmdline};
pub use config::{
    BalloonConfig, BootProtocolChoice, ConfigError, DiskConfig, MacAddr, NetConfig,
    RateLimitConfig, RngConfig, TokenBucket, VmConfig, VsockConfig, DEFAULT_CMDLINE,
    DEFAULT_MEMORY_MIB, MAX_CONFIG_FILE_SIZE, MAX_DISKS, MAX_DISK_ID_LEN, MAX_VCPUS,
    MAX_VIRTIO_DEVICES,
};
pub use console::ESCAPE as CONSOLE_ESCAPE;
pub use devices::{DeviceControl, FIRST_VIRTIO_GSI, LAST_GSI};
pub use error::Error;
pub use exit::{defer_teardown_to_exit, exit_process};
pub use fork::Template;
pub use handle::VmHandle;
pub use outcome::{DeviceCounters, DeviceReport, ExitCounts, StartupTimings, VmExit, VmOutcome};
pub use pool::{PreparedVm, VmPool};
pub use snapshot::{
    describe as describe_snapshot, frame_state as frame_snapshot, merge_diff as merge_memory_diff,
    parse_state as parse_snapshot, read_state as read_snapshot, DevicePlacement, SnapshotError,
    SnapshotState, SNAPSHOT_FORMAT_VERSION,
};
pub use state::{DevicesState, MachineState, VirtioDeviceState};
pub use vm::{wait_for_teardown, ThreadHook, ThreadKind, Vm, VmBuilder};
pub use vmgenid::GED_GSI;

/// Re-exports for callers that want the layout or loader types without naming those crates.
pub use ember_loader::BootProtocol;
pub use ember_memory::MemoryLayout;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// The instant the VMM process started, as far as Ember knows.
///
/// The first call fixes it; a VMM binary should call this first thing in `main` so the
/// boot timer measures from process start.
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}
