//! `ember-quick`: Ember's quick-boot VMM, built small. It boots a microVM from flags (the same
//! quick-boot flags as `ember`'s) and nothing else: no Firecracker mode, no JSON
//! configuration file, no snapshots. Its flags are parsed with lexopt rather than clap, and
//! neither the API server nor clap is linked in, so that each process maps less of its binary
//! (see docs/performance.md, *Where Ember's RSS goes*).
//!
//! ```text
//! cargo run --release --bin ember-quick -- --kernel target/probe/probe.elf --cmdline "probe=memmap,serial"
//! ```
//!
//! Exit statuses as `ember`'s: 0 for the guest's reset or poweroff (or Ctrl-A x), 1 for any
//! other end of the VM, 2 for a bad argument or configuration, 128 + the signal for SIGTERM,
//! SIGINT or SIGHUP, 148 for a system call the seccomp filters block.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use ember_bin::quick::{self, VmFlags};
use ember_bin::seccomp;

const HELP: &str = "\
Boot a microVM with Ember (quick boot only; `ember` has Firecracker mode, --config and snapshots)

Usage: ember-quick --kernel FILE [OPTIONS]

Options:
      --kernel FILE          Kernel image: an ELF vmlinux (with or without a PVH note) or a bzImage
      --initrd FILE          Initramfs image
      --cmdline STRING       Kernel command line [default: \"console=ttyS0 reboot=k panic=1\"]
      --memory-mib MIB       Guest memory in MiB, at least 16 [default: 128]
      --vcpus N              Number of vCPUs, 1 to 32 [default: 1]
      --disk SPEC            A virtio-blk disk (repeatable):
                             PATH[,ro][,id=SERIAL][,bw=SIZE/REFILL_MS[/BURST]][,ops=SIZE/REFILL_MS[/BURST]]
      --net SPEC             A virtio-net interface on an existing TAP device (repeatable):
                             tap=NAME[,mac=MAC][,id=ID][,mtu=N][,offload=on|off][,rx_bw=..][,tx_bw=..]
      --vsock cid=N,uds=PATH A virtio-vsock device (Firecracker's host-side protocol)
      --rng[=SPEC]           A virtio-rng entropy device: [bw=SIZE/REFILL_MS][,ops=SIZE/REFILL_MS]
      --balloon SPEC         A virtio-balloon device:
                             mib=N[,stats=SECS][,deflate-on-oom][,free-page-reporting]
      --pit                  Create the legacy i8254 PIT
      --no-acpi              Do not write ACPI tables
      --cpu-template NAME    host, minimal, emulated-ring0, or a JSON template file [default: host]
      --boot-protocol NAME   pvh or linux64 [default: PVH when the kernel offers it, else linux64]
      --timings              Print the VMM's start-up phases on stderr
      --no-seccomp           Run without seccomp filters (a warning is printed)
      --seccomp-filter FILE  Seccomp filters compiled by Firecracker's seccompiler-bin
  -h, --help                 Print help
  -V, --version              Print version

The guest's serial console is stdin and stdout. On a terminal, Ctrl-A x ends the VM (Ctrl-A
Ctrl-A sends a Ctrl-A).

The guest's reset or poweroff ends ember-quick with status 0 (so does Ctrl-A x); an emulation
failure, triple fault or guest panic with status 1; a bad argument or configuration with
status 2; SIGTERM, SIGINT or SIGHUP stop the VM (status 128 + the signal).
";

/// The parsed command line.
#[derive(Debug, Default)]
struct Args {
    vm: VmFlags,
    timings: bool,
    no_seccomp: bool,
    seccomp_filter: Option<PathBuf>,
    seccomp_test_blocked: Option<String>,
}

/// What the command line asks for.
enum Parsed {
    Boot(Box<Args>),
    Help,
    Version,
}

fn string(value: OsString, flag: &str) -> Result<String, String> {
    value
        .into_string()
        .map_err(|v| format!("{flag}: not valid UTF-8: {}", v.to_string_lossy()))
}

fn number<T: std::str::FromStr>(value: OsString, flag: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let s = string(value, flag)?;
    s.parse().map_err(|e| format!("{flag} {s}: {e}"))
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut a = Args::default();
    let err = |e: lexopt::Error| e.to_string();
    // As clap does for `ember`: a flag that takes one value is given once.
    let mut seen: Vec<String> = Vec::new();
    while let Some(arg) = parser.next().map_err(err)? {
        if let Long(name) = arg {
            if !matches!(name, "disk" | "net") {
                if seen.iter().any(|s| s == name) {
                    return Err(format!("--{name} is given more than once"));
                }
                seen.push(name.to_string());
            }
        }
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Long("kernel") => a.vm.kernel = Some(parser.value().map_err(err)?.into()),
            Long("initrd") => a.vm.initrd = Some(parser.value().map_err(err)?.into()),
            Long("cmdline") => {
                a.vm.cmdline = Some(string(parser.value().map_err(err)?, "--cmdline")?)
            }
            Long("memory-mib") => {
                a.vm.memory_mib = Some(number(parser.value().map_err(err)?, "--memory-mib")?)
            }
            Long("vcpus") => {
                let n: u8 = number(parser.value().map_err(err)?, "--vcpus")?;
                if n == 0 || n > ember_vmm::MAX_VCPUS {
                    return Err(format!(
                        "--vcpus {n}: expected 1 to {}",
                        ember_vmm::MAX_VCPUS
                    ));
                }
                a.vm.vcpus = Some(n);
            }
            Long("disk") => {
                a.vm.disks
                    .push(string(parser.value().map_err(err)?, "--disk")?)
            }
            Long("net") => {
                a.vm.nets
                    .push(string(parser.value().map_err(err)?, "--net")?)
            }
            Long("vsock") => a.vm.vsock = Some(string(parser.value().map_err(err)?, "--vsock")?),
            // `--rng`, `--rng=SPEC` or `--rng SPEC` (a next word that is not a flag), as
            // `ember` takes it.
            Long("rng") => {
                let value = match parser.optional_value() {
                    Some(v) => Some(v),
                    None => parser
                        .raw_args()
                        .map_err(err)?
                        .next_if(|w| !w.to_string_lossy().starts_with('-')),
                };
                a.vm.rng = Some(match value {
                    Some(v) => string(v, "--rng")?,
                    None => String::new(),
                })
            }
            Long("balloon") => {
                a.vm.balloon = Some(string(parser.value().map_err(err)?, "--balloon")?)
            }
            Long("pit") => a.vm.pit = true,
            Long("no-acpi") => a.vm.no_acpi = true,
            Long("cpu-template") => {
                a.vm.cpu_template = Some(string(parser.value().map_err(err)?, "--cpu-template")?)
            }
            Long("boot-protocol") => {
                a.vm.boot_protocol = Some(string(parser.value().map_err(err)?, "--boot-protocol")?)
            }
            Long("timings") => a.timings = true,
            Long("no-seccomp") => a.no_seccomp = true,
            Long("seccomp-filter") => a.seccomp_filter = Some(parser.value().map_err(err)?.into()),
            // Test hook, as `ember`'s: the given thread makes a blocked system call.
            Long("seccomp-test-blocked") => {
                a.seccomp_test_blocked = Some(string(
                    parser.value().map_err(err)?,
                    "--seccomp-test-blocked",
                )?)
            }
            _ => return Err(format!("{} (see --help)", err(arg.unexpected()))),
        }
    }
    if a.no_seccomp && a.seccomp_filter.is_some() {
        return Err("--no-seccomp and --seccomp-filter do not go together".into());
    }
    Ok(Parsed::Boot(Box::new(a)))
}

