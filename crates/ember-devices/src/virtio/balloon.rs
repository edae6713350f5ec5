//! virtio-balloon: the host asks the guest to give back memory (the target, in 4 KiB pages),
//! the guest hands page frame numbers over the inflate queue, and the device discards those
//! pages from the host mapping (`madvise(MADV_DONTNEED)`, or `MADV_REMOVE` for shared memory)
//! so the VMM's resident memory really drops. The guest reuses a page simply by touching it
//! again after deflating.
//!
//! Queues, in order, those the driver set up being compacted as virtio-mmio drivers do: inflate,
//! deflate, statistics (with `VIRTIO_BALLOON_F_STATS_VQ`), free page reporting (with
//! `VIRTIO_BALLOON_F_REPORTING`). Offered features: `VERSION_1`, `STATS_VQ` when a polling
//! interval is set, `DEFLATE_ON_OOM` and `REPORTING` on request, and `MUST_TELL_HOST`'s
//! semantics are honoured in any case (inflate and deflate are handled in order).
//!
//! Statistics follow the spec's protocol: the driver keeps one buffer of `(tag: le16,
//! value: le64)` entries in the statistics queue; the device holds it, and every polling
//! interval (its timer, a host descriptor) returns it, which makes the driver refill it with
//! fresh values.
//!
//! Hostile input: a PFN outside guest RAM, or a reported range that is, is skipped and counted
//! ([`BalloonCounters::invalid_pfns`]); at most [`MAX_PFNS_PER_CHAIN`] PFNs are taken from a
//! chain, read in bounded batches; a chain in the wrong direction is returned unread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::{
    next_chain, Error, GuestRam, HostFd, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::Timer;

/// Device type of virtio-balloon.
pub const TYPE_BALLOON: u32 = 5;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size (PFNs are in these units, whatever the guest's page size).
pub const PAGE_SIZE: u64 = 4096;
/// Feature bit: the driver tells the host before it uses deflated pages.
pub const F_MUST_TELL_HOST: u32 = 0;
/// Feature bit: the statistics queue.
pub const F_STATS_VQ: u32 = 1;
/// Feature bit: the guest deflates when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: free page reporting.
pub const F_REPORTING: u32 = 5;
/// Most PFNs taken from one inflate or deflate chain (Linux sends at most 256): the rest of a
/// longer chain is ignored and the chain counted as malformed, so one descriptor cannot keep
/// the device discarding for long.
pub const MAX_PFNS_PER_CHAIN: u64 = 1024;
/// Most statistics entries read from one buffer.
pub const MAX_STATS: usize = 32;

/// Statistics tags (virtio spec 1.x §5.5.6.3).
pub mod stat {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJOR_FAULTS: u16 = 2;
    /// Minor page faults.
    pub const MINOR_FAULTS: u16 = 3;
    /// Free memory, bytes.
    pub const FREE_MEMORY: u16 = 4;
    /// Total memory, bytes.
    pub const TOTAL_MEMORY: u16 = 5;
    /// Available memory (estimate), bytes.
    pub const AVAILABLE_MEMORY: u16 = 6;
    /// Disk caches, bytes.
    pub const DISK_CACHES: u16 = 7;
    /// Successful hugetlb page allocations.
    pub const HUGETLB_ALLOCATIONS: u16 = 8;
    /// Failed hugetlb page allocations.
    pub const HUGETLB_FAILURES: u16 = 9;
}

/// How the device gives discarded pages back to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discard {
    /// `MADV_DONTNEED`: for private mappings (anonymous memory, a private file mapping).
    DontNeed,
    /// `MADV_REMOVE`: for shared mappings of a memfd or file (frees the backing pages too).
    Remove,
}

/// A balloon's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Target size in 4 KiB pages.
    pub target_pages: u32,
    /// Statistics polling interval (`None`: no statistics queue).
    pub stats_interval: Option<Duration>,
    /// Offer `DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// How pages are discarded.
    pub discard: Discard,
}

/// The latest statistics the guest reported (tags it did not send are `None`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BalloonStats {
    /// Each tag's value, by tag ([`stat`]), for tags below [`MAX_STATS`].
    pub values: Vec<(u16, u64)>,
    /// How many statistics buffers the guest filled.
    pub updates: u64,
}

impl BalloonStats {
    /// The value of `tag`, if reported.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.iter().find(|(t, _)| *t == tag).map(|&(_, v)| v)
    }
}

