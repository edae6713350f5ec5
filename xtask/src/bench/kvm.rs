//! KVM set-up ablation: the ioctls Ember's start-up makes, timed one by one (wall clock and
//! the calling thread's CPU time), in Ember's order and in the orders a faster start-up
//! could use. Wall time well above CPU time means the ioctl sleeps (an RCU grace period,
//! waiting for a kernel thread), which no amount of user-space work removes but which other
//! work can overlap.

use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use super::stats::Summary;

/// One step of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// open `/dev/kvm`
    Open,
    /// `KVM_CREATE_VM`
    CreateVm,
    /// `KVM_SET_TSS_ADDR`
    Tss,
    /// `KVM_CREATE_IRQCHIP`
    Irqchip,
    /// `KVM_CREATE_PIT2`
    Pit2,
    /// `KVM_SET_USER_MEMORY_REGION` on a second thread, joined at [`Op::Join`]
    SpawnMemslot,
    /// join the thread of [`Op::SpawnMemslot`]
    Join,
    /// `KVM_SET_GSI_ROUTING` (IOAPIC pins 0-23, as Ember sets up)
    GsiRouting,
    /// `KVM_SET_USER_MEMORY_REGION` for the guest RAM
    Memslot,
    /// `KVM_GET_SUPPORTED_CPUID`
    SupportedCpuid,
    /// `KVM_CREATE_VCPU` (+ mmap of `kvm_run`)
    CreateVcpu,
    /// `KVM_SET_CPUID2`
    SetCpuid,
    /// sleep 50 ms (a VM that lives a little before it is torn down)
    Live,
    /// close the vCPU fd
    CloseVcpu,
    /// close the VM fd (the VM is destroyed)
    Destroy,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Open => "open /dev/kvm",
            Op::CreateVm => "KVM_CREATE_VM",
            Op::Tss => "KVM_SET_TSS_ADDR",
            Op::Irqchip => "KVM_CREATE_IRQCHIP",
            Op::Pit2 => "KVM_CREATE_PIT2",
            Op::SpawnMemslot => "spawn thread: KVM_SET_USER_MEMORY_REGION",
            Op::Join => "join the thread",
            Op::GsiRouting => "KVM_SET_GSI_ROUTING",
            Op::Memslot => "KVM_SET_USER_MEMORY_REGION",
            Op::SupportedCpuid => "KVM_GET_SUPPORTED_CPUID",
            Op::CreateVcpu => "KVM_CREATE_VCPU",
            Op::SetCpuid => "KVM_SET_CPUID2",
            Op::Live => "(the VM lives 50 ms)",
            Op::CloseVcpu => "close the vCPU fd",
            Op::Destroy => "close the VM fd (destroy)",
        }
    }
}

/// The sequences compared.
pub fn sequences() -> Vec<(&'static str, Vec<Op>)> {
    use Op::*;
    vec![
        (
            "Ember's order",
            vec![
                Open,
                CreateVm,
                Tss,
                Irqchip,
                Pit2,
                GsiRouting,
                Memslot,
                SupportedCpuid,
                CreateVcpu,
                SetCpuid,
                CloseVcpu,
                Destroy,
            ],
        ),
        (
            "no PIT",
            vec![
                Open,
                CreateVm,
                Tss,
                Irqchip,
                GsiRouting,
                Memslot,
                SupportedCpuid,
                CreateVcpu,
                SetCpuid,
                CloseVcpu,
                Destroy,
            ],
        ),
        (
            "memory slot first",
            vec![
                Open,
                CreateVm,
                Memslot,
                Tss,
                Irqchip,
                Pit2,
                GsiRouting,
                SupportedCpuid,
                CreateVcpu,
                SetCpuid,
                CloseVcpu,
                Destroy,
            ],
        ),
        (
            "memory slot first, no PIT",
            vec![
                Open,
                CreateVm,
                Memslot,
                Tss,
                Irqchip,
                GsiRouting,
                SupportedCpuid,
                CreateVcpu,
                SetCpuid,
                CloseVcpu,
                Destroy,
            ],
        ),
        (
            "memory slot first, no PIT, VM lives 50 ms",
            vec![
                Open,
                CreateVm,
                Memslot,
                Tss,
                Irqchip,
                GsiRouting,
                SupportedCpuid,
                CreateVcpu,
                SetCpuid,
                Live,
                CloseVcpu,
                Destroy,
            ],
        ),
        (
            "memory slot on a 2nd thread, no PIT",
            vec![
                Open,
                CreateVm,
                SpawnMemslot,
                Tss,
                Irqchip,
                GsiRouting,
                SupportedCpuid,
                CreateVcpu,
                SetCpuid,
                Join,
                CloseVcpu,
                Destroy,
            ],
        ),
    ]
}

