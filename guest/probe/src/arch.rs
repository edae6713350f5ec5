//! Entry points, descriptor tables, exception stubs and the ring-3 service gate (assembly),
//! plus small wrappers for port I/O, `rdtsc` and gate calls.
//!
//! Everything in this file that runs in ring 0 is executed by KVM's instruction emulator on a
//! PVM host, so it is kept short and uses only plain integer instructions, `in`/`out`,
//! `rdtsc`, `rdmsr`/`wrmsr`, `cpuid`, control-register moves, descriptor-table loads and
//! `iretq` (none of XSAVE*, FXSAVE, CMPXCHG16B, POPCNT, INT3, FWAIT, CLAC/STAC or SSE).
//!
//! The gate (`int 0x80`, RAX = service) is how ring 3 asks ring 0 for something: a reset,
//! a timed ring-0 loop, a `cpuid` as the VMM configured it, a ring-0 `out` loop, or a
//! serial write. On PVM a port access from ring 3 traps and is emulated by KVM at several
//! times the cost of the same access from (emulated) ring 0, so bulk I/O goes through the
//! gate.

use core::arch::{asm, global_asm};

/// Entered through the PVH note (32-bit, paging off).
pub const ENTRY_PVH: u64 = 1;
/// Entered at `e_entry` with the Linux 64-bit boot protocol (long mode, RSI = zero page).
pub const ENTRY_LINUX64: u64 = 2;

/// Kernel code selector (64-bit, DPL 0).
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (DPL 3), with RPL 3.
pub const USER_DS: u16 = 0x28 | 3;
/// User code selector (64-bit, DPL 3), with RPL 3.
pub const USER_CS: u16 = 0x30 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x38;
/// Kernel code selector, 32-bit (used once by application processors on their way to long
/// mode).
pub const KERNEL_CS32: u16 = 0x18;
/// GDT entries (the TSS descriptor takes two).
pub const GDT_ENTRIES: usize = 9;

/// Number of GiB the page directories in `.noinit` can map (2 MiB pages).
pub const MAX_GIB: usize = 64;

/// Vector of the ring-3 service gate (`int 0x80`, DPL 3).
pub const GATE_VECTOR: usize = 0x80;

/// Gate service: reset the VM (i8042 0xFE, then triple fault). Does not return.
pub const SVC_RESET: u64 = 0;
/// Gate service: time `RDI` iterations of `dec; jnz` in ring 0; returns TSC cycles in RAX.
pub const SVC_RING0_LOOP: u64 = 1;
/// Gate service: `cpuid` in ring 0 (EDI = leaf, ESI = subleaf; returns EAX, ESI = EBX,
/// EDI = ECX, EDX).
pub const SVC_CPUID: u64 = 2;
/// Gate service: `RDI` writes of AL to port `SI` from ring 0; returns TSC cycles in RAX.
pub const SVC_OUT_LOOP: u64 = 3;
/// Gate service: write `RSI` bytes at `RDI` to COM1 from ring 0 (polling LSR.THRE).
pub const SVC_SERIAL_WRITE: u64 = 4;
/// Gate service: `cli; hlt` forever (how application processors stop).
pub const SVC_PARK: u64 = 5;
/// Gate service: 32-bit store of ESI to the address in RDI from ring 0 (an MMIO write).
pub const SVC_MMIO_WRITE32: u64 = 6;
/// Gate service: RFLAGS.IF of the caller := RDI != 0 (ring 3 cannot rely on `sti`: PVM
/// does not honour IOPL in ring 3).
pub const SVC_SET_IF: u64 = 7;
/// Gate service: `wrmsr` of MSR EDI with the value RSI.
pub const SVC_WRMSR: u64 = 8;
/// Gate service: I/O APIC at RDI: IOREGSEL := ESI, then IOWIN := EDX if RCX != 0; returns
/// IOWIN in EAX. In ring 0 with interrupts off, so an interrupt handler that masks a
/// level-triggered entry cannot come between the select and the data access.
pub const SVC_IOAPIC: u64 = 9;

