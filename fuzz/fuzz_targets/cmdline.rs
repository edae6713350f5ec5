//! The kernel command line Ember composes: an arbitrary configured command line plus the words
//! the VMM appends (virtio-mmio device descriptions, host-compatibility parameters), then
//! written to guest memory. Either a clear error, or a line that starts with the configured
//! text, holds every appended word, fits the limit and loads; never a panic.
#![no_main]

use std::sync::OnceLock;

use ember_memory::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

const HOST_COMPAT: [&str; 4] = [
    "noxsave",
    "clearcpuid=popcnt,cx16,smap",
    "clearcpuid=popcnt,cx16,smap,smep,erms,fsrm,movbe,avx,avx2,bmi1,bmi2,fsgsbase,rdtscp",
    "",
];

fn memory() -> &'static GuestRam {
    static MEM: OnceLock<GuestRam> = OnceLock::new();
    MEM.get_or_init(|| {
        let layout = ember_memory::MemoryLayout::new(16 << 20).expect("layout");
        ember_memory::create_guest_memory(&layout, ember_memory::DirtyBitmap::Off)
            .expect("guest memory")
    })
}

fuzz_target!(|data: &[u8]| {
    // [devices, host-compat choice, configured text...]
    let Some((&[devices, compat], text)) = data.split_first_chunk::<2>() else {
        return;
    };
    let configured = String::from_utf8_lossy(text);
    let mut cmdline = ember_vmm::KernelCmdline::new(&configured);
    for d in 0..u64::from(devices % 20) {
        cmdline.append(&format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            0xd000_0000 + d * 0x1000,
            5 + d
        ));
    }
    cmdline.append(HOST_COMPAT[usize::from(compat % 4)]);
    match cmdline.build() {
        Ok(line) => {
            assert!(line.starts_with(&*configured));
            for w in cmdline.appended() {
                assert!(line.contains(w.as_str()));
            }
            assert!(line.len() < 2048);
            let size = ember_loader::load_cmdline(memory(), &line, GuestAddress(0x20000), 2048)
                .expect("a composed command line loads");
            assert_eq!(size as usize, line.len() + 1);
        }
        Err(ember_vmm::CmdlineError::TooLong { len, max, .. }) => assert!(len > max),
        Err(ember_vmm::CmdlineError::Nul) => assert!(configured.contains('\0')),
        Err(e) => panic!("unexpected {e}"),
    }
});
