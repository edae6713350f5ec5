//! Building and running one microVM: [`VmBuilder`] → [`Vm`] → [`Vm::run`] → [`VmOutcome`].
//!
//! [`Vm::build`] is a list of steps, each in the module that does that job: guest memory and
//! the kernel (`ember-memory`, `ember-loader`), the KVM VM (`kvm`), the devices (`devices`),
//! the vCPUs (`cpu`), the firmware tables and boot structures (`ember-boot`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_boot::acpi::AcpiConfig;
use ember_boot::{BootConfig, BootEntry};
use ember_devices::serial::{OutputBuffer, OUTPUT_BUFFER_CAPACITY};
use ember_devices::virtio::balloon::{self, Balloon};
use ember_devices::virtio::block::Block;
use ember_devices::virtio::net::{self, Net, Tap};
use ember_devices::virtio::rng::Rng;
use ember_devices::virtio::vsock::Vsock;
use ember_devices::{lock, Buses, SharedDevice};
use ember_loader::{BootProtocol, LoadedKernel};
use ember_memory::{GuestRam, MemoryLayout};
use ember_vcpu::Vcpu;
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::cmdline::KernelCmdline;
use crate::config::{BootProtocolChoice, VmConfig};
use crate::console::{self, ConsoleOut, Drained, Escape, Sink, Typed};
use crate::control::VcpuControl;
use crate::device_config::limiter;
use crate::devices::{DeviceControl, DeviceManager, LegacyDevices, VirtioSlot, VirtioSpec};
use crate::error::Error;
use crate::event_loop::{EventLoop, Flow};
use crate::handle::{VmHandle, VmShared};
use crate::outcome::{DeviceCounters, DeviceReport, StartupTimings, VmExit, VmOutcome};
use crate::process_start;
use crate::state::MachineState;

/// Where the guest's console output goes.
enum OutputChoice {
    /// The VMM's stdout (default).
    Stdout,
    /// A descriptor the builder was given.
    Fd(OwnedFd),
    /// A writer that must not block.
    Writer(Box<dyn Write + Send>),
}

/// Where a restore's guest memory comes from.
enum RestoreMemory {
    /// A memory file (its path names it in errors), mapped `MAP_PRIVATE`.
    File(std::fs::File, PathBuf),
    /// Anonymous memory filled by the page-fault handler listening on this socket.
    #[cfg(feature = "uffd")]
    Uffd(PathBuf),
}

/// Builder for a [`Vm`]: a configuration plus where the console goes.
pub struct VmBuilder {
    config: VmConfig,
    output: OutputChoice,
    serial_in: Option<OwnedFd>,
    escape: bool,
    kvm_path: PathBuf,
    port_devices: Vec<(u64, u64, SharedDevice)>,
    cpu_template: Option<ember_vcpu::template::CpuTemplate>,
    restore: Option<(crate::snapshot::SnapshotState, RestoreMemory)>,
    start_paused: bool,
    fork_template: bool,
    prepared: Option<crate::pool::PreparedVm>,
    thread_hook: Option<ThreadHook>,
}

/// Which of a VM's threads a [`ThreadHook`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ThreadKind {
    /// The thread of vCPU `n`, before it first enters the guest. vCPU threads start when the
    /// VM is built (in [`VmBuilder::build`], from the thread that calls it, whose signal mask,
    /// affinity and seccomp filter they inherit) and run their hook at once, while the rest of
    /// the VM is built: also for a VM whose build then fails or that is never run (dropping
    /// it, or the failed build, waits for the hooks to return). Once [`Vm::run`] has handed
    /// the thread its vCPU, a pause or stop may signal it while its hook still runs: a
    /// blocking call there can return `EINTR`.
    Vcpu(usize),
    /// The thread that called [`Vm::run`] (the event loop: devices, console, timers), after
    /// the vCPU threads are started and before it handles anything the guest wrote.
    EventLoop,
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ThreadKind::Vcpu(n) => write!(f, "vcpu{n}"),
            ThreadKind::EventLoop => f.write_str("event loop"),
        }
    }
}

