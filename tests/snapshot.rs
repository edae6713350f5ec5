//! Snapshot and restore with a busy guest: the probe fills memory, keeps its clock, waits for
//! the host across the snapshot, then checks its memory and drives its devices in the restored
//! VM.

mod snapshot_common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use ember_test_support::{kvm_or_skip, probe_elf};
use ember_vmm::{VmBuilder, VmExit};
use snapshot_common::{files, restore, take_snapshot};

#[test]
fn a_restored_probe_finds_its_memory_and_its_devices() {
    if !kvm_or_skip("a_restored_probe_finds_its_memory_and_its_devices") {
        return;
    }
    let f = files();
    let before = take_snapshot(&f, "snapshot,blk,rng");
    assert!(!before.contains("PROBE snapshot ok"), "{before}");
    let mem_len = std::fs::metadata(&f.memory).unwrap().len();
    assert_eq!(mem_len, 128 << 20);
    let (h, console, join) = restore(&f);
    // The restored guest is in its wait: the byte releases it.
    h.send_serial(b"g");
    let outcome = join.join().unwrap().unwrap();
    let out = console.text();
    assert_eq!(outcome.exit, VmExit::Reset, "{out}");
    assert!(
        out.contains("PROBE snapshot ok pattern=ok tsc_forward=yes"),
        "{out}"
    );
    assert!(out.contains("PROBE blk ok"), "{out}");
    assert!(out.contains("PROBE rng ok"), "{out}");
    assert!(out.contains("PROBE done checks=3 failed=0"), "{out}");
    // The memory file is only read (MAP_PRIVATE): the same snapshot restores again.
    let (h, console, join) = restore(&f);
    h.send_serial(b"g");
    let outcome = join.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Reset, "{}", console.text());
}

/// The ID of the last `PROBE vmgenid ok ... id=<hex>` line.
fn generation_id(console: &str) -> Option<String> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.starts_with("PROBE vmgenid ok"))?;
    Some(
        line.split("id=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string(),
    )
}

/// Every restore of a snapshot is a new generation: the guest reads a new VM generation ID
/// (ACPI `VGEN`), the same one the VMM reports, and never the snapshotted VM's.
#[test]
fn each_restore_gets_a_new_vm_generation_id() {
    if !kvm_or_skip("each_restore_gets_a_new_vm_generation_id") {
        return;
    }
    let f = files();
    let before = take_snapshot(&f, "vmgenid,snapshot,vmgenid");
    let original = generation_id(&before).expect("the booted VM's ID");
    let mut seen = vec![original];
    for _ in 0..2 {
        let (h, console, join) = restore(&f);
        let given = h.generation_id().expect("an ID");
        h.send_serial(b"g");
        let outcome = join.join().unwrap().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "{out}");
        let id = generation_id(&out).unwrap_or_else(|| panic!("{out}"));
        let hex: String = given.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(id, hex, "the guest reads the ID the VMM wrote");
        assert!(!seen.contains(&id), "{id} again: {seen:?}");
        seen.push(id);
        assert!(out.contains("PROBE done checks=3 failed=0"), "{out}");
    }
}

