//! Tests against the real /dev/kvm: hand-written guest code in 2 MiB of guest memory.
//!
//! Every test skips (with a loud message) only when /dev/kvm does not exist.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test inputs are small, known values; LAPIC register bytes (c_char) are reinterpreted as u8"
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_vcpu::{
    cpuid, kick, segment_from_gdt_entry, BootRegs, EntryMode, IoHandler, Vcpu, VcpuStop,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 2 << 20;
const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const START_INFO: u64 = 0x6000;
const ZERO_PAGE: u64 = 0x7000;
const STACK_TOP: u64 = 0x8ff0;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
const CODE: u64 = 0x1000;

const GDT_LONG: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0fff,
];
const GDT_PROT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0fff,
];

use common::kvm_or_skip;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Access {
    PioWrite(u16, Vec<u8>),
    PioRead(u16, usize),
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
}

/// Records every access; reads return 0xa0, 0xa1, ...; a write to `stop_port` sets `stop`.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<Access>>,
    stop_port: Option<u16>,
    stop: Arc<AtomicBool>,
}

fn fill_pattern(data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = 0xa0 + i as u8;
    }
}

impl IoHandler for Recorder {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        fill_pattern(data);
        self.log
            .lock()
            .unwrap()
            .push(Access::PioRead(port, data.len()));
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if Some(port) == self.stop_port {
            self.stop.store(true, Ordering::Release);
        }
        self.log
            .lock()
            .unwrap()
            .push(Access::PioWrite(port, data.to_vec()));
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        fill_pattern(data);
        self.log
            .lock()
            .unwrap()
            .push(Access::MmioRead(addr, data.len()));
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::MmioWrite(addr, data.to_vec()));
    }
}

/// Counts port writes, allocation-free, for the exit-rate measurement.
struct Counter {
    exits: AtomicU64,
    stop: AtomicBool,
}

impl IoHandler for Counter {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, _: &[u8]) {
        if port == 0x512 {
            self.stop.store(true, Ordering::Release);
        } else {
            self.exits.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

struct TestVm {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
}

impl TestVm {
    fn new(kvm: Kvm, irqchip: bool) -> Self {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of MEM_SIZE bytes owned by `mem`, which lives as
        // long as the VM (both in this struct; `vm` is dropped first, being declared before).
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        if irqchip {
            vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        }
        TestVm { kvm, vm, mem }
    }

    fn write_u64s(&self, addr: u64, values: &[u64]) {
        for (i, v) in values.iter().enumerate() {
            self.mem
                .write_obj(*v, GuestAddress(addr + 8 * i as u64))
                .unwrap();
        }
    }

    /// Boot structures for `mode`, code at CODE, and a configured vCPU 0.
    fn vcpu(&self, long_mode: bool, code: &[u8]) -> Vcpu {
        let gdt = if long_mode { GDT_LONG } else { GDT_PROT };
        self.write_u64s(GDT_ADDR, &gdt);
        self.write_u64s(IDT_ADDR, &[0]);
        if long_mode {
            // Identity map of the first 1 GiB with 2 MiB pages, user-accessible.
            self.write_u64s(PML4, &[PDPT | 7]);
            self.write_u64s(PDPT, &[PD | 7]);
            let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | 0x87).collect();
            self.write_u64s(PD, &pd);
        }
        self.mem.write_slice(code, GuestAddress(CODE)).unwrap();
        let mode = if long_mode {
            EntryMode::Linux64 {
                entry: CODE,
                zero_page: ZERO_PAGE,
                pml4: PML4,
            }
        } else {
            EntryMode::Pvh {
                entry: CODE,
                start_info: START_INFO,
            }
        };
        let vcpu = Vcpu::new(&self.vm, 0).expect("create vCPU");
        let mut table = cpuid::supported(&self.kvm).expect("supported CPUID");
        cpuid::normalize(&mut table, 0, 1, vcpu.tsc_khz()).expect("normalize");
        vcpu.configure(
            &table,
            &BootRegs {
                mode,
                gdt_addr: GDT_ADDR,
                gdt,
                idt_addr: IDT_ADDR,
                stack_top: STACK_TOP,
            },
        )
        .expect("configure");
        vcpu
    }
}

fn run_to_end(vcpu: &mut Vcpu, io: &Recorder) -> VcpuStop {
    let stop = AtomicBool::new(false);
    vcpu.run(io, &stop).expect("run")
}

#[test]
fn pvh_out_in_hlt() {
    let Some(kvm) = kvm_or_skip("pvh_out_in_hlt") else {
        return;
    };
    let vm = TestVm::new(kvm, false);
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'A',             // mov al, 'A'
        0xee,                   // out dx, al
        0x66, 0xba, 0x00, 0x02, // mov dx, 0x200
        0xec,                   // in al, dx
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee,                   // out dx, al
        0xf4,                   // hlt
    ];
    let mut vcpu = vm.vcpu(false, &code);
    let io = Recorder::default();
    assert_eq!(run_to_end(&mut vcpu, &io), VcpuStop::Halted);
    assert_eq!(
        *io.log.lock().unwrap(),
        vec![
            Access::PioWrite(0x3f8, vec![b'A']),
            Access::PioRead(0x200, 1),
            Access::PioWrite(0x3f8, vec![0xa0]),
        ]
    );
    let regs = vcpu.fd().get_regs().unwrap();
    assert_eq!(regs.rbx, START_INFO, "PVH: EBX = start_info");
    assert_eq!(regs.rip, CODE + code.len() as u64, "RIP after hlt");
    let sregs = vcpu.fd().get_sregs().unwrap();
    assert_eq!(sregs.cr0 & 0x8000_0001, 1, "protected mode, paging off");
    assert_eq!((sregs.cs.db, sregs.cs.l, sregs.cs.selector), (1, 0, 0x08));
}

