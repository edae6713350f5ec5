//! Pure helpers to drive a [`Bus`] with arbitrary access sequences, for fuzz targets and
//! property tests.
//!
//! A fuzz target (a `cargo fuzz` crate outside this workspace, built on nightly) only needs the
//! public API below:
//!
//! ```ignore
//! #![no_main]
//! libfuzzer_sys::fuzz_target!(|data: &[u8]| {
//!     let fx = ember_devices::fuzz::legacy_bus().unwrap();
//!     let stats = ember_devices::fuzz::drive_legacy(&fx, data);
//!     assert_eq!(stats.violations, 0, "{stats:?}");
//! });
//! ```
//!
//! The input is decoded by [`decode_ops`] into a sequence of [`BusOp`]s, each encoded as:
//!
//! * a control byte: bit 0 = write, bits 1..=4 = access length `0..=15` (lengths 0 and above
//!   [`MAX_ACCESS_LEN`](crate::MAX_ACCESS_LEN) exercise the refusal paths), bits 6..=7 =
//!   address form:
//!   * `0b00`: a 16-bit port (2 bytes little-endian follow);
//!   * `0b01`: a full 64-bit address (8 bytes little-endian follow);
//!   * `0b10`: a port near the legacy devices (1 byte follows; its low 5 bits are added to
//!     the base its top 2 bits select: `0x3f8` COM1, `0x500` boot timer and pvpanic, `0x600`
//!     ACPI PM registers, `0x60` i8042);
//!   * `0b11`: host input to the UART (`len` bytes follow; only [`drive_legacy`] acts on it,
//!     [`run_ops`] passes it to its callback);
//! * for writes and host input, `len` data bytes (fewer if the input ends).
//!
//! Decoding stops at the first incomplete address. [`run_ops`] checks the bus invariants after
//! every access and counts violations instead of panicking, so the fuzz target decides what a
//! failure is: a read that was not forwarded must return all `0xff`; an access is forwarded
//! exactly when [`Bus::resolve`] finds a device for it; the [`Bus::unhandled`] counter grows by
//! exactly the number of accesses that were not forwarded.
#![allow(
    clippy::cast_possible_truncation,
    reason = "seed inputs: register offsets are small, known values"
)]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::acpi_pm::{AcpiPmRegisters, ACPI_PM_BASE, ACPI_PM_LEN};
use crate::boot_timer::{BootTimer, BOOT_TIMER_LEN, BOOT_TIMER_PORT};
use crate::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::pvpanic::{PvPanic, PVPANIC_LEN, PVPANIC_PORT};
use crate::serial::{SerialDevice, COM1_BASE, COM1_LEN};
use crate::{lock, Bus, Error, EventFdTrigger, SharedBuffer};

/// One decoded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusOp {
    /// A guest read of `len` bytes at `addr`.
    Read {
        /// Bus address.
        addr: u64,
        /// Access length (may be 0 or above [`MAX_ACCESS_LEN`](crate::MAX_ACCESS_LEN)).
        len: usize,
    },
    /// A guest write of `data` at `addr`.
    Write {
        /// Bus address.
        addr: u64,
        /// Bytes written (may be empty or longer than [`MAX_ACCESS_LEN`](crate::MAX_ACCESS_LEN)).
        data: Vec<u8>,
    },
    /// Host input for the UART (see [`drive_legacy`]).
    HostInput(Vec<u8>),
}

/// Outcome of [`run_ops`] / [`drive_bus`] / [`drive_legacy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Accesses forwarded to a device.
    pub forwarded: u64,
    /// Accesses not forwarded.
    pub unhandled: u64,
    /// Host input operations performed.
    pub host_inputs: u64,
    /// Invariant violations (must be 0).
    pub violations: u64,
}

