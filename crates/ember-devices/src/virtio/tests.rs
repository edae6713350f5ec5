//! Transport and virtio-blk tests: a fake guest driver programs the registers and writes
//! descriptor chains into real guest memory; the "VMM" calls `process_notification`.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test inputs are small, known values; 64-bit addresses are split into 32-bit halves on purpose"
)]

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::block::{Block, BlockConfig, BlockCountersHandle, BlockError, DiskError, QUEUE_SIZE};
use super::testing::{self, read_reg, write_reg, Buf, GuestQueue, BLK_S_IOERR, BLK_S_OK};
use super::testing::{BLK_S_UNSUPP, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT};
use super::*;
use crate::{BusDevice, EventFdTrigger};

const DISK_LEN: usize = 1 << 20;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0xf000;
/// Start of the hole between the two RAM regions.
const HOLE: u64 = 0x10000;

fn pattern(i: usize) -> u8 {
    ((i * 7 + i / 512) % 251) as u8
}

/// Two RAM regions with a hole between them, with the dirty bitmap of the VMM's writes (as a VM
/// that takes diff snapshots has it).
fn memory() -> GuestRam {
    ember_memory::ram_from_ranges(
        &[(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)],
        ember_memory::DirtyBitmap::On,
    )
    .unwrap()
}

fn image(len: usize) -> TempFile {
    let f = TempFile::new().unwrap();
    let data: Vec<u8> = (0..len).map(pattern).collect();
    std::fs::write(f.as_path(), data).unwrap();
    f
}

struct Fx {
    mem: GuestRam,
    dev: MmioTransport,
    q: GuestQueue,
    img: TempFile,
    counters: BlockCountersHandle,
    irq: EventFdTrigger,
}

fn block_fx(read_only: bool, serial: Option<&str>, qsize: u16) -> Fx {
    let mem = memory();
    let img = image(DISK_LEN);
    let block = Block::new(BlockConfig {
        path: img.as_path().to_path_buf(),
        read_only,
        serial: serial.map(str::to_string),
    })
    .unwrap();
    assert_eq!(block.capacity(), (DISK_LEN / 512) as u64);
    let counters = block.counters_handle();
    let irq = EventFdTrigger::new().unwrap();
    let dev = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap()).unwrap();
    let q = GuestQueue::new(&mem, qsize, GuestAddress(0)).unwrap();
    Fx {
        mem,
        dev,
        q,
        img,
        counters,
        irq,
    }
}

/// A device after the full guest handshake.
fn ready_fx(read_only: bool, serial: Option<&str>) -> Fx {
    let mut fx = block_fx(read_only, serial, 16);
    testing::driver_init(&mut fx.dev, &[&fx.q], None).unwrap();
    assert!(fx.dev.is_activated());
    fx
}

impl Fx {
    /// Kicks queue 0 through the register (no ioeventfd) and runs the event loop.
    fn kick(&mut self) {
        write_reg(&mut self.dev, QUEUE_NOTIFY_OFFSET, 0);
        assert_eq!(self.dev.queue_notify_evts()[0].read().unwrap(), 1);
        self.dev.process_notification(0);
    }

    fn submit(&mut self, bufs: &[Buf]) -> (u32, u32) {
        let head = self.q.add_chain(bufs).unwrap();
        self.kick();
        let used = self.q.pop_used().expect("request completed");
        assert_eq!(used.0, u32::from(head));
        assert_eq!(self.q.pop_used(), None);
        used
    }

