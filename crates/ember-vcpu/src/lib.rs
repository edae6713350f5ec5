//! ember-vcpu: the KVM vCPUs of an Ember microVM, from creation to the exit loop.
//!
//! - [`cpuid`]: the per-vCPU CPUID table ([`cpuid::supported`] + [`cpuid::normalize`]: APIC
//!   id, topology of `n` single-threaded cores, hypervisor and timing leaves);
//! - [`template`]: CPU templates (`host`, `minimal`, `emulated-ring0` or JSON), CPUID and MSR
//!   masks applied on top of what KVM supports;
//! - [`Vcpu::configure`]: CPUID, boot MSRs, FPU, general and special registers for the chosen
//!   [`EntryMode`] (PVH 32-bit protected mode or the 64-bit Linux boot protocol), and the local
//!   APIC's LINT0/LINT1 when the VM has an in-kernel irqchip;
//! - [`Vcpu::configure_ap`]: an application processor that waits in the in-kernel local APIC
//!   for the guest's INIT/SIPI;
//! - [`Vcpu::run`]: `KVM_RUN` in a loop, dispatching port and MMIO exits to an [`IoHandler`]
//!   without allocating, until something the VMM has to decide about happens ([`VcpuStop`]);
//! - [`kick`]: stop a running vCPU from another thread (set the `stop` flag, then kick).
//!
//! The caller owns the boot structures: it writes the GDT, IDT, page tables, zero page or PVH
//! start info into guest memory and passes their addresses and the GDT entries as plain numbers
//! in [`BootRegs`].
//!
//! # Order of set-up
//!
//! 1. create the VM, register guest memory;
//! 2. if the VM uses an in-kernel irqchip, create it (`VmFd::create_irq_chip`) **before** any
//!    vCPU: KVM refuses to create it afterwards, and only vCPUs created after it get an
//!    in-kernel local APIC;
//! 3. for each vCPU id `0..n` ([`MAX_VCPUS`] at most): [`Vcpu::new`], optionally
//!    [`Vcpu::set_msr_modifiers`] with the template's MSRs, its CPUID table
//!    ([`CpuTemplate::vcpu_cpuid`](template::CpuTemplate::vcpu_cpuid): supported → normalised
//!    for this id → template), then [`Vcpu::configure`] for vCPU 0 (it programs LINT0 = ExtINT
//!    and LINT1 = NMI when the vCPU has an in-kernel LAPIC and skips that otherwise) and
//!    [`Vcpu::configure_ap`] for the others;
//! 4. [`kick::init`] once, then [`Vcpu::run`] on each vCPU's own thread ([`Vcpu`] is `Send`);
//!    APs block inside `KVM_RUN` until the guest starts them.
//!
//! # SMP
//!
//! vCPU `i` has APIC id `i` (the MADT lists 0..n). vCPU 0 is the bootstrap processor and
//! enters the kernel with the boot registers. The others start the way they do on hardware:
//! the guest sends INIT and a STARTUP IPI through its local APIC (ICR at 0xfee00300); KVM's
//! in-kernel LAPIC resets the AP and starts it in real mode at `vector * 0x1000`. On the PVM
//! host this takes about 0.1 ms for one AP and 3 ms for 31 (broadcast), measured by
//! `tests/smp.rs`.
//!
//! Without an in-kernel irqchip, `HLT` exits to user space ([`VcpuStop::Halted`]); with one,
//! KVM handles it and waits for an interrupt.
//!
//! # This host
//!
//! On hosts where `/dev/kvm` is PVM, guest ring 0 is emulated by KVM's instruction emulator,
//! which refuses some instructions (XSAVE family, `cmpxchg16b`, `popcnt`, `int3`, `fwait`,
//! `clac`, ...; `tests/emulator.rs` lists them). Such a refusal ends [`Vcpu::run`] with
//! [`VcpuStop::EmulationFailure`], with the instruction bytes taken from the kernel's exit
//! report (or, if the kernel did not give them, from [`Vcpu::emulation_failure_bytes`]). The
//! `emulated-ring0` [template] hides the features behind them; where the host's KVM overrides
//! CPUID bits anyway, [`template::overridden_bits`] and [`template::linux_clearcpuid`] give the
//! kernel parameters that hide them from Linux.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use ember_vcpu::template::CpuTemplate;
//! use ember_vcpu::{cpuid, BootRegs, EntryMode, IoHandler, Vcpu, VcpuStop};
//!
//! struct Console;
//! impl IoHandler for Console {
//!     fn pio_read(&self, _port: u16, data: &mut [u8]) { data.fill(0xff) }
//!     fn pio_write(&self, port: u16, data: &[u8]) {
//!         if port == 0x3f8 { print!("{}", String::from_utf8_lossy(data)) }
//!     }
//!     fn mmio_read(&self, _addr: u64, data: &mut [u8]) { data.fill(0xff) }
//!     fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = kvm.create_vm()?;
//! // ... register guest memory, create the irqchip, load the kernel, write GDT/IDT/start info ...
//! let supported = cpuid::supported(&kvm)?;
//! let template = CpuTemplate::by_name("emulated-ring0")?; // or CpuTemplate::from_json(..)
//! let mut vcpu = Vcpu::new(&vm, 0)?;
//! vcpu.set_msr_modifiers(&template.msrs)?;
//! // supported -> cpuid::normalize (vCPU 0 of 1) -> template
//! let table = template.vcpu_cpuid(&supported, 0, 1, vcpu.tsc_khz())?;
//! vcpu.configure(
//!     &table,
//!     &BootRegs {
//!         mode: EntryMode::Pvh { entry: 0x100_0000, start_info: 0x6000 },
//!         gdt_addr: 0x500,
//!         gdt: [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0fff],
//!         idt_addr: 0x520,
//!         stack_top: 0x8ff0,
//!     },
//! )?;
//! ember_vcpu::kick::init()?;
//! let stop = AtomicBool::new(false);
//! match vcpu.run(&Console, &stop)? {
//!     VcpuStop::EmulationFailure { rip, insn } => {
//!         eprintln!("emulation failure at {rip:#x}: {insn:02x?}")
//!     }
//!     other => eprintln!("vCPU stopped: {other:?}"),
//! }
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod cpuid;
pub mod kick;
pub mod state;
pub mod template;
pub mod vm;

