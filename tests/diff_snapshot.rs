//! Diff snapshots: KVM's dirty log and guest memory's dirty bitmap give the pages written since
//! the last snapshot; a chain of them restores the guest where the last one was taken. The
//! probe's `snapshot` check runs three times (each waits for a byte from the host), with disk
//! and entropy traffic between, so every snapshot is of a busy guest.

mod snapshot_common;

use std::path::Path;
use std::time::{Duration, Instant};

use ember_test_support::kvm_or_skip;
use ember_vmm::{Vm, VmBuilder, VmExit, VmHandle};
use snapshot_common::{config, files, spawn, Console};

const CHECKS: &str = "snapshot,blk,snapshot,blk,snapshot,rng";
const WAITING: &str = "PROBE snapshot waiting";

/// Waits until the console shows `WAITING` `n` times.
fn wait_for_waits(console: &Console, n: usize) {
    let end = Instant::now() + Duration::from_secs(30);
    while console.text().matches(WAITING).count() < n {
        assert!(Instant::now() < end, "{}", console.text());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Restores `state` on `memory` (dirty pages tracked) and returns the handle, the console and
/// the VM's thread.
fn restore(
    state: &Path,
    memory: &Path,
) -> (
    VmHandle,
    Console,
    std::thread::JoinHandle<Result<ember_vmm::VmOutcome, ember_vmm::Error>>,
) {
    let mut s = ember_vmm::read_snapshot(state).unwrap();
    s.config.track_dirty_pages = true;
    let console = Console::default();
    let vm = VmBuilder::restore(s, std::fs::File::open(memory).unwrap(), memory)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    assert!(ember_memory::has_dirty_bitmap(vm.memory()));
    let (h, join) = spawn(vm);
    (h, console, join)
}

#[test]
fn a_chain_of_diff_snapshots_restores_the_last_one() {
    if !kvm_or_skip("a_chain_of_diff_snapshots_restores_the_last_one") {
        return;
    }
    let f = files();
    let dir = f.state.parent().unwrap().to_path_buf();
    let (state1, mem1) = (dir.join("full.state"), dir.join("full.mem"));
    let (state2, diff2) = (dir.join("diff2.state"), dir.join("diff2.mem"));
    let (state3, chain) = (dir.join("diff3.state"), dir.join("chain.mem"));

    // Boot with tracking: a full snapshot at the first wait, a diff into a new file at the
    // second.
    let mut cfg = config(&f.disk, CHECKS);
    cfg.track_dirty_pages = true;
    let console = Console::default();
    let vm = Vm::builder(cfg)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    assert!(ember_memory::has_dirty_bitmap(vm.memory()));
    let (h, join) = spawn(vm);
    wait_for_waits(&console, 1);
    assert!(h.pause());
    let full = h.snapshot(&state1, &mem1).unwrap();
    h.resume();
    h.send_serial(b"1");
    wait_for_waits(&console, 2);
    assert!(h.pause());
    let diff = h.diff_snapshot(&state2, &diff2).unwrap();
    h.stop();
    assert_eq!(join.join().unwrap().unwrap().exit, VmExit::Stopped);
    let text = console.text();
    assert!(
        text.contains("PROBE snapshot ok") && text.contains("PROBE blk ok"),
        "{text}"
    );
    // Only the pages written in between: the probe's 1 MiB region (marked, then filled again),
    // its stack, the disk check's buffers and rings; less than the full snapshot, which
    // writes every 2 MiB chunk with a resident page.
    assert!(diff >= 1 << 20, "diff {diff} bytes, full {full}");
    assert!(
        diff < full && diff % 4096 == 0,
        "diff {diff} bytes, full {full}"
    );
    assert_eq!(std::fs::metadata(&diff2).unwrap().len(), 128 << 20);

    // The diff laid over a copy of the base restores the guest at its second wait.
    std::fs::copy(&mem1, &chain).unwrap();
    let copied = ember_vmm::merge_memory_diff(&chain, &diff2).unwrap();
    assert!(copied >= diff, "copied {copied}, diff {diff}");
    let (h, console, join) = restore(&state2, &chain);
    h.send_serial(b"2");
    wait_for_waits(&console, 1);
    let text = console.text();
    assert!(text.contains("PROBE snapshot ok"), "{text}");
    assert!(text.contains("PROBE blk ok"), "{text}");
    assert!(!text.contains("PROBE start"), "{text}");

    // A diff of the restored VM written into the very file its memory is mapped from (the
    // pages written are the ones it dirtied, private copies by now): that file and the third
    // state then restore the guest at its third wait.
    assert!(h.pause());
    h.diff_snapshot(&state3, &chain).unwrap();
    h.stop();
    assert_eq!(join.join().unwrap().unwrap().exit, VmExit::Stopped);
    let (h, console, join) = restore(&state3, &chain);
    h.send_serial(b"3");
    let outcome = join.join().unwrap().unwrap();
    let text = console.text();
    assert_eq!(outcome.exit, VmExit::Reset, "{text}");
    assert!(text.contains("PROBE snapshot ok"), "{text}");
    assert!(text.contains("PROBE rng ok"), "{text}");
    assert!(!text.contains(WAITING), "{text}");
    // Every check of the command line passed, those before each snapshot included: the
    // probe's tally lives in guest memory, so a page left out of a diff would lose it.
    assert!(text.contains("PROBE done checks=6 failed=0"), "{text}");
    drop(h);
}

#[test]
fn a_diff_snapshot_needs_dirty_page_tracking_and_a_matching_base() {
    if !kvm_or_skip("a_diff_snapshot_needs_dirty_page_tracking_and_a_matching_base") {
        return;
    }
    let f = files();
    let console = Console::default();
    let vm = Vm::builder(config(&f.disk, "snapshot"))
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    // Without tracking, the VMM's writes set no bitmap either.
    assert!(!ember_memory::has_dirty_bitmap(vm.memory()));
    let (h, join) = spawn(vm);
    wait_for_waits(&console, 1);
    assert!(h.pause());
    let e = h
        .diff_snapshot(&f.state, &f.memory)
        .unwrap_err()
        .to_string();
    assert!(e.contains("track_dirty_pages"), "{e}");
    assert!(!f.memory.exists());
    h.stop();
    join.join().unwrap().unwrap();
    // A diff of another size than its base.
    let (base, diff) = (
        f.memory.with_extension("base"),
        f.memory.with_extension("diff"),
    );
    std::fs::write(&base, vec![0u8; 8192]).unwrap();
    std::fs::write(&diff, vec![1u8; 4096]).unwrap();
    let e = ember_vmm::merge_memory_diff(&base, &diff)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4096 bytes") && e.contains("8192"), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), vec![0u8; 8192]);
}
