//! `ember`: Ember's reference VMM binary, booting a microVM from flags or a JSON config.
//!
//! ```text
//! cargo run --release --bin ember -- --kernel target/probe/probe.elf --cmdline "probe=memmap,serial"
//! ```
//!
//! Stdin feeds the serial console (raw mode when it is a terminal, restored on every exit
//! path); the guest's reset or poweroff ends the process with status 0; an emulation failure,
//! triple fault or guest panic ends it with status 1 and a message on stderr.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use clap::Parser;
use ember_vmm::{BootProtocolChoice, Vm, VmConfig, VmExit};

#[derive(Parser, Debug)]
#[command(
    name = "ember",
    version,
    about = "Boot a microVM with Ember",
    after_help = "The guest's serial console is stdin and stdout. On a terminal, Ctrl-A x ends \
                  the VM (Ctrl-A Ctrl-A sends a Ctrl-A).\n\n\
                  The guest's reset or poweroff ends ember with status 0 (so does Ctrl-A x); an \
                  emulation failure, triple fault or guest panic with status 1; a bad argument or \
                  configuration with status 2; SIGTERM, SIGINT or SIGHUP stop the VM (status 128 + \
                  the signal)."
)]
struct Args {
    /// Kernel image: an ELF vmlinux (with or without a PVH note) or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs image.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB, at least 16 [default: 128].
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// Number of vCPUs, 1 to 32 [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=i64::from(ember_vmm::MAX_VCPUS)))]
    vcpus: Option<u8>,
    /// A virtio-blk disk (repeatable). `bw` and `ops` limit bytes and requests with a token
    /// bucket: SIZE tokens refilled every REFILL_MS milliseconds, plus a one-time BURST.
    #[arg(
        long = "disk",
        value_name = "PATH[,ro][,id=SERIAL][,bw=SIZE/REFILL_MS[/BURST]][,ops=SIZE/REFILL_MS[/BURST]]"
    )]
    disks: Vec<String>,
    /// A virtio-net interface on an existing TAP device (repeatable). The MAC defaults to one
    /// derived from the TAP name; `rx_bw`, `rx_ops`, `tx_bw`, `tx_ops` are token buckets as on
    /// --disk.
    #[arg(
        long = "net",
        value_name = "tap=NAME[,mac=MAC][,id=ID][,mtu=N][,offload=on|off][,rx_bw=..][,tx_bw=..]"
    )]
    nets: Vec<String>,
    /// A virtio-vsock device: guest CID N (3 or above), host side on the Unix socket PATH
    /// (Firecracker's protocol: connect, write `CONNECT <port>\n`).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<String>,
    /// A virtio-rng entropy device, optionally rate limited.
    #[arg(long, value_name = "[bw=SIZE/REFILL_MS][,ops=SIZE/REFILL_MS]", num_args = 0..=1, default_missing_value = "")]
    rng: Option<String>,
    /// A virtio-balloon device asking the guest for N MiB, with a statistics interval.
    #[arg(
        long,
        value_name = "mib=N[,stats=SECS][,deflate-on-oom][,free-page-reporting]"
    )]
    balloon: Option<String>,
    /// Create the legacy i8254 PIT (for kernels that boot without ACPI and want it).
    #[arg(long)]
    pit: bool,
    /// Do not write ACPI tables (the guest then finds virtio devices on the command line).
    #[arg(long)]
    no_acpi: bool,
    /// CPU template: host, minimal, emulated-ring0, or a JSON template file [default: host].
    #[arg(long, value_name = "NAME|FILE")]
    cpu_template: Option<String>,
    /// Boot protocol to force [default: PVH when the kernel offers it, else linux64].
    #[arg(long, value_parser = ["pvh", "linux64"])]
    boot_protocol: Option<String>,
    /// JSON VM configuration (schema: examples/vm.json); the other flags override its fields.
    /// Relative paths in it are taken from the file's folder.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the VMM's start-up phases on stderr.
    #[arg(long)]
    timings: bool,
}

