//! Guest physical memory layout for Ember microVMs (x86_64).
//!
//! This crate fixes where things live in guest physical memory and creates the
//! guest RAM mappings:
//!
//! * low RAM is mapped from 0 up to `min(mem_size, MMIO32_START)` (3.25 GiB);
//! * the rest of RAM ("high RAM") is mapped from [`HIGH_RAM_START`] (4 GiB);
//! * the e820 / PVH memory map lists RAM only: `[0, EBDA_START)`,
//!   `[HIMEM_START, low_end)` and, when there is high RAM, `[4 GiB, 4 GiB + rest)`;
//! * the 32-bit MMIO window for devices is `[MMIO32_START, IOAPIC_START)`;
//! * the boot structures (GDT, page tables, zero page, PVH start info, command
//!   line) sit at the fixed addresses of [`addresses`], the kernel at
//!   [`addresses::KERNEL_LOAD_ADDR`];
//! * an initrd goes as high as possible in low RAM, page aligned
//!   ([`MemoryLayout::initrd_addr`]).
//!
//! [`create_guest_memory`] maps the RAM ranges as anonymous, private,
//! `MAP_NORESERVE` memory and never touches it, so a large guest costs nothing
//! until the guest uses its memory.
//!
//! # Example
//!
//! ```
//! use ember_memory::{create_guest_memory, DirtyBitmap, E820Kind, MemoryLayout, EBDA_START, HIMEM_START, MIB};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let layout = MemoryLayout::new(128 * MIB)?;
//! assert_eq!(layout.low_ram_end(), 128 * MIB);
//! assert_eq!(layout.ram_end(), 128 * MIB);
//!
//! let e820 = layout.e820();
//! assert_eq!(e820.len(), 3);
//! assert_eq!((e820[0].addr, e820[0].size, e820[0].kind), (0, EBDA_START, E820Kind::Ram));
//! assert_eq!((e820[1].addr, e820[1].kind), (EBDA_START, E820Kind::Reserved));
//! assert_eq!((e820[2].addr, e820[2].size), (HIMEM_START, 128 * MIB - HIMEM_START));
//!
//! // A 1 MiB initrd above a kernel that ends at 20 MiB goes at the top of low RAM.
//! let initrd = layout.initrd_addr(MIB, 20 * MIB)?;
//! assert_eq!(initrd, GuestAddress(127 * MIB));
//!
//! let mem = create_guest_memory(&layout, DirtyBitmap::Off)?;
//! mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
//! assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234_5678);
//! # Ok::<(), ember_memory::Error>(())
//! ```

#![deny(missing_docs)]

use vm_memory::GuestAddress;

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;

/// Guest page size used for alignment (4 KiB).
pub const PAGE_SIZE: u64 = 4 * KIB;

/// Start of the Extended BIOS Data Area: RAM in the first megabyte ends here
/// in the memory map.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of "high memory" (1 MiB): the second RAM entry of the memory map
/// starts here, and so does the kernel.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (3.25 GiB); low RAM ends at or below it.
pub const MMIO32_START: u64 = 0xd000_0000;
/// End (exclusive) of the 32-bit MMIO hole: 4 GiB.
pub const MMIO32_END: u64 = 0x1_0000_0000;
/// IOAPIC base address (4 KiB). `[IOAPIC_START, MMIO32_END)` is reserved.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address (4 KiB).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Where RAM above the MMIO hole starts (4 GiB).
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// The smallest guest memory size accepted, in MiB.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The largest guest memory size accepted, in bytes (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Largest number of vCPUs an Ember machine describes (APIC ids 0..32 in the MADT and MP
/// table): the one definition every crate uses.
pub const MAX_VCPUS: u8 = 32;

/// Fixed guest physical addresses of the boot structures.
pub mod addresses {
    /// Global descriptor table (4 entries).
    pub const GDT_ADDR: u64 = 0x500;
    /// Interrupt descriptor table (one zero entry).
    pub const IDT_ADDR: u64 = 0x520;
    /// PVH `hvm_start_info`.
    pub const PVH_START_INFO_ADDR: u64 = 0x6000;
    /// PVH memory map table (right after the start info), followed by the
    /// module list.
    pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
    /// Linux zero page (`boot_params`).
    pub const ZERO_PAGE_ADDR: u64 = 0x7000;
    /// Initial stack pointer for the boot vCPU.
    pub const BOOT_STACK_TOP: u64 = 0x8ff0;
    /// Page map level 4 of the boot identity map (CR3).
    pub const PML4_ADDR: u64 = 0x9000;
    /// Page directory pointer table of the boot identity map.
    pub const PDPT_ADDR: u64 = 0xa000;
    /// Page directory (512 x 2 MiB pages) of the boot identity map.
    pub const PD_ADDR: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE_ADDR: u64 = 0x2_0000;
    /// Maximum command line size in bytes, including the terminating NUL.
    pub const CMDLINE_MAX_SIZE: u64 = 2048;
    /// Where a bzImage's protected-mode kernel is loaded (= `HIMEM_START`).
    pub const KERNEL_LOAD_ADDR: u64 = super::HIMEM_START;
    /// The VM generation ID (16 bytes, the ACPI `VGEN` device's `ADDR`): in the reserved
    /// range between the EBDA and 1 MiB, below the ACPI tables, where the guest never puts
    /// anything of its own.
    pub const VMGENID_ADDR: u64 = 0xd_f000;
    /// The three pages KVM needs for its TSS on Intel hosts (`KVM_SET_TSS_ADDR`): just below
    /// the BIOS area at the top of the 32-bit space, inside the MMIO gap, never RAM.
    pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
}

