//! Application-processor start-up for the `smp` check.
//!
//! The BSP (in ring 3) prepares, for every AP in the MADT, a per-CPU block: a copy of the
//! GDT with its own TSS (RSP0 = the block's kernel stack, no I/O bitmap), the IDT pointer
//! and both stack tops. It copies a 16-bit trampoline to a free low-memory page and sends
//! INIT / SIPI / SIPI through the local APIC's ICR (xAPIC MMIO, written from ring 3).
//!
//! An AP then runs, all of it in the emulator on a PVM host: real mode (load the GDT, set
//! CR0.PE, far jump), 32-bit protected mode inside the probe image (PAE, the probe's CR3,
//! EFER.LME, paging, far jump), and 64-bit mode: `cpuid` for its APIC id, the per-CPU block
//! from `probe_ap_slot[apic_id]`, `lgdt`/`ltr`/`lidt`, its kernel stack, and `iretq` to
//! `ap_main` in ring 3. There it marks its progress in the block, runs a `dec; jnz` loop
//! and parks through the gate (`cli; hlt` in ring 0).

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::arch::{self, rdtsc};

/// Per-CPU blocks (APs only).
pub const MAX_AP_SLOTS: usize = 64;
/// Size of one per-CPU block.
pub const BLOCK_SIZE: u64 = 0x4000;
/// `probe_ap_slot` value for "not an AP the probe started".
pub const NO_SLOT: u8 = 0xff;

// Per-CPU block layout.
/// GDT pseudo-descriptor (limit u16, base u64).
pub const OFF_GDTR: u64 = 0x00;
/// IDT pseudo-descriptor.
pub const OFF_IDTR: u64 = 0x10;
/// Kernel stack top (RSP after the switch to the block).
pub const OFF_KSTACK: u64 = 0x20;
/// User stack top (minus 8, as after a call).
pub const OFF_USTACK: u64 = 0x28;
/// Ring-3 entry point.
pub const OFF_ENTRY: u64 = 0x30;
/// Progress: 0 nothing, 1 long mode, 2 ring 3, 3 loop done in ring 3, 4 wrong CPL.
pub const OFF_STATE: u64 = 0x38;
/// APIC id as read by `cpuid` in ring 0.
pub const OFF_APIC_ID: u64 = 0x3c;
/// The GDT copy.
pub const OFF_GDT: u64 = 0x40;
/// The TSS.
pub const OFF_TSS: u64 = 0x100;
/// Kernel stack top within the block.
pub const KSTACK_TOP: u64 = 0x2000;
/// User stack top within the block.
pub const USTACK_TOP: u64 = 0x4000;
/// Iterations of the ring-3 loop on each AP.
pub const AP_LOOP: u64 = 10_000;

extern "C" {
    static probe_tramp_start: u8;
    static probe_tramp_end: u8;
    static mut probe_ap_slot: [u8; 256];
    static mut probe_percpu: [u8; MAX_AP_SLOTS * BLOCK_SIZE as usize];
}

