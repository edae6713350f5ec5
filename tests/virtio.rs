//! virtio-mmio and virtio-blk, end to end: the probe's polled driver reads the pattern the test
//! wrote, writes a new one, flushes and reads it back; after the VMM exits the test finds the
//! new pattern in the image byte for byte. Read-only disks refuse writes and stay untouched;
//! a hostile driver cannot hurt the VMM.

use std::path::{Path, PathBuf};

use ember_test_support::{
    blk_pattern_byte, boot_probe, kvm_or_skip, write_blk_image, ProbeLine, ProbeOptions, ProbeRun,
    Status,
};

const SECTORS: u64 = 8192; // 4 MiB
const SEED: u8 = 0x5a;
const WSEED: u8 = 0xa5;
const WSECTOR: u64 = 128;
const WCOUNT: u64 = 256;

fn image(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-virtio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    write_blk_image(&path, SECTORS, SEED).unwrap();
    path
}

/// Small throughput runs keep the test quick; the figures are for the benches.
const BLK_PARAMS: &str = "probe.blk.iops_n=200 probe.blk.mib_n=4";

fn blk_lines(run: &ProbeRun) -> Vec<&ProbeLine> {
    run.lines
        .iter()
        .filter(|l| l.check == "blk" && l.status != Status::Other("waiting-input".into()))
        .collect()
}

/// The image holds the write seed's pattern over the written range and the original one
/// everywhere else.
fn assert_written(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() as u64, SECTORS * 512);
    let written = WSECTOR * 512..(WSECTOR + WCOUNT) * 512;
    let mut wrong = 0u64;
    for (i, &b) in bytes.iter().enumerate() {
        let i = i as u64;
        let seed = if written.contains(&i) { WSEED } else { SEED };
        if b != blk_pattern_byte(i, seed) {
            wrong += 1;
        }
    }
    assert_eq!(
        wrong,
        0,
        "{wrong} bytes of {} differ from the expected image",
        path.display()
    );
}

fn assert_untouched(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let wrong = bytes
        .iter()
        .enumerate()
        .filter(|(i, &b)| b != blk_pattern_byte(*i as u64, SEED))
        .count();
    assert_eq!(wrong, 0, "read-only image {} was modified", path.display());
}

#[test]
fn guest_writes_reach_the_image_and_survive_the_vm() {
    if !kvm_or_skip("guest_writes_reach_the_image_and_survive_the_vm") {
        return;
    }
    let img = image("rw.img");
    let checks = "virtio,blk";
    let run = boot_probe(
        &ProbeOptions::new(checks)
            .disk(&img, false, Some("ember-rw"))
            .cmdline(BLK_PARAMS),
    )
    .unwrap();
    run.expect_all_ok(checks);
    let virtio = run.expect_ok("virtio");
    assert_eq!(virtio.get("devices"), Some("1"), "{}", run.output);
    assert_eq!(virtio.get("acpi"), Some("1"), "{}", run.output);
    assert_eq!(virtio.get("versions"), Some("2"), "{}", run.output);
    let (disk, block) = run.outcome.disks().next().expect("a disk");
    assert_eq!(
        virtio.get("bases"),
        Some(format!("{:#x}", disk.mmio_base).as_str())
    );
    assert_eq!(virtio.get("gsis"), Some(disk.gsi.to_string().as_str()));

    let blk = run.expect_ok("blk");
    assert_eq!(blk.get("id"), Some("ember-rw"));
    assert_eq!(blk.get("sectors"), Some(SECTORS.to_string().as_str()));
    assert_eq!(blk.get("ro"), Some("no"));
    for k in ["read", "write", "flush", "readback"] {
        assert_eq!(blk.get(k), Some("ok"), "{k}: {}", run.output);
    }
    assert!(block.writes > 0 && block.flushes > 0, "{block:?}");
    assert_eq!(block.malformed_chains, 0);
    assert_written(&img);
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    if !kvm_or_skip("read_only_disk_refuses_writes_and_stays_unchanged") {
        return;
    }
    let img = image("ro.img");
    let checks = "virtio,blk";
    let run = boot_probe(
        &ProbeOptions::new(checks)
            .disk(&img, true, None)
            .cmdline(BLK_PARAMS),
    )
    .unwrap();
    run.expect_all_ok(checks);
    let blk = run.expect_ok("blk");
    assert_eq!(blk.get("ro"), Some("yes"), "{}", run.output);
    assert_eq!(blk.get("write"), Some("ioerr"), "{}", run.output);
    assert!(run.outcome.disks().next().unwrap().1.read_only_rejected > 0);
    assert_untouched(&img);
}

