//! Interrupts: the ring-0 handlers that count interrupts per vector, local APIC and I/O
//! APIC programming from ring 3, and the `irq` check (LAPIC timer, COM1, virtio).
//!
//! The probe owns `N_SLOTS` vectors from `VECTOR_BASE` on; "slot" is the vector minus
//! `VECTOR_BASE`. Each handler (ring 0, so emulated on a PVM host) does only this: record
//! the TSC, increment the slot's counter; for a virtio device, read InterruptStatus and
//! write it to InterruptACK (as Linux's handler does: the line is then low at the EOI, which
//! matters for level-triggered lines) and keep the bits for ring 3; for any other
//! level-triggered slot, mask its I/O APIC entry (ring 3 unmasks it once it has quietened
//! the device); EOI (not for the spurious vector); `iretq`. Ring 3 waits for a counter to
//! change with a pause loop and a TSC deadline.
//!
//! Ring 3 runs with IF=1 only while something is routed: the `irq` check, and the device
//! checks with `probe.irq=1`. The 8259 PIC and LINT0 are masked first, and every I/O APIC
//! entry the probe does not program stays masked, so only the probe's vectors can arrive.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::{Acpi, Iso, IRQ_LEVEL, IRQ_LOW, MAX_IOAPICS, MAX_ISOS};
use crate::arch::{self, inb, outb, rdtsc};
use crate::checks::Ctx;
use crate::console::{Line, LSR, LSR_DR, MCR, RBR_THR};
use crate::phys::{mapped, mmio_rd32, mmio_wr32};
use crate::virtio::{self as vio, Dev, IrqMode, D_NEXT, D_WRITE};

/// First vector the probe uses (above the exceptions and the PIC's usual 0x20..0x2f).
pub const VECTOR_BASE: u8 = 0x30;
/// Vectors (slots) the probe has handlers for.
pub const N_SLOTS: usize = 32;
/// Slot of the local APIC timer.
pub const SLOT_TIMER: usize = 0;
/// Slot of COM1 (ISA IRQ 4).
pub const SLOT_COM1: usize = 1;
/// First slot for virtio GSIs (one per distinct GSI).
pub const SLOT_VIRTIO: usize = 2;
/// Slots available for virtio GSIs.
pub const MAX_VIRTIO_SLOTS: usize = 16;
/// Slot of the local APIC error interrupt.
pub const SLOT_ERROR: usize = 30;
/// Slot of the local APIC spurious-interrupt vector (no EOI).
pub const SLOT_SPURIOUS: usize = 31;

// Local APIC registers (xAPIC MMIO).
const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_LVT_ERROR: u64 = 0x370;
const LAPIC_TMICT: u64 = 0x380;
const LAPIC_TMCCT: u64 = 0x390;
const LAPIC_TDCR: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TSC_DEADLINE: u32 = 2 << 17;
/// IA32_TSC_DEADLINE.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// I/O APIC redirection entry: masked.
const RTE_MASKED: u32 = 1 << 16;
const RTE_LEVEL: u32 = 1 << 15;
const RTE_LOW: u32 = 1 << 13;
/// No GSI routed to a slot.
const NO_GSI: u32 = u32::MAX;

/// Interrupts taken per slot (written by the ring-0 handlers).
pub static IRQ_COUNT: [AtomicU64; N_SLOTS] = [const { AtomicU64::new(0) }; N_SLOTS];
/// TSC at the last interrupt per slot (written by the ring-0 handlers).
pub static IRQ_TSC: [AtomicU64; N_SLOTS] = [const { AtomicU64::new(0) }; N_SLOTS];
/// Per slot: I/O APIC base (0: nothing to mask, edge-triggered) and `index | masked << 32`,
/// the register write that masks the slot's level-triggered entry.
pub static IRQ_MASK: [AtomicU64; 2 * N_SLOTS] = [const { AtomicU64::new(0) }; 2 * N_SLOTS];
/// Per slot: the virtio-mmio base whose InterruptStatus the handler reads and writes back
/// to InterruptACK before the EOI (0: none), so a level-triggered line is low at the EOI.
pub static IRQ_DEV: [AtomicU64; N_SLOTS] = [const { AtomicU64::new(0) }; N_SLOTS];
/// Per slot: InterruptStatus bits the handler acknowledged, collected until ring 3 takes
/// them.
pub static IRQ_ISR: [AtomicU64; N_SLOTS] = [const { AtomicU64::new(0) }; N_SLOTS];
/// Address of the local APIC EOI register (0 until set up).
pub static IRQ_EOI: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// `N_SLOTS` handler stubs, 16 bytes apart, for vectors `VECTOR_BASE..`.
    pub static probe_irq_stubs: [u8; N_SLOTS * 16];
}

