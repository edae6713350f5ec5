//! Input decoders and invariant checks for the virtio fuzz targets (`fuzz/fuzz_targets/
//! virtio_blk.rs` and `virtio_mmio.rs`), also run on pseudo-random inputs by the unit tests.
//!
//! Both harnesses use the same guest memory: two 64 KiB RAM regions, `[0, 0x10000)` and
//! `[0x20000, 0x30000)`, with a hole between them (buffers crossing or landing in the hole
//! must be refused), and a 64 KiB read-write (or read-only) image in an unlinked temporary file
//! (reused by the runs of one thread and restored after every run that wrote to it).
//!
//! A target only calls [`run_blk`] or [`run_mmio`] and asserts that
//! [`FuzzStats::violations`] is 0:
//!
//! ```ignore
//! #![no_main]
//! libfuzzer_sys::fuzz_target!(|data: &[u8]| {
//!     let stats = ember_devices::virtio::fuzz::run_blk(data).expect("fixture");
//!     assert_eq!(stats.violations, 0, "{stats:?}");
//! });
//! ```
//!
//! # `run_blk` input
//!
//! * byte 0: bit 0 = read-only disk, bit 1 = serial set, bits 2..=5 = queue size `1 << (n % 9)`;
//! * bytes 1..3: available ring index (`u16` LE; below 0x8000 it is folded to
//!   `0..=queue size`, above it is used raw, which exercises the "index jumped" check);
//! * one 16-byte descriptor per queue entry (`addr: u64, len: u32, flags: u16, next: u16`, LE).
//!   An address below 2^63 is folded into `[0x2000, 0x30000)` (RAM, hole and second region), a
//!   length below 2^31 into `0..0x4000`, a `next` below 0x8000 into the table; larger values are
//!   used raw;
//! * one `u16` head index per available ring slot (folded into the table below 0x8000);
//! * the rest is copied into guest memory from 0x2000 (request headers, indirect tables).
//!
//! The queue is activated directly on a [`Block`] and processed twice. Invariants: no panic;
//! `process_queue` fails only with [`Error::QueueBroken`]; the image keeps its length (and its
//! contents when read-only); the used index never passes the available index; every used
//! element names a head inside the table and a length of at most the disk size plus the
//! status byte.
//!
//! # `run_mmio` input
//!
//! A sequence of operations, each a control byte (bits 0..=2 select the operation, bits 3..=7
//! are its argument `a`) and operands:
//!
//! * 0: read `a % 16` bytes at offset `u16 % 0x1100`;
//! * 1: write `a % 16` bytes (following) at offset `u16 % 0x1100`;
//! * 2: 32-bit register write at `(byte * 4) % 0x1000` of a `u32` value;
//! * 3: the VMM event loop handles queue `a % 4`'s notification;
//! * 4: the guest's handshake up to FEATURES_OK (features masked by a `u64` operand);
//! * 5: queue 0 setup at 0x0 with size `1 << (a % 9)` and DRIVER_OK;
//! * 6: a valid request (type `a % 16`, sector from one byte) published on that queue;
//! * 7: write up to 32 bytes (length byte, then data) into guest memory at `u16`.
//!
//! Invariants after every operation: no panic; MagicValue/Version read back right; the
//! interrupt status has no bits beyond used-buffer and config-change; an activated transport
//! has DRIVER_OK set; the image keeps its length.
#![allow(
    clippy::cast_possible_truncation,
    reason = "fuzz fixtures: guest addresses, sizes and register offsets are small, known values"
)]

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use virtio_queue::{Queue, QueueT};

use super::block::{Block, BlockConfig, QUEUE_SIZE};
use super::testing::{self, Buf, GuestQueue};
use super::{
    regs, status, Error, GuestRam, MmioInterrupt, MmioTransport, VirtioDevice, MMIO_MAGIC,
};
use crate::{BusDevice, EventFdTrigger};

/// Guest RAM regions of the harnesses.
pub const RAM: [(GuestAddress, usize); 2] =
    [(GuestAddress(0), 0x10000), (GuestAddress(0x20000), 0x10000)];
/// Size of the image file.
pub const DISK_LEN: u64 = 64 << 10;
/// Where `run_blk` puts the descriptor table.
const DESC: u64 = 0x0;
/// Where `run_blk` puts the available ring.
const AVAIL: u64 = 0x1000;
/// Where `run_blk` puts the used ring.
const USED: u64 = 0x1400;
/// Start of the data area.
const DATA: u64 = 0x2000;

