//! virtio-mmio (version 2) transport and one split virtqueue, polled from ring 3.
//!
//! Discovery: the DSDT's `LNRO0005` devices and `virtio_mmio.device=` words on the command
//! line. Register accesses are plain 32-bit loads and stores on the identity map (each one
//! traps to the VMM). Queue memory lives in the probe's `.noinit` area, identity mapped,
//! so guest-physical = virtual. Interrupts are suppressed (`VIRTQ_AVAIL_F_NO_INTERRUPT`)
//! and completions are found by polling the used ring with a TSC deadline.

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

/// Per-device queue memory: descriptor table, avail ring, used ring (one page each).
const QMEM: u64 = 3 * 4096;

extern "C" {
    static mut probe_vq: [u8; MAX_DEVS * QMEM as usize];
}

global_asm!(
    ".section .noinit.probe_vq, \"aw\", @nobits",
    ".p2align 12",
    ".global probe_vq",
    "probe_vq:",
    "    .skip {size}",
    ".text",
    size = const MAX_DEVS * QMEM as usize,
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

/// One virtio-mmio device with queue 0 set up.
pub struct Dev {
    /// MMIO base.
    pub base: u64,
    /// Accepted features.
    pub features: u64,
    /// Queue size in use.
    pub qsize: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
}

/// Reads a transport register.
pub fn rd(base: u64, off: u64) -> u32 {
    mmio_rd32(base + off)
}

/// Writes a transport register.
pub fn wr(base: u64, off: u64, v: u32) {
    mmio_wr32(base + off, v)
}

/// Queue memory of device slot `slot`: (descriptors, avail, used).
pub fn queue_mem(slot: usize) -> (u64, u64, u64) {
    let b = (&raw const probe_vq) as u64 + slot as u64 * QMEM;
    (b, b + 4096, b + 8192)
}

fn zero(addr: u64, len: u64) {
    // SAFETY: the probe's own queue memory (identity mapped); no device uses it while the
    // driver resets it (the device was reset first).
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

impl Dev {
    /// Identifies the transport at `base` (magic, version, device id).
    pub fn identify(base: u64) -> Result<(u32, u32, u32), Failure> {
        let magic = rd(base, MAGIC_VALUE);
        if magic != MAGIC {
            return Err(("bad MagicValue", base));
        }
        Ok((rd(base, VERSION), rd(base, DEVICE_ID), rd(base, VENDOR_ID)))
    }

    /// Full initialisation: reset, ACK, DRIVER, features (`want` & offered, plus
    /// VERSION_1), FEATURES_OK, queue 0 in queue memory `slot`, DRIVER_OK.
    pub fn init(base: u64, slot: usize, want: u64) -> Result<Dev, Failure> {
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
        let features = offered & (want | F_VERSION_1);
        wr(base, DRIVER_FEATURES_SEL, 0);
        wr(base, DRIVER_FEATURES, features as u32);
        wr(base, DRIVER_FEATURES_SEL, 1);
        wr(base, DRIVER_FEATURES, (features >> 32) as u32);
        wr(base, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if rd(base, STATUS) & S_FEATURES_OK == 0 {
            return Err(("FEATURES_OK did not stick", base));
        }
        wr(base, QUEUE_SEL, 0);
        if rd(base, QUEUE_READY) != 0 {
            return Err(("queue 0 ready before set-up", base));
        }
        let max = rd(base, QUEUE_NUM_MAX);
        if max == 0 {
            return Err(("queue 0 not available (QueueNumMax 0)", base));
        }
        let qsize = max.min(u32::from(MAX_QUEUE)) as u16;
        let (desc, avail, used) = queue_mem(slot);
        zero(desc, QMEM);
        // No interrupts: the probe polls.
        // SAFETY: avail ring flags word in the probe's queue memory.
        unsafe { core::ptr::write_volatile(avail as *mut u16, 1) };
        wr(base, QUEUE_NUM, u32::from(qsize));
        set_queue_addrs(base, desc, avail, used);
        wr(base, QUEUE_READY, 1);
        wr(base, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let st = rd(base, STATUS);
        if st & (S_NEEDS_RESET | S_FAILED) != 0 || st & S_DRIVER_OK == 0 {
            return Err(("device refused DRIVER_OK", base));
        }
        Ok(Dev {
            base,
            features,
            qsize,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_idx: 0,
        })
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i % self.qsize);
        // SAFETY: inside this device's descriptor page (i < qsize <= 256).
        unsafe {
            core::ptr::write_volatile(d as *mut u64, addr);
            core::ptr::write_volatile((d + 8) as *mut u32, len);
            core::ptr::write_volatile((d + 12) as *mut u16, flags);
            core::ptr::write_volatile((d + 14) as *mut u16, next);
        }
    }

    /// Publishes `head` in the avail ring (does not notify).
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.qsize);
        // SAFETY: avail ring entries and index in this device's avail page.
        unsafe {
            core::ptr::write_volatile((self.avail + 4 + 2 * slot) as *mut u16, head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            core::ptr::write_volatile((self.avail + 2) as *mut u16, self.avail_idx);
        }
        fence(Ordering::SeqCst);
    }

    /// Notifies queue 0 (ring-3 store or gate, see `NOTIFY_GATE`).
    pub fn notify(&self) {
        if NOTIFY_GATE.load(Ordering::Relaxed) {
            arch::gate_mmio_write32(self.base + QUEUE_NOTIFY, 0);
        } else {
            wr(self.base, QUEUE_NOTIFY, 0);
        }
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx_now(&self) -> u16 {
        // SAFETY: used ring index in this device's used page.
        unsafe { core::ptr::read_volatile((self.used + 2) as *const u16) }
    }

    /// Polls for the next used entry for at most `cycles` TSC cycles: (id, len).
    pub fn poll(&mut self, cycles: u64) -> Option<(u32, u32)> {
        let t0 = rdtsc();
        loop {
            if self.used_idx_now() != self.used_idx {
                fence(Ordering::SeqCst);
                let e = self.used + 4 + 8 * u64::from(self.used_idx % self.qsize);
                // SAFETY: a used ring element in this device's used page.
                let (id, len) = unsafe {
                    (
                        core::ptr::read_volatile(e as *const u32),
                        core::ptr::read_volatile((e + 4) as *const u32),
                    )
                };
                self.used_idx = self.used_idx.wrapping_add(1);
                return Some((id, len));
            }
            if rdtsc().wrapping_sub(t0) > cycles {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Reads a 32-bit config field.
    pub fn config32(&self, off: u64) -> u32 {
        rd(self.base, CONFIG + off)
    }

    /// Reads a 64-bit config field consistently (ConfigGeneration loop).
    pub fn config64(&self, off: u64) -> u64 {
        loop {
            let g = rd(self.base, CONFIG_GENERATION);
            let lo = u64::from(self.config32(off));
            let hi = u64::from(self.config32(off + 4));
            if rd(self.base, CONFIG_GENERATION) == g {
                return lo | (hi << 32);
            }
        }
    }
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
