//! virtio-blk on a raw image file.
//!
//! One request queue of [`QUEUE_SIZE`] entries. Supported requests: `IN` (read), `OUT`
//! (write), `FLUSH` (`fdatasync` of the image) and `GET_ID` (the serial given in
//! [`BlockConfig::serial`], NUL-padded to 20 bytes; `UNSUPP` when none was set). Every other
//! request type completes with `UNSUPP`. Offered features: `VERSION_1`, `INDIRECT_DESC`,
//! `SEG_MAX`, `FLUSH`, and `RO` for read-only disks (whose `OUT` requests complete with
//! `IOERR`, leaving the file untouched).
//!
//! # Request validation
//!
//! A request is a descriptor chain: device-readable descriptors (the 16-byte header
//! `{type: le32, reserved: le32, sector: le64}`, then the data of an `OUT`) followed by
//! device-writable ones (the data of an `IN` or `GET_ID`, then the status byte, which is the
//! last byte of the chain). Buffer boundaries are not otherwise significant (any layout).
//!
//! * A chain whose end cannot be trusted — empty, looping, longer than [`QUEUE_SIZE`]
//!   descriptors, with an unreadable descriptor or an index outside the table, whose last
//!   descriptor is not device-writable or lies outside guest memory — is put in the used ring
//!   with length 0 and nothing is written to guest memory ([`BlockCounters::dropped_chains`]).
//! * A chain with a usable status byte but breaking the other rules (a readable descriptor
//!   after a writable one, a descriptor outside guest memory, a header shorter than 16 bytes,
//!   data in the wrong direction for the request type, data not a multiple of 512 bytes)
//!   completes with `IOERR` ([`BlockCounters::malformed_chains`] counts both kinds).
//! * `IN`/`OUT` must satisfy `sector * 512 + len <= capacity * 512` (overflow-checked), or
//!   complete with `IOERR` ([`BlockCounters::out_of_range`]).
//!
//! [`request::parse`] applies these rules without any I/O; the device then runs the request
//! against its [`DiskBackend`]. With [`FileDisk`], data moves straight between the image file
//! and guest memory (`pread`/`pwrite` into [`vm_memory::VolatileSlice`]s), without an
//! intermediate buffer. The used length is the number of bytes written into the chain's writable
//! buffers, status byte included (1 for every request that failed).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{
    Error, GuestRam, HostFd, VirtioDevice, VirtioInterrupt, TYPE_BLOCK, VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::{RateLimiter, TokenType};

mod backend;
pub mod request;

pub use backend::{DiskBackend, DiskError, FileDisk};
use request::{for_each_segment, Parsed, Refusal, Request, RequestKind};

/// Size of a virtio-blk sector (the unit of `capacity` and of the request `sector` field).
pub const SECTOR_SIZE: u64 = 512;
/// Maximum (and default) size of the request queue; also the longest chain accepted.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the `GET_ID` answer (the serial, NUL-padded).
pub const ID_LEN: usize = 20;
/// Length of the request header.
pub const HEADER_LEN: u64 = 16;
/// Length of the configuration space the device implements (`capacity`, `size_max`, `seg_max`,
/// `geometry`, `blk_size`); reads beyond it return 0.
pub const CONFIG_LEN: usize = 24;

/// How to create a [`Block`] device on a raw image file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw disk image (regular file or block device). Its size, rounded down to whole sectors,
    /// is the disk capacity.
    pub path: PathBuf,
    /// Open the image read-only and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// The serial returned by `GET_ID` (at most [`ID_LEN`] bytes).
    pub serial: Option<String>,
}

/// Why a [`Block`] device could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The serial is longer than 20 bytes.
    #[error("block device serial is {len} bytes long; at most {ID_LEN} fit")]
    SerialTooLong {
        /// Length of the refused serial.
        len: usize,
    },
    /// An eventfd or timer could not be created.
    #[error("block device set-up: {0}")]
    Io(#[source] std::io::Error),
}

