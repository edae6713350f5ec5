//! Arbitrary text as a device option of the quick-boot binary: the first byte picks the parser
//! (`--disk`, `--net`, `--vsock`, `--rng`, `--balloon`), the rest is the option text. A clear
//! error or a device the configuration validates (or refuses with a clear error); never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ember_vmm::{BalloonConfig, DiskConfig, NetConfig, RngConfig, VmConfig, VsockConfig};

fn check<T: std::str::FromStr<Err = ember_vmm::ConfigError>>(
    text: &str,
    add: impl FnOnce(&mut VmConfig, T),
) {
    match text.parse::<T>() {
        Ok(dev) => {
            let mut cfg = VmConfig::new("/k");
            add(&mut cfg, dev);
            if let Err(e) = cfg.validate() {
                assert!(!e.to_string().is_empty());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 5 {
        0 => {
            if let Ok(disk) = text.parse::<DiskConfig>() {
                // The path is the text before the first comma.
                let path = text.split(',').next().unwrap();
                assert_eq!(disk.path.as_os_str(), path);
                assert!(!path.is_empty());
                let mut cfg = VmConfig::new("/k");
                cfg.disks.push(disk.clone());
                // A serial longer than the virtio-blk limit is refused by validation.
                let long_id = disk
                    .id
                    .as_ref()
                    .is_some_and(|id| id.len() > ember_vmm::MAX_DISK_ID_LEN);
                assert_eq!(cfg.validate().is_err(), long_id);
            } else {
                check::<DiskConfig>(text, |c, d| c.disks.push(d));
            }
        }
        1 => check::<NetConfig>(text, |c, n| c.nets.push(n)),
        2 => check::<VsockConfig>(text, |c, v| c.vsock = Some(v)),
        3 => check::<RngConfig>(text, |c, r| c.rng = Some(r)),
        _ => check::<BalloonConfig>(text, |c, b| c.balloon = Some(b)),
    }
});
