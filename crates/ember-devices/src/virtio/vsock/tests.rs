#![allow(
    clippy::cast_possible_truncation,
    reason = "test lengths and indices are small"
)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};
use super::*;
use crate::virtio::testing::{self, Buf, GuestQueue};
use crate::virtio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::EventFdTrigger;

const CID: u64 = 3;
const RX_BUF: u32 = 4096 + HDR_LEN as u32;

struct Guest {
    mem: GuestRam,
    t: MmioTransport<GuestRam>,
    rx: GuestQueue,
    tx: GuestQueue,
    evt: GuestQueue,
    rx_bufs: HashMap<u32, u64>,
    next_rx_addr: u64,
    tx_addr: u64,
    counters: VsockCountersHandle,
    dir: vmm_sys_util::tempdir::TempDir,
}

impl Guest {
    fn new() -> Self {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-vsock-").unwrap();
        let mem = ember_memory::ram_from_ranges(
            &[(GuestAddress(0), 0x100_0000)],
            ember_memory::DirtyBitmap::Off,
        )
        .unwrap();
        let dev = Vsock::new(CID, &dir.as_path().join("v.sock")).unwrap();
        let counters = dev.counters_handle();
        let irq = EventFdTrigger::new().unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq).unwrap();
        let rx = GuestQueue::new(&mem, 64, GuestAddress(0x1000)).unwrap();
        let tx = GuestQueue::new(&mem, 64, GuestAddress(0x4000)).unwrap();
        let evt = GuestQueue::new(&mem, 64, GuestAddress(0x8000)).unwrap();
        testing::driver_init(&mut t, &[&rx, &tx, &evt], Some(!VIRTIO_F_EVENT_IDX)).unwrap();
        let mut g = Guest {
            mem,
            t,
            rx,
            tx,
            evt,
            rx_bufs: HashMap::new(),
            next_rx_addr: 0x10_0000,
            tx_addr: 0x80_0000,
            counters,
            dir,
        };
        for _ in 0..32 {
            g.post_rx();
        }
        g
    }

    fn uds(&self) -> PathBuf {
        self.dir.as_path().join("v.sock")
    }

    fn post_rx(&mut self) {
        let addr = self.next_rx_addr;
        self.next_rx_addr += 0x2000;
        if self.next_rx_addr >= 0x80_0000 {
            self.next_rx_addr = 0x10_0000;
        }
        let head = self.rx.add_chain(&[Buf::writable(addr, RX_BUF)]).unwrap();
        self.rx_bufs.insert(u32::from(head), addr);
    }

    fn kick(&mut self, q: u32) {
        testing::write_reg(&mut self.t, QUEUE_NOTIFY_OFFSET, q);
        self.t.process_notification(q as usize);
    }

    fn host_events(&mut self) {
        self.t.process_host_event(0);
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        let mut h = h;
        h.len = payload.len() as u32;
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(payload);
        let at = self.tx_addr;
        self.tx_addr = if at + 0x20000 >= 0xf0_0000 {
            0x80_0000
        } else {
            at + 0x12000
        };
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        self.tx
            .add_chain(&[Buf::readable(at, bytes.len() as u32)])
            .unwrap();
        self.kick(1);
        while self.tx.pop_used().is_some() {}
    }

    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let (id, len) = self.rx.pop_used()?;
        let addr = self.rx_bufs.remove(&id).unwrap();
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        self.post_rx();
        self.kick(0);
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&b[..HDR_LEN]);
        let h = Header::decode(&hb);
        assert_eq!(h.len as usize, b.len() - HDR_LEN);
        Some((h, b[HDR_LEN..].to_vec()))
    }

    fn hdr(&self, src_port: u32, dst_port: u32, operation: u16) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            kind: TYPE_STREAM,
            op: operation,
            buf_alloc: 1 << 20,
            ..Header::default()
        }
    }
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

/// A host program connecting to guest port `port` through the device, accepted by the guest.
fn host_connect(g: &mut Guest, port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(g.uds()).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    g.host_events();
    let (req, _) = g.recv().expect("a REQUEST for the guest");
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, CID, port)
    );
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    let resp = g.hdr(port, req.src_port, op::RESPONSE);
    g.send(resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.src_port));
    (s, req.src_port)
}

#[test]
fn config_space_holds_the_cid() {
    let mut g = Guest::new();
    let mut b = [0u8; 8];
    crate::BusDevice::read(&mut g.t, crate::virtio::CONFIG_SPACE_OFFSET, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
}

#[test]
fn a_host_program_reaches_a_guest_listener() {
    let mut g = Guest::new();
    let (mut s, host_port) = host_connect(&mut g, 52);
    s.write_all(b"hello guest").unwrap();
    g.host_events();
    let (h, data) = g.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RW, host_port, 52));
    assert_eq!(data, b"hello guest");
    g.send(g.hdr(52, host_port, op::RW), b"hello host");
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    let c = g.counters.snapshot();
    assert_eq!((c.connections_opened, c.rx_bytes, c.tx_bytes), (1, 11, 10));
}

