//! The i8042 PS/2 controller: the CPU reset command, and as much of a keyboard as a guest
//! needs to receive Ctrl+Alt+Del from the host (Firecracker's `SendCtrlAltDel`).
//!
//! Insert it at [`I8042_BASE`] with length [`I8042_LEN`]: offset 0 is the data port (0x60) and
//! offset 4 the command/status port (0x64). Writing [`CMD_RESET_CPU`] (0xFE) to the command
//! port fires the reset trigger (through [`vm_superio::I8042Device`]); the VMM polls its eventfd
//! and ends the VM with "reset".
//!
//! The keyboard side answers the probing a Linux `i8042`/`atkbd` driver does (controller
//! self-test 0xAA → 0x55, interface test 0xAB → 0x00, the command byte with 0x20/0x60, keyboard
//! commands acknowledged with 0xFA, reset answered 0xFA 0xAA, identify 0xFA 0xAB 0x83) and keeps
//! the bytes for the guest in a 16-byte buffer, read one at a time from the data port while
//! status bit 0 is set. [`I8042::trigger_ctrl_alt_del`] queues the set-2 make codes of Ctrl,
//! Alt and Delete (0x14, 0x11, 0xE0 0x71, as Firecracker) and raises the keyboard interrupt
//! (IRQ 1) when the guest enabled it in the command byte.

use std::collections::VecDeque;

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
/// The keyboard's interrupt line.
pub const KEYBOARD_IRQ: u32 = 1;
/// The scan codes (set 2) [`I8042::trigger_ctrl_alt_del`] sends.
pub const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xE0, 0x71];

const BUFFER: usize = 16;
/// Status: output buffer full.
const SB_OUT_FULL: u8 = 0x01;
/// Status: system flag (the self-test passed).
const SB_SYSTEM: u8 = 0x04;
/// Status: the last write was a command.
const SB_COMMAND: u8 = 0x08;
/// Status: keyboard not inhibited.
const SB_KBD_ENABLED: u8 = 0x10;
/// Command byte: keyboard interrupt enabled.
const CB_KBD_INT: u8 = 0x01;
/// Command byte: system flag; translate set 2 to set 1.
const CB_DEFAULT: u8 = 0x01 | 0x04 | 0x40;

/// What the next data-port write means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    /// 0x60: the new command byte.
    CommandByte,
    /// 0xD1: the output port (ignored).
    OutputPort,
    /// A keyboard command taking an argument (LEDs 0xED, scan code set 0xF0, rate 0xF3).
    KeyboardArgument,
}

/// The i8042 as a [`BusDevice`] (see the [module docs](self)).
///
/// 1-byte accesses only: wider ones are refused (reads get `0xff`) and counted in
/// [`I8042::bad_accesses`].
#[derive(Debug)]
pub struct I8042<T: Trigger = EventFdTrigger> {
    dev: I8042Device<T>,
    kbd_irq: Option<EventFdTrigger>,
    buffer: VecDeque<u8>,
    command_byte: u8,
    status: u8,
    pending: Pending,
    resets: u64,
    bad_accesses: u64,
    trigger_errors: u64,
    missed_bytes: u64,
}

impl<T: Trigger> I8042<T> {
    /// An i8042 firing `reset` when the guest requests a CPU reset, without a keyboard
    /// interrupt.
    pub fn new(reset: T) -> Self {
        I8042 {
            dev: I8042Device::new(reset),
            kbd_irq: None,
            buffer: VecDeque::with_capacity(BUFFER),
            command_byte: CB_DEFAULT,
            status: SB_SYSTEM | SB_KBD_ENABLED,
            pending: Pending::None,
            resets: 0,
            bad_accesses: 0,
            trigger_errors: 0,
            missed_bytes: 0,
        }
    }

