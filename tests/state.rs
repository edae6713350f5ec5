//! The state seam through a running VM: pause a probe guest in the middle of its exit loop,
//! take the whole machine's state (vCPUs, irqchip and clock, devices with an active virtio
//! disk), put it back over vCPUs that were given a broken state in between, resume: the guest
//! finishes its checks as if nothing happened.

use std::time::{Duration, Instant};

use ember_test_support::{kvm_or_skip, ProbeOptions};
use ember_vmm::{MachineState, Vm, VmExit};

#[test]
fn a_paused_vm_saved_scrambled_and_restored_finishes_its_checks() {
    if !kvm_or_skip("a_paused_vm_saved_scrambled_and_restored_finishes_its_checks") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    ember_test_support::write_blk_image(&img, 2048, 0x5a).unwrap();
    let checks = "smp,virtio,blk,exitloop";
    let opts = ProbeOptions::new(checks)
        .vcpus(2)
        .disk(&img, false, None)
        .cmdline("probe.exits=400000");
    let output = ember_devices::SharedBuffer::new();
    let vm = Vm::builder(opts.vm_config())
        .serial_output(Box::new(output.clone()))
        .build()
        .unwrap();
    let handle = vm.handle();
    assert!(matches!(
        handle.save_state(),
        Err(ember_vmm::Error::VcpuRequest(_))
    ));
    let runner = std::thread::spawn(move || vm.run());

    // In the middle of the exit loop (every exit is an unhandled port access).
    let started = Instant::now();
    while handle.unhandled_io() < 20_000 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the exit loop did not start: {}",
            String::from_utf8_lossy(&output.contents())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(handle.pause());
    let at_pause = handle.unhandled_io();
    let saved = handle.save_state().unwrap();
    assert_eq!(saved.vcpus.len(), 2);
    assert_eq!(saved.devices.virtio.len(), 1);
    // The blk check resets its device when done; the transport keeps the driver's steps.
    assert_eq!(saved.devices.virtio[0].transport.device_type, 2);
    assert!(!saved.vcpus[0].msrs.is_empty());

    // Plain data: it survives serialization.
    let json = serde_json::to_string(&saved).unwrap();
    let from_json: MachineState = serde_json::from_str(&json).unwrap();

    // Give the vCPUs a state that cannot run (RIP and RSP nowhere), then the saved one.
    let mut broken = saved.clone();
    for v in &mut broken.vcpus {
        v.regs.rip = 0xdead_0000;
        v.regs.rsp = 0;
    }
    handle.restore_state(&broken).unwrap();
    assert_eq!(
        handle.save_state().unwrap().vcpus[0].regs.rip,
        0xdead_0000,
        "the broken state was applied"
    );
    handle.restore_state(&from_json).unwrap();
    let again = handle.save_state().unwrap();
    for (a, b) in saved.vcpus.iter().zip(&again.vcpus) {
        assert_eq!(a.regs, b.regs, "vCPU {}", a.id);
        assert_eq!(a.sregs, b.sregs, "vCPU {}", a.id);
        assert_eq!(a.mp_state, b.mp_state, "vCPU {}", a.id);
    }
    assert_eq!(again.devices, saved.devices);
    // Nothing ran while paused.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(handle.unhandled_io(), at_pause);

    handle.resume();
    let outcome = runner.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&output.contents()).into_owned();
    assert_eq!(outcome.exit, VmExit::Reset, "{text}");
    assert!(text.contains("PROBE exitloop ok exits=400000"), "{text}");
    assert!(text.contains("PROBE done checks=4 failed=0"), "{text}");
    // The handle outlives the VM but not its KVM resources.
    assert!(matches!(
        handle.save_state(),
        Err(ember_vmm::Error::NotRunning)
    ));
}