/// Outcome of a harness run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FuzzStats {
    /// Operations performed (`run_mmio`) or chains put in the used ring (`run_blk`).
    pub ops: u64,
    /// Requests the device completed successfully.
    pub ok_requests: u64,
    /// Invariant violations (must be 0).
    pub violations: u64,
}

/// Why a harness could not set itself up (never the input's fault).
pub type FixtureError = Box<dyn std::error::Error + Send + Sync>;

fn memory() -> Result<GuestRam, FixtureError> {
    Ok(ember_memory::ram_from_ranges(
        &RAM,
        ember_memory::DirtyBitmap::Off,
    )?)
}

/// The image contents every run starts from.
fn pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| (0..DISK_LEN).map(|i| (i % 251) as u8).collect())
}

thread_local! {
    /// One image per thread, reused across runs (restored when a run changed it). The file is
    /// unlinked at once and reached through `/proc/self/fd`, so nothing is left behind however
    /// the process ends.
    static IMAGE: RefCell<Option<File>> = const { RefCell::new(None) };
}

/// The path of this thread's image, with the pattern contents.
fn image() -> Result<(PathBuf, File), FixtureError> {
    IMAGE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let tmp = TempFile::new()?;
            let file = tmp.into_file();
            file.write_all_at(pattern(), 0)?;
            *slot = Some(file);
        }
        let file = slot.as_ref().ok_or("no image")?.try_clone()?;
        Ok((format!("/proc/self/fd/{}", file.as_raw_fd()).into(), file))
    })
}

/// Whether the image still has the pattern contents (`full`) or at least its length.
fn image_intact(file: &File, full: bool) -> bool {
    if file.metadata().map(|m| m.len()).ok() != Some(DISK_LEN) {
        return false;
    }
    if !full {
        return true;
    }
    let mut buf = vec![0u8; DISK_LEN as usize];
    file.read_exact_at(&mut buf, 0).is_ok() && buf == pattern()
}

/// Puts the pattern back (after a run that wrote to the image).
fn restore_image(file: &File) {
    let _ = file.set_len(DISK_LEN);
    let _ = file.write_all_at(pattern(), 0);
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
}

/// Runs one `virtio_blk` fuzz input (format in the module docs).
pub fn run_blk(input: &[u8]) -> Result<FuzzStats, FixtureError> {
    let mut fx = blk_fixture(input)?;
    Ok(drive_blk(&mut fx))
}

/// A `run_blk` input laid out in guest memory and an activated [`Block`] on the harness's
/// image: [`blk_fixture`] does the set-up (the guest's writes, the image, activation) and
/// [`drive_blk`] the device's work, so that the two can run on different threads (the fuzz
/// target drives under the seccomp filter of the thread that runs devices).
pub struct BlkFixture {
    mem: GuestRam,
    block: Block<GuestRam>,
    counters: super::block::BlockCountersHandle,
    img: File,
    size: u16,
    avail_idx: u16,
    read_only: bool,
}

impl std::fmt::Debug for BlkFixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkFixture")
            .field("size", &self.size)
            .field("avail_idx", &self.avail_idx)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Lays out one `run_blk` input (format in the module docs) and activates the device on it.
pub fn blk_fixture(input: &[u8]) -> Result<BlkFixture, FixtureError> {
    let mut c = Cursor(input);
    let flags = c.u8();
    let read_only = flags & 1 != 0;
    let size: u16 = 1 << ((flags >> 2) % 9);
    let raw_idx = c.u16();
    let avail_idx = if raw_idx < 0x8000 {
        raw_idx % (size + 1)
    } else {
        raw_idx
    };

    let mem = memory()?;
    let span = RAM[1].0 .0 + RAM[1].1 as u64 - DATA;
    for i in 0..size {
        let addr = c.u64();
        let len = c.u32();
        let dflags = c.u16();
        let next = c.u16();
        let addr = if addr >> 63 == 0 {
            DATA + addr % span
        } else {
            addr
        };
        let len = if len >> 31 == 0 { len % 0x4000 } else { len };
        let next = if next < 0x8000 { next % size } else { next };
        testing::write_descriptor_at(
            &mem,
            GuestAddress(DESC + 16 * u64::from(i)),
            addr,
            len,
            dflags,
            next,
        )?;
    }
    for i in 0..size {
        let head = c.u16();
        let head = if head < 0x8000 { head % size } else { head };
        let _ = mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(i)));
    }
    let _ = mem.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2));
    let rest = c.take(0xe000);
    let _ = mem.write_slice(rest, GuestAddress(DATA));

    let (path, img) = image()?;
    let mut block: Block<GuestRam> = Block::new(BlockConfig {
        path,
        read_only,
        serial: (flags & 2 != 0).then(|| "fuzz-serial".to_string()),
    })?;
    let counters = block.counters_handle();
    let mut queue = Queue::new(QUEUE_SIZE)?;
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let irq = EventFdTrigger::new()?;
    block.activate(
        mem.clone(),
        block.features(),
        vec![queue],
        std::sync::Arc::new(MmioInterrupt::new(irq)),
    )?;
    Ok(BlkFixture {
        mem,
        block,
        counters,
        img,
        size,
        avail_idx,
        read_only,
    })
}

