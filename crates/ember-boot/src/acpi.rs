//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) written into guest memory.
//!
//! The tables are built with the [`acpi_tables`] crate (table builders and an
//! AML generator, no hand-assembled bytes) and placed one after the other,
//! 16-byte aligned, in `[ACPI_TABLES_START, ACPI_TABLES_END)`
//! (`[0xe0000, 0x100000)`, not RAM in the e820 map):
//!
//! | table | contents |
//! |-------|----------|
//! | RSDP  | at `0xe0000` (Linux's legacy BIOS-area scan finds it there), revision 2, points at the XSDT |
//! | XSDT  | entries: FADT, MADT |
//! | FADT  | revision 6, `HW_REDUCED_ACPI`, no FACS, `X_DSDT`; sleep control/status registers at I/O ports [`SLEEP_CONTROL_PORT`] / [`SLEEP_STATUS_PORT`]; reset register at [`RESET_PORT`] with [`RESET_VALUE`] (`RESET_REG_SUP`) |
//! | MADT  | local APIC address `0xfee00000`; one enabled Processor Local APIC per vCPU (ACPI UID = APIC id = vCPU index); the IOAPIC (id = number of vCPUs, `0xfec00000`, GSI base 0); Interrupt Source Override ISA IRQ 0 -> GSI [`TIMER_GSI`] (edge, active high); Local APIC NMI on LINT1 for all processors |
//! | DSDT  | `\_SB_` scope with one device per [`AcpiDevice`] (UART: `PNP0501`; virtio-mmio: `LNRO0005`; VM generation ID: `VMGENCTR` and its Generic Event Device `ACPI0013`) and `\_S5_` = `Package {5, 0, 0, 0}` |
//!
//! With these, Linux powers off by writing `SLP_TYP = 5 | SLP_EN` to the
//! sleep control register and reboots by writing [`RESET_VALUE`] to the reset
//! register; `ember_devices::acpi_pm` emulates both ports.
//!
//! Since the FADT is hardware-reduced, Linux (`acpi_generic_reduced_hw_init`)
//! uses neither the legacy 8259 PIC nor the PIT timer interrupt and creates
//! no identity ISA IRQ mappings: device interrupts reach it through the
//! IOAPIC as described by the DSDT `_CRS` (edge, active high). The
//! IRQ 0 -> GSI 2 override (also used by the MP table, see
//! [`crate::mptable`]) matches the PC convention; for the PIT to really
//! arrive on IOAPIC pin 2 the VMM must route GSI 0 to IOAPIC pin 2 as QEMU
//! does (KVM's default routing maps GSI 0 to pin 0). KVM guests skip Linux's
//! timer-IRQ check (`no_timer_check`), so a mismatch is silent, not fatal.
//!
//! # Example
//!
//! ```
//! use ember_boot::acpi::{write_acpi_tables, AcpiConfig, AcpiDevice, ACPI_TABLES_START};
//! use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let mem = create_guest_memory(&MemoryLayout::new(128 * MIB)?, DirtyBitmap::Off)?;
//! let devices = [
//!     AcpiDevice::Uart { port: 0x3f8, irq: 4 },
//!     AcpiDevice::VirtioMmio { base: 0xd000_0000, len: 0x1000, gsi: 5 },
//! ];
//! let rsdp = write_acpi_tables(&mem, &AcpiConfig { vcpus: 2, devices: &devices })?;
//! assert_eq!(rsdp, GuestAddress(ACPI_TABLES_START));
//!
//! let mut sig = [0u8; 8];
//! mem.read_slice(&mut sig, rsdp)?;
//! assert_eq!(&sig, b"RSD PTR ");
//! // Pass `rsdp` in PVH `rsdp_paddr` or the zero page's `acpi_rsdp_addr`.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use acpi_tables::aml::{
    self, Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify,
    Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::{write_slice, Error};

/// Start of the guest memory region holding the ACPI tables (and the RSDP).
pub const ACPI_TABLES_START: u64 = 0x000e_0000;
/// End (exclusive) of the ACPI tables region.
pub const ACPI_TABLES_END: u64 = 0x0010_0000;
/// Guest address of the RSDP: the start of the region.
pub const RSDP_ADDR: u64 = ACPI_TABLES_START;
/// Alignment of every table in the region.
pub const TABLE_ALIGN: u64 = 16;

