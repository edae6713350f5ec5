//! The checks, run in ring 3 in the order the command line names them.

use core::arch::asm;
use core::sync::atomic::Ordering;

use crate::arch::{self, inb, outb, rdtsc};
use crate::bootinfo::{self, MAX_CMDLINE, TYPE_RAM};
use crate::console::{self, Line, LSR, LSR_DR, LSR_THRE, MCR, RBR_THR, SCR};
use crate::setup::{BOOT_INFO, ENTRY, MAPPED_END};

/// Checks run when the command line has no `probe=` parameter.
const DEFAULT_CHECKS: [&[u8]; 6] = [
    b"memmap",
    b"cmdline",
    b"boottimer",
    b"serial",
    b"exitloop",
    b"ring0",
];
/// Most checks taken from `probe=`.
const MAX_CHECKS: usize = 32;
/// Default `probe.exits`.
const DEFAULT_EXITS: u64 = 100_000;
/// `dec; jnz` iterations for the ring0 check (about 25 ms when emulated).
const RING0_ITERS: u64 = 20_000;
/// Boot-timer port.
const BOOT_TIMER_PORT: u16 = 0x510;
/// Exit-loop port (nothing mapped there).
const EXIT_PORT: u16 = 0x511;
/// i8042 command/status port.
const I8042_CMD: u16 = 0x64;
/// i8042 data port.
const I8042_DATA: u16 = 0x60;
/// TSC frequency assumed for timeouts when CPUID does not tell it.
const FALLBACK_TSC_KHZ: u64 = 3_000_000;

/// Parameters from the command line.
pub(crate) struct Params<'a> {
    cmdline: &'a [u8],
    checks: [&'a [u8]; MAX_CHECKS],
    n_checks: usize,
    too_many: bool,
    exits: Option<&'a [u8]>,
    exit_ring: Option<&'a [u8]>,
    echo: Option<&'a [u8]>,
}

impl<'a> Params<'a> {
    fn parse(cmdline: &'a [u8]) -> Self {
        let mut p = Params {
            cmdline,
            checks: [&[]; MAX_CHECKS],
            n_checks: 0,
            too_many: false,
            exits: None,
            exit_ring: None,
            echo: None,
        };
        let mut list: Option<&'a [u8]> = None;
        for tok in cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n' || b == b'\r') {
            if let Some(v) = tok.strip_prefix(b"probe=") {
                list = Some(v);
            } else if let Some(v) = tok.strip_prefix(b"probe.exits=") {
                p.exits = Some(v);
            } else if let Some(v) = tok.strip_prefix(b"probe.exitring=") {
                p.exit_ring = Some(v);
            } else if let Some(v) = tok.strip_prefix(b"probe.echo=") {
                p.echo = Some(v);
            }
        }
        match list {
            Some(list) => {
                for name in list.split(|&b| b == b',').filter(|n| !n.is_empty()) {
                    if p.n_checks == MAX_CHECKS {
                        p.too_many = true;
                        break;
                    }
                    p.checks[p.n_checks] = name;
                    p.n_checks += 1;
                }
            }
            None => {
                for name in DEFAULT_CHECKS {
                    p.checks[p.n_checks] = name;
                    p.n_checks += 1;
                }
            }
        }
        p
    }

    /// Command-line words, split on white space.
    pub(crate) fn words(&self) -> impl Iterator<Item = &'a [u8]> {
        self.cmdline
            .split(|&b| b == b' ' || b == b'\t' || b == b'\n' || b == b'\r')
            .filter(|w| !w.is_empty())
    }

    /// The value of the last `key=value` word, if any (`key` includes the `=`).
    pub(crate) fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        self.words().filter_map(|w| w.strip_prefix(key)).last()
    }

    /// `key=N` as a number (decimal or 0x hex); `Err` carries the bad text.
    pub(crate) fn num(&self, key: &[u8], default: u64) -> Result<u64, &'a [u8]> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_u64(v).ok_or(v),
        }
    }
}

