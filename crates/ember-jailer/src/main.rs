//! `ember-jailer`: starts a VMM (the `ember` binary, or Firecracker) confined, with Firecracker
//! jailer's flags where they fit:
//!
//! ```text
//! ember-jailer --id vm1 --exec-file ./ember --uid 1000 --gid 1000 \
//!     --file probe.elf --file disk.img --cgroup memory.max=300M --resource-limit no-file=1024 \
//!     -- --kernel /probe.elf --disk /disk.img
//! ```
//!
//! In order, as root: every inherited descriptor above stderr is closed; the process joins a
//! new cgroup (`<mount>/<parent-cgroup>/<id>`, v1 or v2) with the given limits; the rlimits are
//! set; it joins `--netns`; with `--new-pid-ns` it forks into a new PID namespace (the parent
//! waits and passes the exit status on); in a new mount namespace it builds the chroot
//! `<chroot-base-dir>/<exec-file name>/<id>/root` holding only the VMM (bind-mounted read-only),
//! `/dev/kvm`, `/dev/net/tun`, `/dev/urandom` and the `--file`s (bind-mounted), and
//! `pivot_root`s into it, detaching the old root; with `--daemonize` it leaves its session
//! and its stdio go to `/dev/null`; it drops the supplementary groups, sets the gid and uid,
//! drops every capability (effective, permitted, inheritable, ambient and bounding) and sets
//! `no_new_privs`; then it execs the VMM with the arguments after `--` and an empty
//! environment. The VMM must be statically linked (the chroot has no dynamic loader).

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

mod cgroup;
mod jail;

/// What can go wrong (each ends the jailer with status 1 and the message, before the exec).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A flag is invalid.
    #[error("{0}")]
    Usage(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    /// The last OS error, for `what`.
    pub fn last(what: impl Into<String>) -> Self {
        JailError::Os {
            what: what.into(),
            source: std::io::Error::last_os_error(),
        }
    }

    /// `source`, for `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        JailError::Os {
            what: what.into(),
            source,
        }
    }
}

/// The jailer's flags.
#[derive(Parser, Debug)]
#[command(
    name = "ember-jailer",
    version,
    about = "Start a VMM in a chroot, in its own namespaces and cgroup, without privileges",
    after_help = "Arguments after `--` go to the VMM. In Firecracker mode (no --kernel, --config \
                  or --restore among them) `--id ID` is passed too, as Firecracker's jailer does. \
                  Paths the VMM is given are paths inside the chroot (a --file lands at \
                  /<its file name>)."
)]
pub struct Args {
    /// The VM's id: letters, digits and '-', at most 64 (names the chroot and the cgroup).
    #[arg(long)]
    pub id: String,
    /// The VMM binary (statically linked).
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The user id the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// The group id the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// Where chroots are made: `<DIR>/<exec-file name>/<id>/root`.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// The cgroup version: 1 or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub cgroup_version: u8,
    /// A cgroup setting, FILE=VALUE (repeatable): `memory.max=256M`, `cpu.max=50000 100000`
    /// (v2), `memory.limit_in_bytes=268435456` (v1). The controller is FILE's first part.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// The cgroup under which the VM's is made [default: the exec file's name].
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// A resource limit (repeatable): `fsize=BYTES` or `no-file=N` [default: no-file=2048].
    #[arg(long = "resource-limit", value_name = "NAME=N")]
    pub resource_limits: Vec<String>,
    /// Run the VMM in a new PID namespace (as its PID 1).
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Detach: a new session, stdio to /dev/null; the jailer returns at once.
    #[arg(long)]
    pub daemonize: bool,
    /// A file to bind-mount into the chroot at /<its name> (repeatable; Ember's addition).
    #[arg(long = "file", value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// The VMM's arguments.
    #[arg(last = true)]
    pub vmm_args: Vec<String>,
}

/// Checks the id the way Firecracker's jailer does.
fn check_id(id: &str) -> Result<(), JailError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(JailError::Usage(format!(
            "--id {id:?}: use 1 to 64 letters, digits and '-'"
        )));
    }
    Ok(())
}

