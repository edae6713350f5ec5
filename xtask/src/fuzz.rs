//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets under `fuzz/`
//! (nightly toolchain; installs cargo-fuzz if it is missing), each starting from its seed
//! corpus in `fuzz/seeds/<target>/` (committed, written by `tests/fuzz_seeds.rs`) plus what
//! earlier runs found in `fuzz/corpus/<target>/`. Fails on any crash; prints the executions and
//! coverage of every target at the end.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use crate::{run_cmd, workspace_root};

/// Every fuzz target, in the order they run.
pub const TARGETS: &[&str] = &[
    "loader_kernel",
    "loader_initrd",
    "pio_bus",
    "virtio_blk",
    "virtio_mmio",
    "virtio_net",
    "virtio_vsock",
    "virtio_balloon",
    "virtio_rng",
    "vm_config",
    "device_option",
    "api_request",
    "cpu_template",
    "cmdline",
    "snapshot_state",
    "fork_transfer",
];

/// The targets that run each input under one of the `ember` binary's seccomp filters
/// (`fuzz/src/lib.rs`), and which filter.
pub const FILTERED: &[(&str, &str)] = &[
    ("pio_bus", "vcpu"),
    ("virtio_blk", "vmm"),
    ("virtio_mmio", "vmm"),
    ("virtio_net", "vmm"),
    ("virtio_vsock", "vmm"),
    ("virtio_balloon", "vmm"),
    ("virtio_rng", "vmm"),
    ("api_request", "api"),
];

/// `cargo xtask fuzz`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

/// What libFuzzer reported at the end of one target's run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Report {
    execs: Option<u64>,
    execs_per_sec: Option<u64>,
    coverage: Option<u64>,
    features: Option<u64>,
    corpus: Option<u64>,
}

impl Report {
    /// Takes what it can from one line of libFuzzer's output: the status lines
    /// (`#1234 DONE cov: 56 ft: 78 corp: 9/100b ...`) and the final statistics
    /// (`stat::number_of_executed_units: 1234`, `stat::average_exec_per_sec: 99`).
    fn add_line(&mut self, line: &str) {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            self.execs = v.trim().parse().ok().or(self.execs);
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            self.execs_per_sec = v.trim().parse().ok().or(self.execs_per_sec);
        } else if line.starts_with('#') {
            let mut words = line.split_whitespace();
            let field = |words: &mut std::str::SplitWhitespace, key: &str| -> Option<u64> {
                let mut w = words.clone();
                while let Some(word) = w.next() {
                    if word == key {
                        let v = w.next()?;
                        return v.split('/').next()?.parse().ok();
                    }
                }
                None
            };
            if let Some(n) = words.next().and_then(|w| w[1..].parse().ok()) {
                self.execs = Some(n);
            }
            self.coverage = field(&mut words, "cov:").or(self.coverage);
            self.features = field(&mut words, "ft:").or(self.features);
            self.corpus = field(&mut words, "corp:").or(self.corpus);
        }
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Entry point of `cargo xtask fuzz`.
pub fn run(args: &Args) -> Result<(), String> {
    let targets: Vec<String> = if args.targets.is_empty() {
        TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        args.targets.clone()
    };
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_fuzz {
        run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = workspace_root().join("fuzz");
    // Build every target first, with cargo's progress shown.
    run_cmd(
        Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "build"]),
    )?;
    check_filters(&fuzz_dir, &targets)?;
    let mut reports = Vec::new();
    for t in &targets {
        let corpus = fuzz_dir.join("corpus").join(t);
        let seeds = fuzz_dir.join("seeds").join(t);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
        let seed_count = std::fs::read_dir(&seeds).map(|d| d.count()).unwrap_or(0);
        if seed_count == 0 {
            return Err(format!(
                "{} has no seeds (EMBER_UPDATE_SEEDS=1 cargo test --test fuzz_seeds writes them)",
                seeds.display()
            ));
        }
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", t])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-rss_limit_mb=4096")
            .arg("-print_final_stats=1")
            .stderr(Stdio::piped());
        eprintln!(
            "xtask fuzz: {t} for {} s from {seed_count} seeds",
            args.seconds
        );
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut report = Report::default();
        let mut err = std::io::stderr().lock();
        for line in BufReader::new(stderr).lines() {
            let line = line.map_err(|e| e.to_string())?;
            report.add_line(&line);
            let _ = writeln!(err, "{line}");
        }
        drop(err);
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!(
                "fuzz target {t} failed ({status}); the crashing input is in fuzz/artifacts/{t}/"
            ));
        }
        reports.push((t.clone(), seed_count, report));
    }
    eprintln!("xtask fuzz: {} s per target", args.seconds);
    eprintln!(
        "xtask fuzz: {:<15} {:>6} {:>10} {:>8} {:>6} {:>7} {:>7}",
        "target", "seeds", "execs", "execs/s", "cov", "ft", "corpus"
    );
    for (t, seeds, r) in &reports {
        eprintln!(
            "xtask fuzz: {:<15} {:>6} {:>10} {:>8} {:>6} {:>7} {:>7}",
            t,
            seeds,
            opt(r.execs),
            opt(r.execs_per_sec),
            opt(r.coverage),
            opt(r.features),
            opt(r.corpus)
        );
    }
    Ok(())
}

