//! Ending a VMM process without waiting for KVM's teardown.
//!
//! Closing the last descriptor of a KVM VM waits for the kernel's grace periods (11 to 20 ms
//! on the development host, with little CPU). A process that exits with a VM fd open pays
//! that in its exit path, so whoever waits for it (a shell, an orchestrator) waits that much
//! longer. A VMM binary that calls [`defer_teardown_to_exit`] first thing keeps finished VMs'
//! KVM fds open, and [`exit_process`] then hands their last close to a short-lived child:
//! the parent's exit status is reported at once, the child (holding nothing else) closes them
//! after the parent is gone and exits.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use ember_devices::lock;
use ember_memory::GuestRam;
use kvm_ioctls::VmFd;

static DEFER: AtomicBool = AtomicBool::new(false);
static KEPT: Mutex<Vec<(VmFd, GuestRam)>> = Mutex::new(Vec::new());

/// From now on, a finished VM's KVM fd and guest memory stay in the process until
/// [`exit_process`] instead of being released on the teardown thread (for a VMM process that
/// runs one VM, or a few, and then exits).
pub fn defer_teardown_to_exit() {
    DEFER.store(true, Ordering::SeqCst);
}

/// Keeps a finished VM's parts when [`defer_teardown_to_exit`] was called; gives them back
/// otherwise.
pub(crate) fn keep(vm_fd: VmFd, memory: GuestRam) -> Option<(VmFd, GuestRam)> {
    if DEFER.load(Ordering::SeqCst) {
        lock(&KEPT).push((vm_fd, memory));
        None
    } else {
        Some((vm_fd, memory))
    }
}

/// Ends the process with `code` now (stdout and stderr flushed, no destructors run). Guest
/// memory goes with the process; the last close of every KVM VM kept by
/// [`defer_teardown_to_exit`] is left to a child process that holds only those descriptors,
/// waits for this process to be gone, and exits.
pub fn exit_process(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // Descriptors are never negative.
    let mut fds: Vec<libc::c_uint> = lock(&KEPT)
        .iter()
        .filter_map(|(f, _)| libc::c_uint::try_from(f.as_raw_fd()).ok())
        .collect();
    fds.sort_unstable();
    if !fds.is_empty() {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child runs only async-signal-safe system calls (close_range, getppid,
        // nanosleep, _exit) on memory allocated before the fork, then exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut next: libc::c_uint = 0;
            for &fd in &fds {
                if fd > next {
                    // SAFETY: closes descriptors of this (child) process only.
                    unsafe { libc::syscall(libc::SYS_close_range, next, fd - 1, 0) };
                }
                next = fd + 1;
            }
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_close_range, next, libc::c_uint::MAX, 0) };
            let pause = libc::timespec {
                tv_sec: 0,
                tv_nsec: 1_000_000,
            };
            // SAFETY: getppid has no preconditions.
            while unsafe { libc::getppid() } == parent {
                // SAFETY: nanosleep only reads `pause`.
                unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
            }
            // SAFETY: ends the child; the kernel closes the KVM fds.
            unsafe { libc::_exit(0) };
        }
    }
    // SAFETY: ends the process; the kernel releases everything it holds.
    unsafe { libc::_exit(i32::from(code)) }
}
