//! Seccomp in the `ember` binary: every thread of a running VM is filtered, a blocked system
//! call ends the VM with status 148 and a line naming the thread and the call, `--no-seccomp`
//! and `--seccomp-filter` do what they say. (The rest of the suite runs with the filters on:
//! that is what shows the allow-lists are enough. The Firecracker-mode threads are checked in
//! tests/api.rs.)

use std::io::Write;
use std::process::{Child, Command, Stdio};

use ember_test_support::{ember_binary, kvm_or_skip, probe_elf, thread_seccomp_modes};

/// Starts a probe that runs for minutes, with two vCPUs and the snapshot thread; returns once
/// the guest printed its first check.
fn start_long_guest(extra: &[&str]) -> Child {
    let dir = std::env::temp_dir().join(format!("ember-seccomp-{}", std::process::id()));
    let mut child = Command::new(ember_binary())
        .args(["--kernel", probe_elf().to_str().unwrap(), "--vcpus", "2"])
        .args(["--cmdline", "probe=cmdline,exitloop probe.exits=10000000"])
        .arg("--snapshot-dir")
        .arg(&dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ember_test_support::wait_for_line(&mut child, "PROBE cmdline ok");
    child
}

fn stop(child: Child) -> (Option<i32>, String) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    if !kvm_or_skip("every_thread_of_a_running_vm_is_filtered") {
        return;
    }
    let child = start_long_guest(&[]);
    let names = ["ember", "vcpu0", "vcpu1", "snapshot"];
    let filtered = ember_test_support::wait_for_filtered_threads(child.id(), &names);
    let (code, stderr) = stop(child);
    if let Err(seen) = filtered {
        panic!("threads and their seccomp modes: {seen:?}");
    }
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
}

#[test]
fn no_seccomp_warns_and_leaves_the_threads_unfiltered() {
    if !kvm_or_skip("no_seccomp_warns_and_leaves_the_threads_unfiltered") {
        return;
    }
    let child = start_long_guest(&["--no-seccomp"]);
    let seen = thread_seccomp_modes(child.id());
    let (_, stderr) = stop(child);
    assert!(
        seen.len() >= 3 && seen.iter().all(|(_, m)| *m == 0),
        "{seen:?}"
    );
    assert!(stderr.contains("warning: --no-seccomp"), "{stderr}");
}

/// A blocked call on each kind of VM thread: the process ends with 148 and says which thread
/// made which call.
#[test]
fn a_blocked_system_call_ends_the_vm_with_status_148_naming_the_thread_and_call() {
    if !kvm_or_skip("a_blocked_system_call_ends_the_vm_with_status_148_naming_the_thread_and_call")
    {
        return;
    }
    for (thread, label) in [("vcpu", "vcpu0"), ("vmm", "main")] {
        let out = Command::new(ember_binary())
            .args(["--kernel", probe_elf().to_str().unwrap()])
            .args(["--cmdline", "probe=cmdline,exitloop probe.exits=10000000"])
            .args(["--seccomp-test-blocked", thread])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(148), "{thread}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "seccomp: the {label} thread made system call 41 (socket)"
            )),
            "{thread}: {stderr}"
        );
    }
}

