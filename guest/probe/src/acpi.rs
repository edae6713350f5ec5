//! ACPI table discovery and parsing, in ring 3 on the identity map: RSDP, XSDT/RSDT, every
//! table's checksum, the MADT (CPUs, IOAPICs), the FADT (DSDT pointer, sleep registers) and
//! a byte-level look at the DSDT's AML (`_HID`s, `_S5_`, and the `_CRS` of `LNRO0005`
//! virtio-mmio devices).

use crate::arch;
use crate::bootinfo;
use crate::console::Line;
use crate::phys::{mapped, rd32, rd64, rd8, sum8};

/// Most tables recorded (XSDT entries plus the DSDT).
pub const MAX_TABLES: usize = 32;
/// Most CPUs recorded from the MADT.
pub const MAX_CPUS: usize = 256;
/// Most IOAPICs recorded from the MADT.
pub const MAX_IOAPICS: usize = 8;
/// Most interrupt source overrides recorded from the MADT.
pub const MAX_ISOS: usize = 16;
/// Interrupt flag: level-triggered (else edge).
pub const IRQ_LEVEL: u8 = 1;
/// Interrupt flag: active low (else active high).
pub const IRQ_LOW: u8 = 2;
/// Longest table the probe accepts (bytes).
const MAX_TABLE_LEN: u32 = 1 << 20;

/// One system description table.
#[derive(Clone, Copy, Default)]
pub struct Table {
    /// Physical address.
    pub addr: u64,
    /// Signature.
    pub sig: [u8; 4],
    /// Length in bytes (header included).
    pub len: u32,
}

/// A Generic Address Structure.
#[derive(Clone, Copy, Default)]
pub struct Gas {
    /// 0 = system memory, 1 = system I/O.
    pub space: u8,
    /// Register width in bits.
    pub bit_width: u8,
    /// Address.
    pub addr: u64,
}

/// A MADT I/O APIC entry (type 1).
#[derive(Clone, Copy, Default)]
pub struct IoApic {
    /// MMIO address.
    pub addr: u64,
    /// First GSI it serves.
    pub gsi_base: u32,
}

/// A MADT interrupt source override (type 2): ISA `source` is GSI `gsi`.
#[derive(Clone, Copy, Default)]
pub struct Iso {
    /// ISA IRQ.
    pub source: u8,
    /// GSI.
    pub gsi: u32,
    /// `IRQ_LEVEL` / `IRQ_LOW` (ISA defaults, edge and active high, where the MPS flags
    /// say "conforms").
    pub flags: u8,
}

/// What the probe learned from the ACPI tables.
pub struct Acpi {
    /// RSDP address.
    pub rsdp: u64,
    /// Where the RSDP pointer came from: `pvh`, `bootparams` or `scan`.
    pub rsdp_via: &'static str,
    /// RSDP revision (0 = ACPI 1.0, 2 = 2.0+).
    pub revision: u8,
    /// Tables in XSDT/RSDT order, then the DSDT.
    pub tables: [Table; MAX_TABLES],
    /// Number of valid `tables`.
    pub n_tables: usize,
    /// Local APIC MMIO address from the MADT (0 without a MADT).
    pub lapic_addr: u64,
    /// Whether there is a MADT.
    pub has_madt: bool,
    /// Enabled CPUs' APIC ids (type 0 and type 9 entries), in MADT order.
    pub cpus: [u32; MAX_CPUS],
    /// Number of valid `cpus`.
    pub n_cpus: usize,
    /// IOAPIC entries.
    pub ioapics: u32,
    /// The first `MAX_IOAPICS` IOAPIC entries.
    pub ioapic: [IoApic; MAX_IOAPICS],
    /// Interrupt source overrides.
    pub isos: [Iso; MAX_ISOS],
    /// Number of valid `isos`.
    pub n_isos: usize,
    /// The DSDT, if the FADT names one.
    pub dsdt: Option<Table>,
    /// The FADT.
    pub fadt: Option<Table>,
}