/// A byte count as people write it: `8 MiB`, `1 GiB`, or `12345 bytes` when it is not a
/// whole number of MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(GIB) {
            write!(f, "{} GiB", b / GIB)
        } else if b != 0 && b.is_multiple_of(MIB) {
            write!(f, "{} MiB", b / MIB)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The requested guest memory is below [`MIN_MEMORY_MIB`].
    #[error("guest memory of {} is too small: at least {} are needed", Size(*requested), Size(*minimum))]
    TooSmall {
        /// Requested size in bytes.
        requested: u64,
        /// Minimum size in bytes.
        minimum: u64,
    },
    /// The requested guest memory is above [`MAX_MEMORY`].
    #[error("guest memory of {} is too large: at most {} are supported", Size(*requested), Size(*maximum))]
    TooLarge {
        /// Requested size in bytes.
        requested: u64,
        /// Maximum size in bytes.
        maximum: u64,
    },
    /// The requested guest memory is not a whole number of pages.
    #[error(
        "guest memory of {requested} bytes is not a multiple of the {alignment}-byte page size"
    )]
    Unaligned {
        /// Requested size in bytes.
        requested: u64,
        /// Required alignment in bytes.
        alignment: u64,
    },
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error("initrd of {size} bytes does not fit in guest low RAM: only {available} bytes are free above the kernel")]
    InitrdTooLarge {
        /// Initrd size in bytes.
        size: u64,
        /// Bytes available for it (page aligned, between kernel end and low RAM end).
        available: u64,
    },
    /// A memory file could not be created, sized or read.
    #[error("{what}: {source}")]
    File {
        /// Which file.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A memory file is smaller than the guest memory it should hold.
    #[error("the memory file has {} but the guest memory needs {}", Size(*size), Size(*needed))]
    FileTooSmall {
        /// The file's size.
        size: u64,
        /// The guest memory size.
        needed: u64,
    },
    /// Mapping a memory file failed.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// Mapping guest RAM failed.
    #[error("failed to map {size} bytes of guest RAM: {source}")]
    Mmap {
        /// Total RAM size that was being mapped.
        size: u64,
        /// The underlying vm-memory error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The type of an e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM (e820 type 1).
    Ram = 1,
    /// Reserved (e820 type 2).
    Reserved = 2,
}

impl From<E820Kind> for u32 {
    fn from(kind: E820Kind) -> u32 {
        kind as u32
    }
}

/// One entry of the guest memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Entry type.
    pub kind: E820Kind,
}

impl E820Entry {
    /// End address (exclusive), saturating at `u64::MAX`.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The guest physical memory layout for a given RAM size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    mem_size: u64,
    low_end: u64,
    high_size: u64,
}

const fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_add(align - 1).map(|v| align_down(v, align))
}

impl MemoryLayout {
    /// Computes the layout for `mem_size` bytes of guest RAM.
    ///
    /// `mem_size` must be a multiple of [`PAGE_SIZE`], at least
    /// [`MIN_MEMORY_MIB`] MiB and at most [`MAX_MEMORY`].
    pub fn new(mem_size: u64) -> Result<Self, Error> {
        let minimum = MIN_MEMORY_MIB * MIB;
        if mem_size < minimum {
            return Err(Error::TooSmall {
                requested: mem_size,
                minimum,
            });
        }
        if mem_size > MAX_MEMORY {
            return Err(Error::TooLarge {
                requested: mem_size,
                maximum: MAX_MEMORY,
            });
        }
        if mem_size & (PAGE_SIZE - 1) != 0 {
            return Err(Error::Unaligned {
                requested: mem_size,
                alignment: PAGE_SIZE,
            });
        }
        let low_end = mem_size.min(MMIO32_START);
        Ok(MemoryLayout {
            mem_size,
            low_end,
            high_size: mem_size - low_end,
        })
    }

