//! `ember`: Ember's reference VMM binary, in two modes:
//!
//! * quick boot, from flags or an Ember JSON config:
//!   ```text
//!   cargo run --release --bin ember -- --kernel target/probe/probe.elf --cmdline "probe=memmap,serial"
//!   ```
//! * Firecracker's: the same flags, config file and REST API on a Unix socket as Firecracker
//!   1.16 (`ember --api-sock /tmp/fc.sock`, `ember --no-api --config-file vm.json`); see
//!   docs/api.md.
//!
//! Stdin feeds the serial console (raw mode when it is a terminal, restored on every exit
//! path); the guest's reset or poweroff ends the process with status 0; an emulation failure,
//! triple fault or guest panic ends it with status 1 and a message on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ember_bin::quick::{self, VmFlags};
use ember_bin::seccomp;
use ember_vmm::{Vm, VmConfig};

mod firecracker;

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
    /// Restore the snapshot in DIR (`vm.state` and `vm.mem`) instead of booting; the
    /// configuration comes from the snapshot.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// On SIGUSR1, pause the guest, write a full snapshot into DIR (`vm.state`, `vm.mem`) and
    /// resume it.
    #[arg(long, value_name = "DIR")]
    snapshot_dir: Option<PathBuf>,

    // Firecracker's flags (Firecracker mode: used without --kernel and --config).
    /// [Firecracker] The API's Unix socket.
    #[arg(long, value_name = "PATH", help_heading = "Firecracker mode")]
    api_sock: Option<PathBuf>,
    /// [Firecracker] The instance id (in logs and `GET /`).
    #[arg(
        long,
        default_value = "anonymous-instance",
        help_heading = "Firecracker mode"
    )]
    id: String,
    /// [Firecracker] Boot from a Firecracker JSON config file at once.
    #[arg(long, value_name = "FILE", help_heading = "Firecracker mode")]
    config_file: Option<PathBuf>,
    /// [Firecracker] No API socket (needs --config-file).
    #[arg(long, help_heading = "Firecracker mode")]
    no_api: bool,
    /// [Firecracker] Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long, help_heading = "Firecracker mode")]
    level: Option<String>,
    /// [Firecracker] Log file or named pipe [default: stderr].
    #[arg(long, value_name = "PATH", help_heading = "Firecracker mode")]
    log_path: Option<String>,
    /// [Firecracker] Show each line's level.
    #[arg(long, help_heading = "Firecracker mode")]
    show_level: bool,
    /// [Firecracker] Show each line's file and line.
    #[arg(long, help_heading = "Firecracker mode")]
    show_log_origin: bool,
    /// [Firecracker] Only log messages of this module path.
    #[arg(long, value_name = "PATH", help_heading = "Firecracker mode")]
    module: Option<String>,
    /// [Firecracker] Metrics file or named pipe.
    #[arg(long, value_name = "PATH", help_heading = "Firecracker mode")]
    metrics_path: Option<String>,
    /// [Firecracker] Log the guest's boot time (its write to port 0x510).
    #[arg(long, help_heading = "Firecracker mode")]
    boot_timer: bool,
    /// Run without seccomp filters (a warning is printed). By default every thread gets the
    /// filter of its kind (vcpu, vmm, api) before it handles anything from the guest or the API.
    #[arg(long)]
    no_seccomp: bool,
    /// Seccomp filters compiled by Firecracker's `seccompiler-bin` (a map with `vmm`, `api`
    /// and `vcpu` entries), instead of Ember's own.
    #[arg(long, value_name = "FILE", conflicts_with = "no_seccomp")]
    seccomp_filter: Option<PathBuf>,
    /// Test hook: once its filter is in place, the given thread makes a system call no filter
    /// allows (socket(AF_INET)), to check the report and the exit status.
    #[arg(long, hide = true, value_parser = ["vcpu", "vmm", "api"])]
    seccomp_test_blocked: Option<String>,
    /// [Firecracker] Largest API request body, bytes.
    #[arg(long, default_value_t = ember_api::DEFAULT_MAX_PAYLOAD, help_heading = "Firecracker mode")]
    http_api_max_payload_size: usize,
    /// [Firecracker] Process start (wall clock, µs), for the start-up metrics.
    #[arg(long, help_heading = "Firecracker mode")]
    start_time_us: Option<u64>,
    /// [Firecracker] Process start (CPU time, µs), for the start-up metrics.
    #[arg(long, help_heading = "Firecracker mode")]
    start_time_cpu_us: Option<u64>,
    /// [Firecracker] The parent's CPU time (µs), added to the start-up CPU time.
    #[arg(long, help_heading = "Firecracker mode")]
    parent_cpu_time_us: Option<u64>,
    /// [Ember] Guest memory in a memfd, so that the paused microVM can become a fork template
    /// (`PUT /fork/template`) that this Unix socket hands to other VMMs (`PUT /fork/load`).
    #[arg(long, value_name = "PATH", help_heading = "Firecracker mode")]
    fork_socket: Option<PathBuf>,
    /// Lays the diff snapshot's memory file DIFF (a diff written into a new file) over the
    /// full memory file BASE, which then holds the diff snapshot's memory (Firecracker's
    /// `snapshot-editor edit-memory rebase`); apply a chain's diffs in the order taken.
    #[arg(long, num_args = 2, value_names = ["BASE", "DIFF"], exclusive = true)]
    merge_diff: Option<Vec<PathBuf>>,
    /// [Firecracker] Prints the format version of a snapshot state file.
    #[arg(long, value_name = "FILE", help_heading = "Firecracker mode")]
    describe_snapshot: Option<PathBuf>,
    /// [Firecracker] Prints the snapshot format version this build writes.
    #[arg(long, help_heading = "Firecracker mode")]
    snapshot_version: bool,
    /// [Firecracker] Not supported: Ember has no PCI.
    #[arg(long, help_heading = "Firecracker mode")]
    enable_pci: bool,
    /// [Firecracker] Not supported: Ember has no MMDS.
    #[arg(long, value_name = "FILE", help_heading = "Firecracker mode")]
    metadata: Option<PathBuf>,
    /// [Firecracker] Not supported: Ember has no MMDS.
    #[arg(long, value_name = "BYTES", help_heading = "Firecracker mode")]
    mmds_size_limit: Option<u64>,
}

