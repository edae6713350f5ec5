//! The state of a vCPU ([`VcpuState`]) and of the VM-level KVM devices ([`VmState`]: PIC,
//! IOAPIC, PIT, kvmclock), taken and applied with the KVM `GET`/`SET` ioctls, as plain data
//! (serde, through kvm-bindings' `serde` feature).
//!
//! A vCPU's state must be taken and applied on the thread that runs it, while it is out of
//! `KVM_RUN` (the VMM parks its vCPU threads and sends them the request).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

use crate::{Error, Vcpu};

/// Everything KVM keeps about one vCPU: registers, FPU and extended state, MSRs, local APIC,
/// run state, pending events, debug registers, CPUID and TSC frequency.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU id.
    pub id: u8,
    /// The CPUID table it runs with (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state: the 4 KiB region of `KVM_GET_XSAVE`, as 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Every MSR of [`saved_msrs`] that KVM returns for this vCPU.
    pub msrs: Vec<kvm_msr_entry>,
    /// The in-kernel local APIC.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for INIT/SIPI ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// TSC frequency in kHz, if KVM knows it.
    pub tsc_khz: Option<u32>,
}

/// Largest CPUID table read back from a vCPU.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// MSRs read or written per ioctl.
const MSR_CHUNK: usize = 64;

/// The MSRs a vCPU's state includes: every MSR `KVM_GET_MSR_INDEX_LIST` reports (asked once per
/// process). Those a vCPU refuses to return are left out of its [`VcpuState::msrs`].
pub fn saved_msrs(kvm: &Kvm) -> Result<Vec<u32>, Error> {
    use std::sync::OnceLock;
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l.clone());
    }
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| Error::VmIoctl {
            ioctl: "KVM_GET_MSR_INDEX_LIST",
            source,
        })?
        .as_slice()
        .to_vec();
    Ok(LIST.get_or_init(|| list).clone())
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, Error> {
    // At most MSR_CHUNK entries: within what a kvm_msrs holds.
    Msrs::from_entries(entries).map_err(|_| Error::TooManyMsrs {
        count: entries.len(),
    })
}

impl Vcpu {
    /// Takes this vCPU's state; `msr_indices` from [`saved_msrs`]. Call it on the vCPU's own
    /// thread while it is outside `KVM_RUN`.
    ///
    /// The run state is read first, so that the registers are the ones KVM synchronised for it
    /// (as Firecracker's `save_state` does).
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, Error> {
        let fd = &self.fd;
        let err = |ioctl| self.ioctl_err(ioctl);
        let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = fd
            .get_xsave()
            .map_err(err("KVM_GET_XSAVE"))?
            .region
            .to_vec();
        let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for chunk in msr_indices.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            // KVM stops at the first MSR it cannot read; read the rest one by one then.
            let mut batch = msrs_of(&entries)?;
            let got = fd.get_msrs(&mut batch).map_err(err("KVM_GET_MSRS"))?;
            msrs.extend_from_slice(&batch.as_slice()[..got]);
            for e in &entries[got..] {
                let mut one = msrs_of(std::slice::from_ref(e))?;
                if fd.get_msrs(&mut one).map_err(err("KVM_GET_MSRS"))? == 1 {
                    msrs.push(one.as_slice()[0]);
                }
            }
        }
        let vcpu_events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = fd
            .get_cpuid2(MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            id: self.id,
            cpuid,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            msrs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz: self.tsc_khz(),
        })
    }

    /// Applies a state from [`save_state`](Vcpu::save_state) of the vCPU with the same id. Call
    /// it on the vCPU's own thread while it is outside `KVM_RUN`.
    ///
    /// Order as in Firecracker's `restore_state`: TSC frequency and CPUID first (they shape
    /// what the rest may contain), MSRs before the events, the run state and the events last.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), Error> {
        if state.id != self.id {
            return Err(Error::StateMismatch {
                id: self.id,
                saved: state.id,
            });
        }
        let fd = &self.fd;
        let err = |ioctl| self.ioctl_err(ioctl);
        if let Some(khz) = state.tsc_khz {
            if self.tsc_khz() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(err("KVM_SET_TSC_KHZ"))?;
            }
        }
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| Error::CpuidTooLarge {
            entries: state.cpuid.len(),
            max: MAX_CPUID_ENTRIES,
        })?;
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        fd.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        if state.xsave.len() != xsave.region.len() {
            return Err(Error::StateMismatch {
                id: self.id,
                saved: state.id,
            });
        }
        xsave.region.copy_from_slice(&state.xsave);
        // SAFETY: `xsave` is the legacy 4 KiB buffer KVM_SET_XSAVE reads, filled with what
        // KVM_GET_XSAVE returned for a vCPU with this CPUID.
        unsafe { fd.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debug_regs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
        for chunk in state.msrs.chunks(MSR_CHUNK) {
            let set = fd.set_msrs(&msrs_of(chunk)?).map_err(err("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(Error::SetMsrs {
                    id: self.id,
                    index: chunk[set].index,
                    set,
                    total: chunk.len(),
                });
            }
        }
        fd.set_mp_state(state.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&state.vcpu_events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))
    }
}