/// Why the tables could not be used: `FAIL <what> [table=SIG] [addr=0x..]`.
pub struct AcpiError {
    /// Short reason.
    pub what: &'static str,
    /// The table concerned, if any.
    pub sig: Option<[u8; 4]>,
    /// The address concerned (0: none).
    pub addr: u64,
}

impl AcpiError {
    fn new(what: &'static str, sig: Option<[u8; 4]>, addr: u64) -> Self {
        AcpiError { what, sig, addr }
    }

    /// Appends `<what> table=SIG addr=0x..` to a line.
    pub fn write(&self, line: &mut Line) {
        line.s(self.what);
        if let Some(sig) = self.sig {
            line.s(" table=").b(&printable(&sig));
        }
        if self.addr != 0 {
            line.s(" addr=").hex(self.addr);
        }
    }
}

fn printable(sig: &[u8; 4]) -> [u8; 4] {
    let mut out = *sig;
    for b in out.iter_mut() {
        if !b.is_ascii_graphic() {
            *b = b'?';
        }
    }
    out
}

fn sig_at(addr: u64) -> [u8; 4] {
    rd32(addr).to_le_bytes()
}

/// Finds the RSDP: PVH `rsdp_paddr`, the zero page's `acpi_rsdp_addr`, else the BIOS area scan.
fn find_rsdp(entry: u64, info: u64) -> Option<(u64, &'static str)> {
    if info != 0 {
        if entry == arch::ENTRY_PVH {
            if rd32(info) == bootinfo::PVH_MAGIC {
                let p = rd64(info + 32);
                if p != 0 {
                    return Some((p, "pvh"));
                }
            }
        } else {
            let p = rd64(info + 0x070);
            if p != 0 {
                return Some((p, "bootparams"));
            }
        }
    }
    let mut a = 0xe_0000u64;
    while a < 0x10_0000 {
        if rd64(a) == u64::from_le_bytes(*b"RSD PTR ") && sum8(a, 20) == 0 {
            return Some((a, "scan"));
        }
        a += 16;
    }
    None
}

/// Checks one table's header and checksum; returns it.
fn table_at(addr: u64, want: Option<&[u8; 4]>) -> Result<Table, AcpiError> {
    if !mapped(addr, 36) {
        return Err(AcpiError::new(
            "table pointer outside memory",
            want.copied(),
            addr,
        ));
    }
    let sig = sig_at(addr);
    if let Some(w) = want {
        if &sig != w {
            return Err(AcpiError::new("wrong signature", Some(sig), addr));
        }
    }
    let len = rd32(addr + 4);
    if !(36..=MAX_TABLE_LEN).contains(&len) || !mapped(addr, u64::from(len)) {
        return Err(AcpiError::new("bad length", Some(sig), addr));
    }
    if sum8(addr, u64::from(len)) != 0 {
        return Err(AcpiError::new("checksum", Some(sig), addr));
    }
    Ok(Table { addr, sig, len })
}

