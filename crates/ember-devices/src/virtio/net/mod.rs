//! virtio-net on a host packet device ([`NetBackend`]: a [`Tap`], or a datagram socket).
//!
//! Two queues, receive (0) and transmit (1), of [`QUEUE_SIZE`] entries each; no control queue.
//! Every frame carries the 12-byte virtio 1.x header ([`VNET_HDR_LEN`]), which the backend
//! understands too (a TAP opened with `IFF_VNET_HDR`), so checksum and segmentation offloads
//! pass through untouched.
//!
//! Offered features: `VERSION_1`, `MAC`, `STATUS` (link always up), `MRG_RXBUF`, `EVENT_IDX`,
//! `MTU` when one is configured, and unless [`NetConfig::offload`] is off `CSUM`,
//! `GUEST_CSUM`, `HOST_TSO4/6` and `GUEST_TSO4/6`. What the guest accepts on receive is handed
//! to the backend ([`NetBackend::set_offload`], `TUNSETOFFLOAD`) at activation.
//!
//! # Receive
//!
//! The backend's descriptor is watched edge-triggered. The device reads one frame at a time
//! and holds it until the guest has buffers for it: when the receive queue is empty it stops
//! reading (the TAP's own queue fills, which is the back-pressure its senders see) and resumes
//! when the guest notifies the queue, so a slow guest loses no frame the device has read. With
//! `MRG_RXBUF` a frame spans as many chains as it needs (`num_buffers` tells the guest how
//! many); without it, one chain must hold the whole frame. A frame that the guest's buffers
//! can never hold (larger than one chain without `MRG_RXBUF`, or than the whole queue) is dropped
//! and counted ([`NetCounters::rx_too_big`]). A chain with a device-readable descriptor is
//! returned with length 0 ([`NetCounters::rx_malformed_chains`]).
//!
//! # Transmit
//!
//! A chain must be device-readable only and hold a header plus a frame, at most
//! [`MAX_FRAME_LEN`] bytes in all; anything else completes unsent
//! ([`NetCounters::tx_malformed_chains`]). A frame the backend refuses with an error is dropped
//! ([`NetCounters::tx_errors`]); one it cannot take now (`WouldBlock`) stays in the queue until
//! the backend's descriptor is writable again.
//!
//! Both directions can be rate limited ([`RateLimiter`]: one operation and the frame's bytes
//! per frame). Neither direction runs more than [`BUDGET`] frames per call: the device then
//! signals its own "resume" eventfd so that the VMM's event loop serves the other devices
//! first.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    next_chain, Error, GuestRam, HostFd, VirtioDevice, VirtioInterrupt, VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use crate::mailbox::{Mailbox, MailboxSender};
use crate::rate_limiter::{BucketUpdate, RateLimiter, TokenType};

mod tap;

pub use tap::{datagram_pair, offload, NetBackend, Tap, TapError, VNET_HDR_LEN};

/// Device type of virtio-net.
pub const TYPE_NET: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame, header included, in either direction: a 64 KiB segmentation-offload frame
/// with its Ethernet and VLAN headers, plus the virtio-net header.
pub const MAX_FRAME_LEN: usize = 65_562;
/// Frames one call moves in one direction before it yields to the event loop.
pub const BUDGET: usize = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The feature bits that depend on [`NetConfig::offload`].
const OFFLOAD_FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6);

/// A virtio-net device's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU offered to the guest (`VIRTIO_NET_F_MTU`), if any.
    pub mtu: Option<u16>,
    /// Offer checksum and segmentation offloads.
    pub offload: bool,
}

