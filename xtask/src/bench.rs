//! `cargo xtask bench [--quick] [--runs N] [--only SECTIONS] [--update-doc]`: Ember against
//! QEMU's `microvm` machine (and Firecracker when `FIRECRACKER=/path/to/firecracker` is set)
//! on this machine, in the same run.
//!
//! Sections (`--only boot,startup,waits,memory,rate,exits,devices,api,snapshot,fork,kvm`; all by
//! default):
//!
//! - `boot`: null-guest boot, exec → first console line and exec → exit, PVH and Linux 64-bit
//!   entry, 1 and 4 vCPUs, 128 MiB and 2 GiB; min/median/max over `--runs` runs (default 20,
//!   `--quick` 5), the VMMs alternating run by run.
//! - `startup`: Ember's in-process start-up phases (`ember --timings`), main → first KVM_RUN.
//! - `waits`: where Ember's threads spend a null boot, from sampling their state and kernel
//!   stacks (`/proc/<pid>/task/*/stack`) from outside: CPU, or which kernel wait.
//! - `memory`: RSS beyond guest memory (from smaps, guest RAM mappings excluded) after boot
//!   and at peak, 128 MiB and 2 GiB; then the memory per additional VM in one process
//!   (`cargo bench --bench vm_memory`).
//! - `rate`: null microVMs booted to exit per second, 1, 2, 4 and 8 started concurrently, one
//!   process each, then in one process (`cargo bench --bench boot_rate`).
//! - `exits`: the probe's exit loop (ring 0 and ring 3), ns per exit.
//! - `devices`: the probe's virtio-net (UDP guest→host and echoed host→guest, on a TAP in a
//!   network namespace), virtio-blk (4 KiB IOPS, Ember with interrupts, QEMU polled) and
//!   Ember's vsock (MiB/s both ways); see `bench/devices.rs`.
//! - `api`: Firecracker-mode start-up beside Firecracker: exec → API socket accepting, and
//!   exec → `InstanceStart` answered → the null guest's first line, configured over the API.
//! - `snapshot`: full snapshot create and exec → restored guest answering, beside Firecracker,
//!   128 MiB and 2 GiB, 1 and 4 vCPUs; see `bench/snapshot.rs`.
//! - `fork`: in-process forks of a paused template (`cargo bench --bench fork`): fork → the
//!   fork's guest answering (p50, p99), forks per second, VMM memory per idle fork.
//! - `kvm`: the KVM ioctls of Ember's start-up, timed one by one in several orders.
//!
//! Results go to `target/bench/` (`results.md`, `boot.png`, `boot-samples.csv`);
//! `--update-doc` also replaces the generated part of `docs/performance.md` and writes
//! `docs/performance-boot.png`. The null guest is built here (see `bench/null_elf.rs`).

mod api;
mod devices;
mod kvm;
mod measure;
mod null_elf;
mod peers;
#[cfg(feature = "plot")]
mod plot;
mod snapshot;
mod stats;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use measure::{MemorySample, Run};
use null_elf::{Entries, NullMode};
use peers::{Guest, Kind, Peer, Protocol};
use stats::Summary;

const SECTIONS: &[&str] = &[
    "boot", "startup", "waits", "memory", "rate", "exits", "devices", "api", "snapshot", "fork",
    "kvm",
];
const NULL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
const DOC_BEGIN: &str = "<!-- BEGIN GENERATED: cargo xtask bench -->";
const DOC_END: &str = "<!-- END GENERATED -->";

struct Options {
    quick: bool,
    runs: usize,
    sections: Vec<String>,
    update_doc: bool,
    out: PathBuf,
    no_build: bool,
    /// Extra Ember builds to compare (`--ember NAME=PATH`).
    variants: Vec<(String, PathBuf)>,
    /// Boot scenarios whose label contains this (`--filter`).
    filter: Option<String>,
}

/// `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    /// 5 runs per boot scenario instead of 20.
    #[arg(long)]
    quick: bool,
    /// Runs per boot scenario.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    runs: Option<u64>,
    /// Sections to run (default: all).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(SECTIONS))]
    only: Vec<String>,
    /// Also replace the generated part of docs/performance.md and docs/performance-boot.png.
    #[arg(long)]
    update_doc: bool,
    /// Where results go [default: target/bench].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the ember binary already built.
    #[arg(long)]
    no_build: bool,
    /// Another build of `ember` to compare (e.g. a patched one), as NAME=PATH (repeatable).
    #[arg(long = "ember", value_name = "NAME=PATH")]
    variants: Vec<String>,
    /// Keep the boot scenarios whose label contains TEXT (e.g. "pvh, 1 vcpu, 128").
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// Redraw the boot plot of a saved run: CSV (boot-samples.csv) to PNG.
    #[arg(long, num_args = 2, value_names = ["CSV", "PNG"])]
    plot: Option<Vec<PathBuf>>,
}

fn parse(args: &Args) -> Result<Options, String> {
    let root = crate::workspace_root();
    let mut variants = Vec::new();
    for v in &args.variants {
        let (name, path) = v.split_once('=').ok_or("--ember takes NAME=PATH")?;
        variants.push((name.to_string(), PathBuf::from(path)));
    }
    let runs = match args.runs {
        Some(n) => n as usize,
        None if args.quick => 5,
        None => 20,
    };
    Ok(Options {
        quick: args.quick,
        runs,
        sections: if args.only.is_empty() {
            SECTIONS.iter().map(|s| s.to_string()).collect()
        } else {
            args.only.clone()
        },
        update_doc: args.update_doc,
        out: args
            .out
            .clone()
            .unwrap_or_else(|| root.join("target/bench")),
        no_build: args.no_build,
        variants,
        filter: args.filter.as_ref().map(|f| f.to_lowercase()),
    })
}

fn wants(o: &Options, section: &str) -> bool {
    o.sections.iter().any(|s| s == section)
}

/// Draws the boot plot `png` from the samples saved in `csv`. The plotting crates are built
/// only for this: without the `plot` feature, the task runner re-runs itself with it.
fn draw_boot_plot(csv: &Path, png: &Path) -> Result<(), String> {
    #[cfg(feature = "plot")]
    return plot::boot_plot(png, &read_samples_csv(csv)?);
    #[cfg(not(feature = "plot"))]
    {
        eprintln!("xtask bench: building the plotting task runner (`--features plot`)");
        crate::run_cmd(
            crate::cargo()
                .args(["run", "--package", "xtask", "--features", "plot", "--"])
                .args(["bench", "--plot"])
                .args([csv, png]),
        )
    }
}

