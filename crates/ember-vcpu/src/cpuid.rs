//! CPUID table preparation for one vCPU.
//!
//! The VMM starts from what KVM can virtualise ([`supported`], `KVM_GET_SUPPORTED_CPUID`) and
//! patches the topology and hypervisor leaves for each vCPU with [`normalize`] before handing the
//! table to [`Vcpu::configure`](crate::Vcpu::configure). Every vCPU needs its own copy, because
//! the APIC ids differ.
//!
//! The table is not widened: exposing exactly what KVM reports hides most instructions that the
//! instruction emulator of this host refuses (XSAVE, POPCNT, ...; see the crate docs).

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;

use crate::Error;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: Hyper-Threading / multi-core package (the logical count in EBX is valid).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size reported in leaf 1 EBX bits 8..=15, in 8-byte units (8 = 64 bytes).
pub const CLFLUSH_LINE_UNITS: u32 = 8;
/// The KVM signature leaf (`KVMKVMKVM\0\0\0` in EBX/ECX/EDX, EAX = highest hypervisor leaf).
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// The generic "timing" hypervisor leaf: EAX = TSC frequency in kHz, EBX = APIC bus (timer)
/// frequency in kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// The frequency of KVM's emulated local APIC timer, in kHz (1 GHz), reported in
/// [`TIMING_LEAF`] EBX.
pub const APIC_BUS_KHZ: u32 = 1_000_000;

/// `KVMKVMKVM\0\0\0` as the three little-endian signature registers EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Leaf 0x8000_0008: address sizes, and (AMD) core count in ECX.
pub const EXT_ADDRESS_SIZES_LEAF: u32 = 0x8000_0008;
/// Leaf 0x8000_001e: AMD extended APIC id, core and node ids.
pub const AMD_EXT_APIC_ID_LEAF: u32 = 0x8000_001e;

/// Extended topology level types (leaf 0xb / 0x1f ECX bits 8..=15).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Returns what KVM can virtualise on this host (`KVM_GET_SUPPORTED_CPUID`), the usual starting
/// point for [`normalize`].
pub fn supported(kvm: &Kvm) -> Result<CpuId, Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::GetSupportedCpuid)
}

/// Number of bits needed to give each of `n` things a distinct id (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Whether the vendor string of leaf 0 (EBX, EDX, ECX) is AMD's or Hygon's.
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    const AMD: [u32; 3] = [0x6874_7541, 0x6974_6e65, 0x444d_4163]; // "AuthenticAMD"
    const HYGON: [u32; 3] = [0x6f67_7948, 0x6e65_476e, 0x656e_6975]; // "HygonGenuine"
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| [AMD, HYGON].contains(&[e.ebx, e.edx, e.ecx]))
}

fn find_mut(entries: &mut [kvm_cpuid_entry2], function: u32) -> Option<&mut kvm_cpuid_entry2> {
    entries.iter_mut().find(|e| e.function == function)
}

/// The extended topology subleaves (leaf 0xb, and 0x1f when present) for a package of
/// `nr_vcpus` single-threaded cores.
fn topology_entries(function: u32, x2apic_id: u32, nr_vcpus: u32) -> [kvm_cpuid_entry2; 3] {
    let sub = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: x2apic_id,
        ..Default::default()
    };
    [
        // SMT level: one thread per core, no id bits.
        sub(0, 0, 1, LEVEL_TYPE_SMT),
        // Core level: all vCPUs in one package.
        sub(1, id_bits(nr_vcpus), nr_vcpus, LEVEL_TYPE_CORE),
        // Terminator: level type 0 (invalid).
        sub(2, 0, 0, 0),
    ]
}

