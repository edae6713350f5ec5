//! virtio-mmio (version 2) transport and split virtqueues, driven from ring 3.
//!
//! Discovery: the DSDT's `LNRO0005` devices and `virtio_mmio.device=` words on the command
//! line. Register accesses are plain 32-bit loads and stores on the identity map (each one
//! traps to the VMM). Queue memory (up to `MAX_QUEUES` queues per device slot) and the
//! shared DMA area live in the probe's `.noinit` area, identity mapped, so guest-physical =
//! virtual. By default interrupts are suppressed (`VIRTQ_AVAIL_F_NO_INTERRUPT`) and
//! completions are found by polling the used ring with a TSC deadline; with an interrupt
//! slot (`probe.irq=1`, see `irq`) the driver waits for the device's interrupt instead and
//! honours `VIRTIO_RING_F_EVENT_IDX` (used_event / avail_event) when it was negotiated.

use core::arch::global_asm;
use core::sync::atomic::{fence, AtomicBool, Ordering};

use crate::acpi::{self, Acpi, MmioDev};
use crate::arch::{self, rdtsc};
use crate::checks::{parse_u64, Params};
use crate::phys::{mapped, mmio_rd32, mmio_wr32};

/// Most transports the probe handles.
pub const MAX_DEVS: usize = 16;
/// Largest queue the probe sets up.
pub const MAX_QUEUE: u16 = 256;
/// "virt".
pub const MAGIC: u32 = 0x7472_6976;

// Register offsets.
pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const VENDOR_ID: u64 = 0x00c;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const INTERRUPT_STATUS: u64 = 0x060;
pub const INTERRUPT_ACK: u64 = 0x064;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DESC_HIGH: u64 = 0x084;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const CONFIG_GENERATION: u64 = 0x0fc;
pub const CONFIG: u64 = 0x100;

// Status bits.
pub const S_ACK: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 64;
pub const S_FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

// Descriptor flags.
pub const D_NEXT: u16 = 1;
pub const D_WRITE: u16 = 2;

/// Queues per device the probe can set up.
pub const MAX_QUEUES: usize = 4;
/// Per-queue memory: descriptor table, avail ring, used ring (one page each).
const QMEM: u64 = 3 * 4096;
/// Size of the shared DMA area (`dma()`).
pub const DMA_SIZE: u64 = (1 << 20) + 4096;

/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

extern "C" {
    static mut probe_vq: [u8; MAX_DEVS * MAX_QUEUES * QMEM as usize];
    static mut probe_dma: [u8; DMA_SIZE as usize];
}

global_asm!(
    ".section .noinit.probe_vq, \"aw\", @nobits",
    ".p2align 12",
    ".global probe_vq",
    "probe_vq:",
    "    .skip {size}",
    ".p2align 12",
    ".global probe_dma",
    "probe_dma:",
    "    .skip {dma}",
    ".text",
    size = const MAX_DEVS * MAX_QUEUES * QMEM as usize,
    dma = const DMA_SIZE as usize,
);

/// Notify through the gate (ring 0) instead of a ring-3 store.
pub static NOTIFY_GATE: AtomicBool = AtomicBool::new(false);

/// A transport found by discovery.
#[derive(Clone, Copy, Default)]
pub struct Transport {
    /// MMIO base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// GSI.
    pub gsi: u32,
    /// Listed in the DSDT.
    pub acpi: bool,
    /// Listed on the command line.
    pub cmdline: bool,
    /// Interrupt trigger and polarity (`acpi::IRQ_*` bits; the command line gives none,
    /// which means edge-triggered, active high).
    pub irq_flags: u8,
}

/// Discovery result, sorted by base.
pub struct Found {
    /// Transports, sorted by MMIO base.
    pub devs: [Transport; MAX_DEVS],
    /// Number of valid `devs`.
    pub n: usize,
    /// How many the DSDT lists.
    pub n_acpi: usize,
    /// How many the command line lists.
    pub n_cmdline: usize,
}

