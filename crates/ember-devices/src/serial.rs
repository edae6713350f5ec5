//! The COM1 8250/16550A UART, wrapping [`vm_superio::Serial`].
//!
//! Guest output goes to the `Write` sink given to [`SerialDevice::new`], or, in a VMM, to an
//! [`OutputBuffer`] ([`SerialDevice::with_output_buffer`]): a bounded buffer the vCPU thread
//! only appends to, drained by the VMM's event loop with non-blocking writes, so that a console
//! nobody reads never blocks a vCPU. While that buffer is full the UART reports its transmitter
//! busy (LSR.THRE and TEMT clear), so a driver that polls LSR (every 8250 console driver does)
//! waits instead of losing output; a byte written anyway is dropped and counted
//! ([`SerialCounters::tx_errors`]). When the buffer has room again the VMM calls
//! [`SerialDevice::output_drained`], which raises the THRE interrupt for interrupt-driven
//! drivers.
//!
//! Host input is pushed with [`SerialDevice::enqueue_input`] (at most
//! [`SerialDevice::input_space`] bytes fit in the 64-byte receive FIFO). When the guest has
//! drained input the host enqueued, the eventfd returned by [`SerialDevice::input_drained_evt`]
//! is signalled so the VMM's loop knows it may enqueue more.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::{lock, BusDevice, Error, EventFdTrigger};

/// Port I/O base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of COM1 registers (ports `0x3f8..=0x3ff`).
pub const COM1_LEN: u64 = 8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Register offsets (relative to the UART base) used by the tests and documentation.
pub mod regs {
    /// Receiver buffer (read) / transmitter holding (write); divisor latch low with DLAB.
    pub const DATA: u64 = 0;
    /// Interrupt enable register.
    pub const IER: u64 = 1;
    /// Interrupt identification register (read).
    pub const IIR: u64 = 2;
    /// Line control register.
    pub const LCR: u64 = 3;
    /// Modem control register.
    pub const MCR: u64 = 4;
    /// Line status register.
    pub const LSR: u64 = 5;
    /// Modem status register.
    pub const MSR: u64 = 6;
    /// Scratch register.
    pub const SCR: u64 = 7;
    /// IER bit: received-data-available interrupt.
    pub const IER_RDA: u8 = 0x01;
    /// IER bit: transmitter-holding-register-empty interrupt.
    pub const IER_THRE: u8 = 0x02;
    /// LSR bit: data ready.
    pub const LSR_DR: u8 = 0x01;
    /// LSR bit: transmitter holding register empty.
    pub const LSR_THRE: u8 = 0x20;
    /// LSR bit: transmitter empty (holding and shift registers).
    pub const LSR_TEMT: u8 = 0x40;
    /// MCR bit: loopback mode.
    pub const MCR_LOOP: u8 = 0x10;
}

/// A snapshot of the serial counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SerialCounters {
    /// Bytes the guest transmitted that reached the output sink.
    pub tx_bytes: u64,
    /// Bytes the guest transmitted that were lost because the sink failed (e.g. a closed pipe).
    pub tx_errors: u64,
    /// Bytes accepted into the receive FIFO by [`SerialDevice::enqueue_input`].
    pub rx_bytes: u64,
    /// Bytes offered to [`SerialDevice::enqueue_input`] that did not fit (FIFO full, or the UART
    /// is in loopback mode). The caller may keep them and retry after `input_drained_evt`.
    pub rx_dropped: u64,
    /// Guest accesses outside offsets `0..8` or not 1 byte wide (reads got `0xff`, writes were
    /// ignored).
    pub bad_accesses: u64,
    /// Failures to signal the interrupt or input-drained eventfd.
    pub signal_errors: u64,
}

#[derive(Debug)]
struct EventsInner {
    tx_bytes: AtomicU64,
    tx_errors: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    bad_accesses: AtomicU64,
    signal_errors: AtomicU64,
    /// Set when the host enqueued input; the next "FIFO empty" event signals `drained_evt` and
    /// clears it (so guest reads of an already-empty FIFO cost no syscall).
    drained_armed: AtomicBool,
    drained_evt: EventFd,
}

/// The [`SerialEvents`] implementation of [`SerialDevice`]: lock-free counters plus the
/// input-drained eventfd. Cloning gives another handle on the same counters, readable without
/// locking the device.
#[derive(Clone, Debug)]
pub struct SerialEventCounters(Arc<EventsInner>);