use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs, CpuId, Msrs,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A VM-level KVM ioctl failed ([`vm`]).
    #[error("{ioctl} failed: {source}")]
    VmIoctl {
        /// The ioctl.
        ioctl: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory has more regions than KVM has memory slot numbers.
    #[error("guest memory has more regions than KVM memory slots")]
    TooManyMemorySlots,
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {id}: {source}")]
    CreateVcpu {
        /// The vCPU id.
        id: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// The vCPU id / count pair passed to [`cpuid::normalize`] is impossible, or [`Vcpu::new`]
    /// got an id of [`MAX_VCPUS`] or more (then `nr_vcpus` = [`MAX_VCPUS`]).
    #[error("invalid vCPU topology: vCPU id {vcpu_id} of {nr_vcpus} vCPUs")]
    InvalidTopology {
        /// The vCPU id.
        vcpu_id: u8,
        /// The number of vCPUs.
        nr_vcpus: u8,
    },
    /// The normalised CPUID table would have more entries than KVM accepts.
    #[error("CPUID table too large: {entries} entries, KVM accepts at most {max}")]
    CpuidTooLarge {
        /// Entries needed.
        entries: usize,
        /// `KVM_MAX_CPUID_ENTRIES`.
        max: usize,
    },
    /// A vCPU ioctl of [`Vcpu::configure`] or of the exit handling failed.
    #[error("{ioctl} failed on vCPU {id}: {source}")]
    Ioctl {
        /// The ioctl, e.g. `KVM_SET_SREGS`.
        ioctl: &'static str,
        /// The vCPU id.
        id: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A saved state belongs to another vCPU.
    #[error("the state of vCPU {saved} cannot be restored into vCPU {id}")]
    StateMismatch {
        /// This vCPU's id.
        id: u8,
        /// The id in the state.
        saved: u8,
    },
    /// More MSRs in one request than a `kvm_msrs` holds.
    #[error("{count} MSRs in one request are more than KVM takes")]
    TooManyMsrs {
        /// Entries in the request.
        count: usize,
    },
    /// KVM accepted only the first `set` of the MSRs given (boot MSRs, or a restored state).
    #[error("KVM_SET_MSRS on vCPU {id} stopped at MSR {index:#x} ({set} of {total} set)")]
    SetMsrs {
        /// The vCPU id.
        id: u8,
        /// The MSR KVM refused.
        index: u32,
        /// MSRs set before it.
        set: usize,
        /// MSRs in the list.
        total: usize,
    },
    /// `KVM_RUN` failed with an error other than `EINTR`.
    #[error("KVM_RUN failed on vCPU {id}: {source}")]
    Run {
        /// The vCPU id.
        id: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A guest linear address is not mapped by the guest's page tables.
    #[error("guest linear address {gva:#x} is not mapped")]
    GvaNotMapped {
        /// The linear address.
        gva: u64,
    },
    /// Guest memory could not be read (or mapped).
    #[error("cannot access guest memory at {gpa:#x}: {source}")]
    GuestMemory {
        /// The guest physical address.
        gpa: u64,
        /// The vm-memory error.
        source: vm_memory::GuestMemoryError,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] std::io::Error),
    /// `pthread_kill` failed.
    #[error("cannot kick vCPU thread: {0}")]
    Kick(#[source] std::io::Error),
    /// [`Vcpu::configure_ap`] on a vCPU without an in-kernel local APIC (APs wait for
    /// INIT/SIPI in the in-kernel LAPIC).
    #[error("vCPU {id} has no in-kernel local APIC: create the irqchip before the vCPUs")]
    NoInKernelLapic {
        /// The vCPU id.
        id: u8,
    },
    /// [`Vcpu::configure_ap`] on vCPU 0, which KVM treats as the bootstrap processor.
    #[error("vCPU {id} is the bootstrap processor; configure it with Vcpu::configure")]
    NotAnAp {
        /// The vCPU id.
        id: u8,
    },
    /// No built-in CPU template has this name.
    #[error("unknown CPU template {name:?} (built-in: host, minimal, emulated-ring0)")]
    UnknownTemplate {
        /// The name asked for.
        name: String,
    },
    /// A CPU template's JSON could not be parsed.
    #[error("invalid CPU template JSON: {0}")]
    TemplateJson(#[source] serde_json::Error),
    /// A CPU template file could not be read.
    #[error("cannot read CPU template {path:?}: {source}")]
    TemplateFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CPU template is inconsistent (see
    /// [`CpuTemplate::validate`](template::CpuTemplate::validate)).
    #[error("invalid CPU template {template:?}: {reason}")]
    InvalidTemplate {
        /// The template's name.
        template: String,
        /// What is wrong.
        reason: String,
    },
    /// A CPU template sets CPUID bits that KVM does not offer (templates may only take
    /// features away).
    #[error(
        "CPU template {template:?} sets bits {bits:#010x} of CPUID leaf {leaf:#x}{} {register}, \
         which KVM does not offer",
        subleaf.map(|s| format!(".{s}")).unwrap_or_default()
    )]
    TemplateSetsUnsupported {
        /// The template's name.
        template: String,
        /// The leaf.
        leaf: u32,
        /// The subleaf of the modifier (`None` = all).
        subleaf: Option<u32>,
        /// The register.
        register: template::Register,
        /// The bits KVM does not offer.
        bits: u32,
    },
    /// An MSR modifier sets bits of an MSR that KVM does not report as set (or the MSR does not
    /// exist for this vCPU).
    #[error(
        "MSR modifier sets bits {bits:#x} of MSR {index:#x} that KVM does not offer on vCPU {id}"
    )]
    MsrUnsupported {
        /// The vCPU id.
        id: u8,
        /// The MSR.
        index: u32,
        /// The bits.
        bits: u64,
    },
}

pub use ember_bus::IoHandler;

pub use ember_boot::{BootRegs, EntryMode};

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcpuStop {
    /// The `stop` flag was set (normally followed by a [`kick`](kick::kick)).
    Stopped,
    /// The guest executed `HLT` (only exits to user space without an in-kernel irqchip).
    Halted,
    /// Triple fault (or another shutdown condition).
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT`; `kind` is `KVM_SYSTEM_EVENT_*` (1 shutdown, 2 reset, 3 crash).
    SystemEvent {
        /// The event type.
        kind: u32,
    },
    /// KVM's instruction emulator could not emulate the instruction at `rip`
    /// (`KVM_EXIT_INTERNAL_ERROR`, suberror 1).
    EmulationFailure {
        /// RIP of the instruction (not advanced).
        rip: u64,
        /// The bytes the emulator fetched, as reported by the kernel: up to 15, starting with
        /// the refused instruction (possibly followed by the next ones). Empty if the kernel
        /// gave none, in which case [`Vcpu::emulation_failure_bytes`] reads them from guest
        /// memory.
        insn: Vec<u8>,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` with another suberror (`KVM_INTERNAL_ERROR_*`).
    InternalError {
        /// The suberror.
        suberror: u32,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
    },
    /// Any other exit, as text (e.g. `"Debug(..)"`); the VMM should treat it as fatal.
    Unexpected(String),
}

/// MSR numbers set by [`Vcpu::configure`].
pub mod msr {
    /// IA32_TSC.
    pub const IA32_TSC: u32 = 0x10;
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// IA32_MISC_ENABLE.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MISC_ENABLE bit 0: fast strings.
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// IA32_MISC_ENABLE bit 11: branch trace storage unavailable.
    pub const MISC_ENABLE_BTS_UNAVAILABLE: u64 = 1 << 11;
    /// IA32_MISC_ENABLE bit 12: processor event based sampling unavailable.
    pub const MISC_ENABLE_PEBS_UNAVAILABLE: u64 = 1 << 12;
    /// IA32_ARCH_CAPABILITIES (read-only for the guest; KVM sets its value).
    pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
    /// IA32_MTRR_DEF_TYPE.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// MTRRs enabled (bit 11) with default type write-back (6).
    pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK (FMASK).
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;

    /// The boot MSRs and their values, in the order they are set.
    pub const BOOT_MSRS: [(u32, u64); 11] = [
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ];
}

/// Control register and EFER bits used for the boot state.
pub mod bits {
    /// CR0.PE: protected mode.
    pub const CR0_PE: u64 = 1;
    /// CR0.ET: extension type (always 1 on modern CPUs).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0.PG: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4.PAE.
    pub const CR4_PAE: u64 = 1 << 5;
    /// EFER.LME.
    pub const EFER_LME: u64 = 1 << 8;
    /// EFER.LMA.
    pub const EFER_LMA: u64 = 1 << 10;
    /// RFLAGS bit 1 (reserved, always 1).
    pub const RFLAGS_RESERVED: u64 = 1 << 1;
}

/// LAPIC register offsets and delivery modes used for LINT0/LINT1.
pub mod lapic {
    /// LVT LINT0 register offset.
    pub const LVT_LINT0: usize = 0x350;
    /// LVT LINT1 register offset.
    pub const LVT_LINT1: usize = 0x360;
    /// LVT mask bit.
    pub const LVT_MASKED: u32 = 1 << 16;
    /// Delivery mode NMI.
    pub const DELIVERY_NMI: u32 = 4;
    /// Delivery mode ExtINT.
    pub const DELIVERY_EXTINT: u32 = 7;

    /// Replaces the delivery mode (bits 8..=10) of an LVT entry.
    pub fn set_delivery_mode(lvt: u32, mode: u32) -> u32 {
        (lvt & !0x700) | ((mode & 7) << 8)
    }
}

/// The item size of the `KVM_EXIT_IO` exit just returned by `KVM_RUN` on the vCPU whose
/// `kvm_run` mapping is `run`; `len` (the exit's `size * count` data bytes) when the size is
/// not one KVM uses, so that a malformed exit is still handed on as one access.
fn pio_item_size(run: *const kvm_run, len: usize) -> usize {
    // SAFETY: `run` is the vCPU's live `kvm_run` mapping (held by the `Vcpu` being run) and the
    // exit reason is KVM_EXIT_IO, for which the kernel filled the `io` member of the union:
    // plain integers, valid for any bit pattern. Only that header is read; the data bytes the
    // caller borrows lie at `io.data_offset`, past the header.
    let size = usize::from(unsafe { (*run).__bindgen_anon_1.io.size });
    match size {
        1 | 2 | 4 if len.is_multiple_of(size) => size,
        _ => len.max(1),
    }
}

/// Decodes a GDT descriptor into KVM's segment form, as if loaded with selector
/// `table_index * 8` (TI = 0, RPL = 0).
///
/// Base and limit are reassembled from their split fields, the limit scaled to bytes when the
/// granularity bit is set (`limit << 12 | 0xfff`); type, S, DPL, P, AVL, L, D/B, G are copied;
/// a descriptor that is not present is marked unusable.
pub fn segment_from_gdt_entry(entry: u64, table_index: u8) -> kvm_segment {
    let field = |shift: u32, width: u32| (entry >> shift) & ((1u64 << width) - 1);
    #[allow(
        clippy::cast_possible_truncation,
        reason = "only used for fields of at most 4 bits, which fit in u8"
    )]
    let flag = |shift: u32, width: u32| field(shift, width) as u8;
    let base = field(16, 24) | (field(56, 8) << 24);
    let raw_limit = field(0, 16) | (field(48, 4) << 16);
    let g = flag(55, 1);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    #[allow(
        clippy::cast_possible_truncation,
        reason = "at most 20 bits shifted by 12 plus 0xfff: fits in u32"
    )]
    let limit = limit as u32;
    let present = flag(47, 1);
    kvm_segment {
        base,
        limit,
        selector: u16::from(table_index) * 8,
        type_: flag(40, 4),
        s: flag(44, 1),
        dpl: flag(45, 2),
        present,
        avl: flag(52, 1),
        l: flag(53, 1),
        db: flag(54, 1),
        g,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

pub use ember_memory::MAX_VCPUS;

/// Exits of one vCPU's run loop, by reason (relaxed atomic counters, readable from any
/// thread while the vCPU runs).
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads (one per `KVM_EXIT_IO` in, whatever the string length).
    pub io_in: std::sync::atomic::AtomicU64,
    /// Port writes.
    pub io_out: std::sync::atomic::AtomicU64,
    /// MMIO reads.
    pub mmio_read: std::sync::atomic::AtomicU64,
    /// MMIO writes.
    pub mmio_write: std::sync::atomic::AtomicU64,
    /// Interrupted `KVM_RUN`s (kicks, signals).
    pub interrupted: std::sync::atomic::AtomicU64,
    /// `KVM_RUN` failures.
    pub failures: std::sync::atomic::AtomicU64,
}