impl Args {
    /// Whether any Firecracker-only flag is present.
    fn firecracker_flags(&self) -> Option<&'static str> {
        let set: [(bool, &'static str); 17] = [
            (self.api_sock.is_some(), "--api-sock"),
            (self.config_file.is_some(), "--config-file"),
            (self.no_api, "--no-api"),
            (self.level.is_some(), "--level"),
            (self.log_path.is_some(), "--log-path"),
            (self.show_level, "--show-level"),
            (self.show_log_origin, "--show-log-origin"),
            (self.module.is_some(), "--module"),
            (self.metrics_path.is_some(), "--metrics-path"),
            (self.boot_timer, "--boot-timer"),
            (self.start_time_us.is_some(), "--start-time-us"),
            (self.describe_snapshot.is_some(), "--describe-snapshot"),
            (self.snapshot_version, "--snapshot-version"),
            (self.enable_pci, "--enable-pci"),
            (self.metadata.is_some(), "--metadata"),
            (self.mmds_size_limit.is_some(), "--mmds-size-limit"),
            (self.fork_socket.is_some(), "--fork-socket"),
        ];
        set.iter().find(|(on, _)| *on).map(|(_, n)| *n)
    }

    fn quick_boot(&self) -> bool {
        self.kernel.is_some() || self.config.is_some() || self.restore.is_some()
    }

    /// Whether a flag that configures the VM is present (a restore takes its configuration
    /// from the snapshot instead).
    fn config_flags(&self) -> bool {
        self.config.is_some() || self.vm_flags().any()
    }

    /// Whether a quick-boot-only flag is present.
    fn quick_boot_flags(&self) -> bool {
        self.config_flags() || self.timings || self.snapshot_dir.is_some()
    }
}

