//! Snapshot and restore with a busy guest: the probe fills memory, keeps its clock, waits for
//! the host across the snapshot, then checks its memory and drives its devices in the restored
//! VM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_test_support::{kvm_or_skip, probe_elf, write_blk_image};
use ember_vmm::{DiskConfig, RngConfig, Vm, VmBuilder, VmConfig, VmExit, VmHandle};

/// A console sink the test reads.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }
}

fn config(disk: &Path, checks: &str) -> VmConfig {
    let mut c = VmConfig::new(probe_elf());
    c.memory_mib = 128;
    c.cmdline = format!("probe={checks}");
    c.disks.push(DiskConfig {
        path: disk.to_path_buf(),
        id: Some("probe".into()),
        ..Default::default()
    });
    c.rng = Some(RngConfig::default());
    c
}

/// Runs `vm` on a thread; returns its handle and the join handle.
fn spawn(
    vm: Vm,
) -> (
    VmHandle,
    std::thread::JoinHandle<Result<ember_vmm::VmOutcome, ember_vmm::Error>>,
) {
    let h = vm.handle();
    (h, std::thread::spawn(move || vm.run()))
}

struct Files {
    _dir: vmm_sys_util::tempdir::TempDir,
    disk: PathBuf,
    state: PathBuf,
    memory: PathBuf,
}

fn files() -> Files {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-snapshot-").unwrap();
    let disk = dir.as_path().join("disk.img");
    write_blk_image(&disk, 2048, 0x5a).unwrap();
    Files {
        state: dir.as_path().join("vm.state"),
        memory: dir.as_path().join("vm.mem"),
        disk,
        _dir: dir,
    }
}

/// Boots the probe to its `snapshot` wait, pauses, snapshots, stops.
fn take_snapshot(f: &Files, checks: &str) -> String {
    let console = Console::default();
    let vm = Vm::builder(config(&f.disk, checks))
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let (h, join) = spawn(vm);
    assert!(
        console.wait_for("PROBE snapshot waiting", Duration::from_secs(30)),
        "{}",
        console.text()
    );
    assert!(h.pause());
    let written = h.snapshot(&f.state, &f.memory).unwrap();
    assert!(written > 0);
    h.stop();
    let outcome = join.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Stopped);
    console.text()
}

fn restore(
    f: &Files,
) -> (
    VmHandle,
    Console,
    std::thread::JoinHandle<Result<ember_vmm::VmOutcome, ember_vmm::Error>>,
) {
    let state = ember_vmm::read_snapshot(&f.state).unwrap();
    let mem = std::fs::File::open(&f.memory).unwrap();
    let console = Console::default();
    let vm = VmBuilder::restore(state, mem, &f.memory)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let (h, join) = spawn(vm);
    (h, console, join)
}

#[test]
fn a_restored_probe_finds_its_memory_and_its_devices() {
    if !kvm_or_skip("a_restored_probe_finds_its_memory_and_its_devices") {
        return;
    }
    let f = files();
    let before = take_snapshot(&f, "snapshot,blk,rng");
    assert!(!before.contains("PROBE snapshot ok"), "{before}");
    let mem_len = std::fs::metadata(&f.memory).unwrap().len();
    assert_eq!(mem_len, 128 << 20);
    let (h, console, join) = restore(&f);
    // The restored guest is in its wait: the byte releases it.
    h.send_serial(b"g");
    let outcome = join.join().unwrap().unwrap();
    let out = console.text();
    assert_eq!(outcome.exit, VmExit::Reset, "{out}");
    assert!(
        out.contains("PROBE snapshot ok pattern=ok tsc_forward=yes"),
        "{out}"
    );
    assert!(out.contains("PROBE blk ok"), "{out}");
    assert!(out.contains("PROBE rng ok"), "{out}");
    assert!(out.contains("PROBE done checks=3 failed=0"), "{out}");
    // The memory file is only read (MAP_PRIVATE): the same snapshot restores again.
    let (h, console, join) = restore(&f);
    h.send_serial(b"g");
    let outcome = join.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Reset, "{}", console.text());
}

#[test]
fn bad_snapshots_are_clear_errors() {
    if !kvm_or_skip("bad_snapshots_are_clear_errors") {
        return;
    }
    let f = files();
    take_snapshot(&f, "snapshot");
    // A memory file of the wrong size.
    let short = f.memory.with_extension("short");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let state = ember_vmm::read_snapshot(&f.state).unwrap();
    let e = VmBuilder::restore(state.clone(), std::fs::File::open(&short).unwrap(), &short)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("bytes of guest memory"), "{e}");
    // A different device set.
    let mut other = state.clone();
    other.config.rng = None;
    let e = VmBuilder::restore(other, std::fs::File::open(&f.memory).unwrap(), &f.memory)
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("devices"), "{e}");
    // A corrupt and a truncated state file.
    let mut bytes = std::fs::read(&f.state).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&f.state, &bytes).unwrap();
    let e = ember_vmm::read_snapshot(&f.state).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    std::fs::write(&f.state, &bytes[..n / 3]).unwrap();
    let e = ember_vmm::read_snapshot(&f.state).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}
