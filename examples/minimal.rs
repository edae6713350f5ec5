//! The same boot as `microvm`, composed straight from the low-level crates, without
//! `ember-vmm`: one vCPU on the calling thread, COM1 and the i8042 on a port bus, the Linux
//! 64-bit boot protocol, no interrupt controller, no event loop.
//!
//! ```text
//! cargo xtask probe
//! cargo run --example minimal -- target/probe/probe.elf "probe=memmap,cmdline,serial"
//! ```

use std::error::Error;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ember::boot::{gdt, paging, write_zero_page, LinuxBootParams};
use ember::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use ember::devices::serial::{SerialDevice, COM1_BASE, COM1_LEN};
use ember::devices::{Bus, EventFdTrigger};
use ember::memory::addresses::*;
use ember::memory::{create_guest_memory, MemoryLayout, MIB};
use ember::vcpu::{BootRegs, EntryMode, IoHandler, Vcpu, VcpuStop};
use kvm_ioctls::Kvm;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Port I/O goes to the bus; a write that makes the i8042 fire its reset trigger stops the vCPU.
struct PortIo {
    bus: Bus,
    reset: EventFdTrigger,
    stop: AtomicBool,
}

impl IoHandler for PortIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.bus.read(u64::from(port), data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.bus.write(u64::from(port), data);
        if self.reset.eventfd().read().is_ok() {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let kernel_path = PathBuf::from(args.next().ok_or("usage: minimal <kernel> [cmdline]")?);
    let cmdline = args
        .next()
        .unwrap_or_else(|| "probe=memmap,cmdline,serial".into());

    // Guest memory, kernel, command line.
    let layout = MemoryLayout::new(128 * MIB)?;
    let mem = create_guest_memory(&layout)?;
    let kernel = ember::loader::load_kernel(&mem, &kernel_path)?;
    let cmdline_addr = GuestAddress(CMDLINE_ADDR);
    let cmdline_size =
        ember::loader::load_cmdline(&mem, &cmdline, cmdline_addr, CMDLINE_MAX_SIZE as usize)?;

    // Linux 64-bit boot protocol: zero page, identity page tables, GDT.
    let e820 = layout.e820();
    let params = LinuxBootParams {
        setup_header: kernel.setup_header,
        cmdline_addr,
        cmdline_size,
        initrd: None,
        e820: &e820,
        acpi_rsdp_addr: None,
    };
    write_zero_page(&mem, GuestAddress(ZERO_PAGE_ADDR), &params)?;
    let pml4 = paging::write_identity_page_tables(&mem)?;
    gdt::write_gdt(&mem, GuestAddress(GDT_ADDR), &gdt::LONG_MODE)?;
    gdt::write_idt(&mem, GuestAddress(IDT_ADDR))?;

    // KVM VM with the guest memory registered.
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.set_tss_address(0xfffb_d000)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr())?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping is owned by `mem`, which outlives the VM in this function.
        unsafe { vm.set_user_memory_region(region)? };
    }

    // Devices: COM1 to stdout, i8042 for the guest's reset.
    let reset = EventFdTrigger::new()?;
    let mut bus = Bus::new();
    let serial = SerialDevice::new(EventFdTrigger::new()?, Box::new(std::io::stdout()))?;
    bus.insert(Arc::new(Mutex::new(serial)), COM1_BASE, COM1_LEN)?;
    bus.insert(
        Arc::new(Mutex::new(I8042::new(reset.try_clone()?))),
        I8042_BASE,
        I8042_LEN,
    )?;

    // One vCPU entering the kernel's 64-bit entry point.
    let mut vcpu = Vcpu::new(&vm, 0)?;
    let mut cpuid = ember::vcpu::cpuid::supported(&kvm)?;
    ember::vcpu::cpuid::normalize(&mut cpuid, 0, 1, vcpu.tsc_khz())?;
    vcpu.configure(
        &cpuid,
        &BootRegs {
            mode: EntryMode::Linux64 {
                entry: kernel.linux64_entry.0,
                zero_page: ZERO_PAGE_ADDR,
                pml4: pml4.0,
            },
            gdt_addr: GDT_ADDR,
            gdt: gdt::LONG_MODE,
            idt_addr: IDT_ADDR,
            stack_top: BOOT_STACK_TOP,
        },
    )?;

    let io = PortIo {
        bus,
        reset,
        stop: AtomicBool::new(false),
    };
    match vcpu.run(&io, &io.stop)? {
        VcpuStop::Stopped => {
            eprintln!("minimal: guest reset");
            Ok(())
        }
        other => Err(format!("minimal: guest stopped: {other:?}").into()),
    }
}
