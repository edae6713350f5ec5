//! The device manager: the port and MMIO buses, the MMIO-window and interrupt-line allocators,
//! the firmware and command-line descriptions of the devices, and every virtio device.
//!
//! [`DeviceManager::attach_virtio`] is the one way in for a virtio device: it allocates a
//! window and a GSI, wires the irqfd and one ioeventfd per queue into KVM, maps the transport
//! on the MMIO bus and records the ACPI and command-line descriptions. A new device type costs
//! its constructor and its config struct.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ember_boot::acpi::{AcpiDevice, SLEEP_CONTROL_PORT};
use ember_devices::acpi_pm::{AcpiPmRegisters, ACPI_PM_LEN};
use ember_devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use ember_devices::i8042::{I8042, I8042_BASE, I8042_LEN, KEYBOARD_IRQ};
use ember_devices::mailbox::MailboxSender;
use ember_devices::pvpanic::{PvPanic, PVPANIC_PORT};
use ember_devices::serial::{OutputBuffer, SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use ember_devices::virtio::balloon::BalloonHandle;
use ember_devices::virtio::block::{BlockCommand, FileDisk};
use ember_devices::virtio::net::NetCommand;
use ember_devices::virtio::{MmioTransport, VirtioDevice, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use ember_devices::{lock, Buses, EventFdTrigger, SharedDevice};
use ember_memory::{GuestRam, MemoryLayout};
use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;

use crate::error::Error;
use crate::outcome::{DeviceCounters, DeviceReport};

/// First GSI handed to virtio-mmio devices (0-4 are the PIT, PIC cascade, COM1 ...).
pub const FIRST_VIRTIO_GSI: u32 = 5;
/// Last IOAPIC GSI.
pub const LAST_GSI: u32 = 23;

/// The legacy devices of every Ember VM, and what the VMM watches of them.
pub(crate) struct LegacyDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest drained the input the host gave COM1.
    pub serial_drained: EventFd,
    /// The i8042 and ACPI reset requests.
    pub reset_evt: EventFd,
    /// pvpanic.
    pub panic_evt: EventFd,
    /// ACPI S5.
    pub poweroff_evt: EventFd,
    /// The guest's first boot-timer write.
    pub boot_time: Arc<OnceLock<Duration>>,
    /// pvpanic.
    pub pvpanic: Arc<Mutex<PvPanic>>,
    /// The ACPI PM registers.
    pub acpi_pm: Arc<Mutex<AcpiPmRegisters>>,
    /// The boot timer.
    pub boot_timer: Arc<Mutex<BootTimer>>,
    /// The i8042 (for Ctrl+Alt+Del from the host).
    pub i8042: Arc<Mutex<I8042>>,
}

/// What another thread may send a running device (from [`VmHandle::device_control`](crate::VmHandle::device_control)).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum DeviceControl {
    /// A disk: new image, new rate limiter.
    Block(MailboxSender<BlockCommand<FileDisk>>),
    /// A network interface: new rate limiters.
    Net(MailboxSender<NetCommand>),
    /// The balloon: new target, new statistics interval; its statistics.
    Balloon(BalloonHandle),
}

/// What [`DeviceManager::attach_virtio`] attaches.
pub struct VirtioSpec {
    /// The device's id (unique in the VM; a disk's `id`, or `disk<N>`).
    pub id: String,
    /// What backs it, for reports (a disk's image path).
    pub backing: String,
    /// The device.
    pub device: Box<dyn VirtioDevice>,
    /// Reads the device's counters (from any thread, without locking the device).
    pub counters: Box<dyn Fn() -> DeviceCounters + Send + Sync>,
    /// Its control, if it takes commands at run time.
    pub control: Option<DeviceControl>,
}

/// One attached virtio-mmio device.
pub(crate) struct VirtioSlot {
    pub id: String,
    pub backing: String,
    pub device_type: u32,
    pub mmio_base: u64,
    pub gsi: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub counters: Box<dyn Fn() -> DeviceCounters + Send + Sync>,
    pub control: Option<DeviceControl>,
}

