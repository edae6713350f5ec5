//! Arbitrary bytes as a kernel image (ELF or bzImage) and as a command line: the loader must
//! return an error or a kernel that lies inside guest memory, never panic or write outside it.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use ember_memory::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fn memory() -> &'static GuestRam {
    static MEM: OnceLock<GuestRam> = OnceLock::new();
    MEM.get_or_init(|| {
        let layout = ember_memory::MemoryLayout::new(32 << 20).expect("32 MiB layout");
        ember_memory::create_guest_memory(&layout, ember_memory::DirtyBitmap::Off)
            .expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    let mut image = Cursor::new(data);
    if let Ok(kernel) = ember_loader::load_kernel_from(mem, &mut image) {
        assert!(kernel.kernel_end >= kernel.kernel_start.0);
        assert!(kernel.kernel_end <= 32 << 20);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ember_loader::load_cmdline(mem, text, GuestAddress(0x20000), 2048);
    }
});