extern "C" {
    pub static mut probe_pml4: [u64; 512];
    pub static mut probe_pdpt: [u64; 512];
    pub static mut probe_pds: [[u64; 512]; MAX_GIB];
    pub static mut probe_gdt: [u64; GDT_ENTRIES];
    pub static probe_exc_stubs: [u8; 32 * 16];
    pub static probe_kstack_top: u8;
    pub static probe_ustack_top: u8;
    pub fn probe_ud_entry();
    pub fn probe_gate();
}

global_asm!(
    // ---------------------------------------------------------------- PVH ELF note
    ".section .note.Xen, \"a\", @note",
    ".p2align 2",
    ".long 4",           // namesz
    ".long 4",           // descsz
    ".long 18",          // XEN_ELFNOTE_PHYS32_ENTRY
    ".asciz \"Xen\"",
    ".long _start32",    // desc: 32-bit physical entry
    // An empty note right after: loaders that read the descriptor as a 64-bit value
    // (QEMU does for ELF64) see zeros in the upper half.
    ".long 0",
    ".long 0",
    ".long 0",
    // ---------------------------------------------------------------- PVH entry (32-bit)
    ".section .text.entry32, \"ax\"",
    ".code32",
    ".global _start32",
    "_start32:",
    "    cli",
    "    cld",
    "    mov esi, ebx",                       // hvm_start_info
    "    mov esp, offset probe_kstack_top",
    // PD entries for 0..4 GiB: 2 MiB pages, present | writable | user | PS.
    "    mov edi, offset probe_pds",
    "    mov eax, 0x87",
    "    xor edx, edx",
    "    mov ecx, 2048",
    ".Lpvh_pd:",
    "    mov dword ptr [edi], eax",
    "    mov dword ptr [edi + 4], edx",
    "    add eax, 0x200000",
    "    add edi, 8",
    "    dec ecx",
    "    jnz .Lpvh_pd",
    // PDPT[0..4] -> the four page directories.
    "    mov edi, offset probe_pdpt",
    "    mov eax, offset probe_pds",
    "    or eax, 7",
    "    mov ecx, 4",
    ".Lpvh_pdpt:",
    "    mov dword ptr [edi], eax",
    "    mov dword ptr [edi + 4], edx",
    "    add eax, 4096",
    "    add edi, 8",
    "    dec ecx",
    "    jnz .Lpvh_pdpt",
    "    mov eax, offset probe_pdpt",
    "    or eax, 7",
    "    mov edi, offset probe_pml4",
    "    mov dword ptr [edi], eax",
    "    mov dword ptr [edi + 4], edx",
    // PAE, CR3, EFER.LME, paging.
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
    "    lgdt [probe_gdtr32]",
    // ljmp 0x08:probe_pvh64
    "    .byte 0xea",
    "    .long probe_pvh64",
    "    .word 0x08",
    ".code64",
    "probe_pvh64:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    xor eax, eax",
    "    mov fs, ax",
    "    mov gs, ax",
    "    lea rsp, [rip + probe_kstack_top]",
    "    mov esi, esi",
    "    mov edi, {pvh}",
    "    call {setup}",
    "    ud2",
    // ---------------------------------------------------------------- Linux 64-bit entry
    ".section .text.entry64, \"ax\"",
    ".global _start64",
    "_start64:",
    "    cli",
    "    cld",
    "    lea rsp, [rip + probe_kstack_top]",
    "    mov edi, {linux64}",                 // RSI = zero page
    "    call {setup}",
    "    ud2",
    // ---------------------------------------------------------------- exception stubs
    ".section .text.probe_exc, \"ax\"",
    ".p2align 4",
    ".global probe_exc_stubs",
    "probe_exc_stubs:",
    ".set probe_vec, 0",
    ".rept 32",
    "    .p2align 4",
    // Vectors 8, 10-14, 17, 21, 29, 30 push an error code; the others get a zero.
    "    .if ((0x60227d00 >> probe_vec) & 1) == 0",
    "    push 0",
    "    .endif",
    "    push probe_vec",
    "    jmp probe_exc_common",
    "    .set probe_vec, probe_vec + 1",
    ".endr",
    "probe_exc_common:",
    "    mov rdi, rsp",                       // [vector, error, rip, cs, rflags, rsp, ss]
    "    and rsp, -16",
    "    call {exception}",
    "    ud2",
    // ---------------------------------------------------------------- ring-3 service gate
    // Ring 3 calls `int 0x80` with RAX = service. On VMX/SVM hosts that goes through the
    // DPL-3 gate at vector 0x80. PVM turns a software interrupt from guest ring 3 into #UD
    // at the `int` instruction, so the #UD stub recognises `int 0x80` (bytes cd 80) from
    // ring 3, steps over it and joins the same service code. (`syscall` is no help on PVM:
    // it reaches LSTAR but stays in ring 3.)
    ".global probe_ud_entry",
    "probe_ud_entry:",
    "    test byte ptr [rsp + 8], 3",
    "    jz .Lud_fault",
    "    push rax",
    "    mov rax, qword ptr [rsp + 8]",
    "    cmp word ptr [rax], 0x80cd",
    "    pop rax",
    "    jne .Lud_fault",
    "    add qword ptr [rsp], 2",
    "    jmp probe_gate",
    ".Lud_fault:",
    "    push 0",
    "    push 6",
    "    jmp probe_exc_common",
    ".global probe_gate",
    "probe_gate:",
    "    cmp rax, 1",
    "    je .Lsvc_loop",
    "    cmp rax, 2",
    "    je .Lsvc_cpuid",
    "    cmp rax, 3",
    "    je .Lsvc_out_loop",
    "    cmp rax, 4",
    "    je .Lsvc_write",
    "    cmp rax, 6",
    "    je .Lsvc_mmio_write",
    "    cmp rax, 5",
    "    je .Lsvc_park",
    "    cmp rax, 7",
    "    je .Lsvc_set_if",
    "    cmp rax, 8",
    "    je .Lsvc_wrmsr",
    "    cmp rax, 9",
    "    je .Lsvc_ioapic",
    // Service 0 (and anything unknown): reset.
    "    mov al, 0xfe",
    "    out 0x64, al",
    "    lidt [rip + probe_null_idtr]",
    "    ud2",                                // #UD -> no IDT -> triple fault
    ".Lsvc_park:",
    "    cli",
    "    hlt",
    "    jmp .Lsvc_park",
    ".Lsvc_set_if:",
    "    test rdi, rdi",
    "    jz .Lsvc_if_off",
    "    or qword ptr [rsp + 16], 0x200",
    "    iretq",
    ".Lsvc_if_off:",
    "    and qword ptr [rsp + 16], -0x201",
    "    iretq",
    ".Lsvc_wrmsr:",
    "    mov ecx, edi",
    "    mov eax, esi",
    "    mov rdx, rsi",
    "    shr rdx, 32",
    "    wrmsr",
    "    iretq",
    ".Lsvc_ioapic:",
    "    mov dword ptr [rdi], esi",
    "    test rcx, rcx",
    "    jz .Lsvc_ioapic_read",
    "    mov dword ptr [rdi + 16], edx",
    ".Lsvc_ioapic_read:",
    "    mov eax, dword ptr [rdi + 16]",
    "    iretq",
    ".Lsvc_mmio_write:",
    "    mov dword ptr [rdi], esi",
    "    iretq",
    ".Lsvc_loop:",
    "    mov rcx, rdi",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r8, rax",
    "    test rcx, rcx",
    "    jz .Lsvc_loop_done",
    ".Lsvc_loop_body:",
    "    dec rcx",
    "    jnz .Lsvc_loop_body",
    ".Lsvc_loop_done:",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    sub rax, r8",
    "    iretq",
    ".Lsvc_cpuid:",
    "    mov r8, rbx",
    "    mov eax, edi",
    "    mov ecx, esi",
    "    cpuid",
    "    mov esi, ebx",
    "    mov edi, ecx",
    "    mov rbx, r8",
    "    iretq",
    ".Lsvc_write:",
    "    test rsi, rsi",
    "    jz .Lsvc_write_done",
    ".Lsvc_write_byte:",
    "    mov ecx, 100000",
    "    mov edx, 0x3fd",
    ".Lsvc_write_poll:",
    "    in al, dx",
    "    test al, 0x20",
    "    jnz .Lsvc_write_ready",
    "    dec ecx",
    "    jnz .Lsvc_write_poll",
    ".Lsvc_write_ready:",
    "    mov al, byte ptr [rdi]",
    "    mov edx, 0x3f8",
    "    out dx, al",
    "    inc rdi",
    "    dec rsi",
    "    jnz .Lsvc_write_byte",
    ".Lsvc_write_done:",
    "    iretq",
    ".Lsvc_out_loop:",
    "    mov rcx, rdi",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r8, rax",
    "    mov edx, esi",
    "    test rcx, rcx",
    "    jz .Lsvc_out_done",
    ".Lsvc_out_body:",
    "    out dx, al",
    "    dec rcx",
    "    jnz .Lsvc_out_body",
    ".Lsvc_out_done:",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    sub rax, r8",
    "    iretq",
    // ---------------------------------------------------------------- data
    ".section .data.probe_gdt, \"aw\"",
    ".p2align 4",
    ".global probe_gdt",
    "probe_gdt:",
    "    .quad 0",
    "    .quad 0x00af9b000000ffff",           // 0x08 kernel code, 64-bit
    "    .quad 0x00cf93000000ffff",           // 0x10 kernel data
    "    .quad 0x00cf9b000000ffff",           // 0x18 kernel code, 32-bit (AP start-up)
    "    .quad 0x00cffb000000ffff",           // 0x20 user code, 32-bit, DPL 3 (unused; Linux layout)
    "    .quad 0x00cff3000000ffff",           // 0x28 user data, DPL 3
    "    .quad 0x00affb000000ffff",           // 0x30 user code, 64-bit, DPL 3
    "    .quad 0",                            // 0x38 TSS (filled in by setup)
    "    .quad 0",
    "probe_gdt_end:",
    "    .p2align 2",
    "probe_gdtr32:",
    "    .word probe_gdt_end - probe_gdt - 1",
    "    .long probe_gdt",
    "    .p2align 3",
    "probe_null_idtr:",
    "    .word 0",
    "    .quad 0",
    // Page tables that must start out zero: in .bss, which the linker script stores in the file.
    ".section .bss.probe_pt, \"aw\", @nobits",
    ".p2align 12",
    ".global probe_pml4",
    "probe_pml4:",
    "    .skip 4096",
    ".global probe_pdpt",
    "probe_pdpt:",
    "    .skip 4096",
    // Page directories and stacks: written before they are read.
    ".section .noinit.probe, \"aw\", @nobits",
    ".p2align 12",
    ".global probe_pds",
    "probe_pds:",
    "    .skip 4096 * {max_gib}",
    "    .skip 16384",
    ".global probe_kstack_top",
    "probe_kstack_top:",
    "    .skip 65536",
    ".global probe_ustack_top",
    "probe_ustack_top:",
    ".text",
    setup = sym crate::setup::probe_setup,
    exception = sym crate::setup::probe_exception,
    max_gib = const MAX_GIB,
    pvh = const ENTRY_PVH,
    linux64 = const ENTRY_LINUX64,
);