/// Refuses a VMM binary that names a dynamic loader (it would not be found in the chroot).
fn check_static(path: &Path) -> Result<(), JailError> {
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::ByteValued;
    let what = || format!("--exec-file {}", path.display());
    let mut f = File::open(path).map_err(|e| JailError::io(what(), e))?;
    let meta = f.metadata().map_err(|e| JailError::io(what(), e))?;
    if !meta.is_file() {
        return Err(JailError::Usage(format!("{}: not a regular file", what())));
    }
    let mut ehdr = linux_loader::elf::Elf64_Ehdr::default();
    f.read_exact(ehdr.as_mut_slice())
        .map_err(|e| JailError::io(what(), e))?;
    if ehdr.e_ident[..4] != [0x7f, b'E', b'L', b'F'] {
        return Err(JailError::Usage(format!(
            "{}: not an ELF executable",
            what()
        )));
    }
    let phsize = std::mem::size_of::<linux_loader::elf::Elf64_Phdr>();
    if usize::from(ehdr.e_phentsize) != phsize {
        return Err(JailError::Usage(format!(
            "{}: unexpected program header size",
            what()
        )));
    }
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut ph = linux_loader::elf::Elf64_Phdr::default();
        let at = ehdr
            .e_phoff
            .checked_add(i * phsize as u64)
            .ok_or_else(|| JailError::Usage(format!("{}: bad program headers", what())))?;
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(ph.as_mut_slice()))
            .map_err(|e| JailError::io(what(), e))?;
        if ph.p_type == linux_loader::elf::PT_INTERP {
            return Err(JailError::Usage(format!(
                "{} is dynamically linked: its loader is not in the chroot. Build it static \
                 (RUSTFLAGS='-C target-feature=+crt-static' cargo build --release \
                 --target x86_64-unknown-linux-gnu --bin ember)",
                what()
            )));
        }
    }
    Ok(())
}

/// One `--resource-limit`.
fn rlimit(spec: &str) -> Result<(libc::__rlimit_resource_t, u64), JailError> {
    let bad = || {
        JailError::Usage(format!(
            "--resource-limit {spec:?}: use fsize=BYTES or no-file=N"
        ))
    };
    let (name, value) = spec.split_once('=').ok_or_else(bad)?;
    let value: u64 = value.parse().map_err(|_| bad())?;
    match name {
        "fsize" => Ok((libc::RLIMIT_FSIZE, value)),
        "no-file" => Ok((libc::RLIMIT_NOFILE, value)),
        _ => Err(bad()),
    }
}

fn set_rlimits(specs: &[String]) -> Result<(), JailError> {
    let mut limits = vec![(libc::RLIMIT_NOFILE, 2048u64)];
    for s in specs {
        let (r, v) = rlimit(s)?;
        limits.retain(|(old, _)| *old != r);
        limits.push((r, v));
    }
    for (r, v) in limits {
        let lim = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit reads a valid rlimit.
        if unsafe { libc::setrlimit(r, &lim) } != 0 {
            return Err(JailError::last(format!("setrlimit({r}, {v})")));
        }
    }
    Ok(())
}

fn join_netns(path: &Path) -> Result<(), JailError> {
    let f =
        File::open(path).map_err(|e| JailError::io(format!("--netns {}", path.display()), e))?;
    // SAFETY: setns with a namespace descriptor we hold; it changes only this process.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(JailError::last(format!(
            "--netns {}: setns",
            path.display()
        )));
    }
    Ok(())
}

/// Closes every descriptor above stderr.
fn close_inherited_fds() -> Result<(), JailError> {
    // SAFETY: close_range on this process's own descriptors, none of which Rust owns yet.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(JailError::last("close_range"));
    }
    Ok(())
}

/// Forks; the parent waits for the child and ends with its status (passing SIGTERM, SIGINT
/// and SIGHUP on), or with `detach`, returns at once. Returns in the child.
fn fork_and_wait(pid_file: Option<&Path>, detach: bool) -> Result<(), JailError> {
    // SAFETY: the process is single-threaded here; the child goes on with the jail set-up.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::last("fork"));
    }
    if pid == 0 {
        return Ok(());
    }
    if let Some(p) = pid_file {
        let _ = std::fs::write(p, format!("{pid}\n"));
    }
    if detach {
        std::process::exit(0);
    }
    CHILD.store(pid, std::sync::atomic::Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a handler that only calls kill(2), which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                pass_on as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(1);
        }
    }
    if libc::WIFEXITED(status) {
        std::process::exit(libc::WEXITSTATUS(status));
    }
    std::process::exit(128 + libc::WTERMSIG(status));
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn pass_on(sig: libc::c_int) {
    let child = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(child, sig) };
    }
}

