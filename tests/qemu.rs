//! The probe guest also boots under QEMU's `microvm` machine, so VMMs can be compared on the
//! same guest. Skipped (loudly) only where QEMU is not installed; `cargo xtask test` installs it.

use std::process::{Command, Stdio};
use std::time::Duration;

use ember_test_support::{kvm_or_skip, probe_elf, ProbeLine, Status};

fn qemu() -> Option<&'static str> {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    found.then_some("qemu-system-x86_64")
}

/// Whether KVM and QEMU are both there; a loud skip message naming `test` otherwise.
fn kvm_and_qemu_or_skip(test: &str) -> bool {
    if !kvm_or_skip(test) {
        return false;
    }
    if qemu().is_none() {
        ember_test_support::skip(
            test,
            "qemu-system-x86_64 is not installed (cargo xtask test installs it)",
        );
        return false;
    }
    true
}

fn boot_under_qemu(memory_mib: u64, checks: &str) -> (String, Vec<ProbeLine>) {
    boot_under_qemu_with(memory_mib, checks, &["-M", "microvm"])
}

fn boot_under_qemu_with(
    memory_mib: u64,
    checks: &str,
    machine: &[&str],
) -> (String, Vec<ProbeLine>) {
    let qemu = qemu().unwrap();
    let child = Command::new(qemu)
        .args(machine)
        // A fixed CPU model rather than `host`: `-cpu host` brings the host's model-specific
        // MSRs, and KVM on a PVM host refuses some of them (which differ between Intel and AMD
        // hosts), aborting QEMU. The probe needs no host feature.
        .args(["-enable-kvm", "-cpu", "kvm64", "-m"])
        .arg(memory_mib.to_string())
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
        ])
        .arg(probe_elf())
        .arg("-append")
        .arg(format!("probe={checks} probe.exits=3000"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu");
    // Bound the run: QEMU exits on the probe's reset (-no-reboot); kill it if it does not. The
    // watchdog is told when QEMU was reaped, so it never signals a pid that may be reused.
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(60)).is_err() {
            // SAFETY: kill(2) on the pid we spawned, which has not been reaped yet (the main
            // thread reports the reaping through the channel before joining us).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let out = out.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = text.lines().filter_map(ProbeLine::parse).collect();
    (text, lines)
}

#[test]
fn probe_boots_under_qemu_microvm() {
    if !kvm_and_qemu_or_skip("probe_boots_under_qemu_microvm") {
        return;
    }
    for mib in [128u64, 4608] {
        let checks = "memmap,cmdline,boottimer,serial,exitloop";
        let (text, lines) = boot_under_qemu(mib, checks);
        for check in checks.split(',') {
            let line = lines.iter().find(|l| l.check == check);
            assert!(
                matches!(line, Some(l) if l.status == Status::Ok),
                "{check} under QEMU with {mib} MiB: {line:?}\n{text}"
            );
        }
        let done = lines.iter().find(|l| l.check == "done").expect("done line");
        assert_eq!(done.get("failed"), Some("0"), "{text}");
        let memmap = lines.iter().find(|l| l.check == "memmap").unwrap();
        let ram = memmap.get("ram").unwrap();
        // QEMU's own map: RAM at 1 MiB, and above 4 GiB for the large guest.
        assert!(ram.contains("0x100000-"), "{ram}");
        if mib > 3072 {
            assert!(ram.contains("0x100000000-"), "{ram}");
        }
    }
}

#[test]
fn probe_reads_qemus_own_acpi_tables_and_starts_its_aps() {
    if !kvm_and_qemu_or_skip("probe_reads_qemus_own_acpi_tables_and_starts_its_aps") {
        return;
    }
    let checks = "acpi,smp,cpuid";
    let (text, lines) = boot_under_qemu_with(256, checks, &["-M", "microvm,acpi=on", "-smp", "4"]);
    for check in checks.split(',') {
        let line = lines.iter().find(|l| l.check == check);
        assert!(
            matches!(line, Some(l) if l.status == Status::Ok),
            "{check} under QEMU -smp 4: {line:?}\n{text}"
        );
    }
    let acpi = lines.iter().find(|l| l.check == "acpi").unwrap();
    assert_eq!(acpi.get("cpus"), Some("4"), "{text}");
    let smp = lines.iter().find(|l| l.check == "smp").unwrap();
    assert_eq!(smp.get("started"), Some("3"), "{text}");
}

#[test]
fn probe_drives_qemus_virtio_blk_too() {
    if !kvm_and_qemu_or_skip("probe_drives_qemus_virtio_blk_too") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-qemu-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    ember_test_support::write_blk_image(&rw, 8192, 0x5a).unwrap();
    ember_test_support::write_blk_image(&ro, 8192, 0x5a).unwrap();
    let drive = |id: &str, path: &std::path::Path, ro: bool| {
        format!(
            "id={id},file={},format=raw,if=none{}",
            path.display(),
            if ro { ",readonly=on" } else { "" }
        )
    };
    let (d0, d1) = (drive("d0", &rw, false), drive("d1", &ro, true));
    let checks = "virtio,blk";
    let (text, lines) = boot_under_qemu_with(
        256,
        &format!("{checks} probe.blk.iops_n=200 probe.blk.mib_n=4"),
        &[
            "-M",
            "microvm,acpi=on",
            "-global",
            "virtio-mmio.force-legacy=false",
            "-drive",
            &d0,
            "-device",
            "virtio-blk-device,drive=d0,serial=RWDISK",
            "-drive",
            &d1,
            "-device",
            "virtio-blk-device,drive=d1,serial=RODISK",
        ],
    );
    let virtio = lines
        .iter()
        .find(|l| l.check == "virtio")
        .expect("virtio line");
    assert_eq!(virtio.status, Status::Ok, "{text}");
    assert_eq!(virtio.get("devices"), Some("2"), "{text}");
    let blk: Vec<_> = lines.iter().filter(|l| l.check == "blk").collect();
    assert_eq!(blk.len(), 2, "{text}");
    assert!(blk.iter().all(|l| l.status == Status::Ok), "{text}");
    let ids: Vec<_> = blk.iter().map(|l| l.get("id").unwrap_or("")).collect();
    assert!(ids.contains(&"RWDISK") && ids.contains(&"RODISK"), "{text}");
    // QEMU's writes landed in the image exactly as Ember's do.
    let bytes = std::fs::read(&rw).unwrap();
    let written = 128 * 512..384 * 512;
    let wrong = bytes
        .iter()
        .enumerate()
        .filter(|(i, &b)| {
            let seed = if written.contains(i) { 0xa5 } else { 0x5a };
            b != ember_test_support::blk_pattern_byte(*i as u64, seed)
        })
        .count();
    assert_eq!(wrong, 0, "{text}");
}
