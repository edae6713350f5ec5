//! Memory per additional microVM in one process (`cargo bench --bench vm_memory [-- --quick]
//! [--markdown]`): what a library user pays for each more VM it runs.
//!
//! Each VM is the *parked* null guest of `cargo xtask bench` (`EMBER_PARKED_GUEST=path`, which
//! the bench's `memory` section passes: it prints one line and halts with interrupts off, so
//! that its vCPU thread sleeps in `KVM_RUN`), 128 MiB, 1 vCPU, no devices, built with
//! `VmBuilder::build` and run on a thread of its own. The VMs are started one after the other,
//! each waited for until its line arrived; 50 ms after the first and after the last,
//! `/proc/self/smaps` is read: the Rss of every mapping except guest RAM (anonymous or memfd,
//! writable, of the guest's size or a multiple of it: neighbouring guest mappings may be
//! merged), and the guest RAM resident. The figure is the growth over the first VM, per additional VM. Then
//! every VM is stopped and its thread joined.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use ember_vmm::{Vm, VmConfig, VmHandle};

const GUEST_MIB: u64 = 128;

/// A console that reports when the null guest's line arrives.
struct Watch {
    seen: Vec<u8>,
    tx: Option<mpsc::Sender<()>>,
}

impl Write for Watch {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.seen.extend_from_slice(b);
        if self.seen.windows(4).any(|w| w == b"NULL") {
            if let Some(tx) = self.tx.take() {
                let _ = tx.send(());
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// (Rss outside guest RAM, guest RAM resident) of this process, KiB.
fn rss_kib() -> (u64, u64) {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut outside, mut guest) = (0, 0);
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range, permissions, offset, device, inode, path.
            let size = first
                .split_once('-')
                .and_then(|(a, b)| {
                    Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
                })
                .unwrap_or(0);
            let writable = words.next().is_some_and(|p| p.starts_with("rw"));
            let path = words.nth(3).unwrap_or("");
            // Neighbouring guest RAM mappings of the same kind can be merged by the kernel:
            // any multiple of the guest's size counts.
            is_guest = size > 0
                && size % (GUEST_MIB << 20) == 0
                && writable
                && (path.is_empty() || path.starts_with("/memfd:"));
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if is_guest {
                guest += kib;
            } else {
                outside += kib;
            }
        }
    }
    (outside, guest)
}

/// Starts one parked VM on a thread of its own; returns once its line arrived.
fn start(config: &VmConfig) -> (VmHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let (handle_tx, handle_rx) = mpsc::channel();
    let config = config.clone();
    let thread = std::thread::spawn(move || {
        let console = Watch {
            seen: Vec::new(),
            tx: Some(tx),
        };
        let vm = Vm::builder(config)
            .serial_output(Box::new(console))
            .build()
            .expect("the parked guest's VM builds");
        handle_tx.send(vm.handle()).expect("the bench waits");
        let _ = vm.run();
    });
    let handle = handle_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the VM is built within 10 s");
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the parked guest prints its line within 10 s");
    (handle, thread)
}

fn main() {
    let _ = ember_vmm::process_start();
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this too, shortly.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let markdown = args.iter().any(|a| a == "--markdown");
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("vm_memory bench: SKIPPED: no /dev/kvm");
        return;
    }
    let Some(kernel) = std::env::var_os("EMBER_PARKED_GUEST").map(PathBuf::from) else {
        eprintln!(
            "vm_memory bench: SKIPPED: no parked guest (EMBER_PARKED_GUEST, which cargo xtask bench passes)"
        );
        return;
    };
    let n: u64 = if quick { 4 } else { 16 };
    let mut config = VmConfig::new(kernel);
    config.memory_mib = GUEST_MIB;
    config.cmdline = "console=ttyS0".into();

    let mut running = vec![start(&config)];
    std::thread::sleep(Duration::from_millis(50));
    let one = rss_kib();
    for _ in 1..n {
        running.push(start(&config));
    }
    std::thread::sleep(Duration::from_millis(50));
    let all = rss_kib();
    for (handle, _) in &running {
        handle.stop();
    }
    for (_, thread) in running {
        let _ = thread.join();
    }

    let extra = n - 1;
    let per_vm = all.0.saturating_sub(one.0) / extra;
    let per_vm_guest = all.1.saturating_sub(one.1) / extra;
    if markdown {
        println!(
            "### Memory per additional VM in one process (the parked null guest, {GUEST_MIB} MiB, 1 vCPU, no devices)\n"
        );
    }
    println!("| VMs running | RSS outside guest RAM, KiB | guest RAM resident, KiB |");
    println!("|---|---|---|");
    println!("| 1 | {} | {} |", one.0, one.1);
    println!("| {n} | {} | {} |", all.0, all.1);
    println!(
        "\nPer additional VM: **{per_vm} KiB** outside guest RAM, and {per_vm_guest} KiB of \
         guest RAM that its guest touched. Command: `cargo bench --bench vm_memory -- \
         --markdown{}`.\n",
        if quick { " --quick" } else { "" }
    );
}