/// I/O port of the FADT sleep control register (8 bit).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the FADT sleep status register (8 bit).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// I/O port of the FADT reset register (8 bit).
pub const RESET_PORT: u16 = 0x602;
/// Value the guest writes to [`RESET_PORT`] to reset the machine.
pub const RESET_VALUE: u8 = 0x06;
/// `SLP_TYP` of the S5 (soft off) sleep state, as advertised by `\_S5_`.
pub const S5_SLP_TYP: u8 = 5;

/// OEM ID of every table.
pub const OEM_ID: [u8; 6] = *b"EMBER ";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// OEM table ID of the XSDT.
pub const XSDT_TABLE_ID: [u8; 8] = *b"EMBRXSDT";
/// OEM table ID of the FADT.
pub const FADT_TABLE_ID: [u8; 8] = *b"EMBRFACP";
/// OEM table ID of the MADT.
pub const MADT_TABLE_ID: [u8; 8] = *b"EMBRAPIC";
/// OEM table ID of the DSDT.
pub const DSDT_TABLE_ID: [u8; 8] = *b"EMBRDSDT";
/// FADT "Hypervisor Vendor Identity" ("EMBERVMM" as a little-endian u64).
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"EMBERVMM";

pub use ember_memory::MAX_VCPUS;
/// Guest physical address of the local APICs.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Guest physical address of the IOAPIC.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Number of IOAPIC pins (GSIs `0..IOAPIC_PINS`).
pub const IOAPIC_PINS: u32 = 24;
/// GSI (IOAPIC pin) of ISA IRQ 0, the PIT timer (interrupt source override).
pub const TIMER_GSI: u32 = 2;

/// `_HID` of a 16550A-compatible UART (EISA ID).
pub const UART_HID: &str = "PNP0501";
/// `_HID` of a virtio-mmio transport (matched by Linux's `virtio_mmio`).
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Number of I/O ports of a UART.
pub const UART_PORTS: u16 = 8;
/// `_HID` of the VM generation ID device (an id Linux's `vmgenid` driver matches).
pub const VMGENID_HID: &str = "VMGENCTR";
/// `_CID` and `_DDN` of the VM generation ID device (Microsoft's name, which Linux, Windows
/// and Firecracker's and QEMU's devices use).
pub const VMGENID_CID: &str = "VM_GEN_COUNTER";
/// `_HID` of the ACPI Generic Event Device, through which the VMM tells the guest that the
/// generation ID changed.
pub const GED_HID: &str = "ACPI0013";
/// The `Notify` value of a VM generation ID change.
pub const VMGENID_NOTIFY: u8 = 0x80;
/// Bytes of the generation ID (a 128-bit GUID).
pub const VMGENID_LEN: u64 = 16;

/// FADT IA-PC boot architecture flags written by Ember: no VGA, no MSI, no
/// PCIe ASPM control, no CMOS RTC. The 8042 flag is clear, so Linux does
/// not probe a PS/2 controller (Ember's i8042 only implements the reset
/// command, which Linux uses as a reboot fallback regardless).
pub const IAPC_BOOT_ARCH: u16 = IAPC_VGA_NOT_PRESENT
    | IAPC_MSI_NOT_SUPPORTED
    | IAPC_PCIE_ASPM_CONTROLS
    | IAPC_CMOS_RTC_NOT_PRESENT;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MPS INTI flags: active high, edge triggered.
const MPS_INTI_EDGE_HIGH: u16 = 0b01 | (0b01 << 2);
/// MADT processor UID meaning "all processors".
const ALL_PROCESSORS: u8 = 0xff;