impl Acpi {
    /// Finds and validates every table, parses the MADT.
    pub fn load(entry: u64, info: u64) -> Result<Acpi, AcpiError> {
        let Some((rsdp, via)) = find_rsdp(entry, info) else {
            return Err(AcpiError::new("no RSDP", None, 0));
        };
        if !mapped(rsdp, 36) || rd64(rsdp) != u64::from_le_bytes(*b"RSD PTR ") {
            return Err(AcpiError::new("no RSD PTR signature at rsdp", None, rsdp));
        }
        if sum8(rsdp, 20) != 0 {
            return Err(AcpiError::new("rsdp checksum", None, rsdp));
        }
        let revision = rd8(rsdp + 15);
        let mut acpi = Acpi {
            rsdp,
            rsdp_via: via,
            revision,
            tables: [Table::default(); MAX_TABLES],
            n_tables: 0,
            lapic_addr: 0,
            has_madt: false,
            cpus: [0; MAX_CPUS],
            n_cpus: 0,
            ioapics: 0,
            ioapic: [IoApic::default(); MAX_IOAPICS],
            isos: [Iso::default(); MAX_ISOS],
            n_isos: 0,
            dsdt: None,
            fadt: None,
        };
        let (root, stride) = if revision >= 2 {
            let len = rd32(rsdp + 20);
            if !(36..=4096).contains(&len) || sum8(rsdp, u64::from(len)) != 0 {
                return Err(AcpiError::new("rsdp extended checksum", None, rsdp));
            }
            let x = rd64(rsdp + 24);
            if x != 0 {
                (table_at(x, Some(b"XSDT"))?, 8)
            } else {
                (table_at(u64::from(rd32(rsdp + 16)), Some(b"RSDT"))?, 4)
            }
        } else {
            (table_at(u64::from(rd32(rsdp + 16)), Some(b"RSDT"))?, 4)
        };
        let n = (u64::from(root.len) - 36) / stride;
        for i in 0..n {
            let p = root.addr + 36 + i * stride;
            let addr = if stride == 8 {
                rd64(p)
            } else {
                u64::from(rd32(p))
            };
            let t = table_at(addr, None)?;
            acpi.push(t);
            match &t.sig {
                b"FACP" => acpi.fadt = Some(t),
                b"APIC" => acpi.parse_madt(t)?,
                _ => {}
            }
        }
        if let Some(f) = acpi.fadt {
            let x = if f.len >= 148 { rd64(f.addr + 140) } else { 0 };
            let d = if x != 0 {
                x
            } else {
                u64::from(rd32(f.addr + 40))
            };
            if d != 0 {
                let t = table_at(d, Some(b"DSDT"))?;
                acpi.push(t);
                acpi.dsdt = Some(t);
            }
        }
        Ok(acpi)
    }

    fn push(&mut self, t: Table) {
        if self.n_tables < MAX_TABLES {
            self.tables[self.n_tables] = t;
            self.n_tables += 1;
        }
    }

    fn parse_madt(&mut self, t: Table) -> Result<(), AcpiError> {
        if t.len < 44 {
            return Err(AcpiError::new("MADT too short", Some(t.sig), t.addr));
        }
        self.has_madt = true;
        self.lapic_addr = u64::from(rd32(t.addr + 36));
        let end = t.addr + u64::from(t.len);
        let mut p = t.addr + 44;
        while p + 2 <= end {
            let kind = rd8(p);
            let len = u64::from(rd8(p + 1));
            if len < 2 || p + len > end {
                return Err(AcpiError::new("bad MADT entry length", Some(t.sig), p));
            }
            match (kind, len) {
                // Processor Local APIC, enabled.
                (0, 8..) if rd32(p + 4) & 1 != 0 => self.add_cpu(u32::from(rd8(p + 3))),
                (1, 12..) => {
                    if (self.ioapics as usize) < MAX_IOAPICS {
                        self.ioapic[self.ioapics as usize] = IoApic {
                            addr: u64::from(rd32(p + 4)),
                            gsi_base: rd32(p + 8),
                        };
                    }
                    self.ioapics += 1;
                }
                (2, 10..) if self.n_isos < MAX_ISOS => {
                    let mps = rd8(p + 8);
                    let mut flags = 0;
                    if mps & 3 == 3 {
                        flags |= IRQ_LOW;
                    }
                    if (mps >> 2) & 3 == 3 {
                        flags |= IRQ_LEVEL;
                    }
                    self.isos[self.n_isos] = Iso {
                        source: rd8(p + 3),
                        gsi: rd32(p + 4),
                        flags,
                    };
                    self.n_isos += 1;
                }
                (5, 12..) => self.lapic_addr = rd64(p + 4),
                // Processor Local x2APIC, enabled.
                (9, 16..) if rd32(p + 8) & 1 != 0 => self.add_cpu(rd32(p + 4)),
                _ => {}
            }
            p += len;
        }
        Ok(())
    }

    fn add_cpu(&mut self, id: u32) {
        if self.n_cpus < MAX_CPUS {
            self.cpus[self.n_cpus] = id;
            self.n_cpus += 1;
        }
    }