fn count(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One KVM vCPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    msr_modifiers: Vec<template::MsrModifier>,
    exits: std::sync::Arc<ExitCounters>,
}

impl Vcpu {
    /// Creates vCPU `id` (`KVM_CREATE_VCPU`; the id is also its APIC id). Create the in-kernel
    /// irqchip, if any, before this (see the crate docs). vCPU 0 is the bootstrap processor
    /// ([`Vcpu::configure`]), the others are application processors ([`Vcpu::configure_ap`]).
    ///
    /// Errors: [`Error::InvalidTopology`] for `id >= MAX_VCPUS`; [`Error::CreateVcpu`].
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, Error> {
        if id >= MAX_VCPUS {
            return Err(Error::InvalidTopology {
                vcpu_id: id,
                nr_vcpus: MAX_VCPUS,
            });
        }
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| Error::CreateVcpu { id, source })?;
        Ok(Vcpu {
            fd,
            id,
            msr_modifiers: Vec::new(),
            exits: std::sync::Arc::default(),
        })
    }

    /// Stores the MSR part of a CPU template ([`CpuTemplate::msrs`](template::CpuTemplate));
    /// [`Vcpu::configure`] and [`Vcpu::configure_ap`] apply it right after the boot MSRs.
    ///
    /// Errors: [`Error::InvalidTemplate`] for an MSR templates may not modify (see
    /// [`template::msr_settable_bits`]). Whether KVM offers the bits is checked when they are
    /// applied.
    pub fn set_msr_modifiers(&mut self, modifiers: &[template::MsrModifier]) -> Result<(), Error> {
        template::CpuTemplate {
            name: format!("vCPU {} MSRs", self.id),
            cpuid: Vec::new(),
            msrs: modifiers.to_vec(),
        }
        .validate()?;
        self.msr_modifiers = modifiers.to_vec();
        Ok(())
    }

    /// The MSR modifiers stored by [`Vcpu::set_msr_modifiers`].
    pub fn msr_modifiers(&self) -> &[template::MsrModifier] {
        &self.msr_modifiers
    }

    /// This vCPU's exit counters (shared: keep the `Arc` to read them while it runs).
    pub fn exit_counters(&self) -> std::sync::Arc<ExitCounters> {
        self.exits.clone()
    }

    /// The vCPU id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The underlying kvm-ioctls vCPU, for anything this crate does not wrap.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU's TSC frequency in kHz (`KVM_GET_TSC_KHZ`), if KVM knows it; the value to pass
    /// to [`cpuid::normalize`] for the timing leaf.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok().filter(|&khz| khz != 0)
    }

    fn ioctl_err(&self, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        let id = self.id;
        move |source| Error::Ioctl { ioctl, id, source }
    }

    /// Sets up the vCPU for entering the kernel as described by `boot`: CPUID (`cpuid`, already
    /// [normalised](cpuid::normalize) for this vCPU), the boot MSRs ([`msr::BOOT_MSRS`]), FPU
    /// (FCW 0x37f, MXCSR 0x1f80), general registers, segment/control registers, and — when the
    /// vCPU has an in-kernel local APIC — LINT0 = ExtINT, LINT1 = NMI.
    ///
    /// - [`EntryMode::Linux64`]: CR0 = PE|ET|PG, CR4 = PAE, EFER = LME|LMA, CR3 = `pml4`,
    ///   CS from `gdt[1]`, DS/ES/FS/GS/SS from `gdt[2]`, TR from `gdt[3]`, RIP = `entry`,
    ///   RSI = `zero_page`, RSP = RBP = `stack_top`, RFLAGS = 0x2.
    /// - [`EntryMode::Pvh`]: CR0 = PE|ET, CR4 = 0, EFER = 0, same segments (from a 32-bit
    ///   GDT), RIP = `entry`, RBX = `start_info`, RFLAGS = 0x2.
    ///
    /// GDTR = (`gdt_addr`, 31), IDTR = (`idt_addr`, 7) in both modes.
    pub fn configure(&self, cpuid: &CpuId, boot: &BootRegs) -> Result<(), Error> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.ioctl_err("KVM_SET_CPUID2"))?;
        self.setup_msrs()?;
        self.setup_fpu()?;
        self.setup_regs(boot)?;
        self.setup_sregs(boot)?;
        if self.has_in_kernel_lapic()? {
            self.setup_lapic()?;
        }
        Ok(())
    }

    /// Sets up an application processor (vCPU id > 0) to wait for the guest's INIT/SIPI:
    /// CPUID (`cpuid`, [normalised](cpuid::normalize) for this vCPU), the boot MSRs and the
    /// template MSRs ([`Vcpu::set_msr_modifiers`]), the FPU as in [`Vcpu::configure`], the local
    /// APIC's LINT0 = ExtINT and LINT1 = NMI delivery modes with the mask bits left as KVM's
    /// reset put them (masked on APs: only the BSP takes the PIC's ExtINT, as in Firecracker;
    /// the guest programs its own LVTs), and `KVM_MP_STATE_UNINITIALIZED`.
    ///
    /// The general and segment registers are left in their reset state: the in-kernel LAPIC
    /// holds the vCPU (`KVM_RUN` blocks) until the guest sends INIT and then a STARTUP IPI with
    /// vector `v`; the vCPU then starts in real mode at `v * 0x1000` (CS = `v << 8`, IP = 0).
    /// INIT keeps CPUID, MSRs and FPU state. Run the vCPU with [`Vcpu::run`] on its own thread
    /// from the start, like the BSP.
    ///
    /// Errors: [`Error::NotAnAp`] for vCPU 0 (KVM's bootstrap processor, which never waits for
    /// a SIPI); [`Error::NoInKernelLapic`] without an in-kernel irqchip; [`Error::Ioctl`] /
    /// [`Error::SetMsrs`] / [`Error::MsrUnsupported`].
    pub fn configure_ap(&self, cpuid: &CpuId) -> Result<(), Error> {
        if self.id == 0 {
            return Err(Error::NotAnAp { id: self.id });
        }
        if !self.has_in_kernel_lapic()? {
            return Err(Error::NoInKernelLapic { id: self.id });
        }
        self.fd
            .set_cpuid2(cpuid)
            .map_err(self.ioctl_err("KVM_SET_CPUID2"))?;
        self.setup_msrs()?;
        self.setup_fpu()?;
        self.setup_lapic()?;
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(self.ioctl_err("KVM_SET_MP_STATE"))
    }

    /// The CPUID table KVM actually uses for this vCPU (`KVM_GET_CPUID2`). Compare it with the
    /// table passed to [`Vcpu::configure`] using [`template::overridden_bits`]: some KVM builds
    /// (PVM) override parts of it.
    pub fn effective_cpuid(&self) -> Result<CpuId, Error> {
        self.fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(self.ioctl_err("KVM_GET_CPUID2"))
    }

    /// The vCPU's multiprocessing state (`KVM_GET_MP_STATE`): `KVM_MP_STATE_RUNNABLE` (0),
    /// `KVM_MP_STATE_UNINITIALIZED` (1, an AP waiting for INIT), `KVM_MP_STATE_INIT_RECEIVED`
    /// (2, waiting for SIPI), `KVM_MP_STATE_HALTED` (3), ...
    pub fn mp_state(&self) -> Result<u32, Error> {
        self.fd
            .get_mp_state()
            .map(|s| s.mp_state)
            .map_err(self.ioctl_err("KVM_GET_MP_STATE"))
    }

    /// Sets [`msr::BOOT_MSRS`], then applies the MSR modifiers of [`Vcpu::set_msr_modifiers`].
    pub fn setup_msrs(&self) -> Result<(), Error> {
        let entries = msr::BOOT_MSRS.map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        self.set_msr_entries(&entries)?;
        for m in &self.msr_modifiers {
            self.apply_msr_modifier(m)?;
        }
        Ok(())
    }

    fn set_msr_entries(&self, entries: &[kvm_msr_entry]) -> Result<(), Error> {
        // At most the 11 boot MSRs, far below KVM_MAX_MSR_ENTRIES: cannot fail.
        let msrs = Msrs::from_entries(entries).expect("MSR list fits");
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.ioctl_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(Error::SetMsrs {
                id: self.id,
                index: entries.get(set).map_or(0, |e| e.index),
                set,
                total: entries.len(),
            });
        }
        Ok(())
    }

    /// Reads one MSR (`KVM_GET_MSRS`); `None` if KVM does not have it for this vCPU.
    pub fn get_msr(&self, index: u32) -> Result<Option<u64>, Error> {
        // One entry: cannot fail.
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one MSR fits");
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.ioctl_err("KVM_GET_MSRS"))?;
        Ok((n == 1).then(|| msrs.as_slice()[0].data))
    }

    /// Read-modify-write of one MSR for a template modifier: `set` bits must already be set or
    /// be in [`template::msr_settable_bits`]; an MSR KVM does not have is skipped when the
    /// modifier only clears bits.
    fn apply_msr_modifier(&self, m: &template::MsrModifier) -> Result<(), Error> {
        let settable = template::msr_settable_bits(m.index).unwrap_or(0);
        let Some(old) = self.get_msr(m.index)? else {
            if m.set == 0 {
                return Ok(());
            }
            return Err(Error::MsrUnsupported {
                id: self.id,
                index: m.index,
                bits: m.set,
            });
        };
        let missing = m.set & !old & !settable;
        if missing != 0 {
            return Err(Error::MsrUnsupported {
                id: self.id,
                index: m.index,
                bits: missing,
            });
        }
        let new = (old & !m.clear) | m.set;
        if new != old {
            self.set_msr_entries(&[kvm_msr_entry {
                index: m.index,
                data: new,
                ..Default::default()
            }])?;
        }
        Ok(())
    }

    /// Sets the FPU to its post-`FNINIT` state (FCW 0x37f) with MXCSR 0x1f80.
    ///
    /// Note: the kernels measured (6.18, PVM) ignore `kvm_fpu.mxcsr` in `KVM_SET_FPU` and
    /// report 0 in `KVM_GET_FPU`; the guest's MXCSR is KVM's reset value, 0x1f80, as
    /// `KVM_GET_XSAVE` shows.
    pub fn setup_fpu(&self) -> Result<(), Error> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.ioctl_err("KVM_SET_FPU"))
    }

    /// The general registers for `boot` (see [`Vcpu::configure`]).
    pub fn boot_regs(boot: &BootRegs) -> kvm_regs {
        let mut regs = kvm_regs {
            rflags: bits::RFLAGS_RESERVED,
            ..Default::default()
        };
        match boot.mode {
            EntryMode::Pvh { entry, start_info } => {
                regs.rip = entry;
                regs.rbx = start_info;
            }
            EntryMode::Linux64 {
                entry, zero_page, ..
            } => {
                regs.rip = entry;
                regs.rsi = zero_page;
                regs.rsp = boot.stack_top;
                regs.rbp = boot.stack_top;
            }
        }
        regs
    }

    fn setup_regs(&self, boot: &BootRegs) -> Result<(), Error> {
        self.fd
            .set_regs(&Self::boot_regs(boot))
            .map_err(self.ioctl_err("KVM_SET_REGS"))
    }

    /// Applies the segment, descriptor-table, control-register and EFER state for `boot` to
    /// `sregs` (see [`Vcpu::configure`]); other fields (APIC base, interrupt bitmap) are kept.
    pub fn apply_boot_sregs(sregs: &mut kvm_sregs, boot: &BootRegs) {
        let code = segment_from_gdt_entry(boot.gdt[1], 1);
        let data = segment_from_gdt_entry(boot.gdt[2], 2);
        let tss = segment_from_gdt_entry(boot.gdt[3], 3);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        #[allow(
            clippy::cast_possible_truncation,
            reason = "the GDT is 4 entries (32 bytes) and the IDT one 8-byte entry"
        )]
        let (gdt_limit, idt_limit) = (
            (std::mem::size_of_val(&boot.gdt) - 1) as u16,
            (std::mem::size_of::<u64>() - 1) as u16,
        );
        sregs.gdt.base = boot.gdt_addr;
        sregs.gdt.limit = gdt_limit;
        sregs.idt.base = boot.idt_addr;
        sregs.idt.limit = idt_limit;
        match boot.mode {
            EntryMode::Pvh { .. } => {
                sregs.cr0 = bits::CR0_PE | bits::CR0_ET;
                sregs.cr3 = 0;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            EntryMode::Linux64 { pml4, .. } => {
                sregs.cr0 = bits::CR0_PE | bits::CR0_ET | bits::CR0_PG;
                sregs.cr3 = pml4;
                sregs.cr4 = bits::CR4_PAE;
                sregs.efer = bits::EFER_LME | bits::EFER_LMA;
            }
        }
    }

    fn setup_sregs(&self, boot: &BootRegs) -> Result<(), Error> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        Self::apply_boot_sregs(&mut sregs, boot);
        self.fd
            .set_sregs(&sregs)
            .map_err(self.ioctl_err("KVM_SET_SREGS"))
    }

    /// Whether this vCPU has an in-kernel local APIC, i.e. the VM's in-kernel irqchip existed
    /// when the vCPU was created.
    pub fn has_in_kernel_lapic(&self) -> Result<bool, Error> {
        match self.fd.get_lapic() {
            Ok(_) => Ok(true),
            // KVM_GET_LAPIC without an in-kernel LAPIC: EINVAL (ENXIO on some kernels).
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENXIO => Ok(false),
            Err(source) => Err(Error::Ioctl {
                ioctl: "KVM_GET_LAPIC",
                id: self.id,
                source,
            }),
        }
    }

    /// Programs the local APIC: LINT0 delivery mode ExtINT (the legacy PIC's INTR), LINT1 NMI.
    /// Only the delivery modes change; the mask bits stay as KVM's reset left them (on the BSP
    /// KVM leaves LINT0 unmasked, on APs every LVT is masked). Needs the in-kernel irqchip
    /// (fails with [`Error::Ioctl`] otherwise).
    pub fn setup_lapic(&self) -> Result<(), Error> {
        let mut state = self
            .fd
            .get_lapic()
            .map_err(self.ioctl_err("KVM_GET_LAPIC"))?;
        for (offset, mode) in [
            (lapic::LVT_LINT0, lapic::DELIVERY_EXTINT),
            (lapic::LVT_LINT1, lapic::DELIVERY_NMI),
        ] {
            let reg = &mut state.regs[offset..offset + 4];
            let mut bytes = [0u8; 4];
            for (b, r) in bytes.iter_mut().zip(reg.iter()) {
                *b = u8::from_ne_bytes(r.to_ne_bytes());
            }
            let value = lapic::set_delivery_mode(u32::from_le_bytes(bytes), mode);
            for (r, b) in reg.iter_mut().zip(value.to_le_bytes()) {
                *r = b as std::os::raw::c_char;
            }
        }
        self.fd
            .set_lapic(&state)
            .map_err(self.ioctl_err("KVM_SET_LAPIC"))
    }

    /// Runs the vCPU until something other than port I/O or MMIO happens, or `stop` is set.
    ///
    /// `stop` is checked before every `KVM_RUN`. To stop a vCPU from another thread, set `stop`
    /// and then [`kick::kick`] the vCPU thread: that is race-free (see [`kick`]). Port I/O and
    /// MMIO exits go to `io` and the loop continues; `EINTR` (a kick or another signal) clears
    /// `immediate_exit` and continues (and so re-checks `stop`); `EAGAIN` (an AP woken from
    /// its wait for INIT/SIPI, see [`Vcpu::configure_ap`]) continues.
    pub fn run(&mut self, io: &dyn IoHandler, stop: &AtomicBool) -> Result<VcpuStop, Error> {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        let _published = kick::RunGuard::enter(run_ptr);
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(VcpuStop::Stopped);
            }
            let exits = &*self.exits;
            match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    count(&exits.io_out);
                    for item in data.chunks(pio_item_size(run_ptr, data.len())) {
                        io.pio_write(port, item);
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    count(&exits.io_in);
                    for item in data.chunks_mut(pio_item_size(run_ptr, data.len())) {
                        io.pio_read(port, item);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    count(&exits.mmio_write);
                    io.mmio_write(addr, data)
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    count(&exits.mmio_read);
                    io.mmio_read(addr, data)
                }
                Ok(VcpuExit::Hlt) => return Ok(VcpuStop::Halted),
                Ok(VcpuExit::Shutdown) => return Ok(VcpuStop::Shutdown),
                Ok(VcpuExit::SystemEvent(kind, _)) => return Ok(VcpuStop::SystemEvent { kind }),
                Ok(VcpuExit::FailEntry(reason, _)) => return Ok(VcpuStop::FailEntry { reason }),
                Ok(VcpuExit::InternalError) => return self.internal_error(),
                Ok(VcpuExit::Intr) => {
                    count(&exits.interrupted);
                    self.fd.set_kvm_immediate_exit(0)
                }
                Ok(other) => return Ok(VcpuStop::Unexpected(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR => {
                    count(&exits.interrupted);
                    self.fd.set_kvm_immediate_exit(0)
                }
                // An AP held by the in-kernel LAPIC (KVM_MP_STATE_UNINITIALIZED) returns EAGAIN
                // when INIT/SIPI (or anything else) wakes it: just enter again.
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(source) => {
                    count(&exits.failures);
                    return Err(Error::Run {
                        id: self.id,
                        source,
                    });
                }
            }
        }
    }

    /// Decodes the `KVM_EXIT_INTERNAL_ERROR` just returned by `KVM_RUN`.
    fn internal_error(&mut self) -> Result<VcpuStop, Error> {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which the kernel fills the
        // `internal` / `emulation_failure` union members; both start with `suberror`, `ndata`
        // and are plain integers, valid for any bit pattern.
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Ok(VcpuStop::InternalError {
                suberror: failure.suberror,
            });
        }
        // ndata counts u64 words after the header: flags, then 2 words of insn_size/insn_bytes.
        let insn = if failure.ndata >= 3
            && failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
        {
            // SAFETY: the flag says the insn_size/insn_bytes member is the valid one; it is
            // plain bytes.
            let bytes = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
            let len = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
            bytes.insn_bytes[..len].to_vec()
        } else {
            Vec::new()
        };
        let rip = self
            .fd
            .get_regs()
            .map_err(self.ioctl_err("KVM_GET_REGS"))?
            .rip;
        Ok(VcpuStop::EmulationFailure { rip, insn })
    }

    /// The linear address of the current instruction: CS base + RIP outside 64-bit mode
    /// (wrapped to 32 bits), RIP in 64-bit mode.
    pub fn current_instruction_address(&self) -> Result<u64, Error> {
        let rip = self
            .fd
            .get_regs()
            .map_err(self.ioctl_err("KVM_GET_REGS"))?
            .rip;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.ioctl_err("KVM_GET_SREGS"))?;
        Ok(if sregs.efer & bits::EFER_LMA != 0 && sregs.cs.l == 1 {
            rip
        } else {
            sregs.cs.base.wrapping_add(rip) & 0xffff_ffff
        })
    }

    /// Translates a guest linear address with the vCPU's current paging state
    /// (`KVM_TRANSLATE`) to a guest physical address.
    pub fn translate(&self, gva: u64) -> Result<u64, Error> {
        let tr = self
            .fd
            .translate_gva(gva)
            .map_err(self.ioctl_err("KVM_TRANSLATE"))?;
        if tr.valid == 0 {
            return Err(Error::GvaNotMapped { gva });
        }
        Ok(tr.physical_address)
    }

    /// Reads the (up to 15) bytes of the instruction at the current CS:RIP from guest memory,
    /// translating through the guest's page tables page by page. Meant for a
    /// [`VcpuStop::EmulationFailure`] whose `insn` is empty; stops early (returning fewer
    /// bytes) at the first page that is unmapped or not RAM, and fails only if not even the
    /// first byte can be read.
    pub fn emulation_failure_bytes<M: GuestMemoryBackend>(
        &self,
        mem: &M,
    ) -> Result<Vec<u8>, Error> {
        const MAX_INSN: usize = 15;
        const PAGE: u64 = 4096;
        let start = self.current_instruction_address()?;
        let mut out = Vec::with_capacity(MAX_INSN);
        let mut gva = start;
        while out.len() < MAX_INSN {
            // At most 4096, so it fits in usize.
            let to_page_end = usize::try_from(PAGE - (gva % PAGE)).unwrap_or(usize::MAX);
            let want = (MAX_INSN - out.len()).min(to_page_end);
            let gpa = match self.translate(gva) {
                Ok(gpa) => gpa,
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            };
            let mut buf = [0u8; MAX_INSN];
            let buf = &mut buf[..want];
            match mem.read_slice(buf, GuestAddress(gpa)) {
                Ok(()) => out.extend_from_slice(buf),
                Err(source) if out.is_empty() => return Err(Error::GuestMemory { gpa, source }),
                Err(_) => break,
            }
            gva = gva.wrapping_add(want as u64);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_long_mode_gdt() {
        let code = segment_from_gdt_entry(0x00af_9b00_0000_ffff, 1);
        assert_eq!(
            (code.base, code.limit, code.selector, code.type_),
            (0, 0xffff_ffff, 0x08, 0xb)
        );
        assert_eq!(
            (
                code.present,
                code.dpl,
                code.db,
                code.s,
                code.l,
                code.g,
                code.unusable
            ),
            (1, 0, 0, 1, 1, 1, 0)
        );
        let data = segment_from_gdt_entry(0x00cf_9300_0000_ffff, 2);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l, data.g),
            (0x10, 3, 1, 0, 1)
        );
        assert_eq!(data.limit, 0xffff_ffff);
        let code32 = segment_from_gdt_entry(0x00cf_9b00_0000_ffff, 1);
        assert_eq!((code32.db, code32.l, code32.type_), (1, 0, 0xb));
    }

    #[test]
    fn decode_tss_and_base_fields() {
        let tss = segment_from_gdt_entry(0x0000_8b00_0000_0fff, 3);
        assert_eq!(
            (
                tss.base,
                tss.limit,
                tss.selector,
                tss.type_,
                tss.s,
                tss.present,
                tss.g
            ),
            (0, 0xfff, 0x18, 0xb, 0, 1, 0)
        );
        // base 0x12345678, limit 0x56789 bytes (G=0), DPL 3, AVL.
        let entry: u64 = 0x1215_f234_5678_6789 | (1 << 52);
        let s = segment_from_gdt_entry(entry, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x5_6789);
        assert_eq!((s.dpl, s.present, s.avl, s.s, s.type_), (3, 1, 1, 1, 2));
        assert_eq!(s.selector, 0x28);
        let null = segment_from_gdt_entry(0, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn lvt_delivery_mode() {
        assert_eq!(
            lapic::set_delivery_mode(0x0001_0000, lapic::DELIVERY_EXTINT),
            0x0001_0700
        );
        assert_eq!(
            lapic::set_delivery_mode(0x0001_07ff, lapic::DELIVERY_NMI),
            0x0001_04ff
        );
    }

    #[test]
    fn boot_state_per_mode() {
        let boot = BootRegs {
            mode: EntryMode::Linux64 {
                entry: 0x100_0000,
                zero_page: 0x7000,
                pml4: 0x9000,
            },
            gdt_addr: 0x500,
            gdt: [
                0,
                0x00af_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x0000_8b00_0000_0fff,
            ],
            idt_addr: 0x520,
            stack_top: 0x8ff0,
        };
        let r = Vcpu::boot_regs(&boot);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rbp, r.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 0x8ff0, 2)
        );
        let mut s = kvm_sregs::default();
        Vcpu::apply_boot_sregs(&mut s, &boot);
        assert_eq!(
            (s.cr0, s.cr3, s.cr4, s.efer),
            (0x8000_0011, 0x9000, 0x20, 0x500)
        );
        assert_eq!(
            (s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit),
            (0x500, 31, 0x520, 7)
        );
        assert_eq!(
            (s.cs.selector, s.cs.l, s.ss.selector, s.tr.selector),
            (8, 1, 0x10, 0x18)
        );

        let pvh = BootRegs {
            mode: EntryMode::Pvh {
                entry: 0x100_000c,
                start_info: 0x6000,
            },
            gdt: [
                0,
                0x00cf_9b00_0000_ffff,
                0x00cf_9300_0000_ffff,
                0x0000_8b00_0000_0067,
            ],
            ..boot
        };
        let r = Vcpu::boot_regs(&pvh);
        assert_eq!(
            (r.rip, r.rbx, r.rsi, r.rsp, r.rflags),
            (0x100_000c, 0x6000, 0, 0, 2)
        );
        Vcpu::apply_boot_sregs(&mut s, &pvh);
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x11, 0, 0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.tr.limit), (1, 0, 0x67));
    }
}
