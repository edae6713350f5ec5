//! The probe guest also boots under QEMU's `microvm` machine, so VMMs can be compared on the
//! same guest. Skipped (loudly) only where QEMU is not installed; `cargo xtask test` installs it.

use std::process::{Command, Stdio};
use std::time::Duration;

use ember_test_support::net::{net_peer, Netns};
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
    boot_under_qemu_in(None, "kvm64", memory_mib, checks, machine)
}

/// Boots the probe under QEMU, inside network namespace `netns` if given, with CPU model
/// `cpu`.
fn boot_under_qemu_in(
    netns: Option<&str>,
    cpu: &str,
    memory_mib: u64,
    checks: &str,
    machine: &[&str],
) -> (String, Vec<ProbeLine>) {
    let qemu = qemu().unwrap();
    let mut cmd = match netns {
        // `ip netns exec` execs QEMU, so the pid below is QEMU's.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, qemu]);
            c
        }
        None => Command::new(qemu),
    };
    let child = cmd
        .args(machine)
        // A fixed CPU model rather than `host`: `-cpu host` brings the host's model-specific
        // MSRs, and KVM on a PVM host refuses some of them (which differ between Intel and AMD
        // hosts), aborting QEMU. The probe needs no host feature.
        .args(["-enable-kvm", "-cpu", cpu, "-m"])
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

fn line<'a>(lines: &'a [ProbeLine], check: &str, text: &str) -> &'a ProbeLine {
    lines
        .iter()
        .find(|l| l.check == check)
        .unwrap_or_else(|| panic!("no {check} line\n{text}"))
}

fn num(l: &ProbeLine, key: &str) -> u64 {
    l.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing or not a number in {l:?}"))
}

#[test]
fn probe_takes_interrupts_and_drives_qemus_rng_and_balloon() {
    if !kvm_and_qemu_or_skip("probe_takes_interrupts_and_drives_qemus_rng_and_balloon") {
        return;
    }
    let machine = [
        "-M",
        "microvm,acpi=on",
        "-global",
        "virtio-mmio.force-legacy=false",
        "-device",
        "virtio-rng-device",
        "-device",
        "virtio-balloon-device",
    ];
    // Polled device checks, then the interrupt check.
    let (text, lines) = boot_under_qemu_in(
        None,
        "kvm64,+tsc-deadline",
        256,
        "rng,balloon,irq probe.balloon.touch_mib=8",
        &machine,
    );
    let irq = line(&lines, "irq", &text);
    assert_eq!(irq.status, Status::Ok, "{text}");
    assert!(irq.get("timer").unwrap().starts_with("oneshot"), "{text}");
    assert_eq!(irq.get("timer_early"), Some("0"), "{text}");
    assert_eq!(irq.get("timer_lost"), Some("0"), "{text}");
    assert_eq!(irq.get("com1"), Some("thre,rx"), "{text}");
    assert_eq!(irq.get("virtio"), Some("2"), "{text}");
    assert_eq!(irq.get("spurious"), Some("0"), "{text}");
    let rng = line(&lines, "rng", &text);
    assert_eq!(rng.status, Status::Ok, "{text}");
    assert_eq!(rng.get("bytes"), Some("4096"), "{text}");
    assert!(num(rng, "distinct") >= 64, "{text}");
    let balloon = line(&lines, "balloon", &text);
    assert_eq!(balloon.status, Status::Ok, "{text}");
    assert_eq!(balloon.get("stats"), Some("yes"), "{text}");
    assert_eq!(balloon.get("touched_mib"), Some("8"), "{text}");
    assert_eq!(
        line(&lines, "done", &text).get("failed"),
        Some("0"),
        "{text}"
    );

    // The same devices waited for by interrupt, edge-triggered and as the DSDT says.
    for trigger in ["edge", "acpi"] {
        let (text, lines) = boot_under_qemu_in(
            None,
            "kvm64",
            256,
            &format!("rng,balloon,irq probe.irq=1 probe.irq.trigger={trigger}"),
            &machine,
        );
        let rng = line(&lines, "rng", &text);
        assert_eq!(rng.status, Status::Ok, "{text}");
        assert!(num(rng, "irqs") >= 1, "{text}");
        assert_eq!(line(&lines, "balloon", &text).status, Status::Ok, "{text}");
        let irq = line(&lines, "irq", &text);
        assert_eq!(irq.status, Status::Ok, "{text}");
        if trigger == "edge" {
            assert_eq!(irq.get("level_redelivered"), None, "{text}");
        }
    }
}

#[test]
fn probe_talks_to_a_tap_in_a_namespace_under_qemu() {
    let test = "probe_talks_to_a_tap_in_a_namespace_under_qemu";
    if !kvm_and_qemu_or_skip(test) {
        return;
    }
    let Some(ns) = Netns::create(test) else {
        return;
    };
    let ns = std::sync::Arc::new(ns);
    // QEMU's own offer (MRG_RXBUF, CSUM, GUEST_CSUM) with the offloads accepted, polled;
    // then none of them, waiting for interrupts.
    for (params, device) in [
        (
            "probe.net.features=0x2001802b",
            "virtio-net-device,netdev=n0",
        ),
        (
            "probe.irq=1",
            "virtio-net-device,netdev=n0,csum=off,guest_csum=off,mrg_rxbuf=off",
        ),
    ] {
        let peer_ns = ns.clone();
        let peer = std::thread::spawn(move || net_peer(&peer_ns, 100));
        // The peer binds before the probe says hello (QEMU takes longer to boot).
        std::thread::sleep(Duration::from_millis(200));
        let (text, lines) = boot_under_qemu_in(
            Some(&ns.name),
            "kvm64",
            256,
            &format!(
                "net probe.net.ip=192.0.2.2/24 probe.net.peer=192.0.2.1:9000 \
                 probe.net.serve_ms=3000 probe.net.flood=100 probe.net.size=512 {params}"
            ),
            &[
                "-M",
                "microvm,acpi=on",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-netdev",
                "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device",
                device,
            ],
        );
        let p = peer.join().unwrap();
        let net = line(&lines, "net", &text);
        assert_eq!(net.status, Status::Ok, "{text}\n{p:?}");
        let mac = net.get("mac").unwrap();
        let (hello, from) = p
            .hello
            .clone()
            .unwrap_or_else(|| panic!("no hello\n{text}"));
        assert_eq!(hello, format!("PROBE-NET-HELLO mac={mac}"), "{text}");
        assert_eq!(from.to_string(), "192.0.2.2:7", "{text}");
        assert!(p.flood_rx > 0, "{text}\n{p:?}");
        assert_eq!(p.pings, 3, "{text}\n{p:?}");
        assert_eq!(p.echoes, 4, "{text}\n{p:?}");
        assert_eq!(num(net, "icmp"), 3, "{text}");
        assert_eq!(num(net, "udp_echo"), 4, "{text}");
        assert_eq!(num(net, "flood"), 100, "{text}");
        assert!(num(net, "pps") > 0, "{text}");
        if params.contains("irq") {
            assert_eq!(net.get("mrg_rxbuf"), Some("no"), "{text}");
            assert!(num(net, "irqs") > 0, "{text}");
        } else {
            assert_eq!(net.get("csum"), Some("yes"), "{text}");
            assert_eq!(net.get("guest_csum"), Some("yes"), "{text}");
        }
    }
}
