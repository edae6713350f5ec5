//! A device's control inbox: another thread (an API server) sends it commands, and the device
//! takes them when the VMM's event loop sees the mailbox's eventfd readable (one of the
//! device's [host descriptors](crate::virtio::HostFd)). The device stays ignorant of threads
//! and loops; the sender never touches the device's state.
//!
//! ```
//! use ember_devices::mailbox::Mailbox;
//!
//! let mut inbox: Mailbox<u32> = Mailbox::new()?;
//! let sender = inbox.sender();
//! std::thread::spawn(move || sender.send(7)).join().unwrap()?;
//! assert_eq!(inbox.take(), vec![7]);
//! assert!(inbox.take().is_empty());
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Most commands waiting at once (a sender past it gets `WouldBlock`).
pub const CAPACITY: usize = 64;

#[derive(Debug)]
struct Inner<T> {
    queue: Mutex<VecDeque<T>>,
    evt: EventFd,
}

/// The receiving end, owned by the device.
#[derive(Debug)]
pub struct Mailbox<T> {
    inner: Arc<Inner<T>>,
}

/// A sending end (cloneable, for any thread).
#[derive(Debug)]
pub struct MailboxSender<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for MailboxSender<T> {
    fn clone(&self) -> Self {
        MailboxSender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Mailbox<T> {
    /// An empty mailbox (its eventfd non-blocking and close-on-exec).
    pub fn new() -> io::Result<Self> {
        Ok(Mailbox {
            inner: Arc::new(Inner {
                queue: Mutex::new(VecDeque::new()),
                evt: crate::new_eventfd()?,
            }),
        })
    }

    /// A sender.
    pub fn sender(&self) -> MailboxSender<T> {
        MailboxSender {
            inner: self.inner.clone(),
        }
    }

    /// The descriptor to watch (readable while commands wait).
    pub fn fd(&self) -> RawFd {
        self.inner.evt.as_raw_fd()
    }

    /// Takes every waiting command, in the order sent (clears the descriptor).
    pub fn take(&mut self) -> Vec<T> {
        // Reading first: a command sent after the read signals again.
        let _ = self.inner.evt.read();
        crate::lock(&self.inner.queue).drain(..).collect()
    }
}

impl<T> MailboxSender<T> {
    /// Queues `command` and wakes the device. `WouldBlock` when [`CAPACITY`] commands wait.
    pub fn send(&self, command: T) -> io::Result<()> {
        {
            let mut q = crate::lock(&self.inner.queue);
            if q.len() >= CAPACITY {
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            q.push_back(command);
        }
        self.inner.evt.write(1)
    }
}
