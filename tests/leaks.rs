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
    let opts = ProbeOptions::new("cmdline,memmap");
    // Warm-up: first-use allocations (probe path, allocator arenas, signal handler) happen once.
    boot_probe(&opts).unwrap().expect_all_ok("cmdline,memmap");
    let (fds0, threads0, rss0) = (open_fds(), threads(), rss_kib());
    for _ in 0..50 {
        let run = boot_probe(&opts).unwrap();
        run.expect_all_ok("cmdline,memmap");
    }
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
