//! The virtio-mmio register file (virtio spec 1.x §4.2.2, version 2).

use std::fmt;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::state::{MmioTransportState, QueueConfigState};
use super::{
    interrupt_status, status, Error, GuestRam, MmioInterrupt, VirtioDevice, VirtioInterrupt,
    CONFIG_SPACE_OFFSET, MMIO_MAGIC, MMIO_VERSION, MMIO_WINDOW, VENDOR_ID, VIRTIO_F_VERSION_1,
};
use crate::{BusDevice, EventFdTrigger};

/// Register offsets inside the virtio-mmio window (all 32 bits wide, little endian).
pub mod regs {
    /// R: [`MMIO_MAGIC`](super::super::MMIO_MAGIC).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// R: 2.
    pub const VERSION: u64 = 0x004;
    /// R: the device type.
    pub const DEVICE_ID: u64 = 0x008;
    /// R: [`VENDOR_ID`](super::super::VENDOR_ID).
    pub const VENDOR_ID: u64 = 0x00c;
    /// R: 32 bits of the offered features, selected by `DEVICE_FEATURES_SEL`.
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// W: which 32-bit half of the offered features `DEVICE_FEATURES` shows.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// W: 32 bits of the accepted features, selected by `DRIVER_FEATURES_SEL`.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// W: which 32-bit half of the accepted features `DRIVER_FEATURES` sets.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// W: the queue the queue registers refer to.
    pub const QUEUE_SEL: u64 = 0x030;
    /// R: maximum size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// W: size of the selected queue.
    pub const QUEUE_NUM: u64 = 0x038;
    /// RW: the selected queue is ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// W: queue notification (value = queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// R: pending interrupt causes.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// W: acknowledges interrupt causes.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// RW: device status.
    pub const STATUS: u64 = 0x070;
    /// W: descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// W: descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// W: available ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// W: available ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// W: used ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// W: used ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// W: shared memory region selector (no regions: lengths read as all ones).
    pub const SHM_SEL: u64 = 0x0ac;
    /// R: selected shared memory region length, low 32 bits.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// R: selected shared memory region length, high 32 bits.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// R: selected shared memory region base, low 32 bits.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// R: selected shared memory region base, high 32 bits.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// R: configuration generation counter.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// A snapshot of the transport's counters. Everything the guest did wrong is counted here and
/// otherwise ignored (nothing a guest writes can panic the VMM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// Register accesses that are not 32-bit aligned 4-byte accesses, hit no register, read a
    /// write-only register, write a read-only one, or fall outside the window (reads got
    /// `0xff` bytes, writes were ignored).
    pub bad_accesses: u64,
    /// Feature or queue register writes in a state that does not allow them (e.g. features
    /// after FEATURES_OK, queue setup before FEATURES_OK or after DRIVER_OK, changing a queue
    /// that is already ready); ignored.
    pub invalid_state_writes: u64,
    /// Queue register writes with bogus values (size 0, above the maximum or not a power of two,
    /// a selected queue that does not exist, ...).
    pub invalid_queue_values: u64,
    /// Status writes that are not a valid step of the initialization sequence; ignored.
    pub invalid_status_transitions: u64,
    /// FEATURES_OK refused: the driver accepted features the device does not offer, or not
    /// VERSION_1.
    pub features_rejected: u64,
    /// Successful device activations.
    pub activations: u64,
    /// DRIVER_OK writes that failed to activate the device (no ready queue, a queue outside
    /// guest memory or misaligned, the device refused): DEVICE_NEEDS_RESET is set.
    pub activation_failures: u64,
    /// Device resets (status 0 written).
    pub resets: u64,
    /// Notifications handed to the device.
    pub notifications: u64,
    /// Notifications while the device is not activated (or needs a reset); ignored.
    pub notifications_ignored: u64,
    /// QueueNotify writes or notifications for a queue that does not exist.
    pub bad_notifications: u64,
    /// Errors the device returned from `process_queue`.
    pub device_errors: u64,
    /// Failures to signal an eventfd (interrupt or queue notification).
    pub signal_errors: u64,
}

