//! CPU templates: named CPUID and MSR masks applied on top of what KVM supports.
//!
//! A [`CpuTemplate`] is a list of [`CpuidModifier`]s (per leaf/subleaf/register: bits forced to
//! 0 and bits required to be 1) and [`MsrModifier`]s. The built-in ones ([`CpuTemplate::builtin`],
//! [`BUILTIN_NAMES`]):
//!
//! - **`host`** (the default): no modifiers; the guest sees KVM's supported CPUID as
//!   [normalised](crate::cpuid::normalize).
//! - **`minimal`**: a conservative baseline for snapshot portability across hosts: x86-64-v2
//!   (SSE3, SSSE3, SSE4.1/4.2, POPCNT, CMPXCHG16B, LAHF/SAHF) plus the system features every
//!   x86-64 server since ~2013 has (PCID, x2APIC, TSC-deadline, FSGSBASE, SMEP, SMAP, ERMS,
//!   INVPCID, CLFLUSHOPT, UMIP, RDTSCP, 1 GiB pages, invariant TSC) and the speculation-control
//!   bits (so that guests keep their mitigations). Everything else in the feature registers is
//!   cleared: AVX/AVX2/AVX-512/AMX, FMA, F16C, BMI1/2, ADX, AES, PCLMULQDQ, SHA, GFNI, MOVBE,
//!   RDRAND/RDSEED, TSX (HLE, RTM, TSXLDTRK), PKU, WAITPKG, MPX, SGX, PT, CET, LA57, RDPID,
//!   MOVDIRI/MOVDIR64B, leaf 7.1; XSAVE (and leaf 0xd), since XSAVE area layouts differ between
//!   CPU generations; the architectural perfmon leaf 0xa, SGX leaf 0x12 and PT leaf 0x14 are
//!   zeroed. MSRs: IA32_ARCH_CAPABILITIES bit 7 (TSX_CTRL) is cleared, as TSX is hidden and not
//!   every host has the TSX_CTRL MSR.
//! - **`emulated-ring0`**: for hosts whose KVM runs guest ring 0 (and real mode) through its
//!   instruction emulator (PVM). It hides every feature whose instructions the emulator was
//!   measured to refuse, fault on or execute wrongly in ring 0 (see `tests/emulator.rs`), and
//!   the byte-granular fast-string hints (under the emulator a REP iteration costs about as much
//!   as an instruction, so `rep movsb`/`rep stosb` are 8x slower than the `rep movsq`/`rep
//!   stosq` Linux uses without ERMS/FSRM). Details in [`CpuTemplate::builtin`].
//!
//! # Order and the "never widen" rule
//!
//! A vCPU's table is built as: [`cpuid::supported`] →
//! [`cpuid::normalize`] (topology, hypervisor and timing leaves) →
//! [`CpuTemplate::apply`] ([`CpuTemplate::vcpu_cpuid`] does all three). The template comes last,
//! so it has the final say, and its `set` bits are checked against the normalised table KVM
//! gave: in a feature register a template may only *require* bits that are already there
//! (`set` ⊆ current value), otherwise [`apply`](CpuTemplate::apply) fails with
//! [`Error::TemplateSetsUnsupported`]. So a template can never make the guest believe in
//! something KVM cannot virtualise. `set` is free only in the identification registers (leaf 1
//! EAX (family/model/stepping), leaf 0x8000_0001 EAX, brand string leaves
//! 0x8000_0002..=0x8000_0004), see [`set_is_free`].
//!
//! # Hosts whose KVM overrides the table
//!
//! Standard KVM gives the guest exactly the table set with `KVM_SET_CPUID2`. The PVM build on
//! the hosts Ember is developed on does not: it replaces leaves 6, 7.0, 7.1, 0xd (and a few
//! others) with fixed values and forces the hardware's instruction-set bits (POPCNT, XSAVE, AVX,
//! SSE4.x, ...) into leaf 1, so there the template only takes effect for the remaining bits
//! (e.g. leaf 1 CX16, leaf 0x8000_0001 RDTSCP/LZCNT, topology). [`overridden_bits`] compares
//! the requested table with the vCPU's effective one
//! ([`Vcpu::effective_cpuid`](crate::Vcpu::effective_cpuid)) and [`linux_clearcpuid`] turns the
//! difference into the kernel parameters that hide the rest from Linux (`noxsave`,
//! `clearcpuid=...`).
//!
//! MSR modifiers are limited to IA32_MISC_ENABLE and IA32_ARCH_CAPABILITIES (see
//! [`msr_settable_bits`]); [`Vcpu::set_msr_modifiers`](crate::Vcpu::set_msr_modifiers) stores
//! them and [`Vcpu::configure`](crate::Vcpu::configure) /
//! [`Vcpu::configure_ap`](crate::Vcpu::configure_ap) apply them after the boot MSRs.
//!
//! # JSON
//!
//! Numbers are accepted as JSON numbers or as strings (`"0x00000200"`, `"512"`); they are written
//! as hex strings. `subleaf` absent or `null` means "every subleaf of the leaf". Unknown fields
//! are errors.
//!
//! ```
//! use ember_vcpu::template::CpuTemplate;
//!
//! let t = CpuTemplate::from_json(r#"{
//!     "name": "no-avx2",
//!     "cpuid": [
//!         { "leaf": "0x7", "subleaf": 0, "register": "ebx", "clear": "0x00000020" },
//!         { "leaf": 13, "register": "eax", "clear": "0xffffffff" }
//!     ],
//!     "msrs": [ { "index": "0x1a0", "set": "0x1" } ]
//! }"#)?;
//! assert_eq!(t.cpuid[0].clear, 1 << 5);
//! assert_eq!(t.cpuid[1].subleaf, None);
//! assert_eq!(CpuTemplate::from_json(&t.to_json())?, t);
//! assert!(CpuTemplate::builtin("emulated-ring0").is_some());
//! # Ok::<(), ember_vcpu::Error>(())
//! ```

mod builtin;
pub mod features;

use std::fmt;
use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

use crate::{cpuid, msr, Error};

