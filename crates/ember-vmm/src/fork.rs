//! Forks: many VMs from one paused template, each a copy-on-write view of the template's
//! guest memory.
//!
//! A VM built with [`VmBuilder::fork_template`] keeps its guest memory in a memfd. Once it is
//! paused at the point forks should start from (a warmed-up guest), [`VmHandle::template`]
//! takes its state once and returns a [`Template`]: that state plus the memfd. Each
//! [`Template::fork`] is then a restore of that state whose memory is the memfd mapped
//! `MAP_PRIVATE`: pages are shared with the template and every other fork until the fork writes
//! them; nothing is copied up front, so a fork costs the same for 128 MiB as for 2 GiB.
//!
//! Identity: every fork re-creates its devices from the configuration, so anything that names
//! a host resource must differ per fork, and [`Template::fork_with`] refuses a fork that would
//! share one with the template: a vsock Unix socket ([`SnapshotState::override_vsock`], with
//! a CID of its own), a TAP ([`SnapshotState::override_tap`]), a writable disk
//! ([`SnapshotState::override_disk`]: give each fork its own copy of the image; a read-only
//! disk is shared). virtio-rng draws from the host's entropy in each fork, and each fork writes a
//! new VM generation ID (ACPI `VMGENCTR`, with a notification once it runs), so that the guest
//! can tell it was forked and reseed its RNG.
//!
//! A snapshot on disk can be a template too ([`Template::from_snapshot`]): its memory file is
//! then the shared base, mapped `MAP_PRIVATE` by every fork, so that a process that did not
//! boot the template (a new VMM process, a host after a reboot) forks it just the same. The
//! memory file must not change while forks of it run: a page a fork has not written yet is
//! read from the file when first touched (the same holds for a restore).
//!
//! [`VmBuilder::fork_template`]: crate::VmBuilder::fork_template
//! [`VmHandle::template`]: crate::VmHandle::template

use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::snapshot::{SnapshotError, SnapshotState};
use crate::vm::VmBuilder;

/// A paused VM's state and its guest memory's file (the VM's memfd, or a snapshot's memory
/// file): the base of forks.
#[derive(Debug)]
pub struct Template {
    pub(crate) state: SnapshotState,
    pub(crate) memory: std::fs::File,
    /// What names the memory file in errors.
    pub(crate) memory_path: PathBuf,
}

/// What [`Template::fork_with`] refuses.
fn shared_resource(what: String) -> Error {
    Error::Snapshot(SnapshotError::SharedResource(what))
}

impl Template {
    /// A template from a snapshot on disk: the state file at `state` ([`crate::read_snapshot`]:
    /// version, checksum and consistency checked) and the memory file at `memory`, opened
    /// read-only, which must hold exactly the state's guest memory. Nothing of the memory is
    /// read here. The file must stay unchanged while forks of it run (see the module docs),
    /// and must be a full snapshot's memory (or a base a diff was merged into): a diff
    /// snapshot's memory file has the full size but holes where it holds no page, which a fork
    /// would read as zeroes.
    pub fn from_snapshot(state: &Path, memory: &Path) -> Result<Self, Error> {
        let state = crate::snapshot::read_state(state)?;
        // Not a FIFO or a device: opening one must not block, reading one would not be memory.
        let file = ember_loader::open_regular_file(memory).map_err(|source| {
            Error::Snapshot(SnapshotError::Io {
                path: memory.to_path_buf(),
                source,
            })
        })?;
        let meta = file.metadata().map_err(|source| {
            Error::Snapshot(SnapshotError::Io {
                path: memory.to_path_buf(),
                source,
            })
        })?;
        if !meta.is_file() || meta.len() != state.memory_bytes {
            return Err(Error::Snapshot(SnapshotError::MemorySize {
                path: memory.to_path_buf(),
                size: if meta.is_file() { meta.len() } else { 0 },
                want: state.memory_bytes,
            }));
        }
        Ok(Template {
            state,
            memory: file,
            memory_path: memory.to_path_buf(),
        })
    }

    /// The template's state: clone it, apply a fork's overrides, give it to
    /// [`fork_with`](Self::fork_with).
    pub fn state(&self) -> &SnapshotState {
        &self.state
    }

    /// A new descriptor of the template's memfd.
    pub(crate) fn memory_file(&self) -> Result<std::fs::File, Error> {
        self.memory.try_clone().map_err(|source| {
            Error::Snapshot(SnapshotError::Io {
                path: self.memory_path.clone(),
                source,
            })
        })
    }

    /// A fork with the template's configuration unchanged (for a template whose devices name
    /// no host resource a fork would share: no vsock, TAP or writable disk).
    pub fn fork(&self) -> Result<VmBuilder, Error> {
        self.fork_with(self.state.clone())
    }

    /// A fork from `state` (the template's, with this fork's identity applied). The builder
    /// restores it; set its console and [`VmBuilder::start_paused`] as for any VM.
    pub fn fork_with(&self, state: SnapshotState) -> Result<VmBuilder, Error> {
        let t = &self.state.config;
        let f = &state.config;
        if let (Some(a), Some(b)) = (&t.vsock, &f.vsock) {
            if a.uds_path == b.uds_path {
                return Err(shared_resource(format!(
                    "the vsock socket {} (give the fork its own with override_vsock)",
                    a.uds_path.display()
                )));
            }
        }
        for (i, (a, b)) in t.nets.iter().zip(&f.nets).enumerate() {
            if a.tap == b.tap {
                return Err(shared_resource(format!(
                    "the TAP {} of interface {i} (give the fork its own with override_tap)",
                    a.tap
                )));
            }
        }
        for (a, b) in t.disks.iter().zip(&f.disks) {
            if !b.read_only && a.path == b.path {
                return Err(shared_resource(format!(
                    "the writable disk {} (give the fork its own copy with override_disk)",
                    a.path.display()
                )));
            }
        }
        let memory = self.memory_file()?;
        Ok(VmBuilder::restore(state, memory, &self.memory_path))
    }
}
