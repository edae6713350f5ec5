//! Which instructions the instruction emulator of this host's KVM executes in guest ring 0.
//!
//! On PVM hosts guest ring 0 goes through KVM's x86 emulator; this test runs candidate
//! instructions one per VM, in 64-bit ring 0, and prints whether each one completed, was refused
//! (`KVM_EXIT_INTERNAL_ERROR` / emulation failure) or faulted (the null IDT turns any exception
//! into a triple fault). It backs the choice of bits in the `emulated-ring0` CPU template.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use common::*;
use ember_vcpu::{Vcpu, VcpuStop};
use kvm_ioctls::Kvm;

const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

#[rustfmt::skip]
const PRELUDE: &[u8] = &[
    0x48, 0xc7, 0xc6, 0x00, 0x30, 0x00, 0x00, // mov rsi, 0x3000
    0x48, 0xc7, 0xc7, 0x00, 0x31, 0x00, 0x00, // mov rdi, 0x3100
    0xb9, 0x01, 0x00, 0x00, 0x00,             // mov ecx, 1
    0xba, 0x00, 0x00, 0x00, 0x00,             // mov edx, 0
    0x31, 0xc0,                               // xor eax, eax
    0x31, 0xdb,                               // xor ebx, ebx
];

/// A CPUID feature bit to force on for one case: (leaf, subleaf, register 0..=3 = EAX..EDX, bit).
type Force = Option<(u32, u32, u8, u32)>;

fn run_one(insn: &[u8], cr4_extra: u64, force: Force) -> (String, u64, std::time::Duration) {
    let vm = TestVm::new(Kvm::new().unwrap(), false);
    let mut code = PRELUDE.to_vec();
    code.extend_from_slice(insn);
    code.push(0xf4);
    let mut table = vm.cpuid(0, 1);
    if let Some((leaf, sub, reg, bit)) = force {
        for e in table.as_mut_slice() {
            if e.function == leaf && e.index == sub {
                let r = match reg {
                    0 => &mut e.eax,
                    1 => &mut e.ebx,
                    2 => &mut e.ecx,
                    _ => &mut e.edx,
                };
                *r |= 1 << bit;
            }
        }
    }
    let mut vcpu: Vcpu = vm.bsp(&code, &table);
    // Data: a selector (0x10) for verw, small numbers elsewhere.
    vm.write_u64s(DATA, &[0x10, 0, 0, 0, 0, 0, 0, 0]);
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT | cr4_extra;
    if let Err(e) = vcpu.fd().set_sregs(&sregs) {
        return (
            format!("n/a (CR4 {cr4_extra:#x} refused: {e})"),
            0,
            Default::default(),
        );
    }
    let io = PortLog::default();
    let t0 = Instant::now();
    let stop = vcpu.run(&io, &AtomicBool::new(false)).unwrap();
    let dt = t0.elapsed();
    let rax = vcpu.fd().get_regs().unwrap().rax;
    let what = match stop {
        VcpuStop::Halted => "ok".to_string(),
        VcpuStop::EmulationFailure { .. } => "REFUSED".to_string(),
        VcpuStop::Shutdown => "fault".to_string(),
        other => format!("{other:?}"),
    };
    (what, rax, dt)
}

