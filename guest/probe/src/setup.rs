//! Ring-0 setup shared by both entries: page tables, GDT/TSS, IDT, then `iretq` to ring 3.
//!
//! This code is emulated on a PVM host (about 1.6 M instructions per second), so it does as
//! little as possible: one pass over the memory map to find the end of RAM, one store per
//! 2 MiB page, a handful of descriptor writes.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{self, MAX_GIB};
use crate::bootinfo;
use crate::console::Line;

/// How the probe was entered (`arch::ENTRY_PVH` or `arch::ENTRY_LINUX64`).
pub static ENTRY: AtomicU64 = AtomicU64::new(0);
/// Physical address of `hvm_start_info` (PVH) or of the zero page (Linux64).
pub static BOOT_INFO: AtomicU64 = AtomicU64::new(0);
/// End (exclusive) of the identity map built by the probe.
pub static MAPPED_END: AtomicU64 = AtomicU64::new(0);

const GIB: u64 = 1 << 30;
/// Page-table flags: present, writable, user.
const PT_FLAGS: u64 = 0x7;
/// 2 MiB page: present, writable, user, PS.
const PDE_FLAGS: u64 = 0x87;

static mut IDT: [u64; 2 * (arch::GATE_VECTOR + 1)] = [0; 2 * (arch::GATE_VECTOR + 1)];
/// IDT limit (as loaded by `lidt`).
pub const IDT_LIMIT: u16 = ((arch::GATE_VECTOR + 1) * 16 - 1) as u16;

/// Address of the IDT (application processors load the same one).
pub fn idt_base() -> u64 {
    (&raw const IDT) as u64
}

/// The low and high quadwords of a 64-bit available-TSS descriptor.
pub fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (low, base >> 32)
}

/// Size of the 64-bit TSS proper.
const TSS_SIZE: usize = 104;
/// I/O permission bitmap: one bit per port, all clear (= allowed), plus the 0xff terminator.
const IO_BITMAP_SIZE: usize = 65536 / 8;
/// TSS limit: the last byte is the bitmap's terminator.
const TSS_LIMIT: u64 = (TSS_SIZE + IO_BITMAP_SIZE) as u64;
/// 64-bit TSS plus a full I/O permission bitmap, as dwords (RSP0 at byte 4, I/O map base
/// at byte 102). The bitmap is what lets ring 3 use `in`/`out` on PVM: PVM runs guest ring 3
/// with hardware IOPL 0 and emulates a faulting I/O instruction only if the guest TSS
/// bitmap allows the port (RFLAGS.IOPL=3 is also set, which suffices on VMX/SVM hosts).
static mut TSS: [u32; (TSS_SIZE + IO_BITMAP_SIZE + 4) / 4] =
    [0; (TSS_SIZE + IO_BITMAP_SIZE + 4) / 4];

#[repr(C, packed)]
struct DescriptorTablePointer {
    limit: u16,
    base: u64,
}

/// Common 64-bit setup; called from both entries with the entry kind and boot-info pointer.
pub extern "C" fn probe_setup(entry: u64, info: u64) -> ! {
    ENTRY.store(entry, Ordering::Relaxed);
    BOOT_INFO.store(info, Ordering::Relaxed);

    // Map max(4 GiB, end of RAM), rounded up to whole GiB.
    let ram_end = bootinfo::ram_end_hint(entry, info);
    let mut gib = ram_end.div_ceil(GIB).max(4) as usize;
    if gib > MAX_GIB {
        gib = MAX_GIB;
    }
    // The PVH entry already mapped the first 4 GiB; the Linux entry runs on the VMM's map.
    let first = if entry == arch::ENTRY_PVH { 4 } else { 0 };
    // SAFETY: the page tables are the probe's own statics; nothing uses the new entries
    // until CR3 is reloaded below, and the entries for the code already running are
    // identical identity mappings.
    unsafe {
        let pml4 = (&raw mut arch::probe_pml4).cast::<u64>();
        let pdpt = (&raw mut arch::probe_pdpt).cast::<u64>();
        let pds = (&raw mut arch::probe_pds).cast::<u64>();
        for g in first..gib {
            let pd = pds.add(g * 512);
            let mut phys = ((g as u64) * GIB) | PDE_FLAGS;
            for i in 0..512 {
                pd.add(i).write_volatile(phys);
                phys += 2 << 20;
            }
            pdpt.add(g).write_volatile(pd as u64 | PT_FLAGS);
        }
        pml4.write_volatile(pdpt as u64 | PT_FLAGS);
        asm!("mov cr3, {0}", in(reg) pml4 as u64, options(nostack, preserves_flags));
    }
    MAPPED_END.store(gib as u64 * GIB, Ordering::Relaxed);

    // SAFETY: descriptor tables are the probe's statics, set up once before use.
    unsafe {
        load_gdt_and_tss();
        load_idt();
    }
    // SAFETY: drops to ring 3 for good; the user stack and code are mapped with U=1.
    unsafe { enter_ring3() }
}

const TSS_SEL_INDEX: usize = arch::TSS_SEL as usize / 8;

