//! Forks: many VMs from one paused template, each a copy-on-write view of the template's
//! guest memory.
//!
//! A VM built with [`VmBuilder::fork_template`] keeps its guest memory in a memfd. Once it is
//! paused at the point forks should start from (a warmed-up guest), [`VmHandle::template`]
//! takes its state once and returns a [`Template`]: that state plus the memfd. Each
//! [`Template::fork`] is then a restore of that state whose memory is the memfd mapped
//! `MAP_PRIVATE`: pages are shared with the template and every other fork until the fork writes
//! them; nothing is copied up front, so a fork costs the same for 128 MiB as for 2 GiB.
//!
//! Identity: every fork re-creates its devices from the configuration, so anything that names
//! a host resource must differ per fork, and [`Template::fork_with`] refuses a fork that would
//! share one with the template: a vsock Unix socket ([`SnapshotState::override_vsock`], with
//! a CID of its own), a TAP ([`SnapshotState::override_tap`]), a writable disk
//! ([`SnapshotState::override_disk`]: give each fork its own copy of the image; a read-only
//! disk is shared). virtio-rng draws from the host's entropy in each fork, and each fork writes a
//! new VM generation ID (ACPI `VMGENCTR`, with a notification once it runs), so that the guest
//! can tell it was forked and reseed its RNG.
//!
//! A snapshot on disk can be a template too ([`Template::from_snapshot`]): its memory file is
//! then the shared base, mapped `MAP_PRIVATE` by every fork, so that a process that did not
//! boot the template (a new VMM process, a host after a reboot) forks it just the same. The
//! memory file must not change while forks of it run: a page a fork has not written yet is
//! read from the file when first touched (the same holds for a restore).
//!
//! A template made from a running VM can also be handed to another process
//! ([`Template::send_to`] and [`Template::receive`], over a Unix socket): the memfd travels as
//! a descriptor (`SCM_RIGHTS`), sealed against writes and size changes, and the state as a
//! state file holds it, so that each fork may run in a VMM process of its own, still sharing
//! the template's pages. The reference VMM serves forks this way (`PUT /fork/template`,
//! `PUT /fork/load`; docs/api.md).
//!
//! [`VmBuilder::fork_template`]: crate::VmBuilder::fork_template
//! [`VmHandle::template`]: crate::VmHandle::template

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::Error;
use crate::snapshot::{SnapshotError, SnapshotState};
use crate::vm::VmBuilder;

/// A paused VM's state and its guest memory's file (the VM's memfd, or a snapshot's memory
/// file): the base of forks.
#[derive(Debug)]
pub struct Template {
    pub(crate) state: SnapshotState,
    pub(crate) memory: std::fs::File,
    /// What names the memory file in errors.
    pub(crate) memory_path: PathBuf,
}

/// The first bytes of a template handed over a socket ([`Template::send_to`]).
const TRANSFER_MAGIC: &[u8; 8] = b"EMBERFRK";
/// The header: the magic, then the state's length (u64, little-endian).
const TRANSFER_HEADER: usize = 16;
/// The largest state [`Template::receive`] takes (a state is some KiB per vCPU and device).
pub const MAX_TRANSFER_STATE: u64 = 16 << 20;

/// Whether `f` lives on tmpfs (an ordinary memfd does; a huge-page one is on hugetlbfs).
fn on_tmpfs(f: &std::fs::File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // SAFETY: statfs is plain data; fstatfs writes it for a descriptor this function borrows.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid statfs to write into.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's type differs between libcs"
    )]
    let fs_type = st.f_type as i64;
    r == 0 && fs_type == TMPFS_MAGIC
}

/// What [`Template::fork_with`] refuses.
fn shared_resource(what: String) -> Error {
    Error::Snapshot(SnapshotError::SharedResource(what))
}

