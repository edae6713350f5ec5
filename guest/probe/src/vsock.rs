//! The `vsock` check: a virtio-vsock driver (device type 19; queues rx 0, tx 1, event 2)
//! with one stream connection at a time and credit-based flow control (virtio 1.2,
//! section 5.10).
//!
//! Every packet is a 44-byte little-endian header (`src_cid u64, dst_cid u64, src_port u32,
//! dst_port u32, len u32, type u16, op u16, flags u32, buf_alloc u32, fwd_cnt u32`) and
//! `len` bytes of payload. Receive buffers are two descriptors (header, 4 KiB payload), as
//! are transmitted packets with a payload (header only otherwise): the layout every device
//! implementation accepts, including those that expect the header in a descriptor of its
//! own.
//!
//! Flow control: the probe advertises `BUF_ALLOC` bytes and counts in `fwd_cnt` what it
//! has consumed (for the echo server: what it has sent back, so its buffer can never hold
//! more than `BUF_ALLOC`); it sends no more than the peer's `buf_alloc - (tx_cnt -
//! peer_fwd_cnt)`, asks with CREDIT_REQUEST when that is 0, and sends CREDIT_UPDATE when
//! asked and when it has consumed half its buffer since it last told the peer.
//! Every wait is bounded; a RST or a transport reset event ends the connection.

use crate::arch::{inb, rdtsc};
use crate::checks::Ctx;
use crate::console::{Line, LSR, LSR_DR, RBR_THR};
use crate::virtio::{self as vio, Dev, D_NEXT, D_WRITE};

/// virtio-vsock device id.
pub const VSOCK_ID: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Packet header length.
pub const HDR: u64 = 44;
/// Stream socket type.
const TYPE_STREAM: u16 = 1;
// Operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive no more / send no more.
const SHUT_RCV: u32 = 1;
const SHUT_SEND: u32 = 2;
/// Buffer space the probe advertises (the echo ring's size).
const BUF_ALLOC: u32 = 0x1_0000;
/// Payload bytes per receive buffer and per transmitted packet.
const PAYLOAD: u64 = 4096;

// DMA layout.
const RX_HDR_OFF: u64 = 0;
const RX_DATA_OFF: u64 = 0x1_0000;
const TX_HDR_OFF: u64 = 0x3_0000;
const EVT_OFF: u64 = 0x3_8000;
const TX_DATA_OFF: u64 = 0x4_0000;
const ECHO_OFF: u64 = 0x8_0000;
/// Receive buffers and transmit slots (each two descriptors).
const MAX_BUFS: u16 = 32;
/// Event buffers.
const N_EVT: u16 = 4;
/// Longest reply line kept.
const LINE_MAX: usize = 200;

/// A packet header.
#[derive(Clone, Copy, Default)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// Writes the header at `addr` (DMA area).
    pub fn write(&self, addr: u64) {
        let b = vio::dma_slice(addr, HDR as usize);
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }

    fn read(addr: u64) -> Hdr {
        let b = vio::dma_slice(addr, HDR as usize);
        let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            src_port: u32at(16),
            dst_port: u32at(20),
            len: u32at(24),
            kind: u16at(28),
            op: u16at(30),
            flags: u32at(32),
            buf_alloc: u32at(36),
            fwd_cnt: u32at(40),
        }
    }
}

/// The guest CID from the config space (u64 at offset 0; only the low 32 bits are used
/// by the specification).
pub fn guest_cid(dev: &Dev) -> u64 {
    dev.config64(0)
}

/// The `irq` check's packet: a RST to the host for a connection that does not exist
/// (the device consumes it; nobody answers). Returns the length written at `addr`.
pub fn irq_test_packet(dev: &Dev, addr: u64) -> u32 {
    Hdr {
        src_cid: guest_cid(dev),
        dst_cid: HOST_CID,
        src_port: 0xffff_fff0,
        dst_port: 0xffff_fff0,
        kind: TYPE_STREAM,
        op: OP_RST,
        ..Hdr::default()
    }
    .write(addr);
    HDR as u32
}

/// Connection states.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Established,
    Closed,
}

/// The one connection.
#[derive(Clone, Copy)]
struct Conn {
    state: State,
    local_port: u32,
    peer_cid: u64,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent.
    tx_cnt: u32,
    /// Payload bytes received.
    rx_cnt: u32,
    /// Payload bytes consumed (sent back, for the echo server).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the peer.
    fwd_told: u32,
    /// SHUTDOWN flags the peer sent.
    peer_shut: u32,
    /// Why it closed, if it did.
    why: Option<&'static str>,
}

