//! Boot structures for Ember microVMs (x86_64).
//!
//! Pure functions that write what a guest expects to find in memory at its
//! first instruction:
//!
//! * [`write_zero_page`]: the Linux `boot_params` "zero page" for the 64-bit
//!   Linux boot protocol (command line, initrd, e820 map, setup header);
//! * [`write_pvh_start_info`]: the PVH `hvm_start_info`, its memory map table
//!   and module list (initrd);
//! * [`gdt`]: the boot GDT (long mode or 32-bit protected mode) and an empty IDT;
//! * [`paging`]: identity page tables for the first GiB (2 MiB pages);
//! * [`write_boot_params`]: all of the above for one boot protocol, plus the command line,
//!   returning the boot vCPU's starting registers ([`BootRegs`]).
//!
//! They only write guest memory through [`vm_memory::Bytes`]; errors are
//! typed ([`Error`]) and no guest-controlled input can make them panic.
//!
//! # Example
//!
//! ```
//! use ember_boot::{gdt, paging, write_pvh_start_info, write_zero_page};
//! use ember_boot::{LinuxBootParams, PvhBootParams};
//! use ember_memory::addresses::*;
//! use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let layout = MemoryLayout::new(64 * MIB)?;
//! let mem = create_guest_memory(&layout, DirtyBitmap::Off)?;
//! let e820 = layout.e820();
//!
//! // 64-bit Linux boot protocol.
//! let linux = LinuxBootParams {
//!     setup_header: None,
//!     cmdline_addr: GuestAddress(CMDLINE_ADDR),
//!     cmdline_size: 12,
//!     initrd: None,
//!     e820: &e820,
//!     acpi_rsdp_addr: None,
//! };
//! write_zero_page(&mem, GuestAddress(ZERO_PAGE_ADDR), &linux)?;
//! assert_eq!(mem.read_obj::<u16>(GuestAddress(ZERO_PAGE_ADDR + 0x1fe)).unwrap(), 0xaa55);
//!
//! gdt::write_gdt(&mem, GuestAddress(GDT_ADDR), &gdt::LONG_MODE)?;
//! gdt::write_idt(&mem, GuestAddress(IDT_ADDR))?;
//! let cr3 = paging::write_identity_page_tables(&mem)?;
//! assert_eq!(cr3, GuestAddress(PML4_ADDR));
//!
//! // PVH boot protocol.
//! let pvh = PvhBootParams {
//!     cmdline_addr: GuestAddress(CMDLINE_ADDR),
//!     initrd: Some((GuestAddress(60 * MIB), 4096)),
//!     memmap: &e820,
//!     rsdp_addr: None,
//! };
//! write_pvh_start_info(
//!     &mem,
//!     GuestAddress(PVH_START_INFO_ADDR),
//!     GuestAddress(PVH_MEMMAP_ADDR),
//!     &pvh,
//! )?;
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(PVH_START_INFO_ADDR)).unwrap(), 0x336e_c578);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

use ember_memory::E820Entry;
use linux_loader::bootparam::{boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

/// Maximum number of e820 entries in the zero page (128).
pub const MAX_E820_ENTRIES: usize = E820_MAX_ENTRIES_ZEROPAGE;
/// Maximum number of entries accepted for the PVH memory map (128, as for
/// e820: with the default addresses, 128 entries plus the module list still
/// end below the zero page).
pub const MAX_PVH_MEMMAP_ENTRIES: usize = 128;

/// `boot_flag` value of a valid setup header.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value of a valid setup header ("HdrS").
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` written by Ember: 0xff, "undefined" boot loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` written when the kernel has no setup header (16 MiB).
pub const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// PVH `hvm_start_info.version` written by Ember (1: has the memory map).
pub const PVH_START_INFO_VERSION: u32 = 1;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line is too long or contains a NUL byte.
    #[error("a command line of {len} bytes (with its NUL) does not fit the {max}-byte boot protocol limit, or contains a NUL byte")]
    Cmdline {
        /// Bytes needed, NUL included.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The memory map has more entries than the table can hold.
    #[error("memory map has {count} entries, but the {table} holds at most {max}")]
    TooManyE820Entries {
        /// Number of entries given.
        count: usize,
        /// Maximum number of entries.
        max: usize,
        /// Which table ("zero page e820 table" or "PVH memory map").
        table: &'static str,
    },
    /// A structure would not fit in guest memory (address out of range).
    #[error("cannot write the {what} ({size} bytes) at guest address {addr:#x}: {source}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Guest physical address.
        addr: u64,
        /// Number of bytes.
        size: usize,
        /// The underlying vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The number of vCPUs is outside `1..=max` (ACPI MADT, MP table).
    #[error("{count} vCPUs requested, but the firmware tables describe 1 to {max}")]
    InvalidVcpuCount {
        /// Number of vCPUs requested.
        count: u8,
        /// Maximum number of vCPUs.
        max: u8,
    },
    /// A device given to the ACPI table builder cannot be described.
    #[error("ACPI device #{index} cannot be described: {reason}")]
    InvalidAcpiDevice {
        /// Index of the device in [`acpi::AcpiConfig::devices`].
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Firmware tables do not fit the guest memory region reserved for them.
    #[error("the {what} need {size} bytes, but only {available} bytes are reserved for them")]
    TablesTooLarge {
        /// Which tables ("ACPI tables" or "MP table").
        what: &'static str,
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        available: u64,
    },
    /// An address computation overflowed `u64`.
    #[error(
        "the {what} at guest address {addr:#x} would extend past the end of the address space"
    )]
    AddressOverflow {
        /// What was being placed.
        what: &'static str,
        /// Base guest physical address.
        addr: u64,
    },
}

