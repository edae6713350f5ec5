//! Building a VM without running it: `VmBuilder::build` on the probe guest (guest memory,
//! kernel load, boot parameters, KVM VM with irqchip and PIT, memory slot, devices, vCPU).
//! The VM's destruction (dropping it) is not timed.
//!
//! Needs `/dev/kvm` and the probe (`cargo xtask probe`); without them it says so and measures
//! nothing.
//!
//! ```sh
//! cargo xtask probe && cargo bench --bench vm_build
//! ```

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ember_vmm::{BootProtocolChoice, Vm, VmConfig};

fn probe() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/probe/probe.elf");
    p.exists().then_some(p)
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn bench_build(c: &mut Criterion) {
    let Some(kernel) = probe() else {
        eprintln!("vm_build: target/probe/probe.elf is missing (cargo xtask probe); skipped");
        return;
    };
    if !kvm_usable() {
        eprintln!("vm_build: /dev/kvm is not usable here; skipped");
        return;
    }
    let mut g = c.benchmark_group("vm_build");
    // Each build takes milliseconds (KVM waits for RCU grace periods): few, long samples.
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, protocol) in [
        ("pvh", BootProtocolChoice::Pvh),
        ("linux64", BootProtocolChoice::Linux64),
    ] {
        for mib in [128u64, 2048] {
            let mut config = VmConfig::new(&kernel);
            config.cmdline = "probe=reset".into();
            config.memory_mib = mib;
            config.boot_protocol = Some(protocol);
            g.bench_with_input(BenchmarkId::new(name, mib), &config, |b, config| {
                b.iter_with_large_drop(|| {
                    Vm::builder(config.clone())
                        .serial_output(Box::new(std::io::sink()))
                        .build()
                        .expect("VmBuilder::build")
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_build);
criterion_main!(benches);
