//! The VMMs under test and how each is asked to boot a guest.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Boot protocol of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// Xen PVH (32-bit entry from the ELF note).
    Pvh,
    /// Linux 64-bit boot protocol (ELF `e_entry` in long mode).
    Linux64,
}

impl Protocol {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "PVH",
            Protocol::Linux64 => "Linux 64-bit",
        }
    }
}

/// A guest to boot.
#[derive(Clone, Debug)]
pub struct Guest {
    /// ELF with the PVH note (and a 64-bit `e_entry`).
    pub kernel: PathBuf,
    /// The same code without the PVH note, for VMMs that always take PVH when offered and
    /// have no switch to refuse it (Firecracker). `None`: use `kernel`.
    pub kernel_no_pvh: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Entry protocol.
    pub protocol: Protocol,
}

/// Which VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The `ember` binary, static release build.
    Ember,
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// Firecracker (`FIRECRACKER=/path`), `--no-api --config-file`.
    Firecracker,
    /// Cloud Hypervisor (`CLOUD_HYPERVISOR=/path`), `--kernel` with the serial console on
    /// stdout. It reboots the guest on a reset, so a null guest's run is timed to its first
    /// line and then killed (no exit time).
    CloudHypervisor,
}

/// One VMM binary.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Which VMM.
    pub kind: Kind,
    /// Name in tables ("Ember", "QEMU 7.2.x microvm", ...).
    pub name: String,
    /// The executable.
    pub bin: PathBuf,
    /// Where generated config files go.
    pub scratch: PathBuf,
    /// Flags added to every command (Ember and Firecracker: `--no-seccomp`, for what the
    /// seccomp filters cost).
    pub flags: Vec<String>,
}

