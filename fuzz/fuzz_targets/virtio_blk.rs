//! Arbitrary bytes as a virtio-blk request queue: a descriptor table, an available ring and
//! request data in a small guest memory with a hole, processed by a `Block` on a temporary
//! image. Malformed chains must be completed or dropped and counted, never panic, never touch
//! memory outside guest RAM, never grow the image (or change it when read-only).
#![no_main]

use libfuzzer_sys::fuzz_target;

// The guest's writes and the device's activation here; its queue processing on a thread under
// the `vmm` filter, the event loop's, which runs the devices in the VMM.
fuzz_target!(|data: &[u8]| {
    let mut fx = ember_devices::virtio::fuzz::blk_fixture(data).expect("fixture");
    let (fx, stats) = ember_fuzz::filtered("vmm").run(move || {
        let stats = ember_devices::virtio::fuzz::drive_blk(&mut fx);
        (fx, stats)
    });
    drop(fx);
    assert_eq!(
        stats.violations, 0,
        "virtio-blk invariant violated: {stats:?}"
    );
});