/// `SnapshotState::advance_clock_to_now` (Firecracker's `clock_realtime`): the restored
/// guest's kvmclock is moved on by the host time since the snapshot; without it the clock goes
/// on from the snapshot's moment.
#[test]
fn a_restore_can_move_the_guest_clock_on_by_the_time_since_the_snapshot() {
    if !kvm_or_skip("a_restore_can_move_the_guest_clock_on_by_the_time_since_the_snapshot") {
        return;
    }
    const SLEEP_NS: u64 = 1_500_000_000;
    let f = files();
    take_snapshot(&f, "snapshot");
    let saved = ember_vmm::read_snapshot(&f.state).unwrap();
    let at_snapshot = saved.machine.vm.clock.clock;
    std::thread::sleep(Duration::from_nanos(SLEEP_NS));
    // kvmclock of a restore of `state`, read once its guest runs (polling in its wait).
    let clock_of = |state: ember_vmm::SnapshotState| {
        let vm = VmBuilder::restore(state, std::fs::File::open(&f.memory).unwrap(), &f.memory)
            .serial_output(Box::new(snapshot_common::Console::default()))
            .build()
            .unwrap();
        let (h, join) = snapshot_common::spawn(vm);
        let end = Instant::now() + Duration::from_secs(30);
        while h.exits().io_in == 0 {
            assert!(Instant::now() < end, "the restored guest never ran");
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(h.pause());
        let clock = h.save_state().unwrap().vm.clock.clock;
        h.stop();
        join.join().unwrap().unwrap();
        i128::from(clock) - i128::from(at_snapshot)
    };
    let plain = clock_of(saved.clone());
    let mut moved_state = saved.clone();
    let added = moved_state.advance_clock_to_now();
    assert!(added >= SLEEP_NS, "{added}");
    let moved = clock_of(moved_state);
    assert!(
        (0..i128::from(SLEEP_NS) / 2).contains(&plain),
        "without the adjustment the clock went on {plain} ns from the snapshot"
    );
    assert!(
        moved >= i128::from(SLEEP_NS),
        "with it only {moved} ns (added {added})"
    );
}

/// A restored VM whose vCPU hook fails ends with that failure, without waiting for the
/// thread to park (it never will).
#[test]
fn a_restore_whose_vcpu_hook_fails_ends_with_its_error() {
    if !kvm_or_skip("a_restore_whose_vcpu_hook_fails_ends_with_its_error") {
        return;
    }
    let f = files();
    take_snapshot(&f, "snapshot");
    let state = ember_vmm::read_snapshot(&f.state).unwrap();
    let hook: ember_vmm::ThreadHook = std::sync::Arc::new(|kind| match kind {
        ember_vmm::ThreadKind::Vcpu(0) => Err("refused by the test".into()),
        _ => Ok(()),
    });
    let e = VmBuilder::restore(state, std::fs::File::open(&f.memory).unwrap(), &f.memory)
        .serial_output(Box::new(snapshot_common::Console::default()))
        .thread_hook(hook)
        .build()
        .unwrap()
        .run()
        .unwrap_err()
        .to_string();
    assert!(e.contains("ended before they parked"), "{e}");
    assert!(e.contains("vcpu0: refused by the test"), "{e}");
}

#[test]
fn bad_snapshots_are_clear_errors() {
    if !kvm_or_skip("bad_snapshots_are_clear_errors") {
        return;
    }
    let f = files();
    take_snapshot(&f, "snapshot");
    // A memory file of the wrong size.
    let short = f.memory.with_extension("short");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let state = ember_vmm::read_snapshot(&f.state).unwrap();
    let e = VmBuilder::restore(state.clone(), std::fs::File::open(&short).unwrap(), &short)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("bytes of guest memory"), "{e}");
    // A different device set.
    let mut other = state.clone();
    other.config.rng = None;
    let e = VmBuilder::restore(other, std::fs::File::open(&f.memory).unwrap(), &f.memory)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("devices"), "{e}");
    // A corrupt and a truncated state file.
    let mut bytes = std::fs::read(&f.state).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&f.state, &bytes).unwrap();
    let e = ember_vmm::read_snapshot(&f.state).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    std::fs::write(&f.state, &bytes[..n / 3]).unwrap();
    let e = ember_vmm::read_snapshot(&f.state).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

