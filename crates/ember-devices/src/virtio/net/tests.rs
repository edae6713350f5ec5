#![allow(
    clippy::cast_possible_truncation,
    reason = "test frames and queue indices are small"
)]

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::rate_limiter::TokenBucketConfig;
use crate::virtio::testing::{self, Buf, GuestQueue};
use crate::virtio::{MmioTransport, CONFIG_SPACE_OFFSET, QUEUE_NOTIFY_OFFSET};
use crate::EventFdTrigger;

const MAC: [u8; 6] = [0x02, 0xe0, 0, 0, 0, 1];
const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x8000;
const ALL_BUT_EVENT_IDX: u64 = !VIRTIO_F_EVENT_IDX;

struct Fixture {
    mem: GuestRam,
    t: MmioTransport<GuestRam>,
    rx: GuestQueue,
    tx: GuestQueue,
    peer: UnixDatagram,
    counters: NetCountersHandle,
    irq: EventFdTrigger,
}

fn fixture_with(
    config: NetConfig,
    wanted: u64,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
) -> Fixture {
    let mem = ember_memory::ram_from_ranges(
        &[(GuestAddress(0), 0x10_0000)],
        ember_memory::DirtyBitmap::Off,
    )
    .unwrap();
    let (dev_end, peer) = datagram_pair().unwrap();
    let net = Net::new(dev_end, config, rx_limiter, tx_limiter).unwrap();
    let counters = net.counters_handle();
    let irq = EventFdTrigger::new().unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq.try_clone().unwrap()).unwrap();
    let rx = GuestQueue::new(&mem, 16, GuestAddress(RXQ)).unwrap();
    let tx = GuestQueue::new(&mem, 16, GuestAddress(TXQ)).unwrap();
    testing::driver_init(&mut t, &[&rx, &tx], Some(wanted)).unwrap();
    Fixture {
        mem,
        t,
        rx,
        tx,
        peer,
        counters,
        irq,
    }
}

fn fixture(wanted: u64) -> Fixture {
    fixture_with(
        NetConfig {
            mac: MAC,
            mtu: Some(1500),
            offload: true,
        },
        wanted,
        RateLimiter::unlimited().unwrap(),
        RateLimiter::unlimited().unwrap(),
    )
}

/// A frame as the backend carries it: a zero virtio-net header, then `payload`.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(payload);
    f
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

impl Fixture {
    fn kick(&mut self, queue: u32) {
        testing::write_reg(&mut self.t, QUEUE_NOTIFY_OFFSET, queue);
        self.t.process_notification(queue as usize);
    }

    /// The backend became readable (what the event loop does on its edge).
    fn backend_ready(&mut self) {
        self.t.process_host_event(0);
    }

    fn send_tx(&mut self, bytes: &[u8], at: u64) -> u16 {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        let head = self
            .tx
            .add_chain(&[Buf::readable(at, bytes.len() as u32)])
            .unwrap();
        self.kick(1);
        head
    }

