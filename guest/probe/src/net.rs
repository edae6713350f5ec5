//! The `net` check: a virtio-net driver (device type 1; receive queue 0, transmit queue 1)
//! with just enough Ethernet, ARP, IPv4, ICMP and UDP to say hello to a peer, answer it,
//! and flood it.
//!
//! Buffers live in the shared DMA area: receive buffers from offset 0 (one descriptor
//! each, descriptor index = buffer index), transmit buffers from `TX_OFF` (one descriptor
//! per frame: the 12-byte virtio-net header and the frame), a scratch frame at `FRAME_OFF`
//! where received frames that span several buffers (`MRG_RXBUF`) are put together.

use crate::arch::{inb, rdtsc};
use crate::checks::{parse_u64, Ctx};
use crate::console::{Line, LSR, LSR_DR, RBR_THR};
use crate::virtio::{self as vio, Dev, D_WRITE, F_EVENT_IDX};

/// virtio-net device id.
pub const NET_ID: u32 = 1;
/// VIRTIO_NET_F_CSUM: the device checksums what the driver leaves partial.
pub const F_CSUM: u64 = 1 << 0;
/// VIRTIO_NET_F_GUEST_CSUM: the driver accepts partially checksummed frames.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// VIRTIO_NET_F_MTU.
pub const F_MTU: u64 = 1 << 3;
/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_MRG_RXBUF.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// VIRTIO_NET_F_STATUS.
pub const F_STATUS: u64 = 1 << 16;
/// Feature bits the driver can handle.
const SUPPORTED: u64 = F_CSUM | F_GUEST_CSUM | F_MTU | F_MAC | F_MRG_RXBUF | F_STATUS | F_EVENT_IDX;
/// `probe.net.features` default: no offloads.
const DEFAULT_MASK: u64 = F_MTU | F_MAC | F_MRG_RXBUF | F_STATUS | F_EVENT_IDX;

/// virtio-net header size (virtio 1.x: `num_buffers` always present).
pub const HDR: usize = 12;
/// Header flag: checksum needed from `csum_start` (`csum_offset` into it).
const HDR_NEEDS_CSUM: u8 = 1;
/// Header flag: checksum already validated.
const HDR_DATA_VALID: u8 = 2;

/// Receive buffers: DMA offset 0 .. `TX_OFF`.
const RX_AREA: u64 = 0x4_0000;
/// Transmit buffers, 2 KiB each.
const TX_OFF: u64 = 0x4_0000;
const TX_STRIDE: u64 = 2048;
/// Scratch frame for merged receive buffers.
const FRAME_OFF: u64 = 0x8_0000;
/// Largest frame put together from merged buffers.
const FRAME_MAX: usize = 0x4000;
/// At most this many buffers per queue.
const MAX_BUFS: u16 = 128;

const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;
/// Ethertype of the `irq` check's frame (IEEE local experimental).
const ETH_PROBE: u16 = 0x88b5;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
/// The UDP echo port and the source port of everything the probe sends.
const ECHO_PORT: u16 = 7;
/// The UDP port `netflight` receives the host's numbered datagrams on.
const FLIGHT_PORT: u16 = 9;
/// Transmit requests `netflight` keeps published at once.
const FLIGHT_DEPTH: usize = 8;

/// Parameters of the `net` check.
struct NetParams {
    ip: [u8; 4],
    prefix: u8,
    peer: [u8; 4],
    peer_port: u16,
    serve_ms: u64,
    mask: u64,
    flood: u64,
    size: u64,
    rxbuf: u64,
}

/// Counters for the ok line.
#[derive(Default)]
struct Counters {
    rx: u64,
    tx: u64,
    arp: u64,
    icmp: u64,
    udp_echo: u64,
    bad_csum: u64,
    dropped: u64,
    /// Transmit used entries for a buffer that was not in flight (a request completed twice,
    /// or an unknown id).
    tx_twice: u64,
    /// `netflight`: numbered datagrams received on `FLIGHT_PORT`, the last number, and how
    /// many arrived out of order or again.
    flight_rx: u64,
    flight_last: u64,
    flight_again: u64,
}

/// A virtio-net device in use.
struct Net {
    dev: Dev,
    me: Me,
    peer: [u8; 4],
    peer_port: u16,
    peer_mac: Option<[u8; 6]>,
    mrg: bool,
    rx_size: u32,
    rx_stride: u64,
    n_rx: u16,
    n_tx: u16,
    tx_free: [u16; MAX_BUFS as usize],
    n_free: usize,
    /// Which transmit buffers the device has (published, not yet used).
    tx_busy: [bool; MAX_BUFS as usize],
    khz: u64,
    c: Counters,
}