impl Conn {
    fn new(local_port: u32, peer_cid: u64, peer_port: u32, state: State) -> Conn {
        Conn {
            state,
            local_port,
            peer_cid,
            peer_port,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
            peer_shut: 0,
            why: None,
        }
    }

    /// Bytes the peer can take now.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

/// Counters for the line.
#[derive(Default, Clone, Copy)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
    pub rst_sent: u64,
    pub dropped: u64,
    pub overrun: u64,
    pub credit_requests: u64,
    pub credit_updates: u64,
    pub resets: u64,
    /// Transmit used entries for a slot that was not in flight (a request completed twice,
    /// or an unknown id).
    pub tx_twice: u64,
}

/// What received data is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// Collect one line (the reply to the hello).
    Line,
    /// Echo it back.
    Echo,
    /// Drop it (counted as consumed).
    Discard,
}

/// A virtio-vsock device in use.
pub struct Vsock {
    pub dev: Dev,
    pub cid: u64,
    n_rx: u16,
    n_tx: u16,
    tx_free: [u16; MAX_BUFS as usize],
    n_free: usize,
    /// Which transmit slots the device has (published, not yet used).
    tx_busy: [bool; MAX_BUFS as usize],
    khz: u64,
    conn: Option<Conn>,
    listen: Option<u32>,
    sink: Sink,
    line: [u8; LINE_MAX],
    line_len: usize,
    line_done: bool,
    echo_start: u32,
    echo_len: u32,
    pub echoed: u64,
    pub accepted: u64,
    pub c: Counters,
}

impl Vsock {
    /// Sets up the receive and event buffers.
    pub fn new(dev: Dev, khz: u64) -> Vsock {
        let n_rx = (dev.q[0].size / 2).min(MAX_BUFS);
        let n_tx = (dev.q[1].size / 2).min(MAX_BUFS);
        let mut v = Vsock {
            cid: guest_cid(&dev),
            dev,
            n_rx,
            n_tx,
            tx_free: [0; MAX_BUFS as usize],
            n_free: 0,
            tx_busy: [false; MAX_BUFS as usize],
            khz,
            conn: None,
            listen: None,
            sink: Sink::Discard,
            line: [0; LINE_MAX],
            line_len: 0,
            line_done: false,
            echo_start: 0,
            echo_len: 0,
            echoed: 0,
            accepted: 0,
            c: Counters::default(),
        };
        for i in 0..n_tx {
            v.tx_free[v.n_free] = n_tx - 1 - i;
            v.n_free += 1;
        }
        for i in 0..n_rx {
            v.post_rx(i);
        }
        for i in 0..N_EVT.min(v.dev.q[2].size) {
            v.post_event(i);
        }
        v.dev.kick(0);
        v.dev.kick(2);
        v
    }

    fn post_rx(&mut self, i: u16) {
        let d = vio::dma();
        let q = &mut self.dev.q[0];
        q.set_desc(2 * i, d + RX_HDR_OFF + 64 * u64::from(i), HDR as u32, D_WRITE | D_NEXT, 2 * i + 1);
        q.set_desc(2 * i + 1, d + RX_DATA_OFF + PAYLOAD * u64::from(i), PAYLOAD as u32, D_WRITE, 0);
        q.publish(2 * i);
    }

    fn post_event(&mut self, i: u16) {
        let q = &mut self.dev.q[2];
        q.set_desc(i, vio::dma() + EVT_OFF + 8 * u64::from(i), 8, D_WRITE, 0);
        q.publish(i);
    }

    fn reclaim_one(&mut self, id: u32) {
        let slot = (id / 2) as usize;
        if !id.is_multiple_of(2) || id / 2 >= u32::from(self.n_tx) || !self.tx_busy[slot] {
            self.c.tx_twice += 1;
            return;
        }
        self.tx_busy[slot] = false;
        if self.n_free < usize::from(self.n_tx) {
            self.tx_free[self.n_free] = slot as u16;
            self.n_free += 1;
        }
    }