/// A snapshot of the block device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// Successful `IN` requests.
    pub reads: u64,
    /// Successful `OUT` requests.
    pub writes: u64,
    /// Successful `FLUSH` requests.
    pub flushes: u64,
    /// Successful `GET_ID` requests.
    pub get_id: u64,
    /// Bytes read from the image into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the image.
    pub write_bytes: u64,
    /// Host I/O failures (`pread`/`pwrite`/`fdatasync` errors or short transfers); the request
    /// completed with `IOERR`.
    pub io_errors: u64,
    /// Chains breaking the descriptor rules (see the module docs); completed with `IOERR` or,
    /// when no status byte could be trusted, dropped.
    pub malformed_chains: u64,
    /// The subset of `malformed_chains` put in the used ring with length 0 and no status.
    pub dropped_chains: u64,
    /// `IN`/`OUT` requests beyond the end of the disk; completed with `IOERR`.
    pub out_of_range: u64,
    /// Requests of an unsupported type (or `GET_ID` without a serial); completed with `UNSUPP`.
    pub unsupported: u64,
    /// `OUT` requests to a read-only disk; completed with `IOERR`.
    pub read_only_rejected: u64,
    /// Broken queues (available index moved by more than the queue size, used ring not
    /// writable); the device then needs a reset.
    pub queue_errors: u64,
    /// Driver writes to the (read-only) configuration space; ignored.
    pub config_writes_ignored: u64,
    /// Times the rate limiter held requests back.
    pub rate_limited: u64,
    /// Backing images swapped while running ([`BlockCommand::ReplaceDisk`]).
    pub disk_replacements: u64,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    get_id: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    io_errors: AtomicU64,
    malformed_chains: AtomicU64,
    dropped_chains: AtomicU64,
    out_of_range: AtomicU64,
    unsupported: AtomicU64,
    read_only_rejected: AtomicU64,
    queue_errors: AtomicU64,
    config_writes_ignored: AtomicU64,
    rate_limited: AtomicU64,
    disk_replacements: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A handle on a [`Block`]'s counters, readable from any thread without locking the device.
#[derive(Clone, Debug)]
pub struct BlockCountersHandle(Arc<Counters>);

impl BlockCountersHandle {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> BlockCounters {
        let c = &self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlockCounters {
            reads: l(&c.reads),
            writes: l(&c.writes),
            flushes: l(&c.flushes),
            get_id: l(&c.get_id),
            read_bytes: l(&c.read_bytes),
            write_bytes: l(&c.write_bytes),
            io_errors: l(&c.io_errors),
            malformed_chains: l(&c.malformed_chains),
            dropped_chains: l(&c.dropped_chains),
            out_of_range: l(&c.out_of_range),
            unsupported: l(&c.unsupported),
            read_only_rejected: l(&c.read_only_rejected),
            queue_errors: l(&c.queue_errors),
            config_writes_ignored: l(&c.config_writes_ignored),
            rate_limited: l(&c.rate_limited),
            disk_replacements: l(&c.disk_replacements),
        }
    }
}

struct Active<M> {
    mem: M,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio-blk device on a [`DiskBackend`] (see the [module docs](self)), over guest memory
/// `M`.
pub struct Block<M = GuestRam, D = FileDisk> {
    disk: D,
    /// Capacity in sectors.
    capacity: u64,
    serial: Option<[u8; ID_LEN]>,
    config: [u8; CONFIG_LEN],
    features: u64,
    queue_sizes: [u16; 1],
    counters: Arc<Counters>,
    active: Option<Active<M>>,
    /// Scratch space for the descriptors of the chain being handled (reused: no allocation per
    /// request).
    descs: Vec<Descriptor>,
    limiter: RateLimiter,
    control: crate::mailbox::Mailbox<BlockCommand<D>>,
}

/// What another thread may ask of a running disk ([`Block::control`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum BlockCommand<D> {
    /// Swap the backing image (Firecracker's `PATCH /drives` with `path_on_host`): the
    /// capacity is re-read and the guest is told with a configuration-change interrupt.
    ReplaceDisk(D),
    /// Change the rate limiter's buckets.
    UpdateRateLimiter {
        /// Bandwidth bucket.
        bandwidth: crate::rate_limiter::BucketUpdate,
        /// Operations bucket.
        ops: crate::rate_limiter::BucketUpdate,
    },
}

