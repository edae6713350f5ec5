//! Port-bus dispatch: one `Bus::write` / `Bus::read` as a vCPU's I/O exit makes it, on a bus
//! populated like Ember's (COM1, i8042, boot timer, pvpanic).
//!
//! ```sh
//! cargo bench --bench bus
//! ```

use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use ember_devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use ember_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use ember_devices::pvpanic::{PvPanic, PVPANIC_PORT};
use ember_devices::serial::{SerialDevice, COM1_BASE};
use ember_devices::{Bus, EventFdTrigger, SharedDevice};

/// The port that nothing answers on (the probe's exit-loop port).
const UNMAPPED_PORT: u64 = 0x511;

fn ember_bus() -> Bus {
    let mut bus = Bus::new();
    let serial = SerialDevice::new(
        EventFdTrigger::new().expect("eventfd"),
        Box::new(std::io::sink()),
    )
    .expect("serial");
    bus.insert(Arc::new(Mutex::new(serial)) as SharedDevice, COM1_BASE, 8)
        .expect("COM1");
    bus.insert(
        Arc::new(Mutex::new(I8042::new(
            EventFdTrigger::new().expect("eventfd"),
        ))),
        I8042_BASE,
        I8042_LEN,
    )
    .expect("i8042");
    bus.insert(
        Arc::new(Mutex::new(BootTimer::new(Instant::now()))),
        BOOT_TIMER_PORT,
        1,
    )
    .expect("boot timer");
    bus.insert(
        Arc::new(Mutex::new(PvPanic::new(
            EventFdTrigger::new().expect("eventfd"),
        ))),
        PVPANIC_PORT,
        1,
    )
    .expect("pvpanic");
    bus
}

fn bench_bus(c: &mut Criterion) {
    let bus = ember_bus();
    let mut g = c.benchmark_group("pio_bus");
    g.bench_function("write boot timer (0x510)", |b| {
        b.iter(|| bus.write(black_box(BOOT_TIMER_PORT), black_box(&[1u8])))
    });
    g.bench_function("write unmapped port (0x511)", |b| {
        b.iter(|| bus.write(black_box(UNMAPPED_PORT), black_box(&[1u8])))
    });
    g.bench_function("read unmapped port (0x511)", |b| {
        let mut data = [0u8; 1];
        b.iter(|| bus.read(black_box(UNMAPPED_PORT), black_box(&mut data)))
    });
    g.bench_function("read COM1 LSR (0x3fd)", |b| {
        let mut data = [0u8; 1];
        b.iter(|| bus.read(black_box(COM1_BASE + 5), black_box(&mut data)))
    });
    g.bench_function("write COM1 THR (0x3f8) to a sink", |b| {
        b.iter(|| bus.write(black_box(COM1_BASE), black_box(b"x")))
    });
    g.finish();
}

criterion_group!(benches, bench_bus);
criterion_main!(benches);
