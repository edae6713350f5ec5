//! In-process creation rate (`cargo bench --bench boot_rate [-- --quick] [--markdown]`): how
//! many microVMs one process boots to their end per second, with 1, 2, 4 and 8 booting at
//! once.
//!
//! Each VM is the null guest of `cargo xtask bench` (`EMBER_NULL_GUEST=path`, which the
//! bench's `rate` section passes: it prints one line and resets), or without it the probe guest
//! with no checks (`probe=`; its ring-0 start-up, emulated on PVM hosts, takes most of its
//! ~15 ms), 128 MiB, 1 vCPU, no devices, its console to a sink: built with `VmBuilder::build`,
//! run to its reset with `Vm::run`. `N` threads each boot VMs back to back for a fixed time;
//! the rate is all the VMs that ended over the wall time (per core: over the machine's cores).
//! Each level is measured with the KVM VM and vCPU made per VM, and taken from a
//! [`ember_vmm::VmPool`] whose own thread prepares them. The KVM VMs' last close happens on
//! Ember's teardown thread, off each booting thread; `wait_for_teardown` is awaited after each
//! level (and its time reported), so that a level's teardowns are not left to the next one.
//! As for one `ember` process per VM (whose exit helper closes the KVM VM after the exit is
//! reported), a VM counts as ended when `Vm::run` returned.
//!
//! The same figure by process (one `ember` process per VM) is the `rate` section of
//! `cargo xtask bench`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ember_vmm::{Vm, VmConfig, VmPool};

/// The guest, its command line and its name for the table.
fn guest() -> Option<(PathBuf, &'static str, &'static str)> {
    if let Some(p) = std::env::var_os("EMBER_NULL_GUEST").map(PathBuf::from) {
        return p.exists().then_some((p, "console=ttyS0", "the null guest"));
    }
    let p = std::env::var_os("EMBER_PROBE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/probe/probe.elf")
        });
    p.exists()
        .then_some((p, "probe=", "the probe guest with no checks"))
}

/// Boots VMs on `threads` threads for `time`; returns (VMs ended cleanly, failures, wall, the
/// time the teardown threads then took to release the last KVM VMs).
fn level(
    (kernel, cmdline): (&PathBuf, &str),
    threads: usize,
    time: Duration,
    pool: Option<&VmPool>,
) -> (u64, u64, Duration, Duration) {
    let mut config = VmConfig::new(kernel);
    config.memory_mib = 128;
    config.cmdline = cmdline.into();
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while t0.elapsed() < time {
                    let mut b =
                        Vm::builder(config.clone()).serial_output(Box::new(std::io::sink()));
                    if let Some(p) = pool {
                        match p.take() {
                            Ok(vm) => b = b.prepared(vm),
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    }
                    match b.build().and_then(Vm::run) {
                        Ok(o) if o.exit.is_clean() => done.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    let wall = t0.elapsed();
    let t1 = Instant::now();
    ember_vmm::wait_for_teardown(Duration::from_secs(60));
    (done.into_inner(), failed.into_inner(), wall, t1.elapsed())
}

fn main() {
    let _ = ember_vmm::process_start();
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this too, shortly.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let markdown = args.iter().any(|a| a == "--markdown");
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("boot_rate bench: SKIPPED: no /dev/kvm");
        return;
    }
    let Some((kernel, cmdline, name)) = guest() else {
        eprintln!("boot_rate bench: SKIPPED: no guest (EMBER_NULL_GUEST, or cargo xtask probe)");
        return;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let time = Duration::from_millis(if quick { 500 } else { 2000 });
    if markdown {
        println!("### Creation rate in process ({name}, 128 MiB, 1 vCPU, no devices, booted to its reset)\n");
    }
    println!("| booting at once | KVM VM and vCPU | VMs | failed | VMs/s | VMs/s/core | then the last KVM VMs released, s |");
    println!("|---|---|---|---|---|---|---|");
    for pooled in [false, true] {
        let pool = pooled.then(|| VmPool::new("/dev/kvm", 1, false, 8).expect("a VM pool"));
        for threads in [1usize, 2, 4, 8] {
            let (n, failed, wall, drain) = level((&kernel, cmdline), threads, time, pool.as_ref());
            let rate = n as f64 / wall.as_secs_f64();
            println!(
                "| {threads} | {} | {n} | {failed} | {rate:.0} | {:.0} | {:.2} |",
                if pooled {
                    "from a VmPool"
                } else {
                    "created per VM"
                },
                rate / cores,
                drain.as_secs_f64()
            );
        }
    }
    println!(
        "\n{} s per level on {cores} cores. Command: `cargo bench --bench boot_rate -- --markdown{}`.\n",
        time.as_secs_f64(),
        if quick { " --quick" } else { "" }
    );
}
