//! The reference VMM binary (`ember`, package `ember-bin`): exit statuses and messages a user
//! sees.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ember_test_support::{kvm_or_skip, open_pty, probe_elf};

fn ember() -> PathBuf {
    ember_test_support::ember_binary()
}

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(ember())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// What an `ember` run left: exit status, stdout (the guest's console), stderr (the VMM's).
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `ember --kernel <probe> <args>` with `stdin` on its standard input.
fn run_probe(args: &[&str], stdin: &[u8]) -> Run {
    let kernel = probe_elf();
    let mut all = vec!["--kernel", kernel.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = run(&all, stdin);
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn probe_reset_exits_zero_and_reports_boot_timer() {
    if !kvm_or_skip("probe_reset_exits_zero_and_reports_boot_timer") {
        return;
    }
    let Run {
        code,
        stdout,
        stderr,
    } = run_probe(&["--cmdline", "probe=boottimer,cmdline"], b"");
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("PROBE boottimer ok"), "{stdout}");
    assert!(stdout.contains("PROBE done checks=2 failed=0"), "{stdout}");
    assert!(stderr.contains("boot timer:"), "{stderr}");
    assert!(stderr.contains("guest reset"), "{stderr}");
}

#[test]
fn stdin_feeds_the_serial_console() {
    if !kvm_or_skip("stdin_feeds_the_serial_console") {
        return;
    }
    let Run { code, stdout, .. } = run_probe(
        &["--cmdline", "probe=serial probe.echo=fromstdin"],
        b"fromstdin\n",
    );
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("echo=fromstdin"), "{stdout}");
}

#[test]
fn config_file_and_flag_override() {
    if !kvm_or_skip("config_file_and_flag_override") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"kernel": "{}", "memory_mib": 64, "cmdline": "probe=memmap"}}"#,
            probe_elf().display()
        ),
    )
    .unwrap();
    let out = run(
        &["--config", cfg.to_str().unwrap(), "--memory-mib", "96"],
        b"",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // 96 MiB from the flag, not 64 from the file.
    assert!(stdout.contains("0x100000-0x6000000"), "{stdout}");
}

#[test]
fn user_errors_are_messages_not_panics() {
    for (args, needle) in [
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "/nonexistent/vmlinux",
        ),
        (vec!["--memory-mib", "64"], "--kernel"),
        (
            vec!["--config", "/nonexistent/vm.json"],
            "/nonexistent/vm.json",
        ),
        (vec!["--kernel", "/dev/null", "--vcpus", "0"], "1..=32"),
        (vec!["--kernel", "/dev/null", "--memory-mib", "1"], "memory"),
    ] {
        let out = run(&args, b"");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn virtio_blk_example_serves_the_probes_disk_checks() {
    if !kvm_or_skip("virtio_blk_example_serves_the_probes_disk_checks") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-cli-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    ember_test_support::write_blk_image(&img, 2048, 0x5a).unwrap();
    let out = Command::new(ember().with_file_name("examples").join("virtio_blk"))
        .arg(probe_elf())
        .arg(&img)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("PROBE virtio ok devices=1"), "{stdout}");
    assert!(stdout.contains("PROBE blk ok"), "{stdout}");
    assert!(
        stdout.contains("read=ok write=ok flush=ok readback=ok"),
        "{stdout}"
    );
    assert!(stdout.contains("PROBE done checks=2 failed=0"), "{stdout}");
    // What the guest wrote is in the image (the blk check writes from sector 128).
    let bytes = std::fs::read(&img).unwrap();
    assert_ne!(
        bytes[128 * 512..129 * 512],
        (128 * 512..129 * 512u64)
            .map(|i| ember_test_support::blk_pattern_byte(i, 0x5a))
            .collect::<Vec<u8>>()[..]
    );
}

#[test]
fn minimal_example_boots_the_probe() {
    if !kvm_or_skip("minimal_example_boots_the_probe") {
        return;
    }
    let bin = ember().with_file_name("examples").join("minimal");
    let out = Command::new(bin)
        .arg(probe_elf())
        .arg("probe=memmap,cmdline,serial")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("PROBE start entry=linux64"), "{stdout}");
    assert!(stdout.contains("PROBE done checks=3 failed=0"), "{stdout}");
    assert!(stderr.contains("guest reset"), "{stderr}");
}

