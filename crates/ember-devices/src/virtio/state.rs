//! Plain-data state of a virtio-mmio transport and its queues, for snapshots (serde with the
//! `serde` feature).

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// A virtqueue as the driver configured it and the device left it: virtio-queue's
/// [`virtio_queue::QueueState`], field for field, as plain data that serializes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct QueueState {
    /// The maximum size in elements offered by the device.
    pub max_size: u16,
    /// Where the device is in the available ring.
    pub next_avail: u16,
    /// Where the device is in the used ring.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// The queue size the driver selected.
    pub size: u16,
    /// The driver finished configuring the queue.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(q: QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// One queue's registers as the driver wrote them through the transport (before activation,
/// or while the device is not activated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct QueueConfigState {
    /// QueueNumMax.
    pub max_size: u16,
    /// QueueNum as written (possibly invalid; activation refuses it then).
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver (available ring).
    pub avail: u64,
    /// QueueDevice (used ring).
    pub used: u64,
}

/// Everything a virtio-mmio transport must keep across a snapshot: its registers, the
/// interrupt status, and, while the device is activated, the device's queues (with the
/// device's positions in them) and the device-specific state.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct MmioTransportState {
    /// The device type behind the transport (a restore into another type is refused).
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Per queue, the registers the driver wrote.
    pub queue_configs: Vec<QueueConfigState>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device is activated; then `queues` holds its queues.
    pub activated: bool,
    /// The activated device's queues.
    pub queues: Vec<QueueState>,
    /// Device-specific state ([`VirtioDevice::save_state`](super::VirtioDevice::save_state)).
    #[cfg(feature = "serde")]
    pub device: serde_json::Value,
}