global_asm!(
    ".section .text.probe_irq, \"ax\"",
    ".p2align 4",
    ".global probe_irq_stubs",
    "probe_irq_stubs:",
    ".set probe_irq_i, 0",
    ".rept {n}",
    "    .p2align 4",
    "    push rax",
    "    mov eax, probe_irq_i",
    "    jmp probe_irq_common",
    "    .set probe_irq_i, probe_irq_i + 1",
    ".endr",
    "probe_irq_common:",
    "    push rdx",
    "    push rcx",
    "    push r8",
    "    mov ecx, eax",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    lea rdx, [rip + {tsc}]",
    "    mov qword ptr [rdx + rcx * 8], rax",
    "    lea rdx, [rip + {count}]",
    "    add qword ptr [rdx + rcx * 8], 1",
    // A virtio device: InterruptStatus -> InterruptACK, remembered for ring 3.
    "    lea rdx, [rip + {dev}]",
    "    mov rax, qword ptr [rdx + rcx * 8]",
    "    test rax, rax",
    "    jz .Lirq_nodev",
    "    mov edx, dword ptr [rax + 0x60]",
    "    mov dword ptr [rax + 0x64], edx",
    "    lea r8, [rip + {isr}]",
    "    or qword ptr [r8 + rcx * 8], rdx",
    ".Lirq_nodev:",
    // Level-triggered: mask the entry (IOREGSEL, IOWIN) until ring 3 has served it.
    "    shl ecx, 4",
    "    lea r8, [rip + {mask}]",
    "    add r8, rcx",
    "    mov rax, qword ptr [r8]",
    "    test rax, rax",
    "    jz .Lirq_eoi",
    "    mov edx, dword ptr [r8 + 8]",
    "    mov dword ptr [rax], edx",
    "    mov edx, dword ptr [r8 + 12]",
    "    mov dword ptr [rax + 16], edx",
    ".Lirq_eoi:",
    "    cmp ecx, {spurious}",
    "    je .Lirq_done",
    "    mov rax, qword ptr [rip + {eoi}]",
    "    test rax, rax",
    "    jz .Lirq_done",
    "    mov dword ptr [rax], 0",
    ".Lirq_done:",
    "    pop r8",
    "    pop rcx",
    "    pop rdx",
    "    pop rax",
    "    iretq",
    ".text",
    n = const N_SLOTS,
    tsc = sym IRQ_TSC,
    count = sym IRQ_COUNT,
    mask = sym IRQ_MASK,
    dev = sym IRQ_DEV,
    isr = sym IRQ_ISR,
    eoi = sym IRQ_EOI,
    spurious = const SLOT_SPURIOUS * 16,
);

/// Interrupts taken on `slot` so far.
pub fn count(slot: usize) -> u64 {
    IRQ_COUNT[slot].load(Ordering::SeqCst)
}

/// TSC at the last interrupt on `slot`.
pub fn last_tsc(slot: usize) -> u64 {
    IRQ_TSC[slot].load(Ordering::SeqCst)
}

