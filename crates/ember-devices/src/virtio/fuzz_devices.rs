//! One harness for the fuzz targets of virtio-net, virtio-vsock, virtio-balloon and virtio-rng
//! (`fuzz/fuzz_targets/virtio_{net,vsock,balloon,rng}.rs`): an input is a sequence of guest and
//! host operations on a device behind its [`MmioTransport`], in the guest memory of the other
//! virtio harnesses (two 64 KiB regions with a hole, [`super::fuzz::RAM`]).
//!
//! Each operation is a control byte (bits 0..=2: the operation, bits 3..=7: its argument `a`)
//! and operands:
//!
//! * 0: a chain on queue `a % queues`: a byte `b` (`1 + b % 4` descriptors, descriptor `i`
//!   device-writable if bit `4 + i` of `b` is set), then per descriptor a `u32` address folded
//!   into `[0x1000, 0x30000)` (hole included; the rings below 0x1000 are left alone, so that
//!   the used ring the checks read is the device's) and a `u16` length;
//! * 1: the event loop handles queue `a % queues`'s notification;
//! * 2: the event loop handles host descriptor `a % host descriptors`;
//! * 3: up to 64 bytes (length byte, data) into guest memory at `0x1000 + 3 * u16`;
//! * 4: a host action: net: the peer sends a frame (length `u16 % 70000`, header from the
//!   input); vsock: a host program connects and writes a line or bytes, or a host socket
//!   is read, written or closed; balloon: nothing; rng: nothing;
//! * 5: the driver writes a raw available index (`u16`) on queue `a % queues`;
//! * 6: a well-formed request: net: a transmit frame with a virtio-net header from the input;
//!   vsock: a packet with header fields from the input (ports from a small set so they meet);
//!   balloon: a PFN list (inflate or deflate), a statistics buffer or a reported range;
//!   rng: a writable buffer;
//! * 7: a driver reset and a new handshake with the features masked by a `u64`.
//!
//! Invariants, after every operation: no panic; MagicValue reads back; every used element
//! names a descriptor inside its table and a length within what the device may write; the
//! device's own bounds hold (net: frames reaching the peer are header plus at most
//! [`MAX_FRAME_LEN`](super::net::MAX_FRAME_LEN) bytes; vsock: at most
//! [`MAX_CONNECTIONS`](super::vsock::MAX_CONNECTIONS) connections).
#![allow(
    clippy::cast_possible_truncation,
    reason = "fuzz fixtures: guest addresses, sizes and register offsets are small, known values"
)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::balloon::{Balloon, BalloonConfig, Discard};
use super::fuzz::{FixtureError, FuzzStats, RAM};
use super::net::{datagram_pair, Net, NetConfig, MAX_FRAME_LEN};
use super::rng::Rng;
use super::testing::{self, Buf, GuestQueue};
use super::vsock::packet::{Header, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::vsock::Vsock;
use super::GuestRam;
use super::{regs, MmioTransport, MMIO_MAGIC, QUEUE_NOTIFY_OFFSET};
use crate::rate_limiter::{RateLimiter, TokenBucketConfig};
use crate::EventFdTrigger;

/// The device a run drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// virtio-net on a datagram socket.
    Net,
    /// virtio-vsock on Unix sockets in a temporary directory.
    Vsock,
    /// virtio-balloon with statistics and free page reporting.
    Balloon,
    /// virtio-rng with a rate limiter.
    Rng,
}

/// Guest CID of the vsock harness.
const CID: u64 = 3;
/// Entries of every queue.
const QSIZE: u16 = 16;
/// Host ports the vsock harness listens on (`<uds>_<port>`), and guest ports it uses.
const PORTS: [u32; 4] = [1, 2, 52, 1024];
/// Most host sockets the vsock harness opens.
const MAX_HOST_SOCKETS: usize = 8;

enum Host {
    Net(UnixDatagram),
    Vsock {
        dir: TempDir,
        listeners: Vec<UnixListener>,
        sockets: Vec<UnixStream>,
    },
    None,
}

/// A device of one [`Kind`] behind its MMIO transport, handshaken, with the harness's host
/// side (a datagram peer, vsock listeners): what [`drive`] runs inputs against. Made by
/// [`fixture`], so that the set-up (sockets, a temporary directory: the host's work, not the
/// device's) can happen on one thread and the input run on another, under the seccomp filter
/// of the thread that runs devices, as the fuzz targets do.
pub struct Fixture {
    kind: Kind,
    mem: GuestRam,
    t: MmioTransport<GuestRam>,
    queues: Vec<GuestQueue>,
    host: Host,
    stats: FuzzStats,
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }
}

