//! virtio-rng (entropy source): one request queue whose device-writable buffers the device
//! fills from the host's `getrandom(2)`, at most [`MAX_REQUEST_BYTES`] per request (as
//! Firecracker), behind an optional [`RateLimiter`].
//!
//! A chain with a device-readable descriptor, or with none writable, is malformed: it is
//! returned with used length 0 and counted. A request refused by the rate limiter stays in the
//! queue until the limiter's timer fires (host descriptor 0).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};

use super::{Error, GuestRam, HostFd, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::rate_limiter::{RateLimiter, TokenType};

/// Device type of virtio-rng (entropy source).
pub const TYPE_RNG: u32 = 4;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets.
pub const MAX_REQUEST_BYTES: u32 = 64 << 10;

/// A snapshot of the rng counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngCounters {
    /// Requests filled.
    pub requests: u64,
    /// Bytes of entropy written to guest memory.
    pub bytes: u64,
    /// Malformed chains (returned with length 0).
    pub malformed_chains: u64,
    /// Times the rate limiter held requests back.
    pub rate_limited: u64,
    /// `getrandom` or guest-memory failures (the request completed with what was written).
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
    malformed_chains: AtomicU64,
    rate_limited: AtomicU64,
    errors: AtomicU64,
}

/// A handle on an [`Rng`]'s counters, readable from any thread.
#[derive(Clone, Debug)]
pub struct RngCountersHandle(Arc<Counters>);

impl RngCountersHandle {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> RngCounters {
        let c = &self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RngCounters {
            requests: l(&c.requests),
            bytes: l(&c.bytes),
            malformed_chains: l(&c.malformed_chains),
            rate_limited: l(&c.rate_limited),
            errors: l(&c.errors),
        }
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Active<M> {
    mem: M,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The virtio-rng device (see the [module docs](self)).
pub struct Rng<M = GuestRam> {
    limiter: RateLimiter,
    counters: Arc<Counters>,
    active: Option<Active<M>>,
    sizes: [u16; 1],
}

impl<M> std::fmt::Debug for Rng<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field(
                "counters",
                &RngCountersHandle(self.counters.clone()).snapshot(),
            )
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl<M> Rng<M> {
    /// A device limited by `limiter` ([`RateLimiter::unlimited`] for none).
    pub fn new(limiter: RateLimiter) -> Self {
        Rng {
            limiter,
            counters: Arc::new(Counters::default()),
            active: None,
            sizes: [QUEUE_SIZE],
        }
    }

    /// A handle on the counters.
    pub fn counters_handle(&self) -> RngCountersHandle {
        RngCountersHandle(self.counters.clone())
    }
}

/// Fills `len` bytes of guest memory at `addr` with entropy (through a bounce buffer: the
/// guest never sees a partly written `getrandom` result it could race with).
fn fill<M: GuestMemoryBackend>(mem: &M, addr: vm_memory::GuestAddress, len: usize) -> bool {
    let mut buf = [0u8; 4096];
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(buf.len());
        // SAFETY: getrandom writes at most `n` bytes into `buf`, which has room for them.
        let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), n, 0) };
        let Ok(got) = usize::try_from(got) else {
            return false;
        };
        let Some(at) = addr.0.checked_add(done as u64) else {
            return false;
        };
        if mem
            .write_slice(&buf[..got], vm_memory::GuestAddress(at))
            .is_err()
        {
            return false;
        }
        done += got;
    }
    true
}

impl<M: GuestMemoryBackend + Send> Rng<M> {
    fn serve(&mut self) -> Result<(), Error> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let c = &self.counters;
        let mut used_any = false;
        if !active.queue.ready() {
            return Ok(());
        }
        while let Some(chain) = super::next_chain(&mut active.queue, &active.mem)
            .map_err(|source| Error::QueueBroken { queue: 0, source })?
        {
            let head = chain.head_index();
            let descs: Vec<_> = chain.take(usize::from(QUEUE_SIZE)).collect();
            let writable: u64 = descs
                .iter()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum();
            if writable == 0 || descs.iter().any(|d| !d.is_write_only()) {
                add(&c.malformed_chains, 1);
                active
                    .queue
                    .add_used(&active.mem, head, 0)
                    .map_err(|source| Error::QueueBroken { queue: 0, source })?;
                used_any = true;
                continue;
            }
            let want = writable.min(u64::from(MAX_REQUEST_BYTES));
            if !self.limiter.consume(1, TokenType::Ops) {
                active.queue.go_to_previous_position();
                add(&c.rate_limited, 1);
                break;
            }
            if !self.limiter.consume(want, TokenType::Bytes) {
                self.limiter.replenish(1, TokenType::Ops);
                active.queue.go_to_previous_position();
                add(&c.rate_limited, 1);
                break;
            }
            let mut left = want;
            let mut written = 0u64;
            for d in &descs {
                if left == 0 {
                    break;
                }
                let n = left.min(u64::from(d.len()));
                // n <= 64 KiB: lossless.
                let ok = fill(&active.mem, d.addr(), usize::try_from(n).unwrap_or(0));
                if !ok {
                    add(&c.errors, 1);
                    break;
                }
                left -= n;
                written += n;
            }
            // written <= 64 KiB: lossless.
            let used = u32::try_from(written).unwrap_or(MAX_REQUEST_BYTES);
            active
                .queue
                .add_used(&active.mem, head, used)
                .map_err(|source| Error::QueueBroken { queue: 0, source })?;
            used_any = true;
            add(&c.requests, 1);
            add(&c.bytes, written);
        }
        if used_any
            && super::needs_interrupt(&mut active.queue, &active.mem)
                .map_err(|source| Error::QueueBroken { queue: 0, source })?
        {
            active.interrupt.signal_used_queue(0)?;
        }
        Ok(())
    }
}

