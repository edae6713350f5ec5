//! Stop signals: SIGTERM, SIGINT and SIGHUP stop the running VM (its stop eventfd is written
//! from the handler); with no VM running in Firecracker mode they end the process, removing
//! its sockets.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The running VM's stop descriptor, for the signal handler (-1: none).
pub static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The signal that asked the VMM to stop (0: none).
pub static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The API socket to remove when a signal ends a process with no VM running (Firecracker
/// mode): a NUL-terminated path, set once.
static API_SOCKET: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

/// Records the API socket, to be removed when a signal ends the process.
pub fn set_api_socket(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        let _ = API_SOCKET.set(c);
    }
}

/// Removes the API and fork sockets recorded (async-signal-safe: `unlink` only).
pub fn remove_api_socket() {
    for p in [API_SOCKET.get(), FORK_SOCKET.get()].into_iter().flatten() {
        // SAFETY: unlink of a NUL-terminated path.
        unsafe { libc::unlink(p.as_ptr()) };
    }
}

/// Firecracker mode: a stop signal with no VM running ends the process at once (removing the
/// sockets), from the process's start on.
static EXIT_WITHOUT_VM: AtomicBool = AtomicBool::new(false);

/// Makes a stop signal with no VM running end the process, and installs the handlers: called
/// first thing in Firecracker mode, so that a signal that comes while the sockets are being
/// set up is not lost, and does not kill the process without removing them.
pub fn exit_on_stop_signal_without_vm() {
    EXIT_WITHOUT_VM.store(true, Ordering::SeqCst);
    install_stop_signals();
}

/// The fork socket (`--fork-socket`), removed with the API socket when a signal ends a
/// process with no VM running.
static FORK_SOCKET: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

/// Records the fork socket, to be removed with the API socket.
pub fn set_fork_socket(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) {
        let _ = FORK_SOCKET.set(c);
    }
}

extern "C" fn on_stop_signal(signum: libc::c_int) {
    STOP_SIGNAL.store(signum, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is the
        // VM's stop eventfd, open for the lifetime of the run.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    } else if EXIT_WITHOUT_VM.load(Ordering::SeqCst) {
        // Firecracker mode before InstanceStart: nothing to stop, so end the process.
        remove_api_socket();
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + signum) };
    }
}

/// SIGTERM and SIGINT stop the VM; the normal exit path then restores the terminal.
pub fn install_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only does async-signal-safe work (atomics and write(2)).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}
