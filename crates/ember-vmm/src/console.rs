//! The serial console's two ends on the host: where the guest's output goes (drained from the
//! UART's [`OutputBuffer`] with non-blocking writes, so that a console nobody reads can never
//! block a vCPU or the stop path), and where its input comes from (a terminal, a pipe, a
//! socket or a regular file, plus bytes sent through the handle), with the Ctrl-A escape.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use ember_devices::lock;
use ember_devices::serial::{OutputBuffer, SerialDevice};

/// Where the guest's console output is written.
pub(crate) enum Sink {
    /// A descriptor written without blocking: a FIFO or terminal reopened with `O_NONBLOCK`
    /// (its own open file description, so the flag touches nobody else), a regular file, or a
    /// socket (`send` with `MSG_DONTWAIT`).
    Fd {
        /// The descriptor.
        fd: OwnedFd,
        /// Write with `send(MSG_DONTWAIT)`.
        socket: bool,
    },
    /// A writer the library user gave; it must not block (`WouldBlock` keeps the bytes for the
    /// next attempt).
    Writer(Box<dyn Write + Send>),
}

impl Sink {
    /// A sink for descriptor `fd` (e.g. stdout), which is borrowed: a FIFO, pipe or terminal
    /// is reopened through `/proc/self/fd` with `O_NONBLOCK`; anything else is duplicated.
    pub(crate) fn for_fd(fd: RawFd) -> io::Result<Sink> {
        // SAFETY: fstat writes into the zeroed stat buffer; an invalid fd gives EBADF.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat buffer.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFIFO || kind == libc::S_IFCHR {
            let path = format!("/proc/self/fd/{fd}\0");
            // SAFETY: `path` is NUL-terminated.
            let new = unsafe {
                libc::open(
                    path.as_ptr().cast(),
                    libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
                )
            };
            if new >= 0 {
                // SAFETY: `open` just returned this descriptor, owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(new) };
                return Ok(Sink::Fd { fd, socket: false });
            }
        }
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open; the result is ours.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fcntl` just returned this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        Ok(Sink::Fd {
            fd,
            socket: kind == libc::S_IFSOCK,
        })
    }

    /// One non-blocking write of (a prefix of) `bytes`.
    fn write_some(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Fd { fd, socket } => {
                // SAFETY: `bytes` is a valid buffer of its length; `fd` is open.
                let n = unsafe {
                    if *socket {
                        libc::send(
                            fd.as_raw_fd(),
                            bytes.as_ptr().cast(),
                            bytes.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    } else {
                        libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len())
                    }
                };
                // Negative (an error) is the one value that does not fit in usize.
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            }
            Sink::Writer(w) => {
                let n = w.write(bytes)?;
                w.flush()?;
                Ok(n)
            }
        }
    }

    /// The descriptor to watch for writability, if any.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        match self {
            Sink::Fd { fd, .. } => Some(fd.as_raw_fd()),
            Sink::Writer(_) => None,
        }
    }
}

/// What a drain achieved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Everything was written.
    Empty,
    /// The sink is full; wait until it is writable.
    Blocked,
    /// The sink failed for good (a closed pipe); the output is discarded from now on.
    Broken,
}

/// The output side: the UART's buffer and the sink it is drained to.
pub(crate) struct ConsoleOut {
    pub buffer: OutputBuffer,
    pub sink: Sink,
    /// Bytes thrown away because the sink failed for good.
    pub discarded: u64,
    broken: bool,
}

impl ConsoleOut {
    pub(crate) fn new(buffer: OutputBuffer, sink: Sink) -> Self {
        ConsoleOut {
            buffer,
            sink,
            discarded: 0,
            broken: false,
        }
    }

    /// Writes what the buffer holds, without blocking, and tells the UART when it has room
    /// again.
    pub(crate) fn drain(&mut self, serial: &Mutex<SerialDevice>) -> Drained {
        let result = loop {
            if self.broken {
                self.discarded += self.buffer.discard() as u64;
                break Drained::Broken;
            }
            let sink = &mut self.sink;
            match self.buffer.drain(|b| sink.write_some(b)) {
                Ok(0) if self.buffer.is_empty() => break Drained::Empty,
                Ok(0) => break Drained::Blocked,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Drained::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => self.broken = true,
            }
        };
        lock(serial).output_drained();
        result
    }
}

/// The byte that starts an escape sequence on the console input (Ctrl-A, as in QEMU).
pub const ESCAPE: u8 = 0x01;

/// What [`Escape::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Typed {
    /// Bytes for the guest.
    Input(Vec<u8>),
    /// Ctrl-A x: end the VM.
    Quit,
}

/// The escape state of the console input: Ctrl-A x ends the VM, Ctrl-A Ctrl-A sends one
/// Ctrl-A, Ctrl-A followed by anything else sends both bytes.
#[derive(Debug, Default)]
pub(crate) struct Escape {
    pending: bool,
}

impl Escape {
    /// Runs typed bytes through the escape state.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Typed {
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return Typed::Quit,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        Typed::Input(out)
    }
}

