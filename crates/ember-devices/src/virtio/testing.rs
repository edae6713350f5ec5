//! A guest-side virtio driver for tests, benchmarks, fuzz targets and examples: register
//! accesses, the initialization handshake, and split virtqueue rings written into guest memory
//! the way a guest kernel lays them out.
//!
//! Nothing here is needed by a VMM.
#![allow(
    clippy::cast_possible_truncation,
    reason = "test driver: queue indices and sizes are small; 64-bit features and addresses are split into 32-bit halves on purpose"
)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::{regs, status, GuestRam, MmioTransport, MMIO_MAGIC, MMIO_VERSION, VIRTIO_F_VERSION_1};
use crate::BusDevice;

/// Request type `IN` (read from the disk).
pub const BLK_T_IN: u32 = 0;
/// Request type `OUT` (write to the disk).
pub const BLK_T_OUT: u32 = 1;
/// Request type `FLUSH`.
pub const BLK_T_FLUSH: u32 = 4;
/// Request type `GET_ID`.
pub const BLK_T_GET_ID: u32 = 8;
/// Status `OK`.
pub const BLK_S_OK: u8 = 0;
/// Status `IOERR`.
pub const BLK_S_IOERR: u8 = 1;
/// Status `UNSUPP`.
pub const BLK_S_UNSUPP: u8 = 2;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;

