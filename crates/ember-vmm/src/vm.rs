//! Building and running one microVM.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_boot::acpi::{AcpiConfig, AcpiDevice, SLEEP_CONTROL_PORT};
use ember_devices::acpi_pm::AcpiPmRegisters;
use ember_devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use ember_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use ember_devices::pvpanic::{PvPanic, PVPANIC_PORT};
use ember_devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ};
use ember_devices::virtio::block::{Block, BlockConfig, BlockCounters, BlockCountersHandle};
use ember_devices::virtio::{MmioTransport, TransportCounters, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use ember_devices::{Bus, EventFdTrigger, SharedDevice};
use ember_loader::{BootProtocol, LoadedKernel};
use ember_memory::addresses::*;
use ember_memory::MemoryLayout;
use ember_vcpu::{BootRegs, EntryMode, IoHandler, Vcpu, VcpuStop};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::cmdline::KernelCmdline;
use crate::config::{BootProtocolChoice, VmConfig};
use crate::control::VcpuControl;
use crate::error::Error;
use crate::process_start;

/// First GSI handed to virtio-mmio devices (0-4 are the PIT, PIC cascade, COM1 ...).
const FIRST_VIRTIO_GSI: u32 = 5;
/// Last IOAPIC GSI.
const LAST_GSI: u32 = 23;

/// Ports of the ACPI PM registers: sleep control, sleep status, reset.
const ACPI_PM_LEN: u64 = 3;

/// Address of the TSS KVM needs on Intel hosts (three pages below the BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset, or a KVM reset event). A clean exit.
    Reset,
    /// The guest powered the machine off (KVM shutdown event). A clean exit.
    Poweroff,
    /// The guest reported a panic (pvpanic port, or a KVM crash event).
    GuestPanic,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// KVM could not emulate a guest instruction (`KVM_EXIT_INTERNAL_ERROR`, suberror 1).
    EmulationFailure {
        /// Guest RIP of the instruction.
        rip: u64,
        /// Up to 15 instruction bytes at RIP, when they could be read.
        insn: Vec<u8>,
    },
    /// A vCPU stopped with another error.
    VcpuError(String),
    /// The VMM was asked to stop (through a [`VmHandle`]).
    Stopped,
}

impl VmExit {
    /// Whether this is an ordinary end of the guest (reset or poweroff).
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::Poweroff)
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::Poweroff => write!(f, "guest powered off"),
            VmExit::GuestPanic => write!(f, "guest panic"),
            VmExit::TripleFault => write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN)"),
            VmExit::EmulationFailure { rip, insn } => {
                write!(
                    f,
                    "emulation failure: KVM could not emulate the instruction at rip {rip:#x}"
                )?;
                if insn.is_empty() {
                    write!(f, " (instruction bytes unreadable)")
                } else {
                    write!(f, ", bytes")?;
                    for b in insn {
                        write!(f, " {b:02x}")?;
                    }
                    Ok(())
                }
            }
            VmExit::VcpuError(e) => write!(f, "vCPU error: {e}"),
            VmExit::Stopped => write!(f, "stopped by the VMM"),
        }
    }
}

/// Time spent in each start-up phase, in order.
#[derive(Clone, Debug, Default)]
pub struct StartupTimings {
    /// `(phase name, duration)` pairs in the order they ran.
    pub phases: Vec<(&'static str, Duration)>,
}

impl StartupTimings {
    fn record(&mut self, name: &'static str, since: &mut Instant) {
        let now = Instant::now();
        self.phases.push((name, now - *since));
        *since = now;
    }

    /// Sum of all phases.
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, d)| *d).sum()
    }
}

/// A virtio-blk disk of a VM: where it sits and what it did.
#[derive(Clone, Debug)]
pub struct DiskReport {
    /// The image file.
    pub path: PathBuf,
    /// Base of its virtio-mmio window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub gsi: u32,
    /// Request counters (reads, writes, errors, malformed chains ...).
    pub block: BlockCounters,
    /// Transport counters (bad register accesses, invalid state transitions ...).
    pub transport: TransportCounters,
}

/// One attached virtio-mmio disk.
struct VirtioDisk {
    path: PathBuf,
    base: u64,
    gsi: u32,
    transport: Arc<Mutex<MmioTransport>>,
    counters: BlockCountersHandle,
}

impl VirtioDisk {
    fn report(&self) -> DiskReport {
        DiskReport {
            path: self.path.clone(),
            mmio_base: self.base,
            gsi: self.gsi,
            block: self.counters.snapshot(),
            transport: lock(&self.transport).counters(),
        }
    }
}

