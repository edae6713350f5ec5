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
    /// The image is not a regular file or block device, or its size cannot be read.
    #[error("disk image {}: {why}", path.display())]
    BadImage {
        /// The image path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
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
