//! Snapshot files: a microVM's whole state (its [`VmConfig`], [`MachineState`] and device
//! placement) in a versioned, checksummed state file, and its guest memory in a second file
//! (the RAM regions back to back in address order, the layout [`ember_memory::map_guest_memory`]
//! maps).
//!
//! The state file is an 8-byte magic `EMBERSNP`, the format version (`u32`, little endian), the
//! body's length (`u64`) and CRC-32 (`u32`), then the body: JSON of [`SnapshotState`]. A file of
//! another version, a truncated or corrupt one is refused with a [`SnapshotError`] naming what
//! is wrong, before anything is built.
//!
//! The memory file is written sparse: pages the host never gave the guest (not resident) stay
//! holes, so a 2 GiB guest that touched 40 MiB writes 40 MiB. Restoring maps it `MAP_PRIVATE`:
//! nothing is read until the guest touches a page, and the file is never written.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ember_memory::GuestRam;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::state::MachineState;

/// The magic at the start of a state file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"EMBERSNP";
/// The state file format this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
/// Bytes of the header before the body.
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Largest body accepted (a state is some kilobytes per vCPU).
const MAX_BODY: u64 = 64 << 20;

/// Where a virtio device sat in the snapshotted VM (checked again on restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlacement {
    /// The device's id.
    pub id: String,
    /// Its virtio device type.
    pub device_type: u32,
    /// Its MMIO window.
    pub mmio_base: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

/// What a state file holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The Ember version that wrote it.
    pub ember_version: String,
    /// The configuration of the VM (devices are re-created from it, in the same order).
    pub config: VmConfig,
    /// Bytes of guest memory (the memory file's size).
    pub memory_bytes: u64,
    /// The virtio devices, in attach order.
    pub devices: Vec<DevicePlacement>,
    /// vCPUs, VM-level devices, devices.
    pub machine: MachineState,
}

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not an Ember state file.
    #[error("{} is not an Ember snapshot state file (no EMBERSNP magic)", .0.display())]
    NotASnapshot(PathBuf),
    /// A state file of another format version.
    #[error("{}: snapshot format version {found}; this Ember reads version {supported}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// This build's.
        supported: u32,
    },
    /// Shorter than its header says.
    #[error("{}: truncated ({got} of {want} bytes)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes present.
        got: u64,
        /// Bytes needed.
        want: u64,
    },
    /// The checksum does not match: the file was changed or damaged.
    #[error("{}: corrupt (checksum {found:#010x}, header says {want:#010x})", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Computed.
        found: u32,
        /// Recorded.
        want: u32,
    },
    /// The body is not a state this build understands.
    #[error("{}: invalid state: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        #[source]
        source: serde_json::Error,
    },
    /// The memory file does not fit the state.
    #[error("{}: {size} bytes of guest memory; the state needs {want}", path.display())]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// What the state says.
        want: u64,
    },
    /// The body parsed but does not hang together.
    #[error("{}: inconsistent state: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A template handed over a Unix socket ([`crate::Template::receive`]) that is not one.
    #[error("{}: not a fork template: {why}", path.display())]
    Transfer {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The userfaultfd memory backend could not be set up.
    #[error("{}: userfaultfd memory backend: {why}", path.display())]
    Uffd {
        /// The page-fault handler's socket.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A fork would share a host resource with its template.
    #[error("a fork would share {0} with its template")]
    SharedResource(String),
    /// A diff snapshot of a VM that does not track dirty pages.
    #[error(
        "a diff snapshot needs dirty page tracking, turned on when the VM is built or \
         restored (track_dirty_pages)"
    )]
    NoDirtyLog,
    /// A diff memory file that does not fit its base.
    #[error("{}: {size} bytes; its base {} has {base_size}", diff.display(), base.display())]
    DiffSize {
        /// The diff memory file.
        diff: PathBuf,
        /// Its size.
        size: u64,
        /// The base memory file.
        base: PathBuf,
        /// The base's size.
        base_size: u64,
    },
    /// A restore override names a device the snapshot does not have.
    #[error("the snapshot has no {kind} device {id:?} to override")]
    NoSuchDevice {
        /// `network` or `vsock`.
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
}