/// Code a VMM runs on each of a VM's threads before the thread does anything for the guest:
/// installing that kind of thread's seccomp filter, pinning it, naming it. An error ends the
/// VM ([`Error::ThreadHook`], or [`VmExit::VcpuError`] for a vCPU).
pub type ThreadHook = Arc<dyn Fn(ThreadKind) -> Result<(), String> + Send + Sync>;

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("config", &self.config)
            .field("kvm_path", &self.kvm_path)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// Starts a builder from a configuration.
    pub fn new(config: VmConfig) -> Self {
        VmBuilder {
            config,
            output: OutputChoice::Stdout,
            serial_in: None,
            escape: false,
            kvm_path: PathBuf::from("/dev/kvm"),
            port_devices: Vec::new(),
            cpu_template: None,
            restore: None,
            start_paused: false,
            fork_template: false,
            prepared: None,
            thread_hook: None,
        }
    }

    /// Runs `hook` on every vCPU thread before it enters the guest and on the event-loop
    /// thread before it handles guest input ([`ThreadKind`]): where a VMM installs its seccomp
    /// filters. The vCPU threads run it during [`build`](Self::build), in parallel with it.
    pub fn thread_hook(mut self, hook: ThreadHook) -> Self {
        self.thread_hook = Some(hook);
        self
    }

    /// Restores a snapshot instead of booting: the configuration comes from `state` (apply
    /// overrides to `state.config` before), guest memory is `memory` mapped copy-on-write (the
    /// file is never written, and nothing is read until the guest touches a page), and
    /// [`Vm::run`] applies the saved vCPU, VM and device state before any vCPU runs.
    pub fn restore(
        state: crate::snapshot::SnapshotState,
        memory: std::fs::File,
        memory_path: &Path,
    ) -> Self {
        let mut b = VmBuilder::new(state.config.clone());
        b.restore = Some((
            state,
            RestoreMemory::File(memory, memory_path.to_path_buf()),
        ));
        b
    }

    /// As [`restore`](Self::restore), with guest memory filled on demand by a page-fault
    /// handler process listening on the Unix socket `handler` (Firecracker's `Uffd` memory
    /// backend and handshake). Guest memory is anonymous, registered with a new userfaultfd
    /// (missing pages, kernel accesses included; remove events with a balloon) before anything
    /// touches it;
    /// the handler gets one message: a JSON array of the regions, each
    /// `{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}` (`offset` in
    /// the memory file; `page_size_kib` holds bytes, as Firecracker sends it), with the
    /// userfaultfd attached (`SCM_RIGHTS`). The handler must be listening before the VM is
    /// built, and serve every page the guest or the VMM touches (a handler that stops serving
    /// freezes the guest); the VMM keeps the connection open while the VM lives. Creating the
    /// userfaultfd needs root, `CAP_SYS_PTRACE` or `vm.unprivileged_userfaultfd=1`.
    /// (Feature `uffd`, on by default.)
    #[cfg(feature = "uffd")]
    pub fn restore_with_uffd(state: crate::snapshot::SnapshotState, handler: &Path) -> Self {
        let mut b = VmBuilder::new(state.config.clone());
        b.restore = Some((state, RestoreMemory::Uffd(handler.to_path_buf())));
        b
    }

    /// Puts guest memory in a memfd, so that the paused VM can become a [`crate::Template`]
    /// that forks map copy-on-write ([`VmHandle::template`]). Off by default (anonymous
    /// memory).
    pub fn fork_template(mut self, on: bool) -> Self {
        self.fork_template = on;
        self
    }

    /// Builds the VM on `vm`, a KVM VM made ahead of time with its irqchip and vCPUs
    /// ([`crate::VmPool`]), instead of creating one: `KVM_CREATE_VM`, the irqchip and vCPU
    /// creation leave the start-up path. Its vCPU count and PIT must be the configuration's.
    pub fn prepared(mut self, vm: crate::pool::PreparedVm) -> Self {
        self.prepared = Some(vm);
        self
    }

    /// Starts the VM paused: [`Vm::run`] waits for [`VmHandle::resume`] before any vCPU runs
    /// (Firecracker's `resume_vm: false`).
    pub fn start_paused(mut self, paused: bool) -> Self {
        self.start_paused = paused;
        self
    }

    /// Uses `template` instead of the one the configuration names (a template built in
    /// memory, e.g. from Firecracker's `PUT /cpu-config`).
    pub fn cpu_template(mut self, template: ember_vcpu::template::CpuTemplate) -> Self {
        self.cpu_template = Some(template);
        self
    }

    /// Adds a port I/O device of your own at `[base, base + len)` (a debug port, a device
    /// Ember does not have). It runs on the vCPU threads, like every port device; building
    /// fails if the range overlaps one of Ember's devices.
    pub fn port_device(mut self, base: u64, len: u64, device: SharedDevice) -> Self {
        self.port_devices.push((base, len, device));
        self
    }

    /// The KVM device to open (default `/dev/kvm`).
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_path = path.into();
        self
    }

    /// Where the guest's serial output goes (default: the VMM's stdout). The writer is called
    /// from the VMM's event loop, never from a vCPU thread, with everything the guest wrote
    /// since the last call; it must not block (an in-memory sink, a non-blocking socket).
    pub fn serial_output(mut self, out: Box<dyn Write + Send>) -> Self {
        self.output = OutputChoice::Writer(out);
        self
    }

    /// Sends the guest's serial output to `fd` (a terminal, pipe, FIFO, socket or regular
    /// file), written without blocking: while it is full the guest's UART reports itself busy.
    pub fn serial_output_fd(mut self, fd: OwnedFd) -> Self {
        self.output = OutputChoice::Fd(fd);
        self
    }

    /// A descriptor (e.g. a duplicate of stdin) whose bytes feed the guest's serial input: a
    /// terminal, pipe or socket is read when readable, a regular file (or `/dev/null`) is read
    /// in chunks as the guest takes its input.
    pub fn serial_input(mut self, fd: OwnedFd) -> Self {
        self.serial_in = Some(fd);
        self
    }

    /// Whether Ctrl-A x on the serial input ends the VM ([`VmExit::ConsoleEscape`]; Ctrl-A
    /// Ctrl-A sends one Ctrl-A). Off by default; the `ember` binary turns it on for a terminal.
    pub fn console_escape(mut self, on: bool) -> Self {
        self.escape = on;
        self
    }

    /// Builds the VM: memory, kernel, boot parameters, KVM VM, devices, vCPUs.
    pub fn build(self) -> Result<Vm, Error> {
        Vm::build(self)
    }
}

/// A built microVM, ready to [`run`](Vm::run).
pub struct Vm {
    // Dropped first: the vCPUs and the threads waiting for them, then what holds the VM fd
    // and the memory it maps.
    vcpus: Vec<Vcpu>,
    seats: VcpuSeats,
    shared: Arc<VmShared>,
    layout: MemoryLayout,
    kernel: Option<LoadedKernel>,
    protocol: Option<BootProtocol>,
    console: ConsoleOut,
    serial_in: Option<OwnedFd>,
    escape: bool,
    cmdline: String,
    handle: VmHandle,
    timings: StartupTimings,
    /// The state to apply before the vCPUs run (a restore).
    restore: Option<MachineState>,
    jobs: ember_devices::mailbox::Mailbox<crate::handle::Job>,
    thread_hook: Option<ThreadHook>,
    /// The userfaultfd of memory a page-fault handler serves, held for the VM's life.
    #[cfg(feature = "uffd")]
    _uffd: Option<crate::uffd::UffdMemory>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("layout", &self.layout)
            .field("protocol", &self.protocol)
            .field("vcpus", &self.vcpus.len())
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Shorthand for `VmBuilder::new(config)`.
    pub fn builder(config: VmConfig) -> VmBuilder {
        VmBuilder::new(config)
    }