/// A discovery failure: reason and the address concerned (0: none).
pub type Failure = (&'static str, u64);

/// Parses `<size>@<base>:<irq>[:<id>]` (Linux `virtio_mmio.device=`).
fn parse_cmdline_dev(v: &[u8]) -> Option<Transport> {
    let at = v.iter().position(|&c| c == b'@')?;
    let (size_s, rest) = (&v[..at], &v[at + 1..]);
    let colon = rest.iter().position(|&c| c == b':')?;
    let (base_s, rest) = (&rest[..colon], &rest[colon + 1..]);
    let irq_s = rest.split(|&c| c == b':').next()?;
    let (num, mult) = match size_s.last()? {
        b'k' | b'K' => (&size_s[..size_s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&size_s[..size_s.len() - 1], 1 << 20),
        b'g' | b'G' => (&size_s[..size_s.len() - 1], 1 << 30),
        _ => (size_s, 1),
    };
    Some(Transport {
        base: parse_u64(base_s)?,
        len: parse_u64(num)?.checked_mul(mult)?,
        gsi: u32::try_from(parse_u64(irq_s)?).ok()?,
        acpi: false,
        cmdline: true,
        irq_flags: 0,
    })
}

/// Finds virtio-mmio transports in the DSDT and on the command line; both lists must agree
/// when both are present.
pub fn discover(entry: u64, info: u64, params: &Params) -> Result<Found, Failure> {
    let mut f = Found {
        devs: [Transport::default(); MAX_DEVS],
        n: 0,
        n_acpi: 0,
        n_cmdline: 0,
    };
    let mut from_acpi = [MmioDev::default(); MAX_DEVS];
    if let Ok(a) = Acpi::load(entry, info) {
        f.n_acpi = acpi::virtio_devices(a.dsdt_aml(), &mut from_acpi);
        if f.n_acpi > MAX_DEVS {
            return Err(("more than 16 LNRO0005 devices in the DSDT", 0));
        }
    }
    let mut from_cmd = [Transport::default(); MAX_DEVS];
    for v in params
        .words()
        .filter_map(|w| w.strip_prefix(b"virtio_mmio.device="))
    {
        let t = parse_cmdline_dev(v).ok_or(("bad virtio_mmio.device= word", 0))?;
        if f.n_cmdline == MAX_DEVS {
            return Err(("more than 16 virtio_mmio.device= words", 0));
        }
        from_cmd[f.n_cmdline] = t;
        f.n_cmdline += 1;
    }
    for d in &from_acpi[..f.n_acpi] {
        if d.base == 0 || d.len == 0 {
            return Err(("LNRO0005 device without Memory32Fixed in _CRS", 0));
        }
        add(
            &mut f,
            Transport {
                base: d.base,
                len: d.len,
                gsi: d.gsi,
                acpi: true,
                cmdline: false,
                irq_flags: d.irq_flags,
            },
        )?;
    }
    for t in &from_cmd[..f.n_cmdline] {
        match f.devs[..f.n].iter_mut().find(|d| d.base == t.base) {
            Some(d) if d.cmdline => return Err(("base listed twice on the command line", t.base)),
            Some(d) => {
                if d.len != t.len {
                    return Err(("acpi and cmdline disagree on the window length", t.base));
                }
                if d.gsi != t.gsi {
                    return Err(("acpi and cmdline disagree on the interrupt", t.base));
                }
                d.cmdline = true;
            }
            None => add(&mut f, *t)?,
        }
    }
    if f.n_acpi > 0 && f.n_cmdline > 0 {
        if let Some(d) = f.devs[..f.n].iter().find(|d| !(d.acpi && d.cmdline)) {
            return Err(if d.acpi {
                ("device in the DSDT but not on the command line", d.base)
            } else {
                ("device on the command line but not in the DSDT", d.base)
            });
        }
    }
    // Sort by base (insertion sort; n <= 16).
    for i in 1..f.n {
        let mut j = i;
        while j > 0 && f.devs[j - 1].base > f.devs[j].base {
            f.devs.swap(j - 1, j);
            j -= 1;
        }
    }
    for d in &f.devs[..f.n] {
        if d.len < 0x100 || !mapped(d.base, d.len) || d.base & 3 != 0 {
            return Err((
                "window not usable (unmapped, unaligned or shorter than 0x100)",
                d.base,
            ));
        }
    }
    Ok(f)
}

fn add(f: &mut Found, t: Transport) -> Result<(), Failure> {
    if f.devs[..f.n].iter().any(|d| d.base == t.base) {
        return Err(("base listed twice", t.base));
    }
    if f.n == MAX_DEVS {
        return Err(("more than 16 virtio-mmio devices", t.base));
    }
    f.devs[f.n] = t;
    f.n += 1;
    Ok(())
}

/// One split virtqueue in the probe's queue memory.
#[derive(Clone, Copy, Default)]
pub struct Queue {
    /// Queue size in use (0: not set up).
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Next avail index the driver publishes.
    avail_idx: u16,
    /// Next used index the driver consumes.
    used_idx: u16,
    /// Avail index at the last notify (for `VIRTIO_RING_F_EVENT_IDX`).
    kicked_idx: u16,
}

impl Queue {
    /// Writes descriptor `i` (taken modulo the queue size).
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i % self.size);
        // SAFETY: inside this queue's descriptor page (i % size < size <= 256).
        unsafe {
            core::ptr::write_volatile(d as *mut u64, addr);
            core::ptr::write_volatile((d + 8) as *mut u32, len);
            core::ptr::write_volatile((d + 12) as *mut u16, flags);
            core::ptr::write_volatile((d + 14) as *mut u16, next);
        }
    }

    /// Publishes `head` in the avail ring (does not notify).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        // SAFETY: avail ring entries and index in this queue's avail page.
        unsafe {
            core::ptr::write_volatile((self.avail + 4 + 2 * slot) as *mut u16, head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            core::ptr::write_volatile((self.avail + 2) as *mut u16, self.avail_idx);
        }
        fence(Ordering::SeqCst);
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx_now(&self) -> u16 {
        // SAFETY: used ring index in this queue's used page.
        unsafe { core::ptr::read_volatile((self.used + 2) as *const u16) }
    }

    /// The next used entry, if the device has written one: (id, len).
    pub fn take(&mut self) -> Option<(u32, u32)> {
        if self.size == 0 || self.used_idx_now() == self.used_idx {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
        // SAFETY: a used ring element in this queue's used page.
        let (id, len) = unsafe {
            (
                core::ptr::read_volatile(e as *const u32),
                core::ptr::read_volatile((e + 4) as *const u32),
            )
        };
        self.used_idx = self.used_idx.wrapping_add(1);
        Some((id, len))
    }

    /// `used_event` (EVENT_IDX): ask for an interrupt once the device has written used
    /// entry `idx`.
    fn set_used_event(&self, idx: u16) {
        let p = self.avail + 4 + 2 * u64::from(self.size);
        // SAFETY: the used_event word right after the avail ring, inside the avail page
        // (4 + 2 * 256 + 2 < 4096).
        unsafe { core::ptr::write_volatile(p as *mut u16, idx) };
        fence(Ordering::SeqCst);
    }

    /// `avail_event` (EVENT_IDX) as the device last wrote it.
    fn avail_event(&self) -> u16 {
        let p = self.used + 4 + 8 * u64::from(self.size);
        // SAFETY: the avail_event word right after the used ring, inside the used page
        // (4 + 8 * 256 + 2 < 4096).
        unsafe { core::ptr::read_volatile(p as *const u16) }
    }

    /// Sets the avail ring's flags word (1 = `VIRTQ_AVAIL_F_NO_INTERRUPT`).
    fn set_avail_flags(&self, flags: u16) {
        // SAFETY: avail ring flags word in this queue's avail page.
        unsafe { core::ptr::write_volatile(self.avail as *mut u16, flags) };
    }
}

/// How a device signals completions to the driver.
#[derive(Clone, Copy, Default)]
pub struct IrqMode {
    /// Interrupt slot (see `irq`) whose counter the driver waits on; `None`: polling with
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
    pub slot: Option<usize>,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` when offered (only with `slot`).
    pub event_idx: bool,
}

/// One virtio-mmio device with its queues set up.
pub struct Dev {
    /// MMIO base.
    pub base: u64,
    /// Accepted features.
    pub features: u64,
    /// Size of queue 0.
    pub qsize: u16,
    /// Queues 0..nq.
    pub q: [Queue; MAX_QUEUES],
    /// Number of queues set up.
    pub nq: usize,
    /// Interrupt slot to wait on (`None`: poll).
    pub irq: Option<usize>,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// Interrupt count at the last InterruptACK.
    acked: u64,
    /// Interrupts taken while waiting.
    pub irqs: u64,
    /// Notifies skipped because of `avail_event`.
    pub kicks_saved: u64,
}

/// Reads a transport register.
pub fn rd(base: u64, off: u64) -> u32 {
    mmio_rd32(base + off)
}

/// Writes a transport register.
pub fn wr(base: u64, off: u64, v: u32) {
    mmio_wr32(base + off, v)
}

/// Queue memory of queue 0 of device slot `slot`: (descriptors, avail, used).
pub fn queue_mem(slot: usize) -> (u64, u64, u64) {
    queue_mem_q(slot, 0)
}

/// Queue memory of queue `q` of device slot `slot`: (descriptors, avail, used).
pub fn queue_mem_q(slot: usize, q: usize) -> (u64, u64, u64) {
    let b = (&raw const probe_vq) as u64 + (slot * MAX_QUEUES + q) as u64 * QMEM;
    (b, b + 4096, b + 8192)
}

/// The shared DMA area (`DMA_SIZE` bytes, page aligned): data buffers of whichever
/// virtio check runs (one at a time).
pub fn dma() -> u64 {
    (&raw const probe_dma) as u64
}

/// `len` bytes of the DMA area from `addr` as a slice.
pub fn dma_slice(addr: u64, len: usize) -> &'static mut [u8] {
    assert!(addr >= dma() && addr + len as u64 <= dma() + DMA_SIZE);
    // SAFETY: inside the probe's DMA area (asserted), which only the running check uses;
    // the device does not own these bytes while the driver looks at them (not published,
    // or returned in the used ring). Callers do not keep two overlapping slices alive.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

/// Zeroes `len` bytes at `addr` in probe memory.
pub fn zero(addr: u64, len: u64) {
    // SAFETY: callers pass the probe's own queue or DMA memory (identity mapped), which no
    // device is using at the time (reset first, or buffers not yet published).
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) }
}

/// Resets the device (status 0) and waits (bounded) for the status to read back 0.
pub fn reset(base: u64) -> bool {
    wr(base, STATUS, 0);
    for _ in 0..1000 {
        if rd(base, STATUS) == 0 {
            return true;
        }
    }
    false
}

/// `vring_need_event`: whether moving the index from `old` to `new` passes `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Dev {
    /// Identifies the transport at `base` (magic, version, device id).
    pub fn identify(base: u64) -> Result<(u32, u32, u32), Failure> {
        let magic = rd(base, MAGIC_VALUE);
        if magic != MAGIC {
            return Err(("bad MagicValue", base));
        }
        Ok((rd(base, VERSION), rd(base, DEVICE_ID), rd(base, VENDOR_ID)))
    }

    /// Full polled initialisation with queue 0 only: reset, ACK, DRIVER, features (`want`
    /// & offered, plus VERSION_1), FEATURES_OK, queue 0 in queue memory `slot`, DRIVER_OK.
    pub fn init(base: u64, slot: usize, want: u64) -> Result<Dev, Failure> {
        Self::open(base, slot, want, 1, IrqMode::default())
    }

    /// Initialisation with queues `0..nq` and the given interrupt mode.
    pub fn open(
        base: u64,
        slot: usize,
        want: u64,
        nq: usize,
        mode: IrqMode,
    ) -> Result<Dev, Failure> {
        let (version, id, _) = Self::identify(base)?;
        if version != 2 {
            return Err(("not a version 2 (modern) virtio-mmio transport", base));
        }
        if id == 0 {
            return Err(("no device behind the transport (DeviceID 0)", base));
        }
        if !reset(base) {
            return Err(("status does not read 0 after reset", base));
        }
        wr(base, STATUS, S_ACK);
        wr(base, STATUS, S_ACK | S_DRIVER);
        let offered = read_features(base);
        if offered & F_VERSION_1 == 0 {
            return Err(("device does not offer VERSION_1", base));
        }
        let mut want = want | F_VERSION_1;
        if mode.slot.is_some() && mode.event_idx {
            want |= F_EVENT_IDX;
        } else {
            want &= !F_EVENT_IDX;
        }
        let features = offered & want;
        wr(base, DRIVER_FEATURES_SEL, 0);
        wr(base, DRIVER_FEATURES, features as u32);
        wr(base, DRIVER_FEATURES_SEL, 1);
        wr(base, DRIVER_FEATURES, (features >> 32) as u32);
        wr(base, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if rd(base, STATUS) & S_FEATURES_OK == 0 {
            return Err(("FEATURES_OK did not stick", base));
        }
        // Queues that exist only with a feature: the balloon's stats queue (2).
        let nq = if id == crate::balloon::BALLOON_ID && features & crate::balloon::F_STATS_VQ == 0 {
            nq.min(2)
        } else {
            nq
        };
        let mut dev = Dev {
            base,
            features,
            qsize: 0,
            q: [Queue::default(); MAX_QUEUES],
            nq: nq.min(MAX_QUEUES),
            irq: mode.slot,
            event_idx: features & F_EVENT_IDX != 0,
            acked: 0,
            irqs: 0,
            kicks_saved: 0,
        };
        for qi in 0..dev.nq {
            dev.q[qi] = setup_queue(base, slot, qi, mode.slot.is_none())?;
        }
        dev.qsize = dev.q[0].size;
        wr(base, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let st = rd(base, STATUS);
        if st & (S_NEEDS_RESET | S_FAILED) != 0 || st & S_DRIVER_OK == 0 {
            return Err(("device refused DRIVER_OK", base));
        }
        if let Some(s) = dev.irq {
            dev.acked = crate::irq::count(s);
        }
        Ok(dev)
    }

    /// Writes descriptor `i` of queue 0.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.q[0].set_desc(i, addr, len, flags, next)
    }

    /// Publishes `head` in queue 0's avail ring (does not notify).
    pub fn publish(&mut self, head: u16) {
        self.q[0].publish(head)
    }

    /// Notifies queue 0 unconditionally (ring-3 store or gate, see `NOTIFY_GATE`).
    pub fn notify(&self) {
        self.notify_q(0)
    }

    /// Notifies queue `q` unconditionally.
    pub fn notify_q(&self, q: u16) {
        if NOTIFY_GATE.load(Ordering::Relaxed) {
            arch::gate_mmio_write32(self.base + QUEUE_NOTIFY, u32::from(q));
        } else {
            wr(self.base, QUEUE_NOTIFY, u32::from(q));
        }
    }

    /// Notifies queue `q` if the device wants it: always without EVENT_IDX, else when the
    /// avail index passed `avail_event` since the last notify.
    pub fn kick(&mut self, q: usize) {
        let qu = &mut self.q[q];
        let (old, new) = (qu.kicked_idx, qu.avail_idx);
        if old == new {
            return;
        }
        qu.kicked_idx = new;
        fence(Ordering::SeqCst);
        if self.event_idx && !need_event(qu.avail_event(), new, old) {
            self.kicks_saved += 1;
            return;
        }
        self.notify_q(q as u16);
    }

    /// Polls queue 0 for the next used entry for at most `cycles` TSC cycles.
    pub fn poll(&mut self, cycles: u64) -> Option<(u32, u32)> {
        self.poll_q(0, cycles)
    }

    /// Waits for the next used entry of queue `q` for at most `cycles` TSC cycles: by
    /// polling the used ring, or (with an interrupt slot) by waiting for the interrupt.
    pub fn poll_q(&mut self, q: usize, cycles: u64) -> Option<(u32, u32)> {
        let t0 = rdtsc();
        loop {
            let seen = self.ack_if_interrupted();
            if self.event_idx {
                self.q[q].set_used_event(self.q[q].used_idx);
            }
            if let Some(e) = self.q[q].take() {
                return Some(e);
            }
            let left = cycles.saturating_sub(rdtsc().wrapping_sub(t0));
            if left == 0 {
                return None;
            }
            match (self.irq, seen) {
                (Some(s), Some(c)) => {
                    crate::irq::wait_change(s, c, left);
                }
                _ => core::hint::spin_loop(),
            }
        }
    }

    /// Any used entry on any of the queues in `mask` (bit per queue), waiting at most
    /// `cycles`: (queue, id, len).
    pub fn poll_any(&mut self, mask: u32, cycles: u64) -> Option<(usize, u32, u32)> {
        let t0 = rdtsc();
        loop {
            let seen = self.ack_if_interrupted();
            for qi in 0..self.nq {
                if mask & (1 << qi) == 0 {
                    continue;
                }
                if self.event_idx {
                    self.q[qi].set_used_event(self.q[qi].used_idx);
                }
            }
            for qi in 0..self.nq {
                if mask & (1 << qi) != 0 {
                    if let Some((id, len)) = self.q[qi].take() {
                        return Some((qi, id, len));
                    }
                }
            }
            let left = cycles.saturating_sub(rdtsc().wrapping_sub(t0));
            if left == 0 {
                return None;
            }
            match (self.irq, seen) {
                (Some(s), Some(c)) => {
                    crate::irq::wait_change(s, c, left);
                }
                _ => core::hint::spin_loop(),
            }
        }
    }

    /// With an interrupt slot and no interrupt counted yet: waits up to `cycles` for the one
    /// still on its way. A device writes the used ring before it signals, so the driver may
    /// take the entry first; the count then includes the interrupt that follows.
    pub fn await_first_interrupt(&mut self, cycles: u64) {
        let Some(s) = self.irq else { return };
        let t0 = rdtsc();
        while self.irqs == 0 {
            let Some(c) = self.ack_if_interrupted() else { return };
            let left = cycles.saturating_sub(rdtsc().wrapping_sub(t0));
            if self.irqs != 0 || left == 0 {
                return;
            }
            crate::irq::wait_change(s, c, left);
        }
    }

    /// With an interrupt slot: notes the interrupts that came since the last call (the
    /// handler acknowledged them to the device). Returns the interrupt count to wait past
    /// (`None` without a slot).
    fn ack_if_interrupted(&mut self) -> Option<u64> {
        let s = self.irq?;
        let c = crate::irq::count(s);
        if c != self.acked {
            // The handler acknowledged the device; take the bits it collected.
            self.irqs += c.wrapping_sub(self.acked);
            self.acked = c;
            crate::irq::take_isr(s);
        }
        Some(c)
    }

    /// Reads InterruptStatus and acknowledges what it shows; returns it. With an interrupt
    /// slot the handler has done that already: returns the bits it collected (and any
    /// still set).
    pub fn ack_isr(&self) -> u32 {
        let mut isr = rd(self.base, INTERRUPT_STATUS);
        if let Some(s) = self.irq {
            isr |= crate::irq::take_isr(s);
        }
        if isr != 0 {
            wr(self.base, INTERRUPT_ACK, isr);
        }
        isr
    }

    /// Reads a 32-bit config field.
    pub fn config32(&self, off: u64) -> u32 {
        rd(self.base, CONFIG + off)
    }

    /// Reads an 8-bit config field.
    pub fn config8(&self, off: u64) -> u8 {
        crate::phys::mmio_rd8(self.base + CONFIG + off)
    }

    /// Reads a 16-bit config field.
    pub fn config16(&self, off: u64) -> u16 {
        crate::phys::mmio_rd16(self.base + CONFIG + off)
    }

    /// Writes a 32-bit config field.
    pub fn set_config32(&self, off: u64, v: u32) {
        wr(self.base, CONFIG + off, v)
    }

    /// Reads a 64-bit config field consistently (ConfigGeneration loop, bounded).
    pub fn config64(&self, off: u64) -> u64 {
        let mut v = 0;
        for _ in 0..100 {
            let g = rd(self.base, CONFIG_GENERATION);
            let lo = u64::from(self.config32(off));
            let hi = u64::from(self.config32(off + 4));
            v = lo | (hi << 32);
            if rd(self.base, CONFIG_GENERATION) == g {
                break;
            }
        }
        v
    }
}

/// Sets up queue `qi` of the device at `base` in queue memory `slot`.
fn setup_queue(base: u64, slot: usize, qi: usize, no_interrupt: bool) -> Result<Queue, Failure> {
    wr(base, QUEUE_SEL, qi as u32);
    if rd(base, QUEUE_READY) != 0 {
        return Err(("queue ready before set-up", base));
    }
    let max = rd(base, QUEUE_NUM_MAX);
    if max == 0 {
        return Err(("queue not available (QueueNumMax 0)", base));
    }
    let size = max.min(u32::from(MAX_QUEUE)) as u16;
    let (desc, avail, used) = queue_mem_q(slot, qi);
    zero(desc, QMEM);
    let q = Queue {
        size,
        desc,
        avail,
        used,
        avail_idx: 0,
        used_idx: 0,
        kicked_idx: 0,
    };
    // Polling: no interrupts (`VIRTQ_AVAIL_F_NO_INTERRUPT`).
    q.set_avail_flags(u16::from(no_interrupt));
    wr(base, QUEUE_NUM, u32::from(size));
    set_queue_addrs(base, desc, avail, used);
    wr(base, QUEUE_READY, 1);
    Ok(q)
}

/// Reads the 64 offered feature bits.
pub fn read_features(base: u64) -> u64 {
    wr(base, DEVICE_FEATURES_SEL, 0);
    let lo = u64::from(rd(base, DEVICE_FEATURES));
    wr(base, DEVICE_FEATURES_SEL, 1);
    let hi = u64::from(rd(base, DEVICE_FEATURES));
    lo | (hi << 32)
}

/// Writes the three queue addresses of the selected queue.
pub fn set_queue_addrs(base: u64, desc: u64, avail: u64, used: u64) {
    wr(base, QUEUE_DESC_LOW, desc as u32);
    wr(base, QUEUE_DESC_HIGH, (desc >> 32) as u32);
    wr(base, QUEUE_DRIVER_LOW, avail as u32);
    wr(base, QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    wr(base, QUEUE_DEVICE_LOW, used as u32);
    wr(base, QUEUE_DEVICE_HIGH, (used >> 32) as u32);
}
