//! The serial console of the `ember` binary: a stdout nobody reads never makes the VMM
//! unstoppable, stdin from a regular file reaches the guest, Ctrl-A x ends the VM from a
//! terminal. (Its own test binary: the SIGTERM bound is measured with nothing else running.)

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_test_support::{ember_binary, kvm_or_skip, open_pty, probe_elf};

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Bytes waiting in a pipe (FIONREAD on its read end).
fn queued(read_end: &OwnedFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer.
    unsafe { libc::ioctl(read_end.as_raw_fd(), libc::FIONREAD, &mut n) };
    usize::try_from(n).expect("FIONREAD reports a non-negative count")
}

#[test]
fn a_stdout_nobody_reads_does_not_stop_sigterm() {
    if !kvm_or_skip("a_stdout_nobody_reads_does_not_stop_sigterm") {
        return;
    }
    let (read_end, write_end) = pipe();
    // 4 MiB of console output: far more than the pipe (64 KiB) and Ember's buffer (64 KiB).
    let mut child = Command::new(ember_binary())
        .args(["--kernel", probe_elf().to_str().unwrap()])
        .args(["--cmdline", "probe=spew probe.spew.bytes=4194304"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the pipe is full and the guest has kept writing for a while.
    let started = Instant::now();
    while queued(&read_end) < 60 << 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the guest's output never filled the pipe ({} bytes)",
            queued(&read_end)
        );
        assert!(child.try_wait().unwrap().is_none(), "ember ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "ember ended early");

    let sent = Instant::now();
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "ember still running 10 s after SIGTERM with its stdout full"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = sent.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    eprintln!("stopped {took:?} after SIGTERM; stderr: {stderr}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(
        took < Duration::from_millis(100),
        "ember took {took:?} to stop after SIGTERM with its stdout full"
    );
    // What never reached the console is said, not silently lost.
    assert!(stderr.contains("could not be written"), "{stderr}");
    drop(read_end);
}

#[test]
fn stdin_from_a_regular_file_reaches_the_guest() {
    if !kvm_or_skip("stdin_from_a_regular_file_reaches_the_guest") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("input.txt");
    std::fs::write(&input, "fromafile\n").unwrap();
    let out = Command::new(ember_binary())
        .args(["--kernel", probe_elf().to_str().unwrap()])
        .args(["--cmdline", "probe=serial probe.echo=fromafile"])
        .stdin(std::fs::File::open(&input).unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("PROBE serial ok"), "{stdout}");
    assert!(stdout.contains("echo=fromafile"), "{stdout}");
}

#[test]
fn ctrl_a_x_on_a_terminal_ends_the_vm() {
    if !kvm_or_skip("ctrl_a_x_on_a_terminal_ends_the_vm") {
        return;
    }
    let (mut controller, terminal) = open_pty();
    // A guest that runs for minutes: ten million exits.
    let mut child = Command::new(ember_binary())
        .args(["--kernel", probe_elf().to_str().unwrap()])
        .args(["--cmdline", "probe=cmdline,exitloop probe.exits=10000000"])
        .stdin(terminal)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("PROBE cmdline ok") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "output ended");
    }
    controller.write_all(b"\x01x").unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Ctrl-A x did not end the VM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Ctrl-A x"), "{stderr}");
}