impl Peer {
    /// The command that boots `g`, or why this VMM cannot boot it.
    pub fn command(&self, g: &Guest) -> Result<Command, String> {
        match self.kind {
            Kind::Ember => {
                let mut c = Command::new(&self.bin);
                c.arg("--kernel")
                    .arg(&g.kernel)
                    .arg("--cmdline")
                    .arg(&g.cmdline)
                    .arg("--memory-mib")
                    .arg(g.mem_mib.to_string())
                    .arg("--vcpus")
                    .arg(g.vcpus.to_string());
                if g.protocol == Protocol::Linux64 {
                    c.args(["--boot-protocol", "linux64"]);
                }
                c.args(&self.flags);
                Ok(c)
            }
            Kind::Qemu => {
                if g.protocol == Protocol::Linux64 {
                    return Err("QEMU's direct kernel boot enters ELF kernels only through \
                                the PVH note (no 64-bit entry)"
                        .into());
                }
                let mut c = Command::new(&self.bin);
                c.args(QEMU_ARGS)
                    .arg("-m")
                    .arg(g.mem_mib.to_string())
                    .arg("-smp")
                    .arg(g.vcpus.to_string())
                    .arg("-kernel")
                    .arg(&g.kernel)
                    .arg("-append")
                    .arg(&g.cmdline);
                Ok(c)
            }
            Kind::Firecracker => {
                let kernel = match g.protocol {
                    Protocol::Pvh => &g.kernel,
                    Protocol::Linux64 => g.kernel_no_pvh.as_ref().unwrap_or(&g.kernel),
                };
                let cfg = firecracker_config(kernel, &g.cmdline, g.mem_mib, g.vcpus);
                let path = self.scratch.join(format!(
                    "firecracker-{}-{}mib-{}vcpu-{}.json",
                    match g.protocol {
                        Protocol::Pvh => "pvh",
                        Protocol::Linux64 => "linux64",
                    },
                    g.mem_mib,
                    g.vcpus,
                    kernel
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                // Written aside and renamed into place: workers of the rate section start
                // Firecrackers with the same file concurrently, and one must never read it
                // half written.
                static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let aside = path.with_extension(format!("json.{}-{n}", std::process::id()));
                std::fs::write(&aside, cfg)
                    .and_then(|()| std::fs::rename(&aside, &path))
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                let mut c = Command::new(&self.bin);
                c.arg("--no-api")
                    .arg("--config-file")
                    .arg(&path)
                    .args(["--level", "Error"])
                    .args(&self.flags);
                Ok(c)
            }
            Kind::CloudHypervisor => {
                if g.protocol == Protocol::Linux64 {
                    return Err("Cloud Hypervisor enters ELF kernels only through the PVH \
                                note (no 64-bit entry)"
                        .into());
                }
                let mut c = Command::new(&self.bin);
                c.arg("--kernel")
                    .arg(&g.kernel)
                    .arg("--cmdline")
                    .arg(&g.cmdline)
                    .arg("--memory")
                    .arg(format!("size={}M", g.mem_mib))
                    .arg("--cpus")
                    .arg(format!("boot={}", g.vcpus))
                    .args(["--serial", "tty", "--console", "off"])
                    .args(&self.flags);
                Ok(c)
            }
        }
    }
}

/// QEMU's fixed arguments (the machine, without memory, vCPUs, kernel and command line).
pub const QEMU_ARGS: &[&str] = &[
    "-M",
    "microvm",
    "-enable-kvm",
    "-cpu",
    "host,-arch-capabilities",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
];

/// A Firecracker configuration file (`--config-file`) for a kernel-only VM: no drives, no
/// network, serial console on stdout. Firecracker takes the PVH entry when the ELF has the
/// note and the 64-bit Linux entry otherwise.
pub fn firecracker_config(kernel: &Path, cmdline: &str, mem_mib: u64, vcpus: u8) -> String {
    format!(
        r#"{{
  "boot-source": {{
    "kernel_image_path": {kernel},
    "boot_args": {cmdline}
  }},
  "drives": [],
  "machine-config": {{
    "vcpu_count": {vcpus},
    "mem_size_mib": {mem_mib},
    "smt": false
  }}
}}
"#,
        kernel = json_string(&kernel.to_string_lossy()),
        cmdline = json_string(cmdline),
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The version line a binary prints for `--version` (best effort).
pub fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peers' command lines for real: the null guest booted by Firecracker (`FIRECRACKER`
    /// or `EMBER_FIRECRACKER`) from the generated config file, through both entries, and by
    /// Cloud Hypervisor (`CLOUD_HYPERVISOR`), each to its `NULL` line. Skipped, with a line on
    /// stderr, where neither binary is given (they are built outside the repository).
    #[test]
    fn the_generated_commands_boot_the_null_guest_under_the_peers() {
        use super::super::measure;
        use super::super::null_elf::{self, Entries, NullMode};
        let env = |names: &[&str]| names.iter().find_map(std::env::var_os).map(PathBuf::from);
        let fc = env(&["FIRECRACKER", "EMBER_FIRECRACKER"]);
        let ch = env(&["CLOUD_HYPERVISOR", "EMBER_CLOUD_HYPERVISOR"]);
        if fc.is_none() && ch.is_none() {
            eprintln!(
                "SKIPPED the_generated_commands_boot_the_null_guest_under_the_peers: \
                 neither FIRECRACKER nor CLOUD_HYPERVISOR is set"
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pvh = dir.join("null-pvh.elf");
        let nopvh = dir.join("null-linux64.elf");
        std::fs::write(
            &pvh,
            null_elf::build(NullMode::Exit, Entries::PvhAndLinux64),
        )
        .unwrap();
        std::fs::write(
            &nopvh,
            null_elf::build(NullMode::Exit, Entries::Linux64Only),
        )
        .unwrap();
        let peers = [(Kind::Firecracker, fc), (Kind::CloudHypervisor, ch)];
        for (kind, bin) in peers {
            let Some(bin) = bin else { continue };
            let peer = Peer {
                kind,
                name: format!("{kind:?}"),
                bin,
                scratch: dir.clone(),
                flags: Vec::new(),
            };
            for protocol in [Protocol::Pvh, Protocol::Linux64] {
                let g = Guest {
                    kernel: pvh.clone(),
                    kernel_no_pvh: Some(nopvh.clone()),
                    cmdline: "console=ttyS0".into(),
                    mem_mib: 128,
                    vcpus: 2,
                    protocol,
                };
                let Ok(mut cmd) = peer.command(&g) else {
                    assert_eq!(kind, Kind::CloudHypervisor, "{protocol:?}");
                    continue;
                };
                let opts = measure::Options {
                    line: Some(null_elf::LINE.into()),
                    timeout: std::time::Duration::from_secs(20),
                    sample_memory: None,
                    stop_after_line: kind == Kind::CloudHypervisor,
                    guest_bytes: 128 << 20,
                };
                let run = measure::run(&mut cmd, &opts).unwrap();
                assert!(
                    run.first_line.is_some(),
                    "{kind:?} {protocol:?}: no NULL line: {}",
                    run.failure()
                );
                if kind == Kind::Firecracker {
                    assert!(run.ok(), "{protocol:?}: {}", run.failure());
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn firecracker_config_is_json_shaped() {
        let c = firecracker_config(Path::new("/k \"x\""), "a=b\\c", 128, 2);
        assert!(c.contains(r#""kernel_image_path": "/k \"x\"""#));
        assert!(c.contains(r#""boot_args": "a=b\\c""#));
        assert!(c.contains(r#""vcpu_count": 2"#));
        assert!(c.contains(r#""mem_size_mib": 128"#));
    }

    #[test]
    fn qemu_command_line() {
        assert_eq!(QEMU_ARGS[1], "microvm");
        assert!(QEMU_ARGS.contains(&"-no-reboot"));
    }
}