#[test]
fn emulation_failure_exits_non_zero_with_a_clear_message() {
    if !kvm_or_skip("emulation_failure_exits_non_zero_with_a_clear_message") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("popcnt.elf");
    std::fs::write(
        &kernel,
        ember_test_support::tiny_elf_kernel(ember_test_support::POPCNT_THEN_RESET),
    )
    .unwrap();
    let out = run(&["--kernel", kernel.to_str().unwrap()], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("guest reset") {
        eprintln!("note: ring 0 is native here; popcnt executed");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("emulation failure"), "{stderr}");
    assert!(stderr.contains("rip 0x100000"), "{stderr}");
}

fn termios_of(f: &std::fs::File) -> libc::termios {
    use std::os::unix::io::AsRawFd;
    // SAFETY: termios is plain data filled by tcgetattr on a valid terminal fd.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(f.as_raw_fd(), &mut t), 0);
        t
    }
}

#[test]
fn sigterm_stops_within_a_second_and_restores_the_terminal() {
    if !kvm_or_skip("sigterm_stops_within_a_second_and_restores_the_terminal") {
        return;
    }
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    let (_controller, terminal) = open_pty();
    let before = termios_of(&terminal);
    // A guest that runs for minutes: ten million exits.
    let mut child = Command::new(ember())
        .args(["--kernel", probe_elf().to_str().unwrap()])
        .args(["--cmdline", "probe=cmdline,exitloop probe.exits=10000000"])
        .stdin(terminal.try_clone().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "guest output ended early"
        );
        if line.contains("PROBE cmdline ok") {
            break;
        }
    }
    // The VMM has the terminal in raw mode now.
    let during = termios_of(&terminal);
    assert_ne!(during.c_lflag & libc::ICANON, before.c_lflag & libc::ICANON);

    let sent = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        // A bound against hanging, not a speed figure.
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "VMM still running 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let after = termios_of(&terminal);
    assert_eq!(
        after.c_lflag, before.c_lflag,
        "terminal local modes not restored"
    );
    assert_eq!(
        after.c_iflag, before.c_iflag,
        "terminal input modes not restored"
    );
}

#[test]
fn acpi_poweroff_exits_zero_with_every_vcpu_joined() {
    if !kvm_or_skip("acpi_poweroff_exits_zero_with_every_vcpu_joined") {
        return;
    }
    let Run {
        code,
        stdout,
        stderr,
    } = run_probe(&["--vcpus", "4", "--cmdline", "probe=smp,poweroff"], b"");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("PROBE smp ok cpus=4 started=3"), "{stdout}");
    assert!(stderr.contains("guest powered off"), "{stderr}");
}

#[test]
fn guest_panic_exits_non_zero_with_a_clear_message() {
    if !kvm_or_skip("guest_panic_exits_non_zero_with_a_clear_message") {
        return;
    }
    // The probe's `fault` check takes a page fault in ring 3; its handler reports the panic on
    // the pvpanic port.
    let Run {
        code,
        stdout,
        stderr,
    } = run_probe(&["--cmdline", "probe=fault"], b"");
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("PROBE panic exception 14"), "{stdout}");
    assert!(stderr.contains("guest panic"), "{stderr}");
}