/// `ember --kernel … --snapshot-dir D` writes a snapshot on SIGUSR1 and goes on; `ember
/// --restore D` restores it in a new process.
#[test]
fn the_cli_snapshots_on_sigusr1_and_restores_from_a_directory() {
    if !kvm_or_skip("the_cli_snapshots_on_sigusr1_and_restores_from_a_directory") {
        return;
    }
    use std::process::{Command, Stdio};
    let f = files();
    let dir = f.state.parent().unwrap().join("snap");
    let out1 = f.state.with_file_name("out1.txt");
    let err1 = f.state.with_file_name("err1.txt");
    let mut child = Command::new(ember_test_support::ember_binary())
        .arg("--kernel")
        .arg(probe_elf())
        .args(["--cmdline", "probe=snapshot,blk,rng", "--rng", "--disk"])
        .arg(format!("{},id=probe", f.disk.display()))
        .arg("--snapshot-dir")
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out1).unwrap())
        .stderr(std::fs::File::create(&err1).unwrap())
        .spawn()
        .unwrap();
    let wait_file = |p: &Path, needle: &str| {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            if t.contains(needle) || Instant::now() > end {
                return t;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let t = wait_file(&out1, "PROBE snapshot waiting");
    assert!(t.contains("PROBE snapshot waiting"), "{t}");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let e = wait_file(&err1, "snapshot written");
    assert!(e.contains("snapshot written to"), "{e}");
    // The snapshotted VM goes on: it finishes its checks when released.
    child.stdin.as_mut().unwrap().write_all(b"g").unwrap();
    assert!(child.wait().unwrap().success());
    let t = std::fs::read_to_string(&out1).unwrap();
    assert!(t.contains("PROBE done checks=3 failed=0"), "{t}");

    // The restore, in a new process.
    let mut child = Command::new(ember_test_support::ember_binary())
        .arg("--restore")
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.as_mut().unwrap().write_all(b"g").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("PROBE snapshot ok pattern=ok"), "{text}");
    assert!(text.contains("PROBE done checks=3 failed=0"), "{text}");
    assert!(!text.contains("PROBE start"), "{text}");

    // User errors.
    for (args, needle) in [
        (
            vec![
                "--restore".to_string(),
                dir.display().to_string(),
                "--memory-mib".into(),
                "256".into(),
            ],
            "takes the VM's configuration from the snapshot",
        ),
        (
            vec!["--restore".into(), "/nonexistent-ember-snap".into()],
            "/nonexistent-ember-snap/vm.state",
        ),
    ] {
        let out = Command::new(ember_test_support::ember_binary())
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// A `resume` that comes before `Vm::run` has applied the restored state (a client that loads
/// a snapshot paused and resumes at once) must not let a vCPU run from its reset state.
#[test]
fn an_early_resume_waits_for_the_restored_state() {
    if !kvm_or_skip("an_early_resume_waits_for_the_restored_state") {
        return;
    }
    let f = files();
    take_snapshot(&f, "snapshot");
    let state = ember_vmm::read_snapshot(&f.state).unwrap();
    let console = snapshot_common::Console::default();
    let vm = VmBuilder::restore(state, std::fs::File::open(&f.memory).unwrap(), &f.memory)
        .start_paused(true)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let h = vm.handle();
    assert!(h.is_paused());
    h.resume();
    h.send_serial(b"g");
    let outcome = vm.run().unwrap();
    let out = console.text();
    assert_eq!(outcome.exit, VmExit::Reset, "{out}");
    assert!(out.contains("PROBE snapshot ok pattern=ok"), "{out}");
}

/// Snapshots taken while the guest keeps a disk write in flight: in the restored VM every
/// write completes exactly once and every slot of the disk holds the last write the guest saw
/// complete (the probe's `blkflight` check). Five snapshots, each at a different moment.
#[test]
fn disk_writes_in_flight_complete_once_across_a_snapshot() {
    if !kvm_or_skip("disk_writes_in_flight_complete_once_across_a_snapshot") {
        return;
    }
    for round in 0..5u64 {
        let f = files();
        let console = snapshot_common::Console::default();
        let vm = ember_vmm::Vm::builder(snapshot_common::config(&f.disk, "blkflight"))
            .serial_output(Box::new(console.clone()))
            .build()
            .unwrap();
        let (h, join) = snapshot_common::spawn(vm);
        snapshot_common::snapshot_once_running(
            &h,
            join,
            &console,
            "PROBE blkflight running",
            Duration::from_millis(10 + 7 * round),
            &f,
        );

        let (h, console, join) = restore(&f);
        h.send_serial(b"g");
        let outcome = join.join().unwrap().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "round {round}: {out}");
        assert!(
            out.contains("PROBE blkflight ok writes="),
            "round {round}: {out}"
        );
    }
}

/// A restored VM given a new vsock socket and CID (Firecracker's `vsock_override`, a clone's
/// identity) reaches the host on that socket, and its guest sees the new CID.
#[test]
fn a_restored_vm_reaches_the_host_on_its_overridden_vsock() {
    if !kvm_or_skip("a_restored_vm_reaches_the_host_on_its_overridden_vsock") {
        return;
    }
    use std::io::{Read, Write as _};
    let f = files();
    let dir = f.state.parent().unwrap().to_path_buf();
    let mut c = snapshot_common::config(&f.disk, "snapshot,vsock");
    c.cmdline.push_str(" probe.vsock.connect=5000");
    c.vsock = Some(ember_vmm::VsockConfig {
        cid: 3,
        uds_path: dir.join("template.sock"),
    });
    let console = snapshot_common::Console::default();
    let vm = ember_vmm::Vm::builder(c)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let (h, join) = snapshot_common::spawn(vm);
    assert!(
        console.wait_for("PROBE snapshot waiting", Duration::from_secs(30)),
        "{}",
        console.text()
    );
    assert!(h.pause());
    h.snapshot(&f.state, &f.memory).unwrap();
    h.stop();
    join.join().unwrap().unwrap();

    let mut state = ember_vmm::read_snapshot(&f.state).unwrap();
    let sock = dir.join("clone.sock");
    state.override_vsock(&sock, Some(42)).unwrap();
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_5000", sock.display())).unwrap();
    let console = snapshot_common::Console::default();
    let vm = VmBuilder::restore(state, std::fs::File::open(&f.memory).unwrap(), &f.memory)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let (h, join) = snapshot_common::spawn(vm);
    h.send_serial(b"g");
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"PROBE-VSOCK-HELLO\n");
    s.write_all(b"go\n").unwrap();
    let outcome = join.join().unwrap().unwrap();
    let out = console.text();
    assert_eq!(outcome.exit, VmExit::Reset, "{out}");
    assert!(out.contains("PROBE vsock ok cid=42 port=5000"), "{out}");
}

