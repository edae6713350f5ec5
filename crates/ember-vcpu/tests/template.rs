//! CPU templates against the real /dev/kvm: what the built-in templates make of this host's
//! supported CPUID, what a guest's `cpuid` then returns in ring 0 (and ring 3), MSR modifiers,
//! and JSON templates.

mod common;

use common::*;
use ember_vcpu::template::features::*;
use ember_vcpu::template::{
    dynamic_bits, linux_clearcpuid, overridden_bits, CpuTemplate, CpuidModifier, MsrModifier,
    Register, BUILTIN_NAMES,
};
use ember_vcpu::{cpuid, msr, segment_from_gdt_entry, Error, Vcpu, VcpuStop};
use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;

const OUT_PORT: u16 = 0x510;
const STOP_PORT: u16 = 0x512;

/// (leaf, subleaf) the guest queries.
const QUERIES: [(u32, u32); 11] = [
    (0, 0),
    (1, 0),
    (7, 0),
    (7, 1),
    (0xb, 0),
    (0xb, 1),
    (0xd, 0),
    (0xd, 1),
    (0x8000_0001, 0),
    (0x8000_0008, 0),
    (0x4000_0000, 0),
];

/// Register bits KVM computes at run time from guest state, not from the table.
fn dynamic_mask(leaf: u32, sub: u32) -> [u32; 4] {
    Register::ALL.map(|r| dynamic_bits(leaf, sub, r))
}

/// 64-bit code: for each query, `cpuid` and out EAX, EBX, ECX, EDX to port 0x510; then out to
/// port 0x512 (stop). Works in ring 0 and, with IOPL 3, in ring 3.
fn cpuid_code() -> Vec<u8> {
    let mut c = Vec::new();
    for (leaf, sub) in QUERIES {
        c.push(0xb8); // mov eax, leaf
        c.extend_from_slice(&leaf.to_le_bytes());
        c.push(0xb9); // mov ecx, sub
        c.extend_from_slice(&sub.to_le_bytes());
        #[rustfmt::skip]
        c.extend_from_slice(&[
            0x0f, 0xa2,             // cpuid
            0x89, 0xd6,             // mov esi, edx
            0x66, 0xba, 0x10, 0x05, // mov dx, 0x510
            0xef,                   // out dx, eax
            0x89, 0xd8, 0xef,       // mov eax, ebx; out dx, eax
            0x89, 0xc8, 0xef,       // mov eax, ecx; out dx, eax
            0x89, 0xf0, 0xef,       // mov eax, esi; out dx, eax
        ]);
    }
    #[rustfmt::skip]
    c.extend_from_slice(&[
        0x66, 0xba, 0x12, 0x05, // mov dx, 0x512
        0xee,                   // out dx, al
        0xeb, 0xfe,             // jmp $
    ]);
    c
}

/// Runs `cpuid_code` on a vCPU configured with `table` (and `template`'s MSRs), in ring 0 or
/// ring 3; returns the registers per query and KVM's effective table for the vCPU.
fn guest_cpuid(table: &CpuId, template: &CpuTemplate, ring3: bool) -> (Vec<[u32; 4]>, CpuId) {
    let vm = TestVm::new(Kvm::new().unwrap(), false);
    let boot = vm.long_mode_setup(&cpuid_code());
    let mut vcpu = Vcpu::new(&vm.vm, 0).unwrap();
    vcpu.set_msr_modifiers(&template.msrs).unwrap();
    vcpu.configure(table, &boot).unwrap();
    if ring3 {
        let ucode = 0x00af_fb00_0000_ffffu64;
        let udata = 0x00cf_f300_0000_ffffu64;
        vm.write_u64s(GDT_ADDR + 32, &[ucode, udata]);
        let mut sregs = vcpu.fd().get_sregs().unwrap();
        sregs.gdt.limit = 6 * 8 - 1;
        sregs.cs = segment_from_gdt_entry(ucode, 4);
        sregs.cs.selector |= 3;
        let mut ds = segment_from_gdt_entry(udata, 5);
        ds.selector |= 3;
        (sregs.ds, sregs.es, sregs.ss) = (ds, ds, ds);
        vcpu.fd().set_sregs(&sregs).unwrap();
        let mut regs = vcpu.fd().get_regs().unwrap();
        regs.rflags = 0x3002;
        vcpu.fd().set_regs(&regs).unwrap();
    }
    let effective = vcpu.effective_cpuid().unwrap();
    let io = PortLog {
        stop_port: Some(STOP_PORT),
        ..Default::default()
    };
    let stop = vcpu.run(&io, &io.stop).unwrap();
    assert_eq!(stop, VcpuStop::Stopped, "ring3={ring3}");
    let values = io.u32s(OUT_PORT);
    assert_eq!(values.len(), QUERIES.len() * 4);
    let seen = values.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect();
    (seen, effective)
}