impl<M, D: std::fmt::Debug> std::fmt::Debug for Block<M, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("capacity", &self.capacity)
            .field("features", &self.features)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl<M> Block<M, FileDisk> {
    /// Opens the image (read-write unless `cfg.read_only`).
    ///
    /// Fails with [`DiskError::Open`] if it cannot be opened, [`DiskError::BadImage`] if it is
    /// neither a regular file nor a block device, and [`BlockError::SerialTooLong`] for a serial
    /// above [`ID_LEN`] bytes.
    pub fn new(cfg: BlockConfig) -> Result<Self, BlockError> {
        let serial = check_serial(cfg.serial.as_deref())?;
        let disk = FileDisk::open(&cfg.path, cfg.read_only)?;
        Self::with_serial(disk, serial)
    }
}

fn check_serial(serial: Option<&str>) -> Result<Option<[u8; ID_LEN]>, BlockError> {
    match serial {
        None => Ok(None),
        Some(s) if s.len() > ID_LEN => Err(BlockError::SerialTooLong { len: s.len() }),
        Some(s) => {
            let mut id = [0u8; ID_LEN];
            id[..s.len()].copy_from_slice(s.as_bytes());
            Ok(Some(id))
        }
    }
}

impl<M, D: DiskBackend> Block<M, D> {
    /// A device on `disk`, answering `GET_ID` with `serial` (at most [`ID_LEN`] bytes).
    pub fn with_backend(disk: D, serial: Option<&str>) -> Result<Self, BlockError> {
        let serial = check_serial(serial)?;
        Self::with_serial(disk, serial)
    }

    fn with_serial(disk: D, serial: Option<[u8; ID_LEN]>) -> Result<Self, BlockError> {
        let capacity = disk.size() / SECTOR_SIZE;
        let limiter = RateLimiter::unlimited().map_err(BlockError::Io)?;
        let control = crate::mailbox::Mailbox::new().map_err(BlockError::Io)?;
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_INDIRECT_DESC
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (8..12) stays 0: not offered. seg_max leaves room for header and status.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // geometry (16..20) not offered; blk_size (20..24) for completeness.
        #[allow(clippy::cast_possible_truncation, reason = "SECTOR_SIZE is 512")]
        let blk_size = SECTOR_SIZE as u32;
        config[20..24].copy_from_slice(&blk_size.to_le_bytes());
        Ok(Block {
            disk,
            capacity,
            serial,
            config,
            features,
            queue_sizes: [QUEUE_SIZE],
            counters: Arc::new(Counters::default()),
            active: None,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            limiter,
            control,
        })
    }

    /// Limits the disk's requests (operations) and bytes (see [`RateLimiter`]); a request the
    /// limiter refuses stays in the queue until its timer fires.
    pub fn with_rate_limiter(mut self, limiter: RateLimiter) -> Self {
        self.limiter = limiter;
        self
    }

    /// A sender of [`BlockCommand`]s to this disk, usable from any thread while it runs (the
    /// device takes them from its event loop).
    pub fn control(&self) -> crate::mailbox::MailboxSender<BlockCommand<D>> {
        self.control.sender()
    }

