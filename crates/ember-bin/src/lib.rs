//! What Ember's reference VMM binaries share: `ember` (quick boot and Firecracker mode) and
//! `ember-quick` (quick boot only, built small: no Firecracker mode, no JSON configuration, no
//! snapshots, and no clap).
//!
//! - [`quick`]: the quick-boot flags ([`quick::VmFlags`]) made into a [`VmConfig`](ember_vmm::VmConfig),
//!   and the run on the serial console ([`quick::run`]) that ends in an exit status;
//! - [`seccomp`]: the per-thread filters and the report of a blocked system call;
//! - [`signals`]: SIGTERM, SIGINT and SIGHUP stop the VM;
//! - [`console`]: the host terminal in raw mode while the VM runs.
//!
//! A quick-boot VMM in a few lines:
//!
//! ```no_run
//! use ember_bin::{quick, seccomp};
//!
//! let flags = quick::VmFlags {
//!     kernel: Some("target/probe/probe.elf".into()),
//!     cmdline: Some("probe=serial".into()),
//!     ..Default::default()
//! };
//! let config = flags.config(None).expect("a valid configuration");
//! ember_bin::set_program_name("my-vmm");
//! let opts = quick::RunOptions {
//!     timings: false,
//!     seccomp: seccomp::Setup::from_flags(false, None, None).expect("Ember's filters"),
//! };
//! ember_vmm::defer_teardown_to_exit();
//! let status = quick::run(ember_vmm::Vm::builder(config), &opts, |_vm| {});
//! quick::exit(status)
//! ```
#![deny(missing_docs)]

pub mod console;
pub mod quick;
pub mod seccomp;
pub mod signals;

/// The binary's name, which starts its messages on stderr (set once, first thing in `main`).
static PROGRAM_NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names the binary in its messages ("ember-quick: error: ..."); `ember` if never called.
pub fn set_program_name(name: &'static str) {
    let _ = PROGRAM_NAME.set(name);
}

/// The name [`set_program_name`] gave, or `ember`. Async-signal-safe (one atomic load), so the
/// blocked-call report can use it.
pub fn program_name() -> &'static str {
    PROGRAM_NAME.get().copied().unwrap_or("ember")
}