impl SerialEventCounters {
    /// New counters signalling `drained_evt` when the guest drains host input.
    pub fn new(drained_evt: EventFd) -> Self {
        SerialEventCounters(Arc::new(EventsInner {
            tx_bytes: AtomicU64::new(0),
            tx_errors: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            rx_dropped: AtomicU64::new(0),
            bad_accesses: AtomicU64::new(0),
            signal_errors: AtomicU64::new(0),
            drained_armed: AtomicBool::new(false),
            drained_evt,
        }))
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> SerialCounters {
        let i = &self.0;
        SerialCounters {
            tx_bytes: i.tx_bytes.load(Ordering::Relaxed),
            tx_errors: i.tx_errors.load(Ordering::Relaxed),
            rx_bytes: i.rx_bytes.load(Ordering::Relaxed),
            rx_dropped: i.rx_dropped.load(Ordering::Relaxed),
            bad_accesses: i.bad_accesses.load(Ordering::Relaxed),
            signal_errors: i.signal_errors.load(Ordering::Relaxed),
        }
    }

    /// The eventfd signalled when the guest has drained input the host enqueued.
    pub fn drained_evt(&self) -> &EventFd {
        &self.0.drained_evt
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl SerialEvents for SerialEventCounters {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        Self::add(&self.0.tx_bytes, 1);
    }

    fn tx_lost_byte(&self) {
        Self::add(&self.0.tx_errors, 1);
    }

    fn in_buffer_empty(&self) {
        if self.0.drained_armed.swap(false, Ordering::AcqRel)
            && self.0.drained_evt.write(1).is_err()
        {
            Self::add(&self.0.signal_errors, 1);
        }
    }
}

#[derive(Debug)]
struct OutputInner {
    bytes: Mutex<VecDeque<u8>>,
    capacity: usize,
    ready: EventFd,
}

/// A bounded byte buffer between the UART and the console: the guest's output is appended to it
/// on the vCPU thread (never blocking), the VMM drains it from its event loop. Cloning gives
/// another handle on the same buffer.
#[derive(Clone, Debug)]
pub struct OutputBuffer(Arc<OutputInner>);

/// Default capacity of an [`OutputBuffer`]: 64 KiB.
pub const OUTPUT_BUFFER_CAPACITY: usize = 64 << 10;

impl OutputBuffer {
    /// An empty buffer of `capacity` bytes (at least 1).
    pub fn new(capacity: usize) -> Result<Self, Error> {
        Ok(OutputBuffer(Arc::new(OutputInner {
            bytes: Mutex::new(VecDeque::with_capacity(
                capacity.min(OUTPUT_BUFFER_CAPACITY),
            )),
            capacity: capacity.max(1),
            ready: crate::new_eventfd().map_err(Error::EventFd)?,
        })))
    }

    /// Signalled (written once) each time the buffer goes from empty to not empty: poll it and
    /// drain.
    pub fn ready_evt(&self) -> &EventFd {
        &self.0.ready
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        lock(&self.0.bytes).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the buffer is full (the UART then reports its transmitter busy).
    pub fn is_full(&self) -> bool {
        lock(&self.0.bytes).len() >= self.0.capacity
    }

    /// Hands the held bytes, oldest first and as one contiguous slice, to `write`, and removes
    /// as many as it took. `write` is called at most once; it returns how many bytes it took
    /// (a non-blocking `write(2)`), or an error (`WouldBlock` when the sink is full), which is
    /// returned with nothing removed. Returns the bytes taken (0 when empty).
    pub fn drain(&self, write: impl FnOnce(&[u8]) -> io::Result<usize>) -> io::Result<usize> {
        let mut bytes = lock(&self.0.bytes);
        if bytes.is_empty() {
            return Ok(0);
        }
        let n = write(bytes.make_contiguous())?.min(bytes.len());
        bytes.drain(..n);
        Ok(n)
    }

    /// Throws the held bytes away (a console that can no longer be written); returns how many.
    pub fn discard(&self) -> usize {
        let mut bytes = lock(&self.0.bytes);
        let n = bytes.len();
        bytes.clear();
        n
    }
}

impl Write for OutputBuffer {
    /// Takes as much of `buf` as fits; `WouldBlock` when the buffer is full.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut bytes = lock(&self.0.bytes);
        let room = self.0.capacity.saturating_sub(bytes.len());
        if room == 0 && !buf.is_empty() {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let n = room.min(buf.len());
        let was_empty = bytes.is_empty();
        bytes.extend(&buf[..n]);
        drop(bytes);
        if was_empty && n > 0 {
            // Non-blocking: a saturated counter means a wake-up is pending anyway.
            let _ = self.0.ready.write(1);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`SerialDevice`] keeps across a snapshot: the UART's registers and the bytes in its
/// receive FIFO (vm-superio's `SerialState`, as plain data that serializes). Output waiting in
/// an [`OutputBuffer`] belongs to the host side and is not part of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// The receive FIFO, oldest byte first.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialDeviceState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for vm_superio::serial::SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The concrete `vm_superio` serial type wrapped by [`SerialDevice`].
pub type InnerSerial = Serial<EventFdTrigger, SerialEventCounters, Box<dyn Write + Send>>;

/// The COM1 UART as a [`BusDevice`] (insert it at [`COM1_BASE`], length [`COM1_LEN`]).
pub struct SerialDevice {
    serial: InnerSerial,
    events: SerialEventCounters,
    /// The output buffer when the output goes through one (back-pressure on LSR).
    output: Option<OutputBuffer>,
    /// The guest read LSR while the output buffer was full (so it saw THRE clear).
    tx_held: bool,
}

impl fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialDevice")
            .field("counters", &self.counters())
            .field("input_space", &self.input_space())
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq` for its interrupts and writing guest output to `out`. Creates the
    /// (non-blocking) input-drained eventfd, which is why this can fail.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Result<Self, Error> {
        let drained = crate::new_eventfd().map_err(Error::EventFd)?;
        Ok(Self::with_drained_evt(irq, out, drained))
    }

    /// Like [`SerialDevice::new`] with a caller-provided input-drained eventfd.
    pub fn with_drained_evt(
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
        drained_evt: EventFd,
    ) -> Self {
        let events = SerialEventCounters::new(drained_evt);
        SerialDevice {
            serial: Serial::with_events(irq, events.clone(), out),
            events,
            output: None,
            tx_held: false,
        }
    }

    /// A UART writing guest output into `output` (drained by the VMM, see the
    /// [module docs](self)), with back-pressure on LSR while it is full.
    pub fn with_output_buffer(irq: EventFdTrigger, output: OutputBuffer) -> Result<Self, Error> {
        let mut dev = Self::new(irq, Box::new(output.clone()))?;
        dev.output = Some(output);
        Ok(dev)
    }

    /// The VMM drained the output buffer: if the guest found the transmitter busy, tell it the
    /// transmitter is empty again (the THRE interrupt, when the guest enabled it).
    pub fn output_drained(&mut self) {
        if !self.tx_held || self.output.as_ref().is_some_and(OutputBuffer::is_full) {
            return;
        }
        self.tx_held = false;
        // vm-superio raises THRE (if enabled and not pending) on an IER write; writing the
        // current value changes nothing else.
        #[allow(clippy::cast_possible_truncation, reason = "regs::IER is 1")]
        const IER: u8 = regs::IER as u8;
        let ier = self.serial.read(IER);
        if self.serial.write(IER, ier).is_err() {
            SerialEventCounters::add(&self.events.0.signal_errors, 1);
        }
    }

    /// Pushes host input into the receive FIFO and raises the data-available interrupt (if the
    /// guest enabled it). Returns how many bytes were accepted: fewer than `bytes.len()` (possibly
    /// 0) when the FIFO is full or the UART is in loopback mode; the rest is counted in
    /// [`SerialCounters::rx_dropped`]. Fails only if signalling the interrupt failed (the bytes
    /// are queued regardless).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        if bytes.is_empty() {
            return Ok(0);
        }
        let c = &self.events.0;
        let space = self.serial.fifo_capacity();
        if space == 0 {
            SerialEventCounters::add(&c.rx_dropped, bytes.len() as u64);
            return Ok(0);
        }
        // Arm before queueing so a concurrent drain notification cannot be missed.
        c.drained_armed.store(true, Ordering::Release);
        let (accepted, res) = match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => (n, Ok(n)),
            Err(SerialError::Trigger(e)) => {
                // The bytes were queued before the interrupt failed.
                SerialEventCounters::add(&c.signal_errors, 1);
                (bytes.len().min(space), Err(Error::Trigger(e)))
            }
            // Not produced by `enqueue_raw_bytes` except for a full FIFO, checked above.
            Err(SerialError::FullFifo | SerialError::IOError(_)) => (0, Ok(0)),
        };
        SerialEventCounters::add(&c.rx_bytes, accepted as u64);
        SerialEventCounters::add(&c.rx_dropped, (bytes.len() - accepted) as u64);
        if accepted == 0 {
            c.drained_armed.store(false, Ordering::Release);
        }
        res
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn input_space(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// The (non-blocking) eventfd signalled when the guest has read the last byte of input the
    /// host enqueued; poll it to resume feeding input.
    pub fn input_drained_evt(&self) -> &EventFd {
        self.events.drained_evt()
    }

    /// The interrupt trigger (register its eventfd as the irqfd of [`COM1_IRQ`]).
    pub fn interrupt_evt(&self) -> &EventFdTrigger {
        self.serial.interrupt_evt()
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> SerialCounters {
        self.events.snapshot()
    }

    /// A handle on the counters that can be read without locking the device.
    pub fn counters_handle(&self) -> SerialEventCounters {
        self.events.clone()
    }

    /// The wrapped `vm_superio` serial.
    pub fn inner(&self) -> &InnerSerial {
        &self.serial
    }

    /// The UART's state (registers and receive FIFO).
    pub fn state(&self) -> SerialDeviceState {
        self.serial.state().into()
    }

    /// Puts the UART into a saved state, keeping its interrupt, counters and output (vm-superio's
    /// `from_state`). A pending interrupt the state records is raised again.
    pub fn restore(&mut self, state: &SerialDeviceState) -> Result<(), Error> {
        let irq = self.serial.interrupt_evt().try_clone()?;
        let placeholder = Serial::with_events(
            irq.try_clone()?,
            self.events.clone(),
            Box::new(io::sink()) as Box<dyn Write + Send>,
        );
        let old = std::mem::replace(&mut self.serial, placeholder);
        let out = old.into_writer();
        self.serial = Serial::from_state(&state.into(), irq, self.events.clone(), out).map_err(
            |e| match e {
                SerialError::Trigger(e) => Error::Trigger(e),
                SerialError::FullFifo => Error::InvalidState(format!(
                    "{} bytes in the receive FIFO, which holds 64",
                    state.in_buffer.len()
                )),
                SerialError::IOError(e) => Error::Trigger(e),
            },
        )?;
        self.tx_held = false;
        Ok(())
    }

    fn single_byte_offset(&self, offset: u64, len: usize) -> Option<u8> {
        match u8::try_from(offset) {
            Ok(byte) if len == 1 && offset < COM1_LEN => Some(byte),
            _ => {
                SerialEventCounters::add(&self.events.0.bad_accesses, 1);
                None
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.single_byte_offset(offset, data.len()) {
            Some(off) => {
                let mut v = self.serial.read(off);
                if u64::from(off) == regs::LSR
                    && self.output.as_ref().is_some_and(OutputBuffer::is_full)
                {
                    // The console is behind: the transmitter is busy until it catches up.
                    v &= !(regs::LSR_THRE | regs::LSR_TEMT);
                    self.tx_held = true;
                }
                data[0] = v;
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(off) = self.single_byte_offset(offset, data.len()) else {
            return;
        };
        match self.serial.write(off, data[0]) {
            Ok(()) => {}
            // Already counted by `tx_lost_byte`.
            Err(SerialError::IOError(_)) => {}
            Err(SerialError::Trigger(_)) => {
                SerialEventCounters::add(&self.events.0.signal_errors, 1);
            }
            Err(SerialError::FullFifo) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::regs::*;
    use super::*;
    use crate::SharedBuffer;
    use std::io;

    /// A sink that always fails, like a closed pipe.
    struct FailingSink;

    impl Write for FailingSink {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn device() -> (SerialDevice, EventFdTrigger, SharedBuffer) {
        let out = SharedBuffer::new();
        let irq = EventFdTrigger::new().unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
        (dev, irq, out)
    }

    fn rd(dev: &mut SerialDevice, off: u64) -> u8 {
        let mut d = [0u8];
        dev.read(off, &mut d);
        d[0]
    }

    #[test]
    fn output_reaches_the_sink() {
        let (mut dev, _irq, out) = device();
        for b in b"hello\n" {
            dev.write(DATA, &[*b]);
        }
        assert_eq!(out.contents(), b"hello\n");
        assert_eq!(dev.counters().tx_bytes, 6);
        assert_ne!(rd(&mut dev, LSR) & LSR_THRE, 0);
    }

    #[test]
    fn input_is_read_back_through_rbr_and_lsr() {
        let (mut dev, _irq, _out) = device();
        assert_eq!(rd(&mut dev, LSR) & LSR_DR, 0);
        assert_eq!(dev.input_space(), 64);
        assert_eq!(dev.enqueue_input(b"ok").unwrap(), 2);
        assert_eq!(dev.input_space(), 62);
        let mut got = Vec::new();
        while rd(&mut dev, LSR) & LSR_DR != 0 {
            got.push(rd(&mut dev, DATA));
        }
        assert_eq!(got, b"ok");
        assert_eq!(dev.counters().rx_bytes, 2);
        assert_eq!(dev.input_space(), 64);
    }

    #[test]
    fn fifo_full_counts_drops() {
        let (mut dev, _irq, _out) = device();
        let big = [b'x'; 100];
        assert_eq!(dev.enqueue_input(&big).unwrap(), 64);
        assert_eq!(dev.enqueue_input(b"yz").unwrap(), 0);
        assert_eq!(dev.enqueue_input(b"").unwrap(), 0);
        let c = dev.counters();
        assert_eq!((c.rx_bytes, c.rx_dropped), (64, 38));
    }

    #[test]
    fn interrupt_fires_only_when_enabled() {
        let (mut dev, irq, _out) = device();
        // IER = 0: input raises no interrupt.
        dev.enqueue_input(b"a").unwrap();
        assert!(irq.read().is_err());
        rd(&mut dev, DATA);
        // Enable RDA: new input raises one.
        dev.write(IER, &[IER_RDA]);
        assert!(irq.read().is_err());
        dev.enqueue_input(b"b").unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        // Still pending (IIR not read): re-enabling does not fire twice.
        dev.write(IER, &[IER_RDA]);
        assert!(irq.read().is_err());
        // After the IIR is read, re-enabling RDA with data pending re-asserts it.
        assert_eq!(rd(&mut dev, IIR) & 0x0f, 0x04);
        dev.write(IER, &[IER_RDA]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut dev, DATA), b'b');
        // THRE: enabling it raises it; after the IIR read, transmitting raises it again.
        dev.write(IER, &[IER_THRE]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut dev, IIR) & 0x0f, 0x02);
        dev.write(DATA, b"c");
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(rd(&mut dev, IER), IER_THRE);
    }

    #[test]
    fn drained_evt_fires_after_the_guest_empties_the_fifo() {
        let (mut dev, _irq, _out) = device();
        let drained = dev.input_drained_evt().try_clone().unwrap();
        // Reading an empty FIFO that the host never filled does not signal.
        rd(&mut dev, DATA);
        assert!(drained.read().is_err());
        dev.enqueue_input(b"xy").unwrap();
        assert_eq!(rd(&mut dev, DATA), b'x');
        assert!(drained.read().is_err());
        assert_eq!(rd(&mut dev, DATA), b'y');
        assert_eq!(drained.read().unwrap(), 1);
        // Once only per enqueue.
        rd(&mut dev, DATA);
        assert!(drained.read().is_err());
    }

    #[test]
    fn scratch_dlab_and_loopback() {
        let (mut dev, _irq, out) = device();
        dev.write(SCR, &[0x5a]);
        assert_eq!(rd(&mut dev, SCR), 0x5a);
        // DLAB: offset 0/1 are the divisor latch.
        dev.write(LCR, &[0x83]);
        dev.write(DATA, &[0x01]);
        assert_eq!(rd(&mut dev, DATA), 0x01);
        dev.write(LCR, &[0x03]);
        // Loopback: THR -> RBR, nothing to the sink, host input refused.
        dev.write(MCR, &[MCR_LOOP]);
        dev.write(DATA, b"L");
        assert_ne!(rd(&mut dev, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut dev, DATA), b'L');
        assert_eq!(dev.enqueue_input(b"q").unwrap(), 0);
        assert_eq!(dev.counters().rx_dropped, 1);
        assert!(out.is_empty());
    }

    #[test]
    fn bad_accesses_are_refused_and_counted() {
        let (mut dev, _irq, out) = device();
        let mut d = [0u8; 2];
        dev.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        dev.write(0, b"ab");
        let mut d1 = [0u8];
        dev.read(8, &mut d1);
        assert_eq!(d1, [0xff]);
        dev.write(u64::MAX, b"a");
        dev.read(0, &mut []);
        assert_eq!(dev.counters().bad_accesses, 5);
        assert!(out.is_empty());
    }

    #[test]
    fn sink_errors_are_counted_not_fatal() {
        let irq = EventFdTrigger::new().unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(FailingSink)).unwrap();
        for b in b"lost" {
            dev.write(DATA, &[*b]);
        }
        let c = dev.counters();
        assert_eq!((c.tx_bytes, c.tx_errors), (0, 4));
        // THR still reports empty so the guest never blocks.
        assert_ne!(rd(&mut dev, LSR) & LSR_THRE, 0);
    }

    #[test]
    fn counters_handle_reads_without_the_device() {
        let (mut dev, _irq, _out) = device();
        let h = dev.counters_handle();
        dev.write(DATA, b"z");
        assert_eq!(h.snapshot().tx_bytes, 1);
        assert!(format!("{dev:?}").contains("tx_bytes: 1"));
    }

    #[test]
    fn a_full_output_buffer_holds_the_transmitter_and_drops_what_is_forced() {
        let irq = EventFdTrigger::new().unwrap();
        let buf = OutputBuffer::new(4).unwrap();
        let mut dev =
            SerialDevice::with_output_buffer(irq.try_clone().unwrap(), buf.clone()).unwrap();
        assert_ne!(rd(&mut dev, LSR) & LSR_THRE, 0);
        for b in b"abcd" {
            dev.write(DATA, &[*b]);
        }
        // One wake-up for the drainer, when the buffer stopped being empty.
        assert_eq!(buf.ready_evt().read().unwrap(), 1);
        assert!(buf.is_full());
        // Busy: a polling driver waits.
        assert_eq!(rd(&mut dev, LSR) & (LSR_THRE | LSR_TEMT), 0);
        // A driver that writes anyway loses the byte, counted.
        dev.write(DATA, b"e");
        assert_eq!(dev.counters().tx_errors, 1);
        assert_eq!(dev.counters().tx_bytes, 4);
        // With THRE interrupts enabled, draining tells the driver the transmitter is free.
        dev.write(IER, &[IER_THRE]);
        let _ = irq.read();
        assert_eq!(rd(&mut dev, IIR) & 0x0f, 0x02);
        assert_eq!(rd(&mut dev, LSR) & LSR_THRE, 0);
        let mut out = Vec::new();
        let n = buf
            .drain(|b| {
                out.extend_from_slice(&b[..2]);
                Ok(2)
            })
            .unwrap();
        assert_eq!((n, out.as_slice()), (2, &b"ab"[..]));
        dev.output_drained();
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(rd(&mut dev, LSR) & LSR_THRE, 0);
        // A sink that would block leaves the bytes in place.
        let e = buf
            .drain(|_| Err(io::Error::from(io::ErrorKind::WouldBlock)))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(buf.len(), 2);
        assert_eq!(buf.discard(), 2);
        assert!(buf.is_empty());
        assert_eq!(buf.drain(|_| unreachable!()).unwrap(), 0);
    }

    #[test]
    fn state_round_trips_into_a_fresh_uart() {
        let (mut a, _irq, _out) = device();
        a.write(LCR, &[0x83]);
        a.write(DATA, &[0x0c]); // divisor 12
        a.write(LCR, &[0x03]);
        a.write(IER, &[IER_RDA]);
        a.write(SCR, &[0x77]);
        a.enqueue_input(b"abc").unwrap();
        assert_eq!(rd(&mut a, DATA), b'a');
        let saved = a.state();
        assert_eq!(saved.in_buffer, b"bc");

        let (mut b, irq_b, out_b) = device();
        b.restore(&saved).unwrap();
        assert_eq!(b.state(), saved);
        // Like the saved UART: its driver already took the interrupt for this input.
        assert!(irq_b.read().is_err());
        assert_eq!(rd(&mut b, IER), IER_RDA);
        assert_eq!(rd(&mut b, SCR), 0x77);
        assert_ne!(rd(&mut b, LSR) & LSR_DR, 0);
        assert_eq!((rd(&mut b, DATA), rd(&mut b, DATA)), (b'b', b'c'));
        assert_eq!(rd(&mut b, LSR) & LSR_DR, 0);
        // The divisor survived; the next output goes to the restored UART's own sink.
        b.write(LCR, &[0x83]);
        assert_eq!(rd(&mut b, DATA), 0x0c);
        b.write(LCR, &[0x03]);
        b.write(DATA, b"!");
        assert_eq!(out_b.contents(), b"!");
        // A state with more than the FIFO holds is refused.
        let too_full = SerialDeviceState {
            in_buffer: vec![0; 65],
            ..saved
        };
        assert!(matches!(b.restore(&too_full), Err(Error::InvalidState(_))));
    }
}
