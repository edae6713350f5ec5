//! The port I/O / MMIO bus.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound::{Excluded, Unbounded};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{lock, Error};

/// Largest access the bus forwards to a device (KVM exits carry at most 8 bytes).
pub const MAX_ACCESS_LEN: usize = 8;

/// A device on a [`Bus`].
///
/// The bus only forwards accesses that lie entirely inside the device's range and whose length is
/// `1..=MAX_ACCESS_LEN`; `offset` is relative to the base the device was inserted at. Devices must
/// not panic on any such access (they see guest-controlled values).
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; the device fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else needs it (e.g. the VMM's event loop feeding
/// serial input).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct BusEntry {
    len: u64,
    dev: SharedDevice,
}

/// An address space mapping non-overlapping `[base, base + len)` ranges to devices.
///
/// All access methods take `&self`, so one `Bus` (in an `Arc`) serves every vCPU thread; each
/// device is locked only for the duration of its own access. A poisoned device mutex is recovered
/// rather than propagated.
///
/// Accesses that hit no device, straddle the end of a device range, are empty or are longer than
/// [`MAX_ACCESS_LEN`] are not forwarded: reads fill `data` with `0xff`, both reads and writes
/// return `false` and bump the [`Bus::unhandled`] counter.
///
/// Lookup is a single `BTreeMap::range(..=addr).next_back()` (no allocation, no reference-count
/// traffic), so unmapped ports such as the exit-loop port stay cheap.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, BusEntry>,
    unhandled: AtomicU64,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field(
                "ranges",
                &self
                    .ranges()
                    .map(|(b, l)| format!("{b:#x}+{l:#x}"))
                    .collect::<Vec<_>>(),
            )
            .field("unhandled", &self.unhandled())
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base + len)`.
    ///
    /// Fails with [`Error::ZeroLength`] for `len == 0`, [`Error::RangeOverflow`] if the range
    /// would wrap past `u64::MAX`, and [`Error::Overlap`] if it intersects a device already
    /// mapped (adjacent ranges are fine).
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        if len == 0 {
            return Err(Error::ZeroLength { base });
        }
        // The last byte of the range must be addressable; a range ending exactly at 2^64 is fine.
        if base.checked_add(len - 1).is_none() {
            return Err(Error::RangeOverflow { base, len });
        }
        let overlap = |(&existing_base, e): (&u64, &BusEntry)| Error::Overlap {
            base,
            len,
            existing_base,
            existing_len: e.len,
        };
        // The closest device starting at or below `base` must end at or before `base`.
        if let Some((&b, e)) = self.devices.range(..=base).next_back() {
            if base - b < e.len {
                return Err(overlap((&b, e)));
            }
        }
        // The closest device starting above `base` must start at or after our end.
        if let Some((&b, e)) = self.devices.range((Excluded(base), Unbounded)).next() {
            if b - base < len {
                return Err(overlap((&b, e)));
            }
        }
        self.devices.insert(base, BusEntry { len, dev });
        Ok(())
    }

    /// Unmaps the device inserted at exactly `base`, returning it.
    pub fn remove(&mut self, base: u64) -> Option<SharedDevice> {
        self.devices.remove(&base).map(|e| e.dev)
    }

    /// The device containing the whole access `[addr, addr + len)`, with the access offset
    /// relative to the device base. `None` when the access would not be forwarded (see the type
    /// docs).
    pub fn resolve(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        if len == 0 || len > MAX_ACCESS_LEN {
            return None;
        }
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // `len <= 8`, so the cast is lossless; checked_add guards offsets near u64::MAX.
        let end = offset.checked_add(len as u64)?;
        (end <= entry.len).then_some((&entry.dev, offset))
    }

    /// The `(base, len, device)` of the range containing `addr`, if any.
    pub fn get(&self, addr: u64) -> Option<(u64, u64, SharedDevice)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (base, entry.len, entry.dev.clone()))
    }

    /// Reads `data.len()` bytes at `addr`. Returns `false` (with `data` filled with `0xff`) when
    /// the access was not forwarded to a device.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Writes `data` at `addr`. Returns `false` when the access was not forwarded to a device.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => {
                self.unhandled.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Number of accesses (reads and writes) that were not forwarded to any device.
    pub fn unhandled(&self) -> u64 {
        self.unhandled.load(Ordering::Relaxed)
    }

    /// The mapped `(base, len)` ranges in address order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.devices.iter().map(|(&b, e)| (b, e.len))
    }

    /// Number of mapped devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device is mapped.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test inputs are small, known values"
)]
mod tests {
    use super::*;

    /// Records every access; reads return `offset + i` for byte `i`.
    #[derive(Default)]
    struct Recorder {
        log: Vec<(bool, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
            self.log.push((false, offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.push((true, offset, data.to_vec()));
        }
    }

    fn rec() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn bus_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Bus>();
        check::<SharedDevice>();
    }

    #[test]
    fn insert_refuses_overlaps_and_accepts_adjacent() {
        let mut bus = Bus::new();
        bus.insert(rec(), 0x100, 0x10).unwrap();
        // Adjacent on both sides.
        bus.insert(rec(), 0xf0, 0x10).unwrap();
        bus.insert(rec(), 0x110, 0x8).unwrap();
        for (base, len) in [
            (0x100, 0x10),
            (0x100, 1),
            (0x10f, 1),
            (0xff, 2),
            (0x80, 0x100),
            (0x117, 4),
            (0x105, 0x1),
            (0, 0xf1),
        ] {
            let err = bus.insert(rec(), base, len).unwrap_err();
            assert!(
                matches!(err, Error::Overlap { .. }),
                "{base:#x}+{len:#x}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&format!("{base:#x}")), "{msg}");
        }
        let msg = bus.insert(rec(), 0x108, 4).unwrap_err().to_string();
        assert_eq!(
            msg,
            "bus range [0x108, 0x108+0x4) overlaps the device at [0x100, 0x100+0x10)"
        );
        assert_eq!(
            bus.ranges().collect::<Vec<_>>(),
            vec![(0xf0, 0x10), (0x100, 0x10), (0x110, 0x8)]
        );
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn insert_refuses_zero_length_and_wraparound() {
        let mut bus = Bus::new();
        assert!(matches!(
            bus.insert(rec(), 0x10, 0),
            Err(Error::ZeroLength { base: 0x10 })
        ));
        assert!(matches!(
            bus.insert(rec(), u64::MAX, 2),
            Err(Error::RangeOverflow { .. })
        ));
        // Ending exactly at 2^64 is fine.
        bus.insert(rec(), u64::MAX - 7, 8).unwrap();
        assert!(!bus.is_empty());
        let mut d = [0u8; 8];
        assert!(bus.read(u64::MAX - 7, &mut d));
        assert!(bus.read(u64::MAX, &mut d[..1]));
        assert!(!bus.read(u64::MAX, &mut d[..2]));
        assert!(!bus.write(u64::MAX - 1, &[0; 4]));
    }

    #[test]
    fn lookup_passes_offsets() {
        let mut bus = Bus::new();
        let a = rec();
        let b = rec();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x1000, 0x100).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x3fd, &mut d[..1]));
        assert_eq!(d[0], 5);
        assert!(bus.write(0x3f8, &[0x41]));
        assert!(bus.read(0x10fe, &mut d));
        assert_eq!(d, [0xfe, 0xff]);
        assert!(bus.write(0x1000, &[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(
            a.lock().unwrap().log,
            vec![(false, 5, vec![5]), (true, 0, vec![0x41])]
        );
        assert_eq!(
            b.lock().unwrap().log,
            vec![
                (false, 0xfe, vec![0xfe, 0xff]),
                (true, 0, (1..=8).collect())
            ]
        );
        assert_eq!(bus.unhandled(), 0);
        let (base, len, _) = bus.get(0x1050).unwrap();
        assert_eq!((base, len), (0x1000, 0x100));
        assert!(bus.get(0x1100).is_none());
        assert!(bus.get(0x3f7).is_none());
    }

    #[test]
    fn straddle_and_misses_are_not_forwarded_and_counted() {
        let mut bus = Bus::new();
        let a = rec();
        bus.insert(a.clone(), 0x60, 5).unwrap();
        let mut d = [0u8; 4];
        // Straddles the end (0x63..0x67 vs 0x60..0x65).
        assert!(!bus.read(0x63, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.write(0x64, &[1, 2]));
        // Nothing there, below, between and above.
        let mut d1 = [0u8];
        assert!(!bus.read(0x5f, &mut d1));
        assert_eq!(d1, [0xff]);
        assert!(!bus.read(0x65, &mut d1));
        assert!(!bus.write(0x511, &[0]));
        assert!(!bus.write(0, &[0]));
        assert_eq!(bus.unhandled(), 6);
        assert!(a.lock().unwrap().log.is_empty());
        // Still fine right at the end.
        assert!(bus.read(0x64, &mut d1));
        assert_eq!(bus.unhandled(), 6);
    }

    #[test]
    fn every_length_is_safe() {
        let mut bus = Bus::new();
        bus.insert(rec(), 0x100, 0x10).unwrap();
        for len in 0..=64usize {
            for addr in [0xf8u64, 0xff, 0x100, 0x108, 0x10f, 0x110, u64::MAX] {
                let mut d = vec![0u8; len];
                let handled = bus.read(addr, &mut d);
                let fits = (1..=MAX_ACCESS_LEN).contains(&len)
                    && addr >= 0x100
                    && addr.saturating_add(len as u64) <= 0x110;
                assert_eq!(handled, fits, "read {addr:#x} len {len}");
                if !handled {
                    assert!(d.iter().all(|&b| b == 0xff));
                }
                assert_eq!(bus.write(addr, &d), fits, "write {addr:#x} len {len}");
            }
        }
    }

    #[test]
    fn poisoned_device_does_not_take_the_bus_down() {
        struct Panicky;
        impl BusDevice for Panicky {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data.fill(7);
            }
            fn write(&mut self, _offset: u64, _data: &[u8]) {}
        }
        let dev: Arc<Mutex<Panicky>> = Arc::new(Mutex::new(Panicky));
        let d2 = dev.clone();
        let _ = std::thread::spawn(move || {
            let _g = d2.lock().unwrap();
            panic!("poison the device");
        })
        .join();
        let mut bus = Bus::new();
        bus.insert(dev, 0x10, 1).unwrap();
        let mut d = [0u8];
        assert!(bus.read(0x10, &mut d));
        assert_eq!(d, [7]);
        assert!(bus.write(0x10, &[1]));
    }

    #[test]
    fn remove_unmaps() {
        let mut bus = Bus::new();
        bus.insert(rec(), 0x10, 4).unwrap();
        assert!(bus.remove(0x11).is_none());
        assert!(bus.remove(0x10).is_some());
        assert!(!bus.write(0x10, &[0]));
        bus.insert(rec(), 0x10, 4).unwrap();
        assert!(format!("{bus:?}").contains("0x10+0x4"));
    }

    #[test]
    fn concurrent_access_from_threads() {
        let mut bus = Bus::new();
        let a = rec();
        bus.insert(a.clone(), 0x10, 8).unwrap();
        let bus = Arc::new(bus);
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..250 {
                        bus.write(0x10 + i, &[i as u8]);
                        bus.write(0x20, &[0]);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(a.lock().unwrap().log.len(), 1000);
        assert_eq!(bus.unhandled(), 1000);
    }
}
