//! Test helpers for Ember: boot the probe guest in Ember with a command line and get back the
//! parsed `PROBE` lines, the exit reason and the layout Ember computed.
//!
//! ```no_run
//! use ember_test_support::{boot_probe, ProbeOptions};
//!
//! if !ember_test_support::kvm_or_skip("example") { return; }
//! let run = boot_probe(&ProbeOptions::new("cmdline")).unwrap();
//! assert!(run.check("cmdline").unwrap().is_ok());
//! ```
#![deny(missing_docs)]

pub mod net;
pub mod uffd;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use ember_memory::MemoryLayout;
use ember_vmm::{BootProtocolChoice, Vm, VmConfig, VmExit, VmHandle, VmOutcome};

/// Records that `test` is skipped on this machine because of `reason`: prints a loud message
/// and, when `EMBER_SKIP_LOG` names a file (`cargo xtask test` sets it), appends
/// `test<TAB>reason` to it, so the run's summary counts the test as skipped rather than passed.
/// The test then returns early.
pub fn skip(test: &str, reason: &str) {
    eprintln!("\n*** SKIPPED {test}: {reason} ***\n");
    if let Some(log) = std::env::var_os("EMBER_SKIP_LOG") {
        let line = format!("{test}\t{}\n", reason.replace(['\t', '\n'], " "));
        // O_APPEND writes of one short line are atomic, so parallel tests do not interleave.
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("warning: cannot record the skip of {test}: {e}");
        }
    }
}

/// Whether `/dev/kvm` exists. When it does not, records a skip of `test` (see [`skip`]).
///
/// Tests call this first and return early when it is false; where `/dev/kvm` exists they run
/// and a failed boot fails them.
pub fn kvm_or_skip(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        skip(
            test,
            "/dev/kvm is absent on this machine; KVM tests cannot run",
        );
        false
    }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

static BUILD_PROBE: Once = Once::new();

/// Path to the probe ELF, building it with `cargo xtask probe` on first use.
///
/// `EMBER_PROBE` overrides the path (and skips the build).
pub fn probe_elf() -> PathBuf {
    if let Ok(p) = std::env::var("EMBER_PROBE") {
        return PathBuf::from(p);
    }
    let root = workspace_root();
    let elf = root.join("target/probe/probe.elf");
    BUILD_PROBE.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["run", "--quiet", "--package", "xtask", "--", "probe"])
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("building the probe guest failed: {other:?}"),
        }
    });
    elf
}

/// The profile directory the calling test runs from (`target/<profile>`, from
/// `target/<profile>/deps/<test>-<hash>`) and the target directory above it.
fn test_dirs() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|p| p.parent()).unwrap().to_path_buf();
    let target_dir = profile_dir.parent().unwrap().to_path_buf();
    (profile_dir, target_dir)
}

/// Whether `profile_dir` is the release profile's.
fn is_release(profile_dir: &Path) -> bool {
    profile_dir.file_name().and_then(|n| n.to_str()) == Some("release")
}

/// The `ember` and `ember-quick` binaries (and the root package's `minimal` and `virtio_blk` examples), built once per test process
/// into the profile directory the calling test runs from (`cargo test --all-targets` builds
/// examples only as test harnesses and other packages' binaries not at all).
///
/// `EMBER_TEST_BINARY=PATH` runs PATH instead (still after the build): a wrapper script that
/// runs the built binary under `strace -f -Y`, for instance, shows which system calls each
/// thread makes across the suite (how the seccomp allow-lists are checked).
pub fn ember_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    // target/<profile>/deps/cli-<hash> -> target/<profile>/ember
    let (profile_dir, target_dir) = test_dirs();
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace_root())
            .args([
                "build",
                "--quiet",
                "--bin",
                "ember",
                "--bin",
                "ember-quick",
                "--example",
                "minimal",
                "--example",
                "virtio_blk",
            ])
            .env("CARGO_TARGET_DIR", &target_dir);
        if is_release(&profile_dir) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building ember and the examples failed");
    });
    match std::env::var_os("EMBER_TEST_BINARY") {
        Some(p) => PathBuf::from(p),
        None => profile_dir.join("ember"),
    }
}

/// The `ember-quick` binary (quick boot only, built small), built with [`ember_binary`].
///
/// `EMBER_QUICK_TEST_BINARY=PATH` runs PATH instead (the musl release build, in CI).
pub fn ember_quick_binary() -> PathBuf {
    // Builds both binaries (once per test process).
    let _ = ember_binary();
    match std::env::var_os("EMBER_QUICK_TEST_BINARY") {
        Some(p) => PathBuf::from(p),
        None => test_dirs().0.join("ember-quick"),
    }
}

