//! KVM VMs made ahead of time, so that `KVM_CREATE_VM`, the irqchip and vCPU creation leave a
//! VM's start-up (or a fork's) path.
//!
//! A [`PreparedVm`] is a KVM VM with its in-kernel irqchip (and PIT, if asked) and its vCPUs,
//! but no guest memory and no devices: [`VmBuilder::prepared`](crate::VmBuilder::prepared)
//! builds a VM on it instead of creating one. A [`VmPool`] keeps some ready and makes new ones
//! as they are taken, on a thread of its own at the lowest scheduling priority.
//!
//! ```no_run
//! # fn main() -> Result<(), ember_vmm::Error> {
//! let pool = ember_vmm::VmPool::new("/dev/kvm", 1, false, 4)?;
//! let mut config = ember_vmm::VmConfig::new("vmlinux");
//! config.vcpus = 1;
//! let vm = ember_vmm::Vm::builder(config).prepared(pool.take()?).build()?;
//! # let _ = vm; Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Mutex;

use ember_vcpu::Vcpu;
use kvm_ioctls::{Kvm, VmFd};

use crate::error::Error;

/// A KVM VM with its irqchip and vCPUs, and possibly its guest memory already registered.
pub struct PreparedVm {
    // Dropped in this order: the vCPUs, the VM fd, then the memory it maps.
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) vm_fd: VmFd,
    pub(crate) kvm: Kvm,
    pub(crate) memory: Option<ember_memory::GuestRam>,
    /// The file behind `memory` (device, inode): a restore checks it is its memory file.
    pub(crate) memory_source: Option<(u64, u64)>,
    pub(crate) pit: bool,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("vcpus", &self.vcpus.len())
            .field("pit", &self.pit)
            .finish_non_exhaustive()
    }
}

impl PreparedVm {
    /// Opens KVM at `kvm_path`, creates a VM with its irqchip (and a PIT if `pit`) and vCPUs
    /// `0..vcpus`.
    ///
    /// A VM built on it registers its guest memory after the vCPUs exist, which on some hosts
    /// waits for a kernel grace period (4 to 8 ms on PVM): where the memory is known ahead
    /// (a fork's), [`with_memory`](Self::with_memory) avoids that.
    pub fn new(kvm_path: &Path, vcpus: u8, pit: bool) -> Result<Self, Error> {
        Self::make(kvm_path, vcpus, pit, None)
    }

    /// As [`new`](Self::new), with `memory` registered as the VM's guest memory right after
    /// `KVM_CREATE_VM` (when nothing else is pending, so that the memory slot's grace period
    /// costs nothing). The VM built on it uses this memory.
    /// `source` is the file `memory` maps (the restore it is for must name the same file).
    pub fn with_memory(
        kvm_path: &Path,
        vcpus: u8,
        pit: bool,
        memory: ember_memory::GuestRam,
        source: &std::fs::File,
    ) -> Result<Self, Error> {
        let mut p = Self::make(kvm_path, vcpus, pit, Some(memory))?;
        p.memory_source = Some(file_id(source)?);
        Ok(p)
    }

    fn make(
        kvm_path: &Path,
        vcpus: u8,
        pit: bool,
        memory: Option<ember_memory::GuestRam>,
    ) -> Result<Self, Error> {
        if vcpus == 0 || vcpus > crate::MAX_VCPUS {
            return Err(Error::Prepared(format!(
                "{vcpus} vCPUs (1 to {} are possible)",
                crate::MAX_VCPUS
            )));
        }
        let kvm = crate::kvm::open(kvm_path)?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        if let Some(m) = &memory {
            // SAFETY: the PreparedVm (and then the Vm built on it) keeps `memory` alive for as
            // long as `vm_fd`, dropping the fd first, and nothing remaps it.
            unsafe { ember_vcpu::vm::register_guest_memory(&vm_fd, m, false)? };
        }
        ember_vcpu::vm::create_irqchip(&vm_fd, pit)?;
        let vcpus = (0..vcpus)
            .map(|id| Vcpu::new(&vm_fd, id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PreparedVm {
            vcpus,
            vm_fd,
            kvm,
            memory,
            memory_source: None,
            pit,
        })
    }

    /// Its vCPU count.
    pub fn vcpus(&self) -> u8 {
        u8::try_from(self.vcpus.len()).unwrap_or(u8::MAX)
    }
}

/// A file's (device, inode).
pub(crate) fn file_id(f: &std::fs::File) -> Result<(u64, u64), Error> {
    use std::os::unix::fs::MetadataExt;
    let m = f
        .metadata()
        .map_err(|e| Error::Prepared(format!("memory file: {e}")))?;
    Ok((m.dev(), m.ino()))
}

/// Prepared VMs of one shape (vCPU count, PIT), refilled on a thread of its own.
pub struct VmPool {
    ready: Mutex<Receiver<Result<PreparedVm, Error>>>,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    make: Maker,
    vcpus: u8,
    pit: bool,
}

/// How a pool makes a VM.
type Maker = std::sync::Arc<dyn Fn() -> Result<PreparedVm, Error> + Send + Sync>;

impl std::fmt::Debug for VmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmPool")
            .field("vcpus", &self.vcpus)
            .field("pit", &self.pit)
            .finish_non_exhaustive()
    }
}

