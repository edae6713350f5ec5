//! Optional: Debian's cloud kernel (`linux-image-<ver>-cloud-amd64`), a bzImage. Downloaded
//! and unpacked only; never installed.

use std::fs;
use std::process::Command;

use super::host;
use super::kernel::bzimage_version;
use super::Layout;

/// Meta-package whose `Depends` names the current cloud kernel package.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The real package behind the meta-package, from `apt-cache depends` output.
pub fn resolve_package(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|l| {
        let name = l.trim().strip_prefix("Depends:")?.trim();
        let name = name.trim_start_matches('<').trim_end_matches('>');
        (name.starts_with("linux-image-") && name.ends_with("-cloud-amd64") && name != META_PACKAGE)
            .then(|| name.to_owned())
    })
}

fn query() -> Option<String> {
    let out = host::output(Command::new("apt-cache").args(["depends", META_PACKAGE])).ok()?;
    resolve_package(&out)
}

/// Fetches the cloud kernel to `<out>/debian-cloud-bzImage` (cached by package name).
pub fn ensure(layout: &Layout) -> Result<(), String> {
    let pkg = match query() {
        Some(p) => p,
        None => {
            host::apt_update()?;
            query().ok_or_else(|| format!("`apt-cache depends {META_PACKAGE}` names no kernel"))?
        }
    };
    let out = layout.out.join("debian-cloud-bzImage");
    let stamp = layout.out.join("debian-cloud.stamp");
    if out.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == pkg) {
        eprintln!("guest: {pkg} up to date");
        return Ok(());
    }
    let debs = layout.work.join("debs");
    let deb = match host::find_deb(&debs, &pkg)? {
        Some(deb) => deb,
        None => host::apt_download(&pkg, &debs)?,
    };
    let tmp = layout.work.join("debian-cloud.tmp");
    host::dpkg_extract(&deb, &tmp)?;
    let boot = tmp.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .map_err(|e| format!("{}: {e}", boot.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("no boot/vmlinuz-* in {}", deb.display()))?;
    let image = fs::read(&vmlinuz).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;
    bzimage_version(&image).map_err(|e| format!("{}: {e}", vmlinuz.display()))?;
    host::copy_atomic(&vmlinuz, &out)?;
    host::remove_dir(&tmp)?;
    host::write_if_changed(&stamp, format!("{pkg}\n").as_bytes())?;
    eprintln!("guest: {} from {pkg}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_from_apt_cache_output() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-41-cloud-amd64\n";
        assert_eq!(
            resolve_package(out).as_deref(),
            Some("linux-image-6.1.0-41-cloud-amd64")
        );
        let virtual_dep = "linux-image-cloud-amd64\n  Depends: <linux-image-6.1.0-9-cloud-amd64>\n";
        assert_eq!(
            resolve_package(virtual_dep).as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
        assert_eq!(
            resolve_package("linux-image-cloud-amd64\n  Recommends: foo\n"),
            None
        );
        assert_eq!(resolve_package(""), None);
    }
}
