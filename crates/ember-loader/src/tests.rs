#![allow(
    clippy::cast_possible_truncation,
    reason = "test inputs are small, known values"
)]

use super::*;
use ember_memory::addresses::CMDLINE_ADDR;
use ember_memory::GuestRam;
use ember_memory::{create_guest_memory, DirtyBitmap, MIB};
use std::io::Cursor;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

const CMDLINE_MAX_SIZE: usize = ember_memory::addresses::CMDLINE_MAX_SIZE as usize;

/// A file in the temp dir, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        TempPath(std::env::temp_dir().join(format!(
            "ember-loader-test-{}-{n}-{name}",
            std::process::id()
        )))
    }

    fn with_contents(name: &str, bytes: &[u8]) -> Self {
        let t = TempPath::new(name);
        let mut f = File::create(&t.0).unwrap();
        f.write_all(bytes).unwrap();
        t
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn mem(size: u64) -> GuestRam {
    create_guest_memory(&MemoryLayout::new(size).unwrap(), DirtyBitmap::Off).unwrap()
}

/// A deterministic xorshift byte stream.
fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

struct ElfSpec {
    paddr: u64,
    entry: u64,
    payload: Vec<u8>,
    memsz: u64,
    /// PVH entry for a Xen PHYS32_ENTRY note.
    pvh: Option<u32>,
    /// Put an unrelated note before the Xen one.
    other_note: bool,
}

impl ElfSpec {
    fn new(paddr: u64, payload: &[u8]) -> Self {
        ElfSpec {
            paddr,
            entry: paddr,
            payload: payload.to_vec(),
            memsz: payload.len() as u64,
            pvh: None,
            other_note: false,
        }
    }
}

fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_le_bytes());
    v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    v.extend_from_slice(&ty.to_le_bytes());
    v.extend_from_slice(name);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v.extend_from_slice(desc);
    while v.len() % 4 != 0 {
        v.push(0);
    }
    v
}

fn phdr(p_type: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&p_type.to_le_bytes());
    v.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for x in [offset, paddr, paddr, filesz, memsz, 0x1000] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    assert_eq!(v.len(), 56);
    v
}

/// ELF64 header + one PT_LOAD + optionally a PT_NOTE with a Xen PVH note.
fn build_elf(s: &ElfSpec) -> Vec<u8> {
    let mut notes = Vec::new();
    if s.other_note {
        notes.extend(note(b"GNU\0", 3, &[0xab; 20]));
    }
    if let Some(pvh) = s.pvh {
        notes.extend(note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &pvh.to_le_bytes()));
    }
    let phnum: u16 = if notes.is_empty() { 1 } else { 2 };
    let notes_off = 64 + 56 * u64::from(phnum);
    let payload_off = notes_off + notes.len() as u64;

    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&s.entry.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, phnum, 64, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        f.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(f.len(), 64);
    f.extend(phdr(
        PT_LOAD,
        payload_off,
        s.paddr,
        s.payload.len() as u64,
        s.memsz,
    ));
    if !notes.is_empty() {
        f.extend(phdr(PT_NOTE, notes_off, 0, notes.len() as u64, 0));
    }
    f.extend(notes);
    f.extend_from_slice(&s.payload);
    f
}

/// A fake bzImage: boot sector + `setup_sects` setup sectors + payload.
fn build_bzimage(setup_sects: u8, payload: &[u8], version: u16, init_size: u32) -> Vec<u8> {
    let sects = if setup_sects == 0 { 4 } else { setup_sects };
    let setup_size = (usize::from(sects) + 1) * 512;
    let mut f = vec![0u8; setup_size];
    f[0x1f1] = setup_sects;
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    f[0x211] = 1; // loadflags: LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    f[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes()); // init_size
    f.extend_from_slice(payload);
    f
}