/// Waits (pause loop, ring 3) until the counter of `slot` differs from `seen`, for at most
/// `cycles` TSC cycles. Returns whether it changed.
pub fn wait_change(slot: usize, seen: u64, cycles: u64) -> bool {
    let t0 = rdtsc();
    loop {
        if count(slot) != seen {
            return true;
        }
        if rdtsc().wrapping_sub(t0) >= cycles {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// The InterruptStatus bits the handler acknowledged on `slot` since the last call.
pub fn take_isr(slot: usize) -> u32 {
    IRQ_ISR[slot].swap(0, Ordering::SeqCst) as u32
}

/// Unmasks the slot's level-triggered I/O APIC entry again (the handler masked it); does
/// nothing for edge-triggered slots.
pub fn rearm(slot: usize) {
    let base = IRQ_MASK[2 * slot].load(Ordering::SeqCst);
    if base == 0 {
        return;
    }
    let v = IRQ_MASK[2 * slot + 1].load(Ordering::SeqCst);
    arch::gate_ioapic(base, v as u32, Some((v >> 32) as u32 & !RTE_MASKED));
}

/// The vector of `slot`.
pub fn vector(slot: usize) -> u8 {
    VECTOR_BASE + slot as u8
}

fn lapic_rd(lapic: u64, off: u64) -> u32 {
    mmio_rd32(lapic + off)
}

fn lapic_wr(lapic: u64, off: u64, v: u32) {
    mmio_wr32(lapic + off, v)
}

/// An I/O APIC in use.
#[derive(Clone, Copy, Default)]
struct IoApic {
    addr: u64,
    gsi_base: u32,
    entries: u32,
}

/// Interrupt routing state (local APIC, I/O APICs, which GSI goes to which slot).
pub struct Irq {
    /// Local APIC MMIO base.
    pub lapic: u64,
    /// This CPU's (the BSP's) APIC id.
    pub apic_id: u8,
    ioapics: [IoApic; MAX_IOAPICS],
    n_ioapics: usize,
    isos: [Iso; MAX_ISOS],
    n_isos: usize,
    /// GSI and flags routed to each slot (`NO_GSI`: none).
    routed: [(u32, u8); N_SLOTS],
    /// Whether ring 3 runs with IF=1.
    pub if_on: bool,
}

impl Irq {
    /// Sets up the local APIC (software enable, spurious and error vectors, LINT0 and the
    /// timer masked, TPR 0), masks the 8259 PIC and reads the I/O APICs' sizes.
    pub fn init(a: &Acpi) -> Result<Irq, &'static str> {
        if !a.has_madt {
            return Err("no MADT");
        }
        let lapic = if a.lapic_addr != 0 {
            a.lapic_addr
        } else {
            0xfee0_0000
        };
        if !mapped(lapic, 0x1000) {
            return Err("local APIC not mapped");
        }
        let mut irq = Irq {
            lapic,
            apic_id: (lapic_rd(lapic, LAPIC_ID) >> 24) as u8,
            ioapics: [IoApic::default(); MAX_IOAPICS],
            n_ioapics: 0,
            isos: a.isos,
            n_isos: a.n_isos,
            routed: [(NO_GSI, 0); N_SLOTS],
            if_on: false,
        };
        for io in &a.ioapic[..(a.ioapics as usize).min(MAX_IOAPICS)] {
            if !mapped(io.addr, 0x20) {
                return Err("I/O APIC not mapped");
            }
            let ver = arch::gate_ioapic(io.addr, 1, None);
            irq.ioapics[irq.n_ioapics] = IoApic {
                addr: io.addr,
                gsi_base: io.gsi_base,
                entries: ((ver >> 16) & 0xff) + 1,
            };
            irq.n_ioapics += 1;
        }
        // The legacy PIC: everything masked (harmless where there is none).
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
        IRQ_EOI.store(lapic + LAPIC_EOI, Ordering::SeqCst);
        lapic_wr(lapic, LAPIC_LVT_LINT0, LVT_MASKED);
        lapic_wr(lapic, LAPIC_LVT_TIMER, LVT_MASKED | u32::from(vector(SLOT_TIMER)));
        lapic_wr(lapic, LAPIC_LVT_ERROR, u32::from(vector(SLOT_ERROR)));
        lapic_wr(lapic, LAPIC_TPR, 0);
        lapic_wr(lapic, LAPIC_SVR, 0x100 | u32::from(vector(SLOT_SPURIOUS)));
        Ok(irq)
    }

    /// Whether any I/O APIC is there.
    pub fn has_ioapic(&self) -> bool {
        self.n_ioapics > 0
    }

    /// The GSI and flags of ISA IRQ `irq` (interrupt source overrides honoured; ISA
    /// default: same number, edge, active high).
    pub fn isa_gsi(&self, irq: u8) -> (u32, u8) {
        self.isos[..self.n_isos]
            .iter()
            .find(|o| o.source == irq)
            .map_or((u32::from(irq), 0), |o| (o.gsi, o.flags))
    }

    /// The slot for the GSI of the transport with index `dev` (in MMIO-base order): the
    /// slot the GSI is already routed to (a shared line), else `SLOT_VIRTIO + dev`, so
    /// every device has a vector of its own.
    pub fn virtio_slot(&self, gsi: u32, dev: usize) -> Option<usize> {
        let range = SLOT_VIRTIO..SLOT_VIRTIO + MAX_VIRTIO_SLOTS;
        range
            .clone()
            .find(|&s| self.routed[s].0 == gsi)
            .or_else(|| (dev < MAX_VIRTIO_SLOTS).then_some(SLOT_VIRTIO + dev))
    }

    /// The slot `gsi` is routed to.
    pub fn slot_of(&self, gsi: u32) -> Option<usize> {
        (0..N_SLOTS).find(|&s| self.routed[s].0 == gsi)
    }

    fn ioapic_for(&self, gsi: u32) -> Option<(u64, u32)> {
        self.ioapics[..self.n_ioapics]
            .iter()
            .find(|io| gsi >= io.gsi_base && gsi - io.gsi_base < io.entries)
            .map(|io| (io.addr, gsi - io.gsi_base))
    }

    /// Routes `gsi` to `slot`'s vector, fixed delivery to this CPU, with the trigger and
    /// polarity in `flags`, unmasked. `virtio`: the device's base, acknowledged by the
    /// handler (0: not a virtio device).
    pub fn route(
        &mut self,
        slot: usize,
        gsi: u32,
        flags: u8,
        virtio: u64,
    ) -> Result<(), &'static str> {
        let (base, pin) = self.ioapic_for(gsi).ok_or("no I/O APIC serves the GSI")?;
        let mut low = u32::from(vector(slot));
        if flags & IRQ_LEVEL != 0 {
            low |= RTE_LEVEL;
        }
        if flags & IRQ_LOW != 0 {
            low |= RTE_LOW;
        }
        let index = 0x10 + 2 * pin;
        IRQ_DEV[slot].store(virtio, Ordering::SeqCst);
        IRQ_ISR[slot].store(0, Ordering::SeqCst);
        if flags & IRQ_LEVEL != 0 && virtio == 0 {
            IRQ_MASK[2 * slot + 1].store(
                u64::from(index) | (u64::from(low | RTE_MASKED) << 32),
                Ordering::SeqCst,
            );
            IRQ_MASK[2 * slot].store(base, Ordering::SeqCst);
        } else {
            IRQ_MASK[2 * slot].store(0, Ordering::SeqCst);
        }
        arch::gate_ioapic(base, index + 1, Some(u32::from(self.apic_id) << 24));
        arch::gate_ioapic(base, index, Some(low));
        self.routed[slot] = (gsi, flags);
        Ok(())
    }

    /// Masks the entry routed to `slot` and forgets the route.
    pub fn unroute(&mut self, slot: usize) {
        let (gsi, _) = self.routed[slot];
        if gsi == NO_GSI {
            return;
        }
        if let Some((base, pin)) = self.ioapic_for(gsi) {
            arch::gate_ioapic(base, 0x10 + 2 * pin, Some(RTE_MASKED));
        }
        IRQ_MASK[2 * slot].store(0, Ordering::SeqCst);
        IRQ_DEV[slot].store(0, Ordering::SeqCst);
        self.routed[slot] = (NO_GSI, 0);
    }

    /// Ring 3 with interrupts on or off.
    pub fn set_if(&mut self, on: bool) {
        arch::gate_set_if(on);
        self.if_on = on;
    }
}

/// Results of the timer part.
struct TimerResult {
    tsc_deadline: bool,
    early: u64,
    lost: u64,
    late_max_cycles: u64,
    extra: u64,
    rounds: u64,
}

/// One-shot durations, in µs.
const TIMER_US: [u64; 3] = [2000, 5000, 1000];
/// Tolerance for the one-shot timer against the calibration (percent early allowed).
const ONESHOT_TOLERANCE_PCT: u64 = 3;
/// Tolerance for the TSC-deadline timer, ns early allowed: KVM injects it up to its
/// `lapic_timer_advance_ns` ahead of the deadline (adaptive, at most 5000 ns), which a host
/// such as PVM does not always wait out before it enters the guest.
const TSC_DEADLINE_SLACK_NS: u64 = 5000;

/// Results of the COM1 part.
struct Com1Result {
    thre: bool,
    rx: bool,
    gsi: u32,
    flags: u8,
    why: Option<&'static str>,
}

/// Per-device results of the virtio part.
#[derive(Clone, Copy, Default)]
struct VirtioResult {
    id: u32,
    slot: usize,
    gsi: u32,
    flags: u8,
    /// Used-buffer interrupts expected and seen.
    expected: u64,
    seen: u64,
    /// Interrupts beyond the expected ones that InterruptStatus explains as config changes.
    config: u64,
    /// Interrupts beyond the expected ones otherwise.
    extra: u64,
    /// Level-triggered only: interrupts right after a used-buffer interrupt that found
    /// InterruptStatus already 0 (the line delivered again although the handler had
    /// acknowledged the device before its EOI).
    redelivered: u64,
    why: Option<&'static str>,
}

impl Ctx<'_> {
    /// The routing state, set up on first use.
    pub(crate) fn irq_state(&mut self) -> Result<&mut Irq, &'static str> {
        if self.irq.is_none() {
            let a = Acpi::load(self.entry, self.info).map_err(|e| e.what)?;
            self.irq = Some(Irq::init(&a)?);
        }
        Ok(self.irq.as_mut().unwrap())
    }

    /// Trigger and polarity of a virtio transport's GSI: from the DSDT (edge, active high
    /// for command-line transports), unless `probe.irq.trigger=edge|level` overrides it.
    pub(crate) fn virtio_trigger(&self, t: &vio::Transport) -> u8 {
        match self.params.get(b"probe.irq.trigger=") {
            Some(b"edge") => t.irq_flags & !IRQ_LEVEL,
            Some(b"level") => t.irq_flags | IRQ_LEVEL,
            _ => t.irq_flags,
        }
    }

    /// Opens a virtio device for a device check: polled, or with `probe.irq=1` routed to
    /// its own slot with interrupts on (and EVENT_IDX when offered).
    pub(crate) fn open_virtio(
        &mut self,
        t: &vio::Transport,
        slot: usize,
        want: u64,
        nq: usize,
    ) -> Result<Dev, vio::Failure> {
        if !self.irq_mode {
            return Dev::open(t.base, slot, want, nq, IrqMode::default());
        }
        let flags = self.virtio_trigger(t);
        let st = self.irq_state().map_err(|why| (why, t.base))?;
        let islot = st
            .virtio_slot(t.gsi, slot)
            .ok_or(("no free interrupt slot", t.base))?;
        // Routed before the device can interrupt (at DRIVER_OK); reset first so a device
        // left running by an earlier check is quiet.
        vio::reset(t.base);
        st.route(islot, t.gsi, flags, t.base)
            .map_err(|why| (why, t.base))?;
        if !st.if_on {
            st.set_if(true);
        }
        let mode = IrqMode {
            slot: Some(islot),
            event_idx: true,
        };
        Dev::open(t.base, slot, want, nq, mode)
    }

    /// Resets a device opened with `open_virtio` and masks its interrupt.
    pub(crate) fn close_virtio(&mut self, t: &vio::Transport) {
        vio::reset(t.base);
        if let Some(st) = self.irq.as_mut() {
            if let Some(s) = st.slot_of(t.gsi) {
                st.unroute(s);
            }
        }
    }

    /// The ` irqs=N` suffix of a device line in interrupt mode.
    pub(crate) fn irq_suffix(&self, l: &mut Line, dev: &Dev) {
        if dev.irq.is_some() {
            l.s(" irqs=")
                .dec(dev.irqs)
                .s(" event_idx=")
                .s(if dev.event_idx { "yes" } else { "no" });
        }
    }

    /// `irq`: LAPIC timer (one-shot, TSC-deadline), COM1 THRE and RX, one used-buffer
    /// interrupt per virtio device, no spurious or lost interrupts.
    pub(crate) fn irq(&mut self) -> bool {
        if !self.tsc {
            Line::new("irq").s("skip no TSC").end();
            return false;
        }
        let khz = self.tsc_khz_or_guess();
        let found = vio::discover(self.entry, self.info, &self.params).ok();
        if let Err(why) = self.irq_state() {
            Line::new("irq").s("FAIL ").s(why).end();
            return true;
        }
        let counts0: [u64; N_SLOTS] = core::array::from_fn(count);
        let was_on = self.irq.as_ref().is_some_and(|s| s.if_on);
        self.irq.as_mut().unwrap().set_if(true);

        let lapic = self.irq.as_ref().unwrap().lapic;
        let timer = timer_test(lapic, khz);
        let com1 = self.com1_test(khz);
        let mut vr = [VirtioResult::default(); vio::MAX_DEVS];
        let mut nv = 0;
        if let Some(f) = &found {
            for (i, t) in f.devs[..f.n].iter().enumerate() {
                if let Some(r) = self.virtio_irq_test(i, t, khz) {
                    vr[nv] = r;
                    nv += 1;
                }
            }
        }
        // Anything late (an extra timer shot, a second THRE) shows up in the next 20 ms.
        spin_cycles(khz * 20);
        let timer_extra = timer.as_ref().map_or(0, |t| {
            (count(SLOT_TIMER) - counts0[SLOT_TIMER]).saturating_sub(t.rounds - t.lost)
        });
        if !was_on {
            self.irq.as_mut().unwrap().set_if(false);
        }
        self.irq.as_mut().unwrap().unroute(SLOT_COM1);

        // Spurious: the spurious and error vectors, vectors nothing was routed to, and
        // interrupts beyond the expected ones.
        let delta = |s: usize| count(s).wrapping_sub(counts0[s]);
        let mut spurious = delta(SLOT_SPURIOUS) + delta(SLOT_ERROR) + timer_extra;
        for s in 0..N_SLOTS {
            let used = s == SLOT_TIMER
                || s == SLOT_COM1
                || s == SLOT_SPURIOUS
                || s == SLOT_ERROR
                || vr[..nv].iter().any(|r| r.slot == s);
            if !used {
                spurious += delta(s);
            }
        }
        let com1_extra = delta(SLOT_COM1).saturating_sub(u64::from(com1.thre) + u64::from(com1.rx));
        spurious += com1_extra;
        for r in &vr[..nv] {
            spurious += r.extra;
        }

        let mut why: Option<&str> = None;
        match &timer {
            Err(w) => why = Some(w),
            Ok(t) if t.lost > 0 => why = Some("timer interrupt lost"),
            Ok(t) if t.early > 0 => why = Some("timer interrupt before the deadline"),
            _ => {}
        }
        if why.is_none() {
            why = com1.why;
        }
        if why.is_none() {
            why = vr[..nv].iter().find_map(|r| r.why);
        }
        if why.is_none() && spurious > 0 {
            why = Some("spurious interrupts");
        }

        let mut l = Line::new("irq");
        match why {
            None => l.s("ok"),
            Some(w) => l.s("FAIL ").s(w),
        };
        l.s(" timer=");
        match &timer {
            Ok(t) => {
                l.s("oneshot");
                if t.tsc_deadline {
                    l.s(",tscdeadline");
                }
                l.s(" timer_early=")
                    .dec(t.early)
                    .s(" timer_lost=")
                    .dec(t.lost)
                    .s(" timer_late_us=")
                    .dec(t.late_max_cycles * 1000 / khz)
                    .s(" timer_extra=")
                    .dec(t.extra);
            }
            Err(_) => {
                l.s("none");
            }
        }
        l.s(" com1=");
        match (com1.thre, com1.rx) {
            (true, true) => l.s("thre,rx"),
            (true, false) => l.s("thre"),
            (false, true) => l.s("rx"),
            (false, false) => l.s("none"),
        };
        let ok_virtio = vr[..nv]
            .iter()
            .filter(|r| r.why.is_none() && r.seen == r.expected)
            .count();
        l.s(" virtio=").dec(ok_virtio as u64).s(" virtio_ids=");
        list(&mut l, nv, |l, i| {
            l.dec(u64::from(vr[i].id));
        });
        l.s(" spurious=").dec(spurious).s(" vectors=");
        let mut first = true;
        for s in 0..N_SLOTS {
            let d = delta(s);
            if d == 0 {
                continue;
            }
            if !first {
                l.s(",");
            }
            first = false;
            l.hex(u64::from(vector(s))).s(":").dec(d);
        }
        if first {
            l.s("none");
        }
        l.s(" gsis=")
            .dec(u64::from(com1.gsi))
            .s(":")
            .s(trigger(com1.flags));
        for r in &vr[..nv] {
            l.s(",").dec(u64::from(r.gsi)).s(":").s(trigger(r.flags));
        }
        l.s(" virtio_irqs=");
        list(&mut l, nv, |l, i| {
            let r = &vr[i];
            l.dec(u64::from(r.id))
                .s(":")
                .dec(r.seen)
                .s("/")
                .dec(r.expected)
                .s("/")
                .dec(r.extra);
        });
        let redelivered: u64 = vr[..nv].iter().map(|r| r.redelivered).sum();
        if redelivered > 0 {
            l.s(" level_redelivered=").dec(redelivered);
        }
        let config: u64 = vr[..nv].iter().map(|r| r.config).sum();
        if config > 0 {
            l.s(" config_irqs=").dec(config);
        }
        l.s(" lapic=").hex(lapic);
        if self.tsc_khz.is_none() {
            l.s(" tsc_khz=unknown");
        }
        l.end();
        why.is_some()
    }

    /// COM1: THRE interrupt (IER bit 1) and RX interrupt (IER bit 0) through loopback.
    fn com1_test(&mut self, khz: u64) -> Com1Result {
        const IER: u16 = 0x3f9;
        const IIR: u16 = 0x3fa;
        let st = self.irq.as_mut().unwrap();
        let (gsi, flags) = st.isa_gsi(4);
        let mut r = Com1Result {
            thre: false,
            rx: false,
            gsi,
            flags,
            why: None,
        };
        if !st.has_ioapic() {
            r.why = Some("no I/O APIC");
            return r;
        }
        let mcr0 = inb(MCR);
        outb(IER, 0);
        drain_rx();
        let _ = inb(IIR);
        if let Err(w) = st.route(SLOT_COM1, gsi, flags, 0) {
            r.why = Some(w);
            return r;
        }
        // OUT2 gates the UART's interrupt line on PCs.
        outb(MCR, mcr0 | 0x08);
        let wait = khz * 100;

        // THRE: enabling the interrupt with THR empty raises it; reading IIR clears it.
        let c0 = count(SLOT_COM1);
        outb(IER, 0x02);
        let got = wait_change(SLOT_COM1, c0, wait);
        let iir = inb(IIR);
        outb(IER, 0);
        r.thre = got && iir & 0x0f == 0x02;
        if !got {
            r.why = Some("no COM1 THRE interrupt within 100 ms");
        } else if !r.thre {
            r.why = Some("COM1 THRE interrupt but IIR does not show THRE");
        }

        // RX: loopback (MCR bit 4) routes THR to RBR.
        outb(MCR, mcr0 | 0x18);
        drain_rx();
        let c1 = count(SLOT_COM1);
        outb(IER, 0x01);
        outb(RBR_THR, 0xa5);
        let got = wait_change(SLOT_COM1, c1, wait);
        let iir = inb(IIR);
        let byte = if inb(LSR) & LSR_DR != 0 {
            Some(inb(RBR_THR))
        } else {
            None
        };
        outb(IER, 0);
        drain_rx();
        outb(MCR, mcr0);
        r.rx = got && iir & 0x0f == 0x04 && byte == Some(0xa5);
        if r.why.is_none() {
            if !got {
                r.why = Some("no COM1 RX interrupt within 100 ms (loopback)");
            } else if !r.rx {
                r.why = Some("COM1 RX interrupt but IIR/RBR do not show the byte");
            }
        }
        r
    }

    /// One device: route its GSI, open it with interrupts, issue the cheapest request(s)
    /// that produce a used buffer, and count the interrupts. `None`: device type not
    /// covered (or an empty transport).
    fn virtio_irq_test(&mut self, slot: usize, t: &vio::Transport, khz: u64) -> Option<VirtioResult> {
        let (_, id, _) = Dev::identify(t.base).ok()?;
        let steps = match id {
            1 | 2 | 4 | 19 => 1,
            5 => 2,
            _ => return None,
        };
        let flags = self.virtio_trigger(t);
        let st = self.irq.as_mut().unwrap();
        let mut r = VirtioResult {
            id,
            gsi: t.gsi,
            flags,
            ..VirtioResult::default()
        };
        let Some(islot) = st.virtio_slot(t.gsi, slot) else {
            r.why = Some("more virtio GSIs than interrupt slots");
            return Some(r);
        };
        r.slot = islot;
        if !st.has_ioapic() {
            r.why = Some("no I/O APIC");
            return Some(r);
        }
        vio::reset(t.base);
        if let Err(w) = st.route(islot, t.gsi, r.flags, t.base) {
            r.why = Some(w);
            return Some(r);
        }
        let nq = match id {
            1 => 2,
            19 => 3,
            5 => 2,
            _ => 1,
        };
        let want = match id {
            1 => crate::net::F_MAC,
            _ => 0,
        };
        let mode = IrqMode {
            slot: Some(islot),
            event_idx: false,
        };
        let c_start = count(islot);
        let mut dev = match Dev::open(t.base, slot, want, nq, mode) {
            Ok(d) => d,
            Err((w, _)) => {
                r.why = Some(w);
                self.irq.as_mut().unwrap().unroute(islot);
                vio::reset(t.base);
                return Some(r);
            }
        };
        // Interrupts before any request (a config change at DRIVER_OK) are not used-buffer
        // interrupts; note and acknowledge them.
        spin_cycles(khz);
        let early = count(islot) - c_start;
        if early > 0 {
            let isr = dev.ack_isr();
            rearm(islot);
            if isr & 2 != 0 && isr & 1 == 0 {
                r.config += early;
            } else {
                r.extra += early;
            }
        }
        for step in 0..steps {
            let c0 = count(islot);
            let q = virtio_request(id, &mut dev, step);
            r.expected += 1;
            if !wait_change(islot, c0, khz * 1000) {
                r.why = Some("no used-buffer interrupt within 1 s");
                break;
            }
            let isr = dev.ack_isr();
            rearm(islot);
            if isr & 1 == 0 {
                r.why = Some("interrupt without the used-buffer bit in InterruptStatus");
                break;
            }
            if dev.q[q].take().is_none() {
                r.why = Some("interrupt but no used entry");
                break;
            }
            r.seen += 1;
            // A second interrupt for the same buffer would arrive now.
            spin_cycles(khz * 2);
            let more = count(islot) - c0 - 1;
            if more > 0 {
                let isr = dev.ack_isr();
                rearm(islot);
                if isr & 2 != 0 && isr & 1 == 0 {
                    r.config += more;
                } else if isr == 0 && flags & IRQ_LEVEL != 0 {
                    r.redelivered += more;
                } else {
                    r.extra += more;
                }
            }
        }
        self.irq.as_mut().unwrap().unroute(islot);
        vio::reset(t.base);
        Some(r)
    }
}

