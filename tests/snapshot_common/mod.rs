//! What the snapshot tests share: a console the test reads, the probe's configuration, a
//! snapshot taken at the probe's wait, and its restore.
#![allow(dead_code, reason = "each test file uses a part")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_test_support::{probe_elf, write_blk_image};
use ember_vmm::{DiskConfig, RngConfig, Vm, VmBuilder, VmConfig, VmExit, VmHandle};

/// A console sink the test reads.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

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
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` is there and the line it is in has ended (its `\n` arrived).
    pub fn wait_for_line_end(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let text = self.text();
            if text
                .find(needle)
                .is_some_and(|at| text[at..].contains('\n'))
            {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
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

pub fn config(disk: &Path, checks: &str) -> VmConfig {
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
pub fn spawn(
    vm: Vm,
) -> (
    VmHandle,
    std::thread::JoinHandle<Result<ember_vmm::VmOutcome, ember_vmm::Error>>,
) {
    let h = vm.handle();
    (h, std::thread::spawn(move || vm.run()))
}

pub struct Files {
    pub _dir: vmm_sys_util::tempdir::TempDir,
    pub disk: PathBuf,
    pub state: PathBuf,
    pub memory: PathBuf,
}

pub fn files() -> Files {
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
pub fn take_snapshot(f: &Files, checks: &str) -> String {
    take_snapshot_of(config(&f.disk, checks), f)
}

/// As [`take_snapshot`], for a VM of configuration `config` (a probe whose checks include
/// `snapshot`). Returns the console's text.
pub fn take_snapshot_of(config: VmConfig, f: &Files) -> String {
    let console = Console::default();
    let vm = Vm::builder(config)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let (h, join) = spawn(vm);
    // The whole `waiting` line (it names the region), not just its start.
    assert!(
        console.wait_for_line_end("PROBE snapshot waiting", Duration::from_secs(30)),
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

pub fn restore(
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

/// Once `console` shows `running` (the probe check's line), waits `after` more, then pauses the
/// VM, snapshots it to `f`'s files, stops it and checks that nothing failed before the snapshot.
pub fn snapshot_once_running(
    h: &VmHandle,
    join: std::thread::JoinHandle<Result<ember_vmm::VmOutcome, ember_vmm::Error>>,
    console: &Console,
    running: &str,
    after: Duration,
    f: &Files,
) {
    assert!(
        console.wait_for(running, Duration::from_secs(30)),
        "{}",
        console.text()
    );
    std::thread::sleep(after);
    assert!(h.pause());
    h.snapshot(&f.state, &f.memory).unwrap();
    h.stop();
    join.join().unwrap().unwrap();
    assert!(!console.text().contains("FAIL"), "{}", console.text());
}
