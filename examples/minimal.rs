//! A boot composed straight from the low-level crates, without `ember-vmm`: one vCPU, COM1 and
//! the i8042 on a port bus, the Linux 64-bit boot protocol, no event loop.
//!
//! ```text
//! cargo xtask probe
//! cargo run --example minimal -- target/probe/probe.elf "probe=memmap,cmdline,serial"
//! ```

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ember::boot::{write_boot_params, BootConfig, BootEntry};
use ember::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use ember::devices::serial::{SerialDevice, COM1_BASE, COM1_LEN};
use ember::devices::{Buses, EventFdTrigger};
use ember::memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
use ember::vcpu::{kick, template::CpuTemplate, Vcpu};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let kernel = args.next().ok_or("usage: minimal <kernel> [cmdline]")?;
    let cmdline = args
        .next()
        .unwrap_or_else(|| "probe=memmap,cmdline,serial".into());

    let layout = MemoryLayout::new(128 * MIB)?;
    let mem = create_guest_memory(&layout, DirtyBitmap::Off)?;
    let loaded = ember::loader::load_kernel(&mem, kernel.as_ref())?;
    let boot = BootConfig {
        entry: BootEntry::Linux64 {
            entry: loaded.linux64_entry,
            setup_header: loaded.setup_header,
        },
        cmdline: &cmdline,
        initrd: None,
        rsdp: None,
        e820: &layout.e820(),
    };
    let regs = write_boot_params(&mem, &boot)?;

    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    // SAFETY: `mem` lives until the end of `main`, after the VM's last use.
    unsafe { ember::vcpu::vm::register_guest_memory(&vm, &mem, false)? };
    vm.set_tss_address(usize::try_from(ember::memory::addresses::KVM_TSS_ADDRESS)?)?;

    // COM1 to stdout; the i8042's reset (0xfe to port 0x64) wakes the main thread (blocking).
    let done = EventFdTrigger::from(EventFd::new(EFD_CLOEXEC)?);
    let mut buses = Buses::default();
    let serial = SerialDevice::new(EventFdTrigger::new()?, Box::new(std::io::stdout()))?;
    buses
        .pio
        .insert(Arc::new(Mutex::new(serial)), COM1_BASE, COM1_LEN)?;
    buses.pio.insert(
        Arc::new(Mutex::new(I8042::new(done.try_clone()?))),
        I8042_BASE,
        I8042_LEN,
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
    let (flag, ended) = (stop.clone(), done.try_clone()?);
    let thread = std::thread::spawn(move || {
        let result = vcpu.run(&buses, &flag);
        let _ = ended.eventfd().write(1); // a vCPU that stops by itself wakes the main thread too
        result
    });
    done.eventfd().read()?;
    stop.store(true, Ordering::SeqCst);
    kick::kick_thread(&thread)?;
    match thread.join().map_err(|_| "the vCPU thread panicked")?? {
        ember::vcpu::VcpuStop::Stopped => {
            eprintln!("minimal: guest reset");
            Ok(())
        }
        other => Err(format!("minimal: the guest stopped by itself: {other:?}").into()),
    }
}