/// Driver-visible configuration of one queue, before activation.
type QueueConfig = QueueConfigState;

impl QueueConfigState {
    fn new(max_size: u16) -> Self {
        QueueConfigState {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// The queue the device gets: the configured values if the driver enabled it.
    fn build<M: GuestMemoryBackend>(&self, mem: &M) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.max_size)?;
        if !self.ready {
            return Ok(q);
        }
        let size = u16::try_from(self.size).map_err(|_| virtio_queue::Error::InvalidSize)?;
        q.try_set_size(size)?;
        q.try_set_desc_table_address(GuestAddress(self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))?;
        q.try_set_used_ring_address(GuestAddress(self.used))?;
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(virtio_queue::Error::FindMemoryRegion);
        }
        Ok(q)
    }
}

/// The driver-visible initialization states, in order.
const STATES: [u32; 5] = [
    0,
    status::ACKNOWLEDGE,
    status::ACKNOWLEDGE | status::DRIVER,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
];

/// A virtio-mmio transport (register layout version 2) for one [`VirtioDevice`].
///
/// Map it on the MMIO bus with length [`MMIO_WINDOW`]; see the [module docs](super) for how the
/// VMM wires notifications and interrupts.
///
/// Device status state machine: the driver must go 0 → ACKNOWLEDGE → +DRIVER → +FEATURES_OK →
/// +DRIVER_OK (several steps in one write are accepted); FAILED may be added at any time; 0
/// resets. Anything else is counted in [`TransportCounters::invalid_status_transitions`] and
/// ignored. FEATURES_OK is refused (the bit stays clear, as the spec prescribes) if the driver
/// accepted a feature the device does not offer or not VERSION_1. DriverFeatures may only be
/// written between DRIVER and FEATURES_OK, queue registers only between FEATURES_OK and
/// DRIVER_OK. On DRIVER_OK every ready queue is checked (size, alignment, rings inside guest
/// memory) and the device activated; if that fails, DEVICE_NEEDS_RESET is set and a
/// configuration-change interrupt raised.
pub struct MmioTransport<M: GuestMemoryBackend = GuestRam> {
    device: Box<dyn VirtioDevice<M>>,
    mem: M,
    interrupt: Arc<MmioInterrupt>,
    notify_evts: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    counters: TransportCounters,
}

