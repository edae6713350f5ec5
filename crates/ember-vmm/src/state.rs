//! [`MachineState`]: everything of a paused VM but its memory, as plain data (serde): the
//! vCPUs, the VM-level KVM devices, the legacy devices and every virtio transport with its
//! device. Taken and applied through [`VmHandle`](crate::VmHandle) with the VM paused.

use ember_devices::acpi_pm::AcpiPmState;
use ember_devices::boot_timer::BootTimerState;
use ember_devices::lock;
use ember_devices::pvpanic::PvPanicState;
use ember_devices::serial::SerialDeviceState;
use ember_devices::virtio::MmioTransportState;
use ember_vcpu::state::{VcpuState, VmState};
use serde::{Deserialize, Serialize};

use crate::control::{VcpuReply, VcpuRequest};
use crate::error::Error;
use crate::handle::VmShared;

/// A virtio device's state, by its id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The device's id.
    pub id: String,
    /// Its transport, queues and device-specific state.
    pub transport: MmioTransportState,
}

/// The devices' state. (The i8042 has none: vm-superio's device keeps nothing but its reset
/// trigger.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialDeviceState,
    /// pvpanic.
    pub pvpanic: PvPanicState,
    /// The ACPI PM registers.
    pub acpi_pm: AcpiPmState,
    /// The boot timer.
    pub boot_timer: BootTimerState,
    /// The virtio devices, in attach order.
    pub virtio: Vec<VirtioDeviceState>,
}

/// Everything of a paused VM but its memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Every vCPU, by id.
    pub vcpus: Vec<VcpuState>,
    /// PIC, IOAPIC, PIT and kvmclock.
    pub vm: VmState,
    /// The devices.
    pub devices: DevicesState,
}

fn vcpu_err(why: String) -> Error {
    Error::VcpuRequest(why)
}

impl VmShared {
    /// The devices' state.
    pub(crate) fn devices_state(&self) -> Result<DevicesState, Error> {
        let l = &self.legacy;
        let virtio = self
            .virtio
            .iter()
            .map(|slot| {
                Ok(VirtioDeviceState {
                    id: slot.id.clone(),
                    transport: lock(&slot.transport)
                        .state()
                        .map_err(|source| Error::Device {
                            id: slot.id.clone(),
                            source,
                        })?,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(DevicesState {
            serial: lock(&l.serial).state(),
            pvpanic: lock(&l.pvpanic).state(),
            acpi_pm: lock(&l.acpi_pm).state(),
            boot_timer: lock(&l.boot_timer).state(),
            virtio,
        })
    }

    /// Applies the devices' state; the virtio devices must match by id and type.
    pub(crate) fn restore_devices(&self, state: &DevicesState) -> Result<(), Error> {
        if state.virtio.len() != self.virtio.len() {
            return Err(Error::StateMismatch(format!(
                "{} virtio devices saved, {} attached",
                state.virtio.len(),
                self.virtio.len()
            )));
        }
        for (saved, slot) in state.virtio.iter().zip(&self.virtio) {
            if saved.id != slot.id {
                return Err(Error::StateMismatch(format!(
                    "saved virtio device {} where {} is attached",
                    saved.id, slot.id
                )));
            }
            lock(&slot.transport)
                .restore(&saved.transport)
                .map_err(|source| Error::Device {
                    id: slot.id.clone(),
                    source,
                })?;
        }
        let l = &self.legacy;
        lock(&l.serial).restore(&state.serial)?;
        lock(&l.pvpanic).restore(&state.pvpanic);
        lock(&l.acpi_pm).restore(&state.acpi_pm);
        lock(&l.boot_timer).restore(&state.boot_timer);
        Ok(())
    }

    /// The whole machine's state; the vCPUs must be parked.
    pub(crate) fn save(&self) -> Result<MachineState, Error> {
        let replies = self
            .control
            .request(VcpuRequest::SaveState(ember_vcpu::state::saved_msrs(
                &self.kvm,
            )?))
            .map_err(vcpu_err)?;
        let mut vcpus = Vec::with_capacity(replies.len());
        for (id, reply) in replies {
            match reply {
                VcpuReply::Saved(s) => vcpus.push(*s),
                VcpuReply::Failed(why) => return Err(vcpu_err(format!("vCPU {id}: {why}"))),
                VcpuReply::Restored => return Err(vcpu_err(format!("vCPU {id}: bad reply"))),
            }
        }
        if vcpus.len() != self.vcpu_count {
            return Err(vcpu_err(format!(
                "{} of {} vCPUs are still running",
                vcpus.len(),
                self.vcpu_count
            )));
        }
        Ok(MachineState {
            vcpus,
            vm: ember_vcpu::state::save_vm_state(&self.vm_fd, self.pit)?,
            devices: self.devices_state()?,
        })
    }

    /// Applies a machine state of a VM with the same vCPUs and devices; the vCPUs must be
    /// parked.
    pub(crate) fn restore(&self, state: &MachineState) -> Result<(), Error> {
        if state.vcpus.len() != self.vcpu_count {
            return Err(Error::StateMismatch(format!(
                "{} vCPUs saved, {} in this VM",
                state.vcpus.len(),
                self.vcpu_count
            )));
        }
        if state.vm.pit.is_some() != self.pit {
            return Err(Error::StateMismatch(
                "the saved VM and this one differ in having a PIT".into(),
            ));
        }
        // The VM-level devices first: the local APICs the vCPU states bring talk to them.
        ember_vcpu::state::restore_vm_state(&self.vm_fd, &state.vm)?;
        let replies = self
            .control
            .request(VcpuRequest::RestoreState(state.vcpus.clone()))
            .map_err(vcpu_err)?;
        for (id, reply) in replies {
            if let VcpuReply::Failed(why) = reply {
                return Err(vcpu_err(format!("vCPU {id}: {why}")));
            }
        }
        self.restore_devices(&state.devices)
    }
}