    fn recv_peer(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let n = self.peer.recv(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
}

#[test]
fn config_space_has_mac_link_and_mtu() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    let mut c = [0u8; 12];
    for (i, b) in c.iter_mut().enumerate() {
        let mut one = [0u8; 1];
        crate::BusDevice::read(&mut f.t, CONFIG_SPACE_OFFSET + i as u64, &mut one);
        *b = one[0];
    }
    assert_eq!(&c[..6], &MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
    let offered = testing::read_device_features(&mut f.t);
    assert_ne!(offered & bit(VIRTIO_NET_F_MTU), 0);
    assert_ne!(offered & bit(VIRTIO_NET_F_HOST_TSO4), 0);
}

#[test]
fn without_offload_no_offload_feature_is_offered() {
    let f = fixture_with(
        NetConfig {
            mac: MAC,
            mtu: None,
            offload: false,
        },
        u64::MAX,
        RateLimiter::unlimited().unwrap(),
        RateLimiter::unlimited().unwrap(),
    );
    let mut t = f.t;
    let offered = testing::read_device_features(&mut t);
    assert_eq!(offered & OFFLOAD_FEATURES, 0);
    assert_eq!(offered & bit(VIRTIO_NET_F_MTU), 0);
}

#[test]
fn tx_frames_reach_the_backend_byte_exact() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    let a = frame(&payload(60, 1));
    let head = f.send_tx(&a, 0x20000);
    assert_eq!(f.recv_peer().unwrap(), a);
    assert_eq!(f.tx.pop_used(), Some((u32::from(head), 0)));
    // A frame split over three descriptors.
    let b = frame(&payload(3000, 2));
    f.mem.write_slice(&b[..12], GuestAddress(0x30000)).unwrap();
    f.mem
        .write_slice(&b[12..1000], GuestAddress(0x31000))
        .unwrap();
    f.mem
        .write_slice(&b[1000..], GuestAddress(0x32000))
        .unwrap();
    f.tx.add_chain(&[
        Buf::readable(0x30000, 12),
        Buf::readable(0x31000, 988),
        Buf::readable(0x32000, (b.len() - 1000) as u32),
    ])
    .unwrap();
    f.kick(1);
    assert_eq!(f.recv_peer().unwrap(), b);
    let c = f.counters.snapshot();
    assert_eq!((c.tx_frames, c.tx_bytes), (2, 3060));
    assert!(f.irq.read().unwrap() >= 1);
}

#[test]
fn malformed_tx_chains_complete_unsent() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    // Too short for a header.
    f.send_tx(&[0u8; 8], 0x20000);
    // A writable descriptor.
    f.tx.add_chain(&[Buf::readable(0x20000, 12), Buf::writable(0x21000, 64)])
        .unwrap();
    f.kick(1);
    // Longer than any frame.
    f.tx.add_chain(&[
        Buf::readable(0x20000, 0x8000),
        Buf::readable(0x40000, 0x8000),
        Buf::readable(0x60000, 0x1000),
    ])
    .unwrap();
    f.kick(1);
    // Outside guest memory.
    f.tx.add_chain(&[Buf::readable(0xfff_0000, 64)]).unwrap();
    f.kick(1);
    for _ in 0..4 {
        assert!(matches!(f.tx.pop_used(), Some((_, 0))));
    }
    assert_eq!(f.recv_peer(), None, "nothing was sent");
    let c = f.counters.snapshot();
    assert_eq!((c.tx_malformed_chains, c.tx_frames), (4, 0));
    // The device still works.
    let a = frame(b"after");
    f.send_tx(&a, 0x20000);
    assert_eq!(f.recv_peer().unwrap(), a);
}

#[test]
fn rx_frames_are_delivered_with_num_buffers() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    let head = f.rx.add_chain(&[Buf::writable(0x20000, 2048)]).unwrap();
    f.kick(0);
    let a = frame(&payload(100, 3));
    f.peer.send(&a).unwrap();
    f.backend_ready();
    assert_eq!(f.rx.pop_used(), Some((u32::from(head), a.len() as u32)));
    let got = f.read(0x20000, a.len());
    assert_eq!(&got[12..], &a[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    let c = f.counters.snapshot();
    assert_eq!((c.rx_frames, c.rx_bytes), (1, 100));
}

#[test]
fn a_slow_guest_loses_no_frame() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    let frames: Vec<_> = (0..5).map(|i| frame(&payload(200 + i, i as u8))).collect();
    for fr in &frames {
        f.peer.send(fr).unwrap();
    }
    // No buffers yet: the device holds the first frame and stops reading.
    f.backend_ready();
    assert!(f.counters.snapshot().rx_no_buffers >= 1);
    assert_eq!(f.counters.snapshot().rx_frames, 0);
    // Two buffers: two frames.
    for i in 0..2u64 {
        f.rx.add_chain(&[Buf::writable(0x20000 + i * 0x1000, 2048)])
            .unwrap();
    }
    f.kick(0);
    assert_eq!(f.counters.snapshot().rx_frames, 2);
    // Three more buffers, posted after the edge: the notification alone drains the rest.
    for i in 2..5u64 {
        f.rx.add_chain(&[Buf::writable(0x20000 + i * 0x1000, 2048)])
            .unwrap();
    }
    f.kick(0);
    for (i, fr) in frames.iter().enumerate() {
        let (_, len) = f.rx.pop_used().unwrap();
        assert_eq!(len as usize, fr.len());
        assert_eq!(
            &f.read(0x20000 + i as u64 * 0x1000 + 12, fr.len() - 12),
            &fr[12..]
        );
    }
    assert_eq!(f.counters.snapshot().rx_frames, 5);
}

#[test]
fn mergeable_buffers_carry_a_large_frame() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    for i in 0..4u64 {
        f.rx.add_chain(&[Buf::writable(0x20000 + i * 0x1000, 1500)])
            .unwrap();
    }
    f.kick(0);
    let a = frame(&payload(4000, 9));
    f.peer.send(&a).unwrap();
    f.backend_ready();
    let mut got = Vec::new();
    let mut lens = Vec::new();
    while let Some((_, len)) = f.rx.pop_used() {
        lens.push(len);
    }
    for (i, &len) in lens.iter().enumerate() {
        got.extend(f.read(0x20000 + i as u64 * 0x1000, len as usize));
    }
    assert_eq!(lens, vec![1500, 1500, 1012]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[12..], &a[12..]);
}