/// Writes `val` at `addr`, mapping errors to [`Error::GuestWrite`].
fn write_obj<M: GuestMemoryBackend, T: ByteValued>(
    mem: &M,
    what: &'static str,
    addr: GuestAddress,
    val: T,
) -> Result<(), Error> {
    mem.write_obj(val, addr)
        .map_err(|source| Error::GuestWrite {
            what,
            addr: addr.0,
            size: std::mem::size_of::<T>(),
            source,
        })
}

/// Writes `buf` at `addr`, mapping errors to [`Error::GuestWrite`].
fn write_slice<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    addr: GuestAddress,
    buf: &[u8],
) -> Result<(), Error> {
    mem.write_slice(buf, addr)
        .map_err(|source| Error::GuestWrite {
            what,
            addr: addr.0,
            size: buf.len(),
            source,
        })
}

/// `base + index * size`, or [`Error::AddressOverflow`].
fn offset_addr(
    what: &'static str,
    base: GuestAddress,
    index: usize,
    size: usize,
) -> Result<GuestAddress, Error> {
    (index as u64)
        .checked_mul(size as u64)
        .and_then(|off| base.0.checked_add(off))
        .map(GuestAddress)
        .ok_or(Error::AddressOverflow { what, addr: base.0 })
}

/// Inputs of [`write_zero_page`] (64-bit Linux boot protocol).
#[derive(Clone, Copy, Debug)]
pub struct LinuxBootParams<'a> {
    /// The kernel's setup header (bzImage), copied into the zero page; `None`
    /// for an ELF vmlinux, in which case a minimal header is synthesized.
    pub setup_header: Option<setup_header>,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: GuestAddress,
    /// Command line size in bytes, including the NUL.
    pub cmdline_size: u32,
    /// Initrd `(address, size)`, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Memory map (at most [`MAX_E820_ENTRIES`] entries).
    pub e820: &'a [E820Entry],
    /// Guest address of the ACPI RSDP (`acpi_rsdp_addr`, boot protocol 2.14+), if any.
    pub acpi_rsdp_addr: Option<GuestAddress>,
}

/// Builds the zero page for `p` (without writing it).
///
/// Without a setup header: `boot_flag` 0xaa55, `header` "HdrS",
/// `kernel_alignment` 16 MiB. Always: `type_of_loader` 0xff, `cmd_line_ptr`
/// (high half in `ext_cmd_line_ptr`), `cmdline_size`, `ramdisk_image` /
/// `ramdisk_size` (high halves in `ext_ramdisk_*`), `e820_table` /
/// `e820_entries`.
pub fn build_zero_page(p: &LinuxBootParams) -> Result<boot_params, Error> {
    if p.e820.len() > MAX_E820_ENTRIES {
        return Err(Error::TooManyE820Entries {
            count: p.e820.len(),
            max: MAX_E820_ENTRIES,
            table: "zero page e820 table",
        });
    }
    let mut params = boot_params::default();
    match p.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    let cmdline = p.cmdline_addr.0;
    params.hdr.cmd_line_ptr = low_u32(cmdline);
    params.ext_cmd_line_ptr = (cmdline >> 32) as u32;
    params.hdr.cmdline_size = p.cmdline_size;

    let (initrd_addr, initrd_size) = p.initrd.map(|(a, s)| (a.0, s)).unwrap_or((0, 0));
    params.hdr.ramdisk_image = low_u32(initrd_addr);
    params.ext_ramdisk_image = (initrd_addr >> 32) as u32;
    params.hdr.ramdisk_size = low_u32(initrd_size);
    params.ext_ramdisk_size = (initrd_size >> 32) as u32;

    params.acpi_rsdp_addr = p.acpi_rsdp_addr.map_or(0, |a| a.0);

    #[allow(
        clippy::cast_possible_truncation,
        reason = "checked above: at most E820_MAX_ENTRIES_ZEROPAGE (128) entries"
    )]
    let e820_entries = p.e820.len() as u8;
    params.e820_entries = e820_entries;
    for (slot, entry) in params.e820_table.iter_mut().zip(p.e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind.into();
    }
    Ok(params)
}