/// Entry point of `cargo xtask bench`.
pub fn run(args: &Args) -> Result<(), String> {
    if let Some([csv, png]) = args.plot.as_deref() {
        return draw_boot_plot(csv, png);
    }
    let opts = parse(args)?;
    let root = crate::workspace_root();
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| format!("cannot create {}: {e}", opts.out.display()))?;
    let load_before = loadavg();
    let started = Instant::now();

    // The VMMs.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target_dir = if target_dir.is_relative() {
        root.join(target_dir)
    } else {
        target_dir
    };
    let ember_bin = if opts.no_build {
        [MUSL_TARGET, GLIBC_TARGET]
            .iter()
            .map(|t| target_dir.join(t).join("release/ember"))
            .find(|p| p.exists())
            .ok_or("no release build of ember (drop --no-build)")?
    } else {
        build_release_ember(&target_dir)?
    };
    eprintln!("xtask bench: Ember is {}", ember_bin.display());
    // `ember-quick`, built beside `ember` by the same recipe: boot, memory and rate rows.
    let quick_bin = ember_bin.with_file_name("ember-quick");
    if !quick_bin.exists() {
        eprintln!(
            "xtask bench: note: no {} (drop --no-build): no ember-quick rows",
            quick_bin.display()
        );
    }
    let quick_peer = quick_bin.exists().then(|| Peer {
        kind: Kind::Ember,
        name: "Ember (ember-quick)".into(),
        bin: quick_bin,
        scratch: opts.out.clone(),
        flags: Vec::new(),
    });
    let with_quick = |peers: &[Peer]| -> Vec<Peer> {
        let mut v = peers.to_vec();
        if let Some(q) = &quick_peer {
            v.insert(1, q.clone());
        }
        v
    };
    let mut peers = vec![Peer {
        kind: Kind::Ember,
        name: "Ember".into(),
        bin: ember_bin.clone(),
        scratch: opts.out.clone(),
        flags: Vec::new(),
    }];
    for (name, bin) in &opts.variants {
        if !bin.exists() {
            return Err(format!("--ember {name}={}: no such file", bin.display()));
        }
        peers.push(Peer {
            kind: Kind::Ember,
            name: name.clone(),
            bin: bin.clone(),
            scratch: opts.out.clone(),
            flags: Vec::new(),
        });
    }
    if let Err(e) = crate::ensure_packages(&["qemu-system-x86"]) {
        eprintln!("xtask bench: warning: cannot install QEMU ({e})");
    }
    let qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if qemu.exists() {
        let v = peers::version(&qemu).unwrap_or_default();
        let v = v
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .unwrap_or("")
            .to_string();
        peers.push(Peer {
            kind: Kind::Qemu,
            name: format!("QEMU {v} microvm").replace("  ", " "),
            bin: qemu,
            scratch: opts.out.clone(),
            flags: Vec::new(),
        });
    } else {
        eprintln!("xtask bench: warning: no QEMU; Ember runs alone (no ratios)");
    }
    if let Some(ch) = std::env::var_os("CLOUD_HYPERVISOR") {
        let bin = PathBuf::from(ch);
        let v = peers::version(&bin)
            .map(|v| v.replace("cloud-hypervisor", "Cloud Hypervisor"))
            .unwrap_or_else(|| "Cloud Hypervisor".into());
        peers.push(Peer {
            kind: Kind::CloudHypervisor,
            name: v,
            bin,
            scratch: opts.out.clone(),
            flags: Vec::new(),
        });
    }
    if let Some(fc) = std::env::var_os("FIRECRACKER") {
        let bin = PathBuf::from(fc);
        let v = peers::version(&bin).unwrap_or_else(|| "Firecracker".into());
        peers.push(Peer {
            kind: Kind::Firecracker,
            name: v,
            bin,
            scratch: opts.out.clone(),
            flags: Vec::new(),
        });
    }

    // The guests.
    let null_pvh = write_null(
        &opts.out,
        "null-pvh.elf",
        NullMode::Exit,
        Entries::PvhAndLinux64,
    )?;
    let null_nopvh = write_null(
        &opts.out,
        "null-linux64.elf",
        NullMode::Exit,
        Entries::Linux64Only,
    )?;
    let park_pvh = write_null(
        &opts.out,
        "null-park.elf",
        NullMode::Park,
        Entries::PvhAndLinux64,
    )?;
    let park_nopvh = write_null(
        &opts.out,
        "null-park-linux64.elf",
        NullMode::Park,
        Entries::Linux64Only,
    )?;
    let probe = root.join("target/probe/probe.elf");
    if wants(&opts, "exits") || wants(&opts, "devices") {
        crate::probe::build()?;
    }

    let machine = machine_info();
    let mut report = Report::default();
    let cmd_line = std::iter::once("cargo xtask".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");

    let null = |kernel: &Path, nopvh: &Path, protocol, mem_mib, vcpus| Guest {
        kernel: kernel.to_path_buf(),
        kernel_no_pvh: Some(nopvh.to_path_buf()),
        cmdline: NULL_CMDLINE.into(),
        mem_mib,
        vcpus,
        protocol,
    };

    if wants(&opts, "boot") {
        let mut scenarios = Vec::new();
        for protocol in [Protocol::Pvh, Protocol::Linux64] {
            for vcpus in [1u8, 4] {
                for mem in [128u64, 2048] {
                    let g = null(&null_pvh, &null_nopvh, protocol, mem, vcpus);
                    let label = scenario_label(&g).to_lowercase();
                    if opts
                        .filter
                        .as_ref()
                        .is_none_or(|f| label.contains(f.as_str()))
                    {
                        scenarios.push(g);
                    }
                }
            }
        }
        // Ember and Firecracker without their seccomp filters too: what installing them
        // costs each.
        let mut boot_peers = Vec::new();
        for p in &with_quick(&peers) {
            boot_peers.push(p.clone());
            if matches!(p.kind, Kind::Ember | Kind::Firecracker)
                && p.flags.is_empty()
                && quick_peer.as_ref().is_none_or(|q| q.bin != p.bin)
            {
                boot_peers.push(Peer {
                    name: format!("{} --no-seccomp", p.name),
                    flags: vec!["--no-seccomp".into()],
                    ..p.clone()
                });
            }
        }
        report.boot = boot_section(&boot_peers, &scenarios, opts.runs)?;
    }
    if wants(&opts, "startup") {
        let runs = opts.runs;
        report.startup = Some(startup_section(&peers, &null_pvh, runs)?);
    }
    if wants(&opts, "waits") {
        let g = null(&null_pvh, &null_nopvh, Protocol::Pvh, 128, 1);
        for p in peers.iter().filter(|p| p.kind == Kind::Ember) {
            eprintln!(
                "xtask bench: wait profile of {} ({} runs)",
                p.name, opts.runs
            );
            let mut prof = measure::WaitProfile::default();
            for _ in 0..opts.runs {
                prof.sample(&mut p.command(&g)?, timeout_for(&g))?;
            }
            report.waits.push((p.name.clone(), prof));
        }
    }
    if wants(&opts, "memory") {
        let runs = if opts.quick { 2 } else { 5 };
        let mut guests = Vec::new();
        for mem in [128u64, 2048] {
            guests.push(null(&park_pvh, &park_nopvh, Protocol::Pvh, mem, 1));
        }
        report.memory = memory_section(&with_quick(&peers), &guests, runs)?;
        report.memory_in_process = Some(library_bench(
            &root,
            "vm_memory",
            opts.quick,
            &[("EMBER_PARKED_GUEST", &park_pvh)],
        )?);
    }
    if wants(&opts, "rate") {
        let per_level = Duration::from_millis(if opts.quick { 250 } else { 1000 });
        let g = null(&null_pvh, &null_nopvh, Protocol::Pvh, 128, 1);
        report.rate = rate_section(&with_quick(&peers), &g, per_level)?;
        report.rate_in_process = Some(library_bench(
            &root,
            "boot_rate",
            opts.quick,
            &[("EMBER_NULL_GUEST", &null_pvh)],
        )?);
    }
    if wants(&opts, "exits") {
        let runs = if opts.quick { 2 } else { 5 };
        report.exits = exits_section(&peers, &probe, runs, opts.quick)?;
    }
    if wants(&opts, "devices") {
        let runs = if opts.quick { 1 } else { 3 };
        report.devices = Some(devices::run(&peers, &probe, &opts.out, runs)?);
    }
    if wants(&opts, "api") {
        let runs = if opts.quick { 5 } else { opts.runs };
        report.api = api::run(&peers, &null_pvh, &opts.out, runs);
    }
    if wants(&opts, "snapshot") {
        let runs = if opts.quick { 5 } else { opts.runs };
        let sizes: &[(u64, u8)] = if opts.quick {
            &[(128, 1), (2048, 1)]
        } else {
            &[(128, 1), (2048, 1), (128, 4), (2048, 4)]
        };
        report.snapshot = snapshot::run(&peers, &probe, &opts.out, runs, sizes);
        report.snapshot_diff = snapshot::run_diff(&peers, &probe, &opts.out, runs.min(10));
    }
    if wants(&opts, "fork") {
        report.fork = Some(fork_section(&root, opts.quick)?);
    }
    if wants(&opts, "kvm") {
        let reps = if opts.quick { 5 } else { opts.runs };
        eprintln!("xtask bench: KVM ioctl ablation ({reps} repetitions)");
        report.kvm = kvm::run(reps, 128)?;
    }

    report.machine = Some(machine);
    report.command = cmd_line;
    report.load_before = load_before;
    report.load_after = loadavg();
    report.duration = started.elapsed();
    report.runs = opts.runs;

    let md = report.markdown();
    let results = opts.out.join("results.md");
    std::fs::write(&results, &md)
        .map_err(|e| format!("cannot write {}: {e}", results.display()))?;
    let csv = opts.out.join("boot-samples.csv");
    write_samples_csv(&csv, &report)?;
    let png = opts.out.join("boot.png");
    if !report.boot.is_empty() {
        if let Err(e) = draw_boot_plot(&csv, &png) {
            eprintln!("xtask bench: warning: no plot: {e}");
        }
    }
    println!("{md}");
    eprintln!("xtask bench: results in {}", results.display());
    if opts.update_doc {
        update_doc(&root, &md, &png)?;
    }
    Ok(())
}

