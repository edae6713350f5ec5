//! What a run of a VM reports: how it ended ([`VmExit`]), its start-up phases
//! ([`StartupTimings`]) and its devices ([`DeviceReport`]), together in a [`VmOutcome`].

use std::time::{Duration, Instant};

use ember_devices::virtio::balloon::BalloonCounters;
use ember_devices::virtio::block::BlockCounters;
use ember_devices::virtio::net::NetCounters;
use ember_devices::virtio::rng::RngCounters;
use ember_devices::virtio::vsock::VsockCounters;
use ember_devices::virtio::TransportCounters;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset, or a KVM reset event). A clean exit.
    Reset,
    /// The guest powered the machine off (KVM shutdown event). A clean exit.
    Poweroff,
    /// The guest reported a panic (pvpanic port, or a KVM crash event).
    GuestPanic,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// KVM could not emulate a guest instruction (`KVM_EXIT_INTERNAL_ERROR`, suberror 1).
    EmulationFailure {
        /// Guest RIP of the instruction.
        rip: u64,
        /// Up to 15 instruction bytes at RIP, when they could be read.
        insn: Vec<u8>,
    },
    /// A vCPU stopped with another error (or its thread panicked).
    VcpuError(String),
    /// The VMM was asked to stop (through a [`VmHandle`](crate::VmHandle)).
    Stopped,
    /// The console's escape sequence (Ctrl-A x) was typed on the serial input.
    ConsoleEscape,
}

impl VmExit {
    /// Whether this is an ordinary end of the guest (reset or poweroff).
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::Poweroff)
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::Poweroff => write!(f, "guest powered off"),
            VmExit::GuestPanic => write!(f, "guest panic"),
            VmExit::TripleFault => write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN)"),
            VmExit::EmulationFailure { rip, insn } => {
                write!(
                    f,
                    "emulation failure: KVM could not emulate the instruction at rip {rip:#x}"
                )?;
                if insn.is_empty() {
                    write!(f, " (instruction bytes unreadable)")
                } else {
                    write!(f, ", bytes")?;
                    for b in insn {
                        write!(f, " {b:02x}")?;
                    }
                    Ok(())
                }
            }
            VmExit::VcpuError(e) => write!(f, "vCPU error: {e}"),
            VmExit::Stopped => write!(f, "stopped by the VMM"),
            VmExit::ConsoleEscape => write!(f, "stopped from the console (Ctrl-A x)"),
        }
    }
}

/// Time spent in each start-up phase, in order.
#[derive(Clone, Debug, Default)]
pub struct StartupTimings {
    /// `(phase name, duration)` pairs in the order they ran.
    pub phases: Vec<(&'static str, Duration)>,
}

impl StartupTimings {
    pub(crate) fn record(&mut self, name: &'static str, since: &mut Instant) {
        let now = Instant::now();
        self.phases.push((name, now - *since));
        *since = now;
    }

    /// Sum of all phases.
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, d)| *d).sum()
    }
}

/// A device's own counters, by device kind.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceCounters {
    /// virtio-blk request counters.
    Block(BlockCounters),
    /// virtio-net counters.
    Net(NetCounters),
    /// virtio-rng counters.
    Rng(RngCounters),
    /// virtio-balloon counters.
    Balloon(BalloonCounters),
    /// virtio-vsock counters.
    Vsock(VsockCounters),
}

/// vCPU exits by reason, summed over the vCPUs ([`VmHandle::exits`](crate::VmHandle::exits)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Interrupted runs (kicks, signals).
    pub interrupted: u64,
    /// `KVM_RUN` failures.
    pub failures: u64,
}

/// A virtio device of a VM: where it sits and what it did.
#[derive(Clone, Debug)]
pub struct DeviceReport {
    /// The device's id (a disk's or interface's `id`, or `disk<N>`, `net<N>`, `rng`).
    pub id: String,
    /// The virtio device type (1: net, 2: block, 4: rng, 5: balloon, 19: vsock).
    pub device_type: u32,
    /// What it is backed by (a disk's image path, an interface's TAP).
    pub backing: String,
    /// Base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub gsi: u32,
    /// Transport counters (bad register accesses, invalid state transitions ...).
    pub transport: TransportCounters,
    /// Whether the guest's driver activated the device (DRIVER_OK).
    pub activated: bool,
    /// The device's own counters.
    pub counters: DeviceCounters,
}

impl DeviceReport {
    /// The virtio-blk counters, if this is a disk.
    pub fn block(&self) -> Option<&BlockCounters> {
        match &self.counters {
            DeviceCounters::Block(c) => Some(c),
            _ => None,
        }
    }

    /// The virtio-net counters, if this is a network interface.
    pub fn net(&self) -> Option<&NetCounters> {
        match &self.counters {
            DeviceCounters::Net(c) => Some(c),
            _ => None,
        }
    }

    /// The virtio-balloon counters, if this is the balloon.
    pub fn balloon(&self) -> Option<&BalloonCounters> {
        match &self.counters {
            DeviceCounters::Balloon(c) => Some(c),
            _ => None,
        }
    }

    /// The virtio-vsock counters, if this is the vsock device.
    pub fn vsock(&self) -> Option<&VsockCounters> {
        match &self.counters {
            DeviceCounters::Vsock(c) => Some(c),
            _ => None,
        }
    }

    /// The virtio-rng counters, if this is the entropy device.
    pub fn rng(&self) -> Option<&RngCounters> {
        match &self.counters {
            DeviceCounters::Rng(c) => Some(c),
            _ => None,
        }
    }
}

/// What [`Vm::run`](crate::Vm::run) returns.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    /// Why the VM ended.
    pub exit: VmExit,
    /// Time from VMM process start to the guest's first boot-timer write, if it wrote.
    pub boot_time: Option<Duration>,
    /// Time from VMM process start to the first `KVM_RUN`.
    pub first_run: Option<Duration>,
    /// Port or MMIO accesses that hit no device.
    pub unhandled_io: u64,
    /// Every virtio device, with its counters at the end of the run, in attach order.
    pub devices: Vec<DeviceReport>,
    /// Console output bytes the guest wrote that could not be delivered (the output sink kept
    /// refusing them while the console buffer was full, or failed).
    pub console_dropped: u64,
    /// vCPU exits, summed over the vCPUs.
    pub exits: ExitCounts,
    /// The console UART's counters.
    pub serial: ember_devices::serial::SerialCounters,
}

impl VmOutcome {
    /// The virtio-blk disks, in attach order, with their counters.
    pub fn disks(&self) -> impl Iterator<Item = (&DeviceReport, &BlockCounters)> {
        self.devices
            .iter()
            .filter_map(|d| d.block().map(|b| (d, b)))
    }
}
