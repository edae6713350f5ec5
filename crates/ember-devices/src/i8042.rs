//! The i8042 PS/2 controller, only as far as the CPU reset command goes (wraps
//! [`vm_superio::I8042Device`]).
//!
//! Insert it at [`I8042_BASE`] with length [`I8042_LEN`]: offset 0 is the data port (0x60) and
//! offset 4 the command port (0x64). Writing [`CMD_RESET_CPU`] (0xFE) to the command port fires
//! the reset trigger; the VMM polls its eventfd and ends the VM with "reset".

use vm_superio::{I8042Device, Trigger};

use crate::{BusDevice, EventFdTrigger};

/// Port I/O base of the i8042 (data port).
pub const I8042_BASE: u64 = 0x60;
/// Length of the i8042 bus range (ports 0x60..=0x64).
pub const I8042_LEN: u64 = 5;
/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64).
pub const COMMAND_OFFSET: u64 = 4;
/// The "pulse reset line" command.
pub const CMD_RESET_CPU: u8 = 0xFE;

/// The i8042 as a [`BusDevice`].
///
/// 1-byte accesses anywhere in the range go to the `vm_superio` device (reads return 0, only
/// 0xFE to the command port does anything). Wider accesses are refused (reads get `0xff`) and
/// counted in [`I8042::bad_accesses`].
///
/// It keeps no state worth a snapshot: vm-superio's `I8042Device` has none beyond its reset
/// trigger.
#[derive(Debug)]
pub struct I8042<T: Trigger = EventFdTrigger> {
    dev: I8042Device<T>,
    resets: u64,
    bad_accesses: u64,
    trigger_errors: u64,
}

impl<T: Trigger> I8042<T> {
    /// An i8042 firing `reset` when the guest requests a CPU reset.
    pub fn new(reset: T) -> Self {
        I8042 {
            dev: I8042Device::new(reset),
            resets: 0,
            bad_accesses: 0,
            trigger_errors: 0,
        }
    }

    /// The reset trigger (poll its eventfd).
    pub fn reset_evt(&self) -> &T {
        self.dev.reset_evt()
    }

    /// How many reset commands the guest issued.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Accesses that were not 1 byte wide or fell outside the range.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    /// Failures to signal the reset eventfd.
    pub fn trigger_errors(&self) -> u64 {
        self.trigger_errors
    }

    fn offset(&mut self, offset: u64, len: usize) -> Option<u8> {
        match u8::try_from(offset) {
            Ok(byte) if len == 1 && offset < I8042_LEN => Some(byte),
            _ => {
                self.bad_accesses += 1;
                None
            }
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.offset(offset, data.len()) {
            Some(off) => data[0] = self.dev.read(off),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(off) = self.offset(offset, data.len()) else {
            return;
        };
        if u64::from(off) == COMMAND_OFFSET && data[0] == CMD_RESET_CPU {
            self.resets += 1;
        }
        if self.dev.write(off, data[0]).is_err() {
            self.trigger_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_fires_on_0xfe_to_the_command_port_only() {
        let reset = EventFdTrigger::new().unwrap();
        let dev = Arc::new(Mutex::new(I8042::new(reset.try_clone().unwrap())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), I8042_BASE, I8042_LEN).unwrap();

        // Not a reset: other commands, 0xFE to the data port, wide writes.
        bus.write(0x64, &[0xAA]);
        bus.write(0x60, &[0xFE]);
        bus.write(0x61, &[0xFE]);
        bus.write(0x63, &[0xFE, 0xFE]);
        assert!(reset.read().is_err());
        assert_eq!(dev.lock().unwrap().resets(), 0);

        assert!(bus.write(0x64, &[0xFE]));
        assert_eq!(reset.read().unwrap(), 1);
        assert_eq!(dev.lock().unwrap().resets(), 1);

        let mut d = [0x55u8];
        assert!(bus.read(0x64, &mut d));
        assert_eq!(d, [0]);
        let mut d2 = [0u8; 2];
        assert!(bus.read(0x60, &mut d2));
        assert_eq!(d2, [0xff, 0xff]);
        assert_eq!(dev.lock().unwrap().bad_accesses(), 2);
        assert_eq!(dev.lock().unwrap().trigger_errors(), 0);
    }
}