/// The seccomp filters the flags ask for (status 2 and a message for a bad filter file).
fn seccomp_setup(args: &Args) -> Result<seccomp::Setup, ExitCode> {
    seccomp::Setup::from_flags(
        args.no_seccomp,
        args.seccomp_filter.as_deref(),
        args.seccomp_test_blocked.as_deref(),
    )
    .map_err(|e| {
        eprintln!("ember: error: {e}");
        ExitCode::from(2)
    })
}

/// Firecracker mode: checks the flags Ember does not implement, then runs.
fn firecracker_mode(args: &Args) -> ExitCode {
    let unsupported = |flag: &str, why: &str| {
        eprintln!("ember: error: {flag} is not supported: {why}");
        ExitCode::from(1)
    };
    if args.enable_pci {
        return unsupported("--enable-pci", "Ember has no PCI bus (virtio-mmio only)");
    }
    if args.metadata.is_some() || args.mmds_size_limit.is_some() {
        return unsupported("--metadata/--mmds-size-limit", "Ember has no MMDS");
    }
    if args.snapshot_version {
        println!("v{}.0.0", ember_vmm::SNAPSHOT_FORMAT_VERSION);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &args.describe_snapshot {
        return match ember_vmm::describe_snapshot(path) {
            Ok(v) => {
                println!("v{v}.0.0");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ember: error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let seccomp = match seccomp_setup(args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let level = match args.level.as_deref().map(str::parse) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            eprintln!("ember: error: --level: {e}");
            return ExitCode::from(1);
        }
    };
    firecracker::run(firecracker::FcArgs {
        api_sock: args
            .api_sock
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/firecracker.socket")),
        id: args.id.clone(),
        config_file: args.config_file.clone(),
        no_api: args.no_api,
        level,
        log_path: args.log_path.clone(),
        show_level: args.show_level,
        show_log_origin: args.show_log_origin,
        module: args.module.clone(),
        metrics_path: args.metrics_path.clone(),
        boot_timer: args.boot_timer,
        http_api_max_payload_size: args.http_api_max_payload_size,
        start_time_us: args.start_time_us,
        start_time_cpu_us: args.start_time_cpu_us,
        parent_cpu_time_us: args.parent_cpu_time_us,
        seccomp,
        fork_socket: args.fork_socket.clone(),
    })
}

/// The builder of a restore from `dir/vm.state` and `dir/vm.mem`.
fn restore_builder(dir: &std::path::Path) -> Result<ember_vmm::VmBuilder, String> {
    let (state_path, mem_path) = (dir.join("vm.state"), dir.join("vm.mem"));
    let state = ember_vmm::read_snapshot(&state_path).map_err(|e| e.to_string())?;
    let memory = ember_loader::open_regular_file(&mem_path)
        .map_err(|e| format!("{}: {e}", mem_path.display()))?;
    Ok(ember_vmm::VmBuilder::restore(state, memory, &mem_path))
}

/// Blocks SIGUSR1 in this thread (and the threads it starts); returns the set to wait on.
fn block_sigusr1() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; pthread_sigmask changes
    // only this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// A thread that waits for SIGUSR1 and then pauses the VM, writes a snapshot into `dir` and
/// resumes the VM.
fn snapshot_on_signal(
    handle: ember_vmm::VmHandle,
    dir: PathBuf,
    set: libc::sigset_t,
    seccomp: seccomp::Setup,
) {
    let spawned = std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            if let Err(e) = seccomp.enter(seccomp::Thread::Vmm, "snapshot") {
                eprintln!("ember: snapshot: {e}; SIGUSR1 does nothing");
                return;
            }
            snapshot_loop(&handle, &dir, &set);
        });
    if let Err(e) = spawned {
        eprintln!("ember: warning: no snapshot thread ({e}); SIGUSR1 does nothing");
    }
}

/// Waits for SIGUSR1 and writes a snapshot, for ever.
fn snapshot_loop(handle: &ember_vmm::VmHandle, dir: &std::path::Path, set: &libc::sigset_t) {
    loop {
        let mut sig = 0;
        // SAFETY: `set` is an initialised signal set; `sig` is a valid out-pointer.
        if unsafe { libc::sigwait(set, &mut sig) } != 0 {
            return;
        }
        let t = std::time::Instant::now();
        if !handle.pause() {
            eprintln!("ember: snapshot: the VM did not pause");
            continue;
        }
        let written = std::fs::create_dir_all(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))
            .and_then(|()| {
                handle
                    .snapshot(&dir.join("vm.state"), &dir.join("vm.mem"))
                    .map_err(|e| e.to_string())
            });
        handle.resume();
        match written {
            Ok(bytes) => eprintln!(
                "ember: snapshot written to {} ({:.1} MiB of memory, {:.1} ms)",
                dir.display(),
                bytes as f64 / f64::from(1u32 << 20),
                t.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => eprintln!("ember: snapshot failed: {e}"),
        }
    }
}
impl Args {
    /// The flags that configure the VM, for [`VmFlags::config`].
    fn vm_flags(&self) -> VmFlags {
        VmFlags {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            disks: self.disks.clone(),
            nets: self.nets.clone(),
            vsock: self.vsock.clone(),
            rng: self.rng.clone(),
            balloon: self.balloon.clone(),
            pit: self.pit,
            no_acpi: self.no_acpi,
            cpu_template: self.cpu_template.clone(),
            boot_protocol: self.boot_protocol.clone(),
        }
    }
}

fn build_config(args: &Args) -> Result<VmConfig, String> {
    let base = match &args.config {
        Some(path) => Some(VmConfig::from_file(path).map_err(|e| e.to_string())?),
        None if args.kernel.is_none() => {
            return Err("give --kernel or --config (or Firecracker's flags)".into())
        }
        None => None,
    };
    args.vm_flags().config(base)
}

fn main() {
    let _ = ember_vmm::process_start();
    // One VM per process: its KVM VM is closed after the exit status is reported
    // (`exit_process`), not on the way to it.
    ember_vmm::defer_teardown_to_exit();
    quick::exit(run())
}

fn run() -> ExitCode {
    let args = Args::parse();
    if let Some([base, diff]) = args.merge_diff.as_deref() {
        return match ember_vmm::merge_memory_diff(base, diff) {
            Ok(bytes) => {
                println!(
                    "{}: {bytes} bytes of {} laid over it",
                    base.display(),
                    diff.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ember: error: {e}");
                ExitCode::from(1)
            }
        };
    }
    if !args.quick_boot() {
        if args.quick_boot_flags() {
            eprintln!("ember: error: give --kernel or --config (or Firecracker's flags, without the quick-boot ones)");
            return ExitCode::from(2);
        }
        return firecracker_mode(&args);
    }
    if let Some(flag) = args.firecracker_flags() {
        eprintln!(
            "ember: error: {flag} is a Firecracker-mode flag; it does not go with --kernel or --config"
        );
        return ExitCode::from(2);
    }
    let builder = match &args.restore {
        Some(dir) => {
            if args.config_flags() {
                eprintln!("ember: error: --restore takes the VM's configuration from the snapshot; it goes with --snapshot-dir and --timings only");
                return ExitCode::from(2);
            }
            match restore_builder(dir) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("ember: error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => match build_config(&args) {
            Ok(c) => Vm::builder(c),
            Err(e) => {
                eprintln!("ember: error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let seccomp = match seccomp_setup(&args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Before any thread starts, so that every thread inherits the blocked SIGUSR1.
    let snapshot_signal = args.snapshot_dir.as_ref().map(|_| block_sigusr1());
    let opts = quick::RunOptions {
        timings: args.timings,
        seccomp: seccomp.clone(),
    };
    quick::run(builder, &opts, |vm| {
        if let (Some(dir), Some(set)) = (&args.snapshot_dir, snapshot_signal) {
            snapshot_on_signal(vm.handle(), dir.clone(), set, seccomp);
        }
    })
}