/// A port from a small set: the harness's listening ports (below 128), or one of the first
/// host ports the device gives host-initiated connections.
fn port(b: u8) -> u32 {
    if b < 128 {
        PORTS[usize::from(b) % 4]
    } else {
        (1 << 30) + u32::from(b - 128) % 4
    }
}

/// Queue `i`'s rings (in the first region, below the data).
fn queue_base(i: usize) -> GuestAddress {
    GuestAddress(0x400 * i as u64)
}

/// Where op 6 builds its requests (second region).
const REQ: u64 = 0x2_0000;

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Sets up a [`Fixture`] of `kind`.
pub fn fixture(kind: Kind) -> Result<Fixture, FixtureError> {
    let mem = ember_memory::ram_from_ranges(&RAM, ember_memory::DirtyBitmap::Off)?;
    let irq = EventFdTrigger::new()?;
    let (device, host): (Box<dyn super::VirtioDevice<GuestRam>>, Host) = match kind {
        Kind::Net => {
            let (dev, peer) = datagram_pair()?;
            let limiter = RateLimiter::new(
                Some(TokenBucketConfig {
                    size: 1 << 20,
                    one_time_burst: 0,
                    refill_time: Duration::from_millis(1),
                }),
                None,
            )?;
            let net = Net::new(
                dev,
                NetConfig {
                    mac: [2, 0, 0, 0, 0, 1],
                    mtu: Some(1500),
                    offload: true,
                },
                RateLimiter::unlimited()?,
                limiter,
            )?;
            (Box::new(net), Host::Net(peer))
        }
        Kind::Vsock => {
            let dir = TempDir::new_with_prefix("/tmp/ember-fuzz-vsock-")?;
            let uds = dir.as_path().join("v");
            let mut listeners = Vec::new();
            for p in PORTS {
                let l = UnixListener::bind(format!("{}_{p}", uds.display()))?;
                l.set_nonblocking(true)?;
                listeners.push(l);
            }
            let dev = Vsock::new(CID, &uds)?;
            (
                Box::new(dev),
                Host::Vsock {
                    dir,
                    listeners,
                    sockets: Vec::new(),
                },
            )
        }
        Kind::Balloon => {
            let b = Balloon::new(BalloonConfig {
                target_pages: 8,
                stats_interval: Some(Duration::from_millis(1)),
                deflate_on_oom: true,
                free_page_reporting: true,
                discard: Discard::DontNeed,
            })?;
            (Box::new(b), Host::None)
        }
        Kind::Rng => {
            let limiter = RateLimiter::new(
                Some(TokenBucketConfig {
                    size: 8192,
                    one_time_burst: 4096,
                    refill_time: Duration::from_millis(1),
                }),
                None,
            )?;
            (Box::new(Rng::new(limiter)), Host::None)
        }
    };
    let t = MmioTransport::new(device, mem.clone(), irq)?;
    let mut fx = Fixture {
        kind,
        mem,
        t,
        queues: Vec::new(),
        host,
        stats: FuzzStats::default(),
    };
    fx.handshake(u64::MAX)?;
    Ok(fx)
}

impl Fixture {
    fn queue_count(&self) -> usize {
        match self.kind {
            Kind::Net => 2,
            Kind::Vsock => 3,
            Kind::Balloon => 4,
            Kind::Rng => 1,
        }
    }

    fn handshake(&mut self, features: u64) -> Result<(), FixtureError> {
        let mut n = self.queue_count();
        if self.kind == Kind::Balloon {
            // Only the queues of accepted features exist.
            let offered = testing::read_device_features(&mut self.t) & features;
            n = 2
                + usize::from(offered & (1 << super::balloon::F_STATS_VQ) != 0)
                + usize::from(offered & (1 << super::balloon::F_REPORTING) != 0);
        }
        self.queues = (0..n)
            .map(|i| GuestQueue::new(&self.mem, QSIZE, queue_base(i)))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&GuestQueue> = self.queues.iter().collect();
        // A refused handshake (features without VERSION_1) is the input's business.
        let _ = testing::driver_init(&mut self.t, &refs, Some(features));
        Ok(())
    }

    fn notify(&mut self, q: usize) {
        testing::write_reg(&mut self.t, QUEUE_NOTIFY_OFFSET, q as u32);
        self.t.process_notification(q);
    }

    fn add_chain(&mut self, q: usize, bufs: &[Buf]) {
        if let Some(queue) = self.queues.get_mut(q) {
            let _ = queue.add_chain(bufs);
        }
    }

