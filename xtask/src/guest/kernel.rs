//! The guest kernel: Debian's linux-source-6.1, `tinyconfig` + `guest/linux/microvm.config`.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use super::host;
use super::Layout;

/// Debian package holding the kernel source tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Tarball inside [`SOURCE_PACKAGE`].
const SOURCE_TARBALL: &str = "usr/src/linux-source-6.1.tar.xz";
/// Top directory of the tarball.
const SOURCE_DIR: &str = "linux-source-6.1";

/// Host packages the kernel build needs (checked with `dpkg -s`, installed when missing).
/// No libssl-dev: with MODULES and the trusted keyring off, no host tool links OpenSSL.
pub const BUILD_DEPS: &[&str] = &[
    "build-essential",
    "make",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "cpio",
    "xz-utils",
];

/// Bump when the build recipe (not the fragment) changes in a way that needs a rebuild.
const RECIPE: &str = "ember-guest-kernel-recipe-1: tinyconfig + microvm.config, ARCH=x86_64";

/// Options that must be `=y` in the fragment and in the final `.config`: the guest does not
/// work without them, so a fragment edit that drops one is an error, not a silent change.
pub const REQUIRED_Y: &[&str] = &[
    "64BIT",
    "SMP",
    "PRINTK",
    "PRINTK_TIME",
    "EARLY_PRINTK",
    "TTY",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "HYPERVISOR_GUEST",
    "PARAVIRT",
    "KVM_GUEST",
    "PVH",
    "ACPI",
    "BLK_DEV_INITRD",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "PROC_FS",
    "SYSFS",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "DEVPORT",
    "VIRTIO_MMIO",
    "VIRTIO_MMIO_CMDLINE_DEVICES",
    "BLOCK",
    "VIRTIO_BLK",
    "EXT4_FS",
];
/// Options that must stay unset.
pub const REQUIRED_OFF: &[&str] = &["MODULES"];

/// Xen ELF note type of the 32-bit PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What a config line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// `CONFIG_X=value`.
    Value(String),
    /// `# CONFIG_X is not set`.
    Unset,
}

/// Parses a `.config` or fragment into option name (without `CONFIG_`) -> wanted state.
/// Other comments and blank lines are skipped.
pub fn parse_config(text: &str) -> BTreeMap<String, Want> {
    let mut map = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                map.insert(name.to_owned(), Want::Unset);
            }
        } else if let Some(rest) = line.strip_prefix("CONFIG_") {
            if let Some((name, value)) = rest.split_once('=') {
                map.insert(name.to_owned(), Want::Value(value.to_owned()));
            }
        }
    }
    map
}

