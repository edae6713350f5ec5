//! Kernel, initrd and command line loading for Ember microVMs (x86_64).
//!
//! * [`load_kernel`] opens a kernel image, recognizes its format and loads it
//!   into guest memory: an ELF `vmlinux` (or any ELF64 x86_64 kernel, such as
//!   Ember's probe guest) at its own physical addresses, a `bzImage`'s
//!   protected-mode part at [`KERNEL_LOAD_ADDR`]. The result tells where the
//!   kernel is and which boot protocols it offers ([`LoadedKernel`]).
//!   [`load_kernel_from`] does the same from any `Read + ReadVolatile + Seek`
//!   source, such as a `Cursor<&[u8]>` in a fuzz target.
//! * [`load_initrd`] reads an initrd straight into guest memory at the place
//!   [`MemoryLayout::initrd_addr`] picks.
//! * [`load_cmdline`] writes the NUL-terminated command line.
//!
//! Nothing here panics on a malformed image: every failure is an [`Error`]
//! naming the file and the sizes involved.
//!
//! # Example
//!
//! ```
//! use std::io::Cursor;
//! use ember_loader::{load_cmdline, load_kernel_from, BootProtocol, Error, KernelFormat};
//! use ember_memory::addresses::{CMDLINE_ADDR, CMDLINE_MAX_SIZE};
//! use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let mem = create_guest_memory(&MemoryLayout::new(32 * MIB)?, DirtyBitmap::Off)?;
//!
//! // A minimal ELF64 kernel: one PT_LOAD segment of 4 bytes at 2 MiB.
//! let image = tiny_elf(0x20_0000, &[0xf4, 0xeb, 0xfd, 0x90]);
//! let kernel = load_kernel_from(&mem, &mut Cursor::new(&image[..]))?;
//! assert_eq!(kernel.format, KernelFormat::Elf);
//! assert_eq!(kernel.kernel_start, GuestAddress(0x20_0000));
//! assert_eq!(kernel.kernel_end, 0x20_0004);
//! assert_eq!(kernel.preferred_protocol(), BootProtocol::Linux64);
//! assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0xf4);
//!
//! // Anything else is rejected with a typed error.
//! let junk = vec![0x42u8; 4096];
//! assert!(matches!(
//!     load_kernel_from(&mem, &mut Cursor::new(&junk[..])),
//!     Err(Error::NotAKernel { .. })
//! ));
//!
//! let max = CMDLINE_MAX_SIZE as usize;
//! let size = load_cmdline(&mem, "console=ttyS0", GuestAddress(CMDLINE_ADDR), max)?;
//! assert_eq!(size, 14);
//! # fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
//! #     let mut f = Vec::new();
//! #     f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
//! #     f.extend_from_slice(&2u16.to_le_bytes()); // e_type EXEC
//! #     f.extend_from_slice(&62u16.to_le_bytes()); // e_machine x86_64
//! #     f.extend_from_slice(&1u32.to_le_bytes()); // e_version
//! #     f.extend_from_slice(&paddr.to_le_bytes()); // e_entry
//! #     f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
//! #     f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
//! #     f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
//! #     for v in [64u16, 56, 1, 64, 0, 0] { f.extend_from_slice(&v.to_le_bytes()); }
//! #     f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
//! #     f.extend_from_slice(&5u32.to_le_bytes()); // R+X
//! #     for v in [120u64, paddr, paddr, code.len() as u64, code.len() as u64, 16] {
//! #         f.extend_from_slice(&v.to_le_bytes());
//! #     }
//! #     f.extend_from_slice(code);
//! #     f
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ember_memory::addresses::KERNEL_LOAD_ADDR;
use ember_memory::{MemoryLayout, HIMEM_START};
use linux_loader::bootparam::{setup_header, LOADED_HIGH};
use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

/// ELF magic at offset 0.
pub const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// bzImage magic "HdrS"...
pub const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
/// ...at this offset of the file (the setup header's `header` field).
pub const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
/// Offset of the setup header in a bzImage.
pub const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Offset of the 64-bit entry point from the start of a bzImage's
/// protected-mode kernel.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Path reported in errors by [`load_kernel_from`], which has no file name.
pub const IMAGE_PATH: &str = "<kernel image>";

