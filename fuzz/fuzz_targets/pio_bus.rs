//! Arbitrary guest port accesses (and host console input) against the legacy devices on the
//! port bus: COM1, i8042, boot timer, pvpanic, and unmapped ports. Nothing a guest writes may
//! panic or hang the VMM, and every bus invariant (reads of nothing return 0xff, no access is
//! forwarded past a device's range) must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The devices here; the port accesses on a thread under the `vcpu` filter, as a vCPU thread
// makes them in the VMM.
fuzz_target!(|data: &[u8]| {
    let fixture = ember_devices::fuzz::legacy_bus().expect("eventfds");
    let input = data.to_vec();
    let (fixture, stats) = ember_fuzz::filtered("vcpu").run(move || {
        let stats = ember_devices::fuzz::drive_legacy(&fixture, &input);
        (fixture, stats)
    });
    drop(fixture);
    assert_eq!(stats.violations, 0, "bus invariant violated: {stats:?}");
});
