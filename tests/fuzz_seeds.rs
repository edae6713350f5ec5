//! The seed corpus of every fuzz target (`fuzz/seeds/<target>/`), generated here from valid
//! inputs of each parser: this test fails when a committed seed differs from what the
//! generators produce (or is missing), and `EMBER_UPDATE_SEEDS=1 cargo test --test fuzz_seeds`
//! rewrites them. `cargo xtask fuzz` starts every target from its seeds: unseeded,
//! `loader_kernel` stayed at its initial coverage after two million runs.

use std::collections::BTreeMap;
use std::path::Path;

use ember_test_support::{tiny_elf_kernel, workspace_root, POPCNT_THEN_RESET};

type Seeds = BTreeMap<String, Vec<u8>>;

fn named(list: Vec<(String, Vec<u8>)>) -> Seeds {
    list.into_iter().collect()
}

/// A tiny ELF kernel with a Xen PVH entry note (type 18) after the code.
fn tiny_pvh_elf() -> Vec<u8> {
    let mut elf = tiny_elf_kernel(POPCNT_THEN_RESET);
    let note_off = elf.len() as u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&0x10_0000u32.to_le_bytes());
    elf.extend_from_slice(&note);
    // A second program header, PT_NOTE, after the first (the code starts at 0x1000).
    elf[56..58].copy_from_slice(&2u16.to_le_bytes());
    let ph = &mut elf[120..176];
    ph[0..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    ph[8..16].copy_from_slice(&note_off.to_le_bytes());
    ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&4u64.to_le_bytes());
    elf
}

/// A bzImage header (boot protocol 2.15, loaded high) with `init_size` and a small payload.
fn tiny_bzimage(init_size: u32) -> Vec<u8> {
    let mut f = vec![0u8; 2 * 512];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    f.extend_from_slice(POPCNT_THEN_RESET);
    f
}

fn loader_kernel() -> Seeds {
    named(vec![
        ("elf".into(), tiny_elf_kernel(POPCNT_THEN_RESET)),
        ("elf-pvh".into(), tiny_pvh_elf()),
        ("bzimage".into(), tiny_bzimage(0x10_0000)),
        ("bzimage-no-init-size".into(), tiny_bzimage(0)),
        (
            "cmdline".into(),
            b"console=ttyS0 reboot=k panic=1 probe=memmap".to_vec(),
        ),
    ])
}

/// `[claimed size: u32][kernel end: u64][image]`.
fn loader_initrd() -> Seeds {
    let input = |claimed: u32, kernel_end: u64, image: &[u8]| {
        let mut v = claimed.to_le_bytes().to_vec();
        v.extend_from_slice(&kernel_end.to_le_bytes());
        v.extend_from_slice(image);
        v
    };
    let image: Vec<u8> = b"070701".iter().copied().cycle().take(600).collect();
    named(vec![
        ("fits".into(), input(600, 0x20_0000, &image)),
        ("truncated".into(), input(4096, 0x20_0000, &image)),
        ("above-ram".into(), input(600, 0x1000_0000, &image)),
        ("empty".into(), input(0, 0x10_0000, &[])),
    ])
}

fn vm_config() -> Seeds {
    let example = std::fs::read(workspace_root().join("examples/vm.json")).unwrap();
    let minimal = serde_json::to_vec(&ember_vmm::VmConfig::new("/boot/vmlinux")).unwrap();
    named(vec![
        ("example".into(), example),
        ("defaults".into(), minimal),
        (
            "linux64-no-acpi".into(),
            br#"{"kernel":"k","boot_protocol":"linux64","acpi":false,"pit":true,"vcpus":4,
"disks":[{"path":"a.img","read_only":true,"id":"root"},{"path":"b.img"}],
"cpu_template":"emulated-ring0","memory_mib":4608,"initrd":"i.cpio"}"#
                .to_vec(),
        ),
    ])
}