/// What [`Vm::run`] returns.
#[derive(Clone, Debug)]
pub struct VmOutcome {
    /// Why the VM ended.
    pub exit: VmExit,
    /// Time from VMM process start to the guest's first boot-timer write, if it wrote.
    pub boot_time: Option<Duration>,
    /// Time from VMM process start to the first `KVM_RUN`.
    pub first_run: Option<Duration>,
    /// Port or MMIO accesses that hit no device.
    pub unhandled_io: u64,
    /// Every virtio-blk disk, with its counters at the end of the run.
    pub disks: Vec<DiskReport>,
}

/// A clonable handle to a running VM: feed its console, ask it to stop.
#[derive(Clone)]
pub struct VmHandle {
    stop_evt: Arc<EventFd>,
    input_evt: Arc<EventFd>,
    input: Arc<Mutex<VecDeque<u8>>>,
    control: Arc<VcpuControl>,
    // Weak: a console sink may hold a handle, and the devices hold the sink.
    io: std::sync::Weak<DeviceIo>,
}

impl VmHandle {
    /// Asks the VM to stop; [`Vm::run`] then returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        // An eventfd write only fails if the counter would overflow, which a stop cannot cause.
        let _ = self.stop_evt.write(1);
    }

    /// Pauses every vCPU: returns once none is inside `KVM_RUN` (at most about 5 s; `false`
    /// if some vCPU did not leave in that time). Devices and the event loop keep running.
    pub fn pause(&self) -> bool {
        self.control.pause()
    }

    /// Resumes vCPUs paused by [`pause`](Self::pause).
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Guest port and MMIO accesses so far that hit no device (e.g. the probe's exit loop).
    pub fn unhandled_io(&self) -> u64 {
        self.io
            .upgrade()
            .map_or(0, |io| io.pio.unhandled() + io.mmio.unhandled())
    }

    /// A descriptor that stops the VM when an 8-byte native-endian non-zero integer is written
    /// to it. Writing is async-signal-safe, so a SIGTERM handler may use it.
    pub fn stop_fd(&self) -> RawFd {
        self.stop_evt.as_raw_fd()
    }

    /// Queues bytes for the guest's serial console.
    pub fn send_serial(&self, bytes: &[u8]) {
        lock(&self.input).extend(bytes.iter().copied());
        let _ = self.input_evt.write(1);
    }
}

/// Builder for a [`Vm`]: a configuration plus where the console goes.
pub struct VmBuilder {
    config: VmConfig,
    serial_out: Option<Box<dyn Write + Send>>,
    serial_in: Option<RawFd>,
    kvm_path: PathBuf,
}

impl VmBuilder {
    /// Starts a builder from a configuration.
    pub fn new(config: VmConfig) -> Self {
        VmBuilder {
            config,
            serial_out: None,
            serial_in: None,
            kvm_path: PathBuf::from("/dev/kvm"),
        }
    }

    /// The KVM device to open (default `/dev/kvm`).
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_path = path.into();
        self
    }

    /// Where the guest's serial output goes (default: the VMM's stdout).
    pub fn serial_output(mut self, out: Box<dyn Write + Send>) -> Self {
        self.serial_out = Some(out);
        self
    }

    /// A file descriptor (e.g. stdin) whose bytes feed the guest's serial input.
    ///
    /// The descriptor is only read, never closed, and should be non-blocking or a terminal/pipe
    /// that is read only when readable.
    pub fn serial_input_fd(mut self, fd: RawFd) -> Self {
        self.serial_in = Some(fd);
        self
    }

    /// Builds the VM: memory, kernel, boot parameters, KVM VM, devices, vCPU.
    pub fn build(self) -> Result<Vm, Error> {
        Vm::build(self)
    }
}

/// The VMM's stdout, flushed after every write so the guest's console is never held back.
pub struct UnbufferedStdout;

impl Write for UnbufferedStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// The devices the vCPUs reach through port and MMIO exits.
struct DeviceIo {
    pio: Bus,
    mmio: Bus,
}

impl IoHandler for DeviceIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