    fn set_capacity(&mut self) {
        self.capacity = self.disk.size() / SECTOR_SIZE;
        self.config[0..8].copy_from_slice(&self.capacity.to_le_bytes());
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The backend.
    pub fn backend(&self) -> &D {
        &self.disk
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> BlockCounters {
        self.counters_handle().snapshot()
    }

    /// A handle on the counters that stays readable (from any thread, without the device lock)
    /// after the device was moved into its transport.
    pub fn counters_handle(&self) -> BlockCountersHandle {
        BlockCountersHandle(self.counters.clone())
    }
}

impl<M, D> VirtioDevice<M> for Block<M, D>
where
    M: GuestMemoryBackend + Send,
    D: DiskBackend,
{
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        inc(&self.counters.config_writes_ignored);
    }

    fn activate(
        &mut self,
        mem: M,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), Error> {
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(Error::QueueCount { expected: 1, got });
        };
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), Error> {
        if index != 0 {
            return Err(Error::InvalidQueue(index));
        }
        if self.limiter.is_blocked() {
            // The limiter's timer resumes the queue.
            return Ok(());
        }
        let Block {
            disk,
            capacity,
            serial,
            counters,
            active,
            descs,
            limiter,
            ..
        } = self;
        let Some(active) = active.as_mut() else {
            return Err(Error::NotActivated);
        };
        if !active.queue.ready() {
            return Ok(());
        }
        let mem = &active.mem;
        let mut used_any = false;
        let result = loop {
            let chain = match active.queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(source) => break Err(source),
            };
            let Some(chain) = chain else {
                break Ok(());
            };
            let head = chain.head_index();
            // Collect the chain (bounded: virtio-queue stops after `queue size` descriptors, an
            // indirect table after its own length, and we after QUEUE_SIZE).
            descs.clear();
            let mut complete = false;
            for d in chain {
                if descs.len() == usize::from(QUEUE_SIZE) {
                    complete = false;
                    break;
                }
                complete = !d.has_next();
                descs.push(d);
            }
            let parsed = request::parse(mem, descs, complete, *capacity);
            if limiter.is_limited() && !admit(limiter, &parsed) {
                // Back into the queue; the limiter's timer brings the device back to it.
                active.queue.go_to_previous_position();
                inc(&counters.rate_limited);
                break Ok(());
            }
            let len = handle_chain(disk, serial.as_ref(), mem, descs, parsed, counters);
            match active.queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                // A head index outside the table: the chain was already counted as dropped
                // and cannot be returned; the queue itself is fine.
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(source) => break Err(source),
            }
        };
        // An unreadable avail ring (the queue is broken anyway) still gets its interrupt.
        let signal =
            if used_any && super::needs_interrupt(&mut active.queue, &active.mem).unwrap_or(true) {
                active.interrupt.signal_used_queue(0)
            } else {
                Ok(())
            };
        if let Err(source) = result {
            inc(&counters.queue_errors);
            return Err(Error::QueueBroken { queue: 0, source });
        }
        signal
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn host_fds(&self) -> Vec<HostFd> {
        vec![
            HostFd::readable(self.limiter.timer_fd()),
            HostFd::readable(self.control.fd()),
        ]
    }

    fn process_host(&mut self, index: usize) -> Result<(), Error> {
        let retry = match index {
            0 => self.limiter.timer_fired(),
            1 => {
                let mut retry = false;
                for cmd in self.control.take() {
                    match cmd {
                        BlockCommand::ReplaceDisk(disk) => {
                            self.disk = disk;
                            self.set_capacity();
                            inc(&self.counters.disk_replacements);
                            if let Some(a) = &self.active {
                                a.interrupt.signal_config()?;
                            }
                        }
                        BlockCommand::UpdateRateLimiter { bandwidth, ops } => {
                            self.limiter.update(bandwidth, ops);
                            retry = true;
                        }
                    }
                }
                retry
            }
            _ => false,
        };
        if retry && self.active.is_some() {
            return self.process_queue(0);
        }
        Ok(())
    }

    fn queues(&self) -> &[Queue] {
        self.active
            .as_ref()
            .map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    /// virtio-blk keeps nothing beyond its queue: every request is finished within
    /// `process_queue`, so nothing is in flight between calls.
    #[cfg(feature = "serde")]
    fn save_state(&self) -> Result<serde_json::Value, Error> {
        Ok(serde_json::Value::Null)
    }

    #[cfg(feature = "serde")]
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), Error> {
        if state.is_null() {
            Ok(())
        } else {
            Err(Error::InvalidState(format!(
                "virtio-blk keeps no device state, got {state}"
            )))
        }
    }
}

/// Whether the rate limiter lets a parsed request through now (one operation, and its data
/// bytes). Refused chains (malformed, out of range) cost nothing.
fn admit(limiter: &mut RateLimiter, parsed: &Parsed) -> bool {
    let Parsed::Chain {
        request: Ok(req), ..
    } = parsed
    else {
        return true;
    };
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    let bytes = match req.kind {
        RequestKind::Read | RequestKind::Write => req.len,
        _ => 0,
    };
    if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
        limiter.replenish(1, TokenType::Ops);
        return false;
    }
    true
}

