//! ember-bus: the port I/O and MMIO buses of an Ember microVM, in the role rust-vmm's
//! `vm-device` plays for other VMMs.
//!
//! * [`Bus`]: an address space mapping non-overlapping `[base, base + len)` ranges to
//!   [`BusDevice`]s (two methods: `read` and `write` at an offset), shared by every vCPU thread.
//! * [`IoHandler`]: what a vCPU run loop hands its port I/O and MMIO exits to (four methods).
//! * [`Buses`]: a port bus and an MMIO bus together, as an [`IoHandler`]: what every VMM built
//!   from Ember's crates would otherwise write itself.
//!
//! The crate knows nothing of KVM, devices or event loops; `ember-devices` builds its devices
//! on [`BusDevice`], `ember-vcpu` runs vCPUs against an [`IoHandler`].
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use ember_bus::{BusDevice, Buses, IoHandler};
//!
//! /// A one-byte scratch register.
//! struct Scratch(u8);
//! impl BusDevice for Scratch {
//!     fn read(&mut self, _offset: u64, data: &mut [u8]) { data[0] = self.0 }
//!     fn write(&mut self, _offset: u64, data: &[u8]) { self.0 = data[0] }
//! }
//!
//! let mut buses = Buses::default();
//! buses.pio.insert(Arc::new(Mutex::new(Scratch(0))), 0x3ff, 1).unwrap();
//! buses.pio_write(0x3ff, &[0x5a]);
//! let mut b = [0u8];
//! buses.pio_read(0x3ff, &mut b);
//! assert_eq!(b, [0x5a]);
//! // Nothing on the MMIO bus: reads return 0xff and are counted.
//! let mut w = [0u8; 4];
//! buses.mmio_read(0xd000_0000, &mut w);
//! assert_eq!((w, buses.unhandled()), ([0xff; 4], 1));
//! ```

#![deny(missing_docs)]

use std::sync::{Mutex, MutexGuard, PoisonError};

mod bus;

pub use bus::{Bus, BusDevice, SharedDevice, MAX_ACCESS_LEN};

/// Why a device could not be mapped on a [`Bus`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The new range overlaps a device already on the bus.
    #[error(
        "bus range [{base:#x}, {base:#x}+{len:#x}) overlaps the device at \
         [{existing_base:#x}, {existing_base:#x}+{existing_len:#x})"
    )]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
        /// Base of the device already there.
        existing_base: u64,
        /// Length of the device already there.
        existing_len: u64,
    },
    /// A device range must not be empty.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Base of the refused range.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("bus range at {base:#x} with length {len:#x} wraps around the address space")]
    RangeOverflow {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

/// The VMM's side of port I/O and MMIO exits. Called on the vCPU thread from the hot path of
/// a vCPU run loop: implementations should be quick and must not block for long.
///
/// Every call is one access of 1, 2 or 4 bytes (MMIO: up to 8), as the device would see it on
/// hardware: a string instruction (`rep outsb`, `rep insw`, ...) that KVM reports as one exit
/// with several items reaches the handler as one call per item, in order.
pub trait IoHandler {
    /// The guest read `data.len()` bytes from I/O port `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// The guest wrote `data` to I/O port `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// The guest read `data.len()` bytes at guest physical address `addr` that is not RAM.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// The guest wrote `data` at guest physical address `addr` that is not RAM.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// A port I/O bus and an MMIO bus: the devices a vCPU reaches through its exits.
#[derive(Debug, Default)]
pub struct Buses {
    /// Port I/O (addresses are port numbers).
    pub pio: Bus,
    /// MMIO (guest physical addresses).
    pub mmio: Bus,
}

impl Buses {
    /// Accesses of both buses that hit no device.
    pub fn unhandled(&self) -> u64 {
        self.pio.unhandled() + self.mmio.unhandled()
    }
}

impl IoHandler for Buses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

/// Locks a mutex, recovering the guard if another thread panicked while holding it: a device
/// whose handler panicked is still in a consistent-enough state for emulation, and the VMM must
/// not go down because of it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn poisoned_lock_is_recovered() {
        let m = Arc::new(Mutex::new(5u32));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 5);
    }
}