/// Name of the built-in template that changes nothing.
pub const HOST: &str = "host";
/// Name of the built-in portable baseline template.
pub const MINIMAL: &str = "minimal";
/// Name of the built-in template for hosts whose KVM emulates guest ring 0.
pub const EMULATED_RING0: &str = "emulated-ring0";
/// The names [`CpuTemplate::builtin`] knows, default first.
pub const BUILTIN_NAMES: [&str; 3] = [HOST, MINIMAL, EMULATED_RING0];

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Register {
    /// EAX.
    #[serde(alias = "EAX")]
    Eax,
    /// EBX.
    #[serde(alias = "EBX")]
    Ebx,
    /// ECX.
    #[serde(alias = "ECX")]
    Ecx,
    /// EDX.
    #[serde(alias = "EDX")]
    Edx,
}

impl Register {
    /// All four, in order.
    pub const ALL: [Register; 4] = [Register::Eax, Register::Ebx, Register::Ecx, Register::Edx];

    /// The register's value in `entry`.
    pub fn get(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            Register::Eax => entry.eax,
            Register::Ebx => entry.ebx,
            Register::Ecx => entry.ecx,
            Register::Edx => entry.edx,
        }
    }

    /// The register in `entry`, for writing.
    pub fn get_mut(self, entry: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Register::Eax => &mut entry.eax,
            Register::Ebx => &mut entry.ebx,
            Register::Ecx => &mut entry.ecx,
            Register::Edx => &mut entry.edx,
        }
    }
}

impl fmt::Display for Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Register::Eax => "EAX",
            Register::Ebx => "EBX",
            Register::Ecx => "ECX",
            Register::Edx => "EDX",
        })
    }
}

/// One register of one CPUID leaf (or of every subleaf of it): new value =
/// `(old & !clear) | set` (a bit in both is set: `clear` = a field's mask and `set` = its new
/// value replaces a field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidModifier {
    /// The leaf (CPUID function, EAX input).
    #[serde(with = "num::hex32")]
    pub leaf: u32,
    /// The subleaf (ECX input); `None` = every subleaf KVM reports for the leaf.
    #[serde(default, with = "num::opt32", skip_serializing_if = "Option::is_none")]
    pub subleaf: Option<u32>,
    /// The register.
    pub register: Register,
    /// Bits forced to 0.
    #[serde(default, with = "num::hex32")]
    pub clear: u32,
    /// Bits forced to 1. Outside the identification registers ([`set_is_free`]) these must
    /// already be set in the table the template is applied to (KVM must support them).
    #[serde(default, with = "num::hex32")]
    pub set: u32,
}

impl CpuidModifier {
    /// A modifier clearing `bits` of `register` in `leaf` / `subleaf`.
    pub const fn clear(leaf: u32, subleaf: Option<u32>, register: Register, bits: u32) -> Self {
        CpuidModifier {
            leaf,
            subleaf,
            register,
            clear: bits,
            set: 0,
        }
    }

    /// Whether this modifier applies to `entry`.
    pub fn matches(&self, entry: &kvm_cpuid_entry2) -> bool {
        entry.function == self.leaf && self.subleaf.unwrap_or(entry.index) == entry.index
    }
}

/// One MSR: value written = `(value after the boot MSRs & !clear) | set`. See
/// [`msr_settable_bits`] for which MSRs and which `set` bits are accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// The MSR number.
    #[serde(with = "num::hex32")]
    pub index: u32,
    /// Bits forced to 0.
    #[serde(default, with = "num::hex64")]
    pub clear: u64,
    /// Bits forced to 1.
    #[serde(default, with = "num::hex64")]
    pub set: u64,
}

/// A named set of CPUID and MSR modifiers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTemplate {
    /// The template's name (for messages; built-ins use [`BUILTIN_NAMES`]).
    pub name: String,
    /// CPUID modifiers, applied in order.
    #[serde(default)]
    pub cpuid: Vec<CpuidModifier>,
    /// MSR modifiers, applied in order.
    #[serde(default)]
    pub msrs: Vec<MsrModifier>,
}

impl Default for CpuTemplate {
    /// The `host` template (no modifiers).
    fn default() -> Self {
        CpuTemplate {
            name: HOST.to_string(),
            cpuid: Vec::new(),
            msrs: Vec::new(),
        }
    }
}

/// Whether `set` bits of `register` in `leaf` may be anything (identification values: family,
/// model, stepping, brand string) rather than only bits KVM already reports.
pub fn set_is_free(leaf: u32, register: Register) -> bool {
    matches!(
        (leaf, register),
        (1, Register::Eax) | (0x8000_0001, Register::Eax) | (0x8000_0002..=0x8000_0004, _)
    )
}

/// The MSRs a template may modify and the bits its `set` may turn on regardless of their
/// current value; `None` for MSRs templates may not touch.
///
/// - IA32_MISC_ENABLE (0x1a0): any bit may be cleared; `set` may turn on fast strings (bit 0)
///   and the "BTS unavailable" / "PEBS unavailable" bits (11, 12), which only take features
///   away. Linux disables its `rep movs`/`rep stos` string routines (REP_GOOD, ERMS) when fast
///   strings are off.
/// - IA32_ARCH_CAPABILITIES (0x10a): bits may be cleared (the guest then assumes it is
///   vulnerable or lacks the control, and mitigates more); `set` may only repeat bits KVM
///   already reports (claiming immunity that the host lacks would be a security hole).
pub fn msr_settable_bits(index: u32) -> Option<u64> {
    match index {
        msr::IA32_MISC_ENABLE => Some(
            msr::MISC_ENABLE_FAST_STRING
                | msr::MISC_ENABLE_BTS_UNAVAILABLE
                | msr::MISC_ENABLE_PEBS_UNAVAILABLE,
        ),
        msr::IA32_ARCH_CAPABILITIES => Some(0),
        _ => None,
    }
}

/// Largest CPU template file [`CpuTemplate::from_file`] reads (1 MiB).
pub const MAX_TEMPLATE_FILE_SIZE: u64 = 1 << 20;

