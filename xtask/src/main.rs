//! Ember's task runner: `cargo xtask <command>`.
//!
//! - `probe`: build the probe guest (`target/probe/probe.elf`).
//! - `guest [--debian-cloud]`: prepare the Linux guest (minimal kernel + busybox initramfs).
//! - `demo [--linux]`: build and boot the default guest (the probe, or Linux) with the
//!   reference VMM, `examples/microvm.rs`.
//! - `test [--linux] [--fuzz SECONDS] [--all]`: build the probe and run the test suite; `--linux`
//!   adds the Linux tier, `--fuzz` a fuzz run of every target, `--all` both (60 s per target).
//! - `fuzz [--seconds N] [TARGET]`: run the cargo-fuzz targets (nightly).

mod bench;
mod fuzz;
mod guest;
mod probe;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: cargo xtask <probe|guest|demo|test|fuzz> [args]");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "probe" => probe::run(rest),
        "bench" => bench::run(rest),
        "guest" => guest::run(rest),
        "demo" => demo(rest),
        "test" => test(rest),
        "fuzz" => fuzz::run(rest),
        other => Err(format!("unknown xtask command `{other}`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {cmd}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Runs a command, failing with its description if it does not succeed.
pub fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Installs Debian packages that are missing (as root, with apt-get), best effort.
pub fn ensure_packages(packages: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {missing:?}");
    let _ = Command::new("apt-get").arg("update").arg("-qq").status();
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn demo(args: &[String]) -> Result<(), String> {
    let root = workspace_root();
    if args.iter().any(|a| a == "--linux") {
        guest::run(&[])?;
        let dir = guest::guest_dir();
        return run_cmd(
            cargo()
                .args(["run", "--release", "--quiet", "--example", "microvm", "--"])
                .arg("--kernel")
                .arg(dir.join("vmlinux"))
                .arg("--initrd")
                .arg(dir.join("initramfs.cpio"))
                .args(["--memory-mib", "256", "--cmdline"])
                .arg(format!(
                    "{} {}",
                    guest::DEMO_CMDLINE,
                    guest::HOST_COMPAT_ARGS
                )),
        );
    }
    probe::run(&[])?;
    run_cmd(
        cargo()
            .args(["run", "--release", "--quiet", "--example", "microvm", "--"])
            .arg("--kernel")
            .arg(root.join("target/probe/probe.elf"))
            .args([
                "--timings",
                "--vcpus",
                "2",
                "--cmdline",
                "probe=memmap,cmdline,boottimer,serial,acpi,smp,cpuid,exitloop,ring0,reset",
            ]),
    )
}

fn test(args: &[String]) -> Result<(), String> {
    let all = args.iter().any(|a| a == "--all");
    let linux = all || args.iter().any(|a| a == "--linux");
    let fuzz_seconds = match args.iter().position(|a| a == "--fuzz") {
        Some(i) => Some(
            args.get(i + 1)
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("--fuzz takes a number of seconds")?,
        ),
        None if all => Some(60),
        None => None,
    };
    // The probe guest, and the peer VMM (QEMU) the comparison tests boot it under.
    probe::run(&[])?;
    if let Err(e) = ensure_packages(&["qemu-system-x86", "e2fsprogs"]) {
        eprintln!("xtask: warning: could not install QEMU ({e}); the QEMU tests will skip");
    }
    run_cmd(cargo().args(["test", "--workspace", "--all-targets"]))?;
    run_cmd(cargo().args(["test", "--workspace", "--doc"]))?;
    if linux {
        // The Linux tier: our minimal kernel and Debian's cloud kernel, one test at a time
        // (each is a CPU-bound emulation of guest ring 0 on hosts like Ember's).
        guest::run(&[])?;
        guest::run(&["--debian-cloud".to_string()])?;
        run_cmd(
            cargo()
                .args([
                    "test",
                    "-p",
                    "ember",
                    "--test",
                    "linux",
                    "--",
                    "--test-threads=1",
                ])
                .env("EMBER_LINUX_TESTS", "1"),
        )?;
    }
    if let Some(secs) = fuzz_seconds {
        fuzz::run(&["--seconds".to_string(), secs.to_string()])?;
    }
    Ok(())
}