fn main() {
    let _ = ember_vmm::process_start();
    ember_bin::set_program_name("ember-quick");
    // One VM per process: its KVM VM is closed after the exit status is reported.
    ember_vmm::defer_teardown_to_exit();
    quick::exit(run())
}

fn run() -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("ember-quick: error: {e}");
        ExitCode::from(2)
    };
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Boot(a)) => a,
        // A closed stdout is not an error worth a panic.
        Ok(Parsed::Help) => {
            let _ = std::io::stdout().write_all(HELP.as_bytes());
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            let _ = writeln!(
                std::io::stdout(),
                "ember-quick {}",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e),
    };
    let config = match args.vm.config(None) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let seccomp = match seccomp::Setup::from_flags(
        args.no_seccomp,
        args.seccomp_filter.as_deref(),
        args.seccomp_test_blocked.as_deref(),
    ) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let opts = quick::RunOptions {
        timings: args.timings,
        seccomp,
    };
    quick::run(ember_vmm::Vm::builder(config), &opts, |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(args: &[&str]) -> Result<Args, String> {
        match parse(args.iter().map(OsString::from))? {
            Parsed::Boot(a) => Ok(*a),
            _ => Err("not a boot".into()),
        }
    }

    #[test]
    fn flags_fill_the_vm_flags() {
        let a = boot(&[
            "--kernel",
            "k",
            "--cmdline",
            "x y",
            "--memory-mib",
            "256",
            "--vcpus",
            "2",
            "--disk",
            "d.img,ro",
            "--disk",
            "e.img",
            "--rng",
            "--pit",
            "--boot-protocol=linux64",
            "--timings",
            "--no-seccomp",
        ])
        .unwrap();
        assert_eq!(a.vm.kernel, Some(PathBuf::from("k")));
        assert_eq!(a.vm.cmdline.as_deref(), Some("x y"));
        assert_eq!(a.vm.memory_mib, Some(256));
        assert_eq!(a.vm.vcpus, Some(2));
        assert_eq!(a.vm.disks, ["d.img,ro", "e.img"]);
        assert_eq!(a.vm.rng.as_deref(), Some(""));
        assert!(a.vm.pit && a.timings && a.no_seccomp);
        assert_eq!(a.vm.boot_protocol.as_deref(), Some("linux64"));
        assert_eq!(
            boot(&["--rng=ops=10/100"]).unwrap().vm.rng.as_deref(),
            Some("ops=10/100")
        );
        let a = boot(&["--rng", "bw=1M/100", "--pit"]).unwrap();
        assert_eq!(a.vm.rng.as_deref(), Some("bw=1M/100"));
        assert!(a.vm.pit);
        assert_eq!(
            boot(&["--rng", "--pit"]).unwrap().vm.rng.as_deref(),
            Some("")
        );
        assert!(boot(&["--rng", "--nope"]).unwrap_err().contains("--nope"));
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        let e = |args: &[&str]| boot(args).unwrap_err();
        assert!(e(&["--vcpus", "0"]).contains("expected 1 to"));
        assert!(e(&["--vcpus", "33"]).contains("expected 1 to"));
        assert!(e(&["--memory-mib", "lots"]).contains("--memory-mib lots"));
        assert!(e(&["--kernel"]).contains("missing argument"));
        assert!(e(&["--config", "vm.json"]).contains("--config"));
        assert!(e(&["stray"]).contains("stray"));
        assert!(e(&["--no-seccomp", "--seccomp-filter", "f"]).contains("do not go together"));
        assert!(e(&["--kernel", "a", "--kernel", "b"]).contains("--kernel is given more than once"));
        assert!(e(&["--pit", "--pit"]).contains("--pit is given more than once"));
        assert_eq!(
            boot(&["--disk", "a", "--disk", "b"])
                .unwrap()
                .vm
                .disks
                .len(),
            2
        );
        assert!(matches!(parse([OsString::from("-h")]), Ok(Parsed::Help)));
    }
}