impl VirtioSlot {
    pub(crate) fn report(&self) -> DeviceReport {
        let t = lock(&self.transport);
        let (transport, activated) = (t.counters(), t.is_activated());
        drop(t);
        DeviceReport {
            id: self.id.clone(),
            device_type: self.device_type,
            backing: self.backing.clone(),
            mmio_base: self.mmio_base,
            gsi: self.gsi,
            transport,
            activated,
            counters: (self.counters)(),
        }
    }
}

/// The buses, allocators and device descriptions of a VM being built.
pub(crate) struct DeviceManager {
    buses: Buses,
    windows: AddressAllocator,
    gsis: IdAllocator,
    acpi_devices: Vec<AcpiDevice>,
    cmdline_devices: Vec<String>,
    virtio: Vec<VirtioSlot>,
}

fn alloc_err(what: &'static str) -> impl Fn(vm_allocator::Error) -> Error {
    move |source| Error::Allocate { what, source }
}

impl DeviceManager {
    /// Empty buses, the layout's 32-bit MMIO window for virtio devices and GSIs
    /// [`FIRST_VIRTIO_GSI`]..=[`LAST_GSI`].
    pub(crate) fn new(layout: &MemoryLayout) -> Result<Self, Error> {
        let (window_start, window_len) = layout.mmio32_window();
        Ok(DeviceManager {
            buses: Buses::default(),
            windows: AddressAllocator::new(window_start, window_len)
                .map_err(alloc_err("MMIO windows"))?,
            gsis: IdAllocator::new(FIRST_VIRTIO_GSI, LAST_GSI)
                .map_err(alloc_err("interrupt lines"))?,
            acpi_devices: Vec::new(),
            cmdline_devices: Vec::new(),
            virtio: Vec::new(),
        })
    }

