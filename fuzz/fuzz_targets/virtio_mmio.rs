//! Arbitrary register read/write sequences (plus guest handshakes, queue setups, requests,
//! guest memory writes and event-loop notifications) against a virtio-mmio transport wrapping
//! a virtio-blk device. The state machine must never panic, and its invariants (magic and
//! version, interrupt status bits, DRIVER_OK while activated, image size) must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The fixture here; the input on a thread under the `vmm` filter. (In the VMM the register
// accesses run on vCPU threads, under the narrower `vcpu` filter, and the queue processing on
// the event loop; the harness interleaves both, so it runs under the event loop's.)
fuzz_target!(|data: &[u8]| {
    let mut fx = ember_devices::virtio::fuzz::mmio_fixture().expect("fixture");
    let input = data.to_vec();
    let (fx, stats) = ember_fuzz::filtered("vmm").run(move || {
        let stats = ember_devices::virtio::fuzz::drive_mmio(&mut fx, &input);
        (fx, stats)
    });
    drop(fx);
    assert_eq!(
        stats.violations, 0,
        "virtio-mmio invariant violated: {stats:?}"
    );
});