/// What the checks share.
pub(crate) struct Ctx<'a> {
    pub(crate) entry: u64,
    pub(crate) info: u64,
    cmdline: &'a [u8],
    pub(crate) params: Params<'a>,
    pub(crate) tsc: bool,
    pub(crate) tsc_khz: Option<u64>,
    pub(crate) checks: u64,
    pub(crate) failed: u64,
    /// TSC cycles of 16 4 KiB reads with a ring-3 notify and with a gate notify (`blk`).
    pub(crate) notify_cycles: [u64; 2],
    /// Interrupt routing, set up on first use (`irq`, `probe.irq=1`).
    pub(crate) irq: Option<crate::irq::Irq>,
    /// `probe.irq=1`: device checks wait for interrupts instead of polling.
    pub(crate) irq_mode: bool,
}

/// Ring-3 main: parse the command line, run the checks, report, reset.
pub fn run() -> ! {
    console::init();
    let entry = ENTRY.load(Ordering::Relaxed);
    let info = BOOT_INFO.load(Ordering::Relaxed);
    let mut buf = [0u8; MAX_CMDLINE + 1];
    let len = bootinfo::read_cmdline(bootinfo::cmdline_addr(entry, info), &mut buf);
    let cmdline = &buf[..len];

    Line::new("start")
        .s("entry=")
        .s(if entry == arch::ENTRY_PVH {
            "pvh"
        } else {
            "linux64"
        })
        .s(" ring=")
        .dec(u64::from(arch::cpl()))
        .end();

    let (tsc, tsc_khz) = detect_tsc();
    let mut ctx = Ctx {
        entry,
        info,
        cmdline,
        params: Params::parse(cmdline),
        tsc,
        tsc_khz,
        checks: 0,
        failed: 0,
        notify_cycles: [0; 2],
        irq: None,
        irq_mode: false,
    };
    ctx.irq_mode = matches!(ctx.params.get(b"probe.irq="), Some(b"1"));
    if ctx.params.too_many {
        Line::new("cmdline")
            .s("skip more than 32 checks in probe=, the rest are ignored")
            .end();
    }
    for i in 0..ctx.params.n_checks {
        let name = ctx.params.checks[i];
        ctx.checks += 1;
        let failed = match name {
            b"memmap" => ctx.memmap(),
            b"cmdline" => ctx.cmdline(),
            b"boottimer" => ctx.boottimer(),
            b"serial" => ctx.serial(),
            b"stringio" => ctx.stringio(),
            b"spew" => ctx.spew(),
            b"exitloop" => ctx.exitloop(),
            b"ring0" => ctx.ring0(),
            b"reset" => ctx.reset_check(),
            b"fault" => ctx.fault(),
            b"acpi" => ctx.acpi(),
            b"cpuid" => ctx.cpuid(),
            b"smp" => ctx.smp(),
            b"poweroff" => ctx.poweroff(),
            b"virtio" => ctx.virtio(),
            b"blk" => ctx.blk(),
            b"blkflight" => ctx.blkflight(),
            b"netflight" => ctx.netflight(),
            b"vsockflight" => ctx.vsockflight(),
            b"hostile" => ctx.hostile(),
            b"irq" => ctx.irq(),
            b"net" => ctx.net(),
            b"vsock" => ctx.vsock(),
            b"rng" => ctx.rng(),
            b"balloon" => ctx.balloon(),
            b"ctrlaltdel" => ctx.ctrlaltdel(),
            b"snapshot" => ctx.snapshot(),
            b"vmgenid" => ctx.vmgenid(),
            _ => {
                Line::new_bytes(name).s("skip unknown check").end();
                false
            }
        };
        if failed {
            ctx.failed += 1;
        }
    }
    ctx.done();
    ctx.reset()
}

