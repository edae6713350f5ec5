//! Host-side helpers: running commands, Debian packages (apt-get / dpkg), files, hashing.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

/// Renders a command for messages.
pub fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; error if it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", show(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({status})", show(cmd)))
    }
}

/// Like [`run`], with the command's stdout sent to our stderr, so that our stdout carries
/// only the output paths.
pub fn run_quiet_stdout(cmd: &mut Command) -> Result<(), String> {
    use std::os::fd::AsFd;
    if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
    run(cmd)
}

/// Runs `cmd` and returns its stdout; error (with stderr) if it exits non-zero.
pub fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{}`: {e}", show(cmd)))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `cmd` with stdout and stderr appended to `log`; on failure the error carries the
/// last lines of the log.
pub fn run_logged(cmd: &mut Command, log: &Path) -> Result<(), String> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let _ = writeln!(file, "$ {}", show(cmd));
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .map_err(|e| format!("cannot run `{}`: {e}", show(cmd)))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    Err(format!(
        "`{}` failed ({status}); last lines of {}:\n{tail}",
        show(cmd),
        log.display()
    ))
}

/// Whether a Debian package is installed (`dpkg -s`).
pub fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg")
        .args(["-s", pkg])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.trim() == "Status: install ok installed")
        })
        .unwrap_or(false)
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive")
        // Wait for other apt/dpkg users instead of failing on the lock.
        .args(["-o", "DPkg::Lock::Timeout=600"]);
    c
}

/// `apt-get update`.
pub fn apt_update() -> Result<(), String> {
    eprintln!("guest: apt-get update");
    run_quiet_stdout(apt_get().arg("-q").arg("update"))
}

/// Installs whichever of `pkgs` `dpkg -s` does not report as installed. Only build tools:
/// nothing here ever installs a kernel into the host.
pub fn ensure_installed(pkgs: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("guest: installing host build tools: {}", missing.join(" "));
    let install = |missing: &[&str]| {
        run(apt_get()
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing))
    };
    install(&missing)
        .or_else(|_| {
            apt_update()?;
            install(&missing)
        })
        .map_err(|e| {
            format!(
                "{e}\n(the kernel build needs: {}; install them as root)",
                missing.join(" ")
            )
        })
}

/// `apt-get download <pkg>` into `dir` (retrying after `apt-get update` when the package
/// lists are empty or stale) and returns the path of the downloaded `.deb`.
pub fn apt_download(pkg: &str, dir: &Path) -> Result<PathBuf, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    eprintln!("guest: apt-get download {pkg}");
    let download = || {
        run_quiet_stdout(
            apt_get()
                .current_dir(dir)
                // Root downloads into a directory `_apt` cannot write: skip the sandbox user
                // instead of printing a warning.
                .args(["-o", "APT::Sandbox::User=root", "-q", "download", pkg]),
        )
    };
    download().or_else(|_| {
        apt_update()?;
        download()
    })?;
    find_deb(dir, pkg)?
        .ok_or_else(|| format!("apt-get download {pkg}: no .deb in {}", dir.display()))
}

/// The newest (by modification time) `<pkg>_*.deb` in `dir`, if any.
pub fn find_deb(dir: &Path, pkg: &str) -> Result<Option<PathBuf>, String> {
    let prefix = format!("{pkg}_");
    let mut best: Option<(SystemTime, PathBuf)> = None;
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(None);
    };
    for entry in rd {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            let t = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let newer = match &best {
                Some((bt, _)) => t > *bt,
                None => true,
            };
            if newer {
                best = Some((t, entry.path()));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// `dpkg -x <deb> <dir>` into a fresh `dir`.
pub fn dpkg_extract(deb: &Path, dir: &Path) -> Result<(), String> {
    remove_dir(dir)?;
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    run_quiet_stdout(Command::new("dpkg").arg("-x").arg(deb).arg(dir))
}

/// Removes a directory tree if it exists.
pub fn remove_dir(dir: &Path) -> Result<(), String> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
    }
}

/// Reads a file into a string, mapping the error to a message.
pub fn read_text(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Writes `data` to `path` atomically (temporary file + rename) unless the file already holds
/// exactly `data`. Returns whether it wrote.
pub fn write_if_changed(path: &Path, data: &[u8]) -> Result<bool, String> {
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    fs::rename(&tmp, path).map_err(|e| format!("cannot rename to {}: {e}", path.display()))?;
    Ok(true)
}

/// Copies `from` to `to` atomically (temporary file + rename).
pub fn copy_atomic(from: &Path, to: &Path) -> Result<(), String> {
    let tmp = to.with_extension("tmp");
    fs::copy(from, &tmp)
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), tmp.display()))?;
    fs::rename(&tmp, to).map_err(|e| format!("cannot rename to {}: {e}", to.display()))
}

/// 64-bit FNV-1a: a small, stable hash for cache stamps (not for security).
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        // Length-prefix each part so ("ab","c") and ("a","bc") differ.
        for b in (part.len() as u64).to_le_bytes().iter().chain(part.iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_separates_parts() {
        // FNV-1a of the empty input is the offset basis; with the length prefix the value
        // is fixed by this implementation: pin it so stamps stay valid across builds.
        assert_eq!(fnv1a64(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"abc"]), fnv1a64(&[b"abc"]));
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
        assert_ne!(fnv1a64(&[b"CONFIG_PVH=y\n"]), fnv1a64(&[b"CONFIG_PVH=n\n"]));
    }

    #[test]
    fn write_if_changed_skips_identical() {
        let dir = std::env::temp_dir().join(format!("xtask-guest-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        assert!(write_if_changed(&p, b"one").unwrap());
        assert!(!write_if_changed(&p, b"one").unwrap());
        assert!(write_if_changed(&p, b"two").unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"two");
        fs::remove_dir_all(&dir).unwrap();
    }
}
