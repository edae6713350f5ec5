//! VM-level KVM set-up that every Ember VMM does the same way: guest memory slots, the TSS,
//! the in-kernel irqchip (and optional PIT) with PC interrupt routing.
//!
//! ```no_run
//! use ember_memory::{create_guest_memory, DirtyBitmap, MemoryLayout, MIB};
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! let mem = create_guest_memory(&MemoryLayout::new(128 * MIB)?, DirtyBitmap::Off)?;
//! // SAFETY: `mem` outlives `vm` (both live to the end of this function).
//! unsafe { ember_vcpu::vm::register_guest_memory(&vm, &mem, false)? };
//! ember_vcpu::vm::create_irqchip(&vm, false)?;
//! // ... then the vCPUs (after the irqchip, so that they get an in-kernel local APIC).
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use ember_memory::addresses::KVM_TSS_ADDRESS;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::Error;

/// Number of IOAPIC input pins (GSIs 0..24).
pub const IOAPIC_PINS: u32 = 24;

fn vm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::VmIoctl { ioctl, source }
}

/// Registers every region of `mem` with the VM as a memory slot (slot `i` = region `i`), with
/// KVM's dirty log on (`KVM_MEM_LOG_DIRTY_PAGES`, read by [`dirty_pages`]) if `log_dirty`.
/// Called again on the same VM and memory, it only changes that flag.
///
/// Do this right after `KVM_CREATE_VM`: each slot change waits for an SRCU grace period, and
/// right after creation nothing else is pending.
///
/// # Safety
///
/// KVM writes guest memory through these mappings for as long as the VM exists: `mem` (its
/// mappings) must outlive `vm`, and must not be unmapped or remapped meanwhile.
pub unsafe fn register_guest_memory<M: GuestMemoryBackend>(
    vm: &VmFd,
    mem: &M,
    log_dirty: bool,
) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::GuestMemory {
                gpa: region.start_addr().0,
                source: e,
            })?;
        let r = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| Error::TooManyMemorySlots)?,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the caller guarantees the mapping outlives the VM; the regions of one
        // `GuestMemoryBackend` do not overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Takes and clears KVM's dirty log of memory slot `slot` (`memory_size` bytes): one bit per
/// 4 KiB page the guest wrote since the last call (or since the log was turned on), bit
/// `i % 64` of word `i / 64` for page `i`. The slot must have been registered with
/// `log_dirty` ([`register_guest_memory`]). Writes of the VMM itself are not in it.
pub fn dirty_pages(vm: &VmFd, slot: u32, memory_size: usize) -> Result<Vec<u64>, Error> {
    vm.get_dirty_log(slot, memory_size)
        .map_err(vm_err("KVM_GET_DIRTY_LOG"))
}

/// Sets the TSS address ([`KVM_TSS_ADDRESS`]), creates the in-kernel irqchip (PIC, IOAPIC and,
/// for vCPUs created afterwards, local APICs), the i8254 PIT if `pit`, and installs the PC
/// interrupt routing of [`pc_gsi_routing`].
pub fn create_irqchip(vm: &VmFd, pit: bool) -> Result<(), Error> {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "KVM_TSS_ADDRESS is 0xfffb_d000, below 4 GiB"
    )]
    let tss_address = KVM_TSS_ADDRESS as usize;
    vm.set_tss_address(tss_address)
        .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
    if pit {
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(config).map_err(vm_err("KVM_CREATE_PIT2"))?;
    }
    vm.set_gsi_routing(&pc_gsi_routing()?)
        .map_err(vm_err("KVM_SET_GSI_ROUTING"))
}

/// Wires a virtio-mmio device at `base` into KVM: `irq` becomes the irqfd of `gsi`, and
/// `notify[i]` the ioeventfd of a 4-byte guest write of `i` to the QueueNotify register
/// (`base + queue_notify_offset`), so that neither an interrupt nor a queue notification costs
/// an exit to the VMM.
pub fn register_virtio_mmio(
    vm: &VmFd,
    base: u64,
    queue_notify_offset: u64,
    gsi: u32,
    irq: &vmm_sys_util::eventfd::EventFd,
    notify: &[vmm_sys_util::eventfd::EventFd],
) -> Result<(), Error> {
    vm.register_irqfd(irq, gsi).map_err(vm_err("KVM_IRQFD"))?;
    for (queue, evt) in notify.iter().enumerate() {
        let queue = u32::try_from(queue).map_err(|_| Error::VmIoctl {
            ioctl: "KVM_IOEVENTFD",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        vm.register_ioevent(
            evt,
            &kvm_ioctls::IoEventAddress::Mmio(base + queue_notify_offset),
            queue,
        )
        .map_err(vm_err("KVM_IOEVENTFD"))?;
    }
    Ok(())
}

/// The interrupt routing the firmware tables describe: ISA IRQs 0..15 on the PICs, GSIs on the
/// IOAPIC pins with the same number, except the PIT's IRQ 0, which the MADT's interrupt
/// source override (and the MP table) put on IOAPIC pin 2, as on PC hardware.
pub fn pc_gsi_routing() -> Result<KvmIrqRouting, Error> {
    let entry = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::new();
    for irq in 0..16u32 {
        if irq == 2 {
            continue; // the cascade
        }
        let chip = if irq < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        entries.push(entry(irq, chip, irq % 8));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => entries.push(entry(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => entries.push(entry(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    // Only fails for more entries than a kvm_irq_routing can hold, which 38 are not.
    KvmIrqRouting::from_entries(&entries).map_err(|_| Error::VmIoctl {
        ioctl: "KVM_SET_GSI_ROUTING",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_covers_isa_irqs_and_ioapic_pins() {
        let r = pc_gsi_routing().unwrap();
        let entries = r.as_slice();
        assert_eq!(entries.len(), 15 + 23);
        // The PIT's IRQ 0 reaches IOAPIC pin 2.
        let pins: Vec<(u32, u32, u32)> = entries
            .iter()
            .map(|e| {
                // SAFETY: pc_gsi_routing builds every entry as KVM_IRQ_ROUTING_IRQCHIP with the
                // irqchip member of the union set; its fields are plain u32s.
                let irqchip = unsafe { e.u.irqchip.irqchip };
                // SAFETY: as above.
                let pin = unsafe { e.u.irqchip.pin };
                (e.gsi, irqchip, pin)
            })
            .collect();
        assert!(pins.contains(&(0, KVM_IRQCHIP_IOAPIC, 2)));
        assert!(pins.contains(&(4, KVM_IRQCHIP_IOAPIC, 4)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|&(gsi, _, _)| gsi == 2));
    }
}