/// Reads the child's stdout (piped) until a line holds `needle`, then keeps draining it on a
/// thread of its own, so that the guest never blocks on its console. Panics if the output ends
/// first.
pub fn wait_for_line(child: &mut std::process::Child, needle: &str) {
    use std::io::BufRead;
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("a piped stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap_or(0) > 0,
            "guest output ended before a line with {needle:?}"
        );
        if line.contains(needle) {
            break;
        }
    }
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
}

/// Opens a pseudo-terminal pair: (controller, terminal), for tests of what a VMM does on a
/// terminal.
pub fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::unix::io::FromRawFd;
    let (mut controller, mut terminal) = (-1, -1);
    // SAFETY: openpty writes two fds into the given ints; name/termios/winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(controller),
            std::fs::File::from_raw_fd(terminal),
        )
    }
}

/// Result of one probe check line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// `PROBE <check> ok ...`
    Ok,
    /// `PROBE <check> FAIL ...`
    Fail,
    /// `PROBE <check> skip ...`
    Skip,
    /// Any other word in the status position (`start`, `done`, `waiting-input`, `panic` ...).
    Other(String),
}

/// One parsed `PROBE` line.
#[derive(Clone, Debug)]
pub struct ProbeLine {
    /// The check name (second word).
    pub check: String,
    /// The status word.
    pub status: Status,
    /// `k=v` fields after the status. A `text=` field takes the rest of the line.
    pub fields: BTreeMap<String, String>,
    /// Everything after the status word, verbatim.
    pub rest: String,
}

impl ProbeLine {
    /// Whether the check reported ok.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }

    /// A field's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// Parses a line starting with `PROBE `; `None` for other lines.
    pub fn parse(line: &str) -> Option<ProbeLine> {
        let line = line.trim_end_matches(['\r', '\n']);
        let body = line.strip_prefix("PROBE ")?;
        let mut parts = body.splitn(3, ' ');
        let check = parts.next()?.to_string();
        let status_word = parts.next().unwrap_or("");
        let rest = parts.next().unwrap_or("").to_string();
        let status = match status_word {
            "ok" => Status::Ok,
            "FAIL" => Status::Fail,
            "skip" => Status::Skip,
            other => Status::Other(other.to_string()),
        };
        let mut fields = BTreeMap::new();
        // Lines like `PROBE start entry=pvh ring=3` have fields where a status would be.
        let field_text = if status_word.contains('=') {
            format!("{status_word} {rest}")
        } else {
            rest.clone()
        };
        let mut remaining = field_text.trim_end();
        while !remaining.is_empty() {
            if let Some(text) = remaining.strip_prefix("text=") {
                fields.insert("text".to_string(), text.to_string());
                break;
            }
            let (word, tail) = remaining.split_once(' ').unwrap_or((remaining, ""));
            if let Some((k, v)) = word.split_once('=') {
                fields.insert(k.to_string(), v.to_string());
            }
            remaining = tail;
        }
        Some(ProbeLine {
            check,
            status,
            fields,
            rest,
        })
    }
}

/// How to boot the probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Comma-separated checks (`probe=` value).
    pub checks: String,
    /// Extra command-line words after `probe=...`.
    pub extra_cmdline: String,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Force a boot protocol.
    pub protocol: Option<BootProtocolChoice>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// CPU template name or JSON path (`None`: the default, `host`).
    pub cpu_template: Option<String>,
    /// virtio-blk disks.
    pub disks: Vec<ember_vmm::DiskConfig>,
    /// virtio-net interfaces.
    pub nets: Vec<ember_vmm::NetConfig>,
    /// A virtio-vsock device.
    pub vsock: Option<ember_vmm::VsockConfig>,
    /// A virtio-rng device.
    pub rng: Option<ember_vmm::RngConfig>,
    /// A virtio-balloon device.
    pub balloon: Option<ember_vmm::BalloonConfig>,
    /// Write ACPI tables (default true).
    pub acpi: bool,
    /// Bytes typed on the console once the output contains [`ProbeOptions::input_after`].
    pub serial_input: Option<Vec<u8>>,
    /// The text whose appearance makes the console type `serial_input` (default: the probe's
    /// `PROBE serial waiting-input`).
    pub input_after: String,
    /// Stop the VM (and fail) after this long.
    pub timeout: Duration,
    /// Stop the VM as soon as the console output contains this text (the run then ends with
    /// [`VmExit::Stopped`]); used to end a Linux boot once what the test needs was printed.
    pub stop_when: Option<String>,
}

