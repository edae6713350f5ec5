//! In-process forks of a paused template (`cargo bench --bench fork [-- --quick] [--markdown]`).
//!
//! The template is the probe guest (128 MiB, 1 vCPU) with virtio-rng, a read-only virtio-blk
//! disk and virtio-vsock attached, paused in its `snapshot` wait (it filled 64 KiB with a
//! pattern, `probe.snapshot_kib=64`). Each fork gets its own vsock socket and CID, runs, is
//! sent one byte, checks the pattern, marks it with the byte and answers. Measured:
//!
//! - fork → its vCPU's first `KVM_RUN`, and fork → its guest's answer (its `PROBE snapshot ok`
//!   line, the pattern checked: the memory is the template's), one fork at a time;
//! - forks per second: two threads forking, running and tearing down forks for a fixed time;
//! - each of these with the fork's KVM VM, vCPUs and memory made for it, and taken from a
//!   [`ember_vmm::VmPool::for_template`] that prepares them on a thread of its own;
//! - VMM memory per idle fork: process RSS with 64 forks built and paused, minus before, per
//!   fork (guest pages are not touched while paused, so this is what the VMM adds).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_vmm::{DiskConfig, RngConfig, Template, Vm, VmConfig, VsockConfig};

/// A console that reports when a line holding `needle` arrives.
#[derive(Clone)]
struct Watch {
    buf: Arc<Mutex<Vec<u8>>>,
    needle: &'static [u8],
    tx: Arc<Mutex<Option<mpsc::Sender<Instant>>>>,
}

impl Watch {
    fn new(needle: &'static str) -> (Watch, mpsc::Receiver<Instant>) {
        let (tx, rx) = mpsc::channel();
        (
            Watch {
                buf: Arc::default(),
                needle: needle.as_bytes(),
                tx: Arc::new(Mutex::new(Some(tx))),
            },
            rx,
        )
    }
}