impl Template {
    /// A template from a snapshot on disk: the state file at `state` ([`crate::read_snapshot`]:
    /// version, checksum and consistency checked) and the memory file at `memory`, opened
    /// read-only, which must hold exactly the state's guest memory. Nothing of the memory is
    /// read here. The file must stay unchanged while forks of it run (see the module docs),
    /// and must be a full snapshot's memory (or a base a diff was merged into): a diff
    /// snapshot's memory file has the full size but holes where it holds no page, which a fork
    /// would read as zeroes.
    pub fn from_snapshot(state: &Path, memory: &Path) -> Result<Self, Error> {
        let state = crate::snapshot::read_state(state)?;
        // Not a FIFO or a device: opening one must not block, reading one would not be memory.
        let file = ember_loader::open_regular_file(memory).map_err(|source| {
            Error::Snapshot(SnapshotError::Io {
                path: memory.to_path_buf(),
                source,
            })
        })?;
        let meta = file.metadata().map_err(|source| {
            Error::Snapshot(SnapshotError::Io {
                path: memory.to_path_buf(),
                source,
            })
        })?;
        if !meta.is_file() || meta.len() != state.memory_bytes {
            return Err(Error::Snapshot(SnapshotError::MemorySize {
                path: memory.to_path_buf(),
                size: if meta.is_file() { meta.len() } else { 0 },
                want: state.memory_bytes,
            }));
        }
        Ok(Template {
            state,
            memory: file,
            memory_path: memory.to_path_buf(),
        })
    }

    /// Hands the template to another process over `socket`, a connected Unix stream socket:
    /// a 16-byte header (`EMBERFRK`, then the state's length as a little-endian u64) with the
    /// memfd attached (`SCM_RIGHTS`), then the state as a state file holds it (versioned and
    /// checksummed). Nothing of guest memory is copied: the receiver ([`receive`](Self::receive))
    /// maps the same memfd copy-on-write. Whoever can connect to the socket a caller serves
    /// this on can read the guest's memory: make it accessible to the forks' VMMs only.
    ///
    /// Only a template made from a running VM ([`crate::VmHandle::template`]) whose memfd is
    /// sealed ([`ember_memory::is_sealed`]) can be sent: the receiver must be sure its base
    /// never changes. A snapshot on disk is opened where it is needed
    /// ([`from_snapshot`](Self::from_snapshot)) instead. Set a write timeout on `socket`
    /// if the peer may stall.
    pub fn send_to(&self, socket: &UnixStream) -> Result<(), Error> {
        let what = Path::new("the fork socket");
        if !ember_memory::is_sealed(&self.memory) {
            return Err(Error::Snapshot(SnapshotError::Transfer {
                path: what.into(),
                why: format!(
                    "its memory ({}) is not a sealed memfd, so another process could not rely \
                     on it (open a snapshot on disk there with Template::from_snapshot)",
                    self.memory_path.display()
                ),
            }));
        }
        let io = |source: std::io::Error| {
            Error::Snapshot(SnapshotError::Io {
                path: what.into(),
                source,
            })
        };
        let body = serde_json::to_vec(&self.state).map_err(|source| {
            Error::Snapshot(SnapshotError::Json {
                path: what.into(),
                source,
            })
        })?;
        let framed = crate::snapshot::frame_state(&body);
        let mut head = [0u8; TRANSFER_HEADER];
        head[..8].copy_from_slice(TRANSFER_MAGIC);
        head[8..].copy_from_slice(&(framed.len() as u64).to_le_bytes());
        let sent = socket
            .send_with_fd(&head[..], self.memory.as_raw_fd())
            .map_err(|e| io(e.into()))?;
        let mut w = socket;
        w.write_all(&head[sent..]).map_err(io)?;
        w.write_all(&framed).map_err(io)?;
        Ok(())
    }

    /// Whether the template can be handed to another process ([`send_to`](Self::send_to)):
    /// its memory is a sealed memfd.
    pub fn can_send(&self) -> bool {
        ember_memory::is_sealed(&self.memory)
    }