/// Checks that the fragment keeps the required options and that `final_config` (the
/// `.config` after olddefconfig) has every value the fragment asks for.
pub fn verify_config(fragment: &str, final_config: &str) -> Result<(), String> {
    let frag = parse_config(fragment);
    let fin = parse_config(final_config);
    let mut problems = Vec::new();
    for name in REQUIRED_Y {
        if frag.get(*name) != Some(&Want::Value("y".into())) {
            problems.push(format!("fragment must set CONFIG_{name}=y"));
        }
    }
    for name in REQUIRED_OFF {
        if frag.get(*name) != Some(&Want::Unset) {
            problems.push(format!("fragment must have `# CONFIG_{name} is not set`"));
        }
    }
    for (name, want) in &frag {
        let got = fin.get(name);
        match want {
            Want::Value(v) => {
                if got != Some(want) {
                    let got = match got {
                        Some(Want::Value(g)) => format!("={g}"),
                        _ => " unset (dependency missing?)".into(),
                    };
                    problems.push(format!("CONFIG_{name}={v} wanted, final .config has{got}"));
                }
            }
            Want::Unset => {
                if let Some(Want::Value(g)) = got {
                    problems.push(format!(
                        "CONFIG_{name} should be unset, final .config has ={g} (selected by another option?)"
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "kernel config check failed:\n  {}",
            problems.join("\n  ")
        ))
    }
}

/// Finds the Xen PVH entry note in an ELF64 little-endian image and returns the entry
/// address it holds.
pub fn pvh_entry(elf: &[u8]) -> Result<u64, String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not an ELF64 little-endian file".into());
    }
    let bad = || "truncated ELF headers".to_string();
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph).ok_or_else(bad)? != 4 {
            continue; // not PT_NOTE
        }
        let start = u64_at(ph + 8).ok_or_else(bad)? as usize;
        let size = u64_at(ph + 0x20).ok_or_else(bad)? as usize;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= elf.len())
            .ok_or_else(bad)?;
        let mut off = start;
        while off + 12 <= end {
            let namesz = u32_at(off).ok_or_else(bad)? as usize;
            let descsz = u32_at(off + 4).ok_or_else(bad)? as usize;
            let ntype = u32_at(off + 8).ok_or_else(bad)?;
            let name_at = off + 12;
            let desc_at = name_at + ((namesz + 3) & !3);
            let next = desc_at + ((descsz + 3) & !3);
            if next > end {
                break;
            }
            if elf.get(name_at..name_at + namesz) == Some(b"Xen\0")
                && ntype == XEN_ELFNOTE_PHYS32_ENTRY
            {
                return match descsz {
                    4 => Ok(u64::from(u32_at(desc_at).ok_or_else(bad)?)),
                    8 => u64_at(desc_at).ok_or_else(bad),
                    n => Err(format!("Xen PHYS32_ENTRY note has a {n}-byte descriptor")),
                };
            }
            off = next;
        }
    }
    Err("no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY): is CONFIG_PVH set?".into())
}

/// Checks the bzImage boot sector signature and the "HdrS" setup header magic and returns
/// the boot protocol version.
pub fn bzimage_version(image: &[u8]) -> Result<u16, String> {
    if image.len() < 0x208 || image[0x1fe..0x200] != [0x55, 0xaa] || &image[0x202..0x206] != b"HdrS"
    {
        return Err("not a bzImage (no 0xAA55 boot signature / HdrS magic)".into());
    }
    Ok(u16::from_le_bytes([image[0x206], image[0x207]]))
}

/// Cache key of a kernel build: the recipe version and the options the fragment sets (so
/// editing comments or reordering lines does not rebuild).
pub fn fragment_hash(fragment: &str) -> u64 {
    let mut options = String::new();
    for (name, want) in parse_config(fragment) {
        match want {
            Want::Value(v) => options.push_str(&format!("CONFIG_{name}={v}\n")),
            Want::Unset => options.push_str(&format!("# CONFIG_{name} is not set\n")),
        }
    }
    host::fnv1a64(&[RECIPE.as_bytes(), options.as_bytes()])
}

