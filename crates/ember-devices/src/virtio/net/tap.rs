//! The host side of virtio-net: a [`NetBackend`] moves whole frames (each with its 12-byte
//! virtio-net header) without blocking. [`Tap`] is a Linux TAP interface opened with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; a `SOCK_DGRAM`/`SOCK_SEQPACKET` Unix socket is another
//! backend (one frame per datagram), used by the tests and fuzz targets and usable for a
//! user-space network stack.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: u64 = 0x4004_54ca;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
/// `IFF_TAP`.
const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`.
const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`.
const IFF_VNET_HDR: i16 = 0x4000;

/// Offload flags for [`NetBackend::set_offload`] (the kernel's `TUN_F_*`): what the backend
/// may hand the device (and so the guest) on receive.
pub mod offload {
    /// Frames may carry a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const CSUM: u32 = 0x01;
    /// TCP segmentation offload over IPv4.
    pub const TSO4: u32 = 0x02;
    /// TCP segmentation offload over IPv6.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN.
    pub const TSO_ECN: u32 = 0x08;
}

/// Bytes of the virtio-net header every frame starts with (virtio 1.x `virtio_net_hdr_v1`,
/// with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Errors opening a TAP interface.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapError {
    /// The name is empty, too long (15 bytes at most) or holds a character an interface name
    /// cannot.
    #[error("invalid TAP interface name {0:?} (1 to 15 bytes, no '/', ':' or whitespace)")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?): {0}")]
    OpenTun(#[source] io::Error),
    /// No interface of that name exists in the VMM's network namespace.
    #[error("TAP interface {0:?} does not exist (create it with `ip tuntap add {0} mode tap`)")]
    NotFound(String),
    /// Another process (another VMM?) has the interface open.
    #[error("TAP interface {0:?} is busy: another process has it open")]
    Busy(String),
    /// The interface belongs to another user or group and the VMM lacks `CAP_NET_ADMIN`.
    #[error(
        "no permission to open TAP interface {0:?} (create it with `ip tuntap add {0} mode tap \
         user <the VMM's user>`, or run with CAP_NET_ADMIN)"
    )]
    PermissionDenied(String),
    /// The interface exists but is not a single-queue TAP (a TUN, a multi-queue TAP, or another
    /// kind of interface).
    #[error("interface {0:?} is not a single-queue TAP device")]
    NotTap(String),
    /// Another TAP ioctl failed.
    #[error("TAP interface {name:?}: {what}: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// The ioctl.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A packet device moving whole frames, each starting with a [`VNET_HDR_LEN`]-byte virtio-net
