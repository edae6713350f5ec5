//! The `balloon` check: virtio-balloon (device type 5; queues inflate 0, deflate 1, stats 2
//! with `VIRTIO_BALLOON_F_STATS_VQ`).
//!
//! The probe writes every page of `probe.balloon.touch_mib` MiB of RAM above its image (so
//! the VMM has really backed them), reads the target (`num_pages`), gives the device that
//! many of the touched pages (u32 PFNs, up to 256 per buffer), writes `actual`, answers the
//! stats queue, reports, and then holds for `probe.balloon.hold_ms` (following target
//! changes and stats requests) so the host can look at the VMM's memory use.

use crate::arch::rdtsc;
use crate::bootinfo::{self, TYPE_RAM};
use crate::checks::Ctx;
use crate::console::Line;
use crate::virtio::{self as vio, Dev};

/// virtio-balloon device id.
pub const BALLOON_ID: u32 = 5;
/// VIRTIO_BALLOON_F_MUST_TELL_HOST.
const F_MUST_TELL_HOST: u64 = 1 << 0;
/// VIRTIO_BALLOON_F_STATS_VQ.
pub const F_STATS_VQ: u64 = 1 << 1;
/// Features the driver accepts.
pub const BALLOON_WANT: u64 = F_MUST_TELL_HOST | F_STATS_VQ;
/// PFNs per buffer.
pub const PFNS_PER_BUF: usize = 256;
/// Buffers in flight (DMA offset `i * 1024`).
const MAX_BUFS: u16 = 128;
/// Stats buffer (DMA offset).
const STATS_OFF: u64 = 0x4_0000;
/// Stats: (tag, value) pairs, 10 bytes each (packed).
const N_STATS: usize = 7;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

extern "C" {
    static __probe_end: u8;
}

/// Parameters of the `balloon` check.
struct BalloonParams {
    touch_mib: u64,
    hold_ms: u64,
    wait_ms: u64,
}

/// A virtio-balloon device in use.
struct Balloon {
    dev: Dev,
    khz: u64,
    stats: bool,
    /// First touched page (physical address) and how many pages were touched.
    region: u64,
    touched: u64,
    /// Pages given to the device: the first `inflated` pages of the region.
    inflated: u64,
    total_ram: u64,
    stats_updates: u64,
}

impl Balloon {
    fn target(&self) -> u64 {
        u64::from(self.dev.config32(0))
    }

    /// Sends PFNs of region pages `[from, from + n)` on queue `q` (0 inflate, 1 deflate),
    /// waiting for every buffer.
    fn transfer(&mut self, q: usize, from: u64, n: u64) -> Result<(), &'static str> {
        let bufs = self.dev.q[q].size.min(MAX_BUFS);
        let mut done = 0u64;
        while done < n {
            // Fill and publish up to `bufs` buffers.
            let mut published = 0u16;
            while published < bufs && done < n {
                let k = (n - done).min(PFNS_PER_BUF as u64);
                let addr = vio::dma() + u64::from(published) * 1024;
                let b = vio::dma_slice(addr, 4 * k as usize);
                for j in 0..k {
                    let pfn = (self.region >> 12) + from + done + j;
                    let o = 4 * j as usize;
                    b[o..o + 4].copy_from_slice(&(pfn as u32).to_le_bytes());
                }
                self.dev.q[q].set_desc(published, addr, 4 * k as u32, 0, 0);
                self.dev.q[q].publish(published);
                published += 1;
                done += k;
            }
            self.dev.kick(q);
            for _ in 0..published {
                if self.dev.poll_q(q, self.khz * 5000).is_none() {
                    return Err("balloon buffer not returned within 5 s");
                }
            }
        }
        Ok(())
    }

    /// Inflates or deflates to `min(target, touched)` pages and writes `actual`.
    fn follow(&mut self) -> Result<(), &'static str> {
        let want = self.target().min(self.touched);
        if want > self.inflated {
            self.transfer(0, self.inflated, want - self.inflated)?;
        } else if want < self.inflated {
            self.transfer(1, want, self.inflated - want)?;
        }
        self.inflated = want;
        self.dev.set_config32(4, want as u32);
        Ok(())
    }

    /// Writes the statistics and gives the buffer to the device.
    fn post_stats(&mut self) {
        let used = self.touched * PAGE + probe_bytes();
        let free = self.total_ram.saturating_sub(used);
        let vals: [(u16, u64); N_STATS] = [
            (0, 0),               // swap in
            (1, 0),               // swap out
            (2, 0),               // major faults
            (3, 0),               // minor faults
            (4, free),            // free memory
            (5, self.total_ram),  // total memory
            (6, free),            // available memory
        ];
        let b = vio::dma_slice(vio::dma() + STATS_OFF, 10 * N_STATS);
        for (i, (tag, v)) in vals.iter().enumerate() {
            b[10 * i..10 * i + 2].copy_from_slice(&tag.to_le_bytes());
            b[10 * i + 2..10 * i + 10].copy_from_slice(&v.to_le_bytes());
        }
        self.dev.q[2].set_desc(0, vio::dma() + STATS_OFF, (10 * N_STATS) as u32, 0, 0);
        self.dev.q[2].publish(0);
        self.dev.kick(2);
    }

    /// Keeps running for `ms`: answers stats requests, follows the target.
    fn hold(&mut self, ms: u64) -> Result<(), &'static str> {
        let t0 = rdtsc();
        let mut last_check = t0;
        while rdtsc().wrapping_sub(t0) < self.khz * ms {
            if self.stats {
                let mask = 1u32 << 2;
                if self.dev.poll_any(mask, self.khz * 10).is_some() {
                    self.stats_updates += 1;
                    self.post_stats();
                }
            } else {
                crate::irq::spin_cycles(self.khz * 10);
            }
            if rdtsc().wrapping_sub(last_check) > self.khz * 50 {
                last_check = rdtsc();
                if self.target().min(self.touched) != self.inflated {
                    self.follow()?;
                }
            }
        }
        Ok(())
    }
}