/// A snapshot of a virtio-net device's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (frames without their virtio-net header).
    pub rx_bytes: u64,
    /// Frames sent by the guest to the backend.
    pub tx_frames: u64,
    /// Bytes sent (frames without their virtio-net header).
    pub tx_bytes: u64,
    /// Received frames dropped because the guest's buffers could never hold them.
    pub rx_too_big: u64,
    /// Backend read errors and frames shorter than a header.
    pub rx_errors: u64,
    /// Receive chains with a device-readable descriptor (returned with length 0).
    pub rx_malformed_chains: u64,
    /// Times receiving stopped for lack of guest buffers (the frame was kept).
    pub rx_no_buffers: u64,
    /// Times the receive rate limiter held a frame back.
    pub rx_rate_limited: u64,
    /// Transmit chains completed unsent (writable descriptor, too short or too long, outside
    /// guest memory).
    pub tx_malformed_chains: u64,
    /// Frames the backend refused (dropped).
    pub tx_errors: u64,
    /// Times the backend could not take a frame yet (kept in the queue).
    pub tx_backpressure: u64,
    /// Times the transmit rate limiter held a frame back.
    pub tx_rate_limited: u64,
    /// Failed attempts to set the backend's offloads.
    pub offload_errors: u64,
    /// Guest writes to the (read-only) configuration space, ignored.
    pub config_writes_ignored: u64,
}

