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
//! let opts = quick::RunOptions {
//!     name: "my-vmm",
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
