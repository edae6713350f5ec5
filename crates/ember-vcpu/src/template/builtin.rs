//! The modifier lists of the built-in templates (documented on `CpuTemplate::builtin` and in
//! the module docs of `template`).

use super::features::*;
use super::{CpuidModifier, MsrModifier, Register};
use crate::msr;

use Register::{Eax, Ebx, Ecx, Edx};

/// Clears everything in `register` except `keep`.
const fn keep_only(
    leaf: u32,
    subleaf: Option<u32>,
    register: Register,
    keep: u32,
) -> CpuidModifier {
    CpuidModifier::clear(leaf, subleaf, register, !keep)
}

/// Zeroes all four registers of every subleaf of `leaf`.
fn zero_leaf(leaf: u32) -> impl Iterator<Item = CpuidModifier> {
    Register::ALL
        .into_iter()
        .map(move |r| CpuidModifier::clear(leaf, None, r, u32::MAX))
}

/// `minimal`: x86-64-v2 plus common system features and speculation controls.
pub(super) fn minimal_cpuid() -> Vec<CpuidModifier> {
    let mut v = vec![
        keep_only(
            1,
            None,
            Ecx,
            leaf1_ecx::SSE3
                | leaf1_ecx::SSSE3
                | leaf1_ecx::CX16
                | leaf1_ecx::PCID
                | leaf1_ecx::SSE4_1
                | leaf1_ecx::SSE4_2
                | leaf1_ecx::X2APIC
                | leaf1_ecx::POPCNT
                | leaf1_ecx::TSC_DEADLINE
                | leaf1_ecx::HYPERVISOR,
        ),
        keep_only(
            1,
            None,
            Edx,
            leaf1_edx::FPU
                | leaf1_edx::VME
                | leaf1_edx::DE
                | leaf1_edx::PSE
                | leaf1_edx::TSC
                | leaf1_edx::MSR
                | leaf1_edx::PAE
                | leaf1_edx::MCE
                | leaf1_edx::CX8
                | leaf1_edx::APIC
                | leaf1_edx::SEP
                | leaf1_edx::MTRR
                | leaf1_edx::PGE
                | leaf1_edx::MCA
                | leaf1_edx::CMOV
                | leaf1_edx::PAT
                | leaf1_edx::PSE36
                | leaf1_edx::CLFLUSH
                | leaf1_edx::MMX
                | leaf1_edx::FXSR
                | leaf1_edx::SSE
                | leaf1_edx::SSE2
                | leaf1_edx::HTT,
        ),
        keep_only(6, None, Eax, leaf6_eax::ARAT),
        keep_only(
            7,
            Some(0),
            Ebx,
            leaf7_ebx::FSGSBASE
                | leaf7_ebx::TSC_ADJUST
                | leaf7_ebx::FDP_EXCPTN_ONLY
                | leaf7_ebx::SMEP
                | leaf7_ebx::ERMS
                | leaf7_ebx::INVPCID
                | leaf7_ebx::ZERO_FCS_FDS
                | leaf7_ebx::SMAP
                | leaf7_ebx::CLFLUSHOPT,
        ),
        keep_only(7, Some(0), Ecx, leaf7_ecx::UMIP),
        keep_only(
            7,
            Some(0),
            Edx,
            leaf7_edx::MD_CLEAR
                | leaf7_edx::SPEC_CTRL
                | leaf7_edx::STIBP
                | leaf7_edx::FLUSH_L1D
                | leaf7_edx::ARCH_CAPABILITIES
                | leaf7_edx::SSBD,
        ),
        CpuidModifier::clear(7, Some(1), Eax, u32::MAX),
        CpuidModifier::clear(7, Some(1), Edx, u32::MAX),
        keep_only(0x8000_0001, None, Ecx, ext1_ecx::LAHF_LM),
        keep_only(
            0x8000_0001,
            None,
            Edx,
            ext1_edx::SYSCALL | ext1_edx::NX | ext1_edx::PDPE1GB | ext1_edx::RDTSCP | ext1_edx::LM,
        ),
        keep_only(0x8000_0007, None, Edx, ext7_edx::INVARIANT_TSC),
    ];
    // Architectural perfmon, XSAVE, SGX, processor trace.
    for leaf in [0xa, 0xd, 0x12, 0x14] {
        v.extend(zero_leaf(leaf));
    }
    v
}

/// IA32_ARCH_CAPABILITIES bit 7: the IA32_TSX_CTRL MSR exists.
pub(super) const ARCH_CAP_TSX_CTRL_MSR: u64 = 1 << 7;

/// `minimal`: TSX is hidden, so is its control MSR.
pub(super) fn minimal_msrs() -> Vec<MsrModifier> {
    vec![MsrModifier {
        index: msr::IA32_ARCH_CAPABILITIES,
        clear: ARCH_CAP_TSX_CTRL_MSR,
        set: 0,
    }]
}