    /// The DSDT's AML body (after the 36-byte header) as a slice.
    pub fn dsdt_aml(&self) -> &'static [u8] {
        match self.dsdt {
            // SAFETY: the table was bounds-checked against the identity map by `table_at`
            // and ACPI tables are not modified while the probe runs.
            Some(t) => unsafe {
                core::slice::from_raw_parts((t.addr + 36) as *const u8, t.len as usize - 36)
            },
            None => &[],
        }
    }

    /// The sleep control register and the value layout: `(register, hw_reduced)`. For a
    /// HW-reduced FADT (or any FADT with SLEEP_CONTROL_REG) the register takes
    /// `SLP_TYP << 2 | 1 << 5`; PM1a_CNT takes `SLP_TYP << 10 | 1 << 13`.
    pub fn sleep_control(&self) -> Option<(Gas, bool)> {
        let f = self.fadt?;
        if f.len >= 256 + 12 {
            let g = gas_at(f.addr + 244);
            if g.addr != 0 {
                return Some((g, true));
            }
        }
        if f.len >= 172 + 12 {
            let g = gas_at(f.addr + 172);
            if g.addr != 0 {
                return Some((g, false));
            }
        }
        let port = rd32(f.addr + 64);
        if port != 0 {
            return Some((
                Gas {
                    space: 1,
                    bit_width: 16,
                    addr: u64::from(port),
                },
                false,
            ));
        }
        None
    }
}

fn gas_at(addr: u64) -> Gas {
    Gas {
        space: rd8(addr),
        bit_width: rd8(addr + 1),
        addr: rd64(addr + 4),
    }
}

// ------------------------------------------------------------------------------ AML

/// A device `_HID`: an EISA id decoded to 7 characters or a string of up to 8.
#[derive(Clone, Copy)]
pub struct Hid {
    /// The id's bytes.
    pub id: [u8; 8],
    /// Number of valid bytes.
    pub len: usize,
}

impl Hid {
    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.id[..self.len]
    }
}

/// Decodes an `EISAID()` dword (the 4 bytes as stored in AML) to e.g. `PNP0501`.
fn eisa_decode(b: &[u8]) -> Hid {
    let w = (u16::from(b[0]) << 8) | u16::from(b[1]);
    let hex = |n: u8| if n < 10 { b'0' + n } else { b'A' + n - 10 };
    Hid {
        id: [
            0x40 + ((w >> 10) & 31) as u8,
            0x40 + ((w >> 5) & 31) as u8,
            0x40 + (w & 31) as u8,
            hex(b[2] >> 4),
            hex(b[2] & 15),
            hex(b[3] >> 4),
            hex(b[3] & 15),
            0,
        ],
        len: 7,
    }
}

/// Decodes the data object at `aml[0..]` as a `_HID` value (EISAID dword or string).
fn hid_value(aml: &[u8]) -> Option<Hid> {
    match aml.first()? {
        0x0c if aml.len() >= 5 => Some(eisa_decode(&aml[1..5])),
        0x0d => {
            let mut h = Hid { id: [0; 8], len: 0 };
            for &c in aml[1..].iter().take_while(|&&c| c != 0) {
                if h.len == 8 {
                    return None;
                }
                h.id[h.len] = c;
                h.len += 1;
            }
            Some(h)
        }
        _ => None,
    }
}

/// Calls `f` with every `Name(_HID, ...)` value found in `aml` (byte scan) and the offset
/// just after the name.
pub fn for_each_hid(aml: &[u8], mut f: impl FnMut(Hid, usize)) {
    let mut i = 0;
    while i + 5 < aml.len() {
        if aml[i] == 0x08 && &aml[i + 1..i + 5] == b"_HID" {
            if let Some(h) = hid_value(&aml[i + 5..]) {
                f(h, i + 5);
            }
            i += 5;
        } else {
            i += 1;
        }
    }
}

/// Decodes a PkgLength at `aml[0..]`: (length, bytes used by the encoding).
pub fn pkg_length(aml: &[u8]) -> Option<(usize, usize)> {
    let lead = *aml.first()?;
    let follow = usize::from(lead >> 6);
    if aml.len() < 1 + follow {
        return None;
    }
    if follow == 0 {
        return Some((usize::from(lead & 0x3f), 1));
    }
    let mut len = usize::from(lead & 0x0f);
    for k in 0..follow {
        len |= usize::from(aml[1 + k]) << (4 + 8 * k);
    }
    Some((len, 1 + follow))
}