/// Patches a CPUID table (normally [`supported`]) for vCPU `vcpu_id` of `nr_vcpus`:
///
/// - leaf 1: EBX bits 24..=31 initial APIC id = `vcpu_id`, EBX bits 16..=23 logical
///   processor count = `nr_vcpus`, EBX bits 8..=15 CLFLUSH line size 64 bytes; ECX bit 31
///   (hypervisor) set; EDX HTT set only when `nr_vcpus > 1`;
/// - leaf 4 (deterministic cache parameters), each subleaf: EAX bits 26..=31 = `nr_vcpus - 1`
///   (cores per package), EAX bits 14..=25 = 0 for L1/L2 (private) and `nr_vcpus - 1` for L3+;
/// - leaf 0xb (and 0x1f if KVM reports it), rewritten as subleaf 0 = SMT level (shift 0, 1
///   thread), subleaf 1 = core level (shift = ceil(log2(`nr_vcpus`)), `nr_vcpus` threads),
///   subleaf 2 = terminator; EDX = x2APIC id = `vcpu_id` in all of them;
/// - leaf 0x8000_0008 (if present) ECX bits 0..=7 = `nr_vcpus - 1` (cores per package) and
///   bits 12..=15 = ceil(log2(`nr_vcpus`)) (APIC id bits for the core), other ECX bits kept
///   (AMD's layout; the bits are reserved, and ignored, on Intel);
/// - AMD/Hygon only, leaf 0x8000_001e (if present): EAX = extended APIC id = `vcpu_id`,
///   EBX = core id `vcpu_id` with 1 thread per core, ECX = node 0 of 1;
/// - KVM signature leaf 0x4000_0000 kept; with `tsc_khz = Some(khz)` the timing leaf
///   0x4000_0010 is set to EAX = `khz`, EBX = [`APIC_BUS_KHZ`] and the signature leaf's EAX
///   (highest hypervisor leaf) raised to at least 0x4000_0010 (the signature leaf is added with
///   the KVM signature if the table has none).
///
/// So the package is `nr_vcpus` single-threaded cores, APIC id = x2APIC id = `vcpu_id`,
/// matching the MADT / MP table (APIC ids 0..`nr_vcpus`).
///
/// Leaves KVM did not report are not added (except the ones above), so the guest sees nothing
/// KVM cannot give. Normalising a normalised table again (e.g. for another vCPU) gives the same
/// result as normalising the original. Errors: [`Error::InvalidTopology`] when
/// `nr_vcpus == 0`, `nr_vcpus >` [`MAX_VCPUS`](crate::MAX_VCPUS) or `vcpu_id >= nr_vcpus`;
/// [`Error::CpuidTooLarge`] when the table would exceed `KVM_MAX_CPUID_ENTRIES`.
pub fn normalize(
    cpuid: &mut CpuId,
    vcpu_id: u8,
    nr_vcpus: u8,
    tsc_khz: Option<u32>,
) -> Result<(), Error> {
    if nr_vcpus == 0 || nr_vcpus > crate::MAX_VCPUS || vcpu_id >= nr_vcpus {
        return Err(Error::InvalidTopology { vcpu_id, nr_vcpus });
    }
    let id = u32::from(vcpu_id);
    let n = u32::from(nr_vcpus);
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid.as_slice().to_vec();
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);

    if let Some(e) = find_mut(&mut entries, 1) {
        e.ebx = (e.ebx & 0xff) | (id << 24) | (n << 16) | (CLFLUSH_LINE_UNITS << 8);
        e.ecx |= LEAF1_ECX_HYPERVISOR;
        if n > 1 {
            e.edx |= LEAF1_EDX_HTT;
        } else {
            e.edx &= !LEAF1_EDX_HTT;
        }
    }

    for e in entries.iter_mut().filter(|e| e.function == 4) {
        if e.eax & 0x1f == 0 {
            // Cache type 0: no more caches; leave the terminator alone.
            continue;
        }
        let level = (e.eax >> 5) & 0x7;
        let sharing = if level >= 3 { n - 1 } else { 0 };
        e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
    }

    for function in [0xb, 0x1f] {
        let present = entries.iter().any(|e| e.function == function);
        // Leaf 0xb is rewritten whenever the basic range covers it; 0x1f only when KVM offers it.
        let wanted = present || (function == 0xb && max_basic >= 0xb);
        if wanted {
            entries.retain(|e| e.function != function);
            entries.extend(topology_entries(function, id, n));
        }
    }

    if let Some(e) = find_mut(&mut entries, EXT_ADDRESS_SIZES_LEAF) {
        e.ecx = (e.ecx & !0xf0ff) | (id_bits(n) << 12) | (n - 1);
    }

    if is_amd(&entries) {
        if let Some(e) = find_mut(&mut entries, AMD_EXT_APIC_ID_LEAF) {
            e.eax = id;
            // Bits 8..=15: threads per core - 1 = 0; bits 0..=7: core id.
            e.ebx = (e.ebx & !0xffff) | id;
            // Bits 8..=10: nodes per processor - 1 = 0; bits 0..=7: node id 0.
            e.ecx &= !0x7ff;
        }
    }

    if let Some(khz) = tsc_khz {
        match find_mut(&mut entries, KVM_SIGNATURE_LEAF) {
            Some(e) => e.eax = e.eax.max(TIMING_LEAF),
            None => entries.push(kvm_cpuid_entry2 {
                function: KVM_SIGNATURE_LEAF,
                eax: TIMING_LEAF,
                ebx: KVM_SIGNATURE[0],
                ecx: KVM_SIGNATURE[1],
                edx: KVM_SIGNATURE[2],
                ..Default::default()
            }),
        }
        entries.retain(|e| e.function != TIMING_LEAF);
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }

    if entries.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(Error::CpuidTooLarge {
            entries: entries.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        });
    }
    *cpuid = CpuId::from_entries(&entries).map_err(|_| Error::CpuidTooLarge {
        entries: entries.len(),
        max: KVM_MAX_CPUID_ENTRIES,
    })?;
    Ok(())
}

