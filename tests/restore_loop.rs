//! Many restores of one snapshot in one process: every one completes, and none leaves a
//! descriptor or a thread behind. (A test binary of its own: other tests running beside it
//! would change the counts.)

mod snapshot_common;

use ember_test_support::kvm_or_skip;
use ember_vmm::VmExit;
use snapshot_common::{files, restore, take_snapshot};

/// Open descriptors and threads of this process.
fn fds_and_threads() -> (usize, usize) {
    let count = |d: &str| std::fs::read_dir(d).map_or(0, Iterator::count);
    (count("/proc/self/fd"), count("/proc/self/task"))
}

/// The counts once every finished VM is released (their KVM VMs are closed on Ember's teardown
/// thread a moment after `Vm::run` returns).
fn settled() -> (usize, usize) {
    assert!(
        ember_vmm::wait_for_teardown(std::time::Duration::from_secs(2)),
        "finished VMs not released within 2 s"
    );
    fds_and_threads()
}

#[test]
fn many_restores_of_one_snapshot_complete_and_leak_nothing() {
    if !kvm_or_skip("many_restores_of_one_snapshot_complete_and_leak_nothing") {
        return;
    }
    // 200 in the test tier (about 20 s in a debug build); EMBER_RESTORES=1000 for the full count.
    let restores: usize = std::env::var("EMBER_RESTORES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let f = files();
    take_snapshot(&f, "snapshot,blk,rng");
    // One restore first: whatever is created once per process (KVM's own threads, lazily
    // opened files) is then there before the count.
    let (h, console, join) = restore(&f);
    h.send_serial(b"g");
    assert_eq!(
        join.join().unwrap().unwrap().exit,
        VmExit::Reset,
        "{}",
        console.text()
    );
    let before = settled();
    for i in 0..restores {
        let (h, console, join) = restore(&f);
        h.send_serial(b"g");
        let outcome = join.join().unwrap().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "restore {i}: {out}");
        assert!(
            out.contains("PROBE done checks=3 failed=0"),
            "restore {i}: {out}"
        );
    }
    let after = settled();
    assert_eq!(
        before, after,
        "(fds, threads) before and after {restores} restores"
    );
}
