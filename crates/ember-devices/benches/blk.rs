//! virtio-blk request handling throughput: 4 KiB reads from an image file in the page cache,
//! driven through `VirtioDevice::process_queue` (what the VMM's event loop calls on a queue
//! notification). Reported as requests per second (criterion "elements"), on guest memory
//! without and with the dirty bitmap of the VMM's writes (a VM that takes diff snapshots).
#![allow(
    clippy::cast_possible_truncation,
    reason = "the test queue lives in low guest memory: its addresses fit in 32 bits"
)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ember_devices::virtio::block::{Block, BlockConfig};
use ember_devices::virtio::testing::{self, Buf, GuestQueue};
use ember_devices::virtio::{MmioInterrupt, VirtioDevice};
use ember_devices::EventFdTrigger;
use ember_memory::DirtyBitmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::tempfile::TempFile;

/// Requests published per `process_queue` call (one notification).
const BATCH: u16 = 64;
const QSIZE: u16 = 256;
const IMAGE: usize = 64 << 20;
const REQ: u32 = 4096;

fn bench_reads(c: &mut Criterion) {
    let mut group = c.benchmark_group("virtio_blk");
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    for (dirty, name) in [
        (DirtyBitmap::Off, "read_4k_page_cache"),
        (DirtyBitmap::On, "read_4k_page_cache_dirty_bitmap"),
    ] {
        bench_one(&mut group, dirty, name);
    }
    group.finish();
}

fn bench_one(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dirty: DirtyBitmap,
    name: &str,
) {
    let img = TempFile::new().unwrap();
    std::fs::write(img.as_path(), vec![0x5au8; IMAGE]).unwrap();
    // Pull it into the page cache.
    let _ = std::fs::read(img.as_path()).unwrap();

    let mem = ember_memory::ram_from_ranges(&[(GuestAddress(0), 4 << 20)], dirty).unwrap();
    let mut gq = GuestQueue::new(&mem, QSIZE, GuestAddress(0)).unwrap();
    let mut block: Block = Block::new(BlockConfig {
        path: img.as_path().to_path_buf(),
        read_only: true,
        serial: None,
    })
    .unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(gq.desc_table() as u32), Some(0));
    q.set_avail_ring_address(Some(gq.avail_ring() as u32), Some(0));
    q.set_used_ring_address(Some(gq.used_ring() as u32), Some(0));
    q.set_ready(true);
    let irq = EventFdTrigger::new().unwrap();
    block
        .activate(
            mem.clone(),
            block.features(),
            vec![q],
            std::sync::Arc::new(MmioInterrupt::new(irq.try_clone().unwrap())),
        )
        .unwrap();

    // BATCH chains of 3 descriptors, headers at 0x10000, data buffers from 0x100000.
    let sectors = (IMAGE / 512) as u64;
    let mut heads = Vec::new();
    for i in 0..u64::from(BATCH) {
        let hdr = 0x10000 + 16 * i;
        let data = 0x10_0000 + u64::from(REQ) * i;
        let status = 0x20000 + i;
        // Spread the reads over the image (stride 1 MiB).
        let sector = (i * 2048 + 8 * i) % (sectors - 8);
        testing::write_blk_header(&mem, GuestAddress(hdr), testing::BLK_T_IN, sector).unwrap();
        heads.push(
            gq.add_chain(&[
                Buf::readable(hdr, 16),
                Buf::writable(data, REQ),
                Buf::writable(status, 1),
            ])
            .unwrap(),
        );
    }
    // Consume the initial publication so every iteration starts from an empty queue.
    block.process_queue(0).unwrap();
    while gq.pop_used().is_some() {}

    group.bench_function(name, |b| {
        b.iter(|| {
            for &h in &heads {
                gq.publish(h).unwrap();
            }
            block.process_queue(0).unwrap();
            let mut n = 0;
            while gq.pop_used().is_some() {
                n += 1;
            }
            assert_eq!(n, BATCH);
            let _ = irq.read();
        })
    });
    let c = block.counters();
    assert_eq!(c.malformed_chains + c.io_errors + c.out_of_range, 0);
}

criterion_group!(benches, bench_reads);
criterion_main!(benches);
