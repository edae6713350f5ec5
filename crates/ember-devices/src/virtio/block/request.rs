//! virtio-blk requests: a descriptor chain checked and decoded into a [`Request`], with no I/O
//! (only the 16-byte header is read from guest memory). The rules are in the
//! [module docs of `block`](super).

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{HEADER_LEN, ID_LEN, SECTOR_SIZE};

/// What a request asks the device to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `IN`: read `len` bytes from `sector` into the chain's writable buffers.
    Read,
    /// `OUT`: write the `len` bytes after the header to `sector`.
    Write,
    /// `FLUSH`.
    Flush,
    /// `GET_ID`: the serial, at most `len` bytes of it.
    GetId,
    /// Any other request type (completes with `UNSUPP`).
    Unsupported(u32),
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// First sector (`Read`/`Write`).
    pub sector: u64,
    /// Data bytes: to read or write (a multiple of 512, inside the disk), or room for the
    /// `GET_ID` answer (at most [`ID_LEN`]).
    pub len: u64,
}

/// Why a chain with a usable status byte is refused (it completes with `IOERR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The chain breaks the layout rules (descriptor order, memory, header, direction, size).
    Malformed,
    /// `Read`/`Write` beyond the end of the disk.
    OutOfRange,
}

/// A parsed chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No status byte can be trusted: the chain goes back with used length 0 and nothing is
    /// written to guest memory.
    Dropped,
    /// The status byte is at `status`; the request, or why it is refused.
    Chain {
        /// Guest address of the status byte (the chain's last byte).
        status: GuestAddress,
        /// What to do.
        request: Result<Request, Refusal>,
    },
}

/// Checks and decodes the chain `descs` (`complete`: its last descriptor had no NEXT flag)
/// against a disk of `capacity` sectors.
pub fn parse<M: GuestMemoryBackend>(
    mem: &M,
    descs: &[Descriptor],
    complete: bool,
    capacity: u64,
) -> Parsed {
    let Some(last) = descs.last() else {
        return Parsed::Dropped;
    };
    if !complete
        || !last.is_write_only()
        || last.len() == 0
        || !mem.check_range(last.addr(), last.len() as usize)
    {
        return Parsed::Dropped;
    }
    let Some(status) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
        return Parsed::Dropped;
    };
    Parsed::Chain {
        status: GuestAddress(status),
        request: decode(mem, descs, capacity),
    }
}

fn decode<M: GuestMemoryBackend>(
    mem: &M,
    descs: &[Descriptor],
    capacity: u64,
) -> Result<Request, Refusal> {
    // Layout: all readable descriptors before all writable ones, everything inside guest RAM.
    let (mut readable, mut writable) = (0u64, 0u64);
    for d in descs {
        let len = u64::from(d.len());
        if d.is_write_only() {
            writable += len;
        } else if writable > 0 {
            return Err(Refusal::Malformed);
        } else {
            readable += len;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(Refusal::Malformed);
        }
    }
    if readable < HEADER_LEN {
        return Err(Refusal::Malformed);
    }
    // The last descriptor is writable and non-empty (checked by `parse`).
    let data_out = readable - HEADER_LEN;
    let data_in = writable - 1;
    #[allow(clippy::cast_possible_truncation, reason = "HEADER_LEN is 16")]
    let mut hdr = [0u8; HEADER_LEN as usize];
    let mut pos = 0;
    let ok = for_each_segment(descs, false, 0, HEADER_LEN, |addr, len| {
        let r = mem.read_slice(&mut hdr[pos..pos + len], addr).is_ok();
        pos += len;
        r
    });
    if !ok {
        return Err(Refusal::Malformed);
    }
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let (kind, len) = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let read = req_type == VIRTIO_BLK_T_IN;
            let (len, wrong_direction) = if read {
                (data_in, data_out)
            } else {
                (data_out, data_in)
            };
            if wrong_direction != 0 || !len.is_multiple_of(SECTOR_SIZE) {
                return Err(Refusal::Malformed);
            }
            let in_range = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(len))
                .zip(capacity.checked_mul(SECTOR_SIZE))
                .is_some_and(|(end, cap)| end <= cap);
            if !in_range {
                return Err(Refusal::OutOfRange);
            }
            let kind = if read {
                RequestKind::Read
            } else {
                RequestKind::Write
            };
            (kind, len)
        }
        VIRTIO_BLK_T_FLUSH => (RequestKind::Flush, 0),
        VIRTIO_BLK_T_GET_ID => (RequestKind::GetId, data_in.min(ID_LEN as u64)),
        other => (RequestKind::Unsupported(other), 0),
    };
    Ok(Request { kind, sector, len })
}