/// What the peer of [`network_traffic_in_flight_completes_once_across_a_snapshot`] saw: the
/// numbers of the guest's datagrams, in arrival order.
fn flight_peer(
    ns: &ember_test_support::net::Netns,
    stop: &std::sync::atomic::AtomicBool,
    bound: &std::sync::mpsc::Sender<()>,
) -> Vec<u64> {
    use std::net::UdpSocket;
    use std::sync::atomic::Ordering;
    ns.enter();
    let s = UdpSocket::bind("192.0.2.1:9000").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    // Room for every datagram of a run (tens of thousands), so that none is dropped by this
    // socket when the peer's thread is not scheduled for a while.
    let size: libc::c_int = 64 << 20;
    // SAFETY: setsockopt on a socket this function owns, with an int option value.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&size).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap(),
        )
    };
    assert_eq!(r, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
    let tx = UdpSocket::bind("192.0.2.1:0").unwrap();
    // The guest's first datagram must find the socket bound.
    bound.send(()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        // The peer's own numbered datagrams to the guest's port 9 (before the guest answers
        // ARP these fail: not counted, not retried).
        let mut msg = [0u8; 64];
        msg[..8].copy_from_slice(&n.to_be_bytes());
        if tx.send_to(&msg, "192.0.2.2:9").is_ok() {
            n += 1;
        }
        // At most 32 before the next send, so that a busy guest does not starve the peer's
        // sends.
        for _ in 0..32 {
            let Ok((len, _)) = s.recv_from(&mut buf) else {
                break;
            };
            assert!(len >= 8, "a datagram of {len} bytes");
            got.push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
        }
    }
    got
}

/// The `PROBE <check> ok` line of `out` and its `sent=` count (the test fails without them).
fn ok_line_and_sent<'a>(out: &'a str, check: &str, round: u64) -> (&'a str, u64) {
    let prefix = format!("PROBE {check} ok");
    let line = out
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("round {round}: {out}"));
    let sent = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sent="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("round {round}: {line}"));
    (line, sent)
}