/// Bytes of the probe image in memory (from 1 MiB).
fn probe_bytes() -> u64 {
    (&raw const __probe_end) as u64 - 0x10_0000
}

impl Ctx<'_> {
    /// The RAM the balloon check may touch: from the first 2 MiB boundary above the image,
    /// within one RAM entry, clear of the boot information. (start, bytes available).
    fn balloon_region(&self) -> Result<(u64, u64, u64), &'static str> {
        let map = bootinfo::memmap(self.entry, self.info)?;
        let start = ((&raw const __probe_end) as u64).div_ceil(2 * MIB) * 2 * MIB;
        let total: u64 = map.entries[..map.count]
            .iter()
            .filter(|r| r.kind == TYPE_RAM)
            .map(|r| r.size)
            .sum();
        let r = map.entries[..map.count]
            .iter()
            .find(|r| r.kind == TYPE_RAM && r.addr <= start && start < r.addr + r.size)
            .ok_or("no RAM above the probe image")?;
        let mut end = r.addr + r.size;
        // Boot information above the image (unusual) ends the region.
        for b in [
            self.info,
            bootinfo::cmdline_addr(self.entry, self.info),
            bootinfo::memmap_table_addr(self.entry, self.info),
        ] {
            if b >= start && b < end {
                end = b & !(PAGE - 1);
            }
        }
        Ok((start, end.saturating_sub(start), total))
    }

    fn balloon_params(&self) -> Result<BalloonParams, &'static str> {
        let p = &self.params;
        let n = |k: &[u8], d| p.num(k, d).map_err(|_| "bad probe.balloon.* number");
        Ok(BalloonParams {
            touch_mib: n(b"probe.balloon.touch_mib=", 16)?,
            hold_ms: n(b"probe.balloon.hold_ms=", 0)?,
            wait_ms: n(b"probe.balloon.wait_ms=", 0)?,
        })
    }

    /// `balloon`: touch, inflate to the target, stats, report, hold.
    pub(crate) fn balloon(&mut self) -> bool {
        let bp = match self.balloon_params() {
            Ok(p) => p,
            Err(why) => {
                Line::new("balloon").s("FAIL ").s(why).end();
                return true;
            }
        };
        let Some(f) = self.virtio_found("balloon") else {
            return true;
        };
        let Some((slot, t)) = f.devs[..f.n]
            .iter()
            .enumerate()
            .find(|(_, t)| matches!(Dev::identify(t.base), Ok((2, BALLOON_ID, _))))
        else {
            Line::new("balloon").s("skip no virtio-balloon device").end();
            return false;
        };
        let t = *t;
        let (start, avail, total) = match self.balloon_region() {
            Ok(r) => r,
            Err(why) => {
                Line::new("balloon").s("FAIL ").s(why).end();
                return true;
            }
        };
        let khz = self.tsc_khz_or_guess();
        let bytes = (bp.touch_mib * MIB).min(avail & !(PAGE - 1));
        // Touch every page (one store per page; the whole page is not needed).
        let mut a = start;
        while a < start + bytes {
            // SAFETY: RAM from the memory map above the probe's image and clear of the boot
            // information (`balloon_region`); nothing else uses it.
            unsafe { core::ptr::write_volatile(a as *mut u64, a ^ 0x5a5a_5a5a) };
            a += PAGE;
        }
        let dev = match self.open_virtio(&t, slot, BALLOON_WANT, 3) {
            Ok(d) => d,
            Err((why, _)) => {
                Line::new("balloon").s("FAIL ").s(why).s(" base=").hex(t.base).end();
                self.close_virtio(&t);
                return true;
            }
        };
        let stats = dev.features & F_STATS_VQ != 0 && dev.nq >= 3 && dev.q[2].size > 0;
        let mut b = Balloon {
            dev,
            khz,
            stats,
            region: start,
            touched: bytes / PAGE,
            inflated: 0,
            total_ram: total,
            stats_updates: 0,
        };
        if stats {
            b.post_stats();
        }
        // Optionally wait for the host to set a target.
        let t0 = rdtsc();
        while b.target() == 0 && rdtsc().wrapping_sub(t0) < khz * bp.wait_ms {
            crate::irq::spin_cycles(khz);
        }
        let target = b.target();
        let r = b.follow();
        let mut l = Line::new("balloon");
        match r {
            Ok(()) => l.s("ok"),
            Err(why) => l.s("FAIL ").s(why),
        };
        l.s(" target_pages=")
            .dec(target)
            .s(" inflated=")
            .dec(b.inflated)
            .s(" stats=")
            .s(if stats { "yes" } else { "no" })
            .s(" touched_mib=")
            .dec(bytes / MIB)
            .s(" region=")
            .hex(start)
            .s(" features=")
            .hex(b.dev.features)
            .s(" base=")
            .hex(t.base);
        self.irq_suffix(&mut l, &b.dev);
        l.end();
        let mut failed = r.is_err();
        if !failed && bp.hold_ms > 0 {
            let r = b.hold(bp.hold_ms);
            let mut l = Line::new("balloon-hold");
            match r {
                Ok(()) => l.s("ok"),
                Err(why) => l.s("FAIL ").s(why),
            };
            l.s(" ms=")
                .dec(bp.hold_ms)
                .s(" stats_updates=")
                .dec(b.stats_updates)
                .s(" target_pages=")
                .dec(b.target())
                .s(" inflated=")
                .dec(b.inflated)
                .end();
            failed = r.is_err();
        }
        self.close_virtio(&t);
        failed
    }
}