impl ProbeOptions {
    /// Options running `checks` on a 128 MiB guest through the kernel's preferred protocol.
    pub fn new(checks: &str) -> Self {
        ProbeOptions {
            checks: checks.to_string(),
            extra_cmdline: String::new(),
            memory_mib: 128,
            protocol: None,
            vcpus: 1,
            cpu_template: None,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: None,
            balloon: None,
            acpi: true,
            serial_input: None,
            input_after: String::from_utf8_lossy(WAITING_INPUT).into_owned(),
            timeout: Duration::from_secs(60),
            stop_when: None,
        }
    }

    /// Sets the memory size.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }

    /// Adds a virtio-blk disk.
    pub fn disk(mut self, path: &Path, read_only: bool, id: Option<&str>) -> Self {
        self.disks.push(ember_vmm::DiskConfig {
            path: path.to_path_buf(),
            read_only,
            id: id.map(str::to_string),
            ..Default::default()
        });
        self
    }

    /// Adds a virtio-net interface.
    pub fn net(mut self, net: ember_vmm::NetConfig) -> Self {
        self.nets.push(net);
        self
    }

    /// Adds the virtio-vsock device.
    pub fn vsock(mut self, cid: u64, uds_path: &Path) -> Self {
        self.vsock = Some(ember_vmm::VsockConfig {
            cid,
            uds_path: uds_path.to_path_buf(),
        });
        self
    }

    /// Adds the virtio-rng device.
    pub fn rng(mut self) -> Self {
        self.rng = Some(ember_vmm::RngConfig::default());
        self
    }

    /// Adds the virtio-balloon device.
    pub fn balloon(mut self, balloon: ember_vmm::BalloonConfig) -> Self {
        self.balloon = Some(balloon);
        self
    }

    /// Selects a CPU template.
    pub fn cpu_template(mut self, name: &str) -> Self {
        self.cpu_template = Some(name.to_string());
        self
    }

    /// Forces a boot protocol.
    pub fn protocol(mut self, p: BootProtocolChoice) -> Self {
        self.protocol = Some(p);
        self
    }

    /// Appends command-line words.
    pub fn cmdline(mut self, extra: &str) -> Self {
        if !self.extra_cmdline.is_empty() {
            self.extra_cmdline.push(' ');
        }
        self.extra_cmdline.push_str(extra);
        self
    }

    /// The full command line the probe gets.
    pub fn full_cmdline(&self) -> String {
        let mut c = format!("probe={}", self.checks);
        if !self.extra_cmdline.is_empty() {
            c.push(' ');
            c.push_str(&self.extra_cmdline);
        }
        c
    }

    /// The VM configuration for these options.
    pub fn vm_config(&self) -> VmConfig {
        let mut cfg = VmConfig::new(probe_elf());
        cfg.cmdline = self.full_cmdline();
        cfg.memory_mib = self.memory_mib;
        cfg.boot_protocol = self.protocol;
        cfg.vcpus = self.vcpus;
        cfg.cpu_template = self.cpu_template.clone();
        cfg.disks = self.disks.clone();
        cfg.nets = self.nets.clone();
        cfg.vsock = self.vsock.clone();
        cfg.rng = self.rng.clone();
        cfg.balloon = self.balloon.clone();
        cfg.acpi = self.acpi;
        cfg
    }
}

/// What a probe boot produced.
#[derive(Debug)]
pub struct ProbeRun {
    /// Everything the guest printed on the console.
    pub output: String,
    /// The parsed `PROBE` lines, in order.
    pub lines: Vec<ProbeLine>,
    /// How the VM ended, with timings.
    pub outcome: VmOutcome,
    /// The layout Ember computed for the guest.
    pub layout: MemoryLayout,
    /// The command line the probe was given.
    pub cmdline: String,
}

impl ProbeRun {
    /// The first line for `check` whose status is ok/FAIL/skip.
    pub fn check(&self, check: &str) -> Option<&ProbeLine> {
        self.lines.iter().find(|l| {
            l.check == check && matches!(l.status, Status::Ok | Status::Fail | Status::Skip)
        })
    }

