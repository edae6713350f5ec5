//! [`VmHandle`]: what another thread (a signal handler, an API server, a test) may do to a
//! running VM: stop it, pause and resume it, feed its console.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use ember_devices::{lock, Buses};
use ember_memory::GuestRam;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::control::VcpuControl;
use crate::devices::{LegacyDevices, VirtioSlot};
use crate::error::Error;
use crate::state::MachineState;

/// What a VM shares with its handles, for as long as it runs: the VM fd (before the memory it
/// maps, so that it is closed first), the devices, the vCPU control.
/// Work for the VM's event loop thread (where device state changes happen).
pub(crate) type Job = Box<dyn FnOnce(&VmShared) + Send>;

pub(crate) struct VmShared {
    /// The configuration the VM was built from.
    pub config: crate::config::VmConfig,
    /// Where its virtio devices sit.
    pub placements: Vec<crate::snapshot::DevicePlacement>,
    /// Each vCPU's exit counters.
    pub exit_counters: Vec<Arc<ember_vcpu::ExitCounters>>,
    pub vm_fd: VmFd,
    pub memory: GuestRam,
    pub pit: bool,
    pub vcpu_count: usize,
    /// The KVM fd (for the MSR list a vCPU state includes, asked on the first save).
    pub kvm: kvm_ioctls::Kvm,
    pub legacy: LegacyDevices,
    pub virtio: Vec<VirtioSlot>,
    pub buses: Arc<Buses>,
    pub control: Arc<VcpuControl>,
    /// The memfd behind guest memory while the VM can still become a fork template
    /// ([`crate::VmBuilder::fork_template`]); taken by [`VmHandle::template`].
    pub memory_file: Mutex<Option<std::fs::File>>,
}

impl VmShared {
    /// Takes and clears the pages written since the last call, one bitmap per memory region
    /// (= KVM memory slot): KVM's dirty log (the guest's writes) or'ed with guest memory's
    /// own bitmap (the VMM's writes). Needs `config.track_dirty_pages`.
    pub(crate) fn take_dirty_pages(&self) -> Result<Vec<Vec<u64>>, Error> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        // Without the VMM's bitmap the VMM's writes would be missed: refuse before KVM's log
        // is taken (and cleared).
        if !ember_memory::has_dirty_bitmap(&self.memory) {
            return Err(crate::snapshot::SnapshotError::NoDirtyLog.into());
        }
        self.memory
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let slot = u32::try_from(i).map_err(|_| ember_vcpu::Error::TooManyMemorySlots)?;
                let size = usize::try_from(region.len())
                    .map_err(|_| ember_vcpu::Error::TooManyMemorySlots)?;
                let mut bits = ember_vcpu::vm::dirty_pages(&self.vm_fd, slot, size)?;
                let vmm = ember_memory::take_dirty_pages(&self.memory, i).unwrap_or_default();
                for (b, v) in bits.iter_mut().zip(vmm) {
                    *b |= v;
                }
                Ok(bits)
            })
            .collect()
    }

    /// Marks the pages of `dirty` ([`VmShared::take_dirty_pages`]) dirty again in guest
    /// memory's bitmap, so that the next diff snapshot holds them (this one failed).
    pub(crate) fn give_back_dirty_pages(&self, dirty: &[Vec<u64>]) {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        for (region, bits) in self.memory.iter().zip(dirty) {
            for (w, &word) in bits.iter().enumerate() {
                let mut word = word;
                while word != 0 {
                    let page = w * 64 + word.trailing_zeros() as usize;
                    word &= word - 1;
                    region.bitmap().mark_dirty(page * 4096, 4096);
                }
            }
        }
    }
}

/// The vCPUs' exit counters, summed.
pub(crate) fn sum_exits(counters: &[Arc<ember_vcpu::ExitCounters>]) -> crate::ExitCounts {
    use std::sync::atomic::Ordering::Relaxed;
    let mut e = crate::ExitCounts::default();
    for c in counters {
        e.io_in += c.io_in.load(Relaxed);
        e.io_out += c.io_out.load(Relaxed);
        e.mmio_read += c.mmio_read.load(Relaxed);
        e.mmio_write += c.mmio_write.load(Relaxed);
        e.interrupted += c.interrupted.load(Relaxed);
        e.failures += c.failures.load(Relaxed);
    }
    e
}

/// A clonable handle to a running VM: feed its console, pause it, take and apply its state,
/// ask it to stop.
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) jobs: ember_devices::mailbox::MailboxSender<Job>,
    pub(crate) stop_evt: Arc<EventFd>,
    pub(crate) input_evt: Arc<EventFd>,
    pub(crate) input: Arc<Mutex<VecDeque<u8>>>,
    pub(crate) control: Arc<VcpuControl>,
    // Weak: a console sink may hold a handle, and the VM holds the sink; and the VM's KVM
    // resources go when the VM ends, whoever still holds a handle.
    pub(crate) shared: Weak<VmShared>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("paused", &self.is_paused())
            .finish_non_exhaustive()
    }
}