/// Decodes an integer data object (Zero, One, Ones, Byte/Word/DWord/QWord const):
/// (value, bytes used).
pub fn aml_integer(aml: &[u8]) -> Option<(u64, usize)> {
    let n = match *aml.first()? {
        0x00 => return Some((0, 1)),
        0x01 => return Some((1, 1)),
        0xff => return Some((u64::MAX, 1)),
        0x0a => 1,
        0x0b => 2,
        0x0c => 4,
        0x0e => 8,
        _ => return None,
    };
    if aml.len() < 1 + n {
        return None;
    }
    let mut v = 0u64;
    for k in 0..n {
        v |= u64::from(aml[1 + k]) << (8 * k);
    }
    Some((v, 1 + n))
}

/// The first element (SLP_TYPa) of `Name(_S5_, Package(){...})`.
pub fn s5_slp_typ(aml: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i + 6 < aml.len() {
        if &aml[i..i + 4] == b"_S5_" && i > 0 && (aml[i - 1] == 0x08 || aml[i - 1] == b'\\') {
            let rest = &aml[i + 4..];
            if rest.first() == Some(&0x12) {
                let (_, used) = pkg_length(&rest[1..])?;
                // PkgLength, then NumElements (one byte), then the elements.
                return aml_integer(rest.get(1 + used + 1..)?).map(|(v, _)| v);
            }
        }
        i += 1;
    }
    None
}

/// The `ADDR` of the DSDT's VM generation ID device (the `Device` whose `_HID` is
/// `VMGENCTR`): `Name (ADDR, Package (2) {low 32 bits, high 32 bits})`.
pub fn vmgenid_addr(aml: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i + 2 < aml.len() {
        if aml[i] == 0x5b && aml[i + 1] == 0x82 {
            if let Some((len, used)) = pkg_length(&aml[i + 2..]) {
                let start = i + 2;
                let end = (start + len).min(aml.len());
                let body = &aml[(start + used).min(end)..end];
                let mut ours = false;
                for_each_hid(body, |h, _| ours |= h.as_bytes() == b"VMGENCTR");
                if ours {
                    return package_addr(body);
                }
            }
        }
        i += 1;
    }
    None
}

/// `Name (ADDR, Package (2) {lo, hi})` in a device body, as `hi << 32 | lo`.
fn package_addr(body: &[u8]) -> Option<u64> {
    let at = body.windows(6).position(|w| w[0] == 0x08 && &w[1..5] == b"ADDR" && w[5] == 0x12)?;
    let rest = body.get(at + 6..)?;
    let (_, used) = pkg_length(rest)?;
    // PkgLength, NumElements, then the two integers.
    let elems = rest.get(used + 1..)?;
    let (lo, n) = aml_integer(elems)?;
    let (hi, _) = aml_integer(elems.get(n..)?)?;
    Some((hi << 32) | (lo & 0xffff_ffff))
}

/// A virtio-mmio window found in the DSDT.
#[derive(Clone, Copy, Default)]
pub struct MmioDev {
    /// MMIO base.
    pub base: u64,
    /// Window length.
    pub len: u64,
    /// Interrupt (GSI).
    pub gsi: u32,
    /// `IRQ_LEVEL` / `IRQ_LOW` from the interrupt descriptor.
    pub irq_flags: u8,
}

/// Finds every `Device` whose `_HID` is `LNRO0005` and decodes its `_CRS`
/// (`Memory32Fixed` and the first `Interrupt`/`IRQ`). Returns how many were found; at
/// most `out.len()` are stored.
pub fn virtio_devices(aml: &[u8], out: &mut [MmioDev]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i + 2 < aml.len() {
        // DeviceOp = ExtOpPrefix 0x5b, 0x82; PkgLength; NameString; TermList.
        if aml[i] == 0x5b && aml[i + 1] == 0x82 {
            if let Some((len, used)) = pkg_length(&aml[i + 2..]) {
                let start = i + 2;
                let end = (start + len).min(aml.len());
                let body = &aml[start + used..end];
                if let Some(dev) = virtio_device(body) {
                    if n < out.len() {
                        out[n] = dev;
                    }
                    n += 1;
                    i = end;
                    continue;
                }
            }
        }
        i += 1;
    }
    n
}

