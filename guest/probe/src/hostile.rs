//! The `hostile` cases for virtio-net, virtio-vsock and virtio-balloon: malformed chains,
//! bogus packet headers, floods and PFNs outside RAM, each after a clean set-up and
//! followed by a notify, a bounded (20 ms) look at every used ring and a reset; then a
//! clean set-up and a valid request that must still work. (The virtio-blk cases are in
//! `blk.rs`.)

use crate::arch::rdtsc;
use crate::blk::OUTSIDE;
use crate::checks::Ctx;
use crate::console::Line;
use crate::net::{self, Me, NET_ID};
use crate::virtio::{self as vio, Dev, IrqMode, D_NEXT, D_WRITE, S_NEEDS_RESET};
use crate::vsock::{self, Hdr, Vsock, HDR, HOST_CID, OP_REQUEST, OP_RST, OP_RW, VSOCK_ID};
use crate::balloon::{BALLOON_ID, BALLOON_WANT, F_STATS_VQ};

/// Descriptor flag VIRTQ_DESC_F_INDIRECT.
const D_INDIRECT: u16 = 4;

/// One device under hostile input.
struct Rough {
    base: u64,
    slot: usize,
    want: u64,
    nq: usize,
    khz: u64,
    sent: u64,
    used: u64,
    needs_reset: u64,
}

impl Rough {
    fn open(&self) -> Result<Dev, &'static str> {
        Dev::open(self.base, self.slot, self.want, self.nq, IrqMode::default()).map_err(|(w, _)| w)
    }

    /// Clean set-up, `build` (which writes and publishes descriptors), a notify of queue
    /// `q`, 20 ms for used entries on every queue, a reset.
    fn chain(&mut self, q: u16, build: &dyn Fn(&mut Dev)) -> Result<(), &'static str> {
        let mut dev = self.open()?;
        build(&mut dev);
        dev.notify_q(q);
        self.sent += 1;
        let t0 = rdtsc();
        while rdtsc().wrapping_sub(t0) < self.khz * 20 && self.used < 100_000 {
            match dev.poll_any((1 << self.nq) - 1, self.khz) {
                Some(_) => self.used += 1,
                None => {
                    if vio::rd(self.base, vio::STATUS) & S_NEEDS_RESET != 0 {
                        break;
                    }
                }
            }
        }
        if vio::rd(self.base, vio::STATUS) & S_NEEDS_RESET != 0 {
            self.needs_reset += 1;
        }
        vio::reset(self.base);
        Ok(())
    }

    fn line(&self, dev: &str, valid: Result<&str, &str>) -> bool {
        let mut l = Line::new("hostile");
        match valid {
            Ok(_) => l.s("ok dev="),
            Err(_) => l.s("FAIL dev="),
        };
        l.s(dev).s(" sent=").dec(self.sent);
        match valid {
            Ok(what) => l.s(" valid=ok valid_reply=").s(what),
            Err(why) => l.s(" valid: ").s(why),
        };
        l.s(" used=")
            .dec(self.used)
            .s(" needs_reset=")
            .dec(self.needs_reset)
            .s(" base=")
            .hex(self.base)
            .end();
        valid.is_err()
    }
}

/// Puts a tx chain of the common malformed shapes at `d` on queue `q` (one case per call,
/// `case` 0..N_CHAIN_CASES).
const N_CHAIN_CASES: usize = 9;
fn bad_chain(dev: &mut Dev, q: usize, case: usize, d: u64, len: u32) {
    let qq = &mut dev.q[q];
    let size = qq.size;
    match case {
        // Zero-length descriptor.
        0 => qq.set_desc(0, d, 0, 0, 0),
        // Two descriptors looping.
        1 => {
            qq.set_desc(0, d, len, D_NEXT, 1);
            qq.set_desc(1, d, len, D_NEXT, 0);
        }
        // A descriptor that is its own next.
        2 => qq.set_desc(0, d, len, D_NEXT, 0),
        // Outside RAM.
        3 => qq.set_desc(0, OUTSIDE, len, 0, 0),
        // Wrong direction: a transmit buffer the device may write.
        4 => qq.set_desc(0, d, len, D_WRITE, 0),
        // Next index beyond the queue.
        5 => qq.set_desc(0, d, len, D_NEXT, 0xfff0),
        // Length running past the end of RAM.
        6 => qq.set_desc(0, d, 0xffff_0000, 0, 0),
        // INDIRECT without the feature, table outside RAM.
        7 => qq.set_desc(0, OUTSIDE, 64, D_INDIRECT, 0),
        // A chain longer than the queue.
        _ => {
            for i in 0..size {
                qq.set_desc(i, d, 16, D_NEXT, i + 1);
            }
        }
    }
    qq.publish(0);
    if case == 8 {
        // And a head index beyond the queue, with the avail index far ahead.
        qq.publish(size + 3);
        for _ in 0..1000 {
            qq.publish(0);
        }
    }
}