    /// Panics with the whole console output unless `check` reported ok.
    pub fn expect_ok(&self, check: &str) -> &ProbeLine {
        match self.check(check) {
            Some(l) if l.is_ok() => l,
            other => panic!(
                "probe check `{check}` did not report ok (got {other:?}); exit {:?}; console:\n{}",
                self.outcome.exit, self.output
            ),
        }
    }

    /// Panics unless the VM ended by reset, every requested check reported ok and the probe
    /// printed its `done` line with no failures.
    pub fn expect_all_ok(&self, checks: &str) {
        for c in checks.split(',').filter(|c| !c.is_empty()) {
            self.expect_ok(c);
        }
        let done = self.lines.iter().find(|l| l.check == "done");
        assert!(
            matches!(done.and_then(|d| d.get("failed")), Some("0")),
            "probe did not finish cleanly: {done:?}; console:\n{}",
            self.output
        );
        let expected = if checks.split(',').any(|c| c == "poweroff") {
            VmExit::Poweroff
        } else {
            VmExit::Reset
        };
        assert_eq!(
            self.outcome.exit, expected,
            "VM should end by {expected:?}; console:\n{}",
            self.output
        );
    }
}

/// Console sink shared with the test: collects output and types `serial_input` when the probe
/// asks for it.
struct Console {
    buf: Arc<Mutex<Vec<u8>>>,
    reply: Option<Vec<u8>>,
    reply_after: Vec<u8>,
    stop_when: Option<Vec<u8>>,
    handle: Arc<Mutex<Option<VmHandle>>>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const WAITING_INPUT: &[u8] = b"PROBE serial waiting-input";

impl Write for Console {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        buf.extend_from_slice(data);
        if !data.contains(&b'\n') {
            return Ok(data.len());
        }
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = handle.as_ref() {
            if matches!(&self.stop_when, Some(needle) if contains(&buf, needle)) {
                h.stop();
            }
            if self.reply.is_some() && contains(&buf, &self.reply_after) {
                if let Some(reply) = self.reply.take() {
                    h.send_serial(&reply);
                }
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boots the probe in Ember with `opts` and returns what it reported.
///
/// Errors are Ember's build/run errors; a boot that times out returns `Ok` with
/// [`VmExit::Stopped`] so the caller sees the console.
pub fn boot_probe(opts: &ProbeOptions) -> Result<ProbeRun, ember_vmm::Error> {
    boot_with_config(opts.vm_config(), opts)
}

/// Boots `config` (any kernel) with the console handling and timeout of `opts`.
pub fn boot_with_config(
    config: VmConfig,
    opts: &ProbeOptions,
) -> Result<ProbeRun, ember_vmm::Error> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let handle_slot = Arc::new(Mutex::new(None));
    let console = Console {
        buf: buf.clone(),
        reply: opts.serial_input.clone(),
        reply_after: opts.input_after.as_bytes().to_vec(),
        stop_when: opts.stop_when.as_ref().map(|s| s.as_bytes().to_vec()),
        handle: handle_slot.clone(),
    };
    let cmdline = config.cmdline.clone();
    let vm = Vm::builder(config)
        .serial_output(Box::new(console))
        .build()?;
    let layout = vm.layout().clone();
    let handle = vm.handle();
    *handle_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.clone());

    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let timeout = opts.timeout;
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            handle.stop();
        }
    });
    let outcome = vm.run();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let outcome = outcome?;

    let output =
        String::from_utf8_lossy(&buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let lines = output.lines().filter_map(ProbeLine::parse).collect();
    Ok(ProbeRun {
        output,
        lines,
        outcome,
        layout,
        cmdline,
    })
}

/// Formats RAM ranges the way the probe's `memmap` check prints them (`0x0-0x9fc00,...`).
pub fn format_ram_list(layout: &MemoryLayout) -> String {
    layout
        .e820()
        .iter()
        .filter(|e| e.kind == ember_memory::E820Kind::Ram)
        .map(|e| format!("{:#x}-{:#x}", e.addr, e.addr + e.size))
        .collect::<Vec<_>>()
        .join(",")
}

