//! The vCPUs of a VM: created and given their CPUID table from the CPU template, the kernel
//! parameters that hide what a host's KVM shows anyway, and how a vCPU's stop becomes a
//! [`VmExit`].

use ember_memory::GuestRam;
use ember_vcpu::template::{self, CpuTemplate};
use ember_vcpu::{Vcpu, VcpuStop};
use kvm_bindings::CpuId;
use kvm_ioctls::{Kvm, VmFd};

use crate::error::Error;
use crate::outcome::VmExit;

/// Creates vCPUs `0..count` with the template's MSR modifiers and computes each one's CPUID
/// table (supported → normalized for its id → template). Not yet configured.
pub(crate) fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    template: &CpuTemplate,
    count: u8,
) -> Result<(Vec<Vcpu>, Vec<CpuId>), Error> {
    let vcpus = (0..count)
        .map(|id| Vcpu::new(vm_fd, id))
        .collect::<Result<Vec<_>, _>>()?;
    prepare_vcpus(kvm, vcpus, template)
}

/// Gives created vCPUs (ids `0..n`, in order) the template's MSR modifiers and computes each
/// one's CPUID table.
pub(crate) fn prepare_vcpus(
    kvm: &Kvm,
    mut vcpus: Vec<Vcpu>,
    template: &CpuTemplate,
) -> Result<(Vec<Vcpu>, Vec<CpuId>), Error> {
    let supported = crate::kvm::supported_cpuid(kvm)?;
    let count = u8::try_from(vcpus.len()).unwrap_or(u8::MAX);
    let mut cpuids = Vec::with_capacity(vcpus.len());
    for vcpu in &mut vcpus {
        cpuids.push(template.vcpu_cpuid(&supported, vcpu.id(), count, vcpu.tsc_khz())?);
        vcpu.set_msr_modifiers(&template.msrs)?;
    }
    Ok((vcpus, cpuids))
}

/// Kernel parameters for what a non-`host` CPU template asked to hide but this host's KVM
/// shows the guest anyway (some PVM builds override CPUID; see
/// [`ember_vcpu::template::overridden_bits`]). Empty for a template that hides nothing (such as
/// `host`) and wherever KVM honours the table. A host-compatibility piece: see docs/guest.md.
pub(crate) fn host_compat_params(
    template: &CpuTemplate,
    bsp: &Vcpu,
    requested: &CpuId,
) -> Result<String, Error> {
    if template.cpuid.is_empty() {
        return Ok(String::new());
    }
    bsp.fd()
        .set_cpuid2(requested)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
    let effective = bsp.effective_cpuid()?;
    let overrides = template::overridden_bits(requested, &effective);
    let mut words = Vec::new();
    if overrides.iter().any(|o| o.linux_names().contains(&"xsave")) {
        words.push("noxsave".to_string());
    }
    let names = template::linux_clearcpuid(&overrides);
    if let Some(value) = clearcpuid_value(&names) {
        words.push(format!("clearcpuid={value}"));
    }
    Ok(words.join(" "))
}

/// Longest `clearcpuid=` value Linux reads (`char arg[128]` in `cpu_parse_early_param`).
pub(crate) const CLEARCPUID_MAX: usize = 127;

/// Features whose instructions KVM's ring-0 emulator refuses and Linux executes in ring 0 early,
/// most important first: they go first into the length-limited `clearcpuid=` value.
const CLEARCPUID_PRIORITY: &[&str] = &[
    "popcnt", "cx16", "smap", "smep", "erms", "fsrm", "movbe", "avx", "avx2", "bmi1", "bmi2",
    "fsgsbase", "rdtscp", "invpcid", "pku", "ospke", "avx512f",
];

/// The `clearcpuid=` value for `names`: the priority features first, then the rest in table
/// order, as many as fit Linux's 127-byte limit. `None` for an empty list.
pub(crate) fn clearcpuid_value(names: &[&str]) -> Option<String> {
    let mut ordered: Vec<&str> = CLEARCPUID_PRIORITY
        .iter()
        .copied()
        .filter(|p| names.contains(p))
        .collect();
    ordered.extend(
        names
            .iter()
            .copied()
            .filter(|n| !CLEARCPUID_PRIORITY.contains(n)),
    );
    let mut value = String::new();
    for name in ordered {
        let extra = name.len() + usize::from(!value.is_empty());
        if value.len() + extra > CLEARCPUID_MAX {
            continue;
        }
        if !value.is_empty() {
            value.push(',');
        }
        value.push_str(name);
    }
    (!value.is_empty()).then_some(value)
}

/// How the VM ends when a vCPU stops for `reason`.
pub(crate) fn vcpu_stop_to_exit(vcpu: &Vcpu, memory: &GuestRam, reason: VcpuStop) -> VmExit {
    match reason {
        VcpuStop::Stopped => VmExit::Stopped,
        VcpuStop::Halted => VmExit::VcpuError("vCPU halted with interrupts off".into()),
        VcpuStop::Shutdown => VmExit::TripleFault,
        VcpuStop::SystemEvent { kind } => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Poweroff,
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => VmExit::GuestPanic,
            other => VmExit::VcpuError(format!("unknown KVM system event {other}")),
        },
        VcpuStop::EmulationFailure { rip, insn } => {
            let insn = if insn.is_empty() {
                vcpu.emulation_failure_bytes(memory).unwrap_or_default()
            } else {
                insn
            };
            VmExit::EmulationFailure { rip, insn }
        }
        other => VmExit::VcpuError(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clearcpuid_value_puts_priority_features_first_and_fits_linux() {
        assert_eq!(clearcpuid_value(&[]), None);
        assert_eq!(
            clearcpuid_value(&["pni", "popcnt", "smap"]).as_deref(),
            Some("popcnt,smap,pni")
        );
        let many: Vec<String> = (0..60).map(|i| format!("feature{i}")).collect();
        let mut names: Vec<&str> = many.iter().map(String::as_str).collect();
        names.push("cx16");
        let v = clearcpuid_value(&names).unwrap();
        assert!(v.len() <= CLEARCPUID_MAX, "{v}");
        assert!(v.starts_with("cx16,feature0,"), "{v}");
    }
}