    /// Raises `irq` (the VMM registers it as an irqfd for [`KEYBOARD_IRQ`]) when the keyboard
    /// has bytes for a guest that enabled its interrupt.
    pub fn with_keyboard_interrupt(mut self, irq: EventFdTrigger) -> Self {
        self.kbd_irq = Some(irq);
        self
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

    /// Failures to signal the reset or keyboard eventfd.
    pub fn trigger_errors(&self) -> u64 {
        self.trigger_errors
    }

    /// Bytes dropped because the guest had not read the buffer.
    pub fn missed_bytes(&self) -> u64 {
        self.missed_bytes
    }

    /// Queues Ctrl+Alt+Del's scan codes for the guest and interrupts it.
    pub fn trigger_ctrl_alt_del(&mut self) {
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.interrupt();
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() == BUFFER {
            self.missed_bytes += 1;
            return;
        }
        self.buffer.push_back(byte);
    }

    fn interrupt(&mut self) {
        if self.command_byte & CB_KBD_INT == 0 || self.buffer.is_empty() {
            return;
        }
        if let Some(irq) = &self.kbd_irq {
            if irq.trigger().is_err() {
                self.trigger_errors += 1;
            }
        }
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

    fn command(&mut self, cmd: u8) {
        self.status |= SB_COMMAND;
        match cmd {
            0x20 => self.push(self.command_byte),
            0x60 => self.pending = Pending::CommandByte,
            0xA7 | 0xA8 | 0xAD => {}
            0xAE => self.status |= SB_KBD_ENABLED,
            // Aux port test: "no aux device" answers are fine for a keyboard-only guest.
            0xA9 => self.push(0xFF),
            0xAA => self.push(0x55),
            0xAB => self.push(0x00),
            0xD0 => self.push(0x01),
            0xD1 => self.pending = Pending::OutputPort,
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_COMMAND;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::CommandByte => {
                self.command_byte = byte;
                return;
            }
            Pending::OutputPort => return,
            Pending::KeyboardArgument => {
                self.push(0xFA);
                self.interrupt();
                return;
            }
            Pending::None => {}
        }
        // A keyboard command.
        match byte {
            0xFF => {
                self.push(0xFA);
                self.push(0xAA);
            }
            0xF2 => {
                self.push(0xFA);
                self.push(0xAB);
                self.push(0x83);
            }
            0xED | 0xF0 | 0xF3 => {
                self.push(0xFA);
                self.pending = Pending::KeyboardArgument;
            }
            0xEE => self.push(0xEE),
            _ => self.push(0xFA),
        }
        self.interrupt();
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(off) = self.offset(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        data[0] = if u64::from(off) == COMMAND_OFFSET {
            self.status | (u8::from(!self.buffer.is_empty()) * SB_OUT_FULL)
        } else if u64::from(off) == DATA_OFFSET {
            let b = self.buffer.pop_front().unwrap_or(0);
            // More bytes: the guest gets another interrupt for them.
            self.interrupt();
            b
        } else {
            self.dev.read(off)
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(off) = self.offset(offset, data.len()) else {
            return;
        };
        if u64::from(off) == COMMAND_OFFSET {
            if data[0] == CMD_RESET_CPU {
                self.resets += 1;
                if self.dev.write(off, data[0]).is_err() {
                    self.trigger_errors += 1;
                }
                return;
            }
            self.command(data[0]);
        } else if u64::from(off) == DATA_OFFSET {
            self.data(data[0]);
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
        // Self-test answer waiting (the 0xAA above): output buffer full, system flag.
        assert_eq!(d[0] & 0x05, 0x05);
        let mut d2 = [0u8; 2];
        assert!(bus.read(0x60, &mut d2));
        assert_eq!(d2, [0xff, 0xff]);
        assert_eq!(dev.lock().unwrap().bad_accesses(), 2);
        assert_eq!(dev.lock().unwrap().trigger_errors(), 0);
    }

    #[test]
    fn a_linux_style_probe_and_ctrl_alt_del() {
        let kbd = EventFdTrigger::new().unwrap();
        let mut dev = I8042::new(EventFdTrigger::new().unwrap())
            .with_keyboard_interrupt(kbd.try_clone().unwrap());
        let rd = |dev: &mut I8042, port: u64| {
            let mut b = [0u8];
            dev.read(port, &mut b);
            b[0]
        };
        // Controller self-test, interface test, command byte round trip.
        dev.write(COMMAND_OFFSET, &[0xAA]);
        assert_eq!(rd(&mut dev, COMMAND_OFFSET) & 1, 1);
        assert_eq!(rd(&mut dev, DATA_OFFSET), 0x55);
        assert_eq!(rd(&mut dev, COMMAND_OFFSET) & 1, 0, "buffer empty again");
        dev.write(COMMAND_OFFSET, &[0xAB]);
        assert_eq!(rd(&mut dev, DATA_OFFSET), 0x00);
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(DATA_OFFSET, &[0x45]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        assert_eq!(rd(&mut dev, DATA_OFFSET), 0x45);
        // Keyboard reset and identify.
        dev.write(DATA_OFFSET, &[0xFF]);
        assert_eq!(
            (rd(&mut dev, DATA_OFFSET), rd(&mut dev, DATA_OFFSET)),
            (0xFA, 0xAA)
        );
        dev.write(DATA_OFFSET, &[0xED]);
        dev.write(DATA_OFFSET, &[0x07]);
        assert_eq!(
            (rd(&mut dev, DATA_OFFSET), rd(&mut dev, DATA_OFFSET)),
            (0xFA, 0xFA)
        );
        while kbd.read().is_ok() {}
        // The host sends Ctrl+Alt+Del: four bytes and an interrupt (IRQs enabled: 0x45).
        dev.trigger_ctrl_alt_del();
        assert!(kbd.read().is_ok());
        let got: Vec<u8> = (0..4).map(|_| rd(&mut dev, DATA_OFFSET)).collect();
        assert_eq!(got, CTRL_ALT_DEL);
        // Interrupts off: the bytes wait, no interrupt.
        while kbd.read().is_ok() {}
        dev.write(COMMAND_OFFSET, &[0x60]);
        dev.write(DATA_OFFSET, &[0x44]);
        dev.trigger_ctrl_alt_del();
        assert!(kbd.read().is_err());
        // A guest that never reads loses bytes past 16, counted.
        for _ in 0..10 {
            dev.trigger_ctrl_alt_del();
        }
        assert!(dev.missed_bytes() > 0);
    }
}