/// Builds (or finds cached) `vmlinux` and `bzImage` in the output directory.
pub fn ensure(layout: &Layout) -> Result<(), String> {
    let fragment_path = layout.fragment();
    let fragment = host::read_text(&fragment_path)?;
    let hash = fragment_hash(&fragment);
    let stamp_line = format!("config-hash={hash:016x}");
    let stamp = layout.out.join("kernel.stamp");
    let vmlinux = layout.out.join("vmlinux");
    let bzimage = layout.out.join("bzImage");
    let cached = fs::read_to_string(&stamp).is_ok_and(|s| s.lines().any(|l| l == stamp_line));
    if cached && vmlinux.is_file() && bzimage.is_file() {
        eprintln!("guest: kernel up to date ({stamp_line})");
        return Ok(());
    }
    // Check the fragment itself before downloading anything.
    verify_config(&fragment, &fragment).map_err(|e| format!("{}: {e}", fragment_path.display()))?;

    host::ensure_installed(BUILD_DEPS)?;
    let (src, deb) = ensure_source(layout)?;
    let build = layout.work.join("linux-build");
    fs::create_dir_all(&build).map_err(|e| format!("cannot create {}: {e}", build.display()))?;
    let log = layout.work.join("kernel-build.log");
    let _ = fs::remove_file(&log);

    let started = Instant::now();
    let make = |targets: &[&str]| {
        let mut c = Command::new("nice");
        c.args(["-n", "19", "make", "-C"])
            .arg(&src)
            .arg(format!("O={}", build.display()))
            .args([
                "ARCH=x86_64",
                "KBUILD_BUILD_USER=ember",
                "KBUILD_BUILD_HOST=ember",
            ])
            .args(targets);
        c
    };
    eprintln!(
        "guest: configuring the kernel (tinyconfig + {})",
        fragment_path.display()
    );
    host::run_logged(&mut make(&["tinyconfig"]), &log)?;
    let config = build.join(".config");
    host::run_logged(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .args(["-m", "-O"])
            .arg(&build)
            .arg(&config)
            .arg(&fragment_path),
        &log,
    )?;
    host::run_logged(&mut make(&["olddefconfig"]), &log)?;
    let final_config = host::read_text(&config)?;
    verify_config(&fragment, &final_config)?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!(
        "guest: building vmlinux and bzImage (make -j{jobs}, nice 19; log: {})",
        log.display()
    );
    host::run_logged(
        &mut make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]),
        &log,
    )?;
    eprintln!(
        "guest: kernel built in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );

    let built_vmlinux = build.join("vmlinux");
    let built_bzimage = build.join("arch/x86/boot/bzImage");
    let elf = fs::read(&built_vmlinux)
        .map_err(|e| format!("cannot read {}: {e}", built_vmlinux.display()))?;
    let entry = pvh_entry(&elf).map_err(|e| format!("{}: {e}", built_vmlinux.display()))?;
    let bz = fs::read(&built_bzimage)
        .map_err(|e| format!("cannot read {}: {e}", built_bzimage.display()))?;
    let version = bzimage_version(&bz).map_err(|e| format!("{}: {e}", built_bzimage.display()))?;
    eprintln!(
        "guest: vmlinux PVH entry {entry:#x}; bzImage boot protocol {}.{:02}",
        version >> 8,
        version & 0xff
    );

    host::copy_atomic(&built_vmlinux, &vmlinux)?;
    host::copy_atomic(&built_bzimage, &bzimage)?;
    host::write_if_changed(&layout.out.join("kernel.config"), final_config.as_bytes())?;
    let deb_name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    host::write_if_changed(
        &stamp,
        format!("{stamp_line}\nsource={deb_name}\npvh-entry={entry:#x}\n").as_bytes(),
    )?;
    Ok(())
}

/// Downloads and unpacks the kernel source (once); returns the source tree and the `.deb`.
fn ensure_source(layout: &Layout) -> Result<(PathBuf, PathBuf), String> {
    let debs = layout.work.join("debs");
    let deb = match host::find_deb(&debs, SOURCE_PACKAGE)? {
        Some(deb) => deb,
        None => host::apt_download(SOURCE_PACKAGE, &debs)?,
    };
    let deb_name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let src = layout.work.join(SOURCE_DIR);
    let marker = src.join(".ember-unpacked");
    if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == deb_name) {
        return Ok((src, deb));
    }
    eprintln!("guest: unpacking {deb_name}");
    host::remove_dir(&src)?;
    // A new source tree invalidates every object of the old one.
    host::remove_dir(&layout.work.join("linux-build"))?;
    let pkg = layout.work.join("linux-source-pkg.tmp");
    host::dpkg_extract(&deb, &pkg)?;
    let unpack = layout.work.join("linux-source-unpack.tmp");
    host::remove_dir(&unpack)?;
    fs::create_dir_all(&unpack).map_err(|e| format!("cannot create {}: {e}", unpack.display()))?;
    host::run(
        Command::new("tar")
            .arg("-xf")
            .arg(pkg.join(SOURCE_TARBALL))
            .arg("-C")
            .arg(&unpack),
    )?;
    fs::rename(unpack.join(SOURCE_DIR), &src)
        .map_err(|e| format!("cannot move the unpacked source to {}: {e}", src.display()))?;
    host::remove_dir(&unpack)?;
    host::remove_dir(&pkg)?;
    fs::write(&marker, format!("{deb_name}\n"))
        .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    Ok((src, deb))
}