/// Shows that the filtered targets really run under their filter: with
/// `EMBER_FUZZ_SECCOMP_SELFTEST=1` each makes a `socket(AF_INET)` call (number 41, allowed by
/// no filter) before its first input and must fail naming it.
fn check_filters(fuzz_dir: &std::path::Path, targets: &[String]) -> Result<(), String> {
    let scratch = std::env::temp_dir().join(format!("ember-fuzz-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let mut checked = 0;
    for &(t, filter) in FILTERED
        .iter()
        .filter(|(t, _)| targets.iter().any(|x| x == t))
    {
        let out = Command::new("cargo")
            .current_dir(fuzz_dir)
            .args(["+nightly", "fuzz", "run", t])
            .arg(fuzz_dir.join("seeds").join(t))
            .arg("--")
            .arg("-runs=1")
            .arg(format!("-artifact_prefix={}/", scratch.display()))
            .env("EMBER_FUZZ_SECCOMP_SELFTEST", "1")
            .output()
            .map_err(|e| format!("cannot run the {t} fuzz target: {e}"))?;
        let text = String::from_utf8_lossy(&out.stderr);
        let want = format!("under the {filter} filter this input made system call 41");
        if out.status.success() || !text.contains(&want) {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(format!(
                "fuzz target {t}: a blocked system call on its {filter}-filtered thread did not \
                 fail it as it must ({}):\n{text}",
                out.status
            ));
        }
        checked += 1;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "xtask fuzz: {checked} targets run their input under the ember binary's seccomp \
         filters; each failed on a blocked call, as it must"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_libfuzzer_lines() {
        let mut r = Report::default();
        r.add_line("#2	INITED cov: 101 ft: 102 corp: 1/1b exec/s: 0 rss: 30Mb");
        r.add_line(
            "#524288	pulse  cov: 180 ft: 400 corp: 33/2190b lim: 4096 exec/s: 26214 rss: 60Mb",
        );
        r.add_line(
            "#1000000	DONE   cov: 185 ft: 420 corp: 35/2300b lim: 4096 exec/s: 33333 rss: 61Mb",
        );
        r.add_line("stat::number_of_executed_units: 1000001");
        r.add_line("stat::average_exec_per_sec:     33333");
        assert_eq!(
            r,
            Report {
                execs: Some(1_000_001),
                execs_per_sec: Some(33333),
                coverage: Some(185),
                features: Some(420),
                corpus: Some(35),
            }
        );
    }

    #[test]
    fn the_filtered_targets_use_their_filter() {
        let fuzz = workspace_root().join("fuzz");
        let lib = std::fs::read_to_string(fuzz.join("src/lib.rs")).unwrap();
        let helper = &lib[lib.find("pub fn run_virtio_device").unwrap()..];
        assert!(helper.contains("filtered(\"vmm\")"), "{helper}");
        for (t, filter) in FILTERED {
            assert!(TARGETS.contains(t), "{t}");
            let src = std::fs::read_to_string(fuzz.join(format!("fuzz_targets/{t}.rs"))).unwrap();
            // Directly, or through the virtio-device helper, which runs under `vmm`.
            let direct = src.contains(&format!("ember_fuzz::filtered(\"{filter}\")"));
            let helper = *filter == "vmm" && src.contains("ember_fuzz::run_virtio_device(");
            assert!(
                direct || helper,
                "{t} does not run under the {filter} filter"
            );
        }
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let fuzz = workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                fuzz.join(format!("fuzz_targets/{t}.rs")).is_file(),
                "{t} has no source"
            );
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} not in Cargo.toml"
            );
            let seeds = std::fs::read_dir(fuzz.join("seeds").join(t))
                .map(|d| d.count())
                .unwrap_or(0);
            assert!(seeds > 0, "{t} has no seed corpus");
        }
    }
}
