//! virtio-vsock with Firecracker's host side (hybrid vsock over Unix sockets; see
//! [`muxer`](self#host-side) below).
//!
//! Three queues: receive (0, packets to the guest), transmit (1, packets from the guest), event
//! (2, the transport-reset event a restored guest gets). The configuration space holds the
//! guest's CID.
//!
//! # Host side
//!
//! * A host program connects to the Unix socket `uds_path` and writes `CONNECT <port>\n`;
//!   once the guest's listener on `<port>` accepts, it reads `OK <host port>\n` and the socket
//!   is the stream.
//! * A guest connecting to host port P (CID 2) is connected to the Unix socket `<uds_path>_P`.
//!
//! Credit-based flow control bounds what Ember holds: at most [`CONN_BUF_SIZE`] bytes of guest
//! data per connection that its host peer has not read, nothing of host data the guest has no
//! room for (Ember stops reading), and at most [`MAX_CONNECTIONS`] connections.
//!
//! # Hostile input
//!
//! A transmit chain shorter than a header, with a device-writable descriptor, or whose payload
//! is shorter than its header says, is returned unread ([`VsockCounters::malformed_chains`]).
//! A packet with a wrong source or destination CID is dropped; one for an unknown connection,
//! of an unknown type or operation, or beyond the guest's credit, gets `RST`.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{
    next_chain, Error, GuestRam, HostFd, VirtioDevice, VirtioInterrupt, VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::Timer;

mod muxer;
pub mod packet;

pub use muxer::{CONNECT_TIMEOUT, CONN_BUF_SIZE, MAX_CONNECTIONS, MAX_PENDING_ACCEPTS};
use packet::{Header, HDR_LEN, MAX_PAYLOAD};

/// Device type of virtio-vsock.
pub const TYPE_VSOCK: u32 = 19;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Packets moved per call in one direction before the device yields to the event loop.
pub const BUDGET: usize = 256;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;

/// Errors setting up a vsock device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockError {
    /// The listening socket could not be created.
    #[error("cannot listen on {}: {source}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process listens on the socket path.
    #[error("{} is in use: another process listens on it", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket (Ember only replaces a stale socket)", .0.display())]
    NotASocket(PathBuf),
    /// epoll or a timer failed.
    #[error("epoll: {0}")]
    Epoll(#[source] io::Error),
}

/// A snapshot of a vsock device's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VsockCounters {
    /// Packets delivered to the guest.
    pub rx_packets: u64,
    /// Packets taken from the guest.
    pub tx_packets: u64,
    /// Stream bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Stream bytes from the guest.
    pub tx_bytes: u64,
    /// Connections set up (both directions).
    pub connections_opened: u64,
    /// Connections whose host socket was closed.
    pub connections_closed: u64,
    /// Guest connection requests refused (no listener at `<uds>_<port>`, limit reached).
    pub refused_guest_connections: u64,
    /// Host connections refused (bad `CONNECT` line, limits, timeout).
    pub refused_host_connections: u64,
    /// `RST` packets sent to the guest.
    pub resets_sent: u64,
    /// Malformed chains, returned unread.
    pub malformed_chains: u64,
    /// Packets dropped (wrong CID, unknown type, no room to owe a reset).
    pub dropped_packets: u64,
    /// Connections reset because the guest sent beyond its credit.
    pub credit_violations: u64,
    /// Host socket errors (connections reset).
    pub host_errors: u64,
    /// Handshakes or closes that timed out.
    pub timeouts: u64,
    /// Transport-reset events delivered.
    pub transport_resets: u64,
}

macro_rules! counters {
    ($($name:ident),*) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $($name: AtomicU64,)* }
        impl Counters {
            fn snapshot(&self) -> VsockCounters {
                VsockCounters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
            fn add(c: &AtomicU64, n: u64) {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    };
}

counters!(
    rx_packets,
    tx_packets,
    rx_bytes,
    tx_bytes,
    connections_opened,
    connections_closed,
    refused_guest_connections,
    refused_host_connections,
    resets_sent,
    malformed_chains,
    dropped_packets,
    credit_violations,
    host_errors,
    timeouts,
    transport_resets
);

/// A handle on a vsock device's counters, readable from any thread.
#[derive(Clone, Debug)]
pub struct VsockCountersHandle(Arc<Counters>);

impl VsockCountersHandle {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> VsockCounters {
        self.0.snapshot()
    }
}

struct Active<M> {
    mem: M,
    queues: [Queue; 3],
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The virtio-vsock device (see the [module docs](self)).
pub struct Vsock<M = GuestRam> {
    cid: u64,
    muxer: muxer::Muxer,
    sweep: Timer,
    resume: EventFd,
    rx_more: bool,
    tx_more: bool,
    reset_event_pending: bool,
    buf: Vec<u8>,
    counters: Arc<Counters>,
    active: Option<Active<M>>,
    sizes: [u16; 3],
}

impl<M> std::fmt::Debug for Vsock<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("connections", &self.muxer.connection_count())
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl<M> Vsock<M> {
    /// A device for guest CID `cid`, listening on `uds_path` (created; a stale socket there is
    /// replaced, anything else refused). The socket is removed when the device is dropped.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        Ok(Vsock {
            cid,
            muxer: muxer::Muxer::new(cid, uds_path)?,
            sweep: Timer::new().map_err(VsockError::Epoll)?,
            resume: crate::new_eventfd().map_err(VsockError::Epoll)?,
            rx_more: false,
            tx_more: false,
            reset_event_pending: false,
            buf: vec![0; HDR_LEN + MAX_PAYLOAD],
            counters: Arc::new(Counters::default()),
            active: None,
            sizes: [QUEUE_SIZE; 3],
        })
    }

    /// A handle on the counters.
    pub fn counters_handle(&self) -> VsockCountersHandle {
        VsockCountersHandle(self.counters.clone())
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }
}

