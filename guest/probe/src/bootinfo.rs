//! Readers for the boot information the VMM hands over: the PVH `hvm_start_info` (memory map,
//! command line) and the Linux zero page (`boot_params`: e820 table, command line).

use crate::arch;

/// `hvm_start_info.magic`.
pub const PVH_MAGIC: u32 = 0x336e_c578;
/// Most memory-map entries the probe looks at (the zero page holds at most 128).
pub const MAX_ENTRIES: usize = 128;
/// Memory-map type of usable RAM (e820 and PVH agree).
pub const TYPE_RAM: u32 = 1;
/// Longest command line the probe reads (bytes, without the NUL).
pub const MAX_CMDLINE: usize = 4095;

// hvm_start_info offsets.
const SI_MAGIC: u64 = 0;
const SI_VERSION: u64 = 4;
const SI_CMDLINE: u64 = 24;
const SI_MEMMAP: u64 = 40;
const SI_MEMMAP_ENTRIES: u64 = 48;
// boot_params offsets.
const BP_EXT_CMDLINE: u64 = 0x0c8;
const BP_E820_ENTRIES: u64 = 0x1e8;
const BP_CMDLINE: u64 = 0x228;
const BP_E820_TABLE: u64 = 0x2d0;

/// One memory-map entry.
#[derive(Clone, Copy, Default)]
pub struct Region {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

/// The memory map as the VMM gave it.
pub struct MemMap {
    /// `"pvh"` or `"e820"`.
    pub source: &'static str,
    /// Entries in table order; only the first `count` are valid.
    pub entries: [Region; MAX_ENTRIES],
    /// Number of valid entries.
    pub count: usize,
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: `addr` lies in the boot structures the VMM placed in RAM, which the probe's
    // identity map covers; unaligned reads are allowed on x86.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: as for `rd32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Reads the memory map. Errors are short reasons for a `FAIL` line.
pub fn memmap(entry: u64, info: u64) -> Result<MemMap, &'static str> {
    let mut map = MemMap {
        source: "e820",
        entries: [Region::default(); MAX_ENTRIES],
        count: 0,
    };
    if info == 0 {
        return Err("no boot information pointer");
    }
    if entry == arch::ENTRY_PVH {
        map.source = "pvh";
        if rd32(info + SI_MAGIC) != PVH_MAGIC {
            return Err("bad hvm_start_info magic");
        }
        if rd32(info + SI_VERSION) < 1 {
            return Err("hvm_start_info version 0 has no memory map");
        }
        let table = rd64(info + SI_MEMMAP);
        let n = rd32(info + SI_MEMMAP_ENTRIES) as usize;
        if table == 0 || n == 0 {
            return Err("empty pvh memory map");
        }
        if n > MAX_ENTRIES {
            return Err("more than 128 pvh memory map entries");
        }
        for i in 0..n {
            let e = table + 24 * i as u64;
            map.entries[i] = Region {
                addr: rd64(e),
                size: rd64(e + 8),
                kind: rd32(e + 16),
            };
        }
        map.count = n;
    } else {
        let n = rd8(info + BP_E820_ENTRIES) as usize;
        if n == 0 {
            return Err("empty e820 table");
        }
        if n > MAX_ENTRIES {
            return Err("more than 128 e820 entries");
        }
        for i in 0..n {
            let e = info + BP_E820_TABLE + 20 * i as u64;
            map.entries[i] = Region {
                addr: rd64(e),
                size: rd64(e + 8),
                kind: rd32(e + 16),
            };
        }
        map.count = n;
    }
    Ok(map)
}

/// End of the highest RAM entry, or 0 when the map cannot be read. Runs in (emulated)
/// ring 0, so it reads the table in place without copying it.
pub fn ram_end_hint(entry: u64, info: u64) -> u64 {
    let mut end = 0u64;
    if info == 0 {
        return 0;
    }
    let (table, n, stride) = if entry == arch::ENTRY_PVH {
        if rd32(info + SI_MAGIC) != PVH_MAGIC || rd32(info + SI_VERSION) < 1 {
            return 0;
        }
        (
            rd64(info + SI_MEMMAP),
            rd32(info + SI_MEMMAP_ENTRIES) as u64,
            24,
        )
    } else {
        (
            info + BP_E820_TABLE,
            u64::from(rd8(info + BP_E820_ENTRIES)),
            20,
        )
    };
    if table == 0 {
        return 0;
    }
    for i in 0..n.min(MAX_ENTRIES as u64) {
        let e = table + stride * i;
        if rd32(e + 16) == TYPE_RAM {
            end = end.max(rd64(e).saturating_add(rd64(e + 8)));
        }
    }
    end
}

/// Physical address of the memory-map table (0 if unknown).
pub fn memmap_table_addr(entry: u64, info: u64) -> u64 {
    if info == 0 {
        0
    } else if entry == arch::ENTRY_PVH {
        if rd32(info + SI_MAGIC) == PVH_MAGIC {
            rd64(info + SI_MEMMAP)
        } else {
            0
        }
    } else {
        info + BP_E820_TABLE
    }
}

/// Physical address of the command line (0 if none).
pub fn cmdline_addr(entry: u64, info: u64) -> u64 {
    if info == 0 {
        return 0;
    }
    if entry == arch::ENTRY_PVH {
        if rd32(info + SI_MAGIC) != PVH_MAGIC {
            return 0;
        }
        rd64(info + SI_CMDLINE)
    } else {
        u64::from(rd32(info + BP_CMDLINE)) | (u64::from(rd32(info + BP_EXT_CMDLINE)) << 32)
    }
}

/// Copies the NUL-terminated command line at `addr` into `buf`; returns its length.
pub fn read_cmdline(addr: u64, buf: &mut [u8]) -> usize {
    if addr == 0 {
        return 0;
    }
    let mut n = 0;
    while n < buf.len() {
        let b = rd8(addr + n as u64);
        if b == 0 {
            break;
        }
        buf[n] = b;
        n += 1;
    }
    n
}