/// The API thread's filter, and the report in Firecracker mode (log file and metrics).
#[test]
fn a_blocked_system_call_on_the_api_thread_is_logged_and_counted() {
    let dir = std::env::temp_dir().join(format!("ember-seccomp-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (log, metrics) = (dir.join("log"), dir.join("metrics"));
    let out = Command::new(ember_binary())
        .arg("--api-sock")
        .arg(dir.join("api.sock"))
        .arg("--log-path")
        .arg(&log)
        .arg("--metrics-path")
        .arg(&metrics)
        .args(["--seccomp-test-blocked", "api"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(148), "{stderr}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("the fc_api thread made system call 41 (socket)"),
        "{logged}"
    );
    let counted = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        counted.contains(r#"{"seccomp":{"num_faults":1}}"#),
        "{counted}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--seccomp-filter`: a file compiled by Firecracker's seccompiler-bin (a bitcode map of
/// thread name to BPF instructions) is installed; anything else is a clear error.
#[test]
fn seccomp_filter_takes_a_compiled_file_and_refuses_garbage() {
    let dir = std::env::temp_dir().join(format!("ember-seccomp-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.bpf");
    std::fs::write(&garbage, b"this is not BPF").unwrap();
    let out = Command::new(ember_binary())
        .args(["--kernel", probe_elf().to_str().unwrap()])
        .arg("--seccomp-filter")
        .arg(&garbage)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not a compiled seccomp filter file"),
        "{stderr}"
    );

    if !kvm_or_skip("seccomp_filter_takes_a_compiled_file_and_refuses_garbage") {
        return;
    }
    // One instruction, `ret SECCOMP_RET_ALLOW`, for every thread: filtered, everything allowed.
    let allow: u64 = 0x06 | (0x7fff_0000u64 << 32);
    let map: std::collections::BTreeMap<String, Vec<u64>> = ["vmm", "api", "vcpu"]
        .into_iter()
        .map(|t| (t.to_string(), vec![allow]))
        .collect();
    let file = dir.join("allow.bpf");
    std::fs::File::create(&file)
        .unwrap()
        .write_all(&bitcode::serialize(&map).unwrap())
        .unwrap();
    // A fork template needs Ember's own filters: the pair is refused at start-up.
    let out = Command::new(ember_binary())
        .args(["--api-sock", dir.join("api.sock").to_str().unwrap()])
        .args(["--fork-socket", dir.join("fork.sock").to_str().unwrap()])
        .args(["--seccomp-filter", file.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--fork-socket needs Ember's own seccomp filters"),
        "{stderr}"
    );
    assert!(!dir.join("fork.sock").exists());
    let child = start_long_guest(&["--seccomp-filter", file.to_str().unwrap()]);
    let filtered =
        ember_test_support::wait_for_filtered_threads(child.id(), &["ember", "vcpu0", "vcpu1"]);
    // Allowed by this file, refused by Ember's own: the file's filter is the one in place.
    let (code, stderr) = stop(child);
    if let Err(seen) = filtered {
        panic!("threads and their seccomp modes: {seen:?}");
    }
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    let out = Command::new(ember_binary())
        .args(["--kernel", probe_elf().to_str().unwrap()])
        .args(["--cmdline", "probe=cmdline"])
        .args(["--seccomp-filter", file.to_str().unwrap()])
        .args(["--seccomp-test-blocked", "vcpu"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 2-vCPU probe guest that runs for seconds: in the hook tests, the hook's failure is what
/// ends it.
fn long_guest_config() -> ember_vmm::VmConfig {
    ember_test_support::ProbeOptions::new("cmdline,exitloop")
        .vcpus(2)
        .cmdline("probe.exits=10000000")
        .vm_config()
}

/// The library seam the filters go through: `VmBuilder::thread_hook` runs on every vCPU
/// thread and on the event loop, and a failing hook ends the VM with an error.
#[test]
fn the_thread_hook_runs_on_every_vm_thread_and_its_failure_ends_the_vm() {
    if !kvm_or_skip("the_thread_hook_runs_on_every_vm_thread_and_its_failure_ends_the_vm") {
        return;
    }
    use std::sync::{Arc, Mutex};
    let config = ember_test_support::ProbeOptions::new("cmdline")
        .vcpus(2)
        .vm_config();
    let seen: Arc<Mutex<Vec<(ember_vmm::ThreadKind, String)>>> = Arc::default();
    let record = seen.clone();
    let hook: ember_vmm::ThreadHook = Arc::new(move |kind| {
        let name = std::thread::current().name().unwrap_or("").to_string();
        record.lock().unwrap().push((kind, name));
        Ok(())
    });
    let outcome = ember_vmm::Vm::builder(config.clone())
        .serial_output(Box::new(std::io::sink()))
        .thread_hook(hook)
        .build()
        .unwrap()
        .run()
        .unwrap();
    assert!(outcome.exit.is_clean(), "{:?}", outcome.exit);
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by_key(|(k, _)| format!("{k}"));
    let kinds: Vec<String> = seen.iter().map(|(k, n)| format!("{k}@{n}")).collect();
    let main = std::thread::current().name().unwrap_or("").to_string();
    assert_eq!(
        kinds,
        [
            format!("event loop@{main}"),
            "vcpu0@vcpu0".to_string(),
            "vcpu1@vcpu1".to_string()
        ]
    );

    let long = long_guest_config();
    for fail_on in ["event loop", "vcpu1"] {
        let hook: ember_vmm::ThreadHook = Arc::new(move |kind| {
            if kind.to_string() == fail_on {
                Err("refused by the test".into())
            } else {
                Ok(())
            }
        });
        let r = ember_vmm::Vm::builder(long.clone())
            .serial_output(Box::new(std::io::sink()))
            .thread_hook(hook)
            .build()
            .unwrap()
            .run();
        let text = match r {
            Err(e) => e.to_string(),
            Ok(o) => o.exit.to_string(),
        };
        assert!(text.contains("refused by the test"), "{fail_on}: {text}");
    }
}

/// vCPU threads start when the VM is built and run their hook then, before `run` (so that
/// a seccomp filter is compiled while the rest of the VM is built); a built VM dropped without
/// running ends and joins them; a vCPU hook that panics ends the VM with an error.
#[test]
fn vcpu_hooks_run_at_build_and_an_unrun_vm_leaves_no_thread() {
    if !kvm_or_skip("vcpu_hooks_run_at_build_and_an_unrun_vm_leaves_no_thread") {
        return;
    }
    use std::sync::{mpsc, Arc, Mutex};
    use std::time::Duration;
    let config = ember_test_support::ProbeOptions::new("cmdline")
        .vcpus(2)
        .vm_config();
    let (tx, rx) = mpsc::channel::<(String, i32)>();
    let tx = Mutex::new(tx);
    let hook: ember_vmm::ThreadHook = Arc::new(move |kind| {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let _ = tx.lock().unwrap().send((kind.to_string(), tid));
        Ok(())
    });
    let vm = ember_vmm::Vm::builder(config)
        .serial_output(Box::new(std::io::sink()))
        .thread_hook(hook)
        .build()
        .unwrap();
    // Both vCPU hooks come without `run` being called.
    let mut tids = Vec::new();
    for _ in 0..2 {
        let (kind, tid) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(kind.starts_with("vcpu"), "{kind}");
        tids.push(tid);
    }
    let task = |tid: &i32| std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
    assert!(tids.iter().all(|t| task(t).exists()), "{tids:?}");
    drop(vm);
    // Joined by the drop; the kernel removes a joined thread's task a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let left = loop {
        let left: Vec<&i32> = tids.iter().filter(|t| task(t).exists()).collect();
        if left.is_empty() || std::time::Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        left.is_empty(),
        "vCPU threads left after the VM was dropped: {left:?}"
    );
    assert!(
        rx.try_recv().is_err(),
        "no event-loop hook runs for a VM that never ran"
    );

    let hook: ember_vmm::ThreadHook = Arc::new(|kind| {
        if kind == ember_vmm::ThreadKind::Vcpu(1) {
            panic!("the test's hook panics on vcpu1");
        }
        Ok(())
    });
    let long = long_guest_config();
    let outcome = ember_vmm::Vm::builder(long)
        .serial_output(Box::new(std::io::sink()))
        .thread_hook(hook)
        .build()
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(
        outcome.exit,
        ember_vmm::VmExit::VcpuError("vcpu1: the thread hook panicked".into())
    );
}

/// No mapping of a running VMM is both writable and executable (guest memory included), and
/// the filters keep it so: no thread may ask for `PROT_EXEC` once filtered.
#[test]
fn no_mapping_of_a_running_vmm_is_writable_and_executable() {
    if !kvm_or_skip("no_mapping_of_a_running_vmm_is_writable_and_executable") {
        return;
    }
    let child = start_long_guest(&[]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap();
    let (code, stderr) = stop(child);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    let wx: Vec<&str> = maps
        .lines()
        .filter(|l| {
            let perms = l.split_whitespace().nth(1).unwrap_or("");
            perms.contains('w') && perms.contains('x')
        })
        .collect();
    assert!(wx.is_empty(), "writable and executable mappings: {wx:#?}");
    // Guest memory (the largest mapping) is there, read-write and not executable.
    let largest = maps
        .lines()
        .max_by_key(|l| {
            let range = l.split_whitespace().next().unwrap_or("0-0");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0)
        })
        .unwrap();
    assert!(
        largest
            .split_whitespace()
            .nth(1)
            .unwrap()
            .starts_with("rw-"),
        "{largest}"
    );
}