/// Reads a big-endian u16.
fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// One's complement sum of `data` (big-endian 16-bit words) added to `sum`.
fn csum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a sum to 16 bits (not complemented).
fn csum_fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 pseudo-header sum for a UDP datagram of `len` bytes.
fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: u16) -> u64 {
    let s = csum_add(0, src);
    let s = csum_add(s, dst);
    s + u64::from(proto) + u64::from(len)
}

/// Parses `A.B.C.D`.
fn parse_ip(text: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = text.split(|&c| c == b'.');
    for b in ip.iter_mut() {
        *b = u8::try_from(parse_u64(parts.next()?)?).ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn write_ip(l: &mut Line, ip: &[u8; 4]) {
    for (i, b) in ip.iter().enumerate() {
        if i > 0 {
            l.s(".");
        }
        l.dec(u64::from(*b));
    }
}

fn write_mac(l: &mut Line, mac: &[u8; 6]) {
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            l.s(":");
        }
        l.hex2(*b);
    }
}

/// The device's MAC address (config bytes 0..6) when MAC was negotiated, else a fixed
/// locally administered one.
fn mac_of(dev: &Dev) -> [u8; 6] {
    if dev.features & F_MAC == 0 {
        return [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
    }
    core::array::from_fn(|i| dev.config8(i as u64))
}

/// The `irq` check's frame: a virtio-net header and a minimum-size frame of the local
/// experimental ethertype from and to the device's own MAC (nobody answers it). Returns
/// the length written at `addr`.
pub fn irq_test_frame(dev: &Dev, addr: u64) -> u32 {
    let mac = mac_of(dev);
    let b = vio::dma_slice(addr, HDR + 60);
    b.fill(0);
    b[HDR..HDR + 6].copy_from_slice(&mac);
    b[HDR + 6..HDR + 12].copy_from_slice(&mac);
    put16(b, HDR + 12, ETH_PROBE);
    b[HDR + 14..HDR + 23].copy_from_slice(b"PROBE-IRQ");
    (HDR + 60) as u32
}

impl Net {
    fn new(dev: Dev, p: &NetParams, khz: u64) -> Net {
        let mrg = dev.features & F_MRG_RXBUF != 0;
        let min = if mrg { 128 } else { 1526 };
        let rx_size = p.rxbuf.clamp(min, 4096) as u32;
        let rx_stride = u64::from(rx_size).div_ceil(64) * 64;
        let n_rx = dev.q[0].size.min(MAX_BUFS).min((RX_AREA / rx_stride) as u16);
        let n_tx = dev.q[1].size.min(MAX_BUFS);
        let mut net = Net {
            me: Me {
                mac: mac_of(&dev),
                ip: p.ip,
                tx_csum: dev.features & F_CSUM != 0,
            },
            peer: p.peer,
            peer_port: p.peer_port,
            peer_mac: None,
            mrg,
            rx_size,
            rx_stride,
            n_rx,
            n_tx,
            tx_free: [0; MAX_BUFS as usize],
            n_free: 0,
            tx_busy: [false; MAX_BUFS as usize],
            khz,
            c: Counters::default(),
            dev,
        };
        for i in 0..n_tx {
            net.tx_free[net.n_free] = n_tx - 1 - i;
            net.n_free += 1;
        }
        for i in 0..n_rx {
            net.post_rx(i);
        }
        net.dev.kick(0);
        net
    }

    fn rx_addr(&self, i: u16) -> u64 {
        vio::dma() + u64::from(i) * self.rx_stride
    }

    fn tx_addr(&self, i: u16) -> u64 {
        vio::dma() + TX_OFF + u64::from(i) * TX_STRIDE
    }

    /// Gives receive buffer `i` to the device (not notified).
    fn post_rx(&mut self, i: u16) {
        let a = self.rx_addr(i);
        self.dev.q[0].set_desc(i, a, self.rx_size, D_WRITE, 0);
        self.dev.q[0].publish(i);
    }

    /// A transmit used entry: its buffer is free again, if the device had it (else it is
    /// counted as completed twice).
    fn tx_done(&mut self, id: u32) {
        let i = id as usize;
        if id >= u32::from(self.n_tx) || !self.tx_busy[i] {
            self.c.tx_twice += 1;
            return;
        }
        self.tx_busy[i] = false;
        if self.n_free < usize::from(self.n_tx) {
            self.tx_free[self.n_free] = id as u16;
            self.n_free += 1;
        }
    }

    /// Takes back completed transmit buffers.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.dev.q[1].take() {
            self.tx_done(id);
        }
    }

    /// A free transmit buffer, waiting up to 1 s for one.
    fn tx_slot(&mut self) -> Result<u16, &'static str> {
        self.reclaim();
        let t0 = rdtsc();
        while self.n_free == 0 {
            if let Some((id, _)) = self.dev.poll_q(1, self.khz * 100) {
                self.tx_done(id);
            }
            if rdtsc().wrapping_sub(t0) > self.khz * 1000 {
                return Err("transmit buffers not returned within 1 s");
            }
        }
        self.n_free -= 1;
        Ok(self.tx_free[self.n_free])
    }

    /// Sends one frame built by `build` into the buffer after the header (it returns the
    /// frame length and, for UDP with CSUM offload, the checksum start). `kick`: notify now.
    fn send(
        &mut self,
        kick: bool,
        build: impl FnOnce(&mut [u8]) -> (usize, Option<u16>),
    ) -> Result<(), &'static str> {
        let slot = self.tx_slot()?;
        let a = self.tx_addr(slot);
        let b = vio::dma_slice(a, TX_STRIDE as usize);
        b[..HDR].fill(0);
        let (len, partial) = build(&mut b[HDR..]);
        if let Some(start) = partial {
            b[0] = HDR_NEEDS_CSUM;
            b[6..8].copy_from_slice(&start.to_le_bytes());
            b[8..10].copy_from_slice(&6u16.to_le_bytes());
        }
        self.dev.q[1].set_desc(slot, a, (HDR + len) as u32, 0, 0);
        self.tx_busy[usize::from(slot)] = true;
        self.dev.q[1].publish(slot);
        if kick {
            self.dev.kick(1);
        }
        self.c.tx += 1;
        Ok(())
    }

    /// Waits up to `cycles` for a received frame (reclaiming transmit buffers meanwhile)
    /// and handles it. Returns false on timeout.
    fn poll_once(&mut self, cycles: u64) -> Result<bool, &'static str> {
        match self.dev.poll_any(0b11, cycles) {
            None => Ok(false),
            Some((1, id, _)) => {
                self.tx_done(id);
                Ok(true)
            }
            Some((_, id, len)) => {
                self.receive(id, len)?;
                Ok(true)
            }
        }
    }

    /// A used receive buffer: put the frame together (merged buffers), re-post the
    /// buffers, handle the frame.
    fn receive(&mut self, id: u32, len: u32) -> Result<(), &'static str> {
        if id >= u32::from(self.n_rx) {
            return Err("receive used entry with an unknown id");
        }
        let first = id as u16;
        let len = (len as usize).min(self.rx_size as usize);
        let head = vio::dma_slice(self.rx_addr(first), self.rx_size as usize);
        let flags = head[0];
        let nbuf = if self.mrg {
            u16::from_le_bytes([head[10], head[11]]).max(1)
        } else {
            1
        };
        self.c.rx += 1;
        let frame = vio::dma_slice(vio::dma() + FRAME_OFF, FRAME_MAX);
        let mut flen = 0usize;
        let mut ok = len >= HDR;
        if ok {
            let part = &head[HDR..len];
            frame[..part.len()].copy_from_slice(part);
            flen = part.len();
        }
        self.post_rx(first);
        for _ in 1..nbuf {
            let deadline = rdtsc() + self.khz * 100;
            let next = loop {
                if let Some(e) = self.dev.q[0].take() {
                    break Some(e);
                }
                if rdtsc() > deadline {
                    break None;
                }
                core::hint::spin_loop();
            };
            let Some((nid, nlen)) = next else {
                return Err("merged receive buffers missing (num_buffers)");
            };
            if nid >= u32::from(self.n_rx) {
                return Err("receive used entry with an unknown id");
            }
            let nlen = (nlen as usize).min(self.rx_size as usize);
            let part = vio::dma_slice(self.rx_addr(nid as u16), nlen);
            if flen + nlen <= FRAME_MAX {
                frame[flen..flen + nlen].copy_from_slice(part);
                flen += nlen;
            } else {
                ok = false;
            }
            self.post_rx(nid as u16);
        }
        self.dev.kick(0);
        if !ok {
            self.c.dropped += 1;
            return Ok(());
        }
        let trusted = flags & (HDR_NEEDS_CSUM | HDR_DATA_VALID) != 0;
        self.handle(&frame[..flen], trusted)
    }

    /// One received Ethernet frame.
    fn handle(&mut self, f: &[u8], csum_trusted: bool) -> Result<(), &'static str> {
        if f.len() < 14 {
            self.c.dropped += 1;
            return Ok(());
        }
        let dst = &f[0..6];
        if dst != self.me.mac && dst != [0xff; 6] {
            return Ok(());
        }
        let src: [u8; 6] = f[6..12].try_into().unwrap();
        match be16(f, 12) {
            ETH_ARP => self.handle_arp(&f[14..]),
            ETH_IP => self.handle_ip(&src, &f[14..], csum_trusted),
            _ => Ok(()),
        }
    }

    fn handle_arp(&mut self, a: &[u8]) -> Result<(), &'static str> {
        if a.len() < 28 || be16(a, 0) != 1 || be16(a, 2) != ETH_IP || a[4] != 6 || a[5] != 4 {
            return Ok(());
        }
        let sha: [u8; 6] = a[8..14].try_into().unwrap();
        let spa: [u8; 4] = a[14..18].try_into().unwrap();
        let tpa: [u8; 4] = a[24..28].try_into().unwrap();
        if spa == self.peer {
            self.peer_mac = Some(sha);
        }
        if be16(a, 6) == 1 && tpa == self.me.ip {
            self.c.arp += 1;
            let me = self.me;
            self.send(true, |b| (me.arp(b, 2, &sha, &spa), None))?;
        }
        Ok(())
    }

    fn handle_ip(&mut self, src_mac: &[u8; 6], p: &[u8], trusted: bool) -> Result<(), &'static str> {
        if p.len() < 20 || p[0] >> 4 != 4 {
            return Ok(());
        }
        let ihl = usize::from(p[0] & 15) * 4;
        let total = usize::from(be16(p, 2));
        if ihl < 20 || total < ihl || total > p.len() {
            self.c.dropped += 1;
            return Ok(());
        }
        if csum_fold(csum_add(0, &p[..ihl])) != 0xffff {
            self.c.bad_csum += 1;
            return Ok(());
        }
        if p[16..20] != self.me.ip || be16(p, 6) & 0x3fff != 0 {
            return Ok(()); // not ours, or a fragment
        }
        let src: [u8; 4] = p[12..16].try_into().unwrap();
        let body = &p[ihl..total];
        match p[9] {
            PROTO_ICMP => self.handle_icmp(src_mac, &src, body),
            PROTO_UDP => self.handle_udp(src_mac, &src, body, trusted),
            _ => Ok(()),
        }
    }

    fn handle_icmp(&mut self, mac: &[u8; 6], src: &[u8; 4], m: &[u8]) -> Result<(), &'static str> {
        if m.len() < 8 || m[0] != 8 || m.len() > 1472 {
            return Ok(());
        }
        if csum_fold(csum_add(0, m)) != 0xffff {
            self.c.bad_csum += 1;
            return Ok(());
        }
        self.c.icmp += 1;
        let me = self.me;
        self.send(true, |b| (me.icmp_reply(b, mac, src, m), None))
    }

    fn handle_udp(
        &mut self,
        mac: &[u8; 6],
        src: &[u8; 4],
        u: &[u8],
        trusted: bool,
    ) -> Result<(), &'static str> {
        if u.len() < 8 {
            return Ok(());
        }
        let ulen = usize::from(be16(u, 4));
        if ulen < 8 || ulen > u.len() {
            self.c.dropped += 1;
            return Ok(());
        }
        let u = &u[..ulen];
        if !trusted && be16(u, 6) != 0 {
            let sum = csum_add(pseudo_sum(src, &self.me.ip, PROTO_UDP, ulen as u16), u);
            if csum_fold(sum) != 0xffff {
                self.c.bad_csum += 1;
                return Ok(());
            }
        }
        if be16(u, 2) == FLIGHT_PORT && u.len() >= 16 {
            let n = u64::from_be_bytes(u[8..16].try_into().unwrap());
            if self.c.flight_rx > 0 && n <= self.c.flight_last {
                self.c.flight_again += 1;
            }
            self.c.flight_rx += 1;
            self.c.flight_last = n;
            return Ok(());
        }
        if be16(u, 2) != ECHO_PORT {
            return Ok(());
        }
        let sport = be16(u, 0);
        let payload = &u[8..];
        if payload.len() > 1472 {
            return Ok(());
        }
        self.c.udp_echo += 1;
        let me = self.me;
        self.send(true, |b| {
            b[42..42 + payload.len()].copy_from_slice(payload);
            me.udp(b, mac, src, sport, payload.len())
        })
    }

    /// Resolves the peer's MAC: an ARP request every 200 ms, up to 2 s.
    fn resolve_peer(&mut self) -> Result<[u8; 6], &'static str> {
        for _ in 0..10 {
            let (peer, me) = (self.peer, self.me);
            self.send(true, |b| (me.arp(b, 1, &[0; 6], &peer), None))?;
            let t0 = rdtsc();
            while rdtsc().wrapping_sub(t0) < self.khz * 200 {
                if let Some(m) = self.peer_mac {
                    return Ok(m);
                }
                self.poll_once(self.khz * 20)?;
            }
        }
        self.peer_mac.ok_or("the peer did not answer ARP within 2 s")
    }

    /// Serves ARP, ICMP echo and UDP echo until `ms` have passed.
    fn serve(&mut self, ms: u64) -> Result<(), &'static str> {
        let t0 = rdtsc();
        let total = self.khz * ms;
        loop {
            let spent = rdtsc().wrapping_sub(t0);
            if spent >= total {
                return Ok(());
            }
            self.poll_once((total - spent).min(self.khz * 50))?;
        }
    }

    /// `netflight`'s traffic: numbered datagrams (8-byte big-endian number, then `size - 8`
    /// pattern bytes) to the peer, `FLIGHT_DEPTH` always published, while receiving the
    /// peer's numbered datagrams on `FLIGHT_PORT`, until a byte arrives on COM1 or `ms` have
    /// passed (an error). Then 500 ms more, and every transmit buffer must come back within
    /// 1 s. Returns (datagrams sent, received before the byte).
    fn flight(&mut self, ms: u64, size: usize, peer_mac: [u8; 6]) -> Result<(u64, u64), &'static str> {
        let me = self.me;
        let (peer, port) = (self.peer, self.peer_port);
        let t0 = rdtsc();
        let mut sent = 0u64;
        let mut byte_at: Option<(u64, u64)> = None;
        loop {
            let now = rdtsc();
            match byte_at {
                None if inb(LSR) & LSR_DR != 0 => {
                    let _ = inb(RBR_THR);
                    byte_at = Some((now, self.c.flight_rx));
                }
                None if now.wrapping_sub(t0) > self.khz * ms => return Err("no byte from the host"),
                Some((t, _)) if now.wrapping_sub(t) > self.khz * 500 => break,
                _ => {}
            }
            let in_flight = usize::from(self.n_tx) - self.n_free;
            if in_flight < FLIGHT_DEPTH && self.n_free > 0 {
                let seq = sent;
                self.send(true, |b| {
                    let p = &mut b[42..42 + size];
                    for (i, x) in p.iter_mut().enumerate() {
                        *x = (i as u8) ^ 0xa5;
                    }
                    p[..8].copy_from_slice(&seq.to_be_bytes());
                    me.udp(b, &peer_mac, &peer, port, size)
                })?;
                sent += 1;
            }
            self.poll_once(self.khz)?;
            if self.c.tx_twice > 0 {
                return Err("a transmit request completed twice");
            }
        }
        let deadline = rdtsc() + self.khz * 1000;
        while self.n_free < usize::from(self.n_tx) {
            self.poll_once(self.khz)?;
            if rdtsc() > deadline {
                return Err("transmit buffers not returned within 1 s");
            }
        }
        if self.c.tx_twice > 0 {
            return Err("a transmit request completed twice");
        }
        Ok((sent, byte_at.map_or(0, |(_, rx)| rx)))
    }

    /// Sends `n` datagrams with `size` payload bytes to the peer; (TSC cycles from the
    /// first send to the last completion).
    fn flood(&mut self, n: u64, size: usize, peer_mac: [u8; 6]) -> Result<u64, &'static str> {
        let me = self.me;
        let (peer, port) = (self.peer, self.peer_port);
        let t0 = rdtsc();
        let mut sent = 0u64;
        while sent < n {
            self.reclaim();
            if self.n_free == 0 {
                // Wait for the device to return some (bounded by tx_slot's 1 s).
                let s = self.tx_slot()?;
                self.tx_free[self.n_free] = s;
                self.n_free += 1;
            }
            while self.n_free > 0 && sent < n {
                let seq = sent;
                self.send(false, |b| {
                    let p = &mut b[42..42 + size];
                    for (i, x) in p.iter_mut().enumerate() {
                        *x = (i as u8) ^ 0x5a;
                    }
                    if size >= 8 {
                        p[..8].copy_from_slice(&seq.to_be_bytes());
                    }
                    me.udp(b, &peer_mac, &peer, port, size)
                })?;
                sent += 1;
            }
            self.dev.kick(1);
        }
        // Every buffer back.
        let deadline = rdtsc() + self.khz * 2000;
        while self.n_free < usize::from(self.n_tx) {
            self.reclaim();
            if rdtsc() > deadline {
                return Err("flood: transmit buffers not returned within 2 s");
            }
            core::hint::spin_loop();
        }
        Ok(rdtsc().wrapping_sub(t0))
    }
}

