//! Legacy x86 devices for Ember microVMs and the bus they sit on.
//!
//! This crate is deliberately small and VMM-agnostic (in the style of rust-vmm's `vm-superio`):
//! it knows nothing about KVM, vCPU threads or the event loop. Devices do no I/O of their own
//! beyond the [`std::io::Write`] sink they are given; everything they need to tell the VMM
//! (an interrupt, a reset request, a guest panic) goes through an [`EventFdTrigger`], which the
//! VMM registers as an irqfd or polls in its loop.
//!
//! * [`Bus`]: an address space (port I/O or MMIO) mapping `[base, base + len)` ranges to
//!   [`BusDevice`]s, shared by all vCPU threads (`&self` methods).
//! * [`serial::SerialDevice`]: the COM1 8250/16550A UART (wraps `vm_superio::Serial`).
//! * [`i8042::I8042`]: the i8042 controller, only for the CPU reset command (0xFE to port 0x64).
//! * [`boot_timer::BootTimer`]: port 0x510; the first guest write records the boot time.
//! * [`pvpanic::PvPanic`]: port 0x505; a guest panic notification.
//! * `fuzz` (feature `test-utils`): pure helpers a fuzz target (or a test) uses to drive a
//!   [`Bus`] with arbitrary access sequences.
//!
//! # Example
//!
//! Build a port I/O bus with COM1 writing to an in-memory buffer, and write "hi" through the
//! transmitter holding register (THR, offset 0):
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use ember_devices::serial::{SerialDevice, COM1_BASE, COM1_LEN};
//! use ember_devices::{Bus, EventFdTrigger, SharedBuffer};
//!
//! let out = SharedBuffer::new();
//! let irq = EventFdTrigger::new().unwrap();
//! let serial = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
//! let serial = Arc::new(Mutex::new(serial));
//!
//! let mut bus = Bus::new();
//! bus.insert(serial.clone(), COM1_BASE, COM1_LEN).unwrap();
//!
//! for b in b"hi" {
//!     assert!(bus.write(COM1_BASE, &[*b]));
//! }
//! assert_eq!(out.contents(), b"hi");
//! assert_eq!(serial.lock().unwrap().counters().tx_bytes, 2);
//!
//! // Nothing is mapped at the exit-loop port: reads return 0xff and are counted.
//! let mut data = [0u8; 1];
//! assert!(!bus.read(0x511, &mut data));
//! assert_eq!(data, [0xff]);
//! assert_eq!(bus.unhandled(), 1);
//! ```

#![deny(missing_docs)]

use std::io;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod acpi_pm;
pub mod boot_timer;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz;
pub mod i8042;
pub mod mailbox;
pub mod pvpanic;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

pub use ember_bus::{lock, Bus, BusDevice, Buses, Error as BusError, SharedDevice, MAX_ACCESS_LEN};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device could not be mapped on a bus.
    #[error(transparent)]
    Bus(#[from] ember_bus::Error),
    /// Creating or cloning an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// Signalling an eventfd (interrupt or notification) failed.
    #[error("failed to signal an eventfd: {0}")]
    Trigger(#[source] io::Error),
    /// A saved device state cannot be applied.
    #[error("invalid device state: {0}")]
    InvalidState(String),
}

/// A new eventfd as every Ember device and VMM uses them: non-blocking (signalling never
/// blocks, even with a saturated counter; reading an unsignalled one returns `WouldBlock`) and
/// close-on-exec (a process the VMM starts inherits none of them).
pub fn new_eventfd() -> io::Result<EventFd> {
    EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
}

/// A [`vm_superio::Trigger`] backed by an [`EventFd`]: `trigger()` writes 1 to it.
///
/// The VMM keeps a clone ([`EventFdTrigger::try_clone`]) of the same eventfd to register it as an
/// irqfd (interrupts) or to poll it (reset, panic). It also dereferences to the inner [`EventFd`].
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Creates a trigger over a new eventfd from [`new_eventfd`] (non-blocking, so signalling
    /// can never block a vCPU thread, and close-on-exec).
    pub fn new() -> Result<Self, Error> {
        new_eventfd().map(EventFdTrigger).map_err(Error::EventFd)
    }

    /// Another trigger on the same underlying eventfd (a `dup`).
    pub fn try_clone(&self) -> Result<Self, Error> {
        self.0
            .try_clone()
            .map(EventFdTrigger)
            .map_err(Error::EventFd)
    }

    /// The inner eventfd (to register as an irqfd, poll or read).
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Consumes the trigger, returning the inner eventfd.
    pub fn into_inner(self) -> EventFd {
        self.0
    }
}

impl From<EventFd> for EventFdTrigger {
    fn from(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> Result<(), io::Error> {
        self.0.write(1)
    }
}

/// A cloneable in-memory [`std::io::Write`] sink (`Arc<Mutex<Vec<u8>>>`), handy as serial output
/// in tests, examples and fuzz targets.
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.0).clone()
    }

    /// Takes everything written so far, leaving the buffer empty.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *lock(&self.0))
    }

    /// Number of bytes currently held.
    pub fn len(&self) -> usize {
        lock(&self.0).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        lock(&self.0).is_empty()
    }
}

impl io::Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_superio::Trigger;

    #[test]
    fn trigger_writes_one_and_clones_share_the_fd() {
        let t = EventFdTrigger::new().unwrap();
        let c = t.try_clone().unwrap();
        t.trigger().unwrap();
        t.trigger().unwrap();
        assert_eq!(c.eventfd().read().unwrap(), 2);
        // Non-blocking: nothing pending now.
        assert!(c.read().is_err());
        let evt: EventFd = c.into_inner();
        EventFdTrigger::from(evt.try_clone().unwrap())
            .trigger()
            .unwrap();
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn shared_buffer_collects_and_takes() {
        let b = SharedBuffer::new();
        let mut w = b.clone();
        w.write_all(b"abc").unwrap();
        w.flush().unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b.take(), b"abc");
        assert!(b.is_empty());
    }
}