macro_rules! counters {
    ($($name:ident),*) => {
        #[derive(Debug, Default)]
        struct Counters { $($name: AtomicU64,)* }
        impl Counters {
            fn snapshot(&self) -> NetCounters {
                NetCounters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters!(
    rx_frames,
    rx_bytes,
    tx_frames,
    tx_bytes,
    rx_too_big,
    rx_errors,
    rx_malformed_chains,
    rx_no_buffers,
    rx_rate_limited,
    tx_malformed_chains,
    tx_errors,
    tx_backpressure,
    tx_rate_limited,
    offload_errors,
    config_writes_ignored
);

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A handle on a [`Net`] device's counters, readable from any thread.
#[derive(Clone, Debug)]
pub struct NetCountersHandle(Arc<Counters>);

impl NetCountersHandle {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> NetCounters {
        self.0.snapshot()
    }
}

/// The device-specific state of a [`Net`] device in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NetState {
    /// The MAC address the guest was given.
    pub mac: [u8; 6],
}

struct Active<M> {
    mem: M,
    /// Receive and transmit queue.
    queues: [Queue; 2],
    interrupt: Arc<dyn VirtioInterrupt>,
    mrg_rxbuf: bool,
}

/// What a host descriptor index stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host {
    Backend,
    Resume,
    RxTimer,
    TxTimer,
    Control,
}

/// What another thread may ask of a running interface ([`Net::control`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetCommand {
    /// Change the rate limiters (Firecracker's `PATCH /network-interfaces`).
    UpdateRateLimiters {
        /// Receive bandwidth bucket.
        rx_bandwidth: BucketUpdate,
        /// Receive operations bucket.
        rx_ops: BucketUpdate,
        /// Transmit bandwidth bucket.
        tx_bandwidth: BucketUpdate,
        /// Transmit operations bucket.
        tx_ops: BucketUpdate,
    },
}

/// What became of the held receive frame.
enum Delivery {
    Delivered,
    Dropped,
    Wait,
}

/// A virtio-net device (see the [module docs](self)).
pub struct Net<B: NetBackend = Tap, M = GuestRam> {
    backend: B,
    config: NetConfig,
    features: u64,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// The frame read from the backend and not yet delivered (`rx_len` bytes, 0 = none).
    rx_frame: Vec<u8>,
    rx_len: usize,
    tx_frame: Vec<u8>,
    /// The backend refused a frame with `WouldBlock`: retry when it is writable.
    tx_blocked: bool,
    /// A direction stopped at its budget with work left.
    rx_more: bool,
    tx_more: bool,
    resume: EventFd,
    control: Mailbox<NetCommand>,
    hosts: Vec<Host>,
    counters: Arc<Counters>,
    active: Option<Active<M>>,
    sizes: [u16; 2],
    /// Scratch: the chains of the frame being delivered.
    chains: Vec<RxChain>,
    descs: Vec<(GuestAddress, u32)>,
}

/// One receive chain: its head, its writable buffers (`descs[start..end]`) and their total
/// length; `None` for a malformed chain.
struct RxChain {
    head: u16,
    buffers: Option<(usize, usize, u64)>,
}

impl<B: NetBackend, M> std::fmt::Debug for Net<B, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("config", &self.config)
            .field("activated", &self.active.is_some())
            .field("counters", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl<B: NetBackend, M> Net<B, M> {
    /// A device on `backend` (which must be non-blocking), with a limiter per direction
    /// ([`RateLimiter::unlimited`] for none).
    pub fn new(
        backend: B,
        config: NetConfig,
        rx_limiter: RateLimiter,
        tx_limiter: RateLimiter,
    ) -> Result<Self, Error> {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_EVENT_IDX
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF);
        if config.mtu.is_some() {
            features |= bit(VIRTIO_NET_F_MTU);
        }
        if config.offload {
            features |= OFFLOAD_FEATURES;
        }
        // Fixed from construction on: the timers are watched even while unlimited, so that
        // a limit set at run time ([`NetCommand`]) works.
        let hosts = vec![
            Host::Backend,
            Host::Resume,
            Host::RxTimer,
            Host::TxTimer,
            Host::Control,
        ];
        Ok(Net {
            backend,
            config,
            features,
            rx_limiter,
            tx_limiter,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_len: 0,
            tx_frame: Vec::with_capacity(MAX_FRAME_LEN),
            tx_blocked: false,
            rx_more: false,
            tx_more: false,
            resume: crate::new_eventfd().map_err(Error::EventFd)?,
            control: Mailbox::new().map_err(Error::EventFd)?,
            hosts,
            counters: Arc::new(Counters::default()),
            active: None,
            sizes: [QUEUE_SIZE; 2],
            chains: Vec::new(),
            descs: Vec::new(),
        })
    }

    /// A sender of [`NetCommand`]s to this interface, usable from any thread while it runs.
    pub fn control(&self) -> MailboxSender<NetCommand> {
        self.control.sender()
    }

    /// A handle on the counters.
    pub fn counters_handle(&self) -> NetCountersHandle {
        NetCountersHandle(self.counters.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn config_space(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.config.mac);
        let link_up = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        c[6..8].copy_from_slice(&link_up.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.unwrap_or(0).to_le_bytes());
        c
    }

    fn kick_resume(&self) {
        // A non-blocking eventfd: only fails when the counter is saturated, i.e. already set.
        let _ = self.resume.write(1);
    }
}

fn broken(queue: usize) -> impl Fn(virtio_queue::Error) -> Error {
    move |source| Error::QueueBroken { queue, source }
}

impl<B: NetBackend, M: GuestMemoryBackend + Send> Net<B, M> {
    /// Moves frames from the backend to the guest until the backend has none, the guest has no
    /// buffers, the limiter refuses, or the budget is spent.
    fn receive(&mut self) -> Result<(), Error> {
        self.rx_more = false;
        if self
            .active
            .as_ref()
            .is_none_or(|a| !a.queues[RX_QUEUE].ready())
            || self.rx_limiter.is_blocked()
        {
            return Ok(());
        }
        let mut used_any = false;
        let mut result = Ok(());
        let mut stopped = false;
        for _ in 0..BUDGET {
            if self.rx_len == 0 {
                match self.backend.read_frame(&mut self.rx_frame) {
                    Ok(n) if n < VNET_HDR_LEN => {
                        add(&self.counters.rx_errors, 1);
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            add(&self.counters.rx_errors, 1);
                        }
                        stopped = true;
                        break;
                    }
                }
            }
            match self.deliver(&mut used_any) {
                Ok(Delivery::Delivered) | Ok(Delivery::Dropped) => {}
                Ok(Delivery::Wait) => {
                    stopped = true;
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    stopped = true;
                    break;
                }
            }
        }
        // Stopped at the budget: whether the backend has more is unknown, the resume event
        // asks again after the other devices had their turn.
        self.rx_more = !stopped;
        let Some(active) = self.active.as_mut() else {
            return result;
        };
        if used_any
            && super::needs_interrupt(&mut active.queues[RX_QUEUE], &active.mem)
                .map_err(broken(RX_QUEUE))?
        {
            active.interrupt.signal_used_queue(0)?;
        }
        result
    }

    /// Delivers the held frame into the guest's receive buffers.
    fn deliver(&mut self, used_any: &mut bool) -> Result<Delivery, Error> {
        let Net {
            rx_frame,
            rx_len,
            rx_limiter,
            counters,
            active,
            chains,
            descs,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Ok(Delivery::Wait);
        };
        let len = *rx_len;
        let mem = &a.mem;
        chains.clear();
        descs.clear();
        let mut capacity = 0u64;
        let mut good = 0usize;
        let size = usize::from(a.queues[RX_QUEUE].size());
        let mut exhausted = false;
        while capacity < len as u64 && (a.mrg_rxbuf || good == 0) {
            if chains.len() >= size {
                exhausted = true;
                break;
            }
            let Some(chain) = next_chain(&mut a.queues[RX_QUEUE], mem).map_err(broken(RX_QUEUE))?
            else {
                break;
            };
            let head = chain.head_index();
            let start = descs.len();
            let mut total = 0u64;
            let mut ok = true;
            for d in chain {
                if !d.is_write_only() {
                    ok = false;
                    break;
                }
                descs.push((d.addr(), d.len()));
                total += u64::from(d.len());
            }
            if ok && total > 0 {
                chains.push(RxChain {
                    head,
                    buffers: Some((start, descs.len(), total)),
                });
                capacity += total;
                good += 1;
            } else {
                descs.truncate(start);
                chains.push(RxChain {
                    head,
                    buffers: None,
                });
            }
        }
        // Malformed chains before the first good one are returned now; everything from the
        // first good chain on goes back to the ring unless the frame is delivered.
        let first_good = chains
            .iter()
            .position(|c| c.buffers.is_some())
            .unwrap_or(chains.len());
        let give_back = |a: &mut Active<M>, n: usize| {
            for _ in 0..n {
                a.queues[RX_QUEUE].go_to_previous_position();
            }
        };
        let fits = capacity >= len as u64;
        let mut outcome = if fits {
            if !rx_limiter.consume(1, TokenType::Ops) {
                None
            } else if !rx_limiter.consume(len as u64, TokenType::Bytes) {
                rx_limiter.replenish(1, TokenType::Ops);
                None
            } else {
                Some(Delivery::Delivered)
            }
        } else if exhausted || (good == 1 && !a.mrg_rxbuf) {
            Some(Delivery::Dropped)
        } else {
            // Not enough buffers yet.
            add(&counters.rx_no_buffers, 1);
            Some(Delivery::Wait)
        };
        if outcome.is_none() {
            add(&counters.rx_rate_limited, 1);
            outcome = Some(Delivery::Wait);
        }
        let outcome = outcome.unwrap_or(Delivery::Wait);
        for c in &chains[..first_good] {
            a.queues[RX_QUEUE]
                .add_used(mem, c.head, 0)
                .map_err(broken(RX_QUEUE))?;
            add(&counters.rx_malformed_chains, 1);
            *used_any = true;
        }
        match outcome {
            Delivery::Delivered => {}
            Delivery::Dropped => {
                add(&counters.rx_too_big, 1);
                *rx_len = 0;
                give_back(a, chains.len() - first_good);
                return Ok(Delivery::Dropped);
            }
            Delivery::Wait => {
                give_back(a, chains.len() - first_good);
                return Ok(Delivery::Wait);
            }
        }
        // num_buffers: the number of good chains the frame spans (at most the queue size).
        let spans = u16::try_from(good).unwrap_or(u16::MAX);
        rx_frame[10..12].copy_from_slice(&spans.to_le_bytes());
        let mut offset = 0usize;
        let mut malformed_after = 0u64;
        for c in &chains[first_good..] {
            let Some((start, end, _)) = c.buffers else {
                malformed_after += 1;
                a.queues[RX_QUEUE]
                    .add_used(mem, c.head, 0)
                    .map_err(broken(RX_QUEUE))?;
                continue;
            };
            let mut written = 0u32;
            for &(addr, dlen) in &descs[start..end] {
                if offset >= len {
                    break;
                }
                let n = (len - offset).min(dlen as usize);
                if mem
                    .write_slice(&rx_frame[offset..offset + n], addr)
                    .is_err()
                {
                    // Outside guest memory: what was written stays, the rest of the frame is
                    // lost to this chain.
                    add(&counters.rx_errors, 1);
                    offset = len;
                    break;
                }
                offset += n;
                // n <= one descriptor's u32 length.
                written += u32::try_from(n).unwrap_or(u32::MAX);
            }
            a.queues[RX_QUEUE]
                .add_used(mem, c.head, written)
                .map_err(broken(RX_QUEUE))?;
        }
        *used_any = true;
        add(&counters.rx_malformed_chains, malformed_after);
        add(&counters.rx_frames, 1);
        add(&counters.rx_bytes, (len - VNET_HDR_LEN) as u64);
        *rx_len = 0;
        Ok(Delivery::Delivered)
    }

    /// Sends the guest's frames until its queue is empty, the backend would block, the limiter
    /// refuses, or the budget is spent.
    fn transmit(&mut self) -> Result<(), Error> {
        self.tx_more = false;
        let Net {
            backend,
            tx_limiter,
            tx_frame,
            tx_blocked,
            counters,
            active,
            tx_more,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Ok(());
        };
        if !a.queues[TX_QUEUE].ready() || tx_limiter.is_blocked() {
            return Ok(());
        }
        *tx_blocked = false;
        let mem = &a.mem;
        let mut used_any = false;
        let mut sent = 0usize;
        // The frame's pieces of guest memory (one per descriptor, or more where one crosses
        // a region boundary).
        let mut parts = Vec::with_capacity(4);
        let result = loop {
            if sent == BUDGET {
                *tx_more = true;
                break Ok(());
            }
            let chain = match next_chain(&mut a.queues[TX_QUEUE], mem) {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(broken(TX_QUEUE)(e)),
            };
            sent += 1;
            let head = chain.head_index();
            parts.clear();
            let mut len = 0usize;
            let mut ok = true;
            'chain: for d in chain {
                let dlen = d.len() as usize;
                if d.is_write_only() || len + dlen > MAX_FRAME_LEN {
                    ok = false;
                    break;
                }
                for part in mem.get_slices(d.addr(), dlen) {
                    match part {
                        Ok(p) => parts.push(p),
                        Err(_) => {
                            ok = false;
                            break 'chain;
                        }
                    }
                }
                len += dlen;
            }
            if !ok || len < VNET_HDR_LEN {
                add(&counters.tx_malformed_chains, 1);
            } else {
                let len = len as u64;
                let admitted = if !tx_limiter.consume(1, TokenType::Ops) {
                    false
                } else if !tx_limiter.consume(len, TokenType::Bytes) {
                    tx_limiter.replenish(1, TokenType::Ops);
                    false
                } else {
                    true
                };
                if !admitted {
                    add(&counters.tx_rate_limited, 1);
                    a.queues[TX_QUEUE].go_to_previous_position();
                    break Ok(());
                }
                match backend.write_frame_parts(&parts, tx_frame) {
                    Ok(()) => {
                        add(&counters.tx_frames, 1);
                        add(&counters.tx_bytes, len - VNET_HDR_LEN as u64);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Give the tokens back: the frame is tried again later.
                        tx_limiter.replenish(1, TokenType::Ops);
                        tx_limiter.replenish(len, TokenType::Bytes);
                        add(&counters.tx_backpressure, 1);
                        a.queues[TX_QUEUE].go_to_previous_position();
                        *tx_blocked = true;
                        break Ok(());
                    }
                    Err(_) => add(&counters.tx_errors, 1),
                }
            }
            if let Err(e) = a.queues[TX_QUEUE].add_used(mem, head, 0) {
                break Err(broken(TX_QUEUE)(e));
            }
            used_any = true;
        };
        if used_any
            && super::needs_interrupt(&mut a.queues[TX_QUEUE], mem).map_err(broken(TX_QUEUE))?
        {
            a.interrupt.signal_used_queue(1)?;
        }
        result
    }

    fn after_budget(&self) {
        if self.rx_more || self.tx_more {
            self.kick_resume();
        }
    }
}