/// Runs `cargo bench --bench fork` (in-process forks need the library, which this xtask does
/// not link) and returns its markdown.
fn fork_section(root: &Path, quick: bool) -> Result<String, String> {
    library_bench(root, "fork", quick, &[])
}

/// Runs `cargo bench --bench <name> -- --markdown` (with `env` set) and returns its markdown.
fn library_bench(
    root: &Path,
    name: &str,
    quick: bool,
    env: &[(&str, &Path)],
) -> Result<String, String> {
    eprintln!("xtask bench: cargo bench --bench {name}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["bench", "--quiet", "--bench", name, "--", "--markdown"])
        .env("EMBER_PROBE", root.join("target/probe/probe.elf"))
        .envs(env.iter().copied());
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run cargo bench: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo bench --bench {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_null(dir: &Path, name: &str, mode: NullMode, entries: Entries) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::write(&path, null_elf::build(mode, entries))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------------------------------------
// Boot

/// One (scenario, VMM) cell of the boot table.
pub struct BootCell {
    /// Scenario label ("PVH, 1 vCPU, 128 MiB").
    pub scenario: String,
    /// Protocol, vCPUs, MiB (for ordering and the plot).
    pub key: (Protocol, u8, u64),
    /// VMM name.
    pub peer: String,
    /// Whether this is Ember.
    pub is_ember: bool,
    /// Why there are no numbers, if there are none.
    pub unsupported: Option<String>,
    /// exec → first line, ms.
    pub first_line: Vec<f64>,
    /// exec → exit, ms.
    pub exit: Vec<f64>,
}

fn scenario_label(g: &Guest) -> String {
    format!(
        "{}, {} vCPU{}, {}",
        g.protocol.name(),
        g.vcpus,
        if g.vcpus == 1 { "" } else { "s" },
        mib_label(g.mem_mib)
    )
}

fn mib_label(mib: u64) -> String {
    if mib >= 1024 && mib & 1023 == 0 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

fn timeout_for(g: &Guest) -> Duration {
    Duration::from_secs(10 + g.mem_mib / 256)
}

fn null_opts(g: &Guest) -> measure::Options {
    measure::Options {
        line: Some(null_elf::LINE.into()),
        timeout: timeout_for(g),
        sample_memory: None,
        stop_after_line: false,
        guest_bytes: g.mem_mib << 20,
    }
}

/// [`null_opts`] for `p`: a VMM that reboots on reset is killed after the first line.
fn null_opts_for(p: &Peer, g: &Guest) -> measure::Options {
    measure::Options {
        stop_after_line: p.kind == Kind::CloudHypervisor,
        ..null_opts(g)
    }
}

/// Whether `p` ends a null guest's run by itself (it does not when it reboots on reset).
fn exits_by_itself(p: &Peer) -> bool {
    p.kind != Kind::CloudHypervisor
}

/// Why a failed first run means "unsupported" rather than a broken VMM.
fn unsupported_reason(peer: &Peer, g: &Guest, run: &Run) -> Option<String> {
    let err = run.stderr.to_lowercase();
    if peer.kind == Kind::Ember && g.vcpus > 1 && err.contains("vcpu") {
        let msg = run.stderr.lines().last().unwrap_or("").trim();
        let msg = msg.strip_prefix("ember: error: ").unwrap_or(msg);
        return Some(format!("unsupported: {msg}"));
    }
    None
}

fn check_null_run(run: &Run) -> Result<(), String> {
    if run.stopped_after_line {
        return Ok(());
    }
    if !run.ok() {
        return Err(run.failure());
    }
    if run.first_line.is_none() {
        return Err(format!("no `{}` line on stdout", null_elf::LINE));
    }
    Ok(())
}

fn boot_section(peers: &[Peer], scenarios: &[Guest], runs: usize) -> Result<Vec<BootCell>, String> {
    let mut cells: Vec<BootCell> = Vec::new();
    // Warm-up run per cell; it also tells what is unsupported.
    for g in scenarios {
        for p in peers {
            let mut cell = BootCell {
                scenario: scenario_label(g),
                key: (g.protocol, g.vcpus, g.mem_mib),
                peer: p.name.clone(),
                is_ember: p.kind == Kind::Ember,
                unsupported: None,
                first_line: Vec::new(),
                exit: Vec::new(),
            };
            match p.command(g) {
                Err(why) => cell.unsupported = Some(format!("n/a: {why}")),
                Ok(mut cmd) => {
                    let run = measure::run(&mut cmd, &null_opts_for(p, g))?;
                    if let Err(e) = check_null_run(&run) {
                        cell.unsupported = Some(
                            unsupported_reason(p, g, &run)
                                .unwrap_or_else(|| format!("failed: {e}")),
                        );
                    }
                }
            }
            if let Some(u) = &cell.unsupported {
                eprintln!("xtask bench: {} / {}: {u}", cell.scenario, p.name);
            }
            cells.push(cell);
        }
    }
    eprintln!(
        "xtask bench: null-guest boot, {runs} runs x {} scenarios x {} VMMs",
        scenarios.len(),
        peers.len()
    );
    for i in 0..runs {
        for (si, g) in scenarios.iter().enumerate() {
            // Alternate which VMM goes first.
            for k in 0..peers.len() {
                let pi = (k + i) % peers.len();
                let cell = &mut cells[si * peers.len() + pi];
                if cell.unsupported.is_some() {
                    continue;
                }
                let mut cmd = peers[pi].command(g)?;
                let run = measure::run(&mut cmd, &null_opts_for(&peers[pi], g))?;
                if let Err(e) = check_null_run(&run) {
                    eprintln!(
                        "xtask bench: {} / {}: run {i} failed: {e}",
                        cell.scenario, cell.peer
                    );
                    continue;
                }
                cell.first_line.push(ms(run.first_line.unwrap_or_default()));
                if exits_by_itself(&peers[pi]) {
                    cell.exit.push(ms(run.exit));
                }
            }
        }
    }
    Ok(cells)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Start-up breakdown

/// Samples per start-up phase, in Ember's order: (phase, ms per run).
pub type Phases = Vec<(String, Vec<f64>)>;

/// Ember's in-process start-up phases and the process floors.
pub struct Startup {
    /// (guest MiB, phase → samples ms), phases in Ember's order.
    pub phases: Vec<(u64, Phases)>,
    /// exec → exit of `ember --help` (process start + dynamic loading + argument parsing).
    pub ember_floor: Vec<f64>,
    /// exec → exit of `qemu-system-x86_64 --version`.
    pub qemu_floor: Vec<f64>,
}

fn parse_timings(stderr: &str) -> Vec<(String, f64)> {
    let mut v = Vec::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix("ember: ") else {
            continue;
        };
        if let Some(p) = rest.strip_prefix("start-up ") {
            // "<phase, may contain spaces>   <ms> ms"
            let p = p.trim_end().trim_end_matches("ms").trim_end();
            if let Some((name, num)) = p.rsplit_once(' ') {
                if let Ok(x) = num.trim().parse::<f64>() {
                    v.push((name.trim().to_string(), x));
                }
            }
        } else if let Some(p) = rest.strip_prefix("first KVM_RUN ") {
            if let Some(x) = p.split_whitespace().next().and_then(|x| x.parse().ok()) {
                v.push(("main → first KVM_RUN".into(), x));
            }
        } else if let Some(p) = rest.strip_prefix("boot timer: ") {
            if let Some(x) = p.split_whitespace().next().and_then(|x| x.parse().ok()) {
                v.push(("main → guest's boot-timer write".into(), x));
            }
        }
    }
    v
}

fn startup_section(peers: &[Peer], kernel: &Path, runs: usize) -> Result<Startup, String> {
    let ember = peers
        .iter()
        .find(|p| p.kind == Kind::Ember)
        .ok_or("no Ember")?;
    eprintln!("xtask bench: Ember start-up phases ({runs} runs)");
    let mut out = Startup {
        phases: Vec::new(),
        ember_floor: Vec::new(),
        qemu_floor: Vec::new(),
    };
    for mem in [128u64, 2048] {
        let g = Guest {
            kernel: kernel.to_path_buf(),
            kernel_no_pvh: None,
            cmdline: NULL_CMDLINE.into(),
            mem_mib: mem,
            vcpus: 1,
            protocol: Protocol::Pvh,
        };
        let mut phases: Phases = Vec::new();
        for _ in 0..runs {
            let mut cmd = ember.command(&g)?;
            cmd.arg("--timings");
            let run = measure::run(&mut cmd, &null_opts(&g))?;
            check_null_run(&run)?;
            let mut parsed = parse_timings(&run.stderr);
            let total: f64 = parsed
                .iter()
                .filter(|(n, _)| !n.starts_with("main →"))
                .map(|(_, x)| x)
                .sum();
            if let Some(first) = parsed
                .iter()
                .find(|(n, _)| n == "main → first KVM_RUN")
                .map(|x| x.1)
            {
                parsed.push((
                    "(rest: argument parsing, run() set-up, thread start)".into(),
                    first - total,
                ));
            }
            parsed.push((
                "exec → first line (outside)".into(),
                ms(run.first_line.unwrap_or_default()),
            ));
            parsed.push(("exec → exit (outside)".into(), ms(run.exit)));
            for (name, x) in parsed {
                match phases.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, v)) => v.push(x),
                    None => phases.push((name, vec![x])),
                }
            }
        }
        out.phases.push((mem, phases));
    }
    for _ in 0..runs {
        let mut c = Command::new(&ember.bin);
        c.arg("--help");
        let r = measure::run(&mut c, &quiet_opts())?;
        out.ember_floor.push(ms(r.exit));
        if let Some(q) = peers.iter().find(|p| p.kind == Kind::Qemu) {
            let mut c = Command::new(&q.bin);
            c.arg("--version");
            let r = measure::run(&mut c, &quiet_opts())?;
            out.qemu_floor.push(ms(r.exit));
        }
    }
    Ok(out)
}

fn quiet_opts() -> measure::Options {
    measure::Options {
        line: None,
        timeout: Duration::from_secs(10),
        sample_memory: None,
        stop_after_line: false,
        guest_bytes: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

/// Memory of one VMM running a parked null guest.
pub struct MemoryCell {
    /// Guest MiB.
    pub mem_mib: u64,
    /// VMM name.
    pub peer: String,
    /// Whether this is Ember.
    pub is_ember: bool,
    /// Samples.
    pub samples: Vec<MemorySample>,
    /// Why there are none.
    pub error: Option<String>,
}

fn memory_section(
    peers: &[Peer],
    guests: &[Guest],
    runs: usize,
) -> Result<Vec<MemoryCell>, String> {
    eprintln!("xtask bench: memory overhead ({runs} runs)");
    let mut cells = Vec::new();
    for g in guests {
        for p in peers {
            let mut cell = MemoryCell {
                mem_mib: g.mem_mib,
                peer: p.name.clone(),
                is_ember: p.kind == Kind::Ember,
                samples: Vec::new(),
                error: None,
            };
            for _ in 0..runs {
                let mut cmd = match p.command(g) {
                    Ok(c) => c,
                    Err(e) => {
                        cell.error = Some(e);
                        break;
                    }
                };
                let opts = measure::Options {
                    line: Some(null_elf::LINE.into()),
                    timeout: timeout_for(g),
                    sample_memory: Some(Duration::from_millis(50)),
                    stop_after_line: false,
                    guest_bytes: g.mem_mib << 20,
                };
                let run = measure::run(&mut cmd, &opts)?;
                match run.memory {
                    Some(m) if m.guest_mappings > 0 => cell.samples.push(m),
                    Some(_) => {
                        cell.error = Some("no guest RAM mapping recognised in smaps".into());
                        break;
                    }
                    None => {
                        cell.error = Some(format!("the guest did not come up: {}", run.failure()));
                        break;
                    }
                }
            }
            cells.push(cell);
        }
    }
    Ok(cells)
}

// ---------------------------------------------------------------------------------------------
// Creation rate

/// Creation rate of one VMM at one concurrency.
pub struct RateCell {
    /// VMM name.
    pub peer: String,
    /// Whether this is Ember.
    pub is_ember: bool,
    /// VMs started concurrently.
    pub concurrency: usize,
    /// VMs booted to exit.
    pub vms: usize,
    /// Failed runs.
    pub failed: usize,
    /// Wall time, s.
    pub seconds: f64,
}

/// Each of `c` workers boots null VMs one after another, starting a new one until `per_level`
/// has passed (and at least two each); the rate is the VMs booted over the wall time until the
/// last one ended.
fn rate_section(peers: &[Peer], g: &Guest, per_level: Duration) -> Result<Vec<RateCell>, String> {
    eprintln!(
        "xtask bench: creation rate ({:.1} s per level)",
        per_level.as_secs_f64()
    );
    let mut cells = Vec::new();
    for c in [1usize, 2, 4, 8] {
        for p in peers.iter().filter(|p| exits_by_itself(p)) {
            let t0 = Instant::now();
            type Worker = (usize, usize, Option<String>);
            let results: Vec<Result<Worker, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..c)
                    .map(|_| {
                        s.spawn(move || -> Result<Worker, String> {
                            let (mut booted, mut failed, mut why) = (0, 0, None);
                            while booted < 2 || t0.elapsed() < per_level {
                                let mut cmd = p.command(g)?;
                                let run = measure::run(&mut cmd, &null_opts(g))?;
                                booted += 1;
                                if let Err(e) = check_null_run(&run) {
                                    failed += 1;
                                    why.get_or_insert(e);
                                }
                            }
                            Ok((booted, failed, why))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
                    .collect()
            });
            let seconds = t0.elapsed().as_secs_f64();
            let (mut total, mut failed, mut first_failure) = (0, 0, None);
            for r in results {
                let (b, f, why) = r?;
                total += b;
                failed += f;
                first_failure = first_failure.or(why);
            }
            if let Some(why) = &first_failure {
                eprintln!(
                    "xtask bench: {} at {c} at once: {failed} failed; the first: {why}",
                    p.name
                );
            }
            cells.push(RateCell {
                peer: p.name.clone(),
                is_ember: p.kind == Kind::Ember,
                concurrency: c,
                vms: total,
                failed,
                seconds,
            });
        }
    }
    Ok(cells)
}

// ---------------------------------------------------------------------------------------------
// Exit cost

/// Exit-loop results of one VMM in one ring.
pub struct ExitCell {
    /// VMM name.
    pub peer: String,
    /// Whether this is Ember / QEMU.
    pub is_ember: bool,
    /// Whether this is QEMU.
    pub is_qemu: bool,
    /// Ring the loop ran in.
    pub ring: u8,
    /// Exits per run.
    pub exits: u64,
    /// TSC cycles per exit, per run.
    pub cycles: Vec<f64>,
    /// The TSC frequency the guest reported (kHz), if any.
    pub tsc_khz: Option<u64>,
    /// Error, if the runs failed.
    pub error: Option<String>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// Parses the probe's `ring0` line: (native, ratio).
fn parse_ring0(out: &str) -> Option<(bool, f64)> {
    let line = out.lines().find(|l| l.starts_with("PROBE ring0 ok"))?;
    Some((
        field(line, "native")? == "yes",
        field(line, "ratio")?.parse().ok()?,
    ))
}

fn exits_section(
    peers: &[Peer],
    probe: &Path,
    runs: usize,
    quick: bool,
) -> Result<Report2, String> {
    let mut cells = Vec::new();
    let mut ring0 = None;
    eprintln!("xtask bench: exit cost ({runs} runs per ring)");
    for ring in [0u8, 3] {
        let exits: u64 = match (ring, quick) {
            (0, true) => 5000,
            (0, false) => 20000,
            (_, true) => 1000,
            (_, false) => 5000,
        };
        for p in peers.iter().filter(|p| exits_by_itself(p)) {
            let g = Guest {
                kernel: probe.to_path_buf(),
                kernel_no_pvh: None,
                cmdline: format!(
                    "probe={}exitloop probe.exits={exits} probe.exitring={ring}",
                    if ring == 0 && p.kind == Kind::Ember {
                        "ring0,"
                    } else {
                        ""
                    }
                ),
                mem_mib: 128,
                vcpus: 1,
                protocol: Protocol::Pvh,
            };
            let mut cell = ExitCell {
                peer: p.name.clone(),
                is_ember: p.kind == Kind::Ember,
                is_qemu: p.kind == Kind::Qemu,
                ring,
                exits,
                cycles: Vec::new(),
                tsc_khz: None,
                error: None,
            };
            for _ in 0..runs {
                let mut cmd = match p.command(&g) {
                    Ok(c) => c,
                    Err(e) => {
                        cell.error = Some(e);
                        break;
                    }
                };
                let opts = measure::Options {
                    line: None,
                    timeout: Duration::from_secs(60),
                    sample_memory: None,
                    stop_after_line: false,
                    guest_bytes: 128 << 20,
                };
                let run = measure::run(&mut cmd, &opts)?;
                if ring0.is_none() {
                    ring0 = parse_ring0(&run.stdout);
                }
                let line = run.stdout.lines().find(|l| l.starts_with("PROBE exitloop"));
                match line {
                    Some(l) if l.starts_with("PROBE exitloop ok") => {
                        if let Some(c) = field(l, "cycles_per_exit").and_then(|v| v.parse().ok()) {
                            cell.cycles.push(c);
                        }
                        cell.tsc_khz = field(l, "tsc_khz").and_then(|v| v.parse().ok());
                    }
                    Some(l) => {
                        cell.error = Some(l.to_string());
                        break;
                    }
                    None => {
                        cell.error = Some(format!("no exitloop line ({})", run.failure()));
                        break;
                    }
                }
            }
            cells.push(cell);
        }
    }
    Ok(Report2 { cells, ring0 })
}

/// Exit-cost section results.
#[derive(Default)]
pub struct Report2 {
    /// Per VMM and ring.
    pub cells: Vec<ExitCell>,
    /// The probe's ring-0 check under Ember: (native, ratio).
    pub ring0: Option<(bool, f64)>,
}

// ---------------------------------------------------------------------------------------------
// Machine

struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
    kvm: String,
    mem_gib: f64,
}

fn machine_info() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let flags = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .unwrap_or("")
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "PVM (`kvm_pvm`, no VMX/SVM: guest ring 3 native, guest ring 0 emulated)".to_string()
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "hardware (`kvm_intel`, VMX)".to_string()
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "hardware (`kvm_amd`, SVM)".to_string()
    } else if flags.contains(" vmx") || flags.contains(" svm") {
        "hardware (VMX/SVM flag; KVM module unknown)".to_string()
    } else {
        "unknown".to_string()
    };
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores,
        kernel,
        kvm,
        mem_gib,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Default)]
struct Report {
    machine: Option<Machine>,
    command: String,
    load_before: String,
    load_after: String,
    duration: Duration,
    runs: usize,
    boot: Vec<BootCell>,
    startup: Option<Startup>,
    waits: Vec<(String, measure::WaitProfile)>,
    memory: Vec<MemoryCell>,
    rate: Vec<RateCell>,
    exits: Report2,
    devices: Option<devices::Report>,
    api: Vec<api::Cell>,
    snapshot: Vec<snapshot::Cell>,
    snapshot_diff: Vec<snapshot::DiffCell>,
    fork: Option<String>,
    /// The in-process creation rate (`cargo bench --bench boot_rate`), markdown.
    rate_in_process: Option<String>,
    /// `cargo bench --bench vm_memory`'s table.
    memory_in_process: Option<String>,
    kvm: Vec<kvm::SequenceResult>,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

impl Report {
    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Command: `{}` ({} runs per boot cell; took {:.0} s).",
            self.command,
            self.runs,
            self.duration.as_secs_f64()
        );
        let _ = writeln!(s);
        if let Some(m) = &self.machine {
            let _ = writeln!(
                s,
                "Machine: {}, {} cores, {:.0} GiB, Linux {}; KVM: {}. Load average (1/5/15 min) \
                 before: {}, after: {}.",
                m.cpu, m.cores, m.mem_gib, m.kernel, m.kvm, self.load_before, self.load_after
            );
            if let Some((native, r)) = self.exits.ring0 {
                let _ = writeln!(
                    s,
                    "The probe's `ring0` check under Ember: native={} (ring-0/ring-3 loop cost ratio {r:.0}).",
                    if native { "yes" } else { "no" }
                );
            }
            let _ = writeln!(s);
        }
        self.boot_md(&mut s);
        self.startup_md(&mut s);
        self.waits_md(&mut s);
        self.memory_md(&mut s);
        if let Some(m) = &self.memory_in_process {
            s.push_str(m);
        }
        self.rate_md(&mut s);
        if let Some(r) = &self.rate_in_process {
            s.push_str(r);
        }
        self.exits_md(&mut s);
        if let Some(d) = &self.devices {
            d.markdown(&mut s);
        }
        api::markdown(&self.api, &mut s);
        snapshot::markdown(&self.snapshot, &mut s);
        snapshot::diff_markdown(&self.snapshot_diff, &mut s);
        if let Some(f) = &self.fork {
            s.push_str(f);
        }
        self.kvm_md(&mut s);
        s
    }

    fn boot_md(&self, s: &mut String) {
        if self.boot.is_empty() {
            return;
        }
        let _ = writeln!(s, "### Null-guest boot\n");
        let _ = writeln!(
            s,
            "Milliseconds, median (min–max) over the runs; the VMMs alternate run by run. \
             *first line*: exec until `NULL` is read from the VMM's stdout pipe; *exit*: exec \
             until the VMM is reaped (Cloud Hypervisor reboots the guest on its reset, so it is \
             killed after the first line and has no exit time). Ratios: an Ember row's median \
             over the best other VMM's in the same guest (QEMU, Firecracker or Cloud \
             Hypervisor, whichever is fastest, named; `--no-seccomp` rows are not peers; below \
             1: Ember is faster).\n"
        );
        let _ = writeln!(s, "| guest | VMM | exec → first line, ms | exec → exit, ms | ÷ best peer, first line | ÷ best peer, exit |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        // The fastest other VMM in `key`'s guest by `pick` (first line or exit).
        let best = |key, pick: fn(&BootCell) -> &Vec<f64>| {
            self.boot
                .iter()
                .filter(|q| q.key == key && !q.is_ember && !q.peer.ends_with("--no-seccomp"))
                .filter_map(|q| Summary::of(pick(q)).map(|m| (m.median, q.peer.clone())))
                .min_by(|a, b| a.0.total_cmp(&b.0))
        };
        for c in &self.boot {
            if let Some(u) = &c.unsupported {
                let _ = writeln!(s, "| {} | {} | {u} | | | |", c.scenario, c.peer);
                continue;
            }
            let Some(f) = Summary::of(&c.first_line) else {
                let _ = writeln!(
                    s,
                    "| {} | {} | every run failed | | | |",
                    c.scenario, c.peer
                );
                continue;
            };
            let e = Summary::of(&c.exit);
            let (mut rf, mut re) = (String::new(), String::new());
            if c.is_ember {
                if let Some((m, who)) = best(c.key, |q| &q.first_line) {
                    rf = format!("**{}** ({who})", ratio(f.median, m));
                }
                if let (Some(e), Some((m, who))) = (&e, best(c.key, |q| &q.exit)) {
                    re = format!("**{}** ({who})", ratio(e.median, m));
                }
            }
            let exit = e.map_or_else(|| "n/a (reboots on reset)".to_string(), |e| e.fmt(2));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {exit} | {rf} | {re} |",
                c.scenario,
                c.peer,
                f.fmt(2),
            );
        }
        let _ = writeln!(s);
    }

    fn startup_md(&self, s: &mut String) {
        let Some(st) = &self.startup else { return };
        let _ = writeln!(
            s,
            "### Ember start-up, in process (`ember --timings`, null guest, PVH, 1 vCPU)\n"
        );
        let mems: Vec<u64> = st.phases.iter().map(|(m, _)| *m).collect();
        let _ = write!(s, "| phase |");
        for m in &mems {
            let _ = write!(s, " {} guest: median (min–max), ms |", mib_label(*m));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|{}", "---|".repeat(mems.len()));
        if let Some((_, first)) = st.phases.first() {
            for (name, _) in first {
                let _ = write!(s, "| {name} |");
                for (_, phases) in &st.phases {
                    let cell = phases
                        .iter()
                        .find(|(n, _)| n == name)
                        .and_then(|(_, v)| Summary::of(v))
                        .map(|x| x.fmt(3))
                        .unwrap_or_default();
                    let _ = write!(s, " {cell} |");
                }
                let _ = writeln!(s);
            }
        }
        if let Some(f) = Summary::of(&st.ember_floor) {
            let _ = writeln!(
                s,
                "| *floor:* exec → exit of `ember --help` | {} |{}",
                f.fmt(3),
                " |".repeat(mems.len().saturating_sub(1))
            );
        }
        if let Some(f) = Summary::of(&st.qemu_floor) {
            let _ = writeln!(
                s,
                "| *floor:* exec → exit of `qemu-system-x86_64 --version` | {} |{}",
                f.fmt(3),
                " |".repeat(mems.len().saturating_sub(1))
            );
        }
        let _ = writeln!(s);
    }

    fn waits_md(&self, s: &mut String) {
        if self.waits.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "### Where a null boot's time goes (thread state and kernel wait stacks, sampled)\n"
        );
        let _ = writeln!(
            s,
            "Null guest, PVH, 1 vCPU, 128 MiB. Every ~0.1 ms the harness reads each VMM thread's \
             state (`/proc/<pid>/task/<tid>/stat`) and, if it sleeps, its kernel stack \
             (`.../stack`, frames that only say \"system call\" dropped); each round's duration is \
             charged to what every thread was doing. Milliseconds per boot (a thread's rows add up \
             to its lifetime); top entries, KVM's idle worker thread omitted.\n"
        );
        for (name, prof) in &self.waits {
            let runs = prof.runs.max(1) as f64;
            // KVM's own worker thread (`kvm-nx-lpage-recovery`, a vhost task in the VMM's
            // thread group) sleeping in its main loop is not on anybody's critical path.
            let mut rows: Vec<(&(String, String), &f64)> = prof
                .ms
                .iter()
                .filter(|((_, what), _)| !what.starts_with("vhost_task_fn"))
                .collect();
            rows.sort_by(|a, b| b.1.total_cmp(a.1));
            let _ = writeln!(
                s,
                "{name} ({} boots, {} sample rounds):\n",
                prof.runs, prof.rounds
            );
            let _ = writeln!(s, "| thread | doing | ms per boot |");
            let _ = writeln!(s, "|---|---|---|");
            for ((thread, what), ms) in rows.into_iter().take(14) {
                let _ = writeln!(s, "| {thread} | {what} | {:.2} |", ms / runs);
            }
            let _ = writeln!(s);
        }
    }

    fn memory_md(&self, s: &mut String) {
        if self.memory.is_empty() {
            return;
        }
        let _ = writeln!(s, "### Memory overhead (RSS beyond guest RAM)\n");
        let _ = writeln!(
            s,
            "A null guest that prints its line and halts; 50 ms after the line, `/proc/<pid>/smaps` \
             is read and the VMM killed. *After boot*: Rss of every mapping except guest RAM \
             (anonymous or memfd mappings of the guest's size, as Firecracker's memory monitor \
             tells them apart). *Peak*: `VmHWM` minus the guest RAM resident at that moment. \
             *Private*: the `Anonymous` pages of the mappings other than guest RAM, what each \
             more VMM process costs (the rest is file pages of the binary and its libraries, \
             shared by every process of that binary). MiB, median (min–max).\n"
        );
        let _ = writeln!(s, "| guest | VMM | after boot, MiB | peak, MiB | private, MiB | guest RAM resident, MiB | total RSS, MiB | ÷ best peer (after boot) |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for c in &self.memory {
            if let Some(e) = &c.error {
                let _ = writeln!(
                    s,
                    "| {} | {} | {e} | | | | | |",
                    mib_label(c.mem_mib),
                    c.peer
                );
                continue;
            }
            let mib = |f: &dyn Fn(&MemorySample) -> u64| {
                Summary::of(
                    &c.samples
                        .iter()
                        .map(|m| f(m) as f64 / 1024.0)
                        .collect::<Vec<_>>(),
                )
            };
            let (Some(a), Some(p), Some(v), Some(g), Some(t)) = (
                mib(&|m| m.overhead_kib()),
                mib(&|m| m.peak_overhead_kib()),
                mib(&|m| m.private_kib),
                mib(&|m| m.guest_rss_kib),
                mib(&|m| m.total_rss_kib),
            ) else {
                continue;
            };
            let mut r = String::new();
            if c.is_ember {
                // The other VMM with the least memory after boot, in the same guest.
                let best = self
                    .memory
                    .iter()
                    .filter(|q| !q.is_ember && !q.peer.ends_with("--no-seccomp"))
                    .filter(|q| q.error.is_none() && q.mem_mib == c.mem_mib)
                    .filter_map(|q| {
                        let after = Summary::of(
                            &q.samples
                                .iter()
                                .map(|m| m.overhead_kib() as f64 / 1024.0)
                                .collect::<Vec<_>>(),
                        )?;
                        Some((after.median, &q.peer))
                    })
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                if let Some((median, peer)) = best {
                    r = format!("**{}** ({peer})", ratio(a.median, median));
                }
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {r} |",
                mib_label(c.mem_mib),
                c.peer,
                a.fmt(2),
                p.fmt(2),
                v.fmt(2),
                g.fmt(2),
                t.fmt(2)
            );
        }
        let _ = writeln!(s);
    }

    fn rate_md(&self, s: &mut String) {
        if self.rate.is_empty() {
            return;
        }
        let cores = self.machine.as_ref().map(|m| m.cores).unwrap_or(1) as f64;
        let _ = writeln!(
            s,
            "### Creation rate (null guest, PVH, 1 vCPU, 128 MiB, booted to exit)\n"
        );
        let _ = writeln!(
            s,
            "Each of the concurrent workers boots null VMs one after another, starting another \
             until the level's time is up; VMs/s is the VMs booted over the wall time until the \
             last one ended, each process started, read and reaped by this harness (on the same \
             cores). Ratio: an Ember row's VMs/s over the best other VMM's at the same \
             concurrency (above 1: Ember is faster).\n"
        );
        let _ = writeln!(
            s,
            "| started concurrently | VMM | VMs | wall, s | VMs/s | VMs/s/core | × best peer |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for c in &self.rate {
            let rate = c.vms as f64 / c.seconds;
            let mut r = String::new();
            if c.is_ember {
                let best = self
                    .rate
                    .iter()
                    .filter(|q| !q.is_ember && !q.peer.ends_with("--no-seccomp"))
                    .filter(|q| q.concurrency == c.concurrency)
                    .max_by(|a, b| {
                        let (ra, rb) = (a.vms as f64 / a.seconds, b.vms as f64 / b.seconds);
                        ra.total_cmp(&rb)
                    });
                if let Some(q) = best {
                    r = format!("**{}** ({})", ratio(rate, q.vms as f64 / q.seconds), q.peer);
                }
            }
            let failed = if c.failed > 0 {
                format!(" ({} failed)", c.failed)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {}{failed} | {:.2} | {:.1} | {:.1} | {r} |",
                c.concurrency,
                c.peer,
                c.vms,
                c.seconds,
                rate,
                rate / cores
            );
        }
        let _ = writeln!(s);
    }

    fn exits_md(&self, s: &mut String) {
        if self.exits.cells.is_empty() {
            return;
        }
        // One TSC frequency for everyone: the guests share the host's TSC.
        let khz = self.exits.cells.iter().find_map(|c| c.tsc_khz);
        let _ = writeln!(
            s,
            "### Exit cost (probe `exitloop`: `out` to an unmapped port, 128 MiB, PVH)\n"
        );
        let _ = writeln!(
            s,
            "TSC cycles per exit measured by the guest, median (min–max) over the runs; ns and \
             exits/s from the TSC frequency {} (QEMU's guest is not told it).\n",
            khz.map(|k| format!("{k} kHz that Ember's guest reports"))
                .unwrap_or_else(|| "(unknown)".into())
        );
        let _ = writeln!(
            s,
            "| ring | VMM | exits per run | cycles/exit | ns/exit | exits/s | Ember/QEMU (cost) |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for c in &self.exits.cells {
            if let Some(e) = &c.error {
                let _ = writeln!(s, "| {} | {} | {e} | | | | |", c.ring, c.peer);
                continue;
            }
            let Some(cy) = Summary::of(&c.cycles) else {
                continue;
            };
            let (ns, eps) = match khz {
                Some(k) => {
                    let ns = cy.median * 1e6 / k as f64;
                    (format!("{ns:.0}"), format!("{:.0}", 1e9 / ns))
                }
                None => (String::new(), String::new()),
            };
            let mut r = String::new();
            if c.is_ember {
                if let Some(q) = self
                    .exits
                    .cells
                    .iter()
                    .find(|q| q.is_qemu && q.ring == c.ring)
                {
                    if let Some(qc) = Summary::of(&q.cycles) {
                        r = format!("**{}**", ratio(cy.median, qc.median));
                    }
                }
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {ns} | {eps} | {r} |",
                c.ring,
                c.peer,
                c.exits,
                cy.fmt(0)
            );
        }
        let _ = writeln!(s);
    }

    fn kvm_md(&self, s: &mut String) {
        if self.kvm.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "### KVM set-up ioctls, one by one (128 MiB guest, 1 vCPU)\n"
        );
        let _ = writeln!(
            s,
            "Median wall time in ms (median thread CPU time in parentheses) of each step, for \
             Ember's order and alternatives; *ready*: open → vCPU ready, *total*: open → VM destroyed, \
             wall, median (min–max).\n"
        );
        let mut names: Vec<&str> = Vec::new();
        for q in &self.kvm {
            for st in &q.steps {
                if !names.contains(&st.name) {
                    names.push(st.name);
                }
            }
        }
        let _ = write!(s, "| step |");
        for q in &self.kvm {
            let _ = write!(s, " {} |", q.name);
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|{}", "---|".repeat(self.kvm.len()));
        for n in names {
            let _ = write!(s, "| {n} |");
            for q in &self.kvm {
                match q.steps.iter().find(|st| st.name == n) {
                    Some(st) => {
                        let _ = write!(s, " {:.3} ({:.3}) |", st.wall.median, st.cpu.median);
                    }
                    None => {
                        let _ = write!(s, " – |");
                    }
                }
            }
            let _ = writeln!(s);
        }
        let _ = write!(s, "| **ready** (open → vCPU ready) |");
        for q in &self.kvm {
            let _ = write!(s, " **{}** |", q.ready.fmt(3));
        }
        let _ = writeln!(s);
        let _ = write!(s, "| **total** (open → VM destroyed) |");
        for q in &self.kvm {
            let _ = write!(s, " **{}** |", q.total.fmt(3));
        }
        let _ = writeln!(s, "\n");
    }
}

