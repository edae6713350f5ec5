//! The `virtio`, `blk` and `hostile` checks: a polled virtio-blk driver in ring 3.

use core::sync::atomic::Ordering;

use crate::arch::{inb, rdtsc};
use crate::console::{LSR, LSR_DR, RBR_THR};
use crate::checks::Ctx;
use crate::console::Line;
use crate::virtio::{self as vio, Dev, Found, D_NEXT, D_WRITE, NOTIFY_GATE};

/// virtio-blk device id.
const BLK_ID: u32 = 2;
// virtio-blk feature bits.
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
/// Features the driver accepts from a block device (besides VERSION_1).
const BLK_WANT: u64 = F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH;
// Request types and status values.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Status byte value before the device writes it.
const S_NONE: u8 = 0xee;

/// Data buffer size (the largest transfer).
const BUF_SIZE: u64 = 1 << 20;
/// Sectors per data buffer.
const BUF_SECTORS: u64 = BUF_SIZE / 512;

/// Data buffer: the shared DMA area (header and status in its last page).
fn buf() -> u64 {
    vio::dma()
}
/// Request header (16 bytes).
fn hdr() -> u64 {
    buf() + BUF_SIZE
}
/// Status byte.
fn status_addr() -> u64 {
    hdr() + 64
}
/// GET_ID buffer (20 bytes).
fn id_addr() -> u64 {
    hdr() + 128
}

fn buf_slice(len: u64) -> &'static mut [u8] {
    // SAFETY: the probe's own DMA buffer; only one request is in flight and the device has
    // completed it (or was reset) before the CPU touches the data.
    unsafe { core::slice::from_raw_parts_mut(buf() as *mut u8, len as usize) }
}

fn rd8(addr: u64) -> u8 {
    // SAFETY: inside the probe's DMA area.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn wr8(addr: u64, v: u8) {
    // SAFETY: inside the probe's DMA area.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

fn write_hdr(kind: u32, sector: u64) {
    // SAFETY: the header lives in the probe's DMA area.
    unsafe {
        core::ptr::write_volatile(hdr() as *mut u32, kind);
        core::ptr::write_volatile((hdr() + 4) as *mut u32, 0);
        core::ptr::write_volatile((hdr() + 8) as *mut u64, sector);
    }
}

/// The disk content protocol: byte at disk offset `i`.
fn pattern(i: u64, seed: u8) -> u8 {
    ((i >> 9) as u8) ^ (i as u8) ^ seed
}

/// First offset (relative to the disk) where the buffer differs from the pattern.
fn verify(sector: u64, len: u64, seed: u8) -> Option<(u64, u8, u8)> {
    let base = sector * 512;
    buf_slice(len)
        .iter()
        .enumerate()
        .find(|&(i, &b)| b != pattern(base + i as u64, seed))
        .map(|(i, &b)| (base + i as u64, b, pattern(base + i as u64, seed)))
}

fn fill(sector: u64, len: u64, seed: u8) {
    let base = sector * 512;
    for (i, b) in buf_slice(len).iter_mut().enumerate() {
        *b = pattern(base + i as u64, seed);
    }
}

/// A virtio-blk device in use.
struct Blk {
    dev: Dev,
    /// Bytes per data descriptor.
    seg_bytes: u64,
    /// Data descriptors per request.
    max_segs: u64,
    /// TSC cycles a request may take.
    timeout: u64,
}

impl Blk {
    fn new(dev: Dev, khz: u64) -> Blk {
        let mut seg_bytes = BUF_SIZE;
        if dev.features & F_SIZE_MAX != 0 {
            let m = u64::from(dev.config32(8)) & !511;
            if m != 0 {
                seg_bytes = seg_bytes.min(m);
            }
        }
        let mut max_segs = u64::from(dev.qsize) - 2;
        if dev.features & F_SEG_MAX != 0 {
            let m = u64::from(dev.config32(12));
            if m != 0 {
                max_segs = max_segs.min(m);
            }
        }
        Blk {
            dev,
            seg_bytes,
            max_segs: max_segs.max(1),
            timeout: khz * 5000,
        }
    }

    fn capacity(&self) -> u64 {
        self.dev.config64(0)
    }

    /// One request: header, data (`len` bytes at `data`, split into descriptors), status.
    fn request(&mut self, kind: u32, sector: u64, data: u64, len: u64) -> Result<u8, &'static str> {
        write_hdr(kind, sector);
        wr8(status_addr(), S_NONE);
        let dev_writes = kind == T_IN || kind == T_GET_ID;
        self.dev.set_desc(0, hdr(), 16, D_NEXT, 1);
        let mut i = 1u16;
        let mut off = 0;
        while off < len {
            let n = (len - off).min(self.seg_bytes);
            let flags = D_NEXT | if dev_writes { D_WRITE } else { 0 };
            self.dev.set_desc(i, data + off, n as u32, flags, i + 1);
            off += n;
            i += 1;
        }
        self.dev.set_desc(i, status_addr(), 1, D_WRITE, 0);
        self.dev.publish(0);
        self.dev.kick(0);
        match self.dev.poll(self.timeout) {
            None => Err("request timed out (no used entry within 5 s)"),
            Some((0, _)) => Ok(rd8(status_addr())),
            Some(_) => Err("used entry with an unknown id"),
        }
    }

    /// Reads or writes `sectors` sectors at `sector` to/from the data buffer, in as many
    /// requests as the segment limits need. Returns the first non-OK status.
    fn rw(&mut self, kind: u32, sector: u64, sectors: u64) -> Result<u8, &'static str> {
        let per_req = (self.seg_bytes * self.max_segs / 512).max(1);
        let mut done = 0;
        while done < sectors {
            let n = (sectors - done).min(per_req);
            let st = self.request(kind, sector + done, buf() + done * 512, n * 512)?;
            if st != S_OK {
                return Ok(st);
            }
            done += n;
        }
        Ok(S_OK)
    }

    /// Times `n` reads of `sectors` sectors each, striding over the disk; TSC cycles.
    fn time_reads(&mut self, n: u64, sectors: u64, cap: u64) -> Result<u64, &'static str> {
        let span = cap.saturating_sub(sectors).max(1);
        let t0 = rdtsc();
        for j in 0..n {
            let s = (j * sectors) % span;
            let st = self.rw(T_IN, s, sectors)?;
            if st != S_OK {
                return Err("read during the throughput test failed");
            }
        }
        Ok(rdtsc().wrapping_sub(t0))
    }
}