#[test]
fn linux64_out_and_mmio() {
    let Some(kvm) = kvm_or_skip("linux64_out_and_mmio") else {
        return;
    };
    let vm = TestVm::new(kvm, false);
    #[rustfmt::skip]
    let code = [
        0x66, 0xba, 0xf8, 0x03,                   // mov dx, 0x3f8
        0xb0, b'B',                               // mov al, 'B'
        0xee,                                     // out dx, al
        0x48, 0xc7, 0xc0, 0x00, 0x00, 0x00, 0x10, // mov rax, 0x1000_0000 (not RAM)
        0xc7, 0x00, 0x78, 0x56, 0x34, 0x12,       // mov dword [rax], 0x12345678
        0x8b, 0x58, 0x08,                         // mov ebx, [rax + 8]
        0x66, 0xba, 0x10, 0x05,                   // mov dx, 0x510
        0x89, 0xd8,                               // mov eax, ebx
        0xef,                                     // out dx, eax
        0xf4,                                     // hlt
    ];
    let mut vcpu = vm.vcpu(true, &code);
    let io = Recorder::default();
    assert_eq!(run_to_end(&mut vcpu, &io), VcpuStop::Halted);
    assert_eq!(
        *io.log.lock().unwrap(),
        vec![
            Access::PioWrite(0x3f8, vec![b'B']),
            Access::MmioWrite(0x1000_0000, vec![0x78, 0x56, 0x34, 0x12]),
            Access::MmioRead(0x1000_0008, 4),
            Access::PioWrite(0x510, vec![0xa0, 0xa1, 0xa2, 0xa3]),
        ]
    );
    let regs = vcpu.fd().get_regs().unwrap();
    assert_eq!(
        (regs.rsi, regs.rsp, regs.rbp),
        (ZERO_PAGE, STACK_TOP, STACK_TOP)
    );
    let sregs = vcpu.fd().get_sregs().unwrap();
    assert_eq!(
        (sregs.cs.l, sregs.cr3, sregs.efer & 0x500),
        (1, PML4, 0x500)
    );
    assert_eq!(
        (sregs.tr.selector, sregs.gdt.limit, sregs.idt.limit),
        (0x18, 31, 7)
    );
}

