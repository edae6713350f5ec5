//! Intel MultiProcessor Specification (1.4) table, for kernels built without
//! ACPI (Linux scans the top KiB of base memory, `0x9fc00`, for it).
//!
//! Written at [`MPTABLE_START`] (`0x9fc00`, EBDA_START, not RAM in the e820
//! map): the 16-byte floating pointer structure (`"_MP_"`, spec revision 1.4,
//! no default configuration, virtual wire mode), immediately followed by the
//! configuration table (`"PCMP"`) with, in order:
//!
//! * one processor entry per vCPU (APIC id = vCPU index, enabled, vCPU 0 is
//!   the bootstrap processor);
//! * one bus entry: bus 0, `"ISA   "`;
//! * the IOAPIC: id = number of vCPUs, version 0x11, usable, `0xfec00000`;
//! * I/O interrupt entries for ISA IRQs 0..15 (except 2, the cascade):
//!   IRQ 0 -> IOAPIC pin [`TIMER_GSI`] (2), as in the ACPI MADT's interrupt
//!   source override, and IRQ n -> pin n otherwise (bus-default polarity and
//!   trigger: active high, edge);
//! * local interrupt entries: ExtINT on LINT0 and NMI on LINT1 of every
//!   local APIC.
//!
//! Both structures are checksummed. For 1 vCPU the whole thing is 232 bytes,
//! for 32 vCPUs 852 bytes (ending at `0x9ff54`).
//!
//! # Example
//!
//! ```
//! use ember_boot::mptable::{write_mptable, MPTABLE_START};
//! use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let mem = create_guest_memory(&MemoryLayout::new(128 * MIB)?, DirtyBitmap::Off)?;
//! write_mptable(&mem, 4)?;
//! let mut sig = [0u8; 4];
//! mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))?;
//! assert_eq!(&sig, b"_MP_");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::acpi::{check_vcpus, ACPI_TABLES_START, IOAPIC_ADDR, LAPIC_ADDR, TIMER_GSI};
use crate::{write_slice, Error};

/// Guest address of the MP floating pointer structure (EBDA_START; the top
/// KiB of 640 KiB base memory).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// The MP table must end by this address (the start of the ACPI region).
pub const MPTABLE_LIMIT: u64 = ACPI_TABLES_START;
/// Size of the floating pointer structure.
pub const FLOATING_POINTER_SIZE: usize = 16;
/// Size of the configuration table header.
pub const CONFIG_HEADER_SIZE: usize = 44;
/// Size of a processor entry.
pub const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Size of every other entry (bus, IOAPIC, interrupt assignments).
pub const ENTRY_SIZE: usize = 8;