/// A device described in the DSDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcpiDevice {
    /// A 16550A UART (`PNP0501`): 8 I/O ports at `port`, ISA IRQ `irq`
    /// (edge, active high). UARTs are named `COM1`, `COM2`, ... with `_UID`
    /// 0, 1, ... in the order given.
    Uart {
        /// First I/O port.
        port: u16,
        /// ISA IRQ / GSI (below [`IOAPIC_PINS`]).
        irq: u32,
    },
    /// A virtio-mmio transport (`LNRO0005`): `len` bytes of MMIO at `base`
    /// (below 4 GiB), interrupt `gsi` (edge, active high, exclusive).
    /// Devices are named `V000`, `V001`, ... with `_UID` 0, 1, ... in the
    /// order given.
    VirtioMmio {
        /// Guest physical base address.
        base: u64,
        /// Length of the MMIO window.
        len: u64,
        /// GSI (below [`IOAPIC_PINS`]).
        gsi: u32,
    },
    /// A VM generation ID device (`VGEN`: `_HID` [`VMGENID_HID`], `_CID` [`VMGENID_CID`],
    /// `ADDR` = `Package {low 32 bits, high 32 bits}` of `addr`, where the VMM keeps the 16-byte
    /// ID, in memory the e820 map reserves) and a Generic Event Device (`GED0`, `ACPI0013`) on
    /// `gsi` (edge, active high) whose `_EVT` notifies `VGEN` ([`VMGENID_NOTIFY`]): an edge
    /// on `gsi` after the VMM wrote a new ID makes Linux's `vmgenid` driver read it and reseed
    /// its random number generator.
    VmGenId {
        /// Guest physical address of the ID (8-byte aligned, below 4 GiB).
        addr: u64,
        /// GSI of the notification (below [`IOAPIC_PINS`]).
        gsi: u32,
    },
}

/// What the ACPI tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig<'a> {
    /// Number of vCPUs, `1..=MAX_VCPUS`; APIC ids are `0..vcpus`.
    pub vcpus: u8,
    /// Devices described in the DSDT, in order.
    pub devices: &'a [AcpiDevice],
}

/// One built table and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// Table signature: `"RSD PTR "` for the RSDP, else the 4-byte signature
    /// (`"XSDT"`, `"FACP"`, `"APIC"`, `"DSDT"`).
    pub signature: &'static str,
    /// Guest physical address of the table.
    pub addr: GuestAddress,
    /// The table bytes (checksummed).
    pub bytes: Vec<u8>,
}

/// Checks that `vcpus` is in `1..=MAX_VCPUS`.
pub fn check_vcpus(vcpus: u8) -> Result<(), Error> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::InvalidVcpuCount {
            count: vcpus,
            max: MAX_VCPUS,
        });
    }
    Ok(())
}

/// Already-serialized AML, spliced into a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn device_error(index: usize, reason: String) -> Error {
    Error::InvalidAcpiDevice { index, reason }
}

/// AML of a UART device.
fn uart_aml(index: usize, uid: usize, port: u16, irq: u32) -> Result<Vec<u8>, Error> {
    if uid >= 9 {
        return Err(device_error(index, "at most 9 UARTs (COM1..COM9)".into()));
    }
    if port.checked_add(UART_PORTS - 1).is_none() {
        return Err(device_error(
            index,
            format!("UART ports {port:#x}+{UART_PORTS} wrap past 0xffff"),
        ));
    }
    if irq >= IOAPIC_PINS {
        return Err(device_error(
            index,
            format!("UART IRQ {irq} is not an IOAPIC pin (0..{IOAPIC_PINS})"),
        ));
    }
    let name = format!("COM{}", uid + 1);
    let hid = Name::new("_HID".into(), &EISAName::new(UART_HID));
    let uid = Name::new("_UID".into(), &uid);
    #[allow(clippy::cast_possible_truncation, reason = "UART_PORTS is 8")]
    let io = IO::new(port, port, 1, UART_PORTS as u8);
    let int = Interrupt::new(true, true, false, false, irq);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &int]));
    Ok(aml_bytes(&Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    )))
}

/// AML of a virtio-mmio device.
fn virtio_mmio_aml(
    index: usize,
    uid: usize,
    base: u64,
    len: u64,
    gsi: u32,
) -> Result<Vec<u8>, Error> {
    if uid > 0xfff {
        return Err(device_error(
            index,
            "at most 4096 virtio-mmio devices".into(),
        ));
    }
    let end = base.saturating_add(len);
    if len == 0 || end > 1 << 32 {
        return Err(device_error(
            index,
            format!("virtio-mmio window {base:#x}+{len:#x} is empty or not below 4 GiB"),
        ));
    }
    if gsi >= IOAPIC_PINS {
        return Err(device_error(
            index,
            format!("virtio-mmio GSI {gsi} is not an IOAPIC pin (0..{IOAPIC_PINS})"),
        ));
    }
    let name = format!("V{uid:03X}");
    let hid = Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid = Name::new("_UID".into(), &uid);
    // Checked above: base + len <= 4 GiB and len > 0, so base fits in u32, and so does len
    // unless the window is the whole 4 GiB, which a 32-bit descriptor cannot express.
    let (Ok(base32), Ok(len32)) = (u32::try_from(base), u32::try_from(len)) else {
        return Err(device_error(
            index,
            format!("virtio-mmio window {base:#x}+{len:#x} does not fit a 32-bit descriptor"),
        ));
    };
    let mem = Memory32Fixed::new(true, base32, len32);
    let int = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &int]));
    Ok(aml_bytes(&Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    )))
}

