//! Arbitrary bytes as an initramfs of a claimed size, above a kernel ending anywhere, in guest
//! memory of varying size: the loader must place it page-aligned inside low RAM above the
//! kernel or refuse it, never write outside guest memory, and report a short image as
//! truncated.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use ember_memory::GuestRam;
use libfuzzer_sys::fuzz_target;

const MIB: u64 = 1 << 20;

fn memory() -> &'static (ember_memory::MemoryLayout, GuestRam) {
    static MEM: OnceLock<(ember_memory::MemoryLayout, GuestRam)> = OnceLock::new();
    MEM.get_or_init(|| {
        let layout = ember_memory::MemoryLayout::new(16 * MIB).expect("16 MiB layout");
        let mem = ember_memory::create_guest_memory(&layout, ember_memory::DirtyBitmap::Off)
            .expect("guest memory");
        (layout, mem)
    })
}

fuzz_target!(|data: &[u8]| {
    let (layout, mem) = memory();
    if data.len() < 12 {
        return;
    }
    // Claimed size (up to 32 MiB, some of it beyond what the image holds) and kernel end.
    let claimed = u64::from(u32::from_le_bytes(data[0..4].try_into().unwrap())) % (32 * MIB);
    let kernel_end = u64::from_le_bytes(data[4..12].try_into().unwrap());
    let mut image = &data[12..];
    let available = image.len() as u64;
    let result = ember_loader::load_initrd_from(
        mem,
        &mut image,
        claimed,
        layout,
        kernel_end,
        Path::new("fuzz-initrd"),
    );
    match result {
        Ok((addr, size)) => {
            assert_eq!(size, claimed);
            assert!(claimed <= available, "a short image must be refused");
            assert_eq!(addr.0 % 4096, 0, "page aligned");
            assert!(addr.0 >= kernel_end, "above the kernel");
            assert!(addr.0 + size <= layout.low_ram_end(), "inside low RAM");
        }
        Err(ember_loader::Error::InitrdTruncated { expected, read, .. }) => {
            assert_eq!(expected, claimed);
            assert!(read <= available && available < claimed);
        }
        Err(_) => {}
    }
});