/// Issues request `step` for device type `id`; returns the queue it was put on.
fn virtio_request(id: u32, dev: &mut Dev, step: usize) -> usize {
    let d = vio::dma();
    vio::zero(d, 4096);
    let q = match (id, step) {
        // virtio-blk: read sector 0 (header, 512 bytes, status).
        (2, _) => {
            // SAFETY: the header lives in the probe's DMA area; no request is in flight.
            unsafe {
                core::ptr::write_volatile(d as *mut u32, 0);
                core::ptr::write_volatile((d + 8) as *mut u64, 0);
            }
            let q = &mut dev.q[0];
            q.set_desc(0, d, 16, D_NEXT, 1);
            q.set_desc(1, d + 512, 512, D_NEXT | D_WRITE, 2);
            q.set_desc(2, d + 64, 1, D_WRITE, 0);
            q.publish(0);
            0
        }
        // virtio-net: one frame on the transmit queue.
        (1, _) => {
            let len = crate::net::irq_test_frame(dev, d);
            let q = &mut dev.q[1];
            q.set_desc(0, d, len, 0, 0);
            q.publish(0);
            1
        }
        // virtio-rng: 64 bytes.
        (4, _) => {
            let q = &mut dev.q[0];
            q.set_desc(0, d, 64, D_WRITE, 0);
            q.publish(0);
            0
        }
        // virtio-vsock: a RST to the host for no connection (the device just consumes it).
        (19, _) => {
            let len = crate::vsock::irq_test_packet(dev, d);
            let q = &mut dev.q[1];
            q.set_desc(0, d, len, 0, 0);
            q.publish(0);
            1
        }
        // virtio-balloon: inflate one scratch page, then deflate it.
        (_, step) => {
            let page = d + 0x8_0000;
            // SAFETY: the PFN list lives in the probe's DMA area.
            unsafe { core::ptr::write_volatile(d as *mut u32, (page >> 12) as u32) };
            let q = &mut dev.q[step];
            q.set_desc(0, d, 4, 0, 0);
            q.publish(0);
            step
        }
    };
    dev.notify_q(q as u16);
    q
}

