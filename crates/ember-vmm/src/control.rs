//! Pausing, resuming and stopping a VM's vCPU threads.
//!
//! Every vCPU thread runs `Vcpu::run` with one shared `exit` flag. Pausing or stopping sets the
//! flag and kicks each thread with a signal whose handler sets `immediate_exit` in that thread's
//! `kvm_run`, so a vCPU inside `KVM_RUN` leaves it at once and one about to enter it does not
//! enter. A paused thread parks on a condition variable until resumed or stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ember_vcpu::{IoHandler, Vcpu, VcpuStop};

/// How long [`VcpuControl::pause`] waits for every vCPU to leave `KVM_RUN`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    /// A pause is in force.
    paused: bool,
    /// vCPU threads parked because of it.
    parked: usize,
    /// vCPU threads still in their run loop.
    running: usize,
    /// Threads to kick.
    threads: Vec<libc::pthread_t>,
}

/// Shared between the VM's handle, its event loop and its vCPU threads.
#[derive(Default)]
pub(crate) struct VcpuControl {
    exit: AtomicBool,
    stop: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

impl VcpuControl {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_all(&self, state: &State) {
        for &t in &state.threads {
            // A thread that already finished cannot be signalled; nothing to do then.
            let _ = ember_vcpu::kick::kick(t);
        }
    }

    /// Registers the calling thread as a vCPU thread.
    pub(crate) fn enter(&self) {
        let mut st = self.state();
        // SAFETY: pthread_self has no preconditions.
        st.threads.push(unsafe { libc::pthread_self() });
        st.running += 1;
    }

    /// Runs `vcpu` until it stops for a reason other than a pause, parking while paused.
    pub(crate) fn run(
        &self,
        vcpu: &mut Vcpu,
        io: &dyn IoHandler,
    ) -> Result<VcpuStop, ember_vcpu::Error> {
        let result = loop {
            let r = vcpu.run(io, &self.exit);
            if !matches!(r, Ok(VcpuStop::Stopped)) || self.stop.load(Ordering::SeqCst) {
                break r;
            }
            let mut st = self.state();
            if st.paused {
                st.parked += 1;
                self.changed.notify_all();
                while st.paused && !self.stop.load(Ordering::SeqCst) {
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.parked -= 1;
            }
        };
        let mut st = self.state();
        st.running -= 1;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // SAFETY: pthread_equal only compares the two ids.
        st.threads
            .retain(|&t| unsafe { libc::pthread_equal(t, me) } == 0);
        self.changed.notify_all();
        result
    }

    /// Takes every vCPU out of `KVM_RUN` and keeps it out until [`resume`](Self::resume).
    /// Returns once all of them are parked; `false` if that took longer than 5 s.
    pub(crate) fn pause(&self) -> bool {
        let mut st = self.state();
        st.paused = true;
        self.exit.store(true, Ordering::SeqCst);
        self.kick_all(&st);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while st.parked < st.running {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Lets paused vCPUs run again.
    pub(crate) fn resume(&self) {
        let mut st = self.state();
        st.paused = false;
        self.exit
            .store(self.stop.load(Ordering::SeqCst), Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Whether a pause is in force.
    pub(crate) fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// Makes every vCPU leave its run loop for good.
    pub(crate) fn stop(&self) {
        let st = self.state();
        self.stop.store(true, Ordering::SeqCst);
        self.exit.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        self.kick_all(&st);
    }
}