/// Decodes fuzzer bytes into operations (format in the module docs). Never panics.
pub fn decode_ops(input: &[u8]) -> Vec<BusOp> {
    let mut ops = Vec::new();
    let mut rest = input;
    while let Some((&ctl, tail)) = rest.split_first() {
        rest = tail;
        let is_write = ctl & 1 != 0;
        let len = usize::from((ctl >> 1) & 0xf);
        let addr = match ctl >> 6 {
            0b00 => match take(&mut rest, 2) {
                Some(b) => u64::from(u16::from_le_bytes([b[0], b[1]])),
                None => break,
            },
            0b01 => match take(&mut rest, 8) {
                Some(b) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    u64::from_le_bytes(a)
                }
                None => break,
            },
            0b10 => match take(&mut rest, 1) {
                Some(b) => {
                    let base = [COM1_BASE, 0x500, ACPI_PM_BASE, I8042_BASE][usize::from(b[0] >> 6)];
                    base + u64::from(b[0] & 0x1f)
                }
                None => break,
            },
            _ => {
                ops.push(BusOp::HostInput(take_upto(&mut rest, len).to_vec()));
                continue;
            }
        };
        let op = if is_write {
            BusOp::Write {
                addr,
                data: take_upto(&mut rest, len).to_vec(),
            }
        } else {
            BusOp::Read { addr, len }
        };
        ops.push(op);
    }
    ops
}

/// Splits off the first `n` bytes, or returns `None` (consuming nothing) if there are fewer.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

/// Splits off up to `n` bytes.
fn take_upto<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n.min(rest.len()));
    *rest = tail;
    head
}

/// Runs `ops` against `bus`, checking the invariants listed in the module docs after each access.
/// `host_input` receives [`BusOp::HostInput`] payloads (pass `|_| ()` to skip them).
pub fn run_ops(bus: &Bus, ops: &[BusOp], mut host_input: impl FnMut(&[u8])) -> RunStats {
    let mut stats = RunStats::default();
    for op in ops {
        let before = bus.unhandled();
        let (addr, len, forwarded, ff_ok) = match op {
            BusOp::Read { addr, len } => {
                let mut buf = [0u8; 16];
                let data = &mut buf[..(*len).min(16)];
                let fwd = bus.read(*addr, data);
                (
                    *addr,
                    data.len(),
                    fwd,
                    fwd || data.iter().all(|&b| b == 0xff),
                )
            }
            BusOp::Write { addr, data } => (*addr, data.len(), bus.write(*addr, data), true),
            BusOp::HostInput(data) => {
                host_input(data);
                stats.host_inputs += 1;
                continue;
            }
        };
        let expected = bus.resolve(addr, len).is_some();
        let delta = bus.unhandled().wrapping_sub(before);
        if !ff_ok || forwarded != expected || delta != u64::from(!forwarded) {
            stats.violations += 1;
        }
        if forwarded {
            stats.forwarded += 1;
        } else {
            stats.unhandled += 1;
        }
    }
    stats
}

/// Decodes `input` and runs it against `bus` (host input operations are skipped).
pub fn drive_bus(bus: &Bus, input: &[u8]) -> RunStats {
    run_ops(bus, &decode_ops(input), |_| ())
}

/// The standard x86 legacy device set on one port I/O bus, with every handle a test or fuzz
/// target needs to observe it.
#[derive(Debug)]
pub struct LegacyBus {
    /// The bus: COM1 at 0x3f8, i8042 at 0x60, boot timer at 0x510, pvpanic at 0x505, the ACPI
    /// PM registers at 0x600.
    pub bus: Bus,
    /// The UART (for host input and counters).
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Everything the guest transmitted on COM1.
    pub output: SharedBuffer,
    /// COM1's interrupt eventfd.
    pub serial_irq: EventFdTrigger,
    /// The i8042 reset eventfd.
    pub reset_evt: EventFdTrigger,
    /// The pvpanic eventfd.
    pub panic_evt: EventFdTrigger,
    /// The ACPI poweroff (S5) eventfd.
    pub poweroff_evt: EventFdTrigger,
    /// The boot timer's recorded time.
    pub boot_time: Arc<OnceLock<Duration>>,
}

/// Builds a [`LegacyBus`].
pub fn legacy_bus() -> Result<LegacyBus, Error> {
    let output = SharedBuffer::new();
    let serial_irq = EventFdTrigger::new()?;
    let reset_evt = EventFdTrigger::new()?;
    let panic_evt = EventFdTrigger::new()?;
    let poweroff_evt = EventFdTrigger::new()?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq.try_clone()?,
        Box::new(output.clone()),
    )?));
    let timer = BootTimer::new(Instant::now());
    let boot_time = timer.handle();
    let mut bus = Bus::new();
    bus.insert(serial.clone(), COM1_BASE, COM1_LEN)?;
    bus.insert(
        Arc::new(Mutex::new(I8042::new(reset_evt.try_clone()?))),
        I8042_BASE,
        I8042_LEN,
    )?;
    bus.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_PORT, BOOT_TIMER_LEN)?;
    bus.insert(
        Arc::new(Mutex::new(PvPanic::new(panic_evt.try_clone()?))),
        PVPANIC_PORT,
        PVPANIC_LEN,
    )?;
    bus.insert(
        Arc::new(Mutex::new(AcpiPmRegisters::new(
            poweroff_evt.try_clone()?,
            reset_evt.try_clone()?,
        ))),
        ACPI_PM_BASE,
        ACPI_PM_LEN,
    )?;
    Ok(LegacyBus {
        bus,
        serial,
        output,
        serial_irq,
        reset_evt,
        panic_evt,
        poweroff_evt,
        boot_time,
    })
}

