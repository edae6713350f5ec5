//! What the fuzz targets share: running each input under the seccomp filter of the VMM thread
//! that handles such input in the `ember` binary.
//!
//! [`Filtered`] is a thread with one of the binary's filters installed (`vmm`: the event loop
//! that runs the devices; `api`: the API thread; `vcpu`: a vCPU thread), compiled at build
//! time from the same `crates/ember-bin/seccomp/x86_64.json`. A target sets its fixture up on
//! the fuzzer's own thread (the host's part: files, sockets, activation), then runs the input
//! on the filtered thread. A system call the filter does not allow raises `SIGSYS` there: the
//! handler here notes the call, makes it fail with `EPERM` and lets the input finish, and
//! [`Filtered::run`] then panics naming the call, so that libFuzzer keeps the input as a crash.
//!
//! `EMBER_FUZZ_SECCOMP_SELFTEST=1` makes the filtered thread call `socket(AF_INET)` (allowed by
//! no filter) before each input: the target must then fail on its first input, naming system
//! call 41. `cargo xtask fuzz` checks that.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;

mod filters {
    include!(concat!(env!("OUT_DIR"), "/filters.rs"));
}

/// The system call a filter blocked during the current input (-1: none).
static BLOCKED: AtomicI32 = AtomicI32::new(-1);

/// The offset of `si_syscall` in the kernel's `siginfo_t` for SIGSYS.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t and ucontext_t to an SA_SIGINFO handler.
    unsafe {
        let nr = info
            .cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned();
        let _ = BLOCKED.compare_exchange(-1, nr, Ordering::SeqCst, Ordering::SeqCst);
        // The blocked call returns -EPERM to its caller.
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
        let msg =
            b"fuzz: seccomp: the filtered thread made a system call its filter does not allow\n";
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

fn install_handler() {
    // SAFETY: sigaction is plain data, zeroed then filled in; the handler is async-signal-safe
    // (an atomic, a register in the signal frame, write(2)).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread under one of the `ember` binary's seccomp filters that runs closures.
pub struct Filtered {
    name: &'static str,
    jobs: mpsc::Sender<Job>,
}

impl Filtered {
    /// Starts a thread and installs the filter `name` (`vmm`, `api` or `vcpu`) on it.
    pub fn new(name: &'static str) -> Filtered {
        let program: Vec<seccompiler::sock_filter> = match name {
            "vmm" => filters::VMM,
            "api" => filters::API,
            "vcpu" => filters::VCPU,
            _ => panic!("no {name:?} filter"),
        }
        .iter()
        .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
        .collect();
        install_handler();
        let selftest = std::env::var("EMBER_FUZZ_SECCOMP_SELFTEST").as_deref() == Ok("1");
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("fuzz-{name}"))
            .spawn(move || {
                let r = seccompiler::apply_filter(&program).map_err(|e| e.to_string());
                let ok = r.is_ok();
                let _ = ready_tx.send(r);
                if !ok {
                    return;
                }
                for job in rx {
                    if selftest {
                        // SAFETY: a socket call with constant arguments; its fd (if any) is
                        // closed at once.
                        unsafe {
                            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                            if fd >= 0 {
                                libc::close(fd);
                            }
                        }
                    }
                    job();
                }
            })
            .expect("start the filtered thread");
        ready_rx
            .recv()
            .expect("the filtered thread started")
            .unwrap_or_else(|e| panic!("cannot install the {name} seccomp filter: {e}"));
        Filtered { name, jobs: tx }
    }

    /// Runs `f` on the filtered thread and returns its result; panics if `f` made a system
    /// call the filter does not allow.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("the filtered thread runs");
        let r = rx.recv();
        let nr = BLOCKED.swap(-1, Ordering::SeqCst);
        assert!(
            nr < 0,
            "seccomp: under the {} filter this input made system call {nr}, which the filter \
             does not allow",
            self.name
        );
        r.expect("the input ended the filtered thread")
    }
}

/// The process's filtered thread for filter `name` (`vmm`, `api` or `vcpu`), started on first
/// use.
pub fn filtered(name: &'static str) -> &'static Filtered {
    use std::sync::OnceLock;
    static VMM: OnceLock<Filtered> = OnceLock::new();
    static API: OnceLock<Filtered> = OnceLock::new();
    static VCPU: OnceLock<Filtered> = OnceLock::new();
    let cell = match name {
        "vmm" => &VMM,
        "api" => &API,
        "vcpu" => &VCPU,
        _ => panic!("no {name:?} filter"),
    };
    cell.get_or_init(|| Filtered::new(name))
}

/// Runs one input against a virtio device of `kind` behind its transport
/// (`ember_devices::virtio::fuzz_devices`): the fixture is set up here, the input driven on
/// the thread under the `vmm` filter (the event loop's, which runs the devices in the VMM).
/// Panics if the device broke one of its invariants.
pub fn run_virtio_device(kind: ember_devices::virtio::fuzz_devices::Kind, data: &[u8]) {
    use ember_devices::virtio::fuzz_devices::{drive, fixture};
    let mut fx = fixture(kind).expect("fixture");
    let input = data.to_vec();
    let (fx, stats) = filtered("vmm").run(move || {
        let stats = drive(&mut fx, &input);
        (fx, stats)
    });
    drop(fx);
    let stats = stats.expect("fixture");
    assert_eq!(stats.violations, 0, "{kind:?} invariant violated: {stats:?}");
}