/// Moves queued console input into the UART's FIFO as far as it has room.
pub(crate) fn pump_input(serial: &Mutex<SerialDevice>, input: &Mutex<VecDeque<u8>>) {
    let mut queue = lock(input);
    if queue.is_empty() {
        return;
    }
    let mut serial = lock(serial);
    let room = serial.input_space().min(queue.len());
    if room == 0 {
        return;
    }
    let chunk: Vec<u8> = queue.drain(..room).collect();
    if let Ok(taken) = serial.enqueue_input(&chunk) {
        // Put back what the FIFO did not take, in order.
        for &b in chunk[taken..].iter().rev() {
            queue.push_front(b);
        }
    }
}

/// How much of a regular file used as console input is held in memory at once.
pub(crate) const FILE_INPUT_CHUNK: usize = 4096;

/// Reads up to `buf.len()` bytes from `fd` (a non-blocking read for a terminal, pipe or
/// socket; a regular file never blocks). `Ok(0)`: end of input.
pub(crate) fn read_input(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid writable buffer of its length; `fd` is open.
        let got = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        // Negative (an error) is the one value that does not fit in usize.
        if let Ok(got) = usize::try_from(got) {
            return Ok(got);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut e = Escape::default();
        assert_eq!(e.feed(b"ab"), Typed::Input(b"ab".to_vec()));
        assert_eq!(e.feed(b"c\x01"), Typed::Input(b"c".to_vec()));
        assert_eq!(e.feed(b"\x01d"), Typed::Input(b"\x01d".to_vec()));
        assert_eq!(e.feed(b"\x01z"), Typed::Input(b"\x01z".to_vec()));
        assert_eq!(e.feed(b"\x01"), Typed::Input(Vec::new()));
        assert_eq!(e.feed(b"x"), Typed::Quit);
    }

    #[test]
    fn a_pipe_nobody_reads_blocks_the_drain_not_the_caller() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just created.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let sink = Sink::for_fd(w.as_raw_fd()).unwrap();
        drop(w);
        let buffer = OutputBuffer::new(1 << 20).unwrap();
        let serial = Mutex::new(
            SerialDevice::with_output_buffer(
                ember_devices::EventFdTrigger::new().unwrap(),
                buffer.clone(),
            )
            .unwrap(),
        );
        let mut out = ConsoleOut::new(buffer.clone(), sink);
        let mut w = buffer.clone();
        w.write_all(&vec![b'x'; 200 << 10]).unwrap();
        // The pipe takes 64 KiB, then the drain stops instead of blocking.
        assert_eq!(out.drain(&serial), Drained::Blocked);
        assert_eq!(buffer.len(), (200 - 64) << 10);
        // With the reader gone the sink is broken and the output discarded.
        drop(r);
        assert_eq!(out.drain(&serial), Drained::Broken);
        assert_eq!(out.discarded, (200 - 64) << 10);
    }
}
