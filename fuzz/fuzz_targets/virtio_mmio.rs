//! Arbitrary register read/write sequences (plus guest handshakes, queue setups, requests,
//! guest memory writes and event-loop notifications) against a virtio-mmio transport wrapping
//! a virtio-blk device. The state machine must never panic, and its invariants (magic and
//! version, interrupt status bits, DRIVER_OK while activated, image size) must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stats = ember_devices::virtio::fuzz::run_mmio(data).expect("fixture");
    assert_eq!(
        stats.violations, 0,
        "virtio-mmio invariant violated: {stats:?}"
    );
});