/// Has the device process the queue [`blk_fixture`] laid out (twice) and checks what it did.
pub fn drive_blk(fx: &mut BlkFixture) -> FuzzStats {
    let BlkFixture {
        mem,
        block,
        counters,
        img,
        size,
        avail_idx,
        read_only,
    } = fx;
    let (mem, size, avail_idx, read_only) = (&*mem, *size, *avail_idx, *read_only);
    let mut stats = FuzzStats::default();
    for _ in 0..2 {
        match block.process_queue(0) {
            Ok(()) | Err(Error::QueueBroken { .. }) => {}
            Err(_) => stats.violations += 1,
        }
    }

    let used_idx = mem
        .read_obj::<u16>(GuestAddress(USED + 2))
        .map(u16::from_le)
        .unwrap_or(u16::MAX);
    stats.ops = u64::from(used_idx);
    if used_idx > avail_idx || used_idx > size {
        stats.violations += 1;
    }
    for i in 0..used_idx.min(size) {
        let at = USED + 4 + 8 * u64::from(i);
        let id = mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(u32::MAX);
        let len = mem
            .read_obj::<u32>(GuestAddress(at + 4))
            .unwrap_or(u32::MAX);
        // The most a request can write: a read of the whole disk plus the status byte.
        if id >= u32::from(size) || u64::from(len) > DISK_LEN + 1 {
            stats.violations += 1;
        }
    }
    let c = counters.snapshot();
    stats.ok_requests = c.reads + c.writes + c.flushes + c.get_id;
    if !image_intact(img, read_only) {
        stats.violations += 1;
    }
    if read_only && (c.writes != 0 || c.write_bytes != 0) {
        stats.violations += 1;
    }
    if c.writes != 0 || stats.violations != 0 {
        restore_image(img);
    }
    stats
}

/// The `run_mmio` fixture: a transport over a [`Block`] on the harness's image, made by
/// [`mmio_fixture`] and driven by [`drive_mmio`] (on another thread if need be).
pub struct MmioFixture {
    mem: GuestRam,
    dev: MmioTransport,
    img: File,
    queue: Option<GuestQueue>,
}

impl std::fmt::Debug for MmioFixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioFixture").finish_non_exhaustive()
    }
}

/// Sets up an [`MmioFixture`].
pub fn mmio_fixture() -> Result<MmioFixture, FixtureError> {
    let mem = memory()?;
    let (path, img) = image()?;
    let block: Block<GuestRam> = Block::new(BlockConfig {
        path,
        read_only: false,
        serial: Some("mmio".into()),
    })?;
    let dev = MmioTransport::new(Box::new(block), mem.clone(), EventFdTrigger::new()?)?;
    Ok(MmioFixture {
        mem,
        dev,
        img,
        queue: None,
    })
}

/// Runs one `virtio_mmio` fuzz input (format in the module docs).
pub fn run_mmio(input: &[u8]) -> Result<FuzzStats, FixtureError> {
    let mut fx = mmio_fixture()?;
    Ok(drive_mmio(&mut fx, input))
}