/// A built microVM, ready to [`run`](Vm::run).
pub struct Vm {
    // Kept open for the VM's lifetime: the VM fd needs the KVM fd only at creation, but
    // dropping order matters to nobody and holding it documents ownership.
    _kvm: Kvm,
    vm_fd: VmFd,
    memory: GuestMemoryMmap,
    layout: MemoryLayout,
    kernel: LoadedKernel,
    protocol: BootProtocol,
    vcpus: Vec<Vcpu>,
    io: Arc<DeviceIo>,
    disks: Vec<VirtioDisk>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_drained: EventFd,
    serial_in: Option<RawFd>,
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    panic_evt: EventFd,
    cmdline: String,
    boot_time: Arc<OnceLock<Duration>>,
    handle: VmHandle,
    timings: StartupTimings,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Vm {
    /// Shorthand for `VmBuilder::new(config)`.
    pub fn builder(config: VmConfig) -> VmBuilder {
        VmBuilder::new(config)
    }

    fn build(b: VmBuilder) -> Result<Vm, Error> {
        let config = b.config;
        config.validate()?;
        let mut timings = StartupTimings::default();
        let mut t = Instant::now();

        // Memory, kernel and boot parameters first: they need no KVM, so a user error in them
        // is reported the same on any machine.
        let layout = MemoryLayout::new(config.memory_mib.saturating_mul(ember_memory::MIB))?;
        let memory = ember_memory::create_guest_memory(&layout)?;
        timings.record("guest memory", &mut t);

        let kernel = ember_loader::load_kernel(&memory, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(ember_loader::load_initrd(
                &memory,
                path,
                &layout,
                kernel.kernel_end,
            )?),
            None => None,
        };
        timings.record("kernel load", &mut t);

        let protocol = match config.boot_protocol {
            None => kernel.preferred_protocol(),
            Some(BootProtocolChoice::Pvh) => BootProtocol::Pvh,
            Some(BootProtocolChoice::Linux64) => BootProtocol::Linux64,
        };
        let entry = match protocol {
            BootProtocol::Pvh => kernel.pvh_entry,
            BootProtocol::Linux64 => Some(kernel.linux64_entry),
        }
        .ok_or_else(|| Error::ProtocolNotOffered {
            protocol,
            kernel: config.kernel.clone(),
        })?;
        let kvm_path =
            CString::new(b.kvm_path.as_os_str().as_bytes()).map_err(|_| Error::KvmOpen {
                path: b.kvm_path.clone(),
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        let kvm = Kvm::new_with_path(&kvm_path).map_err(|source| Error::KvmOpen {
            path: b.kvm_path.clone(),
            source,
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCapability(name));
            }
        }
        timings.record("kvm open", &mut t);

        let vm_fd = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        timings.record("vm create", &mut t);

        // Guest memory is registered first: each memslot change waits for an SRCU grace period
        // (4-8 ms on PVM hosts), and right after KVM_CREATE_VM nothing else is pending, so the
        // wait overlaps the rest of the set-up instead of adding to it (docs/performance.md).
        for (slot, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(Error::GuestMemory)?;
            let mem_region = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `memory`, which the `Vm` keeps for
            // as long as the VM fd exists; the guest address ranges do not overlap.
            unsafe { vm_fd.set_user_memory_region(mem_region) }
                .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        timings.record("memory mapping", &mut t);

        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
        if config.pit {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm_fd
                .create_pit2(pit)
                .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
        }
        vm_fd
            .set_gsi_routing(&gsi_routing()?)
            .map_err(|e| Error::Kvm("KVM_SET_GSI_ROUTING", e))?;
        timings.record("irqchip", &mut t);

        // Devices.
        let serial_irq = EventFdTrigger::new()?;
        vm_fd
            .register_irqfd(serial_irq.eventfd(), COM1_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let serial_out = b
            .serial_out
            .unwrap_or_else(|| Box::new(UnbufferedStdout) as Box<dyn Write + Send>);
        let serial = SerialDevice::new(serial_irq, serial_out)?;
        let serial_drained = serial
            .input_drained_evt()
            .try_clone()
            .map_err(Error::EventFd)?;
        let serial = Arc::new(Mutex::new(serial));
        let reset_evt = ember_devices::new_eventfd().map_err(Error::EventFd)?;
        let panic_evt = ember_devices::new_eventfd().map_err(Error::EventFd)?;
        let i8042 = I8042::new(EventFdTrigger::from(
            reset_evt.try_clone().map_err(Error::EventFd)?,
        ));
        let pvpanic = PvPanic::new(EventFdTrigger::from(
            panic_evt.try_clone().map_err(Error::EventFd)?,
        ));
        let poweroff_evt = ember_devices::new_eventfd().map_err(Error::EventFd)?;
        let acpi_pm = AcpiPmRegisters::new(
            EventFdTrigger::from(poweroff_evt.try_clone().map_err(Error::EventFd)?),
            EventFdTrigger::from(reset_evt.try_clone().map_err(Error::EventFd)?),
        );
        let boot_timer = BootTimer::new(process_start());
        let boot_time = boot_timer.handle();

        let mut pio = Bus::new();
        pio.insert(serial.clone() as SharedDevice, COM1_BASE, 8)?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)?;
        pio.insert(Arc::new(Mutex::new(boot_timer)), BOOT_TIMER_PORT, 1)?;
        pio.insert(Arc::new(Mutex::new(pvpanic)), PVPANIC_PORT, 1)?;
        pio.insert(
            Arc::new(Mutex::new(acpi_pm)),
            u64::from(SLEEP_CONTROL_PORT),
            ACPI_PM_LEN,
        )?;
        // virtio-mmio disks: windows and interrupt lines from allocators, queue notifications
        // through ioeventfds, interrupts through irqfds.
        let mut mmio = Bus::new();
        let mut acpi_devices = vec![AcpiDevice::Uart {
            port: COM1_BASE as u16,
            irq: COM1_IRQ,
        }];
        let mut cmdline_devices = Vec::new();
        let (window_start, window_len) = layout.mmio32_window();
        let alloc_err = |what: &'static str| {
            move |e: vm_allocator::Error| Error::Allocate {
                what,
                reason: e.to_string(),
            }
        };
        let mut windows =
            AddressAllocator::new(window_start, window_len).map_err(alloc_err("MMIO windows"))?;
        let mut gsis =
            IdAllocator::new(FIRST_VIRTIO_GSI, LAST_GSI).map_err(alloc_err("interrupt lines"))?;
        let mut disks = Vec::with_capacity(config.disks.len());
        for disk in &config.disks {
            let disk_err = |source| Error::Disk {
                path: disk.path.clone(),
                source,
            };
            let block = Block::new(BlockConfig {
                path: disk.path.clone(),
                read_only: disk.read_only,
                serial: disk.id.clone(),
            })
            .map_err(disk_err)?;
            let counters = block.counters_handle();
            let base = windows
                .allocate(MMIO_WINDOW, MMIO_WINDOW, AllocPolicy::FirstMatch)
                .map_err(alloc_err("a virtio-mmio window"))?
                .start();
            let gsi = gsis
                .allocate_id()
                .map_err(alloc_err("a virtio interrupt line"))?;
            let irq = EventFdTrigger::new()?;
            vm_fd
                .register_irqfd(irq.eventfd(), gsi)
                .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
            let transport =
                MmioTransport::new(Box::new(block), memory.clone(), irq).map_err(disk_err)?;
            for (queue, evt) in transport.queue_notify_evts().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        evt,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                        queue as u32,
                    )
                    .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone() as SharedDevice, base, MMIO_WINDOW)?;
            acpi_devices.push(AcpiDevice::VirtioMmio {
                base,
                len: MMIO_WINDOW,
                gsi,
            });
            cmdline_devices.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
            disks.push(VirtioDisk {
                path: disk.path.clone(),
                base,
                gsi,
                transport,
                counters,
            });
        }
        let io = Arc::new(DeviceIo { pio, mmio });
        timings.record("devices", &mut t);

        // vCPUs: created first, so that what KVM makes of the CPU template is known before the
        // command line is written.
        let template = config.cpu_template()?;
        let supported = supported_cpuid(&kvm)?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        let mut cpuids = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let mut vcpu = Vcpu::new(&vm_fd, id)?;
            cpuids.push(template.vcpu_cpuid(&supported, id, config.vcpus, vcpu.tsc_khz())?);
            vcpu.set_msr_modifiers(&template.msrs)?;
            vcpus.push(vcpu);
        }
        let mut cmdline = KernelCmdline::new(&config.cmdline);
        if !config.acpi {
            // Without ACPI the guest learns of its virtio-mmio devices from the command line
            // (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). With ACPI the DSDT describes them and a
            // second description would make Linux probe each device twice.
            for d in &cmdline_devices {
                cmdline.append(d);
            }
        }
        cmdline.append(&host_compat_params(&template, &vcpus[0], &cpuids[0])?);
        let cmdline = cmdline.build()?;
        timings.record("vcpu create", &mut t);

