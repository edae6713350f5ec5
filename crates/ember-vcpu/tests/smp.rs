//! Multi-vCPU tests against the real /dev/kvm: application processors started by the guest with
//! INIT/SIPI through the in-kernel local APIC.
//!
//! vCPU 0 runs hand-written 64-bit code (emulated ring 0 on PVM hosts) that software-enables its
//! xAPIC, writes INIT and then STARTUP (vector 0x08) to the ICR at 0xfee00300/0xfee00310 and
//! reports its APIC id on port 0x513. Each AP, configured with `Vcpu::configure_ap`, starts in
//! the real-mode trampoline at 0x8000, reads its APIC id with CPUID leaf 1 and writes it to port
//! 0x513. Every vCPU runs on its own thread; kick + stop end them.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test inputs are small, known values; LAPIC register bytes (c_char) are reinterpreted as u8"
)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ember_vcpu::template::CpuTemplate;
use ember_vcpu::{cpuid, kick, lapic, Error, IoHandler, Vcpu, VcpuStop, MAX_VCPUS};
use kvm_bindings::KVM_MP_STATE_UNINITIALIZED;

const REPORT_PORT: u16 = 0x513;
const MARK_PORT: u16 = 0x514;
const TRAMPOLINE: u64 = 0x8000;
const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;

/// Real mode, CS = 0x0800: report the APIC id from CPUID leaf 1 EBX[31:24], then halt.
#[rustfmt::skip]
const AP_CODE: [u8; 23] = [
    0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
    0x0f, 0xa2,                         // cpuid
    0x66, 0xc1, 0xeb, 0x18,             // shr ebx, 24
    0x66, 0x89, 0xd8,                   // mov eax, ebx
    0xba, 0x13, 0x05,                   // mov dx, 0x513
    0x66, 0xef,                         // out dx, eax
    0xf4,                               // 1: hlt
    0xeb, 0xfd,                         // jmp 1b
];

/// 64-bit BSP code: mark on port 0x514, INIT + SIPI to APIC id 1 (or, with `broadcast`, to all
/// but self), then report its own APIC id on port 0x513 and halt.
fn bsp_code(broadcast: bool) -> Vec<u8> {
    // ICR: delivery mode INIT (5) / STARTUP (6), level assert, physical destination; shorthand
    // "all excluding self" (bits 18..=19 = 3) when broadcasting.
    let shorthand = if broadcast { 3 << 18 } else { 0 };
    let icr_init: u32 = shorthand | (1 << 14) | (5 << 8);
    let icr_sipi: u32 = shorthand | (1 << 14) | (6 << 8) | SIPI_VECTOR;
    let dest: u32 = 1 << 24;
    let mut c = vec![
        0x66, 0xba, 0x14, 0x05, // mov dx, 0x514
        0xef, // out dx, eax (mark: INIT about to be sent)
        0xbb, 0x00, 0x00, 0xe0, 0xfe, // mov ebx, 0xfee00000
    ];
    // mov dword [rbx + off], imm32
    let mut store = |off: u32, value: u32| {
        c.extend_from_slice(&[0xc7, 0x83]);
        c.extend_from_slice(&off.to_le_bytes());
        c.extend_from_slice(&value.to_le_bytes());
    };
    store(0xf0, 0x1ff); // spurious vector register: APIC software-enabled, vector 0xff
    store(0x310, dest);
    store(0x300, icr_init);
    store(0x310, dest);
    store(0x300, icr_sipi);
    #[rustfmt::skip]
    c.extend_from_slice(&[
        0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0f, 0xa2,                   // cpuid
        0xc1, 0xeb, 0x18,             // shr ebx, 24
        0x89, 0xd8,                   // mov eax, ebx
        0x66, 0xba, 0x13, 0x05,       // mov dx, 0x513
        0xef,                         // out dx, eax
        0xf4,                         // 1: hlt
        0xeb, 0xfd,                   // jmp 1b
    ]);
    c
}

/// Sends (vCPU id, port, value, time) for every port write of one vCPU.
struct Reporter {
    id: u8,
    tx: Mutex<mpsc::Sender<(u8, u16, u32, Instant)>>,
}

impl IoHandler for Reporter {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let now = Instant::now();
        let _ = self
            .tx
            .lock()
            .unwrap()
            .send((self.id, port, u32::from_le_bytes(b), now));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        eprintln!(
            "vCPU {}: MMIO write {addr:#x} {data:02x?} reached user space",
            self.id
        );
    }
}

