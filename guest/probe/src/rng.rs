//! The `rng` check: virtio-rng (device type 4, one queue), 4 KiB of entropy.

use crate::checks::Ctx;
use crate::console::Line;
use crate::virtio::{self as vio, D_WRITE};

/// virtio-rng device id.
pub const RNG_ID: u32 = 4;
/// Bytes read.
const WANT: u64 = 4096;
/// Fewer distinct byte values than this in 4 KiB is not random.
const MIN_DISTINCT: u64 = 64;

impl Ctx<'_> {
    /// `rng`: read 4096 bytes from every virtio-rng device; FAIL when they are (nearly)
    /// constant.
    pub(crate) fn rng(&mut self) -> bool {
        let Some(f) = self.virtio_found("rng") else {
            return true;
        };
        let mut n = 0;
        let mut failed = false;
        for (slot, t) in f.devs[..f.n].iter().enumerate() {
            if !matches!(vio::Dev::identify(t.base), Ok((_, RNG_ID, _))) {
                continue;
            }
            let mut l = Line::new("rng");
            match self.rng_read(slot, t) {
                Ok((distinct, requests, irq)) => {
                    let ok = distinct >= MIN_DISTINCT;
                    failed |= !ok;
                    l.s(if ok { "ok" } else { "FAIL constant data" })
                        .s(" bytes=")
                        .dec(WANT)
                        .s(" distinct=")
                        .dec(distinct)
                        .s(" requests=")
                        .dec(requests)
                        .s(" base=")
                        .hex(t.base);
                    if let Some((irqs, event_idx)) = irq {
                        l.s(" irqs=")
                            .dec(irqs)
                            .s(" event_idx=")
                            .s(if event_idx { "yes" } else { "no" });
                    }
                }
                Err(why) => {
                    failed = true;
                    l.s("FAIL ").s(why).s(" base=").hex(t.base);
                }
            }
            l.end();
            self.close_virtio(t);
            n += 1;
        }
        if n == 0 {
            Line::new("rng").s("skip no virtio-rng device").end();
        }
        failed
    }

    /// Reads `WANT` bytes (as many requests as the device needs) into the DMA area.
    /// Returns (distinct byte values, requests, (interrupts, EVENT_IDX) in interrupt mode).
    #[allow(clippy::type_complexity)]
    fn rng_read(
        &mut self,
        slot: usize,
        t: &vio::Transport,
    ) -> Result<(u64, u64, Option<(u64, bool)>), &'static str> {
        let timeout = self.tsc_khz_or_guess() * 5000;
        let mut dev = self.open_virtio(t, slot, 0, 1).map_err(|(why, _)| why)?;
        let buf = vio::dma();
        vio::zero(buf, WANT);
        let mut got = 0u64;
        let mut requests = 0u64;
        while got < WANT {
            dev.q[0].set_desc(0, buf + got, (WANT - got) as u32, D_WRITE, 0);
            dev.q[0].publish(0);
            dev.kick(0);
            requests += 1;
            match dev.poll_q(0, timeout) {
                None => return Err("no used entry within 5 s"),
                Some((0, len)) if u64::from(len) <= WANT - got => got += u64::from(len),
                Some((0, _)) => return Err("used length larger than the buffer"),
                Some(_) => return Err("used entry with an unknown id"),
            }
            if requests > 10_000 {
                return Err("device returns too little data (10000 requests)");
            }
        }
        let mut seen = [false; 256];
        // SAFETY: the DMA area, written by the device and no longer in use.
        let data = unsafe { core::slice::from_raw_parts(buf as *const u8, WANT as usize) };
        for &b in data {
            seen[usize::from(b)] = true;
        }
        let distinct = seen.iter().filter(|&&s| s).count() as u64;
        // The last entry may have been taken before its interrupt came (up to 100 ms).
        dev.await_first_interrupt(self.tsc_khz_or_guess() * 100);
        let irq = dev.irq.map(|_| (dev.irqs, dev.event_idx));
        Ok((distinct, requests, irq))
    }
}
