//! Every descriptor Ember opens is close-on-exec, so a process the VMM starts (or a host
//! program it hands a socket to) inherits none of them. (Its own test binary, so no other
//! test's descriptors come and go meanwhile.)

use ember_test_support::{kvm_or_skip, ProbeOptions};

/// The descriptors open in this process, with their `open(2)` flags from `/proc/self/fdinfo`.
fn fd_flags() -> std::collections::BTreeMap<u32, u32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter_map(|fd: u32| {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            Some((fd, u32::from_str_radix(flags.trim(), 8).ok()?))
        })
        .collect()
}

#[test]
fn every_descriptor_of_a_running_vm_is_close_on_exec() {
    if !kvm_or_skip("every_descriptor_of_a_running_vm_is_close_on_exec") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-cloexec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    ember_test_support::write_blk_image(&img, 2048, 0x5a).unwrap();
    let before = fd_flags();
    // The probe waits for console input that never comes, so the VM stays up.
    let opts = ProbeOptions::new("virtio,serial")
        .cmdline("probe.echo=never")
        .vcpus(2)
        .disk(&img, false, None);
    let vm = ember_vmm::Vm::builder(opts.vm_config())
        .serial_output(Box::new(std::io::sink()))
        .build()
        .unwrap();
    let handle = vm.handle();
    let runner = std::thread::spawn(move || vm.run());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let during = fd_flags();
    handle.stop();
    runner.join().unwrap().unwrap();
    let new: Vec<(u32, u32)> = during
        .into_iter()
        .filter(|(fd, _)| !before.contains_key(fd))
        .collect();
    assert!(
        new.len() >= 10,
        "expected the VM's descriptors, got {new:?}"
    );
    let inherited: Vec<u32> = new
        .iter()
        .filter(|(_, flags)| flags & libc::O_CLOEXEC as u32 == 0)
        .map(|(fd, _)| *fd)
        .collect();
    assert!(
        inherited.is_empty(),
        "descriptors without O_CLOEXEC: {inherited:?} of {new:?}"
    );
}