/// Builds a VM on a thread that entered `ns` (where its TAP is).
fn build_in(
    ns: &std::sync::Arc<ember_test_support::net::Netns>,
    builder: impl FnOnce() -> ember_vmm::VmBuilder + Send + 'static,
) -> ember_vmm::Vm {
    let ns = ns.clone();
    std::thread::spawn(move || {
        ns.enter();
        builder().build().unwrap()
    })
    .join()
    .unwrap()
}

/// Snapshots taken while the guest keeps 8 datagrams always in flight to a peer on its TAP,
/// and the peer sends the guest datagrams of its own (the probe's `netflight` check): in the
/// restored VM, on a TAP of the same name, every transmit request completes exactly once (the
/// guest checks its used ring), the peer receives every datagram the guest sent exactly once,
/// and the guest receives the peer's in order, never twice, and again after the restore.
/// Three snapshots, each at a different moment.
#[test]
fn network_traffic_in_flight_completes_once_across_a_snapshot() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let test = "network_traffic_in_flight_completes_once_across_a_snapshot";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(ns) = ember_test_support::net::Netns::create(test) else {
        return;
    };
    let ns = Arc::new(ns);
    for round in 0..3u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let (bound_tx, bound) = std::sync::mpsc::channel();
        let peer = {
            let (ns, stop) = (ns.clone(), stop.clone());
            std::thread::spawn(move || flight_peer(&ns, &stop, &bound_tx))
        };
        bound.recv_timeout(Duration::from_secs(10)).unwrap();
        let f = files();
        let mut cfg = snapshot_common::config(&f.disk, "netflight");
        cfg.cmdline += " probe.net.ip=192.0.2.2/24 probe.net.peer=192.0.2.1:9000 \
                        probe.net.size=256";
        cfg.nets.push(ember_vmm::NetConfig {
            tap: "tap0".into(),
            ..Default::default()
        });
        let console = snapshot_common::Console::default();
        let out = console.clone();
        let vm = build_in(&ns, move || {
            ember_vmm::Vm::builder(cfg).serial_output(Box::new(out))
        });
        let (h, join) = snapshot_common::spawn(vm);
        snapshot_common::snapshot_once_running(
            &h,
            join,
            &console,
            "PROBE netflight running",
            Duration::from_millis(20 + 13 * round),
            &f,
        );

        let console = snapshot_common::Console::default();
        let out = console.clone();
        let (state, memory) = (f.state.clone(), f.memory.clone());
        let vm = build_in(&ns, move || {
            let s = ember_vmm::read_snapshot(&state).unwrap();
            let file = std::fs::File::open(&memory).unwrap();
            VmBuilder::restore(s, file, &memory).serial_output(Box::new(out))
        });
        let (h, join) = snapshot_common::spawn(vm);
        h.send_serial(b"g");
        let outcome = join.join().unwrap().unwrap();
        // The last datagrams reach the peer's socket before the VM is reaped.
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::SeqCst);
        let mut got = peer.join().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "round {round}: {out}");
        let (line, sent) = ok_line_and_sent(&out, "netflight", round);
        assert!(sent > 8, "round {round}: {line}");
        got.sort_unstable();
        let dups: Vec<u64> = got
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        assert!(
            dups.is_empty(),
            "round {round}: {} datagrams received twice, the first {:?}; {line}",
            dups.len(),
            &dups[..dups.len().min(10)]
        );
        got.dedup();
        let missing: Vec<u64> = (0..sent)
            .filter(|n| got.binary_search(n).is_err())
            .collect();
        let extra = got.iter().filter(|&&n| n >= sent).count();
        assert!(
            missing.is_empty() && extra == 0,
            "round {round}: {} of 0..{sent} never arrived (the first {:?}), {extra} above; {line}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
}

/// The next connection to `listener`, within 30 s (else the test fails with the console).
fn accept_within(
    listener: &std::os::unix::net::UnixListener,
    console: &snapshot_common::Console,
) -> std::os::unix::net::UnixStream {
    listener.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("no connection from the guest ({e}): {}", console.text()),
        }
    }
}