impl Ctx<'_> {
    /// Runs the hostile cases for the first net, vsock and balloon devices. Returns
    /// (devices tried, any failed).
    pub(crate) fn hostile_others(&mut self) -> (u64, bool) {
        let Ok(f) = vio::discover(self.entry, self.info, &self.params) else {
            return (0, false);
        };
        let khz = self.tsc_khz_or_guess();
        let mut n = 0;
        let mut failed = false;
        for id in [NET_ID, VSOCK_ID, BALLOON_ID] {
            let Some((slot, t)) = f.devs[..f.n]
                .iter()
                .enumerate()
                .find(|(_, t)| matches!(Dev::identify(t.base), Ok((2, i, _)) if i == id))
            else {
                continue;
            };
            let mut r = Rough {
                base: t.base,
                slot,
                want: 0,
                nq: 0,
                khz,
                sent: 0,
                used: 0,
                needs_reset: 0,
            };
            n += 1;
            failed |= match id {
                NET_ID => self.hostile_net(&mut r),
                VSOCK_ID => hostile_vsock(&mut r),
                _ => self.hostile_balloon(&mut r),
            };
            vio::reset(t.base);
        }
        (n, failed)
    }

    fn hostile_net(&mut self, r: &mut Rough) -> bool {
        r.want = net::F_MAC | net::F_CSUM | net::F_GUEST_CSUM | net::F_MRG_RXBUF;
        r.nq = 2;
        let res = (|| -> Result<&'static str, &'static str> {
            let d = vio::dma();
            // A valid broadcast ARP request (so that the peer, if any, sends something
            // into the hostile receive buffers), built once at `d + 0x1000`.
            let arp_at = d + 0x1000;
            let frame = |dev: &Dev| {
                let me = Me::of(dev, [192, 0, 2, 2]);
                let b = vio::dma_slice(arp_at, 2048);
                b[..net::HDR].fill(0);
                let len = me.arp(&mut b[net::HDR..], 1, &[0; 6], &[192, 0, 2, 1]);
                (net::HDR + len) as u32
            };
            for case in 0..N_CHAIN_CASES {
                r.chain(1, &|dev| bad_chain(dev, 1, case, d, 1514))?;
            }
            // Header only, and a header shorter than 12 bytes.
            r.chain(1, &|dev| {
                vio::zero(d, 64);
                dev.q[1].set_desc(0, d, net::HDR as u32, 0, 0);
                dev.q[1].publish(0);
            })?;
            r.chain(1, &|dev| {
                dev.q[1].set_desc(0, d, 4, 0, 0);
                dev.q[1].publish(0);
            })?;
            // Bogus header: GSO type 0xff, NEEDS_CSUM with csum_start/offset beyond the
            // frame, num_buffers 0xffff.
            r.chain(1, &|dev| {
                let len = frame(dev);
                let b = vio::dma_slice(arp_at, 12);
                b.copy_from_slice(&[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0, 0xff, 0xff, 0xff]);
                dev.q[1].set_desc(0, arp_at, len, 0, 0);
                dev.q[1].publish(0);
            })?;
            // A 128 KiB frame (32 descriptors of 4 KiB).
            r.chain(1, &|dev| {
                let n = dev.q[1].size.min(32);
                for i in 0..n {
                    let flags = if i + 1 < n { D_NEXT } else { 0 };
                    dev.q[1].set_desc(i, d + 4096 * u64::from(i), 4096, flags, i + 1);
                }
                dev.q[1].publish(0);
            })?;
            // Receive buffers that are wrong: device-readable, zero-length, outside RAM,
            // shorter than the header; then an ARP request to draw a reply into them.
            r.chain(0, &|dev| {
                let rx = &mut dev.q[0];
                rx.set_desc(0, d + 0x2000, 2048, 0, 0);
                rx.set_desc(1, d + 0x3000, 0, D_WRITE, 0);
                rx.set_desc(2, OUTSIDE, 2048, D_WRITE, 0);
                rx.set_desc(3, d + 0x4000, 4, D_WRITE, 0);
                for i in 0..4 {
                    rx.publish(i);
                }
                let len = frame(dev);
                dev.q[1].set_desc(0, arp_at, len, 0, 0);
                dev.q[1].publish(0);
                dev.notify_q(1);
            })?;
            // A valid frame must still be sent.
            let mut dev = r.open()?;
            let len = frame(&dev);
            dev.q[1].set_desc(0, arp_at, len, 0, 0);
            dev.q[1].publish(0);
            dev.notify_q(1);
            let ok = dev.poll_q(1, self.tsc_khz_or_guess() * 1000).is_some();
            vio::reset(r.base);
            if ok {
                Ok("tx")
            } else {
                Err("valid frame not transmitted within 1 s")
            }
        })();
        r.line("net", res)
    }

    fn hostile_balloon(&mut self, r: &mut Rough) -> bool {
        r.want = BALLOON_WANT;
        r.nq = 3;
        let ram_pfn = crate::bootinfo::ram_end_hint(self.entry, self.info) >> 12;
        let res = (|| -> Result<&'static str, &'static str> {
            let d = vio::dma();
            let scratch = ((d + 0x8_0000) >> 12) as u32;
            let pfns = |list: &[u32]| {
                let b = vio::dma_slice(d, 4 * list.len());
                for (i, p) in list.iter().enumerate() {
                    b[4 * i..4 * i + 4].copy_from_slice(&p.to_le_bytes());
                }
                4 * list.len() as u32
            };
            let outside = [
                u32::MAX,
                ram_pfn as u32,
                (ram_pfn + 12345) as u32,
                0xfec00,
                0xfee00,
                0xfffff,
                0,
            ];
            for q in [0usize, 1] {
                // PFNs outside RAM (and of the APICs, and page 0 on deflate only).
                let list = if q == 0 { &outside[..6] } else { &outside[..] };
                r.chain(q as u16, &|dev| {
                    let len = pfns(list);
                    dev.q[q].set_desc(0, d, len, 0, 0);
                    dev.q[q].publish(0);
                })?;
                for case in 0..N_CHAIN_CASES {
                    r.chain(q as u16, &|dev| {
                        // Every PFN a malformed chain can reach is the scratch page: a device
                        // reads up to 1024 PFNs from a chain (Ember's cap; Linux sends 256),
                        // and case 6's 4 GiB descriptor must not name the probe's own pages.
                        let b = vio::dma_slice(d, 4 * 4096);
                        for w in b.chunks_exact_mut(4) {
                            w.copy_from_slice(&scratch.to_le_bytes());
                        }
                        bad_chain(dev, q, case, d, 16)
                    })?;
                }
                // A length that is not a multiple of 4.
                r.chain(q as u16, &|dev| {
                    pfns(&[scratch]);
                    dev.q[q].set_desc(0, d, 3, 0, 0);
                    dev.q[q].publish(0);
                })?;
                // 10000 PFNs, all the same page, in one buffer.
                r.chain(q as u16, &|dev| {
                    let b = vio::dma_slice(d, 40_000);
                    for i in 0..10_000 {
                        b[4 * i..4 * i + 4].copy_from_slice(&scratch.to_le_bytes());
                    }
                    dev.q[q].set_desc(0, d, 40_000, 0, 0);
                    dev.q[q].publish(0);
                })?;
            }
            // Stats queue: odd length, unknown tag, zero length.
            r.chain(2, &|dev| {
                if dev.features & F_STATS_VQ == 0 || dev.nq < 3 {
                    return;
                }
                let b = vio::dma_slice(d, 20);
                b.fill(0xff);
                dev.q[2].set_desc(0, d, 7, 0, 0);
                dev.q[2].publish(0);
                dev.notify_q(2);
                dev.q[2].set_desc(1, d, 20, 0, 0);
                dev.q[2].publish(1);
                dev.notify_q(2);
                dev.q[2].set_desc(2, d, 0, 0, 0);
                dev.q[2].publish(2);
            })?;
            // `actual` garbage.
            {
                let dev = r.open()?;
                dev.set_config32(4, u32::MAX);
                dev.set_config32(4, 0);
                r.sent += 2;
                vio::reset(r.base);
            }
            // A valid inflate and deflate of the scratch page.
            let mut dev = r.open()?;
            for q in 0..2 {
                let len = pfns(&[scratch]);
                dev.q[q].set_desc(0, d, len, 0, 0);
                dev.q[q].publish(0);
                dev.notify_q(q as u16);
                if dev.poll_q(q, self.tsc_khz_or_guess() * 1000).is_none() {
                    vio::reset(r.base);
                    return Err("valid inflate/deflate not returned within 1 s");
                }
            }
            vio::reset(r.base);
            Ok("inflate,deflate")
        })();
        r.line("balloon", res)
    }
}