global_asm!(
    ".section .text.probe_ap, \"ax\"",
    // ------------------------------------------------ 16-bit trampoline (copied below 1 MiB)
    ".code16",
    ".global probe_tramp_start",
    "probe_tramp_start:",
    "    cli",
    "    mov ax, cs",
    "    mov ds, ax",
    // o32 lgdt [probe_tramp_gdtr - probe_tramp_start] (32-bit base, DS = CS)
    "    .byte 0x66, 0x0f, 0x01, 0x16",
    "    .word probe_tramp_gdtr - probe_tramp_start",
    "    mov eax, cr0",
    "    or al, 1",
    "    mov cr0, eax",
    "    .byte 0x66, 0xea",                    // ljmpl 0x18:probe_ap32
    "    .long probe_ap32",
    "    .word {cs32}",
    "    .p2align 2",
    "probe_tramp_gdtr:",
    "    .word {gdt_limit}",
    "    .long probe_gdt",
    ".global probe_tramp_end",
    "probe_tramp_end:",
    // ------------------------------------------------ 32-bit, in the image
    ".code32",
    "probe_ap32:",
    "    mov ax, {ds}",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    mov eax, cr4",
    "    or eax, 0x20",
    "    mov cr4, eax",
    "    mov eax, offset probe_pml4",
    "    mov cr3, eax",
    "    mov ecx, 0xc0000080",
    "    rdmsr",
    "    or eax, 0x100",
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, 0x80000001",
    "    mov cr0, eax",
    "    .byte 0xea",                          // ljmp 0x08:probe_ap64
    "    .long probe_ap64",
    "    .word {cs64}",
    // ------------------------------------------------ 64-bit, ring 0
    ".code64",
    "probe_ap64:",
    "    mov eax, 1",
    "    cpuid",
    "    shr ebx, 24",                         // APIC id
    "    lea rsi, [rip + probe_ap_slot]",
    "    movzx eax, byte ptr [rsi + rbx]",
    "    cmp eax, {no_slot}",
    "    je .Lap_park",
    "    shl rax, {block_shift}",
    "    lea rsi, [rip + probe_percpu]",
    "    add rsi, rax",                        // the block
    "    mov dword ptr [rsi + {off_state}], 1",
    "    mov dword ptr [rsi + {off_apic}], ebx",
    "    lgdt [rsi + {off_gdtr}]",
    "    lidt [rsi + {off_idtr}]",
    "    mov ax, {tss}",
    "    ltr ax",
    "    mov rsp, qword ptr [rsi + {off_kstack}]",
    "    push {user_ds}",
    "    push qword ptr [rsi + {off_ustack}]",
    "    push 0x3002",                         // IOPL 3, IF 0
    "    push {user_cs}",
    "    push qword ptr [rsi + {off_entry}]",
    "    mov edi, ebx",
    "    iretq",                               // ap_main(apic_id, block)
    ".Lap_park:",
    "    cli",
    "    hlt",
    "    jmp .Lap_park",
    // ------------------------------------------------ data
    ".section .noinit.probe_percpu, \"aw\", @nobits",
    ".p2align 12",
    ".global probe_percpu",
    "probe_percpu:",
    "    .skip {percpu_size}",
    ".global probe_ap_slot",
    "probe_ap_slot:",
    "    .skip 256",
    ".text",
    cs32 = const arch::KERNEL_CS32,
    cs64 = const arch::KERNEL_CS,
    ds = const arch::KERNEL_DS,
    tss = const arch::TSS_SEL,
    user_ds = const arch::USER_DS,
    user_cs = const arch::USER_CS,
    gdt_limit = const arch::GDT_ENTRIES * 8 - 1,
    no_slot = const NO_SLOT,
    block_shift = const 14,
    off_state = const OFF_STATE,
    off_apic = const OFF_APIC_ID,
    off_gdtr = const OFF_GDTR,
    off_idtr = const OFF_IDTR,
    off_kstack = const OFF_KSTACK,
    off_ustack = const OFF_USTACK,
    off_entry = const OFF_ENTRY,
    percpu_size = const MAX_AP_SLOTS * BLOCK_SIZE as usize,
);

const _: () = assert!(BLOCK_SIZE == 1 << 14);

/// Ring-3 entry of an AP (`iretq` from `probe_ap64`).
extern "C" fn ap_main(_apic_id: u64, block: u64) -> ! {
    let state = state_of(block);
    state.store(2, Ordering::SeqCst);
    arch::local_loop(AP_LOOP);
    let done = if arch::cpl() == 3 { 3 } else { 4 };
    state.store(done, Ordering::SeqCst);
    arch::gate_park()
}

fn state_of(block: u64) -> &'static AtomicU32 {
    // SAFETY: the state word is a 4-byte-aligned u32 inside a per-CPU block, which lives for
    // the whole run; it is only accessed atomically.
    unsafe { &*((block + OFF_STATE) as *const AtomicU32) }
}

/// Address of per-CPU block `slot`.
pub fn block(slot: usize) -> u64 {
    (&raw const probe_percpu) as u64 + slot as u64 * BLOCK_SIZE
}

/// Progress word of block `slot`.
pub fn state(slot: usize) -> u32 {
    state_of(block(slot)).load(Ordering::SeqCst)
}