/// A snapshot of a balloon's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalloonCounters {
    /// The target, in pages.
    pub target_pages: u32,
    /// The guest's `actual` (pages it says the balloon holds).
    pub actual_pages: u32,
    /// Pages the guest inflated (and the device discarded).
    pub inflated_pages: u64,
    /// Pages the guest deflated.
    pub deflated_pages: u64,
    /// Pages reported free (and discarded).
    pub reported_pages: u64,
    /// PFNs or reported ranges outside guest RAM, skipped.
    pub invalid_pfns: u64,
    /// `madvise` failures.
    pub discard_errors: u64,
    /// Chains in the wrong direction, returned unread.
    pub malformed_chains: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

#[derive(Debug, Default)]
struct Counters {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    reported_pages: AtomicU64,
    invalid_pfns: AtomicU64,
    discard_errors: AtomicU64,
    malformed_chains: AtomicU64,
    stats_updates: AtomicU64,
    stats: Mutex<BalloonStats>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// What another thread may ask of a running balloon ([`BalloonHandle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BalloonCommand {
    /// A new target, pages (the guest is told with a configuration-change interrupt).
    SetTargetPages(u32),
    /// A new statistics polling interval (a request goes out at once).
    SetStatsInterval(Duration),
}

/// A handle on a balloon, usable from any thread: its counters and latest statistics, and
/// commands ([`BalloonCommand`]) the device carries out from its event loop.
#[derive(Clone, Debug)]
pub struct BalloonHandle(Arc<Counters>, crate::mailbox::MailboxSender<BalloonCommand>);

impl BalloonHandle {
    /// A snapshot of the counters.
    pub fn snapshot(&self) -> BalloonCounters {
        let c = &self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BalloonCounters {
            target_pages: c.target_pages.load(Ordering::Relaxed),
            actual_pages: c.actual_pages.load(Ordering::Relaxed),
            inflated_pages: l(&c.inflated_pages),
            deflated_pages: l(&c.deflated_pages),
            reported_pages: l(&c.reported_pages),
            invalid_pfns: l(&c.invalid_pfns),
            discard_errors: l(&c.discard_errors),
            malformed_chains: l(&c.malformed_chains),
            stats_updates: l(&c.stats_updates),
        }
    }

    /// The latest statistics.
    pub fn stats(&self) -> BalloonStats {
        crate::lock(&self.0.stats).clone()
    }

    /// Sends a command to the device.
    pub fn send(&self, command: BalloonCommand) -> std::io::Result<()> {
        self.1.send(command)
    }
}

/// The device-specific state of a balloon in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BalloonState {
    /// Target, pages.
    pub target_pages: u32,
    /// The guest's `actual`.
    pub actual_pages: u32,
    /// Head of the statistics buffer the device holds, if any.
    pub stats_desc: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Active<M> {
    mem: M,
    queues: Vec<Queue>,
    roles: Vec<Role>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The virtio-balloon device (see the [module docs](self)).
pub struct Balloon<M = GuestRam> {
    config: BalloonConfig,
    features: u64,
    sizes: Vec<u16>,
    target_pages: u32,
    actual_pages: u32,
    stats_desc: Option<u16>,
    timer: Timer,
    control: crate::mailbox::Mailbox<BalloonCommand>,
    counters: Arc<Counters>,
    active: Option<Active<M>>,
}

impl<M> std::fmt::Debug for Balloon<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl<M> Balloon<M> {
    /// A balloon with `config`.
    pub fn new(config: BalloonConfig) -> io::Result<Self> {
        let mut features = VIRTIO_F_VERSION_1 | (1 << F_MUST_TELL_HOST);
        let mut sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        if config.stats_interval.is_some() {
            features |= 1 << F_STATS_VQ;
            sizes.push(QUEUE_SIZE);
        }
        if config.deflate_on_oom {
            features |= 1 << F_DEFLATE_ON_OOM;
        }
        if config.free_page_reporting {
            features |= 1 << F_REPORTING;
            sizes.push(QUEUE_SIZE);
        }
        let counters = Arc::new(Counters::default());
        counters
            .target_pages
            .store(config.target_pages, Ordering::Relaxed);
        Ok(Balloon {
            config,
            features,
            sizes,
            target_pages: config.target_pages,
            actual_pages: 0,
            stats_desc: None,
            timer: Timer::new()?,
            control: crate::mailbox::Mailbox::new()?,
            counters,
            active: None,
        })
    }

    /// A handle on the counters and statistics.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.counters.clone(), self.control.sender())
    }

    /// The target, in pages.
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    fn config_space(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[4..].copy_from_slice(&self.actual_pages.to_le_bytes());
        c
    }
}