/// Writes one byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; ring 3 runs with IOPL 3 and a TSS I/O bitmap
    // that allows every port, so this is allowed in ring 0 and ring 3. The devices behind
    // the ports are the VMM's.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads one byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes `bytes` to an I/O port with one `rep outsb` (string port I/O: the hypervisor may
/// hand the whole string to the VMM in one exit).
#[inline(always)]
pub fn rep_outsb(port: u16, bytes: &[u8]) {
    // SAFETY: `rep outsb` reads `bytes.len()` bytes at `bytes.as_ptr()`, a live shared slice;
    // port I/O is allowed as for `outb`. DF is clear (the ABI guarantees it at calls).
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _,
             inout("rcx") bytes.len() => _, options(readonly, nostack, preserves_flags))
    }
}

/// Fills `buf` from an I/O port with one `rep insb`.
#[inline(always)]
pub fn rep_insb(port: u16, buf: &mut [u8]) {
    // SAFETY: `rep insb` writes `buf.len()` bytes at `buf.as_mut_ptr()`, a live exclusive
    // slice; port I/O is allowed as for `outb`. DF is clear.
    unsafe {
        asm!("rep insb", in("dx") port, inout("rdi") buf.as_mut_ptr() => _,
             inout("rcx") buf.len() => _, options(nostack, preserves_flags))
    }
}

