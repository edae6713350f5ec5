//! COM1 output and `PROBE ...` line building.
//!
//! Every byte goes out with the 8250 protocol: wait for LSR.THRE, then write THR. From
//! ring 3 a line is buffered and handed to ring 0 through the gate (`SVC_SERIAL_WRITE`),
//! because on a PVM host each port access from ring 3 traps (#GP, emulated by KVM) and costs
//! several times more than the same access from (emulated) ring 0.

use crate::arch::{self, inb, outb};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// Receive/transmit buffer.
pub const RBR_THR: u16 = COM1;
/// Line control register.
pub const LCR: u16 = COM1 + 3;
/// Modem control register.
pub const MCR: u16 = COM1 + 4;
/// Line status register.
pub const LSR: u16 = COM1 + 5;
/// Scratch register.
pub const SCR: u16 = COM1 + 7;
/// LSR: data ready.
pub const LSR_DR: u8 = 0x01;
/// LSR: transmit holding register empty.
pub const LSR_THRE: u8 = 0x20;

/// Sets 8N1 with DLAB clear, so offset 0 is the data register.
pub fn init() {
    outb(LCR, 0x03);
}

/// Writes bytes to COM1: directly in ring 0, through the gate in ring 3.
pub fn write(bytes: &[u8]) {
    if arch::cpl() == 0 {
        for &b in bytes {
            let mut polls = 0u32;
            while inb(LSR) & LSR_THRE == 0 && polls < 100_000 {
                polls += 1;
            }
            outb(RBR_THR, b);
        }
    } else {
        arch::gate_serial_write(bytes);
    }
}

/// A `PROBE <check> ...` line, buffered and written when full or at `end`.
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    /// Starts a line: `PROBE <check> `.
    pub fn new(check: &str) -> Self {
        Self::new_bytes(check.as_bytes())
    }

    /// Starts a line from raw bytes for the check name.
    pub fn new_bytes(check: &[u8]) -> Self {
        let mut line = Line {
            buf: [0; 256],
            len: 0,
        };
        line.b(b"PROBE ").b(check).b(b" ");
        line
    }

    fn flush(&mut self) {
        write(&self.buf[..self.len]);
        self.len = 0;
    }

    fn putb(&mut self, b: u8) {
        if self.len == self.buf.len() {
            self.flush();
        }
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// Appends text.
    pub fn s(&mut self, s: &str) -> &mut Self {
        self.b(s.as_bytes())
    }

    /// Appends raw bytes.
    pub fn b(&mut self, s: &[u8]) -> &mut Self {
        for &c in s {
            self.putb(c);
        }
        self
    }

    /// Appends a decimal number.
    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.b(&digits[i..])
    }

    /// Appends `0x` and lower-case hex digits (no leading zeros).
    pub fn hex(&mut self, v: u64) -> &mut Self {
        self.b(b"0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xf) as u8;
            if d != 0 || started || shift == 0 {
                started = true;
                self.putb(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }

    /// Appends a byte as two lower-case hex digits, without `0x`.
    pub fn hex2(&mut self, v: u8) -> &mut Self {
        let digit = |d: u8| if d < 10 { b'0' + d } else { b'a' + d - 10 };
        self.putb(digit(v >> 4));
        self.putb(digit(v & 0xf));
        self
    }

    /// Appends `num / den` with two decimals (rounded), e.g. `1.05`.
    pub fn fix2(&mut self, num: u64, den: u64) -> &mut Self {
        if den == 0 {
            return self.s("inf");
        }
        let hundredths = ((u128::from(num) * 200 + u128::from(den)) / (2 * u128::from(den))) as u64;
        self.dec(hundredths / 100);
        let frac = hundredths % 100;
        self.b(&[b'.', b'0' + (frac / 10) as u8, b'0' + (frac % 10) as u8])
    }

    /// Ends the line and writes it out.
    pub fn end(&mut self) {
        self.putb(b'\n');
        self.flush();
    }
}
