//! `cargo xtask test`: builds the probe and runs the test suite, then prints how many tests
//! ran, passed, failed, were skipped at run time (and why) and were ignored.
//!
//! Tests that cannot run on this machine (no `/dev/kvm`, no QEMU, ring 0 emulated for a full
//! Linux boot) return early and so report `ok` to the test harness; they record the skip in the
//! file named by `EMBER_SKIP_LOG` (`test<TAB>reason` lines, see `ember_test_support::skip`),
//! which this command sets, so the summary counts them as skipped, not passed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::{cargo, ensure_packages, fuzz, guest, probe};

/// `cargo xtask test`.
#[derive(clap::Args)]
pub struct Args {
    /// Add the Linux tier (builds the guest kernel on first use: 5 to 15 minutes).
    #[arg(long)]
    pub linux: bool,
    /// Add a fuzz run of SECONDS per target.
    #[arg(long, value_name = "SECONDS")]
    pub fuzz: Option<u64>,
    /// Everything: the Linux tier and a fuzz run (30 s per target unless --fuzz says otherwise).
    #[arg(long)]
    pub all: bool,
    /// Run every test binary even when one fails (cargo test --no-fail-fast).
    #[arg(long)]
    pub no_fail_fast: bool,
}

/// Seconds per fuzz target that `--all` runs.
const ALL_FUZZ_SECONDS: u64 = 30;

/// Test counts summed over `cargo test` runs.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    /// Adds one libtest summary line (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(name), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match name {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs a `cargo test` command, echoing its output, and adds its test counts.
fn cargo_test(cmd: &mut Command, counts: &mut Counts) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading test output: {e}"))?;
        counts.add_line(&line);
        let _ = writeln!(out, "{line}");
    }
    drop(out);
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// The skips recorded in the skip log: reason → tests.
fn read_skips(log: &Path) -> BTreeMap<String, Vec<String>> {
    let mut by_reason: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let Some((test, reason)) = line.split_once('\t') {
            by_reason
                .entry(reason.to_string())
                .or_default()
                .push(test.to_string());
        }
    }
    by_reason
}

/// The summary lines printed at the end.
fn summary(counts: &Counts, skips: &BTreeMap<String, Vec<String>>) -> String {
    let skipped: u64 = skips.values().map(|t| t.len() as u64).sum();
    let ran = counts.passed + counts.failed;
    let mut s = format!(
        "xtask test: {ran} tests ran: {} passed, {} failed, {skipped} skipped at run time; {} ignored\n",
        counts.passed.saturating_sub(skipped),
        counts.failed,
        counts.ignored
    );
    for (reason, tests) in skips {
        s.push_str(&format!(
            "xtask test:   skipped {} ({reason}): {}\n",
            tests.len(),
            tests.join(", ")
        ));
    }
    s
}

/// Entry point of `cargo xtask test`.
pub fn run(args: &Args) -> Result<(), String> {
    let linux = args.all || args.linux;
    let fuzz_seconds = args.fuzz.or(args.all.then_some(ALL_FUZZ_SECONDS));
    print_machine();
    // The probe guest, and the peer VMM (QEMU) the comparison tests boot it under.
    probe::build()?;
    if let Err(e) = ensure_packages(&["libclang-dev"]) {
        eprintln!(
            "xtask: warning: cannot install libclang-dev ({e}): ember-vmm's uffd feature needs it"
        );
    }
    if let Err(e) = ensure_packages(&["qemu-system-x86", "e2fsprogs", "iproute2"]) {
        eprintln!("xtask: warning: could not install QEMU ({e}); the QEMU tests will skip");
    }
    let log = crate::target_dir().join("test-skips.log");
    std::fs::create_dir_all(crate::target_dir()).map_err(|e| e.to_string())?;
    std::fs::write(&log, "").map_err(|e| format!("{}: {e}", log.display()))?;
    let mut counts = Counts::default();
    let no_fail_fast: &[&str] = if args.no_fail_fast {
        &["--no-fail-fast"]
    } else {
        &[]
    };
    let mut result = cargo_test(
        cargo()
            .args(["test", "--workspace", "--all-targets"])
            .args(no_fail_fast)
            .env("EMBER_SKIP_LOG", &log),
        &mut counts,
    );
    if result.is_ok() || args.no_fail_fast {
        let doc = cargo_test(
            cargo()
                .args(["test", "--workspace", "--doc"])
                .env("EMBER_SKIP_LOG", &log),
            &mut counts,
        );
        result = result.and(doc);
    }
    if linux && (result.is_ok() || args.no_fail_fast) {
        // The Linux tier: our minimal kernel and Debian's cloud kernel, one test at a time
        // (each is a CPU-bound emulation of guest ring 0 on hosts like Ember's). Its tests are
        // `#[ignore]`d in the fast tier.
        guest::run(&guest::Args::default())?;
        guest::run(&guest::Args {
            debian_cloud: true,
            no_kernel: false,
        })?;
        let tier = cargo_test(
            cargo()
                .args(["test", "-p", "ember", "--test", "linux", "--"])
                .args(["--ignored", "--test-threads=1"])
                .env("EMBER_SKIP_LOG", &log),
            &mut counts,
        );
        // Those tests were counted as ignored by the fast tier and ran now.
        counts.ignored = counts.ignored.saturating_sub(LINUX_TIER_TESTS);
        result = result.and(tier);
    }
    eprint!("{}", summary(&counts, &read_skips(&log)));
    result?;
    if let Some(seconds) = fuzz_seconds {
        fuzz::run(&fuzz::Args {
            seconds,
            targets: Vec::new(),
        })?;
    }
    Ok(())
}

/// Number of `#[ignore]`d Linux-tier tests in `tests/linux.rs` (checked by a unit test).
const LINUX_TIER_TESTS: u64 = 9;

/// The CPU and kernel, first in every log (tests differ between Intel and AMD hosts).
fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    eprintln!(
        "xtask test: CPU {model}, {} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_libtest_lines() {
        let mut c = Counts::default();
        c.add_line("test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.66s");
        c.add_line(
            "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 5 filtered out",
        );
        c.add_line("running 4 tests");
        assert_eq!(
            c,
            Counts {
                passed: 15,
                failed: 1,
                ignored: 2
            }
        );
    }

    #[test]
    fn summary_subtracts_skips_from_passed() {
        let c = Counts {
            passed: 10,
            failed: 0,
            ignored: 9,
        };
        let mut skips = BTreeMap::new();
        skips.insert("no QEMU".to_string(), vec!["a".into(), "b".into()]);
        let s = summary(&c, &skips);
        assert!(
            s.starts_with(
                "xtask test: 10 tests ran: 8 passed, 0 failed, 2 skipped at run time; 9 ignored"
            ),
            "{s}"
        );
        assert!(s.contains("skipped 2 (no QEMU): a, b"), "{s}");
    }

    #[test]
    fn linux_tier_count_matches_the_test_file() {
        let src = std::fs::read_to_string(crate::workspace_root().join("tests/linux.rs")).unwrap();
        let ignored = src.matches("#[ignore = \"Linux tier").count() as u64;
        assert_eq!(ignored, LINUX_TIER_TESTS);
    }
}