    /// Total guest RAM in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The RAM ranges to map: `(start, length)`, low RAM first, then high RAM
    /// if there is any.
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, usize)> {
        #[allow(
            clippy::cast_possible_truncation,
            reason = "both sizes are at most MAX_MEMORY (1 TiB), which fits in usize on the 64-bit hosts this crate targets"
        )]
        let (low_len, high_len) = (self.low_end as usize, self.high_size as usize);
        let mut ranges = vec![(GuestAddress(0), low_len)];
        if self.high_size > 0 {
            ranges.push((GuestAddress(HIGH_RAM_START), high_len));
        }
        ranges
    }

    /// The guest memory map, for the zero page's e820 table and the PVH memory map: RAM below
    /// the EBDA, the legacy area `[EBDA_START, 1 MiB)` as reserved (it holds the MP table and
    /// the ACPI tables), RAM from 1 MiB to the MMIO gap, and RAM above 4 GiB if any.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: HIMEM_START,
                size: self.low_end - HIMEM_START,
                kind: E820Kind::Ram,
            },
        ];
        if self.high_size > 0 {
            map.push(E820Entry {
                addr: HIGH_RAM_START,
                size: self.high_size,
                kind: E820Kind::Ram,
            });
        }
        map
    }

    /// End (exclusive) of RAM below 4 GiB.
    pub fn low_ram_end(&self) -> u64 {
        self.low_end
    }

    /// Highest RAM address + 1.
    pub fn ram_end(&self) -> u64 {
        if self.high_size > 0 {
            HIGH_RAM_START + self.high_size
        } else {
            self.low_end
        }
    }

    /// The 32-bit MMIO window for devices: `(start, length)`, i.e.
    /// `[MMIO32_START, IOAPIC_START)`.
    pub fn mmio32_window(&self) -> (u64, u64) {
        (MMIO32_START, IOAPIC_START - MMIO32_START)
    }

    /// Where to put an initrd of `initrd_size` bytes: page aligned, as high as
    /// possible in low RAM, and at or above `kernel_end` rounded up to a page.
    ///
    /// A zero-sized initrd gets the end of low RAM.
    pub fn initrd_addr(&self, initrd_size: u64, kernel_end: u64) -> Result<GuestAddress, Error> {
        let lowest = align_up(kernel_end, PAGE_SIZE).unwrap_or(u64::MAX);
        let available = self.low_end.saturating_sub(lowest);
        // A kernel ending above low RAM leaves no room at all, not even for an empty initrd
        // (which would otherwise be placed below the kernel's end).
        if lowest > self.low_end || initrd_size > available {
            return Err(Error::InitrdTooLarge {
                size: initrd_size,
                available,
            });
        }
        // low_end is page aligned and low_end - initrd_size >= lowest, which
        // is page aligned too, so aligning down stays at or above `lowest`.
        Ok(GuestAddress(align_down(
            self.low_end - initrd_size,
            PAGE_SIZE,
        )))
    }
}

/// Ember's guest memory type, as created by [`create_guest_memory`] and used by every Ember crate
/// that does not take a generic `M: GuestMemoryBackend`.
///
/// A region may carry a dirty bitmap ([`AtomicBitmap`], one bit per 4 KiB page: 4 KiB of
/// bitmap per 128 MiB of guest memory) that every write of the VMM through vm-memory sets:
/// device DMA, virtio rings, the loader. KVM's dirty log only sees the guest's own writes, so a
/// diff snapshot needs both ([`take_dirty_pages`]). Whether it does is chosen when the memory
/// is made ([`DirtyBitmap`]); without one, the VMM's writes cost nothing extra.
pub type GuestRam = vm_memory::GuestMemoryMmap<Option<AtomicBitmap>>;

pub use vm_memory::bitmap::AtomicBitmap;

/// Whether the regions of a new [`GuestRam`] carry a dirty bitmap of the VMM's own writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyBitmap {
    /// No bitmap (the default): the VMM's writes set nothing, and [`take_dirty_pages`] has
    /// nothing to give, so no diff snapshot can be taken of this memory.
    #[default]
    Off,
    /// One bit per 4 KiB page, set by every write of the VMM (what a VM that takes diff
    /// snapshots needs). It costs each VMM write an atomic update of the bitmap.
    On,
}

impl DirtyBitmap {
    /// [`DirtyBitmap::On`] if `track`, else [`DirtyBitmap::Off`].
    pub fn tracked_if(track: bool) -> Self {
        if track {
            Self::On
        } else {
            Self::Off
        }
    }

    fn for_region(self, len: usize) -> Option<AtomicBitmap> {
        use vm_memory::bitmap::NewBitmap;
        match self {
            Self::Off => None,
            Self::On => Some(AtomicBitmap::with_len(len)),
        }
    }
}

/// Takes and clears the VMM's dirty bitmap of `mem`'s region `index`: one bit per 4 KiB page
/// the VMM wrote since the last call (or since the memory was made), in the `u64` words of
/// `KVM_GET_DIRTY_LOG`'s bitmap (bit `i % 64` of word `i / 64` is page `i`). `None` if there is
/// no such region or the region has no bitmap ([`DirtyBitmap::Off`]).
pub fn take_dirty_pages(mem: &GuestRam, index: usize) -> Option<Vec<u64>> {
    use vm_memory::GuestMemoryBackend;
    mem.iter()
        .nth(index)
        .and_then(|region| region.bitmap().as_ref())
        .map(AtomicBitmap::get_and_reset)
}