/// Writes a 16-bit value to an I/O port.
#[inline(always)]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the TSC (CR4.TSD is clear).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The current privilege level (CS.RPL).
pub fn cpl() -> u8 {
    let cs: u16;
    // SAFETY: reads the CS selector only.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    (cs & 3) as u8
}

/// Runs `iterations` of `dec; jnz` in ring 3 (the caller's ring) and returns the TSC cycles.
pub fn local_loop(iterations: u64) -> u64 {
    let cycles: u64;
    // SAFETY: register-only loop between two `rdtsc`.
    unsafe {
        asm!(
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "mov r8, rax",
            "test rcx, rcx",
            "jz 3f",
            ".p2align 4",
            "2:",
            "dec rcx",
            "jnz 2b",
            "3:",
            "rdtsc",
            "shl rdx, 32",
            "or rax, rdx",
            "sub rax, r8",
            inout("rcx") iterations => _,
            out("rax") cycles,
            out("rdx") _,
            out("r8") _,
            options(nomem, nostack),
        );
    }
    cycles
}

/// Performs `count` writes to `port` and returns the TSC cycles they took.
pub fn out_loop(port: u16, count: u64) -> u64 {
    let t0 = rdtsc();
    // SAFETY: port writes only; see `outb`.
    unsafe {
        asm!(
            "test rcx, rcx",
            "jz 3f",
            "2:",
            "out dx, al",
            "dec rcx",
            "jnz 2b",
            "3:",
            inout("rcx") count => _,
            in("dx") port,
            in("al") 0u8,
            options(nomem, nostack),
        );
    }
    rdtsc().wrapping_sub(t0)
}

