//! Linux tier: a real kernel, which no one here wrote, parses what Ember hands it.
//!
//! On hosts whose KVM emulates guest ring 0 (PVM, as on Ember's development machines) no VMM
//! gets Linux to init, so these tests boot the kernel's *early* boot and assert on what it
//! prints: the version banner, the command line Ember passed, and `BIOS-e820:` lines equal to
//! the map Ember built. The full boot to init runs only where ring 0 is native (detected with
//! the probe's `ring0` check).
//!
//! Artifacts come from `cargo xtask guest` (`.cache/guest/` or `$EMBER_CACHE/guest/`). The tests
//! are `#[ignore]`d in the fast tier; `cargo xtask test --linux` builds the artifacts and runs
//! them with `--ignored`, one at a time (each is a CPU-bound emulation of guest ring 0 here,
//! and running them side by side only slows each down). A missing artifact fails.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ember_memory::{E820Kind, MemoryLayout};
use ember_test_support::{
    boot_probe, boot_with_config, kvm_or_skip, workspace_root, ProbeOptions, ProbeRun,
};
use ember_vmm::{BootProtocolChoice, VmConfig, VmExit};

/// Kernel parameters for hosts whose KVM emulates guest ring 0: they keep the kernel away
/// from the instructions that emulator refuses (see docs/guest.md, "Host-compatibility").
const HOST_COMPAT: &str = "noxsave clearcpuid=popcnt,cx16,smap,smep,xsave,avx,avx2";

fn guest_dir() -> PathBuf {
    match std::env::var_os("EMBER_CACHE") {
        Some(dir) => PathBuf::from(dir).join("guest"),
        None => workspace_root().join(".cache/guest"),
    }
}

/// How much longer than measured on Ember's development hosts a guest may take: emulated
/// ring 0 runs at different speeds on different hosts, and the timeouts only bound failures
/// (a passing test ends as soon as the kernel printed what it asserts on).
const SLOWER_HOST_FACTOR: u32 = 3;

/// A timeout of `dev_host_s` seconds (what the development host needs, with margin) times
/// [`SLOWER_HOST_FACTOR`].
fn allow(dev_host_s: u64) -> Duration {
    Duration::from_secs(dev_host_s) * SLOWER_HOST_FACTOR
}

/// The artifact's path. A missing artifact is a failure: `cargo xtask guest` should have built
/// it.
fn artifact(name: &str) -> PathBuf {
    let path = guest_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing; `cargo xtask guest` (run by `cargo xtask test --linux`) builds it",
        path.display()
    );
    path
}

/// The e820 lines Linux prints for Ember's layout (`BIOS-e820: [mem 0x...-0x...] usable`).
fn expected_e820_lines(layout: &MemoryLayout) -> Vec<String> {
    layout
        .e820()
        .iter()
        .map(|e| {
            let kind = match e.kind {
                E820Kind::Ram => "usable",
                E820Kind::Reserved => "reserved",
            };
            format!(
                "BIOS-e820: [mem {:#018x}-{:#018x}] {kind}",
                e.addr,
                e.addr + e.size - 1
            )
        })
        .collect()
}

fn printed_e820_lines(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.find("BIOS-e820: ").map(|i| l[i..].trim_end().to_string()))
        .collect()
}