#[test]
fn configure_sets_msrs_fpu_cpuid() {
    let Some(kvm) = kvm_or_skip("configure_sets_msrs_fpu_cpuid") else {
        return;
    };
    let vm = TestVm::new(kvm, false);
    let vcpu = vm.vcpu(true, &[0xf4]);
    let mut msrs =
        kvm_bindings::Msrs::from_entries(&ember_vcpu::msr::BOOT_MSRS.map(|(index, _)| {
            kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            }
        }))
        .unwrap();
    let n = vcpu.fd().get_msrs(&mut msrs).unwrap();
    assert_eq!(n, ember_vcpu::msr::BOOT_MSRS.len());
    for (got, (index, want)) in msrs.as_slice().iter().zip(ember_vcpu::msr::BOOT_MSRS) {
        assert_eq!(got.index, index);
        if index == ember_vcpu::msr::IA32_TSC {
            // A host-initiated write of 0 means "synchronise with the VM's TSC" to KVM
            // (kvm_synchronize_tsc), so the value read back is not 0 here.
            continue;
        } else if index == ember_vcpu::msr::IA32_MISC_ENABLE {
            assert_eq!(got.data & want, want, "MSR {index:#x}");
        } else {
            assert_eq!(got.data, want, "MSR {index:#x}");
        }
    }
    let fpu = vcpu.fd().get_fpu().unwrap();
    assert_eq!(fpu.fcw, 0x37f);
    // KVM_SET_FPU / KVM_GET_FPU do not transfer MXCSR (the kernel reports 0 here); the guest's
    // MXCSR is the reset value 0x1f80, visible through KVM_GET_XSAVE (legacy area offset 24).
    let xsave = vcpu.fd().get_xsave().unwrap();
    assert_eq!(xsave.region[6], 0x1f80);
    let table = vcpu
        .fd()
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let l1 = cpuid::find(&table, 1, 0).unwrap();
    assert_ne!(l1.ecx & cpuid::LEAF1_ECX_HYPERVISOR, 0);
    assert!(!vcpu.has_in_kernel_lapic().unwrap());
}

#[test]
fn lapic_lint_with_irqchip() {
    let Some(kvm) = kvm_or_skip("lapic_lint_with_irqchip") else {
        return;
    };
    let vm = TestVm::new(kvm, true);
    let vcpu = vm.vcpu(false, &[0xf4]);
    assert!(vcpu.has_in_kernel_lapic().unwrap());
    let state = vcpu.fd().get_lapic().unwrap();
    let reg = |off: usize| {
        let b: Vec<u8> = state.regs[off..off + 4].iter().map(|&c| c as u8).collect();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    assert_eq!((reg(0x350) >> 8) & 7, 7, "LINT0 ExtINT: {:#x}", reg(0x350));
    assert_eq!((reg(0x360) >> 8) & 7, 4, "LINT1 NMI: {:#x}", reg(0x360));
}

#[test]
fn supported_cpuid_normalizes() {
    let Some(kvm) = kvm_or_skip("supported_cpuid_normalizes") else {
        return;
    };
    let mut table = cpuid::supported(&kvm).unwrap();
    let before = table.as_slice().len();
    cpuid::normalize(&mut table, 1, 2, Some(2_000_000)).unwrap();
    let l1 = cpuid::find(&table, 1, 0).unwrap();
    assert_eq!(l1.ebx >> 24, 1);
    assert_eq!((l1.ebx >> 16) & 0xff, 2);
    assert_eq!((l1.ebx >> 8) & 0xff, 8);
    assert_ne!(l1.ecx & cpuid::LEAF1_ECX_HYPERVISOR, 0);
    assert_ne!(l1.edx & cpuid::LEAF1_EDX_HTT, 0);
    let sig = cpuid::find(&table, cpuid::KVM_SIGNATURE_LEAF, 0).unwrap();
    assert!(sig.eax >= cpuid::TIMING_LEAF);
    let t = cpuid::find(&table, cpuid::TIMING_LEAF, 0).unwrap();
    assert_eq!((t.eax, t.ebx), (2_000_000, cpuid::APIC_BUS_KHZ));
    let max_basic = cpuid::find(&table, 0, 0).unwrap().eax;
    if max_basic >= 0xb {
        let core = cpuid::find(&table, 0xb, 1).unwrap();
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
    }
    eprintln!(
        "supported CPUID: {before} entries, normalized {}; max basic leaf {max_basic:#x}; leaf 1 ecx {:#x} edx {:#x}",
        table.as_slice().len(),
        l1.ecx,
        l1.edx
    );
    // KVM accepts the result.
    let vm = TestVm::new(kvm, false);
    let vcpu = Vcpu::new(&vm.vm, 0).unwrap();
    cpuid::normalize(&mut table, 0, 2, None).unwrap();
    vcpu.fd().set_cpuid2(&table).unwrap();
}

#[test]
fn guest_sees_normalized_cpuid() {
    let Some(kvm) = kvm_or_skip("guest_sees_normalized_cpuid") else {
        return;
    };
    let vm = TestVm::new(kvm, false);
    #[rustfmt::skip]
    let code = [
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0f, 0xa2,                   // cpuid (clobbers edx)
        0x66, 0xba, 0x10, 0x05,       // mov dx, 0x510
        0x89, 0xd8,                   // mov eax, ebx
        0xef,                         // out dx, eax
        0x89, 0xc8,                   // mov eax, ecx
        0xef,                         // out dx, eax
        0xb8, 0x10, 0x00, 0x00, 0x40, // mov eax, 0x40000010
        0x0f, 0xa2,                   // cpuid
        0x66, 0xba, 0x10, 0x05,       // mov dx, 0x510
        0xef,                         // out dx, eax
        0x89, 0xd8,                   // mov eax, ebx
        0xef,                         // out dx, eax
        0xf4,                         // hlt
    ];
    let mut vcpu = vm.vcpu(true, &code);
    let tsc_khz = vcpu.tsc_khz();
    eprintln!("KVM_GET_TSC_KHZ: {tsc_khz:?}");
    let io = Recorder::default();
    assert_eq!(run_to_end(&mut vcpu, &io), VcpuStop::Halted);
    let values: Vec<u32> = io
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|a| match a {
            Access::PioWrite(0x510, d) => u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
            other => panic!("unexpected access {other:?}"),
        })
        .collect();
    assert_eq!(values.len(), 4);
    assert_eq!(
        values[0] >> 8,
        0x00_01_08,
        "leaf 1 EBX: APIC id 0, 1 logical, clflush 8"
    );
    assert_ne!(values[1] & cpuid::LEAF1_ECX_HYPERVISOR, 0);
    match tsc_khz {
        Some(khz) => assert_eq!((values[2], values[3]), (khz, cpuid::APIC_BUS_KHZ)),
        None => eprintln!("!!!!! no TSC frequency from KVM: timing leaf not checked !!!!!"),
    }
}

