//! Arbitrary text as a CPU template JSON file, applied to a CPUID table for an arbitrary vCPU
//! of an arbitrary VM: a clear error or a table that never sets a feature the supported table
//! lacks; the template round-trips through its JSON form; never a panic.
#![no_main]

use ember_vcpu::template::CpuTemplate;
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use libfuzzer_sys::fuzz_target;

/// A supported table like KVM's: the leaves Ember normalizes, features all set.
fn supported() -> CpuId {
    let leaf = |function: u32, index: u32, flags: u32, regs: [u32; 4]| kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    };
    let sig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    let entries = [
        leaf(0, 0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
        leaf(1, 0, 0, [0x806f8, 0x0800, u32::MAX, u32::MAX]),
        leaf(7, 0, sig, [1, u32::MAX, u32::MAX, u32::MAX]),
        leaf(7, 1, sig, [u32::MAX, 0, 0, 0]),
        leaf(0xb, 0, sig, [0, 1, 0x100, 0]),
        leaf(0xb, 1, sig, [0, 1, 0x201, 0]),
        leaf(0xd, 0, sig, [0x2e7, 0xa88, 0xa88, 0]),
        leaf(0xd, 1, sig, [0xf, 0, 0, 0]),
        leaf(0x4000_0000, 0, 0, [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]),
        leaf(0x4000_0001, 0, 0, [u32::MAX, 0, 0, 0]),
        leaf(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
        leaf(0x8000_0001, 0, 0, [0, 0, u32::MAX, u32::MAX]),
        leaf(0x8000_0008, 0, 0, [0x3030, 0, 0, 0]),
    ];
    CpuId::from_entries(&entries).expect("13 entries fit")
}

fuzz_target!(|data: &[u8]| {
    let Some((&[id, n], json)) = data.split_first_chunk::<2>() else {
        return;
    };
    let Ok(json) = std::str::from_utf8(json) else {
        return;
    };
    let Ok(template) = CpuTemplate::from_json(json) else {
        return;
    };
    let back = CpuTemplate::from_json(&template.to_json()).expect("its own JSON parses");
    assert_eq!(back, template);
    let supported = supported();
    if let Ok(table) = template.vcpu_cpuid(&supported, id % 40, n % 40, Some(2_000_000)) {
        // A template only clears feature bits, or sets free identification ones: nothing in a
        // feature register the supported table lacks.
        for e in table.as_slice() {
            let Some(s) = ember_vcpu::cpuid::find(&supported, e.function, e.index) else {
                continue;
            };
            if e.function == 7 && e.index == 0 {
                assert_eq!(e.ebx & !s.ebx, 0, "leaf 7 EBX widened");
                assert_eq!(e.ecx & !s.ecx, 0, "leaf 7 ECX widened");
            }
        }
    }
});
