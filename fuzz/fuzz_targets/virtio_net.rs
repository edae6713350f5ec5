//! Guest and host operation sequences against virtio-net behind its MMIO transport (format:
//! `ember_devices::virtio::fuzz_devices`): hostile chains, headers and requests must complete
//! or be refused and counted, never panic, never break the device's bounds.
#![no_main]

use ember_devices::virtio::fuzz_devices::{drive, fixture, Kind};
use libfuzzer_sys::fuzz_target;

// The host's part (sockets, the handshake) here; the input on a thread under the `vmm` filter,
// the event loop's, which runs the devices in the VMM.
fuzz_target!(|data: &[u8]| {
    let mut fx = fixture(Kind::Net).expect("fixture");
    let input = data.to_vec();
    let (fx, stats) = ember_fuzz::filtered("vmm").run(move || {
        let stats = drive(&mut fx, &input);
        (fx, stats)
    });
    drop(fx);
    let stats = stats.expect("fixture");
    assert_eq!(
        stats.violations, 0,
        "virtio-net invariant violated: {stats:?}"
    );
});