/// A minimal x86_64 ELF kernel (no PVH note) whose 64-bit entry at 1 MiB runs `code`.
///
/// Used to make a guest do one precise thing in ring 0, e.g. execute an instruction the host's
/// KVM cannot emulate.
pub fn tiny_elf_kernel(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFFSET: u64 = 0x1000;
    #[allow(clippy::cast_possible_truncation, reason = "CODE_OFFSET is 0x1000")]
    let mut elf = vec![0u8; CODE_OFFSET as usize];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut elf[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&CODE_OFFSET.to_le_bytes());
    ph[16..24].copy_from_slice(&LOAD.to_le_bytes());
    ph[24..32].copy_from_slice(&LOAD.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// `popcnt eax, ecx` then an i8042 reset: refused by KVM's ring-0 emulator on hosts that
/// emulate guest ring 0 (an emulation failure at 1 MiB), a plain reset elsewhere.
pub const POPCNT_THEN_RESET: &[u8] = &[
    0xf3, 0x0f, 0xb8, 0xc1, // popcnt eax, ecx
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, // hlt
];

/// The byte the probe's `blk` check expects at disk offset `offset` for `seed`
/// (`((offset >> 9) as u8) ^ (offset as u8) ^ seed`; see docs/probe.md).
#[allow(
    clippy::cast_possible_truncation,
    reason = "the pattern is defined on the low bytes of offset >> 9 and offset"
)]
pub fn blk_pattern_byte(offset: u64, seed: u8) -> u8 {
    ((offset >> 9) as u8) ^ (offset as u8) ^ seed
}

/// Writes a disk image of `sectors` 512-byte sectors filled with the probe's pattern.
pub fn write_blk_image(path: &Path, sectors: u64, seed: u8) -> std::io::Result<()> {
    let bytes: Vec<u8> = (0..sectors * 512)
        .map(|i| blk_pattern_byte(i, seed))
        .collect();
    std::fs::write(path, bytes)
}

/// A statically linked `ember` (debug profile), built once per test process into
/// `target/static` (a jail has no dynamic loader), and the `ember-jailer` beside
/// [`ember_binary`].
pub fn static_ember_and_jailer() -> (PathBuf, PathBuf) {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let (profile_dir, target_dir) = test_dirs();
    let static_dir = target_dir.join("static");
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        for (args, dir, flags) in [
            (
                &["build", "--quiet", "--bin", "ember", "--target", TARGET][..],
                &static_dir,
                "-C target-feature=+crt-static",
            ),
            (
                &["build", "--quiet", "--bin", "ember-jailer"][..],
                &target_dir,
                "",
            ),
        ] {
            let mut cmd = Command::new(&cargo);
            cmd.current_dir(workspace_root())
                .args(args)
                .env("CARGO_TARGET_DIR", dir);
            if flags.is_empty() {
                cmd.env_remove("RUSTFLAGS");
            } else {
                cmd.env("RUSTFLAGS", flags);
            }
            if is_release(&profile_dir) {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo {args:?} failed");
        }
    });
    let profile = profile_dir.file_name().unwrap();
    (
        static_dir.join(TARGET).join(profile).join("ember"),
        profile_dir.join("ember-jailer"),
    )
}

/// Each thread of process `pid`: its name and its `Seccomp:` mode (0 none, 2 filter), from
/// `/proc/PID/task/TID/{comm,status}`.
pub fn thread_seccomp_modes(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(u32::MAX);
        out.push((comm.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// Waits up to 5 s until process `pid` has a thread of every name in `names` and every one
/// of its threads is in seccomp mode 2; returns what it saw last.
pub fn wait_for_filtered_threads(pid: u32, names: &[&str]) -> Result<(), Vec<(String, u32)>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let seen = thread_seccomp_modes(pid);
        let all_named = names.iter().all(|n| seen.iter().any(|(c, _)| c == n));
        if all_named && !seen.is_empty() && seen.iter().all(|(_, m)| *m == 2) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(seen);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probe_lines() {
        let l =
            ProbeLine::parse("PROBE memmap ok source=e820 entries=2 ram=0x0-0x9fc00\r\n").unwrap();
        assert_eq!(l.check, "memmap");
        assert!(l.is_ok());
        assert_eq!(l.get("entries"), Some("2"));
        let l = ProbeLine::parse("PROBE cmdline ok len=20 text=probe=cmdline foo=bar").unwrap();
        assert_eq!(l.get("text"), Some("probe=cmdline foo=bar"));
        let l = ProbeLine::parse("PROBE start entry=pvh ring=3").unwrap();
        assert_eq!(l.get("entry"), Some("pvh"));
        assert_eq!(l.get("ring"), Some("3"));
        let l = ProbeLine::parse("PROBE serial FAIL loopback mismatch").unwrap();
        assert_eq!(l.status, Status::Fail);
        assert!(ProbeLine::parse("Linux version 6.1").is_none());
    }
}