/// Median wall and CPU time of one step, ms.
#[derive(Clone, Debug)]
pub struct StepResult {
    /// Step name.
    pub name: &'static str,
    /// Wall clock, ms.
    pub wall: Summary,
    /// Thread CPU time, ms.
    pub cpu: Summary,
}

/// One sequence's results.
#[derive(Clone, Debug)]
pub struct SequenceResult {
    /// Sequence name.
    pub name: &'static str,
    /// Per step.
    pub steps: Vec<StepResult>,
    /// Open → vCPU ready (everything before closing), wall ms.
    pub ready: Summary,
    /// Open → VM destroyed, wall ms (without the time it lived, for [`Op::Live`]).
    pub total: Summary,
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

struct Guest {
    addr: *mut libc::c_void,
    len: usize,
}

impl Guest {
    fn new(len: usize) -> Result<Guest, String> {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Guest { addr, len })
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the VM using it is gone by then.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

#[derive(Default)]
struct State {
    kvm: Option<Kvm>,
    vm: Option<std::sync::Arc<VmFd>>,
    vcpu: Option<VcpuFd>,
    cpuid: Option<kvm_bindings::CpuId>,
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
}

fn pit(vm: &VmFd) -> Result<(), String> {
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(|e| format!("KVM_CREATE_PIT2: {e}"))
}

/// IOAPIC pins 0-23 as GSIs 0-23 (Ember adds the PIC's; the ioctl's cost is the same).
fn gsi_routing() -> Result<kvm_bindings::KvmIrqRouting, String> {
    let entries: Vec<kvm_bindings::kvm_irq_routing_entry> = (0..24u32)
        .map(|gsi| {
            let mut e = kvm_bindings::kvm_irq_routing_entry {
                gsi,
                type_: kvm_bindings::KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = kvm_bindings::KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = gsi;
            e
        })
        .collect();
    kvm_bindings::KvmIrqRouting::from_entries(&entries).map_err(|e| format!("routing: {e:?}"))
}

fn memslot(vm: &VmFd, addr: u64, len: u64) -> Result<(), String> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: len,
        userspace_addr: addr,
    };
    // SAFETY: the mapping outlives the VM (it is unmapped after `Destroy`).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))
}

fn step(op: Op, s: &mut State, guest: &Guest) -> Result<(), String> {
    let vm = || s.vm.clone().ok_or("no VM");
    match op {
        Op::Open => s.kvm = Some(Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?),
        Op::CreateVm => {
            let kvm = s.kvm.as_ref().ok_or("no kvm")?;
            s.vm = Some(std::sync::Arc::new(
                kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?,
            ))
        }
        Op::Tss => vm()?
            .set_tss_address(0xfffb_d000)
            .map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?,
        Op::Irqchip => vm()?
            .create_irq_chip()
            .map_err(|e| format!("KVM_CREATE_IRQCHIP: {e}"))?,
        Op::Pit2 => pit(vm()?.as_ref())?,
        Op::SpawnMemslot => {
            let vm = vm()?;
            let (addr, len) = (guest.addr as u64, guest.len as u64);
            s.threads
                .push(std::thread::spawn(move || memslot(&vm, addr, len)));
        }
        Op::Join => {
            for t in s.threads.drain(..) {
                t.join().map_err(|_| "thread panicked")??;
            }
        }
        Op::GsiRouting => vm()?
            .set_gsi_routing(&gsi_routing()?)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))?,
        Op::Memslot => memslot(vm()?.as_ref(), guest.addr as u64, guest.len as u64)?,
        Op::SupportedCpuid => {
            let kvm = s.kvm.as_ref().ok_or("no kvm")?;
            s.cpuid = Some(
                kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?,
            );
        }
        Op::CreateVcpu => {
            s.vcpu = Some(
                vm()?
                    .create_vcpu(0)
                    .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?,
            )
        }
        Op::SetCpuid => {
            let (vcpu, cpuid) = (
                s.vcpu.as_ref().ok_or("no vcpu")?,
                s.cpuid.as_ref().ok_or("no cpuid")?,
            );
            vcpu.set_cpuid2(cpuid)
                .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?
        }
        Op::Live => std::thread::sleep(std::time::Duration::from_millis(50)),
        Op::CloseVcpu => s.vcpu = None,
        Op::Destroy => {
            for t in s.threads.drain(..) {
                let _ = t.join();
            }
            s.vcpu = None;
            s.vm = None;
            s.kvm = None;
        }
    }
    Ok(())
}