impl VmPool {
    /// A pool keeping `size` VMs of `vcpus` vCPUs ready (the first is made before this
    /// returns, so that a KVM error shows here).
    pub fn new(
        kvm_path: impl Into<PathBuf>,
        vcpus: u8,
        pit: bool,
        size: usize,
    ) -> Result<Self, Error> {
        let path: PathBuf = kvm_path.into();
        Self::with_maker(
            std::sync::Arc::new(move || PreparedVm::new(&path, vcpus, pit)),
            vcpus,
            pit,
            size,
        )
    }

    /// A pool of VMs for forks of `template`: each with the template's vCPU count and its
    /// memory, a copy-on-write view of the template's memfd, already registered
    /// ([`PreparedVm::with_memory`]). Give one to [`crate::Template::fork_with`]'s builder
    /// with [`VmBuilder::prepared`](crate::VmBuilder::prepared). Their memory has the dirty
    /// bitmap of the VMM's writes if the template's configuration tracks dirty pages;
    /// [`for_template_with`](Self::for_template_with) chooses.
    pub fn for_template(
        kvm_path: impl Into<PathBuf>,
        template: &crate::Template,
        size: usize,
    ) -> Result<Self, Error> {
        let dirty =
            ember_memory::DirtyBitmap::tracked_if(template.state().config.track_dirty_pages);
        Self::for_template_with(kvm_path, template, size, dirty)
    }

    /// As [`for_template`](Self::for_template), with the memory's dirty bitmap as `dirty` says:
    /// [`ember_memory::DirtyBitmap::On`] for forks that track dirty pages (diff snapshots) when
    /// the template does not.
    pub fn for_template_with(
        kvm_path: impl Into<PathBuf>,
        template: &crate::Template,
        size: usize,
        dirty: ember_memory::DirtyBitmap,
    ) -> Result<Self, Error> {
        let path: PathBuf = kvm_path.into();
        let config = &template.state().config;
        let (vcpus, pit) = (config.vcpus, config.pit);
        let layout =
            ember_memory::MemoryLayout::new(config.memory_mib.saturating_mul(ember_memory::MIB))?;
        let memfd = template.memory_file()?;
        Self::with_maker(
            std::sync::Arc::new(move || {
                let memory = ember_memory::map_guest_memory(
                    &layout,
                    &memfd,
                    ember_memory::Sharing::Private,
                    dirty,
                )?;
                PreparedVm::with_memory(&path, vcpus, pit, memory, &memfd)
            }),
            vcpus,
            pit,
            size,
        )
    }

    fn with_maker(make: Maker, vcpus: u8, pit: bool, size: usize) -> Result<Self, Error> {
        use std::sync::atomic::Ordering::SeqCst;
        let first = make()?;
        let (tx, rx) = sync_channel(size.max(1));
        let _ = tx.send(Ok(first));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(1));
        let counted = count.clone();
        let maker = make.clone();
        // The thread fills the channel and blocks while it is full; it ends when the pool
        // (the receiver) is dropped.
        std::thread::Builder::new()
            .name("ember-vm-pool".into())
            .spawn(move || {
                // The lowest priority: refilling uses idle CPU, not the VMs' (a refill right
                // after a `take` would otherwise compete with the VM just taken).
                // SAFETY: gettid has no arguments; setpriority takes this thread's own id and
                // no memory.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                if let Ok(tid) = libc::id_t::try_from(tid) {
                    // SAFETY: as above.
                    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) };
                }
                loop {
                    if tx.send(maker()).is_err() {
                        return;
                    }
                    counted.fetch_add(1, SeqCst);
                }
            })
            .map_err(|e| Error::Prepared(format!("cannot start the pool's thread: {e}")))?;
        Ok(VmPool {
            ready: Mutex::new(rx),
            count,
            make,
            vcpus,
            pit,
        })
    }

    /// A prepared VM: a ready one, or one made now if none is ready.
    pub fn take(&self) -> Result<PreparedVm, Error> {
        let ready = ember_devices::lock(&self.ready).try_recv();
        match ready {
            Ok(vm) => {
                self.count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                vm
            }
            Err(_) => (self.make)(),
        }
    }

    /// How many VMs are ready to take now (at most the pool's size).
    pub fn ready(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}