fn _vcpu_is_send() {
    fn is_send<T: Send>() {}
    is_send::<Vcpu>();
}

/// Candidates for an instruction KVM's emulator refuses in guest ring 0 on PVM hosts.
const REFUSED: [(&str, &[u8]); 4] = [
    ("popcnt eax, ecx", &[0xf3, 0x0f, 0xb8, 0xc1]),
    ("int3", &[0xcc]),
    ("fwait", &[0x9b]),
    ("lock cmpxchg16b [rsi]", &[0xf0, 0x48, 0x0f, 0xc7, 0x0e]),
];

#[test]
fn emulation_failure_reports_rip_and_bytes() {
    let Some(_kvm) = kvm_or_skip("emulation_failure_reports_rip_and_bytes") else {
        return;
    };
    let mut refused = Vec::new();
    for (name, insn) in REFUSED {
        let vm = TestVm::new(Kvm::new().unwrap(), false);
        // Two harmless instructions first, so that RIP is not the entry point.
        let mut code = vec![0x31, 0xc9, 0x90]; // xor ecx, ecx; nop
        code.extend_from_slice(insn);
        code.push(0xf4);
        let mut vcpu = vm.vcpu(true, &code);
        let io = Recorder::default();
        let stop = run_to_end(&mut vcpu, &io);
        eprintln!("{name}: {stop:?}");
        if let VcpuStop::EmulationFailure { rip, insn: bytes } = stop {
            assert_eq!(rip, CODE + 3, "{name}: RIP of the refused instruction");
            assert!(
                bytes.is_empty() || bytes.starts_with(insn),
                "{name}: kernel bytes {bytes:02x?}"
            );
            let from_mem = vcpu.emulation_failure_bytes(&vm.mem).unwrap();
            assert_eq!(from_mem.len(), 15);
            assert!(from_mem.starts_with(insn), "{name}: {from_mem:02x?}");
            refused.push((name, bytes));
        }
    }
    if refused.is_empty() {
        eprintln!(
            "!!!!! emulation_failure_reports_rip_and_bytes: no candidate was refused here \
             (guest ring 0 runs natively, not through the emulator); nothing to check !!!!!"
        );
        return;
    }
    eprintln!("refused in ring 0 here: {refused:02x?}");
}