        // Firmware tables: ACPI (preferred by x86_64 kernels; Debian's has no MP-table parser)
        // and an MP table for kernels built without ACPI.
        let rsdp = if config.acpi {
            Some(ember_boot::acpi::write_acpi_tables(
                &memory,
                &AcpiConfig {
                    vcpus: config.vcpus,
                    devices: &acpi_devices,
                },
            )?)
        } else {
            None
        };
        ember_boot::mptable::write_mptable(&memory, config.vcpus)?;
        let boot = write_boot_params(
            &memory,
            &layout,
            &kernel,
            (protocol, entry),
            &cmdline,
            initrd,
            rsdp,
        )?;
        timings.record("boot params", &mut t);

        for (vcpu, cpuid) in vcpus.iter().zip(&cpuids) {
            if vcpu.id() == 0 {
                vcpu.configure(cpuid, &boot)?;
            } else {
                vcpu.configure_ap(cpuid)?;
            }
        }
        timings.record("vcpu setup", &mut t);

        let handle = VmHandle {
            stop_evt: Arc::new(ember_devices::new_eventfd().map_err(Error::EventFd)?),
            input_evt: Arc::new(ember_devices::new_eventfd().map_err(Error::EventFd)?),
            input: Arc::new(Mutex::new(VecDeque::new())),
            control: Arc::new(VcpuControl::default()),
            io: Arc::downgrade(&io),
        };