#[test]
fn two_disks_at_once() {
    if !kvm_or_skip("two_disks_at_once") {
        return;
    }
    let rw = image("two-rw.img");
    let ro = image("two-ro.img");
    let checks = "virtio,blk";
    let run = boot_probe(
        &ProbeOptions::new(checks)
            .disk(&rw, false, Some("first"))
            .disk(&ro, true, Some("second"))
            .cmdline(BLK_PARAMS),
    )
    .unwrap();
    run.expect_all_ok(checks);
    assert_eq!(run.expect_ok("virtio").get("devices"), Some("2"));
    let lines = blk_lines(&run);
    assert_eq!(lines.len(), 2, "{}", run.output);
    // Disks are numbered by MMIO base, which follows the configuration order.
    assert_eq!(lines[0].get("id"), Some("first"));
    assert_eq!(lines[1].get("id"), Some("second"));
    assert_eq!(lines[1].get("write"), Some("ioerr"));
    assert_written(&rw);
    assert_untouched(&ro);
}

#[test]
fn without_acpi_the_guest_finds_disks_on_the_command_line() {
    if !kvm_or_skip("without_acpi_the_guest_finds_disks_on_the_command_line") {
        return;
    }
    let img = image("cmdline.img");
    let checks = "virtio,blk";
    let mut opts = ProbeOptions::new(checks)
        .disk(&img, false, None)
        .cmdline(BLK_PARAMS);
    opts.acpi = false;
    let run = boot_probe(&opts).unwrap();
    run.expect_all_ok(checks);
    let virtio = run.expect_ok("virtio");
    assert_eq!(virtio.get("cmdline"), Some("1"), "{}", run.output);
    assert_eq!(virtio.get("acpi"), Some("0"), "{}", run.output);
    assert_written(&img);
}

#[test]
fn hostile_driver_cannot_hurt_the_vmm() {
    if !kvm_or_skip("hostile_driver_cannot_hurt_the_vmm") {
        return;
    }
    let img = image("hostile.img");
    let checks = "hostile,blk";
    let run = boot_probe(
        &ProbeOptions::new(checks)
            .disk(&img, false, None)
            .cmdline(BLK_PARAMS),
    )
    .unwrap();
    // The VMM survived everything and still serves valid requests afterwards.
    run.expect_all_ok(checks);
    assert_eq!(run.expect_ok("hostile").get("valid_read"), Some("ok"));
    let (disk, block) = run.outcome.disks().next().expect("a disk");
    let t = &disk.transport;
    let b = block;
    eprintln!("transport counters: {t:?}\nblock counters: {b:?}");
    assert!(t.invalid_state_writes + t.invalid_queue_values + t.invalid_status_transitions > 0);
    // DRIVER_OK with rings outside RAM (notifications before activation are also ignored,
    // but how many of them the event loop sees before the guest's next step is timing).
    assert!(t.activation_failures > 0, "{t:?}");
    assert!(b.malformed_chains + b.dropped_chains > 0, "{b:?}");
    assert!(b.out_of_range > 0, "{b:?}");
    // Only the valid pattern was ever written by the blk check after the attack.
    assert_written(&img);
}