/// MP specification revision 1.4.
pub const MP_SPEC_REV: u8 = 4;
/// OEM ID of the configuration table.
pub const OEM_ID: [u8; 8] = *b"EMBER   ";
/// Product ID of the configuration table.
pub const PRODUCT_ID: [u8; 12] = *b"EMBER VM    ";
/// Local APIC version reported in processor entries (KVM's in-kernel LAPIC).
pub const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version reported in the IOAPIC entry (KVM's in-kernel IOAPIC).
pub const IOAPIC_VERSION: u8 = 0x11;
/// ISA bus id.
pub const ISA_BUS_ID: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// CPU signature: family 6, model 0, stepping 0.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX feature flags: FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_USABLE: u8 = 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags: polarity and trigger conform to the bus.
const INT_FLAGS_CONFORMING: u16 = 0;
/// Destination local APIC id meaning "all local APICs".
const ALL_LOCAL_APICS: u8 = 0xff;
/// Number of ISA IRQs.
const ISA_IRQS: u8 = 16;
/// ISA IRQ of the PIC cascade (no entry).
const ISA_CASCADE_IRQ: u8 = 2;

/// Number of I/O interrupt entries (ISA IRQs except the cascade).
const IO_INTERRUPT_ENTRIES: usize = ISA_IRQS as usize - 1;

/// Size of the MP table (floating pointer + configuration table) for
/// `vcpus` vCPUs.
pub const fn mptable_size(vcpus: u8) -> usize {
    FLOATING_POINTER_SIZE
        + CONFIG_HEADER_SIZE
        + vcpus as usize * PROCESSOR_ENTRY_SIZE
        + (2 + IO_INTERRUPT_ENTRIES + 2) * ENTRY_SIZE
}

/// `(ISA IRQ, IOAPIC pin)` pairs of the I/O interrupt entries.
pub fn isa_irq_pins() -> impl Iterator<Item = (u8, u8)> {
    #[allow(clippy::cast_possible_truncation, reason = "TIMER_GSI is 2")]
    const TIMER_PIN: u8 = TIMER_GSI as u8;
    (0..ISA_IRQS)
        .filter(|&irq| irq != ISA_CASCADE_IRQ)
        .map(|irq| (irq, if irq == 0 { TIMER_PIN } else { irq }))
}

/// 8-bit value making `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP table for `vcpus` vCPUs (`1..=32`) as it is laid out at
/// [`MPTABLE_START`]: floating pointer, then the configuration table.
pub fn build_mptable(vcpus: u8) -> Result<Vec<u8>, Error> {
    check_vcpus(vcpus)?;
    let size = mptable_size(vcpus);
    let available = MPTABLE_LIMIT - MPTABLE_START;
    if size as u64 > available {
        return Err(Error::TablesTooLarge {
            what: "MP table",
            size: size as u64,
            available,
        });
    }
    let config_addr = MPTABLE_START + FLOATING_POINTER_SIZE as u64;

    let mut t = Vec::with_capacity(size);
    // Floating pointer structure.
    t.extend_from_slice(b"_MP_");
    #[allow(
        clippy::cast_possible_truncation,
        reason = "MPTABLE_START + 16 is below 1 MiB, so it fits in 32 bits"
    )]
    let config_addr32 = config_addr as u32;
    t.extend_from_slice(&config_addr32.to_le_bytes());
    t.push(1); // length in 16-byte units
    t.push(MP_SPEC_REV);
    t.push(0); // checksum
    t.extend_from_slice(&[0; 5]); // features: config table present, virtual wire mode
    t[10] = checksum(&t[..FLOATING_POINTER_SIZE]);

    // Configuration table header; length, entry count and checksum below.
    let c = t.len();
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes()); // base table length
    t.push(MP_SPEC_REV);
    t.push(0); // checksum
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&PRODUCT_ID);
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    let mut entries = 0u16;

    for id in 0..vcpus {
        let flags = if id == 0 {
            CPU_ENABLED | CPU_BOOTSTRAP
        } else {
            CPU_ENABLED
        };
        t.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    t.extend_from_slice(b"ISA   ");
    let ioapic_id = vcpus;
    t.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE]);
    t.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries += 2;
    for (irq, pin) in isa_irq_pins() {
        t.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        t.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        t.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, pin]);
        entries += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        t.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        t.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        t.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        entries += 1;
    }
    debug_assert_eq!(t.len(), size);

    #[allow(
        clippy::cast_possible_truncation,
        reason = "at most 44 + 32 * 20 + 19 * 8 bytes: fits in u16"
    )]
    let config_len = (t.len() - c) as u16;
    t[c + 4..c + 6].copy_from_slice(&config_len.to_le_bytes());
    t[c + 34..c + 36].copy_from_slice(&entries.to_le_bytes());
    t[c + 7] = checksum(&t[c..]);
    Ok(t)
}