    /// A template handed over `socket` by [`send_to`](Self::send_to) (`name`, the socket's
    /// path, names it in errors), all of it within `timeout` (a peer that stalls or trickles
    /// gets an error then). The state is checked as a state file is
    /// ([`crate::read_snapshot`]), and the memory must be a sealed memfd (on tmpfs: not a
    /// huge-page one, whose copy-on-write could fail) of exactly the state's size: a peer that
    /// sends anything else gets a clear error, never a mapping that could change or shrink
    /// under the forks.
    ///
    /// The peer is trusted as a state file is: the state names the host files, sockets and
    /// TAPs the fork's devices open. Accept templates only from a VMM of the same user (check
    /// the socket's peer, as the reference VMM does) or one you started.
    pub fn receive(socket: &UnixStream, name: &Path, timeout: Duration) -> Result<Self, Error> {
        let deadline = Instant::now() + timeout;
        let bad = |why: String| {
            Error::Snapshot(SnapshotError::Transfer {
                path: name.to_path_buf(),
                why,
            })
        };
        let io = |source: std::io::Error| {
            Error::Snapshot(SnapshotError::Io {
                path: name.to_path_buf(),
                source,
            })
        };
        // Every read waits at most for what is left of the whole transfer's time.
        let left = || -> Result<Duration, Error> {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(bad(format!(
                    "the transfer took longer than {} ms",
                    timeout.as_millis()
                )));
            }
            socket.set_read_timeout(Some(left)).map_err(io)?;
            Ok(left)
        };
        left()?;
        let mut head = [0u8; TRANSFER_HEADER];
        let (got, memory) = socket.recv_with_fd(&mut head).map_err(|e| io(e.into()))?;
        // Descriptors received without MSG_CMSG_CLOEXEC: keep a close-on-exec duplicate.
        let memory = memory.map(|f| f.try_clone()).transpose().map_err(io)?;
        if got == 0 {
            return Err(bad("the connection closed before a template came".into()));
        }
        let mut r = socket;
        left()?;
        r.read_exact(&mut head[got..])
            .map_err(|e| bad(format!("its header ended early ({e})")))?;
        if &head[..8] != TRANSFER_MAGIC {
            return Err(bad("no EMBERFRK header".into()));
        }
        let Some(memory) = memory else {
            return Err(bad("no memory descriptor came with it".into()));
        };
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[8..]);
        let len = u64::from_le_bytes(len);
        if len > MAX_TRANSFER_STATE {
            return Err(bad(format!(
                "a state of {len} bytes (at most {MAX_TRANSFER_STATE} are taken)"
            )));
        }
        let mut bytes = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        while (bytes.len() as u64) < len {
            left()?;
            let want = usize::try_from(len - bytes.len() as u64)
                .unwrap_or(usize::MAX)
                .min(chunk.len());
            match r.read(&mut chunk[..want]) {
                Ok(0) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(bad(format!("its state ended early ({e})"))),
            }
        }
        if bytes.len() as u64 != len {
            return Err(bad(format!(
                "its state ended after {} of {len} bytes",
                bytes.len()
            )));
        }
        let state = crate::snapshot::parse_state(&bytes, name)?;
        if !ember_memory::is_sealed(&memory) {
            return Err(bad(
                "its memory is not a sealed memfd (it could change under the forks)".into(),
            ));
        }
        if !on_tmpfs(&memory) {
            return Err(bad(
                "its memory is not an ordinary memfd (a huge-page one's copy-on-write could \
                 fail for want of huge pages)"
                    .into(),
            ));
        }
        let size = memory.metadata().map_err(io)?.len();
        if size != state.memory_bytes {
            return Err(Error::Snapshot(SnapshotError::MemorySize {
                path: name.to_path_buf(),
                size,
                want: state.memory_bytes,
            }));
        }
        Ok(Template {
            state,
            memory,
            memory_path: name.to_path_buf(),
        })
    }

    /// The template's state: clone it, apply a fork's overrides, give it to
    /// [`fork_with`](Self::fork_with).
    pub fn state(&self) -> &SnapshotState {
        &self.state
    }

    /// A new descriptor of the template's memfd.
    pub(crate) fn memory_file(&self) -> Result<std::fs::File, Error> {
        self.memory.try_clone().map_err(|source| {
            Error::Snapshot(SnapshotError::Io {
                path: self.memory_path.clone(),
                source,
            })
        })
    }

    /// A fork with the template's configuration unchanged (for a template whose devices name
    /// no host resource a fork would share: no vsock, TAP or writable disk).
    pub fn fork(&self) -> Result<VmBuilder, Error> {
        self.fork_with(self.state.clone())
    }

    /// A fork from `state` (the template's, with this fork's identity applied). The builder
    /// restores it; set its console and [`VmBuilder::start_paused`] as for any VM.
    pub fn fork_with(&self, state: SnapshotState) -> Result<VmBuilder, Error> {
        let t = &self.state.config;
        let f = &state.config;
        if let (Some(a), Some(b)) = (&t.vsock, &f.vsock) {
            if a.uds_path == b.uds_path {
                return Err(shared_resource(format!(
                    "the vsock socket {} (give the fork its own with override_vsock)",
                    a.uds_path.display()
                )));
            }
        }
        for (i, (a, b)) in t.nets.iter().zip(&f.nets).enumerate() {
            if a.tap == b.tap {
                return Err(shared_resource(format!(
                    "the TAP {} of interface {i} (give the fork its own with override_tap)",
                    a.tap
                )));
            }
        }
        for (a, b) in t.disks.iter().zip(&f.disks) {
            if !b.read_only && a.path == b.path {
                return Err(shared_resource(format!(
                    "the writable disk {} (give the fork its own copy with override_disk)",
                    a.path.display()
                )));
            }
        }
        let memory = self.memory_file()?;
        Ok(VmBuilder::restore(state, memory, &self.memory_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(send: impl FnOnce(&UnixStream)) -> String {
        let (a, b) = UnixStream::pair().unwrap();
        send(&a);
        drop(a);
        Template::receive(&b, Path::new("/run/t.sock"), Duration::from_secs(5))
            .unwrap_err()
            .to_string()
    }

    fn sealed_memfd() -> std::fs::File {
        let layout = ember_memory::MemoryLayout::new(16 * ember_memory::MIB).unwrap();
        let (mem, file) =
            ember_memory::create_guest_memory_memfd(&layout, ember_memory::DirtyBitmap::Off)
                .unwrap();
        ember_memory::remap_private(&mem, &file).unwrap();
        ember_memory::seal_memory_file(&file).unwrap();
        file
    }

    fn header(len: u64) -> Vec<u8> {
        let mut h = TRANSFER_MAGIC.to_vec();
        h.extend_from_slice(&len.to_le_bytes());
        h
    }

    #[test]
    fn a_peer_that_stalls_or_trickles_is_given_up_on_in_time() {
        let sealed = sealed_memfd();
        // Stalls after the header.
        let (a, b) = UnixStream::pair().unwrap();
        a.send_with_fd(&header(100)[..], sealed.as_raw_fd())
            .unwrap();
        let t = Instant::now();
        let e = Template::receive(&b, Path::new("/run/t.sock"), Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(t.elapsed() < Duration::from_secs(2), "{e}");
        assert!(e.contains("/run/t.sock"), "{e}");
        // Trickles a byte every 50 ms: each read is quick, the whole is not.
        let (a, b) = UnixStream::pair().unwrap();
        a.send_with_fd(&header(1000)[..], sealed.as_raw_fd())
            .unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..40 {
                if (&a).write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let t = Instant::now();
        let e = Template::receive(&b, Path::new("/run/t.sock"), Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(t.elapsed() < Duration::from_secs(1), "{e}");
        assert!(e.contains("longer than 300 ms"), "{e}");
        drop(b);
        writer.join().unwrap();
    }

    #[test]
    fn what_is_not_a_template_is_refused_with_a_reason() {
        let sealed = sealed_memfd();
        let e = receive(|_| {});
        assert!(
            e.contains("/run/t.sock") && e.contains("closed before"),
            "{e}"
        );
        let e = receive(|s| {
            s.send_with_fd(&b"GET / HTTP/1.1\r\n"[..], sealed.as_raw_fd())
                .unwrap();
        });
        assert!(e.contains("no EMBERFRK header"), "{e}");
        let e = receive(|s| (&*s).write_all(&header(10)).unwrap());
        assert!(e.contains("no memory descriptor"), "{e}");
        let e = receive(|s| {
            s.send_with_fd(&header(u64::MAX)[..], sealed.as_raw_fd())
                .unwrap();
        });
        assert!(e.contains("at most"), "{e}");
        let e = receive(|s| {
            s.send_with_fd(&header(100)[..], sealed.as_raw_fd())
                .unwrap();
            (&*s).write_all(b"EMBERSNP").unwrap();
        });
        assert!(e.contains("ended after 8 of 100"), "{e}");
        // A header cut in two still parses; a state that is not one is refused as a state
        // file would be.
        let junk = crate::snapshot::frame_state(b"{}");
        let e = receive(|s| {
            s.send_with_fd(&header(junk.len() as u64)[..5], sealed.as_raw_fd())
                .unwrap();
            (&*s).write_all(&header(junk.len() as u64)[5..]).unwrap();
            (&*s).write_all(&junk).unwrap();
        });
        assert!(e.contains("invalid state"), "{e}");
    }
}
