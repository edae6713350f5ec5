//! Where a virtio-blk disk's bytes live: the [`DiskBackend`] trait and its first
//! implementation, a raw image file read and written with `pread`/`pwrite` ([`FileDisk`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// The storage behind a [`Block`](super::Block) device.
///
/// Requests arrive validated (inside the disk, whole sectors); data moves straight between the
/// backend and guest memory through [`VolatileSlice`]s. A transfer that moves fewer bytes than
/// asked is an error (the request completes with `IOERR`). Methods run on the VMM's event loop
/// thread, never on a vCPU thread.
pub trait DiskBackend: Send {
    /// Size of the disk in bytes (the device exposes whole 512-byte sectors of it).
    fn size(&self) -> u64;
    /// Whether writes are refused (the device then offers `VIRTIO_BLK_F_RO`).
    fn read_only(&self) -> bool;
    /// Fills `buf` from the disk at byte `offset`.
    fn read_at<B: BitmapSlice>(&mut self, offset: u64, buf: &VolatileSlice<B>) -> io::Result<()>;
    /// Writes `buf` to the disk at byte `offset`.
    fn write_at<B: BitmapSlice>(&mut self, offset: u64, buf: &VolatileSlice<B>) -> io::Result<()>;
    /// Makes written data durable (`FLUSH`).
    fn flush(&mut self) -> io::Result<()>;
}

/// Why a disk image could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// Opening the image failed.
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another opener holds the image: a VM (this one or another) has it open for writing, or
    /// this opener wants to write and someone has it open.
    #[error("disk image {} is in use: {holder} holds a {kind} lock on it ({wanted} refused)", path.display())]
    InUse {
        /// The image path.
        path: PathBuf,
        /// Who holds it ("process 1234 (ember)", or "another opener" when the kernel does not
        /// say).
        holder: String,
        /// `write` or `read`: the holder's lock.
        kind: &'static str,
        /// What this opener asked for: `writing` or `reading`.
        wanted: &'static str,
    },
    /// The image is not a regular file or block device, or its size cannot be read.
    #[error("disk image {}: {why}", path.display())]
    BadImage {
        /// The image path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// Takes `flock` on an image: exclusive to write it, shared to read it, so that no two VMs (nor
/// one VM twice) write one image, and no one writes an image another VM reads. The lock lives
/// as long as the open file (every descriptor of it).
fn lock_image(file: &File, path: &Path, read_only: bool) -> Result<(), DiskError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor this function borrows; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(DiskError::Open {
            path: path.to_path_buf(),
            source: err,
        });
    }
    let (holder, kind) = lock_holder(file).unwrap_or((
        "another opener".into(),
        if read_only { "write" } else { "read or write" },
    ));
    Err(DiskError::InUse {
        path: path.to_path_buf(),
        holder,
        kind,
        wanted: if read_only { "reading" } else { "writing" },
    })
}

/// Who holds an `flock` on `file`, from `/proc/locks`: ("process PID (COMM)", "read"/"write").
fn lock_holder(file: &File) -> Option<(String, &'static str)> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    // /proc/locks writes the device as MAJOR:MINOR in hex and the inode in decimal.
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let want = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if f.len() < 6 || f[1] != "FLOCK" || f[5] != want {
            return None;
        }
        let kind = if f[3] == "WRITE" { "write" } else { "read" };
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", f[4])).unwrap_or_default();
        Some((format!("process {} ({})", f[4], comm.trim()), kind))
    })
}

/// A raw disk image (regular file or block device), read with `pread` and written with `pwrite`
/// straight to and from guest memory.
#[derive(Debug)]
pub struct FileDisk {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileDisk {
    /// Opens `path` (read-write unless `read_only`), without blocking on a FIFO (which, like
    /// anything but a regular file or block device, is refused).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let bad = |why: String| DiskError::BadImage {
            path: path.to_path_buf(),
            why,
        };
        let meta = file.metadata().map_err(|e| bad(format!("metadata: {e}")))?;
        let size = if meta.file_type().is_block_device() {
            block_device_size(&file).map_err(|e| bad(format!("BLKGETSIZE64: {e}")))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(bad("not a regular file or block device".into()));
        };
        lock_image(&file, path, read_only)?;
        Ok(FileDisk {
            file,
            size,
            read_only,
        })
    }

    /// The open image.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl DiskBackend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at<B: BitmapSlice>(&mut self, offset: u64, buf: &VolatileSlice<B>) -> io::Result<()> {
        let len = buf.len();
        let guard = buf.ptr_guard_mut();
        let ptr = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            let at = off(offset + done as u64)?;
            // SAFETY: `ptr` is valid for writes of `len` bytes (VolatileSlice invariant, kept
            // alive by `guard`) and `done < len`, so `ptr + done` with `len - done` bytes stays
            // inside it; the fd is valid for the lifetime of `self.file`.
            let n =
                unsafe { libc::pread(self.file.as_raw_fd(), ptr.add(done).cast(), len - done, at) };
            // A negative `n` (an error) is the one value that does not fit in usize.
            match usize::try_from(n) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_at<B: BitmapSlice>(&mut self, offset: u64, buf: &VolatileSlice<B>) -> io::Result<()> {
        let len = buf.len();
        let guard = buf.ptr_guard();
        let ptr = guard.as_ptr();
        let mut done = 0usize;
        while done < len {
            let at = off(offset + done as u64)?;
            // SAFETY: `ptr` is valid for reads of `len` bytes (VolatileSlice invariant, kept
            // alive by `guard`) and `done < len`; the fd is valid for the lifetime of
            // `self.file`.
            let n = unsafe {
                libc::pwrite(self.file.as_raw_fd(), ptr.add(done).cast(), len - done, at)
            };
            match usize::try_from(n) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            Ok(())
        } else {
            self.file.sync_data()
        }
    }
}

#[cfg(target_os = "linux")]
fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the fd is valid for the lifetime of `file`; BLKGETSIZE64 writes one u64 to the
    // pointer, which points to a live, properly aligned u64.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(not(target_os = "linux"))]
fn block_device_size(_file: &File) -> io::Result<u64> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (vmm_sys_util::tempdir::TempDir, PathBuf) {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-lock-").unwrap();
        let p = dir.as_path().join("disk.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        (dir, p)
    }

    #[test]
    fn a_written_image_has_one_opener() {
        let (_d, p) = image();
        let first = FileDisk::open(&p, false).unwrap();
        for read_only in [false, true] {
            let e = FileDisk::open(&p, read_only).unwrap_err().to_string();
            assert!(e.contains("is in use"), "{e}");
            assert!(
                e.contains(&format!("process {}", std::process::id())),
                "{e}"
            );
            assert!(e.contains("write lock"), "{e}");
        }
        drop(first);
        FileDisk::open(&p, false).unwrap();
    }

    #[test]
    fn a_read_image_has_many_readers_and_no_writer() {
        let (_d, p) = image();
        let a = FileDisk::open(&p, true).unwrap();
        let b = FileDisk::open(&p, true).unwrap();
        let e = FileDisk::open(&p, false).unwrap_err().to_string();
        assert!(e.contains("is in use") && e.contains("read lock"), "{e}");
        assert!(e.contains("writing refused"), "{e}");
        drop((a, b));
        FileDisk::open(&p, false).unwrap();
    }
}