fn broken(queue: usize) -> impl Fn(virtio_queue::Error) -> Error {
    move |source| Error::QueueBroken { queue, source }
}

impl<M: GuestMemoryBackend + Send> Vsock<M> {
    /// Moves packets from the muxer into the guest's receive buffers.
    fn receive(&mut self) -> Result<(), Error> {
        self.rx_more = false;
        let Vsock {
            muxer,
            buf,
            counters,
            active,
            rx_more,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Ok(());
        };
        if !a.queues[RX].ready() {
            return Ok(());
        }
        let mem = &a.mem;
        let mut used_any = false;
        let mut sent = 0;
        while muxer.has_rx() {
            if sent == BUDGET {
                *rx_more = true;
                break;
            }
            let Some(chain) = next_chain(&mut a.queues[RX], mem).map_err(broken(RX))? else {
                break;
            };
            let head = chain.head_index();
            let mut descs = Vec::with_capacity(4);
            let mut capacity = 0usize;
            let mut ok = true;
            for d in chain {
                if !d.is_write_only() {
                    ok = false;
                    break;
                }
                capacity = capacity.saturating_add(d.len() as usize);
                descs.push((d.addr(), d.len() as usize));
            }
            if !ok || capacity < HDR_LEN {
                Counters::add(&counters.malformed_chains, 1);
                a.queues[RX].add_used(mem, head, 0).map_err(broken(RX))?;
                used_any = true;
                continue;
            }
            let room = capacity.min(buf.len());
            let Some(len) = muxer.next_rx(&mut buf[..room], counters) else {
                a.queues[RX].go_to_previous_position();
                break;
            };
            let mut at = 0;
            for (addr, dlen) in descs {
                if at == len {
                    break;
                }
                let n = dlen.min(len - at);
                if mem.write_slice(&buf[at..at + n], addr).is_err() {
                    break;
                }
                at += n;
            }
            // at <= 64 KiB + 44.
            let written = u32::try_from(at).unwrap_or(0);
            a.queues[RX]
                .add_used(mem, head, written)
                .map_err(broken(RX))?;
            Counters::add(&counters.rx_packets, 1);
            used_any = true;
            sent += 1;
        }
        if used_any && super::needs_interrupt(&mut a.queues[RX], mem).map_err(broken(RX))? {
            a.interrupt.signal_used_queue(0)?;
        }
        Ok(())
    }

    /// Takes the guest's packets and hands them to the muxer.
    fn transmit(&mut self) -> Result<(), Error> {
        self.tx_more = false;
        let Vsock {
            muxer,
            buf,
            counters,
            active,
            tx_more,
            ..
        } = self;
        let Some(a) = active.as_mut() else {
            return Ok(());
        };
        if !a.queues[TX].ready() {
            return Ok(());
        }
        let mem = &a.mem;
        let mut used_any = false;
        let mut taken = 0;
        loop {
            if taken == BUDGET {
                *tx_more = true;
                break;
            }
            let Some(chain) = next_chain(&mut a.queues[TX], mem).map_err(broken(TX))? else {
                break;
            };
            taken += 1;
            let head = chain.head_index();
            let mut len = 0usize;
            let mut ok = true;
            for d in chain {
                if d.is_write_only() {
                    ok = false;
                    break;
                }
                let n = (d.len() as usize).min(buf.len() - len);
                if mem.read_slice(&mut buf[len..len + n], d.addr()).is_err() {
                    ok = false;
                    break;
                }
                len += n;
                if len == buf.len() {
                    break;
                }
            }
            let mut hdr_bytes = [0u8; HDR_LEN];
            if ok && len >= HDR_LEN {
                hdr_bytes.copy_from_slice(&buf[..HDR_LEN]);
            }
            let hdr = Header::decode(&hdr_bytes);
            if !ok || len < HDR_LEN || hdr.len as usize > len - HDR_LEN {
                Counters::add(&counters.malformed_chains, 1);
            } else {
                Counters::add(&counters.tx_packets, 1);
                let payload = &buf[HDR_LEN..HDR_LEN + hdr.len as usize];
                muxer.guest_packet(&hdr, payload, counters);
            }
            a.queues[TX].add_used(mem, head, 0).map_err(broken(TX))?;
            used_any = true;
        }
        if used_any && super::needs_interrupt(&mut a.queues[TX], mem).map_err(broken(TX))? {
            a.interrupt.signal_used_queue(1)?;
        }
        Ok(())
    }

