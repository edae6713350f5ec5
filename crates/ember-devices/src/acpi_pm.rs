//! ACPI power-management registers of a hardware-reduced ACPI platform: the FADT sleep control
//! and sleep status registers and the reset register, three 8-bit I/O ports at 0x600..=0x602
//! (the numbers `ember_boot::acpi` writes into the FADT).
//!
//! * Sleep control (offset 0, port 0x600): a write with `SLP_EN` (bit 5) set requests the sleep
//!   state `SLP_TYP` (bits 2..=4). `SLP_TYP` = [`S5_SLP_TYP`] (soft off, what `\_S5_` advertises)
//!   fires the poweroff trigger; the VMM polls its eventfd and ends the VM with status 0. Any
//!   sleep request also sets `WAK_STS`, so a guest asking for a state Ember does not implement
//!   "wakes up" at once instead of spinning forever.
//! * Sleep status (offset 1, port 0x601): reads [`WAK_STS`] (0x80) after a sleep request, else 0;
//!   writing a byte with bit 7 set clears it (write-1-to-clear, Linux does it before sleeping).
//! * Reset (offset 2, port 0x602): writing [`RESET_VALUE`] (0x06) fires the reset trigger.
//!
//! Every other write is ignored and counted ([`AcpiPmRegisters::ignored_writes`]); reads other
//! than the sleep status return 0. Accesses wider than a byte are handled byte by byte.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use ember_devices::acpi_pm::{AcpiPmRegisters, ACPI_PM_BASE, ACPI_PM_LEN};
//! use ember_devices::{Bus, EventFdTrigger};
//!
//! let poweroff = EventFdTrigger::new().unwrap();
//! let reset = EventFdTrigger::new().unwrap();
//! let pm = AcpiPmRegisters::new(poweroff.try_clone().unwrap(), reset.try_clone().unwrap());
//! let mut bus = Bus::new();
//! bus.insert(Arc::new(Mutex::new(pm)), ACPI_PM_BASE, ACPI_PM_LEN).unwrap();
//!
//! // What Linux's acpi_hw_extended_sleep(S5) does: clear WAK_STS, then SLP_TYP=5 | SLP_EN.
//! bus.write(0x601, &[0x80]);
//! bus.write(0x600, &[(5 << 2) | (1 << 5)]);
//! assert_eq!(poweroff.read().unwrap(), 1);
//! let mut sts = [0u8];
//! bus.read(0x601, &mut sts);
//! assert_eq!(sts, [0x80]);
//! ```

use vm_superio::Trigger;

use crate::{BusDevice, EventFdTrigger};

/// Port I/O base of the registers (the sleep control register).
pub const ACPI_PM_BASE: u64 = 0x600;
/// Length of the bus range (sleep control, sleep status, reset).
pub const ACPI_PM_LEN: u64 = 3;
/// Offset of the sleep control register (port 0x600).
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (port 0x601).
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (port 0x602).
pub const RESET_OFFSET: u64 = 2;

/// Sleep control: sleep enable bit.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control: position of the 3-bit sleep type field.
pub const SLP_TYP_SHIFT: u8 = 2;
/// Sleep control: mask of the sleep type field.
pub const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
/// Sleep type of S5 (soft off), as in the DSDT's `\_S5_` package.
pub const S5_SLP_TYP: u8 = 5;
/// Sleep status: wake status bit.
pub const WAK_STS: u8 = 1 << 7;
/// Value written to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 0x06;

/// What [`AcpiPmRegisters`] keeps across a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AcpiPmState {
    /// `WAK_STS` in the sleep status register.
    pub wake_status: bool,
}

/// The sleep control/status and reset registers as a [`BusDevice`] (insert at [`ACPI_PM_BASE`]
/// with length [`ACPI_PM_LEN`]); see the module docs.
#[derive(Debug)]
pub struct AcpiPmRegisters<T: Trigger = EventFdTrigger> {
    poweroff: T,
    reset: T,
    wake_status: bool,
    poweroffs: u64,
    resets: u64,
    sleep_requests: u64,
    ignored_writes: u64,
    trigger_errors: u64,
}

