//! Ember: a Rust toolkit for building microVMs on KVM.
//!
//! This facade re-exports the workspace's crates so that the top-level `examples/` and
//! `benches/` can use them under one name:
//!
//! - [`memory`]: the x86_64 guest physical layout and guest memory creation;
//! - [`loader`]: ELF `vmlinux` / bzImage, initramfs and command-line loading;
//! - [`boot`]: zero page, PVH start info, GDT and page tables written into guest memory;
//! - [`devices`]: the I/O bus, 8250 UART, i8042, boot timer and pvpanic devices;
//! - [`vcpu`]: vCPU set-up (CPUID, MSRs, registers, LAPIC) and the run loop;
//! - [`vmm`]: all of the above composed into a running microVM.
//!
//! ```no_run
//! let vm = ember::vmm::Vm::builder(ember::vmm::VmConfig::new("vmlinux")).build()?;
//! println!("{}", vm.run()?.exit);
//! # Ok::<(), ember::vmm::Error>(())
//! ```
#![deny(missing_docs)]

pub use ember_boot as boot;
pub use ember_devices as devices;
pub use ember_loader as loader;
pub use ember_memory as memory;
pub use ember_vcpu as vcpu;
pub use ember_vmm as vmm;