/// Looks up `(function, index)` in a CPUID table the way KVM does: `index` only counts for
/// entries flagged `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`.
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test inputs are small, known values"
)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 4 || function == 0xb {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn synthetic() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            // Host values: APIC id 0x37, 0x40 logical, HTT set, no hypervisor bit.
            entry(1, 0, 0x806f8, 0x3740_0800 | 0x12, 0x0120_2000, 0x1789_fbff),
            entry(4, 0, 0xfc00_4121, 0x02c0_003f, 0x3f, 0),
            entry(4, 1, 0xfc00_4122, 0x01c0_003f, 0x3f, 0),
            entry(4, 2, 0xfc01_c143, 0x03c0_003f, 0x7ff, 0),
            entry(4, 3, 0xfc3f_c163, 0x0380_003f, 0xbfff, 4),
            entry(4, 4, 0, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 0x37),
            entry(0xb, 1, 7, 0x40, 0x201, 0x37),
            entry(
                KVM_SIGNATURE_LEAF,
                0,
                0x4000_0001,
                0x4b4d_564b,
                0x564b_4d56,
                0x4d,
            ),
            entry(0x4000_0001, 0, 0x0100_7afb, 0, 0, 0),
            entry(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
            entry(0x8000_0008, 0, 0x3930, 0, 0x0003_f0ff, 0),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *find(c, f, i).unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 255].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }

    #[test]
    fn leaf1_single_vcpu() {
        let mut c = synthetic();
        normalize(&mut c, 0, 1, None).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx, 0x0001_0812);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & !LEAF1_ECX_HYPERVISOR, 0x0120_2000);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.edx | LEAF1_EDX_HTT, 0x1789_fbff | LEAF1_EDX_HTT);
        assert_eq!(l1.eax, 0x806f8);
    }

    #[test]
    fn leaf1_and_topology_multi_vcpu() {
        let mut c = synthetic();
        normalize(&mut c, 2, 3, None).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_eq!((l1.ebx >> 8) & 0xff, 8);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);

        let smt = get(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = get(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = get(&c, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 2));
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(c.as_slice().iter().all(|e| e.function != 0x1f));

        for i in 0..4 {
            let e = get(&c, 4, i);
            assert_eq!(e.eax >> 26, 2, "leaf 4.{i}");
            let level = (e.eax >> 5) & 7;
            let sharing = (e.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level >= 3 { 2 } else { 0 }, "leaf 4.{i}");
            // Cache type / level / self-init bits kept.
            assert_eq!(e.eax & 0x3fff, get(&synthetic(), 4, i).eax & 0x3fff);
        }
        assert_eq!(get(&c, 4, 4).eax, 0);
    }

    #[test]
    fn timing_leaf() {
        let mut c = synthetic();
        normalize(&mut c, 0, 1, Some(2_100_000)).unwrap();
        let sig = get(&c, KVM_SIGNATURE_LEAF, 0);
        assert_eq!(sig.eax, TIMING_LEAF);
        assert_eq!(
            (sig.ebx, sig.ecx, sig.edx),
            (0x4b4d_564b, 0x564b_4d56, 0x4d)
        );
        let t = get(&c, TIMING_LEAF, 0);
        assert_eq!(
            (t.eax, t.ebx, t.ecx, t.edx),
            (2_100_000, APIC_BUS_KHZ, 0, 0)
        );
        // KVM feature leaf untouched.
        assert_eq!(get(&c, 0x4000_0001, 0).eax, 0x0100_7afb);

        // Idempotent: normalising twice does not duplicate leaves.
        normalize(&mut c, 0, 1, Some(1_000)).unwrap();
        assert_eq!(
            c.as_slice()
                .iter()
                .filter(|e| e.function == TIMING_LEAF)
                .count(),
            1
        );
        assert_eq!(get(&c, TIMING_LEAF, 0).eax, 1_000);
    }

    #[test]
    fn no_timing_leaf_without_tsc_khz() {
        let mut c = synthetic();
        normalize(&mut c, 0, 2, None).unwrap();
        assert!(find(&c, TIMING_LEAF, 0).is_none());
        assert_eq!(get(&c, KVM_SIGNATURE_LEAF, 0).eax, 0x4000_0001);
    }

    #[test]
    fn signature_leaf_added_when_missing() {
        let mut c =
            CpuId::from_entries(&[entry(0, 0, 1, 0, 0, 0), entry(1, 0, 0, 0, 0, 0)]).unwrap();
        normalize(&mut c, 0, 1, Some(3_000_000)).unwrap();
        let sig = get(&c, KVM_SIGNATURE_LEAF, 0);
        assert_eq!(sig.eax, TIMING_LEAF);
        let mut name = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&name, b"KVMKVMKVM\0\0\0");
        // Max basic leaf 1: no leaf 0xb invented.
        assert!(find(&c, 0xb, 0).is_none());
    }

    #[test]
    fn leaf_b_added_when_in_basic_range() {
        let mut c =
            CpuId::from_entries(&[entry(0, 0, 0xd, 0, 0, 0), entry(1, 0, 0, 0, 0, 0)]).unwrap();
        normalize(&mut c, 1, 2, None).unwrap();
        assert_eq!(get(&c, 0xb, 1).ebx, 2);
        assert_eq!(get(&c, 0xb, 0).edx, 1);
    }

    #[test]
    fn leaf_1f_rewritten_when_present() {
        let mut e = entry(0x1f, 0, 1, 2, 0x100, 9);
        e.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut e2 = entry(0x1f, 1, 7, 0x40, 0x201, 9);
        e2.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        let mut c = CpuId::from_entries(&[entry(0, 0, 0x1f, 0, 0, 0), e, e2]).unwrap();
        normalize(&mut c, 3, 4, None).unwrap();
        let core = get(&c, 0x1f, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
    }

    #[test]
    fn invalid_topology() {
        let mut c = synthetic();
        assert!(matches!(
            normalize(&mut c, 0, 0, None),
            Err(Error::InvalidTopology { .. })
        ));
        assert!(matches!(
            normalize(&mut c, 2, 2, None),
            Err(Error::InvalidTopology {
                vcpu_id: 2,
                nr_vcpus: 2
            })
        ));
        // Unchanged on error.
        assert_eq!(c.as_slice(), synthetic().as_slice());
    }

    /// Everything the guest's topology enumeration reads, for vCPU `id` of `n`.
    fn check_topology(c: &CpuId, id: u32, n: u32) {
        let ctx = format!("vCPU {id} of {n}");
        let l1 = get(c, 1, 0);
        assert_eq!(l1.ebx >> 24, id, "{ctx}: leaf 1 EBX APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, n, "{ctx}: leaf 1 EBX logical count");
        assert_eq!(l1.edx & LEAF1_EDX_HTT != 0, n > 1, "{ctx}: HTT");
        let smt = get(c, 0xb, 0);
        assert_eq!(
            (smt.eax, smt.ebx & 0xffff, smt.ecx, smt.edx),
            (0, 1, 0x100, id),
            "{ctx}: leaf 0xb.0"
        );
        let core = get(c, 0xb, 1);
        assert_eq!(
            (core.eax, core.ebx & 0xffff, core.ecx, core.edx),
            (id_bits(n), n, 0x201, id),
            "{ctx}: leaf 0xb.1"
        );
        assert!(
            id < (1 << core.eax) || n == 1,
            "{ctx}: APIC id fits the core shift"
        );
        let end = get(c, 0xb, 2);
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff, end.edx), (0, 0, id));
        for i in 0..4 {
            assert_eq!(get(c, 4, i).eax >> 26, n - 1, "{ctx}: leaf 4.{i} cores");
        }
        let ext = get(c, EXT_ADDRESS_SIZES_LEAF, 0);
        assert_eq!(ext.ecx & 0xff, n - 1, "{ctx}: 0x80000008 ECX cores");
        assert_eq!((ext.ecx >> 12) & 0xf, id_bits(n), "{ctx}: ApicIdSize");
        assert_eq!(
            ext.ecx & 0x0003_0000,
            0x0003_0000,
            "{ctx}: other ECX bits kept"
        );
        assert_eq!(ext.eax, 0x3930);
    }

    #[test]
    fn topology_for_1_2_4_32_vcpus() {
        for n in [1u8, 2, 4, 32] {
            for id in [0, n / 2, n - 1] {
                let mut c = synthetic();
                normalize(&mut c, id, n, None).unwrap();
                check_topology(&c, u32::from(id), u32::from(n));
                // Re-normalising a normalised table for another vCPU is the same as starting
                // from the original.
                let other = n - 1 - id;
                let mut again = c.clone();
                normalize(&mut again, other, n, None).unwrap();
                let mut fresh = synthetic();
                normalize(&mut fresh, other, n, None).unwrap();
                assert_eq!(again.as_slice(), fresh.as_slice(), "{id}->{other} of {n}");
            }
        }
        assert_eq!(
            get(
                &{
                    let mut c = synthetic();
                    normalize(&mut c, 31, 32, None).unwrap();
                    c
                },
                0xb,
                1
            )
            .eax,
            5
        );
    }

    #[test]
    fn more_than_max_vcpus_is_invalid() {
        let mut c = synthetic();
        assert!(matches!(
            normalize(&mut c, 0, crate::MAX_VCPUS + 1, None),
            Err(Error::InvalidTopology { nr_vcpus: 33, .. })
        ));
        normalize(&mut c, crate::MAX_VCPUS - 1, crate::MAX_VCPUS, None).unwrap();
    }

    #[test]
    fn amd_extended_apic_id_leaf() {
        let amd_vendor = entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65);
        let ext = entry(AMD_EXT_APIC_ID_LEAF, 0, 7, 0x0000_0107, 0x0000_0301, 0);
        let mut c = CpuId::from_entries(&[amd_vendor, entry(1, 0, 0, 0, 0, 0), ext]).unwrap();
        normalize(&mut c, 5, 8, None).unwrap();
        let e = get(&c, AMD_EXT_APIC_ID_LEAF, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (5, 5, 0));
        // Not AMD: left alone.
        let intel = entry(0, 0, 0x10, 0x756e_6547, 0x6c65_746e, 0x4965_6e69);
        let mut c = CpuId::from_entries(&[intel, entry(1, 0, 0, 0, 0, 0), ext]).unwrap();
        normalize(&mut c, 5, 8, None).unwrap();
        let e = get(&c, AMD_EXT_APIC_ID_LEAF, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (7, 0x107, 0x301));
    }

    #[test]
    fn full_table_is_an_error() {
        let entries: Vec<_> = (0..KVM_MAX_CPUID_ENTRIES as u32)
            .map(|i| entry(0x8000_0000 + i, 0, 0, 0, 0, 0))
            .collect();
        let mut c = CpuId::from_entries(&entries).unwrap();
        assert!(matches!(
            normalize(&mut c, 0, 1, Some(1)),
            Err(Error::CpuidTooLarge { .. })
        ));
    }
}