/// A way to enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, `hvm_start_info` in EBX.
    Pvh,
    /// 64-bit Linux boot protocol: long mode, zero page in RSI.
    Linux64,
}

/// Kernel image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF64 (`vmlinux`, or another ELF kernel).
    Elf,
    /// Linux `bzImage`.
    BzImage,
}

/// What [`load_kernel`] loaded, and how to start it.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// Image format.
    pub format: KernelFormat,
    /// Lowest guest address loaded.
    pub kernel_start: GuestAddress,
    /// End (exclusive) of the memory the kernel claims; always inside guest
    /// RAM. ELF: the highest `p_paddr + p_memsz` of its loadable segments.
    /// bzImage: the end of the loaded payload or, for boot protocol 2.10+,
    /// the end of the area the kernel decompresses into
    /// (`max(load address, pref_address) + init_size`, which must be RAM),
    /// whichever is higher. Place nothing between `kernel_start` and here.
    pub kernel_end: u64,
    /// 64-bit Linux boot protocol entry: ELF `e_entry`; bzImage: kernel start
    /// + 0x200.
    pub linux64_entry: GuestAddress,
    /// PVH entry (the ELF's `XEN_ELFNOTE_PHYS32_ENTRY` note), if any.
    pub pvh_entry: Option<GuestAddress>,
    /// The bzImage setup header (with `code32_start` set to the load
    /// address), to copy into the zero page; `None` for ELF.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// The boot protocols this kernel supports, preferred first.
    pub fn protocols(&self) -> Vec<BootProtocol> {
        let mut v = Vec::with_capacity(2);
        if self.pvh_entry.is_some() {
            v.push(BootProtocol::Pvh);
        }
        v.push(BootProtocol::Linux64);
        v
    }

    /// [`BootProtocol::Pvh`] if the kernel offers it, else
    /// [`BootProtocol::Linux64`].
    pub fn preferred_protocol(&self) -> BootProtocol {
        if self.pvh_entry.is_some() {
            BootProtocol::Pvh
        } else {
            BootProtocol::Linux64
        }
    }
}