/// `[parser: 0 disk, 1 net, 2 vsock, 3 rng, 4 balloon][option text]`.
fn device_option() -> Seeds {
    [
        (0u8, "/images/root.img"),
        (0, "disk.img,ro"),
        (0, "disk.img,rw,id=data"),
        (0, "a.img,id=01234567890123456789"),
        (0, "a.img,bw=1048576/1000,ops=100/1000/50"),
        (1, "tap=tap0"),
        (
            1,
            "tap=tap0,mac=06:00:ac:10:00:02,id=eth0,mtu=1400,offload=off",
        ),
        (1, "tap=tap1,rx_bw=1000000/100,tx_ops=1000/1000/10"),
        (2, "cid=3,uds=/tmp/v.sock"),
        (3, ""),
        (3, "bw=65536/1000"),
        (4, "mib=64,stats=1,deflate-on-oom,free-page-reporting"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (which, s))| {
        let mut v = vec![*which];
        v.extend_from_slice(s.as_bytes());
        (format!("option-{i}"), v)
    })
    .collect()
}

/// `[method: 0 GET, 1 PUT, 2 PATCH][path]\n[body]`: a request of every route.
fn api_request() -> Seeds {
    let probe = "/images/vmlinux";
    [
        (0u8, "/", ""),
        (0, "/version", ""),
        (1, "/actions", r#"{"action_type":"InstanceStart"}"#),
        (1, "/boot-source", &format!(r#"{{"kernel_image_path":"{probe}","boot_args":"console=ttyS0"}}"#)),
        (1, "/machine-config", r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false}"#),
        (2, "/machine-config", r#"{"mem_size_mib":512}"#),
        (1, "/drives/rootfs", r#"{"drive_id":"rootfs","path_on_host":"/r.img","is_root_device":true,"is_read_only":false,"rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#),
        (2, "/drives/rootfs", r#"{"drive_id":"rootfs","path_on_host":"/s.img"}"#),
        (1, "/network-interfaces/eth0", r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}"#),
        (1, "/vsock", r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#),
        (1, "/entropy", "{}"),
        (1, "/balloon", r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1}"#),
        (2, "/balloon/statistics", r#"{"stats_polling_interval_s":5}"#),
        (1, "/logger", r#"{"level":"Debug","show_level":true}"#),
        (1, "/metrics", r#"{"metrics_path":"/tmp/m.fifo"}"#),
        (2, "/vm", r#"{"state":"Paused"}"#),
        (1, "/cpu-config", r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"ecx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}]}"#),
        (1, "/snapshot/create", r#"{"mem_file_path":"/m","snapshot_path":"/s"}"#),
        (0, "/vm/config", r#"{"boot-source":{"kernel_image_path":"/k"},"machine-config":{"vcpu_count":1,"mem_size_mib":128},"drives":[],"network-interfaces":[]}"#),
    ]
    .iter()
    .enumerate()
    .map(|(i, (m, path, body))| {
        let mut v = vec![*m];
        v.extend_from_slice(path.as_bytes());
        v.push(b'\n');
        v.extend_from_slice(body.as_bytes());
        (format!("request-{i:02}"), v)
    })
    .collect()
}

fn device_kind(kind: ember_devices::virtio::fuzz_devices::Kind) -> Seeds {
    named(ember_devices::virtio::fuzz_devices::seeds(kind))
}

/// `[vcpu id][vcpu count][template JSON]`.
fn cpu_template() -> Seeds {
    ember_vcpu::template::BUILTIN_NAMES
        .iter()
        .map(|name| {
            let t = ember_vcpu::template::CpuTemplate::builtin(name).unwrap();
            let mut v = vec![1u8, 4];
            v.extend_from_slice(t.to_json().as_bytes());
            (name.to_string(), v)
        })
        .collect()
}

/// `[virtio devices][host-compat choice][configured command line]`.
fn cmdline() -> Seeds {
    let input = |devices: u8, compat: u8, text: &str| {
        let mut v = vec![devices, compat];
        v.extend_from_slice(text.as_bytes());
        v
    };
    named(vec![
        (
            "probe".into(),
            input(2, 3, "probe=memmap,virtio,blk console=ttyS0"),
        ),
        (
            "linux".into(),
            input(
                1,
                2,
                "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1 pci=off ember.shell",
            ),
        ),
        ("near-limit".into(), input(19, 2, &"x".repeat(1900))),
    ])
}

fn all_seeds() -> BTreeMap<&'static str, Seeds> {
    let (blk, mmio) = ember_devices::virtio::fuzz::seeds();
    let mut all = BTreeMap::new();
    all.insert("loader_kernel", loader_kernel());
    all.insert("loader_initrd", loader_initrd());
    all.insert("pio_bus", named(ember_devices::fuzz::seeds()));
    all.insert("virtio_blk", named(blk));
    all.insert("virtio_mmio", named(mmio));
    all.insert("vm_config", vm_config());
    all.insert("device_option", device_option());
    all.insert("api_request", api_request());
    {
        use ember_devices::virtio::fuzz_devices::Kind;
        all.insert("virtio_net", device_kind(Kind::Net));
        all.insert("virtio_vsock", device_kind(Kind::Vsock));
        all.insert("virtio_balloon", device_kind(Kind::Balloon));
        all.insert("virtio_rng", device_kind(Kind::Rng));
    }
    all.insert("cpu_template", cpu_template());
    all.insert("cmdline", cmdline());
    all.insert("fork_transfer", fork_transfer());
    all
}

/// What `Template::send_to` sends (the header, then a state as a state file holds it), made
/// from the captured `snapshot_state` seeds, and a header with nothing after it.
fn fork_transfer() -> Seeds {
    let mut seeds = Seeds::new();
    for (name, state) in committed(&workspace_root().join("fuzz/seeds/snapshot_state")) {
        let mut t = b"EMBERFRK".to_vec();
        t.extend_from_slice(&(state.len() as u64).to_le_bytes());
        t.extend_from_slice(&state);
        seeds.insert(name.replace(".state", ".transfer"), t);
    }
    let mut short = b"EMBERFRK".to_vec();
    short.extend_from_slice(&4096u64.to_le_bytes());
    seeds.insert("header-only".into(), short);
    seeds
}

fn committed(dir: &Path) -> Seeds {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Seeds::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).ok()?,
            ))
        })
        .collect()
}

#[test]
fn every_fuzz_target_has_its_generated_seeds() {
    let root = workspace_root().join("fuzz/seeds");
    let update = std::env::var("EMBER_UPDATE_SEEDS").as_deref() == Ok("1");
    let mut stale = Vec::new();
    for (target, seeds) in all_seeds() {
        assert!(!seeds.is_empty(), "{target}: no seeds generated");
        let dir = root.join(target);
        if update {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in &seeds {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        } else if committed(&dir) != seeds {
            stale.push(target);
        }
    }
    assert!(
        stale.is_empty(),
        "the committed seeds of {stale:?} differ from the generators; rewrite them with \
         EMBER_UPDATE_SEEDS=1 cargo test --test fuzz_seeds"
    );
}

#[test]
fn parser_seeds_are_accepted_by_their_parsers() {
    for (name, bytes) in vm_config() {
        let text = String::from_utf8(bytes).unwrap();
        ember_vmm::VmConfig::from_json(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in device_option() {
        let text = String::from_utf8(bytes[1..].to_vec()).unwrap();
        let r = match bytes[0] {
            0 => text.parse::<ember_vmm::DiskConfig>().map(|_| ()),
            1 => text.parse::<ember_vmm::NetConfig>().map(|_| ()),
            2 => text.parse::<ember_vmm::VsockConfig>().map(|_| ()),
            3 => text.parse::<ember_vmm::RngConfig>().map(|_| ()),
            _ => text.parse::<ember_vmm::BalloonConfig>().map(|_| ()),
        };
        r.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in api_request() {
        let method = ["GET", "PUT", "PATCH"][usize::from(bytes[0])];
        let text = String::from_utf8(bytes[1..].to_vec()).unwrap();
        let (path, body) = text.split_once('\n').unwrap();
        ember_api::parse(method, path, body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in cpu_template() {
        let json = std::str::from_utf8(&bytes[2..]).unwrap();
        ember_vcpu::template::CpuTemplate::from_json(json)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in cmdline() {
        let text = String::from_utf8(bytes[2..].to_vec()).unwrap();
        ember_vmm::KernelCmdline::new(&text)
            .build()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The `snapshot_state` seeds are state files captured from real probe VMs (`ember
/// --snapshot-dir`; a vCPU's registers and clocks differ on every run, so they are not
/// generated): each must parse.
#[test]
fn captured_snapshot_seeds_parse() {
    let seeds = committed(&workspace_root().join("fuzz/seeds/snapshot_state"));
    assert!(
        seeds.len() >= 2,
        "fuzz/seeds/snapshot_state: {} seeds",
        seeds.len()
    );
    for (name, bytes) in seeds {
        let state = ember_vmm::parse_snapshot(&bytes, Path::new(&name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!state.machine.vcpus.is_empty(), "{name}");
    }
}