    /// A free transmit slot, handling received packets while waiting (up to 1 s).
    fn tx_slot(&mut self) -> Result<u16, &'static str> {
        while let Some((id, _)) = self.dev.q[1].take() {
            self.reclaim_one(id);
        }
        let t0 = rdtsc();
        while self.n_free == 0 {
            if rdtsc().wrapping_sub(t0) > self.khz * 1000 {
                return Err("transmit buffers not returned within 1 s");
            }
            self.poll(self.khz * 10)?;
        }
        self.n_free -= 1;
        Ok(self.tx_free[self.n_free])
    }

    /// Sends a raw packet: header `h` (its `len` set from `data`) and `data`.
    pub fn send_raw(&mut self, h: &Hdr, data: &[u8]) -> Result<(), &'static str> {
        let slot = self.tx_slot()?;
        let d = vio::dma();
        let ha = d + TX_HDR_OFF + 64 * u64::from(slot);
        let da = d + TX_DATA_OFF + PAYLOAD * u64::from(slot);
        let n = data.len().min(PAYLOAD as usize);
        let mut h = *h;
        h.len = n as u32;
        h.write(ha);
        vio::dma_slice(da, n).copy_from_slice(&data[..n]);
        let q = &mut self.dev.q[1];
        if n > 0 {
            q.set_desc(2 * slot, ha, HDR as u32, D_NEXT, 2 * slot + 1);
            q.set_desc(2 * slot + 1, da, n as u32, 0, 0);
        } else {
            q.set_desc(2 * slot, ha, HDR as u32, 0, 0);
        }
        self.tx_busy[usize::from(slot)] = true;
        q.publish(2 * slot);
        self.dev.kick(1);
        self.c.tx += 1;
        Ok(())
    }

    /// Sends `op` on the connection (current credit fields).
    fn send_conn(&mut self, op: u16, flags: u32, data: &[u8]) -> Result<(), &'static str> {
        let Some(c) = self.conn.as_mut() else {
            return Err("no connection");
        };
        c.fwd_told = c.fwd_cnt;
        if op == OP_RW {
            c.tx_cnt = c.tx_cnt.wrapping_add(data.len() as u32);
        }
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: c.peer_cid,
            src_port: c.local_port,
            dst_port: c.peer_port,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
            len: 0,
        };
        self.send_raw(&h, data)
    }

    /// A RST in answer to `h` (never to a RST).
    fn rst_for(&mut self, h: &Hdr) -> Result<(), &'static str> {
        if h.op == OP_RST {
            return Ok(());
        }
        self.c.rst_sent += 1;
        let r = Hdr {
            src_cid: self.cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Hdr::default()
        };
        self.send_raw(&r, &[])
    }

    /// Waits up to `cycles` for one used entry on any queue and handles it. Returns false
    /// on timeout.
    pub fn poll(&mut self, cycles: u64) -> Result<bool, &'static str> {
        let Some((q, id, len)) = self.dev.poll_any(0b111, cycles) else {
            return Ok(false);
        };
        match q {
            1 => self.reclaim_one(id),
            2 => self.on_event(id)?,
            _ => self.on_rx(id, len)?,
        }
        Ok(true)
    }

    fn on_event(&mut self, id: u32) -> Result<(), &'static str> {
        if id >= u32::from(N_EVT) {
            return Err("event used entry with an unknown id");
        }
        let ev = vio::dma_slice(vio::dma() + EVT_OFF + 8 * u64::from(id), 4);
        if u32::from_le_bytes(ev[..4].try_into().unwrap()) == 0 {
            // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every connection is gone, the CID may
            // have changed.
            self.c.resets += 1;
            self.cid = guest_cid(&self.dev);
            if let Some(c) = self.conn.as_mut() {
                c.state = State::Closed;
                c.why = Some("transport reset event");
            }
        }
        self.post_event(id as u16);
        self.dev.kick(2);
        Ok(())
    }

    fn on_rx(&mut self, id: u32, used: u32) -> Result<(), &'static str> {
        if !id.is_multiple_of(2) || id / 2 >= u32::from(self.n_rx) {
            return Err("receive used entry with an unknown id");
        }
        let i = (id / 2) as u16;
        let d = vio::dma();
        let h = Hdr::read(d + RX_HDR_OFF + 64 * u64::from(i));
        self.c.rx += 1;
        let avail = u64::from(used).saturating_sub(HDR).min(PAYLOAD);
        let r = if u64::from(used) < HDR || u64::from(h.len) > avail {
            // A header claiming more payload than the buffer holds: drop it.
            self.c.dropped += 1;
            Ok(())
        } else if h.dst_cid != self.cid {
            self.c.dropped += 1;
            Ok(())
        } else {
            let data = vio::dma_slice(d + RX_DATA_OFF + PAYLOAD * u64::from(i), h.len as usize);
            self.on_packet(&h, data)
        };
        self.post_rx(i);
        self.dev.kick(0);
        r
    }

    fn on_packet(&mut self, h: &Hdr, data: &[u8]) -> Result<(), &'static str> {
        let ours = self.conn.is_some_and(|c| {
            c.state != State::Closed
                && c.peer_cid == h.src_cid
                && c.peer_port == h.src_port
                && c.local_port == h.dst_port
        });
        if !ours {
            return self.on_stray(h);
        }
        if h.kind != TYPE_STREAM {
            self.close(Some("packet of a non-stream type"));
            return self.rst_for(h);
        }
        let state = {
            let c = self.conn.as_mut().unwrap();
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            c.state
        };
        match (h.op, state) {
            (OP_RESPONSE, State::Connecting) => {
                self.conn.as_mut().unwrap().state = State::Established;
            }
            (OP_RW, State::Established) => self.on_data(data)?,
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, State::Established) => {
                self.c.credit_updates += 1;
                self.send_conn(OP_CREDIT_UPDATE, 0, &[])?;
            }
            (OP_SHUTDOWN, _) => {
                self.conn.as_mut().unwrap().peer_shut |= h.flags & (SHUT_RCV | SHUT_SEND);
            }
            (OP_RST, State::Connecting) => self.close(Some("connection refused (RST)")),
            (OP_RST, _) => self.close(Some("connection reset by the peer (RST)")),
            _ => {
                // REQUEST on a live connection, RESPONSE when established, unknown ops.
                self.close(Some("unexpected packet on the connection"));
                return self.rst_for(h);
            }
        }
        Ok(())
    }

    /// A packet for no connection: accept a REQUEST to the listening port, RST the rest.
    fn on_stray(&mut self, h: &Hdr) -> Result<(), &'static str> {
        let free = self.conn.is_none_or(|c| c.state == State::Closed);
        if h.op == OP_REQUEST && h.kind == TYPE_STREAM && free && self.listen == Some(h.dst_port)
        {
            let mut c = Conn::new(h.dst_port, h.src_cid, h.src_port, State::Established);
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
            self.conn = Some(c);
            self.echo_len = 0;
            self.echo_start = 0;
            self.accepted += 1;
            return self.send_conn(OP_RESPONSE, 0, &[]);
        }
        self.rst_for(h)
    }

    fn on_data(&mut self, data: &[u8]) -> Result<(), &'static str> {
        let c = self.conn.as_mut().unwrap();
        c.rx_cnt = c.rx_cnt.wrapping_add(data.len() as u32);
        match self.sink {
            Sink::Line => {
                for &b in data {
                    if self.line_done {
                        break;
                    }
                    if b == b'\n' {
                        self.line_done = true;
                    } else if self.line_len < LINE_MAX {
                        self.line[self.line_len] = b;
                        self.line_len += 1;
                    }
                }
                self.consumed(data.len() as u32)?;
            }
            Sink::Discard => self.consumed(data.len() as u32)?,
            Sink::Echo => {
                let room = BUF_ALLOC - self.echo_len;
                let n = (data.len() as u32).min(room);
                if n < data.len() as u32 {
                    // The peer sent beyond the credit it was given.
                    self.c.overrun += 1;
                    self.consumed(data.len() as u32 - n)?;
                }
                let ring = vio::dma_slice(vio::dma() + ECHO_OFF, BUF_ALLOC as usize);
                for (k, &b) in data[..n as usize].iter().enumerate() {
                    let at = (self.echo_start + self.echo_len + k as u32) % BUF_ALLOC;
                    ring[at as usize] = b;
                }
                self.echo_len += n;
            }
        }
        Ok(())
    }

    /// `n` received bytes consumed: fwd_cnt, and a CREDIT_UPDATE once half the buffer has
    /// been freed since the peer last heard.
    fn consumed(&mut self, n: u32) -> Result<(), &'static str> {
        let c = self.conn.as_mut().unwrap();
        c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
        if c.state == State::Established && c.fwd_cnt.wrapping_sub(c.fwd_told) >= BUF_ALLOC / 2 {
            self.c.credit_updates += 1;
            self.send_conn(OP_CREDIT_UPDATE, 0, &[])?;
        }
        Ok(())
    }

    fn close(&mut self, why: Option<&'static str>) {
        if let Some(c) = self.conn.as_mut() {
            c.state = State::Closed;
            if c.why.is_none() {
                c.why = why;
            }
        }
    }

    fn state(&self) -> State {
        self.conn.map_or(State::Closed, |c| c.state)
    }

    fn conn_err(&self, default: &'static str) -> &'static str {
        self.conn.and_then(|c| c.why).unwrap_or(default)
    }

    /// Sends `data` on the connection within the peer's credit (CREDIT_REQUEST when it is
    /// exhausted), for at most 5 s without progress.
    fn send_data(&mut self, mut data: &[u8]) -> Result<(), &'static str> {
        let mut last = rdtsc();
        let mut asked = false;
        while !data.is_empty() {
            if self.state() != State::Established {
                return Err(self.conn_err("connection closed while sending"));
            }
            let credit = self.conn.unwrap().credit();
            if credit == 0 {
                if !asked {
                    self.c.credit_requests += 1;
                    self.send_conn(OP_CREDIT_REQUEST, 0, &[])?;
                    asked = true;
                }
                if rdtsc().wrapping_sub(last) > self.khz * 5000 {
                    return Err("no credit from the peer within 5 s");
                }
                self.poll(self.khz * 10)?;
                continue;
            }
            let n = (credit as usize).min(data.len()).min(PAYLOAD as usize);
            self.send_conn(OP_RW, 0, &data[..n])?;
            data = &data[n..];
            last = rdtsc();
            asked = false;
        }
        Ok(())
    }

    /// Sends what the echo ring holds, as far as the peer's credit allows (no waiting).
    fn flush_echo(&mut self) -> Result<(), &'static str> {
        while self.echo_len > 0 && self.state() == State::Established {
            let credit = self.conn.unwrap().credit();
            if credit == 0 {
                return Ok(());
            }
            let contiguous = BUF_ALLOC - self.echo_start;
            let n = self.echo_len.min(contiguous).min(credit).min(PAYLOAD as u32);
            let ring = vio::dma_slice(vio::dma() + ECHO_OFF, BUF_ALLOC as usize);
            let mut chunk = [0u8; PAYLOAD as usize];
            chunk[..n as usize]
                .copy_from_slice(&ring[self.echo_start as usize..(self.echo_start + n) as usize]);
            self.send_conn(OP_RW, 0, &chunk[..n as usize])?;
            self.echo_start = (self.echo_start + n) % BUF_ALLOC;
            self.echo_len -= n;
            self.echoed += u64::from(n);
            self.consumed(n)?;
        }
        Ok(())
    }

    /// `vsockflight`'s stream: bytes numbered by their offset (`offset % 251`) on the
    /// connection, as much as the credit and the transmit slots allow without waiting, until a
    /// byte arrives on COM1 or `ms` have passed (an error). A transport reset ends the stream
    /// (the connection is gone); the wait for the byte goes on. Returns the bytes sent.
    fn flight(&mut self, ms: u64) -> Result<u64, &'static str> {
        let t0 = rdtsc();
        let mut sent = 0u64;
        let mut chunk = [0u8; 1024];
        loop {
            if inb(LSR) & LSR_DR != 0 {
                let _ = inb(RBR_THR);
                return Ok(sent);
            }
            if rdtsc().wrapping_sub(t0) > self.khz * ms {
                return Err("no byte from the host");
            }
            if self.c.tx_twice > 0 {
                return Err("a transmit request completed twice");
            }
            if self.state() == State::Established && self.n_free > 0 {
                let n = (self.conn.unwrap().credit() as usize).min(chunk.len());
                if n > 0 {
                    for (k, b) in chunk[..n].iter_mut().enumerate() {
                        *b = ((sent + k as u64) % 251) as u8;
                    }
                    self.send_conn(OP_RW, 0, &chunk[..n])?;
                    sent += n as u64;
                    continue;
                }
            }
            self.poll(self.khz)?;
        }
    }

    /// Waits up to 1 s for every transmit slot to come back.
    fn drain_tx(&mut self) -> Result<(), &'static str> {
        let t0 = rdtsc();
        while self.n_free < usize::from(self.n_tx) {
            if rdtsc().wrapping_sub(t0) > self.khz * 1000 {
                return Err("transmit buffers not returned within 1 s");
            }
            self.poll(self.khz)?;
        }
        Ok(())
    }

    /// Connects to the host on `port` (2 s).
    fn connect(&mut self, port: u32) -> Result<(), &'static str> {
        let local = 49152 + (rdtsc() as u32 & 0x3fff);
        self.conn = Some(Conn::new(local, HOST_CID, port, State::Connecting));
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: port,
            kind: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: BUF_ALLOC,
            ..Hdr::default()
        };
        self.send_raw(&h, &[])?;
        let t0 = rdtsc();
        while self.state() == State::Connecting {
            if rdtsc().wrapping_sub(t0) > self.khz * 2000 {
                // Give up: a RST so a late RESPONSE finds no half-open connection.
                self.c.rst_sent += 1;
                let _ = self.send_conn(OP_RST, 0, &[]);
                self.close(Some("no RESPONSE within 2 s"));
                break;
            }
            self.poll(self.khz * 10)?;
        }
        match self.state() {
            State::Established => Ok(()),
            _ => Err(self.conn_err("connection failed")),
        }
    }

    /// Collects received data as one line from now on (before the hello is sent, so a
    /// quick reply is not lost).
    fn expect_line(&mut self) {
        self.sink = Sink::Line;
        self.line_len = 0;
        self.line_done = false;
    }

    /// Sends a REQUEST to the host on `port` and waits up to `cycles` for the answer:
    /// `"response"` (then closed with a RST) or `"rst"`.
    pub fn probe_request(&mut self, port: u32, cycles: u64) -> Result<&'static str, &'static str> {
        let local = 0x4000_0000 + (rdtsc() as u32 & 0xffff);
        self.conn = Some(Conn::new(local, HOST_CID, port, State::Connecting));
        let h = Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: port,
            kind: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: BUF_ALLOC,
            ..Hdr::default()
        };
        self.send_raw(&h, &[])?;
        let t0 = rdtsc();
        while self.state() == State::Connecting {
            if rdtsc().wrapping_sub(t0) > cycles {
                return Err("no RESPONSE or RST to a REQUEST within the timeout");
            }
            self.poll(self.khz * 10)?;
        }
        if self.state() == State::Established {
            self.c.rst_sent += 1;
            self.send_conn(OP_RST, 0, &[])?;
            self.close(None);
            return Ok("response");
        }
        Ok("rst")
    }

    /// Waits for the line `expect_line` started to end with `\n` (5 s).
    fn read_line(&mut self) -> Result<(), &'static str> {
        let t0 = rdtsc();
        while !self.line_done {
            if self.state() != State::Established {
                return Err(self.conn_err("connection closed before the reply line"));
            }
            if self.conn.unwrap().peer_shut & SHUT_SEND != 0 {
                return Err("peer shut down before sending a whole line");
            }
            if rdtsc().wrapping_sub(t0) > self.khz * 5000 {
                return Err("no reply line within 5 s");
            }
            self.poll(self.khz * 10)?;
        }
        self.sink = Sink::Discard;
        Ok(())
    }

    /// Orderly close: SHUTDOWN (both directions), up to 1 s for the peer's RST, then our
    /// RST if it did not come.
    fn shutdown(&mut self) -> Result<(), &'static str> {
        if self.state() != State::Established {
            return Ok(());
        }
        self.send_conn(OP_SHUTDOWN, SHUT_RCV | SHUT_SEND, &[])?;
        let t0 = rdtsc();
        while self.state() == State::Established && rdtsc().wrapping_sub(t0) < self.khz * 1000 {
            self.poll(self.khz * 10)?;
        }
        if self.state() == State::Established {
            self.c.rst_sent += 1;
            self.send_conn(OP_RST, 0, &[])?;
        }
        self.close(None);
        Ok(())
    }

    /// Echo server on `port` for `ms`: every connection is echoed until the peer shuts
    /// down its sending side (then RST, and the next one may come).
    fn serve(&mut self, port: u32, ms: u64) -> Result<(), &'static str> {
        self.listen = Some(port);
        self.sink = Sink::Echo;
        let t0 = rdtsc();
        while rdtsc().wrapping_sub(t0) < self.khz * ms {
            self.poll(self.khz * 5)?;
            self.flush_echo()?;
            if let Some(c) = self.conn {
                if c.state == State::Established && c.peer_shut & SHUT_SEND != 0 && self.echo_len == 0
                {
                    self.c.rst_sent += 1;
                    self.send_conn(OP_RST, 0, &[])?;
                    self.close(None);
                }
            }
        }
        self.listen = None;
        if self.state() == State::Established {
            self.c.rst_sent += 1;
            self.send_conn(OP_RST, 0, &[])?;
            self.close(None);
        }
        Ok(())
    }
}

