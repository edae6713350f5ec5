//! Milestone-2 platform checks: `acpi`, `cpuid`, `smp`, `poweroff`.

use crate::acpi::{self, Acpi, AcpiError};
use crate::arch::{self, rdtsc};
use crate::checks::Ctx;
use crate::console::Line;
use crate::phys;
use crate::smp;

/// Low pages the AP trampoline may use, in order of preference (RAM below 1 MiB that no
/// VMM places boot structures in; checked against the boot information at run time).
const TRAMPOLINE_PAGES: [u64; 4] = [0x70000, 0x60000, 0x50000, 0x80000];
/// Time an AP gets to report (on top of a fixed 2 s).
const AP_BUDGET_MS: u64 = 100;

fn fail_acpi(check: &str, e: &AcpiError) {
    let mut l = Line::new(check);
    l.s("FAIL ");
    e.write(&mut l);
    l.end();
}

/// Counts `_HID`s equal to `id` in the DSDT.
fn count_hid(aml: &[u8], id: &[u8]) -> u64 {
    let mut n = 0;
    acpi::for_each_hid(aml, |h, _| {
        if h.as_bytes() == id {
            n += 1;
        }
    });
    n
}

impl Ctx<'_> {
    /// `acpi`: RSDP, checksums, table list, MADT, DSDT devices and `_S5_`.
    pub(crate) fn acpi(&mut self) -> bool {
        let a = match Acpi::load(self.entry, self.info) {
            Ok(a) => a,
            Err(e) => {
                fail_acpi("acpi", &e);
                return true;
            }
        };
        let missing = if a.fadt.is_none() {
            Some("FADT")
        } else if !a.has_madt {
            Some("MADT")
        } else if a.dsdt.is_none() {
            Some("DSDT")
        } else {
            None
        };
        let aml = a.dsdt_aml();
        let mut l = Line::new("acpi");
        match missing {
            Some(what) => l
                .s("FAIL no ")
                .s(what)
                .s(" rsdp=")
                .hex(a.rsdp)
                .s(" tables="),
            None => l
                .s("ok rsdp=")
                .hex(a.rsdp)
                .s(" revision=")
                .dec(u64::from(a.revision))
                .s(" tables="),
        };
        for (i, t) in a.tables[..a.n_tables].iter().enumerate() {
            if i > 0 {
                l.s(",");
            }
            l.b(&t.sig);
        }
        if missing.is_some() {
            l.end();
            return true;
        }
        l.s(" cpus=").dec(a.n_cpus as u64).s(" apic_ids=");
        for (i, id) in a.cpus[..a.n_cpus].iter().enumerate() {
            if i > 0 {
                l.s(",");
            }
            l.dec(u64::from(*id));
        }
        l.s(" ioapics=")
            .dec(u64::from(a.ioapics))
            .s(" devices=PNP0501:")
            .dec(count_hid(aml, b"PNP0501"))
            .s(",LNRO0005:")
            .dec(count_hid(aml, b"LNRO0005"))
            .s(" s5=");
        match acpi::s5_slp_typ(aml) {
            Some(v) => l.dec(v),
            None => l.s("none"),
        };
        l.s(" rsdp_via=").s(a.rsdp_via).end();
        false
    }

    /// `vmgenid`: the VM generation ID: the DSDT's `VMGENCTR` device, its `ADDR`, the 16
    /// bytes there (printed as 32 hex digits, byte by byte), and how many Generic Event
    /// Devices (`ACPI0013`, through which the VMM announces a new ID) the DSDT has.
    pub(crate) fn vmgenid(&mut self) -> bool {
        let a = match Acpi::load(self.entry, self.info) {
            Ok(a) => a,
            Err(e) => {
                fail_acpi("vmgenid", &e);
                return true;
            }
        };
        let aml = a.dsdt_aml();
        let Some(addr) = acpi::vmgenid_addr(aml) else {
            Line::new("vmgenid")
                .s("FAIL no VMGENCTR device with an ADDR package in the DSDT")
                .end();
            return true;
        };
        if !phys::mapped(addr, 16) {
            Line::new("vmgenid").s("FAIL addr=").hex(addr).s(" not mapped").end();
            return true;
        }
        let mut id = [0u8; 16];
        for (k, b) in id.iter_mut().enumerate() {
            *b = phys::rd8(addr + k as u64);
        }
        let mut l = Line::new("vmgenid");
        l.s(if id == [0; 16] { "FAIL zero " } else { "ok " })
            .s("addr=")
            .hex(addr)
            .s(" id=");
        for b in id {
            l.hex2(b);
        }
        l.s(" ged=").dec(count_hid(aml, b"ACPI0013")).end();
        id == [0; 16]
    }

    /// `cpuid`: what the guest sees (executed in ring 0, i.e. the VMM's CPUID table).
    pub(crate) fn cpuid(&mut self) -> bool {
        let (max, vb, vc, vd) = arch::cpuid(0, 0);
        let (_, b1, c1, d1) = arch::cpuid(1, 0);
        let (b7, c7) = if max >= 7 {
            let (_, b, c, _) = arch::cpuid(7, 0);
            (b, c)
        } else {
            (0, 0)
        };
        let mut vendor = [0u8; 12];
        vendor[..4].copy_from_slice(&vb.to_le_bytes());
        vendor[4..8].copy_from_slice(&vd.to_le_bytes());
        vendor[8..].copy_from_slice(&vc.to_le_bytes());
        let mut hv = [0u8; 12];
        let mut hv_len = 0;
        if c1 & (1 << 31) != 0 {
            let (_, hb, hc, hd) = arch::cpuid(0x4000_0000, 0);
            hv[..4].copy_from_slice(&hb.to_le_bytes());
            hv[4..8].copy_from_slice(&hc.to_le_bytes());
            hv[8..].copy_from_slice(&hd.to_le_bytes());
            hv_len = hv.iter().position(|&c| c == 0).unwrap_or(12);
        }
        let yn = |v: u32, bit: u32| if v & (1 << bit) != 0 { "yes" } else { "no" };
        let mut l = Line::new("cpuid");
        l.s("ok vendor=").b(&clean(&vendor)).s(" hypervisor=");
        if hv_len == 0 {
            l.s("none");
        } else {
            l.b(&clean(&hv)[..hv_len]);
        }
        l.s(" max_leaf=")
            .hex(u64::from(max))
            .s(" l1_ecx=")
            .hex(u64::from(c1))
            .s(" l1_edx=")
            .hex(u64::from(d1))
            .s(" l7_ebx=")
            .hex(u64::from(b7))
            .s(" l7_ecx=")
            .hex(u64::from(c7))
            .s(" xsave=")
            .s(yn(c1, 26))
            .s(" popcnt=")
            .s(yn(c1, 23))
            .s(" cx16=")
            .s(yn(c1, 13))
            .s(" avx=")
            .s(yn(c1, 28))
            .s(" smap=")
            .s(yn(b7, 20))
            .s(" smep=")
            .s(yn(b7, 7))
            .s(" apic_id=")
            .dec(u64::from(b1 >> 24))
            .s(" logical=")
            .dec(u64::from((b1 >> 16) & 0xff))
            .s(" tsc_khz=");
        match self.tsc_khz {
            Some(k) => l.dec(k),
            None => l.s("unknown"),
        };
        l.end();
        false
    }

    /// `poweroff`: ACPI S5 through the FADT's sleep control register. Ends the VM.
    pub(crate) fn poweroff(&mut self) -> bool {
        let why = match self.poweroff_write() {
            Ok(()) => "still running",
            Err(why) => why,
        };
        Line::new("poweroff").s("FAIL ").s(why).end();
        self.failed += 1;
        self.done();
        self.reset()
    }

    /// Prints the ok line and the done line, writes the sleep register and waits 500 ms.
    fn poweroff_write(&mut self) -> Result<(), &'static str> {
        let a = Acpi::load(self.entry, self.info).map_err(|e| e.what)?;
        let (gas, hw_reduced) = a
            .sleep_control()
            .ok_or("no sleep control register in the FADT")?;
        let typ = acpi::s5_slp_typ(a.dsdt_aml()).ok_or("no _S5_ package in the DSDT")? & 7;
        let value = if hw_reduced {
            (typ << 2) | (1 << 5)
        } else {
            (typ << 10) | (1 << 13)
        };
        let bytes = match gas.bit_width {
            0 => {
                if hw_reduced {
                    1
                } else {
                    2
                }
            }
            w => (u64::from(w) / 8).max(1),
        };
        let io = match gas.space {
            1 if gas.addr < 0x10000 => true,
            0 if phys::mapped(gas.addr, bytes) => false,
            _ => return Err("sleep control register in an unsupported address space"),
        };
        Line::new("poweroff")
            .s("ok via=acpi reg=")
            .s(if io { "io:" } else { "mem:" })
            .hex(gas.addr)
            .s(" slp_typ=")
            .dec(typ)
            .end();
        self.done();
        match (io, bytes) {
            (true, 1) => arch::outb(gas.addr as u16, value as u8),
            (true, 2) => arch::outw(gas.addr as u16, value as u16),
            (true, _) => arch::outl(gas.addr as u16, value as u32),
            (false, 1) => phys::mmio_wr8(gas.addr, value as u8),
            (false, 2) => phys::mmio_wr16(gas.addr, value as u16),
            (false, _) => phys::mmio_wr32(gas.addr, value as u32),
        }
        self.wait_ms(500);
        Ok(())
    }

    /// `smp`: start every AP in the MADT, have each reach ring 3 and report.
    pub(crate) fn smp(&mut self) -> bool {
        let a = match Acpi::load(self.entry, self.info) {
            Ok(a) => a,
            Err(e) => {
                fail_acpi("smp", &e);
                return true;
            }
        };
        if !a.has_madt {
            Line::new("smp").s("skip no MADT").end();
            return false;
        }
        let (_, b1, _, _) = arch::cpuid(1, 0);
        let bsp = b1 >> 24;
        let khz = self.tsc_khz_or_guess();

        // Assign a per-CPU block to every AP.
        smp::clear_slots();
        let mut slots = [0u8; smp::MAX_AP_SLOTS];
        let mut n_aps = 0usize;
        for &id in &a.cpus[..a.n_cpus] {
            if id == bsp {
                continue;
            }
            if id >= 255 || n_aps == smp::MAX_AP_SLOTS {
                Line::new("smp")
                    .s("FAIL cannot start APIC id ")
                    .dec(u64::from(id))
                    .s(" (xAPIC ids 0..254, at most 64 APs)")
                    .end();
                return true;
            }
            slots[n_aps] = id as u8;
            smp::prepare(n_aps, id as u8);
            n_aps += 1;
        }
        let cpus = a.n_cpus as u64;
        if n_aps == 0 {
            Line::new("smp")
                .s("ok cpus=")
                .dec(cpus)
                .s(" started=0 apic_ids=")
                .dec(u64::from(bsp))
                .s(" ring3=1")
                .end();
            return false;
        }
        let lapic = if a.lapic_addr != 0 {
            a.lapic_addr
        } else {
            0xfee0_0000
        };
        if !phys::mapped(lapic, 0x1000) {
            Line::new("smp")
                .s("FAIL local APIC ")
                .hex(lapic)
                .s(" not mapped")
                .end();
            return true;
        }

        // The trampoline page: RAM below 1 MiB, clear of the boot information.
        let Some(page) = self.trampoline_page() else {
            Line::new("smp")
                .s("FAIL no free low page for the AP trampoline")
                .end();
            return true;
        };
        let code = smp::trampoline();
        let mut saved = [0u8; 64];
        let n = code.len().min(saved.len());
        for (i, s) in saved[..n].iter_mut().enumerate() {
            *s = phys::rd8(page + i as u64);
            phys::mmio_wr8(page + i as u64, code[i]);
        }
        if code.len() > saved.len() {
            Line::new("smp")
                .s("FAIL trampoline larger than 64 bytes")
                .end();
            return true;
        }

        let t0 = rdtsc();
        for &id in &slots[..n_aps] {
            smp::send_ipi(lapic, id, smp::IPI_INIT);
        }
        smp::wait_us(khz, 10_000);
        let vector = (page >> 12) as u32;
        for &id in &slots[..n_aps] {
            smp::send_ipi(lapic, id, smp::IPI_SIPI | vector);
        }
        smp::wait_us(khz, 200);
        for (slot, &id) in slots[..n_aps].iter().enumerate() {
            if smp::state(slot) == 0 {
                smp::send_ipi(lapic, id, smp::IPI_SIPI | vector);
            }
        }
        // Generous: the loop ends as soon as every AP reported, and the APs' start-up is
        // emulated (real mode, paging set-up) at a speed that differs between hosts and with
        // how many other vCPU threads share the host's cores.
        let budget = khz * (2000 + AP_BUDGET_MS * n_aps as u64);
        loop {
            let pending = (0..n_aps).filter(|&s| smp::state(s) < 3).count();
            if pending == 0 || rdtsc().wrapping_sub(t0) > budget {
                break;
            }
            core::hint::spin_loop();
        }
        let us = rdtsc().wrapping_sub(t0) * 1000 / khz;

        let started = (0..n_aps).filter(|&s| smp::state(s) >= 3).count();
        let ring3 = 1 + (0..n_aps).filter(|&s| smp::state(s) == 3).count();
        let wrong_id = (0..n_aps)
            .find(|&s| smp::state(s) >= 1 && smp::reported_apic_id(s) != u32::from(slots[s]));
        let ok = started == n_aps && ring3 == n_aps + 1 && wrong_id.is_none();
        if ok {
            for (i, &s) in saved[..n].iter().enumerate() {
                phys::mmio_wr8(page + i as u64, s);
            }
        }
        let mut l = Line::new("smp");
        l.s(if ok { "ok" } else { "FAIL" })
            .s(" cpus=")
            .dec(cpus)
            .s(" started=")
            .dec(started as u64)
            .s(" apic_ids=")
            .dec(u64::from(bsp));
        for s in 0..n_aps {
            if smp::state(s) >= 3 {
                l.s(",").dec(u64::from(smp::reported_apic_id(s)));
            }
        }
        l.s(" ring3=").dec(ring3 as u64);
        if !ok {
            // Progress per AP: 0 no sign of life, 1 long mode, 2 ring 3, 3 done, 4 bad CPL.
            l.s(" states=");
            for (s, &id) in slots[..n_aps].iter().enumerate() {
                if s > 0 {
                    l.s(",");
                }
                l.dec(u64::from(id)).s(":").dec(u64::from(smp::state(s)));
            }
            if let Some(s) = wrong_id {
                l.s(" wrong_apic_id=")
                    .dec(u64::from(smp::reported_apic_id(s)));
            }
        }
        l.s(" trampoline=").hex(page).s(" us=").dec(us).end();
        !ok
    }

    /// A RAM page below 1 MiB for the SIPI trampoline that holds none of the boot
    /// information the probe may still read.
    fn trampoline_page(&self) -> Option<u64> {
        let map = crate::bootinfo::memmap(self.entry, self.info).ok()?;
        let cmd = crate::bootinfo::cmdline_addr(self.entry, self.info);
        let busy = [
            self.info,
            cmd,
            crate::bootinfo::memmap_table_addr(self.entry, self.info),
        ];
        TRAMPOLINE_PAGES.into_iter().find(|&p| {
            let ram = map.entries[..map.count].iter().any(|r| {
                r.kind == crate::bootinfo::TYPE_RAM && r.addr <= p && p + 0x1000 <= r.addr + r.size
            });
            ram && busy
                .iter()
                .all(|&b| b == 0 || b + 0x1000 <= p || b >= p + 0x1000)
        })
    }
}

/// Replaces non-printable bytes (CPUID strings) by `?`, NULs by `_`.
fn clean(s: &[u8; 12]) -> [u8; 12] {
    let mut out = *s;
    for c in out.iter_mut() {
        if *c == 0 {
            *c = b'_';
        } else if !c.is_ascii_graphic() {
            *c = b'?';
        }
    }
    out
}
