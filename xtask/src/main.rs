//! Ember's task runner: `cargo xtask <command>` (`cargo xtask --help` lists the commands,
//! `cargo xtask <command> --help` their options).
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a task runner measuring and formatting known-size values"
)]

mod bench;
mod disk;
mod fuzz;
mod guest;
mod probe;
mod test;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Ember's task runner: guests, demo, tests, fuzzing, benchmarks",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the probe guest (target/probe/probe.elf).
    Probe(probe::Args),
    /// Prepare the Linux guest: a minimal 6.1 kernel and a busybox initramfs.
    Guest(guest::Args),
    /// Build the guest and boot it with the `ember` VMM (the probe, or Linux).
    Demo(DemoArgs),
    /// Build the probe and run the tests (unit, probe boots, QEMU side by side; more with flags).
    Test(test::Args),
    /// Run the cargo-fuzz targets (nightly), each from its seed corpus.
    Fuzz(fuzz::Args),
    /// Benchmark Ember against QEMU (and Firecracker, Cloud Hypervisor when given).
    Bench(bench::Args),
    /// Write a raw disk image for the examples (zeros, or the probe's blk pattern).
    Disk(disk::Args),
}

/// `cargo xtask demo`.
#[derive(clap::Args)]
struct DemoArgs {
    /// Boot the Linux guest instead of the probe (builds it first: minutes, once).
    #[arg(long)]
    linux: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (name, result) = match &cli.command {
        Cmd::Probe(a) => ("probe", probe::run(a)),
        Cmd::Guest(a) => ("guest", guest::run(a)),
        Cmd::Demo(a) => ("demo", demo(a)),
        Cmd::Test(a) => ("test", test::run(a)),
        Cmd::Fuzz(a) => ("fuzz", fuzz::run(a)),
        Cmd::Bench(a) => ("bench", bench::run(a)),
        Cmd::Disk(a) => ("disk", disk::run(a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {name}: error: {e}");
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

/// `cargo` (the one running this xtask), in the workspace root.
pub fn cargo() -> Command {
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

/// Builds the `ember` binary (release) with cargo's progress shown, and returns its path.
pub fn build_ember() -> Result<PathBuf, String> {
    // The userfaultfd crate (ember-vmm's `uffd` feature) generates its bindings with libclang.
    if let Err(e) = ensure_packages(&["libclang-dev"]) {
        eprintln!("xtask: warning: cannot install libclang-dev ({e}); the build may fail");
    }
    eprintln!("xtask: building the ember VMM (release; the first build takes a minute or two)");
    run_cmd(cargo().args(["build", "--release", "--bin", "ember"]))?;
    Ok(target_dir().join("release/ember"))
}

/// Cargo's target directory (`$CARGO_TARGET_DIR`, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_relative() => root.join(dir),
        Some(dir) => dir,
        None => root.join("target"),
    }
}

fn demo(args: &DemoArgs) -> Result<(), String> {
    if args.linux {
        guest::run(&guest::Args::default())?;
        let ember = build_ember()?;
        let dir = guest::guest_dir();
        let ring0_emulated = guest::host_emulates_ring0(&ember)?;
        if ring0_emulated {
            eprintln!("{}", guest::RING0_EMULATED_NOTE);
        }
        let result = run_cmd(
            Command::new(&ember)
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
        if result.is_err() && ring0_emulated {
            eprintln!("{}", guest::RING0_EMULATED_NOTE);
            return Ok(());
        }
        return result;
    }
    eprintln!("xtask demo: building the probe guest");
    let probe = probe::build()?;
    let ember = build_ember()?;
    eprintln!("xtask demo: booting the probe in an Ember microVM (2 vCPUs)");
    run_cmd(Command::new(ember).arg("--kernel").arg(probe).args([
        "--timings",
        "--vcpus",
        "2",
        "--cmdline",
        "probe=memmap,cmdline,boottimer,serial,acpi,smp,cpuid,exitloop,ring0,reset",
    ]))
}