/// Decodes `input` and runs it against a [`LegacyBus`], feeding [`BusOp::HostInput`] to the
/// UART with [`SerialDevice::enqueue_input`].
pub fn drive_legacy(fx: &LegacyBus, input: &[u8]) -> RunStats {
    run_ops(&fx.bus, &decode_ops(input), |bytes| {
        // Errors (a failed interrupt signal) are counted by the device.
        let _ = lock(&fx.serial).enqueue_input(bytes);
    })
}

/// xorshift64*: pseudo-random bytes for property tests, without extra dependencies.
pub fn xorshift(seed: u64) -> impl FnMut() -> u8 {
    let mut s = seed | 1;
    move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
    }
}

/// A 1-byte write in the short address form (`base`: 0 COM1, 1 boot timer/pvpanic, 2 ACPI PM,
/// 3 i8042; see the module docs).
fn short_write(base: u8, offset: u8, value: u8) -> [u8; 3] {
    [0b1000_0011, (base << 6) | (offset & 0x1f), value]
}

/// A 1-byte read in the short address form.
fn short_read(base: u8, offset: u8) -> [u8; 2] {
    [0b1000_0010, (base << 6) | (offset & 0x1f)]
}

/// Seed inputs for the `pio_bus` fuzz target (file name, bytes): what drivers do with each
/// device of [`legacy_bus`].
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::serial::regs::*;
    let mut seeds = Vec::new();
    // A Linux-like 8250 probe and console set-up, output "ok", input read back.
    let mut uart = Vec::new();
    for (off, v) in [
        (LCR, 0x80),
        (DATA, 1),
        (IER, 0),
        (LCR, 0x03),
        (MCR, 0x0b),
        (IER, 0x03),
    ] {
        uart.extend(short_write(0, off as u8, v));
    }
    for off in [IIR, LSR, MSR, SCR] {
        uart.extend(short_read(0, off as u8));
    }
    for b in b"ok\n" {
        uart.extend(short_read(0, LSR as u8));
        uart.extend(short_write(0, DATA as u8, *b));
    }
    uart.extend_from_slice(&[0b1100_0100, b'h', b'i']);
    uart.extend(short_read(0, IIR as u8));
    uart.extend(short_read(0, DATA as u8));
    uart.extend(short_read(0, DATA as u8));
    seeds.push(("uart".to_string(), uart));
    // Loopback: THR to RBR inside the UART.
    let mut lo = Vec::new();
    lo.extend(short_write(0, MCR as u8, 0x10));
    lo.extend(short_write(0, DATA as u8, 0x5a));
    lo.extend(short_read(0, LSR as u8));
    lo.extend(short_read(0, DATA as u8));
    seeds.push(("uart-loopback".to_string(), lo));
    // Boot timer, pvpanic (read the capability, then report), i8042 reset.
    let mut misc = Vec::new();
    misc.extend(short_write(1, 0x10, 1));
    misc.extend(short_read(1, 0x05));
    misc.extend(short_write(1, 0x05, 1));
    misc.extend(short_read(3, 0x04));
    misc.extend(short_write(3, 0x04, 0xfe));
    seeds.push(("timer-pvpanic-i8042".to_string(), misc));
    // ACPI: read the sleep status, write S5, then the reset register.
    let mut acpi = Vec::new();
    acpi.extend(short_read(2, 1));
    acpi.extend(short_write(2, 0, (5 << 2) | (1 << 5)));
    acpi.extend(short_write(2, 2, 0x06));
    seeds.push(("acpi-pm".to_string(), acpi));
    // Wide, unaligned and unmapped accesses (full address forms).
    let mut odd = vec![0b0000_1000, 0xf8, 0x03];
    odd.extend_from_slice(&[0b0100_0011, 0x11, 0x05, 0, 0, 0, 0, 0, 0, 0]);
    odd.extend_from_slice(&[0b0000_0011, 0xff, 0xff, 1]);
    seeds.push(("odd-accesses".to_string(), odd));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::regs;

    use super::xorshift as rng;

    #[test]
    fn seeds_reach_every_device() {
        let fx = legacy_bus().unwrap();
        for (name, input) in seeds() {
            let s = drive_legacy(&fx, &input);
            assert_eq!(s.violations, 0, "{name}: {s:?}");
            assert!(s.forwarded > 0, "{name}: {s:?}");
        }
        assert!(fx.output.contents().starts_with(b"ok\n"));
        assert_eq!(fx.panic_evt.read().unwrap(), 1);
        assert!(fx.reset_evt.read().unwrap() >= 1);
        assert_eq!(fx.poweroff_evt.read().unwrap(), 1);
        assert!(fx.boot_time.get().is_some());
    }

    #[test]
    fn decode_examples() {
        // Read 1 byte at port 0x3fd; write "hi"(len 2) at 0x3f8 via the short form; host input.
        let input = [
            0b0000_0010,
            0xfd,
            0x03,
            0b1000_0101,
            0x00,
            b'h',
            b'i',
            0b1100_0100,
            b'x',
            b'y',
            0b0100_0010,
            1,
        ];
        assert_eq!(
            decode_ops(&input),
            vec![
                BusOp::Read {
                    addr: 0x3fd,
                    len: 1
                },
                BusOp::Write {
                    addr: 0x3f8,
                    data: b"hi".to_vec()
                },
                BusOp::HostInput(b"xy".to_vec()),
            ]
        );
        assert!(decode_ops(&[]).is_empty());
    }

    #[test]
    fn legacy_bus_scenario() {
        let fx = legacy_bus().unwrap();
        let mut input = Vec::new();
        // "ok" through THR (short form, base 0x3f8, 1-byte writes).
        for b in b"ok" {
            input.extend_from_slice(&[0b1000_0011, 0, *b]);
        }
        // Host input "z", then read RBR.
        input.extend_from_slice(&[0b1100_0010, b'z', 0b1000_0010, regs::DATA as u8]);
        // Boot timer write (port 0x510 = 0x500 + 0x10), pvpanic write 1 (0x505), reset.
        input.extend_from_slice(&[0b1000_0011, 0x50, 1]);
        input.extend_from_slice(&[0b1000_0011, 0x45, 1]);
        input.extend_from_slice(&[0b0000_0011, 0x64, 0x00, 0xfe]);
        // ACPI S5 (SLP_TYP 5 | SLP_EN to 0x600).
        input.extend_from_slice(&[0b1000_0011, 0x80, (5 << 2) | (1 << 5)]);
        // Exit-loop port (unmapped).
        input.extend_from_slice(&[0b0000_0011, 0x11, 0x05, 0]);
        let stats = drive_legacy(&fx, &input);
        assert_eq!(stats.violations, 0);
        assert_eq!(stats.host_inputs, 1);
        assert_eq!(stats.unhandled, 1);
        assert_eq!(stats.forwarded, 7);
        assert_eq!(fx.output.contents(), b"ok");
        assert!(fx.boot_time.get().is_some());
        assert_eq!(fx.panic_evt.read().unwrap(), 1);
        assert_eq!(fx.reset_evt.read().unwrap(), 1);
        assert_eq!(fx.poweroff_evt.read().unwrap(), 1);
        assert_eq!(fx.serial.lock().unwrap().counters().rx_bytes, 1);
    }

    #[test]
    fn random_inputs_keep_the_invariants() {
        let fx = legacy_bus().unwrap();
        let mut total = RunStats::default();
        for seed in 0..200u64 {
            let mut next = rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let len = usize::from(next()) * 2;
            let input: Vec<u8> = (0..len).map(|_| next()).collect();
            let s = drive_legacy(&fx, &input);
            assert_eq!(s.violations, 0, "seed {seed}: {s:?}");
            total.forwarded += s.forwarded;
            total.unhandled += s.unhandled;
            // A bare bus too.
            assert_eq!(drive_bus(&Bus::new(), &input).violations, 0);
        }
        assert!(total.forwarded > 0 && total.unhandled > 0, "{total:?}");
    }
}
