//! The pvpanic device on QEMU's ISA port 0x505: the guest reads the supported events and writes
//! [`PVPANIC_PANICKED`] when it panics, which fires the panic trigger; the VMM polls its eventfd
//! and ends the VM with "guest panic".

use crate::{BusDevice, EventFdTrigger};
use vm_superio::Trigger;

/// What [`PvPanic`] keeps across a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PvPanicState {
    /// The value of the last panic write, if any.
    pub last_event: Option<u8>,
}

/// Port of the pvpanic device.
pub const PVPANIC_PORT: u64 = 0x505;
/// Length of the pvpanic bus range.
pub const PVPANIC_LEN: u64 = 1;
/// Event bit: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: the guest loaded a crash kernel (not supported, ignored).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic device as a [`BusDevice`]. Reads return [`PVPANIC_PANICKED`] (the only supported
/// event) in the first byte; a write whose first byte has bit 0 set fires the panic trigger and
/// records the value; other writes are ignored.
#[derive(Debug)]
pub struct PvPanic<T: Trigger = EventFdTrigger> {
    evt: T,
    last_event: Option<u8>,
    panics: u64,
    ignored_writes: u64,
    trigger_errors: u64,
}

impl<T: Trigger> PvPanic<T> {
    /// A pvpanic device firing `panic` when the guest reports a panic.
    pub fn new(panic: T) -> Self {
        PvPanic {
            evt: panic,
            last_event: None,
            panics: 0,
            ignored_writes: 0,
            trigger_errors: 0,
        }
    }

    /// The panic trigger (poll its eventfd).
    pub fn panic_evt(&self) -> &T {
        &self.evt
    }

    /// The device's state.
    pub fn state(&self) -> PvPanicState {
        PvPanicState {
            last_event: self.last_event,
        }
    }

    /// Applies a saved state.
    pub fn restore(&mut self, state: &PvPanicState) {
        self.last_event = state.last_event;
    }

    /// The value of the last panic write, if any.
    pub fn last_event(&self) -> Option<u8> {
        self.last_event
    }

    /// How many panic writes the guest made.
    pub fn panics(&self) -> u64 {
        self.panics
    }

    /// Writes without the panicked bit (ignored).
    pub fn ignored_writes(&self) -> u64 {
        self.ignored_writes
    }

    /// Failures to signal the panic eventfd.
    pub fn trigger_errors(&self) -> u64 {
        self.trigger_errors
    }
}

impl<T: Trigger + Send> BusDevice for PvPanic<T> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(&v) if v & PVPANIC_PANICKED != 0 => {
                self.last_event = Some(v);
                self.panics += 1;
                if self.evt.trigger().is_err() {
                    self.trigger_errors += 1;
                }
            }
            _ => self.ignored_writes += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reports_support_and_fires_on_panic_bit() {
        let evt = EventFdTrigger::new().unwrap();
        let dev = Arc::new(Mutex::new(PvPanic::new(evt.try_clone().unwrap())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), PVPANIC_PORT, PVPANIC_LEN).unwrap();

        let mut d = [0u8];
        assert!(bus.read(PVPANIC_PORT, &mut d));
        assert_eq!(d, [PVPANIC_PANICKED]);

        bus.write(PVPANIC_PORT, &[PVPANIC_CRASH_LOADED]);
        bus.write(PVPANIC_PORT, &[0]);
        assert!(evt.read().is_err());
        assert_eq!(dev.lock().unwrap().last_event(), None);

        bus.write(PVPANIC_PORT, &[PVPANIC_PANICKED | PVPANIC_CRASH_LOADED]);
        assert_eq!(evt.read().unwrap(), 1);
        let d = dev.lock().unwrap();
        assert_eq!(d.last_event(), Some(3));
        assert_eq!(
            (d.panics(), d.ignored_writes(), d.trigger_errors()),
            (1, 2, 0)
        );
    }

    #[test]
    fn empty_accesses_do_not_panic() {
        let mut p = PvPanic::new(EventFdTrigger::new().unwrap());
        p.read(0, &mut []);
        p.write(0, &[]);
        assert_eq!(p.ignored_writes(), 1);
    }
}