/// Reads `s` to its end; the bytes read and whether they are all the numbered stream of the
/// probe's `vsockflight` check (`offset % 251`) from offset 0.
fn read_numbered_stream(mut s: std::os::unix::net::UnixStream) -> (u64, Option<u64>) {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 65536];
    let (mut n, mut first_wrong) = (0u64, None);
    while let Ok(len) = s.read(&mut buf) {
        if len == 0 {
            break;
        }
        for (k, &b) in buf[..len].iter().enumerate() {
            let at = n + k as u64;
            if first_wrong.is_none() && u64::from(b) != at % 251 {
                first_wrong = Some(at);
            }
        }
        n += len as u64;
    }
    (n, first_wrong)
}

/// Snapshots taken while the guest streams numbered bytes to a host listener over vsock (the
/// probe's `vsockflight` check): the host received the stream's start with no byte lost or
/// doubled; the restored VM, given a new socket and CID, gets the transport-reset event,
/// completes every transmit request exactly once (any still published for the connection
/// that no longer exists included) and connects again on the new socket. With the restored
/// queues' next available index moved back by two (a mutation), the guest sees two transmit
/// requests complete twice and the test fails. Three snapshots, each at
/// a different moment.
#[test]
fn a_vsock_stream_in_flight_is_reset_cleanly_across_a_snapshot() {
    use std::io::{BufRead, Write as _};
    if !kvm_or_skip("a_vsock_stream_in_flight_is_reset_cleanly_across_a_snapshot") {
        return;
    }
    for round in 0..3u64 {
        let f = files();
        let dir = f.state.parent().unwrap().to_path_buf();
        let (sock, clone_sock) = (dir.join("template.sock"), dir.join("clone.sock"));
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_5000", sock.display())).unwrap();
        let mut c = snapshot_common::config(&f.disk, "vsockflight");
        c.cmdline.push_str(" probe.vsock.connect=5000");
        c.vsock = Some(ember_vmm::VsockConfig {
            cid: 3,
            uds_path: sock.clone(),
        });
        let console = snapshot_common::Console::default();
        let vm = ember_vmm::Vm::builder(c)
            .serial_output(Box::new(console.clone()))
            .build()
            .unwrap();
        let (h, join) = snapshot_common::spawn(vm);
        let stream = accept_within(&listener, &console);
        let reader = std::thread::spawn(move || read_numbered_stream(stream));
        snapshot_common::snapshot_once_running(
            &h,
            join,
            &console,
            "PROBE vsockflight running",
            Duration::from_millis(20 + 13 * round),
            &f,
        );
        let (received, wrong) = reader.join().unwrap();

        let mut state = ember_vmm::read_snapshot(&f.state).unwrap();
        state.override_vsock(&clone_sock, Some(4)).unwrap();
        let listener =
            std::os::unix::net::UnixListener::bind(format!("{}_5000", clone_sock.display()))
                .unwrap();
        let console = snapshot_common::Console::default();
        let vm = VmBuilder::restore(state, std::fs::File::open(&f.memory).unwrap(), &f.memory)
            .serial_output(Box::new(console.clone()))
            .build()
            .unwrap();
        let (h, join) = snapshot_common::spawn(vm);
        h.send_serial(b"g");
        let s = accept_within(&listener, &console);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        assert_eq!(line, "PROBE-VSOCKFLIGHT-AFTER\n", "round {round}");
        (&s).write_all(b"ok\n").unwrap();
        let outcome = join.join().unwrap().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "round {round}: {out}");
        let (ok, sent) = ok_line_and_sent(&out, "vsockflight", round);
        assert!(ok.contains(" cid=4 "), "round {round}: {ok}");
        assert_eq!(
            wrong, None,
            "round {round}: received {received} bytes; {ok}"
        );
        assert!(
            received > 0 && received <= sent,
            "round {round}: the host received {received} bytes of {sent} sent; {ok}"
        );
    }
}