/// The LAPIC timer: calibrate against the TSC, then one-shot rounds and, where CPUID
/// says so, TSC-deadline rounds.
fn timer_test(lapic: u64, khz: u64) -> Result<TimerResult, &'static str> {
    let (_, _, ecx1, _) = arch::cpuid(1, 0);
    let tsc_deadline = ecx1 & (1 << 24) != 0;
    let vec = u32::from(vector(SLOT_TIMER));
    // Calibration: 20 ms of the current count against the TSC, sampled at the midpoint of
    // each (trapping) register read.
    lapic_wr(lapic, LAPIC_LVT_TIMER, LVT_MASKED | vec);
    lapic_wr(lapic, LAPIC_TDCR, 0xb); // divide by 1
    lapic_wr(lapic, LAPIC_TMICT, u32::MAX);
    let sample = || {
        let a = rdtsc();
        let c = lapic_rd(lapic, LAPIC_TMCCT);
        let b = rdtsc();
        (c, a + (b - a) / 2)
    };
    let (c0, t0) = sample();
    spin_cycles(khz * 20);
    let (c1, t1) = sample();
    lapic_wr(lapic, LAPIC_TMICT, 0);
    let ticks = u64::from(c0.wrapping_sub(c1));
    let cycles = t1.wrapping_sub(t0).max(1);
    if ticks == 0 || c1 > c0 {
        return Err("LAPIC timer current count does not count down");
    }
    let mut r = TimerResult {
        tsc_deadline,
        early: 0,
        lost: 0,
        late_max_cycles: 0,
        extra: 0,
        rounds: 0,
    };
    for us in TIMER_US {
        let dur = khz * us / 1000;
        let n = (u128::from(dur) * u128::from(ticks) / u128::from(cycles)).clamp(1, 0xffff_ffff);
        let c = count(SLOT_TIMER);
        lapic_wr(lapic, LAPIC_LVT_TIMER, vec);
        let t_prog = rdtsc();
        lapic_wr(lapic, LAPIC_TMICT, n as u32);
        r.rounds += 1;
        one_round(&mut r, c, t_prog + dur, dur * ONESHOT_TOLERANCE_PCT / 100, khz);
    }
    lapic_wr(lapic, LAPIC_LVT_TIMER, LVT_MASKED | vec);
    lapic_wr(lapic, LAPIC_TMICT, 0);
    if tsc_deadline {
        for us in TIMER_US {
            let dur = khz * us / 1000;
            let c = count(SLOT_TIMER);
            lapic_wr(lapic, LAPIC_LVT_TIMER, LVT_TSC_DEADLINE | vec);
            let deadline = rdtsc() + dur;
            arch::gate_wrmsr(MSR_TSC_DEADLINE, deadline);
            r.rounds += 1;
            one_round(&mut r, c, deadline, khz * TSC_DEADLINE_SLACK_NS / 1_000_000, khz);
        }
        arch::gate_wrmsr(MSR_TSC_DEADLINE, 0);
        lapic_wr(lapic, LAPIC_LVT_TIMER, LVT_MASKED | vec);
    }
    // One-shot means one shot: nothing more in twice the longest duration.
    let c_end = count(SLOT_TIMER);
    spin_cycles(khz * 10);
    r.extra = count(SLOT_TIMER) - c_end;
    Ok(r)
}

