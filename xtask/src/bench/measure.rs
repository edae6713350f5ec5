//! Running one VMM process and timing it from the outside: exec → first console line,
//! exec → exit, and the memory map of a running VMM (`/proc/<pid>/smaps`, `VmHWM`).
//!
//! `ru_maxrss` from `wait4` is not used: Linux carries the RSS high-water mark of the process
//! image replaced by `exec` over into it (with `posix_spawn`, the harness's own), so it is never
//! below the harness's RSS.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What one run of a VMM process gave.
#[derive(Clone, Debug)]
pub struct Run {
    /// exec → the line appeared on the child's stdout (`None`: it never did).
    pub first_line: Option<Duration>,
    /// exec → the child was reaped.
    pub exit: Duration,
    /// Exit status (`Err(signal)` when killed by a signal).
    pub status: Result<i32, i32>,
    /// Everything the child wrote on stdout.
    pub stdout: String,
    /// Everything the child wrote on stderr.
    pub stderr: String,
    /// Whether the watchdog killed it.
    pub timed_out: bool,
    /// Memory sampled while it ran (only with [`Options::sample_memory`]).
    pub memory: Option<MemorySample>,
    /// Whether it was killed after its line ([`Options::stop_after_line`]).
    pub stopped_after_line: bool,
}

impl Run {
    /// Exit status 0 and not timed out.
    pub fn ok(&self) -> bool {
        self.status == Ok(0) && !self.timed_out
    }

    /// One-line description of a failed run.
    pub fn failure(&self) -> String {
        let status = match self.status {
            Ok(c) => format!("exit status {c}"),
            Err(s) => format!("signal {s}"),
        };
        let err = self.stderr.trim();
        let err = err.lines().last().unwrap_or("");
        format!(
            "{status}{}{}",
            if self.timed_out { " (timed out)" } else { "" },
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        )
    }
}

/// How to run and what to watch for.
#[derive(Clone, Debug)]
pub struct Options {
    /// The console line whose arrival is timed (matched as a whole line).
    pub line: Option<String>,
    /// Kill the child after this long.
    pub timeout: Duration,
    /// Once the line appeared: wait this long, sample `/proc/<pid>/smaps` and `VmHWM`, then
    /// kill the child (for guests that do not exit by themselves).
    pub sample_memory: Option<Duration>,
    /// Kill the child as soon as the line appeared (a VMM that reboots the guest on reset).
    pub stop_after_line: bool,
    /// Guest RAM size in bytes, to tell guest mappings from the VMM's own.
    pub guest_bytes: u64,
}

