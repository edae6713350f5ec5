//! Guest and host operation sequences against virtio-net behind its MMIO transport (format:
//! `ember_devices::virtio::fuzz_devices`): hostile chains, headers and requests must complete
//! or be refused and counted, never panic, never break the device's bounds.
#![no_main]

use ember_devices::virtio::fuzz_devices::{run, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stats = run(Kind::Net, data).expect("fixture");
    assert_eq!(stats.violations, 0, "virtio-net invariant violated: {stats:?}");
});