/// Why a recognized kernel image could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// linux-loader rejected the image.
    #[error("{0}")]
    Loader(#[from] linux_loader::loader::Error),
    /// Reading the image's headers failed (I/O error or truncated file).
    #[error("cannot read the {what}: {source}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The ELF file is not ELF64.
    #[error("not a 64-bit ELF file (EI_CLASS is {class}, expected 2)")]
    NotElf64 {
        /// The ELF class byte.
        class: u8,
    },
    /// The ELF file is big-endian (or has an invalid data encoding).
    #[error("not a little-endian ELF file (EI_DATA is {data}, expected 1)")]
    NotLittleEndian {
        /// The ELF data encoding byte.
        data: u8,
    },
    /// The ELF file is not for x86_64.
    #[error("ELF machine is {machine}, not x86_64 (62)")]
    WrongMachine {
        /// `e_machine`.
        machine: u16,
    },
    /// The ELF program header entry size is not 56.
    #[error("ELF program header entries are {size} bytes, expected 56")]
    BadProgramHeaderSize {
        /// `e_phentsize`.
        size: u16,
    },
    /// A segment's bytes lie (partly) beyond the end of the file.
    #[error("ELF segment data [{offset:#x}, +{size:#x}) lies beyond the end of the {file_size}-byte file: the file is truncated")]
    SegmentBeyondFile {
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        size: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// The ELF file has nothing to load.
    #[error("the ELF file has no loadable (PT_LOAD) segment")]
    NoLoadableSegment,
    /// A segment would overwrite the boot structures below 1 MiB.
    #[error("segment [{start:#x}, {end:#x}) starts below {HIMEM_START:#x}, where the boot structures live")]
    BelowHimem {
        /// Segment start (physical address).
        start: u64,
        /// Segment end (exclusive).
        end: u64,
    },
    /// The kernel does not fit in guest memory.
    #[error(
        "kernel needs guest memory [{start:#x}, {end:#x}), which is not all RAM (guest RAM \
         ends at {ram_end:#x}): {}", does_not_fit_hint(*start, *end)
    )]
    DoesNotFit {
        /// Start of the area.
        start: u64,
        /// End of the area (exclusive; saturated on overflow).
        end: u64,
        /// End of guest RAM (exclusive).
        ram_end: u64,
    },
    /// An entry point lies outside the loaded segments.
    #[error("{which} entry point {entry:#x} is outside the loaded kernel [{start:#x}, {end:#x})")]
    EntryOutsideKernel {
        /// "ELF" or "PVH".
        which: &'static str,
        /// The entry point.
        entry: u64,
        /// Kernel start.
        start: u64,
        /// Kernel end (exclusive).
        end: u64,
    },
    /// The bzImage is shorter than its own setup code.
    #[error(
        "bzImage is truncated: {size} bytes, but its real-mode setup alone takes {setup_size}"
    )]
    Truncated {
        /// File size.
        size: u64,
        /// Size of the setup sectors (including the boot sector).
        setup_size: u64,
    },
    /// The bzImage's boot protocol is too old.
    #[error("bzImage boot protocol {version:#x} with loadflags {loadflags:#x} is unsupported: need protocol 2.00+ and a kernel loaded high")]
    UnsupportedBzImage {
        /// Boot protocol version.
        version: u16,
        /// `loadflags`.
        loadflags: u8,
    },
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is neither ELF nor bzImage.
    #[error("{} is not a kernel: neither an ELF file (\\x7fELF at 0) nor a bzImage (\"HdrS\" at 0x202)", path.display())]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// The kernel image was recognized but could not be loaded.
    #[error("cannot load kernel {}: {source}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: LoadError,
    },
    /// The initrd does not fit in guest low RAM above the kernel.
    #[error("initrd {} ({size} bytes) does not fit in guest low RAM: only {available} bytes are free above the kernel", path.display())]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Initrd size in bytes.
        size: u64,
        /// Bytes available.
        available: u64,
    },
    /// Reading the initrd into guest memory failed.
    #[error("cannot read initrd {} into guest memory at {addr:#x}: {source}", path.display())]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Guest address being filled.
        addr: u64,
        /// The vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The initrd file ended early (it shrank while being read).
    #[error("initrd {} ended after {read} of {expected} bytes", path.display())]
    InitrdTruncated {
        /// The file.
        path: PathBuf,
        /// Size when opened.
        expected: u64,
        /// Bytes read.
        read: u64,
    },
    /// Another memory layout error.
    #[error(transparent)]
    Memory(ember_memory::Error),
    /// The command line does not fit.
    #[error("command line of {len} bytes (including the terminating NUL) exceeds the maximum of {max} bytes")]
    CmdlineTooLong {
        /// Needed size, including the NUL.
        len: usize,
        /// Maximum size, including the NUL.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("command line contains a NUL byte")]
    InvalidCmdline,
    /// Writing the command line to guest memory failed.
    #[error("cannot write the command line ({len} bytes) at guest address {addr:#x}: {source}")]
    CmdlineWrite {
        /// Guest address.
        addr: u64,
        /// Bytes, including the NUL.
        len: usize,
        /// The vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Opens `path` for reading, refusing anything but a regular file.
///
/// The file is opened with `O_NONBLOCK` (and `O_CLOEXEC`), so a FIFO or a device cannot block
/// the caller in `open(2)`, then checked with `fstat`: a FIFO, socket, character or block device
/// or directory gives an `InvalidInput` error saying what it is.
pub fn open_regular_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.as_os_str().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path is empty",
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let file_type = file.metadata()?.file_type();
    if file_type.is_file() {
        return Ok(file);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "not a regular file (it is {}); Ember reads it only from a regular file",
            file_type_name(file_type)
        ),
    ))
}

/// Reads a small regular file whole: [`open_regular_file`], then at most `max` bytes (a larger
/// file is an `InvalidData` error, read no further than `max + 1` bytes).
pub fn read_small_file(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_regular_file(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than the {max}-byte limit for this kind of file"),
        ));
    }
    Ok(bytes)
}

