//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! [`init`] installs a process-wide handler for `SIGRTMIN`. [`Vcpu::run`](crate::Vcpu::run)
//! publishes the vCPU's `kvm_run` mapping in a thread-local for as long as it runs; the handler
//! sets `kvm_run.immediate_exit = 1` through it. [`kick`] sends `SIGRTMIN` to a thread.
//!
//! This makes stopping race-free when the stopper first sets the `stop` flag passed to
//! [`Vcpu::run`](crate::Vcpu::run) and then kicks:
//!
//! - vCPU thread inside `KVM_RUN`: the signal makes it return `EINTR`;
//! - vCPU thread between its check of `stop` and `KVM_RUN`: the handler has set
//!   `immediate_exit`, so `KVM_RUN` returns `EINTR` at once without entering the guest;
//! - vCPU thread before its check of `stop`: it sees the flag.
//!
//! After `EINTR` the run loop clears `immediate_exit`, checks `stop` again and returns
//! [`VcpuStop::Stopped`](crate::VcpuStop::Stopped).

use std::cell::Cell;
use std::io;
use std::ptr;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;

use crate::Error;

thread_local! {
    /// The `kvm_run` mapping of the vCPU this thread is running, or null.
    ///
    /// `const`-initialised and without destructor, so reading it needs no lazy initialisation
    /// and no registration: it is a plain TLS load, which is async-signal-safe.
    static CURRENT_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The signal used for kicks: `SIGRTMIN` (as seen by the C library, i.e. after the realtime
/// signals it reserves for itself).
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a volatile byte store: async-signal-safe.
    let run = CURRENT_KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: a non-null pointer is only published by `RunGuard` while the owning `Vcpu`
        // (and so its `kvm_run` mapping) is mutably borrowed by `Vcpu::run` on this very thread,
        // and it is reset before that borrow ends. The kernel reads `immediate_exit` on entry to
        // KVM_RUN; a volatile store of one byte cannot tear.
        unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the `SIGRTMIN` handler (once per process; later calls return the first result).
///
/// [`kick`] calls this itself, so that a kick never hits the default action of `SIGRTMIN`
/// (terminating the process); calling it early, before any vCPU thread starts, keeps the
/// `sigaction` off the stopping path.
pub fn init() -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero `sigaction` is a valid value (no flags, empty mask, SIG_DFL).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = handle_kick as *const () as usize;
        // SA_RESTART: other system calls of a kicked thread are restarted; KVM_RUN itself
        // returns EINTR regardless.
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `action.sa_mask` is a valid, owned sigset_t.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that is async-signal-safe (see `handle_kick`); the old
        // action is not needed (null).
        let ret = unsafe { libc::sigaction(kick_signal(), &action, ptr::null_mut()) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    result.map_err(|errno| Error::SignalHandler(io::Error::from_raw_os_error(errno)))
}

/// Sends `SIGRTMIN` to `thread` (installing the handler first if needed, see [`init`]).
///
/// If the thread is inside [`Vcpu::run`](crate::Vcpu::run), its current or next `KVM_RUN`
/// returns and the loop checks its `stop` flag; otherwise the kick has no effect.
///
/// `thread` must be a live or not yet joined thread of this process (for example from
/// `JoinHandle::as_pthread_t` while the handle is held, or `libc::pthread_self()` sent over from
/// the vCPU thread before it can exit): POSIX leaves `pthread_kill` on a joined or detached and
/// exited thread undefined. [`kick_thread`] enforces that by borrowing the `JoinHandle`.
pub fn kick(thread: libc::pthread_t) -> Result<(), Error> {
    init()?;
    // SAFETY: the caller guarantees `thread` names a thread that has not been joined; the
    // signal number is valid and has a handler installed by `init`.
    let ret = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if ret == 0 {
        Ok(())
    } else {
        Err(Error::Kick(io::Error::from_raw_os_error(ret)))
    }
}

/// [`kick`]s the thread of `handle` (which cannot have been joined while it is borrowed).
pub fn kick_thread<T>(handle: &JoinHandle<T>) -> Result<(), Error> {
    use std::os::unix::thread::JoinHandleExt;
    #[allow(
        clippy::unnecessary_cast,
        reason = "std's RawPthread is a u64; libc's pthread_t is one on glibc, a pointer on musl"
    )]
    let thread = handle.as_pthread_t() as libc::pthread_t;
    kick(thread)
}

/// Publishes a `kvm_run` mapping for the kick handler for the lifetime of the guard and makes
/// sure the kick signal is not blocked on this thread.
pub(crate) struct RunGuard {
    previous: *mut kvm_run,
}

impl RunGuard {
    pub(crate) fn enter(run: *mut kvm_run) -> Self {
        // SAFETY: `set` is an owned, valid sigset_t; unblocking a signal on the calling thread
        // has no memory-safety implications.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, kick_signal());
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, ptr::null_mut());
        }
        let previous = CURRENT_KVM_RUN.with(|c| c.replace(run));
        RunGuard { previous }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        CURRENT_KVM_RUN.with(|c| c.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_idempotent() {
        init().unwrap();
        init().unwrap();
    }

    #[test]
    fn kick_without_vcpu_is_harmless() {
        // No kvm_run published on this thread: the handler does nothing, and the process
        // survives (the handler, not the default action, ran).
        // SAFETY: pthread_self is always valid.
        kick(unsafe { libc::pthread_self() }).unwrap();
        let t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(50)));
        kick_thread(&t).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn handler_sets_immediate_exit_of_published_run() {
        init().unwrap();
        // SAFETY: kvm_run is plain old data; all-zero is valid.
        let mut run: Box<kvm_run> = Box::new(unsafe { std::mem::zeroed() });
        let p: *mut kvm_run = &mut *run;
        {
            let _g = RunGuard::enter(p);
            // SAFETY: signalling the current thread; the handler is installed.
            unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
            // SAFETY: `p` points to the live box; volatile read as the handler wrote it.
            let immediate_exit = unsafe { ptr::addr_of!((*p).immediate_exit).read_volatile() };
            assert_eq!(immediate_exit, 1);
        }
        assert!(CURRENT_KVM_RUN.with(Cell::get).is_null());
        run.immediate_exit = 0;
        // SAFETY: as above.
        unsafe { libc::pthread_kill(libc::pthread_self(), kick_signal()) };
        assert_eq!(run.immediate_exit, 0);
    }
}