/// AML of the VM generation ID device and the Generic Event Device that notifies it.
fn vmgenid_aml(index: usize, addr: u64, gsi: u32) -> Result<Vec<u8>, Error> {
    if !addr.is_multiple_of(8) || addr.saturating_add(VMGENID_LEN) > 1 << 32 {
        return Err(device_error(
            index,
            format!("VM generation ID at {addr:#x}: not 8-byte aligned below 4 GiB"),
        ));
    }
    if gsi >= IOAPIC_PINS {
        return Err(device_error(
            index,
            format!("generic event device GSI {gsi} is not an IOAPIC pin (0..{IOAPIC_PINS})"),
        ));
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the two halves of a 64-bit address"
    )]
    let (lo, hi) = (addr as u32, (addr >> 32) as u32);
    let hid = Name::new("_HID".into(), &VMGENID_HID);
    let cid = Name::new("_CID".into(), &VMGENID_CID);
    let ddn = Name::new("_DDN".into(), &VMGENID_CID);
    let at = Name::new("ADDR".into(), &Package::new(vec![&lo, &hi]));
    let mut out = aml_bytes(&Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &at]));
    let ged_hid = Name::new("_HID".into(), &GED_HID);
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let int = Interrupt::new(true, true, false, false, gsi);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&int]));
    let target = Path::new("\\_SB_.VGEN");
    let notify = Notify::new(&target, &VMGENID_NOTIFY);
    let is_ours = Equal::new(&Arg(0), &gsi);
    let when = If::new(&is_ours, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&when]);
    out.extend(aml_bytes(&Device::new(
        "GED0".into(),
        vec![&ged_hid, &uid, &crs, &evt],
    )));
    Ok(out)
}

/// Builds the DSDT (revision 2): `Scope (\_SB_)` with the devices of `cfg`
/// and `Name (_S5_, Package {5, 0, 0, 0})` at the root.
pub fn build_dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, Error> {
    let mut devices = Vec::new();
    let (mut uarts, mut virtio, mut vmgenids) = (0usize, 0usize, 0usize);
    for (index, dev) in cfg.devices.iter().enumerate() {
        let bytes = match *dev {
            AcpiDevice::Uart { port, irq } => {
                uarts += 1;
                uart_aml(index, uarts - 1, port, irq)?
            }
            AcpiDevice::VirtioMmio { base, len, gsi } => {
                virtio += 1;
                virtio_mmio_aml(index, virtio - 1, base, len, gsi)?
            }
            AcpiDevice::VmGenId { addr, gsi } => {
                vmgenids += 1;
                if vmgenids > 1 {
                    return Err(device_error(index, "a second VM generation ID".into()));
                }
                vmgenid_aml(index, addr, gsi)?
            }
        };
        devices.push(RawAml(bytes));
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let sb = Scope::new(Path::new("\\_SB_"), children);
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLP_TYP, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, DSDT_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml_bytes(&sb));
    dsdt.append_slice(&aml_bytes(&s5));
    Ok(dsdt.as_slice().to_vec())
}

