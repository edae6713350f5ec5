//! Arbitrary bytes as a virtio-blk request queue: a descriptor table, an available ring and
//! request data in a small guest memory with a hole, processed by a `Block` on a temporary
//! image. Malformed chains must be completed or dropped and counted, never panic, never touch
//! memory outside guest RAM, never grow the image (or change it when read-only).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stats = ember_devices::virtio::fuzz::run_blk(data).expect("fixture");
    assert_eq!(
        stats.violations, 0,
        "virtio-blk invariant violated: {stats:?}"
    );
});