/// A queue index as the interrupt wants it (at most 4 queues).
fn queue_id(qi: usize) -> u16 {
    u16::try_from(qi).unwrap_or(u16::MAX)
}

/// Discards `len` bytes of guest memory at `gpa` from the host mapping. `false` when the range
/// is not inside one RAM region.
fn discard<M: GuestMemoryBackend>(mem: &M, gpa: u64, len: u64, how: Discard) -> Result<(), bool> {
    let region = mem.find_region(GuestAddress(gpa)).ok_or(false)?;
    let offset = gpa - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(false);
    }
    let host = region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| false)?;
    let advice = match how {
        Discard::DontNeed => libc::MADV_DONTNEED,
        Discard::Remove => libc::MADV_REMOVE,
    };
    let len = usize::try_from(len).map_err(|_| false)?;
    // SAFETY: [host, host + len) lies inside one mapped guest RAM region (checked above) and
    // is page aligned (region starts are, and gpa is a multiple of PAGE_SIZE). Discarding guest
    // pages only changes what the guest reads from them next (zeroes, or the file's contents),
    // which is what it asked for; no host data lives there.
    if unsafe { libc::madvise(host.cast(), len, advice) } != 0 {
        return Err(true);
    }
    Ok(())
}

impl<M: GuestMemoryBackend + Send> Balloon<M> {
    /// Sets a new target (in pages) and tells the guest (a configuration-change interrupt).
    pub fn set_target_pages(&mut self, pages: u32) -> Result<(), Error> {
        self.target_pages = pages;
        self.counters.target_pages.store(pages, Ordering::Relaxed);
        if let Some(a) = &self.active {
            a.interrupt.signal_config()?;
        }
        Ok(())
    }

    fn discard_run(&self, mem: &M, start_pfn: u64, pages: u64) {
        let c = &self.counters;
        match discard(
            mem,
            start_pfn * PAGE_SIZE,
            pages * PAGE_SIZE,
            self.config.discard,
        ) {
            Ok(()) => {}
            Err(true) => add(&c.discard_errors, 1),
            Err(false) => {
                // Part of the run is outside RAM: page by page, counting the bad ones.
                for pfn in start_pfn..start_pfn + pages {
                    match discard(mem, pfn * PAGE_SIZE, PAGE_SIZE, self.config.discard) {
                        Ok(()) => {}
                        Err(true) => add(&c.discard_errors, 1),
                        Err(false) => add(&c.invalid_pfns, 1),
                    }
                }
            }
        }
    }

    /// Processes the inflate (`inflate == true`) or deflate queue at `qi`.
    fn pfn_queue(&mut self, qi: usize, inflate: bool) -> Result<(), Error> {
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        let r = self.pfn_queue_in(&mut a, qi, inflate);
        self.active = Some(a);
        r
    }

