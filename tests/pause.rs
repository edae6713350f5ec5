//! Pausing and resuming every vCPU of a running VM: while paused the guest makes no progress,
//! after resuming it finishes as if nothing happened.

use std::time::{Duration, Instant};

use ember_devices::SharedBuffer;
use ember_test_support::{kvm_or_skip, ProbeOptions};
use ember_vmm::{Vm, VmExit};

#[test]
fn pause_stops_guest_progress_and_resume_continues_it() {
    if !kvm_or_skip("pause_stops_guest_progress_and_resume_continues_it") {
        return;
    }
    // The exit loop writes an unmapped port: each write is one unhandled access we can count.
    let opts = ProbeOptions::new("smp,exitloop")
        .vcpus(2)
        .cmdline("probe.exits=60000");
    let out = SharedBuffer::new();
    let vm = Vm::builder(opts.vm_config())
        .serial_output(Box::new(out.clone()))
        .build()
        .unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());

    let started = Instant::now();
    while handle.unhandled_io() < 2000 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "exit loop never started"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    for _ in 0..3 {
        assert!(handle.pause(), "vCPUs did not all leave KVM_RUN");
        assert!(handle.is_paused());
        let before = handle.unhandled_io();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(handle.unhandled_io(), before, "guest ran while paused");
        handle.resume();
        let resumed = Instant::now();
        while handle.unhandled_io() == before {
            assert!(
                resumed.elapsed() < Duration::from_secs(5),
                "guest did not resume"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let outcome = runner.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.contents()).into_owned();
    assert_eq!(outcome.exit, VmExit::Reset, "{text}");
    assert!(text.contains("PROBE exitloop ok exits=60000"), "{text}");
    assert!(text.contains("PROBE done checks=2 failed=0"), "{text}");
}

#[test]
fn stop_while_paused_ends_the_vm() {
    if !kvm_or_skip("stop_while_paused_ends_the_vm") {
        return;
    }
    let opts = ProbeOptions::new("exitloop")
        .vcpus(4)
        .cmdline("probe.exits=10000000");
    let vm = Vm::builder(opts.vm_config())
        .serial_output(Box::new(SharedBuffer::new()))
        .build()
        .unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    let started = Instant::now();
    while handle.unhandled_io() < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the probe's exit loop did not start"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(handle.pause());
    let t = Instant::now();
    handle.stop();
    let outcome = runner.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Stopped);
    // A bound against hanging, not a speed figure: the run includes tearing the KVM VM down.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}
