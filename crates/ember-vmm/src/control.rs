//! Pausing, resuming and stopping a VM's vCPU threads, and running requests on parked ones.
//!
//! Every vCPU thread runs `Vcpu::run` with one shared `exit` flag. Pausing or stopping sets the
//! flag and kicks each thread with a signal whose handler sets `immediate_exit` in that thread's
//! `kvm_run`, so a vCPU inside `KVM_RUN` leaves it at once and one about to enter it does not
//! enter. A paused thread parks on a condition variable until resumed or stopped; while parked
//! it carries out [`VcpuRequest`]s (taking or applying its state), which KVM wants done on the
//! vCPU's own thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ember_vcpu::state::VcpuState;
use ember_vcpu::{IoHandler, Vcpu, VcpuStop};

/// How long [`VcpuControl::pause`] waits for every vCPU to leave `KVM_RUN`, and
/// [`VcpuControl::request`] for every parked vCPU to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What a parked vCPU thread is asked to do.
#[derive(Debug)]
pub(crate) enum VcpuRequest {
    /// Take the vCPU's state, with these MSRs.
    SaveState(Vec<u32>),
    /// Apply the state of the same id from this list.
    RestoreState(Vec<VcpuState>),
}

/// A parked vCPU thread's answer.
#[derive(Debug)]
pub(crate) enum VcpuReply {
    /// Its state.
    Saved(Box<VcpuState>),
    /// The state was applied.
    Restored,
    /// The request failed.
    Failed(String),
}

/// A vCPU thread's `pthread_t`, only ever compared and signalled.
#[derive(Clone, Copy)]
struct ThreadId(libc::pthread_t);

// SAFETY: a pthread_t is an opaque thread identifier (an integer on glibc, a pointer on musl)
// that is never dereferenced here: it is only passed to pthread_kill and pthread_equal, which
// any thread of the process may call with it.
unsafe impl Send for ThreadId {}

#[derive(Default)]
struct State {
    /// A pause is in force.
    paused: bool,
    /// The VM holds its vCPUs before their first run (a restore applies its state): like a
    /// pause, but [`VcpuControl::resume`] does not end it.
    held: bool,
    /// vCPU threads parked because of it.
    parked: usize,
    /// vCPU threads still in their run loop.
    running: usize,
    /// Threads to kick.
    threads: Vec<ThreadId>,
    /// The request for parked threads, with its number (each thread answers a number once).
    request: Option<(u64, Arc<VcpuRequest>)>,
    /// Requests made so far.
    requests: u64,
    /// Answers to the current request, by vCPU id.
    replies: Vec<(u8, VcpuReply)>,
}

/// Shared between the VM's handle, its event loop and its vCPU threads.
#[derive(Default)]
pub(crate) struct VcpuControl {
    exit: AtomicBool,
    stop: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

fn answer(vcpu: &Vcpu, request: &VcpuRequest) -> VcpuReply {
    match request {
        VcpuRequest::SaveState(msrs) => match vcpu.save_state(msrs) {
            Ok(s) => VcpuReply::Saved(Box::new(s)),
            Err(e) => VcpuReply::Failed(e.to_string()),
        },
        VcpuRequest::RestoreState(states) => {
            let Some(state) = states.iter().find(|s| s.id == vcpu.id()) else {
                return VcpuReply::Failed(format!("no saved state for vCPU {}", vcpu.id()));
            };
            match vcpu.restore_state(state) {
                Ok(()) => VcpuReply::Restored,
                Err(e) => VcpuReply::Failed(e.to_string()),
            }
        }
    }
}

impl VcpuControl {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_all(&self, state: &State) {
        for &ThreadId(t) in &state.threads {
            // A thread that already finished cannot be signalled; nothing to do then.
            let _ = ember_vcpu::kick::kick(t);
        }
    }

    /// Registers `thread` as a vCPU thread that is about to [`run`](Self::run) (or to
    /// [`leave`](Self::leave) without running). Called by whoever hands the thread its vCPU,
    /// so that a stop or pause from then on counts and kicks it.
    pub(crate) fn enter(&self, thread: libc::pthread_t) {
        let mut st = self.state();
        st.threads.push(ThreadId(thread));
        st.running += 1;
    }

    /// Unregisters `thread`, which has left [`run`](Self::run) or will not run.
    pub(crate) fn leave(&self, thread: libc::pthread_t) {
        let mut st = self.state();
        st.running = st.running.saturating_sub(1);
        // SAFETY: pthread_equal only compares the two ids.
        st.threads
            .retain(|&ThreadId(t)| unsafe { libc::pthread_equal(t, thread) } == 0);
        self.changed.notify_all();
    }