/// Boots `kernel` until the kernel has printed past its memory map, then stops it.
fn early_boot(
    kernel: PathBuf,
    protocol: Option<BootProtocolChoice>,
    memory_mib: u64,
    timeout: Duration,
) -> ProbeRun {
    let cmdline =
        format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 {HOST_COMPAT} ember.test=early");
    let mut config = VmConfig::new(kernel);
    config.cmdline = cmdline;
    config.memory_mib = memory_mib;
    config.boot_protocol = protocol;
    let mut opts = ProbeOptions::new("");
    // "Zone ranges:" follows the e820 dump and the command line in setup_arch().
    opts.stop_when = Some("Zone ranges:".into());
    opts.timeout = timeout;
    let started = Instant::now();
    let run = boot_with_config(config, &opts).expect("VM builds and runs");
    eprintln!(
        "early boot ({protocol:?}, {memory_mib} MiB) reached `Zone ranges:` in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    run
}

fn assert_early_boot(run: &ProbeRun) {
    let out = &run.output;
    assert_eq!(
        run.outcome.exit,
        VmExit::Stopped,
        "the kernel should still be running when the test stops it; console:\n{out}"
    );
    assert!(
        out.contains("Linux version 6.1"),
        "no banner; console:\n{out}"
    );
    assert!(
        out.contains(&format!("Command line: {}", run.cmdline)),
        "command line not echoed; console:\n{out}"
    );
    assert_eq!(
        printed_e820_lines(out),
        expected_e820_lines(&run.layout),
        "the kernel's e820 map differs from Ember's; console:\n{out}"
    );
    assert!(out.contains("Zone ranges:"), "{out}");
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn vmlinux_early_boot_through_pvh() {
    if !kvm_or_skip("vmlinux_early_boot_through_pvh") {
        return;
    }
    let kernel = artifact("vmlinux");
    let run = early_boot(kernel, Some(BootProtocolChoice::Pvh), 256, allow(50));
    assert_early_boot(&run);
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn vmlinux_early_boot_through_linux64() {
    if !kvm_or_skip("vmlinux_early_boot_through_linux64") {
        return;
    }
    let kernel = artifact("vmlinux");
    let run = early_boot(kernel, Some(BootProtocolChoice::Linux64), 4608, allow(50));
    assert_early_boot(&run);
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn bzimage_early_boot() {
    if !kvm_or_skip("bzimage_early_boot") {
        return;
    }
    let kernel = artifact("bzImage");
    // The bzImage decompresses itself first (LZ4, in emulated ring 0 here: ~14 s).
    let run = early_boot(kernel, None, 512, allow(55));
    assert_early_boot(&run);
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn debian_cloud_bzimage_early_boot() {
    if !kvm_or_skip("debian_cloud_bzimage_early_boot") {
        return;
    }
    let path = artifact("debian-cloud-bzImage");
    // Debian's kernel is large (14 MB, LZ4): its decompressor alone runs ~65 s in emulated
    // ring 0 here, so this test gets more time than the minimal kernel's.
    let run = early_boot(path, None, 512, allow(170));
    let out = &run.output;
    assert!(out.contains("Linux version"), "{out}");
    assert_eq!(
        printed_e820_lines(out),
        expected_e820_lines(&run.layout),
        "{out}"
    );
}

/// Why the tests that need Linux at init skip on hosts like Ember's development machines.
const RING0_EMULATED: &str = "this host's KVM emulates guest ring 0 (probe ring0 check: \
                              native=no); no VMM gets Linux to init here (docs/guest.md)";

/// Whether this host's KVM runs guest ring 0 natively, judged by the probe's `ring0` check.
fn ring0_is_native() -> bool {
    let run = boot_probe(&ProbeOptions::new("ring0")).expect("probe boots");
    let line = run.expect_ok("ring0");
    line.get("native") == Some("yes")
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn full_boot_to_init_where_ring0_is_native() {
    if !kvm_or_skip("full_boot_to_init_where_ring0_is_native") {
        return;
    }
    if !ring0_is_native() {
        ember_test_support::skip("full_boot_to_init_where_ring0_is_native", RING0_EMULATED);
        return;
    }
    let (kernel, initrd) = (artifact("vmlinux"), artifact("initramfs.cpio"));
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd);
    config.memory_mib = 256;
    config.cmdline = "console=ttyS0 reboot=k panic=-1 pci=off ember.shell".into();
    let mut opts = ProbeOptions::new("");
    opts.timeout = Duration::from_secs(120);
    // Answer the shell once init is up: a command whose output only a shell can produce.
    opts.input_after = "EMBER-INIT-OK".into();
    opts.serial_input = Some(b"echo EMBER-ECHO $((6*7)); reboot -f\n".to_vec());
    let run = boot_with_config(config, &opts).unwrap();
    let out = &run.output;
    assert!(out.contains("EMBER-INIT-OK"), "{out}");
    assert!(out.contains("EMBER-ECHO 42"), "{out}");
    assert_eq!(
        run.outcome.exit,
        VmExit::Reset,
        "reboot -f should end the VMM; {out}"
    );
    assert!(
        run.outcome.boot_time.is_some(),
        "/init writes the boot timer"
    );
}

/// Percent-encodes a shell command for `ember.cmd=` (docs/guest.md).
fn ember_cmd(command: &str) -> String {
    command
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'.' | b'-' | b'_' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn linux_mounts_an_ext4_disk_and_its_write_reaches_the_image() {
    if !kvm_or_skip("linux_mounts_an_ext4_disk_and_its_write_reaches_the_image") {
        return;
    }
    if !ring0_is_native() {
        ember_test_support::skip(
            "linux_mounts_an_ext4_disk_and_its_write_reaches_the_image",
            RING0_EMULATED,
        );
        return;
    }
    let (kernel, initrd) = (artifact("vmlinux"), artifact("initramfs.cpio"));
    let dir = std::env::temp_dir().join(format!("ember-ext4-{}", std::process::id()));
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), "hello from the host\n").unwrap();
    let img = dir.join("disk.ext4");
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&img)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed for this test");
    assert!(status.success());

    let command = "mount -t ext4 /dev/vda /mnt && cat /mnt/hello.txt && \
                   echo written-by-the-guest > /mnt/guest.txt && sync && umount /mnt && poweroff -f";
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd);
    config.memory_mib = 256;
    config.disks.push(ember_vmm::DiskConfig {
        path: img.clone(),
        read_only: false,
        id: Some("data".into()),
        ..Default::default()
    });
    config.cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 pci=off ember.cmd={}",
        ember_cmd(&format!("mkdir -p /mnt && {command}"))
    );
    let mut opts = ProbeOptions::new("");
    opts.timeout = Duration::from_secs(120);
    let run = boot_with_config(config, &opts).unwrap();
    let out = &run.output;
    assert!(out.contains("hello from the host"), "{out}");
    assert_eq!(run.outcome.exit, VmExit::Poweroff, "{out}");
    let dump = std::process::Command::new("debugfs")
        .args(["-R", "cat /guest.txt"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&dump.stdout).trim(),
        "written-by-the-guest"
    );
}

/// Boots the minimal kernel with `vcpus` until it has parsed the MADT (or, without ACPI, the
/// MP table) and sized its CPU map.
fn early_boot_smp(vcpus: u8, acpi: bool) -> ProbeRun {
    let kernel = guest_dir().join("vmlinux");
    let mut config = VmConfig::new(kernel);
    config.cmdline = format!("console=ttyS0 earlyprintk=serial,ttyS0,115200 {HOST_COMPAT}");
    config.memory_mib = 256;
    config.vcpus = vcpus;
    config.acpi = acpi;
    let mut opts = ProbeOptions::new("");
    opts.stop_when = Some("smpboot: Allowing".into());
    opts.timeout = allow(55);
    let started = Instant::now();
    let run = boot_with_config(config, &opts).expect("VM builds and runs");
    eprintln!(
        "early boot with {vcpus} vCPUs reached `smpboot: Allowing` in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    run
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn linux_finds_every_acpi_table_and_uses_the_madt_for_smp() {
    if !kvm_or_skip("linux_finds_every_acpi_table_and_uses_the_madt_for_smp") {
        return;
    }
    artifact("vmlinux");
    for vcpus in [2u8, 4] {
        let run = early_boot_smp(vcpus, true);
        let out = &run.output;
        assert_eq!(run.outcome.exit, VmExit::Stopped, "{out}");
        for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC"] {
            assert!(
                out.contains(&format!("ACPI: {table} 0x")),
                "Linux did not list the {table} table; console:\n{out}"
            );
        }
        assert!(
            out.contains("ACPI: Using ACPI (MADT) for SMP configuration information"),
            "{out}"
        );
        assert!(
            out.contains(&format!("smpboot: Allowing {vcpus} CPUs, 0 hotplug CPUs")),
            "{out}"
        );
        assert!(
            out.contains("ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2"),
            "{out}"
        );
        for bad in [
            "ACPI Error",
            "ACPI BIOS Error",
            "ACPI Warning",
            "Incorrect checksum",
            "Invalid",
        ] {
            assert!(
                !out.contains(bad),
                "Linux complained ({bad}); console:\n{out}"
            );
        }
    }
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn emulated_ring0_template_hides_what_the_emulator_refuses() {
    if !kvm_or_skip("emulated_ring0_template_hides_what_the_emulator_refuses") {
        return;
    }
    let kernel = artifact("vmlinux");
    // No host-compatibility parameters on the command line: the template brings them.
    let mut config = VmConfig::new(kernel);
    config.cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200".into();
    config.memory_mib = 256;
    config.cpu_template = Some("emulated-ring0".into());
    let mut opts = ProbeOptions::new("");
    opts.stop_when = Some("Zone ranges:".into());
    opts.timeout = allow(50);
    let run = boot_with_config(config, &opts).expect("VM builds and runs");
    let out = &run.output;
    assert_eq!(run.outcome.exit, VmExit::Stopped, "{out}");
    let cleared = out
        .lines()
        .find_map(|l| {
            l.split_once("Clearing CPUID bits:")
                .map(|(_, v)| v.to_string())
        })
        .unwrap_or_default();
    // What Ember appended for this host (`ember_vmm::Vm::cmdline`): the features this host's
    // KVM shows the guest whatever CPUID says (ember_vcpu::template::overridden_bits); which
    // ones depends on the CPU.
    let appended: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("Command line:"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("clearcpuid="))
        .flat_map(|v| v.split(','))
        .collect();
    if !appended.is_empty() {
        for feature in &appended {
            assert!(
                cleared.split_whitespace().any(|w| w == *feature),
                "{feature} not cleared: {cleared}\n{out}"
            );
        }
        assert!(
            !cleared.contains("unknown"),
            "Linux did not know a name: {cleared}"
        );
    } else {
        eprintln!("note: this host's KVM honours the template's CPUID; nothing was appended");
        assert!(cleared.is_empty(), "{out}");
    }
    assert_eq!(
        printed_e820_lines(out),
        expected_e820_lines(&run.layout),
        "{out}"
    );
}

#[test]
#[ignore = "Linux tier: cargo xtask test --linux"]
fn without_acpi_linux_uses_the_mp_table() {
    if !kvm_or_skip("without_acpi_linux_uses_the_mp_table") {
        return;
    }
    artifact("vmlinux");
    let run = early_boot_smp(4, false);
    let out = &run.output;
    assert_eq!(run.outcome.exit, VmExit::Stopped, "{out}");
    assert!(
        out.contains("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]"),
        "{out}"
    );
    assert!(
        out.contains("Intel MultiProcessor Specification v1.4"),
        "{out}"
    );
    for cpu in [
        "Processor #0 (Bootup-CPU)",
        "Processor #1",
        "Processor #2",
        "Processor #3",
    ] {
        assert!(out.contains(cpu), "{cpu} missing; console:\n{out}");
    }
    assert!(out.contains("IOAPIC[0]: apic_id 4"), "{out}");
    assert!(
        out.contains("smpboot: Allowing 4 CPUs, 0 hotplug CPUs"),
        "{out}"
    );
}