/// What a file is, in words ("a FIFO", "a character device", ...).
pub fn file_type_name(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Recognizes the image format; `None` if neither ELF nor bzImage.
fn sniff<F: Read + Seek>(image: &mut F) -> io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    image.rewind()?;
    if read_up_to(image, &mut magic)? == 4 && magic == ELF_MAGIC {
        return Ok(Some(KernelFormat::Elf));
    }
    image.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    if read_up_to(image, &mut magic)? == 4 && magic == BZIMAGE_MAGIC {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

fn read_err(what: &'static str) -> impl FnOnce(io::Error) -> LoadError {
    move |source| LoadError::Read { what, source }
}

/// Checks that `[start, start + len)` is guest RAM. An empty range must still start in guest
/// RAM or right at the end of it: its end is reported as the kernel's end, which later
/// placements (the initrd) trust.
fn check_fits<M: GuestMemoryBackend>(mem: &M, start: u64, len: u64) -> Result<u64, LoadError> {
    let end = start.checked_add(len);
    let fits = match (end, usize::try_from(len)) {
        (Some(_), Ok(0)) => {
            mem.address_in_range(GuestAddress(start))
                || start
                    .checked_sub(1)
                    .is_some_and(|last| mem.address_in_range(GuestAddress(last)))
        }
        (Some(_), Ok(len)) => mem.check_range(GuestAddress(start), len),
        _ => false,
    };
    match end {
        Some(end) if fits => Ok(end),
        _ => Err(LoadError::DoesNotFit {
            start,
            end: end.unwrap_or(u64::MAX),
            ram_end: mem.last_addr().0.saturating_add(1),
        }),
    }
}

/// What a [`LoadError::DoesNotFit`] message suggests: more memory when a bigger VM would hold
/// the range, a bad header when none would.
fn does_not_fit_hint(start: u64, end: u64) -> String {
    use ember_memory::{HIGH_RAM_START, MAX_MEMORY, MIB, MMIO32_END, MMIO32_START};
    if start < MMIO32_END && end > MMIO32_START {
        return "the range overlaps the 32-bit MMIO gap [0xd0000000, 0x100000000): the image \
                header is corrupt or not for this machine"
            .into();
    }
    // Guest RAM needed for RAM to reach `end` (low RAM stops at the MMIO gap).
    let needed = if end <= MMIO32_START {
        end
    } else {
        end - HIGH_RAM_START + MMIO32_START
    };
    if needed > MAX_MEMORY {
        return "no VM is that large: the image header is corrupt or not for this machine".into();
    }
    format!(
        "a VM with at least {} MiB of memory would hold it",
        needed.div_ceil(MIB)
    )
}
fn load_elf<F, M>(mem: &M, image: &mut F) -> Result<LoadedKernel, LoadError>
where
    F: Read + ReadVolatile + Seek,
    M: GuestMemoryBackend,
{
    image.rewind().map_err(read_err("ELF header"))?;
    let mut ehdr = Elf64_Ehdr::default();
    image
        .read_exact(ehdr.as_mut_slice())
        .map_err(read_err("ELF header"))?;
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64 {
        return Err(LoadError::NotElf64 {
            class: ehdr.e_ident[EI_CLASS],
        });
    }
    if ehdr.e_ident[EI_DATA] != ELFDATA2LSB {
        return Err(LoadError::NotLittleEndian {
            data: ehdr.e_ident[EI_DATA],
        });
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(LoadError::WrongMachine {
            machine: ehdr.e_machine,
        });
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() {
        return Err(LoadError::BadProgramHeaderSize {
            size: ehdr.e_phentsize,
        });
    }

    // Validate every loadable segment before anything is written.
    let file_size = image
        .seek(SeekFrom::End(0))
        .map_err(read_err("ELF file size"))?;
    image
        .seek(SeekFrom::Start(ehdr.e_phoff))
        .map_err(read_err("ELF program headers"))?;
    let mut range: Option<(u64, u64)> = None;
    for _ in 0..ehdr.e_phnum {
        let mut phdr = Elf64_Phdr::default();
        image
            .read_exact(phdr.as_mut_slice())
            .map_err(read_err("ELF program headers"))?;
        if phdr.p_type != PT_LOAD || (phdr.p_filesz == 0 && phdr.p_memsz == 0) {
            continue;
        }
        let data_end = phdr.p_offset.checked_add(phdr.p_filesz);
        if data_end.is_none_or(|end| end > file_size) {
            return Err(LoadError::SegmentBeyondFile {
                offset: phdr.p_offset,
                size: phdr.p_filesz,
                file_size,
            });
        }
        let start = phdr.p_paddr;
        let len = phdr.p_filesz.max(phdr.p_memsz);
        if start < HIMEM_START {
            return Err(LoadError::BelowHimem {
                start,
                end: start.saturating_add(len),
            });
        }
        let end = check_fits(mem, start, len)?;
        range = Some(match range {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }
    let (start, end) = range.ok_or(LoadError::NoLoadableSegment)?;

    let entry = ehdr.e_entry;
    if !(start..end).contains(&entry) {
        return Err(LoadError::EntryOutsideKernel {
            which: "ELF",
            entry,
            start,
            end,
        });
    }

    let result = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))?;
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
        _ => None,
    };
    if let Some(pvh) = pvh_entry {
        if !(start..end).contains(&pvh.0) {
            return Err(LoadError::EntryOutsideKernel {
                which: "PVH",
                entry: pvh.0,
                start,
                end,
            });
        }
    }
    Ok(LoadedKernel {
        format: KernelFormat::Elf,
        kernel_start: GuestAddress(start),
        kernel_end: end.max(result.kernel_end),
        linux64_entry: GuestAddress(entry),
        pvh_entry,
        setup_header: None,
    })
}

fn load_bzimage<F, M>(mem: &M, image: &mut F) -> Result<LoadedKernel, LoadError>
where
    F: Read + ReadVolatile + Seek,
    M: GuestMemoryBackend,
{
    let size = image
        .seek(SeekFrom::End(0))
        .map_err(read_err("bzImage size"))?;
    image
        .seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(read_err("bzImage setup header"))?;
    let mut hdr = setup_header::default();
    image
        .read_exact(hdr.as_mut_slice())
        .map_err(read_err("bzImage setup header"))?;
    let (version, loadflags) = (hdr.version, hdr.loadflags);
    if version < 0x200 || loadflags & LOADED_HIGH == 0 {
        return Err(LoadError::UnsupportedBzImage { version, loadflags });
    }
    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let payload = size
        .checked_sub(setup_size)
        .ok_or(LoadError::Truncated { size, setup_size })?;
    let mut kernel_end = check_fits(mem, KERNEL_LOAD_ADDR, payload)?;
    if version >= 0x20a {
        // The kernel decompresses itself into [runtime start, + init_size),
        // the runtime start being at least pref_address (LOAD_PHYSICAL_ADDR).
        let (pref, init_size) = (hdr.pref_address, hdr.init_size);
        let runtime_start = pref.max(KERNEL_LOAD_ADDR);
        let end = check_fits(mem, runtime_start, u64::from(init_size))?;
        kernel_end = kernel_end.max(end);
    }

    let result = BzImage::load(mem, Some(GuestAddress(KERNEL_LOAD_ADDR)), image, None)?;
    kernel_end = kernel_end.max(result.kernel_end);
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        kernel_start: GuestAddress(KERNEL_LOAD_ADDR),
        kernel_end,
        linux64_entry: GuestAddress(KERNEL_LOAD_ADDR + BZIMAGE_64BIT_ENTRY_OFFSET),
        pvh_entry: None,
        setup_header: result.setup_header,
    })
}