fn hostile_vsock(r: &mut Rough) -> bool {
    r.want = 0;
    r.nq = 3;
    let res = (|| -> Result<&'static str, &'static str> {
        let d = vio::dma();
        let cid = {
            let dev = r.open()?;
            let c = vsock::guest_cid(&dev);
            vio::reset(r.base);
            c
        };
        let base_hdr = Hdr {
            src_cid: cid,
            dst_cid: HOST_CID,
            src_port: 0x4000_1234,
            dst_port: 1,
            kind: 1,
            op: OP_REQUEST,
            buf_alloc: 0x1_0000,
            ..Hdr::default()
        };
        for case in 0..N_CHAIN_CASES {
            r.chain(1, &|dev| {
                base_hdr.write(d);
                bad_chain(dev, 1, case, d, HDR as u32)
            })?;
        }
        // A header shorter than 44 bytes.
        r.chain(1, &|dev| {
            base_hdr.write(d);
            dev.q[1].set_desc(0, d, 20, 0, 0);
            dev.q[1].publish(0);
        })?;
        // Bogus headers: len beyond the buffer (huge, and 4096 with 10 bytes), unknown op,
        // unknown type, wrong and spoofed CIDs, RW on no connection.
        let bogus: [Hdr; 9] = [
            Hdr { len: u32::MAX, op: OP_RW, ..base_hdr },
            Hdr { len: 4096, op: OP_RW, ..base_hdr },
            Hdr { op: 99, ..base_hdr },
            Hdr { kind: 0xffff, ..base_hdr },
            Hdr { kind: 2, ..base_hdr },
            Hdr { dst_cid: 0xdead_beef, ..base_hdr },
            Hdr { src_cid: 0x1234, ..base_hdr },
            Hdr { dst_cid: cid, ..base_hdr },
            Hdr { op: OP_RW, len: 10, ..base_hdr },
        ];
        for h in bogus {
            r.chain(1, &|dev| {
                h.write(d);
                vio::dma_slice(d + 64, 10).copy_from_slice(b"0123456789");
                dev.q[1].set_desc(0, d, HDR as u32, D_NEXT, 1);
                dev.q[1].set_desc(1, d + 64, 10, 0, 0);
                dev.q[1].publish(0);
            })?;
        }
        // Receive buffers that are wrong (device-readable, 8 bytes, outside RAM), then a
        // REQUEST whose RST lands in them.
        r.chain(1, &|dev| {
            let rx = &mut dev.q[0];
            rx.set_desc(0, d + 0x1000, 4096, 0, 0);
            rx.set_desc(1, d + 0x2000, 8, D_WRITE, 0);
            rx.set_desc(2, OUTSIDE, 4096, D_WRITE, 0);
            for i in 0..3 {
                rx.publish(i);
            }
            dev.notify_q(0);
            base_hdr.write(d);
            dev.q[1].set_desc(0, d, HDR as u32, 0, 0);
            dev.q[1].publish(0);
        })?;
        // A flood of REQUESTs (ports 1..=300), with receive buffers for the answers, then
        // a RST for each.
        {
            let dev = r.open()?;
            let mut v = Vsock::new(dev, r.khz);
            for op in [OP_REQUEST, OP_RST] {
                for port in 1..=300u32 {
                    let h = Hdr {
                        src_port: 0x4000_0000 + port,
                        dst_port: port,
                        op,
                        ..base_hdr
                    };
                    v.send_raw(&h, &[])?;
                    r.sent += 1;
                    while v.poll(0)? {
                        r.used += 1;
                    }
                }
            }
            let t0 = rdtsc();
            while rdtsc().wrapping_sub(t0) < r.khz * 50 {
                if v.poll(r.khz)? {
                    r.used += 1;
                }
            }
            vio::reset(r.base);
        }
        // A valid REQUEST must still get an answer (RESPONSE or RST).
        let dev = r.open()?;
        let mut v = Vsock::new(dev, r.khz);
        let port = 1;
        let answer = v.probe_request(port, r.khz * 1000)?;
        vio::reset(r.base);
        Ok(answer)
    })();
    r.line("vsock", res)
}