    /// Op 4.
    fn host_action(&mut self, a: u8, c: &mut Cursor<'_>) {
        match &mut self.host {
            Host::Net(peer) => {
                let len = usize::from(c.u16()) % 70_000;
                let mut frame = c.take(16).to_vec();
                frame.resize(len, 0x55);
                let _ = peer.send(&frame);
            }
            Host::Vsock {
                dir,
                listeners,
                sockets,
            } => match a % 4 {
                0 if sockets.len() < MAX_HOST_SOCKETS => {
                    if let Ok(s) = UnixStream::connect(dir.as_path().join("v")) {
                        let _ = s.set_nonblocking(true);
                        let line = match c.u8() % 3 {
                            0 => format!("CONNECT {}\n", PORTS[usize::from(c.u8()) % 4]),
                            1 => String::from_utf8_lossy(c.take(40)).into_owned(),
                            _ => format!("CONNECT {}\nearly", PORTS[usize::from(c.u8()) % 4]),
                        };
                        let _ = (&s).write(line.as_bytes());
                        sockets.push(s);
                    }
                }
                1 => {
                    for l in listeners.iter() {
                        while sockets.len() < MAX_HOST_SOCKETS {
                            let Ok((s, _)) = l.accept() else { break };
                            let _ = s.set_nonblocking(true);
                            sockets.push(s);
                        }
                    }
                }
                2 => {
                    let i = usize::from(c.u8());
                    let n = usize::from(c.u16()) % 70_000;
                    if let Some(s) = sockets.get(i % sockets.len().max(1)) {
                        if c.u8() & 1 == 0 {
                            let data = vec![0x61u8; n];
                            let _ = (&*s).write(&data);
                        } else {
                            let mut buf = vec![0u8; n];
                            let _ = (&*s).read(&mut buf);
                        }
                    }
                }
                _ => {
                    let i = usize::from(c.u8());
                    if !sockets.is_empty() {
                        let s = sockets.swap_remove(i % sockets.len());
                        if i & 0x80 != 0 {
                            let _ = s.shutdown(std::net::Shutdown::Write);
                            sockets.push(s);
                        }
                    }
                }
            },
            Host::None => {}
        }
    }

    /// Op 6.
    fn request(&mut self, a: u8, c: &mut Cursor<'_>) {
        match self.kind {
            Kind::Net => {
                let hdr = c.bytes::<12>();
                let len = usize::from(c.u16()) % 2000;
                let mut frame = hdr.to_vec();
                frame.extend(std::iter::repeat_n(0xab, len));
                let _ = self.mem.write_slice(&frame, GuestAddress(REQ));
                self.add_chain(1, &[Buf::readable(REQ, frame.len() as u32)]);
            }
            Kind::Vsock => {
                let h = Header {
                    src_cid: if a & 1 == 0 { CID } else { u64::from(c.u8()) },
                    dst_cid: HOST_CID,
                    src_port: port(c.u8()),
                    dst_port: port(c.u8()),
                    len: 0,
                    kind: if a & 2 == 0 {
                        TYPE_STREAM
                    } else {
                        u16::from(c.u8())
                    },
                    op: u16::from(c.u8() % 9),
                    flags: u32::from(c.u8() % 4),
                    buf_alloc: c.u32(),
                    fwd_cnt: c.u32(),
                };
                let payload_len = usize::from(c.u16()) % 0x4000;
                let mut h = h;
                h.len = payload_len as u32;
                let mut bytes = h.encode().to_vec();
                bytes.resize(HDR_LEN + payload_len, 0x62);
                let _ = self.mem.write_slice(&bytes, GuestAddress(REQ));
                self.add_chain(1, &[Buf::readable(REQ, bytes.len() as u32)]);
            }
            Kind::Balloon => {
                let q = usize::from(a) % self.queues.len().max(1);
                let n = usize::from(c.u8()) % 64;
                let mut list = Vec::new();
                for _ in 0..n {
                    // PFNs mostly in RAM (both regions), some anywhere.
                    let v = c.u32();
                    let pfn = if v & 0x8000_0000 == 0 { v % 0x30 } else { v };
                    list.extend_from_slice(&pfn.to_le_bytes());
                }
                let _ = self.mem.write_slice(&list, GuestAddress(REQ));
                let writable = q == 3;
                let len = if writable { 0x1000 } else { list.len() as u32 };
                let addr = if writable { 0x2_1000 } else { REQ };
                self.add_chain(
                    q,
                    &[Buf {
                        addr,
                        len,
                        writable,
                    }],
                );
            }
            Kind::Rng => {
                let len = u32::from(c.u16());
                self.add_chain(0, &[Buf::writable(REQ, len % 0x1_0000)]);
            }
        }
    }