/// Drops to `uid`/`gid` with no capability left and `no_new_privs` set.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    // SAFETY: each call below changes only this process's credentials.
    unsafe {
        for cap in 0..=last_cap {
            // EINVAL for a capability this kernel does not know: nothing to drop.
            libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0);
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(JailError::last("setgroups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(JailError::last(format!("setresgid({gid})")));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(JailError::last(format!("setresuid({uid})")));
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    // Effective, permitted and inheritable sets emptied (a uid 0 jail keeps none either).
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a valid header and two data structs (version 3).
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(JailError::last("capset"));
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::last("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    Ok(())
}

/// The VMM's argv: its name, `--id` in Firecracker mode, then the given arguments.
fn vmm_argv(args: &Args, exec_name: &str) -> Vec<String> {
    let mut argv = vec![exec_name.to_string()];
    let quick_boot = args
        .vmm_args
        .iter()
        .any(|a| matches!(a.as_str(), "--kernel" | "--config" | "--restore" | "--id"));
    if !quick_boot {
        argv.push("--id".into());
        argv.push(args.id.clone());
    }
    argv.extend(args.vmm_args.iter().cloned());
    argv
}

fn exec(path: &str, argv: &[String]) -> JailError {
    let to_c = |s: &str| CString::new(s).unwrap_or_default();
    let path_c = to_c(path);
    let argv_c: Vec<CString> = argv.iter().map(|a| to_c(a)).collect();
    let mut ptrs: Vec<*const libc::c_char> = argv_c.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: NUL-terminated path, argv and envp arrays that outlive the call.
    unsafe { libc::execve(path_c.as_ptr(), ptrs.as_ptr(), envp.as_ptr()) };
    JailError::last(format!("exec {path}"))
}

fn run(args: &Args) -> Result<(), JailError> {
    check_id(&args.id)?;
    check_static(&args.exec_file)?;
    for r in &args.resource_limits {
        rlimit(r)?;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::Usage(
            "ember-jailer must run as root (it makes namespaces, device nodes and cgroups, \
             then drops to --uid/--gid)"
                .into(),
        ));
    }
    let exec_name = args
        .exec_file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| JailError::Usage("--exec-file has no file name".into()))?;
    let root = args
        .chroot_base_dir
        .join(&exec_name)
        .join(&args.id)
        .join("root");
    close_inherited_fds()?;
    let parent = args
        .parent_cgroup
        .clone()
        .unwrap_or_else(|| exec_name.clone());
    cgroup::join(args.cgroup_version, &parent, &args.id, &args.cgroups)?;
    set_rlimits(&args.resource_limits)?;
    if let Some(ns) = &args.netns {
        join_netns(ns)?;
    }
    let dev_null = if args.daemonize {
        Some(
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| JailError::io("/dev/null", e))?,
        )
    } else {
        None
    };
    if args.new_pid_ns {
        // SAFETY: unshare with a flag; the next child is PID 1 of the new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(JailError::last("unshare(CLONE_NEWPID)"));
        }
        let pid_file = root.parent().map(|p| p.join(format!("{exec_name}.pid")));
        std::fs::create_dir_all(&root).map_err(|e| JailError::io(root.display().to_string(), e))?;
        fork_and_wait(pid_file.as_deref(), args.daemonize)?;
    } else if args.daemonize {
        fork_and_wait(None, true)?;
    }
    jail::enter(
        &root,
        &args.exec_file,
        &exec_name,
        &args.files,
        args.uid,
        args.gid,
    )?;
    if let Some(null) = dev_null {
        // SAFETY: setsid and dup2 on this process's own descriptors.
        unsafe {
            libc::setsid();
            let fd = std::os::fd::AsRawFd::as_raw_fd(&null);
            for target in 0..=2 {
                libc::dup2(fd, target);
            }
        }
    }
    drop_privileges(args.uid, args.gid)?;
    Err(exec(&format!("/{exec_name}"), &vmm_argv(args, &exec_name)))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-jailer: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// A path as a C string (`what` names it in the error).
pub fn c_path(path: &Path, what: &str) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::Usage(format!("{what} {}: contains a NUL byte", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_limits_are_checked() {
        assert!(check_id("vm-1").is_ok());
        for bad in ["", "a/b", "..", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(rlimit("fsize=10").unwrap(), (libc::RLIMIT_FSIZE, 10));
        assert!(rlimit("no-file=x").is_err());
        assert!(rlimit("cpu=1").is_err());
    }

    #[test]
    fn a_dynamic_binary_is_refused_with_the_way_out() {
        let e = check_static(Path::new("/bin/sh")).unwrap_err().to_string();
        assert!(e.contains("dynamically linked"), "{e}");
        assert!(e.contains("crt-static"), "{e}");
        let text = std::env::temp_dir().join(format!("jailer-test-{}", std::process::id()));
        std::fs::write(
            &text,
            "not an executable, but long enough for an ELF header: ....................",
        )
        .unwrap();
        let e = check_static(&text).unwrap_err().to_string();
        let _ = std::fs::remove_file(&text);
        assert!(e.contains("not an ELF"), "{e}");
    }

    #[test]
    fn firecracker_mode_gets_the_id() {
        let argv = |vmm: [&str; 2]| {
            let mut all = vec![
                "j",
                "--id",
                "a",
                "--exec-file",
                "/e",
                "--uid",
                "1",
                "--gid",
                "1",
            ];
            all.push("--");
            all.extend(vmm);
            vmm_argv(&Args::parse_from(all), "e")
        };
        assert_eq!(
            argv(["--api-sock", "/s"]),
            ["e", "--id", "a", "--api-sock", "/s"]
        );
        assert_eq!(argv(["--kernel", "/k"]), ["e", "--kernel", "/k"]);
    }
}
