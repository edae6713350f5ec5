//! CPUID feature bits used by the built-in templates (and handy for custom ones), one module
//! per register. Names follow the Intel SDM / AMD APM (and Linux's `cpufeatures.h`).

/// Leaf 1 ECX.
pub mod leaf1_ecx {
    /// SSE3 (PNI).
    pub const SSE3: u32 = 1 << 0;
    /// PCLMULQDQ.
    pub const PCLMULQDQ: u32 = 1 << 1;
    /// MONITOR / MWAIT.
    pub const MONITOR: u32 = 1 << 3;
    /// Supplemental SSE3.
    pub const SSSE3: u32 = 1 << 9;
    /// FMA (VEX-encoded fused multiply-add).
    pub const FMA: u32 = 1 << 12;
    /// CMPXCHG16B.
    pub const CX16: u32 = 1 << 13;
    /// Process-context identifiers (CR4.PCIDE).
    pub const PCID: u32 = 1 << 17;
    /// SSE4.1.
    pub const SSE4_1: u32 = 1 << 19;
    /// SSE4.2 (includes CRC32).
    pub const SSE4_2: u32 = 1 << 20;
    /// x2APIC.
    pub const X2APIC: u32 = 1 << 21;
    /// MOVBE.
    pub const MOVBE: u32 = 1 << 22;
    /// POPCNT.
    pub const POPCNT: u32 = 1 << 23;
    /// TSC-deadline timer mode of the local APIC.
    pub const TSC_DEADLINE: u32 = 1 << 24;
    /// AES-NI.
    pub const AES: u32 = 1 << 25;
    /// XSAVE/XRSTOR/XSETBV/XGETBV.
    pub const XSAVE: u32 = 1 << 26;
    /// OS has set CR4.OSXSAVE (dynamic bit, mirrors CR4).
    pub const OSXSAVE: u32 = 1 << 27;
    /// AVX.
    pub const AVX: u32 = 1 << 28;
    /// F16C (VEX-encoded half-precision conversion).
    pub const F16C: u32 = 1 << 29;
    /// RDRAND.
    pub const RDRAND: u32 = 1 << 30;
    /// Running under a hypervisor.
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// Leaf 1 EDX.
pub mod leaf1_edx {
    /// x87 FPU.
    pub const FPU: u32 = 1 << 0;
    /// Virtual-8086 mode extensions.
    pub const VME: u32 = 1 << 1;
    /// Debugging extensions.
    pub const DE: u32 = 1 << 2;
    /// Page size extension.
    pub const PSE: u32 = 1 << 3;
    /// Time stamp counter.
    pub const TSC: u32 = 1 << 4;
    /// RDMSR/WRMSR.
    pub const MSR: u32 = 1 << 5;
    /// Physical address extension.
    pub const PAE: u32 = 1 << 6;
    /// Machine check exception.
    pub const MCE: u32 = 1 << 7;
    /// CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// On-chip APIC.
    pub const APIC: u32 = 1 << 9;
    /// SYSENTER/SYSEXIT.
    pub const SEP: u32 = 1 << 11;
    /// Memory type range registers.
    pub const MTRR: u32 = 1 << 12;
    /// Global pages.
    pub const PGE: u32 = 1 << 13;
    /// Machine check architecture.
    pub const MCA: u32 = 1 << 14;
    /// CMOVcc.
    pub const CMOV: u32 = 1 << 15;
    /// Page attribute table.
    pub const PAT: u32 = 1 << 16;
    /// 36-bit page size extension.
    pub const PSE36: u32 = 1 << 17;
    /// CLFLUSH.
    pub const CLFLUSH: u32 = 1 << 19;
    /// MMX.
    pub const MMX: u32 = 1 << 23;
    /// FXSAVE/FXRSTOR.
    pub const FXSR: u32 = 1 << 24;
    /// SSE.
    pub const SSE: u32 = 1 << 25;
    /// SSE2.
    pub const SSE2: u32 = 1 << 26;
    /// Multi-threading / multi-core package (leaf 1 EBX logical count valid).
    pub const HTT: u32 = 1 << 28;
}

/// Leaf 6 EAX (thermal and power management).
pub mod leaf6_eax {
    /// APIC timer always running (not stopped in deep C-states).
    pub const ARAT: u32 = 1 << 2;
}

/// Leaf 7 subleaf 0 EBX.
pub mod leaf7_ebx {
    /// RDFSBASE/RDGSBASE/WRFSBASE/WRGSBASE.
    pub const FSGSBASE: u32 = 1 << 0;
    /// IA32_TSC_ADJUST MSR.
    pub const TSC_ADJUST: u32 = 1 << 1;
    /// Software Guard Extensions.
    pub const SGX: u32 = 1 << 2;
    /// BMI1 (ANDN, BEXTR, BLSI, ..., TZCNT).
    pub const BMI1: u32 = 1 << 3;
    /// Hardware lock elision (TSX).
    pub const HLE: u32 = 1 << 4;
    /// AVX2.
    pub const AVX2: u32 = 1 << 5;
    /// x87 FPU data pointer updated only on exceptions.
    pub const FDP_EXCPTN_ONLY: u32 = 1 << 6;
    /// Supervisor-mode execution prevention.
    pub const SMEP: u32 = 1 << 7;
    /// BMI2 (BZHI, MULX, PDEP, PEXT, RORX, SARX, ...).
    pub const BMI2: u32 = 1 << 8;
    /// Enhanced REP MOVSB/STOSB.
    pub const ERMS: u32 = 1 << 9;
    /// INVPCID.
    pub const INVPCID: u32 = 1 << 10;
    /// Restricted transactional memory (TSX: XBEGIN/XEND/XABORT/XTEST).
    pub const RTM: u32 = 1 << 11;
    /// Resource director technology monitoring.
    pub const RDT_M: u32 = 1 << 12;
    /// FPU CS and DS deprecated (stored as zero).
    pub const ZERO_FCS_FDS: u32 = 1 << 13;
    /// Memory protection extensions.
    pub const MPX: u32 = 1 << 14;
    /// Resource director technology allocation.
    pub const RDT_A: u32 = 1 << 15;
    /// AVX-512 Foundation.
    pub const AVX512F: u32 = 1 << 16;
    /// AVX-512 doubleword and quadword.
    pub const AVX512DQ: u32 = 1 << 17;
    /// RDSEED.
    pub const RDSEED: u32 = 1 << 18;
    /// ADCX/ADOX.
    pub const ADX: u32 = 1 << 19;
    /// Supervisor-mode access prevention (CLAC/STAC).
    pub const SMAP: u32 = 1 << 20;
    /// AVX-512 integer FMA.
    pub const AVX512_IFMA: u32 = 1 << 21;
    /// CLFLUSHOPT.
    pub const CLFLUSHOPT: u32 = 1 << 23;
    /// CLWB.
    pub const CLWB: u32 = 1 << 24;
    /// Processor trace.
    pub const PT: u32 = 1 << 25;
    /// AVX-512 prefetch.
    pub const AVX512PF: u32 = 1 << 26;
    /// AVX-512 exponential and reciprocal.
    pub const AVX512ER: u32 = 1 << 27;
    /// AVX-512 conflict detection.
    pub const AVX512CD: u32 = 1 << 28;
    /// SHA extensions.
    pub const SHA: u32 = 1 << 29;
    /// AVX-512 byte and word.
    pub const AVX512BW: u32 = 1 << 30;
    /// AVX-512 vector length extensions.
    pub const AVX512VL: u32 = 1 << 31;
}

/// Leaf 7 subleaf 0 ECX.
pub mod leaf7_ecx {
    /// PREFETCHWT1.
    pub const PREFETCHWT1: u32 = 1 << 0;
    /// AVX-512 vector bit manipulation.
    pub const AVX512_VBMI: u32 = 1 << 1;
    /// User-mode instruction prevention.
    pub const UMIP: u32 = 1 << 2;
    /// Protection keys for user pages (RDPKRU/WRPKRU).
    pub const PKU: u32 = 1 << 3;
    /// OS has set CR4.PKE (dynamic bit).
    pub const OSPKE: u32 = 1 << 4;
    /// UMONITOR/UMWAIT/TPAUSE.
    pub const WAITPKG: u32 = 1 << 5;
    /// AVX-512 VBMI2.
    pub const AVX512_VBMI2: u32 = 1 << 6;
    /// CET shadow stacks.
    pub const CET_SS: u32 = 1 << 7;
    /// Galois field instructions.
    pub const GFNI: u32 = 1 << 8;
    /// VEX/EVEX-encoded AES.
    pub const VAES: u32 = 1 << 9;
    /// VEX/EVEX-encoded PCLMULQDQ.
    pub const VPCLMULQDQ: u32 = 1 << 10;
    /// AVX-512 vector neural network instructions.
    pub const AVX512_VNNI: u32 = 1 << 11;
    /// AVX-512 BITALG.
    pub const AVX512_BITALG: u32 = 1 << 12;
    /// AVX-512 VPOPCNTDQ.
    pub const AVX512_VPOPCNTDQ: u32 = 1 << 14;
    /// 5-level paging.
    pub const LA57: u32 = 1 << 16;
    /// RDPID.
    pub const RDPID: u32 = 1 << 22;
    /// Key locker.
    pub const KL: u32 = 1 << 23;
    /// CLDEMOTE.
    pub const CLDEMOTE: u32 = 1 << 25;
    /// MOVDIRI.
    pub const MOVDIRI: u32 = 1 << 27;
    /// MOVDIR64B.
    pub const MOVDIR64B: u32 = 1 << 28;
    /// ENQCMD.
    pub const ENQCMD: u32 = 1 << 29;
    /// Protection keys for supervisor pages.
    pub const PKS: u32 = 1 << 31;
}

/// Leaf 7 subleaf 0 EDX.
pub mod leaf7_edx {
    /// AVX-512 4VNNIW.
    pub const AVX512_4VNNIW: u32 = 1 << 2;
    /// AVX-512 4FMAPS.
    pub const AVX512_4FMAPS: u32 = 1 << 3;
    /// Fast short REP MOVSB.
    pub const FSRM: u32 = 1 << 4;
    /// User interrupts.
    pub const UINTR: u32 = 1 << 5;
    /// AVX-512 VP2INTERSECT.
    pub const AVX512_VP2INTERSECT: u32 = 1 << 8;
    /// VERW clears CPU buffers (MDS mitigation).
    pub const MD_CLEAR: u32 = 1 << 10;
    /// SERIALIZE.
    pub const SERIALIZE: u32 = 1 << 14;
    /// TSX suspend load address tracking.
    pub const TSXLDTRK: u32 = 1 << 16;
    /// PCONFIG.
    pub const PCONFIG: u32 = 1 << 18;
    /// Architectural LBRs.
    pub const ARCH_LBR: u32 = 1 << 19;
    /// CET indirect branch tracking.
    pub const CET_IBT: u32 = 1 << 20;
    /// AMX BF16.
    pub const AMX_BF16: u32 = 1 << 22;
    /// AVX-512 FP16.
    pub const AVX512_FP16: u32 = 1 << 23;
    /// AMX tiles.
    pub const AMX_TILE: u32 = 1 << 24;
    /// AMX INT8.
    pub const AMX_INT8: u32 = 1 << 25;
    /// IBRS and IBPB (IA32_SPEC_CTRL, IA32_PRED_CMD).
    pub const SPEC_CTRL: u32 = 1 << 26;
    /// Single-thread indirect branch predictors.
    pub const STIBP: u32 = 1 << 27;
    /// IA32_FLUSH_CMD (L1D flush).
    pub const FLUSH_L1D: u32 = 1 << 28;
    /// IA32_ARCH_CAPABILITIES MSR.
    pub const ARCH_CAPABILITIES: u32 = 1 << 29;
    /// IA32_CORE_CAPABILITIES MSR.
    pub const CORE_CAPABILITIES: u32 = 1 << 30;
    /// Speculative store bypass disable.
    pub const SSBD: u32 = 1 << 31;
}

/// Leaf 7 subleaf 1 EAX.
pub mod leaf7_1_eax {
    /// AVX-VNNI (VEX-encoded).
    pub const AVX_VNNI: u32 = 1 << 4;
    /// AVX-512 BF16.
    pub const AVX512_BF16: u32 = 1 << 5;
    /// Fast zero-length REP MOVSB.
    pub const FZLRM: u32 = 1 << 10;
    /// Fast short REP STOSB.
    pub const FSRS: u32 = 1 << 11;
    /// Fast short REP CMPSB/SCASB.
    pub const FSRCS: u32 = 1 << 12;
    /// Flexible return and event delivery.
    pub const FRED: u32 = 1 << 17;
    /// LKGS.
    pub const LKGS: u32 = 1 << 18;
    /// WRMSRNS.
    pub const WRMSRNS: u32 = 1 << 19;
}

/// Leaf 0x8000_0001 ECX.
pub mod ext1_ecx {
    /// LAHF/SAHF in 64-bit mode.
    pub const LAHF_LM: u32 = 1 << 0;
    /// LZCNT (AMD: ABM).
    pub const ABM: u32 = 1 << 5;
    /// SSE4a.
    pub const SSE4A: u32 = 1 << 6;
    /// Misaligned SSE mode.
    pub const MISALIGNSSE: u32 = 1 << 7;
    /// PREFETCHW.
    pub const PREFETCHW: u32 = 1 << 8;
    /// XOP.
    pub const XOP: u32 = 1 << 11;
    /// FMA4.
    pub const FMA4: u32 = 1 << 16;
    /// Trailing bit manipulation.
    pub const TBM: u32 = 1 << 21;
    /// MONITORX/MWAITX.
    pub const MONITORX: u32 = 1 << 29;
}

/// Leaf 0x8000_0001 EDX.
pub mod ext1_edx {
    /// SYSCALL/SYSRET.
    pub const SYSCALL: u32 = 1 << 11;
    /// No-execute pages.
    pub const NX: u32 = 1 << 20;
    /// 1 GiB pages.
    pub const PDPE1GB: u32 = 1 << 26;
    /// RDTSCP.
    pub const RDTSCP: u32 = 1 << 27;
    /// Long mode.
    pub const LM: u32 = 1 << 29;
}

/// Leaf 0x8000_0007 EDX.
pub mod ext7_edx {
    /// Invariant TSC.
    pub const INVARIANT_TSC: u32 = 1 << 8;
}

/// Linux's name (as in `/proc/cpuinfo` and accepted by the `clearcpuid=` kernel parameter,
/// Linux 5.19+) for each feature bit that has one among the bits of this module: `(leaf,
/// subleaf, register, bit mask, name)`. XSAVE is better turned off with the `noxsave` parameter
/// (it also stops the FPU code from using XSAVE before `clearcpuid` takes effect).
pub const LINUX_NAMES: &[(u32, u32, super::Register, u32, &str)] = {
    use super::Register::{Ebx, Ecx, Edx};
    &[
        (1, 0, Ecx, leaf1_ecx::SSE3, "pni"),
        (1, 0, Ecx, leaf1_ecx::PCLMULQDQ, "pclmulqdq"),
        (1, 0, Ecx, leaf1_ecx::MONITOR, "monitor"),
        (1, 0, Ecx, leaf1_ecx::SSSE3, "ssse3"),
        (1, 0, Ecx, leaf1_ecx::FMA, "fma"),
        (1, 0, Ecx, leaf1_ecx::CX16, "cx16"),
        (1, 0, Ecx, leaf1_ecx::PCID, "pcid"),
        (1, 0, Ecx, leaf1_ecx::SSE4_1, "sse4_1"),
        (1, 0, Ecx, leaf1_ecx::SSE4_2, "sse4_2"),
        (1, 0, Ecx, leaf1_ecx::X2APIC, "x2apic"),
        (1, 0, Ecx, leaf1_ecx::MOVBE, "movbe"),
        (1, 0, Ecx, leaf1_ecx::POPCNT, "popcnt"),
        (1, 0, Ecx, leaf1_ecx::AES, "aes"),
        (1, 0, Ecx, leaf1_ecx::XSAVE, "xsave"),
        (1, 0, Ecx, leaf1_ecx::AVX, "avx"),
        (1, 0, Ecx, leaf1_ecx::F16C, "f16c"),
        (1, 0, Ecx, leaf1_ecx::RDRAND, "rdrand"),
        (7, 0, Ebx, leaf7_ebx::FSGSBASE, "fsgsbase"),
        (7, 0, Ebx, leaf7_ebx::SGX, "sgx"),
        (7, 0, Ebx, leaf7_ebx::BMI1, "bmi1"),
        (7, 0, Ebx, leaf7_ebx::HLE, "hle"),
        (7, 0, Ebx, leaf7_ebx::AVX2, "avx2"),
        (7, 0, Ebx, leaf7_ebx::SMEP, "smep"),
        (7, 0, Ebx, leaf7_ebx::BMI2, "bmi2"),
        (7, 0, Ebx, leaf7_ebx::ERMS, "erms"),
        (7, 0, Ebx, leaf7_ebx::INVPCID, "invpcid"),
        (7, 0, Ebx, leaf7_ebx::RTM, "rtm"),
        (7, 0, Ebx, leaf7_ebx::MPX, "mpx"),
        (7, 0, Ebx, leaf7_ebx::AVX512F, "avx512f"),
        (7, 0, Ebx, leaf7_ebx::AVX512DQ, "avx512dq"),
        (7, 0, Ebx, leaf7_ebx::RDSEED, "rdseed"),
        (7, 0, Ebx, leaf7_ebx::ADX, "adx"),
        (7, 0, Ebx, leaf7_ebx::SMAP, "smap"),
        (7, 0, Ebx, leaf7_ebx::AVX512_IFMA, "avx512ifma"),
        (7, 0, Ebx, leaf7_ebx::CLFLUSHOPT, "clflushopt"),
        (7, 0, Ebx, leaf7_ebx::CLWB, "clwb"),
        (7, 0, Ebx, leaf7_ebx::PT, "intel_pt"),
        (7, 0, Ebx, leaf7_ebx::AVX512PF, "avx512pf"),
        (7, 0, Ebx, leaf7_ebx::AVX512ER, "avx512er"),
        (7, 0, Ebx, leaf7_ebx::AVX512CD, "avx512cd"),
        (7, 0, Ebx, leaf7_ebx::SHA, "sha_ni"),
        (7, 0, Ebx, leaf7_ebx::AVX512BW, "avx512bw"),
        (7, 0, Ebx, leaf7_ebx::AVX512VL, "avx512vl"),
        (7, 0, Ecx, leaf7_ecx::AVX512_VBMI, "avx512vbmi"),
        (7, 0, Ecx, leaf7_ecx::UMIP, "umip"),
        (7, 0, Ecx, leaf7_ecx::PKU, "pku"),
        (7, 0, Ecx, leaf7_ecx::OSPKE, "ospke"),
        (7, 0, Ecx, leaf7_ecx::WAITPKG, "waitpkg"),
        (7, 0, Ecx, leaf7_ecx::AVX512_VBMI2, "avx512_vbmi2"),
        (7, 0, Ecx, leaf7_ecx::CET_SS, "user_shstk"),
        (7, 0, Ecx, leaf7_ecx::GFNI, "gfni"),
        (7, 0, Ecx, leaf7_ecx::VAES, "vaes"),
        (7, 0, Ecx, leaf7_ecx::VPCLMULQDQ, "vpclmulqdq"),
        (7, 0, Ecx, leaf7_ecx::AVX512_VNNI, "avx512_vnni"),
        (7, 0, Ecx, leaf7_ecx::AVX512_BITALG, "avx512_bitalg"),
        (7, 0, Ecx, leaf7_ecx::AVX512_VPOPCNTDQ, "avx512_vpopcntdq"),
        (7, 0, Ecx, leaf7_ecx::LA57, "la57"),
        (7, 0, Ecx, leaf7_ecx::RDPID, "rdpid"),
        (7, 0, Ecx, leaf7_ecx::CLDEMOTE, "cldemote"),
        (7, 0, Ecx, leaf7_ecx::MOVDIRI, "movdiri"),
        (7, 0, Ecx, leaf7_ecx::MOVDIR64B, "movdir64b"),
        (7, 0, Ecx, leaf7_ecx::ENQCMD, "enqcmd"),
        (7, 0, Edx, leaf7_edx::AVX512_4VNNIW, "avx512_4vnniw"),
        (7, 0, Edx, leaf7_edx::AVX512_4FMAPS, "avx512_4fmaps"),
        (7, 0, Edx, leaf7_edx::FSRM, "fsrm"),
        (
            7,
            0,
            Edx,
            leaf7_edx::AVX512_VP2INTERSECT,
            "avx512_vp2intersect",
        ),
        (7, 0, Edx, leaf7_edx::MD_CLEAR, "md_clear"),
        (7, 0, Edx, leaf7_edx::SERIALIZE, "serialize"),
        (7, 0, Edx, leaf7_edx::TSXLDTRK, "tsxldtrk"),
        (7, 0, Edx, leaf7_edx::PCONFIG, "pconfig"),
        (7, 0, Edx, leaf7_edx::ARCH_LBR, "arch_lbr"),
        (7, 0, Edx, leaf7_edx::CET_IBT, "ibt"),
        (7, 0, Edx, leaf7_edx::AMX_BF16, "amx_bf16"),
        (7, 0, Edx, leaf7_edx::AVX512_FP16, "avx512_fp16"),
        (7, 0, Edx, leaf7_edx::AMX_TILE, "amx_tile"),
        (7, 0, Edx, leaf7_edx::AMX_INT8, "amx_int8"),
        (
            7,
            1,
            super::Register::Eax,
            leaf7_1_eax::AVX_VNNI,
            "avx_vnni",
        ),
        (
            7,
            1,
            super::Register::Eax,
            leaf7_1_eax::AVX512_BF16,
            "avx512_bf16",
        ),
        (7, 1, super::Register::Eax, leaf7_1_eax::FZLRM, "fzrm"),
        (7, 1, super::Register::Eax, leaf7_1_eax::FSRS, "fsrs"),
        (7, 1, super::Register::Eax, leaf7_1_eax::FSRCS, "fsrc"),
        (7, 1, super::Register::Eax, leaf7_1_eax::FRED, "fred"),
        (7, 1, super::Register::Eax, leaf7_1_eax::LKGS, "lkgs"),
        (7, 1, super::Register::Eax, leaf7_1_eax::WRMSRNS, "wrmsrns"),
        (0x8000_0001, 0, Ecx, ext1_ecx::ABM, "abm"),
        (0x8000_0001, 0, Ecx, ext1_ecx::SSE4A, "sse4a"),
        (0x8000_0001, 0, Ecx, ext1_ecx::MISALIGNSSE, "misalignsse"),
        (0x8000_0001, 0, Ecx, ext1_ecx::XOP, "xop"),
        (0x8000_0001, 0, Ecx, ext1_ecx::FMA4, "fma4"),
        (0x8000_0001, 0, Ecx, ext1_ecx::TBM, "tbm"),
        (0x8000_0001, 0, Ecx, ext1_ecx::MONITORX, "mwaitx"),
        (0x8000_0001, 0, Edx, ext1_edx::PDPE1GB, "pdpe1gb"),
        (0x8000_0001, 0, Edx, ext1_edx::RDTSCP, "rdtscp"),
    ]
};

/// Linux's name for one feature bit (`bit` is a mask with one bit set), from [`LINUX_NAMES`].
pub fn linux_name(
    leaf: u32,
    subleaf: u32,
    register: super::Register,
    bit: u32,
) -> Option<&'static str> {
    LINUX_NAMES
        .iter()
        .find(|&&(l, s, r, b, _)| l == leaf && s == subleaf && r == register && b == bit)
        .map(|&(.., name)| name)
}