impl SnapshotState {
    /// Points the network interface `id` at the host TAP `tap` (a restored clone's own TAP;
    /// Firecracker's `network_overrides`).
    pub fn override_tap(&mut self, id: &str, tap: &str) -> Result<(), SnapshotError> {
        let nic = self
            .config
            .nets
            .iter_mut()
            .enumerate()
            .find(|(i, n)| n.id.clone().unwrap_or_else(|| format!("net{i}")) == id)
            .map(|(_, n)| n)
            .ok_or_else(|| SnapshotError::NoSuchDevice {
                kind: "network",
                id: id.into(),
            })?;
        nic.tap = tap.into();
        Ok(())
    }

    /// Moves the guest's kvmclock on by the host realtime that passed since the snapshot
    /// (Firecracker's `clock_realtime`): without it the restored guest's clock goes on from the
    /// snapshot's moment. Returns the nanoseconds added.
    pub fn advance_clock_to_now(&mut self) -> u64 {
        ember_vcpu::state::advance_clock(&mut self.machine.vm)
    }

    /// Gives disk `id` another image (a fork's own copy of a writable disk). The image must
    /// have the same size: the guest's driver already knows the capacity.
    pub fn override_disk(&mut self, id: &str, path: &Path) -> Result<(), SnapshotError> {
        let disk = self
            .config
            .disks
            .iter_mut()
            .enumerate()
            .find(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")) == id)
            .map(|(_, d)| d)
            .ok_or_else(|| SnapshotError::NoSuchDevice {
                kind: "disk",
                id: id.into(),
            })?;
        disk.path = path.to_path_buf();
        Ok(())
    }

    /// Gives the vsock device a new host socket and, if `cid` is set, a new guest CID (the
    /// guest reads it again on the transport-reset event every restore sends;
    /// Firecracker's `vsock_override`).
    pub fn override_vsock(
        &mut self,
        uds_path: &Path,
        cid: Option<u64>,
    ) -> Result<(), SnapshotError> {
        let vsock = self
            .config
            .vsock
            .as_mut()
            .ok_or_else(|| SnapshotError::NoSuchDevice {
                kind: "vsock",
                id: "vsock".into(),
            })?;
        vsock.uds_path = uds_path.to_path_buf();
        if let Some(cid) = cid {
            vsock.cid = cid;
        }
        Ok(())
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `state` to `path` (through a temporary file renamed into place: a crash leaves the
/// old file or none, never half of one).
pub fn write_state(path: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let body = serde_json::to_vec(state).map_err(|source| SnapshotError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    write_body(path, &body)
}

/// Writes a state file holding `body`.
/// The bytes of a state file holding `body`: the header (magic, this build's version, the
/// body's length and CRC-32), then the body.
pub fn frame_state(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The temporary file a file is written to before it is renamed to `path`: `path` with
/// `.tmp-ember` appended (distinct for a state and a memory file of the same stem).
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp-ember");
    PathBuf::from(name)
}

fn write_body(path: &Path, body: &[u8]) -> Result<(), SnapshotError> {
    let out = frame_state(body);
    let tmp = temporary(path);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&out).map_err(io(&tmp))?;
    f.sync_data().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The format version of the state file at `path` (Firecracker's `--describe-snapshot`).
pub fn describe(path: &Path) -> Result<u32, SnapshotError> {
    let f = ember_loader::open_regular_file(path).map_err(io(path))?;
    let mut head = [0u8; 12];
    f.take(12)
        .read_exact(&mut head)
        .map_err(|_| SnapshotError::NotASnapshot(path.to_path_buf()))?;
    if &head[..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    Ok(u32::from_le_bytes([head[8], head[9], head[10], head[11]]))
}

/// Reads and checks the state file at `path`.
pub fn read_state(path: &Path) -> Result<SnapshotState, SnapshotError> {
    parse_state(&read_file(path)?, path)
}

/// A state file's bytes as a [`SnapshotState`] (`path` names it in errors): the header, the
/// checksum, the JSON body and its consistency (a configuration that validates, one saved
/// state per vCPU, one placement per virtio device) are checked.
pub fn parse_state(bytes: &[u8], path: &Path) -> Result<SnapshotState, SnapshotError> {
    let state: SnapshotState =
        serde_json::from_slice(body(bytes, path)?).map_err(|source| SnapshotError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let invalid = |why: String| SnapshotError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    state
        .config
        .validate()
        .map_err(|e| invalid(format!("its configuration: {e}")))?;
    if state.machine.vcpus.len() != usize::from(state.config.vcpus) {
        return Err(invalid(format!(
            "{} vCPU states for {} vCPUs",
            state.machine.vcpus.len(),
            state.config.vcpus
        )));
    }
    if state.machine.devices.virtio.len() != state.devices.len() {
        return Err(invalid(format!(
            "{} virtio device states for {} devices",
            state.machine.devices.virtio.len(),
            state.devices.len()
        )));
    }
    if state.memory_bytes != state.config.memory_mib.saturating_mul(1 << 20) {
        return Err(invalid(format!(
            "{} bytes of memory for {} MiB",
            state.memory_bytes, state.config.memory_mib
        )));
    }
    Ok(state)
}

/// Reads a state file's body, checked.
fn read_file(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let f = ember_loader::open_regular_file(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    f.take(MAX_BODY + HEADER_LEN as u64)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    Ok(bytes)
}

/// The checked body of a state file's bytes (`path` names it in errors).
fn body<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a [u8], SnapshotError> {
    if bytes.len() < 8 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            got: bytes.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: SNAPSHOT_FORMAT_VERSION,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    let want = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    let have = (bytes.len() - HEADER_LEN) as u64;
    if len > MAX_BODY {
        return Err(SnapshotError::Invalid {
            path: path.to_path_buf(),
            why: format!("its header gives a body of {len} bytes (at most {MAX_BODY})"),
        });
    }
    if have < len {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            got: bytes.len() as u64,
            want: (HEADER_LEN as u64).saturating_add(len),
        });
    }
    // len <= have <= usize.
    let body = &bytes[HEADER_LEN..HEADER_LEN + usize::try_from(len).unwrap_or(0)];
    let found = crc32fast::hash(body);
    if found != want {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            found,
            want,
        });
    }
    Ok(body)
}

/// Bytes per residency check when writing memory.
const CHUNK: usize = 2 << 20;

/// Whether any page of `[host, host + len)` is resident.
fn resident(host: *mut u8, len: usize) -> bool {
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: [host, host + len) is one mapped guest RAM chunk (page aligned); `vec` has a byte
    // per page.
    let r = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    // If mincore fails, write the chunk: a larger file, never a wrong one.
    r != 0 || vec.iter().any(|b| b & 1 != 0)
}

/// Whether `file` has data (not a hole) in `[offset, offset + len)`. `true` when the file system
/// cannot tell (no `SEEK_DATA`): a larger snapshot, never a wrong one.
fn file_has_data(file: &std::fs::File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(offset) else {
        return true;
    };
    // SAFETY: lseek on an fd this process owns; it only moves that fd's offset, which
    // nothing here uses (all reads and writes are positioned).
    let data = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after `offset`.
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
    }
    data.cast_unsigned() < offset.saturating_add(len)
}

/// Whether a chunk of guest memory may hold something other than zeroes: a page of it is
/// resident, or (memory mapped from a file: a restored VM, a fork) the file has data under it.
/// A page of a restored VM the guest never touched is neither resident nor private, but its
/// contents are the memory file's.
fn may_hold_data(host: *mut u8, len: usize, backing: Option<(&std::fs::File, u64)>) -> bool {
    resident(host, len)
        || backing.is_some_and(|(file, offset)| file_has_data(file, offset, len as u64))
}

fn mem_err(path: &Path) -> impl Fn(vm_memory::GuestMemoryError) -> SnapshotError + '_ {
    move |e| io(path)(std::io::Error::other(e.to_string()))
}

/// Writes `len` bytes of guest memory at `gpa` to `file` at `offset`, straight from the
/// mapping (no copy through a buffer: the kernel reads the guest pages).
fn write_guest_at(
    mem: &GuestRam,
    gpa: GuestAddress,
    len: usize,
    mut file: &std::fs::File,
    offset: u64,
    path: &Path,
) -> Result<(), SnapshotError> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset)).map_err(io(path))?;
    mem.write_all_volatile_to(gpa, &mut file, len)
        .map_err(mem_err(path))
}