/// The VM-level KVM devices: the two PICs and the IOAPIC of the in-kernel irqchip, the PIT
/// when there is one, and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// `KVM_GET_IRQCHIP` of the master PIC, the slave PIC and the IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// `KVM_GET_PIT2`, if the VM has a PIT.
    pub pit: Option<kvm_pit_state2>,
    /// `KVM_GET_CLOCK`.
    pub clock: kvm_clock_data,
    /// The host's `CLOCK_REALTIME` when the state was taken, in nanoseconds since the epoch
    /// (0: not known, a state from an older Ember): what [`advance_clock`] measures from.
    #[serde(default)]
    pub taken_at_realtime_ns: u64,
}

/// The host's `CLOCK_REALTIME` in nanoseconds since the epoch (0 before the epoch).
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Moves `state`'s kvmclock on by the host realtime that passed since the state was taken
/// (Firecracker's `clock_realtime` at snapshot load): a guest restored an hour later then
/// reads an hour later on its kvmclock, instead of going on from the moment of the snapshot.
/// Returns the nanoseconds added (0 if the state does not say when it was taken, or the host
/// clock went back).
pub fn advance_clock(state: &mut VmState) -> u64 {
    if state.taken_at_realtime_ns == 0 {
        return 0;
    }
    let elapsed = realtime_ns().saturating_sub(state.taken_at_realtime_ns);
    state.clock.clock = state.clock.clock.saturating_add(elapsed);
    // Counted once: a second call adds only what passed since this one.
    state.taken_at_realtime_ns = state.taken_at_realtime_ns.saturating_add(elapsed);
    elapsed
}

fn vm_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::VmIoctl { ioctl, source }
}

/// The three irqchips of the in-kernel irqchip, in the order [`VmState::irqchips`] keeps them.
const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Takes the VM-level state (`pit`: whether the VM has a PIT). The vCPUs should be paused.
pub fn save_vm_state(vm: &VmFd, pit: bool) -> Result<VmState, Error> {
    let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
    for chip_id in IRQCHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(vm_err("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    let pit = if pit {
        Some(vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?)
    } else {
        None
    };
    let mut clock = vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?;
    // Only the value is restored: KVM refuses flags it sets itself on the way out.
    clock.flags = 0;
    Ok(VmState {
        irqchips,
        pit,
        clock,
        taken_at_realtime_ns: realtime_ns(),
    })
}

/// Applies a [`VmState`]. The vCPUs should be paused.
pub fn restore_vm_state(vm: &VmFd, state: &VmState) -> Result<(), Error> {
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(vm_err("KVM_SET_PIT2"))?;
    }
    vm.set_clock(&state.clock).map_err(vm_err("KVM_SET_CLOCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_clock_adds_the_realtime_since_the_state_was_taken_once() {
        let mut s = VmState {
            irqchips: Vec::new(),
            pit: None,
            clock: kvm_clock_data {
                clock: 5_000,
                ..Default::default()
            },
            taken_at_realtime_ns: realtime_ns() - 2_000_000_000,
        };
        let added = advance_clock(&mut s);
        assert!((2_000_000_000..3_000_000_000).contains(&added), "{added}");
        assert_eq!(s.clock.clock, 5_000 + added);
        // A second call adds only what passed since the first.
        assert!(advance_clock(&mut s) < 1_000_000_000);
        // A state that does not say when it was taken is left alone.
        s.taken_at_realtime_ns = 0;
        let before = s.clock.clock;
        assert_eq!(advance_clock(&mut s), 0);
        assert_eq!(s.clock.clock, before);
    }
}
