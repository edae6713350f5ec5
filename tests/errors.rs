//! Bad user input gives a typed error with a clear message, never a panic.

use std::io::Write;
use std::path::PathBuf;

use ember_test_support::{kvm_or_skip, probe_elf};
use ember_vmm::{Error, Vm, VmConfig};

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

fn build_err(config: VmConfig) -> Error {
    match Vm::builder(config).build() {
        Ok(_) => panic!("building the VM should have failed"),
        Err(e) => e,
    }
}

#[test]
fn missing_kernel() {
    let err = build_err(VmConfig::new("/nonexistent/vmlinux"));
    assert!(
        matches!(err, Error::Loader(ember_loader::Error::Open { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn file_that_is_not_a_kernel() {
    let path = temp_file("not-a-kernel", &[0x5a; 8192]);
    let err = build_err(VmConfig::new(&path));
    assert!(
        matches!(err, Error::Loader(ember_loader::Error::NotAKernel { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("not-a-kernel"), "{err}");
}

#[test]
fn truncated_elf_kernel() {
    let probe = std::fs::read(probe_elf()).unwrap();
    let path = temp_file("truncated.elf", &probe[..100]);
    let err = build_err(VmConfig::new(&path));
    assert!(matches!(err, Error::Loader(_)), "{err:?}");
    // Headers intact, segment data cut off.
    let path = temp_file("half.elf", &probe[..probe.len() / 2]);
    let err = build_err(VmConfig::new(&path));
    assert!(
        matches!(
            err,
            Error::Loader(ember_loader::Error::Load {
                source: ember_loader::LoadError::SegmentBeyondFile { .. },
                ..
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn memory_too_small() {
    let mut cfg = VmConfig::new(probe_elf());
    cfg.memory_mib = 4;
    let err = build_err(cfg);
    assert!(
        matches!(err, Error::Memory(ember_memory::Error::TooSmall { .. })),
        "{err:?}"
    );
}

#[test]
fn initramfs_that_does_not_fit() {
    let dir = std::env::temp_dir().join(format!("ember-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("huge-initrd");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(200 << 20).unwrap(); // sparse, 200 MiB
    let mut cfg = VmConfig::new(probe_elf());
    cfg.memory_mib = 64;
    cfg.initrd = Some(path);
    let err = build_err(cfg);
    assert!(
        matches!(err, Error::Loader(_) | Error::Memory(_)),
        "{err:?}"
    );
    assert!(err.to_string().to_lowercase().contains("initr"), "{err}");
}

#[test]
fn command_line_too_long() {
    let mut cfg = VmConfig::new(probe_elf());
    cfg.cmdline = "x".repeat(5000);
    let err = build_err(cfg);
    assert!(
        matches!(
            err,
            Error::Cmdline(ember_vmm::CmdlineError::TooLong { len: 5001, .. })
        ),
        "{err:?}"
    );
    // What Ember appends counts, and the message says so: without ACPI every disk adds a
    // `virtio_mmio.device=` word.
    let img = temp_file("cmdline-disk.img", &[0u8; 4096]);
    let mut cfg = VmConfig::new(probe_elf());
    cfg.cmdline = "x".repeat(2030);
    cfg.acpi = false;
    cfg.disks
        .push(format!("{}", img.display()).parse().unwrap());
    let msg = build_err(cfg).to_string();
    assert!(
        msg.contains("2030 bytes configured + ") && msg.contains("virtio_mmio.device="),
        "{msg}"
    );
}

#[test]
fn kvm_not_accessible() {
    let err = match Vm::builder(VmConfig::new(probe_elf()))
        .kvm_path("/nonexistent/kvm")
        .build()
    {
        Ok(_) => panic!("should fail"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::KvmOpen { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/kvm"), "{err}");
}

#[test]
fn too_many_vcpus() {
    for n in [0, 33] {
        let mut cfg = VmConfig::new(probe_elf());
        cfg.vcpus = n;
        let err = build_err(cfg);
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(err.to_string().contains("1 to 32"), "{err}");
    }
}

#[test]
fn unknown_cpu_template() {
    let mut cfg = VmConfig::new(probe_elf());
    cfg.cpu_template = Some("pentium-pro".into());
    let err = build_err(cfg);
    assert!(err.to_string().contains("pentium-pro"), "{err}");
    cfg = VmConfig::new(probe_elf());
    cfg.cpu_template = Some("/nonexistent/template.json".into());
    let err = build_err(cfg);
    assert!(
        err.to_string().contains("/nonexistent/template.json"),
        "{err}"
    );
}

/// The probe ELF with its PVH note's type changed, so it offers only the Linux 64-bit entry.
fn probe_without_pvh_note() -> PathBuf {
    let mut elf = std::fs::read(probe_elf()).unwrap();
    let name = elf
        .windows(4)
        .position(|w| w == b"Xen\0")
        .expect("probe has a Xen note");
    // Note header: namesz, descsz, type (u32 each) right before the name.
    elf[name - 4..name].copy_from_slice(&0u32.to_le_bytes());
    temp_file("probe-no-pvh.elf", &elf)
}

#[test]
fn pvh_forced_on_a_kernel_without_the_note() {
    let mut cfg = VmConfig::new(probe_without_pvh_note());
    cfg.boot_protocol = Some(ember_vmm::BootProtocolChoice::Pvh);
    let err = build_err(cfg);
    assert!(matches!(err, Error::ProtocolNotOffered { .. }), "{err:?}");
}

#[test]
fn kernel_without_pvh_note_boots_through_linux64() {
    if !kvm_or_skip("kernel_without_pvh_note_boots_through_linux64") {
        return;
    }
    let mut cfg = VmConfig::new(probe_without_pvh_note());
    cfg.cmdline = "probe=cmdline".into();
    let opts = ember_test_support::ProbeOptions::new("cmdline");
    let run = ember_test_support::boot_with_config(cfg, &opts).unwrap();
    run.expect_all_ok("cmdline");
    let start = run.lines.iter().find(|l| l.check == "start").unwrap();
    assert_eq!(start.get("entry"), Some("linux64"));
}

#[test]
fn guest_emulation_failure_is_reported_with_rip_and_bytes() {
    if !kvm_or_skip("guest_emulation_failure_is_reported_with_rip_and_bytes") {
        return;
    }
    let kernel = temp_file(
        "popcnt.elf",
        &ember_test_support::tiny_elf_kernel(ember_test_support::POPCNT_THEN_RESET),
    );
    let run = ember_test_support::boot_with_config(
        VmConfig::new(&kernel),
        &ember_test_support::ProbeOptions::new(""),
    )
    .unwrap();
    match &run.outcome.exit {
        ember_vmm::VmExit::EmulationFailure { rip, insn } => {
            assert_eq!(*rip, 0x10_0000);
            assert_eq!(&insn[..4], &[0xf3, 0x0f, 0xb8, 0xc1]);
            let msg = run.outcome.exit.to_string();
            assert!(
                msg.contains("emulation failure") && msg.contains("0x100000"),
                "{msg}"
            );
            assert!(msg.contains("f3 0f b8 c1"), "{msg}");
        }
        ember_vmm::VmExit::Reset => {
            // popcnt ran: only acceptable where KVM runs guest ring 0 natively.
            let probe =
                ember_test_support::boot_probe(&ember_test_support::ProbeOptions::new("ring0"))
                    .unwrap();
            assert_eq!(probe.expect_ok("ring0").get("native"), Some("yes"));
            eprintln!("note: ring 0 is native here; popcnt executed, no emulation failure to see");
        }
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn guest_triple_fault_is_reported() {
    if !kvm_or_skip("guest_triple_fault_is_reported") {
        return;
    }
    // `ud2` with the boot IDT (one null gate): #UD -> #GP -> double fault -> shutdown.
    let kernel = temp_file(
        "ud2.elf",
        &ember_test_support::tiny_elf_kernel(&[0x0f, 0x0b]),
    );
    let run = ember_test_support::boot_with_config(
        VmConfig::new(&kernel),
        &ember_test_support::ProbeOptions::new(""),
    )
    .unwrap();
    assert_eq!(run.outcome.exit, ember_vmm::VmExit::TripleFault);
    assert!(!run.outcome.exit.is_clean());
    assert!(run.outcome.exit.to_string().contains("triple fault"));
}

/// Runs `f` on another thread and fails the test if it takes longer than `limit` (a blocking
/// `open(2)` on a FIFO would otherwise hang the whole test run).
fn within<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not return within {limit:?}"))
}

fn fifo(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    path
}

#[test]
fn fifos_and_devices_as_inputs_are_refused_at_once() {
    let limit = std::time::Duration::from_millis(900);
    type Case = (
        &'static str,
        Box<dyn Fn(&mut VmConfig, PathBuf) + Send>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        ("kernel", Box::new(|c, p| c.kernel = p), "a FIFO"),
        ("initrd", Box::new(|c, p| c.initrd = Some(p)), "a FIFO"),
        (
            "read-only disk",
            Box::new(|c, p| c.disks.push(format!("{},ro", p.display()).parse().unwrap())),
            "not a regular file or block device",
        ),
        (
            "disk",
            Box::new(|c, p| c.disks.push(format!("{}", p.display()).parse().unwrap())),
            "not a regular file or block device",
        ),
        (
            "cpu template",
            Box::new(|c, p| c.cpu_template = Some(p.display().to_string())),
            "not a regular file",
        ),
    ];
    for (what, set, expect) in cases {
        let path = fifo(&format!("fifo-{}", what.replace(' ', "-")));
        let shown = path.display().to_string();
        let msg = within(limit, move || {
            let mut cfg = VmConfig::new(probe_elf());
            set(&mut cfg, path);
            build_err(cfg).to_string()
        });
        assert!(
            msg.contains(expect) && msg.contains(&shown),
            "{what}: {msg}"
        );
    }
    // A FIFO or a device as the configuration file.
    for path in [fifo("fifo-config"), PathBuf::from("/dev/zero")] {
        let err = within(limit, move || {
            VmConfig::from_file(&path).unwrap_err().to_string()
        });
        assert!(err.contains("not a regular file"), "{err}");
    }
    // Endless devices: as CPU template or initrd, refused without reading them.
    for dev in ["/dev/zero", "/dev/urandom"] {
        let msg = within(limit, move || {
            let mut cfg = VmConfig::new(probe_elf());
            cfg.cpu_template = Some(dev.into());
            build_err(cfg).to_string()
        });
        assert!(msg.contains("not a regular file"), "{dev}: {msg}");
    }
    let msg = within(limit, || {
        let mut cfg = VmConfig::new(probe_elf());
        cfg.initrd = Some("/dev/zero".into());
        build_err(cfg).to_string()
    });
    assert!(msg.contains("a character device"), "{msg}");
}

#[test]
fn oversized_config_is_refused() {
    let path = temp_file("huge.json", &vec![b' '; (1 << 20) + 1]);
    let err = VmConfig::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("limit"), "{err}");
}

#[test]
fn empty_paths_are_named() {
    let err = build_err(VmConfig::new(""));
    assert_eq!(err.to_string(), "the kernel path is empty");
}

/// A device that panics on any access: the vCPU thread running it unwinds.
struct Panicking;

impl ember_devices::BusDevice for Panicking {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {
        panic!("a device bug, on purpose");
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        panic!("a device bug, on purpose");
    }
}

#[test]
fn a_panicking_vcpu_thread_ends_the_vm_with_an_error() {
    if !kvm_or_skip("a_panicking_vcpu_thread_ends_the_vm_with_an_error") {
        return;
    }
    // mov dx, 0x511; out dx, al; hlt
    let kernel = temp_file(
        "out-0x511.elf",
        &ember_test_support::tiny_elf_kernel(&[0x66, 0xba, 0x11, 0x05, 0xee, 0xf4]),
    );
    let vm = Vm::builder(VmConfig::new(&kernel))
        .serial_output(Box::new(std::io::sink()))
        .port_device(
            0x511,
            1,
            std::sync::Arc::new(std::sync::Mutex::new(Panicking)),
        )
        .build()
        .unwrap();
    let outcome = within(std::time::Duration::from_secs(30), move || {
        vm.run().unwrap()
    });
    match &outcome.exit {
        ember_vmm::VmExit::VcpuError(why) => assert!(why.contains("panicked"), "{why}"),
        other => panic!("expected a vCPU error, got {other:?}"),
    }
    // Overlapping one of Ember's own devices is refused.
    let err = build_err_with(VmConfig::new(probe_elf()), |b| {
        b.port_device(
            0x3f8,
            1,
            std::sync::Arc::new(std::sync::Mutex::new(Panicking)),
        )
    });
    assert!(err.to_string().contains("overlaps"), "{err}");
}

fn build_err_with(
    config: VmConfig,
    f: impl FnOnce(ember_vmm::VmBuilder) -> ember_vmm::VmBuilder,
) -> Error {
    match f(Vm::builder(config)).build() {
        Ok(_) => panic!("building the VM should have failed"),
        Err(e) => e,
    }
}