/// Writes guest memory to `path`, the RAM regions back to back in address order, through a
/// temporary file renamed into place (the VM's own memory may be mapped from the old file: a
/// restored VM snapshotted over the snapshot it came from). Chunks that hold only zeroes for
/// certain (no page resident, no data in the file they are mapped from) stay holes in a sparse
/// file. Returns the bytes written.
pub fn write_memory(mem: &GuestRam, path: &Path) -> Result<u64, SnapshotError> {
    let tmp = temporary(path);
    let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(total).map_err(io(&tmp))?;
    let mut offset = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let backing = region.file_offset().map(|f| (f.file(), f.start()));
        let mut at = 0u64;
        while at < len {
            // at < len, and CHUNK fits u64.
            let n = usize::try_from((len - at).min(CHUNK as u64)).unwrap_or(CHUNK);
            let gpa = GuestAddress(start + at);
            let host = mem.get_host_address(gpa).map_err(mem_err(&tmp))?;
            if may_hold_data(host, n, backing.map(|(file, off)| (file, off + at))) {
                write_guest_at(mem, gpa, n, &f, offset + at, &tmp)?;
                written += n as u64;
            }
            at += n as u64;
        }
        offset += len;
    }
    f.sync_data().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(written)
}

/// Bytes of a page in a dirty bitmap.
const PAGE: u64 = 4096;