#[test]
fn without_mergeable_buffers_a_frame_too_big_is_dropped_and_the_buffer_kept() {
    let mut f = fixture(ALL_BUT_EVENT_IDX & !bit(VIRTIO_NET_F_MRG_RXBUF));
    let head = f.rx.add_chain(&[Buf::writable(0x20000, 1000)]).unwrap();
    f.kick(0);
    f.peer.send(&frame(&payload(2000, 1))).unwrap();
    let small = frame(&payload(500, 2));
    f.peer.send(&small).unwrap();
    f.backend_ready();
    assert_eq!(f.rx.pop_used(), Some((u32::from(head), small.len() as u32)));
    let c = f.counters.snapshot();
    assert_eq!((c.rx_too_big, c.rx_frames), (1, 1));
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    let bad = f.rx.add_chain(&[Buf::readable(0x20000, 2048)]).unwrap();
    let good = f.rx.add_chain(&[Buf::writable(0x21000, 2048)]).unwrap();
    f.kick(0);
    let a = frame(b"hello");
    f.peer.send(&a).unwrap();
    f.backend_ready();
    assert_eq!(f.rx.pop_used(), Some((u32::from(bad), 0)));
    assert_eq!(f.rx.pop_used(), Some((u32::from(good), a.len() as u32)));
    assert_eq!(f.counters.snapshot().rx_malformed_chains, 1);
}

#[test]
fn tx_back_pressure_keeps_frames_until_the_backend_drains() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    let big = frame(&payload(60_000, 4));
    f.mem.write_slice(&big, GuestAddress(0x20000)).unwrap();
    // Fill the peer's receive buffer without reading.
    let mut sent = 0;
    for _ in 0..64 {
        f.tx.add_chain(&[Buf::readable(0x20000, big.len() as u32)])
            .unwrap();
        f.kick(1);
        while f.tx.pop_used().is_some() {
            sent += 1;
        }
        if f.counters.snapshot().tx_backpressure > 0 {
            break;
        }
    }
    let c = f.counters.snapshot();
    assert!(c.tx_backpressure > 0, "the socket never filled: {c:?}");
    assert_eq!(c.tx_errors, 0, "nothing dropped");
    // Drain the peer; the writable edge resumes transmission.
    let mut got = 0;
    while f.recv_peer().is_some() {
        got += 1;
    }
    f.backend_ready();
    while f.tx.pop_used().is_some() {
        sent += 1;
    }
    while f.recv_peer().is_some() {
        got += 1;
    }
    assert_eq!(sent, got, "every completed frame was delivered");
    assert_eq!(f.counters.snapshot().tx_frames, got);
}

#[test]
fn the_tx_rate_limiter_holds_frames_until_its_timer() {
    let tx = RateLimiter::new(
        None,
        Some(TokenBucketConfig {
            size: 2,
            one_time_burst: 0,
            refill_time: Duration::from_millis(100),
        }),
    )
    .unwrap();
    let mut f = fixture_with(
        NetConfig {
            mac: MAC,
            mtu: None,
            offload: true,
        },
        ALL_BUT_EVENT_IDX,
        RateLimiter::unlimited().unwrap(),
        tx,
    );
    let a = frame(b"x");
    f.mem.write_slice(&a, GuestAddress(0x20000)).unwrap();
    for _ in 0..3 {
        f.tx.add_chain(&[Buf::readable(0x20000, a.len() as u32)])
            .unwrap();
    }
    f.kick(1);
    assert_eq!(f.counters.snapshot().tx_frames, 2);
    assert_eq!(f.counters.snapshot().tx_rate_limited, 1);
    std::thread::sleep(Duration::from_millis(150));
    // Host descriptors: backend, resume, rx timer, tx timer, control.
    f.t.process_host_event(3);
    assert_eq!(f.counters.snapshot().tx_frames, 3);
}