/// Reads a 32-bit register the way a guest does (one aligned 4-byte access).
pub fn read_reg(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register the way a guest does.
pub fn write_reg(dev: &mut dyn BusDevice, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

/// Reads the 64-bit offered feature set through DeviceFeaturesSel/DeviceFeatures.
pub fn read_device_features(dev: &mut dyn BusDevice) -> u64 {
    write_reg(dev, regs::DEVICE_FEATURES_SEL, 0);
    let lo = read_reg(dev, regs::DEVICE_FEATURES);
    write_reg(dev, regs::DEVICE_FEATURES_SEL, 1);
    let hi = read_reg(dev, regs::DEVICE_FEATURES);
    u64::from(lo) | (u64::from(hi) << 32)
}

/// Writes the 64-bit accepted feature set through DriverFeaturesSel/DriverFeatures.
pub fn write_driver_features(dev: &mut dyn BusDevice, features: u64) {
    write_reg(dev, regs::DRIVER_FEATURES_SEL, 0);
    write_reg(dev, regs::DRIVER_FEATURES, features as u32);
    write_reg(dev, regs::DRIVER_FEATURES_SEL, 1);
    write_reg(dev, regs::DRIVER_FEATURES, (features >> 32) as u32);
}

/// Programs queue `index` with the rings of `q` and marks it ready (as Linux's
/// `vm_setup_vq` does).
pub fn setup_queue(dev: &mut dyn BusDevice, index: u32, q: &GuestQueue) -> Result<(), String> {
    write_reg(dev, regs::QUEUE_SEL, index);
    if read_reg(dev, regs::QUEUE_READY) != 0 {
        return Err(format!("queue {index} already ready"));
    }
    let max = read_reg(dev, regs::QUEUE_NUM_MAX);
    if max < u32::from(q.size()) {
        return Err(format!("queue {index}: max size {max} < {}", q.size()));
    }
    write_reg(dev, regs::QUEUE_NUM, u32::from(q.size()));
    for (lo, addr) in [
        (regs::QUEUE_DESC_LOW, q.desc_table()),
        (regs::QUEUE_DRIVER_LOW, q.avail_ring()),
        (regs::QUEUE_DEVICE_LOW, q.used_ring()),
    ] {
        write_reg(dev, lo, addr as u32);
        write_reg(dev, lo + 4, (addr >> 32) as u32);
    }
    write_reg(dev, regs::QUEUE_READY, 1);
    if read_reg(dev, regs::QUEUE_READY) != 1 {
        return Err(format!("queue {index} did not become ready"));
    }
    Ok(())
}

/// The whole driver initialization sequence (virtio spec 1.x §3.1.1) through the registers:
/// check magic/version/device id, reset, ACKNOWLEDGE, DRIVER, negotiate features (`wanted`
/// masks the offered ones; `None` accepts all), FEATURES_OK (and check it stuck), set up
/// `queues[i]` as queue `i`, DRIVER_OK. Returns the accepted features.
pub fn driver_init(
    dev: &mut MmioTransport,
    queues: &[&GuestQueue],
    wanted: Option<u64>,
) -> Result<u64, String> {
    if read_reg(dev, regs::MAGIC_VALUE) != MMIO_MAGIC {
        return Err("bad magic".into());
    }
    if read_reg(dev, regs::VERSION) != MMIO_VERSION {
        return Err("bad version".into());
    }
    if read_reg(dev, regs::DEVICE_ID) == 0 {
        return Err("no device".into());
    }
    write_reg(dev, regs::STATUS, 0);
    if read_reg(dev, regs::STATUS) != 0 {
        return Err("reset did not stick".into());
    }
    let mut s = status::ACKNOWLEDGE;
    write_reg(dev, regs::STATUS, s);
    s |= status::DRIVER;
    write_reg(dev, regs::STATUS, s);
    let offered = read_device_features(dev);
    if offered & VIRTIO_F_VERSION_1 == 0 {
        return Err("device is not virtio 1.x".into());
    }
    let acked = offered & wanted.unwrap_or(u64::MAX);
    write_driver_features(dev, acked);
    s |= status::FEATURES_OK;
    write_reg(dev, regs::STATUS, s);
    if read_reg(dev, regs::STATUS) & status::FEATURES_OK == 0 {
        return Err("FEATURES_OK refused".into());
    }
    for (i, q) in queues.iter().enumerate() {
        setup_queue(dev, i as u32, q)?;
    }
    s |= status::DRIVER_OK;
    write_reg(dev, regs::STATUS, s);
    let now = read_reg(dev, regs::STATUS);
    if now != s {
        return Err(format!("status {now:#x} after DRIVER_OK"));
    }
    Ok(acked)
}

/// Writes a virtio-blk request header (`type`, reserved 0, `sector`) at `addr`.
pub fn write_blk_header(
    mem: &GuestRam,
    addr: GuestAddress,
    req_type: u32,
    sector: u64,
) -> Result<(), GuestMemoryError> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, addr)
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// The guest side of a split virtqueue in guest memory: descriptor table, available ring
/// (driver area) and used ring (device area), laid out back to back from a base address.
#[derive(Debug)]
pub struct GuestQueue {
    mem: GuestRam,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_free: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    /// Bytes of guest memory a queue of `size` entries occupies from its base.
    pub fn footprint(size: u16) -> u64 {
        let (_, _, used) = Self::layout(0, size);
        used + 6 + 8 * u64::from(size)
    }

    fn layout(base: u64, size: u16) -> (u64, u64, u64) {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        (desc, avail, used)
    }

    /// A queue of `size` entries at `base` (16-byte aligned); zeroes its rings.
    pub fn new(mem: &GuestRam, size: u16, base: GuestAddress) -> Result<Self, GuestMemoryError> {
        let (desc, avail, used) = Self::layout(base.0, size);
        let zeros = vec![0u8; Self::footprint(size) as usize];
        mem.write_slice(&zeros, base)?;
        Ok(GuestQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_free: 0,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptor table address.
    pub fn desc_table(&self) -> u64 {
        self.desc
    }

    /// Available ring address.
    pub fn avail_ring(&self) -> u64 {
        self.avail
    }

    /// Used ring address.
    pub fn used_ring(&self) -> u64 {
        self.used
    }

    /// Writes descriptor `index` of the table (any values, for hostile chains).
    pub fn write_descriptor(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), GuestMemoryError> {
        write_descriptor_at(
            &self.mem,
            GuestAddress(self.desc + 16 * u64::from(index)),
            addr,
            len,
            flags,
            next,
        )
    }

    /// Writes `bufs` as a chain into the next free descriptors (wrapping around the table),
    /// publishes it in the available ring and returns its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> Result<u16, GuestMemoryError> {
        let head = self.next_free;
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_free;
            let next = (idx + 1) % self.size;
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_descriptor(idx, b.addr, b.len, flags, next)?;
            self.next_free = next;
        }
        self.publish(head)?;
        Ok(head)
    }

    /// Puts `head` in the next available ring slot and advances the available index.
    pub fn publish(&mut self, head: u16) -> Result<(), GuestMemoryError> {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write_obj(head.to_le(), GuestAddress(slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx)
    }

    /// Writes the available ring index (any value, for hostile drivers).
    pub fn set_avail_idx(&self, idx: u16) -> Result<(), GuestMemoryError> {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
    }

    /// The used ring index the device wrote.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(GuestAddress(self.used + 2))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// The next used element `(descriptor head id, length)` not seen yet.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id = self.mem.read_obj::<u32>(GuestAddress(at)).ok()?;
        let len = self.mem.read_obj::<u32>(GuestAddress(at + 4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }
}

/// Writes one split descriptor (16 bytes) at `at` (a descriptor table slot, or an indirect
/// table entry).
pub fn write_descriptor_at(
    mem: &GuestRam,
    at: GuestAddress,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), GuestMemoryError> {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, at)
}