#[test]
fn the_example_config_boots_as_documented() {
    if !kvm_or_skip("the_example_config_boots_as_documented") {
        return;
    }
    // What `cargo xtask disk target/disk.img --size 1M --pattern probe` writes (README).
    let root = ember_test_support::workspace_root();
    probe_elf();
    ember_test_support::write_blk_image(&root.join("target/disk.img"), 2048, 0x5a).unwrap();
    // Run from elsewhere: the config's relative paths are taken from its own folder.
    let out = Command::new(ember())
        .current_dir(std::env::temp_dir())
        .arg("--config")
        .arg(root.join("examples/vm.json"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for check in [
        "memmap", "cmdline", "serial", "acpi", "smp", "virtio", "blk",
    ] {
        assert!(
            stdout.contains(&format!("PROBE {check} ok")),
            "{check}: {stdout}"
        );
    }
    assert!(stdout.contains("PROBE done checks=8 failed=0"), "{stdout}");
}

#[test]
fn a_disk_image_in_use_is_refused_naming_its_holder() {
    if !kvm_or_skip("a_disk_image_in_use_is_refused_naming_its_holder") {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-cli-lock-").unwrap();
    let img = dir.as_path().join("disk.img");
    ember_test_support::write_blk_image(&img, 2048, 0x5a).unwrap();
    let disk = img.to_str().unwrap();
    // The same image twice in one VM.
    let r = run_probe(&["--disk", disk, "--disk", &format!("{disk},ro")], b"");
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("is in use"), "{}", r.stderr);
    // Held for writing by a running VM: another VMM may neither write nor read it.
    let mut holder = std::process::Command::new(ember())
        .arg("--kernel")
        .arg(probe_elf())
        .args(["--cmdline", "probe=snapshot", "--disk", disk])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(holder.stdout.as_mut().unwrap(), &mut first).unwrap();
    for extra in ["", ",ro"] {
        let r = run_probe(&["--disk", &format!("{disk}{extra}")], b"");
        assert_eq!(r.code, Some(2), "{}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("process {} (ember)", holder.id())),
            "{}",
            r.stderr
        );
    }
    let _ = holder.kill();
    let _ = holder.wait();
    // Read-only openers share it.
    let r = run_probe(
        &[
            "--cmdline",
            "probe=blk",
            "--disk",
            &format!("{disk},ro"),
            "--disk",
            &format!("{disk},ro"),
        ],
        b"",
    );
    assert!(!r.stderr.contains("in use"), "{}", r.stderr);
}

/// `ember` reports its exit status before its KVM VM is closed (a short-lived child does the
/// last close): that child is gone promptly, and leaves nothing behind.
#[test]
fn the_kvm_vm_is_closed_promptly_after_ember_exits() {
    if !kvm_or_skip("the_kvm_vm_is_closed_promptly_after_ember_exits") {
        return;
    }
    let marker = format!("ember.exit.marker={}", std::process::id());
    let r = run_probe(&["--cmdline", &format!("probe=cmdline {marker}")], b"");
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("PROBE cmdline ok"), "{}", r.stdout);
    let with_marker = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&marker))
            .count()
    };
    let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while with_marker() > 0 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        with_marker(),
        0,
        "an ember process is still there 2 s after the exit"
    );
}

/// `ember --merge-diff BASE DIFF`: the diff's data extents land in the base at their offsets,
/// the holes leave the base as it was; a diff of another size, a missing file and a flag
/// beside it are refused, the base untouched.
#[test]
fn merge_diff_lays_a_sparse_diff_over_its_base() {
    use std::os::unix::fs::FileExt;
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-merge-").unwrap();
    let (base, diff) = (
        dir.as_path().join("base.mem"),
        dir.as_path().join("diff.mem"),
    );
    let size: usize = 4 << 20;
    let original: Vec<u8> = (0..size).map(|i| u8::try_from(i % 251).unwrap()).collect();
    std::fs::write(&base, &original).unwrap();
    let d = std::fs::File::create(&diff).unwrap();
    d.set_len(size as u64).unwrap();
    d.write_all_at(&[0xee; 8192], 1 << 20).unwrap();
    d.write_all_at(&[0x11; 4096], (size - 4096) as u64).unwrap();
    drop(d);
    let (b, f) = (base.to_str().unwrap(), diff.to_str().unwrap());
    let out = run(&["--merge-diff", b, f], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let merged = std::fs::read(&base).unwrap();
    let mut want = original.clone();
    want[1 << 20..(1 << 20) + 8192].fill(0xee);
    want[size - 4096..].fill(0x11);
    assert!(
        merged == want,
        "the merged base is not the base with the diff's pages"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bytes of"),
        "{out:?}"
    );

    std::fs::write(&base, &original).unwrap();
    let short = dir.as_path().join("short.mem");
    std::fs::write(&short, [1u8; 4096]).unwrap();
    let out = run(&["--merge-diff", b, short.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("short.mem"),
        "{out:?}"
    );
    let out = run(&["--merge-diff", b, "/nonexistent/d.mem"], b"");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/d.mem"));
    let out = run(&["--merge-diff", b, f, "--vcpus", "2"], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(std::fs::read(&base).unwrap() == original);
}