    fn invariants(&mut self) -> bool {
        let mut ok = testing::read_reg(&mut self.t, regs::MAGIC_VALUE) == MMIO_MAGIC;
        let max_len = match self.kind {
            Kind::Net => MAX_FRAME_LEN as u32,
            Kind::Vsock => (HDR_LEN + super::vsock::packet::MAX_PAYLOAD) as u32,
            Kind::Balloon => 0,
            Kind::Rng => super::rng::MAX_REQUEST_BYTES,
        };
        for q in &mut self.queues {
            while let Some((id, len)) = q.pop_used() {
                if id >= u32::from(QSIZE) || len > max_len.max(4) {
                    ok = false;
                }
                self.stats.ok_requests += 1;
            }
        }
        if let Host::Net(peer) = &self.host {
            let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
            while let Ok(n) = peer.recv(&mut buf) {
                if !(12..=MAX_FRAME_LEN).contains(&n) {
                    ok = false;
                }
            }
        }
        ok
    }
}

/// Runs one input against a device of `kind` (format in the module docs).
pub fn run(kind: Kind, input: &[u8]) -> Result<FuzzStats, FixtureError> {
    let mut fx = fixture(kind)?;
    drive(&mut fx, input)
}

/// Runs one input (format in the module docs) against `fx`; its counts of this input.
pub fn drive(fx: &mut Fixture, input: &[u8]) -> Result<FuzzStats, FixtureError> {
    fx.stats = FuzzStats::default();
    let mut c = Cursor(input);
    while !c.0.is_empty() {
        let ctl = c.u8();
        let a = ctl >> 3;
        fx.stats.ops += 1;
        let nq = fx.queues.len().max(1);
        match ctl & 7 {
            0 => {
                let b = c.u8();
                let n = 1 + usize::from(b % 4);
                let mut bufs = Vec::with_capacity(n);
                for i in 0..n {
                    let addr = 0x1000 + u64::from(c.u32() % 0x2_f000);
                    let len = u32::from(c.u16());
                    bufs.push(Buf {
                        addr,
                        len,
                        writable: (b >> (4 + i)) & 1 != 0,
                    });
                }
                fx.add_chain(usize::from(a) % nq, &bufs);
            }
            1 => fx.notify(usize::from(a) % nq),
            2 => {
                let n = fx.t.host_fds().len().max(1);
                fx.t.process_host_event(usize::from(a) % n);
            }
            3 => {
                let len = usize::from(c.u8() % 65);
                let at = 0x1000 + u64::from(c.u16()) * 3;
                let data = c.take(len).to_vec();
                let _ = fx.mem.write_slice(&data, GuestAddress(at));
            }
            4 => fx.host_action(a, &mut c),
            5 => {
                let idx = c.u16();
                if let Some(q) = fx.queues.get(usize::from(a) % nq) {
                    let _ = q.set_avail_idx(idx);
                }
            }
            6 => fx.request(a, &mut c),
            _ => {
                testing::write_reg(&mut fx.t, regs::STATUS, 0);
                let features = c.u64() | super::VIRTIO_F_VERSION_1;
                fx.handshake(features)?;
            }
        }
        if !fx.invariants() {
            fx.stats.violations += 1;
        }
    }
    if let Host::Vsock { .. } = fx.host {
        // Drain what the host side still owes, then check the connection bound.
        fx.t.process_host_event(0);
    }
    if !fx.invariants() {
        fx.stats.violations += 1;
    }
    Ok(fx.stats)
}