    fn pfn_queue_in(&mut self, a: &mut Active<M>, qi: usize, inflate: bool) -> Result<(), Error> {
        let broken = |source| Error::QueueBroken { queue: qi, source };
        if !a.queues[qi].ready() {
            return Ok(());
        }
        let mut used_any = false;
        let mut batch = [0u8; 1024];
        while let Some(chain) = next_chain(&mut a.queues[qi], &a.mem).map_err(broken)? {
            let head = chain.head_index();
            let mut pfns: u64 = 0;
            let mut run: Option<(u64, u64)> = None;
            let mut truncated = false;
            'chain: for d in chain {
                if d.is_write_only() {
                    add(&self.counters.malformed_chains, 1);
                    break;
                }
                let len = u64::from(d.len()) & !3;
                let mut at = 0u64;
                while at < len {
                    let left = (MAX_PFNS_PER_CHAIN - pfns) * 4;
                    if left == 0 {
                        truncated = true;
                        break 'chain;
                    }
                    let n = (len - at).min(batch.len() as u64).min(left);
                    // n <= 1024.
                    let nb = usize::try_from(n).unwrap_or(0);
                    let Some(addr) = d.addr().0.checked_add(at) else {
                        break;
                    };
                    if a.mem
                        .read_slice(&mut batch[..nb], GuestAddress(addr))
                        .is_err()
                    {
                        add(&self.counters.invalid_pfns, 1);
                        break;
                    }
                    for w in batch[..nb].chunks_exact(4) {
                        let pfn = u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                        pfns += 1;
                        if !inflate {
                            continue;
                        }
                        run = match run {
                            // Already in the run (a repeated PFN): nothing more to do.
                            Some((s, n)) if (s..s + n).contains(&pfn) => Some((s, n)),
                            Some((s, n)) if s + n == pfn => Some((s, n + 1)),
                            Some((s, n)) => {
                                self.discard_run(&a.mem, s, n);
                                Some((pfn, 1))
                            }
                            None => Some((pfn, 1)),
                        };
                    }
                    at += n;
                }
            }
            if truncated {
                add(&self.counters.malformed_chains, 1);
            }
            if let Some((s, n)) = run {
                self.discard_run(&a.mem, s, n);
            }
            if inflate {
                add(&self.counters.inflated_pages, pfns);
            } else {
                add(&self.counters.deflated_pages, pfns);
            }
            a.queues[qi].add_used(&a.mem, head, 0).map_err(broken)?;
            used_any = true;
        }
        if used_any {
            a.interrupt.signal_used_queue(queue_id(qi))?;
        }
        Ok(())
    }

    /// Free page reporting: each device-writable descriptor is a free range to discard.
    fn reporting_queue(&mut self, qi: usize) -> Result<(), Error> {
        let Some(a) = self.active.take() else {
            return Ok(());
        };
        let r = (|| {
            let broken = |source| Error::QueueBroken { queue: qi, source };
            let mut a = a;
            if !a.queues[qi].ready() {
                return Ok(a);
            }
            let mut used_any = false;
            while let Some(chain) = next_chain(&mut a.queues[qi], &a.mem).map_err(broken)? {
                let head = chain.head_index();
                for d in chain {
                    let (gpa, len) = (d.addr().0, u64::from(d.len()));
                    if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                        add(&self.counters.invalid_pfns, 1);
                        continue;
                    }
                    match discard(&a.mem, gpa, len, self.config.discard) {
                        Ok(()) => add(&self.counters.reported_pages, len / PAGE_SIZE),
                        Err(true) => add(&self.counters.discard_errors, 1),
                        Err(false) => add(&self.counters.invalid_pfns, 1),
                    }
                }
                a.queues[qi].add_used(&a.mem, head, 0).map_err(broken)?;
                used_any = true;
            }
            if used_any {
                a.interrupt.signal_used_queue(queue_id(qi))?;
            }
            Ok(a)
        })();
        match r {
            Ok(a) => {
                self.active = Some(a);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The guest posted (refilled) its statistics buffer: read it and hold it.
    fn stats_queue(&mut self, qi: usize) -> Result<(), Error> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let broken = |source| Error::QueueBroken { queue: qi, source };
        if !a.queues[qi].ready() {
            return Ok(());
        }
        while let Some(chain) = next_chain(&mut a.queues[qi], &a.mem).map_err(broken)? {
            let head = chain.head_index();
            if let Some(old) = self.stats_desc.replace(head) {
                // A second buffer: the spec allows one; give the older back.
                a.queues[qi].add_used(&a.mem, old, 0).map_err(broken)?;
                add(&self.counters.malformed_chains, 1);
            }
            let mut values = Vec::new();
            let mut entry = [0u8; 10];
            'chain: for d in chain {
                if d.is_write_only() {
                    add(&self.counters.malformed_chains, 1);
                    break;
                }
                let mut at = 0u64;
                while at + 10 <= u64::from(d.len()) {
                    if values.len() == MAX_STATS {
                        break 'chain;
                    }
                    let Some(addr) = d.addr().0.checked_add(at) else {
                        break 'chain;
                    };
                    if a.mem.read_slice(&mut entry, GuestAddress(addr)).is_err() {
                        break 'chain;
                    }
                    let tag = u16::from_le_bytes([entry[0], entry[1]]);
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&entry[2..]);
                    values.push((tag, u64::from_le_bytes(v)));
                    at += 10;
                }
            }
            let mut stats = crate::lock(&self.counters.stats);
            for (tag, v) in values {
                match stats.values.iter_mut().find(|(t, _)| *t == tag) {
                    Some(e) => e.1 = v,
                    None => stats.values.push((tag, v)),
                }
            }
            stats.updates += 1;
            add(&self.counters.stats_updates, 1);
        }
        Ok(())
    }

    /// The polling interval passed: return the held statistics buffer to ask for fresh values.
    fn request_stats(&mut self) -> Result<(), Error> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(qi) = a.roles.iter().position(|r| *r == Role::Stats) else {
            return Ok(());
        };
        if let Some(head) = self.stats_desc.take() {
            a.queues[qi]
                .add_used(&a.mem, head, 0)
                .map_err(|source| Error::QueueBroken { queue: qi, source })?;
            a.interrupt.signal_used_queue(queue_id(qi))?;
        }
        Ok(())
    }

    fn arm_timer(&mut self) {
        if let Some(interval) = self.config.stats_interval {
            let _ = self.timer.arm(interval);
        }
    }
}

