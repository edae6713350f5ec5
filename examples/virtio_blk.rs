//! A VM with a virtio-blk disk, composed from the low-level crates without `ember-vmm`: the
//! in-kernel irqchip, COM1 and the i8042 on the port bus, a virtio-mmio transport on the MMIO
//! bus (its interrupt an irqfd, its queue notification an ioeventfd, described to the guest on
//! the command line), and a small event loop that runs the device when the guest notifies it.
//!
//! ```text
//! cargo xtask probe && cargo xtask disk target/disk.img --size 1M --pattern probe
//! cargo run --example virtio_blk -- target/probe/probe.elf target/disk.img
//! ```

use std::error::Error;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ember::boot::{write_boot_params, BootConfig, BootEntry};
use ember::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use ember::devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use ember::devices::virtio::block::{Block, BlockConfig};
use ember::devices::virtio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use ember::devices::{lock, Buses, EventFdTrigger};
use ember::memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
use ember::vcpu::{kick, template::CpuTemplate, Vcpu, VcpuStop};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Where the disk sits: the first 4 KiB of the 32-bit MMIO window, and its interrupt line.
const DISK_BASE: u64 = ember::memory::MMIO32_START;
const DISK_GSI: u32 = 5;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (kernel, image) = match (args.next(), args.next()) {
        (Some(k), Some(i)) => (k, i),
        _ => return Err("usage: virtio_blk <kernel> <disk image>".into()),
    };
    let layout = MemoryLayout::new(128 * MIB)?;
    let mem = create_guest_memory(&layout, DirtyBitmap::Off)?;
    let loaded = ember::loader::load_kernel(&mem, kernel.as_ref())?;

    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    // SAFETY: `mem` lives until the end of `main`, after the VM's last use.
    unsafe { ember::vcpu::vm::register_guest_memory(&vm, &mem, false)? };
    ember::vcpu::vm::create_irqchip(&vm, false)?;

    // The port bus: COM1 (IRQ 4) to stdout; the i8042's reset ends the VM.
    let mut buses = Buses::default();
    let com1_irq = EventFdTrigger::new()?;
    vm.register_irqfd(com1_irq.eventfd(), COM1_IRQ)?;
    let serial = SerialDevice::new(com1_irq, Box::new(std::io::stdout()))?;
    buses
        .pio
        .insert(Arc::new(Mutex::new(serial)), COM1_BASE, COM1_LEN)?;
    let reset = EventFdTrigger::new()?;
    buses.pio.insert(
        Arc::new(Mutex::new(I8042::new(reset.try_clone()?))),
        I8042_BASE,
        I8042_LEN,
    )?;

    // The disk: a transport around the device, wired into KVM and mapped on the MMIO bus.
    let block = Block::new(BlockConfig {
        path: image.into(),
        read_only: false,
        serial: Some("example".into()),
    })?;
    let irq = EventFdTrigger::new()?;
    let transport = MmioTransport::new(Box::new(block), mem.clone(), irq.try_clone()?)?;
    let notify = transport.queue_notify_evts();
    ember::vcpu::vm::register_virtio_mmio(
        &vm,
        DISK_BASE,
        QUEUE_NOTIFY_OFFSET,
        DISK_GSI,
        irq.eventfd(),
        notify,
    )?;
    let notify = notify[0].try_clone()?;
    let transport = Arc::new(Mutex::new(transport));
    buses
        .mmio
        .insert(transport.clone(), DISK_BASE, MMIO_WINDOW)?;

    let cmdline = format!("probe=virtio,blk virtio_mmio.device=4K@{DISK_BASE:#x}:{DISK_GSI}");
    let entry = BootEntry::Linux64 {
        entry: loaded.linux64_entry,
        setup_header: loaded.setup_header,
    };
    let e820 = layout.e820();
    let regs = write_boot_params(
        &mem,
        &BootConfig {
            entry,
            cmdline: &cmdline,
            initrd: None,
            rsdp: None,
            e820: &e820,
        },
    )?;
    let mut vcpu = Vcpu::new(&vm, 0)?;
    let cpuid = CpuTemplate::default().vcpu_cpuid(
        &ember::vcpu::cpuid::supported(&kvm)?,
        0,
        1,
        vcpu.tsc_khz(),
    )?;
    vcpu.configure(&cpuid, &regs)?;

    kick::init()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, ended) = (stop.clone(), reset.try_clone()?);
    let thread = std::thread::spawn(move || {
        let result = vcpu.run(&buses, &flag);
        let _ = ended.eventfd().write(1);
        result
    });
    // The event loop: the queue notification runs the device; the reset ends it all.
    let epoll = Epoll::new()?;
    for (fd, token) in [(notify.as_raw_fd(), 0), (reset.as_raw_fd(), 1)] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    let mut events = [EpollEvent::default(); 2];
    'run: loop {
        let n = epoll.wait(-1, &mut events)?;
        for ev in &events[..n] {
            match ev.data() {
                0 => lock(&transport).process_notification(0),
                _ => break 'run,
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    kick::kick_thread(&thread)?;
    match thread.join().map_err(|_| "the vCPU thread panicked")?? {
        VcpuStop::Stopped => {
            eprintln!("virtio_blk: guest reset");
            Ok(())
        }
        other => Err(format!("virtio_blk: the guest stopped by itself: {other:?}").into()),
    }
}
