//! Arbitrary bytes as a snapshot state file (`ember_vmm::parse_snapshot`), as they are and
//! framed with a valid header and checksum (so that the JSON body and its consistency checks
//! are reached): a clear error or a state that hangs together; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.state");
    let framed = ember_vmm::frame_snapshot(data);
    for bytes in [data, &framed[..]] {
        match ember_vmm::parse_snapshot(bytes, path) {
            Ok(state) => {
                assert_eq!(state.machine.vcpus.len(), usize::from(state.config.vcpus));
                assert_eq!(state.machine.devices.virtio.len(), state.devices.len());
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
});