impl<B: NetBackend, M: GuestMemoryBackend + Send> VirtioDevice<M> for Net<B, M> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        add(&self.counters.config_writes_ignored, 1);
    }

    fn activate(
        &mut self,
        mem: M,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), Error> {
        let got = queues.len();
        let Ok([mut rx, mut tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(Error::QueueCount { expected: 2, got });
        };
        let event_idx = acked_features & VIRTIO_F_EVENT_IDX != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let acked = |b: u32| acked_features & bit(b) != 0;
        let mut flags = 0;
        if acked(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= offload::CSUM;
            if acked(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= offload::TSO4;
            }
            if acked(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= offload::TSO6;
            }
        }
        if self.backend.set_offload(flags).is_err() {
            add(&self.counters.offload_errors, 1);
        }
        self.rx_len = 0;
        self.tx_blocked = false;
        self.active = Some(Active {
            mem,
            queues: [rx, tx],
            interrupt,
            mrg_rxbuf: acked(VIRTIO_NET_F_MRG_RXBUF),
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), Error> {
        if self.active.is_none() {
            return Err(Error::NotActivated);
        }
        let r = match index {
            RX_QUEUE => self.receive(),
            TX_QUEUE => self.transmit(),
            _ => return Err(Error::InvalidQueue(index)),
        };
        self.after_budget();
        r
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_len = 0;
        self.tx_blocked = false;
        if self.backend.set_offload(0).is_err() {
            add(&self.counters.offload_errors, 1);
        }
    }

    fn host_fds(&self) -> Vec<HostFd> {
        self.hosts
            .iter()
            .map(|h| match h {
                Host::Backend => HostFd {
                    fd: self.backend.as_raw_fd(),
                    readable: true,
                    writable: self.backend.writes_may_block(),
                    edge_triggered: true,
                },
                Host::Resume => HostFd::readable(self.resume.as_raw_fd()),
                Host::RxTimer => HostFd::readable(self.rx_limiter.timer_fd()),
                Host::TxTimer => HostFd::readable(self.tx_limiter.timer_fd()),
                Host::Control => HostFd::readable(self.control.fd()),
            })
            .collect()
    }

    fn process_host(&mut self, index: usize) -> Result<(), Error> {
        let Some(&host) = self.hosts.get(index) else {
            return Ok(());
        };
        let (rx, tx) = match host {
            Host::Backend => (true, self.tx_blocked),
            Host::Resume => {
                // Clear the level; then do what was left.
                let _ = self.resume.read();
                (self.rx_more, self.tx_more)
            }
            Host::RxTimer => (self.rx_limiter.timer_fired(), false),
            Host::TxTimer => (false, self.tx_limiter.timer_fired()),
            Host::Control => {
                let mut any = false;
                for cmd in self.control.take() {
                    let NetCommand::UpdateRateLimiters {
                        rx_bandwidth,
                        rx_ops,
                        tx_bandwidth,
                        tx_ops,
                    } = cmd;
                    self.rx_limiter.update(rx_bandwidth, rx_ops);
                    self.tx_limiter.update(tx_bandwidth, tx_ops);
                    any = true;
                }
                (any, any)
            }
        };
        if self.active.is_none() {
            return Ok(());
        }
        let r = if rx { self.receive() } else { Ok(()) };
        let t = if tx { self.transmit() } else { Ok(()) };
        self.after_budget();
        r.and(t)
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues[..])
    }

    #[cfg(feature = "serde")]
    fn save_state(&self) -> Result<serde_json::Value, Error> {
        serde_json::to_value(NetState {
            mac: self.config.mac,
        })
        .map_err(|e| Error::InvalidState(e.to_string()))
    }

    #[cfg(feature = "serde")]
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), Error> {
        let s: NetState = serde_json::from_value(state.clone())
            .map_err(|e| Error::InvalidState(format!("virtio-net: {e}")))?;
        self.config.mac = s.mac;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