#[test]
fn bytes_sent_right_after_the_connect_line_are_kept() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(g.uds()).unwrap();
    s.write_all(b"CONNECT 7\nearly").unwrap();
    g.host_events();
    let (req, _) = g.recv().unwrap();
    g.send(g.hdr(7, req.src_port, op::RESPONSE), &[]);
    g.host_events();
    let (h, data) = g.recv().unwrap();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"early"[..]));
}

#[test]
fn a_guest_reaches_a_host_listener_on_uds_port() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_1234", g.uds().display())).unwrap();
    g.send(g.hdr(5000, 1234, op::REQUEST), &[]);
    let (resp, _) = g.recv().unwrap();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (op::RESPONSE, 1234, 5000)
    );
    let (mut peer, _) = listener.accept().unwrap();
    g.send(g.hdr(5000, 1234, op::RW), b"PROBE-VSOCK-HELLO\n");
    assert_eq!(read_line(&mut peer), "PROBE-VSOCK-HELLO\n");
    peer.write_all(b"welcome\n").unwrap();
    g.host_events();
    let (h, data) = g.recv().unwrap();
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"welcome\n"[..]));
}

#[test]
fn a_guest_request_without_a_host_listener_is_reset() {
    let mut g = Guest::new();
    g.send(g.hdr(5000, 999, op::REQUEST), &[]);
    let (h, _) = g.recv().unwrap();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 999, 5000));
    assert_eq!(g.counters.snapshot().refused_guest_connections, 1);
    // A packet for a connection that does not exist: RST too.
    g.send(g.hdr(5001, 998, op::RW), b"x");
    assert_eq!(g.recv().unwrap().0.op, op::RST);
}

#[test]
fn bad_connect_lines_close_the_host_socket() {
    let mut g = Guest::new();
    for line in [&b"HELLO\n"[..], b"CONNECT x\n", &[b'A'; 40]] {
        let mut s = UnixStream::connect(g.uds()).unwrap();
        s.write_all(line).unwrap();
        g.host_events();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 8];
        // Closed: EOF, or a reset when the device closed with bytes unread.
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(g.recv().is_none(), "the guest heard nothing");
    assert_eq!(g.counters.snapshot().refused_host_connections, 3);
}

#[test]
fn wrong_cids_and_malformed_chains_are_dropped() {
    let mut g = Guest::new();
    let mut h = g.hdr(1, 2, op::REQUEST);
    h.src_cid = 77;
    g.send(h, &[]);
    // Header says 100 bytes, chain has 4.
    let mut h = g.hdr(1, 2, op::RW).encode().to_vec();
    h[24..28].copy_from_slice(&100u32.to_le_bytes());
    h.extend_from_slice(b"abcd");
    g.mem.write_slice(&h, GuestAddress(0xf0_0000)).unwrap();
    g.tx.add_chain(&[Buf::readable(0xf0_0000, h.len() as u32)])
        .unwrap();
    // Too short, and writable.
    g.tx.add_chain(&[Buf::readable(0xf0_0000, 10)]).unwrap();
    g.tx.add_chain(&[Buf::writable(0xf0_0000, 64)]).unwrap();
    g.kick(1);
    let c = g.counters.snapshot();
    assert_eq!((c.dropped_packets, c.malformed_chains), (1, 3), "{c:?}");
    assert!(g.recv().is_none());
}

#[test]
fn a_guest_beyond_its_credit_is_reset_and_memory_stays_bounded() {
    let mut g = Guest::new();
    let (s, host_port) = host_connect(&mut g, 52);
    // The host peer never reads. The guest sends until the socket and the device buffer fill.
    let chunk = vec![0x42u8; 60_000];
    let mut sent = 0usize;
    let limit = 64 << 20;
    while sent < limit {
        g.send(g.hdr(52, host_port, op::RW), &chunk);
        sent += chunk.len();
        if g.counters.snapshot().credit_violations > 0 {
            break;
        }
    }
    let c = g.counters.snapshot();
    assert_eq!(c.credit_violations, 1, "{c:?}");
    // Everything the device took beyond what the socket holds was within one buffer.
    let mut rst = false;
    while let Some((h, _)) = g.recv() {
        rst |= h.op == op::RST;
    }
    assert!(rst, "the guest was reset");
    drop(s);
}

#[test]
fn credit_updates_follow_the_host_reading() {
    let mut g = Guest::new();
    let (mut s, host_port) = host_connect(&mut g, 52);
    let chunk = vec![7u8; 32 << 10];
    let mut total = 0;
    for _ in 0..4 {
        g.send(g.hdr(52, host_port, op::RW), &chunk);
        total += chunk.len();
    }
    let mut got = vec![0u8; total];
    s.read_exact(&mut got).unwrap();
    // A quarter of the buffer was forwarded: the guest hears about it.
    let mut fwd = 0;
    while let Some((h, _)) = g.recv() {
        if h.op == op::CREDIT_UPDATE {
            fwd = h.fwd_cnt;
        }
    }
    assert_eq!(fwd as usize, total);
}

