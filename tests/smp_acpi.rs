//! SMP, ACPI, poweroff and CPU templates, seen from inside the guest: the probe walks the ACPI
//! tables Ember wrote (every checksum), starts every AP with INIT/SIPI, reads CPUID, and powers
//! the machine off through the FADT's sleep register.

use ember_test_support::{boot_probe, kvm_or_skip, ProbeOptions};
use ember_vmm::VmExit;

fn ids(n: u8) -> String {
    (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn acpi_and_smp_with_1_2_4_and_32_vcpus() {
    if !kvm_or_skip("acpi_and_smp_with_1_2_4_and_32_vcpus") {
        return;
    }
    for n in [1u8, 2, 4, 32] {
        let checks = "acpi,smp,cpuid";
        let run = boot_probe(&ProbeOptions::new(checks).vcpus(n)).unwrap();
        run.expect_all_ok(checks);
        let acpi = run.expect_ok("acpi");
        let want_cpus = n.to_string();
        assert_eq!(acpi.get("cpus"), Some(want_cpus.as_str()), "{}", run.output);
        assert_eq!(
            acpi.get("apic_ids"),
            Some(ids(n).as_str()),
            "{}",
            run.output
        );
        assert_eq!(acpi.get("ioapics"), Some("1"), "{}", run.output);
        assert_eq!(acpi.get("s5"), Some("5"), "{}", run.output);
        let tables = acpi.get("tables").unwrap();
        for t in ["FACP", "APIC", "DSDT"] {
            assert!(tables.contains(t), "{t} missing from {tables}");
        }
        assert!(
            acpi.get("devices").unwrap().contains("PNP0501:1"),
            "{}",
            run.output
        );

        let smp = run.expect_ok("smp");
        assert_eq!(smp.get("cpus"), Some(want_cpus.as_str()));
        assert_eq!(
            smp.get("started"),
            Some((n - 1).to_string().as_str()),
            "{}",
            run.output
        );
        assert_eq!(smp.get("ring3"), Some(want_cpus.as_str()), "{}", run.output);
        assert_eq!(smp.get("apic_ids"), Some(ids(n).as_str()), "{}", run.output);

        let cpuid = run.expect_ok("cpuid");
        assert_eq!(
            cpuid.get("logical"),
            Some(want_cpus.as_str()),
            "{}",
            run.output
        );
        assert_eq!(cpuid.get("hypervisor"), Some("KVMKVMKVM"), "{}", run.output);
    }
}

#[test]
fn acpi_poweroff_ends_the_vmm_cleanly() {
    if !kvm_or_skip("acpi_poweroff_ends_the_vmm_cleanly") {
        return;
    }
    for n in [1u8, 4] {
        let run = boot_probe(&ProbeOptions::new("poweroff").vcpus(n)).unwrap();
        run.expect_all_ok("poweroff");
        assert_eq!(run.outcome.exit, VmExit::Poweroff);
        assert_eq!(run.expect_ok("poweroff").get("slp_typ"), Some("5"));
    }
}

/// Each feature the template hides is either hidden from the guest's CPUID, or (where this
/// host's KVM overrides CPUID, as some PVM builds do) hidden from Linux by the kernel parameter
/// Ember appended for it.
fn assert_hidden(run: &ember_test_support::ProbeRun, features: &[(&str, &str)]) {
    let cpuid = run.expect_ok("cpuid");
    let cmdline = run
        .expect_ok("cmdline")
        .get("text")
        .unwrap_or("")
        .to_string();
    let clearcpuid: Vec<&str> = cmdline
        .split(' ')
        .filter_map(|w| w.strip_prefix("clearcpuid="))
        .flat_map(|v| v.split(','))
        .collect();
    for (feature, linux_name) in features {
        let seen = cpuid.get(feature) == Some("yes");
        let param = if *feature == "xsave" {
            cmdline.split(' ').any(|w| w == "noxsave")
        } else {
            clearcpuid.contains(linux_name)
        };
        assert!(
            !seen || param,
            "{feature} visible to the guest and not cleared on the command line: {}",
            run.output
        );
    }
}

const EMULATED_RING0_HIDES: &[(&str, &str)] = &[
    ("xsave", "xsave"),
    ("popcnt", "popcnt"),
    ("cx16", "cx16"),
    ("avx", "avx"),
    ("smap", "smap"),
];

#[test]
fn cpu_templates_reach_the_guest() {
    if !kvm_or_skip("cpu_templates_reach_the_guest") {
        return;
    }
    let checks = "cpuid,cmdline";
    let emulated = boot_probe(&ProbeOptions::new(checks).cpu_template("emulated-ring0")).unwrap();
    emulated.expect_all_ok(checks);
    // Hidden from CPUID, or (where this host's KVM shows a bit whatever the table says)
    // cleared for Linux on the command line: which applies depends on the CPU.
    assert_hidden(&emulated, EMULATED_RING0_HIDES);

    let host = boot_probe(&ProbeOptions::new(checks)).unwrap();
    host.expect_all_ok(checks);
    // The host template passes through what KVM supports and adds nothing to the command line.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let supported = ember_vcpu::cpuid::supported(&kvm).unwrap();
    let leaf1 = ember_vcpu::cpuid::find(&supported, 1, 0).unwrap();
    let cx16 = if leaf1.ecx & (1 << 13) != 0 {
        "yes"
    } else {
        "no"
    };
    assert_eq!(
        host.expect_ok("cpuid").get("cx16"),
        Some(cx16),
        "{}",
        host.output
    );
    assert_eq!(
        host.expect_ok("cmdline").get("text"),
        Some(host.cmdline.as_str())
    );
}

#[test]
fn json_cpu_template_from_a_file() {
    if !kvm_or_skip("json_cpu_template_from_a_file") {
        return;
    }
    let builtin = ember_vcpu::template::CpuTemplate::builtin("emulated-ring0").unwrap();
    let dir = std::env::temp_dir().join(format!("ember-tmpl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("custom.json");
    std::fs::write(&path, builtin.to_json()).unwrap();
    let checks = "cpuid,cmdline";
    let run = boot_probe(&ProbeOptions::new(checks).cpu_template(path.to_str().unwrap())).unwrap();
    run.expect_all_ok(checks);
    assert_hidden(&run, EMULATED_RING0_HIDES);
}