/// One `Device` body: if its `_HID` is `LNRO0005`, its `_CRS` resources. Only the part
/// before a nested `Device` counts (the walker visits nested devices itself).
fn virtio_device(body: &[u8]) -> Option<MmioDev> {
    let own = body
        .windows(2)
        .position(|w| w == [0x5b, 0x82])
        .unwrap_or(body.len());
    let body = &body[..own];
    let mut is_virtio = false;
    for_each_hid(body, |h, _| {
        if h.as_bytes() == b"LNRO0005" {
            is_virtio = true;
        }
    });
    if !is_virtio {
        return None;
    }
    let mut dev = MmioDev::default();
    let mut i = 0;
    while i + 5 < body.len() {
        if body[i] == 0x08 && &body[i + 1..i + 5] == b"_CRS" && body[i + 5] == 0x11 {
            // BufferOp PkgLength BufferSize ByteList.
            let (len, used) = pkg_length(&body[i + 6..])?;
            let start = i + 6 + used;
            let end = (i + 6 + len).min(body.len());
            let (size, sused) = aml_integer(&body[start..end])?;
            let data = &body[start + sused..end];
            let data = &data[..(size as usize).min(data.len())];
            parse_resources(data, &mut dev);
            return Some(dev);
        }
        i += 1;
    }
    Some(dev)
}

/// Decodes a resource template (small and large descriptors).
fn parse_resources(data: &[u8], dev: &mut MmioDev) {
    let mut p = 0;
    let mut have_irq = false;
    while p < data.len() {
        let tag = data[p];
        if tag & 0x80 == 0 {
            // Small item: type in bits 6..3, length in bits 2..0.
            let kind = (tag >> 3) & 0xf;
            let len = usize::from(tag & 7);
            if kind == 0xf {
                break; // End tag.
            }
            if kind == 0x4 && len >= 2 && p + 3 <= data.len() && !have_irq {
                // IRQ descriptor: a 16-bit mask.
                let mask = u16::from_le_bytes([data[p + 1], data[p + 2]]);
                if mask != 0 {
                    dev.gsi = mask.trailing_zeros();
                    have_irq = true;
                    // Optional information byte: bit 0 edge, bit 3 active low.
                    if len >= 3 && p + 3 < data.len() {
                        let info = data[p + 3];
                        dev.irq_flags = (u8::from(info & 1 == 0) * IRQ_LEVEL)
                            | (u8::from(info & 8 != 0) * IRQ_LOW);
                    }
                }
            }
            p += 1 + len;
        } else {
            if p + 3 > data.len() {
                break;
            }
            let len = usize::from(u16::from_le_bytes([data[p + 1], data[p + 2]]));
            let body = &data[(p + 3).min(data.len())..(p + 3 + len).min(data.len())];
            match tag {
                // Memory32Fixed: info, base (4), length (4).
                0x86 if body.len() >= 9 => {
                    dev.base = u64::from(u32::from_le_bytes([body[1], body[2], body[3], body[4]]));
                    dev.len = u64::from(u32::from_le_bytes([body[5], body[6], body[7], body[8]]));
                }
                // Extended Interrupt: flags, count, then count dwords.
                0x89 if body.len() >= 6 && !have_irq => {
                    dev.gsi = u32::from_le_bytes([body[2], body[3], body[4], body[5]]);
                    have_irq = true;
                    // Flags: bit 1 edge (else level), bit 2 active low.
                    dev.irq_flags = (u8::from(body[0] & 2 == 0) * IRQ_LEVEL)
                        | (u8::from(body[0] & 4 != 0) * IRQ_LOW);
                }
                _ => {}
            }
            p += 3 + len;
        }
    }
}