/// Runs every sequence `reps` times (interleaved) with a guest of `mem_mib` MiB.
pub fn run(reps: usize, mem_mib: u64) -> Result<Vec<SequenceResult>, String> {
    let seqs = sequences();
    // samples[seq][step] = (wall, cpu)
    let mut samples: Vec<Vec<(Vec<f64>, Vec<f64>)>> = seqs
        .iter()
        .map(|(_, ops)| vec![(Vec::new(), Vec::new()); ops.len()])
        .collect();
    let mut ready: Vec<Vec<f64>> = vec![Vec::new(); seqs.len()];
    let mut total: Vec<Vec<f64>> = vec![Vec::new(); seqs.len()];
    for _ in 0..reps {
        for (si, (_, ops)) in seqs.iter().enumerate() {
            let guest = Guest::new((mem_mib * 1024 * 1024) as usize)?;
            let mut state = State::default();
            let start = Instant::now();
            let mut is_ready = false;
            for (oi, &op) in ops.iter().enumerate() {
                if !is_ready && (op == Op::CloseVcpu || op == Op::Live) {
                    ready[si].push(start.elapsed().as_secs_f64() * 1e3);
                    is_ready = true;
                }
                if op == Op::Live {
                    step(op, &mut state, &guest)?;
                    continue;
                }
                let (w0, c0) = (Instant::now(), thread_cpu());
                step(op, &mut state, &guest)?;
                samples[si][oi].0.push(w0.elapsed().as_secs_f64() * 1e3);
                samples[si][oi].1.push(thread_cpu() - c0);
            }
            let lived = if ops.contains(&Op::Live) { 50.0 } else { 0.0 };
            total[si].push(start.elapsed().as_secs_f64() * 1e3 - lived);
            drop(state);
        }
    }
    let mut out = Vec::new();
    for (si, (name, ops)) in seqs.iter().enumerate() {
        let steps = ops
            .iter()
            .enumerate()
            .filter_map(|(oi, op)| {
                Some(StepResult {
                    name: op.name(),
                    wall: Summary::of(&samples[si][oi].0)?,
                    cpu: Summary::of(&samples[si][oi].1)?,
                })
            })
            .collect();
        out.push(SequenceResult {
            name,
            steps,
            ready: Summary::of(&ready[si]).ok_or("no samples")?,
            total: Summary::of(&total[si]).ok_or("no samples")?,
        });
    }
    Ok(out)
}