#[test]
fn the_host_does_not_send_beyond_the_guests_credit() {
    let mut g = Guest::new();
    let (mut s, host_port) = host_connect(&mut g, 52);
    // The guest said it has 1 MiB; now it says 100 bytes.
    let mut h = g.hdr(52, host_port, op::CREDIT_UPDATE);
    h.buf_alloc = 100;
    g.send(h, &[]);
    s.write_all(&[1u8; 1000]).unwrap();
    g.host_events();
    let mut bytes = 0;
    while let Some((h, data)) = g.recv() {
        if h.op == op::RW {
            bytes += data.len();
        }
    }
    assert_eq!(bytes, 100);
    // It consumed them.
    let mut h = g.hdr(52, host_port, op::CREDIT_UPDATE);
    h.buf_alloc = 100;
    h.fwd_cnt = 100;
    g.send(h, &[]);
    while let Some((h, data)) = g.recv() {
        if h.op == op::RW {
            bytes += data.len();
        }
    }
    assert_eq!(bytes, 200);
}

#[test]
fn close_in_both_directions() {
    let mut g = Guest::new();
    let (mut s, host_port) = host_connect(&mut g, 52);
    // The host shuts its side: the guest gets SHUTDOWN(SEND).
    s.shutdown(std::net::Shutdown::Write).unwrap();
    g.host_events();
    let (h, _) = g.recv().unwrap();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, shutdown::SEND));
    // The guest closes: its last bytes reach the host, then RST, and the host sees EOF.
    g.send(g.hdr(52, host_port, op::RW), b"bye");
    let mut h = g.hdr(52, host_port, op::SHUTDOWN);
    h.flags = shutdown::SEND | shutdown::RCV;
    g.send(h, &[]);
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    let (h, _) = g.recv().unwrap();
    assert_eq!(h.op, op::RST);
    assert_eq!(g.t.host_fds().len(), 3);
    let c = g.counters.snapshot();
    assert_eq!((c.connections_opened, c.connections_closed), (1, 1));
}

#[test]
fn many_connections_leave_no_descriptor_behind() {
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let mut g = Guest::new();
    let before = fds();
    for i in 0..200u32 {
        let (s, host_port) = host_connect(&mut g, 52);
        if i % 2 == 0 {
            g.send(g.hdr(52, host_port, op::RST), &[]);
        } else {
            drop(s);
            g.host_events();
            let mut h = g.hdr(52, host_port, op::SHUTDOWN);
            h.flags = shutdown::SEND | shutdown::RCV;
            g.send(h, &[]);
        }
        while g.recv().is_some() {}
    }
    let c = g.counters.snapshot();
    assert_eq!(c.connections_opened, 200);
    assert_eq!(c.connections_closed, 200, "{c:?}");
    // Other tests run in parallel threads and open descriptors too: allow for some.
    assert!(
        fds() <= before + 16,
        "{} fds before, {} after",
        before,
        fds()
    );
}

#[cfg(feature = "serde")]
#[test]
fn a_restored_device_sends_the_transport_reset_event() {
    let mut g = Guest::new();
    let _conn = host_connect(&mut g, 52);
    let head = g.evt.add_chain(&[Buf::writable(0xf8_0000, 4)]).unwrap();
    g.kick(2);
    assert_eq!(g.evt.pop_used(), None, "no event before a restore");
    let state = g.t.state().unwrap();
    g.t.restore(&state).unwrap();
    assert_eq!(g.evt.pop_used(), Some((u32::from(head), 4)));
    let ev: u32 = g.mem.read_obj(GuestAddress(0xf8_0000)).unwrap();
    assert_eq!(ev, EVENT_TRANSPORT_RESET);
    assert_eq!(g.counters.snapshot().transport_resets, 1);
}

#[test]
fn bytes_sent_before_a_guest_reset_still_reach_the_host() {
    let mut g = Guest::new();
    let (mut s, host_port) = host_connect(&mut g, 52);
    // More than the host socket holds, so that some stays in the device, then RST.
    let chunk = vec![0x33u8; 60_000];
    let mut sent = 0;
    for _ in 0..6 {
        g.send(g.hdr(52, host_port, op::RW), &chunk);
        sent += chunk.len();
    }
    g.send(g.hdr(52, host_port, op::RST), &[]);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    loop {
        // The device flushes when the host socket drains (its writable edge).
        g.host_events();
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => panic!("{e} after {got} bytes"),
        }
    }
    assert_eq!(got, sent);
    let c = g.counters.snapshot();
    assert_eq!(c.resets_sent, 0, "no RST answers the guest's: {c:?}");
    assert_eq!(c.connections_closed, 1);
}
