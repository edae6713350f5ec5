//! The "null probe": a hand-assembled ELF kernel that does as little as a guest can.
//!
//! Both entries (the 32-bit PVH entry named by a `Xen` note, and the 64-bit Linux entry in
//! `e_entry`) run the same few ring-0 instructions, which encode identically in 32- and
//! 64-bit mode:
//!
//! ```text
//! mov dx, 0x510 ; out dx, al          boot timer
//! mov dx, 0x3f8 ; mov al, 'N' ; out dx, al ; ... 'U' 'L' 'L' '\n'    COM1, no LSR polling
//! ```
//!
//! then, for [`NullMode::Exit`]:
//!
//! ```text
//! mov al, 0xfe ; out 0x64, al         i8042 reset (Ember, Firecracker)
//! in al, 0x64 ; cmp al, 0xff ; jne park   something answers at 0x64: wait to be stopped
//! lidt [zero] ; ud2                   no i8042 (QEMU microvm): triple fault, -no-reboot exits
//! park: cli ; hlt ; jmp park
//! ```
//!
//! and for [`NullMode::Park`] (used to measure a running VMM's memory) just `cli; hlt; jmp`.
//! `int3` is not used for the fault: the ring-0 emulator of PVM hosts refuses it, which would
//! end an Ember VM with an emulation failure instead of a triple fault.
//!
//! The whole file is one `PT_LOAD` segment at physical 0x100000 (so the ELF header itself
//! lands at 0x100000 and the code a few hundred bytes above it) plus a `PT_NOTE`.

/// Physical load address of the image (`HIMEM_START`).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// The line the null probe prints on COM1.
pub const LINE: &str = "NULL";

/// What the null probe does after printing its line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NullMode {
    /// Reset (i8042), or triple-fault where nothing answers at port 0x64.
    Exit,
    /// Halt forever with interrupts off (the VM stays up until killed).
    Park,
}

/// Whether the image carries the PVH note.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entries {
    /// PVH note (32-bit entry) and the 64-bit `e_entry`.
    PvhAndLinux64,
    /// Only the 64-bit `e_entry`: VMMs that prefer PVH must use the Linux 64-bit protocol.
    Linux64Only,
}

/// The code, assembled by hand. `idtr` is the absolute address of 10 zero bytes.
fn code(mode: NullMode, idtr: u32) -> Vec<u8> {
    let mut c = Vec::new();
    // mov dx, 0x510 ; out dx, al   (66 prefix: 16-bit operand in both 32- and 64-bit mode)
    c.extend_from_slice(&[0x66, 0xba, 0x10, 0x05, 0xee]);
    // mov dx, 0x3f8
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]);
    for &b in LINE.as_bytes().iter().chain(b"\n") {
        // mov al, b ; out dx, al
        c.extend_from_slice(&[0xb0, b, 0xee]);
    }
    match mode {
        NullMode::Exit => {
            // mov al, 0xfe ; out 0x64, al ; in al, 0x64 ; cmp al, 0xff
            c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xe4, 0x64, 0x3c, 0xff]);
            // jne park (over lidt (8 bytes) + ud2 (2 bytes))
            c.extend_from_slice(&[0x75, 10]);
            // lidt [disp32] with a SIB byte (no base, no index): absolute in both modes
            // (a plain modrm disp32 would be RIP-relative in 64-bit mode).
            c.extend_from_slice(&[0x0f, 0x01, 0x1c, 0x25]);
            c.extend_from_slice(&idtr.to_le_bytes());
            // ud2: #UD with an empty IDT -> #GP -> #DF -> triple fault
            c.extend_from_slice(&[0x0f, 0x0b]);
        }
        NullMode::Park => {}
    }
    // park: cli ; hlt ; jmp hlt
    c.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    c
}

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Builds the null probe image.
pub fn build(mode: NullMode, entries: Entries) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let with_note = entries == Entries::PvhAndLinux64;
    let phnum = if with_note { 2 } else { 1 };
    let note_off = EHDR + PHDR * phnum;
    // "Xen" note: namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    // It is followed by an empty note (12 zero bytes) so a loader that reads the descriptor
    // as 64 bits (QEMU does for ELF64) sees zero in the upper half.
    let note_len = if with_note { 12 + 4 + 4 + 12 } else { 0 };
    let idtr_off = note_off + note_len;
    let code_off = (idtr_off + 16 + 15) & !15;
    let idtr = (LOAD_ADDR as usize + idtr_off) as u32;
    let body = code(mode, idtr);
    let total = code_off + body.len();
    let entry = LOAD_ADDR + code_off as u64;

    let mut f = Vec::with_capacity(total);
    // ELF header.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    put16(&mut f, 2); // ET_EXEC
    put16(&mut f, 0x3e); // EM_X86_64
    put32(&mut f, 1); // EV_CURRENT
    put64(&mut f, entry); // e_entry: the 64-bit Linux entry
    put64(&mut f, EHDR as u64); // e_phoff
    put64(&mut f, 0); // e_shoff
    put32(&mut f, 0); // e_flags
    put16(&mut f, EHDR as u16); // e_ehsize
    put16(&mut f, PHDR as u16); // e_phentsize
    put16(&mut f, phnum as u16); // e_phnum
    put16(&mut f, 64); // e_shentsize
    put16(&mut f, 0); // e_shnum
    put16(&mut f, 0); // e_shstrndx
    debug_assert_eq!(f.len(), EHDR);
    // PT_LOAD: the whole file, RWX, at LOAD_ADDR.
    put32(&mut f, 1);
    put32(&mut f, 7);
    put64(&mut f, 0);
    put64(&mut f, LOAD_ADDR);
    put64(&mut f, LOAD_ADDR);
    put64(&mut f, total as u64);
    put64(&mut f, total as u64);
    put64(&mut f, 0x1000);
    if with_note {
        put32(&mut f, 4); // PT_NOTE
        put32(&mut f, 4); // R
        put64(&mut f, note_off as u64);
        put64(&mut f, LOAD_ADDR + note_off as u64);
        put64(&mut f, LOAD_ADDR + note_off as u64);
        put64(&mut f, note_len as u64);
        put64(&mut f, note_len as u64);
        put64(&mut f, 4);
        put32(&mut f, 4);
        put32(&mut f, 4);
        put32(&mut f, 18);
        f.extend_from_slice(b"Xen\0");
        put32(&mut f, entry as u32); // the same code serves as the 32-bit entry
        f.extend_from_slice(&[0; 12]);
    }
    debug_assert_eq!(f.len(), idtr_off);
    f.resize(code_off, 0); // the zero IDTR (10 bytes) and padding
    f.extend_from_slice(&body);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let img = build(NullMode::Exit, Entries::PvhAndLinux64);
        assert_eq!(&img[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(img[24..32].try_into().unwrap());
        let off = (entry - LOAD_ADDR) as usize;
        assert_eq!(&img[off..off + 5], &[0x66, 0xba, 0x10, 0x05, 0xee]);
        // The PVH descriptor names the same entry.
        let note = 64 + 2 * 56;
        assert_eq!(&img[note + 12..note + 16], b"Xen\0");
        let pvh = u32::from_le_bytes(img[note + 16..note + 20].try_into().unwrap());
        assert_eq!(u64::from(pvh), entry);
        assert!(img.len() < 512);
        let lin = build(NullMode::Park, Entries::Linux64Only);
        assert_eq!(u16::from_le_bytes(lin[56..58].try_into().unwrap()), 1);
    }
}