/// Asks ring 0 (through the gate) to time `iterations` of `dec; jnz`; returns TSC cycles.
pub fn gate_ring0_loop(iterations: u64) -> u64 {
    let cycles: u64;
    // SAFETY: the gate handler clobbers only the registers listed and returns with `iretq`
    // to the next instruction.
    unsafe {
        asm!(
            "int 0x80",
            inout("rax") SVC_RING0_LOOP => cycles,
            in("rdi") iterations,
            out("rcx") _,
            out("rdx") _,
            out("r8") _,
            options(nomem),
        );
    }
    cycles
}

/// Asks ring 0 to write port `port` `count` times; returns TSC cycles.
pub fn gate_out_loop(port: u16, count: u64) -> u64 {
    let cycles: u64;
    // SAFETY: as for `gate_ring0_loop`; port writes only.
    unsafe {
        asm!(
            "int 0x80",
            inout("rax") SVC_OUT_LOOP => cycles,
            in("rdi") count,
            in("rsi") u64::from(port),
            out("rcx") _,
            out("rdx") _,
            out("r8") _,
            options(nomem),
        );
    }
    cycles
}

/// `cpuid` executed in ring 0 through the gate, so the result is the VMM's CPUID table
/// (ring-3 `cpuid` may not trap on every host). Returns (EAX, EBX, ECX, EDX).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: the gate handler preserves RBX (returns EBX in ESI, ECX in EDI).
    unsafe {
        asm!(
            "int 0x80",
            inout("eax") SVC_CPUID as u32 => a,
            inout("edi") leaf => c,
            inout("esi") subleaf => b,
            out("ecx") _,
            out("edx") d,
            out("r8") _,
            options(nomem),
        );
    }
    (a, b, c, d)
}

