//! Ring-3 access to physical memory and MMIO through the probe's identity map (virtual =
//! physical, every page User + Writable), with a bounds check against the mapped range so a
//! bad table pointer becomes a `FAIL` line instead of a page fault.

use core::sync::atomic::Ordering;

use crate::setup::MAPPED_END;

/// Whether `[addr, addr + len)` is inside the identity map and does not start at 0.
pub fn mapped(addr: u64, len: u64) -> bool {
    addr != 0
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= MAPPED_END.load(Ordering::Relaxed))
}

/// Reads a byte. The caller has checked `mapped`.
pub fn rd8(addr: u64) -> u8 {
    // SAFETY: identity-mapped (checked by the caller); volatile because it may be MMIO.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Reads a little-endian u32 (any alignment).
pub fn rd32(addr: u64) -> u32 {
    // SAFETY: as for `rd8`; x86 allows unaligned reads.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

/// Reads a little-endian u64 (any alignment).
pub fn rd64(addr: u64) -> u64 {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// A 32-bit MMIO read (one aligned `mov`).
pub fn mmio_rd32(addr: u64) -> u32 {
    // SAFETY: `addr` is a device register inside the identity map (checked by the caller).
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// A 32-bit MMIO write (one aligned `mov`).
pub fn mmio_wr32(addr: u64, value: u32) {
    // SAFETY: as for `mmio_rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// An 8-bit MMIO read.
pub fn mmio_rd8(addr: u64) -> u8 {
    // SAFETY: as for `mmio_rd32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// An 8-bit MMIO write.
pub fn mmio_wr8(addr: u64, value: u8) {
    // SAFETY: as for `mmio_rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// A 16-bit MMIO read.
pub fn mmio_rd16(addr: u64) -> u16 {
    // SAFETY: as for `mmio_rd32`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// A 16-bit MMIO write.
pub fn mmio_wr16(addr: u64, value: u16) {
    // SAFETY: as for `mmio_rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

/// A 64-bit MMIO write.
pub fn mmio_wr64(addr: u64, value: u64) {
    // SAFETY: as for `mmio_rd32`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, value) }
}

/// Sum of `len` bytes at `addr`, mod 256 (ACPI checksums).
pub fn sum8(addr: u64, len: u64) -> u8 {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(rd8(addr + i));
    }
    s
}