fn table_regs(table: &CpuId, leaf: u32, sub: u32) -> [u32; 4] {
    cpuid::find(table, leaf, sub).map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
}

fn template_table(kvm: &Kvm, name: &str) -> (CpuTemplate, CpuId) {
    let t = CpuTemplate::builtin(name).unwrap();
    let supported = cpuid::supported(kvm).unwrap();
    let table = t.vcpu_cpuid(&supported, 0, 1, None).unwrap();
    (t, table)
}

fn reg(table: &CpuId, leaf: u32, sub: u32, r: Register) -> u32 {
    r.get(cpuid::find(table, leaf, sub).unwrap())
}

#[test]
fn builtins_on_the_supported_cpuid() {
    let Some(kvm) = kvm_or_skip("builtins_on_the_supported_cpuid") else {
        return;
    };
    let (_, host) = template_table(&kvm, "host");
    for name in BUILTIN_NAMES {
        let (_, t) = template_table(&kvm, name);
        // Never wider than host, entry for entry.
        assert_eq!(t.as_slice().len(), host.as_slice().len());
        for (a, b) in t.as_slice().iter().zip(host.as_slice()) {
            assert_eq!((a.function, a.index), (b.function, b.index));
            for r in Register::ALL {
                let (got, base) = (r.get(a), r.get(b));
                let removed = base & !got;
                let added = got & !base;
                assert_eq!(
                    added, 0,
                    "{name}: leaf {:#x}.{} {r} widened",
                    a.function, a.index
                );
                if removed != 0 {
                    eprintln!(
                        "{name:>15}: leaf {:#010x}.{} {r}: {base:#010x} -> {got:#010x} (cleared {removed:#010x})",
                        a.function, a.index
                    );
                }
            }
        }
    }

    let (_, e) = template_table(&kvm, "emulated-ring0");
    let ecx1 = reg(&e, 1, 0, Register::Ecx);
    for (bit, name) in [
        (leaf1_ecx::XSAVE, "XSAVE"),
        (leaf1_ecx::OSXSAVE, "OSXSAVE"),
        (leaf1_ecx::POPCNT, "POPCNT"),
        (leaf1_ecx::CX16, "CX16"),
        (leaf1_ecx::AVX, "AVX"),
    ] {
        assert_eq!(ecx1 & bit, 0, "emulated-ring0 leaf 1 ECX {name}");
    }
    let ebx7 = reg(&e, 7, 0, Register::Ebx);
    for (bit, name) in [
        (leaf7_ebx::SMEP, "SMEP"),
        (leaf7_ebx::SMAP, "SMAP"),
        (leaf7_ebx::BMI1, "BMI1"),
        (leaf7_ebx::BMI2, "BMI2"),
        (leaf7_ebx::AVX2, "AVX2"),
    ] {
        assert_eq!(ebx7 & bit, 0, "emulated-ring0 leaf 7.0 EBX {name}");
    }
    for e in e.as_slice().iter().filter(|e| e.function == 0xd) {
        assert_eq!(
            (e.eax, e.ebx, e.ecx, e.edx),
            (0, 0, 0, 0),
            "leaf 0xd.{}",
            e.index
        );
    }
    // Hypervisor bit and topology survive every template.
    for name in BUILTIN_NAMES {
        let (_, t) = template_table(&kvm, name);
        let l1 = cpuid::find(&t, 1, 0).unwrap();
        assert_ne!(l1.ecx & leaf1_ecx::HYPERVISOR, 0, "{name}");
        assert_eq!((l1.ebx >> 16) & 0xff, 1, "{name}");
    }
}