/// header, without blocking.
pub trait NetBackend: Send + AsRawFd {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting. A frame longer than `buf`
    /// may be truncated.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame; `WouldBlock` when the backend cannot take it now.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Whether a write can fail with `WouldBlock` (then the device watches the descriptor for
    /// writability and retries). Default: yes. A TAP never refuses a frame for lack of
    /// room (the kernel drops it instead), and watching its writability would cost an epoll
    /// wake-up callback for every frame the kernel frees.
    fn writes_may_block(&self) -> bool {
        true
    }
    /// Writes one frame gathered from pieces of guest memory (the chain's descriptors).
    /// Default: copies them into `scratch` and calls
    /// [`write_frame`](NetBackend::write_frame); [`Tap`] hands them to `writev` instead.
    fn write_frame_parts<B: BitmapSlice>(
        &mut self,
        parts: &[VolatileSlice<'_, B>],
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        gather(parts, scratch);
        self.write_frame(scratch)
    }
    /// Sets the receive offloads (flags of [`offload`]) the guest accepted. Default: only 0
    /// is accepted.
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        if flags == 0 {
            Ok(())
        } else {
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }
}

/// A Linux TAP interface (see the `tap` module docs).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Opens the existing TAP interface `name` (in the calling thread's network namespace),
    /// non-blocking and close-on-exec, with 12-byte virtio-net headers and no offloads.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| TapError::InvalidName(name.into()))?;
        // SAFETY: `cname` is a NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads (and writes back) an `ifreq`, which `IfReq` lays out with its
        // full 40 bytes; `file` is a tun descriptor.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF, &mut req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Ioctl {
                    name: name.into(),
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let size: libc::c_int = 12; // VNET_HDR_LEN
                                    // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
        if unsafe { ioctl_with_ref(&tap.file, TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        tap.offload(0)?;
        Ok(tap)
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes its argument by value.
        // SAFETY: the ioctl reads no memory; `file` is a tun descriptor.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(
                &self.file,
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(self.ioctl_error("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

use std::os::unix::fs::OpenOptionsExt;

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Copies `parts` one after the other into `out`.
fn gather<B: BitmapSlice>(parts: &[VolatileSlice<'_, B>], out: &mut Vec<u8>) {
    out.clear();
    for p in parts {
        let at = out.len();
        out.resize(at + p.len(), 0);
        p.copy_to(&mut out[at..]);
    }
}

/// Most pieces `Tap::write_frame_parts` passes to one `writev` (more are copied first).
const MAX_IOV: usize = 16;

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_fd(self.file.as_raw_fd(), buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for `frame.len()` bytes of reads.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        match usize::try_from(n) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, "short TAP write")),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    fn writes_may_block(&self) -> bool {
        false
    }

    fn write_frame_parts<B: BitmapSlice>(
        &mut self,
        parts: &[VolatileSlice<'_, B>],
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        if parts.len() > MAX_IOV {
            gather(parts, scratch);
            return self.write_frame(scratch);
        }
        // The guards keep each piece mapped during the call (without allocating).
        let guards: [Option<_>; MAX_IOV] =
            std::array::from_fn(|i| parts.get(i).map(|p| p.ptr_guard()));
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut total = 0usize;
        for (v, (g, p)) in iov.iter_mut().zip(guards.iter().zip(parts)) {
            if let Some(g) = g {
                v.iov_base = g.as_ptr().cast_mut().cast();
                v.iov_len = p.len();
                total += p.len();
            }
        }
        // parts.len() <= MAX_IOV (16).
        let count = libc::c_int::try_from(parts.len()).unwrap_or(0);
        // SAFETY: each iovec points into guest memory that its guard keeps mapped for
        // `iov_len` bytes during the call; the kernel only reads it (the guest may change it
        // meanwhile, which changes what is sent, nothing else).
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) };
        match usize::try_from(n) {
            Ok(n) if n == total => Ok(()),
            Ok(_) => Err(io::Error::new(io::ErrorKind::WriteZero, "short TAP write")),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload(flags).map_err(|e| match e {
            TapError::Ioctl { source, .. } => source,
            other => io::Error::other(other.to_string()),
        })
    }
}

/// A frame per datagram. The socket must be non-blocking (the device never waits).
impl NetBackend for UnixDatagram {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send(frame).map(|_| ())
    }

    /// A socket peer receives whatever the guest sends: every offload is accepted.
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// A connected pair of non-blocking, close-on-exec datagram sockets: one end for the device,
/// the other for whoever plays the network (a test, a user-space stack).
pub fn datagram_pair() -> io::Result<(UnixDatagram, UnixDatagram)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are new and owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((UnixDatagram::from(a), UnixDatagram::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        for bad in ["", "a/b", "x:1", "sixteen-bytes-xx", "a b", ".."] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = Tap::open("ember-nosuch0").unwrap_err();
        assert!(matches!(e, TapError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("ip tuntap add ember-nosuch0"), "{e}");
    }

    #[test]
    fn a_non_tap_interface_is_refused() {
        // `lo` exists in every network namespace.
        match Tap::open("lo") {
            Err(TapError::NotTap(_)) => {}
            // Without /dev/net/tun or permission the test cannot tell.
            Err(TapError::OpenTun(_)) | Err(TapError::PermissionDenied(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}
