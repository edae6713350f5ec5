#![allow(
    clippy::cast_possible_truncation,
    reason = "test PFNs and queue indices are small"
)]

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::virtio::testing::{self, Buf, GuestQueue};
use crate::virtio::{MmioTransport, CONFIG_SPACE_OFFSET, QUEUE_NOTIFY_OFFSET};
use crate::{BusDevice, EventFdTrigger};

const MIB: u64 = 1 << 20;

fn config(stats: bool, reporting: bool) -> BalloonConfig {
    BalloonConfig {
        target_pages: 256,
        stats_interval: stats.then(|| Duration::from_millis(20)),
        deflate_on_oom: true,
        free_page_reporting: reporting,
        discard: Discard::DontNeed,
    }
}

struct Fixture {
    mem: GuestRam,
    t: MmioTransport<GuestRam>,
    queues: Vec<GuestQueue>,
    handle: BalloonHandle,
    irq: EventFdTrigger,
}

fn fixture(cfg: BalloonConfig, wanted: u64) -> Fixture {
    let mem = ember_memory::ram_from_ranges(
        &[(GuestAddress(0), 16 << 20)],
        ember_memory::DirtyBitmap::Off,
    )
    .unwrap();
    let b = Balloon::new(cfg).unwrap();
    let handle = b.handle();
    let irq = EventFdTrigger::new().unwrap();
    let mut t = MmioTransport::new(Box::new(b), mem.clone(), irq.try_clone().unwrap()).unwrap();
    let offered = testing::read_device_features(&mut t);
    let acked = offered & wanted;
    let n = 2
        + usize::from(acked & (1 << F_STATS_VQ) != 0)
        + usize::from(acked & (1 << F_REPORTING) != 0);
    let queues: Vec<_> = (0..n)
        .map(|i| GuestQueue::new(&mem, 16, GuestAddress(0x1000 * (i as u64 + 1))).unwrap())
        .collect();
    let refs: Vec<&GuestQueue> = queues.iter().collect();
    testing::driver_init(&mut t, &refs, Some(wanted)).unwrap();
    Fixture {
        mem,
        t,
        queues,
        handle,
        irq,
    }
}

impl Fixture {
    fn kick(&mut self, q: u32) {
        testing::write_reg(&mut self.t, QUEUE_NOTIFY_OFFSET, q);
        self.t.process_notification(q as usize);
    }