/// Whether the CPU has a TSC, and its frequency in kHz if CPUID tells it.
fn detect_tsc() -> (bool, Option<u64>) {
    let (max_basic, _, _, _) = arch::cpuid(0, 0);
    let (_, _, ecx1, edx1) = arch::cpuid(1, 0);
    let tsc = edx1 & (1 << 4) != 0;
    if !tsc {
        return (false, None);
    }
    // Hypervisor timing leaf 0x40000010 (EAX = TSC kHz), if the hypervisor range has it.
    if ecx1 & (1 << 31) != 0 {
        let (max_hv, _, _, _) = arch::cpuid(0x4000_0000, 0);
        if (0x4000_0010..0x5000_0000).contains(&max_hv) {
            let (khz, _, _, _) = arch::cpuid(0x4000_0010, 0);
            if khz != 0 {
                return (true, Some(u64::from(khz)));
            }
        }
    }
    // CPUID 0x15: TSC/crystal ratio and crystal frequency.
    if max_basic >= 0x15 {
        let (den, num, crystal_hz, _) = arch::cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal_hz != 0 {
            let hz = u64::from(crystal_hz) * u64::from(num) / u64::from(den);
            return (true, Some(hz / 1000));
        }
    }
    // CPUID 0x16: processor base frequency in MHz.
    if max_basic >= 0x16 {
        let (mhz, _, _, _) = arch::cpuid(0x16, 0);
        let mhz = mhz & 0xffff;
        if mhz != 0 {
            return (true, Some(u64::from(mhz) * 1000));
        }
    }
    (true, None)
}

/// Writes `pattern`, then its complement, to the 8 bytes at `addr`, reads each back and
/// restores the original value. Returns the two values read.
fn test_word(addr: u64, pattern: u64) -> (u64, u64) {
    let first: u64;
    let second: u64;
    // SAFETY: `addr` is inside a RAM entry of the memory map and identity mapped with U=1.
    // The original value is restored at once; nothing else runs meanwhile (IF=0, one vCPU).
    // Done in assembly because the address may be 0, which Rust pointers must not be.
    unsafe {
        asm!(
            "mov {orig}, qword ptr [{addr}]",
            "mov qword ptr [{addr}], {pat}",
            "mov {first}, qword ptr [{addr}]",
            "not {pat}",
            "mov qword ptr [{addr}], {pat}",
            "mov {second}, qword ptr [{addr}]",
            "mov qword ptr [{addr}], {orig}",
            addr = in(reg) addr,
            pat = inout(reg) pattern => _,
            orig = out(reg) _,
            first = out(reg) first,
            second = out(reg) second,
            options(nostack, preserves_flags),
        );
    }
    (first, second)
}