/// Whether `mem`'s regions carry a dirty bitmap of the VMM's writes ([`DirtyBitmap::On`]).
pub fn has_dirty_bitmap(mem: &GuestRam) -> bool {
    use vm_memory::GuestMemoryBackend;
    mem.iter().all(|region| region.bitmap().is_some())
}

/// Anonymous, private, `MAP_NORESERVE` guest memory of the given `(address, size)` ranges,
/// sorted by address, with or without a dirty bitmap: vm-memory's
/// `GuestMemoryMmap::from_ranges` for [`GuestRam`]. Nothing is touched. For a VM's RAM, use
/// [`create_guest_memory`], which also keeps it out of core dumps.
pub fn ram_from_ranges(
    ranges: &[(GuestAddress, usize)],
    dirty: DirtyBitmap,
) -> Result<GuestRam, vm_memory::mmap::FromRangesError> {
    use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
    let regions = ranges
        .iter()
        .map(|&(addr, size)| {
            let mapping = MmapRegionBuilder::new_with_bitmap(size, dirty.for_region(size))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
                .build()?;
            vm_memory::GuestRegionMmap::new(mapping, addr)
                .ok_or(FromRangesError::InvalidGuestRegion)
        })
        .collect::<Result<Vec<_>, FromRangesError>>()?;
    Ok(GuestRam::from_regions(regions)?)
}

/// Maps the RAM ranges of `layout` as anonymous, private, `MAP_NORESERVE`
/// memory ([`ram_from_ranges`]), with a dirty bitmap of the VMM's writes if `dirty` says so.
/// The memory is not touched: host pages are only allocated when the guest (or the VMM) uses
/// them.
pub fn create_guest_memory(layout: &MemoryLayout, dirty: DirtyBitmap) -> Result<GuestRam, Error> {
    let mem = ram_from_ranges(&layout.ram_ranges(), dirty).map_err(|source| Error::Mmap {
        size: layout.mem_size,
        source,
    })?;
    dont_dump(&mem)?;
    Ok(mem)
}

/// Leaves guest memory out of the VMM's core dumps (`MADV_DONTDUMP` on every region: a
/// crashing VMM must not write the guest's data to disk) and out of any child process the VMM
/// forks (`MADV_DONTFORK`: a fork copies no page table of it, and no child sees it).
fn dont_dump(mem: &GuestRam) -> Result<(), Error> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Map(e.to_string()))?;
        let len = usize::try_from(region.len()).map_err(|e| Error::Map(e.to_string()))?;
        for (advice, what) in [
            (
                libc::MADV_DONTDUMP,
                "madvise(MADV_DONTDUMP) of guest memory",
            ),
            (
                libc::MADV_DONTFORK,
                "madvise(MADV_DONTFORK) of guest memory",
            ),
        ] {
            // SAFETY: advice on exactly one region's own mapping; neither changes contents.
            if unsafe { libc::madvise(host.cast(), len, advice) } != 0 {
                return Err(Error::File {
                    what,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
    }
    Ok(())
}

/// How [`map_guest_memory`] maps a memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// `MAP_SHARED`: guest writes reach the file (a memfd a VM owns and may later be forked
    /// from, or snapshotted by writing the file out).
    Shared,
    /// `MAP_PRIVATE`: copy-on-write; the file's pages are read only when the guest touches them
    /// and written pages stay private (a restore from a memory snapshot, or a fork of a
    /// template's memfd).
    Private,
}

/// A new memfd holding `layout`'s RAM (sparse: nothing is allocated until used), the regions
/// back to back from offset 0 in address order, mapped [`Sharing::Shared`] as guest memory.
/// The memfd is close-on-exec, and may be sealed ([`seal_memory_file`]).
pub fn create_guest_memory_memfd(
    layout: &MemoryLayout,
    dirty: DirtyBitmap,
) -> Result<(GuestRam, std::fs::File), Error> {
    use std::os::fd::FromRawFd;
    let io_err = |e: std::io::Error| Error::File {
        what: "memfd",
        source: e,
    };
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"ember-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this descriptor, owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(layout.mem_size).map_err(io_err)?;
    let mem = map_guest_memory(layout, &file, Sharing::Shared, dirty)?;
    Ok((mem, file))
}

/// Maps `file` as `layout`'s RAM: the regions back to back from offset 0 in address order (the
/// layout of [`create_guest_memory_memfd`] and of a memory snapshot). The file must hold at
/// least `layout.mem_size()` bytes. Nothing is read until the guest touches a page.
pub fn map_guest_memory(
    layout: &MemoryLayout,
    file: &std::fs::File,
    sharing: Sharing,
    dirty: DirtyBitmap,
) -> Result<GuestRam, Error> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let io_err = |what| move |e: std::io::Error| Error::File { what, source: e };
    let len = file.metadata().map_err(io_err("memory file"))?.len();
    if len < layout.mem_size {
        return Err(Error::FileTooSmall {
            size: len,
            needed: layout.mem_size,
        });
    }
    let flags = libc::MAP_NORESERVE
        | match sharing {
            Sharing::Shared => libc::MAP_SHARED,
            Sharing::Private => libc::MAP_PRIVATE,
        };
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, size) in layout.ram_ranges() {
        let f = file.try_clone().map_err(io_err("memory file"))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, dirty.for_region(size))
            .with_file_offset(FileOffset::new(f, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| Error::Map(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mapping, addr)
                .ok_or_else(|| Error::Map(format!("region at {:#x} wraps around", addr.0)))?,
        );
        offset += size as u64;
    }
    let mem = GuestRam::from_regions(regions).map_err(|e| Error::Map(e.to_string()))?;
    dont_dump(&mem)?;
    Ok(mem)
}