impl VmHandle {
    /// Asks the VM to stop; [`Vm::run`](crate::Vm::run) then returns
    /// [`VmExit::Stopped`](crate::VmExit::Stopped).
    pub fn stop(&self) {
        // An eventfd write only fails if the counter would overflow, which a stop cannot cause.
        let _ = self.stop_evt.write(1);
    }

    /// Pauses every vCPU: returns once none is inside `KVM_RUN` (at most about 5 s; `false`
    /// if some vCPU did not leave in that time). Devices and the event loop keep running.
    pub fn pause(&self) -> bool {
        self.control.pause()
    }

    /// Resumes vCPUs paused by [`pause`](Self::pause).
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Guest port and MMIO accesses so far that hit no device (e.g. the probe's exit loop).
    pub fn unhandled_io(&self) -> u64 {
        self.shared.upgrade().map_or(0, |s| s.buses.unhandled())
    }

    /// The state of the whole machine but its memory: vCPUs, irqchip and clock, devices.
    /// The VM must be [paused](Self::pause) (resume it afterwards to go on).
    pub fn save_state(&self) -> Result<MachineState, Error> {
        self.shared.upgrade().ok_or(Error::NotRunning)?.save()
    }

    /// Applies a [`MachineState`] of this VM (or of one with the same vCPUs and devices) while
    /// it is paused; on [`resume`](Self::resume) the guest continues from that state. Guest
    /// memory is not touched.
    pub fn restore_state(&self, state: &MachineState) -> Result<(), Error> {
        self.shared
            .upgrade()
            .ok_or(Error::NotRunning)?
            .restore(state)
    }

    /// A descriptor that stops the VM when an 8-byte native-endian non-zero integer is written
    /// to it. Writing is async-signal-safe, so a SIGTERM handler may use it.
    pub fn stop_fd(&self) -> RawFd {
        self.stop_evt.as_raw_fd()
    }

    /// Sends Ctrl+Alt+Del to the guest through the i8042 (Firecracker's `SendCtrlAltDel`): a
    /// Linux guest reboots (which ends the VM).
    pub fn send_ctrl_alt_del(&self) -> Result<(), Error> {
        let shared = self.shared.upgrade().ok_or(Error::NotRunning)?;
        lock(&shared.legacy.i8042).trigger_ctrl_alt_del();
        Ok(())
    }

    /// The control of virtio device `id`, if it takes commands at run time.
    pub fn device_control(&self, id: &str) -> Option<crate::DeviceControl> {
        let shared = self.shared.upgrade()?;
        shared
            .virtio
            .iter()
            .find(|s| s.id == id)
            .and_then(|s| s.control.clone())
    }

    /// Every virtio device with its counters now (empty once the VM ended).
    pub fn devices(&self) -> Vec<crate::DeviceReport> {
        self.shared
            .upgrade()
            .map(|s| s.virtio.iter().map(|v| v.report()).collect())
            .unwrap_or_default()
    }

    /// vCPU exits so far, summed over the vCPUs.
    pub fn exits(&self) -> crate::ExitCounts {
        self.shared
            .upgrade()
            .map(|s| sum_exits(&s.exit_counters))
            .unwrap_or_default()
    }

    /// The console's counters (bytes the guest wrote, read, dropped).
    pub fn serial_counters(&self) -> Option<ember_devices::serial::SerialCounters> {
        let s = self.shared.upgrade()?;
        let c = lock(&s.legacy.serial).counters();
        Some(c)
    }

    /// Runs `f` on the VM's event loop thread (no device work happens meanwhile) and returns
    /// its result.
    fn on_event_loop<T: Send + 'static>(
        &self,
        f: impl FnOnce(&VmShared) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.jobs
            .send(Box::new(move |shared| {
                let _ = tx.send(f(shared));
            }))
            .map_err(|_| Error::NotRunning)?;
        rx.recv_timeout(std::time::Duration::from_secs(300))
            .map_err(|_| Error::NotRunning)
    }

    /// Writes a full snapshot of the paused VM: its state to `state_path` (versioned and
    /// checksummed) and its guest memory to `memory_path` (sparse). Taken on the event loop
    /// thread, so no device request is half done: every request a device took from a queue
    /// is complete, and what the guest queued after is still in its queue. Returns the bytes
    /// of memory written. With dirty page tracking on, the next [`VmHandle::diff_snapshot`]
    /// holds the pages dirtied after this one.
    pub fn snapshot(&self, state_path: &Path, memory_path: &Path) -> Result<u64, Error> {
        self.write_snapshot(state_path, memory_path, false)
    }

    /// Writes a diff snapshot of the paused VM: its whole state to `state_path`, as
    /// [`VmHandle::snapshot`] does, and to `memory_path` only the pages written since the last
    /// snapshot (or since the VM was built or restored), by the guest (KVM's dirty log) or by
    /// the VMM (guest memory's dirty bitmap: device DMA, virtio rings). The memory file is never
    /// truncated: written over the last snapshot's memory file it brings that file up to date
    /// (the state and that file then restore as a full snapshot); written into a new file it is
    /// a sparse diff for [`crate::merge_memory_diff`]. Needs
    /// [`crate::VmConfig::track_dirty_pages`]. Returns the bytes of memory written.
    pub fn diff_snapshot(&self, state_path: &Path, memory_path: &Path) -> Result<u64, Error> {
        self.write_snapshot(state_path, memory_path, true)
    }