impl Ctx<'_> {
    pub(crate) fn tsc_khz_or_guess(&self) -> u64 {
        self.tsc_khz.unwrap_or(FALLBACK_TSC_KHZ)
    }

    /// Busy-waits about `ms` milliseconds of TSC time (native in ring 3).
    pub(crate) fn wait_ms(&self, ms: u64) {
        let cycles = self.tsc_khz_or_guess() * ms;
        let t0 = rdtsc();
        while rdtsc().wrapping_sub(t0) < cycles {
            core::hint::spin_loop();
        }
    }

    fn memmap(&mut self) -> bool {
        let map = match bootinfo::memmap(self.entry, self.info) {
            Ok(map) => map,
            Err(why) => {
                Line::new("memmap").s("FAIL ").s(why).end();
                return true;
            }
        };
        let mapped_end = MAPPED_END.load(Ordering::Relaxed);
        let mut tested = 0u64;
        for r in map.entries[..map.count]
            .iter()
            .filter(|r| r.kind == TYPE_RAM)
        {
            if r.size < 8 {
                continue;
            }
            let Some(end) = r.addr.checked_add(r.size) else {
                Line::new("memmap")
                    .s("FAIL ram entry at ")
                    .hex(r.addr)
                    .s(" overflows")
                    .end();
                return true;
            };
            if end > mapped_end {
                Line::new("memmap")
                    .s("FAIL ram ")
                    .hex(r.addr)
                    .s("-")
                    .hex(end)
                    .s(" beyond the probe's identity map (ends at ")
                    .hex(mapped_end)
                    .s(")")
                    .end();
                return true;
            }
            let addrs = [r.addr, r.addr + ((r.size / 2) & !7), end - 8];
            for a in addrs {
                let pattern = 0x5a5a_0000_0000_a5a5 ^ (a << 16);
                let (first, second) = test_word(a, pattern);
                if first != pattern || second != !pattern {
                    let (wrote, read) = if first != pattern {
                        (pattern, first)
                    } else {
                        (!pattern, second)
                    };
                    Line::new("memmap")
                        .s("FAIL addr=")
                        .hex(a)
                        .s(" wrote=")
                        .hex(wrote)
                        .s(" read=")
                        .hex(read)
                        .end();
                    return true;
                }
            }
            tested += 1;
        }
        let mut line = Line::new("memmap");
        line.s("ok source=")
            .s(map.source)
            .s(" entries=")
            .dec(map.count as u64)
            .s(" ram=");
        let mut first = true;
        for r in map.entries[..map.count]
            .iter()
            .filter(|r| r.kind == TYPE_RAM)
        {
            if !first {
                line.s(",");
            }
            first = false;
            line.hex(r.addr).s("-").hex(r.addr.wrapping_add(r.size));
        }
        line.s(" tested=").dec(tested);
        // `probe.memmap.touch_mib=N`: writes a word in every page of the top N MiB of the
        // largest RAM region (far from the probe's own image at 1 MiB), so that the host
        // backs them (a memory limit test).
        let touch_mib = match self.params.num(b"probe.memmap.touch_mib=", 0) {
            Ok(n) => n,
            Err(_) => {
                line.s(" FAIL bad probe.memmap.touch_mib=").end();
                return true;
            }
        };
        if touch_mib > 0 {
            let Some(r) = map.entries[..map.count]
                .iter()
                .filter(|r| r.kind == TYPE_RAM && r.addr >= 0x10_0000)
                .max_by_key(|r| r.size)
            else {
                line.s(" FAIL no RAM above 1 MiB to touch").end();
                return true;
            };
            let bytes = touch_mib << 20;
            let end = (r.addr + r.size).min(mapped_end) & !0xfff;
            if bytes.saturating_add(8 << 20) > end.saturating_sub(r.addr) {
                line.s(" FAIL probe.memmap.touch_mib= is larger than RAM less 8 MiB")
                    .end();
                return true;
            }
            let mut a = end - bytes;
            while a < end {
                // SAFETY: `a` is identity-mapped guest RAM in the region's top part, which
                // holds none of the probe's code, data or stack.
                unsafe { core::ptr::write_volatile(a as *mut u64, a) };
                a += 4096;
            }
            line.s(" touched_mib=").dec(touch_mib);
        }
        line.end();
        false
    }

    fn cmdline(&mut self) -> bool {
        if self.cmdline.len() >= MAX_CMDLINE {
            Line::new("cmdline")
                .s("FAIL longer than ")
                .dec(MAX_CMDLINE as u64)
                .s(" bytes or not NUL-terminated")
                .end();
            return true;
        }
        Line::new("cmdline")
            .s("ok len=")
            .dec(self.cmdline.len() as u64)
            .s(" text=")
            .b(self.cmdline)
            .end();
        false
    }

    fn boottimer(&mut self) -> bool {
        outb(BOOT_TIMER_PORT, 0);
        Line::new("boottimer").s("ok port=0x510").end();
        false
    }

    fn serial(&mut self) -> bool {
        // Scratch register round trip.
        let saved = inb(SCR);
        for v in [0xa5u8, 0x5a] {
            outb(SCR, v);
            let got = inb(SCR);
            if got != v {
                outb(SCR, saved);
                Line::new("serial")
                    .s("FAIL scratch wrote=")
                    .hex(u64::from(v))
                    .s(" read=")
                    .hex(u64::from(got))
                    .end();
                return true;
            }
        }
        outb(SCR, saved);

        // Keep host input that is already waiting (it belongs to the echo test).
        let mut input = [0u8; 256];
        let mut n_in = 0usize;
        let mut guard = 0;
        while inb(LSR) & LSR_DR != 0 && guard < 4096 {
            let b = inb(RBR_THR);
            if n_in < input.len() {
                input[n_in] = b;
                n_in += 1;
            }
            guard += 1;
        }

        // Loopback: MCR bit 4 routes THR to RBR inside the UART.
        let mcr = inb(MCR);
        outb(MCR, mcr | 0x10);
        let test_byte = 0x5au8;
        let mut polls = 0u32;
        while inb(LSR) & LSR_THRE == 0 && polls < 100_000 {
            polls += 1;
        }
        outb(RBR_THR, test_byte);
        let t0 = rdtsc();
        let limit = self.tsc_khz_or_guess() * 100; // 100 ms
        let mut got: Option<u8> = None;
        while rdtsc().wrapping_sub(t0) < limit {
            if inb(LSR) & LSR_DR != 0 {
                let b = inb(RBR_THR);
                if b == test_byte {
                    got = Some(b);
                    break;
                }
                // Host input that raced with the switch to loopback mode.
                if n_in < input.len() {
                    input[n_in] = b;
                    n_in += 1;
                }
            }
        }
        outb(MCR, mcr);
        if got.is_none() {
            Line::new("serial")
                .s("FAIL loopback: wrote ")
                .hex(u64::from(test_byte))
                .s(" to THR with MCR.LOOP set, nothing came back in RBR within 100 ms")
                .end();
            return true;
        }

        // Host input echo.
        let Some(want) = self.params.echo else {
            Line::new("serial")
                .s("ok scratch=ok loopback=ok echo=none")
                .end();
            return false;
        };
        Line::new("serial").s("waiting-input").end();
        let mut line = [0u8; 256];
        let mut len = 0usize;
        let mut pos = 0usize;
        let t0 = rdtsc();
        let limit = self.tsc_khz_or_guess() * 10_000; // 10 s
        let mut complete = false;
        loop {
            let b = if pos < n_in {
                pos += 1;
                input[pos - 1]
            } else if inb(LSR) & LSR_DR != 0 {
                inb(RBR_THR)
            } else {
                if rdtsc().wrapping_sub(t0) >= limit {
                    break;
                }
                continue;
            };
            match b {
                b'\n' => {
                    complete = true;
                    break;
                }
                b'\r' => {}
                _ => {
                    if len < line.len() {
                        line[len] = b;
                        len += 1;
                    }
                }
            }
        }
        let got = &line[..len];
        if !complete {
            Line::new("serial")
                .s("FAIL echo: no newline within 10 s, got ")
                .dec(len as u64)
                .s(" bytes '")
                .b(got)
                .s("' want '")
                .b(want)
                .s("'")
                .end();
            return true;
        }
        if got != want {
            Line::new("serial")
                .s("FAIL echo: got '")
                .b(got)
                .s("' want '")
                .b(want)
                .s("'")
                .end();
            return true;
        }
        Line::new("serial")
            .s("ok scratch=ok loopback=ok echo=")
            .b(want)
            .end();
        false
    }

    /// Console output in bulk: `probe.spew.bytes` (default 1 MiB) of 64-byte lines, for tests
    /// of a console nobody reads and of console throughput.
    fn spew(&mut self) -> bool {
        let total = match self.params.num(b"probe.spew.bytes=", 1 << 20) {
            Ok(n) => n,
            Err(bad) => {
                Line::new("spew").s("FAIL bad probe.spew.bytes=").b(bad).end();
                return true;
            }
        };
        let t0 = rdtsc();
        let mut sent = 0u64;
        let mut line = [b'.'; 64];
        line[..11].copy_from_slice(b"PROBE spew ");
        line[63] = b'\n';
        while sent < total {
            console::write(&line);
            sent += 64;
        }
        let cycles = rdtsc().wrapping_sub(t0);
        let mut l = Line::new("spew");
        l.s("ok bytes=").dec(sent).s(" cycles=").dec(cycles);
        if let Some(khz) = self.tsc_khz {
            l.s(" kib_per_s=").dec(sent * khz / 1024 / (cycles / 1000).max(1));
        }
        l.end();
        false
    }

    /// String port I/O (`rep outsb` / `rep insb`): KVM hands the VMM one exit for many
    /// bytes, which must reach the device as one access per byte, as on hardware.
    fn stringio(&mut self) -> bool {
        // `rep outsb` of a whole line to THR: the host sees it on the console.
        let line = b"PROBE stringio-outsb ok marker=rep-outsb-reached-the-uart\n";
        arch::rep_outsb(RBR_THR, line);
        // `rep outsb` to the scratch register: the last byte stays there.
        let saved = inb(SCR);
        arch::rep_outsb(SCR, &[0x11, 0x22, 0x33, 0xc3]);
        let scr = inb(SCR);
        // `rep insb` from the scratch register: every byte reads its value.
        outb(SCR, 0x5a);
        let mut got = [0u8; 8];
        arch::rep_insb(SCR, &mut got);
        outb(SCR, saved);
        let ins_ok = got.iter().all(|&b| b == 0x5a);
        let mut l = Line::new("stringio");
        l.s(if scr == 0xc3 && ins_ok { "ok" } else { "FAIL" });
        l.s(" outsb_scr=").hex(u64::from(scr)).s(" insb=");
        for b in got {
            l.hex2(b);
        }
        l.s(" outsb_bytes=").dec(line.len() as u64).end();
        !(scr == 0xc3 && ins_ok)
    }

    fn exitloop(&mut self) -> bool {
        let exits = match self.params.exits {
            None => DEFAULT_EXITS,
            Some(text) => match parse_u64(text) {
                Some(v) => v,
                None => {
                    Line::new("exitloop")
                        .s("FAIL bad probe.exits=")
                        .b(text)
                        .end();
                    return true;
                }
            },
        };
        if exits == 0 {
            Line::new("exitloop").s("skip probe.exits=0").end();
            return false;
        }
        let ring = match self.params.exit_ring {
            None | Some(b"0") => 0,
            Some(b"3") => 3,
            Some(other) => {
                Line::new("exitloop")
                    .s("FAIL bad probe.exitring=")
                    .b(other)
                    .s(" (0 or 3)")
                    .end();
                return true;
            }
        };
        let cycles = if ring == 0 {
            arch::gate_out_loop(EXIT_PORT, exits)
        } else {
            arch::out_loop(EXIT_PORT, exits)
        };
        let mut line = Line::new("exitloop");
        line.s("ok exits=")
            .dec(exits)
            .s(" cycles_per_exit=")
            .dec(cycles / exits)
            .s(" tsc_khz=");
        match self.tsc_khz {
            Some(khz) => {
                let ns_total = u128::from(cycles) * 1_000_000 / u128::from(khz);
                let ns_per_exit = (ns_total / u128::from(exits)) as u64;
                let per_sec = if cycles == 0 {
                    0
                } else {
                    (u128::from(exits) * u128::from(khz) * 1000 / u128::from(cycles)) as u64
                };
                line.dec(khz)
                    .s(" ns_per_exit=")
                    .dec(ns_per_exit)
                    .s(" exits_per_sec=")
                    .dec(per_sec);
            }
            None => {
                line.s("unknown");
            }
        }
        line.end();
        false
    }

    fn ring0(&mut self) -> bool {
        if !self.tsc {
            Line::new("ring0")
                .s("skip no TSC (CPUID.1:EDX.TSC=0)")
                .end();
            return false;
        }
        let r0 = arch::gate_ring0_loop(RING0_ITERS);
        let mut r3 = u64::MAX;
        for _ in 0..5 {
            r3 = r3.min(arch::local_loop(RING0_ITERS));
        }
        if r0 == 0 || r3 == 0 || r3 == u64::MAX {
            Line::new("ring0").s("skip TSC does not advance").end();
            return false;
        }
        let native = r0 < 10 * r3;
        Line::new("ring0")
            .s("ok native=")
            .s(if native { "yes" } else { "no" })
            .s(" ring0_cycles_per_iter=")
            .fix2(r0, RING0_ITERS)
            .s(" ring3_cycles_per_iter=")
            .fix2(r3, RING0_ITERS)
            .s(" ratio=")
            .fix2(r0, r3)
            .end();
        false
    }

    /// The `fault` check (not in the spec's list; for testing a VMM's panic handling): a
    /// deliberate page fault on an unmapped address. The exception handler reports it as
    /// `PROBE panic exception 14 ...`, writes pvpanic and resets; this never returns.
    fn fault(&mut self) -> bool {
        let addr = MAPPED_END.load(Ordering::Relaxed) + 0x1000;
        // SAFETY: none; the read faults on purpose (the address is beyond the identity map)
        // and the exception handler ends the VM.
        let _ = unsafe { core::ptr::read_volatile(addr as *const u64) };
        Line::new("fault")
            .s("FAIL reading an unmapped address did not fault")
            .end();
        true
    }

    /// `snapshot`: lives across a snapshot. Fills a region (`probe.snapshot_kib`, default and
    /// at most 1024) with a pattern, notes the TSC, prints `PROBE snapshot waiting` with the
    /// region's address and polls COM1 for one byte from the host (sent once the host has
    /// snapshotted and restored or forked the VM; `probe.snapshot_ms`, default 60000). Then
    /// checks the pattern and that the TSC moved forward, marks the region with the byte (a
    /// fork's own write) and prints `mark=`; the checks after it on the command line then run
    /// in the restored VM (blk, rng, net, vsock ...).
    fn snapshot(&mut self) -> bool {
        const LEN: usize = 1 << 20;
        static mut REGION: [u8; LEN] = [0; LEN];
        let pattern = |i: usize| (i as u8) ^ ((i >> 8) as u8) ^ 0xa5;
        let ms = match self.params.num(b"probe.snapshot_ms=", 60_000) {
            Ok(v) => v,
            Err(_) => {
                Line::new("snapshot").s("FAIL bad probe.snapshot_ms=").end();
                return true;
            }
        };
        let kib = match self.params.num(b"probe.snapshot_kib=", 1024) {
            Ok(v) if (4..=1024).contains(&v) => v as usize,
            _ => {
                Line::new("snapshot")
                    .s("FAIL bad probe.snapshot_kib= (4 to 1024)")
                    .end();
                return true;
            }
        };
        // SAFETY: only this check touches REGION, on this one thread.
        let whole = unsafe { &mut *core::ptr::addr_of_mut!(REGION) };
        let region = &mut whole[..kib << 10];
        for (i, b) in region.iter_mut().enumerate() {
            *b = pattern(i);
        }
        // Drain stale input, then wait for the host's byte.
        while inb(LSR) & LSR_DR != 0 {
            let _ = inb(RBR_THR);
        }
        let before = rdtsc();
        Line::new("snapshot")
            .s("waiting ms=")
            .dec(ms)
            .s(" region=")
            .hex(region.as_ptr() as u64)
            .end();
        let limit = self.tsc_khz_or_guess().saturating_mul(ms);
        let mut polls = 0u64;
        let mark = loop {
            if inb(LSR) & LSR_DR != 0 {
                break inb(RBR_THR);
            }
            polls += 1;
            if rdtsc().wrapping_sub(before) > limit {
                Line::new("snapshot")
                    .s("FAIL no byte from the host within ms=")
                    .dec(ms)
                    .end();
                return true;
            }
            core::hint::spin_loop();
        };
        let after = rdtsc();
        let bad = region
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b != pattern(i))
            .count();
        if bad != 0 || after <= before {
            Line::new("snapshot")
                .s("FAIL pattern_bad_bytes=")
                .dec(bad as u64)
                .s(" tsc_forward=")
                .s(if after > before { "yes" } else { "no" })
                .end();
            return true;
        }
        // The host's byte marks the region (a fork's own write; its template and the other
        // forks must not see it).
        for (i, b) in region.iter_mut().enumerate() {
            *b = pattern(i) ^ mark;
        }
        let marked = region
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(i) ^ mark);
        if !marked {
            Line::new("snapshot").s("FAIL marked region changed").end();
            return true;
        }
        Line::new("snapshot")
            .s("ok pattern=ok tsc_forward=yes waited_ms=")
            .dec((after - before) / self.tsc_khz_or_guess().max(1))
            .s(" polls=")
            .dec(polls)
            .s(" mark=")
            .dec(u64::from(mark))
            .end();
        false
    }

    /// `ctrlaltdel`: waits (`probe.ctrlaltdel_ms`, default 30000) for Ctrl+Alt+Del from the
    /// i8042 keyboard (set-2 make codes 0x14 0x11 0xE0 0x71, what Firecracker's and Ember's
    /// `SendCtrlAltDel` send), polling the status port; then reports and resets the machine as
    /// a guest's Ctrl+Alt+Del handler does.
    fn ctrlaltdel(&mut self) -> bool {
        const WANT: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
        let ms = match self.params.num(b"probe.ctrlaltdel_ms=", 30_000) {
            Ok(v) => v,
            Err(_) => {
                Line::new("ctrlaltdel").s("FAIL bad probe.ctrlaltdel_ms=").end();
                return true;
            }
        };
        if !i8042_present() {
            Line::new("ctrlaltdel").s("skip no i8042").end();
            return false;
        }
        // Bytes already waiting count too: the host may have sent the keys before this check
        // began (a sequence split by other bytes is found anyway).
        Line::new("ctrlaltdel").s("waiting ms=").dec(ms).end();
        let t0 = rdtsc();
        let limit = self.tsc_khz_or_guess().saturating_mul(ms);
        let mut seen = 0usize;
        let mut bytes = 0u64;
        while seen < WANT.len() {
            if rdtsc().wrapping_sub(t0) > limit {
                Line::new("ctrlaltdel")
                    .s("FAIL no Ctrl+Alt+Del within ms=")
                    .dec(ms)
                    .s(" bytes=")
                    .dec(bytes)
                    .end();
                return true;
            }
            if inb(I8042_CMD) & 1 == 0 {
                core::hint::spin_loop();
                continue;
            }
            let b = inb(I8042_DATA);
            bytes += 1;
            seen = if b == WANT[seen] {
                seen + 1
            } else {
                usize::from(b == WANT[0])
            };
        }
        Line::new("ctrlaltdel")
            .s("ok scancodes=14,11,e0,71 after_ms=")
            .dec(rdtsc().wrapping_sub(t0) / self.tsc_khz_or_guess().max(1))
            .end();
        self.done();
        self.reset()
    }

    /// The `reset` check: report, print the summary so far, then reset at once.
    fn reset_check(&mut self) -> bool {
        Line::new("reset")
            .s("ok via=")
            .s(if i8042_present() {
                "i8042"
            } else {
                "triple-fault"
            })
            .end();
        self.done();
        self.reset()
    }

    pub(crate) fn done(&self) {
        Line::new("done")
            .s("checks=")
            .dec(self.checks)
            .s(" failed=")
            .dec(self.failed)
            .end();
    }

    /// Ends the VM: i8042 reset (then wait for the VMM to stop us), else triple fault.
    pub(crate) fn reset(&self) -> ! {
        if i8042_present() {
            outb(I8042_CMD, 0xfe);
            self.wait_ms(500);
        }
        arch::gate_reset()
    }
}

/// An i8042 status register that reads 0xff means nothing is decoding the port.
fn i8042_present() -> bool {
    inb(I8042_CMD) != 0xff
}

/// Decimal (or `0x` hex) `u64`.
pub(crate) fn parse_u64(text: &[u8]) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix(b"0x") {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}
