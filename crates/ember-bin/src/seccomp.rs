//! Seccomp filters for the `ember` binary's threads, and the report of a blocked system call.
//!
//! Three filters, named as Firecracker names them: `vcpu` (each vCPU thread, installed before
//! it first enters the guest), `vmm` (the event loop that runs the devices, the main thread
//! once the VM is built, the snapshot thread) and `api` (the HTTP API thread, before it
//! accepts a connection). Ember's own are compiled from `seccomp/x86_64.json` at build time;
//! `--seccomp-filter FILE` takes a file compiled by Firecracker's `seccompiler-bin` instead;
//! `--no-seccomp` installs none.
//!
//! A system call outside a thread's allow-list raises `SIGSYS` on that thread
//! (`SECCOMP_RET_TRAP`): the handler writes one line naming the thread and the call to stderr
//! (and to the Firecracker-mode log and metrics files when they are set), and ends the
//! process with status [`BLOCKED_SYSCALL_STATUS`].

use std::cell::Cell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use seccompiler::{sock_filter, BpfProgram};

/// The exit status after a blocked system call (Firecracker's, 148).
pub const BLOCKED_SYSCALL_STATUS: i32 = 148;

/// The largest filter file read (Firecracker's limit).
const MAX_FILE: u64 = 100_000;

/// A kind of thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thread {
    /// The event loop, the main thread once the VM is built, the snapshot thread.
    Vmm,
    /// The API server thread.
    Api,
    /// A vCPU thread.
    Vcpu,
}

impl Thread {
    fn key(self) -> &'static str {
        match self {
            Thread::Vmm => "vmm",
            Thread::Api => "api",
            Thread::Vcpu => "vcpu",
        }
    }
}

/// One program per kind of thread; an empty program installs nothing.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    vmm: Arc<BpfProgram>,
    api: Arc<BpfProgram>,
    vcpu: Arc<BpfProgram>,
}

/// Firecracker's instruction encoding: a little-endian u64 of (code, jt, jf, k).
fn instruction(word: u64) -> sock_filter {
    let b = word.to_le_bytes();
    sock_filter {
        code: u16::from_le_bytes([b[0], b[1]]),
        jt: b[2],
        jf: b[3],
        k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    }
}

fn program(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            instruction(u64::from_le_bytes(w))
        })
        .collect()
}

impl Filters {
    /// No filters (`--no-seccomp`).
    pub fn none() -> Self {
        Filters::default()
    }

    /// Ember's filters, compiled from `seccomp/x86_64.json` when ember was built.
    pub fn builtin() -> Self {
        Filters {
            vmm: Arc::new(program(include_bytes!(concat!(
                env!("OUT_DIR"),
                "/seccomp_vmm.bpf"
            )))),
            api: Arc::new(program(include_bytes!(concat!(
                env!("OUT_DIR"),
                "/seccomp_api.bpf"
            )))),
            vcpu: Arc::new(program(include_bytes!(concat!(
                env!("OUT_DIR"),
                "/seccomp_vcpu.bpf"
            )))),
        }
    }

    /// Filters from a file compiled by Firecracker's `seccompiler-bin` (a bitcode map from
    /// thread name to instructions): its `vmm`, `api` and `vcpu` entries, each of which must
    /// be there (an empty one installs nothing on that thread).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let what = |e: &dyn std::fmt::Display| format!("--seccomp-filter {}: {e}", path.display());
        let file = ember_loader::open_regular_file(path).map_err(|e| what(&e))?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| what(&e))?;
        if bytes.len() as u64 > MAX_FILE {
            return Err(what(&format_args!("larger than {MAX_FILE} bytes")));
        }
        Self::from_bytes(&bytes).map_err(|e| what(&e))
    }

    /// Filters from the bytes of a compiled filter file ([`from_file`](Self::from_file)).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let map: HashMap<String, Vec<u64>> = bitcode::deserialize(bytes).map_err(|e| {
            format!(
                "not a compiled seccomp filter file (Firecracker's seccompiler-bin output): {e}"
            )
        })?;
        let map: HashMap<String, Vec<u64>> = map
            .into_iter()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        let get = |t: Thread| -> Result<Arc<BpfProgram>, String> {
            let words = map
                .get(t.key())
                .ok_or_else(|| format!("it has no \"{}\" filter", t.key()))?;
            if words.len() > usize::from(u16::MAX) {
                return Err(format!("its \"{}\" filter is too long", t.key()));
            }
            Ok(Arc::new(words.iter().map(|&w| instruction(w)).collect()))
        };
        Ok(Filters {
            vmm: get(Thread::Vmm)?,
            api: get(Thread::Api)?,
            vcpu: get(Thread::Vcpu)?,
        })
    }

    /// Whether any filter is installed.
    pub fn is_empty(&self) -> bool {
        self.vmm.is_empty() && self.api.is_empty() && self.vcpu.is_empty()
    }

    /// Installs `thread`'s filter on the calling thread, which the blocked-call report then
    /// calls `label` (at most 15 bytes are kept).
    pub fn apply(&self, thread: Thread, label: &str) -> Result<(), String> {
        set_label(label);
        let program = match thread {
            Thread::Vmm => &self.vmm,
            Thread::Api => &self.api,
            Thread::Vcpu => &self.vcpu,
        };
        if program.is_empty() {
            return Ok(());
        }
        seccompiler::apply_filter(program)
            .map_err(|e| format!("cannot install the {} seccomp filter: {e}", thread.key()))
    }
}

