//! The probe guest boots under Ember through PVH and the Linux 64-bit protocol, on small and
//! large guests, and every check reports ok with the memory map Ember computed.

use ember_test_support::{boot_probe, format_ram_list, kvm_or_skip, ProbeOptions, ProbeRun};
use ember_vmm::BootProtocolChoice;

const CHECKS: &str = "memmap,cmdline,boottimer,serial,exitloop,reset";

fn boot_all_checks(protocol: BootProtocolChoice, memory_mib: u64) -> ProbeRun {
    let opts = ProbeOptions::new(CHECKS)
        .memory_mib(memory_mib)
        .protocol(protocol)
        .cmdline("probe.exits=3000 console=ttyS0");
    let run = boot_probe(&opts).expect("the probe VM should build and run");
    run.expect_all_ok(CHECKS);

    let entry = match protocol {
        BootProtocolChoice::Pvh => "pvh",
        BootProtocolChoice::Linux64 => "linux64",
    };
    let start = run
        .lines
        .iter()
        .find(|l| l.check == "start")
        .expect("start line");
    assert_eq!(start.get("entry"), Some(entry), "{}", run.output);
    assert_eq!(start.get("ring"), Some("3"));

    // The map the guest was handed is the layout Ember computed, entry for entry.
    let memmap = run.expect_ok("memmap");
    assert_eq!(
        memmap.get("ram"),
        Some(format_ram_list(&run.layout).as_str())
    );
    let source = if protocol == BootProtocolChoice::Pvh {
        "pvh"
    } else {
        "e820"
    };
    assert_eq!(memmap.get("source"), Some(source));

    // The command line arrives intact.
    assert_eq!(
        run.expect_ok("cmdline").get("text"),
        Some(run.cmdline.as_str())
    );

    // The boot timer write was recorded by the VMM.
    assert!(run.outcome.boot_time.is_some(), "boot timer not recorded");
    let exits = run.expect_ok("exitloop");
    assert_eq!(exits.get("exits"), Some("3000"));
    run
}

#[test]
fn pvh_128_mib() {
    if !kvm_or_skip("pvh_128_mib") {
        return;
    }
    boot_all_checks(BootProtocolChoice::Pvh, 128);
}

#[test]
fn linux64_128_mib() {
    if !kvm_or_skip("linux64_128_mib") {
        return;
    }
    boot_all_checks(BootProtocolChoice::Linux64, 128);
}

#[test]
fn pvh_3584_mib_fills_low_ram_and_spills_above_4g() {
    if !kvm_or_skip("pvh_3584_mib") {
        return;
    }
    let run = boot_all_checks(BootProtocolChoice::Pvh, 3584);
    assert!(run.layout.ram_end() > 1 << 32);
}

#[test]
fn linux64_3584_mib() {
    if !kvm_or_skip("linux64_3584_mib") {
        return;
    }
    boot_all_checks(BootProtocolChoice::Linux64, 3584);
}

#[test]
fn pvh_4608_mib() {
    if !kvm_or_skip("pvh_4608_mib") {
        return;
    }
    let run = boot_all_checks(BootProtocolChoice::Pvh, 4608);
    assert_eq!(
        run.layout.ram_end(),
        (4 << 30) + (4608u64 << 20) - 0xd000_0000
    );
}

#[test]
fn linux64_4608_mib() {
    if !kvm_or_skip("linux64_4608_mib") {
        return;
    }
    boot_all_checks(BootProtocolChoice::Linux64, 4608);
}

#[test]
fn serial_input_is_echoed_by_the_guest() {
    if !kvm_or_skip("serial_input_is_echoed_by_the_guest") {
        return;
    }
    let mut opts = ProbeOptions::new("serial").cmdline("probe.echo=ember42");
    opts.serial_input = Some(b"ember42\n".to_vec());
    let run = boot_probe(&opts).unwrap();
    run.expect_all_ok("serial");
    assert_eq!(run.expect_ok("serial").get("echo"), Some("ember42"));
}

#[test]
fn preferred_protocol_is_pvh() {
    if !kvm_or_skip("preferred_protocol_is_pvh") {
        return;
    }
    let run = boot_probe(&ProbeOptions::new("cmdline")).unwrap();
    run.expect_all_ok("cmdline");
    let start = run.lines.iter().find(|l| l.check == "start").unwrap();
    assert_eq!(start.get("entry"), Some("pvh"));
}

#[test]
fn string_port_io_reaches_the_device_one_item_at_a_time() {
    if !kvm_or_skip("string_port_io_reaches_the_device_one_item_at_a_time") {
        return;
    }
    let run = boot_probe(&ProbeOptions::new("stringio")).unwrap();
    run.expect_all_ok("stringio");
    // `rep insb` from the scratch register read its value eight times (one exit of count 8).
    assert_eq!(
        run.expect_ok("stringio").get("insb"),
        Some("5a5a5a5a5a5a5a5a")
    );
    // The line the guest wrote with one `rep outsb` is on the console.
    assert_eq!(
        run.expect_ok("stringio-outsb").get("marker"),
        Some("rep-outsb-reached-the-uart"),
        "{}",
        run.output
    );
}
