//! Opening KVM and creating the VM: capabilities, `KVM_CREATE_VM`, guest memory slots, the
//! irqchip. The vCPU-independent KVM steps of [`Vm::build`](crate::Vm::build).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

use ember_memory::GuestRam;
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::error::Error;

/// The capabilities Ember needs, with their names for the error message.
const REQUIRED: [(Cap, &str); 5] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
];

/// Opens the KVM device at `path` and checks the capabilities Ember needs.
pub(crate) fn open(path: &Path) -> Result<Kvm, Error> {
    let open_err = |source| Error::KvmOpen {
        path: path.to_path_buf(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(&c_path).map_err(open_err)?;
    for (cap, name) in REQUIRED {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// `KVM_CREATE_VM`, then the guest memory slots, then the irqchip (and PIT if asked).
///
/// Guest memory is registered first: each memslot change waits for an SRCU grace period (4-8 ms
/// on PVM hosts), and right after `KVM_CREATE_VM` nothing else is pending, so the wait
/// overlaps the rest of the set-up instead of adding to it (docs/performance.md).
///
/// `memory` must outlive the returned VM fd (the `Vm` holds both and drops the fd first).
pub(crate) fn create_vm(
    kvm: &Kvm,
    memory: &GuestRam,
    pit: bool,
    log_dirty: bool,
    timings: &mut dyn FnMut(&'static str),
) -> Result<VmFd, Error> {
    let vm_fd = kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    timings("vm create");
    // SAFETY: the `Vm` keeps `memory` alive for as long as `vm_fd` (it drops the fd first in
    // `run` and in its field order), and nothing remaps it.
    unsafe { ember_vcpu::vm::register_guest_memory(&vm_fd, memory, log_dirty)? };
    timings("memory mapping");
    ember_vcpu::vm::create_irqchip(&vm_fd, pit)?;
    timings("irqchip");
    Ok(vm_fd)
}

/// `KVM_GET_SUPPORTED_CPUID`, asked once per process: it does not change while the process
/// lives, and on PVM hosts each query costs ~0.8 ms of trapped `cpuid` instructions.
pub(crate) fn supported_cpuid(kvm: &Kvm) -> Result<kvm_bindings::CpuId, Error> {
    static SUPPORTED: OnceLock<kvm_bindings::CpuId> = OnceLock::new();
    if let Some(c) = SUPPORTED.get() {
        return Ok(c.clone());
    }
    let c = ember_vcpu::cpuid::supported(kvm)?;
    Ok(SUPPORTED.get_or_init(|| c).clone())
}