/// This end's addresses and offloads: what the frame builders need (a copy, so that a
/// builder does not borrow the driver).
#[derive(Clone, Copy)]
pub struct Me {
    mac: [u8; 6],
    ip: [u8; 4],
    tx_csum: bool,
}

impl Me {
    /// This end for `dev` (its MAC) at `ip`, without checksum offload.
    pub fn of(dev: &Dev, ip: [u8; 4]) -> Me {
        Me {
            mac: mac_of(dev),
            ip,
            tx_csum: false,
        }
    }

    /// Ethernet header into `b`.
    fn eth(&self, b: &mut [u8], dst: &[u8; 6], kind: u16) {
        b[0..6].copy_from_slice(dst);
        b[6..12].copy_from_slice(&self.mac);
        put16(b, 12, kind);
    }

    /// An ARP packet (op 1 request, broadcast; 2 reply to `tha`). Returns the frame length.
    pub fn arp(&self, b: &mut [u8], op: u16, tha: &[u8; 6], tpa: &[u8; 4]) -> usize {
        let dst = if op == 1 { [0xff; 6] } else { *tha };
        self.eth(b, &dst, ETH_ARP);
        let a = &mut b[14..42];
        put16(a, 0, 1);
        put16(a, 2, ETH_IP);
        a[4] = 6;
        a[5] = 4;
        put16(a, 6, op);
        a[8..14].copy_from_slice(&self.mac);
        a[14..18].copy_from_slice(&self.ip);
        a[18..24].copy_from_slice(if op == 1 { &[0; 6] } else { tha });
        a[24..28].copy_from_slice(tpa);
        b[42..60].fill(0);
        60
    }