impl<M: GuestMemoryBackend + Send> VirtioDevice<M> for Rng<M> {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    }

    fn activate(
        &mut self,
        mem: M,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), Error> {
        let got = queues.len();
        let Ok([mut queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(Error::QueueCount { expected: 1, got });
        };
        queue.set_event_idx(
            acked_features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0,
        );
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), Error> {
        if index != 0 {
            return Err(Error::InvalidQueue(index));
        }
        if self.active.is_none() {
            return Err(Error::NotActivated);
        }
        if self.limiter.is_blocked() {
            // The timer resumes it.
            return Ok(());
        }
        self.serve()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn host_fds(&self) -> Vec<HostFd> {
        vec![HostFd::readable(self.limiter.timer_fd())]
    }

    fn process_host(&mut self, index: usize) -> Result<(), Error> {
        if index == 0 && self.limiter.timer_fired() {
            return self.serve();
        }
        Ok(())
    }

    fn queues(&self) -> &[Queue] {
        self.active
            .as_ref()
            .map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    /// Nothing beyond the queue: every request is filled within `process_queue`.
    #[cfg(feature = "serde")]
    fn save_state(&self) -> Result<serde_json::Value, Error> {
        Ok(serde_json::Value::Null)
    }

    #[cfg(feature = "serde")]
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limiter::TokenBucketConfig;
    use crate::virtio::testing::{self, Buf, GuestQueue};
    use crate::virtio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
    use crate::EventFdTrigger;
    use std::time::Duration;
    use vm_memory::GuestAddress;

    fn setup(
        limiter: RateLimiter,
    ) -> (
        GuestRam,
        MmioTransport<GuestRam>,
        GuestQueue,
        RngCountersHandle,
    ) {
        let mem = ember_memory::ram_from_ranges(
            &[(GuestAddress(0), 0x40000)],
            ember_memory::DirtyBitmap::Off,
        )
        .unwrap();
        let rng = Rng::new(limiter);
        let counters = rng.counters_handle();
        let mut t =
            MmioTransport::new(Box::new(rng), mem.clone(), EventFdTrigger::new().unwrap()).unwrap();
        let q = GuestQueue::new(&mem, 16, GuestAddress(0)).unwrap();
        testing::driver_init(&mut t, &[&q], None).unwrap();
        (mem, t, q, counters)
    }

    fn kick(t: &mut MmioTransport<GuestRam>) {
        testing::write_reg(t, QUEUE_NOTIFY_OFFSET, 0);
        t.process_notification(0);
    }

    #[test]
    fn fills_writable_buffers_with_entropy() {
        let (mem, mut t, mut q, counters) = setup(RateLimiter::unlimited().unwrap());
        let head = q
            .add_chain(&[Buf::writable(0x10000, 4096), Buf::writable(0x20000, 100)])
            .unwrap();
        kick(&mut t);
        assert_eq!(q.pop_used(), Some((u32::from(head), 4196)));
        let mut buf = vec![0u8; 4096];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        let distinct = buf.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 200, "{distinct} distinct byte values");
        // A readable descriptor makes the chain malformed: length 0, nothing written.
        let head = q.add_chain(&[Buf::readable(0x30000, 16)]).unwrap();
        kick(&mut t);
        assert_eq!(q.pop_used(), Some((u32::from(head), 0)));
        let c = counters.snapshot();
        assert_eq!((c.requests, c.bytes, c.malformed_chains), (1, 4196, 1));
    }

    #[test]
    fn the_rate_limiter_holds_requests_until_its_timer() {
        let limiter = RateLimiter::new(
            Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time: Duration::from_millis(100),
            }),
            None,
        )
        .unwrap();
        let (_mem, mut t, mut q, counters) = setup(limiter);
        q.add_chain(&[Buf::writable(0x10000, 1000)]).unwrap();
        q.add_chain(&[Buf::writable(0x11000, 1000)]).unwrap();
        kick(&mut t);
        assert!(q.pop_used().is_some());
        assert_eq!(q.pop_used(), None, "the second waits for tokens");
        assert_eq!(counters.snapshot().rate_limited, 1);
        std::thread::sleep(Duration::from_millis(150));
        t.process_host_event(0);
        assert!(q.pop_used().is_some(), "served when the timer fired");
        assert_eq!(counters.snapshot().requests, 2);
    }
}