#[test]
fn rate_limits_change_at_run_time() {
    let tx = RateLimiter::new(
        None,
        Some(TokenBucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time: Duration::from_secs(100),
        }),
    )
    .unwrap();
    let (dev_end, peer) = datagram_pair().unwrap();
    let net: Net<UnixDatagram, GuestRam> = Net::new(
        dev_end,
        NetConfig {
            mac: MAC,
            mtu: None,
            offload: false,
        },
        RateLimiter::unlimited().unwrap(),
        tx,
    )
    .unwrap();
    let control = net.control();
    let counters = net.counters_handle();
    let mem = ember_memory::ram_from_ranges(
        &[(GuestAddress(0), 0x10_0000)],
        ember_memory::DirtyBitmap::Off,
    )
    .unwrap();
    let mut t =
        MmioTransport::new(Box::new(net), mem.clone(), EventFdTrigger::new().unwrap()).unwrap();
    let rx = GuestQueue::new(&mem, 16, GuestAddress(RXQ)).unwrap();
    let mut txq = GuestQueue::new(&mem, 16, GuestAddress(TXQ)).unwrap();
    testing::driver_init(&mut t, &[&rx, &txq], Some(ALL_BUT_EVENT_IDX)).unwrap();
    let a = frame(b"z");
    mem.write_slice(&a, GuestAddress(0x20000)).unwrap();
    for _ in 0..3 {
        txq.add_chain(&[Buf::readable(0x20000, a.len() as u32)])
            .unwrap();
    }
    testing::write_reg(&mut t, QUEUE_NOTIFY_OFFSET, 1);
    t.process_notification(1);
    assert_eq!(counters.snapshot().tx_frames, 1, "one token for 100 s");
    control
        .send(NetCommand::UpdateRateLimiters {
            rx_bandwidth: BucketUpdate::Keep,
            rx_ops: BucketUpdate::Keep,
            tx_bandwidth: BucketUpdate::Keep,
            tx_ops: BucketUpdate::Disable,
        })
        .unwrap();
    // Host descriptor 4: the control mailbox.
    t.process_host_event(4);
    assert_eq!(counters.snapshot().tx_frames, 3, "the held frames went");
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        assert_eq!(peer.recv(&mut buf).unwrap(), a.len());
    }
}

#[test]
fn with_event_idx_the_device_publishes_avail_event() {
    let mut f = fixture(u64::MAX);
    let a = frame(b"one");
    f.send_tx(&a, 0x20000);
    f.send_tx(&a, 0x21000);
    assert_eq!(f.counters.snapshot().tx_frames, 2);
    // avail_event lives after the used ring's 16 elements.
    let avail_event: u16 = f
        .mem
        .read_obj(GuestAddress(f.tx.used_ring() + 4 + 8 * 16))
        .unwrap();
    assert_eq!(
        avail_event, 2,
        "the driver is asked to notify its next buffer"
    );
}

#[test]
fn the_budget_yields_through_the_resume_event() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    // A 256-entry transmit queue, full.
    testing::write_reg(&mut f.t, crate::virtio::regs::STATUS, 0);
    let rx = GuestQueue::new(&f.mem, 16, GuestAddress(RXQ)).unwrap();
    let mut tx = GuestQueue::new(&f.mem, 256, GuestAddress(0x8000)).unwrap();
    testing::driver_init(&mut f.t, &[&rx, &tx], Some(ALL_BUT_EVENT_IDX)).unwrap();
    let a = frame(b"y");
    f.mem.write_slice(&a, GuestAddress(0x20000)).unwrap();
    for _ in 0..256 {
        tx.add_chain(&[Buf::readable(0x20000, a.len() as u32)])
            .unwrap();
    }
    f.kick(1);
    assert_eq!(f.counters.snapshot().tx_frames, BUDGET as u64);
    let resume = f.t.host_fds()[1].fd;
    assert!(readable_now(resume), "resume event signalled");
    // The guest refilled meanwhile, without a notification (it saw the device busy).
    while tx.pop_used().is_some() {}
    while f.recv_peer().is_some() {}
    for _ in 0..10 {
        tx.add_chain(&[Buf::readable(0x20000, a.len() as u32)])
            .unwrap();
    }
    f.t.process_host_event(1);
    assert_eq!(f.counters.snapshot().tx_frames, BUDGET as u64 + 10);
    assert!(!readable_now(resume), "resume event cleared");
}

fn readable_now(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

#[test]
fn reset_and_reactivation_work() {
    let mut f = fixture(ALL_BUT_EVENT_IDX);
    testing::write_reg(&mut f.t, crate::virtio::regs::STATUS, 0);
    let rx = GuestQueue::new(&f.mem, 16, GuestAddress(RXQ)).unwrap();
    let tx = GuestQueue::new(&f.mem, 16, GuestAddress(TXQ)).unwrap();
    testing::driver_init(&mut f.t, &[&rx, &tx], Some(ALL_BUT_EVENT_IDX)).unwrap();
    f.tx = tx;
    let a = frame(b"again");
    f.send_tx(&a, 0x20000);
    assert_eq!(f.recv_peer().unwrap(), a);
}