/// The low 32 bits of `v` (the zero page splits 64-bit addresses and sizes in two halves).
#[allow(
    clippy::cast_possible_truncation,
    reason = "low half of a 64-bit value; the high half goes in the ext_* field"
)]
fn low_u32(v: u64) -> u32 {
    v as u32
}

/// Writes the Linux zero page (`boot_params`, 4 KiB) at `addr`; see
/// [`build_zero_page`] for the fields set.
pub fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    p: &LinuxBootParams,
) -> Result<(), Error> {
    let params = build_zero_page(p)?;
    write_obj(mem, "zero page", addr, params)
}

/// Inputs of [`write_pvh_start_info`] (PVH boot protocol).
#[derive(Clone, Copy, Debug)]
pub struct PvhBootParams<'a> {
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: GuestAddress,
    /// Initrd `(address, size)`, passed as the single module, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Memory map (at most [`MAX_PVH_MEMMAP_ENTRIES`] entries).
    pub memmap: &'a [E820Entry],
    /// ACPI RSDP address, if the VM has ACPI tables.
    pub rsdp_addr: Option<GuestAddress>,
}

/// Where [`write_pvh_start_info`] puts the module list: right after a memory
/// map of `memmap_entries` entries at `memmap_addr`, 8-byte aligned.
pub fn pvh_modlist_addr(
    memmap_addr: GuestAddress,
    memmap_entries: usize,
) -> Result<GuestAddress, Error> {
    let end = offset_addr(
        "PVH memory map",
        memmap_addr,
        memmap_entries,
        std::mem::size_of::<hvm_memmap_table_entry>(),
    )?;
    end.0
        .checked_add(7)
        .map(|a| GuestAddress(a & !7))
        .ok_or(Error::AddressOverflow {
            what: "PVH module list",
            addr: end.0,
        })
}

/// Writes the PVH `hvm_start_info` (magic 0x336ec578, version 1) at
/// `start_info_addr`, the memory map table at `memmap_addr` and, with an
/// initrd, one `hvm_modlist_entry` right after the memory map (see
/// [`pvh_modlist_addr`]).
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    start_info_addr: GuestAddress,
    memmap_addr: GuestAddress,
    p: &PvhBootParams,
) -> Result<(), Error> {
    if p.memmap.len() > MAX_PVH_MEMMAP_ENTRIES {
        return Err(Error::TooManyE820Entries {
            count: p.memmap.len(),
            max: MAX_PVH_MEMMAP_ENTRIES,
            table: "PVH memory map",
        });
    }
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>();
    for (i, e) in p.memmap.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.into(),
            reserved: 0,
        };
        let at = offset_addr("PVH memory map", memmap_addr, i, entry_size)?;
        write_obj(mem, "PVH memory map entry", at, entry)?;
    }

    #[allow(
        clippy::cast_possible_truncation,
        reason = "checked above: at most MAX_PVH_MEMMAP_ENTRIES (128)"
    )]
    let memmap_entries = p.memmap.len() as u32;
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: PVH_START_INFO_VERSION,
        cmdline_paddr: p.cmdline_addr.0,
        rsdp_paddr: p.rsdp_addr.map_or(0, |a| a.0),
        memmap_paddr: memmap_addr.0,
        memmap_entries,
        ..Default::default()
    };

    if let Some((addr, size)) = p.initrd {
        let modlist = pvh_modlist_addr(memmap_addr, p.memmap.len())?;
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        write_obj(mem, "PVH module list", modlist, module)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist.0;
    }

    write_obj(mem, "PVH start info", start_info_addr, start_info)
}

pub mod acpi;
mod configure;
pub mod mptable;

pub use configure::{write_boot_params, BootConfig, BootEntry, BootRegs, EntryMode};