fn write_samples_csv(path: &Path, r: &Report) -> Result<(), String> {
    let mut s = String::from("scenario,vmm,run,first_line_ms,exit_ms\n");
    for c in &r.boot {
        for (i, (f, e)) in c.first_line.iter().zip(&c.exit).enumerate() {
            let _ = writeln!(s, "\"{}\",\"{}\",{i},{f:.3},{e:.3}", c.scenario, c.peer);
        }
    }
    std::fs::write(path, s).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads `boot-samples.csv` back (for `--plot CSV PNG`: redraw a saved run).
#[cfg(feature = "plot")]
fn read_samples_csv(path: &Path) -> Result<Vec<BootCell>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut cells: Vec<BootCell> = Vec::new();
    for line in text.lines().skip(1) {
        // "scenario","vmm",run,first_line_ms,exit_ms
        let q: Vec<&str> = line.split('"').collect();
        let (Some(scenario), Some(vmm), Some(rest)) = (q.get(1), q.get(3), q.get(4)) else {
            continue;
        };
        let nums: Vec<f64> = rest
            .split(',')
            .filter_map(|x| x.trim().parse().ok())
            .collect();
        let [_, first, exit] = nums[..] else { continue };
        let i = match cells
            .iter()
            .position(|c| c.scenario == *scenario && c.peer == *vmm)
        {
            Some(i) => i,
            None => {
                cells.push(BootCell {
                    scenario: scenario.to_string(),
                    key: (Protocol::Pvh, 1, 0),
                    peer: vmm.to_string(),
                    is_ember: *vmm == "Ember",
                    unsupported: None,
                    first_line: Vec::new(),
                    exit: Vec::new(),
                });
                cells.len() - 1
            }
        };
        cells[i].first_line.push(first);
        cells[i].exit.push(exit);
    }
    Ok(cells)
}

