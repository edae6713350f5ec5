//! Guest and host operation sequences against virtio-balloon behind its MMIO transport (format:
//! `ember_devices::virtio::fuzz_devices`): hostile chains, headers and requests must complete
//! or be refused and counted, never panic, never break the device's bounds.
#![no_main]

use ember_devices::virtio::fuzz_devices::Kind;
use libfuzzer_sys::fuzz_target;

// The host's part (sockets, the handshake) on the fuzzer's thread; the input under the `vmm`
// filter, the event loop's, which runs the devices in the VMM.
fuzz_target!(|data: &[u8]| ember_fuzz::run_virtio_device(Kind::Balloon, data));