/// The runs of set bits in `bitmap` (bit `i % 64` of word `i / 64` is page `i`), as
/// `(first page, pages)`, at most `pages` pages.
fn dirty_runs(bitmap: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if page >= pages {
                break;
            }
            match runs.last_mut() {
                Some((first, n)) if *first + *n == page => *n += 1,
                _ => runs.push((page, 1)),
            }
        }
    }
    runs
}

/// Writes the pages `dirty` marks (one bitmap per region of `mem`, in its order) into the memory
/// file at `path`, at the offsets a full memory file has them, and nothing else: the file is
/// created sparse if it does not exist and is not truncated if it has the memory's size (a
/// file of another size is emptied first). Written into the base snapshot's
/// own memory file it brings that file up to date; written into a new file it is a diff that
/// [`merge_diff`] lays over its base. Returns the bytes written.
///
/// Safe to write into the file the VM's memory is mapped from (`MAP_PRIVATE`, a restored VM):
/// every page written is one the VM dirtied, which is therefore a private copy by now, so
/// the VM's view does not change.
pub fn write_dirty_memory(
    mem: &GuestRam,
    dirty: &[Vec<u64>],
    path: &Path,
) -> Result<u64, SnapshotError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io(path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    if f.metadata().map_err(io(path))?.len() != total {
        // Not this VM's memory file (another size): nothing of it may stay, as Firecracker
        // does.
        f.set_len(0).map_err(io(path))?;
        f.set_len(total).map_err(io(path))?;
    }
    let mut offset = 0u64;
    let mut written = 0u64;
    for (region, bitmap) in mem.iter().zip(dirty) {
        let start = region.start_addr().0;
        for (first, pages) in dirty_runs(bitmap, region.len() / PAGE) {
            let (at, len) = (first * PAGE, pages * PAGE);
            let n = usize::try_from(len).map_err(|e| io(path)(std::io::Error::other(e)))?;
            write_guest_at(mem, GuestAddress(start + at), n, &f, offset + at, path)?;
            written += len;
        }
        offset += region.len();
    }
    f.sync_data().map_err(io(path))?;
    Ok(written)
}