#[test]
fn emulator_coverage() {
    let Some(_kvm) = kvm_or_skip("emulator_coverage") else {
        return;
    };
    #[rustfmt::skip]
    let cases: &[(&str, &[u8], u64)] = &[
        ("nop", &[0x90], 0),
        ("popcnt eax, ecx", &[0xf3, 0x0f, 0xb8, 0xc1], 0),
        ("lzcnt eax, ecx", &[0xf3, 0x0f, 0xbd, 0xc1], 0),
        ("tzcnt eax, edx", &[0xf3, 0x0f, 0xbc, 0xc2], 0),
        ("bsr eax, ecx", &[0x0f, 0xbd, 0xc1], 0),
        ("lock cmpxchg8b [rsi]", &[0xf0, 0x0f, 0xc7, 0x0e], 0),
        ("lock cmpxchg16b [rsi]", &[0xf0, 0x48, 0x0f, 0xc7, 0x0e], 0),
        ("lock xadd [rsi], eax", &[0xf0, 0x0f, 0xc1, 0x06], 0),
        ("xacquire lock add [rsi], eax", &[0xf2, 0xf0, 0x01, 0x06], 0),
        ("rdrand eax", &[0x0f, 0xc7, 0xf0], 0),
        ("rdseed eax", &[0x0f, 0xc7, 0xf8], 0),
        ("rdtsc", &[0x0f, 0x31], 0),
        ("rdtscp", &[0x0f, 0x01, 0xf9], 0),
        ("rdpid rax", &[0xf3, 0x0f, 0xc7, 0xf8], 0),
        ("clac", &[0x0f, 0x01, 0xca], 0),
        ("stac", &[0x0f, 0x01, 0xcb], 0),
        ("clac (CR4.SMAP)", &[0x0f, 0x01, 0xca], 1 << 21),
        ("rdpkru (CR4.PKE)", &[0x0f, 0x01, 0xee], 1 << 22),
        ("rdfsbase rax (CR4.FSGSBASE)", &[0xf3, 0x48, 0x0f, 0xae, 0xc0], 1 << 16),
        ("swapgs", &[0x0f, 0x01, 0xf8], 0),
        ("xgetbv", &[0x0f, 0x01, 0xd0], 0),
        ("andn eax, ecx, edx (BMI1, VEX)", &[0xc4, 0xe2, 0x70, 0xf2, 0xc2], 0),
        ("vzeroupper (AVX)", &[0xc5, 0xf8, 0x77], 0),
        ("adcx eax, ecx (ADX)", &[0x66, 0x0f, 0x38, 0xf6, 0xc1], 0),
        ("movbe eax, [rsi]", &[0x0f, 0x38, 0xf0, 0x06], 0),
        ("crc32 eax, ecx (SSE4.2)", &[0xf2, 0x0f, 0x38, 0xf1, 0xc1], 0),
        ("pshufb xmm0, xmm1 (SSSE3)", &[0x66, 0x0f, 0x38, 0x00, 0xc1], 0),
        ("ptest xmm0, xmm1 (SSE4.1)", &[0x66, 0x0f, 0x38, 0x17, 0xc1], 0),
        ("lddqu xmm0, [rsi] (SSE3)", &[0xf2, 0x0f, 0xf0, 0x06], 0),
        ("pclmulqdq xmm0, xmm1, 0", &[0x66, 0x0f, 0x3a, 0x44, 0xc1, 0x00], 0),
        ("aesenc xmm0, xmm1", &[0x66, 0x0f, 0x38, 0xdc, 0xc1], 0),
        ("sha1nexte xmm0, xmm1", &[0x0f, 0x38, 0xc8, 0xc1], 0),
        ("gf2p8mulb xmm0, xmm1 (GFNI)", &[0x66, 0x0f, 0x38, 0xcf, 0xc1], 0),
        ("movdqa xmm0, [rsi] (SSE2)", &[0x66, 0x0f, 0x6f, 0x06], 0),
        ("movdqu [rdi], xmm0 (SSE2)", &[0xf3, 0x0f, 0x7f, 0x07], 0),
        ("movq rax, xmm0 (SSE2)", &[0x66, 0x48, 0x0f, 0x7e, 0xc0], 0),
        ("pxor xmm0, xmm0 (SSE2)", &[0x66, 0x0f, 0xef, 0xc0], 0),
        ("xorps xmm0, xmm0 (SSE)", &[0x0f, 0x57, 0xc0], 0),
        ("fxsave [rsi]", &[0x0f, 0xae, 0x06], 0),
        ("fxrstor [rsi]", &[0x0f, 0xae, 0x0e], 0),
        ("ldmxcsr [rdi]", &[0x0f, 0xae, 0x17], 0),
        ("fninit", &[0xdb, 0xe3], 0),
        ("fnstcw [rsi]", &[0xd9, 0x3e], 0),
        ("fwait", &[0x9b], 0),
        ("fld1", &[0xd9, 0xe8], 0),
        ("emms", &[0x0f, 0x77], 0),
        ("lfence", &[0x0f, 0xae, 0xe8], 0),
        ("mfence", &[0x0f, 0xae, 0xf0], 0),
        ("sfence", &[0x0f, 0xae, 0xf8], 0),
        ("clflush [rsi]", &[0x0f, 0xae, 0x3e], 0),
        ("clflushopt [rsi]", &[0x66, 0x0f, 0xae, 0x3e], 0),
        ("clwb [rsi]", &[0x66, 0x0f, 0xae, 0x36], 0),
        ("prefetchw [rsi]", &[0x0f, 0x0d, 0x0e], 0),
        ("prefetcht0 [rsi]", &[0x0f, 0x18, 0x0e], 0),
        ("cldemote [rsi]", &[0x0f, 0x1c, 0x06], 0),
        ("endbr64", &[0xf3, 0x0f, 0x1e, 0xfa], 0),
        ("nop dword [rax]", &[0x0f, 0x1f, 0x00], 0),
        ("pause", &[0xf3, 0x90], 0),
        ("verw [rsi]", &[0x0f, 0x00, 0x2e], 0),
        ("serialize", &[0x0f, 0x01, 0xe8], 0),
        ("invpcid rax, [rsi]", &[0x66, 0x0f, 0x38, 0x82, 0x06], 0),
        ("invlpg [rsi]", &[0x0f, 0x01, 0x3e], 0),
        ("wbinvd", &[0x0f, 0x09], 0),
        ("monitor", &[0x0f, 0x01, 0xc8], 0),
        ("xbegin (RTM)", &[0xc7, 0xf8, 0x00, 0x00, 0x00, 0x00], 0),
        ("xtest (RTM/HLE)", &[0x0f, 0x01, 0xd6], 0),
        ("movdiri [rsi], eax", &[0x0f, 0x38, 0xf9, 0x06], 0),
        ("rep movsb (1)", &[0xf3, 0xa4], 0),
        ("rep stosq (1)", &[0xf3, 0x48, 0xab], 0),
        ("tzcnt eax, ecx", &[0xf3, 0x0f, 0xbc, 0xc1], 0),
        ("cpuid", &[0x0f, 0xa2], 0),
        ("sgdt [rsi]", &[0x0f, 0x01, 0x06], 0),
        ("int3", &[0xcc], 0),
    ];
    #[rustfmt::skip]
    let forced: &[(&str, &[u8], u64, Force)] = &[
        ("movbe eax, [rsi] +MOVBE", &[0x0f, 0x38, 0xf0, 0x06], 0, Some((1, 0, 2, 22))),
        ("rdpid rax +RDPID", &[0xf3, 0x0f, 0xc7, 0xf8], 0, Some((7, 0, 2, 22))),
        ("rdtscp +RDTSCP", &[0x0f, 0x01, 0xf9], 0, Some((0x8000_0001, 0, 3, 27))),
        ("lzcnt eax, ecx +ABM", &[0xf3, 0x0f, 0xbd, 0xc1], 0, Some((0x8000_0001, 0, 2, 5))),
        ("popcnt eax, ecx +POPCNT", &[0xf3, 0x0f, 0xb8, 0xc1], 0, Some((1, 0, 2, 23))),
        // mov rax, 0x1234000; wrfsbase rax; xor eax, eax; rdfsbase rax
        ("wrfsbase+rdfsbase +FSGSBASE", &[0x48, 0xc7, 0xc0, 0x00, 0x40, 0x23, 0x01,
            0xf3, 0x48, 0x0f, 0xae, 0xd0, 0x31, 0xc0, 0xf3, 0x48, 0x0f, 0xae, 0xc0], 1 << 16,
            Some((7, 0, 1, 0))),
        ("clac +SMAP (CR4.SMAP)", &[0x0f, 0x01, 0xca], 1 << 21, Some((7, 0, 1, 20))),
        ("rdpkru +PKU (CR4.PKE)", &[0x0f, 0x01, 0xee], 1 << 22, Some((7, 0, 2, 3))),
    ];
    let all = cases
        .iter()
        .map(|(n, i, c)| (*n, *i, *c, None))
        .chain(forced.iter().copied());
    for (name, insn, cr4, force) in all {
        let (what, rax, dt) = run_one(insn, cr4, force);
        eprintln!("{name:<32} {what:<10} rax={rax:#x} {dt:?}");
    }
}

