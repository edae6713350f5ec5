//! Shared helpers of the KVM integration tests of this crate: a VM with a few MiB of guest
//! memory, boot structures for 64-bit code, and an I/O recorder.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ember_vcpu::{cpuid, BootRegs, EntryMode, IoHandler, Vcpu};
use kvm_bindings::{kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const MEM_SIZE: usize = 2 << 20;
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE: u64 = 0x7000;
pub const STACK_TOP: u64 = 0x8ff0;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Page directory for [3 GiB, 4 GiB): maps the LAPIC/IOAPIC pages uncached.
pub const PD_HIGH: u64 = 0xc000;
pub const CODE: u64 = 0x1000;
/// Scratch data for instructions with memory operands.
pub const DATA: u64 = 0x3000;

pub const GDT_LONG: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0fff,
];

pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    if !std::path::Path::new("/dev/kvm").exists() {
        skip(
            test,
            "/dev/kvm is absent on this machine; KVM tests cannot run",
        );
        return None;
    }
    Some(Kvm::new().expect("/dev/kvm exists but cannot be opened"))
}

/// A loud skip message, recorded in `$EMBER_SKIP_LOG` for `cargo xtask test`'s summary (the
/// same protocol as `ember_test_support::skip`, which this crate cannot depend on).
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    eprintln!("\n*** SKIPPED {test}: {reason} ***\n");
    if let Some(log) = std::env::var_os("EMBER_SKIP_LOG") {
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
            .and_then(|mut f| f.write_all(format!("{test}\t{reason}\n").as_bytes()));
    }
}

pub struct TestVm {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub mem: GuestMemoryMmap,
}

impl TestVm {
    pub fn new(kvm: Kvm, irqchip: bool) -> Self {
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

    pub fn write_u64s(&self, addr: u64, values: &[u64]) {
        for (i, v) in values.iter().enumerate() {
            self.mem
                .write_obj(*v, GuestAddress(addr + 8 * i as u64))
                .unwrap();
        }
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    /// GDT, IDT, identity page tables (first 1 GiB, plus [3 GiB, 4 GiB) uncached) and `code`
    /// at CODE.
    pub fn long_mode_setup(&self, code: &[u8]) -> BootRegs {
        self.write_u64s(GDT_ADDR, &GDT_LONG);
        self.write_u64s(IDT_ADDR, &[0]);
        self.write_u64s(PML4, &[PDPT | 7]);
        self.write_u64s(PDPT, &[PD | 7, 0, 0, PD_HIGH | 7]);
        let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | 0x87).collect();
        self.write_u64s(PD, &pd);
        // PS | PCD | PWT | US | RW | P.
        let pd_high: Vec<u64> = (0..512u64)
            .map(|i| (0xc000_0000 + (i << 21)) | 0x9f)
            .collect();
        self.write_u64s(PD_HIGH, &pd_high);
        self.write(CODE, code);
        BootRegs {
            mode: EntryMode::Linux64 {
                entry: CODE,
                zero_page: ZERO_PAGE,
                pml4: PML4,
            },
            gdt_addr: GDT_ADDR,
            gdt: GDT_LONG,
            idt_addr: IDT_ADDR,
            stack_top: STACK_TOP,
        }
    }

    /// The supported CPUID, normalized for vCPU `id` of `n`.
    pub fn cpuid(&self, id: u8, n: u8) -> CpuId {
        let mut table = cpuid::supported(&self.kvm).expect("supported CPUID");
        cpuid::normalize(&mut table, id, n, None).expect("normalize");
        table
    }

    /// vCPU 0 in long mode running `code`, with `table` as CPUID.
    pub fn bsp(&self, code: &[u8], table: &CpuId) -> Vcpu {
        let boot = self.long_mode_setup(code);
        let vcpu = Vcpu::new(&self.vm, 0).expect("create vCPU");
        vcpu.configure(table, &boot).expect("configure");
        vcpu
    }
}

/// Records port writes; a write to `stop_port` sets `stop`.
#[derive(Default)]
pub struct PortLog {
    pub writes: Mutex<Vec<(u16, Vec<u8>)>>,
    pub stop_port: Option<u16>,
    pub stop: Arc<AtomicBool>,
}

impl IoHandler for PortLog {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if Some(port) == self.stop_port {
            self.stop.store(true, Ordering::Release);
        }
        self.writes.lock().unwrap().push((port, data.to_vec()));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

impl PortLog {
    /// The 32-bit values written to `port`.
    pub fn u32s(&self, port: u16) -> Vec<u32> {
        self.writes
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, d)| {
                let mut b = [0u8; 4];
                b[..d.len().min(4)].copy_from_slice(&d[..d.len().min(4)]);
                u32::from_le_bytes(b)
            })
            .collect()
    }
}