/// Runs `cmd` once and times it.
pub fn run(cmd: &mut Command, opts: &Options) -> Result<Run, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take().ok_or("no stdout pipe")?;
    let mut err = child.stderr.take().ok_or("no stderr pipe")?;

    // Watchdog: kill the child if it overstays.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let timeout = opts.timeout;
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: kill has no memory effects; the pid is our unreaped child (reaping
            // happens only after this thread is told or has fired).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        } else {
            false
        }
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });

    let mut stdout = Vec::new();
    let mut first_line = None;
    let mut memory = None;
    let mut buf = [0u8; 4096];
    let needle = opts.line.as_ref().map(|l| format!("{l}\n"));
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        stdout.extend_from_slice(&buf[..n]);
        if first_line.is_none() {
            if let Some(needle) = &needle {
                let text = String::from_utf8_lossy(&stdout);
                let text = text.replace('\r', "");
                if text.starts_with(needle.as_str()) || text.contains(&format!("\n{needle}")) {
                    first_line = Some(t0.elapsed());
                    if let Some(wait) = opts.sample_memory {
                        std::thread::sleep(wait);
                        memory = sample_memory(pid, opts.guest_bytes).ok();
                        // SAFETY: as above; the child is not reaped yet.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    } else if opts.stop_after_line {
                        // SAFETY: as above; the child is not reaped yet.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
    let mut wstatus = 0;
    // SAFETY: rusage is plain data filled by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our child; wstatus and usage are valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut wstatus, 0, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4: {}", std::io::Error::last_os_error()));
        }
    }
    let exit = t0.elapsed();
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let stderr = stderr_reader.join().unwrap_or_default();
    // `child` was reaped by wait4; dropping a std Child neither waits nor kills.
    drop(child);
    let status = if libc::WIFEXITED(wstatus) {
        Ok(libc::WEXITSTATUS(wstatus))
    } else {
        Err(libc::WTERMSIG(wstatus))
    };
    Ok(Run {
        first_line,
        exit,
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr,
        timed_out,
        memory,
        stopped_after_line: opts.stop_after_line && first_line.is_some(),
    })
}

/// A running VMM's memory, from `/proc/<pid>/smaps` and `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemorySample {
    /// Rss of every mapping, KiB.
    pub total_rss_kib: u64,
    /// Rss of the guest RAM mappings, KiB.
    pub guest_rss_kib: u64,
    /// Number of mappings taken for guest RAM.
    pub guest_mappings: usize,
    /// `VmHWM` (peak RSS so far), KiB.
    pub hwm_kib: u64,
    /// `Anonymous` pages of every mapping except guest RAM, KiB: the memory the process has
    /// to itself (heap, stacks, written data, relocated pages), as opposed to the file pages of
    /// its binary and libraries, which every process running that binary shares.
    pub private_kib: u64,
}

impl MemorySample {
    /// RSS that is not guest RAM, KiB.
    pub fn overhead_kib(&self) -> u64 {
        self.total_rss_kib.saturating_sub(self.guest_rss_kib)
    }

    /// Peak RSS minus the guest RAM resident now, KiB: the peak non-guest RSS, assuming the
    /// guest's resident memory did not shrink (it does not for these guests).
    pub fn peak_overhead_kib(&self) -> u64 {
        self.hwm_kib
            .saturating_sub(self.guest_rss_kib)
            .max(self.overhead_kib())
    }
}

/// Samples a process's memory. Guest RAM mappings are the anonymous (or memfd) writable
/// mappings between `guest_bytes` and `guest_bytes + 8 MiB` long — how Firecracker's memory
/// monitor tells them apart — so the guest must not be 64 MiB (a glibc malloc arena's size).
pub fn sample_memory(pid: libc::pid_t, guest_bytes: u64) -> Result<MemorySample, String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| format!("smaps of {pid}: {e}"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("status of {pid}: {e}"))?;
    Ok(parse_memory(&smaps, &status, guest_bytes))
}

/// [`sample_memory`] from the texts of `/proc/<pid>/smaps` and `/proc/<pid>/status`.
fn parse_memory(smaps: &str, status: &str, guest_bytes: u64) -> MemorySample {
    let mut s = MemorySample::default();
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let perms = words.next().unwrap_or("");
                let path = words.nth(3).unwrap_or("");
                let size = end - start;
                is_guest = perms.starts_with("rw")
                    && (path.is_empty() || path.starts_with("/memfd:"))
                    && size >= guest_bytes
                    && size <= guest_bytes + 8 * 1024 * 1024;
                if is_guest {
                    s.guest_mappings += 1;
                }
                continue;
            }
        }
        if first == "Anonymous:" && !is_guest {
            s.private_kib += words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            continue;
        }
        if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            s.total_rss_kib += kib;
            if is_guest {
                s.guest_rss_kib += kib;
            }
        }
    }
    s.hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_shared_text_and_private_pages_are_told_apart() {
        let smaps = "\
00400000-00600000 r-xp 00000000 08:01 42 /usr/bin/vmm
Rss:                1500 kB
Anonymous:             0 kB
00600000-00601000 rw-p 00200000 08:01 42 /usr/bin/vmm
Rss:                   4 kB
Anonymous:             4 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0 
Rss:                2048 kB
Anonymous:          2048 kB
7f1000000000-7f1000100000 rw-p 00000000 00:00 0 
Rss:                 200 kB
Anonymous:           200 kB
";
        let m = parse_memory(smaps, "Name:\tvmm\nVmHWM:\t    4000 kB\n", 128 << 20);
        assert_eq!(m.guest_mappings, 1);
        assert_eq!(m.guest_rss_kib, 2048);
        assert_eq!(m.total_rss_kib, 1500 + 4 + 2048 + 200);
        assert_eq!(m.overhead_kib(), 1704);
        assert_eq!(m.private_kib, 204);
        assert_eq!(m.peak_overhead_kib(), 4000 - 2048);
    }
}