/// Parameters of the `vsock` check.
struct VsockParams {
    connect: Option<u32>,
    listen: Option<u32>,
    serve_ms: u64,
    bytes: u64,
}

impl Ctx<'_> {
    fn vsock_params(&self) -> Result<VsockParams, &'static str> {
        let p = &self.params;
        let port = |k: &[u8]| -> Result<Option<u32>, &'static str> {
            match p.get(k) {
                None => Ok(None),
                Some(v) => crate::checks::parse_u64(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or("bad probe.vsock port"),
            }
        };
        Ok(VsockParams {
            connect: port(b"probe.vsock.connect=")?,
            listen: port(b"probe.vsock.listen=")?,
            serve_ms: p
                .num(b"probe.vsock.serve_ms=", 5000)
                .map_err(|_| "bad probe.vsock.serve_ms=")?,
            bytes: p
                .num(b"probe.vsock.bytes=", 0)
                .map_err(|_| "bad probe.vsock.bytes=")?,
        })
    }

    /// Opens the first virtio-vsock device: (transport index, transport, driver).
    pub(crate) fn vsock_open(&mut self, check: &str) -> Option<Result<(vio::Transport, Vsock), ()>> {
        let f = self.virtio_found(check)?;
        let (slot, t) = f.devs[..f.n]
            .iter()
            .enumerate()
            .find(|(_, t)| matches!(Dev::identify(t.base), Ok((2, VSOCK_ID, _))))?;
        let t = *t;
        let khz = self.tsc_khz_or_guess();
        match self.open_virtio(&t, slot, 0, 3) {
            Ok(dev) if dev.nq == 3 && dev.q[1].size >= 2 && dev.q[0].size >= 2 => {
                Some(Ok((t, Vsock::new(dev, khz))))
            }
            Ok(_) => {
                Line::new(check)
                    .s("FAIL queues too small base=")
                    .hex(t.base)
                    .end();
                self.close_virtio(&t);
                Some(Err(()))
            }
            Err((why, _)) => {
                Line::new(check).s("FAIL ").s(why).s(" base=").hex(t.base).end();
                self.close_virtio(&t);
                Some(Err(()))
            }
        }
    }

    /// `vsock`: connect to the host (hello, one reply line, optional stream of bytes),
    /// and/or serve echo connections.
    pub(crate) fn vsock(&mut self) -> bool {
        let vp = match self.vsock_params() {
            Ok(p) => p,
            Err(why) => {
                Line::new("vsock").s("FAIL ").s(why).end();
                return true;
            }
        };
        let (t, mut v) = match self.vsock_open("vsock") {
            None => {
                Line::new("vsock").s("skip no virtio-vsock device").end();
                return false;
            }
            Some(Err(())) => return true,
            Some(Ok(x)) => x,
        };
        let khz = self.tsc_khz_or_guess();
        let mut stream_cycles = None;
        let r = (|| {
            if let Some(port) = vp.connect {
                v.expect_line();
                v.connect(port)?;
                v.send_data(b"PROBE-VSOCK-HELLO\n")?;
                v.read_line()?;
                if vp.bytes > 0 {
                    let t0 = rdtsc();
                    let mut chunk = [0u8; PAYLOAD as usize];
                    let mut sent = 0u64;
                    while sent < vp.bytes {
                        let n = (vp.bytes - sent).min(PAYLOAD) as usize;
                        for (k, b) in chunk[..n].iter_mut().enumerate() {
                            *b = ((sent + k as u64) % 251) as u8;
                        }
                        v.send_data(&chunk[..n])?;
                        sent += n as u64;
                    }
                    stream_cycles = Some(rdtsc().wrapping_sub(t0));
                }
                v.shutdown()?;
            }
            if let Some(port) = vp.listen {
                v.serve(port, vp.serve_ms)?;
            }
            Ok(())
        })();
        let mut l = Line::new("vsock");
        match r {
            Ok(()) => l.s("ok"),
            Err(why) => l.s("FAIL ").s(why),
        };
        l.s(" cid=").dec(v.cid);
        if let Some(p) = vp.connect {
            l.s(" port=").dec(u64::from(p));
        }
        if let Some(p) = vp.listen {
            l.s(" listen=")
                .dec(u64::from(p))
                .s(" conns=")
                .dec(v.accepted)
                .s(" echoed=")
                .dec(v.echoed);
        }
        if let Some(c) = stream_cycles {
            l.s(" bytes=").dec(vp.bytes).s(" mbit_s=").dec(
                (u128::from(vp.bytes) * 8 * u128::from(khz) / u128::from(c.max(1)) / 1000) as u64,
            );
        }
        l.s(" rx=")
            .dec(v.c.rx)
            .s(" tx=")
            .dec(v.c.tx)
            .s(" rst_sent=")
            .dec(v.c.rst_sent)
            .s(" dropped=")
            .dec(v.c.dropped)
            .s(" overrun=")
            .dec(v.c.overrun)
            .s(" credit_requests=")
            .dec(v.c.credit_requests)
            .s(" credit_updates=")
            .dec(v.c.credit_updates)
            .s(" resets=")
            .dec(v.c.resets)
            .s(" base=")
            .hex(t.base);
        self.irq_suffix(&mut l, &v.dev);
        if vp.connect.is_some() {
            // Last: the reply, spaces as `_`, other unprintable bytes as `?`.
            l.s(" reply=");
            for &b in &v.line[..v.line_len] {
                let c = match b {
                    b' ' => b'_',
                    b if b.is_ascii_graphic() => b,
                    _ => b'?',
                };
                l.b(&[c]);
            }
        }
        l.end();
        self.close_virtio(&t);
        r.is_err()
    }

    /// `vsockflight`: lives across a snapshot with a vsock stream in flight. Connects to the
    /// host on `probe.vsock.connect`, sends bytes numbered by their offset as fast as the
    /// credit allows, until a byte arrives on COM1 (`probe.snapshot_ms`); the snapshot is
    /// taken meanwhile and the byte sent to the restored VM, whose device has no connection
    /// (host sockets are not saved): it must send the transport-reset event, every transmit
    /// request must complete exactly once (a second used entry fails, a lost one times out),
    /// and a new connection to the same port must carry `PROBE-VSOCKFLIGHT-AFTER\n` and one
    /// reply line. The host checks that what it received on the first connection is the
    /// numbered stream's start, without a byte lost or doubled.
    pub(crate) fn vsockflight(&mut self) -> bool {
        let (ms, port) = match (
            self.params.num(b"probe.snapshot_ms=", 60_000),
            self.vsock_params().ok().and_then(|p| p.connect),
        ) {
            (Ok(ms), Some(port)) => (ms, port),
            _ => {
                Line::new("vsockflight")
                    .s("FAIL bad probe.snapshot_ms= or no probe.vsock.connect=")
                    .end();
                return true;
            }
        };
        let (t, mut v) = match self.vsock_open("vsockflight") {
            None => {
                Line::new("vsockflight").s("FAIL no virtio-vsock device").end();
                return true;
            }
            Some(Err(())) => return true,
            Some(Ok(x)) => x,
        };
        while inb(LSR) & LSR_DR != 0 {
            let _ = inb(RBR_THR);
        }
        let mut sent = 0;
        let r = (|| {
            v.connect(port)?;
            Line::new("vsockflight").s("running ms=").dec(ms).end();
            sent = v.flight(ms)?;
            // The reset event may still be in the event queue when the byte is seen.
            let t0 = rdtsc();
            while v.c.resets == 0 && rdtsc().wrapping_sub(t0) < v.khz * 1000 {
                v.poll(v.khz)?;
            }
            if v.c.resets == 0 {
                return Err("no transport reset event after the restore");
            }
            v.drain_tx()?;
            v.expect_line();
            v.connect(port)?;
            v.send_data(b"PROBE-VSOCKFLIGHT-AFTER\n")?;
            v.read_line()?;
            v.shutdown()?;
            v.drain_tx()?;
            if v.c.tx_twice > 0 {
                return Err("a transmit request completed twice");
            }
            Ok(())
        })();
        let mut l = Line::new("vsockflight");
        match r {
            Ok(()) => l.s("ok"),
            Err(why) => l.s("FAIL ").s(why),
        };
        l.s(" sent=")
            .dec(sent)
            .s(" cid=")
            .dec(v.cid)
            .s(" resets=")
            .dec(v.c.resets)
            .s(" tx_twice=")
            .dec(v.c.tx_twice)
            .s(" rst_sent=")
            .dec(v.c.rst_sent)
            .end();
        self.close_virtio(&t);
        r.is_err()
    }
}