    fn build(mut b: VmBuilder) -> Result<Vm, Error> {
        let config = b.config;
        config.validate()?;
        let mut timings = StartupTimings::default();
        let mut t = Instant::now();
        // The vCPU threads first: their hooks (a seccomp filter to compile, say) run on them
        // while this thread builds the VM.
        let mut seats = VcpuSeats::default();
        for index in 0..usize::from(config.vcpus) {
            seats
                .0
                .push_back(VcpuSeat::start(index, b.thread_hook.clone())?);
        }
        timings.record("vcpu threads", &mut t);

        // Memory, kernel and the boot entry first: they need no KVM, so a user error in them
        // is reported the same on any machine.
        let layout = MemoryLayout::new(config.memory_mib.saturating_mul(ember_memory::MIB))?;
        let restore = b.restore.take();
        // A prepared VM with its memory registered is only for a restore (a fork).
        let premapped = b.prepared.as_ref().is_some_and(|p| p.memory.is_some());
        if premapped && restore.is_none() {
            return Err(Error::Prepared(
                "a prepared VM with memory is for a fork or restore, not a boot".into(),
            ));
        }
        let mut memory_file = None;
        let dirty = ember_memory::DirtyBitmap::tracked_if(config.track_dirty_pages);
        #[cfg(feature = "uffd")]
        let mut uffd = None;
        let (memory, kernel, initrd, protocol_entry, machine) = match restore {
            #[cfg(feature = "uffd")]
            Some((state, RestoreMemory::Uffd(handler))) => {
                if state.memory_bytes != layout.mem_size() {
                    return Err(crate::snapshot::SnapshotError::Invalid {
                        path: handler,
                        why: format!(
                            "{} bytes of guest memory; the configuration has {}",
                            state.memory_bytes,
                            layout.mem_size()
                        ),
                    }
                    .into());
                }
                if premapped {
                    return Err(Error::Prepared(
                        "a prepared VM with memory is for a fork or a restore from a file, not \
                         one whose memory a page-fault handler serves"
                            .into(),
                    ));
                }
                let memory = ember_memory::create_guest_memory(&layout, dirty)?;
                uffd = Some(crate::uffd::hand_to_handler(
                    &memory,
                    &handler,
                    config.balloon.is_some(),
                )?);
                if config.acpi {
                    crate::vmgenid::write_new(&memory)?;
                }
                timings.record("guest memory", &mut t);
                (memory, None, None, None, Some(state))
            }
            Some((state, RestoreMemory::File(file, path))) => {
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                if size != state.memory_bytes || size != layout.mem_size() {
                    return Err(crate::snapshot::SnapshotError::MemorySize {
                        path,
                        size,
                        want: state.memory_bytes,
                    }
                    .into());
                }
                let memory = match b.prepared.as_mut().and_then(|p| p.memory.take()) {
                    // A fork's prepared VM brings its view of the template's memfd.
                    Some(m) => {
                        let source = b.prepared.as_ref().and_then(|p| p.memory_source);
                        if source != Some(crate::pool::file_id(&file)?) {
                            return Err(Error::Prepared(format!(
                                "its memory maps another file than {}",
                                path.display()
                            )));
                        }
                        if dirty == ember_memory::DirtyBitmap::On
                            && !ember_memory::has_dirty_bitmap(&m)
                        {
                            return Err(Error::Prepared(
                                "its memory has no dirty bitmap, and the configuration tracks \
                                 dirty pages (make the pool with VmPool::for_template_with and \
                                 DirtyBitmap::On)"
                                    .into(),
                            ));
                        }
                        m
                    }
                    None => ember_memory::map_guest_memory(
                        &layout,
                        &file,
                        ember_memory::Sharing::Private,
                        dirty,
                    )?,
                };
                // A restored VM or a fork is a new generation: a new ID before anything runs
                // (the guest is told in `Vm::run`, once its interrupt controllers are back).
                if config.acpi {
                    crate::vmgenid::write_new(&memory)?;
                }
                timings.record("guest memory", &mut t);
                (memory, None, None, None, Some(state))
            }
            None => {
                let memory = if b.fork_template {
                    let (memory, file) = ember_memory::create_guest_memory_memfd(&layout, dirty)?;
                    memory_file = Some(file);
                    memory
                } else {
                    ember_memory::create_guest_memory(&layout, dirty)?
                };
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
                let pe = boot_entry(&config, &kernel)?;
                timings.record("kernel load", &mut t);
                (memory, Some(kernel), initrd, Some(pe), None)
            }
        };

        let (kvm, vm_fd, prepared_vcpus) = match b.prepared.take() {
            Some(p) => {
                if p.vcpus.len() != usize::from(config.vcpus) || p.pit != config.pit {
                    return Err(Error::Prepared(format!(
                        "it has {} vCPUs and {} PIT; the configuration wants {} and {}",
                        p.vcpus.len(),
                        if p.pit { "a" } else { "no" },
                        config.vcpus,
                        if config.pit { "a PIT" } else { "none" }
                    )));
                }
                if !premapped || config.track_dirty_pages {
                    // SAFETY: the `Vm` keeps `memory` alive for as long as `vm_fd` (it drops
                    // the fd first), and nothing remaps it. On premapped memory this only
                    // turns the dirty log on.
                    unsafe {
                        ember_vcpu::vm::register_guest_memory(
                            &p.vm_fd,
                            &memory,
                            config.track_dirty_pages,
                        )?
                    };
                    timings.record("memory mapping", &mut t);
                }
                (p.kvm, p.vm_fd, Some(p.vcpus))
            }
            None => {
                let kvm = crate::kvm::open(&b.kvm_path)?;
                timings.record("kvm open", &mut t);
                let vm_fd = crate::kvm::create_vm(
                    &kvm,
                    &memory,
                    config.pit,
                    config.track_dirty_pages,
                    &mut |phase| timings.record(phase, &mut t),
                )?;
                (kvm, vm_fd, None)
            }
        };
        let buffer = OutputBuffer::new(OUTPUT_BUFFER_CAPACITY)?;
        let sink = match b.output {
            OutputChoice::Stdout => Sink::for_fd(libc::STDOUT_FILENO).map_err(Error::Console)?,
            OutputChoice::Fd(fd) => Sink::for_fd(fd.as_raw_fd()).map_err(Error::Console)?,
            OutputChoice::Writer(w) => Sink::Writer(w),
        };
        let mut devices = DeviceManager::new(&layout)?;
        let legacy = devices.attach_legacy(&vm_fd, buffer.clone(), process_start())?;
        for (base, len, device) in b.port_devices {
            devices.attach_port_device(device, base, len)?;
        }
        for (index, disk) in config.disks.iter().enumerate() {
            let block = Block::new(disk.block_config())
                .map_err(|source| Error::Disk { index, source })?
                .with_rate_limiter(limiter(disk.rate_limiter.as_ref()).map_err(Error::EventFd)?);
            let counters = block.counters_handle();
            let control = DeviceControl::Block(block.control());
            devices.attach_virtio(
                &vm_fd,
                &memory,
                VirtioSpec {
                    id: disk.id.clone().unwrap_or_else(|| format!("disk{index}")),
                    backing: disk.path.display().to_string(),
                    device: Box::new(block),
                    counters: Box::new(move || DeviceCounters::Block(counters.snapshot())),
                    control: Some(control),
                },
            )?;
        }
        for (index, nic) in config.nets.iter().enumerate() {
            let id = nic.id.clone().unwrap_or_else(|| format!("net{index}"));
            let tap = Tap::open(&nic.tap).map_err(|source| Error::Net {
                id: id.clone(),
                source,
            })?;
            let device = Net::new(
                tap,
                net::NetConfig {
                    mac: nic.mac().0,
                    mtu: nic.mtu,
                    offload: nic.offload,
                },
                limiter(nic.rx_rate_limiter.as_ref()).map_err(Error::EventFd)?,
                limiter(nic.tx_rate_limiter.as_ref()).map_err(Error::EventFd)?,
            )
            .map_err(|source| Error::Device {
                id: id.clone(),
                source,
            })?;
            let counters = device.counters_handle();
            let control = DeviceControl::Net(device.control());
            devices.attach_virtio(
                &vm_fd,
                &memory,
                VirtioSpec {
                    id,
                    backing: format!("tap {} mac {}", nic.tap, nic.mac()),
                    device: Box::new(device),
                    counters: Box::new(move || DeviceCounters::Net(counters.snapshot())),
                    control: Some(control),
                },
            )?;
        }
        if let Some(rng) = &config.rng {
            let rng = Rng::new(limiter(rng.rate_limiter.as_ref()).map_err(Error::EventFd)?);
            let counters = rng.counters_handle();
            devices.attach_virtio(
                &vm_fd,
                &memory,
                VirtioSpec {
                    id: "rng".into(),
                    backing: "getrandom".into(),
                    device: Box::new(rng),
                    counters: Box::new(move || DeviceCounters::Rng(counters.snapshot())),
                    control: None,
                },
            )?;
        }
        if let Some(b) = &config.balloon {
            let pages = b.amount_mib.saturating_mul(256);
            let device = Balloon::new(balloon::BalloonConfig {
                target_pages: u32::try_from(pages).unwrap_or(u32::MAX),
                stats_interval: (b.stats_polling_interval_s > 0)
                    .then(|| std::time::Duration::from_secs(b.stats_polling_interval_s)),
                deflate_on_oom: b.deflate_on_oom,
                free_page_reporting: b.free_page_reporting,
                // A fork template's RAM is a shared memfd mapping until it becomes a template
                // (MADV_REMOVE frees the memfd's pages; afterwards the memfd is sealed and the
                // discards fail, counted); any other VM's is private.
                discard: if memory_file.is_some() {
                    balloon::Discard::Remove
                } else {
                    balloon::Discard::DontNeed
                },
            })
            .map_err(Error::EventFd)?;
            let handle = device.handle();
            let control = DeviceControl::Balloon(handle.clone());
            devices.attach_virtio(
                &vm_fd,
                &memory,
                VirtioSpec {
                    id: "balloon".into(),
                    backing: format!("{} MiB target", b.amount_mib),
                    device: Box::new(device),
                    counters: Box::new(move || DeviceCounters::Balloon(handle.snapshot())),
                    control: Some(control),
                },
            )?;
        }
        if let Some(v) = &config.vsock {
            let device = Vsock::new(v.cid, &v.uds_path).map_err(Error::Vsock)?;
            let counters = device.counters_handle();
            devices.attach_virtio(
                &vm_fd,
                &memory,
                VirtioSpec {
                    id: "vsock".into(),
                    backing: format!("cid {} uds {}", v.cid, v.uds_path.display()),
                    device: Box::new(device),
                    counters: Box::new(move || DeviceCounters::Vsock(counters.snapshot())),
                    control: None,
                },
            )?;
        }
        timings.record("devices", &mut t);

        // vCPUs: created before the command line is written, so that what KVM makes of the CPU
        // template is known.
        let template = match b.cpu_template.take() {
            Some(t) => t,
            None => config.cpu_template()?,
        };
        let (vcpus, cpuids) = match prepared_vcpus {
            Some(v) => crate::cpu::prepare_vcpus(&kvm, v, &template)?,
            None => crate::cpu::create_vcpus(&kvm, &vm_fd, &template, config.vcpus)?,
        };
        let mut cmdline = KernelCmdline::new(&config.cmdline);
        if !config.acpi {
            // Without ACPI the guest learns of its virtio-mmio devices from the command line
            // (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). With ACPI the DSDT describes them and a
            // second description would make Linux probe each device twice.
            for d in devices.cmdline_devices() {
                cmdline.append(d);
            }
        }
        cmdline.append(&crate::cpu::host_compat_params(
            &template, &vcpus[0], &cpuids[0],
        )?);
        let cmdline = cmdline.build()?;
        timings.record("vcpu create", &mut t);

        if let (Some(kernel), Some((protocol, entry))) = (&kernel, protocol_entry) {
            // Firmware tables: ACPI (preferred by x86_64 kernels; Debian's has no MP-table
            // parser) and an MP table for kernels built without ACPI.
            let rsdp = if config.acpi {
                let rsdp = ember_boot::acpi::write_acpi_tables(
                    &memory,
                    &AcpiConfig {
                        vcpus: config.vcpus,
                        devices: devices.acpi_devices(),
                    },
                )?;
                crate::vmgenid::write_new(&memory)?;
                Some(rsdp)
            } else {
                None
            };
            ember_boot::mptable::write_mptable(&memory, config.vcpus)?;
            let boot = ember_boot::write_boot_params(
                &memory,
                &BootConfig {
                    entry: match protocol {
                        BootProtocol::Pvh => BootEntry::Pvh { entry },
                        BootProtocol::Linux64 => BootEntry::Linux64 {
                            entry,
                            setup_header: kernel.setup_header,
                        },
                    },
                    cmdline: &cmdline,
                    initrd,
                    rsdp,
                    e820: &layout.e820(),
                },
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
        }
        // A restore: the devices must sit where they sat.
        let placements = devices.placements();
        if let Some(state) = &machine {
            if placements != state.devices {
                return Err(Error::StateMismatch(format!(
                    "the snapshot's devices {:?} are not this configuration's {:?}",
                    state.devices, placements
                )));
            }
        }

        let (buses, virtio) = devices.into_parts();
        let control = Arc::new(VcpuControl::default());
        // Set before anyone holds the handle: a `resume` that comes early cannot let a vCPU
        // run before a restore's state is applied, and a paused start is paused at once.
        if machine.is_some() {
            control.hold();
        }
        if b.start_paused {
            control.pause();
        }
        let exit_counters = vcpus.iter().map(Vcpu::exit_counters).collect();
        let shared = Arc::new(VmShared {
            config: config.clone(),
            placements,
            exit_counters,
            vm_fd,
            memory,
            pit: config.pit,
            vcpu_count: vcpus.len(),
            kvm,
            legacy,
            virtio,
            buses: Arc::new(buses),
            control: control.clone(),
            memory_file: Mutex::new(memory_file),
        });
        let eventfd = || ember_devices::new_eventfd().map_err(Error::EventFd);
        let jobs = ember_devices::mailbox::Mailbox::new().map_err(Error::EventFd)?;
        let handle = VmHandle {
            jobs: jobs.sender(),
            stop_evt: Arc::new(eventfd()?),
            input_evt: Arc::new(eventfd()?),
            input: Arc::new(Mutex::new(VecDeque::new())),
            control,
            shared: Arc::downgrade(&shared),
        };
        Ok(Vm {
            vcpus,
            seats,
            shared,
            layout,
            kernel,
            protocol: protocol_entry.map(|(p, _)| p),
            console: ConsoleOut::new(buffer, sink),
            serial_in: b.serial_in,
            escape: b.escape,
            cmdline,
            handle,
            timings,
            restore: machine.map(|m| m.machine),
            jobs,
            thread_hook: b.thread_hook,
            #[cfg(feature = "uffd")]
            _uffd: uffd,
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

    /// The loaded kernel (format, entry points, protocols offered); `None` for a restored VM.
    pub fn kernel(&self) -> Option<&LoadedKernel> {
        self.kernel.as_ref()
    }

    /// The boot protocol the vCPUs will enter through; `None` for a restored VM.
    pub fn boot_protocol(&self) -> Option<BootProtocol> {
        self.protocol
    }

    /// The kernel command line as written into guest memory: the configured one plus what
    /// Ember appended (virtio-mmio devices without ACPI, host-compatibility parameters for a
    /// non-host CPU template).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The virtio devices attached, with their windows, interrupt lines and counters.
    pub fn devices(&self) -> Vec<DeviceReport> {
        self.shared.virtio.iter().map(VirtioSlot::report).collect()
    }

    /// How long each start-up phase took.
    pub fn timings(&self) -> &StartupTimings {
        &self.timings
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestRam {
        &self.shared.memory
    }

    /// Runs the VM until the guest resets, powers off, fails, or the VM is stopped.
    ///
    /// Every vCPU thread is joined before this returns.
    pub fn run(mut self) -> Result<VmOutcome, Error> {
        ember_vcpu::kick::init()?;
        let shared = self.shared.clone();
        let control = self.handle.control.clone();
        let vcpu_exit_evt = ember_devices::new_eventfd().map_err(Error::EventFd)?;
        let first_run: Arc<OnceLock<Duration>> = Arc::new(OnceLock::new());
        let results: Arc<Mutex<Vec<VmExit>>> = Arc::new(Mutex::new(Vec::new()));

        // The event loop is ready before any vCPU runs, so that the guest's first console
        // line is written as soon as it is printed.
        let console = Rc::new(RefCell::new(self.console));
        let mut event_loop = build_event_loop(
            &self.handle,
            &shared.legacy,
            &console,
            self.serial_in.as_ref(),
            self.escape,
            &vcpu_exit_evt,
            &results,
            &shared.virtio,
        )?;
        let jobs_fd = self.jobs.fd();
        let mut jobs = self.jobs;
        let job_shared = shared.clone();
        event_loop.add(jobs_fd, EventSet::IN, move |_, _| {
            for job in jobs.take() {
                job(&job_shared);
            }
            Flow::Continue
        })?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut seats = std::mem::take(&mut self.seats);
        for vcpu in std::mem::take(&mut self.vcpus) {
            // Before a seat is taken: one that fails here stays in `seats`, joined on drop.
            let exit_evt = match vcpu_exit_evt.try_clone().map_err(Error::EventFd) {
                Ok(evt) => evt,
                Err(e) => {
                    stop_and_join(&control, threads);
                    return Err(e);
                }
            };
            let Some(seat) = seats.0.pop_front() else {
                break;
            };
            let thread = VcpuThread {
                buses: shared.buses.clone(),
                control: control.clone(),
                memory: shared.memory.clone(),
                results: results.clone(),
                first_run: first_run.clone(),
            };
            threads.push(seat.seat(vcpu, thread, exit_evt));
        }

        let restored = self.restore.is_some();
        let ready = match self.restore.take() {
            Some(state) => control
                .wait_parked(shared.vcpu_count)
                // A vCPU thread that ended first says why (its hook failed, say).
                .map_err(|e| {
                    Error::VcpuRequest(match lock(&results).first() {
                        Some(exit) => format!("{e}: {exit}"),
                        None => e,
                    })
                })
                .and_then(|()| shared.restore(&state))
                .and_then(|()| {
                    // The new generation ID (written at build) announced, now that the
                    // interrupt controllers' state is back.
                    if shared.config.acpi {
                        crate::vmgenid::notify(&shared.vm_fd)?;
                    }
                    Ok(())
                }),
            None => Ok(()),
        }
        .and_then(|()| match &self.thread_hook {
            Some(hook) => hook(ThreadKind::EventLoop).map_err(Error::ThreadHook),
            None => Ok(()),
        });
        if let Err(e) = ready {
            drop(event_loop);
            stop_and_join(&control, threads);
            return Err(e);
        }
        if restored {
            // A queue notification the guest made just before the snapshot may have been
            // pending, not yet seen by the device, when the state was taken: the restored
            // device looks at every queue once, so such a request completes (once: a device
            // only takes what is past its saved position in the ring).
            for slot in &shared.virtio {
                let mut t = lock(&slot.transport);
                if t.is_activated() {
                    for q in 0..t.queue_notify_evts().len() {
                        t.process_notification(q);
                    }
                }
            }
        }
        // The restored state is in place (or there was none): the vCPUs may run, unless the VM
        // is paused.
        control.release();
        let loop_result = event_loop.run();
        drop(event_loop);
        stop_and_join(&control, threads);
        let exit = loop_result?;
        // What the guest wrote last, as far as the sink takes it now.
        let mut console = console.borrow_mut();
        console.drain(&shared.legacy.serial);
        let console_dropped = lock(&shared.legacy.serial).counters().tx_errors
            + console.discarded
            + console.buffer.len() as u64;
        let outcome = VmOutcome {
            exit,
            boot_time: shared.legacy.boot_time.get().copied(),
            first_run: first_run.get().copied(),
            unhandled_io: shared.buses.unhandled(),
            devices: shared.virtio.iter().map(VirtioSlot::report).collect(),
            console_dropped,
            exits: crate::handle::sum_exits(&shared.exit_counters),
            serial: lock(&shared.legacy.serial).counters(),
        };
        // The KVM VM goes now (handles hold only a weak reference), off this thread.
        drop(shared);
        match Arc::try_unwrap(self.shared) {
            Ok(last) => {
                // Devices now (a TAP, a disk, a socket is free when `run` returns); the KVM
                // VM and the memory it maps on the teardown thread.
                let VmShared {
                    vm_fd,
                    memory,
                    virtio,
                    legacy,
                    buses,
                    ..
                } = last;
                drop(buses);
                drop(virtio);
                drop(legacy);
                drop_off_thread(vm_fd, memory);
            }
            Err(still_shared) => drop(still_shared),
        }
        Ok(outcome)
    }
}

/// Finished VMs whose KVM VM fd and memory the teardown thread has not released yet.
static PENDING_TEARDOWNS: Mutex<usize> = Mutex::new(0);
/// Signalled when [`PENDING_TEARDOWNS`] falls.
static TEARDOWN_DONE: std::sync::Condvar = std::sync::Condvar::new();

/// Waits until the KVM VM and guest memory of every VM whose [`Vm::run`] returned have been
/// released (they are released on a teardown thread, a few milliseconds after `run`
/// returns); `false` if that took longer than `timeout`.
pub fn wait_for_teardown(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pending = lock(&PENDING_TEARDOWNS);
    while *pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        pending = TEARDOWN_DONE
            .wait_timeout(pending, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    true
}

/// Drops a finished VM's KVM VM fd and guest memory on one process-wide thread. Closing a KVM
/// VM's fd waits for the kernel's grace periods (11 to 20 ms measured here, with 0.3 ms of
/// CPU): done inline it would hold up whoever waits for [`Vm::run`] to return by that much. The
/// fd is closed a moment after `run` returns ([`wait_for_teardown`] waits for it).
fn drop_off_thread(vm_fd: kvm_ioctls::VmFd, memory: GuestRam) {
    // A process that will exit with `exit_process` keeps them.
    let Some((vm_fd, memory)) = crate::exit::keep(vm_fd, memory) else {
        return;
    };
    type Parts = (kvm_ioctls::VmFd, GuestRam);
    type Reaper = Mutex<Option<std::sync::mpsc::Sender<Parts>>>;
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Parts>();
        let spawned = std::thread::Builder::new()
            .name("ember-teardown".into())
            .spawn(move || {
                for parts in rx {
                    drop(parts);
                    *lock(&PENDING_TEARDOWNS) -= 1;
                    TEARDOWN_DONE.notify_all();
                }
            });
        Mutex::new(spawned.ok().map(|_| tx))
    });
    *lock(&PENDING_TEARDOWNS) += 1;
    let unsent = match lock(reaper).as_ref() {
        Some(tx) => tx.send((vm_fd, memory)).err().map(|e| e.0),
        None => Some((vm_fd, memory)),
    };
    // No teardown thread: release it here.
    if let Some(parts) = unsent {
        drop(parts);
        *lock(&PENDING_TEARDOWNS) -= 1;
        TEARDOWN_DONE.notify_all();
    }
}

/// The boot protocol and its entry point: the configured one, or the kernel's preferred one.
fn boot_entry(
    config: &VmConfig,
    kernel: &LoadedKernel,
) -> Result<(BootProtocol, GuestAddress), Error> {
    let protocol = match config.boot_protocol {
        None => kernel.preferred_protocol(),
        Some(BootProtocolChoice::Pvh) => BootProtocol::Pvh,
        Some(BootProtocolChoice::Linux64) => BootProtocol::Linux64,
    };
    let entry = match protocol {
        BootProtocol::Pvh => kernel.pvh_entry,
        BootProtocol::Linux64 => Some(kernel.linux64_entry),
    };
    entry
        .map(|e| (protocol, e))
        .ok_or_else(|| Error::ProtocolNotOffered {
            protocol,
            kernel: config.kernel.clone(),
        })
}

/// What a vCPU thread shares with the VM.
struct VcpuThread {
    buses: Arc<Buses>,
    control: Arc<VcpuControl>,
    memory: GuestRam,
    results: Arc<Mutex<Vec<VmExit>>>,
    first_run: Arc<OnceLock<Duration>>,
}

/// Reports a vCPU thread's end to the event loop, whichever way the thread ends: normally
/// with its [`VmExit`], or, if it panics, with a [`VmExit::VcpuError`] (so that a panic ends
/// the VM with an error instead of leaving [`Vm::run`] waiting).
struct ExitReport {
    results: Arc<Mutex<Vec<VmExit>>>,
    exit_evt: EventFd,
    exit: Option<VmExit>,
    index: usize,
}

impl Drop for ExitReport {
    fn drop(&mut self) {
        let exit = self.exit.take().unwrap_or_else(|| {
            VmExit::VcpuError(format!("the thread of vCPU {} panicked", self.index))
        });
        lock(&self.results).push(exit);
        let _ = self.exit_evt.write(1);
    }
}

/// A vCPU thread started before its vCPU exists: it runs the VM's thread hook at once, then
/// waits for its vCPU ([`seat`](Self::seat)), or ends when the seat is dropped unused.
struct VcpuSeat {
    index: usize,
    to_thread: std::sync::mpsc::Sender<SeatedVcpu>,
    thread: JoinHandle<()>,
}

/// A VM's vCPU threads that have no vCPU yet, in vCPU order. Dropping it ends and joins them
/// (each ends once its hook has run).
#[derive(Default)]
struct VcpuSeats(VecDeque<VcpuSeat>);

impl Drop for VcpuSeats {
    fn drop(&mut self) {
        for seat in self.0.drain(..) {
            drop(seat.to_thread);
            let _ = seat.thread.join();
        }
    }
}

/// What a [`VcpuSeat`]'s thread is given to run.
struct SeatedVcpu {
    vcpu: Vcpu,
    t: VcpuThread,
    exit_evt: EventFd,
}

impl VcpuSeat {
    fn start(index: usize, hook: Option<ThreadHook>) -> Result<Self, Error> {
        let (to_thread, from_seat) = std::sync::mpsc::channel::<SeatedVcpu>();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // A panicking hook is reported once the thread has its vCPU, as a failed one.
                let hooked = hook.map_or(Ok(()), |hook| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        hook(ThreadKind::Vcpu(index))
                    }))
                    .unwrap_or_else(|_| Err("the thread hook panicked".into()))
                });
                let Ok(SeatedVcpu {
                    mut vcpu,
                    t,
                    exit_evt,
                }) = from_seat.recv()
                else {
                    // The VM was dropped without running.
                    return;
                };
                let mut report = ExitReport {
                    results: t.results,
                    exit_evt,
                    exit: None,
                    index,
                };
                if let Err(e) = hooked {
                    // Reported before the thread leaves: whoever sees it gone finds why.
                    report.exit = Some(VmExit::VcpuError(format!("vcpu{index}: {e}")));
                    drop(report);
                    // SAFETY: pthread_self has no preconditions.
                    t.control.leave(unsafe { libc::pthread_self() });
                    return;
                }
                let _ = t.first_run.set(process_start().elapsed());
                report.exit = Some(match t.control.run(&mut vcpu, t.buses.as_ref()) {
                    Ok(reason) => crate::cpu::vcpu_stop_to_exit(&vcpu, &t.memory, reason),
                    Err(e) => VmExit::VcpuError(e.to_string()),
                });
            })
            .map_err(Error::Thread)?;
        Ok(VcpuSeat {
            index,
            to_thread,
            thread,
        })
    }

    /// Hands `vcpu` to the thread, which runs it. The thread is registered with the VM's
    /// [`VcpuControl`] first, so that a stop or pause from now on counts and reaches it.
    fn seat(self, vcpu: Vcpu, t: VcpuThread, exit_evt: EventFd) -> JoinHandle<()> {
        // std's RawPthread is a u64; libc's pthread_t is the same integer on glibc, a pointer
        // on musl.
        #[allow(clippy::unnecessary_cast, reason = "a pointer on musl")]
        let id = self.thread.as_pthread_t() as libc::pthread_t;
        t.control.enter(id);
        let seated = SeatedVcpu { vcpu, t, exit_evt };
        if let Err(std::sync::mpsc::SendError(seated)) = self.to_thread.send(seated) {
            // The thread is gone (it cannot be, short of a panic outside the hook):
            // unregistered, and reported as a panicked vCPU thread.
            seated.t.control.leave(id);
            drop(ExitReport {
                results: seated.t.results,
                exit_evt: seated.exit_evt,
                exit: None,
                index: self.index,
            });
        }
        self.thread
    }
}