/// Copy throughput of `rep movsb` / `rep movsq` / a `mov` loop in emulated ring 0.
#[test]
fn emulated_copy_rates() {
    let Some(_kvm) = kvm_or_skip("emulated_copy_rates") else {
        return;
    };
    const LEN: u32 = 64 * 1024;
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("rep movsb", [&[0xb9][..], &LEN.to_le_bytes(), &[0xf3, 0xa4]].concat()),
        ("rep movsq", [&[0xb9][..], &(LEN / 8).to_le_bytes(), &[0xf3, 0x48, 0xa5]].concat()),
        ("rep stosb", [&[0xb9][..], &LEN.to_le_bytes(), &[0xf3, 0xaa]].concat()),
        ("rep stosq", [&[0xb9][..], &(LEN / 8).to_le_bytes(), &[0xf3, 0x48, 0xab]].concat()),
        // 1: mov rax, [rsi]; mov [rdi], rax; add rsi, 8; add rdi, 8; dec ecx; jnz 1b
        ("movq loop", [&[0xb9][..], &(LEN / 8).to_le_bytes(), &[
            0x48, 0x8b, 0x06, 0x48, 0x89, 0x07, 0x48, 0x83, 0xc6, 0x08,
            0x48, 0x83, 0xc7, 0x08, 0xff, 0xc9, 0x75, 0xec]].concat()),
    ];
    for (name, body) in cases {
        let vm = TestVm::new(Kvm::new().unwrap(), false);
        #[rustfmt::skip]
        let mut code = vec![
            0x48, 0xc7, 0xc6, 0x00, 0x00, 0x10, 0x00, // mov rsi, 0x100000
            0x48, 0xc7, 0xc7, 0x00, 0x00, 0x18, 0x00, // mov rdi, 0x180000
        ];
        code.extend_from_slice(&body);
        code.push(0xf4);
        let table = vm.cpuid(0, 1);
        let mut vcpu = vm.bsp(&code, &table);
        let io = PortLog::default();
        let t0 = Instant::now();
        let stop = vcpu.run(&io, &AtomicBool::new(false)).unwrap();
        let dt = t0.elapsed();
        eprintln!(
            "{name:<10} {LEN} bytes: {stop:?} in {dt:?} ({:.1} MB/s)",
            f64::from(LEN) / dt.as_secs_f64() / 1e6
        );
    }
}