        Ok(Vm {
            _kvm: kvm,
            vm_fd,
            memory,
            layout,
            kernel,
            protocol,
            vcpus,
            io,
            disks,
            serial,
            serial_drained,
            serial_in: b.serial_in,
            reset_evt,
            poweroff_evt,
            panic_evt,
            cmdline,
            boot_time,
            handle,
            timings,
        })
    }

    /// A handle to feed the console or stop the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// The guest memory layout in use.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The loaded kernel (format, entry points, protocols offered).
    pub fn kernel(&self) -> &LoadedKernel {
        &self.kernel
    }

    /// The boot protocol the vCPUs will enter through.
    pub fn boot_protocol(&self) -> BootProtocol {
        self.protocol
    }

    /// The kernel command line as written into guest memory: the configured one plus what
    /// Ember appended (virtio-mmio devices without ACPI, host-compatibility parameters for a
    /// non-host CPU template).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The virtio-blk disks attached, with their windows and interrupt lines.
    pub fn disks(&self) -> Vec<DiskReport> {
        self.disks.iter().map(VirtioDisk::report).collect()
    }

    /// How long each start-up phase took.
    pub fn timings(&self) -> &StartupTimings {
        &self.timings
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Runs the VM until the guest resets, powers off, fails, or the VM is stopped.
    ///
    /// Every vCPU thread is joined before this returns.
    pub fn run(self) -> Result<VmOutcome, Error> {
        ember_vcpu::kick::init()?;
        let control = self.handle.control.clone();
        let vcpu_exit_evt = ember_devices::new_eventfd().map_err(Error::EventFd)?;
        let first_run: Arc<OnceLock<Duration>> = Arc::new(OnceLock::new());
        let results: Arc<Mutex<Vec<VmExit>>> = Arc::new(Mutex::new(Vec::new()));

        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, mut vcpu) in self.vcpus.into_iter().enumerate() {
            let io = self.io.clone();
            let thread_control = control.clone();
            let memory = self.memory.clone();
            let exit_evt = match vcpu_exit_evt.try_clone() {
                Ok(evt) => evt,
                Err(e) => {
                    stop_and_join(&control, threads);
                    return Err(Error::EventFd(e));
                }
            };
            let results = results.clone();
            let first_run = first_run.clone();
            // Registered before the thread starts, so a stop or pause right now reaches it.
            let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    thread_control.enter();
                    let _ = started_tx.send(());
                    let _ = first_run.set(process_start().elapsed());
                    let exit = match thread_control.run(&mut vcpu, io.as_ref()) {
                        Ok(reason) => vcpu_stop_to_exit(&vcpu, &memory, reason),
                        Err(e) => VmExit::VcpuError(e.to_string()),
                    };
                    lock(&results).push(exit);
                    let _ = exit_evt.write(1);
                });
            match spawned {
                Ok(t) => {
                    let _ = started_rx.recv();
                    threads.push(t);
                }
                Err(e) => {
                    stop_and_join(&control, threads);
                    return Err(Error::Thread(e));
                }
            }
        }

        let loop_result = event_loop(
            &self.handle,
            &self.serial,
            &self.serial_drained,
            self.serial_in,
            &self.reset_evt,
            &self.poweroff_evt,
            &self.panic_evt,
            &vcpu_exit_evt,
            &results,
            &self.disks,
        );
        stop_and_join(&control, threads);
        let exit = loop_result?;
        drop(self.vm_fd);
        Ok(VmOutcome {
            exit,
            boot_time: self.boot_time.get().copied(),
            first_run: first_run.get().copied(),
            unhandled_io: self.io.pio.unhandled() + self.io.mmio.unhandled(),
            disks: self.disks.iter().map(VirtioDisk::report).collect(),
        })
    }
}