/// MADT Interrupt Source Override structure (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI structure (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Builds the MADT for `vcpus` vCPUs (see the module docs for the entries).
pub fn build_madt(vcpus: u8) -> Result<Vec<u8>, Error> {
    check_vcpus(vcpus)?;
    let mut madt = MADT::new(
        OEM_ID,
        MADT_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_ADDR, 0));
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: TIMER_GSI.into(),
        flags: MPS_INTI_EDGE_HIGH.into(),
    });
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: ALL_PROCESSORS,
        flags: MPS_INTI_EDGE_HIGH.into(),
        lint: 1,
    });
    Ok(aml_bytes(&madt))
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// Builds the FADT (revision 6.5, hardware-reduced, no FACS) pointing at the
/// DSDT at `dsdt_addr` through `X_DSDT`.
pub fn build_fadt(dsdt_addr: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, FADT_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr.0)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power/sleep buttons (there is no PM1 block).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = io_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    aml_bytes(&fadt.finalize())
}

/// Builds the XSDT listing `entries` (table addresses).
pub fn build_xsdt(entries: &[GuestAddress]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, XSDT_TABLE_ID, OEM_REVISION);
    for e in entries {
        xsdt.add_entry(e.0);
    }
    aml_bytes(&xsdt)
}

/// Builds the RSDP (revision 2, 36 bytes) pointing at the XSDT at
/// `xsdt_addr`.
pub fn build_rsdp(xsdt_addr: GuestAddress) -> Vec<u8> {
    aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0))
}

fn align_up(addr: u64) -> u64 {
    (addr + TABLE_ALIGN - 1) & !(TABLE_ALIGN - 1)
}

/// Builds every table and lays them out from [`RSDP_ADDR`]: RSDP, XSDT,
/// FADT, MADT, DSDT, each [`TABLE_ALIGN`]-aligned. Fails with
/// [`Error::InvalidVcpuCount`], [`Error::InvalidAcpiDevice`] or
/// [`Error::TablesTooLarge`] (the tables do not end by
/// [`ACPI_TABLES_END`]).
pub fn build_acpi_tables(cfg: &AcpiConfig) -> Result<Vec<AcpiTable>, Error> {
    let madt = build_madt(cfg.vcpus)?;
    let dsdt = build_dsdt(cfg)?;
    let len = |b: &[u8]| b.len() as u64;

    // Table sizes are bounded (at most a few KiB per device), so this
    // arithmetic cannot overflow.
    let rsdp_addr = RSDP_ADDR;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + 2 * 8;
    let fadt_addr = align_up(xsdt_addr + xsdt_len);
    let madt_addr = align_up(fadt_addr + FADT::len() as u64);
    let dsdt_addr = align_up(madt_addr + len(&madt));
    let end = dsdt_addr + len(&dsdt);
    if end > ACPI_TABLES_END {
        return Err(Error::TablesTooLarge {
            what: "ACPI tables",
            size: end - ACPI_TABLES_START,
            available: ACPI_TABLES_END - ACPI_TABLES_START,
        });
    }

    let fadt = build_fadt(GuestAddress(dsdt_addr));
    debug_assert_eq!(len(&fadt), FADT::len() as u64);
    let xsdt = build_xsdt(&[GuestAddress(fadt_addr), GuestAddress(madt_addr)]);
    debug_assert_eq!(len(&xsdt), xsdt_len);
    let rsdp = build_rsdp(GuestAddress(xsdt_addr));
    let table = |signature, addr, bytes| AcpiTable {
        signature,
        addr: GuestAddress(addr),
        bytes,
    };
    Ok(vec![
        table("RSD PTR ", rsdp_addr, rsdp),
        table("XSDT", xsdt_addr, xsdt),
        table("FACP", fadt_addr, fadt),
        table("APIC", madt_addr, madt),
        table("DSDT", dsdt_addr, dsdt),
    ])
}