fn lvt(vcpu: &Vcpu, offset: usize) -> u32 {
    let state = vcpu.fd().get_lapic().unwrap();
    let b: Vec<u8> = state.regs[offset..offset + 4]
        .iter()
        .map(|&c| c as u8)
        .collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

struct Outcome {
    /// (vCPU id, value reported on port 0x513, time since the BSP's mark).
    reports: Vec<(u8, u32, Duration)>,
    /// Time from thread start to the BSP's mark.
    to_mark: Duration,
    /// The vCPUs after they were stopped.
    vcpus: Vec<Vcpu>,
}

/// Starts `n` vCPUs (BSP + APs) with `template`, waits for `n` reports on port 0x513.
fn boot_aps(test: &str, n: u8, broadcast: bool, template: &CpuTemplate) -> Option<Outcome> {
    let kvm = kvm_or_skip(test)?;
    let vm = TestVm::new(kvm, true);
    let boot = vm.long_mode_setup(&bsp_code(broadcast));
    vm.write(TRAMPOLINE, &AP_CODE);
    let supported = cpuid::supported(&vm.kvm).unwrap();
    let mut vcpus = Vec::new();
    for id in 0..n {
        let mut vcpu = Vcpu::new(&vm.vm, id).unwrap();
        vcpu.set_msr_modifiers(&template.msrs).unwrap();
        let table = template
            .vcpu_cpuid(&supported, id, n, vcpu.tsc_khz())
            .unwrap();
        if id == 0 {
            vcpu.configure(&table, &boot).unwrap();
        } else {
            vcpu.configure_ap(&table).unwrap();
            assert_eq!(vcpu.mp_state().unwrap(), KVM_MP_STATE_UNINITIALIZED);
        }
        vcpus.push(vcpu);
    }
    kick::init().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    // APs first (they block in KVM_RUN until the SIPI), the BSP last.
    let threads: Vec<_> = vcpus
        .into_iter()
        .rev()
        .map(|mut vcpu| {
            let stop = stop.clone();
            let io = Reporter {
                id: vcpu.id(),
                tx: Mutex::new(tx.clone()),
            };
            std::thread::spawn(move || {
                let r = vcpu.run(&io, &stop);
                (r, vcpu)
            })
        })
        .collect();
    drop(tx);
    let mut mark = None;
    let mut reports = Vec::new();
    // Generous: ring 0 and real mode are emulated on PVM hosts (it takes < 10 ms there).
    let deadline = Instant::now() + Duration::from_secs(60);
    while reports.len() < usize::from(n) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((id, MARK_PORT, _, at)) => {
                assert_eq!(id, 0, "mark from vCPU {id}");
                mark = Some(at);
            }
            Ok((id, REPORT_PORT, value, at)) => reports.push((id, value, at)),
            Ok(other) => panic!("unexpected port write {other:?}"),
            Err(e) => panic!(
                "{test}: {} of {n} vCPUs reported within 60 s ({e}): {reports:?}",
                reports.len()
            ),
        }
    }
    stop.store(true, Ordering::Release);
    for t in &threads {
        kick::kick_thread(t).unwrap();
    }
    let mut stopped = Vec::new();
    for t in threads {
        let (r, vcpu) = t.join().unwrap();
        assert_eq!(r.unwrap(), VcpuStop::Stopped, "vCPU {}", vcpu.id());
        stopped.push(vcpu);
    }
    stopped.sort_by_key(|v| v.id());
    let mark = mark.expect("BSP mark");
    Some(Outcome {
        reports: reports
            .into_iter()
            .map(|(id, v, at)| (id, v, at.saturating_duration_since(mark)))
            .collect(),
        to_mark: mark.duration_since(t0),
        vcpus: stopped,
    })
}

fn check_reports(o: &Outcome, n: u8) {
    let mut seen: Vec<(u8, u32)> = o.reports.iter().map(|&(id, v, _)| (id, v)).collect();
    seen.sort();
    let want: Vec<(u8, u32)> = (0..n).map(|id| (id, u32::from(id))).collect();
    assert_eq!(
        seen, want,
        "each vCPU reports its own APIC id from its own thread"
    );
    // Every AP started in the trampoline: real mode, CS base = SIPI vector * 4 KiB.
    for vcpu in &o.vcpus[1..] {
        let sregs = vcpu.fd().get_sregs().unwrap();
        assert_eq!(sregs.cr0 & 1, 0, "AP {} in real mode", vcpu.id());
        assert_eq!(
            (sregs.cs.base, sregs.cs.selector),
            (TRAMPOLINE, (TRAMPOLINE >> 4) as u16),
            "AP {}",
            vcpu.id()
        );
    }
}

