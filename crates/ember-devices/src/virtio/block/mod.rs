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
//! Data moves straight between the image file and guest memory (`pread`/`pwrite` into
//! [`vm_memory::VolatileSlice`]s), without an intermediate buffer. The used length is the
//! number of bytes written into the chain's writable buffers, status byte included (1 for
//! every request that failed).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};

use super::{
    Error, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

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

/// How to create a [`Block`] device.
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
        }
    }
}

/// The disk image and what the device knows about it.
#[derive(Debug)]
struct Disk {
    file: File,
    read_only: bool,
    /// Capacity in sectors.
    capacity: u64,
    serial: Option<[u8; ID_LEN]>,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Interrupt,
}

/// A virtio-blk device on a raw image file (see the [module docs](self)).
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    config: [u8; CONFIG_LEN],
    features: u64,
    queue_sizes: [u16; 1],
    counters: Arc<Counters>,
    active: Option<Active>,
    /// Scratch space for the descriptors of the chain being handled (reused: no allocation per
    /// request).
    descs: Vec<Descriptor>,
}

impl Block {
    /// Opens the image (read-write unless `cfg.read_only`).
    ///
    /// Fails with [`Error::Open`] if it cannot be opened, [`Error::BadImage`] if it is neither a
    /// regular file nor a block device, and [`Error::SerialTooLong`] for a serial above
    /// [`ID_LEN`] bytes.
    pub fn new(cfg: BlockConfig) -> Result<Self, Error> {
        let serial = match &cfg.serial {
            None => None,
            Some(s) if s.len() > ID_LEN => return Err(Error::SerialTooLong { len: s.len() }),
            Some(s) => {
                let mut id = [0u8; ID_LEN];
                id[..s.len()].copy_from_slice(s.as_bytes());
                Some(id)
            }
        };
        // O_NONBLOCK: a FIFO (refused below) must not block the open.
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(&cfg.path)
            .map_err(|source| Error::Open {
                path: cfg.path.clone(),
                source,
            })?;
        let bad = |why: String| Error::BadImage {
            path: cfg.path.clone(),
            why,
        };
        let meta = file.metadata().map_err(|e| bad(format!("metadata: {e}")))?;
        let bytes = if meta.file_type().is_block_device() {
            block_device_size(&file).map_err(|e| bad(format!("BLKGETSIZE64: {e}")))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(bad("not a regular file or block device".into()));
        };
        let capacity = bytes / SECTOR_SIZE;

        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_INDIRECT_DESC
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if cfg.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (8..12) stays 0: not offered. seg_max leaves room for header and status.
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        // geometry (16..20) not offered; blk_size (20..24) for completeness.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());

        Ok(Block {
            disk: Disk {
                file,
                read_only: cfg.read_only,
                capacity,
                serial,
            },
            config,
            features,
            queue_sizes: [QUEUE_SIZE],
            counters: Arc::new(Counters::default()),
            active: None,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        })
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only
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

#[cfg(target_os = "linux")]
fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the fd is valid for the lifetime of `file`; BLKGETSIZE64 writes one u64 to the
    // pointer, which points to a live, properly aligned u64.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(not(target_os = "linux"))]
fn block_device_size(_file: &File) -> io::Result<u64> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

impl VirtioDevice for Block {
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
        mem: GuestMemoryMmap,
        _acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Interrupt,
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
        let Block {
            disk,
            counters,
            active,
            descs,
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
            let len = handle_chain(disk, mem, descs, complete, counters);
            match active.queue.add_used(mem, head, len) {
                Ok(()) => used_any = true,
                // A head index outside the table: the chain was already counted as dropped
                // and cannot be returned; the queue itself is fine.
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(source) => break Err(source),
            }
        };
        let signal = if used_any {
            active.interrupt.signal_used_queue()
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
}

/// A file position for positional volatile I/O (`pread`/`pwrite` straight into/out of guest
/// memory). Both directions transfer the whole slice unless the file ends or an error occurs,
/// so a short count always means failure.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EINVAL)))
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        let mut done = 0usize;
        let result = {
            let guard = buf.ptr_guard_mut();
            let ptr = guard.as_ptr();
            loop {
                if done == len {
                    break Ok(done);
                }
                let off = match self.off() {
                    Ok(o) => o,
                    Err(e) => break Err(e),
                };
                // SAFETY: `ptr` is valid for writes of `len` bytes (VolatileSlice invariant, kept
                // alive by `guard`) and `done < len`, so `ptr + done` with `len - done` bytes stays
                // inside it; the fd is valid for the lifetime of `self.file`.
                let n = unsafe {
                    libc::pread(self.file.as_raw_fd(), ptr.add(done).cast(), len - done, off)
                };
                match n {
                    0 => break Ok(done),
                    n if n > 0 => {
                        // n > 0 and n <= len - done: lossless.
                        done += n as usize;
                        self.offset += n as u64;
                    }
                    _ => {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            break Err(VolatileMemoryError::IOError(e));
                        }
                    }
                }
            }
        };
        buf.bitmap()
            .mark_dirty(0, if result.is_ok() { done } else { len });
        result
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let len = buf.len();
        let mut done = 0usize;
        let guard = buf.ptr_guard();
        let ptr = guard.as_ptr();
        while done < len {
            let off = self.off()?;
            // SAFETY: `ptr` is valid for reads of `len` bytes (VolatileSlice invariant, kept
            // alive by `guard`) and `done < len`; the fd is valid for the lifetime of
            // `self.file`.
            let n = unsafe {
                libc::pwrite(self.file.as_raw_fd(), ptr.add(done).cast(), len - done, off)
            };
            match n {
                0 => break,
                n if n > 0 => {
                    done += n as usize;
                    self.offset += n as u64;
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(VolatileMemoryError::IOError(e));
                    }
                }
            }
        }
        Ok(done)
    }
}

