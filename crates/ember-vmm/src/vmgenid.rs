//! The VM generation ID: a 128-bit random ID in guest memory at
//! [`ember_memory::addresses::VMGENID_ADDR`], described to the guest by the ACPI `VGEN` device
//! ([`ember_boot::acpi::AcpiDevice::VmGenId`]). Every boot, restore and fork writes a new one;
//! a restore or fork then raises an edge on [`GED_GSI`], the Generic Event Device's line, whose
//! `_EVT` notifies `VGEN`: Linux's `vmgenid` driver reads the new ID and reseeds its random
//! number generator (`add_vmfork_randomness`), and a guest agent can watch for the uevent.

use ember_memory::addresses::VMGENID_ADDR;
use ember_memory::GuestRam;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};

use crate::error::Error;

/// GSI of the ACPI Generic Event Device that announces a new generation ID (ISA IRQ 3, COM2's
/// line, which Ember leaves free).
pub const GED_GSI: u32 = 3;

/// Writes a new random generation ID into `mem` and returns it.
pub(crate) fn write_new(mem: &GuestRam) -> Result<[u8; 16], Error> {
    let mut id = [0u8; 16];
    let mut got = 0;
    while got < id.len() {
        // SAFETY: getrandom writes at most `len - got` bytes into the rest of `id`.
        let n = unsafe { libc::getrandom(id[got..].as_mut_ptr().cast(), id.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::VmGenId(e.to_string()));
        }
        got += n.cast_unsigned();
    }
    mem.write_slice(&id, GuestAddress(VMGENID_ADDR))
        .map_err(|e| Error::VmGenId(e.to_string()))?;
    Ok(id)
}

/// The generation ID in `mem`.
pub(crate) fn read(mem: &GuestRam) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    mem.read_slice(&mut id, GuestAddress(VMGENID_ADDR)).ok()?;
    Some(id)
}

/// Tells the guest the ID changed: an edge on [`GED_GSI`].
pub(crate) fn notify(vm_fd: &VmFd) -> Result<(), Error> {
    vm_fd
        .set_irq_line(GED_GSI, true)
        .and_then(|()| vm_fd.set_irq_line(GED_GSI, false))
        .map_err(|e| Error::Kvm("KVM_IRQ_LINE", e))
}