/// The seals that freeze a memfd's contents and size: no write, no shrink, no growth.
const FROZEN: libc::c_int = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Seals the memfd `file` (made by [`create_guest_memory_memfd`]) against writes and size
/// changes, for good: once no shared writable mapping of it is left (after
/// [`remap_private`]), its contents are frozen, so that a process it is handed to (a fork's
/// VMM) can rely on it never changing or shrinking under a copy-on-write mapping. Fails
/// (`EBUSY`) while a shared writable mapping exists.
pub fn seal_memory_file(file: &std::fs::File) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_ADD_SEALS on a descriptor this function borrows; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, FROZEN) } < 0 {
        return Err(Error::File {
            what: "sealing the guest memory memfd",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether `file` is a memfd sealed by [`seal_memory_file`] (its contents and size can never
/// change again).
pub fn is_sealed(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GET_SEALS on a descriptor this function borrows; no memory is passed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & FROZEN == FROZEN
}

/// Maps `file` again over each of `mem`'s regions, at the same address, offset and length, but
/// [`Sharing::Private`]: the contents stay what the shared mapping wrote into the file, and
/// from here on the guest's writes stay private to this mapping. A VM whose memory was a
/// [`create_guest_memory_memfd`] memfd becomes one more copy-on-write user of it, so the memfd
/// can serve as the frozen base of forks. KVM sees the change through its MMU notifier (the
/// userspace addresses of its memory slots do not move).
pub fn remap_private(mem: &GuestRam, file: &std::fs::File) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for region in mem.iter() {
        let offset = region
            .file_offset()
            .map(vm_memory::FileOffset::start)
            .ok_or_else(|| Error::Map("a region is not backed by a file".into()))?;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Map(e.to_string()))?;
        let len = usize::try_from(region.len()).map_err(|e| Error::Map(e.to_string()))?;
        let off = libc::off_t::try_from(offset).map_err(|e| Error::Map(e.to_string()))?;
        // SAFETY: MAP_FIXED over exactly the region's own mapping (same address and length,
        // same protection): the range stays mapped, owned and later unmapped by `mem`; only
        // which pages back it changes, to a private view of the same file range.
        let r = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(Error::File {
                what: "private remap of guest memory",
                source: std::io::Error::last_os_error(),
            });
        }
    }
    // The new mappings start without the old ones' advice.
    dont_dump(mem)
}

#[cfg(test)]
mod dump_tests {
    use super::*;

    /// The `VmFlags` of the mapping that holds `addr`, from `/proc/self/smaps`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((a, b)) = range.split_once('-') {
                    if let (Ok(a), Ok(b)) =
                        (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                    {
                        inside = (a..b).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    return f.to_string();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn guest_memory_is_left_out_of_core_dumps_and_never_executable() {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let anon = create_guest_memory(&layout, DirtyBitmap::Off).unwrap();
        let (shared, file) = create_guest_memory_memfd(&layout, DirtyBitmap::Off).unwrap();
        let private = map_guest_memory(&layout, &file, Sharing::Private, DirtyBitmap::Off).unwrap();
        remap_private(&shared, &file).unwrap();
        for mem in [&anon, &shared, &private] {
            for region in mem.iter() {
                let addr = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
                let flags = vm_flags(addr);
                assert!(flags.contains(" dd"), "{flags}");
                assert!(flags.contains(" dc"), "{flags}");
                assert!(!flags.contains(" ex"), "{flags}");
            }
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test inputs are small, known values"
)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    fn ram(addr: u64, size: u64) -> E820Entry {
        E820Entry {
            addr,
            size,
            kind: E820Kind::Ram,
        }
    }

    fn legacy() -> E820Entry {
        E820Entry {
            addr: 0x9_fc00,
            size: 0x10_0000 - 0x9_fc00,
            kind: E820Kind::Reserved,
        }
    }

    #[test]
    fn layout_128m() {
        let l = MemoryLayout::new(128 * MIB).unwrap();
        assert_eq!(l.mem_size(), 128 * MIB);
        assert_eq!(l.low_ram_end(), 0x800_0000);
        assert_eq!(l.ram_end(), 0x800_0000);
        assert_eq!(l.ram_ranges(), vec![(GuestAddress(0), 0x800_0000usize)]);
        assert_eq!(
            l.e820(),
            vec![
                ram(0, 0x9_fc00),
                legacy(),
                ram(0x10_0000, 0x800_0000 - 0x10_0000)
            ]
        );
        assert_eq!(l.mmio32_window(), (0xd000_0000, 0xfec0_0000 - 0xd000_0000));
    }

    #[test]
    fn layout_3_5g() {
        let l = MemoryLayout::new(3 * GIB + 512 * MIB).unwrap();
        assert_eq!(l.low_ram_end(), 0xd000_0000);
        assert_eq!(l.ram_end(), 0x1_1000_0000);
        assert_eq!(
            l.ram_ranges(),
            vec![
                (GuestAddress(0), 0xd000_0000usize),
                (GuestAddress(0x1_0000_0000), 0x1000_0000usize)
            ]
        );
        assert_eq!(
            l.e820(),
            vec![
                ram(0, 0x9_fc00),
                legacy(),
                ram(0x10_0000, 0xd000_0000 - 0x10_0000),
                ram(0x1_0000_0000, 0x1000_0000)
            ]
        );
    }

    #[test]
    fn layout_4_5g() {
        let l = MemoryLayout::new(4 * GIB + 512 * MIB).unwrap();
        assert_eq!(l.low_ram_end(), 0xd000_0000);
        assert_eq!(l.ram_end(), 0x1_5000_0000);
        assert_eq!(
            l.ram_ranges(),
            vec![
                (GuestAddress(0), 0xd000_0000usize),
                (GuestAddress(0x1_0000_0000), 0x5000_0000usize)
            ]
        );
        assert_eq!(
            l.e820(),
            vec![
                ram(0, 0x9_fc00),
                legacy(),
                ram(0x10_0000, 0xd000_0000 - 0x10_0000),
                ram(0x1_0000_0000, 0x5000_0000)
            ]
        );
        let total: u64 = l.ram_ranges().iter().map(|r| r.1 as u64).sum();
        assert_eq!(total, l.mem_size());
    }

    #[test]
    fn exactly_mmio32_start_has_no_high_ram() {
        let l = MemoryLayout::new(MMIO32_START).unwrap();
        assert_eq!(l.ram_ranges().len(), 1);
        assert_eq!(l.e820().len(), 3);
        assert_eq!(l.ram_end(), MMIO32_START);
    }

    #[test]
    fn too_small() {
        match MemoryLayout::new(16 * MIB - PAGE_SIZE) {
            Err(Error::TooSmall { requested, minimum }) => {
                assert_eq!(requested, 16 * MIB - PAGE_SIZE);
                assert_eq!(minimum, 16 * MIB);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(MemoryLayout::new(0), Err(Error::TooSmall { .. })));
        assert!(MemoryLayout::new(16 * MIB).is_ok());
        let msg = MemoryLayout::new(8 * MIB).unwrap_err().to_string();
        assert_eq!(
            msg,
            "guest memory of 8 MiB is too small: at least 16 MiB are needed"
        );
        assert_eq!(Size(12345).to_string(), "12345 bytes");
        assert_eq!(Size(2 * GIB).to_string(), "2 GiB");
    }

    #[test]
    fn too_large_and_unaligned() {
        assert!(matches!(
            MemoryLayout::new(MAX_MEMORY + PAGE_SIZE),
            Err(Error::TooLarge {
                maximum: MAX_MEMORY,
                ..
            })
        ));
        assert!(matches!(
            MemoryLayout::new(u64::MAX),
            Err(Error::TooLarge { .. })
        ));
        assert!(MemoryLayout::new(MAX_MEMORY).is_ok());
        assert!(matches!(
            MemoryLayout::new(32 * MIB + 1),
            Err(Error::Unaligned { requested, alignment: PAGE_SIZE }) if requested == 32 * MIB + 1
        ));
    }

    #[test]
    fn initrd_placement() {
        let l = MemoryLayout::new(128 * MIB).unwrap();
        // Page aligned, at the top of low RAM.
        assert_eq!(
            l.initrd_addr(4 * MIB, 0x20_0000).unwrap(),
            GuestAddress(124 * MIB)
        );
        assert_eq!(
            l.initrd_addr(100, 0x20_0000).unwrap(),
            GuestAddress(128 * MIB - PAGE_SIZE)
        );
        assert_eq!(
            l.initrd_addr(PAGE_SIZE + 1, 0x20_0000).unwrap(),
            GuestAddress(128 * MIB - 2 * PAGE_SIZE)
        );
        // Exactly fills the space above a kernel ending mid-page.
        let kernel_end = 0x20_0001;
        let lowest = 0x20_1000;
        assert_eq!(
            l.initrd_addr(128 * MIB - lowest, kernel_end).unwrap(),
            GuestAddress(lowest)
        );
        match l.initrd_addr(128 * MIB - lowest + 1, kernel_end) {
            Err(Error::InitrdTooLarge { size, available }) => {
                assert_eq!(size, 128 * MIB - lowest + 1);
                assert_eq!(available, 128 * MIB - lowest);
            }
            other => panic!("unexpected {other:?}"),
        }
        // Kernel past low RAM, or absurd kernel end: nothing available.
        assert!(matches!(
            l.initrd_addr(1, 200 * MIB),
            Err(Error::InitrdTooLarge { available: 0, .. })
        ));
        assert!(matches!(
            l.initrd_addr(1, u64::MAX),
            Err(Error::InitrdTooLarge { available: 0, .. })
        ));
        // Found by the loader_initrd fuzz target: even an empty initrd cannot go above a
        // kernel that ends beyond low RAM (it used to be placed below the kernel's end).
        assert!(matches!(
            l.initrd_addr(0, 0x00ca_0010_0000_0000),
            Err(Error::InitrdTooLarge { available: 0, .. })
        ));
        assert!(matches!(
            l.initrd_addr(u64::MAX, 0),
            Err(Error::InitrdTooLarge { .. })
        ));

        // With high RAM the initrd still goes below the MMIO hole.
        let l = MemoryLayout::new(4 * GIB + 512 * MIB).unwrap();
        assert_eq!(
            l.initrd_addr(MIB, 0x20_0000).unwrap(),
            GuestAddress(MMIO32_START - MIB)
        );
    }

    /// The "VmFlags" of the host mapping (VMA) containing `addr`.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(line) = lines.next() {
            let Some((range, _)) = line.split_once(' ') else {
                continue;
            };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                continue;
            };
            if !(start..end).contains(&addr) {
                continue;
            }
            for l in lines.by_ref() {
                if let Some(v) = l.strip_prefix("VmFlags:") {
                    return v.trim().to_string();
                }
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    fn resident_pages(host: *mut u8, len: usize) -> usize {
        let pages = len.div_ceil(PAGE_SIZE as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: `host..host+len` is a live mapping owned by the caller's
        // GuestMemoryMmap, and `vec` has one byte per page of it.
        let ret = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(ret, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|b| *b & 1 != 0).count()
    }

    #[test]
    fn create_4_5g_noreserve_untouched() {
        let layout = MemoryLayout::new(4 * GIB + 512 * MIB).unwrap();
        let mem = create_guest_memory(&layout, DirtyBitmap::Off).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), 0xd000_0000),
                (GuestAddress(0x1_0000_0000), 0x5000_0000)
            ]
        );
        assert!(mem.address_in_range(GuestAddress(0xcfff_ffff)));
        assert!(!mem.address_in_range(GuestAddress(0xd000_0000)));
        assert!(!mem.address_in_range(GuestAddress(0xffff_ffff)));
        assert!(mem.address_in_range(GuestAddress(0x1_4fff_ffff)));
        assert!(!mem.address_in_range(GuestAddress(0x1_5000_0000)));

        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            let flags = vm_flags(host as u64);
            assert!(
                flags.split_whitespace().any(|f| f == "nr"),
                "mapping is not MAP_NORESERVE: {flags}"
            );
            assert_eq!(resident_pages(host, region.len() as usize), 0);
        }

        // Touch one page: exactly that one becomes resident (one huge page's worth where the
        // host backs anonymous memory with transparent huge pages unasked).
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1_0000_0000))
            .unwrap();
        let high = mem.find_region(GuestAddress(0x1_0000_0000)).unwrap();
        let host = high
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap();
        let resident = resident_pages(host, high.len() as usize);
        assert!((1..=512).contains(&resident), "{resident} pages resident");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1_0000_0000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn create_128m() {
        let layout = MemoryLayout::new(128 * MIB).unwrap();
        let mem: GuestRam = create_guest_memory(&layout, DirtyBitmap::Off).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress(128 * MIB - 1));
    }

    #[test]
    fn error_messages_mention_sizes() {
        let e = Error::InitrdTooLarge {
            size: 5000,
            available: 4096,
        };
        assert!(e.to_string().contains("5000") && e.to_string().contains("4096"));
        assert_eq!(u32::from(E820Kind::Ram), 1);
        assert_eq!(u32::from(E820Kind::Reserved), 2);
        assert_eq!(ram(0x1000, 0x1000).end(), 0x2000);
    }

    #[test]
    fn the_vmms_writes_set_the_dirty_bitmap_until_taken() {
        use vm_memory::{Bytes, GuestAddress};
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        for mem in [
            create_guest_memory(&layout, DirtyBitmap::On).unwrap(),
            create_guest_memory_memfd(&layout, DirtyBitmap::On)
                .unwrap()
                .0,
        ] {
            assert!(has_dirty_bitmap(&mem));
            assert_eq!(take_dirty_pages(&mem, 0).unwrap(), vec![0u64; 64]);
            mem.write_slice(&[1; 5000], GuestAddress(3 * 4096 + 100))
                .unwrap();
            mem.write_obj(7u8, GuestAddress(MIB)).unwrap();
            let bits = take_dirty_pages(&mem, 0).unwrap();
            assert_eq!(bits[0], 0b11 << 3);
            assert_eq!(bits[256 / 64], 1);
            assert!(take_dirty_pages(&mem, 0).unwrap().iter().all(|&w| w == 0));
            assert!(take_dirty_pages(&mem, 1).is_none());
        }
    }

    #[test]
    fn memory_without_a_dirty_bitmap_has_none_to_take() {
        use vm_memory::{Bytes, GuestAddress};
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let (memfd, file) = create_guest_memory_memfd(&layout, DirtyBitmap::Off).unwrap();
        for mem in [
            create_guest_memory(&layout, DirtyBitmap::Off).unwrap(),
            map_guest_memory(&layout, &file, Sharing::Private, DirtyBitmap::Off).unwrap(),
            memfd,
        ] {
            assert!(!has_dirty_bitmap(&mem));
            mem.write_slice(&[1; 5000], GuestAddress(3 * 4096 + 100))
                .unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * 4096 + 100)).unwrap(), 1);
            assert!(take_dirty_pages(&mem, 0).is_none());
        }
        // A private map of the same file can still have one.
        let tracked = map_guest_memory(&layout, &file, Sharing::Private, DirtyBitmap::On).unwrap();
        tracked.write_obj(7u8, GuestAddress(0)).unwrap();
        assert_eq!(take_dirty_pages(&tracked, 0).unwrap()[0], 1);
        assert_eq!(DirtyBitmap::tracked_if(true), DirtyBitmap::On);
        assert_eq!(DirtyBitmap::tracked_if(false), DirtyBitmap::default());
    }

    #[test]
    fn memfd_memory_is_shared_with_its_file_and_private_maps_copy_on_write() {
        use std::os::unix::fs::FileExt;
        // Both sides of the MMIO gap, so two regions at consecutive file offsets.
        let layout = MemoryLayout::new(3328 * MIB + 16 * MIB).unwrap();
        let (mem, file) = create_guest_memory_memfd(&layout, DirtyBitmap::Off).unwrap();
        assert_eq!(file.metadata().unwrap().len(), layout.mem_size());
        mem.write_obj(0x1122_3344u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress(HIGH_RAM_START + 8))
            .unwrap();
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1122_3344);
        file.read_exact_at(&mut b, MMIO32_START + 8).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x5566_7788);

        let fork = map_guest_memory(&layout, &file, Sharing::Private, DirtyBitmap::Off).unwrap();
        assert_eq!(
            fork.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344
        );
        fork.write_obj(0xffff_ffffu32, GuestAddress(0x1000))
            .unwrap();
        // The fork's write is its own; the original and the file are untouched.
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344
        );
        file.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0x1122_3344);

        file.set_len(MIB).unwrap();
        assert!(matches!(
            map_guest_memory(&layout, &file, Sharing::Private, DirtyBitmap::Off),
            Err(Error::FileTooSmall { .. })
        ));
    }

    #[test]
    fn a_memfd_is_sealed_only_once_its_shared_mapping_is_private_and_then_never_changes() {
        use std::os::unix::fs::FileExt;
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let (mem, file) = create_guest_memory_memfd(&layout, DirtyBitmap::Off).unwrap();
        mem.write_obj(0xabcd_u32, GuestAddress(0x2000)).unwrap();
        assert!(!is_sealed(&file));
        // The guest's shared writable mapping still exists.
        assert!(seal_memory_file(&file).is_err());
        assert!(!is_sealed(&file));
        remap_private(&mem, &file).unwrap();
        seal_memory_file(&file).unwrap();
        assert!(is_sealed(&file));
        // Frozen: no write, no shrink, no growth, and no new shared writable mapping; the
        // VM's own (private) writes and a new private mapping still work.
        assert!(file.write_all_at(&[1], 0x2000).is_err());
        assert!(file.set_len(MIB).is_err());
        assert!(file.set_len(32 * MIB).is_err());
        assert!(map_guest_memory(&layout, &file, Sharing::Shared, DirtyBitmap::Off).is_err());
        mem.write_obj(0x1234_u32, GuestAddress(0x2000)).unwrap();
        let fork = map_guest_memory(&layout, &file, Sharing::Private, DirtyBitmap::Off).unwrap();
        assert_eq!(fork.read_obj::<u32>(GuestAddress(0x2000)).unwrap(), 0xabcd);
        fork.write_obj(7_u32, GuestAddress(0x2000)).unwrap();
        let mut b = [0u8; 4];
        file.read_exact_at(&mut b, 0x2000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xabcd);
        // A plain file is never sealed.
        let plain =
            std::fs::File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        assert!(!is_sealed(&plain));
    }
}