/// Reads a regular file of at most `max` bytes, opened with `O_NONBLOCK` so that a FIFO or a
/// device is refused without blocking.
fn read_small_regular_file(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

impl CpuTemplate {
    /// A built-in template by name (one of [`BUILTIN_NAMES`]), `None` for other names.
    ///
    /// `emulated-ring0` clears (measured in ring 0 on a PVM host, `tests/emulator.rs`):
    ///
    /// | register | bits | why |
    /// |---|---|---|
    /// | 1 ECX | XSAVE, OSXSAVE, AVX, FMA, F16C | `xgetbv`/`xrstor` and VEX refused |
    /// | 1 ECX | CX16 | `lock cmpxchg16b` refused (SLUB) |
    /// | 1 ECX | POPCNT | refused (`hweight`) |
    /// | 1 ECX | SSE3, SSSE3, SSE4.1, SSE4.2, PCLMULQDQ, AES | refused (crc32c, crypto) |
    /// | 1 ECX | MOVBE | `#UD` even when advertised |
    /// | 1 ECX | MONITOR | `monitor` refused |
    /// | 7.0 EBX | BMI1, BMI2, AVX2, AVX-512 (all), SHA | VEX/EVEX/SHA refused; `tzcnt` runs as `bsf` |
    /// | 7.0 EBX | ADX | `adcx` refused |
    /// | 7.0 EBX | SMAP | `clac`/`stac` refused (or `#UD`) |
    /// | 7.0 EBX | SMEP | PVM runs guest ring 0 at host CPL 3, where SMEP/SMAP mean nothing; not offered by PVM |
    /// | 7.0 EBX | FSGSBASE | not offered by PVM (`rd/wrfsbase` were measured to work) |
    /// | 7.0 EBX | INVPCID | refused |
    /// | 7.0 EBX | HLE, RTM | `xbegin` faults, `xtest` refused |
    /// | 7.0 EBX | CLWB | refused |
    /// | 7.0 EBX | MPX, SGX, PT | need XSAVE state / ENCLS |
    /// | 7.0 EBX | ERMS | speed: `rep stosb` is 8x slower than `rep stosq` here |
    /// | 7.0 ECX | PKU, OSPKE | `rdpkru` refused |
    /// | 7.0 ECX | WAITPKG | `tpause` (Linux's `udelay`) not emulated |
    /// | 7.0 ECX | RDPID | `#UD` even when advertised |
    /// | 7.0 ECX | MOVDIRI, MOVDIR64B, ENQCMD | refused |
    /// | 7.0 ECX | GFNI, VAES, VPCLMULQDQ, AVX-512 (all), PREFETCHWT1, KL, CET_SS, PKS | refused / need XSAVE |
    /// | 7.0 EDX | FSRM | speed (as ERMS) |
    /// | 7.0 EDX | TSXLDTRK, AMX, AVX-512 (all), UINTR, CET_IBT, ARCH_LBR, PCONFIG | refused / need XSAVE |
    /// | 7.1 EAX, EDX | all | VEX (AVX-VNNI, ...), FRED, LKGS, WRMSRNS; FZLRM/FSRS/FSRCS (speed) |
    /// | 0xd | all subleaves, all registers | no XSAVE |
    /// | 0x8000_0001 ECX | ABM (LZCNT) | runs as `bsr`: wrong results |
    /// | 0x8000_0001 ECX | SSE4A, MISALIGNSSE, XOP, FMA4, TBM, MONITORX | AMD SSE/VEX extensions |
    /// | 0x8000_0001 EDX | RDTSCP | refused (Linux's `rdtsc_ordered`) |
    ///
    /// and sets IA32_MISC_ENABLE fast strings (bit 0), so that Linux keeps REP_GOOD (`rep
    /// movsq`/`rep stosq`, the fast path under the emulator). Kept because measured to work:
    /// RDRAND, RDSEED, CLFLUSHOPT, CLDEMOTE, SERIALIZE, `swapgs`, `lfence`/`mfence`/`sfence`,
    /// `fxsave`/`fxrstor`; kept because they add no instruction: LA57, PCID, UMIP, x2APIC,
    /// TSC-deadline. Not maskable through CPUID and still refused: `int3`, `fwait`, x87 and SSE
    /// arithmetic (`fld1`, `ldmxcsr`, `pxor`, ...), `verw` (Linux's "clear CPU buffers"
    /// mitigation; not used when IA32_ARCH_CAPABILITIES says MDS_NO/TAA_NO/..., as on the PVM
    /// host, or with `mitigations=off`).
    ///
    /// Where the host's KVM overrides parts of the table (see the module docs), some of these
    /// bits stay visible; [`overridden_bits`] finds them.
    pub fn builtin(name: &str) -> Option<CpuTemplate> {
        let (cpuid, msrs) = match name {
            HOST => (Vec::new(), Vec::new()),
            MINIMAL => (builtin::minimal_cpuid(), builtin::minimal_msrs()),
            EMULATED_RING0 => (
                builtin::emulated_ring0_cpuid(),
                builtin::emulated_ring0_msrs(),
            ),
            _ => return None,
        };
        Some(CpuTemplate {
            name: name.to_string(),
            cpuid,
            msrs,
        })
    }

    /// [`CpuTemplate::builtin`], with [`Error::UnknownTemplate`] for unknown names.
    pub fn by_name(name: &str) -> Result<CpuTemplate, Error> {
        Self::builtin(name).ok_or_else(|| Error::UnknownTemplate {
            name: name.to_string(),
        })
    }

    /// Parses and [validates](CpuTemplate::validate) a JSON template.
    pub fn from_json(json: &str) -> Result<CpuTemplate, Error> {
        let template: CpuTemplate = serde_json::from_str(json).map_err(Error::TemplateJson)?;
        template.validate()?;
        Ok(template)
    }

    /// Reads a JSON template file ([`CpuTemplate::from_json`]).
    ///
    /// The file must be a regular file of at most [`MAX_TEMPLATE_FILE_SIZE`] bytes: it is opened
    /// without blocking (`O_NONBLOCK`), so a FIFO or device is refused at once rather than
    /// waited on or read without end.
    pub fn from_file(path: &Path) -> Result<CpuTemplate, Error> {
        let file_err = |source| Error::TemplateFile {
            path: path.to_path_buf(),
            source,
        };
        let bytes = read_small_regular_file(path, MAX_TEMPLATE_FILE_SIZE).map_err(file_err)?;
        let json = String::from_utf8(bytes)
            .map_err(|e| file_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        Self::from_json(&json)
    }

    /// The template as pretty-printed JSON (numbers as hex strings); [`CpuTemplate::from_json`]
    /// reads it back unchanged.
    pub fn to_json(&self) -> String {
        // Serialising plain structs of integers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks what can be checked without a CPUID table or a vCPU: a non-empty name and MSR
    /// modifiers only for the MSRs of [`msr_settable_bits`]. Errors: [`Error::InvalidTemplate`].
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidTemplate {
            template: self.name.clone(),
            reason,
        };
        if self.name.trim().is_empty() {
            return Err(invalid("empty name".to_string()));
        }
        for m in &self.msrs {
            if msr_settable_bits(m.index).is_none() {
                return Err(invalid(format!(
                    "MSR {:#x} cannot be modified by a template (allowed: {:#x}, {:#x})",
                    m.index,
                    msr::IA32_MISC_ENABLE,
                    msr::IA32_ARCH_CAPABILITIES
                )));
            }
        }
        Ok(())
    }

    /// Applies the CPUID modifiers to `cpuid` (a [normalised](crate::cpuid::normalize) copy of
    /// [`cpuid::supported`]): for every entry a modifier
    /// [matches](CpuidModifier::matches), `reg = (reg & !clear) | set`.
    ///
    /// Errors, leaving `cpuid` unchanged: [`Error::InvalidTemplate`] (see
    /// [`CpuTemplate::validate`]); [`Error::TemplateSetsUnsupported`] when a modifier sets bits
    /// that are not already set in a register where [`set_is_free`] is false, or sets bits in
    /// a leaf/subleaf the table does not have.
    pub fn apply(&self, cpuid: &mut CpuId) -> Result<(), Error> {
        self.validate()?;
        let mut entries = cpuid.as_slice().to_vec();
        for m in &self.cpuid {
            let unsupported = |bits: u32| Error::TemplateSetsUnsupported {
                template: self.name.clone(),
                leaf: m.leaf,
                subleaf: m.subleaf,
                register: m.register,
                bits,
            };
            let mut matched = false;
            for e in entries.iter_mut().filter(|e| m.matches(e)) {
                matched = true;
                let old = m.register.get(e);
                let missing = m.set & !old;
                if missing != 0 && !set_is_free(m.leaf, m.register) {
                    return Err(unsupported(missing));
                }
                *m.register.get_mut(e) = (old & !m.clear) | m.set;
            }
            if !matched && m.set != 0 {
                return Err(unsupported(m.set));
            }
        }
        cpuid.as_mut_slice().copy_from_slice(&entries);
        Ok(())
    }

    /// The CPUID table for vCPU `vcpu_id` of `nr_vcpus`: a copy of `supported`,
    /// [normalised](crate::cpuid::normalize), then this template [applied](CpuTemplate::apply).
    pub fn vcpu_cpuid(
        &self,
        supported: &CpuId,
        vcpu_id: u8,
        nr_vcpus: u8,
        tsc_khz: Option<u32>,
    ) -> Result<CpuId, Error> {
        let mut table = supported.clone();
        cpuid::normalize(&mut table, vcpu_id, nr_vcpus, tsc_khz)?;
        self.apply(&mut table)?;
        Ok(table)
    }
}

/// Bits that KVM reports in a vCPU's effective CPUID table (`KVM_GET_CPUID2`, see
/// [`Vcpu::effective_cpuid`](crate::Vcpu::effective_cpuid)) although the table the VMM set did
/// not have them: KVM overrode the template there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidOverride {
    /// The leaf.
    pub leaf: u32,
    /// The subleaf (0 for leaves without subleaves).
    pub subleaf: u32,
    /// The register.
    pub register: Register,
    /// The bits KVM set on its own.
    pub bits: u32,
}

impl CpuidOverride {
    /// Linux's names of the overridden bits that have one ([`features::LINUX_NAMES`]), for the
    /// `clearcpuid=` kernel parameter.
    pub fn linux_names(&self) -> Vec<&'static str> {
        (0..32)
            .map(|b| 1u32 << b)
            .filter(|b| self.bits & b != 0)
            .filter_map(|b| features::linux_name(self.leaf, self.subleaf, self.register, b))
            .collect()
    }
}

