//! A userfaultfd page-fault handler for tests, in the role of Firecracker's example handlers:
//! it takes a VMM's handshake on a Unix socket (a JSON array of regions, the userfaultfd
//! attached) and fills every faulting page from a memory snapshot file, until the VMM hangs up.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A region as the VMM described it (Firecracker's `GuestRegionUffdMapping`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Region {
    /// Where the region is mapped in the VMM.
    pub base_host_virt_addr: u64,
    /// Its length.
    pub size: usize,
    /// Where its contents start in the memory file.
    pub offset: u64,
    /// Its page size.
    pub page_size: usize,
}

/// What a handler did.
#[derive(Debug, Default, Clone)]
pub struct Served {
    /// The regions of the handshake.
    pub regions: Vec<Region>,
    /// Pages filled from the file.
    pub pages: u64,
    /// Remove events (a balloon's discards).
    pub removes: u64,
}

/// A handler thread serving one VMM.
#[derive(Debug)]
pub struct PageServer {
    join: Option<JoinHandle<Result<Served, String>>>,
}

impl PageServer {
    /// Listens on `socket` (bound before this returns) and serves the first VMM that connects
    /// from `memory`, giving up if none connects within `wait`.
    pub fn serve_file(
        socket: &Path,
        memory: std::fs::File,
        wait: Duration,
    ) -> std::io::Result<PageServer> {
        let listener = UnixListener::bind(socket)?;
        listener.set_nonblocking(true)?;
        let join = std::thread::spawn(move || serve(&listener, &memory, wait));
        Ok(PageServer { join: Some(join) })
    }

    /// Waits for the VMM to hang up; what was served.
    pub fn finish(mut self) -> Result<Served, String> {
        self.join
            .take()
            .map_or(Err("already finished".into()), |j| {
                j.join().map_err(|_| "the handler panicked".to_string())?
            })
    }
}

fn accept(listener: &UnixListener, wait: Duration) -> Result<UnixStream, String> {
    let end = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(format!("no VMM connected: {e}")),
        }
    }
}

fn serve(
    listener: &UnixListener,
    memory: &std::fs::File,
    wait: Duration,
) -> Result<Served, String> {
    let stream = accept(listener, wait)?;
    let mut buf = vec![0u8; 1 << 16];
    let (n, fd) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("handshake: {e}"))?;
    let fd = fd.ok_or("the handshake brought no userfaultfd")?;
    // SAFETY: the descriptor just received is owned by `fd` alone; the Uffd takes it over.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    let regions: Vec<Region> =
        serde_json::from_slice(&buf[..n]).map_err(|e| format!("handshake JSON: {e}"))?;
    let mut served = Served {
        regions: regions.clone(),
        ..Served::default()
    };
    let mut page = vec![0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        if fds[1].revents != 0 {
            // The VMM sends nothing after the handshake: a read of 0 bytes (or an error) means
            // it closed its end, so it is gone.
            let mut b = [0u8; 1];
            let _ = stream.set_nonblocking(true);
            match std::io::Read::read(&mut &stream, &mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => return Ok(served),
            }
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        while let Some(event) = uffd.read_event().map_err(|e| format!("read_event: {e}"))? {
            match event {
                Event::Pagefault { addr, .. } => {
                    let at = (addr as u64) & !4095;
                    let region = regions
                        .iter()
                        .find(|r| {
                            at >= r.base_host_virt_addr
                                && at < r.base_host_virt_addr + r.size as u64
                        })
                        .ok_or_else(|| format!("a fault at {at:#x}, in no region"))?;
                    let offset = region.offset + (at - region.base_host_virt_addr);
                    memory
                        .read_exact_at(&mut page, offset)
                        .map_err(|e| format!("memory file at {offset:#x}: {e}"))?;
                    // SAFETY: `page` is 4096 readable bytes; the destination is a page of a
                    // region the VMM registered with this userfaultfd.
                    let r = unsafe {
                        uffd.copy(page.as_ptr().cast(), at as *mut libc::c_void, 4096, true)
                    };
                    match r {
                        Ok(_) => served.pages += 1,
                        // Another fault on the same page was served first.
                        Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                            uffd.wake(at as *mut libc::c_void, 4096)
                                .map_err(|e| format!("wake: {e}"))?;
                        }
                        Err(e) => return Err(format!("UFFDIO_COPY at {at:#x}: {e}")),
                    }
                }
                Event::Remove { .. } => served.removes += 1,
                _ => {}
            }
        }
    }
}
