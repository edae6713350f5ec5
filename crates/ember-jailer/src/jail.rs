//! The chroot: a new mount namespace, the VMM and the given files bind-mounted in, three
//! device nodes, then `pivot_root` with the old root detached.

use std::ffi::CString;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::{c_path, JailError};

/// The device nodes a VMM needs: path in the chroot, major, minor.
const DEVICES: [(&str, u32, u32); 3] = [
    ("dev/kvm", 10, 232),
    ("dev/net/tun", 10, 200),
    ("dev/urandom", 1, 9),
];

fn mount(
    src: Option<&Path>,
    target: &Path,
    flags: libc::c_ulong,
    what: &str,
) -> Result<(), JailError> {
    let src_c = src.map(|s| c_path(s, what)).transpose()?;
    let target_c = c_path(target, what)?;
    // SAFETY: NUL-terminated paths (or null) that outlive the call; no filesystem type or
    // data for a bind or propagation change.
    let r = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(JailError::last(format!(
            "{what}: mount {}",
            target.display()
        )));
    }
    Ok(())
}

/// Bind-mounts the file `src` at `target` (an empty file made for it), read-only if asked.
fn bind_file(src: &Path, target: &Path, read_only: bool) -> Result<(), JailError> {
    let what = format!("bind {}", src.display());
    let meta = std::fs::metadata(src).map_err(|e| JailError::io(what.clone(), e))?;
    if !meta.is_file() {
        return Err(JailError::Usage(format!(
            "--file {}: not a regular file",
            src.display()
        )));
    }
    std::fs::File::create(target).map_err(|e| JailError::io(target.display().to_string(), e))?;
    mount(Some(src), target, libc::MS_BIND, &what)?;
    if read_only {
        mount(
            None,
            target,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            &what,
        )?;
    }
    Ok(())
}

fn mknod(
    root: &Path,
    rel: &str,
    major: u32,
    minor: u32,
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| JailError::io(dir.display().to_string(), e))?;
    }
    let _ = std::fs::remove_file(&path);
    let c = c_path(&path, "mknod")?;
    // SAFETY: mknod of a character device at a NUL-terminated path.
    if unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    } != 0
    {
        return Err(JailError::last(format!("mknod {}", path.display())));
    }
    chown(&path, Some(uid), Some(gid)).map_err(|e| JailError::io(path.display().to_string(), e))?;
    Ok(())
}

fn pivot_root(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(|e| JailError::io(root.display().to_string(), e))?;
    let old = PathBuf::from("old_root");
    let _ = std::fs::create_dir(&old);
    let dot = CString::new(".").unwrap_or_default();
    let old_c = c_path(&old, "pivot_root")?;
    // SAFETY: pivot_root with two NUL-terminated paths: the new root is a mount point (bound
    // onto itself) in this process's own mount namespace.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old_c.as_ptr()) } != 0 {
        return Err(JailError::last(format!("pivot_root {}", root.display())));
    }
    std::env::set_current_dir("/").map_err(|e| JailError::io("chdir /", e))?;
    let old_abs = c_path(Path::new("/old_root"), "umount")?;
    // SAFETY: detaches the old root (lazily: nothing of the jail keeps it busy).
    if unsafe { libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::last("umount /old_root"));
    }
    std::fs::remove_dir("/old_root").map_err(|e| JailError::io("rmdir /old_root", e))?;
    Ok(())
}

/// Builds the chroot at `root` and moves the process into it, in a new mount namespace.
pub fn enter(
    root: &Path,
    exec_file: &Path,
    exec_name: &str,
    files: &[PathBuf],
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    // SAFETY: unshare with a flag; the process gets its own copy of the mount table.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(JailError::last("unshare(CLONE_NEWNS)"));
    }
    // Nothing mounted from here on reaches the host's mount table.
    mount(
        None,
        Path::new("/"),
        libc::MS_SLAVE | libc::MS_REC,
        "the mount namespace",
    )?;
    std::fs::create_dir_all(root).map_err(|e| JailError::io(root.display().to_string(), e))?;
    // pivot_root needs the new root to be a mount point.
    mount(Some(root), root, libc::MS_BIND | libc::MS_REC, "the chroot")?;
    for (rel, major, minor) in DEVICES {
        mknod(root, rel, major, minor, uid, gid)?;
    }
    bind_file(exec_file, &root.join(exec_name), true)?;
    let mut names = vec![exec_name.to_string()];
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| JailError::Usage(format!("--file {}: no file name", f.display())))?;
        if names.contains(&name) || name == "dev" {
            return Err(JailError::Usage(format!(
                "--file {}: a file called {name} is already in the chroot",
                f.display()
            )));
        }
        bind_file(f, &root.join(&name), false)?;
        names.push(name);
    }
    // The VMM's user owns the chroot's root (it makes its sockets there).
    chown(root, Some(uid), Some(gid)).map_err(|e| JailError::io(root.display().to_string(), e))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| JailError::io(root.display().to_string(), e))?;
    pivot_root(root)
}
