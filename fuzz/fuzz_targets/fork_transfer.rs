//! Bytes from a peer as a fork template handed over a Unix socket (`Template::receive`): the
//! first 16 bytes (or fewer) come with a sealed 128 MiB memfd attached, as `Template::send_to`
//! sends its header, the rest after it, then the peer hangs up. A clear error or a template
//! whose state hangs together and fits the memfd; never a panic or a hang.
#![no_main]

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Larger inputs could fill the socket's buffer before anyone reads (the write is not threaded).
const MAX_INPUT: usize = 100_000;

fn memfd() -> &'static std::fs::File {
    static MEMFD: OnceLock<std::fs::File> = OnceLock::new();
    MEMFD.get_or_init(|| {
        let layout = ember_memory::MemoryLayout::new(128 << 20).unwrap();
        let (mem, file) =
            ember_memory::create_guest_memory_memfd(&layout, ember_memory::DirtyBitmap::Off)
                .unwrap();
        ember_memory::remap_private(&mem, &file).unwrap();
        ember_memory::seal_memory_file(&file).unwrap();
        file
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let (a, b) = UnixStream::pair().unwrap();
    let head = data.len().min(16);
    if head > 0 {
        a.send_with_fd(&data[..head], memfd().as_raw_fd()).unwrap();
        std::io::Write::write_all(&mut &a, &data[head..]).unwrap();
    }
    drop(a);
    match ember_vmm::Template::receive(&b, std::path::Path::new("fuzz.sock"), std::time::Duration::from_secs(5)) {
        Ok(t) => {
            let s = t.state();
            assert_eq!(s.memory_bytes, 128 << 20);
            assert_eq!(s.machine.vcpus.len(), usize::from(s.config.vcpus));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