#[test]
fn init_sipi_starts_ap() {
    let host = CpuTemplate::default();
    let Some(o) = boot_aps("init_sipi_starts_ap", 2, false, &host) else {
        return;
    };
    check_reports(&o, 2);
    let ap = o.reports.iter().find(|r| r.0 == 1).unwrap().2;
    eprintln!(
        "2 vCPUs: BSP mark {:?} after start; AP reported {ap:?} after the mark (INIT+SIPI+5 real-mode instructions); reports {:?}",
        o.to_mark, o.reports
    );
}

#[test]
fn init_sipi_broadcast_starts_4_aps_with_emulated_ring0_template() {
    let t = CpuTemplate::builtin("emulated-ring0").unwrap();
    let Some(o) = boot_aps(
        "init_sipi_broadcast_starts_4_aps_with_emulated_ring0_template",
        4,
        true,
        &t,
    ) else {
        return;
    };
    check_reports(&o, 4);
    let last = o.reports.iter().map(|r| r.2).max().unwrap();
    eprintln!("4 vCPUs (broadcast): last AP {last:?} after the mark");
    // The template's MSR modifier reached the APs too.
    for vcpu in &o.vcpus {
        let misc = vcpu.get_msr(ember_vcpu::msr::IA32_MISC_ENABLE).unwrap();
        assert_eq!(misc.unwrap() & 1, 1, "vCPU {} fast strings", vcpu.id());
    }
}

#[test]
fn init_sipi_broadcast_starts_31_aps() {
    let host = CpuTemplate::default();
    let Some(o) = boot_aps("init_sipi_broadcast_starts_31_aps", MAX_VCPUS, true, &host) else {
        return;
    };
    check_reports(&o, MAX_VCPUS);
    let last = o.reports.iter().map(|r| r.2).max().unwrap();
    eprintln!("32 vCPUs (broadcast): last AP {last:?} after the mark");
}

#[test]
fn ap_waiting_for_sipi_can_be_stopped() {
    let Some(kvm) = kvm_or_skip("ap_waiting_for_sipi_can_be_stopped") else {
        return;
    };
    let vm = TestVm::new(kvm, true);
    let _bsp = Vcpu::new(&vm.vm, 0).unwrap();
    let mut ap = Vcpu::new(&vm.vm, 1).unwrap();
    ap.configure_ap(&vm.cpuid(1, 2)).unwrap();
    kick::init().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let stop2 = stop.clone();
    let t = std::thread::spawn(move || {
        let io = Reporter {
            id: 1,
            tx: Mutex::new(tx),
        };
        let r = ap.run(&io, &stop2);
        (r, ap)
    });
    // No INIT/SIPI: the AP stays in the kernel without exits.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(!t.is_finished());
    stop.store(true, Ordering::Release);
    kick::kick_thread(&t).unwrap();
    let (r, ap) = t.join().unwrap();
    assert_eq!(r.unwrap(), VcpuStop::Stopped);
    assert_eq!(ap.mp_state().unwrap(), KVM_MP_STATE_UNINITIALIZED);
}

