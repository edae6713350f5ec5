//! A writer for the cpio "newc" format (the format Linux unpacks an initramfs from).
//!
//! Every entry is a 110-byte ASCII header (`070701` followed by thirteen 8-digit upper-case
//! hex fields), the NUL-terminated path, zero padding to a 4-byte boundary, the data, and zero
//! padding to a 4-byte boundary again. The archive ends with an entry named `TRAILER!!!`.
//! See the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.

use std::io::{self, Write};

/// Magic of the "new ASCII" (newc) format without checksums.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
/// Length of a newc header: the magic and 13 fields of 8 hex digits.
pub const HEADER_LEN: usize = 6 + 13 * 8;
/// Name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;

/// Streams a newc archive into `W`. Entries are written in the order they are added, so
/// directories must be added before what they contain (the kernel does not create parents).
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    mtime: u32,
}

/// Fields of one entry, before it is written.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

impl<W: Write> CpioWriter<W> {
    /// A writer whose entries all carry modification time `mtime` (seconds since the epoch;
    /// use a fixed value for a reproducible archive).
    pub fn new(out: W, mtime: u32) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            mtime,
        }
    }

    /// Adds a directory (`path` without a leading `/`, e.g. `dev`).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(&Header {
            name: path,
            mode: S_IFDIR | perm,
            nlink: 2,
            rdev: (0, 0),
            data: &[],
        })
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(&Header {
            name: path,
            mode: S_IFREG | perm,
            nlink: 1,
            rdev: (0, 0),
            data,
        })
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(&Header {
            name: path,
            mode: S_IFLNK | 0o777,
            nlink: 1,
            rdev: (0, 0),
            data: target.as_bytes(),
        })
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(&Header {
            name: path,
            mode: S_IFCHR | perm,
            nlink: 1,
            rdev: (major, minor),
            data: &[],
        })
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_header(TRAILER, 0, 0, 1, 0, (0, 0), 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, h: &Header<'_>) -> io::Result<()> {
        if h.name.is_empty()
            || h.name.starts_with('/')
            || h.name.contains('\0')
            || h.name == TRAILER
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {:?}", h.name),
            ));
        }
        let size = u32::try_from(h.data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.write_header(h.name, ino, h.mode, h.nlink, self.mtime, h.rdev, size)?;
        self.write_padded(h.data)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        filesize: u32,
    ) -> io::Result<()> {
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio name too long"))?;
        // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let fields = [
            ino, mode, 0, 0, nlink, mtime, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write_padded(&header)
    }

    /// Writes `bytes`, then zeros up to the next 4-byte boundary of the archive.
    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }
}

/// One entry read back by [`parse`] (tests only).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the header in the archive.
    pub offset: usize,
    /// The 13 header fields, in header order.
    pub fields: [u32; 13],
    /// Path, without the NUL.
    pub name: String,
    /// Data (file contents, link target).
    pub data: Vec<u8>,
}

#[cfg(test)]
impl Entry {
    /// `st_mode`.
    pub fn mode(&self) -> u32 {
        self.fields[1]
    }
}