impl fmt::Display for CpuidOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "leaf {:#x}.{} {} bits {:#010x}",
            self.leaf, self.subleaf, self.register, self.bits
        )?;
        let names = self.linux_names();
        if !names.is_empty() {
            write!(f, " ({})", names.join(","))?;
        }
        Ok(())
    }
}

/// Register bits KVM computes from guest state rather than from the table: leaf 1 ECX OSXSAVE
/// (CR4) and EDX APIC (APIC base MSR), leaf 7.0 ECX OSPKE (CR4), leaf 0xd.0/0xd.1 EBX (XSAVE
/// area size for the current XCR0/XSS).
pub fn dynamic_bits(leaf: u32, subleaf: u32, register: Register) -> u32 {
    match (leaf, subleaf, register) {
        (1, _, Register::Ecx) => features::leaf1_ecx::OSXSAVE,
        (1, _, Register::Edx) => features::leaf1_edx::APIC,
        (7, 0, Register::Ecx) => features::leaf7_ecx::OSPKE,
        (0xd, 0 | 1, Register::Ebx) => u32::MAX,
        _ => 0,
    }
}

/// The bits KVM added on its own: for every entry of `effective` (what KVM reports for a
/// vCPU), the bits that the `requested` table (what the VMM passed to `KVM_SET_CPUID2`) did not
/// have, ignoring [`dynamic_bits`]. Empty when KVM honoured the table, which standard KVM does.
///
/// Some PVM builds do not: on the hosts Ember is developed on, `KVM_SET_CPUID2` replaces leaves
/// 6, 7.0, 7.1, 0xd, 0x8000_0007, 0x8000_0008 and 0x4000_0001 with fixed values and ORs the
/// hardware's instruction-set bits (SSE3..SSE4.2, PCLMULQDQ, FMA, MOVBE, POPCNT, AES, XSAVE,
/// AVX, F16C, RDRAND, and in EDX the baseline plus HTT) into leaf 1, whatever the template
/// says; only the other bits (leaf 1 CX16, PCID, x2APIC, TSC-deadline, hypervisor, leaf 7.2,
/// leaf 0x8000_0001, topology leaves, ...) follow the table. The guest's `cpuid` (ring 0 and ring
/// 3) returns KVM's effective table. Hiding the rest from Linux then takes kernel parameters:
/// `noxsave` and `clearcpuid=` with [`linux_clearcpuid`].
pub fn overridden_bits(requested: &CpuId, effective: &CpuId) -> Vec<CpuidOverride> {
    let mut out = Vec::new();
    for e in effective.as_slice() {
        let asked = requested
            .as_slice()
            .iter()
            .find(|r| r.function == e.function && r.index == e.index);
        for register in Register::ALL {
            let want = asked.map_or(0, |r| register.get(r));
            let bits = register.get(e) & !want & !dynamic_bits(e.function, e.index, register);
            if bits != 0 {
                out.push(CpuidOverride {
                    leaf: e.function,
                    subleaf: e.index,
                    register,
                    bits,
                });
            }
        }
    }
    out
}