impl<M: GuestMemoryBackend> fmt::Debug for MmioTransport<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .field("acked_features", &self.acked_features)
            .field("interrupt_status", &self.interrupt.status())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemoryBackend + Clone + Send> MmioTransport<M> {
    /// A transport for `device` over guest memory `mem`, raising interrupts through `irq`.
    ///
    /// Fails if the device declares no queue or an invalid maximum queue size, or if an eventfd
    /// cannot be created.
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: M,
        irq: EventFdTrigger,
    ) -> Result<Self, Error> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() {
            return Err(Error::NoQueues);
        }
        let mut queues = Vec::with_capacity(sizes.len());
        let mut notify_evts = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(Error::InvalidQueueMaxSize { index, size });
            }
            queues.push(QueueConfig::new(size));
            notify_evts.push(crate::new_eventfd().map_err(Error::EventFd)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new(irq)),
            notify_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            counters: TransportCounters::default(),
        })
    }

    /// One eventfd per queue, in queue order. The VMM registers eventfd `i` as a KVM ioeventfd
    /// at `base + QUEUE_NOTIFY_OFFSET`, length 4, datamatch `i`, and polls it in its event loop.
    pub fn queue_notify_evts(&self) -> &[EventFd] {
        &self.notify_evts
    }

    /// The VMM's event loop saw queue `queue`'s notify eventfd fire: drains it and lets the
    /// device process the queue. Ignored (and counted) when the device is not activated or needs
    /// a reset. A device error that breaks the queue sets DEVICE_NEEDS_RESET and raises a
    /// configuration-change interrupt.
    pub fn process_notification(&mut self, queue: usize) {
        let Some(evt) = self.notify_evts.get(queue) else {
            self.counters.bad_notifications += 1;
            return;
        };
        // Non-blocking: nothing pending just means someone else drained it.
        let _ = evt.read();
        if !self.activated || self.status & status::DEVICE_NEEDS_RESET != 0 {
            self.counters.notifications_ignored += 1;
            return;
        }
        self.counters.notifications += 1;
        if let Err(e) = self.device.process_queue(queue) {
            self.counters.device_errors += 1;
            if e.needs_reset() {
                self.set_needs_reset();
            }
        }
    }

    /// The host descriptors the device needs watched ([`VirtioDevice::host_fds`]).
    pub fn host_fds(&self) -> Vec<super::HostFd> {
        self.device.host_fds()
    }

    /// Host descriptor `index` of the device is ready: the device handles it
    /// ([`VirtioDevice::process_host`]). An error that breaks a queue sets DEVICE_NEEDS_RESET,
    /// as for a notification.
    pub fn process_host_event(&mut self, index: usize) {
        if let Err(e) = self.device.process_host(index) {
            self.counters.device_errors += 1;
            if e.needs_reset() && self.activated {
                self.set_needs_reset();
            }
        }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice<M> {
        self.device.as_ref()
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice<M> {
        self.device.as_mut()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is activated (DRIVER_OK accepted and not reset since).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device's interrupt (status register and irqfd trigger).
    pub fn interrupt(&self) -> &MmioInterrupt {
        &self.interrupt
    }

    /// The transport's state and, while the device is activated, the device's queues and
    /// device-specific state: what a snapshot keeps. Take it while no vCPU runs and no
    /// notification is being processed (the VMM pauses the VM first). Fails if the activated
    /// device cannot give its state ([`VirtioDevice::queues`], `save_state`).
    pub fn state(&self) -> Result<MmioTransportState, Error> {
        let unsupported = || Error::StateUnsupported {
            device_type: self.device.device_type(),
        };
        let queues = if self.activated {
            let q = self.device.queues();
            if q.len() != self.queues.len() {
                return Err(unsupported());
            }
            q.iter().map(|q| q.state().into()).collect()
        } else {
            Vec::new()
        };
        Ok(MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            queue_configs: self.queues.clone(),
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
            #[cfg(feature = "serde")]
            device: if self.activated {
                self.device.save_state()?
            } else {
                serde_json::Value::Null
            },
        })
    }

    /// Puts the transport into a saved state (of a device of the same type and configuration):
    /// registers, interrupt status, and, if the device was activated, activates it with the
    /// saved queues (checked against guest memory) and restores its device-specific state. A
    /// device activated now is reset first (the VM is paused; its driver never sees it). A
    /// pending interrupt is raised again.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), Error> {
        let invalid = |why: String| Error::InvalidState(why);
        if state.device_type != self.device.device_type() {
            return Err(invalid(format!(
                "saved device type {} is not this device's {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queue_configs.len() != self.queues.len()
            || state
                .queue_configs
                .iter()
                .zip(&self.queues)
                .any(|(s, q)| s.max_size != q.max_size)
        {
            return Err(invalid("the saved queues are not this device's".into()));
        }
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        if state.activated {
            if state.queues.len() != self.queues.len() {
                return Err(invalid("saved queue states are missing".into()));
            }
            let mut queues = Vec::with_capacity(state.queues.len());
            for (i, q) in state.queues.iter().enumerate() {
                let q = Queue::try_from(virtio_queue::QueueState::from(*q))
                    .map_err(|source| Error::QueueBroken { queue: i, source })?;
                if q.ready() && !q.is_valid(&self.mem) {
                    return Err(invalid(format!("queue {i} lies outside guest memory")));
                }
                queues.push(q);
            }
            self.device.activate(
                self.mem.clone(),
                state.acked_features,
                queues,
                self.interrupt.clone() as Arc<dyn VirtioInterrupt>,
            )?;
            #[cfg(feature = "serde")]
            if let Err(e) = self.device.restore_state(&state.device) {
                self.device.reset();
                return Err(e);
            }
        }
        self.activated = state.activated;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.queues.clone_from(&state.queue_configs);
        self.interrupt.set_status(state.interrupt_status);
        if state.interrupt_status != 0 && self.interrupt.trigger().write(1).is_err() {
            self.counters.signal_errors += 1;
        }
        Ok(())
    }

    fn set_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.interrupt.signal_config().is_err() {
            self.counters.signal_errors += 1;
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for evt in &self.notify_evts {
            let _ = evt.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.clear();
        self.counters.resets += 1;
    }

    fn features_phase(&self) -> bool {
        self.status & (status::DRIVER | status::FEATURES_OK | status::FAILED) == status::DRIVER
    }

    fn queue_phase(&self) -> bool {
        self.status
            & (status::FEATURES_OK
                | status::DRIVER_OK
                | status::FAILED
                | status::DEVICE_NEEDS_RESET)
            == status::FEATURES_OK
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver writes back what it read, so the device-owned bit may be in `value`.
        let old = self.status & !(status::DEVICE_NEEDS_RESET | status::FAILED);
        let new = value & !(status::DEVICE_NEEDS_RESET | status::FAILED);
        if value & status::FAILED != 0 && new == old {
            self.status |= status::FAILED;
            return;
        }
        let (Some(from), Some(to)) = (
            STATES.iter().position(|&s| s == old),
            STATES.iter().position(|&s| s == new),
        ) else {
            self.counters.invalid_status_transitions += 1;
            return;
        };
        if to == from {
            return;
        }
        if to < from
            || self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) != 0
            || value & status::FAILED != 0
        {
            self.counters.invalid_status_transitions += 1;
            return;
        }
        if from < 3 && to >= 3 && !self.features_acceptable() {
            // The spec's way to refuse: FEATURES_OK stays clear; the driver re-reads it.
            self.counters.features_rejected += 1;
            self.status = STATES[from.max(2)] | (self.status & status::DEVICE_NEEDS_RESET);
            return;
        }
        self.status = STATES[to];
        if to == 4 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.acked_features & !offered == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut any_ready = false;
        for cfg in &self.queues {
            match cfg.build(&self.mem) {
                Ok(q) => {
                    any_ready |= cfg.ready;
                    queues.push(q);
                }
                Err(_) => {
                    self.counters.activation_failures += 1;
                    self.set_needs_reset();
                    return;
                }
            }
        }
        if !any_ready {
            self.counters.activation_failures += 1;
            self.set_needs_reset();
            return;
        }
        match self.device.activate(
            self.mem.clone(),
            self.acked_features,
            queues,
            self.interrupt.clone() as Arc<dyn VirtioInterrupt>,
        ) {
            Ok(()) => {
                self.activated = true;
                self.counters.activations += 1;
            }
            Err(_) => {
                self.counters.activation_failures += 1;
                // Leave the device in a clean state for the next attempt.
                self.device.reset();
                self.set_needs_reset();
            }
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    /// A write to one of the queue configuration registers (`QueueNum`, `QueueReady`,
    /// addresses).
    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        let in_phase = self.queue_phase();
        // Disabling a queue before DRIVER_OK is harmless (Linux does it while tearing queues
        // down after a reset).
        let benign_disable =
            offset == regs::QUEUE_READY && value == 0 && self.status & status::DRIVER_OK == 0;
        if !in_phase && !benign_disable {
            self.counters.invalid_state_writes += 1;
            return;
        }
        let counters = &mut self.counters;
        let Some(q) = self
            .queue_sel
            .try_into()
            .ok()
            .and_then(|i: usize| self.queues.get_mut(i))
        else {
            counters.invalid_queue_values += 1;
            return;
        };
        if q.ready && offset != regs::QUEUE_READY {
            counters.invalid_state_writes += 1;
            return;
        }
        let hi = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        let lo = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        match offset {
            regs::QUEUE_NUM => {
                if value == 0 || value > u32::from(q.max_size) || !value.is_power_of_two() {
                    counters.invalid_queue_values += 1;
                }
                // Stored as is; activation refuses an invalid size.
                q.size = value;
            }
            regs::QUEUE_READY => match value {
                0 => q.ready = false,
                1 => q.ready = true,
                _ => counters.invalid_queue_values += 1,
            },
            regs::QUEUE_DESC_LOW => q.desc = lo(q.desc),
            regs::QUEUE_DESC_HIGH => q.desc = hi(q.desc),
            regs::QUEUE_DRIVER_LOW => q.avail = lo(q.avail),
            regs::QUEUE_DRIVER_HIGH => q.avail = hi(q.avail),
            regs::QUEUE_DEVICE_LOW => q.used = lo(q.used),
            regs::QUEUE_DEVICE_HIGH => q.used = hi(q.used),
            _ => counters.bad_accesses += 1,
        }
    }

    fn read_reg(&mut self, offset: u64) -> Option<u32> {
        let v = match offset {
            regs::MAGIC_VALUE => MMIO_MAGIC,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => {
                let f = self.device.features();
                #[allow(
                    clippy::cast_possible_truncation,
                    reason = "low half of the 64-bit feature bits; the high half is selector 1"
                )]
                let low = f as u32;
                match self.device_features_sel {
                    0 => low,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH | regs::SHM_BASE_LOW | regs::SHM_BASE_HIGH => {
                u32::MAX
            }
            regs::CONFIG_GENERATION => 0,
            _ => return None,
        };
        Some(v)
    }

    fn write_reg(&mut self, offset: u64, value: u32) -> bool {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => {
                if !self.features_phase() {
                    self.counters.invalid_state_writes += 1;
                } else {
                    match self.driver_features_sel {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        // No feature bits up there: only zeros are acceptable.
                        _ if value == 0 => {}
                        _ => self.counters.invalid_state_writes += 1,
                    }
                }
            }
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_DRIVER_LOW
            | regs::QUEUE_DRIVER_HIGH
            | regs::QUEUE_DEVICE_LOW
            | regs::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            regs::QUEUE_NOTIFY => {
                // Only reached when the VMM registered no ioeventfd (or the value matched none):
                // signal the same eventfd so the work still happens in the event loop.
                match usize::try_from(value)
                    .ok()
                    .and_then(|i| self.notify_evts.get(i))
                {
                    Some(evt) => {
                        if evt.write(1).is_err() {
                            self.counters.signal_errors += 1;
                        }
                    }
                    None => self.counters.bad_notifications += 1,
                }
            }
            regs::INTERRUPT_ACK => {
                if value & !(interrupt_status::USED_BUFFER | interrupt_status::CONFIG_CHANGE) != 0 {
                    self.counters.bad_accesses += 1;
                }
                self.interrupt.ack(value);
            }
            regs::STATUS => self.write_status(value),
            regs::SHM_SEL => {}
            _ => return false,
        }
        true
    }
}

/// Whether `[offset, offset + len)` is a config space access the transport forwards.
fn config_access(offset: u64, len: usize) -> bool {
    offset >= CONFIG_SPACE_OFFSET
        && (1..=8).contains(&len)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= MMIO_WINDOW)
}

impl<M: GuestMemoryBackend + Clone + Send> BusDevice for MmioTransport<M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if config_access(offset, data.len()) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                data.fill(0xff);
                self.counters.bad_accesses += 1;
            }
            return;
        }
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_reg(offset)
        } else {
            None
        };
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => {
                data.fill(0xff);
                self.counters.bad_accesses += 1;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if config_access(offset, data.len()) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                self.counters.bad_accesses += 1;
            }
            return;
        }
        let ok = match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(bytes))
            }
            _ => false,
        };
        if !ok {
            self.counters.bad_accesses += 1;
        }
    }
}
