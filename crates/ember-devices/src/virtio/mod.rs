//! The virtio-mmio transport (virtio 1.x, "modern", register layout version 2) and virtio
//! devices behind it.
//!
//! * [`VirtioDevice`]: the small trait a device implements (features, config space, activation
//!   with its queues, queue processing, reset; host descriptors for the VMM to watch; and, with
//!   the `serde` feature, its state for snapshots). Queues are [`virtio_queue::Queue`]s over any vm-memory backend `M` (by default
//!   [`GuestRam`], Ember's guest memory type).
//! * [`MmioTransport`]: the register file of one device (virtio spec 1.x §4.2.2) as a
//!   [`BusDevice`](crate::BusDevice) for the MMIO bus, with the device status state machine,
//!   feature negotiation and queue setup. It validates the queues against guest memory before
//!   activating the device.
//! * [`VirtioInterrupt`]: how a device tells its driver it used buffers or changed its
//!   configuration; [`MmioInterrupt`] is the virtio-mmio one (the InterruptStatus register plus
//!   an irqfd trigger). A PCI transport would bring its own (MSI-X vectors).
//! * [`block::Block`]: virtio-blk, parsing requests without I/O ([`block::request`]) and doing
//!   the I/O through a [`block::DiskBackend`] (the first being a raw image file).
//! * `testing` (feature `test-utils`): a guest-side driver (register handshake, split virtqueue
//!   rings in guest memory) used by the unit tests, the benchmark, the fuzz targets and the
//!   example below.
//! * `fuzz` (feature `test-utils`): input decoders and invariant checks for the `virtio_blk` and
//!   `virtio_mmio` fuzz targets.
//!
//! # Threading model
//!
//! The crate knows nothing about KVM. The transport exposes one [`EventFd`] per queue
//! ([`MmioTransport::queue_notify_evts`]) which the VMM registers as a KVM ioeventfd at
//! `base + QUEUE_NOTIFY_OFFSET` (4 bytes, datamatch = queue index); the interrupt
//! [`crate::EventFdTrigger`] given to [`MmioTransport::new`] is registered as an
//! irqfd for the device's GSI. vCPU threads only touch registers (the guest's QueueNotify write
//! never does device work on the vCPU thread: without an ioeventfd it just signals the same
//! eventfd). The VMM's event loop polls the notify eventfds and calls
//! [`MmioTransport::process_notification`], which is where requests are executed.
//!
//! # Example
//!
//! A virtio-blk disk on a 1 MiB image, driven through its registers by the test driver exactly
//! like a guest would, reading sector 1:
//!
//! ```
//! use ember_devices::virtio::block::{Block, BlockConfig};
//! use ember_devices::virtio::testing::{self, Buf, GuestQueue};
//! use ember_devices::virtio::{GuestRam, MmioTransport, QUEUE_NOTIFY_OFFSET};
//! use ember_devices::EventFdTrigger;
//! use ember_memory::DirtyBitmap;
//! use vm_memory::{Bytes, GuestAddress};
//! use vmm_sys_util::tempfile::TempFile;
//!
//! let image = TempFile::new().unwrap();
//! let mut data = vec![0u8; 1 << 20];
//! data[512..1024].fill(0xab);
//! std::fs::write(image.as_path(), &data).unwrap();
//!
//! let mem: GuestRam =
//!     ember_memory::ram_from_ranges(&[(GuestAddress(0), 1 << 20)], DirtyBitmap::Off).unwrap();
//! let block = Block::new(BlockConfig {
//!     path: image.as_path().to_path_buf(),
//!     read_only: false,
//!     serial: Some("disk0".into()),
//! })
//! .unwrap();
//! let counters = block.counters_handle();
//! let irq = EventFdTrigger::new().unwrap();
//! let mut dev = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap()).unwrap();
//!
//! // The guest: handshake and queue 0 setup.
//! let mut q = GuestQueue::new(&mem, 16, GuestAddress(0x1000)).unwrap();
//! testing::driver_init(&mut dev, &[&q], None).unwrap();
//!
//! // A read request: header, one 512-byte data buffer, status byte.
//! testing::write_blk_header(&mem, GuestAddress(0x8000), testing::BLK_T_IN, 1).unwrap();
//! q.add_chain(&[
//!     Buf::readable(0x8000, 16),
//!     Buf::writable(0x9000, 512),
//!     Buf::writable(0xa000, 1),
//! ])
//! .unwrap();
//! testing::write_reg(&mut dev, QUEUE_NOTIFY_OFFSET, 0); // the guest kicks queue 0...
//! assert_eq!(dev.queue_notify_evts()[0].read().unwrap(), 1); // ...which only signals the eventfd.
//!
//! // The VMM's event loop.
//! dev.process_notification(0);
//! assert_eq!(q.pop_used(), Some((0, 513)));
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 0); // VIRTIO_BLK_S_OK
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0xab);
//! assert_eq!(counters.snapshot().reads, 1);
//! assert_eq!(irq.read().unwrap(), 1); // one interrupt
//! ```

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub use ember_memory::GuestRam;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::EventFdTrigger;

