//! `cargo xtask probe`: build the probe guest (`guest/probe`) and copy the ELF to
//! `target/probe/probe.elf`.
//!
//! Target selection, in order:
//! 1. `x86_64-unknown-none` if its standard library is installed (soft-float, no red zone;
//!    the intended target);
//! 2. otherwise `rustup target add x86_64-unknown-none`, then (1);
//! 3. otherwise the host target with SSE/MMX disabled, soft-float, a static non-PIE link
//!    without the C runtime, and the same linker script. This fallback compiles with
//!    rustc warnings about the ABI-relevant target features (the host target's `core` is
//!    prebuilt with SSE; the probe's own code is not) and is a last resort.
//!
//! `--host-target` forces (3), for testing the fallback.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";
const MANIFEST: &str = "guest/probe/Cargo.toml";
const TARGET_DIR: &str = "target/probe-build";
const OUT_DIR: &str = "target/probe";
const OUT_FILE: &str = "probe.elf";
/// Code generation flags for the host-target fallback.
const FALLBACK_RUSTFLAGS: &[&str] = &[
    // No `+soft-float`/`-mmx`: rustc ignores both on this target (with a warning).
    "-Ctarget-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
    "-Crelocation-model=static",
    "-Ccode-model=small",
    "-Cpanic=abort",
];

/// `cargo xtask probe`.
#[derive(clap::Args, Default)]
pub struct Args {
    /// Use the host-target fallback (SSE off, soft-float) instead of x86_64-unknown-none.
    #[arg(long)]
    pub host_target: bool,
}

/// Entry point of `cargo xtask probe`.
pub fn run(args: &Args) -> Result<(), String> {
    let out = build_with(args.host_target)?;
    println!("{}", out.display());
    Ok(())
}

/// Builds the probe for the intended target (or the fallback) and returns the ELF's path.
pub fn build() -> Result<PathBuf, String> {
    build_with(false)
}

fn build_with(force_host: bool) -> Result<PathBuf, String> {
    let root = crate::workspace_root();
    let built = if force_host {
        build_host_fallback(&root)?
    } else if target_installed(&root) || rustup_target_add(&root) {
        build_for(&root, TARGET, &[])?
    } else {
        eprintln!(
            "xtask probe: {TARGET} is not installed and `rustup target add {TARGET}` failed; \
             falling back to the host target with SSE disabled"
        );
        build_host_fallback(&root)?
    };

    let out_dir = root.join(OUT_DIR);
    fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let out = out_dir.join(OUT_FILE);
    fs::copy(&built, &out)
        .map_err(|e| format!("cannot copy {} to {}: {e}", built.display(), out.display()))?;
    let image = fs::read(&out).map_err(|e| format!("cannot read {}: {e}", out.display()))?;
    let info = check_elf(&image).map_err(|e| format!("{}: {e}", out.display()))?;
    eprintln!(
        "xtask probe: {} bytes, linux64 entry {:#x}, pvh entry {:#x}",
        image.len(),
        info.entry,
        info.pvh_entry
    );
    Ok(out)
}

fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Whether `rustc` has the standard library for `x86_64-unknown-none`.
fn target_installed(root: &Path) -> bool {
    let Ok(output) = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(root)
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_string();
    output.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib")
            .join(TARGET)
            .join("lib")
            .is_dir()
}

fn rustup_target_add(root: &Path) -> bool {
    eprintln!("xtask probe: {TARGET} not installed, trying `rustup target add {TARGET}`");
    Command::new("rustup")
        .args(["target", "add", TARGET])
        .current_dir(root)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn host_triple(root: &Path) -> Result<String, String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .current_dir(root)
        .output()
        .map_err(|e| format!("cannot run rustc -vV: {e}"))?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .ok_or_else(|| "rustc -vV printed no host triple".into())
}

fn build_host_fallback(root: &Path) -> Result<PathBuf, String> {
    let host = host_triple(root)?;
    if !host.starts_with("x86_64-") {
        return Err(format!(
            "the probe is an x86_64 guest; host target `{host}` cannot stand in for {TARGET}"
        ));
    }
    build_for(root, &host, FALLBACK_RUSTFLAGS)
}

/// Runs `cargo build` for the probe and returns the path of the built ELF.
fn build_for(root: &Path, target: &str, rustflags: &[&str]) -> Result<PathBuf, String> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root).args([
        "build",
        "--release",
        "--manifest-path",
        MANIFEST,
        "--target",
        target,
        "--target-dir",
        TARGET_DIR,
    ]);
    // Flags meant for host builds must not leak into the guest build.
    cmd.env_remove("RUSTFLAGS");
    if rustflags.is_empty() {
        cmd.env_remove("CARGO_ENCODED_RUSTFLAGS");
    } else {
        cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"));
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build of the probe for {target} failed"));
    }
    let built = root
        .join(TARGET_DIR)
        .join(target)
        .join("release")
        .join("probe");
    if !built.is_file() {
        return Err(format!(
            "build succeeded but {} is missing",
            built.display()
        ));
    }
    Ok(built)
}

/// What `check_elf` found.
struct ElfInfo {
    entry: u64,
    pvh_entry: u32,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Sanity checks: ELF64 x86_64 executable whose PT_NOTE carries the Xen PVH entry note.
fn check_elf(b: &[u8]) -> Result<ElfInfo, String> {
    const ET_EXEC: u16 = 2;
    const EM_X86_64: u16 = 62;
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let short = || "truncated ELF".to_string();
    if b.get(0..4) != Some(b"\x7fELF".as_slice()) || b.get(4) != Some(&2) {
        return Err("not an ELF64 file".into());
    }
    if u16_at(b, 16).ok_or_else(short)? != ET_EXEC || u16_at(b, 18).ok_or_else(short)? != EM_X86_64
    {
        return Err("not an x86_64 ET_EXEC ELF".into());
    }
    let entry = u64_at(b, 24).ok_or_else(short)?;
    let phoff = u64_at(b, 32).ok_or_else(short)? as usize;
    let phentsize = usize::from(u16_at(b, 54).ok_or_else(short)?);
    let phnum = usize::from(u16_at(b, 56).ok_or_else(short)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(b, ph).ok_or_else(short)? != PT_NOTE {
            continue;
        }
        let off = u64_at(b, ph + 8).ok_or_else(short)? as usize;
        let size = u64_at(b, ph + 32).ok_or_else(short)? as usize;
        let mut pos = off;
        while pos + 12 <= off + size {
            let namesz = u32_at(b, pos).ok_or_else(short)? as usize;
            let descsz = u32_at(b, pos + 4).ok_or_else(short)? as usize;
            let kind = u32_at(b, pos + 8).ok_or_else(short)?;
            let name = b.get(pos + 12..pos + 12 + namesz).ok_or_else(short)?;
            let desc = pos + 12 + namesz.div_ceil(4) * 4;
            if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" && descsz >= 4 {
                let pvh_entry = u32_at(b, desc).ok_or_else(short)?;
                return Ok(ElfInfo { entry, pvh_entry });
            }
            pos = desc + descsz.div_ceil(4) * 4;
        }
    }
    Err("no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY) in a PT_NOTE segment".into())
}