    /// Delivers a pending transport-reset event.
    fn event(&mut self) -> Result<(), Error> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if !self.reset_event_pending || !a.queues[EVT].ready() {
            return Ok(());
        }
        let Some(chain) = next_chain(&mut a.queues[EVT], &a.mem).map_err(broken(EVT))? else {
            return Ok(());
        };
        let head = chain.head_index();
        let mut used = 0;
        for d in chain {
            if d.is_write_only() && d.len() >= 4 {
                if a.mem
                    .write_slice(&EVENT_TRANSPORT_RESET.to_le_bytes(), d.addr())
                    .is_ok()
                {
                    used = 4;
                }
                break;
            }
        }
        a.queues[EVT]
            .add_used(&a.mem, head, used)
            .map_err(broken(EVT))?;
        self.reset_event_pending = false;
        Counters::add(&self.counters.transport_resets, 1);
        a.interrupt.signal_used_queue(2)
    }

    /// After any work: arm the sweep timer while handshakes run, yield if a budget ran out.
    fn settle(&mut self) {
        if self.muxer.needs_sweep() && !self.sweep.is_armed() {
            let _ = self.sweep.arm(CONNECT_TIMEOUT / 4);
        }
        if self.rx_more || self.tx_more {
            let _ = self.resume.write(1);
        }
    }

    fn work(&mut self, rx: bool, tx: bool) -> Result<(), Error> {
        let t = if tx { self.transmit() } else { Ok(()) };
        // Transmitted packets often owe the guest an answer.
        let r = if rx || tx { self.receive() } else { Ok(()) };
        self.settle();
        t.and(r)
    }
}

impl<M: GuestMemoryBackend + Send> VirtioDevice<M> for Vsock<M> {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn activate(
        &mut self,
        mem: M,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), Error> {
        let got = queues.len();
        let Ok(mut queues) = <[Queue; 3]>::try_from(queues) else {
            return Err(Error::QueueCount { expected: 3, got });
        };
        for q in &mut queues {
            q.set_event_idx(acked_features & VIRTIO_F_EVENT_IDX != 0);
        }
        self.active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), Error> {
        if self.active.is_none() {
            return Err(Error::NotActivated);
        }
        match index {
            RX => self.work(true, false),
            TX => self.work(false, true),
            EVT => self.event(),
            _ => Err(Error::InvalidQueue(index)),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.clear(&self.counters);
    }

    fn host_fds(&self) -> Vec<HostFd> {
        vec![
            HostFd::readable(self.muxer.epoll_fd()),
            HostFd::readable(self.sweep.as_raw_fd()),
            HostFd::readable(self.resume.as_raw_fd()),
        ]
    }

    fn process_host(&mut self, index: usize) -> Result<(), Error> {
        match index {
            0 => self.muxer.process_events(&self.counters),
            1 => {
                if self.sweep.expired() {
                    self.muxer.sweep(&self.counters);
                }
            }
            2 => {
                let _ = self.resume.read();
                let (rx, tx) = (self.rx_more, self.tx_more);
                if self.active.is_some() {
                    return self.work(rx, tx);
                }
                return Ok(());
            }
            _ => return Ok(()),
        }
        if self.active.is_some() {
            return self.work(true, false);
        }
        self.settle();
        Ok(())
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues[..])
    }

    /// Connections are not saved (their host sockets cannot be): a restored guest gets a
    /// transport-reset event and reconnects, as with Firecracker.
    #[cfg(feature = "serde")]
    fn save_state(&self) -> Result<serde_json::Value, Error> {
        Ok(serde_json::json!({ "cid": self.cid }))
    }

    /// The device may have a CID other than the saved one (a restored clone's own identity):
    /// the transport-reset event makes the guest driver read the CID again.
    #[cfg(feature = "serde")]
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), Error> {
        if state
            .get("cid")
            .and_then(serde_json::Value::as_u64)
            .is_none()
        {
            return Err(Error::InvalidState(
                "virtio-vsock: the saved state has no CID".into(),
            ));
        }
        self.muxer.clear(&self.counters);
        self.reset_event_pending = true;
        self.event()
    }
}

#[cfg(test)]
mod tests;