    /// IPv4 header (20 bytes, DF, TTL 64) at `b[14..34]` for `payload` bytes.
    fn ipv4(&self, b: &mut [u8], proto: u8, dst: &[u8; 4], payload: usize) {
        let h = &mut b[14..34];
        h[0] = 0x45;
        h[1] = 0;
        put16(h, 2, (20 + payload) as u16);
        put16(h, 4, 0);
        put16(h, 6, 0x4000);
        h[8] = 64;
        h[9] = proto;
        put16(h, 10, 0);
        h[12..16].copy_from_slice(&self.ip);
        h[16..20].copy_from_slice(dst);
        let c = !csum_fold(csum_add(0, h));
        put16(h, 10, c);
    }

    /// A UDP datagram from port 7 to `dst:port` whose `payload` bytes are already at
    /// `b[42..]`. Returns (frame length, checksum start if left to the device).
    fn udp(
        &self,
        b: &mut [u8],
        dst_mac: &[u8; 6],
        dst: &[u8; 4],
        port: u16,
        payload: usize,
    ) -> (usize, Option<u16>) {
        let ulen = (8 + payload) as u16;
        self.eth(b, dst_mac, ETH_IP);
        self.ipv4(b, PROTO_UDP, dst, 8 + payload);
        put16(b, 34, ECHO_PORT);
        put16(b, 36, port);
        put16(b, 38, ulen);
        let pseudo = pseudo_sum(&self.ip, dst, PROTO_UDP, ulen);
        let len = (42 + payload).max(60);
        b[42 + payload..len].fill(0);
        if self.tx_csum {
            // VIRTIO_NET_HDR_F_NEEDS_CSUM: the device sums from csum_start on, including
            // the pseudo-header sum left in the checksum field.
            put16(b, 40, csum_fold(pseudo));
            return (len, Some(34));
        }
        put16(b, 40, 0);
        let mut c = !csum_fold(csum_add(pseudo, &b[34..42 + payload]));
        if c == 0 {
            c = 0xffff;
        }
        put16(b, 40, c);
        (len, None)
    }