/// `emulated-ring0`: what KVM's instruction emulator refuses, faults on or gets wrong in guest
/// ring 0 (measured by `tests/emulator.rs`), plus the byte-granular fast-string hints.
pub(super) fn emulated_ring0_cpuid() -> Vec<CpuidModifier> {
    let mut v = vec![
        CpuidModifier::clear(
            1,
            None,
            Ecx,
            leaf1_ecx::SSE3
                | leaf1_ecx::PCLMULQDQ
                | leaf1_ecx::MONITOR
                | leaf1_ecx::SSSE3
                | leaf1_ecx::FMA
                | leaf1_ecx::CX16
                | leaf1_ecx::SSE4_1
                | leaf1_ecx::SSE4_2
                | leaf1_ecx::MOVBE
                | leaf1_ecx::POPCNT
                | leaf1_ecx::AES
                | leaf1_ecx::XSAVE
                | leaf1_ecx::OSXSAVE
                | leaf1_ecx::AVX
                | leaf1_ecx::F16C,
        ),
        CpuidModifier::clear(
            7,
            Some(0),
            Ebx,
            leaf7_ebx::FSGSBASE
                | leaf7_ebx::SGX
                | leaf7_ebx::BMI1
                | leaf7_ebx::HLE
                | leaf7_ebx::AVX2
                | leaf7_ebx::SMEP
                | leaf7_ebx::BMI2
                | leaf7_ebx::ERMS
                | leaf7_ebx::INVPCID
                | leaf7_ebx::RTM
                | leaf7_ebx::MPX
                | leaf7_ebx::AVX512F
                | leaf7_ebx::AVX512DQ
                | leaf7_ebx::ADX
                | leaf7_ebx::SMAP
                | leaf7_ebx::AVX512_IFMA
                | leaf7_ebx::CLWB
                | leaf7_ebx::PT
                | leaf7_ebx::AVX512PF
                | leaf7_ebx::AVX512ER
                | leaf7_ebx::AVX512CD
                | leaf7_ebx::SHA
                | leaf7_ebx::AVX512BW
                | leaf7_ebx::AVX512VL,
        ),
        CpuidModifier::clear(
            7,
            Some(0),
            Ecx,
            leaf7_ecx::PREFETCHWT1
                | leaf7_ecx::AVX512_VBMI
                | leaf7_ecx::PKU
                | leaf7_ecx::OSPKE
                | leaf7_ecx::WAITPKG
                | leaf7_ecx::AVX512_VBMI2
                | leaf7_ecx::CET_SS
                | leaf7_ecx::GFNI
                | leaf7_ecx::VAES
                | leaf7_ecx::VPCLMULQDQ
                | leaf7_ecx::AVX512_VNNI
                | leaf7_ecx::AVX512_BITALG
                | leaf7_ecx::AVX512_VPOPCNTDQ
                | leaf7_ecx::RDPID
                | leaf7_ecx::KL
                | leaf7_ecx::MOVDIRI
                | leaf7_ecx::MOVDIR64B
                | leaf7_ecx::ENQCMD
                | leaf7_ecx::PKS,
        ),
        CpuidModifier::clear(
            7,
            Some(0),
            Edx,
            leaf7_edx::AVX512_4VNNIW
                | leaf7_edx::AVX512_4FMAPS
                | leaf7_edx::FSRM
                | leaf7_edx::UINTR
                | leaf7_edx::AVX512_VP2INTERSECT
                | leaf7_edx::TSXLDTRK
                | leaf7_edx::PCONFIG
                | leaf7_edx::ARCH_LBR
                | leaf7_edx::CET_IBT
                | leaf7_edx::AMX_BF16
                | leaf7_edx::AVX512_FP16
                | leaf7_edx::AMX_TILE
                | leaf7_edx::AMX_INT8,
        ),
        CpuidModifier::clear(7, Some(1), Eax, u32::MAX),
        CpuidModifier::clear(7, Some(1), Edx, u32::MAX),
        CpuidModifier::clear(
            0x8000_0001,
            None,
            Ecx,
            ext1_ecx::ABM
                | ext1_ecx::SSE4A
                | ext1_ecx::MISALIGNSSE
                | ext1_ecx::XOP
                | ext1_ecx::FMA4
                | ext1_ecx::TBM
                | ext1_ecx::MONITORX,
        ),
        CpuidModifier::clear(0x8000_0001, None, Edx, ext1_edx::RDTSCP),
    ];
    v.extend(zero_leaf(0xd));
    v
}

/// `emulated-ring0`: keep fast strings on, so Linux keeps `rep movsq`/`rep stosq` (REP_GOOD).
pub(super) fn emulated_ring0_msrs() -> Vec<MsrModifier> {
    vec![MsrModifier {
        index: msr::IA32_MISC_ENABLE,
        clear: 0,
        set: msr::MISC_ENABLE_FAST_STRING,
    }]
}