    /// COM1 (its interrupt an irqfd of IRQ 4, its output into `output`, which the event loop
    /// drains), the i8042, the boot timer, pvpanic and the ACPI PM registers, on the port bus.
    pub(crate) fn attach_legacy(
        &mut self,
        vm_fd: &VmFd,
        output: OutputBuffer,
        process_start: std::time::Instant,
    ) -> Result<LegacyDevices, Error> {
        let eventfd = || ember_devices::new_eventfd().map_err(Error::EventFd);
        let clone = |e: &EventFd| e.try_clone().map_err(Error::EventFd);
        let serial_irq = EventFdTrigger::new()?;
        vm_fd
            .register_irqfd(serial_irq.eventfd(), COM1_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let serial = SerialDevice::with_output_buffer(serial_irq, output)?;
        let serial_drained = clone(serial.input_drained_evt())?;
        let serial = Arc::new(Mutex::new(serial));
        let reset_evt = eventfd()?;
        let panic_evt = eventfd()?;
        let poweroff_evt = eventfd()?;
        let kbd_irq = EventFdTrigger::new()?;
        vm_fd
            .register_irqfd(kbd_irq.eventfd(), KEYBOARD_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let i8042 = Arc::new(Mutex::new(
            I8042::new(EventFdTrigger::from(clone(&reset_evt)?)).with_keyboard_interrupt(kbd_irq),
        ));
        let pvpanic = PvPanic::new(EventFdTrigger::from(clone(&panic_evt)?));
        let acpi_pm = AcpiPmRegisters::new(
            EventFdTrigger::from(clone(&poweroff_evt)?),
            EventFdTrigger::from(clone(&reset_evt)?),
        );
        let boot_timer = BootTimer::new(process_start);
        let boot_time = boot_timer.handle();
        let boot_timer = Arc::new(Mutex::new(boot_timer));
        let pvpanic = Arc::new(Mutex::new(pvpanic));
        let acpi_pm = Arc::new(Mutex::new(acpi_pm));
        let pio = &mut self.buses.pio;
        pio.insert(serial.clone() as SharedDevice, COM1_BASE, COM1_LEN)?;
        pio.insert(i8042.clone(), I8042_BASE, I8042_LEN)?;
        pio.insert(boot_timer.clone(), BOOT_TIMER_PORT, 1)?;
        pio.insert(pvpanic.clone(), PVPANIC_PORT, 1)?;
        pio.insert(acpi_pm.clone(), u64::from(SLEEP_CONTROL_PORT), ACPI_PM_LEN)?;
        #[allow(clippy::cast_possible_truncation, reason = "COM1_BASE is 0x3f8")]
        let port = COM1_BASE as u16;
        self.acpi_devices.push(AcpiDevice::Uart {
            port,
            irq: COM1_IRQ,
        });
        self.acpi_devices.push(AcpiDevice::VmGenId {
            addr: ember_memory::addresses::VMGENID_ADDR,
            gsi: crate::vmgenid::GED_GSI,
        });
        Ok(LegacyDevices {
            serial,
            serial_drained,
            reset_evt,
            panic_evt,
            poweroff_evt,
            boot_time,
            pvpanic,
            acpi_pm,
            boot_timer,
            i8042,
        })
    }

    /// Maps a port I/O device the builder was given.
    pub(crate) fn attach_port_device(
        &mut self,
        device: SharedDevice,
        base: u64,
        len: u64,
    ) -> Result<(), Error> {
        self.buses.pio.insert(device, base, len)?;
        Ok(())
    }

    /// Attaches a virtio device over virtio-mmio: a window and a GSI from the allocators, the
    /// irqfd and the per-queue ioeventfds, the transport on the MMIO bus, its ACPI and
    /// command-line descriptions. Returns its slot index.
    pub(crate) fn attach_virtio(
        &mut self,
        vm_fd: &VmFd,
        mem: &GuestRam,
        spec: VirtioSpec,
    ) -> Result<usize, Error> {
        let device_err = |source| Error::Device {
            id: spec.id.clone(),
            source,
        };
        let mmio_base = self
            .windows
            .allocate(MMIO_WINDOW, MMIO_WINDOW, AllocPolicy::FirstMatch)
            .map_err(alloc_err("a virtio-mmio window"))?
            .start();
        let gsi = self
            .gsis
            .allocate_id()
            .map_err(alloc_err("a virtio interrupt line"))?;
        let device_type = spec.device.device_type();
        let irq = EventFdTrigger::new()?;
        let irq_evt = irq.try_clone()?;
        let transport = MmioTransport::new(spec.device, mem.clone(), irq).map_err(device_err)?;
        ember_vcpu::vm::register_virtio_mmio(
            vm_fd,
            mmio_base,
            QUEUE_NOTIFY_OFFSET,
            gsi,
            irq_evt.eventfd(),
            transport.queue_notify_evts(),
        )?;
        let transport = Arc::new(Mutex::new(transport));
        self.buses
            .mmio
            .insert(transport.clone() as SharedDevice, mmio_base, MMIO_WINDOW)?;
        self.acpi_devices.push(AcpiDevice::VirtioMmio {
            base: mmio_base,
            len: MMIO_WINDOW,
            gsi,
        });
        self.cmdline_devices
            .push(format!("virtio_mmio.device=4K@{mmio_base:#x}:{gsi}"));
        self.virtio.push(VirtioSlot {
            id: spec.id,
            backing: spec.backing,
            device_type,
            mmio_base,
            gsi,
            transport,
            counters: spec.counters,
            control: spec.control,
        });
        Ok(self.virtio.len() - 1)
    }

    /// Where each virtio device sits, in attach order.
    pub(crate) fn placements(&self) -> Vec<crate::snapshot::DevicePlacement> {
        self.virtio
            .iter()
            .map(|v| crate::snapshot::DevicePlacement {
                id: v.id.clone(),
                device_type: v.device_type,
                mmio_base: v.mmio_base,
                gsi: v.gsi,
            })
            .collect()
    }

    /// The devices the ACPI tables describe.
    pub(crate) fn acpi_devices(&self) -> &[AcpiDevice] {
        &self.acpi_devices
    }

    /// The `virtio_mmio.device=` words a guest without ACPI needs.
    pub(crate) fn cmdline_devices(&self) -> &[String] {
        &self.cmdline_devices
    }

    /// The buses (for the vCPUs) and the virtio slots (for the event loop and reports).
    pub(crate) fn into_parts(self) -> (Buses, Vec<VirtioSlot>) {
        (self.buses, self.virtio)
    }
}
