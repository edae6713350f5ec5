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

const USAGE: &str = "\
usage: cargo xtask guest [--debian-cloud] [--no-kernel]

Builds the Ember Linux guest into <cache>/guest (cache: $EMBER_CACHE or <workspace>/.cache):
  vmlinux, bzImage      Linux 6.1 (Debian linux-source-6.1), tinyconfig + guest/linux/microvm.config
  initramfs.cpio        static busybox + /init (protocol: docs/guest.md)
Cached: a second run only checks stamps. Editing the config fragment rebuilds the kernel.

  --debian-cloud   instead of building our kernel, fetch Debian's cloud kernel (a bzImage) to
                   <cache>/guest/debian-cloud-bzImage (downloaded and unpacked, never installed);
                   the initramfs is still written
  --no-kernel      only the initramfs";

/// Kernel command line for a normal boot of this guest under an Ember VMM: console on COM1,
/// reset through the i8042 on `reboot -f` and on panic, no PCI probing (PCI is compiled in
/// only for /dev/port), and a first command for `/init`. Host-compatibility parameters
/// ([`HOST_COMPAT_ARGS`]) are not part of it.
pub const DEMO_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 pci=off ember.cmd=uname%20-a";

/// Extra kernel parameters for hosts whose KVM emulates guest ring 0 (PVM): they keep Linux
/// off the instructions that emulator refuses (docs/guest.md, "Host-compatibility pieces").
pub const HOST_COMPAT_ARGS: &str = "noxsave clearcpuid=popcnt,cx16,smap";

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

fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

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
pub fn run(args: &[String]) -> Result<(), String> {
    let mut debian_cloud = false;
    let mut no_kernel = false;
    for a in args {
        match a.as_str() {
            "--debian-cloud" => debian_cloud = true,
            "--no-kernel" => no_kernel = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
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