/// Runs one `virtio_mmio` input (format in the module docs) against `fx`.
pub fn drive_mmio(fx: &mut MmioFixture, input: &[u8]) -> FuzzStats {
    let mut stats = FuzzStats::default();
    let mut c = Cursor(input);
    while !c.0.is_empty() {
        let ctl = c.u8();
        let a = ctl >> 3;
        stats.ops += 1;
        match ctl & 7 {
            0 => {
                let off = u64::from(c.u16() % 0x1100);
                let mut buf = [0u8; 16];
                fx.dev.read(off, &mut buf[..usize::from(a % 16)]);
            }
            1 => {
                let off = u64::from(c.u16() % 0x1100);
                let data = c.take(usize::from(a % 16)).to_vec();
                fx.dev.write(off, &data);
            }
            2 => {
                let off = (u64::from(c.u8()) * 4) % 0x1000;
                let v = c.u32();
                testing::write_reg(&mut fx.dev, off, v);
            }
            3 => fx.dev.process_notification(usize::from(a % 4)),
            4 => {
                let mask = c.u64();
                let dev = &mut fx.dev;
                testing::write_reg(dev, regs::STATUS, 0);
                testing::write_reg(dev, regs::STATUS, status::ACKNOWLEDGE);
                testing::write_reg(dev, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
                let offered = testing::read_device_features(dev);
                testing::write_driver_features(dev, offered & !mask);
                testing::write_reg(
                    dev,
                    regs::STATUS,
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
                );
            }
            5 => {
                let size = 1u16 << (a % 9);
                if let Ok(q) = GuestQueue::new(&fx.mem, size, GuestAddress(0)) {
                    let _ = testing::setup_queue(&mut fx.dev, 0, &q);
                    let s = testing::read_reg(&mut fx.dev, regs::STATUS);
                    testing::write_reg(&mut fx.dev, regs::STATUS, s | status::DRIVER_OK);
                    fx.queue = Some(q);
                }
            }
            6 => {
                let sector = u64::from(c.u8());
                if let Some(q) = fx.queue.as_mut() {
                    let (hdr, data, st) = (0x8000u64, 0x9000u64, 0xa000u64);
                    let req_type = u32::from(a % 16);
                    let _ = testing::write_blk_header(&fx.mem, GuestAddress(hdr), req_type, sector);
                    let data_buf = Buf {
                        addr: data,
                        len: 1024,
                        writable: req_type != testing::BLK_T_OUT,
                    };
                    let _ = q.add_chain(&[Buf::readable(hdr, 16), data_buf, Buf::writable(st, 1)]);
                    testing::write_reg(&mut fx.dev, super::QUEUE_NOTIFY_OFFSET, 0);
                }
            }
            _ => {
                let addr = u64::from(c.u16());
                let len = usize::from(c.u8() % 33);
                let data = c.take(len).to_vec();
                let _ = fx.mem.write_slice(&data, GuestAddress(addr));
            }
        }
        if !invariants_hold(fx) {
            stats.violations += 1;
        }
    }
    if let Some(c) = block_ok_requests(fx) {
        stats.ok_requests = c;
    }
    // Requests may have written to the image.
    restore_image(&fx.img);
    stats
}

fn block_ok_requests(fx: &MmioFixture) -> Option<u64> {
    // The transport only exposes the device as a trait object; count completions through the
    // used ring instead.
    fx.queue.as_ref().map(|q| u64::from(q.used_idx()))
}

fn invariants_hold(fx: &mut MmioFixture) -> bool {
    let magic = testing::read_reg(&mut fx.dev, regs::MAGIC_VALUE);
    let version = testing::read_reg(&mut fx.dev, regs::VERSION);
    let int = testing::read_reg(&mut fx.dev, regs::INTERRUPT_STATUS);
    let st = fx.dev.status();
    let len = fx.img.metadata().map(|m| m.len()).ok();
    magic == MMIO_MAGIC
        && version == 2
        && int & !3 == 0
        && (!fx.dev.is_activated() || st & status::DRIVER_OK != 0)
        && len == Some(DISK_LEN)
}

/// One `run_blk` descriptor (addresses and lengths below the fold limits are taken relative
/// to the data area).
fn descriptor(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

/// A `run_blk` input: a 4-entry queue with one request of `kind` (a `VIRTIO_BLK_T_*`) on
/// `sector`, as a header, one 512-byte data buffer (device-writable for reads and GET_ID) and
/// the status byte; `read_only` selects a read-only disk.
pub fn blk_request_input(kind: u32, sector: u64, read_only: bool) -> Vec<u8> {
    // size 4 = 1 << 2 -> bits 2..=5 = 2; serial on.
    let mut input = vec![2 << 2 | 2 | u8::from(read_only)];
    input.extend_from_slice(&1u16.to_le_bytes());
    let data_flags = if kind == testing::BLK_T_OUT {
        testing::DESC_F_NEXT
    } else {
        testing::DESC_F_NEXT | testing::DESC_F_WRITE
    };
    // Addresses fold as DATA + addr.
    input.extend(descriptor(0x0, 16, testing::DESC_F_NEXT, 1));
    input.extend(descriptor(0x1000, 512, data_flags, 2));
    input.extend(descriptor(0x2000, 1, testing::DESC_F_WRITE, 0));
    input.extend(descriptor(0, 0, 0, 0));
    for head in [0u16, 0, 0, 0] {
        input.extend_from_slice(&head.to_le_bytes());
    }
    // The header at DATA.
    input.extend_from_slice(&kind.to_le_bytes());
    input.extend_from_slice(&0u32.to_le_bytes());
    input.extend_from_slice(&sector.to_le_bytes());
    input
}

/// A `run_mmio` input: the handshake (no features masked), a queue of 8, one request of
/// `kind` on `sector`, then the event loop's notification.
pub fn mmio_request_input(kind: u8, sector: u8) -> Vec<u8> {
    let mut input = vec![4];
    input.extend_from_slice(&0u64.to_le_bytes());
    input.push(5 | (3 << 3));
    input.extend_from_slice(&[6 | (kind << 3), sector]);
    input.push(3);
    input
}

/// A named fuzz input: (file name, bytes).
pub type Seed = (String, Vec<u8>);

/// Seed inputs for the `virtio_blk` and `virtio_mmio` fuzz targets (file name, bytes), each a
/// valid request the device completes: reads, writes, flushes and GET_ID, on read-write and
/// read-only disks, and a driver reset in the middle of the MMIO sequence.
pub fn seeds() -> (Vec<Seed>, Vec<Seed>) {
    use testing::{BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT};
    let mut blk = Vec::new();
    for (name, kind) in [
        ("in", BLK_T_IN),
        ("out", BLK_T_OUT),
        ("flush", BLK_T_FLUSH),
        ("get-id", BLK_T_GET_ID),
    ] {
        for ro in [false, true] {
            let suffix = if ro { "-ro" } else { "" };
            blk.push((format!("{name}{suffix}"), blk_request_input(kind, 3, ro)));
        }
    }
    let mut mmio = Vec::new();
    for (name, kind) in [("in", 0u8), ("out", 1), ("flush", 4), ("get-id", 8)] {
        mmio.push((name.to_string(), mmio_request_input(kind, 1)));
    }
    // A read, a reset (status 0), then the whole sequence again.
    let mut reset = mmio_request_input(0, 1);
    reset.extend_from_slice(&[2, (regs::STATUS / 4) as u8, 0, 0, 0, 0]);
    reset.extend(mmio_request_input(0, 2));
    mmio.push(("reset-and-again".to_string(), reset));
    (blk, mmio)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::xorshift as rng;

    #[test]
    fn blk_input_with_a_valid_read() {
        let s = run_blk(&blk_request_input(testing::BLK_T_IN, 3, false)).unwrap();
        assert_eq!(s.violations, 0, "{s:?}");
        assert_eq!(s.ok_requests, 1, "{s:?}");
        assert_eq!(s.ops, 1);
    }

    #[test]
    fn every_seed_completes_a_request() {
        let (blk, mmio) = seeds();
        for (name, input) in blk {
            let s = run_blk(&input).unwrap();
            assert_eq!(s.violations, 0, "{name}: {s:?}");
            // A write to a read-only disk completes with IOERR.
            let expect = u64::from(name != "out-ro");
            assert_eq!(s.ok_requests, expect, "{name}: {s:?}");
        }
        for (name, input) in mmio {
            let s = run_mmio(&input).unwrap();
            assert_eq!(s.violations, 0, "{name}: {s:?}");
            assert!(s.ok_requests >= 1, "{name}: {s:?}");
        }
    }

    #[test]
    fn blk_random_inputs_keep_the_invariants() {
        for seed in 0..150u64 {
            let mut next = rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let len = usize::from(next()) * 8 + usize::from(next());
            let input: Vec<u8> = (0..len).map(|_| next()).collect();
            let s = run_blk(&input).unwrap();
            assert_eq!(s.violations, 0, "seed {seed}: {s:?}");
        }
    }

    #[test]
    fn mmio_canned_sequence_reads() {
        // Handshake (mask 0), queue of 8 at 0, a read of sector 1, then the event loop.
        let s = run_mmio(&mmio_request_input(0, 1)).unwrap();
        assert_eq!(s.violations, 0, "{s:?}");
        assert_eq!(s.ok_requests, 1, "{s:?}");
    }

    #[test]
    fn mmio_random_inputs_keep_the_invariants() {
        for seed in 0..150u64 {
            let mut next = rng(seed.wrapping_add(77).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let len = usize::from(next()) * 2;
            let input: Vec<u8> = (0..len).map(|_| next()).collect();
            let s = run_mmio(&input).unwrap();
            assert_eq!(s.violations, 0, "seed {seed}: {s:?}");
        }
    }
}
