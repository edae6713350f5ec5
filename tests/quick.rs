//! `ember-quick`, the quick-boot binary built small: it boots what `ember` boots from the same
//! flags, with the same exit statuses, messages and seccomp filters.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_test_support::{kvm_or_skip, probe_elf};

fn quick() -> PathBuf {
    ember_test_support::ember_quick_binary()
}

/// Runs `ember-quick ARGS` with no input: (status, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(quick())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn it_boots_the_probe_with_a_disk_and_entropy_and_the_guest_writes_reach_the_image() {
    if !kvm_or_skip(
        "it_boots_the_probe_with_a_disk_and_entropy_and_the_guest_writes_reach_the_image",
    ) {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-quick-").unwrap();
    let img = dir.as_path().join("disk.img");
    ember_test_support::write_blk_image(&img, 2048, 0x5a).unwrap();
    let disk = format!("{},id=probe", img.display());
    let kernel = probe_elf();
    let (code, stdout, stderr) = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory-mib",
        "64",
        "--vcpus",
        "2",
        "--disk",
        &disk,
        "--rng",
        "--cmdline",
        "probe=cmdline,smp,blk,rng",
    ]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for check in ["cmdline", "smp", "blk", "rng"] {
        assert!(
            stdout.contains(&format!("PROBE {check} ok")),
            "{check}: {stdout}"
        );
    }
    assert!(stdout.contains("PROBE done checks=4 failed=0"), "{stdout}");
    assert!(stderr.contains("ember-quick: guest reset"), "{stderr}");
    // What the guest wrote is in the image after the VM stopped (the blk check writes from
    // sector 128 on).
    let bytes = std::fs::read(&img).unwrap();
    let pattern: Vec<u8> = (128 * 512..129 * 512u64)
        .map(|i| ember_test_support::blk_pattern_byte(i, 0x5a))
        .collect();
    assert!(
        bytes[128 * 512..129 * 512] != pattern[..],
        "sector 128 still holds the pattern"
    );
}

/// Starts a guest that runs for minutes and waits for its first line.
fn start_long_guest(extra: &[&str]) -> Child {
    let mut child = Command::new(quick())
        .args(["--kernel", probe_elf().to_str().unwrap()])
        .args(["--cmdline", "probe=cmdline,exitloop probe.exits=10000000"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ember_test_support::wait_for_line(&mut child, "PROBE cmdline ok");
    child
}

#[test]
fn every_thread_is_filtered_and_sigterm_stops_the_vm() {
    if !kvm_or_skip("every_thread_is_filtered_and_sigterm_stops_the_vm") {
        return;
    }
    let mut child = start_long_guest(&["--vcpus", "2"]);
    let filtered = ember_test_support::wait_for_filtered_threads(
        child.id(),
        &["ember-quick", "vcpu0", "vcpu1"],
    );
    let sent = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        // A bound against hanging, not a speed figure.
        if sent.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("VMM still running 5 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    if let Err(seen) = filtered {
        panic!("threads and their seccomp modes: {seen:?}");
    }
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(
        stderr.contains("ember-quick: stopped by signal 15"),
        "{stderr}"
    );
}

#[test]
fn no_seccomp_warns_under_its_own_name_and_timings_are_printed() {
    if !kvm_or_skip("no_seccomp_warns_under_its_own_name_and_timings_are_printed") {
        return;
    }
    let kernel = probe_elf();
    let (code, stdout, stderr) = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "probe=cmdline",
        "--no-seccomp",
        "--timings",
    ]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("ember-quick: warning: --no-seccomp"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ember-quick: start-up vcpu create"),
        "{stderr}"
    );
    assert!(stderr.contains("ember-quick: first KVM_RUN"), "{stderr}");
}

#[test]
fn a_blocked_system_call_ends_it_with_status_148_naming_the_thread() {
    if !kvm_or_skip("a_blocked_system_call_ends_it_with_status_148_naming_the_thread") {
        return;
    }
    let kernel = probe_elf();
    let (code, _, stderr) = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        "probe=cmdline,exitloop probe.exits=10000000",
        "--seccomp-test-blocked",
        "vcpu",
    ]);
    assert_eq!(code, Some(148), "{stderr}");
    assert!(
        stderr.contains("ember-quick: seccomp: the vcpu0 thread made system call 41 (socket)"),
        "{stderr}"
    );
}

#[test]
fn user_errors_exit_2_with_a_message_and_no_panic() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-quick-").unwrap();
    let kernel = probe_elf();
    let kernel = kernel.to_str().unwrap();
    let missing = dir.as_path().join("missing.elf");
    let missing = missing.to_str().unwrap();
    let folder = dir.as_path().to_str().unwrap();
    let cases: [(&[&str], &str); 9] = [
        (&[], "give --kernel"),
        (&["--kernel", missing], "missing.elf"),
        (&["--kernel", folder], "not a regular file"),
        (&["--kernel", kernel, "--memory-mib", "1"], "memory"),
        (
            &["--kernel", kernel, "--vcpus", "0"],
            "--vcpus 0: expected 1 to",
        ),
        (
            &["--kernel", kernel, "--boot-protocol", "bios"],
            "--boot-protocol bios",
        ),
        (&["--kernel", kernel, "--config", "vm.json"], "--config"),
        (
            &["--kernel", kernel, "--seccomp-filter", missing],
            "--seccomp-filter",
        ),
        (
            &["--kernel", kernel, "--seccomp-test-blocked", "gpu"],
            "expected vcpu, vmm or api",
        ),
    ];
    for (args, expected) in cases {
        let (code, _, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("ember-quick: error: ") && stderr.contains(expected),
            "{args:?}: expected {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(stdout.contains("--kernel FILE"), "{stdout}");
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("ember-quick "), "{stdout}");
}

/// A disk that cannot be opened is found once the VM is being built (after `/dev/kvm`).
#[test]
fn a_missing_disk_image_exits_2_naming_it() {
    if !kvm_or_skip("a_missing_disk_image_exits_2_naming_it") {
        return;
    }
    let kernel = probe_elf();
    let (code, _, stderr) = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        "/nonexistent/disk.img",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("ember-quick: error: ") && stderr.contains("/nonexistent/disk.img"),
        "{stderr}"
    );
}