/// Boot GDT and IDT.
pub mod gdt {
    use super::{write_obj, write_slice, Error};
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    /// Builds a segment descriptor from `flags` (access byte in bits 0..8,
    /// flags nibble G/DB/L/AVL in bits 12..16), a 32-bit `base` and a 20-bit
    /// `limit`.
    pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
        ((base as u64 & 0xff00_0000) << 32)
            | ((flags as u64 & 0x0000_f0ff) << 40)
            | ((limit as u64 & 0x000f_0000) << 32)
            | ((base as u64 & 0x00ff_ffff) << 16)
            | (limit as u64 & 0x0000_ffff)
    }

    /// Task state segment descriptor shared by both tables: base 0, limit
    /// 0x67 (a minimal 104-byte TSS), byte granularity, present, type 0xb
    /// (busy 32/64-bit TSS), valid for TR in both protected and long mode.
    pub const TSS: u64 = gdt_entry(0x008b, 0, 0x67);

    /// Long mode GDT: null, 64-bit code (L=1, G=1, DPL 0), flat data, TSS.
    pub const LONG_MODE: [u64; 4] = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        TSS,
    ];

    /// 32-bit protected mode GDT (PVH entry): null, flat 32-bit code
    /// (D=1, G=1), flat data, TSS.
    pub const PROTECTED_MODE: [u64; 4] = [
        0,
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        TSS,
    ];

    /// Code segment selector (GDT index 1).
    pub const CODE_SELECTOR: u16 = 0x08;
    /// Data segment selector (GDT index 2).
    pub const DATA_SELECTOR: u16 = 0x10;
    /// TSS selector (GDT index 3).
    pub const TSS_SELECTOR: u16 = 0x18;

    /// Writes `table` (little-endian descriptors) at `addr`.
    pub fn write_gdt<M: GuestMemoryBackend>(
        mem: &M,
        addr: GuestAddress,
        table: &[u64],
    ) -> Result<(), Error> {
        let bytes: Vec<u8> = table.iter().flat_map(|d| d.to_le_bytes()).collect();
        write_slice(mem, "GDT", addr, &bytes)
    }

    /// Writes an IDT of one zero (not present) descriptor at `addr`.
    pub fn write_idt<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress) -> Result<(), Error> {
        write_obj(mem, "IDT", addr, 0u64)
    }
}

/// Boot identity page tables.
pub mod paging {
    use super::{write_slice, Error};
    use ember_memory::addresses::{PDPT_ADDR, PD_ADDR, PML4_ADDR};
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    /// Page table entry bit: present.
    pub const PTE_PRESENT: u64 = 1 << 0;
    /// Page table entry bit: writable.
    pub const PTE_RW: u64 = 1 << 1;
    /// Page directory entry bit: large (2 MiB) page.
    pub const PTE_PS: u64 = 1 << 7;
    /// Size of the identity mapping (1 GiB).
    pub const IDENTITY_MAP_SIZE: u64 = 1 << 30;

    fn page(entries: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        for (slot, e) in buf.chunks_exact_mut(8).zip(entries) {
            slot.copy_from_slice(&e.to_le_bytes());
        }
        buf
    }

    /// Writes identity page tables for the first GiB of guest physical
    /// memory with 2 MiB pages: PML4 at `PML4_ADDR` -> PDPT at `PDPT_ADDR` ->
    /// PD at `PD_ADDR` with 512 entries (present | rw | ps). The three pages
    /// are written whole (unused entries zeroed). Returns the PML4 address,
    /// the value for CR3.
    pub fn write_identity_page_tables<M: GuestMemoryBackend>(
        mem: &M,
    ) -> Result<GuestAddress, Error> {
        let pml4 = page([PDPT_ADDR | PTE_PRESENT | PTE_RW]);
        let pdpt = page([PD_ADDR | PTE_PRESENT | PTE_RW]);
        let pd = page((0..512u64).map(|i| (i << 21) | PTE_PRESENT | PTE_RW | PTE_PS));
        write_slice(mem, "PML4", GuestAddress(PML4_ADDR), &pml4)?;
        write_slice(mem, "PDPT", GuestAddress(PDPT_ADDR), &pdpt)?;
        write_slice(mem, "page directory", GuestAddress(PD_ADDR), &pd)?;
        Ok(GuestAddress(PML4_ADDR))
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test inputs are small, known values"
)]
mod tests {
    use super::*;
    use ember_memory::addresses::*;
    use ember_memory::GuestRam;
    use ember_memory::{create_guest_memory, DirtyBitmap, E820Kind, MemoryLayout, GIB, MIB};

    fn mem(size: u64) -> GuestRam {
        create_guest_memory(&MemoryLayout::new(size).unwrap(), DirtyBitmap::Off).unwrap()
    }