/// APIC id the AP in block `slot` reported (valid once `state >= 1`).
pub fn reported_apic_id(slot: usize) -> u32 {
    // SAFETY: inside the block; written once by the AP before its state becomes 1.
    unsafe { core::ptr::read_volatile((block(slot) + OFF_APIC_ID) as *const u32) }
}

/// Clears the slot table (every APIC id: no slot).
pub fn clear_slots() {
    // SAFETY: plain stores to the probe's own table; no AP is running the start-up code.
    unsafe {
        let t = (&raw mut probe_ap_slot).cast::<u8>();
        for i in 0..256 {
            t.add(i).write_volatile(NO_SLOT);
        }
    }
}

/// Prepares block `slot` for the AP with APIC id `apic_id`.
pub fn prepare(slot: usize, apic_id: u8) {
    let b = block(slot);
    // SAFETY: the block is the probe's own memory (identity mapped, U=1), not yet used by
    // any AP; the GDT source is the probe's GDT.
    unsafe {
        let gdt = (b + OFF_GDT) as *mut u64;
        let src = (&raw const arch::probe_gdt).cast::<u64>();
        for i in 0..arch::GDT_ENTRIES {
            gdt.add(i).write_volatile(src.add(i).read_volatile());
        }
        // TSS: RSP0 at byte 4, I/O map base 104 (= no bitmap: the limit is 103).
        let tss = (b + OFF_TSS) as *mut u8;
        for i in 0..104 {
            tss.add(i).write_volatile(0);
        }
        core::ptr::write_unaligned(tss.add(4).cast::<u64>(), b + KSTACK_TOP);
        core::ptr::write_unaligned(tss.add(102).cast::<u16>(), 104);
        let (low, high) = crate::setup::tss_descriptor(b + OFF_TSS, 103);
        let t = usize::from(arch::TSS_SEL / 8);
        gdt.add(t).write_volatile(low);
        gdt.add(t + 1).write_volatile(high);

        let w16 = |off: u64, v: u16| core::ptr::write_unaligned((b + off) as *mut u16, v);
        let w64 = |off: u64, v: u64| core::ptr::write_unaligned((b + off) as *mut u64, v);
        w16(OFF_GDTR, (arch::GDT_ENTRIES * 8 - 1) as u16);
        w64(OFF_GDTR + 2, b + OFF_GDT);
        w16(OFF_IDTR, crate::setup::IDT_LIMIT);
        w64(OFF_IDTR + 2, crate::setup::idt_base());
        w64(OFF_KSTACK, b + KSTACK_TOP);
        w64(OFF_USTACK, b + USTACK_TOP - 8);
        w64(OFF_ENTRY, ap_main as *const () as u64);
        core::ptr::write_volatile((b + OFF_APIC_ID) as *mut u32, u32::MAX);
        state_of(b).store(0, Ordering::SeqCst);
        (&raw mut probe_ap_slot)
            .cast::<u8>()
            .add(usize::from(apic_id))
            .write_volatile(slot as u8);
    }
}

/// The trampoline's bytes (to be copied to the SIPI page).
pub fn trampoline() -> &'static [u8] {
    let start = &raw const probe_tramp_start;
    let end = &raw const probe_tramp_end;
    // SAFETY: both symbols delimit the trampoline inside the probe's text.
    unsafe { core::slice::from_raw_parts(start, end as usize - start as usize) }
}

/// xAPIC register offsets.
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;

/// Sends one IPI (`icr_low`) to `apic_id` through the xAPIC ICR at `lapic` (ring-3 MMIO).
pub fn send_ipi(lapic: u64, apic_id: u8, icr_low: u32) {
    crate::phys::mmio_wr32(lapic + ICR_HIGH, u32::from(apic_id) << 24);
    crate::phys::mmio_wr32(lapic + ICR_LOW, icr_low);
}

/// INIT, level-triggered assert.
pub const IPI_INIT: u32 = 0x0000_c500;
/// Start-up IPI (OR in the vector = page number).
pub const IPI_SIPI: u32 = 0x0000_0600;

/// Busy-waits `us` microseconds (TSC, ring 3).
pub fn wait_us(tsc_khz: u64, us: u64) {
    let cycles = tsc_khz * us / 1000;
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < cycles {
        core::hint::spin_loop();
    }
}