/// Parameters of the `blk` check.
struct BlkParams {
    seed: u8,
    check: u64,
    wseed: u8,
    wsector: u64,
    wcount: u64,
    iops_n: u64,
    mib_n: u64,
}

impl Ctx<'_> {
    pub(crate) fn virtio_found(&mut self, check: &str) -> Option<Found> {
        match vio::discover(self.entry, self.info, &self.params) {
            Ok(f) => Some(f),
            Err((why, addr)) => {
                let mut l = Line::new(check);
                l.s("FAIL ").s(why);
                if addr != 0 {
                    l.s(" at=").hex(addr);
                }
                l.end();
                None
            }
        }
    }

    /// `virtio`: discover and initialise every virtio-mmio device.
    pub(crate) fn virtio(&mut self) -> bool {
        let Some(f) = self.virtio_found("virtio") else {
            return true;
        };
        let mut ids = [0u32; vio::MAX_DEVS];
        let mut versions = [0u32; vio::MAX_DEVS];
        let mut features = [0u64; vio::MAX_DEVS];
        for (i, t) in f.devs[..f.n].iter().enumerate() {
            let r = vio::Dev::identify(t.base).and_then(|(v, id, _)| {
                versions[i] = v;
                ids[i] = id;
                if id == 0 {
                    // An empty transport (no device plugged in): nothing to set up.
                    return Ok(0);
                }
                let want = if id == BLK_ID { BLK_WANT } else { 0 };
                Dev::init(t.base, i, want).map(|d| d.features)
            });
            match r {
                Ok(feat) => features[i] = feat,
                Err((why, at)) => {
                    Line::new("virtio")
                        .s("FAIL ")
                        .s(why)
                        .s(" at=")
                        .hex(at)
                        .end();
                    return true;
                }
            }
            vio::reset(t.base);
        }
        let mut l = Line::new("virtio");
        l.s("ok devices=")
            .dec(f.n as u64)
            .s(" acpi=")
            .dec(f.n_acpi as u64)
            .s(" cmdline=")
            .dec(f.n_cmdline as u64);
        let list = |l: &mut Line, key: &str, n: usize, v: &dyn Fn(usize) -> u64, hex: bool| {
            l.s(key);
            if n == 0 {
                l.s("none");
            }
            for i in 0..n {
                if i > 0 {
                    l.s(",");
                }
                if hex {
                    l.hex(v(i));
                } else {
                    l.dec(v(i));
                }
            }
        };
        list(&mut l, " ids=", f.n, &|i| u64::from(ids[i]), false);
        list(
            &mut l,
            " versions=",
            f.n,
            &|i| u64::from(versions[i]),
            false,
        );
        list(&mut l, " features=", f.n, &|i| features[i], true);
        list(&mut l, " bases=", f.n, &|i| f.devs[i].base, true);
        list(&mut l, " gsis=", f.n, &|i| u64::from(f.devs[i].gsi), false);
        l.end();
        false
    }

    fn blk_params(&self) -> Result<BlkParams, &[u8]> {
        let p = &self.params;
        Ok(BlkParams {
            seed: p.num(b"probe.blk.seed=", 0x5a)? as u8,
            check: p.num(b"probe.blk.check=", 64)?,
            wseed: p.num(b"probe.blk.wseed=", 0xa5)? as u8,
            wsector: p.num(b"probe.blk.wsector=", 128)?,
            wcount: p.num(b"probe.blk.wcount=", 256)?,
            iops_n: p.num(b"probe.blk.iops_n=", 2000)?,
            mib_n: p.num(b"probe.blk.mib_n=", 32)?,
        })
    }

    /// `blk`: read, identify, write, flush, read back and time every virtio-blk disk.
    pub(crate) fn blk(&mut self) -> bool {
        let bp = match self.blk_params() {
            Ok(p) => p,
            Err(bad) => {
                Line::new("blk").s("FAIL bad parameter value ").b(bad).end();
                return true;
            }
        };
        let Some(f) = self.virtio_found("blk") else {
            return true;
        };
        let mut disk = 0u64;
        let mut failed = false;
        for (i, t) in f.devs[..f.n].iter().enumerate() {
            match Dev::identify(t.base) {
                Ok((_, BLK_ID, _)) => {}
                _ => continue,
            }
            let mut mismatch = None;
            if let Err(why) = self.blk_disk(disk, i, t, &bp, &mut mismatch) {
                let mut l = Line::new("blk");
                l.s("FAIL disk=")
                    .dec(disk)
                    .s(" base=")
                    .hex(t.base)
                    .s(" ")
                    .s(why);
                if let Some((off, got, want)) = mismatch {
                    l.s(" at offset ")
                        .hex(off)
                        .s(" got=")
                        .hex(u64::from(got))
                        .s(" want=")
                        .hex(u64::from(want));
                }
                l.end();
                failed = true;
            }
            self.close_virtio(t);
            disk += 1;
        }
        if disk == 0 {
            Line::new("blk").s("skip no virtio-blk devices").end();
        }
        failed
    }

    fn blk_disk(
        &mut self,
        disk: u64,
        slot: usize,
        t: &vio::Transport,
        bp: &BlkParams,
        mismatch: &mut Option<(u64, u8, u8)>,
    ) -> Result<(), &'static str> {
        let khz = self.tsc_khz_or_guess();
        let base = t.base;
        let dev = self
            .open_virtio(t, slot, BLK_WANT, 1)
            .map_err(|(why, _)| why)?;
        let mut b = Blk::new(dev, khz);
        let cap = b.capacity();
        let ro = b.dev.features & F_RO != 0;

        // Pick the notify path on the first disk: ring-3 store or gate, whichever is faster
        // for single 4 KiB reads.
        if disk == 0 && cap >= 8 {
            // Warm up, then best of three rounds of 16 reads each way.
            b.time_reads(4, 8, cap)?;
            let mut best = [u64::MAX; 2];
            for _ in 0..3 {
                for (k, gate) in [false, true].into_iter().enumerate() {
                    NOTIFY_GATE.store(gate, Ordering::Relaxed);
                    best[k] = best[k].min(b.time_reads(16, 8, cap)?);
                }
            }
            NOTIFY_GATE.store(best[1] < best[0], Ordering::Relaxed);
            self.notify_cycles = best;
        }

        // Read and verify the first `check` sectors.
        if bp.check > cap {
            return Err("probe.blk.check is beyond the disk's capacity");
        }
        let mut s = 0;
        while s < bp.check {
            let n = (bp.check - s).min(BUF_SECTORS);
            let st = b.rw(T_IN, s, n)?;
            if st != S_OK {
                return Err("read returned a non-OK status");
            }
            if let Some(m) = verify(s, n * 512, bp.seed) {
                *mismatch = Some(m);
                return Err("read pattern mismatch");
            }
            s += n;
        }

        // GET_ID.
        for k in 0..20 {
            wr8(id_addr() + k, 0);
        }
        let id_status = b.request(T_GET_ID, 0, id_addr(), 20)?;
        let mut id = [0u8; 20];
        let mut id_len = 0;
        if id_status == S_OK {
            for k in 0..20 {
                let c = rd8(id_addr() + k);
                if c == 0 {
                    break;
                }
                id[id_len] = if c.is_ascii_graphic() { c } else { b'?' };
                id_len += 1;
            }
        }

        // Write, flush, read back (or expect IOERR on a read-only disk).
        let mut write = "ok";
        let mut flush = "none";
        let mut readback = "none";
        if ro {
            if bp.wsector >= cap {
                return Err("probe.blk.wsector is beyond the disk's capacity");
            }
            fill(bp.wsector, 512, bp.wseed);
            let st = b.rw(T_OUT, bp.wsector, 1)?;
            if st != S_IOERR {
                return Err(match st {
                    S_OK => "write to a read-only disk succeeded",
                    S_UNSUPP => "write to a read-only disk: status UNSUPP, not IOERR",
                    S_NONE => "write to a read-only disk: status byte not written",
                    _ => "write to a read-only disk: bad status, not IOERR",
                });
            }
            write = "ioerr";
        } else {
            if bp.wsector + bp.wcount > cap {
                return Err("probe.blk.wsector + wcount is beyond the disk's capacity");
            }
            let mut s = 0;
            while s < bp.wcount {
                let n = (bp.wcount - s).min(BUF_SECTORS);
                fill(bp.wsector + s, n * 512, bp.wseed);
                if b.rw(T_OUT, bp.wsector + s, n)? != S_OK {
                    return Err("write returned a non-OK status");
                }
                s += n;
            }
            if b.dev.features & F_FLUSH != 0 {
                let st = b.request(T_FLUSH, 0, 0, 0)?;
                if st != S_OK {
                    return Err("flush returned a non-OK status");
                }
                flush = "ok";
            } else {
                flush = "unsupported";
            }
            let mut s = 0;
            while s < bp.wcount {
                let n = (bp.wcount - s).min(BUF_SECTORS);
                for x in buf_slice(n * 512).iter_mut() {
                    *x = 0;
                }
                if b.rw(T_IN, bp.wsector + s, n)? != S_OK {
                    return Err("read-back returned a non-OK status");
                }
                if let Some(m) = verify(bp.wsector + s, n * 512, bp.wseed) {
                    *mismatch = Some(m);
                    return Err("read-back mismatch");
                }
                s += n;
            }
            readback = "ok";
        }

        // Throughput.
        let iops_cycles = if bp.iops_n > 0 && cap >= 8 {
            Some(b.time_reads(bp.iops_n, 8, cap)?)
        } else {
            None
        };
        let mib_sectors = BUF_SECTORS.min(cap);
        let mib_cycles = if bp.mib_n > 0 && mib_sectors > 0 {
            Some(b.time_reads(bp.mib_n, mib_sectors, cap)?)
        } else {
            None
        };

        let mut l = Line::new("blk");
        l.s("ok disk=").dec(disk).s(" id=");
        match id_status {
            S_OK if id_len > 0 => l.b(&id[..id_len]),
            S_OK => l.s("empty"),
            _ => l.s("none"),
        };
        l.s(" sectors=")
            .dec(cap)
            .s(" ro=")
            .s(if ro { "yes" } else { "no" })
            .s(" read=ok write=")
            .s(write);
        if !ro {
            l.s(" flush=").s(flush).s(" readback=").s(readback);
        }
        l.s(" iops_4k=");
        match iops_cycles {
            Some(c) if c > 0 => l.dec(bp.iops_n * khz * 1000 / c),
            _ => l.s("none"),
        };
        l.s(" mibps_1m=");
        match mib_cycles {
            Some(c) if c > 0 => l.dec(bp.mib_n * mib_sectors * 512 * khz * 1000 / c / (1 << 20)),
            _ => l.s("none"),
        };
        l.s(" notify=").s(if NOTIFY_GATE.load(Ordering::Relaxed) {
            "gate"
        } else {
            "ring3"
        });
        if disk == 0 {
            // Average cycles of a 4 KiB read with each notify path (16 reads each).
            l.s(" r3_us=")
                .dec(self.notify_cycles[0] * 1000 / 16 / khz)
                .s(" gate_us=")
                .dec(self.notify_cycles[1] * 1000 / 16 / khz);
        }
        l.s(" base=").hex(base);
        if self.tsc_khz.is_none() {
            l.s(" tsc_khz=unknown");
        }
        self.irq_suffix(&mut l, &b.dev);
        l.end();
        Ok(())
    }

    /// `hostile`: the virtio-blk cases (first blk device), then those for the first
    /// virtio-net, -vsock and -balloon devices (`hostile.rs`), one line per device.
    pub(crate) fn hostile(&mut self) -> bool {
        let (blk_ran, blk_failed) = self.hostile_blk();
        let (others, others_failed) = self.hostile_others();
        if !blk_ran && others == 0 {
            Line::new("hostile")
                .s("skip no virtio-blk, -net, -vsock or -balloon device")
                .end();
        }
        blk_failed || others_failed
    }

    /// The virtio-blk cases: out-of-spec register accesses and descriptor chains, then a
    /// valid read. Returns (a blk device was there, failed).
    fn hostile_blk(&mut self) -> (bool, bool) {
        let seed = match self.params.num(b"probe.blk.seed=", 0x5a) {
            Ok(v) => v as u8,
            Err(bad) => {
                Line::new("hostile")
                    .s("FAIL bad probe.blk.seed=")
                    .b(bad)
                    .end();
                return (true, true);
            }
        };
        let Some(f) = self.virtio_found("hostile") else {
            return (true, true);
        };
        let Some((slot, t)) = f.devs[..f.n]
            .iter()
            .enumerate()
            .find(|(_, t)| matches!(Dev::identify(t.base), Ok((2, BLK_ID, _))))
        else {
            return (false, false);
        };
        let khz = self.tsc_khz_or_guess();
        let mut h = Hostile {
            base: t.base,
            slot,
            khz,
            sent: 0,
            used: 0,
            needs_reset: 0,
        };
        h.registers();
        if let Err(why) = h.chains() {
            Line::new("hostile")
                .s("FAIL ")
                .s(why)
                .s(" sent=")
                .dec(h.sent)
                .end();
            return (true, true);
        }

        // Then a clean start and a valid read.
        let r = Dev::init(t.base, slot, BLK_WANT)
            .map_err(|(why, _)| why)
            .and_then(|dev| {
                let mut b = Blk::new(dev, khz);
                if b.rw(T_IN, 0, 8)? != S_OK {
                    return Err("valid read after the hostile input returned a non-OK status");
                }
                if verify(0, 4096, seed).is_some() {
                    return Err("valid read after the hostile input: pattern mismatch");
                }
                Ok(())
            });
        vio::reset(t.base);
        let mut l = Line::new("hostile");
        match r {
            Ok(()) => l.s("ok sent=").dec(h.sent).s(" valid_read=ok"),
            Err(why) => l.s("FAIL sent=").dec(h.sent).s(" valid_read: ").s(why),
        };
        l.s(" used=")
            .dec(h.used)
            .s(" needs_reset=")
            .dec(h.needs_reset)
            .s(" base=")
            .hex(t.base)
            .end();
        (true, r.is_err())
    }
}