/// Strict reader for newc archives, used to check the writer: every header must start on a
/// 4-byte boundary, padding must be zeros, and the archive must end right after the trailer.
/// The trailer is not returned.
#[cfg(test)]
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>, String> {
    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }
    fn zeros(bytes: &[u8], from: usize, to: usize) -> Result<(), String> {
        match bytes.get(from..to) {
            Some(pad) if pad.iter().all(|&b| b == 0) => Ok(()),
            _ => Err(format!("bad padding at {from}..{to}")),
        }
    }
    let mut entries = Vec::new();
    let mut off = 0;
    loop {
        if off % 4 != 0 {
            return Err(format!("header at {off} not 4-byte aligned"));
        }
        let header = bytes
            .get(off..off + HEADER_LEN)
            .ok_or(format!("truncated header at {off}"))?;
        if &header[..6] != NEWC_MAGIC {
            return Err(format!("bad magic at {off}"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let text =
                std::str::from_utf8(&header[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
            if text.bytes().any(|b| b.is_ascii_lowercase()) {
                return Err(format!("lower-case hex field {i} at {off}: {text}"));
            }
            *f = u32::from_str_radix(text, 16).map_err(|e| format!("field {i} at {off}: {e}"))?;
        }
        let namesize = fields[11] as usize;
        let filesize = fields[6] as usize;
        let name_start = off + HEADER_LEN;
        let name_bytes = bytes
            .get(name_start..name_start + namesize)
            .ok_or(format!("truncated name at {off}"))?;
        if namesize == 0 || name_bytes[namesize - 1] != 0 {
            return Err(format!("name at {off} not NUL-terminated"));
        }
        let name = std::str::from_utf8(&name_bytes[..namesize - 1])
            .map_err(|e| e.to_string())?
            .to_owned();
        let data_start = align4(name_start + namesize);
        zeros(bytes, name_start + namesize, data_start)?;
        let data = bytes
            .get(data_start..data_start + filesize)
            .ok_or(format!("truncated data of {name}"))?
            .to_vec();
        let next = align4(data_start + filesize);
        zeros(bytes, data_start + filesize, next)?;
        if name == TRAILER {
            if next != bytes.len() {
                return Err(format!("{} bytes after the trailer", bytes.len() - next));
            }
            return Ok(entries);
        }
        entries.push(Entry {
            offset: off,
            fields,
            name,
            data,
        });
        off = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new(), 1_700_000_000);
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.dir("bin", 0o755).unwrap();
        // Sizes 0..=5 and odd name lengths exercise every padding amount.
        for n in 0..6usize {
            let data: Vec<u8> = (0..n as u8).map(|b| b + 1).collect();
            w.file(&format!("bin/f{}", "x".repeat(n)), 0o644, &data)
                .unwrap();
        }
        w.symlink("bin/sh", "busybox").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(&bytes[..6], b"070701");
        let entries = parse(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "bin",
                "bin/f",
                "bin/fx",
                "bin/fxx",
                "bin/fxxx",
                "bin/fxxxx",
                "bin/fxxxxx",
                "bin/sh",
                "init"
            ]
        );
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e.offset % 4, 0);
            assert_eq!(e.fields[0], i as u32 + 1, "unique inode numbers from 1");
            assert_eq!(e.fields[5], 1_700_000_000, "mtime");
            assert_eq!(
                e.fields[11] as usize,
                e.name.len() + 1,
                "namesize counts the NUL"
            );
            assert_eq!(e.fields[6] as usize, e.data.len());
            assert_eq!(e.fields[12], 0, "check field is zero in newc");
            assert_eq!((e.fields[2], e.fields[3]), (0, 0), "owned by root");
        }
        let dev = &entries[0];
        assert_eq!(dev.mode(), 0o040_755);
        assert_eq!(dev.fields[4], 2);
        let console = &entries[1];
        assert_eq!(console.mode(), 0o020_600);
        assert_eq!((console.fields[9], console.fields[10]), (5, 1));
        for (n, e) in entries[3..9].iter().enumerate() {
            assert_eq!(e.mode(), 0o100_644);
            assert_eq!(e.data, (1..=n as u8).collect::<Vec<_>>());
        }
        let sh = &entries[9];
        assert_eq!(sh.mode(), 0o120_777);
        assert_eq!(sh.data, b"busybox");
        assert_eq!(entries[10].data, b"#!/bin/sh\necho hi\n");
    }

    #[test]
    fn exact_bytes_of_one_entry() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        w.file("ab", 0o644, b"xyz").unwrap();
        let bytes = w.finish().unwrap();
        let expected_header = "070701\
            00000001000081A4000000000000000000000001\
            00000000000000030000000000000000\
            000000000000000000000003\
            00000000";
        assert_eq!(&bytes[..HEADER_LEN], expected_header.as_bytes());
        // 110 + "ab\0" = 113 -> padded to 116; data 3 bytes -> padded to 120.
        assert_eq!(&bytes[HEADER_LEN..116], b"ab\0\0\0\0");
        assert_eq!(&bytes[116..120], b"xyz\0");
        assert_eq!(&bytes[120..126], b"070701");
        let trailer_name = 120 + HEADER_LEN;
        assert_eq!(&bytes[trailer_name..trailer_name + 11], b"TRAILER!!!\0");
        // Trailer: nlink 1, namesize 11.
        let t = std::str::from_utf8(&bytes[120..120 + HEADER_LEN]).unwrap();
        assert_eq!(&t[6 + 4 * 8..6 + 5 * 8], "00000001");
        assert_eq!(&t[6 + 11 * 8..6 + 12 * 8], "0000000B");
        assert_eq!(bytes.len(), 120 + 124);
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = CpioWriter::new(Vec::new(), 0);
        assert!(w.file("/abs", 0o644, b"").is_err());
        assert!(w.file("", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
        assert!(w.file(TRAILER, 0o644, b"").is_err());
    }

    #[test]
    fn parser_catches_corruption() {
        let mut bytes = sample();
        assert!(parse(&bytes[..bytes.len() - 4]).is_err());
        bytes[HEADER_LEN + 4] = b'x'; // padding after "dev\0"
        assert!(parse(&bytes).is_err());
    }
}
