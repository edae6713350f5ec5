//! `cargo xtask guest`: prepares the Linux guest (kernel + busybox initramfs) in the cache.
//!
//! Outputs in `<cache>/guest/` (`<cache>` = `$EMBER_CACHE`, else `<workspace>/.cache`):
//! `vmlinux` (ELF with the Xen PVH note), `bzImage`, `initramfs.cpio`, `kernel.config`,
//! `kernel.stamp`; with `--debian-cloud`, `debian-cloud-bzImage`. Downloads, the kernel
//! source tree and the build tree live in `<cache>/guest/work/`. See docs/guest.md.

mod cpio;
mod debian;
mod host;
mod initramfs;
mod kernel;

use std::path::{Path, PathBuf};
use std::time::Instant;

/// `cargo xtask guest`: builds the Ember Linux guest into `<cache>/guest` (cache:
/// `$EMBER_CACHE` or `<workspace>/.cache`): `vmlinux` and `bzImage` (Linux 6.1 from Debian's
/// linux-source-6.1, tinyconfig + guest/linux/microvm.config) and `initramfs.cpio` (static
/// busybox + /init; protocol: docs/guest.md). Cached: a second run only checks stamps; editing
/// the config fragment rebuilds the kernel.
#[derive(clap::Args, Default)]
pub struct Args {
    /// Instead of building our kernel, fetch Debian's cloud kernel (a bzImage) to
    /// <cache>/guest/debian-cloud-bzImage (unpacked, never installed); the initramfs is still
    /// written.
    #[arg(long)]
    pub debian_cloud: bool,
    /// Only the initramfs.
    #[arg(long)]
    pub no_kernel: bool,
}

/// Kernel command line for a normal boot of this guest under an Ember VMM: console on COM1,
/// reset through the i8042 on `reboot -f` and on panic, no PCI probing (PCI is compiled in
/// only for /dev/port), and a first command for `/init`. Host-compatibility parameters
/// ([`HOST_COMPAT_ARGS`]) are not part of it.
pub const DEMO_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 pci=off ember.cmd=uname%20-a";

/// Extra kernel parameters for hosts whose KVM emulates guest ring 0 (PVM): they keep Linux
/// off the instructions that emulator refuses (docs/guest.md, "Host-compatibility pieces").
pub const HOST_COMPAT_ARGS: &str = "noxsave clearcpuid=popcnt,cx16,smap";

/// What `cargo xtask demo --linux` says on a host whose KVM emulates guest ring 0.
pub const RING0_EMULATED_NOTE: &str = "\
xtask demo: this host's KVM emulates guest ring 0 (the probe's ring0 check says native=no; PVM
  does this). Linux gets through its early boot here (banner, memory map, ACPI tables, CPUs)
  and then stops at an instruction KVM's emulator refuses: an `emulation failure` at the end is
  expected on such a host, with any VMM (docs/guest.md). On a host with hardware KVM the same
  command boots to /init, runs `uname -a` and powers off; put `ember.shell` on the command
  line instead of `ember.cmd=...` for an interactive busybox shell on the console.";

/// Whether this host's KVM emulates guest ring 0: boots the probe's `ring0` check with `ember`.
pub fn host_emulates_ring0(ember: &Path) -> Result<bool, String> {
    let probe = crate::probe::build()?;
    let out = std::process::Command::new(ember)
        .arg("--kernel")
        .arg(&probe)
        .args(["--cmdline", "probe=ring0"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ember.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("PROBE ring0 "))
        .ok_or_else(|| format!("the probe's ring0 check printed nothing:\n{stdout}"))?;
    Ok(line.contains("native=no"))
}

/// `<cache>/guest`, where the outputs are (`vmlinux`, `bzImage`, `initramfs.cpio`, ...).
pub fn guest_dir() -> PathBuf {
    cache_dir().join("guest")
}

/// `$EMBER_CACHE` (relative paths taken from the current directory), else
/// `<workspace>/.cache`.
fn cache_dir() -> PathBuf {
    match std::env::var_os("EMBER_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => std::path::absolute(PathBuf::from(&dir)).unwrap_or_else(|_| dir.into()),
        None => workspace_root().join(".cache"),
    }
}

use crate::workspace_root;

/// Where things go.
pub struct Layout {
    /// The workspace root (holds `guest/linux/microvm.config`).
    pub root: PathBuf,
    /// `<cache>/guest`: the outputs.
    pub out: PathBuf,
    /// `<cache>/guest/work`: downloads, source and build trees.
    pub work: PathBuf,
}

impl Layout {
    fn new() -> Result<Self, String> {
        let root = workspace_root();
        let out = guest_dir();
        let work = out.join("work");
        std::fs::create_dir_all(&work)
            .map_err(|e| format!("cannot create {}: {e}", work.display()))?;
        Ok(Self { root, out, work })
    }

    /// The kernel config fragment kept in the repository.
    pub fn fragment(&self) -> PathBuf {
        self.root.join("guest/linux/microvm.config")
    }
}

/// Takes an exclusive lock on `path` (held until the returned file is dropped), so that two
/// `cargo xtask guest` runs (say, a test run and a demo) never build into the same tree at once.
fn lock(path: &Path) -> Result<std::fs::File, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            eprintln!(
                "guest: waiting for another `cargo xtask guest` ({})",
                path.display()
            );
            file.lock()
                .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", path.display()))
        }
    }
    Ok(file)
}

/// Entry point of `cargo xtask guest`.
pub fn run(args: &Args) -> Result<(), String> {
    let (debian_cloud, no_kernel) = (args.debian_cloud, args.no_kernel);
    let started = Instant::now();
    let layout = Layout::new()?;
    let _lock = lock(&layout.out.join(".lock"))?;
    let mut outputs = Vec::new();
    if !debian_cloud && !no_kernel {
        kernel::ensure(&layout)?;
        outputs.push(layout.out.join("vmlinux"));
        outputs.push(layout.out.join("bzImage"));
    }
    initramfs::ensure(&layout)?;
    outputs.push(layout.out.join("initramfs.cpio"));
    if debian_cloud {
        debian::ensure(&layout)?;
        outputs.push(layout.out.join("debian-cloud-bzImage"));
    }
    eprintln!("guest: done in {:.1} s", started.elapsed().as_secs_f64());
    eprintln!("guest: kernel command line: {DEMO_CMDLINE}");
    eprintln!("guest: on hosts whose KVM emulates guest ring 0, add: {HOST_COMPAT_ARGS}");
    for p in outputs {
        println!("{}", p.display());
    }
    Ok(())
}
