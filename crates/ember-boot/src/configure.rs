//! [`write_boot_params`]: every boot structure a protocol needs, written in one call, returning
//! the registers the boot vCPU starts with (the role of linux-loader's `BootConfigurator`:
//! the code that writes the structures says where it put them).

use ember_memory::addresses::{
    BOOT_STACK_TOP, CMDLINE_ADDR, CMDLINE_MAX_SIZE, GDT_ADDR, IDT_ADDR, PVH_MEMMAP_ADDR,
    PVH_START_INFO_ADDR, ZERO_PAGE_ADDR,
};
use ember_memory::E820Entry;
use linux_loader::bootparam::setup_header;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::{gdt, paging, Error, LinuxBootParams, PvhBootParams};

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Xen PVH boot ABI: 32-bit protected mode, paging off, EBX = start info.
    Pvh {
        /// Guest physical entry point (RIP).
        entry: u64,
        /// Guest physical address of the `hvm_start_info` (EBX).
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64 {
        /// Guest physical = virtual entry point (RIP).
        entry: u64,
        /// Guest physical address of the zero page / `boot_params` (RSI).
        zero_page: u64,
        /// Guest physical address of the PML4 (CR3).
        pml4: u64,
    },
}

/// The boot vCPU's starting state, as far as the boot structures decide it: what
/// `ember_vcpu::Vcpu::configure` needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootRegs {
    /// Entry protocol and its addresses.
    pub mode: EntryMode,
    /// Guest physical address of the GDT (GDTR base; limit = 4 * 8 - 1).
    pub gdt_addr: u64,
    /// The GDT as written: null, code (selector 0x08), data (0x10), TSS (0x18).
    pub gdt: [u64; 4],
    /// Guest physical address of the IDT (IDTR base; limit 7, one null gate).
    pub idt_addr: u64,
    /// Initial RSP and RBP for [`EntryMode::Linux64`] (unused for PVH, whose ABI has no stack).
    pub stack_top: u64,
}

/// The kernel entry to boot through.
#[derive(Clone, Copy, Debug)]
pub enum BootEntry {
    /// PVH at `entry` (the kernel's `XEN_ELFNOTE_PHYS32_ENTRY`).
    Pvh {
        /// Entry point.
        entry: GuestAddress,
    },
    /// The Linux 64-bit boot protocol at `entry`, with the bzImage's setup header (`None`
    /// for an ELF vmlinux).
    Linux64 {
        /// Entry point.
        entry: GuestAddress,
        /// The kernel's setup header, copied into the zero page.
        setup_header: Option<setup_header>,
    },
}

/// What [`write_boot_params`] writes.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    /// The entry and its protocol.
    pub entry: BootEntry,
    /// The kernel command line (at most [`CMDLINE_MAX_SIZE`] bytes with its NUL, no NUL inside).
    pub cmdline: &'a str,
    /// The initrd `(address, size)`, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// The ACPI RSDP, if the VM has ACPI tables.
    pub rsdp: Option<GuestAddress>,
    /// The memory map.
    pub e820: &'a [E820Entry],
}