impl<T: Trigger> AcpiPmRegisters<T> {
    /// Registers firing `poweroff` on an S5 sleep request and `reset` on a reset write.
    pub fn new(poweroff: T, reset: T) -> Self {
        AcpiPmRegisters {
            poweroff,
            reset,
            wake_status: false,
            poweroffs: 0,
            resets: 0,
            sleep_requests: 0,
            ignored_writes: 0,
            trigger_errors: 0,
        }
    }

    /// The poweroff trigger (poll its eventfd).
    pub fn poweroff_evt(&self) -> &T {
        &self.poweroff
    }

    /// The reset trigger (poll its eventfd).
    pub fn reset_evt(&self) -> &T {
        &self.reset
    }

    /// The registers' state.
    pub fn state(&self) -> AcpiPmState {
        AcpiPmState {
            wake_status: self.wake_status,
        }
    }

    /// Applies a saved state.
    pub fn restore(&mut self, state: &AcpiPmState) {
        self.wake_status = state.wake_status;
    }

    /// How many S5 (poweroff) requests the guest made.
    pub fn poweroffs(&self) -> u64 {
        self.poweroffs
    }

    /// How many reset writes the guest made.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// How many sleep requests (`SLP_EN` writes, any sleep type, S5 included) the guest made.
    pub fn sleep_requests(&self) -> u64 {
        self.sleep_requests
    }

    /// Writes that did nothing: sleep control without `SLP_EN`, sleep status without `WAK_STS`,
    /// reset values other than [`RESET_VALUE`], bytes beyond the three registers.
    pub fn ignored_writes(&self) -> u64 {
        self.ignored_writes
    }

    /// Failures to signal the poweroff or reset eventfd.
    pub fn trigger_errors(&self) -> u64 {
        self.trigger_errors
    }

    /// Whether `WAK_STS` is set (a sleep request happened and was not acknowledged).
    pub fn wake_status(&self) -> bool {
        self.wake_status
    }

    fn fire(&mut self, poweroff: bool) {
        let evt = if poweroff {
            &self.poweroff
        } else {
            &self.reset
        };
        if evt.trigger().is_err() {
            self.trigger_errors += 1;
        }
    }

    fn read_byte(&self, reg: u64) -> u8 {
        match reg {
            SLEEP_STATUS_OFFSET if self.wake_status => WAK_STS,
            _ => 0,
        }
    }