/// The filters in use and the test hook: what each thread calls when it starts.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    filters: Filters,
    test_blocked: Option<Thread>,
    /// The filters came from `--seccomp-filter` (Firecracker's, or anyone's).
    from_file: bool,
}

impl Setup {
    /// From `--no-seccomp`, `--seccomp-filter` and the hidden test flag; installs the
    /// blocked-call reporter unless there are no filters.
    pub fn from_flags(
        no_seccomp: bool,
        file: Option<&Path>,
        test_blocked: Option<&str>,
    ) -> Result<Self, String> {
        let filters = match (no_seccomp, file) {
            (true, _) => {
                eprintln!(
                    "{}: warning: --no-seccomp: the VMM's threads run without seccomp filters",
                    crate::program_name()
                );
                Filters::none()
            }
            (false, Some(path)) => Filters::from_file(path)?,
            (false, None) => Filters::builtin(),
        };
        if !filters.is_empty() {
            install_reporter();
        }
        let test_blocked = match test_blocked {
            None => None,
            Some("vcpu") => Some(Thread::Vcpu),
            Some("api") => Some(Thread::Api),
            Some("vmm") => Some(Thread::Vmm),
            Some(other) => {
                return Err(format!(
                    "--seccomp-test-blocked {other}: expected vcpu, vmm or api"
                ))
            }
        };
        Ok(Setup {
            filters,
            test_blocked,
            from_file: !no_seccomp && file.is_some(),
        })
    }

    /// Whether the filters came from a file (`--seccomp-filter`) rather than Ember's own.
    pub fn filters_from_file(&self) -> bool {
        self.from_file
    }

    /// Installs `thread`'s filter on the calling thread (called `label` in a report).
    pub fn enter(&self, thread: Thread, label: &str) -> Result<(), String> {
        self.filters.apply(thread, label)?;
        if self.test_blocked == Some(thread) {
            // SAFETY: socket has no memory arguments; the descriptor, if any, is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: closes the descriptor just made.
                unsafe { libc::close(fd) };
            }
        }
        Ok(())
    }

    /// The VM's thread hook: the `vcpu` filter on vCPU threads, `vmm` on the event loop.
    pub fn hook(&self, event_loop_label: &'static str) -> ember_vmm::ThreadHook {
        let setup = self.clone();
        Arc::new(move |kind| match kind {
            ember_vmm::ThreadKind::Vcpu(n) => setup.enter(Thread::Vcpu, &format!("vcpu{n}")),
            _ => setup.enter(Thread::Vmm, event_loop_label),
        })
    }
}

thread_local! {
    /// The calling thread's name for the report (set before its filter is installed).
    static LABEL: Cell<([u8; 15], usize)> = const { Cell::new(([0; 15], 0)) };
}

fn set_label(label: &str) {
    let mut buf = [0u8; 15];
    let n = label.len().min(buf.len());
    buf[..n].copy_from_slice(&label.as_bytes()[..n]);
    LABEL.with(|l| l.set((buf, n)));
}

/// Where the report also goes (Firecracker mode's log and metrics files; -1: nowhere).
static LOG_FD: AtomicI32 = AtomicI32::new(-1);
static METRICS_FD: AtomicI32 = AtomicI32::new(-1);
/// Blocked system calls so far.
static FAULTS: AtomicU64 = AtomicU64::new(0);

/// The report also goes to `fd` (the log file).
pub fn report_to_log(fd: i32) {
    LOG_FD.store(fd, Ordering::SeqCst);
}

/// The report writes a metrics line (`{"seccomp":{"num_faults":1}}`) to `fd`.
pub fn report_to_metrics(fd: i32) {
    METRICS_FD.store(fd, Ordering::SeqCst);
}

/// A fixed buffer that formats without allocating (the handler may interrupt `malloc`).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn write_all(fd: i32, bytes: &[u8]) {
    if fd < 0 {
        return;
    }
    // SAFETY: writes from a valid buffer; write is async-signal-safe and in every filter.
    let _ = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// The message for a blocked system call `nr` on the thread called `label`.