    fn resident(&self, gpa: u64, len: u64) -> usize {
        let host = self.mem.get_host_address(GuestAddress(gpa)).unwrap();
        let pages = (len / 4096) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: [host, host + len) is mapped guest memory; `vec` has one byte per page.
        let r = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    fn write_pfns(&self, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }
}

#[test]
fn inflating_discards_the_pages_from_the_host() {
    let mut f = fixture(config(false, false), u64::MAX);
    // The guest touches 1 MiB at 4 MiB.
    f.mem
        .write_slice(&vec![0x5a; MIB as usize], GuestAddress(4 * MIB))
        .unwrap();
    assert_eq!(f.resident(4 * MIB, MIB), 256);
    let pfns: Vec<u32> = (0..256).map(|i| (4 * MIB / 4096) as u32 + i).collect();
    let len = f.write_pfns(0x10000, &pfns);
    let head = f.queues[0]
        .add_chain(&[Buf::readable(0x10000, len)])
        .unwrap();
    f.kick(0);
    assert_eq!(f.queues[0].pop_used(), Some((u32::from(head), 0)));
    assert_eq!(f.resident(4 * MIB, MIB), 0, "the pages left the host");
    let mut b = [1u8; 16];
    f.mem.read_slice(&mut b, GuestAddress(4 * MIB)).unwrap();
    assert_eq!(b, [0; 16], "a discarded page reads as zeroes");
    let c = f.handle.snapshot();
    assert_eq!((c.inflated_pages, c.invalid_pfns), (256, 0));
    assert!(f.irq.read().unwrap() >= 1);
}

#[test]
fn pfns_outside_ram_are_skipped_and_counted() {
    let mut f = fixture(config(false, false), u64::MAX);
    f.mem.write_slice(&[7u8; 4096], GuestAddress(MIB)).unwrap();
    let pfns = [
        u32::MAX,
        (MIB / 4096) as u32,
        (16 * MIB / 4096) as u32,
        0xfff_ffff,
    ];
    let len = f.write_pfns(0x10000, &pfns);
    f.queues[0]
        .add_chain(&[Buf::readable(0x10000, len)])
        .unwrap();
    // A device-writable chain on the inflate queue.
    f.queues[0]
        .add_chain(&[Buf::writable(0x10000, 16)])
        .unwrap();
    // A descriptor outside RAM.
    f.queues[0]
        .add_chain(&[Buf::readable(0xffff_0000, 16)])
        .unwrap();
    f.kick(0);
    for _ in 0..3 {
        assert!(f.queues[0].pop_used().is_some());
    }
    let c = f.handle.snapshot();
    assert_eq!(c.invalid_pfns, 4, "{c:?}");
    assert_eq!(c.malformed_chains, 1);
    assert_eq!(f.resident(MIB, 4096), 0, "the valid PFN was discarded");
}

#[test]
fn config_space_has_the_target_and_takes_actual() {
    let mut f = fixture(config(false, false), u64::MAX);
    let mut b = [0u8; 4];
    f.t.read(CONFIG_SPACE_OFFSET, &mut b);
    assert_eq!(u32::from_le_bytes(b), 256);
    f.t.write(CONFIG_SPACE_OFFSET + 4, &100u32.to_le_bytes());
    // num_pages is the host's: a guest write there is ignored.
    f.t.write(CONFIG_SPACE_OFFSET, &7u32.to_le_bytes());
    f.t.read(CONFIG_SPACE_OFFSET, &mut b);
    assert_eq!(u32::from_le_bytes(b), 256);
    let c = f.handle.snapshot();
    assert_eq!((c.target_pages, c.actual_pages), (256, 100));
}

#[test]
fn statistics_are_read_and_requested_every_interval() {
    let mut f = fixture(config(true, false), u64::MAX);
    assert_eq!(f.queues.len(), 3);
    let mut entries = Vec::new();
    for (tag, v) in [
        (stat::FREE_MEMORY, 10 * MIB),
        (stat::TOTAL_MEMORY, 16 * MIB),
    ] {
        entries.extend_from_slice(&tag.to_le_bytes());
        entries.extend_from_slice(&v.to_le_bytes());
    }
    f.mem.write_slice(&entries, GuestAddress(0x10000)).unwrap();
    let head = f.queues[2]
        .add_chain(&[Buf::readable(0x10000, entries.len() as u32)])
        .unwrap();
    f.kick(2);
    assert_eq!(f.queues[2].pop_used(), None, "the device holds the buffer");
    let s = f.handle.stats();
    assert_eq!(s.get(stat::FREE_MEMORY), Some(10 * MIB));
    assert_eq!(s.get(stat::TOTAL_MEMORY), Some(16 * MIB));
    std::thread::sleep(Duration::from_millis(40));
    f.t.process_host_event(0);
    assert_eq!(
        f.queues[2].pop_used(),
        Some((u32::from(head), 0)),
        "returned when the interval passed"
    );
}

#[test]
fn queues_are_numbered_by_the_features_the_driver_took() {
    // Statistics offered but refused: the reporting queue is queue 2.
    let mut f = fixture(config(true, true), !(1u64 << F_STATS_VQ));
    assert_eq!(f.queues.len(), 3);
    f.mem
        .write_slice(&[9u8; 8192], GuestAddress(2 * MIB))
        .unwrap();
    assert_eq!(f.resident(2 * MIB, 8192), 2);
    let head = f.queues[2]
        .add_chain(&[Buf::writable(2 * MIB, 8192)])
        .unwrap();
    f.kick(2);
    assert_eq!(f.queues[2].pop_used(), Some((u32::from(head), 0)));
    assert_eq!(f.resident(2 * MIB, 8192), 0);
    assert_eq!(f.handle.snapshot().reported_pages, 2);
}

#[test]
fn a_new_target_raises_a_configuration_interrupt() {
    let mem = ember_memory::ram_from_ranges(
        &[(GuestAddress(0), 16 << 20)],
        ember_memory::DirtyBitmap::Off,
    )
    .unwrap();
    let mut b: Balloon<GuestRam> = Balloon::new(config(false, false)).unwrap();
    let irq = EventFdTrigger::new().unwrap();
    let interrupt = Arc::new(crate::virtio::MmioInterrupt::new(irq.try_clone().unwrap()));
    let q = || Queue::new(16).unwrap();
    b.activate(mem, VIRTIO_F_VERSION_1, vec![q(), q()], interrupt.clone())
        .unwrap();
    b.set_target_pages(512).unwrap();
    assert_eq!(
        interrupt.status() & crate::virtio::interrupt_status::CONFIG_CHANGE,
        2
    );
    assert_eq!(irq.read().unwrap(), 1);
    let mut c = [0u8; 4];
    b.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes(c), 512);
}

#[test]
fn the_target_changes_through_the_handle() {
    let mut f = fixture(config(false, false), u64::MAX);
    f.handle.send(BalloonCommand::SetTargetPages(300)).unwrap();
    let _ = f.irq.read();
    // Host descriptor 1: the control mailbox.
    f.t.process_host_event(1);
    let mut b = [0u8; 4];
    f.t.read(CONFIG_SPACE_OFFSET, &mut b);
    assert_eq!(u32::from_le_bytes(b), 300);
    assert_eq!(f.handle.snapshot().target_pages, 300);
    assert_eq!(f.irq.read().unwrap(), 1, "a configuration-change interrupt");
    let status = testing::read_reg(&mut f.t, crate::virtio::regs::INTERRUPT_STATUS);
    assert_eq!(status & crate::virtio::interrupt_status::CONFIG_CHANGE, 2);
}