/// State of the `hostile` check.
struct Hostile {
    base: u64,
    slot: usize,
    khz: u64,
    /// Hostile operations sent (register accesses and notified chains).
    sent: u64,
    /// Used entries the device returned for hostile chains.
    used: u64,
    /// Times the device set DEVICE_NEEDS_RESET.
    needs_reset: u64,
}

/// An address far outside guest RAM.
pub const OUTSIDE: u64 = 0x7fff_0000_0000;

impl Hostile {
    fn w(&mut self, off: u64, v: u32) {
        vio::wr(self.base, off, v);
        self.sent += 1;
    }

    fn r(&mut self, off: u64) -> u32 {
        self.sent += 1;
        vio::rd(self.base, off)
    }

    /// Out-of-spec transport register use, no queue set up properly.
    fn registers(&mut self) {
        use crate::phys::{mmio_rd16, mmio_rd8, mmio_wr16, mmio_wr64, mmio_wr8};
        use vio::*;
        let b = self.base;
        vio::reset(b);
        // Notify before anything is set up.
        self.w(QUEUE_NOTIFY, 0);
        self.w(STATUS, S_ACK | S_DRIVER);
        // Bad queue selector.
        self.w(QUEUE_SEL, 0xffff);
        self.r(QUEUE_NUM_MAX);
        self.w(QUEUE_NUM, 8);
        self.w(QUEUE_READY, 1);
        self.w(QUEUE_SEL, 0x8000_0000);
        self.w(QUEUE_DESC_LOW, 0x1000);
        self.w(QUEUE_SEL, 0);
        // QueueNum above the maximum, and 0 and a non-power-of-two.
        let max = self.r(QUEUE_NUM_MAX);
        self.w(QUEUE_NUM, max.wrapping_add(1));
        self.w(QUEUE_NUM, 0xffff_ffff);
        self.w(QUEUE_NUM, 0);
        self.w(QUEUE_NUM, 3);
        // QueueReady before the addresses (still 0).
        self.w(QUEUE_READY, 1);
        self.w(QUEUE_NOTIFY, 0);
        self.w(QUEUE_READY, 0);
        // Addresses outside RAM, then ready.
        self.w(QUEUE_DESC_LOW, 0);
        self.w(QUEUE_DESC_HIGH, (OUTSIDE >> 32) as u32);
        self.w(QUEUE_READY, 1);
        self.w(QUEUE_NOTIFY, 0);
        self.w(QUEUE_READY, 0);
        // Features: garbage, FEATURES_OK, then changed after FEATURES_OK.
        for sel in [0, 1, 2, 0xffff_ffff] {
            self.w(DRIVER_FEATURES_SEL, sel);
            self.w(DRIVER_FEATURES, 0xffff_ffff);
        }
        self.w(DEVICE_FEATURES_SEL, 0xffff_ffff);
        self.r(DEVICE_FEATURES);
        self.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        self.r(STATUS);
        self.w(DRIVER_FEATURES_SEL, 0);
        self.w(DRIVER_FEATURES, 0);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, 0xffff_ffff);
        // Status garbage: DRIVER_OK without FEATURES_OK, clearing bits, all ones.
        self.w(STATUS, S_DRIVER_OK);
        self.w(STATUS, S_ACK);
        self.w(STATUS, 0xffff_ffff);
        self.w(STATUS, 0x7f);
        self.w(QUEUE_NOTIFY, 0xffff);
        // Writes to read-only registers, reads of write-only ones.
        self.w(MAGIC_VALUE, 0);
        self.w(VERSION, 1);
        self.w(DEVICE_ID, 0);
        self.w(QUEUE_NUM_MAX, 1);
        self.w(INTERRUPT_STATUS, 0xffff_ffff);
        self.w(CONFIG_GENERATION, 5);
        self.r(QUEUE_NOTIFY);
        self.r(DRIVER_FEATURES);
        self.r(INTERRUPT_ACK);
        self.w(INTERRUPT_ACK, 0xffff_ffff);
        // Unknown registers, config space past the blk config, window end.
        for off in [0x0b0, 0x0c0, 0x0f8, 0x1fc, 0x200, 0xffc] {
            self.r(off);
            self.w(off, 0xdead_beef);
        }
        // Odd widths and misaligned accesses.
        mmio_rd8(b + MAGIC_VALUE);
        mmio_rd16(b + VERSION + 2);
        mmio_wr8(b + STATUS, 0x0f);
        mmio_wr16(b + QUEUE_SEL, 0);
        mmio_wr8(b + QUEUE_NOTIFY + 1, 0);
        mmio_wr64(b + QUEUE_DESC_LOW, 0x1234_5000);
        mmio_rd8(b + CONFIG + 3);
        mmio_wr8(b + CONFIG, 0xff);
        mmio_rd16(b + 0x001);
        self.sent += 9;
        vio::reset(b);
        self.sent += 1;
        // A proper handshake, then DRIVER_OK with a ready queue whose rings lie outside RAM:
        // the device must refuse to activate (DEVICE_NEEDS_RESET), not touch that memory.
        self.w(STATUS, S_ACK | S_DRIVER);
        self.w(DRIVER_FEATURES_SEL, 1);
        self.w(DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1
        self.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        self.w(QUEUE_SEL, 0);
        self.w(QUEUE_NUM, 8);
        for (lo, hi) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH),
            (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH),
            (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH),
        ] {
            self.w(lo, OUTSIDE as u32);
            self.w(hi, (OUTSIDE >> 32) as u32);
        }
        self.w(QUEUE_READY, 1);
        self.w(STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        if self.r(STATUS) & S_NEEDS_RESET != 0 {
            self.needs_reset += 1;
        }
        vio::reset(b);
        self.sent += 1;
    }

    /// Sets the device up properly, then sends one hostile chain built by `build` and
    /// notifies; waits a bounded time for used entries and resets.
    fn chain(&mut self, build: &dyn Fn(&mut Dev)) -> Result<(), &'static str> {
        let mut dev = Dev::init(self.base, self.slot, BLK_WANT).map_err(|(why, _)| why)?;
        build(&mut dev);
        dev.notify();
        self.sent += 1;
        // Up to 20 ms for whatever the device makes of it.
        let wait = self.khz * 20;
        while dev.poll(wait).is_some() {
            self.used += 1;
            if self.used > 100_000 {
                break;
            }
        }
        if vio::rd(self.base, vio::STATUS) & vio::S_NEEDS_RESET != 0 {
            self.needs_reset += 1;
        }
        vio::reset(self.base);
        Ok(())
    }

    fn chains(&mut self) -> Result<(), &'static str> {
        let h = hdr();
        let st = status_addr();
        let data = buf();
        let cap = {
            let dev = Dev::init(self.base, self.slot, BLK_WANT).map_err(|(why, _)| why)?;
            let c = dev.config64(0);
            vio::reset(self.base);
            c
        };
        let rd_hdr = |sector: u64| write_hdr(T_IN, sector);
        // 1. Two descriptors looping back to each other.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 512, D_NEXT | D_WRITE, 0);
            d.publish(0);
        })?;
        // 2. A descriptor that is its own next.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 0);
            d.publish(0);
        })?;
        // 3. A chain longer than the queue (next runs off the end).
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            let q = d.qsize;
            d.set_desc(0, h, 16, D_NEXT, 1);
            for i in 1..q {
                d.set_desc(
                    i,
                    data + 512 * u64::from(i % 8),
                    512,
                    D_NEXT | D_WRITE,
                    i + 1,
                );
            }
            d.publish(0);
        })?;
        // 4. next index beyond the queue size.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 0xfff0);
            d.publish(0);
        })?;
        // 5. Head index beyond the queue size in the avail ring.
        self.chain(&|d: &mut Dev| {
            let q = d.qsize;
            d.publish(q + 3);
        })?;
        // 6. Avail index far ahead of what was published.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 512, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
            for _ in 0..1000 {
                d.publish(0);
            }
        })?;
        // 7. Data buffer outside guest RAM.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, OUTSIDE, 4096, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 8. Header outside guest RAM; status at an address that wraps.
        self.chain(&|d: &mut Dev| {
            d.set_desc(0, OUTSIDE, 16, D_NEXT, 1);
            d.set_desc(1, data, 512, D_NEXT | D_WRITE, 2);
            d.set_desc(2, u64::MAX, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 9. Huge data length that runs past the end of RAM (at the end of the disk, so
        //    no correct device transfers anything).
        self.chain(&|d: &mut Dev| {
            rd_hdr(cap);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 0xffff_fe00, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 10. Data overlapping the header and the status byte (device writes over both).
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, h, 512, D_NEXT | D_WRITE, 2);
            d.set_desc(2, h + 8, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 11. Data overlapping this queue's own descriptor table.
        let (desc, _, _) = vio::queue_mem(self.slot);
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, desc, 512, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 12. Read past the end of the disk, and at the largest sector.
        for sector in [cap, cap.saturating_sub(1), u64::MAX - 7] {
            self.chain(&move |d: &mut Dev| {
                rd_hdr(sector);
                d.set_desc(0, h, 16, D_NEXT, 1);
                d.set_desc(1, data, 4096, D_NEXT | D_WRITE, 2);
                d.set_desc(2, st, 1, D_WRITE, 0);
                d.publish(0);
            })?;
        }
        // 13. No status descriptor (header only; header + device-readable data).
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, 0, 0);
            d.publish(0);
        })?;
        self.chain(&|d: &mut Dev| {
            write_hdr(T_OUT, 1 << 40);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 512, 0, 0);
            d.publish(0);
        })?;
        // 14. Read-only status descriptor.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 512, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, 0, 0);
            d.publish(0);
        })?;
        // 15. Header too short, and device-writable.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 8, D_NEXT | D_WRITE, 1);
            d.set_desc(1, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 16. Zero-length data, odd-length data, unknown request type.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 0, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 333, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        self.chain(&|d: &mut Dev| {
            write_hdr(0xdead, 0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 17. INDIRECT flag without the feature, pointing outside RAM.
        self.chain(&|d: &mut Dev| {
            d.set_desc(0, OUTSIDE, 64, 4, 0);
            d.publish(0);
        })?;
        // 18. A write of data outside RAM (device reads it).
        self.chain(&|d: &mut Dev| {
            write_hdr(T_OUT, 0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, OUTSIDE, 4096, D_NEXT, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
        })?;
        // 19. A valid request notified twice, and a notify with nothing new.
        self.chain(&|d: &mut Dev| {
            rd_hdr(0);
            d.set_desc(0, h, 16, D_NEXT, 1);
            d.set_desc(1, data, 512, D_NEXT | D_WRITE, 2);
            d.set_desc(2, st, 1, D_WRITE, 0);
            d.publish(0);
            d.notify();
        })?;
        Ok(())
    }
}

/// Sectors `blkflight` cycles over (one 4 KiB write each).
const FLIGHT_SLOTS: u64 = 64;

/// The 4 KiB `blkflight` writes as its `n`-th write: slot `n % FLIGHT_SLOTS`, each byte from
/// `n`, so that a read-back tells which write a slot last received.
fn flight_byte(n: u64, i: u64) -> u8 {
    (n as u8) ^ ((n >> 8) as u8) ^ (i as u8).rotate_left(3) ^ 0x3c
}

impl Ctx<'_> {
    /// `blkflight`: lives across a snapshot with disk writes in flight. Writes 4 KiB after 4 KiB
    /// to the first virtio-blk disk (cycling over 64 slots, each write numbered), one request
    /// always published, until a byte arrives on COM1 (`probe.snapshot_ms`, default 60000);
    /// the snapshot is taken meanwhile and the byte sent to the restored VM. Every request
    /// must complete, exactly once (a lost one times out after 5 s, a doubled one leaves an
    /// extra used entry); then every slot is read back and must hold the last write the guest
    /// saw complete for it.
    pub(crate) fn blkflight(&mut self) -> bool {
        let ms = match self.params.num(b"probe.snapshot_ms=", 60_000) {
            Ok(v) => v,
            Err(_) => {
                Line::new("blkflight").s("FAIL bad probe.snapshot_ms=").end();
                return true;
            }
        };
        let Some(f) = self.virtio_found("blkflight") else {
            return true;
        };
        let khz = self.tsc_khz_or_guess();
        let Some((slot, t)) = f.devs[..f.n]
            .iter()
            .enumerate()
            .find(|(_, t)| matches!(Dev::identify(t.base), Ok((_, BLK_ID, _))))
        else {
            Line::new("blkflight").s("FAIL no virtio-blk disk").end();
            return true;
        };
        let dev = match self.open_virtio(t, slot, BLK_WANT, 1) {
            Ok(d) => d,
            Err((why, _)) => {
                Line::new("blkflight").s("FAIL ").s(why).end();
                return true;
            }
        };
        let mut b = Blk::new(dev, khz);
        if b.dev.features & F_RO != 0 || b.capacity() < FLIGHT_SLOTS * 8 {
            Line::new("blkflight")
                .s("FAIL the disk is read-only or smaller than 256 KiB")
                .end();
            return true;
        }
        while inb(LSR) & LSR_DR != 0 {
            let _ = inb(RBR_THR);
        }
        Line::new("blkflight").s("running ms=").dec(ms).end();
        let start = rdtsc();
        let limit = khz.saturating_mul(ms);
        let mut n = 0u64;
        let data = buf_slice(4096);
        loop {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = flight_byte(n, i as u64);
            }
            match b.request(T_OUT, (n % FLIGHT_SLOTS) * 8, buf(), 4096) {
                Ok(S_OK) => {}
                Ok(_) => {
                    Line::new("blkflight").s("FAIL write ").dec(n).s(" status not OK").end();
                    return true;
                }
                Err(why) => {
                    Line::new("blkflight").s("FAIL write ").dec(n).s(" ").s(why).end();
                    return true;
                }
            }
            // Exactly once: no second used entry for it.
            if b.dev.poll(0).is_some() {
                Line::new("blkflight").s("FAIL write ").dec(n).s(" completed twice").end();
                return true;
            }
            n += 1;
            if inb(LSR) & LSR_DR != 0 {
                let _ = inb(RBR_THR);
                break;
            }
            if rdtsc().wrapping_sub(start) > limit {
                Line::new("blkflight").s("FAIL no byte from the host").end();
                return true;
            }
        }
        // Every slot holds the last write the guest saw complete for it.
        for s in 0..FLIGHT_SLOTS.min(n) {
            let last = if n == 0 { 0 } else { n - 1 - ((n - 1 + FLIGHT_SLOTS - s) % FLIGHT_SLOTS) };
            match b.request(T_IN, s * 8, buf(), 4096) {
                Ok(S_OK) => {}
                _ => {
                    Line::new("blkflight").s("FAIL read-back of slot ").dec(s).end();
                    return true;
                }
            }
            let data = buf_slice(4096);
            if let Some(i) = (0..4096u64).find(|&i| data[i as usize] != flight_byte(last, i)) {
                Line::new("blkflight")
                    .s("FAIL slot ")
                    .dec(s)
                    .s(" does not hold write ")
                    .dec(last)
                    .s(" (byte ")
                    .dec(i)
                    .s(")")
                    .end();
                return true;
            }
        }
        self.close_virtio(t);
        Line::new("blkflight").s("ok writes=").dec(n).end();
        false
    }
}