/// Lays the diff memory file `diff` (a [`crate::VmHandle::diff_snapshot`] into a new file)
/// over its base memory file `base`: every data extent of the diff (`SEEK_DATA`/`SEEK_HOLE`) is copied to the
/// same offset of `base`, which then is the memory of the diff snapshot (Firecracker's
/// `snapshot-editor edit-memory rebase`). Apply the diffs of a chain in the order they were
/// taken. The diff must be on a file system that keeps holes (ext4, xfs, btrfs, tmpfs).
/// Returns the bytes copied.
pub fn merge_diff(base: &Path, diff: &Path) -> Result<u64, SnapshotError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let d = ember_loader::open_regular_file(diff).map_err(io(diff))?;
    let b = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(io(base))?;
    let (size, base_size) = (
        d.metadata().map_err(io(diff))?.len(),
        b.metadata().map_err(io(base))?.len(),
    );
    if size != base_size {
        return Err(SnapshotError::DiffSize {
            diff: diff.into(),
            size,
            base: base.into(),
            base_size,
        });
    }
    let seek = |at: u64, whence| -> Result<Option<u64>, SnapshotError> {
        let off = libc::off_t::try_from(at).map_err(|e| io(diff)(std::io::Error::other(e)))?;
        // SAFETY: lseek on an fd this function owns; reads below are positioned.
        let r = unsafe { libc::lseek(d.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(io(diff)(e)),
            };
        }
        Ok(Some(r.cast_unsigned()))
    };
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    let mut at = 0u64;
    while at < size {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        let mut pos = data;
        while pos < hole {
            let n = usize::try_from((hole - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
            d.read_exact_at(&mut buf[..n], pos).map_err(io(diff))?;
            b.write_all_at(&buf[..n], pos).map_err(io(base))?;
            copied += n as u64;
            pos += n as u64;
        }
        at = hole;
    }
    b.sync_data().map_err(io(base))?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_body(p: &Path) -> Result<Vec<u8>, SnapshotError> {
        read_file(p).and_then(|b| body(&b, p).map(<[u8]>::to_vec))
    }

    /// Found by the `snapshot_state` fuzz target: a header whose body length is near
    /// `u64::MAX` overflowed the "truncated" error's arithmetic.
    #[test]
    fn a_huge_body_length_is_an_error() {
        let p = Path::new("huge.state");
        for len in [u64::MAX, u64::MAX - 10, MAX_BODY + 1] {
            let mut bytes = frame_state(b"{}");
            bytes[12..20].copy_from_slice(&len.to_le_bytes());
            let e = body(&bytes, p).unwrap_err().to_string();
            assert!(e.contains("at most"), "{e}");
        }
        let mut bytes = frame_state(b"{}");
        bytes[12..20].copy_from_slice(&100u64.to_le_bytes());
        assert!(matches!(
            body(&bytes, p),
            Err(SnapshotError::Truncated { .. })
        ));
    }

    #[test]
    fn dirty_runs_coalesce_adjacent_pages() {
        assert_eq!(dirty_runs(&[0], 64), vec![]);
        assert_eq!(dirty_runs(&[0b1110_0101], 64), vec![(0, 1), (2, 1), (5, 3)]);
        // A run across a word boundary; bits past the region's end are ignored.
        assert_eq!(dirty_runs(&[1 << 63, 0b11], 66), vec![(63, 3)]);
        assert_eq!(dirty_runs(&[1 << 63, 0b11], 64), vec![(63, 1)]);
    }

    /// A full snapshot of memory mapped from a file (a restored VM) writes the pages the VM
    /// never touched from the file, even when none of them is in the page cache.
    #[test]
    fn a_full_snapshot_of_file_backed_memory_keeps_pages_that_are_not_resident() {
        use std::os::fd::AsRawFd;
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-snap-").unwrap();
        let (base, out) = (
            dir.as_path().join("base.mem"),
            dir.as_path().join("out.mem"),
        );
        let layout = ember_memory::MemoryLayout::new(16 << 20).unwrap();
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(16 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xab; 4096], 9 << 20).unwrap();
        f.sync_all().unwrap();
        // SAFETY: advice on a file this test owns; its pages are clean (synced).
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let f = std::fs::File::open(&base).unwrap();
        let mem = ember_memory::map_guest_memory(
            &layout,
            &f,
            ember_memory::Sharing::Private,
            ember_memory::DirtyBitmap::Off,
        )
        .unwrap();
        let written = write_memory(&mem, &out).unwrap();
        assert!(written >= 4096, "{written}");
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len(), 16 << 20);
        assert!(bytes[9 << 20..(9 << 20) + 4096].iter().all(|&b| b == 0xab));
        // The diff of nothing dirtied writes nothing and keeps the file.
        let none = vec![vec![0u64; 64]; 1];
        assert_eq!(write_dirty_memory(&mem, &none, &out).unwrap(), 0);
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
    }

    #[test]
    fn state_files_round_trip_and_refuse_damage() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-snap-").unwrap();
        let p = dir.as_path().join("state");
        let body = br#"{"some":"state","n":12345678}"#;
        write_body(&p, body).unwrap();
        assert_eq!(describe(&p).unwrap(), SNAPSHOT_FORMAT_VERSION);
        assert_eq!(read_body(&p).unwrap(), body);
        // A checked body that is not a state.
        assert!(matches!(read_state(&p), Err(SnapshotError::Json { .. })));
        let good = std::fs::read(&p).unwrap();
        // One flipped byte in the body.
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x20;
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(read_body(&p), Err(SnapshotError::Corrupt { .. })));
        // Truncated.
        std::fs::write(&p, &good[..good.len() - 10]).unwrap();
        assert!(matches!(
            read_body(&p),
            Err(SnapshotError::Truncated { .. })
        ));
        // Another version.
        let mut v2 = good.clone();
        v2[8] = 2;
        std::fs::write(&p, &v2).unwrap();
        let e = read_body(&p).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        // Not a snapshot at all.
        std::fs::write(&p, b"{\"hello\": 1}").unwrap();
        assert!(matches!(read_body(&p), Err(SnapshotError::NotASnapshot(_))));
    }
}
