//! Booting and tearing down many VMs in one process leaks nothing: open file descriptors,
//! threads and RSS return to their starting level. (Its own test binary, so no other test's
//! threads or descriptors come and go meanwhile.)

use ember_test_support::{boot_probe, kvm_or_skip, ProbeOptions};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn fifty_vms_leak_no_fds_threads_or_memory() {
    if !kvm_or_skip("fifty_vms_leak_no_fds_threads_or_memory") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ember-leaks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.img");
    ember_test_support::write_blk_image(&img, 2048, 0x5a).unwrap();
    // Two vCPUs, a disk, and both clean ends: reset and ACPI poweroff, alternately.
    let reset = ProbeOptions::new("cmdline,smp,virtio")
        .vcpus(2)
        .disk(&img, false, None);
    let poweroff = ProbeOptions::new("smp,virtio,poweroff")
        .vcpus(2)
        .disk(&img, true, None);
    // Warm-up: first-use allocations (probe path, allocator arenas, signal handler) happen once.
    boot_probe(&reset)
        .unwrap()
        .expect_all_ok("cmdline,smp,virtio");
    boot_probe(&poweroff)
        .unwrap()
        .expect_all_ok("smp,virtio,poweroff");
    // Each VM's KVM VM is closed on Ember's teardown thread after `run` returns.
    let settle = || {
        assert!(
            ember_vmm::wait_for_teardown(std::time::Duration::from_secs(2)),
            "finished VMs not released within 2 s"
        );
    };
    settle();
    let (fds0, threads0, rss0) = (open_fds(), threads(), rss_kib());
    for i in 0..50 {
        if i % 2 == 0 {
            boot_probe(&reset)
                .unwrap()
                .expect_all_ok("cmdline,smp,virtio");
        } else {
            boot_probe(&poweroff)
                .unwrap()
                .expect_all_ok("smp,virtio,poweroff");
        }
    }
    settle();
    let (fds1, threads1, rss1) = (open_fds(), threads(), rss_kib());
    eprintln!("fds {fds0}->{fds1}, threads {threads0}->{threads1}, rss {rss0}->{rss1} KiB");
    assert_eq!(fds1, fds0, "file descriptors leaked");
    assert_eq!(threads1, threads0, "threads leaked");
    // Each VM's guest memory (128 MiB, partly touched by the probe) is unmapped at teardown;
    // allow allocator noise, far below one VM's touched memory.
    assert!(
        rss1 < rss0 + 4096,
        "RSS grew from {rss0} KiB to {rss1} KiB over 50 VMs"
    );
}