impl Write for Watch {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.buf.lock().unwrap();
        buf.extend_from_slice(b);
        if buf.windows(self.needle.len()).any(|w| w == self.needle) {
            if let Some(tx) = self.tx.lock().unwrap().take() {
                let _ = tx.send(Instant::now());
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Setup {
    template: Template,
    /// Prepared KVM VMs (`--pool`), or none.
    pool: Option<ember_vmm::VmPool>,
    dir: PathBuf,
    next_cid: AtomicU64,
}

impl Setup {
    /// A fork with its own vsock socket and CID.
    fn fork(&self, console: Watch, paused: bool) -> Vm {
        let cid = self.next_cid.fetch_add(1, Ordering::Relaxed);
        let mut state = self.template.state().clone();
        let sock = self.dir.join(format!("f{cid}.sock"));
        state.override_vsock(&sock, Some(cid)).unwrap();
        let mut b = self.template.fork_with(state).unwrap();
        if let Some(pool) = &self.pool {
            b = b.prepared(pool.take().unwrap());
        }
        b.serial_output(Box::new(console))
            .start_paused(paused)
            .build()
            .unwrap()
    }
}

fn setup(pool: bool) -> Setup {
    let dir = std::env::temp_dir().join(format!("ember-bench-fork-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("base.img");
    ember_test_support::write_blk_image(&disk, 2048, 0x5a).unwrap();
    let mut c = VmConfig::new(ember_test_support::probe_elf());
    c.memory_mib = 128;
    c.cmdline = "probe=snapshot,rng probe.snapshot_kib=64".into();
    c.rng = Some(RngConfig::default());
    c.disks.push(DiskConfig {
        path: disk,
        read_only: true,
        id: Some("base".into()),
        ..Default::default()
    });
    c.vsock = Some(VsockConfig {
        cid: 3,
        uds_path: dir.join("template.sock"),
    });
    let (console, rx) = Watch::new("PROBE snapshot waiting");
    let vm = Vm::builder(c)
        .fork_template(true)
        .serial_output(Box::new(console))
        .build()
        .unwrap();
    let h = vm.handle();
    let join = std::thread::spawn(move || vm.run());
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the template reached its wait");
    assert!(h.pause());
    let template = h.template().unwrap();
    h.stop();
    join.join().unwrap().unwrap();
    let pool = pool.then(|| ember_vmm::VmPool::for_template("/dev/kvm", &template, 8).unwrap());
    Setup {
        template,
        pool,
        dir,
        next_cid: AtomicU64::new(10),
    }
}

/// One fork, run to its answer and torn down: (→ first KVM_RUN, → answer).
fn one(s: &Setup) -> (Duration, Duration) {
    let t0 = Instant::now();
    let (console, rx) = Watch::new("PROBE snapshot ok");
    let vm = s.fork(console, false);
    let h = vm.handle();
    h.send_serial(b"g");
    let join = std::thread::spawn(move || vm.run());
    let answered = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the fork answered");
    h.stop();
    let outcome = join.join().unwrap().unwrap();
    let first = ember_vmm::process_start() + outcome.first_run.expect("the fork ran");
    (first - t0, answered - t0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within the sample"
    )]
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One configuration's figures: a markdown table row.
fn measure(s: &Setup, quick: bool) -> String {
    let n = if quick { 50 } else { 300 };
    // Warm-up.
    for _ in 0..5 {
        one(s);
    }
    let (mut first, mut answer) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (f, a) = one(s);
        first.push(f.as_secs_f64() * 1e3);
        answer.push(a.as_secs_f64() * 1e3);
    }
    // Forks per second, two threads.
    let window = Duration::from_secs(if quick { 2 } else { 5 });
    let count = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                while start.elapsed() < window {
                    one(s);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    #[allow(clippy::cast_precision_loss, reason = "a count of forks")]
    let per_sec = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    // Memory per idle fork.
    const IDLE: u64 = 64;
    assert!(ember_vmm::wait_for_teardown(Duration::from_secs(5)));
    let before = rss_kib();
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let (console, _rx) = Watch::new("never");
        let vm = s.fork(console, true);
        let h = vm.handle();
        idle.push((h, std::thread::spawn(move || vm.run())));
    }
    std::thread::sleep(Duration::from_millis(200));
    let per_fork_kib = rss_kib().saturating_sub(before) / IDLE;
    for (h, j) in idle {
        h.stop();
        let _ = j.join();
    }
    let fit = (8u64 << 20) / per_fork_kib.max(1);
    let (f50, f99) = (pct(&mut first, 50.0), pct(&mut first, 99.0));
    let (a50, a99) = (pct(&mut answer, 50.0), pct(&mut answer, 99.0));
    format!(
        "| {} | {f50:.3} / {f99:.3} | {a50:.3} / {a99:.3} | {per_sec:.0} | {per_fork_kib} KiB | {fit} |",
        if s.pool.is_some() { "from a VmPool" } else { "created per fork" }
    )
}

fn main() {
    let _ = ember_vmm::process_start();
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let markdown = args.iter().any(|a| a == "--markdown");
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this once with no KVM check.
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("fork bench: SKIPPED: no /dev/kvm");
        return;
    }
    let mut rows = Vec::new();
    for pool in [false, true] {
        let s = setup(pool);
        rows.push(measure(&s, quick));
        let _ = std::fs::remove_dir_all(&s.dir);
    }
    let n = if quick { 50 } else { 300 };
    if markdown {
        println!("### Forks (in process, 128 MiB probe template with rng, blk and vsock)\n");
    }
    println!("| KVM VM and vCPUs | fork → vCPU running, p50 / p99, ms | fork → guest answered, p50 / p99, ms | forks per second (2 threads) | VMM memory per idle fork | idle forks in 8 GiB |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!(
        "\n{n} forks one at a time; each gets its own vsock socket and CID. Command: `cargo bench --bench fork -- --markdown{}`.\n",
        if quick { " --quick" } else { "" }
    );
}