    fn write_byte(&mut self, reg: u64, value: u8) {
        match reg {
            SLEEP_CONTROL_OFFSET if value & SLP_EN != 0 => {
                self.sleep_requests += 1;
                self.wake_status = true;
                if (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP {
                    self.poweroffs += 1;
                    self.fire(true);
                }
            }
            SLEEP_STATUS_OFFSET if value & WAK_STS != 0 => self.wake_status = false,
            RESET_OFFSET if value == RESET_VALUE => {
                self.resets += 1;
                self.fire(false);
            }
            _ => self.ignored_writes += 1,
        }
    }
}

impl<T: Trigger + Send> BusDevice for AcpiPmRegisters<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (reg, b) in (offset..).zip(data.iter_mut()) {
            *b = self.read_byte(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (reg, &b) in (offset..).zip(data) {
            self.write_byte(reg, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;
    use std::sync::{Arc, Mutex};

    struct Setup {
        bus: Bus,
        dev: Arc<Mutex<AcpiPmRegisters>>,
        poweroff: EventFdTrigger,
        reset: EventFdTrigger,
    }

    fn setup() -> Setup {
        let poweroff = EventFdTrigger::new().unwrap();
        let reset = EventFdTrigger::new().unwrap();
        let dev = Arc::new(Mutex::new(AcpiPmRegisters::new(
            poweroff.try_clone().unwrap(),
            reset.try_clone().unwrap(),
        )));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), ACPI_PM_BASE, ACPI_PM_LEN).unwrap();
        Setup {
            bus,
            dev,
            poweroff,
            reset,
        }
    }

    fn read(bus: &Bus, port: u64) -> u8 {
        let mut d = [0xaa];
        assert!(bus.read(port, &mut d));
        d[0]
    }

    #[test]
    fn s5_request_fires_poweroff_and_sets_wake_status() {
        let s = setup();
        assert_eq!(read(&s.bus, 0x601), 0);
        // Linux: clear WAK_STS, then SLP_TYP | SLP_EN, then poll WAK_STS.
        s.bus.write(0x601, &[WAK_STS]);
        assert!(s.poweroff.read().is_err());
        s.bus
            .write(0x600, &[(S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(s.poweroff.read().unwrap(), 1);
        assert!(s.reset.read().is_err());
        assert_eq!(read(&s.bus, 0x601), WAK_STS);
        assert_eq!(read(&s.bus, 0x600), 0);
        assert_eq!(read(&s.bus, 0x602), 0);
        // Write-1-to-clear.
        s.bus.write(0x601, &[0x7f]);
        assert_eq!(read(&s.bus, 0x601), WAK_STS);
        s.bus.write(0x601, &[0xff]);
        assert_eq!(read(&s.bus, 0x601), 0);
        let d = s.dev.lock().unwrap();
        assert_eq!(
            (
                d.poweroffs(),
                d.sleep_requests(),
                d.resets(),
                d.ignored_writes()
            ),
            (1, 1, 0, 1)
        );
        assert_eq!(d.trigger_errors(), 0);
    }

    #[test]
    fn other_sleep_states_wake_at_once_without_poweroff() {
        let s = setup();
        for typ in [0u8, 1, 3, 4, 6, 7] {
            s.bus.write(0x600, &[(typ << SLP_TYP_SHIFT) | SLP_EN]);
            assert!(s.poweroff.read().is_err(), "SLP_TYP {typ}");
            assert_eq!(read(&s.bus, 0x601), WAK_STS);
            s.bus.write(0x601, &[WAK_STS]);
        }
        // SLP_TYP 5 without SLP_EN does nothing.
        s.bus.write(0x600, &[S5_SLP_TYP << SLP_TYP_SHIFT]);
        assert!(s.poweroff.read().is_err());
        assert_eq!(read(&s.bus, 0x601), 0);
        let d = s.dev.lock().unwrap();
        assert_eq!(
            (d.poweroffs(), d.sleep_requests(), d.ignored_writes()),
            (0, 6, 1)
        );
        assert!(!d.wake_status());
    }

    #[test]
    fn reset_value_fires_reset() {
        let s = setup();
        for v in [0u8, 1, 0x0e, 0xfe, 0xff] {
            s.bus.write(0x602, &[v]);
        }
        assert!(s.reset.read().is_err());
        s.bus.write(0x602, &[RESET_VALUE]);
        assert_eq!(s.reset.read().unwrap(), 1);
        assert!(s.poweroff.read().is_err());
        let d = s.dev.lock().unwrap();
        assert_eq!((d.resets(), d.ignored_writes()), (1, 5));
        assert_eq!(d.reset_evt().read().ok(), None);
        assert_eq!(d.poweroff_evt().read().ok(), None);
    }

    #[test]
    fn wide_accesses_go_byte_by_byte() {
        let s = setup();
        // 16-bit write at 0x601: clears WAK_STS (0x80) and writes RESET_VALUE to 0x602.
        s.bus.write(0x601, &[WAK_STS, RESET_VALUE]);
        assert_eq!(s.reset.read().unwrap(), 1);
        // 16-bit write at 0x600: S5 request, then a status byte without WAK_STS.
        s.bus.write(0x600, &[(5 << 2) | SLP_EN, 0]);
        assert_eq!(s.poweroff.read().unwrap(), 1);
        let mut d = [0xaa; 3];
        assert!(s.bus.read(0x600, &mut d));
        assert_eq!(d, [0, WAK_STS, 0]);
        // Out-of-range offsets (not reachable through the bus) are ignored.
        let mut dev = s.dev.lock().unwrap();
        dev.write(3, &[RESET_VALUE]);
        let mut d = [0xaa; 2];
        dev.read(2, &mut d);
        assert_eq!(d, [0, 0]);
        dev.write(0, &[]);
        dev.read(0, &mut []);
        assert_eq!(dev.ignored_writes(), 2);
        assert!(s.reset.read().is_err());
    }
}
