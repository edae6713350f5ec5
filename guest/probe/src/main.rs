//! Ember's probe guest.
//!
//! A freestanding x86_64 ELF that a VMM boots like a kernel (PVH note entry or Linux 64-bit
//! boot protocol entry). It does a minimal ring-0 setup (page tables, GDT/TSS with an
//! all-ports I/O bitmap, IDT), drops to ring 3 with IOPL 3 and runs the checks named on the
//! command line, reporting each one as a `PROBE ...` line on COM1, then resets the VM. See
//! `docs/probe.md` for the protocol.
//!
//! Ring 0 is kept tiny because on a PVM host it runs in KVM's instruction emulator; ring 3
//! runs natively. Ring 3 reaches ring 0 through the `int 0x80` gate (see `arch`).

#![no_std]
#![no_main]

mod acpi;
mod arch;
mod balloon;
mod blk;
mod bootinfo;
mod checks;
mod console;
mod hostile;
mod irq;
#[cfg(not(target_os = "none"))]
mod mem;
mod net;
mod phys;
mod platform;
mod rng;
mod setup;
mod smp;
mod virtio;
mod vsock;

use core::panic::PanicInfo;

use console::Line;

/// Ring-3 entry, reached by `iretq` from `setup::probe_setup`.
pub extern "C" fn user_main() -> ! {
    checks::run()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    let mut line = Line::new("panic");
    line.s("rust");
    if let Some(loc) = info.location() {
        line.s(" at ")
            .s(loc.file())
            .s(":")
            .dec(u64::from(loc.line()));
    }
    line.end();
    if arch::cpl() == 0 {
        arch::ring0_panic_reset(true)
    }
    arch::outb(0x505, 1);
    // Give the VMM a moment to act on pvpanic before the reset (a few tens of ms natively).
    arch::local_loop(100_000_000);
    arch::gate_reset()
}