#[test]
fn triple_fault_is_shutdown() {
    let Some(_kvm) = kvm_or_skip("triple_fault_is_shutdown") else {
        return;
    };
    #[rustfmt::skip]
    let cases: [(&str, &[u8]); 2] = [
        // IDT limit 7 holds only a null gate: #UD -> #GP -> #DF -> triple fault.
        ("ud2", &[0x0f, 0x0b]),
        // Load from beyond the 1 GiB identity map: #PF -> ... -> triple fault.
        ("mov rax, [0x4000_0000]", &[0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x40]),
    ];
    for (name, insn) in cases {
        let vm = TestVm::new(Kvm::new().unwrap(), false);
        let mut code = insn.to_vec();
        code.push(0xf4);
        let mut vcpu = vm.vcpu(true, &code);
        let io = Recorder::default();
        let stop = run_to_end(&mut vcpu, &io);
        eprintln!("{name}: {stop:?}");
        assert_eq!(stop, VcpuStop::Shutdown, "{name}");
    }
}

#[test]
fn stop_before_run_returns_at_once() {
    let Some(kvm) = kvm_or_skip("stop_before_run_returns_at_once") else {
        return;
    };
    let vm = TestVm::new(kvm, false);
    let mut vcpu = vm.vcpu(false, &[0x66, 0xba, 0xf8, 0x03, 0xee, 0xf4]);
    let io = Recorder::default();
    let stop = AtomicBool::new(true);
    assert_eq!(vcpu.run(&io, &stop).unwrap(), VcpuStop::Stopped);
    assert!(io.log.lock().unwrap().is_empty());
    stop.store(false, Ordering::Release);
    assert_eq!(vcpu.run(&io, &stop).unwrap(), VcpuStop::Halted);
    assert_eq!(io.log.lock().unwrap().len(), 1);
}

