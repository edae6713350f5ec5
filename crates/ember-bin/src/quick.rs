//! Quick boot: a VM configured from flags, run on the serial console until it ends, its
//! outcome turned into the process's exit status. `ember` and `ember-quick` both boot this
//! way.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use ember_vmm::{BootProtocolChoice, Vm, VmBuilder, VmConfig, VmExit};

use crate::console::RawTerminal;
use crate::seccomp;
use crate::signals::{install_stop_signals, STOP_FD, STOP_SIGNAL};

/// The flags that configure a quick-boot VM, as given (unparsed device specs, unset fields
/// left to the base configuration or the defaults).
#[derive(Debug, Clone, Default)]
pub struct VmFlags {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--memory-mib`.
    pub memory_mib: Option<u64>,
    /// `--vcpus`.
    pub vcpus: Option<u8>,
    /// `--disk`, each a [`DiskConfig`](ember_vmm::DiskConfig) spec.
    pub disks: Vec<String>,
    /// `--net`, each a [`NetConfig`](ember_vmm::NetConfig) spec.
    pub nets: Vec<String>,
    /// `--vsock`.
    pub vsock: Option<String>,
    /// `--rng` (an empty spec: no rate limit).
    pub rng: Option<String>,
    /// `--balloon`.
    pub balloon: Option<String>,
    /// `--pit`.
    pub pit: bool,
    /// `--no-acpi`.
    pub no_acpi: bool,
    /// `--cpu-template`.
    pub cpu_template: Option<String>,
    /// `--boot-protocol`: `pvh` or `linux64`.
    pub boot_protocol: Option<String>,
}

impl VmFlags {
    /// Whether any of the flags is given.
    pub fn any(&self) -> bool {
        self.kernel.is_some()
            || self.initrd.is_some()
            || self.cmdline.is_some()
            || self.memory_mib.is_some()
            || self.vcpus.is_some()
            || !self.disks.is_empty()
            || !self.nets.is_empty()
            || self.vsock.is_some()
            || self.rng.is_some()
            || self.balloon.is_some()
            || self.pit
            || self.no_acpi
            || self.cpu_template.is_some()
            || self.boot_protocol.is_some()
    }

    /// The configuration: `base` (from a config file), or a new one for `--kernel`, with the
    /// flags laid over it, validated.
    pub fn config(&self, base: Option<VmConfig>) -> Result<VmConfig, String> {
        let mut config = match (base, &self.kernel) {
            (Some(c), _) => c,
            (None, Some(kernel)) => VmConfig::new(kernel),
            (None, None) => return Err("give --kernel".into()),
        };
        if let Some(k) = &self.kernel {
            config.kernel = k.clone();
        }
        if let Some(i) = &self.initrd {
            config.initrd = Some(i.clone());
        }
        if let Some(c) = &self.cmdline {
            config.cmdline = c.clone();
        }
        if let Some(m) = self.memory_mib {
            config.memory_mib = m;
        }
        if let Some(v) = self.vcpus {
            config.vcpus = v;
        }
        let parse_err = |e: ember_vmm::ConfigError| e.to_string();
        for d in &self.disks {
            config.disks.push(d.parse().map_err(parse_err)?);
        }
        for n in &self.nets {
            config.nets.push(n.parse().map_err(parse_err)?);
        }
        if let Some(v) = &self.vsock {
            config.vsock = Some(v.parse().map_err(parse_err)?);
        }
        if let Some(r) = &self.rng {
            config.rng = Some(r.parse().map_err(parse_err)?);
        }
        if let Some(b) = &self.balloon {
            config.balloon = Some(b.parse().map_err(parse_err)?);
        }
        if self.pit {
            config.pit = true;
        }
        if self.no_acpi {
            config.acpi = false;
        }
        if let Some(t) = &self.cpu_template {
            config.cpu_template = Some(t.clone());
        }
        match self.boot_protocol.as_deref() {
            None => {}
            Some("pvh") => config.boot_protocol = Some(BootProtocolChoice::Pvh),
            Some("linux64") => config.boot_protocol = Some(BootProtocolChoice::Linux64),
            Some(other) => {
                return Err(format!(
                    "--boot-protocol {other}: expected \"pvh\" or \"linux64\""
                ))
            }
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

/// How a quick-boot VM is run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print the start-up phases and the first `KVM_RUN` on stderr (`--timings`).
    pub timings: bool,
    /// The seccomp filters each thread enters.
    pub seccomp: seccomp::Setup,
}

/// Builds the VM with the serial console on stdin and stdout and the seccomp filters in
/// place, calls `on_built` with it (to start a thread that needs its handle), runs it until it
/// ends or a stop signal comes, and returns the exit status: 0 for a reset, poweroff or the
/// console escape, 1 for any other end, 2 when the VM cannot be built, 128 + the signal.
///
/// Once per process: the stop signals act on one VM, and the signal that stopped it is not
/// reset.
pub fn run(builder: VmBuilder, opts: &RunOptions, on_built: impl FnOnce(&Vm)) -> ExitCode {
    let name = crate::program_name();
    let stdin = std::io::stdin();
    // SAFETY: isatty only inspects the descriptor.
    let terminal = unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
    let mut builder = builder
        .console_escape(terminal)
        .thread_hook(opts.seccomp.hook("main"));
    match stdin.as_fd().try_clone_to_owned() {
        Ok(fd) => builder = builder.serial_input(fd),
        Err(e) => eprintln!("{name}: warning: stdin is not read ({e})"),
    }
    let vm = match builder.build() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            return ExitCode::from(2);
        }
    };
    if opts.timings {
        for (phase, d) in &vm.timings().phases {
            eprintln!(
                "{name}: start-up {phase:<15} {:>9.3} ms",
                d.as_secs_f64() * 1e3
            );
        }
    }
    STOP_FD.store(vm.handle().stop_fd(), Ordering::SeqCst);
    install_stop_signals();
    on_built(&vm);
    let outcome = {
        let _raw = RawTerminal::enable(stdin.as_raw_fd());
        vm.run()
    };
    STOP_FD.store(-1, Ordering::SeqCst);
    let signal = STOP_SIGNAL.load(Ordering::SeqCst);
    match outcome {
        Ok(outcome) => {
            if let Some(t) = outcome.boot_time {
                eprintln!(
                    "{name}: boot timer: {:.3} ms after VMM start",
                    t.as_secs_f64() * 1e3
                );
            }
            if opts.timings {
                if let Some(t) = outcome.first_run {
                    eprintln!(
                        "{name}: first KVM_RUN {:.3} ms after VMM start",
                        t.as_secs_f64() * 1e3
                    );
                }
            }
            if outcome.console_dropped > 0 {
                eprintln!(
                    "{name}: {} bytes of guest console output could not be written",
                    outcome.console_dropped
                );
            }
            if signal != 0 {
                eprintln!("{name}: stopped by signal {signal}");
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "only SIGTERM, SIGINT or SIGHUP (1..=15) are stored in STOP_SIGNAL"
                )]
                let signal = signal as u8;
                return ExitCode::from(128u8.wrapping_add(signal));
            }
            if outcome.exit.is_clean() || outcome.exit == VmExit::ConsoleEscape {
                eprintln!("{name}: {}", outcome.exit);
                ExitCode::SUCCESS
            } else {
                eprintln!("{name}: VM ended: {}", outcome.exit);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{name}: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Ends the process with `code` (after [`ember_vmm::exit_process`]'s deferred teardown):
/// what a binary's `main` does with the status its run returned.
pub fn exit(code: ExitCode) -> ! {
    // ExitCode has no accessor for its value: find the byte it was made from.
    let byte = (0..=u8::MAX)
        .find(|&b| ExitCode::from(b) == code)
        .unwrap_or(1);
    ember_vmm::exit_process(byte)
}