/// Calls `f(addr, len)` for the bytes `[skip, skip + take)` of the readable (`writable ==
/// false`) or writable descriptors of `descs`, in order. Every descriptor must already be
/// known to lie inside guest memory.
fn for_each_segment(
    descs: &[Descriptor],
    writable: bool,
    mut skip: u64,
    mut take: u64,
    mut f: impl FnMut(GuestAddress, usize) -> bool,
) -> bool {
    for d in descs.iter().filter(|d| d.is_write_only() == writable) {
        if take == 0 {
            break;
        }
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let Some(addr) = d.addr().0.checked_add(skip) else {
            return false;
        };
        let n = (len - skip).min(take);
        skip = 0;
        take -= n;
        // n <= u32::MAX: lossless on 64-bit hosts.
        if !f(GuestAddress(addr), n as usize) {
            return false;
        }
    }
    take == 0
}

/// Handles one chain, writing its status byte; returns the used length.
fn handle_chain(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    complete: bool,
    counters: &Counters,
) -> u32 {
    let dropped = || {
        inc(&counters.malformed_chains);
        inc(&counters.dropped_chains);
        0
    };
    let Some(last) = descs.last() else {
        return dropped();
    };
    if !complete
        || !last.is_write_only()
        || last.len() == 0
        || !mem.check_range(last.addr(), last.len() as usize)
    {
        return dropped();
    }
    let Some(status_addr) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
        return dropped();
    };
    let (status, used) = match execute(disk, mem, descs, counters) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written.saturating_add(1)),
        Err(status) => (status, 1),
    };
    if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
        return dropped();
    }
    // The chain is at most u32::MAX bytes long (virtio-queue enforces it).
    u32::try_from(used).unwrap_or(u32::MAX)
}

const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Validates and executes a request whose status byte is usable. Returns the number of bytes
/// written into the writable buffers before the status byte, or the failure status.
fn execute(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    counters: &Counters,
) -> Result<u64, u8> {
    let malformed = || {
        inc(&counters.malformed_chains);
        IOERR
    };
    // Layout: all readable descriptors before all writable ones, everything inside guest RAM.
    let (mut readable, mut writable) = (0u64, 0u64);
    for d in descs {
        let len = u64::from(d.len());
        if d.is_write_only() {
            writable += len;
        } else if writable > 0 {
            return Err(malformed());
        } else {
            readable += len;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(malformed());
        }
    }
    // The last descriptor is writable and non-empty (checked by the caller).
    let data_out = readable.saturating_sub(HEADER_LEN);
    let data_in = writable - 1;
    if readable < HEADER_LEN {
        return Err(malformed());
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    let mut pos = 0;
    let ok = for_each_segment(descs, false, 0, HEADER_LEN, |addr, len| {
        let r = mem.read_slice(&mut hdr[pos..pos + len], addr).is_ok();
        pos += len;
        r
    });
    if !ok {
        return Err(malformed());
    }
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);

    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = req_type == VIRTIO_BLK_T_IN;
            let (len, wrong_direction) = if is_read {
                (data_in, data_out)
            } else {
                (data_out, data_in)
            };
            if wrong_direction != 0 || len % SECTOR_SIZE != 0 {
                return Err(malformed());
            }
            if !is_read && disk.read_only {
                inc(&counters.read_only_rejected);
                return Err(IOERR);
            }
            let in_range = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(len))
                .zip(disk.capacity.checked_mul(SECTOR_SIZE))
                .is_some_and(|(end, cap)| end <= cap);
            if !in_range {
                inc(&counters.out_of_range);
                return Err(IOERR);
            }
            let mut file = FileAt {
                file: &disk.file,
                offset: sector * SECTOR_SIZE,
            };
            let ok = if is_read {
                for_each_segment(
                    descs,
                    true,
                    0,
                    len,
                    |addr, n| matches!(mem.read_volatile_from(addr, &mut file, n), Ok(m) if m == n),
                )
            } else {
                for_each_segment(
                    descs,
                    false,
                    HEADER_LEN,
                    len,
                    |addr, n| matches!(mem.write_volatile_to(addr, &mut file, n), Ok(m) if m == n),
                )
            };
            if !ok {
                inc(&counters.io_errors);
                return Err(IOERR);
            }
            if is_read {
                inc(&counters.reads);
                counters.read_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(len)
            } else {
                inc(&counters.writes);
                counters.write_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(0)
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only && disk.file.sync_data().is_err() {
                inc(&counters.io_errors);
                return Err(IOERR);
            }
            inc(&counters.flushes);
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let Some(id) = &disk.serial else {
                inc(&counters.unsupported);
                return Err(UNSUPP);
            };
            let n = data_in.min(ID_LEN as u64);
            let mut pos = 0;
            let ok = for_each_segment(descs, true, 0, n, |addr, len| {
                let r = mem.write_slice(&id[pos..pos + len], addr).is_ok();
                pos += len;
                r
            });
            if !ok {
                return Err(malformed());
            }
            inc(&counters.get_id);
            Ok(n)
        }
        _ => {
            inc(&counters.unsupported);
            Err(UNSUPP)
        }
    }
}