/// A vCPU on its own thread running `out 0x511; jmp $`; `go` starts one `run`, results come back.
struct Spinner {
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<(VcpuStop, Instant)>,
    entered: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn spinner(kvm: Kvm) -> Spinner {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let (entered_tx, entered_rx) = mpsc::sync_channel(1);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    kick::init().unwrap();
    let thread = std::thread::spawn(move || {
        let vm = TestVm::new(kvm, false);
        #[rustfmt::skip]
        let mut vcpu = vm.vcpu(false, &[
            0x66, 0xba, 0x11, 0x05, // mov dx, 0x511
            0xee,                   // out dx, al
            0xeb, 0xfe,             // jmp $
        ]);
        struct Entered(Mutex<Option<mpsc::SyncSender<()>>>);
        impl IoHandler for Entered {
            fn pio_read(&self, _: u16, _: &mut [u8]) {}
            fn pio_write(&self, _: u16, _: &[u8]) {
                if let Some(tx) = self.0.lock().unwrap().take() {
                    tx.send(()).unwrap();
                }
            }
            fn mmio_read(&self, _: u64, _: &mut [u8]) {}
            fn mmio_write(&self, _: u64, _: &[u8]) {}
        }
        let io = Entered(Mutex::new(Some(entered_tx)));
        while go_rx.recv().is_ok() {
            let r = vcpu.run(&io, &stop2).expect("run");
            if done_tx.send((r, Instant::now())).is_err() {
                break;
            }
        }
    });
    Spinner {
        go: go_tx,
        done: done_rx,
        entered: entered_rx,
        stop,
        thread,
    }
}

#[test]
fn kick_stops_spinning_guest() {
    let Some(kvm) = kvm_or_skip("kick_stops_spinning_guest") else {
        return;
    };
    let s = spinner(kvm);
    s.go.send(()).unwrap();
    s.entered
        .recv_timeout(Duration::from_secs(10))
        .expect("guest did not reach its out instruction");
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    s.stop.store(true, Ordering::Release);
    kick::kick_thread(&s.thread).unwrap();
    let (stop, at) = s
        .done
        .recv_timeout(Duration::from_secs(1))
        .expect("vCPU not stopped within 1 s of the kick");
    assert_eq!(stop, VcpuStop::Stopped);
    eprintln!("stopped {:?} after the kick", at.duration_since(t0));
    drop(s.go);
    s.thread.join().unwrap();
}

#[test]
fn stop_and_kick_race_free() {
    let Some(kvm) = kvm_or_skip("stop_and_kick_race_free") else {
        return;
    };
    let s = spinner(kvm);
    let mut worst = Duration::ZERO;
    for i in 0..200u32 {
        s.stop.store(false, Ordering::Release);
        s.go.send(()).unwrap();
        // Kick at varying points: before run starts, around the stop check, inside KVM_RUN.
        let delay = Duration::from_micros(u64::from(i % 20) * 25);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let t0 = Instant::now();
        s.stop.store(true, Ordering::Release);
        kick::kick_thread(&s.thread).unwrap();
        let (stop, at) = s
            .done
            .recv_timeout(Duration::from_secs(1))
            .unwrap_or_else(|_| panic!("iteration {i}: not stopped within 1 s"));
        assert_eq!(stop, VcpuStop::Stopped);
        worst = worst.max(at.saturating_duration_since(t0));
    }
    eprintln!("200 stop+kick rounds, worst stop latency {worst:?}");
    drop(s.go);
    s.thread.join().unwrap();
}

/// Measures port-I/O exits per second through `Vcpu::run`, in ring 0 (emulated on PVM hosts)
/// and in ring 3 (native), with `out dx, al; dec ecx; jnz` loops.
#[test]
fn exit_rate() {
    let Some(_kvm) = kvm_or_skip("exit_rate") else {
        return;
    };
    #[rustfmt::skip]
    fn code(n: u32) -> Vec<u8> {
        let mut c = vec![0xb9];                       // mov ecx, n
        c.extend_from_slice(&n.to_le_bytes());
        c.extend_from_slice(&[
            0x66, 0xba, 0x11, 0x05,                   // mov dx, 0x511
            0xee,                                     // 1: out dx, al
            0xff, 0xc9,                               // dec ecx
            0x75, 0xfb,                               // jnz 1b
            0x66, 0xba, 0x12, 0x05,                   // mov dx, 0x512
            0xee,                                     // out dx, al (stop)
            0xeb, 0xfe,                               // jmp $
        ]);
        c
    }
    for (ring, n) in [(0u8, 20_000u32), (3, 20_000)] {
        let vm = TestVm::new(Kvm::new().unwrap(), false);
        let mut vcpu = vm.vcpu(true, &code(n));
        if ring == 3 {
            // User code/data descriptors at GDT slots 4 and 5; IOPL 3 so `out` is allowed.
            let ucode = 0x00af_fb00_0000_ffffu64;
            let udata = 0x00cf_f300_0000_ffffu64;
            vm.write_u64s(GDT_ADDR + 32, &[ucode, udata]);
            let mut sregs = vcpu.fd().get_sregs().unwrap();
            sregs.gdt.limit = 6 * 8 - 1;
            sregs.cs = segment_from_gdt_entry(ucode, 4);
            sregs.cs.selector |= 3;
            let mut ds = segment_from_gdt_entry(udata, 5);
            ds.selector |= 3;
            (sregs.ds, sregs.es, sregs.ss) = (ds, ds, ds);
            vcpu.fd().set_sregs(&sregs).unwrap();
            let mut regs = vcpu.fd().get_regs().unwrap();
            regs.rflags = 0x3002;
            vcpu.fd().set_regs(&regs).unwrap();
        }
        let io = Counter {
            exits: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        };
        let t0 = Instant::now();
        let stop = vcpu.run(&io, &io.stop).unwrap();
        let dt = t0.elapsed();
        assert_eq!(stop, VcpuStop::Stopped, "ring {ring}");
        let exits = io.exits.load(Ordering::Relaxed);
        assert_eq!(exits, u64::from(n), "ring {ring}");
        eprintln!(
            "ring {ring}: {exits} port exits in {dt:?}: {:.0} exits/s, {:.2} us/exit",
            exits as f64 / dt.as_secs_f64(),
            dt.as_secs_f64() * 1e6 / exits as f64
        );
    }
}