    /// An ICMP echo reply to `dst` for the request `m`. Returns the frame length.
    fn icmp_reply(&self, b: &mut [u8], dst_mac: &[u8; 6], dst: &[u8; 4], m: &[u8]) -> usize {
        self.eth(b, dst_mac, ETH_IP);
        self.ipv4(b, PROTO_ICMP, dst, m.len());
        let r = &mut b[34..34 + m.len()];
        r.copy_from_slice(m);
        r[0] = 0;
        r[2] = 0;
        r[3] = 0;
        let c = !csum_fold(csum_add(0, r));
        put16(r, 2, c);
        let len = (34 + m.len()).max(60);
        b[34 + m.len()..len].fill(0);
        len
    }
}

impl Ctx<'_> {
    fn net_params(&self) -> Result<NetParams, &'static str> {
        let p = &self.params;
        let ip_text = p.get(b"probe.net.ip=").unwrap_or(b"192.0.2.2/24");
        let (ip_s, prefix) = match ip_text.iter().position(|&c| c == b'/') {
            Some(i) => (
                &ip_text[..i],
                parse_u64(&ip_text[i + 1..]).ok_or("bad probe.net.ip= prefix")?,
            ),
            None => (ip_text, 24),
        };
        let ip = parse_ip(ip_s).ok_or("bad probe.net.ip=")?;
        let peer_text = p.get(b"probe.net.peer=").unwrap_or(b"192.0.2.1:9000");
        let colon = peer_text
            .iter()
            .position(|&c| c == b':')
            .ok_or("probe.net.peer= needs :PORT")?;
        let peer = parse_ip(&peer_text[..colon]).ok_or("bad probe.net.peer= address")?;
        let peer_port = parse_u64(&peer_text[colon + 1..])
            .and_then(|v| u16::try_from(v).ok())
            .ok_or("bad probe.net.peer= port")?;
        let num = |k: &[u8], d: u64| p.num(k, d).map_err(|_| "bad probe.net.* number");
        let size = num(b"probe.net.size=", 1024)?;
        if prefix > 32 || !(8..=1472).contains(&size) {
            return Err("probe.net prefix > 32 or probe.net.size outside 8..1472");
        }
        Ok(NetParams {
            ip,
            prefix: prefix as u8,
            peer,
            peer_port,
            serve_ms: num(b"probe.net.serve_ms=", 0)?,
            mask: num(b"probe.net.features=", DEFAULT_MASK)?,
            flood: num(b"probe.net.flood=", 0)?,
            size,
            rxbuf: num(b"probe.net.rxbuf=", 2048)?,
        })
    }

    /// Opens the first virtio-net device for `check` with `net_params`. On failure the
    /// check's line is printed and `Err` holds what the check returns: a missing device is a
    /// skip (`false`) if `missing_is_skip`, else a failure.
    fn open_net(
        &mut self,
        check: &'static str,
        missing_is_skip: bool,
    ) -> Result<(Net, NetParams, vio::Transport), bool> {
        let np = match self.net_params() {
            Ok(p) => p,
            Err(why) => {
                Line::new(check).s("FAIL ").s(why).end();
                return Err(true);
            }
        };
        let Some(f) = self.virtio_found(check) else {
            return Err(true);
        };
        let Some((slot, t)) = f.devs[..f.n]
            .iter()
            .enumerate()
            .find(|(_, t)| matches!(Dev::identify(t.base), Ok((2, NET_ID, _))))
        else {
            if missing_is_skip {
                Line::new(check).s("skip no virtio-net device").end();
                return Err(false);
            }
            Line::new(check).s("FAIL no virtio-net device").end();
            return Err(true);
        };
        let t = *t;
        let khz = self.tsc_khz_or_guess();
        let want = np.mask & SUPPORTED;
        let r = self
            .open_virtio(&t, slot, want, 2)
            .map_err(|(why, _)| why)
            .and_then(|dev| {
                if dev.nq < 2 || dev.q[1].size == 0 {
                    return Err("transmit queue missing");
                }
                Ok(Net::new(dev, &np, khz))
            });
        match r {
            Ok(n) => Ok((n, np, t)),
            Err(why) => {
                Line::new(check).s("FAIL ").s(why).s(" base=").hex(t.base).end();
                self.close_virtio(&t);
                Err(true)
            }
        }
    }

    /// `netflight`: lives across a snapshot with network traffic in flight both ways. Resolves
    /// the peer (`probe.net.peer`), then sends it numbered datagrams of `probe.net.size`
    /// bytes, 8 transmit requests always published, while counting the numbered datagrams
    /// the peer sends to UDP port 9, until a byte arrives on COM1 (`probe.snapshot_ms`); the
    /// snapshot is taken meanwhile and the byte sent to the restored VM. Every transmit
    /// request must complete exactly once (a second used entry fails, a lost one times out),
    /// the peer's datagrams must arrive in order and never twice, and at least one must
    /// arrive after the byte (the restored device receives). The peer checks that it got
    /// every number below `sent=` exactly once.
    pub(crate) fn netflight(&mut self) -> bool {
        let ms = match self.params.num(b"probe.snapshot_ms=", 60_000) {
            Ok(v) => v,
            Err(_) => {
                Line::new("netflight").s("FAIL bad probe.snapshot_ms=").end();
                return true;
            }
        };
        let (mut net, np, t) = match self.open_net("netflight", false) {
            Ok(x) => x,
            Err(failed) => return failed,
        };
        while inb(LSR) & LSR_DR != 0 {
            let _ = inb(RBR_THR);
        }
        let r = net.resolve_peer().and_then(|peer_mac| {
            Line::new("netflight").s("running ms=").dec(ms).end();
            net.flight(ms, np.size.max(16) as usize, peer_mac)
        });
        let mut l = Line::new("netflight");
        let failed = match r {
            Ok((sent, rx_before)) => {
                let after = net.c.flight_rx - rx_before;
                if net.c.flight_again > 0 {
                    l.s("FAIL datagrams from the peer arrived out of order or twice");
                } else if after == 0 {
                    l.s("FAIL no datagram from the peer after the byte");
                } else {
                    l.s("ok");
                }
                l.s(" sent=").dec(sent).s(" rx=").dec(net.c.flight_rx).s(" rx_after=").dec(after);
                net.c.flight_again > 0 || after == 0
            }
            Err(why) => {
                l.s("FAIL ").s(why);
                true
            }
        };
        l.s(" again=")
            .dec(net.c.flight_again)
            .s(" tx_twice=")
            .dec(net.c.tx_twice)
            .end();
        self.close_virtio(&t);
        failed
    }

    /// `net`: ARP for the peer, a hello datagram, an optional flood, then serving ARP,
    /// ICMP echo and UDP echo (port 7) for `probe.net.serve_ms`. The first virtio-net device
    /// only.
    pub(crate) fn net(&mut self) -> bool {
        let (mut net, np, t) = match self.open_net("net", true) {
            Ok(x) => x,
            Err(failed) => return failed,
        };
        let khz = net.khz;
        let mut flood_cycles = None;
        let r = (|| {
            let peer_mac = net.resolve_peer()?;
            let (me, peer, port) = (net.me, net.peer, net.peer_port);
            let mac = me.mac;
            net.send(true, |b| {
                let mut msg = [0u8; 40];
                let hello = b"PROBE-NET-HELLO mac=";
                msg[..hello.len()].copy_from_slice(hello);
                let mut n = hello.len();
                for (i, x) in mac.iter().enumerate() {
                    if i > 0 {
                        msg[n] = b':';
                        n += 1;
                    }
                    let d = |v: u8| if v < 10 { b'0' + v } else { b'a' + v - 10 };
                    msg[n] = d(x >> 4);
                    msg[n + 1] = d(x & 15);
                    n += 2;
                }
                b[42..42 + n].copy_from_slice(&msg[..n]);
                me.udp(b, &peer_mac, &peer, port, n)
            })?;
            if np.flood > 0 {
                flood_cycles = Some(net.flood(np.flood, np.size as usize, peer_mac)?);
            }
            net.serve(np.serve_ms)
        })();
        let mut l = Line::new("net");
        match r {
            Ok(()) => l.s("ok"),
            Err(why) => l.s("FAIL ").s(why),
        };
        l.s(" mac=");
        write_mac(&mut l, &net.me.mac);
        l.s(" ip=");
        write_ip(&mut l, &net.me.ip);
        l.s(" prefix=").dec(u64::from(np.prefix)).s(" peer=");
        write_ip(&mut l, &net.peer);
        l.s(":").dec(u64::from(net.peer_port)).s(" peer_mac=");
        match net.peer_mac {
            Some(m) => write_mac(&mut l, &m),
            None => {
                l.s("none");
            }
        }
        l.s(" rx=")
            .dec(net.c.rx)
            .s(" tx=")
            .dec(net.c.tx)
            .s(" arp=")
            .dec(net.c.arp)
            .s(" icmp=")
            .dec(net.c.icmp)
            .s(" udp_echo=")
            .dec(net.c.udp_echo)
            .s(" bad_csum=")
            .dec(net.c.bad_csum)
            .s(" dropped=")
            .dec(net.c.dropped);
        if let Some(c) = flood_cycles {
            let c = c.max(1);
            let n = np.flood;
            l.s(" flood=")
                .dec(n)
                .s(" size=")
                .dec(np.size)
                .s(" pps=")
                .dec((u128::from(n) * u128::from(khz) * 1000 / u128::from(c)) as u64)
                .s(" mbit_s=")
                .dec(
                    (u128::from(n) * u128::from(np.size) * 8 * u128::from(khz) / u128::from(c)
                        / 1000) as u64,
                );
        }
        let feat = net.dev.features;
        let yn = |b: u64| if feat & b != 0 { "yes" } else { "no" };
        l.s(" features=")
            .hex(feat)
            .s(" mrg_rxbuf=")
            .s(yn(F_MRG_RXBUF))
            .s(" csum=")
            .s(yn(F_CSUM))
            .s(" guest_csum=")
            .s(yn(F_GUEST_CSUM))
            .s(" rxbuf=")
            .dec(u64::from(net.rx_size))
            .s(" mtu=");
        if feat & F_MTU != 0 {
            l.dec(u64::from(net.dev.config16(10)));
        } else {
            l.s("none");
        }
        l.s(" link=");
        if feat & F_STATUS != 0 {
            l.s(if net.dev.config16(6) & 1 != 0 { "up" } else { "down" });
        } else {
            l.s("unknown");
        }
        l.s(" base=").hex(t.base);
        if self.tsc_khz.is_none() {
            l.s(" tsc_khz=unknown");
        }
        self.irq_suffix(&mut l, &net.dev);
        l.end();
        self.close_virtio(&t);
        r.is_err()
    }
}