    /// Runs `vcpu` until it stops for a reason other than a pause, parking while paused (and
    /// answering requests meanwhile).
    pub(crate) fn run(
        &self,
        vcpu: &mut Vcpu,
        io: &dyn IoHandler,
    ) -> Result<VcpuStop, ember_vcpu::Error> {
        let mut answered = 0u64;
        let result = loop {
            let r = vcpu.run(io, &self.exit);
            if !matches!(r, Ok(VcpuStop::Stopped)) || self.stop.load(Ordering::SeqCst) {
                break r;
            }
            let mut st = self.state();
            if st.paused || st.held {
                st.parked += 1;
                self.changed.notify_all();
                while (st.paused || st.held) && !self.stop.load(Ordering::SeqCst) {
                    if let Some((number, request)) = st.request.clone() {
                        if number != answered {
                            answered = number;
                            drop(st);
                            let reply = answer(vcpu, &request);
                            st = self.state();
                            if st.request.as_ref().is_some_and(|(n, _)| *n == number) {
                                st.replies.push((vcpu.id(), reply));
                                self.changed.notify_all();
                            }
                            continue;
                        }
                    }
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                st.parked -= 1;
            }
        };
        // SAFETY: pthread_self has no preconditions.
        self.leave(unsafe { libc::pthread_self() });
        result
    }

    /// Takes every vCPU out of `KVM_RUN` and keeps it out until [`resume`](Self::resume).
    /// Returns once all of them are parked; `false` if that took longer than 5 s.
    pub(crate) fn pause(&self) -> bool {
        let mut st = self.state();
        st.paused = true;
        self.exit.store(true, Ordering::SeqCst);
        self.kick_all(&st);
        let deadline = Instant::now() + TIMEOUT;
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

    /// Has every parked vCPU carry out `request` on its own thread; returns the answers by vCPU
    /// id. Fails unless the VM is paused with every vCPU parked, or if a vCPU does not answer
    /// within 5 s.
    pub(crate) fn request(&self, request: VcpuRequest) -> Result<Vec<(u8, VcpuReply)>, String> {
        let mut st = self.state();
        if !(st.paused || st.held) || st.parked < st.running {
            return Err("the VM must be paused first".into());
        }
        st.requests += 1;
        let number = st.requests;
        st.replies.clear();
        st.request = Some((number, Arc::new(request)));
        self.changed.notify_all();
        let deadline = Instant::now() + TIMEOUT;
        while st.replies.len() < st.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.request = None;
                return Err(format!(
                    "{} of {} vCPUs answered in {TIMEOUT:?}",
                    st.replies.len(),
                    st.parked
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.request = None;
        let mut replies = std::mem::take(&mut st.replies);
        replies.sort_by_key(|(id, _)| *id);
        Ok(replies)
    }

    /// Waits (at most 5 s) until `count` vCPU threads are parked (a paused start).
    pub(crate) fn wait_parked(&self, count: usize) -> Result<(), String> {
        let mut st = self.state();
        let deadline = Instant::now() + TIMEOUT;
        while st.parked < count {
            // A thread that ended (its hook failed) will never park: no use waiting.
            if st.running < count && st.parked >= st.running {
                return Err(format!(
                    "{} of {count} vCPU threads ended before they parked",
                    count - st.running
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "{} of {count} vCPUs parked in {TIMEOUT:?}",
                    st.parked
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets paused vCPUs run again (once the VM no longer holds them).
    pub(crate) fn resume(&self) {
        let mut st = self.state();
        st.paused = false;
        self.exit.store(
            self.stop.load(Ordering::SeqCst) || st.held,
            Ordering::SeqCst,
        );
        self.changed.notify_all();
    }

    /// Holds every vCPU before its first `KVM_RUN`, whatever [`resume`](Self::resume) is
    /// called meanwhile, until [`release`](Self::release). Called before any vCPU thread runs.
    pub(crate) fn hold(&self) {
        let mut st = self.state();
        st.held = true;
        self.exit.store(true, Ordering::SeqCst);
    }

    /// Ends a [`hold`](Self::hold): the vCPUs run unless a pause is in force.
    pub(crate) fn release(&self) {
        let mut st = self.state();
        st.held = false;
        self.exit.store(
            self.stop.load(Ordering::SeqCst) || st.paused,
            Ordering::SeqCst,
        );
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