    fn write_snapshot(
        &self,
        state_path: &Path,
        memory_path: &Path,
        diff: bool,
    ) -> Result<u64, Error> {
        if !self.is_paused() {
            return Err(Error::VcpuRequest("pause the VM before a snapshot".into()));
        }
        let (state_path, memory_path) = (state_path.to_path_buf(), memory_path.to_path_buf());
        self.on_event_loop(move |shared| -> Result<u64, Error> {
            if diff && !shared.config.track_dirty_pages {
                return Err(crate::snapshot::SnapshotError::NoDirtyLog.into());
            }
            let machine = shared.save()?;
            // Taken before memory is read: what is dirtied from here on belongs to the next
            // snapshot. Given back if this one fails, so that the next diff still holds it.
            let dirty = if shared.config.track_dirty_pages {
                Some(shared.take_dirty_pages()?)
            } else {
                None
            };
            let written = match &dirty {
                Some(d) if diff => {
                    crate::snapshot::write_dirty_memory(&shared.memory, d, &memory_path)
                }
                _ => crate::snapshot::write_memory(&shared.memory, &memory_path),
            };
            let memory_bytes = vm_memory::GuestMemoryBackend::iter(&shared.memory)
                .map(vm_memory::GuestMemoryRegion::len)
                .sum();
            let r = written.and_then(|written| {
                crate::snapshot::write_state(
                    &state_path,
                    &crate::snapshot::SnapshotState {
                        ember_version: env!("CARGO_PKG_VERSION").into(),
                        config: shared.config.clone(),
                        memory_bytes,
                        devices: shared.placements.clone(),
                        machine,
                    },
                )
                .map(|()| written)
            });
            if let (Err(_), Some(d)) = (&r, &dirty) {
                shared.give_back_dirty_pages(d);
            }
            Ok(r?)
        })?
    }

    /// Makes the paused VM a fork template: its state is taken once, and its memfd becomes
    /// the copy-on-write base of every fork ([`crate::Template::fork`]). The VM itself is
    /// remapped copy-on-write on the same memfd, so it may be resumed afterwards without any
    /// fork seeing its writes. The memfd is then sealed against writes and size changes
    /// ([`ember_memory::seal_memory_file`]), so that it can be handed to another process
    /// ([`crate::Template::send_to`]). Once per VM; needs [`crate::VmBuilder::fork_template`].
    pub fn template(&self) -> Result<crate::Template, Error> {
        if !self.is_paused() {
            return Err(Error::VcpuRequest(
                "pause the VM before making it a template".into(),
            ));
        }
        self.on_event_loop(move |shared| -> Result<crate::Template, Error> {
            let mut slot = lock(&shared.memory_file);
            let Some(file) = slot.as_ref() else {
                return Err(Error::VcpuRequest(
                    "not a fork template: build it with VmBuilder::fork_template(true), once"
                        .into(),
                ));
            };
            let machine = shared.save()?;
            let memory = file.try_clone().map_err(|source| {
                Error::Snapshot(crate::snapshot::SnapshotError::Io {
                    path: "memfd".into(),
                    source,
                })
            })?;
            ember_memory::remap_private(&shared.memory, &memory)?;
            *slot = None;
            // No shared writable mapping is left: freeze the memfd, so that a process it is
            // handed to (Template::send_to) knows it never changes. Should the kernel refuse,
            // forks in this process still work; send_to refuses an unsealed template.
            let _ = ember_memory::seal_memory_file(&memory);
            let memory_bytes = vm_memory::GuestMemoryBackend::iter(&shared.memory)
                .map(vm_memory::GuestMemoryRegion::len)
                .sum();
            Ok(crate::Template {
                state: crate::snapshot::SnapshotState {
                    ember_version: env!("CARGO_PKG_VERSION").into(),
                    config: shared.config.clone(),
                    memory_bytes,
                    devices: shared.placements.clone(),
                    machine,
                },
                memory,
                memory_path: "memfd:ember-guest-ram".into(),
            })
        })?
    }

    /// The VM generation ID the guest sees now (ACPI `VGEN`: new at every boot, restore and
    /// fork), or `None` once the VM ended or without ACPI.
    pub fn generation_id(&self) -> Option<[u8; 16]> {
        let s = self.shared.upgrade()?;
        if !s.config.acpi {
            return None;
        }
        crate::vmgenid::read(&s.memory)
    }

    /// Time from VMM process start to the guest's first boot-timer write, once it wrote.
    pub fn boot_time(&self) -> Option<std::time::Duration> {
        self.shared.upgrade()?.legacy.boot_time.get().copied()
    }

    /// Queues bytes for the guest's serial console.
    pub fn send_serial(&self, bytes: &[u8]) {
        lock(&self.input).extend(bytes.iter().copied());
        let _ = self.input_evt.write(1);
    }
}