pub mod balloon;
pub mod block;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz_devices;
mod mmio;
mod state;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use mmio::{regs, MmioTransport, TransportCounters};

pub mod net;
pub mod rng;
pub mod vsock;
pub use state::{MmioTransportState, QueueConfigState, QueueState};

/// Size of one virtio-mmio register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register inside the window (where the VMM registers the per-queue
/// ioeventfds, 4 bytes wide, datamatch = queue index).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space inside the window.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// Value of the MagicValue register ("virt" in little endian).
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Value of the Version register: 2 = virtio 1.x ("modern") register layout.
pub const MMIO_VERSION: u32 = 2;
/// Value of the VendorID register ("EMBR" in little endian).
pub const VENDOR_ID: u32 = 0x5242_4d45;
/// Device type of virtio-blk.
pub const TYPE_BLOCK: u32 = 2;

/// Feature bit (as a mask): the device conforms to virtio 1.x. Every device must offer it and
/// the transport refuses FEATURES_OK without it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit (as a mask): indirect descriptor tables.
pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;

/// Feature bit (as a mask): `VIRTIO_F_RING_EVENT_IDX` (notification suppression by ring
/// index).
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Takes the next available chain of `queue`, or `Ok(None)` when the driver has made none
/// available. Before it reports the ring empty it re-enables the driver's notifications (with
/// `EVENT_IDX`: publishes `avail_event`), so the driver's next buffer is notified; a driver
/// racing with that is caught by the re-check (bounded: a hostile driver moving its index back
/// and forth cannot keep the device here).
pub(crate) fn next_chain<'m, M: GuestMemoryBackend>(
    queue: &mut virtio_queue::Queue,
    mem: &'m M,
) -> Result<Option<virtio_queue::DescriptorChain<&'m M>>, virtio_queue::Error> {
    use virtio_queue::{QueueOwnedT, QueueT};
    for _ in 0..4 {
        if let Some(chain) = queue.iter(mem)?.next() {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(mem)? {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Whether the driver wants an interrupt for what the device just put in `queue`'s used ring:
/// with `EVENT_IDX`, whether the used index passed its `used_event`; without it, unless the
/// driver set `VRING_AVAIL_F_NO_INTERRUPT` (it polls). Call once after a batch of `add_used`.
pub(crate) fn needs_interrupt<M: GuestMemoryBackend>(
    queue: &mut virtio_queue::Queue,
    mem: &M,
) -> Result<bool, virtio_queue::Error> {
    use virtio_queue::QueueT;
    // Also resets the count of entries added since the last call.
    let event = queue.needs_notification(mem)?;
    if queue.event_idx_enabled() {
        return Ok(event);
    }
    let flags: u16 = vm_memory::Bytes::read_obj(mem, vm_memory::GuestAddress(queue.avail_ring()))
        .map(u16::from_le)
        .unwrap_or(0);
    Ok(flags & 1 == 0)
}

/// Bits of the InterruptStatus register.
pub mod interrupt_status {
    /// The device used a buffer in at least one virtqueue.
    pub const USED_BUFFER: u32 = 1;
    /// The device configuration changed (or the device needs a reset).
    pub const CONFIG_CHANGE: u32 = 2;
}

/// Bits of the device status register (virtio spec 1.x §2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from; the driver must reset it.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Errors of the virtio transport and of devices behind [`VirtioDevice`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Creating an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// Signalling an eventfd (interrupt) failed.
    #[error("failed to signal an eventfd: {0}")]
    Trigger(#[source] io::Error),
    /// The device declared no queues.
    #[error("a virtio device needs at least one queue")]
    NoQueues,
    /// The device declared an invalid maximum queue size (must be a power of two in 1..=32768).
    #[error("queue {index}: invalid maximum size {size}")]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// The refused size.
        size: u16,
    },
    /// `activate` got a different number of queues than the device declared.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Declared number of queues.
        expected: usize,
        /// Number of queues passed.
        got: usize,
    },
    /// No such queue.
    #[error("no queue {0}")]
    InvalidQueue(usize),
    /// The device is not activated.
    #[error("the device is not activated")]
    NotActivated,
    /// A queue is in a state the device cannot continue from (e.g. the driver moved the
    /// available index by more than the queue size); the device needs a reset.
    #[error("queue {queue} is broken: {source}")]
    QueueBroken {
        /// Queue index.
        queue: usize,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device cannot save or restore its state.
    #[error("this virtio device (type {device_type}) cannot save or restore its state")]
    StateUnsupported {
        /// Its device type.
        device_type: u32,
    },
    /// A saved state does not fit this device or transport.
    #[error("invalid virtio device state: {0}")]
    InvalidState(String),
    /// A device-specific failure (its own error type).
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Whether the error leaves the device unusable until the driver resets it (the transport
    /// then sets `DEVICE_NEEDS_RESET`).
    pub fn needs_reset(&self) -> bool {
        matches!(self, Error::QueueBroken { .. })
    }
}

/// How a device tells its driver something happened: an interrupt of its transport.
///
/// virtio-mmio has one interrupt line per device with a status register telling why
/// ([`MmioInterrupt`]); a PCI transport would map queues to MSI-X vectors. Devices hold an
/// `Arc<dyn VirtioInterrupt>` from [`VirtioDevice::activate`] on.
pub trait VirtioInterrupt: Send + Sync + fmt::Debug {
    /// The device used buffers in queue `queue`.
    fn signal_used_queue(&self, queue: u16) -> Result<(), Error>;
    /// The device's configuration changed (or it needs a reset).
    fn signal_config(&self) -> Result<(), Error>;
}

/// A host descriptor a device needs the VMM to watch (a TAP, a socket multiplexer, a rate
/// limiter's timer): when it is ready, the VMM calls [`VirtioDevice::process_host`] with its
/// index in [`VirtioDevice::host_fds`], from its event loop. The device owns the descriptor;
/// the VMM only polls it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFd {
    /// The descriptor.
    pub fd: std::os::fd::RawFd,
    /// Readiness for reading.
    pub readable: bool,
    /// Readiness for writing.
    pub writable: bool,
    /// Watch edges, not levels: the device reads (or writes) until the descriptor would block,
    /// or stops on purpose (no guest buffers) and resumes on its own queue's notification.
    pub edge_triggered: bool,
}

impl HostFd {
    /// A descriptor watched for input, level-triggered (a timer, an eventfd).
    pub fn readable(fd: std::os::fd::RawFd) -> Self {
        HostFd {
            fd,
            readable: true,
            writable: false,
            edge_triggered: false,
        }
    }
}

/// A virtio device behind a transport.
///
/// The transport calls `activate` once the driver set DRIVER_OK (with every queue the driver
/// enabled already validated against guest memory), `process_queue` from the VMM's event loop
/// when the driver notified a queue, and `reset` when the driver writes 0 to the status register.
/// None of the methods may panic on guest-controlled input.
///
/// Eight methods, six of them required; the state methods (feature `serde`) default to
/// "unsupported", so a device that does not care about snapshots implements nothing more.
pub trait VirtioDevice<M: GuestMemoryBackend = GuestRam>: Send {
    /// The virtio device type (DeviceID register), e.g. [`TYPE_BLOCK`].
    fn device_type(&self) -> u32;
    /// The maximum size of each queue (their number is the number of queues). Each must be a
    /// power of two in `1..=32768`.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads `data.len()` bytes of the device configuration space at `offset`. Bytes beyond the
    /// configuration structure read as 0 (the default: a device without configuration space).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// A driver write of `data` to the configuration space at `offset` (default: ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts the device with the negotiated features and its queues (one per entry of
    /// [`queue_max_sizes`](VirtioDevice::queue_max_sizes), in order; queues the driver did not
    /// enable are not ready).
    fn activate(
        &mut self,
        mem: M,
        acked_features: u64,
        queues: Vec<virtio_queue::Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), Error>;
    /// Processes everything available on queue `index`. Called by the VMM's event loop (through
    /// [`MmioTransport::process_notification`]) when that queue's notify eventfd fired, never on
    /// a vCPU thread.
    fn process_queue(&mut self, index: usize) -> Result<(), Error>;
    /// Returns the device to its pre-activation state (drops the queues, memory and interrupt).
    fn reset(&mut self);
    /// The host descriptors the device needs watched (default: none). Fixed from construction
    /// on.
    fn host_fds(&self) -> Vec<HostFd> {
        Vec::new()
    }
    /// Host descriptor `index` of [`host_fds`](VirtioDevice::host_fds) is ready: read from it,
    /// move data to or from the queues (default: nothing). Called whether or not the device is
    /// activated (a device that is not must still clear a level-triggered descriptor).
    fn process_host(&mut self, index: usize) -> Result<(), Error> {
        let _ = index;
        Ok(())
    }
    /// The activated device's queues, with its positions in them, for a snapshot (default:
    /// none, and the device cannot be saved while activated). The device must have finished
    /// every request it took from a queue when this is called (Ember's devices complete requests
    /// within `process_queue`).
    fn queues(&self) -> &[virtio_queue::Queue] {
        &[]
    }
    /// Device-specific state beyond the queues and what the transport keeps (e.g. an open
    /// connection table), for a snapshot. Default: unsupported.
    #[cfg(feature = "serde")]
    fn save_state(&self) -> Result<serde_json::Value, Error> {
        Err(Error::StateUnsupported {
            device_type: self.device_type(),
        })
    }
    /// Restores what [`save_state`](VirtioDevice::save_state) returned, into a device that is
    /// fresh or was just activated with the saved queues. Default: unsupported.
    #[cfg(feature = "serde")]
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), Error> {
        let _ = state;
        Err(Error::StateUnsupported {
            device_type: self.device_type(),
        })
    }
}

/// The interrupt of one virtio-mmio device: the InterruptStatus register shared between the
/// transport (the driver reads and acknowledges it) and the device (sets bits), plus the irqfd
/// trigger.
#[derive(Debug)]
pub struct MmioInterrupt<T: vm_superio::Trigger<E = io::Error> = EventFdTrigger> {
    status: AtomicU32,
    irq: T,
}

impl<T: vm_superio::Trigger<E = io::Error>> MmioInterrupt<T> {
    /// An interrupt raising `irq` (the VMM registers its eventfd as an irqfd).
    pub fn new(irq: T) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    fn raise(&self, bit: u32) -> Result<(), Error> {
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.trigger().map_err(Error::Trigger)
    }

    /// The current InterruptStatus value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Sets the InterruptStatus value (restoring a saved transport).
    pub fn set_status(&self, value: u32) {
        self.status.store(value, Ordering::Release);
    }

    /// Clears the bits set in `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clears the whole status (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }

    /// The irqfd trigger.
    pub fn trigger(&self) -> &T {
        &self.irq
    }
}

impl MmioInterrupt<EventFdTrigger> {
    /// The irqfd eventfd.
    pub fn eventfd(&self) -> &EventFd {
        self.irq.eventfd()
    }
}

impl<T> VirtioInterrupt for MmioInterrupt<T>
where
    T: vm_superio::Trigger<E = io::Error> + Send + Sync + fmt::Debug,
{
    fn signal_used_queue(&self, _queue: u16) -> Result<(), Error> {
        self.raise(interrupt_status::USED_BUFFER)
    }

    fn signal_config(&self) -> Result<(), Error> {
        self.raise(interrupt_status::CONFIG_CHANGE)
    }
}