fn message(label: &[u8], nr: i32) -> Line {
    use std::fmt::Write;
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    let name = u32::try_from(nr)
        .ok()
        .and_then(|n| syscalls::Sysno::new(n as usize))
        .map_or("unknown", |s| s.name());
    let label = std::str::from_utf8(label).unwrap_or("?");
    let _ = writeln!(
        line,
        "{}: seccomp: the {label} thread made system call {nr} ({name}), which its filter \
         does not allow; ending with status {BLOCKED_SYSCALL_STATUS}",
        crate::program_name()
    );
    line
}

/// The offset of `si_syscall` in the kernel's `siginfo_t` for SIGSYS (after `si_signo`,
/// `si_errno`, `si_code`, padding, and the 8-byte `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;
/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for an SA_SIGINFO handler.
    let (code, nr) = unsafe {
        (
            (*info).si_code,
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned(),
        )
    };
    let nr = if code == SYS_SECCOMP { nr } else { -1 };
    FAULTS.fetch_add(1, Ordering::SeqCst);
    let (label, len) = LABEL.with(Cell::get);
    let line = message(&label[..len], nr);
    write_all(2, &line.buf[..line.len]);
    let log = LOG_FD.load(Ordering::SeqCst);
    if log != 2 {
        write_all(log, &line.buf[..line.len]);
    }
    write_all(
        METRICS_FD.load(Ordering::SeqCst),
        b"{\"seccomp\":{\"num_faults\":1}}\n",
    );
    // SAFETY: _exit ends the process at once (exit_group is in every filter).
    unsafe { libc::_exit(BLOCKED_SYSCALL_STATUS) };
}

/// Installs the SIGSYS handler that reports a blocked system call (before any filter).
pub fn install_reporter() {
    // SAFETY: sigaction is plain data, zeroed then filled in; the handler only formats into
    // a stack buffer, writes and exits.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
    }
}

/// Blocked system calls so far (for the metrics: the process ends at the first one).
pub fn faults() -> u64 {
    FAULTS.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_filters_are_there_and_end_in_a_trap_for_the_rest() {
        let f = Filters::builtin();
        for p in [&f.vmm, &f.api, &f.vcpu] {
            assert!(p.len() > 10);
            // SECCOMP_RET_TRAP somewhere: the default action.
            assert!(p.iter().any(|i| i.code == 0x06 && i.k == 0x0003_0000));
        }
        assert!(f.vcpu.len() < f.vmm.len());
        // build.rs's argument load before the call number's (the action cache skipped).
        for p in [&f.vmm, &f.api, &f.vcpu] {
            assert_eq!((p[3].code, p[3].k, p[4].code, p[4].k), (0x20, 16, 0x20, 0));
        }
    }

    #[test]
    fn a_firecracker_compiled_file_is_read_and_garbage_is_refused() {
        let words = |p: &BpfProgram| -> Vec<u64> {
            p.iter()
                .map(|i| {
                    let mut b = [0u8; 8];
                    b[..2].copy_from_slice(&i.code.to_le_bytes());
                    b[2] = i.jt;
                    b[3] = i.jf;
                    b[4..].copy_from_slice(&i.k.to_le_bytes());
                    u64::from_le_bytes(b)
                })
                .collect()
        };
        let f = Filters::builtin();
        let map: std::collections::BTreeMap<String, Vec<u64>> = [
            ("VMM".to_string(), words(&f.vmm)),
            ("api".to_string(), Vec::new()),
            ("vcpu".to_string(), words(&f.vcpu)),
        ]
        .into_iter()
        .collect();
        let bytes = bitcode::serialize(&map).unwrap();
        let read = Filters::from_bytes(&bytes).unwrap();
        assert_eq!(read.vmm.len(), f.vmm.len());
        assert!(read.api.is_empty());
        assert_eq!(read.vcpu[3].k, f.vcpu[3].k);
        let e = Filters::from_bytes(b"not a filter").unwrap_err();
        assert!(e.contains("not a compiled seccomp filter"), "{e}");
        let partial: std::collections::BTreeMap<String, Vec<u64>> =
            [("vmm".to_string(), Vec::new())].into_iter().collect();
        let e = Filters::from_bytes(&bitcode::serialize(&partial).unwrap()).unwrap_err();
        assert!(e.contains("no \"api\" filter"), "{e}");
    }

    #[test]
    fn the_report_names_the_thread_and_the_call() {
        let line = message(b"vcpu0", 41);
        let s = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert!(
            s.contains("the vcpu0 thread made system call 41 (socket)"),
            "{s}"
        );
        assert!(s.ends_with("status 148\n"), "{s}");
    }
}