/// Waits for one timer interrupt (deadline + 1 s) and scores it against `deadline`
/// (`slack` cycles early are tolerated).
fn one_round(r: &mut TimerResult, c: u64, deadline: u64, slack: u64, khz: u64) {
    let budget = deadline.saturating_sub(rdtsc()) + khz * 1000;
    if !wait_change(SLOT_TIMER, c, budget) {
        r.lost += 1;
        return;
    }
    let at = last_tsc(SLOT_TIMER);
    if at.wrapping_add(slack) < deadline {
        r.early += 1;
    } else {
        r.late_max_cycles = r.late_max_cycles.max(at.saturating_sub(deadline));
    }
}

/// Busy-waits `cycles` TSC cycles.
pub fn spin_cycles(cycles: u64) {
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < cycles {
        core::hint::spin_loop();
    }
}

/// Reads whatever the UART has received (bounded).
fn drain_rx() {
    for _ in 0..64 {
        if inb(LSR) & LSR_DR == 0 {
            break;
        }
        let _ = inb(RBR_THR);
    }
}

fn trigger(flags: u8) -> &'static str {
    match (flags & IRQ_LEVEL != 0, flags & IRQ_LOW != 0) {
        (false, false) => "edge",
        (false, true) => "edge-low",
        (true, false) => "level",
        (true, true) => "level-low",
    }
}

/// Writes `n` comma-separated items (`none` when empty).
fn list(l: &mut Line, n: usize, mut item: impl FnMut(&mut Line, usize)) {
    if n == 0 {
        l.s("none");
    }
    for i in 0..n {
        if i > 0 {
            l.s(",");
        }
        item(l, i);
    }
}