/// Puts a terminal into raw mode and restores it when dropped.
struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    fn enable(fd: i32) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid terminal fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host terminal still maps \n to \r\n.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read from the same fd in `enable`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// The running VM's stop descriptor, for the signal handler (-1: none).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);
/// The signal that asked the VMM to stop (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signum: libc::c_int) {
    STOP_SIGNAL.store(signum, Ordering::SeqCst);
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is the
        // VM's stop eventfd, open for the lifetime of the run.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// SIGTERM and SIGINT stop the VM; the normal exit path then restores the terminal.
fn install_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only does async-signal-safe work (atomics and write(2)).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

fn build_config(args: &Args) -> Result<VmConfig, String> {
    let mut config = match (&args.config, &args.kernel) {
        (Some(path), _) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
        (None, Some(kernel)) => VmConfig::new(kernel),
        (None, None) => return Err("give --kernel or --config".into()),
    };
    if let Some(k) = &args.kernel {
        config.kernel = k.clone();
    }
    if let Some(i) = &args.initrd {
        config.initrd = Some(i.clone());
    }
    if let Some(c) = &args.cmdline {
        config.cmdline = c.clone();
    }
    if let Some(m) = args.memory_mib {
        config.memory_mib = m;
    }
    if let Some(v) = args.vcpus {
        config.vcpus = v;
    }
    let parse_err = |e: ember_vmm::ConfigError| e.to_string();
    for d in &args.disks {
        config.disks.push(d.parse().map_err(parse_err)?);
    }
    for n in &args.nets {
        config.nets.push(n.parse().map_err(parse_err)?);
    }
    if let Some(v) = &args.vsock {
        config.vsock = Some(v.parse().map_err(parse_err)?);
    }
    if let Some(r) = &args.rng {
        config.rng = Some(r.parse().map_err(parse_err)?);
    }
    if let Some(b) = &args.balloon {
        config.balloon = Some(b.parse().map_err(parse_err)?);
    }
    if args.pit {
        config.pit = true;
    }
    if args.no_acpi {
        config.acpi = false;
    }
    if let Some(t) = &args.cpu_template {
        config.cpu_template = Some(t.clone());
    }
    match args.boot_protocol.as_deref() {
        Some("pvh") => config.boot_protocol = Some(BootProtocolChoice::Pvh),
        Some("linux64") => config.boot_protocol = Some(BootProtocolChoice::Linux64),
        _ => {}
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn main() -> ExitCode {
    let _ = ember_vmm::process_start();
    let args = Args::parse();
    let config = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ember: error: {e}");
            return ExitCode::from(2);
        }
    };
    let stdin = std::io::stdin();
    // SAFETY: isatty only inspects the descriptor.
    let terminal = unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
    let mut builder = Vm::builder(config).console_escape(terminal);
    match stdin.as_fd().try_clone_to_owned() {
        Ok(fd) => builder = builder.serial_input(fd),
        Err(e) => eprintln!("ember: warning: stdin is not read ({e})"),
    }
    let vm = match builder.build() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("ember: error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.timings {
        for (phase, d) in &vm.timings().phases {
            eprintln!(
                "ember: start-up {phase:<15} {:>9.3} ms",
                d.as_secs_f64() * 1e3
            );
        }
    }
    STOP_FD.store(vm.handle().stop_fd(), Ordering::SeqCst);
    install_stop_signals();
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
                    "ember: boot timer: {:.3} ms after VMM start",
                    t.as_secs_f64() * 1e3
                );
            }
            if args.timings {
                if let Some(t) = outcome.first_run {
                    eprintln!(
                        "ember: first KVM_RUN {:.3} ms after VMM start",
                        t.as_secs_f64() * 1e3
                    );
                }
            }
            if outcome.console_dropped > 0 {
                eprintln!(
                    "ember: {} bytes of guest console output could not be written",
                    outcome.console_dropped
                );
            }
            if signal != 0 {
                eprintln!("ember: stopped by signal {signal}");
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "only SIGTERM, SIGINT or SIGHUP (1..=15) are stored in STOP_SIGNAL"
                )]
                let signal = signal as u8;
                return ExitCode::from(128u8.wrapping_add(signal));
            }
            if outcome.exit.is_clean() || outcome.exit == VmExit::ConsoleEscape {
                eprintln!("ember: {}", outcome.exit);
                ExitCode::SUCCESS
            } else {
                eprintln!("ember: VM ended: {}", outcome.exit);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("ember: error: {e}");
            ExitCode::from(1)
        }
    }
}