/// Where a process's threads spend their time, by sampling: for each thread, its state from
/// `/proc/<pid>/task/<tid>/stat` and, when it sleeps, its kernel stack from `.../stack`
/// (root only). Each sample round's duration is attributed to what every thread was doing.
#[derive(Default, Debug)]
pub struct WaitProfile {
    /// (thread name, "running" or the sleeping kernel stack) → milliseconds.
    pub ms: std::collections::BTreeMap<(String, String), f64>,
    /// Sample rounds taken.
    pub rounds: u64,
    /// Processes profiled.
    pub runs: usize,
}

/// Kernel frames that say nothing about why a thread waits.
const BORING_FRAMES: &[&str] = &[
    "entry_SYSCALL_64_after_hwframe",
    "do_syscall_64",
    "__x64_sys_ioctl",
    "__x64_sys_close",
    "kvm_vm_ioctl",
    "kvm_arch_vm_ioctl",
    "kvm_vcpu_ioctl",
    "kvm_arch_vcpu_ioctl",
    "__synchronize_srcu.part.0",
    "__synchronize_srcu",
];

fn condense(stack: &str) -> String {
    let frames: Vec<&str> = stack
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|f| f.split('+').next().unwrap_or(f))
        .collect();
    let srcu = frames.iter().any(|f| f.starts_with("__synchronize_srcu"));
    let mut kept: Vec<&str> = frames
        .iter()
        .copied()
        .filter(|f| !BORING_FRAMES.contains(f))
        .take(5)
        .collect();
    if kept.is_empty() {
        kept = frames.iter().copied().take(2).collect();
    }
    let s = kept.join(" ← ");
    if srcu {
        format!("synchronize_srcu ← {s}")
    } else {
        s
    }
}

impl WaitProfile {
    /// Runs `cmd` to its end (stdin, stdout and stderr to /dev/null), sampling it.
    pub fn sample(&mut self, cmd: &mut Command, timeout: Duration) -> Result<(), String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let pid = child.id();
        let t0 = Instant::now();
        let mut last = Instant::now();
        loop {
            if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                break;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err("timed out".into());
            }
            let now = Instant::now();
            let dt = (now - last).as_secs_f64() * 1e3;
            last = now;
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            let mut seen = false;
            for t in tasks.flatten() {
                let dir = t.path();
                let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                    continue;
                };
                // "tid (comm) S ...": the state follows the last ')'.
                let Some(close) = stat.rfind(')') else {
                    continue;
                };
                let comm = stat[stat.find('(').map_or(0, |i| i + 1)..close].to_string();
                let state = stat[close + 1..].split_whitespace().next().unwrap_or("?");
                let what = if state == "R" {
                    "running or runnable (CPU)".to_string()
                } else {
                    let stack = std::fs::read_to_string(dir.join("stack")).unwrap_or_default();
                    if stack.trim().is_empty() {
                        format!("state {state}")
                    } else {
                        condense(&stack)
                    }
                };
                *self.ms.entry((comm, what)).or_default() += dt;
                seen = true;
            }
            if seen {
                self.rounds += 1;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        self.runs += 1;
        Ok(())
    }
}