    fn header(&self, req_type: u32, sector: u64) {
        testing::write_blk_header(&self.mem, GuestAddress(HDR), req_type, sector).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A read of `sectors` sectors at `sector` into DATA; returns (status, used len).
    fn read(&mut self, sector: u64, sectors: u32) -> (u8, u32) {
        self.header(BLK_T_IN, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (_, len) = self.submit(&[
            Buf::readable(HDR, 16),
            Buf::writable(DATA, sectors * 512),
            Buf::writable(STATUS, 1),
        ]);
        (self.status(), len)
    }

    fn data(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(DATA)).unwrap();
        v
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(self.img.as_path()).unwrap()
    }

    /// A valid request still works (after hostile ones).
    fn assert_healthy(&mut self) {
        let (st, len) = self.read(7, 1);
        assert_eq!((st, len), (BLK_S_OK, 513));
        let expect: Vec<u8> = (7 * 512..8 * 512).map(pattern).collect();
        assert_eq!(self.data(512), expect);
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-blk requests

#[test]
fn register_identity() {
    let mut fx = block_fx(false, None, 16);
    assert_eq!(read_reg(&mut fx.dev, regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read_reg(&mut fx.dev, regs::VERSION), 2);
    assert_eq!(read_reg(&mut fx.dev, regs::DEVICE_ID), TYPE_BLOCK);
    assert_eq!(read_reg(&mut fx.dev, regs::VENDOR_ID), VENDOR_ID);
    assert_eq!(read_reg(&mut fx.dev, regs::CONFIG_GENERATION), 0);
    assert_eq!(read_reg(&mut fx.dev, regs::SHM_LEN_LOW), u32::MAX);
    assert_eq!(
        read_reg(&mut fx.dev, regs::QUEUE_NUM_MAX),
        u32::from(QUEUE_SIZE)
    );
    let f = testing::read_device_features(&mut fx.dev);
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & (1 << 9), 0, "FLUSH");
    assert_eq!(f & (1 << 5), 0, "not RO");
    // Capacity: config offset 0, u64 LE, as two 32-bit reads (Linux) and one 64-bit read.
    let lo = read_reg(&mut fx.dev, CONFIG_SPACE_OFFSET);
    let hi = read_reg(&mut fx.dev, CONFIG_SPACE_OFFSET + 4);
    assert_eq!(u64::from(lo) | u64::from(hi) << 32, (DISK_LEN / 512) as u64);
    let mut b = [0u8; 8];
    fx.dev.read(CONFIG_SPACE_OFFSET, &mut b);
    assert_eq!(u64::from_le_bytes(b), (DISK_LEN / 512) as u64);
    let mut b = [0u8; 1];
    fx.dev.read(CONFIG_SPACE_OFFSET + 1, &mut b);
    assert_eq!(b[0], ((DISK_LEN / 512) >> 8) as u8);
    assert_eq!(fx.dev.counters().bad_accesses, 0);
}

#[test]
fn read_known_pattern() {
    let mut fx = ready_fx(false, None);
    assert_eq!(fx.read(3, 2), (BLK_S_OK, 1025));
    let expect: Vec<u8> = (3 * 512..5 * 512).map(pattern).collect();
    assert_eq!(fx.data(1024), expect);
    let c = fx.counters.snapshot();
    assert_eq!((c.reads, c.read_bytes), (1, 1024));
    // One interrupt, used-buffer bit set; the guest acknowledges it.
    assert_eq!(fx.irq.read().unwrap(), 1);
    assert_eq!(read_reg(&mut fx.dev, regs::INTERRUPT_STATUS), 1);
    write_reg(&mut fx.dev, regs::INTERRUPT_ACK, 1);
    assert_eq!(read_reg(&mut fx.dev, regs::INTERRUPT_STATUS), 0);
}

#[test]
fn read_scattered_across_regions_and_any_layout() {
    let mut fx = ready_fx(false, None);
    // Header split over two descriptors, data in three pieces (one in the second region),
    // the status byte sharing the last data descriptor.
    fx.header(BLK_T_IN, 10);
    let (_, len) = fx.submit(&[
        Buf::readable(HDR, 10),
        Buf::readable(HDR + 10, 6),
        Buf::writable(DATA, 100),
        Buf::writable(0x20000, 412),
        Buf::writable(0x30000 - 513, 513),
    ]);
    assert_eq!(len, 1025);
    let mut got = vec![0u8; 100];
    fx.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    let mut more = vec![0u8; 412];
    fx.mem.read_slice(&mut more, GuestAddress(0x20000)).unwrap();
    got.extend(more);
    let mut last = vec![0u8; 513];
    fx.mem
        .read_slice(&mut last, GuestAddress(0x30000 - 513))
        .unwrap();
    got.extend(&last[..512]);
    let expect: Vec<u8> = (10 * 512..12 * 512).map(pattern).collect();
    assert_eq!(got, expect);
    assert_eq!(last[512], BLK_S_OK);
}

/// The device's writes to guest memory (the data it read, the status byte, the used ring) set
/// guest memory's dirty bitmap: what a diff snapshot adds to KVM's dirty log, which only sees
/// the guest's own writes.
#[test]
fn the_devices_writes_set_guest_memorys_dirty_bitmap() {
    let mut fx = ready_fx(false, None);
    fx.header(BLK_T_IN, 0);
    fx.q.add_chain(&[
        Buf::readable(HDR, 16),
        Buf::writable(DATA, 2 * 4096),
        Buf::writable(STATUS, 1),
    ])
    .unwrap();
    // What the "guest" wrote so far (header, descriptors, avail ring) is not the device's.
    ember_memory::take_dirty_pages(&fx.mem, 0).unwrap();
    fx.kick();
    assert_eq!(fx.status(), BLK_S_OK);
    let bits = ember_memory::take_dirty_pages(&fx.mem, 0).unwrap();
    let dirty = |addr: u64| (bits[(addr / 4096 / 64) as usize] >> ((addr / 4096) % 64)) & 1 == 1;
    // Page 0 holds the queue: the used ring.
    for page in [0, DATA, DATA + 4096, STATUS] {
        assert!(dirty(page), "page {page:#x} not dirty: {bits:x?}");
    }
    // The request header was only read.
    assert!(!dirty(HDR), "{bits:x?}");
    // Taken means cleared.
    assert_eq!(ember_memory::take_dirty_pages(&fx.mem, 0).unwrap(), vec![0]);
}

#[test]
fn write_reaches_the_file() {
    let mut fx = ready_fx(false, None);
    let data: Vec<u8> = (0..1024).map(|i| (i % 13) as u8 + 100).collect();
    fx.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    fx.header(BLK_T_OUT, 5);
    let (_, len) = fx.submit(&[
        Buf::readable(HDR, 16),
        Buf::readable(DATA, 1024),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!((fx.status(), len), (BLK_S_OK, 1));
    let file = fx.file();
    assert_eq!(&file[5 * 512..7 * 512], &data[..]);
    assert_eq!(file[7 * 512], pattern(7 * 512));
    assert_eq!(file[5 * 512 - 1], pattern(5 * 512 - 1));
    let c = fx.counters.snapshot();
    assert_eq!((c.writes, c.write_bytes), (1, 1024));
    // Header and data in one descriptor (any layout).
    let mut hdr_and_data = vec![0u8; 16 + 512];
    hdr_and_data[0] = BLK_T_OUT as u8;
    hdr_and_data[8] = 9;
    hdr_and_data[16..].fill(0x5a);
    fx.mem
        .write_slice(&hdr_and_data, GuestAddress(DATA))
        .unwrap();
    fx.submit(&[Buf::readable(DATA, 16 + 512), Buf::writable(STATUS, 1)]);
    assert_eq!(fx.status(), BLK_S_OK);
    assert!(fx.file()[9 * 512..10 * 512].iter().all(|&b| b == 0x5a));
}

#[test]
fn flush_and_get_id() {
    let mut fx = ready_fx(false, Some("ember-disk-1"));
    fx.header(BLK_T_FLUSH, 0);
    let (_, len) = fx.submit(&[Buf::readable(HDR, 16), Buf::writable(STATUS, 1)]);
    assert_eq!((fx.status(), len), (BLK_S_OK, 1));
    assert_eq!(fx.counters.snapshot().flushes, 1);

    fx.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    fx.header(BLK_T_GET_ID, 0);
    let (_, len) = fx.submit(&[
        Buf::readable(HDR, 16),
        Buf::writable(DATA, 20),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!((fx.status(), len), (BLK_S_OK, 21));
    let mut id = [0u8; 20];
    fx.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..12], b"ember-disk-1");
    assert!(id[12..].iter().all(|&b| b == 0));
    assert_eq!(fx.counters.snapshot().get_id, 1);
}

#[test]
fn get_id_without_serial_and_unknown_types_are_unsupported() {
    let mut fx = ready_fx(false, None);
    fx.header(BLK_T_GET_ID, 0);
    fx.submit(&[
        Buf::readable(HDR, 16),
        Buf::writable(DATA, 20),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!(fx.status(), BLK_S_UNSUPP);
    for t in [2, 11, 13, 0xdead_beef] {
        fx.header(t, 0);
        let (_, len) = fx.submit(&[Buf::readable(HDR, 16), Buf::writable(STATUS, 1)]);
        assert_eq!((fx.status(), len), (BLK_S_UNSUPP, 1));
    }
    assert_eq!(fx.counters.snapshot().unsupported, 5);
    fx.assert_healthy();
}

#[test]
fn serial_longer_than_20_bytes_is_refused() {
    let img = image(4096);
    let open = |cfg| Block::<GuestRam>::new(cfg).unwrap_err();
    let err = open(BlockConfig {
        path: img.as_path().to_path_buf(),
        read_only: false,
        serial: Some("x".repeat(21)),
    });
    assert!(matches!(err, BlockError::SerialTooLong { len: 21 }));
    let err = open(BlockConfig {
        path: "/nonexistent/ember.img".into(),
        ..Default::default()
    });
    assert!(
        matches!(err, BlockError::Disk(DiskError::Open { .. })),
        "{err}"
    );
    let err = open(BlockConfig {
        path: "/tmp".into(),
        ..Default::default()
    });
    assert!(
        matches!(
            err,
            BlockError::Disk(DiskError::BadImage { .. } | DiskError::Open { .. })
        ),
        "{err}"
    );
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_the_file() {
    let mut fx = ready_fx(true, None);
    assert_ne!(
        fx.dev.acked_features() & (1 << 5),
        0,
        "RO offered and accepted"
    );
    let before = fx.file();
    fx.mem
        .write_slice(&[0x11; 512], GuestAddress(DATA))
        .unwrap();
    fx.header(BLK_T_OUT, 0);
    let (_, len) = fx.submit(&[
        Buf::readable(HDR, 16),
        Buf::readable(DATA, 512),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!((fx.status(), len), (BLK_S_IOERR, 1));
    assert_eq!(fx.file(), before);
    let c = fx.counters.snapshot();
    assert_eq!((c.read_only_rejected, c.writes), (1, 0));
    fx.header(BLK_T_FLUSH, 0);
    fx.submit(&[Buf::readable(HDR, 16), Buf::writable(STATUS, 1)]);
    assert_eq!(fx.status(), BLK_S_OK);
    fx.assert_healthy();
    assert_eq!(fx.file(), before);
}

#[test]
fn out_of_range_sectors_fail() {
    let mut fx = ready_fx(false, None);
    let cap = (DISK_LEN / 512) as u64;
    // The last sector is fine, one past it is not, nor a read straddling the end.
    assert_eq!(fx.read(cap - 1, 1).0, BLK_S_OK);
    assert_eq!(fx.read(cap, 1), (BLK_S_IOERR, 1));
    assert_eq!(fx.read(cap - 1, 2).0, BLK_S_IOERR);
    // Overflowing sector * 512 and sector * 512 + len.
    assert_eq!(fx.read(u64::MAX / 512 + 1, 1).0, BLK_S_IOERR);
    assert_eq!(fx.read(u64::MAX / 512, 1).0, BLK_S_IOERR);
    let before = fx.file();
    fx.header(BLK_T_OUT, cap);
    fx.submit(&[
        Buf::readable(HDR, 16),
        Buf::readable(DATA, 512),
        Buf::writable(STATUS, 1),
    ]);
    assert_eq!(fx.status(), BLK_S_IOERR);
    assert_eq!(fx.file(), before, "the file did not grow");
    assert_eq!(fx.counters.snapshot().out_of_range, 5);
    fx.assert_healthy();
}

#[test]
fn several_requests_one_interrupt() {
    let mut fx = ready_fx(false, None);
    for i in 0..3u64 {
        let hdr = HDR + 16 * i;
        testing::write_blk_header(&fx.mem, GuestAddress(hdr), BLK_T_IN, i).unwrap();
        fx.q.add_chain(&[
            Buf::readable(hdr, 16),
            Buf::writable(DATA + 512 * i, 512),
            Buf::writable(STATUS + i, 1),
        ])
        .unwrap();
    }
    fx.kick();
    for _ in 0..3 {
        assert_eq!(fx.q.pop_used().unwrap().1, 513);
    }
    assert_eq!(fx.irq.read().unwrap(), 1);
    let expect: Vec<u8> = (0..3 * 512).map(pattern).collect();
    assert_eq!(fx.data(3 * 512), expect);
}

#[test]
fn indirect_descriptors_work() {
    let mut fx = ready_fx(false, None);
    assert_ne!(fx.dev.acked_features() & VIRTIO_F_INDIRECT_DESC, 0);
    let table = 0xe000u64;
    fx.header(BLK_T_IN, 4);
    let entries = [
        (HDR, 16, testing::DESC_F_NEXT, 1),
        (DATA, 512, testing::DESC_F_NEXT | testing::DESC_F_WRITE, 2),
        (STATUS, 1, testing::DESC_F_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in entries.into_iter().enumerate() {
        testing::write_descriptor_at(
            &fx.mem,
            GuestAddress(table + 16 * i as u64),
            addr,
            len,
            flags,
            next,
        )
        .unwrap();
    }
    fx.q.write_descriptor(0, table, 48, testing::DESC_F_INDIRECT, 0)
        .unwrap();
    fx.q.publish(0).unwrap();
    fx.kick();
    assert_eq!(fx.q.pop_used(), Some((0, 513)));
    assert_eq!(fx.status(), BLK_S_OK);
    let expect: Vec<u8> = (4 * 512..5 * 512).map(pattern).collect();
    assert_eq!(fx.data(512), expect);
}

// ---------------------------------------------------------------------------------------------
// Hostile chains

/// A raw descriptor: (table index, addr, len, flags, next).
type RawDesc = (u16, u64, u32, u16, u16);

/// Publishes a raw chain starting at descriptor `head`, kicks, and returns the used element.
fn raw(fx: &mut Fx, descs: &[RawDesc], head: u16) -> (u32, u32) {
    for &(i, addr, len, flags, next) in descs {
        fx.q.write_descriptor(i, addr, len, flags, next).unwrap();
    }
    fx.q.publish(head).unwrap();
    fx.kick();
    fx.q.pop_used().expect("chain returned to the guest")
}

#[test]
fn hostile_chains_are_counted_and_never_stall_the_queue() {
    let mut fx = ready_fx(false, None);
    let before = fx.file();
    let (n, w) = (testing::DESC_F_NEXT, testing::DESC_F_WRITE);
    fx.header(BLK_T_IN, 0);
    fx.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();

    // A loop: 0 -> 1 -> 0 -> ...: dropped, length 0, nothing written.
    assert_eq!(
        raw(&mut fx, &[(0, HDR, 16, n, 1), (1, STATUS, 1, n | w, 0)], 0),
        (0, 0)
    );
    assert_eq!(fx.status(), 0xff);
    let c = fx.counters.snapshot();
    assert_eq!((c.malformed_chains, c.dropped_chains), (1, 1));

    // Next index outside the table.
    assert_eq!(raw(&mut fx, &[(0, HDR, 16, n, 999)], 0), (0, 0));
    // Missing status: the last descriptor is device-readable.
    assert_eq!(
        raw(&mut fx, &[(0, HDR, 16, n, 1), (1, DATA, 512, 0, 0)], 0),
        (0, 0)
    );
    // Status descriptor of length 0.
    assert_eq!(
        raw(&mut fx, &[(0, HDR, 16, n, 1), (1, STATUS, 0, w, 0)], 0),
        (0, 0)
    );
    // Status descriptor in the hole between the RAM regions / past the end of RAM / at 2^64-1.
    assert_eq!(
        raw(&mut fx, &[(0, HDR, 16, n, 1), (1, HOLE, 1, w, 0)], 0),
        (0, 0)
    );
    assert_eq!(
        raw(&mut fx, &[(0, HDR, 16, n, 1), (1, 0x30000, 1, w, 0)], 0),
        (0, 0)
    );
    assert_eq!(
        raw(&mut fx, &[(0, HDR, 16, n, 1), (1, u64::MAX, 1, w, 0)], 0),
        (0, 0)
    );
    // A head index outside the table: consumed and counted, not returnable.
    fx.q.publish(500).unwrap();
    fx.kick();
    assert_eq!(fx.q.pop_used(), None);
    let c = fx.counters.snapshot();
    assert_eq!((c.malformed_chains, c.dropped_chains), (8, 8));
    assert_eq!(fx.status(), 0xff);

    // Status usable, the rest broken: IOERR with used length 1.
    let cases: &[&[RawDesc]] = &[
        // Data buffer in the hole.
        &[
            (0, HDR, 16, n, 1),
            (1, HOLE - 256, 512, n | w, 2),
            (2, STATUS, 1, w, 0),
        ],
        // Data buffer far outside RAM.
        &[
            (0, HDR, 16, n, 1),
            (1, 1 << 40, 512, n | w, 2),
            (2, STATUS, 1, w, 0),
        ],
        // IN with device-readable data (wrong direction).
        &[
            (0, HDR, 16, n, 1),
            (1, DATA, 512, n, 2),
            (2, STATUS, 1, w, 0),
        ],
        // Header too short.
        &[(0, HDR, 8, n, 1), (1, STATUS, 1, w, 0)],
        // Data not a multiple of 512.
        &[
            (0, HDR, 16, n, 1),
            (1, DATA, 100, n | w, 2),
            (2, STATUS, 1, w, 0),
        ],
        // A readable descriptor after a writable one.
        &[
            (0, HDR, 16, n, 1),
            (1, DATA, 512, n | w, 2),
            (2, DATA, 16, n, 3),
            (3, STATUS, 1, w, 0),
        ],
        // Header outside RAM.
        &[(0, 1 << 40, 16, n, 1), (1, STATUS, 1, w, 0)],
    ];
    for (i, descs) in cases.iter().enumerate() {
        fx.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(raw(&mut fx, descs, 0), (0, 1), "case {i}");
        assert_eq!(fx.status(), BLK_S_IOERR, "case {i}");
    }
    // OUT with device-writable data (wrong direction): IOERR, file untouched.
    fx.header(BLK_T_OUT, 0);
    assert_eq!(
        raw(
            &mut fx,
            &[
                (0, HDR, 16, n, 1),
                (1, DATA, 512, n | w, 2),
                (2, STATUS, 1, w, 0)
            ],
            0
        ),
        (0, 1)
    );
    assert_eq!(fx.status(), BLK_S_IOERR);
    let c = fx.counters.snapshot();
    assert_eq!(c.malformed_chains, 8 + cases.len() as u64 + 1);
    assert_eq!(c.dropped_chains, 8);
    assert_eq!((c.reads, c.writes, c.io_errors), (0, 0, 0));
    assert_eq!(fx.file(), before);
    assert_eq!(fx.dev.counters().device_errors, 0);
    assert_eq!(fx.dev.status() & status::DEVICE_NEEDS_RESET, 0);
    fx.assert_healthy();
}

#[test]
fn chains_longer_than_the_queue_are_dropped() {
    // A 4-entry queue: a 5-descriptor chain can only exist by wrapping (0 1 2 3 0 ...).
    let mut fx = block_fx(false, None, 4);
    testing::driver_init(&mut fx.dev, &[&fx.q], None).unwrap();
    let (n, w) = (testing::DESC_F_NEXT, testing::DESC_F_WRITE);
    fx.header(BLK_T_IN, 0);
    let descs = [
        (0, HDR, 16, n, 1),
        (1, DATA, 512, n | w, 2),
        (2, DATA, 512, n | w, 3),
        (3, DATA, 512, n | w, 0),
    ];
    assert_eq!(raw(&mut fx, &descs, 0), (0, 0));
    assert_eq!(fx.counters.snapshot().dropped_chains, 1);
    // Nested indirect tables and an indirect table of a bad length are dropped too.
    let table = 0xe000u64;
    testing::write_descriptor_at(
        &fx.mem,
        GuestAddress(table),
        table,
        16,
        testing::DESC_F_INDIRECT,
        0,
    )
    .unwrap();
    assert_eq!(
        raw(&mut fx, &[(0, table, 16, testing::DESC_F_INDIRECT, 0)], 0),
        (0, 0)
    );
    assert_eq!(
        raw(&mut fx, &[(0, table, 17, testing::DESC_F_INDIRECT, 0)], 0),
        (0, 0)
    );
    assert_eq!(
        raw(&mut fx, &[(0, HOLE, 64, testing::DESC_F_INDIRECT, 0)], 0),
        (0, 0)
    );
    assert_eq!(fx.counters.snapshot().dropped_chains, 4);
    fx.assert_healthy();
}

#[test]
fn broken_avail_index_needs_reset_and_reinit_works() {
    let mut fx = ready_fx(false, None);
    // The driver claims 100 new buffers in a 16-entry queue.
    fx.q.set_avail_idx(100).unwrap();
    fx.kick();
    assert_eq!(fx.counters.snapshot().queue_errors, 1);
    assert_eq!(fx.dev.counters().device_errors, 1);
    let st = read_reg(&mut fx.dev, regs::STATUS);
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(
        read_reg(&mut fx.dev, regs::INTERRUPT_STATUS) & 2,
        0,
        "config interrupt"
    );
    // Further notifications are ignored until the reset.
    fx.kick();
    assert_eq!(fx.dev.counters().notifications_ignored, 1);
    // The guest resets and starts over with fresh rings.
    write_reg(&mut fx.dev, regs::STATUS, 0);
    assert_eq!(read_reg(&mut fx.dev, regs::STATUS), 0);
    assert_eq!(read_reg(&mut fx.dev, regs::INTERRUPT_STATUS), 0);
    assert!(!fx.dev.is_activated());
    fx.q = GuestQueue::new(&fx.mem, 16, GuestAddress(0)).unwrap();
    testing::driver_init(&mut fx.dev, &[&fx.q], None).unwrap();
    fx.assert_healthy();
    // driver_init resets first: two handshakes plus the explicit reset.
    assert_eq!(fx.dev.counters().resets, 3);
}

#[test]
fn several_disks_per_vm() {
    let mem = memory();
    let mut disks = Vec::new();
    for (i, base) in [(0u8, 0x0u64), (1, 0x4000)] {
        let img = TempFile::new().unwrap();
        std::fs::write(img.as_path(), vec![0x40 + i; 8192]).unwrap();
        let block = Block::new(BlockConfig {
            path: img.as_path().to_path_buf(),
            read_only: i == 1,
            serial: Some(format!("disk{i}")),
        })
        .unwrap();
        let mut dev =
            MmioTransport::new(Box::new(block), mem.clone(), EventFdTrigger::new().unwrap())
                .unwrap();
        let q = GuestQueue::new(&mem, 8, GuestAddress(base)).unwrap();
        testing::driver_init(&mut dev, &[&q], None).unwrap();
        disks.push((img, dev, q, base));
    }
    for (i, (_img, dev, q, base)) in disks.iter_mut().enumerate() {
        let (hdr, data, st) = (*base + 0x1000, *base + 0x2000, *base + 0x3000);
        testing::write_blk_header(&mem, GuestAddress(hdr), BLK_T_IN, 15).unwrap();
        q.add_chain(&[
            Buf::readable(hdr, 16),
            Buf::writable(data, 512),
            Buf::writable(st, 1),
        ])
        .unwrap();
        dev.process_notification(0);
        assert_eq!(q.pop_used(), Some((0, 513)));
        let mut buf = [0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(data)).unwrap();
        assert!(buf.iter().all(|&b| b == 0x40 + i as u8), "disk {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Transport state machine

#[test]
fn wide_odd_and_unknown_accesses_are_refused() {
    let mut fx = block_fx(false, None, 16);
    let bad = |fx: &Fx| fx.dev.counters().bad_accesses;
    let mut b2 = [0u8; 2];
    fx.dev.read(regs::MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0xff; 2]);
    let mut b8 = [0u8; 8];
    fx.dev.read(regs::MAGIC_VALUE, &mut b8);
    assert_eq!(b8, [0xff; 8]);
    let mut b4 = [0u8; 4];
    fx.dev.read(regs::MAGIC_VALUE + 2, &mut b4);
    assert_eq!(b4, [0xff; 4]);
    fx.dev.read(0x0f8, &mut b4); // nothing there
    fx.dev.read(regs::QUEUE_NUM, &mut b4); // write-only
    fx.dev.read(0x1000, &mut b4); // past the window
    fx.dev.read(0xffe, &mut b4); // straddles the end of the window
    fx.dev.read(0x100, &mut []); // empty
    let mut b16 = [0u8; 16];
    fx.dev.read(0x100, &mut b16); // too wide
    assert_eq!(bad(&fx), 9);
    fx.dev.write(regs::STATUS, &[1]);
    fx.dev.write(regs::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    fx.dev.write(regs::STATUS + 1, &[1, 0, 0, 0]);
    write_reg(&mut fx.dev, regs::MAGIC_VALUE, 0); // read-only
    write_reg(&mut fx.dev, 0x0f0, 1);
    fx.dev.write(u64::MAX - 1, &[1]);
    assert_eq!(bad(&fx), 15);
    assert_eq!(fx.dev.status(), 0);
    // Still a working device.
    testing::driver_init(&mut fx.dev, &[&fx.q], None).unwrap();
    fx.assert_healthy();
}

#[test]
fn config_space_is_read_only_and_bounded() {
    let mut fx = block_fx(false, None, 16);
    write_reg(&mut fx.dev, CONFIG_SPACE_OFFSET, 0x1234);
    fx.dev.write(CONFIG_SPACE_OFFSET + 0x200, &[1, 2]);
    assert_eq!(fx.counters.snapshot().config_writes_ignored, 2);
    assert_eq!(
        read_reg(&mut fx.dev, CONFIG_SPACE_OFFSET),
        (DISK_LEN / 512) as u32
    );
    // Beyond the implemented structure: zeros. The last byte of the window is reachable.
    assert_eq!(read_reg(&mut fx.dev, CONFIG_SPACE_OFFSET + 0x40), 0);
    let mut b = [0xaau8; 1];
    fx.dev.read(0xfff, &mut b);
    assert_eq!(b, [0]);
    assert_eq!(fx.dev.counters().bad_accesses, 0);
}

#[test]
fn status_transitions_must_follow_the_spec() {
    let mut fx = block_fx(false, None, 16);
    let inv = |fx: &Fx| fx.dev.counters().invalid_status_transitions;
    // Straight to DRIVER_OK, or FEATURES_OK without DRIVER.
    write_reg(&mut fx.dev, regs::STATUS, status::DRIVER_OK);
    write_reg(
        &mut fx.dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::FEATURES_OK,
    );
    assert_eq!((inv(&fx), fx.dev.status()), (2, 0));
    write_reg(&mut fx.dev, regs::STATUS, status::ACKNOWLEDGE);
    write_reg(&mut fx.dev, regs::STATUS, status::ACKNOWLEDGE); // idempotent
    write_reg(
        &mut fx.dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    // Clearing a bit (not a reset).
    write_reg(&mut fx.dev, regs::STATUS, status::DRIVER);
    assert_eq!(inv(&fx), 3);
    assert_eq!(fx.dev.status(), status::ACKNOWLEDGE | status::DRIVER);
    // FAILED sticks; nothing but a reset gets out of it.
    write_reg(
        &mut fx.dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_ne!(fx.dev.status() & status::FAILED, 0);
    write_reg(
        &mut fx.dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(inv(&fx), 4);
    write_reg(&mut fx.dev, regs::STATUS, 0);
    assert_eq!(fx.dev.status(), 0);
    testing::driver_init(&mut fx.dev, &[&fx.q], None).unwrap();
    fx.assert_healthy();
}

#[test]
fn feature_negotiation_is_checked() {
    let mut fx = block_fx(false, None, 16);
    let dev = &mut fx.dev;
    // Features before DRIVER: ignored.
    write_reg(dev, regs::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(dev.counters().invalid_state_writes, 1);
    write_reg(dev, regs::STATUS, status::ACKNOWLEDGE);
    write_reg(dev, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    // A feature the device does not offer: FEATURES_OK refused.
    testing::write_driver_features(dev, VIRTIO_F_VERSION_1 | 1 << 60);
    let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write_reg(dev, regs::STATUS, fok);
    assert_eq!(read_reg(dev, regs::STATUS) & status::FEATURES_OK, 0);
    // Without VERSION_1: refused as well.
    testing::write_driver_features(dev, 1 << 9);
    write_reg(dev, regs::STATUS, fok);
    assert_eq!(read_reg(dev, regs::STATUS) & status::FEATURES_OK, 0);
    assert_eq!(dev.counters().features_rejected, 2);
    // Feature bits above 63 must be zero.
    write_reg(dev, regs::DRIVER_FEATURES_SEL, 2);
    write_reg(dev, regs::DRIVER_FEATURES, 1);
    assert_eq!(dev.counters().invalid_state_writes, 2);
    // A proper set.
    testing::write_driver_features(dev, VIRTIO_F_VERSION_1 | 1 << 9);
    write_reg(dev, regs::STATUS, fok);
    assert_eq!(read_reg(dev, regs::STATUS), fok);
    // Features after FEATURES_OK: ignored.
    testing::write_driver_features(dev, VIRTIO_F_VERSION_1);
    assert_eq!(dev.counters().invalid_state_writes, 4);
    assert_eq!(dev.acked_features(), VIRTIO_F_VERSION_1 | 1 << 9);
    // Feature select beyond 1 reads 0.
    write_reg(dev, regs::DEVICE_FEATURES_SEL, 7);
    assert_eq!(read_reg(dev, regs::DEVICE_FEATURES), 0);
}

#[test]
fn queue_setup_in_the_wrong_state_or_with_bogus_values() {
    let mut fx = block_fx(false, None, 16);
    let q = &fx.q;
    let dev = &mut fx.dev;
    // Queue ready before feature negotiation: ignored.
    write_reg(dev, regs::QUEUE_SEL, 0);
    write_reg(dev, regs::QUEUE_NUM, 16);
    write_reg(dev, regs::QUEUE_READY, 1);
    assert_eq!(read_reg(dev, regs::QUEUE_READY), 0);
    assert_eq!(dev.counters().invalid_state_writes, 2);
    // Disabling a queue is always harmless before DRIVER_OK.
    write_reg(dev, regs::QUEUE_READY, 0);
    assert_eq!(dev.counters().invalid_state_writes, 2);
    // Notify before DRIVER_OK: the eventfd fires, the event loop ignores it.
    write_reg(dev, QUEUE_NOTIFY_OFFSET, 0);
    dev.process_notification(0);
    assert_eq!(dev.counters().notifications_ignored, 1);
    // Notify of a queue that does not exist.
    write_reg(dev, QUEUE_NOTIFY_OFFSET, 5);
    dev.process_notification(5);
    assert_eq!(dev.counters().bad_notifications, 2);

    write_reg(dev, regs::STATUS, status::ACKNOWLEDGE);
    write_reg(dev, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    testing::write_driver_features(dev, VIRTIO_F_VERSION_1);
    let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write_reg(dev, regs::STATUS, fok);
    // A queue that does not exist.
    write_reg(dev, regs::QUEUE_SEL, 3);
    assert_eq!(read_reg(dev, regs::QUEUE_NUM_MAX), 0);
    write_reg(dev, regs::QUEUE_NUM, 16);
    assert_eq!(dev.counters().invalid_queue_values, 1);
    // Bogus sizes.
    write_reg(dev, regs::QUEUE_SEL, 0);
    for bad in [0, 3, 512, 1 << 20] {
        write_reg(dev, regs::QUEUE_NUM, bad);
    }
    assert_eq!(dev.counters().invalid_queue_values, 5);
    // Activation with the last bogus size fails: DEVICE_NEEDS_RESET.
    write_reg(dev, regs::QUEUE_DESC_LOW, q.desc_table() as u32);
    write_reg(dev, regs::QUEUE_DRIVER_LOW, q.avail_ring() as u32);
    write_reg(dev, regs::QUEUE_DEVICE_LOW, q.used_ring() as u32);
    write_reg(dev, regs::QUEUE_READY, 1);
    write_reg(dev, regs::QUEUE_NUM, 16); // changing a ready queue: ignored
    assert_eq!(dev.counters().invalid_state_writes, 3);
    write_reg(dev, regs::STATUS, fok | status::DRIVER_OK);
    assert!(!dev.is_activated());
    assert_ne!(dev.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(dev.counters().activation_failures, 1);
    // Status writes other than reset are now refused.
    write_reg(
        dev,
        regs::STATUS,
        fok | status::DRIVER_OK | status::DEVICE_NEEDS_RESET,
    );
    assert!(!dev.is_activated());
    write_reg(dev, regs::STATUS, 0);
    testing::driver_init(dev, &[q], None).unwrap();
    // Queue setup after DRIVER_OK: ignored.
    write_reg(dev, regs::QUEUE_DESC_LOW, 0x8000);
    write_reg(dev, regs::QUEUE_READY, 0);
    assert_eq!(read_reg(dev, regs::QUEUE_READY), 1);
    fx.assert_healthy();
}

#[test]
fn queues_outside_memory_or_misaligned_fail_activation() {
    // (desc, avail, used)
    let layouts = [
        (HOLE, 0x1000, 0x2000),      // descriptor table in the hole
        (0x0, 0x1000, 0x30000 - 8),  // used ring runs past the end of RAM
        (0x0, 0x1000, u64::MAX - 3), // used ring at the top of the address space
        (0x8, 0x1000, 0x2000),       // descriptor table not 16-byte aligned
        (0x0, 0x1001, 0x2000),       // avail ring not 2-byte aligned
        (0x0, 0x1000, 0x2002),       // used ring not 4-byte aligned
    ];
    for (i, (desc, avail, used)) in layouts.into_iter().enumerate() {
        let mut fx = block_fx(false, None, 16);
        let dev = &mut fx.dev;
        write_reg(dev, regs::STATUS, status::ACKNOWLEDGE);
        write_reg(dev, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        testing::write_driver_features(dev, VIRTIO_F_VERSION_1);
        let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write_reg(dev, regs::STATUS, fok);
        write_reg(dev, regs::QUEUE_NUM, 16);
        for (reg, addr) in [
            (regs::QUEUE_DESC_LOW, desc),
            (regs::QUEUE_DRIVER_LOW, avail),
            (regs::QUEUE_DEVICE_LOW, used),
        ] {
            write_reg(dev, reg, addr as u32);
            write_reg(dev, reg + 4, (addr >> 32) as u32);
        }
        write_reg(dev, regs::QUEUE_READY, 1);
        write_reg(dev, regs::STATUS, fok | status::DRIVER_OK);
        assert!(!dev.is_activated(), "layout {i}");
        assert_eq!(dev.counters().activation_failures, 1, "layout {i}");
        assert_ne!(dev.status() & status::DEVICE_NEEDS_RESET, 0);
    }
    // No queue enabled at all.
    let mut fx = block_fx(false, None, 16);
    testing::driver_init(&mut fx.dev, &[], None).unwrap_err();
    assert_eq!(fx.dev.counters().activation_failures, 1);
}

#[test]
fn reset_clears_everything() {
    let mut fx = ready_fx(false, None);
    fx.read(1, 1);
    assert_eq!(read_reg(&mut fx.dev, regs::INTERRUPT_STATUS), 1);
    write_reg(&mut fx.dev, QUEUE_NOTIFY_OFFSET, 0); // pending notification
    write_reg(&mut fx.dev, regs::STATUS, 0);
    assert_eq!(read_reg(&mut fx.dev, regs::STATUS), 0);
    assert_eq!(read_reg(&mut fx.dev, regs::INTERRUPT_STATUS), 0);
    assert_eq!(read_reg(&mut fx.dev, regs::QUEUE_READY), 0);
    assert!(fx.dev.queue_notify_evts()[0].read().is_err(), "drained");
    assert_eq!(fx.dev.acked_features(), 0);
    fx.dev.process_notification(0);
    assert_eq!(fx.dev.counters().notifications_ignored, 1);
    // Old requests are not processed after the reset.
    assert_eq!(fx.counters.snapshot().reads, 1);
}

/// A device with two queues, to check queue selection and partial enabling.
struct TwoQueues {
    sizes: [u16; 2],
    activated: Option<Vec<bool>>,
    processed: Vec<usize>,
}

impl VirtioDevice for TwoQueues {
    fn device_type(&self) -> u32 {
        0x1234
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestRam,
        _acked: u64,
        queues: Vec<virtio_queue::Queue>,
        _interrupt: std::sync::Arc<dyn VirtioInterrupt>,
    ) -> Result<(), Error> {
        use virtio_queue::QueueT;
        self.activated = Some(queues.iter().map(|q| q.ready()).collect());
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<(), Error> {
        self.processed.push(index);
        Err(Error::InvalidQueue(index))
    }
    fn reset(&mut self) {
        self.activated = None;
    }
}

#[test]
fn only_enabled_queues_are_ready_and_device_errors_are_counted() {
    let mem = memory();
    let dev = TwoQueues {
        sizes: [8, 4],
        activated: None,
        processed: Vec::new(),
    };
    let mut t =
        MmioTransport::new(Box::new(dev), mem.clone(), EventFdTrigger::new().unwrap()).unwrap();
    assert_eq!(t.queue_notify_evts().len(), 2);
    write_reg(&mut t, regs::QUEUE_SEL, 1);
    assert_eq!(read_reg(&mut t, regs::QUEUE_NUM_MAX), 4);
    let q = GuestQueue::new(&mem, 4, GuestAddress(0x4000)).unwrap();
    write_reg(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    write_reg(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    testing::write_driver_features(&mut t, VIRTIO_F_VERSION_1);
    let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write_reg(&mut t, regs::STATUS, fok);
    testing::setup_queue(&mut t, 1, &q).unwrap();
    write_reg(&mut t, regs::STATUS, fok | status::DRIVER_OK);
    assert!(t.is_activated());
    t.process_notification(1);
    assert_eq!(t.counters().device_errors, 1);
    // A non-fatal device error does not ask for a reset.
    assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    let mut b = [0u8; 2];
    t.read(CONFIG_SPACE_OFFSET + 3, &mut b);
    assert_eq!(b, [0x5a; 2]);
    assert!(format!("{t:?}").contains("MmioTransport"));
}

#[test]
fn invalid_queue_max_sizes_are_refused() {
    for sizes in [vec![], vec![0u16], vec![3], vec![16, 100]] {
        let dev = TwoQueues {
            sizes: [0, 0],
            activated: None,
            processed: Vec::new(),
        };
        struct Sizes(TwoQueues, Vec<u16>);
        impl VirtioDevice for Sizes {
            fn device_type(&self) -> u32 {
                self.0.device_type()
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &self.1
            }
            fn features(&self) -> u64 {
                self.0.features()
            }
            fn read_config(&self, o: u64, d: &mut [u8]) {
                self.0.read_config(o, d)
            }
            fn write_config(&mut self, o: u64, d: &[u8]) {
                self.0.write_config(o, d)
            }
            fn activate(
                &mut self,
                m: GuestRam,
                a: u64,
                q: Vec<virtio_queue::Queue>,
                i: std::sync::Arc<dyn VirtioInterrupt>,
            ) -> Result<(), Error> {
                self.0.activate(m, a, q, i)
            }
            fn process_queue(&mut self, i: usize) -> Result<(), Error> {
                self.0.process_queue(i)
            }
            fn reset(&mut self) {
                self.0.reset()
            }
        }
        let r = MmioTransport::new(
            Box::new(Sizes(dev, sizes.clone())),
            memory(),
            EventFdTrigger::new().unwrap(),
        );
        assert!(r.is_err(), "{sizes:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// State

/// A transport saved with a request published but not yet processed, restored into a fresh
/// transport over a fresh device on a copy of the image and the same memory: the driver's next notify
/// completes that request there, and the queue positions carry on.
#[test]
fn transport_state_round_trips_with_a_request_in_the_ring() {
    let mut fx = ready_fx(false, Some("disk-a"));
    assert_eq!(fx.read(3, 1).0, BLK_S_OK);
    // Published, not yet seen by the device.
    fx.header(BLK_T_IN, 5);
    fx.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let head =
        fx.q.add_chain(&[
            Buf::readable(HDR, 16),
            Buf::writable(DATA, 512),
            Buf::writable(STATUS, 1),
        ])
        .unwrap();
    let saved = fx.dev.state().unwrap();
    assert!(saved.activated);
    assert_eq!(saved.queues[0].next_avail, 1);
    assert_eq!(saved.queues[0].next_used, 1);

    // A copy of the image: the old device still holds the original's write lock.
    let copy = vmm_sys_util::tempfile::TempFile::new().unwrap();
    std::fs::copy(fx.img.as_path(), copy.as_path()).unwrap();
    let block = Block::new(BlockConfig {
        path: copy.as_path().to_path_buf(),
        read_only: false,
        serial: Some("disk-a".into()),
    })
    .unwrap();
    let counters = block.counters_handle();
    let irq = EventFdTrigger::new().unwrap();
    let mut fresh =
        MmioTransport::new(Box::new(block), fx.mem.clone(), irq.try_clone().unwrap()).unwrap();
    fresh.restore(&saved).unwrap();
    assert!(fresh.is_activated());
    assert_eq!(fresh.status(), saved.status);
    assert_eq!(fresh.acked_features(), saved.acked_features);
    // The driver's notify, handled by the restored transport.
    write_reg(&mut fresh, QUEUE_NOTIFY_OFFSET, 0);
    fresh.process_notification(0);
    assert_eq!(fx.q.pop_used(), Some((u32::from(head), 513)));
    assert_eq!(fx.status(), BLK_S_OK);
    let expect: Vec<u8> = (5 * 512..6 * 512).map(pattern).collect();
    assert_eq!(fx.data(512), expect);
    assert_eq!(counters.snapshot().reads, 1);
    // The saved InterruptStatus still had the first read's bit (never acknowledged): the
    // restore raised it again, then the new completion.
    assert_eq!(saved.interrupt_status, interrupt_status::USED_BUFFER);
    assert_eq!(irq.read().unwrap(), 2);
    assert_eq!(fresh.state().unwrap().queues[0].next_used, 2);

    // A state from another device type is refused; one restored over a transport in use
    // replaces what it was doing.
    let mut other = saved.clone();
    other.device_type = 1;
    assert!(matches!(
        block_fx(false, None, 16).dev.restore(&other),
        Err(Error::InvalidState(_))
    ));
    fresh.restore(&saved).unwrap();
    assert_eq!(fresh.state().unwrap().queues[0].next_used, 1);
    // Rings outside guest memory are refused.
    let mut outside = saved.clone();
    outside.queues[0].desc_table = 0x7fff_0000_0000;
    assert!(block_fx(false, None, 16).dev.restore(&outside).is_err());
}

/// A transport saved before DRIVER_OK keeps the driver's registers.
#[test]
fn transport_state_before_activation() {
    let mut fx = block_fx(false, None, 16);
    write_reg(
        &mut fx.dev,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    write_reg(&mut fx.dev, regs::QUEUE_SEL, 0);
    let saved = fx.dev.state().unwrap();
    assert!(!saved.activated && saved.queues.is_empty());
    let mut fresh = block_fx(false, None, 16);
    fresh.dev.restore(&saved).unwrap();
    assert_eq!(fresh.dev.status(), status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(fresh.dev.state().unwrap(), saved);
}

#[test]
fn a_running_disk_takes_a_new_image_and_the_guest_hears_of_it() {
    let mem = memory();
    let first = image(DISK_LEN);
    let block = Block::new(BlockConfig {
        path: first.as_path().to_path_buf(),
        read_only: false,
        serial: None,
    })
    .unwrap();
    let control = block.control();
    let counters = block.counters_handle();
    let irq = EventFdTrigger::new().unwrap();
    let dev = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone().unwrap()).unwrap();
    let q = GuestQueue::new(&mem, 16, GuestAddress(0)).unwrap();
    let mut fx = Fx {
        mem,
        dev,
        q,
        img: first,
        counters,
        irq,
    };
    testing::driver_init(&mut fx.dev, &[&fx.q], None).unwrap();
    // A second image, twice as large, all 0x77.
    let second = TempFile::new().unwrap();
    std::fs::write(second.as_path(), vec![0x77u8; 2 * DISK_LEN]).unwrap();
    let disk = super::block::FileDisk::open(second.as_path(), false).unwrap();
    control
        .send(super::block::BlockCommand::ReplaceDisk(disk))
        .unwrap();
    let _ = fx.irq.read();
    // Host descriptors: the rate limiter's timer, then the control mailbox.
    fx.dev.process_host_event(1);
    let mut cap = [0u8; 8];
    fx.dev.read(CONFIG_SPACE_OFFSET, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (2 * DISK_LEN / 512) as u64);
    assert_eq!(
        read_reg(&mut fx.dev, regs::INTERRUPT_STATUS) & 2,
        2,
        "config change"
    );
    assert_eq!(fx.irq.read().unwrap(), 1);
    let (st, _) = fx.read(3000, 1);
    assert_eq!(st, BLK_S_OK, "a sector only the new image has");
    assert!(fx.data(512).iter().all(|&b| b == 0x77));
    assert_eq!(fx.counters.snapshot().disk_replacements, 1);
}