fn read_guest(m: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn elf_with_pvh_note() {
    let m = mem(32 * MIB);
    let payload = pseudo_random(1, 10_000);
    let mut spec = ElfSpec::new(0x20_0000, &payload);
    spec.entry = 0x20_0100;
    spec.memsz = 0x10_0000; // bss
    spec.pvh = Some(0x20_0040);
    spec.other_note = true;
    let file = TempPath::with_contents("pvh.elf", &build_elf(&spec));
    let k = load_kernel(&m, &file.0).unwrap();
    assert_eq!(k.format, KernelFormat::Elf);
    assert_eq!(k.kernel_start, GuestAddress(0x20_0000));
    assert_eq!(k.kernel_end, 0x30_0000);
    assert_eq!(k.linux64_entry, GuestAddress(0x20_0100));
    assert_eq!(k.pvh_entry, Some(GuestAddress(0x20_0040)));
    assert!(k.setup_header.is_none());
    assert_eq!(
        k.protocols(),
        vec![BootProtocol::Pvh, BootProtocol::Linux64]
    );
    assert_eq!(k.preferred_protocol(), BootProtocol::Pvh);
    assert_eq!(read_guest(&m, 0x20_0000, payload.len()), payload);
}

#[test]
fn elf_without_pvh_note() {
    let m = mem(32 * MIB);
    let payload = pseudo_random(2, 4096);
    let mut spec = ElfSpec::new(0x100_0000, &payload);
    spec.other_note = true; // a PT_NOTE, but no Xen note in it
    let k = load_kernel_from(&m, &mut Cursor::new(&build_elf(&spec)[..])).unwrap();
    assert_eq!(k.pvh_entry, None);
    assert_eq!(k.linux64_entry, GuestAddress(0x100_0000));
    assert_eq!(k.kernel_end, 0x100_1000);
    assert_eq!(k.protocols(), vec![BootProtocol::Linux64]);
    assert_eq!(k.preferred_protocol(), BootProtocol::Linux64);
    assert_eq!(read_guest(&m, 0x100_0000, payload.len()), payload);

    // Without any PT_NOTE.
    let spec = ElfSpec::new(0x100_0000, &payload);
    let k = load_kernel_from(&m, &mut Cursor::new(&build_elf(&spec)[..])).unwrap();
    assert_eq!(k.pvh_entry, None);
}

#[test]
fn elf_does_not_fit() {
    let m = mem(16 * MIB);
    // Payload fits, bss does not.
    let mut spec = ElfSpec::new(0x20_0000, &[0x90; 64]);
    spec.memsz = 16 * MIB;
    let image = build_elf(&spec);
    m.write_slice(&[0x5a; 64], GuestAddress(0x20_0000)).unwrap();
    let err = load_kernel_from(&m, &mut Cursor::new(&image[..])).unwrap_err();
    match &err {
        Error::Load {
            path,
            source: LoadError::DoesNotFit { start, end, .. },
        } => {
            assert_eq!(path, Path::new(IMAGE_PATH));
            assert_eq!((*start, *end), (0x20_0000, 0x120_0000));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("0x1200000"), "{err}");
    // Nothing was written.
    assert_eq!(read_guest(&m, 0x20_0000, 64), vec![0x5a; 64]);

    // Entirely past the end of memory, and with an overflowing size.
    let spec = ElfSpec::new(64 * MIB, &[0x90; 64]);
    assert!(matches!(
        load_kernel_from(&m, &mut Cursor::new(&build_elf(&spec)[..])),
        Err(Error::Load {
            source: LoadError::DoesNotFit { .. },
            ..
        })
    ));
    let mut spec = ElfSpec::new(0x20_0000, &[0x90; 64]);
    spec.memsz = u64::MAX - 0x10_0000;
    assert!(matches!(
        load_kernel_from(&m, &mut Cursor::new(&build_elf(&spec)[..])),
        Err(Error::Load {
            source: LoadError::DoesNotFit { end: u64::MAX, .. },
            ..
        })
    ));
}

#[test]
fn elf_rejections() {
    let m = mem(16 * MIB);
    let load = |image: &[u8]| load_kernel_from(&m, &mut Cursor::new(image));

    // Below 1 MiB.
    let spec = ElfSpec::new(0x8000, &[0x90; 16]);
    assert!(matches!(
        load(&build_elf(&spec)),
        Err(Error::Load {
            source: LoadError::BelowHimem { start: 0x8000, .. },
            ..
        })
    ));
    // Entry outside the segments.
    let mut spec = ElfSpec::new(0x20_0000, &[0x90; 16]);
    spec.entry = 0x40_0000;
    assert!(matches!(
        load(&build_elf(&spec)),
        Err(Error::Load {
            source: LoadError::EntryOutsideKernel { which: "ELF", .. },
            ..
        })
    ));
    // PVH entry outside the segments.
    let mut spec = ElfSpec::new(0x20_0000, &[0x90; 16]);
    spec.pvh = Some(0x1000);
    assert!(matches!(
        load(&build_elf(&spec)),
        Err(Error::Load {
            source: LoadError::EntryOutsideKernel {
                which: "PVH",
                entry: 0x1000,
                ..
            },
            ..
        })
    ));
    let good = build_elf(&ElfSpec::new(0x20_0000, &[0x90; 16]));
    // 32-bit class.
    let mut img = good.clone();
    img[4] = 1;
    assert!(matches!(
        load(&img),
        Err(Error::Load {
            source: LoadError::NotElf64 { class: 1 },
            ..
        })
    ));
    // Big endian.
    let mut img = good.clone();
    img[5] = 2;
    assert!(matches!(
        load(&img),
        Err(Error::Load {
            source: LoadError::NotLittleEndian { data: 2 },
            ..
        })
    ));
    // aarch64.
    let mut img = good.clone();
    img[18] = 183;
    assert!(matches!(
        load(&img),
        Err(Error::Load {
            source: LoadError::WrongMachine { machine: 183 },
            ..
        })
    ));
    // Bad e_phentsize.
    let mut img = good.clone();
    img[54] = 32;
    assert!(matches!(
        load(&img),
        Err(Error::Load {
            source: LoadError::BadProgramHeaderSize { size: 32 },
            ..
        })
    ));
    // No PT_LOAD.
    let mut img = good.clone();
    img[64] = 6; // PT_PHDR
    assert!(matches!(
        load(&img),
        Err(Error::Load {
            source: LoadError::NoLoadableSegment,
            ..
        })
    ));
    // Truncated header / program headers / payload.
    assert!(matches!(
        load(&good[..40]),
        Err(Error::Load {
            source: LoadError::Read { .. },
            ..
        })
    ));
    assert!(matches!(
        load(&good[..100]),
        Err(Error::Load {
            source: LoadError::Read { .. },
            ..
        })
    ));
    // The payload cut short: said before linux-loader's "Unable to read kernel image".
    let err = load(&good[..good.len() - 1]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Load {
                source: LoadError::SegmentBeyondFile { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn bzimage() {
    let m = mem(64 * MIB);
    let payload = pseudo_random(3, 3 * 4096 + 17);
    let image = build_bzimage(3, &payload, 0x020f, 0x80_0000);
    let file = TempPath::with_contents("bzImage", &image);
    let k = load_kernel(&m, &file.0).unwrap();
    assert_eq!(k.format, KernelFormat::BzImage);
    assert_eq!(k.kernel_start, GuestAddress(KERNEL_LOAD_ADDR));
    assert_eq!(k.linux64_entry, GuestAddress(0x10_0200));
    assert_eq!(k.pvh_entry, None);
    assert_eq!(k.protocols(), vec![BootProtocol::Linux64]);
    // Decompression area: pref_address (16 MiB) + init_size (8 MiB).
    assert_eq!(k.kernel_end, 0x180_0000);
    let hdr = k.setup_header.unwrap();
    let (setup_sects, header, version, code32_start) =
        (hdr.setup_sects, hdr.header, hdr.version, hdr.code32_start);
    assert_eq!(setup_sects, 3);
    assert_eq!(header, 0x5372_6448);
    assert_eq!(version, 0x020f);
    assert_eq!(code32_start, 0x10_0000);
    assert_eq!(read_guest(&m, KERNEL_LOAD_ADDR, payload.len()), payload);

    // setup_sects == 0 means 4; old protocol: kernel_end is the payload end.
    let image = build_bzimage(0, &payload, 0x0209, 0x80_0000);
    let k = load_kernel_from(&m, &mut Cursor::new(&image[..])).unwrap();
    assert_eq!(k.kernel_end, KERNEL_LOAD_ADDR + payload.len() as u64);
    assert_eq!(read_guest(&m, KERNEL_LOAD_ADDR, payload.len()), payload);
}

#[test]
fn bzimage_rejections() {
    let m = mem(16 * MIB);
    let load = |image: &[u8]| load_kernel_from(&m, &mut Cursor::new(image));
    // Too big for memory.
    let image = build_bzimage(1, &vec![0u8; 15 * MIB as usize + 1], 0x020f, 0);
    assert!(matches!(
        load(&image),
        Err(Error::Load {
            source: LoadError::DoesNotFit {
                start: 0x10_0000,
                end: 0x100_0001,
                ..
            },
            ..
        })
    ));
    // The decompression area (pref_address 16 MiB + init_size) is not RAM.
    let image = build_bzimage(1, &[1, 2, 3], 0x020f, 0x1000);
    assert!(matches!(
        load(&image),
        Err(Error::Load {
            source: LoadError::DoesNotFit {
                start: 0x100_0000,
                end: 0x100_1000,
                ..
            },
            ..
        })
    ));
    // Found by the `loader_kernel` fuzz target: an empty decompression area (init_size 0)
    // at a pref_address beyond RAM used to be accepted, and kernel_end then lay outside RAM.
    let mut image = build_bzimage(1, &[1, 2, 3], 0x020f, 0);
    image[0x258..0x260].copy_from_slice(&0x7fff_0000_0000u64.to_le_bytes());
    let err = load(&image).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Load {
                source: LoadError::DoesNotFit {
                    start: 0x7fff_0000_0000,
                    ram_end: 0x100_0000,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("corrupt"), "{err}");
    // ... while one at the very end of RAM is fine.
    let mut image = build_bzimage(1, &[1, 2, 3], 0x020f, 0);
    image[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    assert_eq!(load(&image).unwrap().kernel_end, 0x100_0000);
    // Shorter than its setup sectors.
    let mut image = build_bzimage(1, &[], 0x020f, 0);
    image[0x1f1] = 30;
    assert!(matches!(
        load(&image),
        Err(Error::Load {
            source: LoadError::Truncated {
                size: 1024,
                setup_size: 15872
            },
            ..
        })
    ));
    // Old protocol, or not loaded high.
    let image = build_bzimage(1, &[1, 2, 3], 0x0105, 0);
    assert!(matches!(
        load(&image),
        Err(Error::Load {
            source: LoadError::UnsupportedBzImage { version: 0x105, .. },
            ..
        })
    ));
    let mut image = build_bzimage(1, &[1, 2, 3], 0x020f, 0);
    image[0x211] = 0;
    assert!(matches!(
        load(&image),
        Err(Error::Load {
            source: LoadError::UnsupportedBzImage { loadflags: 0, .. },
            ..
        })
    ));
    // "HdrS" but the file ends inside the setup header.
    let image = build_bzimage(1, &[], 0x020f, 0);
    assert!(matches!(
        load(&image[..0x210]),
        Err(Error::Load {
            source: LoadError::Read { .. },
            ..
        })
    ));
}

#[test]
fn not_a_kernel() {
    let m = mem(16 * MIB);
    let junk = pseudo_random(4, 8192);
    assert_ne!(&junk[..4], b"\x7fELF");
    assert_ne!(&junk[0x202..0x206], b"HdrS");
    let file = TempPath::with_contents("junk", &junk);
    match load_kernel(&m, &file.0) {
        Err(Error::NotAKernel { path }) => assert_eq!(path, file.0),
        other => panic!("unexpected {other:?}"),
    }
    let err = load_kernel(&m, &file.0).unwrap_err().to_string();
    assert!(err.contains(&*file.0.to_string_lossy()), "{err}");

    // Empty and tiny files.
    let empty = TempPath::with_contents("empty", &[]);
    assert!(matches!(
        load_kernel(&m, &empty.0),
        Err(Error::NotAKernel { .. })
    ));
    assert!(matches!(
        load_kernel_from(&m, &mut Cursor::new(&b"\x7fEL"[..])),
        Err(Error::NotAKernel { .. })
    ));
}

#[test]
fn missing_file() {
    let m = mem(16 * MIB);
    let path = Path::new("/nonexistent/ember/vmlinux");
    match load_kernel(&m, path) {
        Err(Error::Open { path: p, source }) => {
            assert_eq!(p, path);
            assert_eq!(source.kind(), io::ErrorKind::NotFound);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = load_kernel(&m, path).unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/ember/vmlinux"), "{msg}");
    let layout = MemoryLayout::new(16 * MIB).unwrap();
    assert!(matches!(
        load_initrd(&m, path, &layout, 0x20_0000),
        Err(Error::Open { .. })
    ));
}

#[test]
fn fuzz_smoke() {
    // Mutated images must give errors or kernels inside guest memory, never
    // panics (the same invariant as fuzz/fuzz_targets/loader_kernel.rs).
    let m = mem(32 * MIB);
    let mut spec = ElfSpec::new(0x20_0000, &pseudo_random(5, 256));
    spec.pvh = Some(0x20_0010);
    spec.other_note = true;
    let elf = build_elf(&spec);
    let bz = build_bzimage(1, &pseudo_random(6, 512), 0x020f, 0x1000);
    let noise = pseudo_random(7, 200_000);
    let mut k = 0;
    let (mut ok, mut err) = (0, 0);
    for base in [&elf, &bz] {
        for i in 0..2000 {
            let mut img = base.clone();
            for _ in 0..1 + i % 4 {
                let pos = usize::from(noise[k]) << 8 | usize::from(noise[k + 1]);
                img[pos % base.len()] = noise[k + 2];
                k += 3;
            }
            if i % 7 == 0 {
                img.truncate(usize::from(noise[k]) * 4);
                k += 1;
            }
            match load_kernel_from(&m, &mut Cursor::new(&img[..])) {
                Ok(kernel) => {
                    assert!(kernel.kernel_end >= kernel.kernel_start.0);
                    assert!(kernel.kernel_end <= 32 * MIB);
                    ok += 1
                }
                Err(_) => err += 1,
            }
        }
    }
    assert!(ok > 100 && err > 100, "ok={ok} err={err}");
}

#[test]
fn initrd() {
    let m = mem(32 * MIB);
    let layout = MemoryLayout::new(32 * MIB).unwrap();
    let contents = pseudo_random(8, 3 * 4096 + 5);
    let file = TempPath::with_contents("initrd", &contents);
    let (addr, size) = load_initrd(&m, &file.0, &layout, 0x40_0000).unwrap();
    assert_eq!(size, contents.len() as u64);
    assert_eq!(addr, GuestAddress(32 * MIB - 4 * 4096));
    assert_eq!(read_guest(&m, addr.0, contents.len()), contents);

    // Empty initrd.
    let empty = TempPath::with_contents("initrd-empty", &[]);
    let (_, size) = load_initrd(&m, &empty.0, &layout, 0x40_0000).unwrap();
    assert_eq!(size, 0);
}

#[test]
fn initrd_too_large() {
    let m = mem(16 * MIB);
    let layout = MemoryLayout::new(16 * MIB).unwrap();
    let file = TempPath::new("initrd-big");
    // Sparse: nothing is written to disk.
    File::create(&file.0).unwrap().set_len(15 * MIB).unwrap();
    match load_initrd(&m, &file.0, &layout, 0x20_0001) {
        Err(Error::InitrdTooLarge {
            path,
            size,
            available,
        }) => {
            assert_eq!(path, file.0);
            assert_eq!(size, 15 * MIB);
            assert_eq!(available, 16 * MIB - 0x20_1000);
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = load_initrd(&m, &file.0, &layout, 0x20_0001)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("15728640") && msg.contains("initrd-big"),
        "{msg}"
    );
}

#[test]
fn initrd_memory_mismatch() {
    // The layout says 32 MiB but only 16 MiB are mapped.
    let m = mem(16 * MIB);
    let layout = MemoryLayout::new(32 * MIB).unwrap();
    let file = TempPath::with_contents("initrd-mismatch", &[1, 2, 3]);
    assert!(matches!(
        load_initrd(&m, &file.0, &layout, 0x20_0000),
        Err(Error::InitrdRead { .. })
    ));
}

#[test]
fn cmdline() {
    let m = mem(16 * MIB);
    let at = GuestAddress(CMDLINE_ADDR);
    m.write_slice(&[0x5a; 64], at).unwrap();
    let size = load_cmdline(&m, "console=ttyS0 probe=memmap", at, CMDLINE_MAX_SIZE).unwrap();
    assert_eq!(size, 27);
    assert_eq!(
        read_guest(&m, CMDLINE_ADDR, 28),
        b"console=ttyS0 probe=memmap\0\x5a"
    );

    // Empty: just the NUL.
    assert_eq!(load_cmdline(&m, "", at, CMDLINE_MAX_SIZE).unwrap(), 1);
    assert_eq!(read_guest(&m, CMDLINE_ADDR, 1), [0]);

    // Exactly the maximum, and one more.
    let max = "x".repeat(CMDLINE_MAX_SIZE - 1);
    assert_eq!(
        load_cmdline(&m, &max, at, CMDLINE_MAX_SIZE).unwrap(),
        CMDLINE_MAX_SIZE as u32
    );
    assert_eq!(read_guest(&m, CMDLINE_ADDR + 2047, 1), [0]);
    let long = "x".repeat(CMDLINE_MAX_SIZE);
    match load_cmdline(&m, &long, at, CMDLINE_MAX_SIZE) {
        Err(Error::CmdlineTooLong { len, max }) => {
            assert_eq!(len, 2049);
            assert_eq!(max, 2048);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        load_cmdline(&m, "a", at, 0),
        Err(Error::CmdlineTooLong { len: 2, max: 0 })
    ));

    // Interior NUL.
    assert!(matches!(
        load_cmdline(&m, "console=ttyS0\0evil", at, CMDLINE_MAX_SIZE),
        Err(Error::InvalidCmdline)
    ));

    // Outside guest memory.
    assert!(matches!(
        load_cmdline(&m, "abc", GuestAddress(16 * MIB - 2), CMDLINE_MAX_SIZE),
        Err(Error::CmdlineWrite { len: 4, .. })
    ));
}
