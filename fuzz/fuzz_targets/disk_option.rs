//! Arbitrary text as a `--disk PATH[,ro][,id=SERIAL]` option: a clear error or a disk whose
//! path is the text before the first comma; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<ember_vmm::DiskConfig>() {
        Ok(disk) => {
            let path = text.split(',').next().unwrap();
            assert_eq!(disk.path.as_os_str(), path);
            assert!(!path.is_empty());
            let mut cfg = ember_vmm::VmConfig::new("/k");
            cfg.disks.push(disk.clone());
            // A serial longer than the virtio-blk limit is refused by validation.
            let long_id = disk.id.as_ref().is_some_and(|id| id.len() > ember_vmm::MAX_DISK_ID_LEN);
            assert_eq!(cfg.validate().is_err(), long_id);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
