//! The VMM's event loop: an epoll set and a registry of handlers, one per file descriptor.
//!
//! Whoever owns a descriptor the loop must watch (a virtio queue's notify eventfd, the console,
//! the stop eventfd) registers it with a handler; the token is the handler's index. Devices
//! know nothing of this: their handlers are closures the VMM writes around the device's own
//! methods (`process_notification`, `enqueue_input`, ...).

use std::os::unix::io::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::error::Error;
use crate::outcome::VmExit;

/// What a handler tells the loop.
pub(crate) enum Flow {
    /// Keep running.
    Continue,
    /// The VM ends, for this reason.
    Exit(VmExit),
}

/// What a handler may do to its own registration.
pub(crate) struct Registration<'a> {
    epoll: &'a Epoll,
    fd: RawFd,
    removed: bool,
}

impl Registration<'_> {
    /// Stops watching the descriptor (its handler is dropped).
    pub(crate) fn remove(&mut self) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, self.fd, EpollEvent::default());
        self.removed = true;
    }
}

type Handler<'h> = Box<dyn FnMut(EventSet, &mut Registration<'_>) -> Flow + 'h>;

/// An epoll set and the handler of each registered descriptor.
pub(crate) struct EventLoop<'h> {
    epoll: Epoll,
    handlers: Vec<Option<(RawFd, Handler<'h>)>>,
}

impl<'h> EventLoop<'h> {
    /// An empty loop.
    pub(crate) fn new() -> Result<Self, Error> {
        Ok(EventLoop {
            epoll: Epoll::new().map_err(Error::Epoll)?,
            handlers: Vec::new(),
        })
    }

    /// Calls `handler` whenever `fd` is ready for `events`. Fails if epoll refuses the
    /// descriptor (a regular file, for one: the caller must read those otherwise).
    pub(crate) fn add(
        &mut self,
        fd: RawFd,
        events: EventSet,
        handler: impl FnMut(EventSet, &mut Registration<'_>) -> Flow + 'h,
    ) -> Result<(), Error> {
        let token = self.handlers.len() as u64;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(Error::Epoll)?;
        self.handlers.push(Some((fd, Box::new(handler))));
        Ok(())
    }

    /// Dispatches events until a handler ends the VM.
    pub(crate) fn run(&mut self) -> Result<VmExit, Error> {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Epoll(e)),
            };
            for ev in &events[..n] {
                let token = ev.data();
                let Some(slot) = usize::try_from(token)
                    .ok()
                    .and_then(|i| self.handlers.get_mut(i))
                else {
                    continue;
                };
                let Some((fd, handler)) = slot.as_mut() else {
                    continue;
                };
                let mut reg = Registration {
                    epoll: &self.epoll,
                    fd: *fd,
                    removed: false,
                };
                let flow = handler(ev.event_set(), &mut reg);
                if reg.removed {
                    *slot = None;
                }
                if let Flow::Exit(exit) = flow {
                    return Ok(exit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::io::AsRawFd;
    use std::rc::Rc;

    #[test]
    fn handlers_run_per_descriptor_until_one_exits() {
        let a = ember_devices::new_eventfd().unwrap();
        let b = ember_devices::new_eventfd().unwrap();
        let seen = Rc::new(Cell::new(0));
        let mut ev = EventLoop::new().unwrap();
        let s = seen.clone();
        let a2 = a.try_clone().unwrap();
        let b2 = b.try_clone().unwrap();
        ev.add(a.as_raw_fd(), EventSet::IN, move |_, reg| {
            let _ = a2.read();
            s.set(s.get() + 1);
            // Once is enough: stop watching it, and ask for the exit.
            reg.remove();
            b2.write(1).unwrap();
            Flow::Continue
        })
        .unwrap();
        let b3 = b.try_clone().unwrap();
        ev.add(b.as_raw_fd(), EventSet::IN, move |_, _| {
            let _ = b3.read();
            Flow::Exit(VmExit::Stopped)
        })
        .unwrap();
        a.write(1).unwrap();
        assert_eq!(ev.run().unwrap(), VmExit::Stopped);
        assert_eq!(seen.get(), 1);
        // A regular file cannot be watched.
        let f = vmm_sys_util::tempfile::TempFile::new().unwrap();
        assert!(ev
            .add(f.as_file().as_raw_fd(), EventSet::IN, |_, _| Flow::Continue)
            .is_err());
    }
}