/// The guest's ring-0 `cpuid` returns KVM's effective table; the template's cleared bits are
/// either hidden or reported by `overridden_bits` (hosts whose KVM overrides the table).
#[test]
fn guest_sees_template_in_ring0() {
    let Some(kvm) = kvm_or_skip("guest_sees_template_in_ring0") else {
        return;
    };
    for name in BUILTIN_NAMES {
        let (t, table) = template_table(&kvm, name);
        let (seen, effective) = guest_cpuid(&table, &t, false);
        for ((leaf, sub), got) in QUERIES.into_iter().zip(&seen) {
            let want = table_regs(&effective, leaf, sub);
            let mask = dynamic_mask(leaf, sub);
            for i in 0..4 {
                assert_eq!(
                    got[i] & !mask[i],
                    want[i] & !mask[i],
                    "{name}: ring 0 cpuid({leaf:#x}, {sub}) {} vs KVM_GET_CPUID2",
                    Register::ALL[i]
                );
            }
        }
        let overrides = overridden_bits(&table, &effective);
        // Each cleared bit: hidden from the guest, or reported as overridden by KVM.
        for m in t.cpuid.iter() {
            for (q, (leaf, sub)) in QUERIES.into_iter().enumerate() {
                if !(m.leaf == leaf && m.subleaf.unwrap_or(sub) == sub) {
                    continue;
                }
                let r = Register::ALL.iter().position(|&r| r == m.register).unwrap();
                let visible = seen[q][r] & m.clear & !dynamic_bits(leaf, sub, m.register);
                let reported: u32 = overrides
                    .iter()
                    .filter(|o| o.leaf == leaf && o.subleaf == sub && o.register == m.register)
                    .map(|o| o.bits)
                    .fold(0, |a, b| a | b);
                assert_eq!(
                    visible & !reported,
                    0,
                    "{name}: cpuid({leaf:#x}, {sub}) {} shows cleared bits that are not reported",
                    m.register
                );
            }
        }
        let l1 = seen[1];
        let l7 = seen[2];
        eprintln!(
            "{name:>15}: ring 0 sees leaf 1 ECX {:#010x} EDX {:#010x}, leaf 7.0 EBX {:#010x} ECX {:#010x} EDX {:#010x}, 7.1 EAX {:#010x}, 0xd.0 EAX {:#x}, 0x80000001 ECX {:#x} EDX {:#x}",
            l1[2], l1[3], l7[1], l7[2], l7[3], seen[3][0], seen[6][0], seen[8][2], seen[8][3]
        );
        if name == "emulated-ring0" {
            let wanted_hidden = [
                (
                    1,
                    0,
                    Register::Ecx,
                    leaf1_ecx::XSAVE | leaf1_ecx::POPCNT | leaf1_ecx::CX16 | leaf1_ecx::AVX,
                ),
                (
                    7,
                    0,
                    Register::Ebx,
                    leaf7_ebx::SMEP
                        | leaf7_ebx::SMAP
                        | leaf7_ebx::BMI1
                        | leaf7_ebx::BMI2
                        | leaf7_ebx::AVX2,
                ),
                (0xd, 0, Register::Eax, u32::MAX),
            ];
            for (leaf, sub, r, bits) in wanted_hidden {
                let q = QUERIES.iter().position(|&x| x == (leaf, sub)).unwrap();
                let shown = seen[q][Register::ALL.iter().position(|&x| x == r).unwrap()] & bits;
                if shown != 0 {
                    eprintln!(
                        "!!!!! emulated-ring0: this host's KVM overrides cpuid({leaf:#x}, {sub}) {r}: guest still sees {shown:#010x}"
                    );
                }
            }
            if !overrides.is_empty() {
                eprintln!(
                    "!!!!! KVM overrode the template in {} registers:",
                    overrides.len()
                );
                for o in &overrides {
                    eprintln!("    {o}");
                }
                eprintln!(
                    "      Linux workaround: noxsave clearcpuid={}",
                    linux_clearcpuid(&overrides).join(",")
                );
            }
        }
    }
}

/// The hypervisor-leaf signature the ring-3 test plants in the table: a ring-3 `cpuid` that
/// returns it was trapped and answered by KVM from the table.
const MARK: &[u8; 12] = b"EmberTrapChk";

fn signature(regs: &[u32; 4]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[..4].copy_from_slice(&regs[1].to_le_bytes());
    s[4..8].copy_from_slice(&regs[2].to_le_bytes());
    s[8..].copy_from_slice(&regs[3].to_le_bytes());
    s
}