#[test]
fn configure_ap_state_and_errors() {
    let Some(kvm) = kvm_or_skip("configure_ap_state_and_errors") else {
        return;
    };
    let vm = TestVm::new(kvm, true);
    let bsp = Vcpu::new(&vm.vm, 0).unwrap();
    let ap = Vcpu::new(&vm.vm, 1).unwrap();
    let table = vm.cpuid(1, 2);
    assert!(matches!(
        bsp.configure_ap(&table),
        Err(Error::NotAnAp { id: 0 })
    ));
    ap.configure_ap(&table).unwrap();
    assert_eq!(ap.mp_state().unwrap(), KVM_MP_STATE_UNINITIALIZED);
    // LINT0 ExtINT and LINT1 NMI, both masked on the AP (as reset left them).
    let (lint0, lint1) = (lvt(&ap, lapic::LVT_LINT0), lvt(&ap, lapic::LVT_LINT1));
    assert_eq!((lint0 >> 8) & 7, lapic::DELIVERY_EXTINT, "{lint0:#x}");
    assert_eq!((lint1 >> 8) & 7, lapic::DELIVERY_NMI, "{lint1:#x}");
    assert_ne!(lint0 & lapic::LVT_MASKED, 0, "AP LINT0 masked: {lint0:#x}");
    assert_ne!(lint1 & lapic::LVT_MASKED, 0, "AP LINT1 masked: {lint1:#x}");
    // The BSP's LINT0 ExtINT is unmasked (the PIC's INTR reaches it).
    let boot = vm.long_mode_setup(&[0xf4]);
    bsp.configure(&vm.cpuid(0, 2), &boot).unwrap();
    let bsp_lint0 = lvt(&bsp, lapic::LVT_LINT0);
    assert_eq!((bsp_lint0 >> 8) & 7, lapic::DELIVERY_EXTINT);
    assert_eq!(
        bsp_lint0 & lapic::LVT_MASKED,
        0,
        "BSP LINT0: {bsp_lint0:#x}"
    );
    // CPUID of the AP is its own.
    let got = ap
        .fd()
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    assert_eq!(cpuid::find(&got, 1, 0).unwrap().ebx >> 24, 1);

    // Without an in-kernel irqchip there is nothing to hold an AP.
    let plain = TestVm::new(kvm_ioctls::Kvm::new().unwrap(), false);
    let ap = Vcpu::new(&plain.vm, 1).unwrap();
    assert!(matches!(
        ap.configure_ap(&plain.cpuid(1, 2)),
        Err(Error::NoInKernelLapic { id: 1 })
    ));
}

#[test]
fn vcpu_ids_up_to_31() {
    let Some(kvm) = kvm_or_skip("vcpu_ids_up_to_31") else {
        return;
    };
    let vm = TestVm::new(kvm, true);
    let supported = cpuid::supported(&vm.kvm).unwrap();
    for id in 0..MAX_VCPUS {
        let vcpu = Vcpu::new(&vm.vm, id).unwrap();
        let mut table = supported.clone();
        cpuid::normalize(&mut table, id, MAX_VCPUS, None).unwrap();
        vcpu.fd().set_cpuid2(&table).unwrap();
    }
    for id in [MAX_VCPUS, 200, 255] {
        assert!(matches!(
            Vcpu::new(&vm.vm, id),
            Err(Error::InvalidTopology { vcpu_id, nr_vcpus: 32 }) if vcpu_id == id
        ));
    }
}

/// The topology leaves of the real supported CPUID after normalisation, for 1, 2, 4, 32 vCPUs.
#[test]
fn real_cpuid_topology() {
    let Some(kvm) = kvm_or_skip("real_cpuid_topology") else {
        return;
    };
    let supported = cpuid::supported(&kvm).unwrap();
    let max_basic = cpuid::find(&supported, 0, 0).unwrap().eax;
    for n in [1u8, 2, 4, 32] {
        for id in [0, n / 2, n - 1] {
            let mut t = supported.clone();
            cpuid::normalize(&mut t, id, n, None).unwrap();
            let (id32, n32) = (u32::from(id), u32::from(n));
            // ceil(log2(n)): APIC id bits of the core level.
            let shift = if n32 == 1 {
                0
            } else {
                32 - (n32 - 1).leading_zeros()
            };
            let l1 = cpuid::find(&t, 1, 0).unwrap();
            assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (id32, n32));
            if max_basic >= 0xb {
                let smt = cpuid::find(&t, 0xb, 0).unwrap();
                let core = cpuid::find(&t, 0xb, 1).unwrap();
                assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, id32));
                assert_eq!(
                    (core.eax, core.ebx, core.ecx, core.edx),
                    (shift, n32, 0x201, id32)
                );
            }
            for e in t
                .as_slice()
                .iter()
                .filter(|e| e.function == 4 && e.eax & 0x1f != 0)
            {
                assert_eq!(e.eax >> 26, n32 - 1);
            }
            if let Some(e) = cpuid::find(&t, 0x8000_0008, 0) {
                assert_eq!((e.ecx & 0xff, (e.ecx >> 12) & 0xf), (n32 - 1, shift));
            }
        }
    }
}