impl<M: GuestMemoryBackend + Send> VirtioDevice<M> for Balloon<M> {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
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

    /// The driver writes `actual` (bytes 4..8); everything else is read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut c = self.config_space();
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
            else {
                continue;
            };
            if (4..8).contains(&o) {
                c[o] = *b;
            }
        }
        self.actual_pages = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        self.counters
            .actual_pages
            .store(self.actual_pages, Ordering::Relaxed);
    }

    fn activate(
        &mut self,
        mem: M,
        acked_features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), Error> {
        if queues.len() != self.sizes.len() {
            return Err(Error::QueueCount {
                expected: self.sizes.len(),
                got: queues.len(),
            });
        }
        // The driver numbers only the queues of the features it accepted.
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked_features & (1 << F_STATS_VQ) != 0 {
            roles.push(Role::Stats);
        }
        if acked_features & (1 << F_REPORTING) != 0 {
            roles.push(Role::Reporting);
        }
        self.stats_desc = None;
        self.active = Some(Active {
            mem,
            queues,
            roles,
            interrupt,
        });
        if self.config.stats_interval.is_some() && acked_features & (1 << F_STATS_VQ) != 0 {
            self.arm_timer();
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), Error> {
        let Some(a) = &self.active else {
            return Err(Error::NotActivated);
        };
        match a.roles.get(index) {
            Some(Role::Inflate) => self.pfn_queue(index, true),
            Some(Role::Deflate) => self.pfn_queue(index, false),
            Some(Role::Stats) => self.stats_queue(index),
            Some(Role::Reporting) => self.reporting_queue(index),
            None => Err(Error::InvalidQueue(index)),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.stats_desc = None;
        self.actual_pages = 0;
        self.counters.actual_pages.store(0, Ordering::Relaxed);
        let _ = self.timer.disarm();
    }

    fn host_fds(&self) -> Vec<HostFd> {
        vec![
            HostFd::readable(self.timer.as_raw_fd()),
            HostFd::readable(self.control.fd()),
        ]
    }

    fn process_host(&mut self, index: usize) -> Result<(), Error> {
        if index == 1 {
            for cmd in self.control.take() {
                match cmd {
                    BalloonCommand::SetTargetPages(p) => self.set_target_pages(p)?,
                    BalloonCommand::SetStatsInterval(d) => {
                        self.config.stats_interval = Some(d).filter(|d| !d.is_zero());
                        if self.active.is_some() {
                            self.request_stats()?;
                            self.arm_timer();
                        }
                    }
                }
            }
            return Ok(());
        }
        if index != 0 || !self.timer.expired() {
            return Ok(());
        }
        if self.active.is_none() {
            return Ok(());
        }
        let r = self.request_stats();
        self.arm_timer();
        r
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues[..])
    }

    #[cfg(feature = "serde")]
    fn save_state(&self) -> Result<serde_json::Value, Error> {
        serde_json::to_value(BalloonState {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            stats_desc: self.stats_desc,
        })
        .map_err(|e| Error::InvalidState(e.to_string()))
    }

    #[cfg(feature = "serde")]
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), Error> {
        let s: BalloonState = serde_json::from_value(state.clone())
            .map_err(|e| Error::InvalidState(format!("virtio-balloon: {e}")))?;
        if let Some(head) = s.stats_desc {
            if self.active.is_none() || head >= QUEUE_SIZE {
                return Err(Error::InvalidState(
                    "virtio-balloon: a held statistics buffer without its queue".into(),
                ));
            }
        }
        self.target_pages = s.target_pages;
        self.actual_pages = s.actual_pages;
        self.stats_desc = s.stats_desc;
        self.counters
            .target_pages
            .store(s.target_pages, Ordering::Relaxed);
        self.counters
            .actual_pages
            .store(s.actual_pages, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