/// Seed inputs per kind: well-formed exchanges the device completes.
pub fn seeds(kind: Kind) -> Vec<(String, Vec<u8>)> {
    let op = |code: u8, a: u8| (a << 3) | code;
    let mut out = Vec::new();
    match kind {
        Kind::Net => {
            // RX buffers, a frame from the peer, the backend event; a TX frame, notified.
            let mut v = Vec::new();
            for i in 0..4u32 {
                v.extend_from_slice(&[op(0, 0), 0x10]);
                v.extend_from_slice(&(0x2_8000 + i * 0x800).to_le_bytes());
                v.extend_from_slice(&0x800u16.to_le_bytes());
            }
            v.push(op(1, 0));
            v.push(op(4, 0));
            v.extend_from_slice(&100u16.to_le_bytes());
            v.extend_from_slice(&[0u8; 16]);
            v.push(op(2, 0));
            v.push(op(6, 1));
            v.extend_from_slice(&[0u8; 12]);
            v.extend_from_slice(&60u16.to_le_bytes());
            v.push(op(1, 1));
            out.push(("rx-and-tx".into(), v.clone()));
            let mut r = v;
            r.push(op(7, 0));
            r.extend_from_slice(&(!(1u64 << 15)).to_le_bytes());
            r.extend_from_slice(&[op(0, 0), 0x10, 0, 0x80, 2, 0, 0, 0x8]);
            r.push(op(1, 0));
            r.push(op(4, 0));
            r.extend_from_slice(&3000u16.to_le_bytes());
            r.extend_from_slice(&[0u8; 16]);
            r.push(op(2, 0));
            out.push(("reset-without-mergeable".into(), r));
        }
        Kind::Vsock => {
            let rx_buffers = |v: &mut Vec<u8>| {
                for i in 0..4u32 {
                    v.extend_from_slice(&[op(0, 0), 0x10]);
                    v.extend_from_slice(&(0x2_8000 + i * 0x1000).to_le_bytes());
                    v.extend_from_slice(&0x1000u16.to_le_bytes());
                }
                v.push(op(1, 0));
            };
            // A packet from the guest: ports (indices), op, flags, buf_alloc, fwd_cnt, length.
            let packet = |v: &mut Vec<u8>, src: u8, dst: u8, operation: u8, flags: u8, len: u16| {
                v.push(op(6, 0));
                v.extend_from_slice(&[src, dst, operation, flags]);
                v.extend_from_slice(&0x4_0000u32.to_le_bytes());
                v.extend_from_slice(&0u32.to_le_bytes());
                v.extend_from_slice(&len.to_le_bytes());
                v.push(op(1, 1));
            };
            // The guest connects from port 1 to host port 52, sends 5 bytes, the host reads
            // them and answers, the guest shuts down.
            let mut v = Vec::new();
            rx_buffers(&mut v);
            packet(&mut v, 0, 2, 1, 0, 0);
            v.push(op(4, 1));
            packet(&mut v, 0, 2, 5, 0, 5);
            v.extend_from_slice(&[op(4, 2), 0, 16, 0, 1]);
            v.extend_from_slice(&[op(4, 2), 0, 16, 0, 0]);
            v.push(op(2, 0));
            packet(&mut v, 0, 2, 4, 3, 0);
            out.push(("guest-connect".into(), v));
            // A host program connects to guest port 52; the guest accepts (from 52 to the
            // first host port) and sends data; the host closes.
            let mut h = Vec::new();
            rx_buffers(&mut h);
            h.extend_from_slice(&[op(4, 0), 0, 2]);
            h.push(op(2, 0));
            packet(&mut h, 2, 128, 2, 0, 0);
            packet(&mut h, 2, 128, 5, 0, 100);
            h.extend_from_slice(&[op(4, 3), 0]);
            h.push(op(2, 0));
            out.push(("host-connect".into(), h));
        }
        Kind::Balloon => {
            let mut v = Vec::new();
            v.push(op(6, 0));
            v.push(16);
            for i in 0..16u32 {
                v.extend_from_slice(&(i + 0x20).to_le_bytes());
            }
            v.push(op(1, 0));
            v.push(op(6, 2));
            v.push(3);
            v.extend_from_slice(&[4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
            v.push(op(1, 2));
            v.push(op(2, 0));
            v.push(op(6, 3));
            v.push(0);
            v.push(op(1, 3));
            out.push(("inflate-stats-report".into(), v));
        }
        Kind::Rng => {
            let mut v = Vec::new();
            for len in [16u16, 4096, 0xffff] {
                v.push(op(6, 0));
                v.extend_from_slice(&len.to_le_bytes());
            }
            v.push(op(1, 0));
            v.push(op(2, 0));
            out.push(("three-requests".into(), v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::xorshift as rng;

    const KINDS: [Kind; 4] = [Kind::Net, Kind::Vsock, Kind::Balloon, Kind::Rng];

    #[test]
    fn seeds_complete_requests() {
        for kind in KINDS {
            for (name, input) in seeds(kind) {
                let s = run(kind, &input).unwrap();
                assert_eq!(s.violations, 0, "{kind:?} {name}: {s:?}");
                assert!(s.ok_requests >= 1, "{kind:?} {name}: {s:?}");
            }
        }
    }

    #[test]
    fn random_inputs_keep_the_invariants() {
        for kind in KINDS {
            for seed in 0..60u64 {
                let mut next = rng(seed.wrapping_add(5).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let len = usize::from(next()) * 2;
                let input: Vec<u8> = (0..len).map(|_| next()).collect();
                let s = run(kind, &input).unwrap();
                assert_eq!(s.violations, 0, "{kind:?} seed {seed}: {s:?}");
            }
        }
    }
}
