//! Guest memory set-up: `MemoryLayout::new` and `create_guest_memory` (anonymous
//! `MAP_NORESERVE` mappings, never touched) for 128 MiB and 2 GiB guests. The unmapping on
//! drop is not timed.
//!
//! ```sh
//! cargo bench --bench memory
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};

fn bench_memory(c: &mut Criterion) {
    let mut g = c.benchmark_group("guest_memory");
    for mib in [128u64, 2048] {
        g.bench_with_input(
            BenchmarkId::new("MemoryLayout::new", mib),
            &mib,
            |b, &mib| b.iter(|| MemoryLayout::new(black_box(mib * MIB)).expect("layout")),
        );
        let layout = MemoryLayout::new(mib * MIB).expect("layout");
        g.bench_with_input(
            BenchmarkId::new("MemoryLayout::new + create_guest_memory", mib),
            &mib,
            |b, &mib| {
                b.iter_with_large_drop(|| {
                    let layout = MemoryLayout::new(black_box(mib * MIB)).expect("layout");
                    create_guest_memory(&layout, DirtyBitmap::Off).expect("guest memory")
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("e820", mib), &layout, |b, layout| {
            b.iter(|| black_box(layout).e820())
        });
    }
    g.finish();
}

criterion_group!(benches, bench_memory);
criterion_main!(benches);