/// Builds the tables ([`build_acpi_tables`]) and writes them into `mem`.
/// Returns the RSDP address (for PVH `rsdp_paddr` and the zero page's
/// `acpi_rsdp_addr`).
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, Error> {
    let tables = build_acpi_tables(cfg)?;
    for t in &tables {
        write_slice(mem, "ACPI tables", t.addr, &t.bytes)?;
    }
    Ok(GuestAddress(RSDP_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::GuestRam;
    use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
    use vm_memory::Bytes;

    fn mem() -> GuestRam {
        create_guest_memory(&MemoryLayout::new(128 * MIB).unwrap(), DirtyBitmap::Off).unwrap()
    }

    fn read(m: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        m.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Reads a whole SDT at `addr`, checking signature, bounds and checksum.
    fn table(m: &GuestRam, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let hdr = read(m, addr, 36);
        assert_eq!(&hdr[0..4], sig);
        let len = u32_at(&hdr, 4) as usize;
        assert!(len >= 36);
        assert!(addr >= ACPI_TABLES_START && addr + len as u64 <= ACPI_TABLES_END);
        let t = read(m, addr, len);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&t[10..16], b"EMBER ");
        t
    }

    struct Parsed {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    /// Follows RSDP -> XSDT -> FADT/MADT, FADT -> DSDT, as Linux does.
    fn parse(m: &GuestRam, rsdp_addr: GuestAddress) -> Parsed {
        assert_eq!(rsdp_addr.0, ACPI_TABLES_START);
        let rsdp = read(m, rsdp_addr.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(&rsdp[9..15], b"EMBER ");
        assert_eq!(rsdp[15], 2); // revision
        assert_eq!(u32_at(&rsdp, 16), 0); // no RSDT
        assert_eq!(u32_at(&rsdp, 20), 36); // length
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = table(m, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let (mut fadt, mut madt) = (None, None);
        for e in xsdt[36..].chunks_exact(8) {
            let addr = u64::from_le_bytes(e.try_into().unwrap());
            match &read(m, addr, 4)[..] {
                b"FACP" => fadt = Some(table(m, addr, b"FACP")),
                b"APIC" => madt = Some(table(m, addr, b"APIC")),
                other => panic!("unexpected table {other:?}"),
            }
        }
        let fadt = fadt.expect("FADT in XSDT");
        let madt = madt.expect("MADT in XSDT");
        assert_eq!(u32_at(&fadt, 40), 0); // 32-bit DSDT
        let dsdt = table(m, u64_at(&fadt, 140), b"DSDT");
        Parsed { fadt, madt, dsdt }
    }

    fn check_madt(madt: &[u8], vcpus: u8) {
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        let mut off = 44;
        let (mut lapics, mut ioapics, mut isos, mut nmis) = (Vec::new(), 0, 0, 0);
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len());
            let e = &madt[off..off + len];
            match ty {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(e[2], e[3]); // UID = APIC id
                    assert_eq!(u32_at(e, 4), 1); // enabled
                    lapics.push(e[3]);
                }
                1 => {
                    assert_eq!(len, 12);
                    assert_eq!(e[2], vcpus);
                    assert_eq!(u32_at(e, 4), 0xfec0_0000);
                    assert_eq!(u32_at(e, 8), 0);
                    ioapics += 1;
                }
                2 => {
                    assert_eq!(e, [2, 10, 0, 0, 2, 0, 0, 0, 5, 0]);
                    isos += 1;
                }
                4 => {
                    assert_eq!(e, [4, 6, 0xff, 5, 0, 1]);
                    nmis += 1;
                }
                _ => panic!("unexpected MADT entry type {ty}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, (0..vcpus).collect::<Vec<_>>());
        assert_eq!((ioapics, isos, nmis), (1, 1, 1));
    }

    fn gas(b: &[u8], off: usize) -> (u8, u8, u8, u8, u64) {
        (
            b[off],
            b[off + 1],
            b[off + 2],
            b[off + 3],
            u64_at(b, off + 4),
        )
    }

    fn devices() -> Vec<AcpiDevice> {
        vec![
            AcpiDevice::Uart {
                port: 0x3f8,
                irq: 4,
            },
            AcpiDevice::VirtioMmio {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            AcpiDevice::VirtioMmio {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ]
    }

    #[test]
    fn tables_parse_back_for_1_2_4_32_vcpus() {
        let devs = devices();
        for vcpus in [1u8, 2, 4, 32] {
            let m = mem();
            let cfg = AcpiConfig {
                vcpus,
                devices: &devs,
            };
            let rsdp = write_acpi_tables(&m, &cfg).unwrap();
            let p = parse(&m, rsdp);
            check_madt(&p.madt, vcpus);

            // FADT.
            let f = &p.fadt;
            assert_eq!(f.len(), 276);
            assert_eq!((f[8], f[131]), (6, 5)); // revision 6.5
            assert_eq!(u32_at(f, 36), 0); // FIRMWARE_CTRL
            assert_eq!(u64_at(f, 132), 0); // X_FIRMWARE_CTRL
            let flags = u32_at(f, 112);
            assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
            assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
            assert_eq!(flags & ((1 << 4) | (1 << 5)), (1 << 4) | (1 << 5));
            assert_eq!(u16_at(f, 109), IAPC_BOOT_ARCH);
            assert_eq!(gas(f, 116), (1, 8, 0, 1, 0x602));
            assert_eq!(f[128], 0x06);
            assert_eq!(gas(f, 244), (1, 8, 0, 1, 0x600));
            assert_eq!(gas(f, 256), (1, 8, 0, 1, 0x601));
            assert_eq!(&f[268..276], b"EMBERVMM");
            // No legacy PM blocks.
            assert!(f[56..88].iter().all(|&b| b == 0));
            assert!(f[148..244].iter().all(|&b| b == 0));

            // DSDT.
            let d = &p.dsdt;
            assert_eq!(d[8], 2);
            assert!(contains(d, b"_SB_"));
            assert!(contains(d, b"COM1"));
            // _HID EISAID("PNP0501") = DWordPrefix 0x0105D041.
            assert!(contains(d, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
            assert!(contains(d, b"LNRO0005\0"));
            assert!(contains(d, b"V000") && contains(d, b"V001"));
            // Name(_S5_, Package(4) {5, 0, 0, 0})
            assert!(contains(
                d,
                &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0, 0, 0]
            ));
            // Memory32Fixed(ReadWrite, 0xd0001000, 0x1000)
            assert!(contains(
                d,
                &[0x86, 9, 0, 1, 0, 0x10, 0, 0xd0, 0, 0x10, 0, 0]
            ));
            // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {6}
            assert!(contains(d, &[0x89, 6, 0, 0x03, 1, 6, 0, 0, 0]));
            // IO(Decode16, 0x3f8, 0x3f8, 1, 8)
            assert!(contains(d, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
        }
    }

    #[test]
    fn layout_is_packed_and_aligned() {
        for vcpus in [1u8, 32] {
            let devs = devices();
            let tables = build_acpi_tables(&AcpiConfig {
                vcpus,
                devices: &devs,
            })
            .unwrap();
            let sigs: Vec<_> = tables.iter().map(|t| t.signature).collect();
            assert_eq!(sigs, ["RSD PTR ", "XSDT", "FACP", "APIC", "DSDT"]);
            let mut end = ACPI_TABLES_START;
            for t in &tables {
                assert_eq!(t.addr.0 % TABLE_ALIGN, 0);
                assert!(t.addr.0 >= end);
                assert!(t.addr.0 - end < TABLE_ALIGN);
                assert_eq!(&t.bytes[..t.signature.len()], t.signature.as_bytes());
                end = t.addr.0 + t.bytes.len() as u64;
            }
            assert!(end <= ACPI_TABLES_END);
            assert_eq!(tables[3].bytes.len(), 44 + 8 * vcpus as usize + 12 + 10 + 6);
        }
    }

    #[test]
    fn dsdt_with_a_vm_generation_id() {
        let vgen = AcpiDevice::VmGenId {
            addr: 0xd_f000,
            gsi: 3,
        };
        let d = build_dsdt(&AcpiConfig {
            vcpus: 1,
            devices: &[vgen],
        })
        .unwrap();
        assert_eq!(sum(&d), 0);
        for needle in [
            &b"VGEN"[..],
            b"VMGENCTR\0",
            b"VM_GEN_COUNTER\0",
            b"ADDR",
            b"GED0",
            b"ACPI0013\0",
            b"_EVT",
        ] {
            assert!(
                contains(&d, needle),
                "{:?}",
                String::from_utf8_lossy(needle)
            );
        }
        // ADDR: Package (2) { DWord 0xdf000, 0 }.
        let at = d.windows(4).position(|w| w == b"ADDR").unwrap();
        assert_eq!(d[at + 4], 0x12, "a package");
        assert_eq!(d[at + 6], 2, "of two elements");
        assert_eq!(&d[at + 7..at + 12], &[0x0c, 0x00, 0xf0, 0x0d, 0x00]);
        // The event method notifies \_SB_.VGEN with 0x80.
        let notify = d.windows(1).position(|w| w == [0x86]).unwrap();
        assert_eq!(&d[notify + 1..notify + 11], b"\\._SB_VGEN");
        assert_eq!(&d[notify + 11..notify + 13], &[0x0a, 0x80]);
        // Bad ones.
        for (dev, why) in [
            (
                AcpiDevice::VmGenId {
                    addr: 0xd_f004,
                    gsi: 3,
                },
                "aligned",
            ),
            (
                AcpiDevice::VmGenId {
                    addr: 0xd_f000,
                    gsi: 24,
                },
                "IOAPIC pin",
            ),
        ] {
            let e = build_dsdt(&AcpiConfig {
                vcpus: 1,
                devices: &[dev],
            })
            .unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
        }
        let e = build_dsdt(&AcpiConfig {
            vcpus: 1,
            devices: &[vgen, vgen],
        })
        .unwrap_err();
        assert!(e.to_string().contains("second"), "{e}");
    }

    #[test]
    fn dsdt_without_devices() {
        let d = build_dsdt(&AcpiConfig {
            vcpus: 1,
            devices: &[],
        })
        .unwrap();
        assert_eq!(sum(&d), 0);
        assert_eq!(u32_at(&d, 4) as usize, d.len());
        assert!(contains(&d, b"_S5_"));
        assert!(!contains(&d, b"COM1"));
    }

    #[test]
    fn invalid_vcpu_counts() {
        let m = mem();
        for vcpus in [0u8, 33, 255] {
            let cfg = AcpiConfig {
                vcpus,
                devices: &[],
            };
            assert!(matches!(
                write_acpi_tables(&m, &cfg),
                Err(Error::InvalidVcpuCount { count, max: 32 }) if count == vcpus
            ));
        }
        // Nothing was written.
        assert_eq!(read(&m, ACPI_TABLES_START, 8), [0; 8]);
    }

    #[test]
    fn invalid_devices() {
        let bad = [
            AcpiDevice::Uart {
                port: 0xfffc,
                irq: 4,
            },
            AcpiDevice::Uart {
                port: 0x3f8,
                irq: 24,
            },
            AcpiDevice::VirtioMmio {
                base: 0xffff_f001,
                len: 0x1000,
                gsi: 5,
            },
            AcpiDevice::VirtioMmio {
                base: 0xd000_0000,
                len: 0,
                gsi: 5,
            },
            AcpiDevice::VirtioMmio {
                base: u64::MAX,
                len: 2,
                gsi: 5,
            },
            AcpiDevice::VirtioMmio {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 24,
            },
        ];
        for dev in bad {
            let devs = [
                AcpiDevice::Uart {
                    port: 0x3f8,
                    irq: 4,
                },
                dev,
            ];
            let r = build_dsdt(&AcpiConfig {
                vcpus: 1,
                devices: &devs,
            });
            assert!(
                matches!(r, Err(Error::InvalidAcpiDevice { index: 1, .. })),
                "{dev:?}: {r:?}"
            );
        }
        // The last window ending exactly at 4 GiB is fine.
        let ok = [AcpiDevice::VirtioMmio {
            base: 0xffff_f000,
            len: 0x1000,
            gsi: 23,
        }];
        build_dsdt(&AcpiConfig {
            vcpus: 1,
            devices: &ok,
        })
        .unwrap();
        let uarts = [AcpiDevice::Uart {
            port: 0x3f8,
            irq: 4,
        }; 10];
        assert!(matches!(
            build_dsdt(&AcpiConfig {
                vcpus: 1,
                devices: &uarts,
            }),
            Err(Error::InvalidAcpiDevice { index: 9, .. })
        ));
    }

    #[test]
    fn too_many_devices_do_not_fit() {
        let devs: Vec<_> = (0..4096u64)
            .map(|i| AcpiDevice::VirtioMmio {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 5,
            })
            .collect();
        assert!(matches!(
            build_acpi_tables(&AcpiConfig {
                vcpus: 1,
                devices: &devs,
            }),
            Err(Error::TablesTooLarge {
                available: 0x20000,
                ..
            })
        ));
    }

    #[test]
    fn memory_without_the_region() {
        let m =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe0000)]).unwrap();
        let cfg = AcpiConfig {
            vcpus: 1,
            devices: &[],
        };
        assert!(matches!(
            write_acpi_tables(&m, &cfg),
            Err(Error::GuestWrite { .. })
        ));
    }
}