/// Ring-3 `cpuid` in a PVM guest is answered by KVM from the VMM's table where the host traps
/// it (CPUID faulting: seen on Intel hosts), and runs natively, returning the host CPU's own
/// values, where it does not (AMD hosts have no CPUID faulting). The test finds out which from
/// a signature planted in the hypervisor leaf and checks what is true in that case:
/// - trapped: ring 3 sees exactly what ring 0 sees (the template reaches user space);
/// - native: ring 3 sees the host's vendor and family/model/stepping, as this very process
///   does (docs/hosts.md: the template then does not reach guest user space).
#[test]
fn guest_cpuid_in_ring3() {
    let Some(kvm) = kvm_or_skip("guest_cpuid_in_ring3") else {
        return;
    };
    let (t, mut table) = template_table(&kvm, "emulated-ring0");
    let hv = table
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == 0x4000_0000)
        .expect("the table has a hypervisor leaf");
    hv.ebx = u32::from_le_bytes(MARK[..4].try_into().unwrap());
    hv.ecx = u32::from_le_bytes(MARK[4..8].try_into().unwrap());
    hv.edx = u32::from_le_bytes(MARK[8..].try_into().unwrap());
    let hv_query = QUERIES.iter().position(|&q| q == (0x4000_0000, 0)).unwrap();

    let (ring0, _) = guest_cpuid(&table, &t, false);
    let (ring3, _) = guest_cpuid(&table, &t, true);
    assert_eq!(
        &signature(&ring0[hv_query]),
        MARK,
        "ring-0 cpuid is always answered by KVM from the table"
    );
    let trapped = &signature(&ring3[hv_query]) == MARK;
    let mut differs = Vec::new();
    for (((leaf, sub), a), b) in QUERIES.into_iter().zip(&ring0).zip(&ring3) {
        let mask = dynamic_mask(leaf, sub);
        for i in 0..4 {
            if a[i] & !mask[i] != b[i] & !mask[i] {
                differs.push(format!(
                    "cpuid({leaf:#x},{sub}) {}: ring0 {:#010x} ring3 {:#010x}",
                    Register::ALL[i],
                    a[i],
                    b[i]
                ));
            }
        }
    }
    if trapped {
        eprintln!("ring-3 cpuid is trapped here: guest user space sees the template");
        assert!(differs.is_empty(), "{differs:#?}");
    } else {
        eprintln!(
            "ring-3 cpuid runs natively here (no CPUID faulting): guest user space sees the \
             host CPU; {} registers differ from ring 0: {differs:#?}",
            differs.len()
        );
        let host = |leaf: u32| std::arch::x86_64::__cpuid_count(leaf, 0);
        let (h0, h1) = (host(0), host(1));
        assert_eq!(
            ring3[0][1..],
            [h0.ebx, h0.ecx, h0.edx],
            "ring 3 sees the host's vendor"
        );
        assert_eq!(
            ring3[1][0], h1.eax,
            "ring 3 sees the host's family/model/stepping"
        );
    }
}