/// The Linux feature names of `overrides` that have one, without duplicates, in table order:
/// the value for `clearcpuid=` (comma-separated). `xsave` is left out: use the `noxsave`
/// parameter for it (see [`features::LINUX_NAMES`]).
pub fn linux_clearcpuid(overrides: &[CpuidOverride]) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for name in overrides.iter().flat_map(CpuidOverride::linux_names) {
        if name != "xsave" && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Serde helpers: numbers as JSON numbers or strings (hex with `0x`, or decimal), written as
/// hex strings.
mod num {
    use std::fmt;

    use serde::de::{self, Visitor};

    fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let digits: String;
        let (body, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => (hex, 16),
            None => (s, 10),
        };
        let body = if body.contains('_') {
            digits = body.replace('_', "");
            digits.as_str()
        } else {
            body
        };
        if body.is_empty() || body.starts_with('+') {
            return None;
        }
        u64::from_str_radix(body, radix).ok()
    }

    struct Num {
        max: u64,
    }

    impl Visitor<'_> for Num {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "an integer 0..={:#x} (a number or a string such as \"0x1f\")",
                self.max
            )
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            if v <= self.max {
                Ok(v)
            } else {
                Err(E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
            }
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            match parse(v) {
                Some(n) if n <= self.max => Ok(n),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
    }

    pub mod hex32 {
        use serde::{Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&format!("{v:#010x}"))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
            let v = d.deserialize_any(super::Num {
                max: u64::from(u32::MAX),
            })?;
            #[allow(
                clippy::cast_possible_truncation,
                reason = "`Num` checked v <= u32::MAX"
            )]
            let v = v as u32;
            Ok(v)
        }
    }

    pub mod hex64 {
        use serde::{Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&format!("{v:#018x}"))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
            d.deserialize_any(super::Num { max: u64::MAX })
        }
    }

    pub mod opt32 {
        use std::fmt;

        use serde::de::{self, Visitor};
        use serde::{Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.serialize_u32(*v),
                None => s.serialize_none(),
            }
        }

        struct Opt;

        impl<'de> Visitor<'de> for Opt {
            type Value = Option<u32>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("null or a 32-bit integer")
            }

            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }

            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::hex32::deserialize(d).map(Some)
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
            d.deserialize_option(Opt)
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn parse_forms() {
            assert_eq!(super::parse("0x00000200"), Some(0x200));
            assert_eq!(super::parse("0XfF"), Some(0xff));
            assert_eq!(super::parse("0x8000_0001"), Some(0x8000_0001));
            assert_eq!(super::parse(" 42 "), Some(42));
            assert_eq!(super::parse("0x"), None);
            assert_eq!(super::parse(""), None);
            assert_eq!(super::parse("-1"), None);
            assert_eq!(super::parse("+1"), None);
            assert_eq!(super::parse("0x+1"), None);
            assert_eq!(super::parse("ten"), None);
            assert_eq!(super::parse("0x1_0000_0000_0000_0000"), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    use super::features::*;
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 7 | 0xb | 0xd) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A table shaped like a rich host's (AVX-512, XSAVE, TSX, ...).
    fn rich() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x806f8, 0x0080_0800, 0xfffa_3203, 0x178b_fbff]),
            entry(6, 0, [0x4, 0, 0, 0]),
            entry(7, 0, [2, 0xf1bf_fbfb, 0x1bc1_5fbe, 0xfc1c_4c1c]),
            entry(7, 1, [0x0002_1c30, 0, 0, 0]),
            entry(7, 2, [0, 0, 0, 0x1f]),
            entry(0xa, 0, [0x0708_0202, 0, 0, 0x8603]),
            entry(0xd, 0, [0x2e7, 0xa88, 0x2b00, 0]),
            entry(0xd, 1, [0x1f, 0x240, 0x1800, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x0000_0121, 0x2c10_0800]),
            entry(0x8000_0002, 0, [0x6574_6e49, 0x2952_286c, 0, 0]),
            entry(0x8000_0007, 0, [0, 0, 0, 0x100]),
        ])
        .unwrap()
    }

    fn reg(c: &CpuId, leaf: u32, sub: u32, r: Register) -> u32 {
        r.get(crate::cpuid::find(c, leaf, sub).expect("leaf present"))
    }

    #[test]
    fn builtins_exist_and_validate() {
        for name in BUILTIN_NAMES {
            let t = CpuTemplate::builtin(name).unwrap();
            assert_eq!(t.name, name);
            t.validate().unwrap();
        }
        assert!(CpuTemplate::builtin("nope").is_none());
        assert!(matches!(
            CpuTemplate::by_name("T2"),
            Err(Error::UnknownTemplate { name }) if name == "T2"
        ));
        assert_eq!(CpuTemplate::default(), CpuTemplate::builtin(HOST).unwrap());
    }

    #[test]
    fn host_changes_nothing() {
        let mut c = rich();
        CpuTemplate::builtin(HOST).unwrap().apply(&mut c).unwrap();
        assert_eq!(c.as_slice(), rich().as_slice());
    }

    #[test]
    fn emulated_ring0_masks() {
        let mut c = rich();
        CpuTemplate::builtin(EMULATED_RING0)
            .unwrap()
            .apply(&mut c)
            .unwrap();
        let ecx1 = reg(&c, 1, 0, Register::Ecx);
        for bit in [
            leaf1_ecx::XSAVE,
            leaf1_ecx::OSXSAVE,
            leaf1_ecx::AVX,
            leaf1_ecx::POPCNT,
            leaf1_ecx::CX16,
            leaf1_ecx::SSE4_2,
            leaf1_ecx::MOVBE,
            leaf1_ecx::FMA,
        ] {
            assert_eq!(ecx1 & bit, 0, "leaf 1 ECX {bit:#x}");
        }
        // Kept: x2APIC, TSC-deadline, hypervisor, RDRAND, PCID.
        for bit in [
            leaf1_ecx::X2APIC,
            leaf1_ecx::TSC_DEADLINE,
            leaf1_ecx::HYPERVISOR,
            leaf1_ecx::RDRAND,
            leaf1_ecx::PCID,
        ] {
            assert_ne!(ecx1 & bit, 0, "leaf 1 ECX {bit:#x}");
        }
        assert_eq!(
            reg(&c, 1, 0, Register::Edx),
            reg(&rich(), 1, 0, Register::Edx)
        );
        let ebx7 = reg(&c, 7, 0, Register::Ebx);
        for bit in [
            leaf7_ebx::SMEP,
            leaf7_ebx::SMAP,
            leaf7_ebx::BMI1,
            leaf7_ebx::BMI2,
            leaf7_ebx::AVX2,
            leaf7_ebx::AVX512F,
            leaf7_ebx::FSGSBASE,
            leaf7_ebx::RTM,
            leaf7_ebx::HLE,
            leaf7_ebx::ERMS,
            leaf7_ebx::INVPCID,
            leaf7_ebx::CLWB,
        ] {
            assert_eq!(ebx7 & bit, 0, "leaf 7 EBX {bit:#x}");
        }
        assert_ne!(ebx7 & leaf7_ebx::RDSEED, 0);
        assert_ne!(ebx7 & leaf7_ebx::CLFLUSHOPT, 0);
        let ecx7 = reg(&c, 7, 0, Register::Ecx);
        for bit in [
            leaf7_ecx::PKU,
            leaf7_ecx::OSPKE,
            leaf7_ecx::WAITPKG,
            leaf7_ecx::RDPID,
            leaf7_ecx::MOVDIRI,
            leaf7_ecx::GFNI,
        ] {
            assert_eq!(ecx7 & bit, 0, "leaf 7 ECX {bit:#x}");
        }
        assert_ne!(ecx7 & leaf7_ecx::UMIP, 0);
        assert_ne!(ecx7 & leaf7_ecx::LA57, 0);
        let edx7 = reg(&c, 7, 0, Register::Edx);
        assert_eq!(edx7 & (leaf7_edx::FSRM | leaf7_edx::AMX_TILE), 0);
        assert_ne!(edx7 & leaf7_edx::SPEC_CTRL, 0);
        assert_eq!(reg(&c, 7, 1, Register::Eax), 0);
        assert_eq!(reg(&c, 7, 2, Register::Edx), 0x1f, "leaf 7.2 kept");
        for sub in [0, 1, 2] {
            for r in Register::ALL {
                assert_eq!(reg(&c, 0xd, sub, r), 0, "leaf 0xd.{sub} {r}");
            }
        }
        assert_eq!(
            reg(&c, 0x8000_0001, 0, Register::Ecx),
            ext1_ecx::LAHF_LM | ext1_ecx::PREFETCHW
        );
        let edx_ext = reg(&c, 0x8000_0001, 0, Register::Edx);
        assert_eq!(edx_ext & ext1_edx::RDTSCP, 0);
        assert_ne!(edx_ext & ext1_edx::LM, 0);
        let t = CpuTemplate::builtin(EMULATED_RING0).unwrap();
        assert_eq!(
            t.msrs,
            vec![MsrModifier {
                index: msr::IA32_MISC_ENABLE,
                clear: 0,
                set: msr::MISC_ENABLE_FAST_STRING
            }]
        );
    }

    #[test]
    fn minimal_keeps_only_the_baseline() {
        let mut c = rich();
        CpuTemplate::builtin(MINIMAL)
            .unwrap()
            .apply(&mut c)
            .unwrap();
        let ecx1 = reg(&c, 1, 0, Register::Ecx);
        let v2 = leaf1_ecx::SSE3
            | leaf1_ecx::SSSE3
            | leaf1_ecx::SSE4_1
            | leaf1_ecx::SSE4_2
            | leaf1_ecx::POPCNT
            | leaf1_ecx::CX16;
        assert_eq!(ecx1 & v2, v2 & reg(&rich(), 1, 0, Register::Ecx));
        for bit in [
            leaf1_ecx::AVX,
            leaf1_ecx::XSAVE,
            leaf1_ecx::FMA,
            leaf1_ecx::AES,
            leaf1_ecx::MOVBE,
            leaf1_ecx::RDRAND,
        ] {
            assert_eq!(ecx1 & bit, 0, "leaf 1 ECX {bit:#x}");
        }
        assert_ne!(ecx1 & leaf1_ecx::HYPERVISOR, 0);
        let ebx7 = reg(&c, 7, 0, Register::Ebx);
        assert_eq!(
            ebx7 & (leaf7_ebx::AVX2
                | leaf7_ebx::AVX512F
                | leaf7_ebx::HLE
                | leaf7_ebx::RTM
                | leaf7_ebx::MPX
                | leaf7_ebx::SGX
                | leaf7_ebx::BMI1),
            0
        );
        assert_ne!(ebx7 & leaf7_ebx::SMEP, 0);
        assert_ne!(ebx7 & leaf7_ebx::SMAP, 0);
        let ecx7 = reg(&c, 7, 0, Register::Ecx);
        assert_eq!(ecx7 & !leaf7_ecx::UMIP, 0, "only UMIP kept in 7.0 ECX");
        let edx7 = reg(&c, 7, 0, Register::Edx);
        assert_ne!(edx7 & leaf7_edx::ARCH_CAPABILITIES, 0);
        assert_eq!(edx7 & (leaf7_edx::AMX_TILE | leaf7_edx::TSXLDTRK), 0);
        assert_eq!(reg(&c, 7, 1, Register::Eax), 0);
        for r in Register::ALL {
            assert_eq!(reg(&c, 0xa, 0, r), 0, "perfmon leaf {r}");
            assert_eq!(reg(&c, 0xd, 0, r), 0, "xsave leaf {r}");
        }
        assert_eq!(reg(&c, 6, 0, Register::Eax), leaf6_eax::ARAT);
        assert_eq!(reg(&c, 0x8000_0001, 0, Register::Ecx), ext1_ecx::LAHF_LM);
        // Brand string untouched.
        assert_eq!(reg(&c, 0x8000_0002, 0, Register::Eax), 0x6574_6e49);
    }

    #[test]
    fn apply_clear_set_and_subleaf_matching() {
        let t = CpuTemplate {
            name: "t".into(),
            cpuid: vec![
                CpuidModifier::clear(0xd, None, Register::Ebx, 0xffff_ffff),
                CpuidModifier::clear(7, Some(1), Register::Eax, 0x30),
                // Set a bit that is already there: allowed.
                CpuidModifier {
                    leaf: 1,
                    subleaf: None,
                    register: Register::Ecx,
                    clear: 0,
                    set: leaf1_ecx::X2APIC,
                },
                // Identification register: set is free.
                CpuidModifier {
                    leaf: 1,
                    subleaf: Some(0),
                    register: Register::Eax,
                    clear: 0xfff_ffff,
                    set: 0x50654,
                },
                // Clearing a leaf that is absent is a no-op.
                CpuidModifier::clear(0x14, None, Register::Eax, 0xffff_ffff),
            ],
            msrs: vec![],
        };
        let mut c = rich();
        t.apply(&mut c).unwrap();
        for sub in 0..3 {
            assert_eq!(reg(&c, 0xd, sub, Register::Ebx), 0);
            assert_eq!(
                reg(&c, 0xd, sub, Register::Eax),
                reg(&rich(), 0xd, sub, Register::Eax)
            );
        }
        assert_eq!(reg(&c, 7, 1, Register::Eax), 0x0002_1c00);
        assert_eq!(reg(&c, 7, 0, Register::Eax), 2, "other subleaf untouched");
        assert_eq!(reg(&c, 1, 0, Register::Eax), 0x50654);
        assert_eq!(c.as_slice().len(), rich().as_slice().len());
    }

    #[test]
    fn set_of_unsupported_bits_is_refused() {
        let mut table = rich();
        // Strip AVX2 as if KVM did not offer it, then try to force it on.
        for e in table.as_mut_slice() {
            if e.function == 7 && e.index == 0 {
                e.ebx &= !leaf7_ebx::AVX2;
            }
        }
        let before = table.as_slice().to_vec();
        let t = CpuTemplate {
            name: "widen".into(),
            cpuid: vec![
                CpuidModifier::clear(1, None, Register::Ecx, leaf1_ecx::AVX),
                CpuidModifier {
                    leaf: 7,
                    subleaf: Some(0),
                    register: Register::Ebx,
                    clear: 0,
                    set: leaf7_ebx::AVX2 | leaf7_ebx::SMEP,
                },
            ],
            msrs: vec![],
        };
        let err = t.apply(&mut table).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TemplateSetsUnsupported {
                    leaf: 7,
                    subleaf: Some(0),
                    register: Register::Ebx,
                    bits,
                    ..
                } if bits == leaf7_ebx::AVX2
            ),
            "{err}"
        );
        assert_eq!(table.as_slice(), &before[..], "unchanged on error");
        // Setting bits of a leaf the table lacks.
        let t = CpuTemplate {
            name: "absent".into(),
            cpuid: vec![CpuidModifier {
                leaf: 0x14,
                subleaf: Some(0),
                register: Register::Ebx,
                clear: 0,
                set: 1,
            }],
            msrs: vec![],
        };
        assert!(matches!(
            t.apply(&mut table),
            Err(Error::TemplateSetsUnsupported { leaf: 0x14, .. })
        ));
    }

    #[test]
    fn validation_errors() {
        let mut t = CpuTemplate::builtin(HOST).unwrap();
        t.msrs.push(MsrModifier {
            index: 0xc000_0080, // EFER
            clear: 0,
            set: 0x800,
        });
        let err = t.validate().unwrap_err();
        assert!(err.to_string().contains("0xc0000080"), "{err}");
        let mut t = CpuTemplate::builtin(HOST).unwrap();
        t.name = " ".into();
        assert!(t.validate().is_err());
        // apply validates too.
        let mut t = CpuTemplate::builtin(HOST).unwrap();
        t.name = String::new();
        assert!(t.apply(&mut rich()).is_err());
    }

    #[test]
    fn json_round_trip_of_builtins() {
        for name in BUILTIN_NAMES {
            let t = CpuTemplate::builtin(name).unwrap();
            let json = t.to_json();
            assert_eq!(CpuTemplate::from_json(&json).unwrap(), t, "{name}: {json}");
        }
        let json = CpuTemplate::builtin(EMULATED_RING0).unwrap().to_json();
        assert!(json.contains(r#""leaf": "0x00000007""#), "{json}");
        assert!(json.contains(r#""register": "ebx""#), "{json}");
        assert!(json.contains(r#""index": "0x000001a0""#), "{json}");
        assert!(json.contains(r#""set": "0x0000000000000001""#), "{json}");
    }

    #[test]
    fn json_accepts_numbers_and_hex_strings() {
        let t = CpuTemplate::from_json(
            r#"{
                "name": "mixed",
                "cpuid": [
                    {"leaf": 7, "subleaf": "0x0", "register": "EBX", "clear": 32, "set": "0"},
                    {"leaf": "0x8000_0001", "subleaf": null, "register": "edx", "clear": "0x08000000"},
                    {"leaf": "13", "register": "eax"}
                ],
                "msrs": [{"index": 416, "clear": "0x0000000000000001"}]
            }"#,
        )
        .unwrap();
        assert_eq!(
            t.cpuid,
            vec![
                CpuidModifier {
                    leaf: 7,
                    subleaf: Some(0),
                    register: Register::Ebx,
                    clear: 32,
                    set: 0
                },
                CpuidModifier::clear(0x8000_0001, None, Register::Edx, ext1_edx::RDTSCP),
                CpuidModifier::clear(0xd, None, Register::Eax, 0),
            ]
        );
        assert_eq!(
            t.msrs,
            vec![MsrModifier {
                index: 0x1a0,
                clear: 1,
                set: 0
            }]
        );
        // Empty lists may be omitted.
        let t = CpuTemplate::from_json(r#"{"name": "empty"}"#).unwrap();
        assert!(t.cpuid.is_empty() && t.msrs.is_empty());
    }

    #[test]
    fn json_errors() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"cpuid": []}"#,
            r#"{"name": "x", "cpuid": [{"leaf": 1, "register": "esi"}]}"#,
            r#"{"name": "x", "cpuid": [{"leaf": "0x1_0000_0000", "register": "eax"}]}"#,
            r#"{"name": "x", "cpuid": [{"leaf": -1, "register": "eax"}]}"#,
            r#"{"name": "x", "cpuid": [{"leaf": "one", "register": "eax"}]}"#,
            r#"{"name": "x", "cpuid": [{"leaf": 1.5, "register": "eax"}]}"#,
            r#"{"name": "x", "cpuid": [{"leaf": 1, "register": "eax", "mask": 1}]}"#,
            r#"{"name": "x", "cpuid": [{"register": "eax"}]}"#,
            r#"{"name": "x", "extra": 1}"#,
        ] {
            let err = CpuTemplate::from_json(bad).unwrap_err();
            assert!(matches!(err, Error::TemplateJson(_)), "{bad}: {err}");
        }
        // Parses, but invalid.
        for bad in [
            r#"{"name": "x", "msrs": [{"index": "0x10", "clear": 1}]}"#,
            r#"{"name": "x", "msrs": [{"index": "0xc0000080"}]}"#,
            r#"{"name": ""}"#,
        ] {
            let err = CpuTemplate::from_json(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidTemplate { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn from_file_reads_json_and_reports_io_errors() {
        let dir = std::env::temp_dir().join(format!("ember-vcpu-tmpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        let t = CpuTemplate::builtin(MINIMAL).unwrap();
        std::fs::write(&path, t.to_json()).unwrap();
        assert_eq!(CpuTemplate::from_file(&path).unwrap(), t);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            CpuTemplate::from_file(&path),
            Err(Error::TemplateFile { .. })
        ));
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn set_is_free_only_for_identification() {
        assert!(set_is_free(1, Register::Eax));
        assert!(set_is_free(0x8000_0003, Register::Edx));
        assert!(!set_is_free(1, Register::Ecx));
        assert!(!set_is_free(7, Register::Ebx));
        assert!(!set_is_free(0, Register::Ebx));
    }

    #[test]
    fn overrides_and_linux_names() {
        let mut requested = rich();
        CpuTemplate::builtin(EMULATED_RING0)
            .unwrap()
            .apply(&mut requested)
            .unwrap();
        // Honoured table: nothing to report.
        assert!(overridden_bits(&requested, &requested).is_empty());
        // A KVM that puts POPCNT, XSAVE, OSXSAVE (dynamic) back in leaf 1, refills leaf 0xd.0
        // EAX and EBX (EBX dynamic), and adds a leaf.
        let mut effective = requested.clone();
        for e in effective.as_mut_slice() {
            match (e.function, e.index) {
                (1, 0) => e.ecx |= leaf1_ecx::POPCNT | leaf1_ecx::XSAVE | leaf1_ecx::OSXSAVE,
                (0xd, 0) => {
                    e.eax = 0x7;
                    e.ebx = 0x240;
                }
                _ => {}
            }
        }
        let effective = {
            let mut v = effective.as_slice().to_vec();
            v.push(entry(0x8000_0007, 1, [0, 0, 0, 0x100]));
            CpuId::from_entries(&v).unwrap()
        };
        let o = overridden_bits(&requested, &effective);
        assert_eq!(
            o,
            vec![
                CpuidOverride {
                    leaf: 1,
                    subleaf: 0,
                    register: Register::Ecx,
                    bits: leaf1_ecx::POPCNT | leaf1_ecx::XSAVE
                },
                CpuidOverride {
                    leaf: 0xd,
                    subleaf: 0,
                    register: Register::Eax,
                    bits: 7
                },
                CpuidOverride {
                    leaf: 0x8000_0007,
                    subleaf: 1,
                    register: Register::Edx,
                    bits: 0x100
                },
            ]
        );
        assert_eq!(o[0].linux_names(), vec!["popcnt", "xsave"]);
        assert_eq!(linux_clearcpuid(&o), vec!["popcnt"]);
        assert_eq!(
            o[0].to_string(),
            "leaf 0x1.0 ECX bits 0x04800000 (popcnt,xsave)"
        );
        assert_eq!(
            features::linux_name(7, 0, Register::Ebx, leaf7_ebx::SMAP),
            Some("smap")
        );
        assert_eq!(
            features::linux_name(7, 0, Register::Ecx, leaf7_ebx::SMAP),
            None
        );
        // Every bit of every built-in template's leaf 1 / 7.0 masks that Linux names is known.
        for &(_, _, _, bit, name) in features::LINUX_NAMES {
            assert_eq!(bit.count_ones(), 1, "{name}");
        }
    }

    #[test]
    fn vcpu_cpuid_normalizes_then_applies() {
        let t = CpuTemplate::builtin(EMULATED_RING0).unwrap();
        let c = t.vcpu_cpuid(&rich(), 3, 4, Some(1000)).unwrap();
        let l1 = crate::cpuid::find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!(l1.ecx & leaf1_ecx::XSAVE, 0);
        assert!(t.vcpu_cpuid(&rich(), 4, 4, None).is_err());
    }
}