/// Asks ring 0 to write `bytes` to COM1 (one gate call instead of two trapped I/O
/// instructions per byte from ring 3).
pub fn gate_serial_write(bytes: &[u8]) {
    // SAFETY: the handler only reads `bytes` and does port I/O.
    unsafe {
        asm!(
            "int 0x80",
            inout("rax") SVC_SERIAL_WRITE => _,
            inout("rdi") bytes.as_ptr() => _,
            inout("rsi") bytes.len() => _,
            out("rcx") _,
            out("rdx") _,
            options(readonly),
        );
    }
}

/// Stops this CPU for good: ring 0 runs `cli; hlt` in a loop.
pub fn gate_park() -> ! {
    // SAFETY: the park service never returns.
    unsafe { asm!("int 0x80", in("rax") SVC_PARK, options(noreturn)) }
}

/// A 32-bit MMIO store done by ring 0 (one gate round trip), for comparison with the same
/// store from ring 3.
pub fn gate_mmio_write32(addr: u64, value: u32) {
    // SAFETY: the handler does one store to `addr`, which the caller chose as a device
    // register inside the identity map.
    unsafe {
        asm!(
            "int 0x80",
            inout("rax") SVC_MMIO_WRITE32 => _,
            in("rdi") addr,
            in("rsi") u64::from(value),
        );
    }
}

/// Sets the caller's RFLAGS.IF through the gate (interrupts on or off for ring 3).
pub fn gate_set_if(on: bool) {
    // SAFETY: the handler only changes the IF bit of the saved RFLAGS; enabling interrupts
    // is sound once the IDT has handlers for every vector that can arrive (the `irq`
    // module programs only its own vectors and masks the rest).
    unsafe {
        asm!(
            "int 0x80",
            inout("rax") SVC_SET_IF => _,
            in("rdi") u64::from(on),
            options(nomem, nostack),
        );
    }
}

/// `wrmsr` in ring 0 (through the gate).
pub fn gate_wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller picks an MSR whose write has no memory-safety effect (the probe
    // writes only IA32_TSC_DEADLINE).
    unsafe {
        asm!(
            "int 0x80",
            inout("rax") SVC_WRMSR => _,
            in("rdi") u64::from(msr),
            in("rsi") value,
            out("rcx") _,
            out("rdx") _,
            options(nostack),
        );
    }
}

/// One I/O APIC register access in ring 0: select `index`, write `value` if given, and
/// return the data register.
pub fn gate_ioapic(base: u64, index: u32, value: Option<u32>) -> u32 {
    let out: u64;
    // SAFETY: `base` is an I/O APIC from the MADT inside the identity map (checked by the
    // caller); the handler does two or three 32-bit accesses there.
    unsafe {
        asm!(
            "int 0x80",
            inout("rax") SVC_IOAPIC => out,
            in("rdi") base,
            in("rsi") u64::from(index),
            in("rdx") u64::from(value.unwrap_or(0)),
            in("rcx") u64::from(value.is_some()),
            options(nostack),
        );
    }
    out as u32
}

/// Asks ring 0 to reset the VM (from ring 3; ring 0 uses `ring0_panic_reset`).
pub fn gate_reset() -> ! {
    // SAFETY: the reset service never returns.
    unsafe { asm!("int 0x80", in("rax") SVC_RESET, options(noreturn)) }
}

/// Last resort from ring 0: pvpanic (optional), i8042 reset, then a triple fault.
pub fn ring0_panic_reset(pvpanic: bool) -> ! {
    if pvpanic {
        outb(0x505, 1);
        spin_ring0(50_000);
    }
    outb(0x64, 0xfe);
    spin_ring0(50_000);
    // SAFETY: loading an empty IDT and raising #UD triple-faults on purpose.
    unsafe { asm!("lidt [rip + probe_null_idtr]", "ud2", options(noreturn),) }
}

/// A short busy wait (about 30 ms when emulated), giving the VMM time to act on an
/// asynchronous event (pvpanic, reset) before the next step.
fn spin_ring0(iterations: u64) {
    // SAFETY: register-only loop.
    unsafe {
        asm!(
            "2:",
            "dec rcx",
            "jnz 2b",
            inout("rcx") iterations => _,
            options(nomem, nostack),
        );
    }
}