#[test]
fn msr_modifiers_applied_in_configure() {
    let Some(kvm) = kvm_or_skip("msr_modifiers_applied_in_configure") else {
        return;
    };
    let vm = TestVm::new(kvm, false);
    let boot = vm.long_mode_setup(&[0xf4]);
    let table = vm.cpuid(0, 1);

    // Without modifiers: what KVM gives.
    let plain = Vcpu::new(&vm.vm, 0).unwrap();
    plain.configure(&table, &boot).unwrap();
    let arch_caps = plain.get_msr(msr::IA32_ARCH_CAPABILITIES).unwrap();
    let misc = plain.get_msr(msr::IA32_MISC_ENABLE).unwrap().unwrap();
    eprintln!("IA32_ARCH_CAPABILITIES {arch_caps:#x?}, IA32_MISC_ENABLE {misc:#x}");
    assert_eq!(misc & msr::MISC_ENABLE_FAST_STRING, 1);

    // minimal: ARCH_CAPABILITIES TSX_CTRL cleared (when the MSR exists).
    let mut v = Vcpu::new(&vm.vm, 1).unwrap();
    v.set_msr_modifiers(&CpuTemplate::builtin("minimal").unwrap().msrs)
        .unwrap();
    v.configure(&vm.cpuid(0, 1), &boot).unwrap();
    let got = v.get_msr(msr::IA32_ARCH_CAPABILITIES).unwrap();
    if let (Some(before), Some(after)) = (arch_caps, got) {
        assert_eq!(after, before & !(1 << 7), "minimal ARCH_CAPABILITIES");
    }

    // Clearing fast strings; setting BTS/PEBS unavailable.
    let mut v = Vcpu::new(&vm.vm, 2).unwrap();
    v.set_msr_modifiers(&[MsrModifier {
        index: msr::IA32_MISC_ENABLE,
        clear: msr::MISC_ENABLE_FAST_STRING,
        set: msr::MISC_ENABLE_BTS_UNAVAILABLE | msr::MISC_ENABLE_PEBS_UNAVAILABLE,
    }])
    .unwrap();
    v.configure(&table, &boot).unwrap();
    let got = v.get_msr(msr::IA32_MISC_ENABLE).unwrap().unwrap();
    assert_eq!(got & 1, 0);
    assert_eq!(got & (3 << 11), 3 << 11);

    // Claiming an ARCH_CAPABILITIES bit KVM does not report is refused.
    if let Some(caps) = arch_caps {
        let bit = (0..64).map(|b| 1u64 << b).find(|b| caps & b == 0).unwrap();
        let mut v = Vcpu::new(&vm.vm, 3).unwrap();
        v.set_msr_modifiers(&[MsrModifier {
            index: msr::IA32_ARCH_CAPABILITIES,
            clear: 0,
            set: bit,
        }])
        .unwrap();
        let err = v.configure(&table, &boot).unwrap_err();
        assert!(
            matches!(err, Error::MsrUnsupported { index: 0x10a, bits, .. } if bits == bit),
            "{err}"
        );
    }
    // Only the allow-listed MSRs.
    let mut v = Vcpu::new(&vm.vm, 4).unwrap();
    assert!(matches!(
        v.set_msr_modifiers(&[MsrModifier {
            index: msr::LSTAR,
            clear: 0,
            set: 1
        }]),
        Err(Error::InvalidTemplate { .. })
    ));
}

#[test]
fn json_template_on_real_cpuid() {
    let Some(kvm) = kvm_or_skip("json_template_on_real_cpuid") else {
        return;
    };
    let supported = cpuid::supported(&kvm).unwrap();
    let json = r#"{
        "name": "no-x2apic-no-cx16",
        "cpuid": [
            { "leaf": "0x00000001", "register": "ecx", "clear": "0x00202000" },
            { "leaf": 1, "subleaf": 0, "register": "eax", "clear": "0x0fff3fff", "set": "0x00050654" }
        ],
        "msrs": [ { "index": "0x1a0", "set": 1 } ]
    }"#;
    let t = CpuTemplate::from_json(json).unwrap();
    assert_eq!(CpuTemplate::from_json(&t.to_json()).unwrap(), t);
    let table = t.vcpu_cpuid(&supported, 0, 1, None).unwrap();
    let (seen, effective) = guest_cpuid(&table, &t, false);
    // Hidden, unless this host's KVM shows them whatever the table says (then reported).
    let reported: u32 = overridden_bits(&table, &effective)
        .iter()
        .filter(|o| (o.leaf, o.subleaf, o.register) == (1, 0, Register::Ecx))
        .fold(0, |a, o| a | o.bits);
    assert_eq!(
        seen[1][2] & (leaf1_ecx::X2APIC | leaf1_ecx::CX16) & !reported,
        0
    );
    assert_eq!(
        seen[1][0],
        0x0005_0654 | (reg(&supported, 1, 0, Register::Eax) & 0xc000)
    );

    // A bit KVM does not offer cannot be forced on.
    let ebx7 = reg(&supported, 7, 0, Register::Ebx);
    let missing = (0..32).map(|b| 1u32 << b).find(|b| ebx7 & b == 0).unwrap();
    let widen = CpuTemplate {
        name: "widen".into(),
        cpuid: vec![CpuidModifier {
            leaf: 7,
            subleaf: Some(0),
            register: Register::Ebx,
            clear: 0,
            set: missing,
        }],
        msrs: vec![],
    };
    let err = widen.vcpu_cpuid(&supported, 0, 1, None).unwrap_err();
    assert!(
        matches!(err, Error::TemplateSetsUnsupported { bits, .. } if bits == missing),
        "{err}"
    );
    eprintln!("{err}");
}