/// Handles one parsed chain, writing its status byte; returns the used length.
fn handle_chain<M: GuestMemoryBackend, D: DiskBackend>(
    disk: &mut D,
    serial: Option<&[u8; ID_LEN]>,
    mem: &M,
    descs: &[Descriptor],
    parsed: Parsed,
    counters: &Counters,
) -> u32 {
    let dropped = || {
        inc(&counters.malformed_chains);
        inc(&counters.dropped_chains);
        0
    };
    let (status_addr, request) = match parsed {
        Parsed::Dropped => return dropped(),
        Parsed::Chain { status, request } => (status, request),
    };
    let outcome = match request {
        Ok(r) => execute(disk, serial, mem, descs, r, counters),
        Err(Refusal::Malformed) => {
            inc(&counters.malformed_chains);
            Err(IOERR)
        }
        Err(Refusal::OutOfRange) => {
            inc(&counters.out_of_range);
            Err(IOERR)
        }
    };
    let (status, used) = match outcome {
        Ok(written) => (OK, written.saturating_add(1)),
        Err(status) => (status, 1),
    };
    if mem.write_obj(status, status_addr).is_err() {
        return dropped();
    }
    // The chain is at most u32::MAX bytes long (virtio-queue enforces it).
    u32::try_from(used).unwrap_or(u32::MAX)
}

#[allow(clippy::cast_possible_truncation, reason = "VIRTIO_BLK_S_OK is 0")]
const OK: u8 = VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation, reason = "VIRTIO_BLK_S_IOERR is 1")]
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation, reason = "VIRTIO_BLK_S_UNSUPP is 2")]
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Moves `len` bytes between the disk at `offset` and the guest memory at `addr` (which may
/// span memory regions), marking guest pages the device wrote dirty.
fn transfer<M: GuestMemoryBackend, D: DiskBackend>(
    disk: &mut D,
    mem: &M,
    addr: GuestAddress,
    len: usize,
    mut offset: u64,
    to_guest: bool,
) -> bool {
    for slice in mem.get_slices(addr, len) {
        let Ok(slice) = slice else {
            return false;
        };
        let ok = if to_guest {
            let ok = disk.read_at(offset, &slice).is_ok();
            slice.bitmap().mark_dirty(0, slice.len());
            ok
        } else {
            disk.write_at(offset, &slice).is_ok()
        };
        if !ok {
            return false;
        }
        offset += slice.len() as u64;
    }
    true
}

/// Runs a validated request. Returns the number of bytes written into the writable buffers
/// before the status byte, or the failure status.
fn execute<M: GuestMemoryBackend, D: DiskBackend>(
    disk: &mut D,
    serial: Option<&[u8; ID_LEN]>,
    mem: &M,
    descs: &[Descriptor],
    req: Request,
    counters: &Counters,
) -> Result<u64, u8> {
    match req.kind {
        RequestKind::Read | RequestKind::Write => {
            let read = req.kind == RequestKind::Read;
            if !read && disk.read_only() {
                inc(&counters.read_only_rejected);
                return Err(IOERR);
            }
            let mut offset = req.sector * SECTOR_SIZE;
            let (writable, skip) = if read { (true, 0) } else { (false, HEADER_LEN) };
            let ok = for_each_segment(descs, writable, skip, req.len, |addr, n| {
                let ok = transfer(disk, mem, addr, n, offset, read);
                offset += n as u64;
                ok
            });
            if !ok {
                inc(&counters.io_errors);
                return Err(IOERR);
            }
            if read {
                inc(&counters.reads);
                counters.read_bytes.fetch_add(req.len, Ordering::Relaxed);
                Ok(req.len)
            } else {
                inc(&counters.writes);
                counters.write_bytes.fetch_add(req.len, Ordering::Relaxed);
                Ok(0)
            }
        }
        RequestKind::Flush => {
            if disk.flush().is_err() {
                inc(&counters.io_errors);
                return Err(IOERR);
            }
            inc(&counters.flushes);
            Ok(0)
        }
        RequestKind::GetId => {
            let Some(id) = serial else {
                inc(&counters.unsupported);
                return Err(UNSUPP);
            };
            let mut pos = 0;
            let ok = for_each_segment(descs, true, 0, req.len, |addr, len| {
                let r = mem.write_slice(&id[pos..pos + len], addr).is_ok();
                pos += len;
                r
            });
            if !ok {
                inc(&counters.malformed_chains);
                return Err(IOERR);
            }
            inc(&counters.get_id);
            Ok(req.len)
        }
        RequestKind::Unsupported(_) => {
            inc(&counters.unsupported);
            Err(UNSUPP)
        }
    }
}