fn stop_and_join(control: &VcpuControl, threads: Vec<JoinHandle<()>>) {
    control.stop();
    for t in threads {
        // A panicked thread already reported itself (`ExitReport`).
        let _ = t.join();
    }
}

/// Where the console input comes from.
enum InputSource {
    /// Watched by epoll (terminal, pipe, socket).
    Polled,
    /// Read in chunks as the guest takes them (regular file, `/dev/null`); `true` at EOF.
    File { eof: bool },
}

/// Reads a chunk of a file-backed console input into the queue if the queue is empty.
fn refill_from_file(fd: &OwnedFd, eof: &mut bool, input: &Mutex<VecDeque<u8>>) {
    if *eof || !lock(input).is_empty() {
        return;
    }
    let mut buf = [0u8; console::FILE_INPUT_CHUNK];
    match console::read_input(fd.as_raw_fd(), &mut buf) {
        Ok(0) | Err(_) => *eof = true,
        Ok(n) => lock(input).extend(&buf[..n]),
    }
}

#[allow(clippy::too_many_arguments)]
fn build_event_loop<'a>(
    handle: &'a VmHandle,
    legacy: &'a LegacyDevices,
    console: &'a Rc<RefCell<ConsoleOut>>,
    serial_in: Option<&'a OwnedFd>,
    escape: bool,
    vcpu_exit_evt: &'a EventFd,
    results: &'a Mutex<Vec<VmExit>>,
    virtio: &'a [VirtioSlot],
) -> Result<EventLoop<'a>, Error> {
    let mut ev = EventLoop::new()?;
    let serial = &legacy.serial;
    // Each of these ends the VM; the eventfds are level-triggered and never read again.
    for (evt, exit) in [
        (handle.stop_evt.as_ref(), VmExit::Stopped),
        (&legacy.reset_evt, VmExit::Reset),
        (&legacy.panic_evt, VmExit::GuestPanic),
        (&legacy.poweroff_evt, VmExit::Poweroff),
    ] {
        ev.add(evt.as_raw_fd(), EventSet::IN, move |_, _| {
            Flow::Exit(exit.clone())
        })?;
    }
    ev.add(vcpu_exit_evt.as_raw_fd(), EventSet::IN, move |_, _| {
        let _ = vcpu_exit_evt.read();
        match lock(results).first().cloned() {
            Some(exit) => Flow::Exit(exit),
            None => Flow::Continue,
        }
    })?;

    // Console output: drained when the UART's buffer stops being empty, and when the sink
    // (edge-triggered) has room again after a drain stopped short.
    let out = console.clone();
    let buffer_evt = console
        .borrow()
        .buffer
        .ready_evt()
        .try_clone()
        .map_err(Error::EventFd)?;
    ev.add(buffer_evt.as_raw_fd(), EventSet::IN, move |_, _| {
        let _ = buffer_evt.read();
        out.borrow_mut().drain(serial);
        Flow::Continue
    })?;
    if let Some(fd) = console.borrow().sink.fd() {
        let out = console.clone();
        let watched = EventSet::OUT | EventSet::EDGE_TRIGGERED;
        // A sink epoll refuses (a regular file) is never full: the buffer event is enough.
        let _ = ev.add(fd, watched, move |_, reg| {
            if out.borrow_mut().drain(serial) == Drained::Broken {
                reg.remove();
            }
            Flow::Continue
        });
    }

    // Console input: the handle's queue, and the input descriptor.
    let input = handle.input.clone();
    let input_evt = handle.input_evt.clone();
    ev.add(input_evt.as_raw_fd(), EventSet::IN, move |_, _| {
        let _ = input_evt.read();
        console::pump_input(serial, &input);
        Flow::Continue
    })?;
    let file_input: Rc<RefCell<Option<(&OwnedFd, bool)>>> = Rc::new(RefCell::new(None));
    if let Some(fd) = serial_in {
        let input = handle.input.clone();
        let mut esc = Escape::default();
        let polled = ev.add(fd.as_raw_fd(), EventSet::IN, move |_, reg| {
            let mut buf = [0u8; 256];
            match console::read_input(fd.as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => {
                    let typed = if escape {
                        esc.feed(&buf[..n])
                    } else {
                        Typed::Input(buf[..n].to_vec())
                    };
                    match typed {
                        Typed::Quit => return Flow::Exit(VmExit::ConsoleEscape),
                        Typed::Input(bytes) => lock(&input).extend(bytes),
                    }
                    console::pump_input(serial, &input);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // End of input (or an error): stop watching it; the guest runs on.
                _ => reg.remove(),
            }
            Flow::Continue
        });
        let source = if polled.is_ok() {
            InputSource::Polled
        } else {
            InputSource::File { eof: false }
        };
        if let InputSource::File { eof } = source {
            let mut eof = eof;
            refill_from_file(fd, &mut eof, &handle.input);
            console::pump_input(serial, &handle.input);
            *file_input.borrow_mut() = Some((fd, eof));
        }
    }
    let input = handle.input.clone();
    let drained = legacy.serial_drained.try_clone().map_err(Error::EventFd)?;
    let file = file_input.clone();
    ev.add(drained.as_raw_fd(), EventSet::IN, move |_, _| {
        let _ = drained.read();
        if let Some((fd, eof)) = file.borrow_mut().as_mut() {
            refill_from_file(fd, eof, &input);
        }
        console::pump_input(serial, &input);
        Flow::Continue
    })?;

    // virtio queue notifications and the devices' host descriptors: the device does the
    // work, on this thread.
    for slot in virtio {
        let transport = lock(&slot.transport);
        for (q, evt) in transport.queue_notify_evts().iter().enumerate() {
            let t = slot.transport.clone();
            ev.add(evt.as_raw_fd(), EventSet::IN, move |_, _| {
                lock(&t).process_notification(q);
                Flow::Continue
            })?;
        }
        for (i, host) in transport.host_fds().into_iter().enumerate() {
            let mut events = EventSet::empty();
            if host.readable {
                events |= EventSet::IN;
            }
            if host.writable {
                events |= EventSet::OUT;
            }
            if host.edge_triggered {
                events |= EventSet::EDGE_TRIGGERED;
            }
            let t = slot.transport.clone();
            ev.add(host.fd, events, move |_, _| {
                lock(&t).process_host_event(i);
                Flow::Continue
            })?;
        }
    }
    Ok(ev)
}
