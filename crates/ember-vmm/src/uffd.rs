//! Guest memory served by a page-fault handler process over userfaultfd: Firecracker's `Uffd`
//! memory backend, with its handshake.
//!
//! A restore with [`VmBuilder::restore_with_uffd`](crate::VmBuilder::restore_with_uffd) maps
//! anonymous guest memory, registers every region with a new userfaultfd (missing-page
//! faults, from the kernel too, so that KVM's accesses are served as well; remove events when
//! a balloon may discard pages), connects to the handler's Unix socket and sends it, as Firecracker
//! does, one message: a JSON array of the regions (`base_host_virt_addr`, `size`, `offset` in
//! the memory file, `page_size`, and the deprecated `page_size_kib`, which holds bytes) with
//! the userfaultfd attached (`SCM_RIGHTS`). From then on every first touch of a page, by the
//! guest or by the VMM, waits for the handler to fill it (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`).
//! The VMM keeps its descriptor of the userfaultfd and the connection open for the VM's life,
//! so that the handler can tell when the VMM is gone.
//!
//! A handler that stops serving freezes the guest (and any VMM thread that touches an unserved
//! page): the handler is part of the VMM's trusted base, as in Firecracker.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use ember_memory::GuestRam;
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::Error;
use crate::snapshot::SnapshotError;

/// One region as the handler is told of it (Firecracker's `GuestRegionUffdMapping`).
#[derive(Debug, serde::Serialize)]
struct GuestRegionUffdMapping {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
    page_size: usize,
    /// Bytes, despite the name (deprecated in Firecracker, sent for its handlers).
    page_size_kib: usize,
}

/// The userfaultfd and the handler's connection, held for the VM's life.
#[derive(Debug)]
pub(crate) struct UffdMemory {
    _uffd: Uffd,
    _socket: UnixStream,
}

fn failed(path: &Path, why: String) -> Error {
    Error::Snapshot(SnapshotError::Uffd {
        path: path.to_path_buf(),
        why,
    })
}

/// Registers `mem` (anonymous, untouched) with a new userfaultfd and hands it to the handler
/// listening on `socket`.
pub(crate) fn hand_to_handler(
    mem: &GuestRam,
    socket: &Path,
    balloon: bool,
) -> Result<UffdMemory, Error> {
    let mut builder = UffdBuilder::new();
    // Remove events only where a balloon discards pages (each discard then waits for the
    // handler to read its event).
    if balloon {
        builder.require_features(FeatureFlags::EVENT_REMOVE);
    }
    let uffd = builder
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(|e| {
            failed(
                socket,
                format!(
                    "cannot create a userfaultfd ({e}): it needs root, CAP_SYS_PTRACE, or \
                     vm.unprivileged_userfaultfd=1"
                ),
            )
        })?;
    let mut mappings = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| failed(socket, e.to_string()))?;
        let size = usize::try_from(region.len()).map_err(|e| failed(socket, e.to_string()))?;
        uffd.register(host.cast(), size)
            .map_err(|e| failed(socket, format!("cannot register guest memory: {e}")))?;
        mappings.push(GuestRegionUffdMapping {
            base_host_virt_addr: host as u64,
            size,
            offset,
            page_size: 4096,
            page_size_kib: 4096,
        });
        offset += region.len();
    }
    let json = serde_json::to_vec(&mappings).map_err(|e| failed(socket, e.to_string()))?;
    let stream = UnixStream::connect(socket).map_err(|e| {
        failed(
            socket,
            format!("cannot connect to the page-fault handler: {e}"),
        )
    })?;
    let sent = stream
        .send_with_fd(&json[..], uffd.as_raw_fd())
        .map_err(|e| failed(socket, format!("cannot send the userfaultfd: {e}")))?;
    if sent != json.len() {
        return Err(failed(
            socket,
            format!(
                "the handshake was cut short ({sent} of {} bytes)",
                json.len()
            ),
        ));
    }
    Ok(UffdMemory {
        _uffd: uffd,
        _socket: stream,
    })
}