/// Writes the TSS descriptor, loads the GDT, reloads the segment registers and TR.
unsafe fn load_gdt_and_tss() {
    let tss = (&raw mut TSS).cast::<u32>();
    let rsp0 = &raw const arch::probe_kstack_top as u64;
    tss.add(1).write_volatile(rsp0 as u32);
    tss.add(2).write_volatile((rsp0 >> 32) as u32);
    // I/O map base right after the TSS; the bitmap is all zeros (file-backed .bss) except
    // for the terminator byte.
    tss.add(25).write_volatile((TSS_SIZE as u32) << 16);
    tss.add((TSS_SIZE + IO_BITMAP_SIZE) / 4)
        .write_volatile(0xff);

    let (low, high) = tss_descriptor(tss as u64, TSS_LIMIT);
    let gdt = (&raw mut arch::probe_gdt).cast::<u64>();

    gdt.add(TSS_SEL_INDEX).write_volatile(low);
    gdt.add(TSS_SEL_INDEX + 1).write_volatile(high);

    let ptr = DescriptorTablePointer {
        limit: (arch::GDT_ENTRIES * 8 - 1) as u16,
        base: gdt as u64,
    };
    asm!(
        "lgdt [{ptr}]",
        "push {cs}",
        "lea {tmp}, [rip + 2f]",
        "push {tmp}",
        "retfq",
        "2:",
        "mov {tmp:e}, {ds}",
        "mov ds, {tmp:e}",
        "mov es, {tmp:e}",
        "mov ss, {tmp:e}",
        "xor {tmp:e}, {tmp:e}",
        "mov fs, {tmp:e}",
        "mov gs, {tmp:e}",
        "mov {tmp:e}, {tr}",
        "ltr {tmp:x}",
        ptr = in(reg) &raw const ptr,
        cs = const arch::KERNEL_CS as u64,
        ds = const arch::KERNEL_DS as u32,
        tr = const arch::TSS_SEL as u32,
        tmp = out(reg) _,
    );
}

/// Fills gates for exceptions 0..31, the interrupt vectors of `irq` and the DPL-3 service
/// gate, then loads the IDT.
unsafe fn load_idt() {
    let idt = (&raw mut IDT).cast::<u64>();
    let stubs = (&raw const arch::probe_exc_stubs).cast::<u8>() as u64;
    for v in 0..32u64 {
        set_gate(idt, v as usize, stubs + v * 16, 0x8e);
    }
    // #UD also carries the gate on PVM (see `arch`).
    set_gate(idt, 6, arch::probe_ud_entry as *const () as u64, 0x8e);
    // The `irq` module's handlers.
    let irq_stubs = (&raw const crate::irq::probe_irq_stubs).cast::<u8>() as u64;
    for i in 0..crate::irq::N_SLOTS {
        let v = usize::from(crate::irq::VECTOR_BASE) + i;
        set_gate(idt, v, irq_stubs + 16 * i as u64, 0x8e);
    }
    set_gate(
        idt,
        arch::GATE_VECTOR,
        arch::probe_gate as *const () as u64,
        0xee,
    );
    let ptr = DescriptorTablePointer {
        limit: IDT_LIMIT,
        base: idt as u64,
    };
    asm!("lidt [{0}]", in(reg) &raw const ptr, options(nostack, preserves_flags));
}

/// Writes one 16-byte interrupt gate (`kind`: 0x8e = DPL 0, 0xee = DPL 3).
unsafe fn set_gate(idt: *mut u64, vector: usize, handler: u64, kind: u64) {
    let low = (handler & 0xffff)
        | ((arch::KERNEL_CS as u64) << 16)
        | (kind << 40)
        | (((handler >> 16) & 0xffff) << 48);
    idt.add(vector * 2).write_volatile(low);
    idt.add(vector * 2 + 1).write_volatile(handler >> 32);
}

/// `iretq` to `crate::user_main` in ring 3 with IOPL 3 and IF clear.
unsafe fn enter_ring3() -> ! {
    let user_stack = (&raw const arch::probe_ustack_top as u64) - 8;
    asm!(
        "push {ss}",
        "push {rsp}",
        "push {rflags}",
        "push {cs}",
        "push {rip}",
        "iretq",
        ss = const arch::USER_DS as u64,
        rsp = in(reg) user_stack,
        rflags = const 0x3002u64,
        cs = const arch::USER_CS as u64,
        rip = in(reg) crate::user_main as *const () as u64,
        options(noreturn),
    )
}

/// Exception handler (ring 0): report, pvpanic, reset.
pub extern "C" fn probe_exception(frame: *const u64) -> ! {
    // SAFETY: `frame` points at the stub's pushes plus the CPU's interrupt frame.
    let (vector, error, rip, cs, rflags) = unsafe {
        (
            *frame,
            *frame.add(1),
            *frame.add(2),
            *frame.add(3),
            *frame.add(4),
        )
    };
    let mut line = Line::new("panic");
    line.s("exception ")
        .dec(vector)
        .s(" rip=")
        .hex(rip)
        .s(" err=")
        .hex(error)
        .s(" cs=")
        .hex(cs)
        .s(" rflags=")
        .hex(rflags);
    if vector == 14 {
        let cr2: u64;
        // SAFETY: reads CR2 (ring 0).
        unsafe { asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        line.s(" cr2=").hex(cr2);
    }
    line.end();
    arch::ring0_panic_reset(true)
}
