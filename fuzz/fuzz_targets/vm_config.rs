//! Arbitrary text as a VM configuration file (`VmConfig::from_json`): a clear error or a
//! configuration that validates, serializes and parses back to itself; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ember_vmm::VmConfig::from_json(text) {
        Ok(cfg) => {
            cfg.validate().expect("from_json validates");
            let again = serde_json::to_string(&cfg).expect("serializes");
            let back = ember_vmm::VmConfig::from_json(&again).expect("parses back");
            assert_eq!(back, cfg);
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
});