fn update_doc(root: &Path, md: &str, png: &Path) -> Result<(), String> {
    let doc = root.join("docs/performance.md");
    let text =
        std::fs::read_to_string(&doc).map_err(|e| format!("cannot read {}: {e}", doc.display()))?;
    let (Some(b), Some(e)) = (text.find(DOC_BEGIN), text.find(DOC_END)) else {
        return Err(format!(
            "{} has no `{DOC_BEGIN}` … `{DOC_END}` section",
            doc.display()
        ));
    };
    if e < b {
        return Err(format!(
            "{}: generated-section markers out of order",
            doc.display()
        ));
    }
    let new = format!("{}{DOC_BEGIN}\n\n{md}\n{}", &text[..b], &text[e..]);
    std::fs::write(&doc, new).map_err(|e| format!("cannot write {}: {e}", doc.display()))?;
    if png.exists() {
        let dst = root.join("docs/performance-boot.png");
        std::fs::copy(png, &dst)
            .map_err(|e| format!("cannot copy the plot to {}: {e}", dst.display()))?;
    }
    eprintln!("xtask bench: updated {}", doc.display());
    Ok(())
}

/// The release recipe's target: musl, statically linked, as Firecracker's release builds are.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The fallback where the musl target cannot be installed: glibc, statically linked.
const GLIBC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the release recipe (docs/performance.md): `ember` and `ember-quick` for musl (static
/// binaries with a small libc: 0.77 MiB less RSS than static glibc, measured), or, if the musl
/// target cannot be installed, statically linked against glibc. `--target` keeps the static
/// flags off the host's proc-macro builds. Returns `ember` (`ember-quick` is beside it).
fn build_release_ember(target_dir: &std::path::Path) -> Result<PathBuf, String> {
    let musl = std::process::Command::new("rustup")
        .args(["target", "add", MUSL_TARGET])
        .status()
        .is_ok_and(|s| s.success());
    // (target, environment variable, its value)
    let (target, var, value) = if musl {
        // C in the dependency tree (userfaultfd-sys's constants) is compiled with the host's
        // gcc: it calls nothing in the C library, and needs the kernel's headers, which
        // musl-gcc's include path does not have.
        (MUSL_TARGET, "CC_x86_64_unknown_linux_musl", "gcc")
    } else {
        eprintln!("xtask bench: the musl target is not available; building with static glibc");
        (GLIBC_TARGET, "RUSTFLAGS", "-C target-feature=+crt-static")
    };
    crate::run_cmd(
        crate::cargo()
            .args(["build", "--release", "--target", target])
            .args(["--bin", "ember", "--bin", "ember-quick"])
            .env(var, value),
    )?;
    Ok(target_dir.join(target).join("release/ember"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_parse() {
        let err = "ember: start-up guest memory        0.008 ms\n\
                   ember: start-up vm + irqchip        2.400 ms\n\
                   ember: boot timer: 18.899 ms after VMM start\n\
                   ember: first KVM_RUN 12.463 ms after VMM start\n";
        let v = parse_timings(err);
        assert_eq!(v[0], ("guest memory".to_string(), 0.008));
        assert_eq!(v[1], ("vm + irqchip".to_string(), 2.4));
        assert_eq!(v[2].1, 18.899);
        assert_eq!(v[3], ("main → first KVM_RUN".to_string(), 12.463));
    }

    #[test]
    fn probe_fields() {
        let l = "PROBE exitloop ok exits=10 cycles_per_exit=43778 tsc_khz=unknown";
        assert_eq!(field(l, "cycles_per_exit"), Some("43778"));
        assert_eq!(field(l, "tsc_khz"), Some("unknown"));
        let r = "PROBE ring0 ok native=no ring0_cycles_per_iter=1932.28 ring3_cycles_per_iter=0.77 ratio=2511.08";
        assert_eq!(parse_ring0(r), Some((false, 2511.08)));
    }
}