/// Writes the command line at [`CMDLINE_ADDR`], the protocol's structures (PVH start info and
/// memory map, or the zero page and identity page tables), the GDT and IDT, and returns the
/// boot vCPU's registers.
///
/// ```
/// use ember_boot::{write_boot_params, BootConfig, BootEntry, EntryMode};
/// use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
/// use vm_memory::GuestAddress;
///
/// let layout = MemoryLayout::new(64 * MIB)?;
/// let mem = create_guest_memory(&layout, DirtyBitmap::Off)?;
/// let regs = write_boot_params(
///     &mem,
///     &BootConfig {
///         entry: BootEntry::Pvh { entry: GuestAddress(0x100_0000) },
///         cmdline: "console=ttyS0",
///         initrd: None,
///         rsdp: None,
///         e820: &layout.e820(),
///     },
/// )?;
/// assert!(matches!(regs.mode, EntryMode::Pvh { entry: 0x100_0000, .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &BootConfig,
) -> Result<BootRegs, Error> {
    let cmdline_addr = GuestAddress(CMDLINE_ADDR);
    let cmdline_size = write_cmdline(mem, cmdline_addr, cfg.cmdline)?;
    let (mode, gdt) = match cfg.entry {
        BootEntry::Pvh { entry } => {
            crate::write_pvh_start_info(
                mem,
                GuestAddress(PVH_START_INFO_ADDR),
                GuestAddress(PVH_MEMMAP_ADDR),
                &PvhBootParams {
                    cmdline_addr,
                    initrd: cfg.initrd,
                    memmap: cfg.e820,
                    rsdp_addr: cfg.rsdp,
                },
            )?;
            (
                EntryMode::Pvh {
                    entry: entry.0,
                    start_info: PVH_START_INFO_ADDR,
                },
                gdt::PROTECTED_MODE,
            )
        }
        BootEntry::Linux64 {
            entry,
            setup_header,
        } => {
            crate::write_zero_page(
                mem,
                GuestAddress(ZERO_PAGE_ADDR),
                &LinuxBootParams {
                    setup_header,
                    cmdline_addr,
                    cmdline_size,
                    initrd: cfg.initrd,
                    e820: cfg.e820,
                    acpi_rsdp_addr: cfg.rsdp,
                },
            )?;
            let pml4 = paging::write_identity_page_tables(mem)?;
            (
                EntryMode::Linux64 {
                    entry: entry.0,
                    zero_page: ZERO_PAGE_ADDR,
                    pml4: pml4.0,
                },
                gdt::LONG_MODE,
            )
        }
    };
    gdt::write_gdt(mem, GuestAddress(GDT_ADDR), &gdt)?;
    gdt::write_idt(mem, GuestAddress(IDT_ADDR))?;
    Ok(BootRegs {
        mode,
        gdt_addr: GDT_ADDR,
        gdt,
        idt_addr: IDT_ADDR,
        stack_top: BOOT_STACK_TOP,
    })
}

/// Writes `cmdline` and its NUL at `addr`; returns the size written (NUL included).
fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    cmdline: &str,
) -> Result<u32, Error> {
    let len = cmdline.len() + 1;
    if cmdline.as_bytes().contains(&0) || len as u64 > CMDLINE_MAX_SIZE {
        return Err(Error::Cmdline {
            len,
            max: usize::try_from(CMDLINE_MAX_SIZE).unwrap_or(usize::MAX),
        });
    }
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, addr)
        .map_err(|source| Error::GuestWrite {
            what: "command line",
            addr: addr.0,
            size: len,
            source,
        })?;
    #[allow(
        clippy::cast_possible_truncation,
        reason = "at most CMDLINE_MAX_SIZE (2048), checked above: lossless"
    )]
    let len = len as u32;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};

    #[test]
    fn both_protocols_write_their_structures() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let mem = create_guest_memory(&layout, DirtyBitmap::Off).unwrap();
        let e820 = layout.e820();
        let cfg = |entry| BootConfig {
            entry,
            cmdline: "console=ttyS0",
            initrd: Some((GuestAddress(32 * MIB), 4096)),
            rsdp: None,
            e820: &e820,
        };
        let regs = write_boot_params(
            &mem,
            &cfg(BootEntry::Linux64 {
                entry: GuestAddress(0x100_0200),
                setup_header: None,
            }),
        )
        .unwrap();
        assert_eq!(regs.gdt, gdt::LONG_MODE);
        let EntryMode::Linux64 { zero_page, .. } = regs.mode else {
            panic!("{regs:?}");
        };
        // cmdline_size in the zero page, the command line itself and its NUL.
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(zero_page + 0x238))
                .unwrap(),
            14
        );
        let mut text = [0u8; 14];
        mem.read_slice(&mut text, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0\0");

        let regs = write_boot_params(
            &mem,
            &cfg(BootEntry::Pvh {
                entry: GuestAddress(0x100_0000),
            }),
        )
        .unwrap();
        assert_eq!(regs.gdt, gdt::PROTECTED_MODE);
        assert!(matches!(
            write_boot_params(
                &mem,
                &BootConfig {
                    cmdline: &"x".repeat(2048),
                    ..cfg(BootEntry::Pvh {
                        entry: GuestAddress(0)
                    })
                }
            ),
            Err(Error::Cmdline { len: 2049, .. })
        ));
    }
}