/// Calls `f(addr, len)` for the bytes `[skip, skip + take)` of the readable (`writable ==
/// false`) or writable descriptors of `descs`, in order; stops at the first `false`. Returns
/// whether all `take` bytes were visited. Every descriptor must already be known to lie inside
/// guest memory.
pub fn for_each_segment(
    descs: &[Descriptor],
    writable: bool,
    mut skip: u64,
    mut take: u64,
    mut f: impl FnMut(GuestAddress, usize) -> bool,
) -> bool {
    for d in descs.iter().filter(|d| d.is_write_only() == writable) {
        if take == 0 {
            break;
        }
        let len = u64::from(d.len());
        if skip >= len {
            skip -= len;
            continue;
        }
        let Some(addr) = d.addr().0.checked_add(skip) else {
            return false;
        };
        let n = (len - skip).min(take);
        skip = 0;
        take -= n;
        // n <= d.len() <= u32::MAX, so this never fails on 32- or 64-bit hosts.
        let Ok(n) = usize::try_from(n) else {
            return false;
        };
        if !f(GuestAddress(addr), n) {
            return false;
        }
    }
    take == 0
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test inputs are small, known values"
)]
mod tests {
    use super::*;
    use crate::virtio::GuestRam;

    const W: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestRam {
        ember_memory::ram_from_ranges(
            &[(GuestAddress(0), 0x10000)],
            ember_memory::DirtyBitmap::Off,
        )
        .unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(m: &GuestRam, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(0x100)).unwrap();
        m.write_obj(sector, GuestAddress(0x108)).unwrap();
    }

    #[test]
    fn reads_writes_and_the_rest() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 2);
        let chain = [
            desc(0x100, 16, 0),
            desc(0x1000, 1024, W),
            desc(0x2000, 1, W),
        ];
        assert_eq!(
            parse(&m, &chain, true, 8),
            Parsed::Chain {
                status: GuestAddress(0x2000),
                request: Ok(Request {
                    kind: RequestKind::Read,
                    sector: 2,
                    len: 1024
                })
            }
        );
        // Past the end of a 3-sector disk.
        assert!(matches!(
            parse(&m, &chain, true, 3),
            Parsed::Chain {
                request: Err(Refusal::OutOfRange),
                ..
            }
        ));
        // A write whose data is device-writable: wrong direction.
        header(&m, VIRTIO_BLK_T_OUT, 2);
        assert!(matches!(
            parse(&m, &chain, true, 8),
            Parsed::Chain {
                request: Err(Refusal::Malformed),
                ..
            }
        ));
        header(&m, 77, 0);
        assert!(matches!(
            parse(&m, &chain, true, 8),
            Parsed::Chain {
                request: Ok(Request {
                    kind: RequestKind::Unsupported(77),
                    ..
                }),
                ..
            }
        ));
    }

    #[test]
    fn untrustworthy_ends_are_dropped() {
        let m = mem();
        assert_eq!(parse(&m, &[], true, 8), Parsed::Dropped);
        let readable_last = [desc(0x100, 16, 0)];
        assert_eq!(parse(&m, &readable_last, true, 8), Parsed::Dropped);
        let outside = [desc(0x100, 16, 0), desc(0x10_0000, 1, W)];
        assert_eq!(parse(&m, &outside, true, 8), Parsed::Dropped);
        let ok = [desc(0x100, 16, 0), desc(0x2000, 1, W)];
        assert_eq!(parse(&m, &ok, false, 8), Parsed::Dropped);
    }
}