fn load_image<F, M>(mem: &M, image: &mut F, path: &Path) -> Result<LoadedKernel, Error>
where
    F: Read + ReadVolatile + Seek,
    M: GuestMemoryBackend,
{
    let format = sniff(image)
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| Error::NotAKernel {
            path: path.to_path_buf(),
        })?;
    let loaded = match format {
        KernelFormat::Elf => load_elf(mem, image),
        KernelFormat::BzImage => load_bzimage(mem, image),
    };
    loaded.map_err(|source| Error::Load {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads the kernel image at `path` into guest memory.
///
/// ELF images (`\x7fELF` at offset 0) are loaded at their segments' physical
/// addresses, which must be at or above 1 MiB; bzImages ("HdrS" at 0x202) at
/// [`KERNEL_LOAD_ADDR`]. Anything else is [`Error::NotAKernel`]. Images that
/// do not fit in guest memory are rejected before anything is written
/// ([`LoadError::DoesNotFit`]).
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, path: &Path) -> Result<LoadedKernel, Error> {
    let mut file = open_regular_file(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    load_image(mem, &mut file, path)
}

/// [`load_kernel`] from an already open image, e.g. a `Cursor<&[u8]>`
/// (fuzzing) or a `File`. Errors name the path [`IMAGE_PATH`].
pub fn load_kernel_from<F: Read + ReadVolatile + Seek, M: GuestMemoryBackend>(
    mem: &M,
    image: &mut F,
) -> Result<LoadedKernel, Error> {
    load_image(mem, image, Path::new(IMAGE_PATH))
}

/// Reads the initrd at `path` straight into guest memory at
/// [`MemoryLayout::initrd_addr`] (page aligned, as high as possible in low
/// RAM, above `kernel_end`). Returns its `(address, size)`.
///
/// The file must be a regular file ([`open_regular_file`]: a FIFO or a device is refused at
/// once).
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    layout: &MemoryLayout,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), Error> {
    let mut file = open_regular_file(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    load_initrd_from(mem, &mut file, size, layout, kernel_end, path)
}

/// [`load_initrd`] from an already open image of `size` bytes (e.g. a `&[u8]` when fuzzing);
/// errors name `path`. Fails with [`Error::InitrdTruncated`] if the image ends before `size`
/// bytes.
pub fn load_initrd_from<M: GuestMemoryBackend, R: ReadVolatile>(
    mem: &M,
    image: &mut R,
    size: u64,
    layout: &MemoryLayout,
    kernel_end: u64,
    path: &Path,
) -> Result<(GuestAddress, u64), Error> {
    let addr = layout.initrd_addr(size, kernel_end).map_err(|e| match e {
        ember_memory::Error::InitrdTooLarge { size, available } => Error::InitrdTooLarge {
            path: path.to_path_buf(),
            size,
            available,
        },
        other => Error::Memory(other),
    })?;

    // Bounded chunks: read(2) returns at most ~2 GiB at a time anyway.
    const CHUNK: u64 = 1 << 30;
    let mut done = 0u64;
    while done < size {
        // initrd_addr guarantees addr + size <= low RAM end.
        let at = GuestAddress(addr.0 + done);
        let count = (size - done).min(CHUNK) as usize;
        let n = mem
            .read_volatile_from(at, image, count)
            .map_err(|source| Error::InitrdRead {
                path: path.to_path_buf(),
                addr: at.0,
                source,
            })?;
        if n == 0 {
            return Err(Error::InitrdTruncated {
                path: path.to_path_buf(),
                expected: size,
                read: done,
            });
        }
        done += n as u64;
    }
    Ok((addr, size))
}

/// Writes `cmdline` and a terminating NUL at `addr`. `max_size` includes the
/// NUL. Returns the size written, including the NUL.
pub fn load_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &str,
    addr: GuestAddress,
    max_size: usize,
) -> Result<u32, Error> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::InvalidCmdline);
    }
    // A &str is at most isize::MAX bytes, so + 1 cannot overflow.
    let len = cmdline.len() + 1;
    let too_long = Error::CmdlineTooLong { len, max: max_size };
    if len > max_size {
        return Err(too_long);
    }
    let size = u32::try_from(len).map_err(|_| too_long)?;
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, addr)
        .map_err(|source| Error::CmdlineWrite {
            addr: addr.0,
            len,
            source,
        })?;
    Ok(size)
}

#[cfg(test)]
mod tests;