    fn rd<T: ByteValued>(mem: &GuestRam, addr: u64) -> T {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn e820_4_5g() -> Vec<E820Entry> {
        MemoryLayout::new(4 * GIB + 512 * MIB).unwrap().e820()
    }

    #[test]
    fn zero_page_without_setup_header() {
        let m = mem(64 * MIB);
        let e820 = e820_4_5g();
        let p = LinuxBootParams {
            setup_header: None,
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            cmdline_size: 42,
            initrd: Some((GuestAddress(0x3c0_0000), 0x12_3456)),
            e820: &e820,
            acpi_rsdp_addr: None,
        };
        // Garbage first, to see every written field and that the rest is zeroed.
        m.write_slice(&[0x5a; 4096], GuestAddress(ZERO_PAGE_ADDR))
            .unwrap();
        write_zero_page(&m, GuestAddress(ZERO_PAGE_ADDR), &p).unwrap();
        let z = ZERO_PAGE_ADDR;
        assert_eq!(rd::<u16>(&m, z + 0x1fe), 0xaa55); // boot_flag
        assert_eq!(rd::<u32>(&m, z + 0x202), 0x5372_6448); // header "HdrS"
        assert_eq!(&rd::<[u8; 4]>(&m, z + 0x202), b"HdrS");
        assert_eq!(rd::<u8>(&m, z + 0x210), 0xff); // type_of_loader
        assert_eq!(rd::<u32>(&m, z + 0x230), 0x0100_0000); // kernel_alignment
        assert_eq!(rd::<u32>(&m, z + 0x228), CMDLINE_ADDR as u32); // cmd_line_ptr
        assert_eq!(rd::<u32>(&m, z + 0x0c8), 0); // ext_cmd_line_ptr
        assert_eq!(rd::<u32>(&m, z + 0x238), 42); // cmdline_size
        assert_eq!(rd::<u32>(&m, z + 0x218), 0x3c0_0000); // ramdisk_image
        assert_eq!(rd::<u32>(&m, z + 0x21c), 0x12_3456); // ramdisk_size
        assert_eq!(rd::<u32>(&m, z + 0x0c0), 0); // ext_ramdisk_image
        assert_eq!(rd::<u32>(&m, z + 0x0c4), 0); // ext_ramdisk_size
        assert_eq!(rd::<u8>(&m, z + 0x1e8), e820.len() as u8); // e820_entries
        for (i, e) in e820.iter().enumerate() {
            let at = z + 0x2d0 + 20 * i as u64;
            assert_eq!(rd::<u64>(&m, at), e.addr);
            assert_eq!(rd::<u64>(&m, at + 8), e.size);
            assert_eq!(rd::<u32>(&m, at + 16), u32::from(e.kind));
        }
        assert_eq!(rd::<u64>(&m, z + 0x2d0 + 20 * 3), 0x1_0000_0000);
        assert_eq!(rd::<u64>(&m, z + 0x2d0 + 20 * 3 + 8), 0x5000_0000);
        // The 5th e820 slot and unrelated fields are zero.
        assert_eq!(rd::<[u8; 20]>(&m, z + 0x2d0 + 80), [0; 20]);
        assert_eq!(rd::<u8>(&m, z + 0x1f1), 0); // setup_sects
        assert_eq!(rd::<u64>(&m, z), 0);
        assert_eq!(rd::<u64>(&m, z + 4088), 0);
    }

    #[test]
    fn zero_page_with_setup_header_and_high_addresses() {
        let m = mem(64 * MIB);
        let mut hdr = setup_header {
            setup_sects: 27,
            boot_flag: 0xaa55,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: 1,
            code32_start: 0x10_0000,
            kernel_alignment: 0x20_0000,
            init_size: 0x123_4000,
            ..Default::default()
        };
        hdr.type_of_loader = 0x12; // must be overwritten
        let e820 = [E820Entry {
            addr: 0,
            size: 0x9fc00,
            kind: E820Kind::Reserved,
        }];
        let p = LinuxBootParams {
            setup_header: Some(hdr),
            cmdline_addr: GuestAddress(0x1_2345_6789),
            cmdline_size: 2048,
            initrd: Some((GuestAddress(0x2_0000_1000), 0x1_0000_0002)),
            e820: &e820,
            acpi_rsdp_addr: None,
        };
        write_zero_page(&m, GuestAddress(ZERO_PAGE_ADDR), &p).unwrap();
        let z = ZERO_PAGE_ADDR;
        assert_eq!(rd::<u8>(&m, z + 0x1f1), 27); // setup_sects preserved
        assert_eq!(rd::<u16>(&m, z + 0x206), 0x020f); // version preserved
        assert_eq!(rd::<u8>(&m, z + 0x211), 1); // loadflags preserved
        assert_eq!(rd::<u32>(&m, z + 0x214), 0x10_0000); // code32_start
        assert_eq!(rd::<u32>(&m, z + 0x230), 0x20_0000); // kernel_alignment preserved
        assert_eq!(rd::<u32>(&m, z + 0x260), 0x123_4000); // init_size preserved
        assert_eq!(rd::<u16>(&m, z + 0x1fe), 0xaa55);
        assert_eq!(rd::<u32>(&m, z + 0x202), HDRS_MAGIC);
        assert_eq!(rd::<u8>(&m, z + 0x210), 0xff);
        assert_eq!(rd::<u32>(&m, z + 0x228), 0x2345_6789);
        assert_eq!(rd::<u32>(&m, z + 0x0c8), 1);
        assert_eq!(rd::<u32>(&m, z + 0x238), 2048);
        assert_eq!(rd::<u32>(&m, z + 0x218), 0x1000);
        assert_eq!(rd::<u32>(&m, z + 0x0c0), 2);
        assert_eq!(rd::<u32>(&m, z + 0x21c), 2);
        assert_eq!(rd::<u32>(&m, z + 0x0c4), 1);
        assert_eq!(rd::<u8>(&m, z + 0x1e8), 1);
        assert_eq!(rd::<u32>(&m, z + 0x2d0 + 16), 2); // reserved type
    }

    #[test]
    fn zero_page_acpi_rsdp_addr() {
        let m = mem(16 * MIB);
        let p = LinuxBootParams {
            setup_header: None,
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            cmdline_size: 1,
            initrd: None,
            e820: &[],
            acpi_rsdp_addr: Some(GuestAddress(0xe0000)),
        };
        write_zero_page(&m, GuestAddress(ZERO_PAGE_ADDR), &p).unwrap();
        assert_eq!(rd::<u64>(&m, ZERO_PAGE_ADDR + 0x070), 0xe0000);
    }

    #[test]
    fn zero_page_no_initrd() {
        let m = mem(16 * MIB);
        let p = LinuxBootParams {
            setup_header: None,
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            cmdline_size: 1,
            initrd: None,
            e820: &[],
            acpi_rsdp_addr: None,
        };
        write_zero_page(&m, GuestAddress(ZERO_PAGE_ADDR), &p).unwrap();
        assert_eq!(rd::<u32>(&m, ZERO_PAGE_ADDR + 0x218), 0);
        assert_eq!(rd::<u32>(&m, ZERO_PAGE_ADDR + 0x21c), 0);
        assert_eq!(rd::<u8>(&m, ZERO_PAGE_ADDR + 0x1e8), 0);
    }

    #[test]
    fn zero_page_e820_limits() {
        let m = mem(16 * MIB);
        let entry = E820Entry {
            addr: 0,
            size: 4096,
            kind: E820Kind::Ram,
        };
        let full = vec![entry; 128];
        let mut p = LinuxBootParams {
            setup_header: None,
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            cmdline_size: 1,
            initrd: None,
            e820: &full,
            acpi_rsdp_addr: None,
        };
        write_zero_page(&m, GuestAddress(ZERO_PAGE_ADDR), &p).unwrap();
        assert_eq!(rd::<u8>(&m, ZERO_PAGE_ADDR + 0x1e8), 128);
        assert_eq!(rd::<u64>(&m, ZERO_PAGE_ADDR + 0x2d0 + 127 * 20 + 8), 4096);

        let too_many = vec![entry; 129];
        p.e820 = &too_many;
        let err = write_zero_page(&m, GuestAddress(ZERO_PAGE_ADDR), &p).unwrap_err();
        assert!(matches!(
            err,
            Error::TooManyE820Entries {
                count: 129,
                max: 128,
                ..
            }
        ));
        assert!(err.to_string().contains("129"), "{err}");
    }

    #[test]
    fn zero_page_outside_memory() {
        let m = mem(16 * MIB);
        let p = LinuxBootParams {
            setup_header: None,
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            cmdline_size: 1,
            initrd: None,
            e820: &[],
            acpi_rsdp_addr: None,
        };
        // Straddles the end of memory.
        let err = write_zero_page(&m, GuestAddress(16 * MIB - 100), &p).unwrap_err();
        assert!(
            matches!(err, Error::GuestWrite { what: "zero page", size: 4096, addr, .. } if addr == 16 * MIB - 100)
        );
        assert!(write_zero_page(&m, GuestAddress(u64::MAX - 10), &p).is_err());
    }

    #[test]
    fn pvh_start_info_with_initrd() {
        let m = mem(64 * MIB);
        let e820 = e820_4_5g();
        m.write_slice(&[0x5a; 0x1000], GuestAddress(PVH_START_INFO_ADDR))
            .unwrap();
        let p = PvhBootParams {
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            initrd: Some((GuestAddress(0x3c0_0000), 0x12_3456)),
            memmap: &e820,
            rsdp_addr: Some(GuestAddress(0xe_0000)),
        };
        write_pvh_start_info(
            &m,
            GuestAddress(PVH_START_INFO_ADDR),
            GuestAddress(PVH_MEMMAP_ADDR),
            &p,
        )
        .unwrap();
        let s = PVH_START_INFO_ADDR;
        let modlist = PVH_MEMMAP_ADDR + 4 * 24;
        assert_eq!(
            pvh_modlist_addr(GuestAddress(PVH_MEMMAP_ADDR), 4).unwrap(),
            GuestAddress(modlist)
        );
        assert_eq!(rd::<u32>(&m, s), 0x336e_c578); // magic
        assert_eq!(rd::<u32>(&m, s + 4), 1); // version
        assert_eq!(rd::<u32>(&m, s + 8), 0); // flags
        assert_eq!(rd::<u32>(&m, s + 12), 1); // nr_modules
        assert_eq!(rd::<u64>(&m, s + 16), modlist); // modlist_paddr
        assert_eq!(rd::<u64>(&m, s + 24), CMDLINE_ADDR); // cmdline_paddr
        assert_eq!(rd::<u64>(&m, s + 32), 0xe_0000); // rsdp_paddr
        assert_eq!(rd::<u64>(&m, s + 40), PVH_MEMMAP_ADDR); // memmap_paddr
        assert_eq!(rd::<u32>(&m, s + 48), 4); // memmap_entries
        assert_eq!(rd::<u32>(&m, s + 52), 0); // reserved
        for (i, e) in e820.iter().enumerate() {
            let at = PVH_MEMMAP_ADDR + 24 * i as u64;
            assert_eq!(rd::<u64>(&m, at), e.addr);
            assert_eq!(rd::<u64>(&m, at + 8), e.size);
            assert_eq!(rd::<u32>(&m, at + 16), u32::from(e.kind));
            assert_eq!(rd::<u32>(&m, at + 20), 0);
        }
        assert_eq!(rd::<u64>(&m, modlist), 0x3c0_0000); // paddr
        assert_eq!(rd::<u64>(&m, modlist + 8), 0x12_3456); // size
        assert_eq!(rd::<u64>(&m, modlist + 16), 0); // cmdline_paddr
        assert_eq!(rd::<u64>(&m, modlist + 24), 0); // reserved
                                                    // Everything ends before the zero page.
        assert!(modlist + 32 <= ZERO_PAGE_ADDR);
    }

    #[test]
    fn pvh_start_info_without_initrd() {
        let m = mem(16 * MIB);
        let e820 = MemoryLayout::new(16 * MIB).unwrap().e820();
        m.write_slice(&[0x5a; 0x1000], GuestAddress(PVH_START_INFO_ADDR))
            .unwrap();
        let p = PvhBootParams {
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            initrd: None,
            memmap: &e820,
            rsdp_addr: None,
        };
        write_pvh_start_info(
            &m,
            GuestAddress(PVH_START_INFO_ADDR),
            GuestAddress(PVH_MEMMAP_ADDR),
            &p,
        )
        .unwrap();
        let s = PVH_START_INFO_ADDR;
        assert_eq!(rd::<u32>(&m, s + 12), 0); // nr_modules
        assert_eq!(rd::<u64>(&m, s + 16), 0); // modlist_paddr
        assert_eq!(rd::<u64>(&m, s + 32), 0); // rsdp_paddr
        assert_eq!(rd::<u32>(&m, s + 48), 3);
        assert_eq!(rd::<u64>(&m, PVH_MEMMAP_ADDR + 2 * 24 + 8), 15 * MIB);
        // The start info struct is 56 bytes; the memmap follows at 0x40.
        assert_eq!(rd::<u64>(&m, s + 56), 0x5a5a_5a5a_5a5a_5a5a);
    }

    #[test]
    fn pvh_errors() {
        let m = mem(16 * MIB);
        let entry = E820Entry {
            addr: 0,
            size: 4096,
            kind: E820Kind::Ram,
        };
        let too_many = vec![entry; 129];
        let mut p = PvhBootParams {
            cmdline_addr: GuestAddress(CMDLINE_ADDR),
            initrd: Some((GuestAddress(0x10_0000), 1)),
            memmap: &too_many,
            rsdp_addr: None,
        };
        let s = GuestAddress(PVH_START_INFO_ADDR);
        let mm = GuestAddress(PVH_MEMMAP_ADDR);
        assert!(matches!(
            write_pvh_start_info(&m, s, mm, &p),
            Err(Error::TooManyE820Entries { count: 129, .. })
        ));
        let max = vec![entry; 128];
        p.memmap = &max;
        write_pvh_start_info(&m, s, mm, &p).unwrap();
        assert!(pvh_modlist_addr(mm, 128).unwrap().0 + 32 <= ZERO_PAGE_ADDR);

        // Outside memory.
        p.memmap = &max[..1];
        assert!(matches!(
            write_pvh_start_info(&m, GuestAddress(16 * MIB), mm, &p),
            Err(Error::GuestWrite {
                what: "PVH start info",
                ..
            })
        ));
        assert!(matches!(
            write_pvh_start_info(&m, s, GuestAddress(16 * MIB - 24), &p),
            Err(Error::GuestWrite {
                what: "PVH module list",
                ..
            })
        ));
        assert!(matches!(
            write_pvh_start_info(&m, s, GuestAddress(u64::MAX - 8), &p),
            Err(Error::GuestWrite { .. } | Error::AddressOverflow { .. })
        ));
        assert!(matches!(
            pvh_modlist_addr(GuestAddress(u64::MAX - 30), 1),
            Err(Error::AddressOverflow { .. })
        ));
    }

    #[test]
    fn gdt_values() {
        assert_eq!(
            gdt::LONG_MODE,
            [
                0,
                0x00af_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x0000_8b00_0000_0067
            ]
        );
        assert_eq!(
            gdt::PROTECTED_MODE,
            [
                0,
                0x00cf_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x0000_8b00_0000_0067
            ]
        );
        assert_eq!(
            gdt::gdt_entry(0x808b, 0x1234_5678, 0xfffff),
            0x128f_8b34_5678_ffff
        );
        assert_eq!(
            (gdt::CODE_SELECTOR, gdt::DATA_SELECTOR, gdt::TSS_SELECTOR),
            (8, 16, 24)
        );
    }

    #[test]
    fn gdt_and_idt_bytes() {
        let m = mem(16 * MIB);
        m.write_slice(&[0x5a; 0x40], GuestAddress(GDT_ADDR))
            .unwrap();
        gdt::write_gdt(&m, GuestAddress(GDT_ADDR), &gdt::LONG_MODE).unwrap();
        gdt::write_idt(&m, GuestAddress(IDT_ADDR)).unwrap();
        let bytes: [u8; 32] = rd(&m, GDT_ADDR);
        assert_eq!(
            bytes,
            [
                0, 0, 0, 0, 0, 0, 0, 0, //
                0xff, 0xff, 0, 0, 0, 0x9b, 0xaf, 0, //
                0xff, 0xff, 0, 0, 0, 0x93, 0xcf, 0, //
                0x67, 0, 0, 0, 0, 0x8b, 0, 0,
            ]
        );
        assert_eq!(rd::<u64>(&m, IDT_ADDR), 0);
        assert_eq!(rd::<u64>(&m, IDT_ADDR + 8), 0x5a5a_5a5a_5a5a_5a5a);

        gdt::write_gdt(&m, GuestAddress(GDT_ADDR), &gdt::PROTECTED_MODE).unwrap();
        for (i, d) in gdt::PROTECTED_MODE.iter().enumerate() {
            assert_eq!(rd::<u64>(&m, GDT_ADDR + 8 * i as u64), *d);
        }
        assert!(matches!(
            gdt::write_gdt(&m, GuestAddress(16 * MIB - 8), &gdt::LONG_MODE),
            Err(Error::GuestWrite {
                what: "GDT",
                size: 32,
                ..
            })
        ));
        assert!(matches!(
            gdt::write_idt(&m, GuestAddress(16 * MIB)),
            Err(Error::GuestWrite { what: "IDT", .. })
        ));
    }

    #[test]
    fn identity_page_tables() {
        let m = mem(16 * MIB);
        m.write_slice(&[0x5a; 0x3000], GuestAddress(PML4_ADDR))
            .unwrap();
        let cr3 = paging::write_identity_page_tables(&m).unwrap();
        assert_eq!(cr3, GuestAddress(0x9000));
        assert_eq!(rd::<u64>(&m, 0x9000), 0xa003);
        assert_eq!(rd::<u64>(&m, 0xa000), 0xb003);
        for i in 1..512u64 {
            assert_eq!(rd::<u64>(&m, 0x9000 + 8 * i), 0);
            assert_eq!(rd::<u64>(&m, 0xa000 + 8 * i), 0);
        }
        for i in 0..512u64 {
            assert_eq!(rd::<u64>(&m, 0xb000 + 8 * i), (i << 21) | 0x83);
        }
        assert_eq!(rd::<u64>(&m, 0xb000 + 8 * 511), 0x3fe0_0083);
    }

    #[test]
    fn page_tables_outside_memory() {
        // Memory that does not cover the PD page.
        let m =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xb000)]).unwrap();
        assert!(matches!(
            paging::write_identity_page_tables(&m),
            Err(Error::GuestWrite {
                what: "page directory",
                ..
            })
        ));
    }
}