/// The fragment as shipped must pass its own check; tests for the helpers above.
#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fragment() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/linux/microvm.config");
        fs::read_to_string(path).unwrap()
    }

    #[test]
    fn shipped_fragment_has_required_options() {
        let f = fragment();
        verify_config(&f, &f).unwrap();
        let parsed = parse_config(&f);
        assert_eq!(
            parsed.get("PCI"),
            Some(&Want::Value("y".into())),
            "DEVPORT needs PCI on 6.1"
        );
        assert_eq!(parsed.get("SERIO_I8042"), Some(&Want::Unset));
    }

    #[test]
    fn verify_reports_lost_and_selected_options() {
        let f = fragment();
        let mut fin = f.replace("CONFIG_PVH=y", "# CONFIG_PVH is not set");
        fin.push_str("CONFIG_MODULES=y\n");
        let err = verify_config(&f, &fin).unwrap_err();
        assert!(err.contains("CONFIG_PVH=y wanted"), "{err}");
        assert!(err.contains("CONFIG_MODULES should be unset"), "{err}");
        let trimmed = f.replace("CONFIG_DEVPORT=y", "");
        let err = verify_config(&trimmed, &trimmed).unwrap_err();
        assert!(err.contains("fragment must set CONFIG_DEVPORT=y"), "{err}");
    }

    #[test]
    fn hash_ignores_comments_and_order_only() {
        let a = "# x\nCONFIG_A=y\n# CONFIG_B is not set\n";
        let b = "# CONFIG_B is not set\n\n# other comment\nCONFIG_A=y\n";
        assert_eq!(fragment_hash(a), fragment_hash(b));
        assert_ne!(fragment_hash(a), fragment_hash("CONFIG_A=y\n"));
        assert_ne!(
            fragment_hash(a),
            fragment_hash("CONFIG_A=n\n# CONFIG_B is not set\n")
        );
    }

    #[test]
    fn parse_config_lines() {
        let m = parse_config("CONFIG_A=y\n# CONFIG_B is not set\n# comment\nCONFIG_C=\"x=y\"\n");
        assert_eq!(m.get("A"), Some(&Want::Value("y".into())));
        assert_eq!(m.get("B"), Some(&Want::Unset));
        assert_eq!(m.get("C"), Some(&Want::Value("\"x=y\"".into())));
        assert_eq!(m.len(), 3);
    }

    /// A minimal ELF64 with one PT_NOTE segment holding a GNU note then the Xen PVH note.
    fn elf_with_notes(pvh_desc: &[u8]) -> Vec<u8> {
        let mut notes = Vec::new();
        let mut note = |name: &[u8], ty: u32, desc: &[u8]| {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&ty.to_le_bytes());
            notes.extend_from_slice(name);
            notes.resize((notes.len() + 3) & !3, 0);
            notes.extend_from_slice(desc);
            notes.resize((notes.len() + 3) & !3, 0);
        };
        note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, pvh_desc);
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(&notes);
        elf
    }

    #[test]
    fn finds_pvh_note() {
        assert_eq!(
            pvh_entry(&elf_with_notes(&0x100_0abc_u64.to_le_bytes())),
            Ok(0x100_0abc)
        );
        assert_eq!(
            pvh_entry(&elf_with_notes(&0x1234_u32.to_le_bytes())),
            Ok(0x1234)
        );
        assert!(pvh_entry(&elf_with_notes(&[1, 2])).is_err());
        let mut no_pvh = elf_with_notes(&[0; 8]);
        let n = no_pvh.len();
        no_pvh[n - 12] = b'Y'; // "Xen" -> "Yen"
        assert!(pvh_entry(&no_pvh).is_err());
        assert!(pvh_entry(b"MZ not elf").is_err());
        assert!(pvh_entry(&elf_with_notes(&[0; 8])[..100]).is_err());
    }

    #[test]
    fn bzimage_magic() {
        let mut img = vec![0u8; 0x300];
        assert!(bzimage_version(&img).is_err());
        img[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        assert_eq!(bzimage_version(&img), Ok(0x020f));
    }
}