/// Number of IOAPIC input pins (GSIs 0..24).
const IOAPIC_PINS: u32 = 24;

/// The interrupt routing the firmware tables describe: ISA IRQs 0..15 on the PICs, GSIs on the
/// IOAPIC pins with the same number, except the PIT's IRQ 0, which the MADT's interrupt
/// source override (and the MP table) put on IOAPIC pin 2, as on PC hardware.
fn gsi_routing() -> Result<kvm_bindings::KvmIrqRouting, Error> {
    use kvm_bindings::{
        kvm_irq_routing_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQ_ROUTING_IRQCHIP,
    };
    let entry = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::new();
    for irq in 0..16u32 {
        if irq == 2 {
            continue; // the cascade
        }
        let chip = if irq < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        entries.push(entry(irq, chip, irq % 8));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => entries.push(entry(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => entries.push(entry(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    kvm_bindings::KvmIrqRouting::from_entries(&entries)
        // Only fails for more entries than a kvm_irq_routing can hold, which 39 are not.
        .map_err(|_| Error::Kvm("KVM_SET_GSI_ROUTING", kvm_ioctls::Error::new(libc::E2BIG)))
}

/// `KVM_GET_SUPPORTED_CPUID`, asked once per process: it does not change while the process
/// lives, and on PVM hosts each query costs ~0.8 ms of trapped `cpuid` instructions.
fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, Error> {
    static SUPPORTED: OnceLock<kvm_bindings::CpuId> = OnceLock::new();
    if let Some(c) = SUPPORTED.get() {
        return Ok(c.clone());
    }
    let c = ember_vcpu::cpuid::supported(kvm)?;
    Ok(SUPPORTED.get_or_init(|| c).clone())
}

/// Kernel parameters for what a non-`host` CPU template asked to hide but this host's KVM
/// shows the guest anyway (some PVM builds override CPUID; see
/// [`ember_vcpu::template::overridden_bits`]). Empty for the `host` template and wherever KVM
/// honours the table. A host-compatibility piece: see docs/guest.md.
fn host_compat_params(
    template: &ember_vcpu::template::CpuTemplate,
    bsp: &Vcpu,
    requested: &kvm_bindings::CpuId,
) -> Result<String, Error> {
    if template.name == "host" {
        return Ok(String::new());
    }
    bsp.fd()
        .set_cpuid2(requested)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
    let effective = bsp.effective_cpuid()?;
    let overrides = ember_vcpu::template::overridden_bits(requested, &effective);
    let mut words = Vec::new();
    if overrides.iter().any(|o| o.linux_names().contains(&"xsave")) {
        words.push("noxsave".to_string());
    }
    let names = ember_vcpu::template::linux_clearcpuid(&overrides);
    if let Some(value) = clearcpuid_value(&names) {
        words.push(format!("clearcpuid={value}"));
    }
    Ok(words.join(" "))
}

/// Longest `clearcpuid=` value Linux reads (`char arg[128]` in `cpu_parse_early_param`).
const CLEARCPUID_MAX: usize = 127;

/// Features whose instructions KVM's ring-0 emulator refuses and Linux executes in ring 0 early,
/// most important first: they go first into the length-limited `clearcpuid=` value.
const CLEARCPUID_PRIORITY: &[&str] = &[
    "popcnt", "cx16", "smap", "smep", "erms", "fsrm", "movbe", "avx", "avx2", "bmi1", "bmi2",
    "fsgsbase", "rdtscp", "invpcid", "pku", "ospke", "avx512f",
];

/// The `clearcpuid=` value for `names`: the priority features first, then the rest in table
/// order, as many as fit Linux's 127-byte limit. `None` for an empty list.
fn clearcpuid_value(names: &[&str]) -> Option<String> {
    let mut ordered: Vec<&str> = CLEARCPUID_PRIORITY
        .iter()
        .copied()
        .filter(|p| names.contains(p))
        .collect();
    ordered.extend(
        names
            .iter()
            .copied()
            .filter(|n| !CLEARCPUID_PRIORITY.contains(n)),
    );
    let mut value = String::new();
    for name in ordered {
        let extra = name.len() + usize::from(!value.is_empty());
        if value.len() + extra > CLEARCPUID_MAX {
            continue;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(name);
    }
    (!value.is_empty()).then_some(value)
}

fn stop_and_join(control: &VcpuControl, threads: Vec<JoinHandle<()>>) {
    control.stop();
    for t in threads {
        let _ = t.join();
    }
}

fn vcpu_stop_to_exit(vcpu: &Vcpu, memory: &GuestMemoryMmap, reason: VcpuStop) -> VmExit {
    match reason {
        VcpuStop::Stopped => VmExit::Stopped,
        VcpuStop::Halted => VmExit::VcpuError("vCPU halted with interrupts off".into()),
        VcpuStop::Shutdown => VmExit::TripleFault,
        VcpuStop::SystemEvent { kind } => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Poweroff,
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => VmExit::GuestPanic,
            other => VmExit::VcpuError(format!("unknown KVM system event {other}")),
        },
        VcpuStop::EmulationFailure { rip, insn } => {
            let insn = if insn.is_empty() {
                vcpu.emulation_failure_bytes(memory).unwrap_or_default()
            } else {
                insn
            };
            VmExit::EmulationFailure { rip, insn }
        }
        other => VmExit::VcpuError(format!("{other:?}")),
    }
}

/// Writes the boot-protocol structures and returns the vCPU entry state.
fn write_boot_params(
    memory: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    (protocol, entry): (BootProtocol, GuestAddress),
    cmdline: &str,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<BootRegs, Error> {
    let cmdline_addr = GuestAddress(CMDLINE_ADDR);
    let cmdline_size =
        ember_loader::load_cmdline(memory, cmdline, cmdline_addr, CMDLINE_MAX_SIZE as usize)?;
    let e820 = layout.e820();
    let (mode, gdt) = match protocol {
        BootProtocol::Pvh => {
            ember_boot::write_pvh_start_info(
                memory,
                GuestAddress(PVH_START_INFO_ADDR),
                GuestAddress(PVH_MEMMAP_ADDR),
                &ember_boot::PvhBootParams {
                    cmdline_addr,
                    initrd,
                    memmap: &e820,
                    rsdp_addr: rsdp,
                },
            )?;
            (
                EntryMode::Pvh {
                    entry: entry.0,
                    start_info: PVH_START_INFO_ADDR,
                },
                ember_boot::gdt::PROTECTED_MODE,
            )
        }
        BootProtocol::Linux64 => {
            ember_boot::write_zero_page(
                memory,
                GuestAddress(ZERO_PAGE_ADDR),
                &ember_boot::LinuxBootParams {
                    setup_header: kernel.setup_header,
                    cmdline_addr,
                    cmdline_size,
                    initrd,
                    e820: &e820,
                    acpi_rsdp_addr: rsdp,
                },
            )?;
            let pml4 = ember_boot::paging::write_identity_page_tables(memory)?;
            (
                EntryMode::Linux64 {
                    entry: entry.0,
                    zero_page: ZERO_PAGE_ADDR,
                    pml4: pml4.0,
                },
                ember_boot::gdt::LONG_MODE,
            )
        }
    };
    ember_boot::gdt::write_gdt(memory, GuestAddress(GDT_ADDR), &gdt)?;
    ember_boot::gdt::write_idt(memory, GuestAddress(IDT_ADDR))?;
    Ok(BootRegs {
        mode,
        gdt_addr: GDT_ADDR,
        gdt,
        idt_addr: IDT_ADDR,
        stack_top: BOOT_STACK_TOP,
    })
}

const TOKEN_STOP: u64 = 1;
const TOKEN_INPUT: u64 = 2;
const TOKEN_SERIAL_DRAINED: u64 = 3;
const TOKEN_STDIN: u64 = 4;
const TOKEN_RESET: u64 = 5;
const TOKEN_PANIC: u64 = 6;
const TOKEN_VCPU_EXIT: u64 = 7;
const TOKEN_POWEROFF: u64 = 8;

/// Moves queued console input into the UART's FIFO as far as it has room.
fn pump_input(serial: &Mutex<SerialDevice>, input: &Mutex<VecDeque<u8>>) {
    let mut queue = lock(input);
    if queue.is_empty() {
        return;
    }
    let mut serial = lock(serial);
    let room = serial.input_space().min(queue.len());
    if room == 0 {
        return;
    }
    let chunk: Vec<u8> = queue.drain(..room).collect();
    if let Ok(taken) = serial.enqueue_input(&chunk) {
        // Put back what the FIFO did not take, in order.
        for &b in chunk[taken..].iter().rev() {
            queue.push_front(b);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn event_loop(
    handle: &VmHandle,
    serial: &Mutex<SerialDevice>,
    serial_drained: &EventFd,
    serial_in: Option<RawFd>,
    reset_evt: &EventFd,
    poweroff_evt: &EventFd,
    panic_evt: &EventFd,
    vcpu_exit_evt: &EventFd,
    results: &Mutex<Vec<VmExit>>,
    disks: &[VirtioDisk],
) -> Result<VmExit, Error> {
    let epoll = Epoll::new().map_err(Error::Epoll)?;
    let add = |fd: RawFd, token: u64| {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(Error::Epoll)
    };
    add(handle.stop_evt.as_raw_fd(), TOKEN_STOP)?;
    add(handle.input_evt.as_raw_fd(), TOKEN_INPUT)?;
    add(serial_drained.as_raw_fd(), TOKEN_SERIAL_DRAINED)?;
    add(reset_evt.as_raw_fd(), TOKEN_RESET)?;
    add(panic_evt.as_raw_fd(), TOKEN_PANIC)?;
    add(poweroff_evt.as_raw_fd(), TOKEN_POWEROFF)?;
    add(vcpu_exit_evt.as_raw_fd(), TOKEN_VCPU_EXIT)?;
    for (d, disk) in disks.iter().enumerate() {
        let transport = lock(&disk.transport);
        for (q, evt) in transport.queue_notify_evts().iter().enumerate() {
            add(evt.as_raw_fd(), virtio_token(d, q))?;
        }
    }
    let mut stdin_open = false;
    if let Some(fd) = serial_in {
        // Regular files cannot be polled; a fd that epoll refuses is simply not read.
        stdin_open = add(fd, TOKEN_STDIN).is_ok();
    }

    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Epoll(e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_STOP => return Ok(VmExit::Stopped),
                TOKEN_RESET => return Ok(VmExit::Reset),
                TOKEN_PANIC => return Ok(VmExit::GuestPanic),
                TOKEN_POWEROFF => return Ok(VmExit::Poweroff),
                TOKEN_VCPU_EXIT => {
                    let _ = vcpu_exit_evt.read();
                    if let Some(exit) = lock(results).first().cloned() {
                        return Ok(exit);
                    }
                }
                TOKEN_INPUT => {
                    let _ = handle.input_evt.read();
                    pump_input(serial, &handle.input);
                }
                TOKEN_SERIAL_DRAINED => {
                    let _ = serial_drained.read();
                    pump_input(serial, &handle.input);
                }
                TOKEN_STDIN if stdin_open => {
                    if let Some(fd) = serial_in {
                        let mut buf = [0u8; 256];
                        // SAFETY: `buf` is a valid writable buffer of the given length and `fd`
                        // is a descriptor the caller promised stays open while the VM runs.
                        let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                        if got > 0 {
                            lock(&handle.input).extend(&buf[..got as usize]);
                            pump_input(serial, &handle.input);
                        } else if got == 0
                            || std::io::Error::last_os_error().kind()
                                != std::io::ErrorKind::WouldBlock
                        {
                            // End of input (or an error): stop watching it; the guest runs on.
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                            stdin_open = false;
                        }
                    }
                }
                token if token >= TOKEN_VIRTIO_BASE => {
                    let (d, q) = virtio_queue_of(token);
                    if let Some(disk) = disks.get(d) {
                        lock(&disk.transport).process_notification(q);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Event-loop tokens of virtio queue notifications: one block of 256 per device.
const TOKEN_VIRTIO_BASE: u64 = 0x1_0000;

fn virtio_token(device: usize, queue: usize) -> u64 {
    TOKEN_VIRTIO_BASE + ((device as u64) << 8) + queue as u64
}

fn virtio_queue_of(token: u64) -> (usize, usize) {
    let t = token - TOKEN_VIRTIO_BASE;
    ((t >> 8) as usize, (t & 0xff) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clearcpuid_value_puts_priority_features_first_and_fits_linux() {
        assert_eq!(clearcpuid_value(&[]), None);
        assert_eq!(
            clearcpuid_value(&["pni", "popcnt", "smap"]).as_deref(),
            Some("popcnt,smap,pni")
        );
        let many: Vec<String> = (0..60).map(|i| format!("feature{i}")).collect();
        let mut names: Vec<&str> = many.iter().map(String::as_str).collect();
        names.push("cx16");
        let v = clearcpuid_value(&names).unwrap();
        assert!(v.len() <= CLEARCPUID_MAX, "{v}");
        assert!(v.starts_with("cx16,feature0,"), "{v}");
    }

    #[test]
    fn virtio_tokens_round_trip() {
        for (d, q) in [(0, 0), (3, 1), (18, 255)] {
            assert_eq!(virtio_queue_of(virtio_token(d, q)), (d, q));
        }
    }
}