/// Writes the MP table for `vcpus` vCPUs (`1..=32`, else
/// [`Error::InvalidVcpuCount`]) at [`MPTABLE_START`].
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, vcpus: u8) -> Result<(), Error> {
    let table = build_mptable(vcpus)?;
    write_slice(mem, "MP table", GuestAddress(MPTABLE_START), &table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::GuestRam;
    use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, EBDA_START, MIB};
    use vm_memory::Bytes;

    fn read(m: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Parses the table the way Linux's mpparse does and checks every entry.
    fn check(m: &GuestRam, vcpus: u8) {
        let mpf = read(m, MPTABLE_START, 16);
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!((mpf[8], mpf[9]), (1, 4));
        assert_eq!(sum(&mpf), 0);
        assert_eq!(&mpf[11..16], &[0; 5]);
        let config = u32_at(&mpf, 4) as u64;
        assert_eq!(config, MPTABLE_START + 16);

        let hdr = read(m, config, 44);
        assert_eq!(&hdr[0..4], b"PCMP");
        assert_eq!(hdr[6], 4);
        let len = u16_at(&hdr, 4) as usize;
        let table = read(m, config, len);
        assert_eq!(sum(&table), 0);
        assert_eq!(&table[8..16], b"EMBER   ");
        assert_eq!(u32_at(&table, 36), 0xfee0_0000);
        let count = u16_at(&table, 34) as usize;
        assert!(config + len as u64 <= ACPI_TABLES_START);

        let mut off = 44;
        let (mut cpus, mut buses, mut ioapics, mut ints, mut lints) =
            (Vec::new(), 0, 0, Vec::new(), Vec::new());
        for _ in 0..count {
            let e = &table[off..];
            match e[0] {
                0 => {
                    assert_eq!(e[2], 0x14);
                    let bsp = if e[1] == 0 { 2 } else { 0 };
                    assert_eq!(e[3], 1 | bsp);
                    assert_eq!(u32_at(e, 8) & (1 << 9), 1 << 9);
                    cpus.push(e[1]);
                    off += 20;
                }
                1 => {
                    assert_eq!(&e[1..8], b"\0ISA   ");
                    buses += 1;
                    off += 8;
                }
                2 => {
                    assert_eq!(&e[1..4], &[vcpus, 0x11, 1]);
                    assert_eq!(u32_at(e, 4), 0xfec0_0000);
                    ioapics += 1;
                    off += 8;
                }
                3 => {
                    assert_eq!((e[1], u16_at(e, 2), e[4], e[6]), (0, 0, 0, vcpus));
                    ints.push((e[5], e[7]));
                    off += 8;
                }
                4 => {
                    assert_eq!((u16_at(e, 2), e[4], e[5], e[6]), (0, 0, 0, 0xff));
                    lints.push((e[1], e[7]));
                    off += 8;
                }
                ty => panic!("unexpected entry type {ty}"),
            }
        }
        assert_eq!(off, len);
        assert_eq!(cpus, (0..vcpus).collect::<Vec<_>>());
        assert_eq!((buses, ioapics), (1, 1));
        let mut want = vec![(0, 2), (1, 1)];
        want.extend((3..16).map(|i| (i, i)));
        assert_eq!(ints, want);
        assert_eq!(lints, [(3, 0), (1, 1)]);
        assert_eq!(16 + len, mptable_size(vcpus));
    }

    #[test]
    fn mptable_parses_back() {
        for vcpus in [1u8, 2, 4, 32] {
            let m = create_guest_memory(&MemoryLayout::new(128 * MIB).unwrap(), DirtyBitmap::Off)
                .unwrap();
            write_mptable(&m, vcpus).unwrap();
            check(&m, vcpus);
        }
        assert_eq!(MPTABLE_START, EBDA_START);
        assert_eq!(mptable_size(1), 232);
        assert_eq!(mptable_size(32), 852);
        assert!(MPTABLE_START + mptable_size(32) as u64 <= 0xa0000);
    }

    #[test]
    fn mptable_errors() {
        let m =
            create_guest_memory(&MemoryLayout::new(16 * MIB).unwrap(), DirtyBitmap::Off).unwrap();
        for vcpus in [0u8, 33] {
            assert!(matches!(
                write_mptable(&m, vcpus),
                Err(Error::InvalidVcpuCount { max: 32, .. })
            ));
        }
        let small =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9fc00)]).unwrap();
        assert!(matches!(
            write_mptable(&small, 1),
            Err(Error::GuestWrite {
                what: "MP table",
                ..
            })
        ));
    }
}
