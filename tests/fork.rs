//! Forks of a paused template: each a copy-on-write view of the template's memory, with its
//! own identity, running beside the others.

mod snapshot_common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use ember_test_support::{kvm_or_skip, probe_elf, write_blk_image};
use ember_vmm::{DiskConfig, RngConfig, Template, Vm, VmConfig, VmExit};
use snapshot_common::{spawn, Console};
use vm_memory::{Bytes, GuestAddress};

/// The probe's pattern byte at offset `i` of its snapshot region.
fn pattern(i: usize) -> u8 {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "the probe's own truncation"
    )]
    let b = (i as u8) ^ ((i >> 8) as u8) ^ 0xa5;
    b
}

/// The guest address of the probe's snapshot region, from its `waiting` line.
fn region(console: &str) -> GuestAddress {
    let hex = console
        .split("region=0x")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no region= in {console}"));
    GuestAddress(u64::from_str_radix(hex, 16).unwrap())
}

/// Boots the probe (`checks` after the snapshot wait) to its wait and makes it a template.
fn template(config: VmConfig) -> (Template, ember_memory::GuestRam, GuestAddress) {
    let console = Console::default();
    let vm = Vm::builder(config)
        .fork_template(true)
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let memory = vm.memory().clone();
    let (h, join) = spawn(vm);
    assert!(
        console.wait_for("PROBE snapshot waiting", Duration::from_secs(30)),
        "{}",
        console.text()
    );
    assert!(h.pause());
    let t = h.template().unwrap();
    // Once per VM.
    assert!(h.template().is_err());
    // The template may run on: its writes are its own (it was remapped copy-on-write).
    h.resume();
    h.send_serial(&[0xff]);
    let outcome = join.join().unwrap().unwrap();
    assert_eq!(outcome.exit, VmExit::Reset, "{}", console.text());
    assert!(console.text().contains("mark=255"), "{}", console.text());
    // A template that runs on keeps its generation ID (only forks and restores get new ones).
    let text = console.text();
    if text.contains("PROBE vmgenid ok") {
        let first = text
            .lines()
            .find(|l| l.starts_with("PROBE vmgenid ok"))
            .unwrap();
        assert_eq!(generation_id(first), generation_id(&text), "{text}");
    }
    (t, memory, region(&text))
}

/// The ID of the last `PROBE vmgenid ok ... id=<32 hex digits>` line.
fn generation_id(console: &str) -> Option<[u8; 16]> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.starts_with("PROBE vmgenid ok"))?;
    let hex = line.split("id=").nth(1)?.split_whitespace().next()?;
    let mut id = [0u8; 16];
    for (k, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * k..2 * k + 2)?, 16).ok()?;
    }
    Some(id)
}

fn probe_config(checks: &str) -> VmConfig {
    let mut c = VmConfig::new(probe_elf());
    c.memory_mib = 128;
    c.cmdline = format!("probe={checks}");
    c.rng = Some(RngConfig::default());
    c
}

#[test]
fn forks_run_side_by_side_and_never_see_each_others_writes() {
    if !kvm_or_skip("forks_run_side_by_side_and_never_see_each_others_writes") {
        return;
    }
    const FORKS: u8 = 100;
    let (template, template_mem, at) = template(probe_config("vmgenid,snapshot,rng,vmgenid"));
    // All forks built and running (each in its wait) before any is released.
    let mut forks = Vec::new();
    for _ in 0..FORKS {
        let console = Console::default();
        let vm = template
            .fork()
            .unwrap()
            .serial_output(Box::new(console.clone()))
            .build()
            .unwrap();
        let memory = vm.memory().clone();
        let (h, join) = spawn(vm);
        forks.push((h, join, console, memory));
    }
    let mut ids = std::collections::HashSet::new();
    for (i, (h, ..)) in forks.iter().enumerate() {
        // Each fork has its own VM generation ID, written before its vCPUs ran.
        let id = h.generation_id().expect("a generation ID");
        assert!(ids.insert(id), "fork {i} has another fork's generation ID");
        h.send_serial(&[u8::try_from(i).unwrap() + 1]);
    }
    for (i, (_, join, console, memory)) in forks.into_iter().enumerate() {
        let mark = u8::try_from(i).unwrap() + 1;
        let outcome = join.join().unwrap().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "fork {i}: {out}");
        assert!(
            out.contains("PROBE snapshot ok pattern=ok tsc_forward=yes"),
            "fork {i}: {out}"
        );
        assert!(out.contains(&format!("mark={mark}\n")), "fork {i}: {out}");
        assert!(out.contains("PROBE rng ok"), "fork {i}: {out}");
        assert!(!out.contains("PROBE start"), "fork {i}: {out}");
        // The guest reads its own generation ID, one no other fork has.
        let id = generation_id(&out).unwrap_or_else(|| panic!("fork {i}: {out}"));
        assert!(
            ids.contains(&id),
            "fork {i} reads an ID it was not given: {out}"
        );
        // Its memory holds its own mark, not another fork's.
        let mut b = [0u8; 256];
        memory.read_slice(&mut b, at).unwrap();
        for (j, v) in b.iter().enumerate() {
            assert_eq!(*v, pattern(j) ^ mark, "fork {i} byte {j}");
        }
    }
    // The template's memory (it ran on after the template was taken, and marked 0xff) is
    // its own; the memfd forks start from still holds the unmarked pattern, as a new fork
    // shows.
    let mut b = [0u8; 256];
    template_mem.read_slice(&mut b, at).unwrap();
    assert!(b.iter().enumerate().all(|(j, v)| *v == pattern(j) ^ 0xff));
    let vm = template.fork().unwrap().build().unwrap();
    vm.memory().read_slice(&mut b, at).unwrap();
    assert!(b.iter().enumerate().all(|(j, v)| *v == pattern(j)));
}

#[test]
fn a_fork_must_not_share_a_writable_disk_or_a_socket_with_its_template() {
    if !kvm_or_skip("a_fork_must_not_share_a_writable_disk_or_a_socket_with_its_template") {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-fork-").unwrap();
    let disk = dir.as_path().join("base.img");
    write_blk_image(&disk, 2048, 0x5a).unwrap();
    let mut c = probe_config("snapshot,blk");
    c.disks.push(DiskConfig {
        path: disk.clone(),
        id: Some("probe".into()),
        ..Default::default()
    });
    c.vsock = Some(ember_vmm::VsockConfig {
        cid: 3,
        uds_path: dir.as_path().join("t.sock"),
    });
    let (template, _, _) = template(c);
    let e = template.fork().unwrap_err().to_string();
    assert!(e.contains("vsock socket"), "{e}");
    let mut state = template.state().clone();
    state
        .override_vsock(&dir.as_path().join("f.sock"), Some(4))
        .unwrap();
    let e = template.fork_with(state.clone()).unwrap_err().to_string();
    assert!(e.contains("writable disk"), "{e}");
    assert!(state.override_disk("nope", &disk).is_err());
    // With its own copy of the disk the fork runs its blk checks on it.
    let copy = dir.as_path().join("fork.img");
    std::fs::copy(&disk, &copy).unwrap();
    state.override_disk("probe", &copy).unwrap();
    let console = Console::default();
    let vm = template
        .fork_with(state)
        .unwrap()
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let base_mtime = std::fs::metadata(&disk).unwrap().modified().unwrap();
    let copy_mtime = std::fs::metadata(&copy).unwrap().modified().unwrap();
    // Its own socket, beside the template's.
    assert!(dir.as_path().join("f.sock").exists());
    let (h, join) = spawn(vm);
    h.send_serial(b"g");
    let outcome = join.join().unwrap().unwrap();
    let out = console.text();
    assert_eq!(outcome.exit, VmExit::Reset, "{out}");
    assert!(out.contains("PROBE blk ok"), "{out}");
    // The blk check wrote to the fork's copy, not to the template's image.
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        base_mtime
    );
    assert_ne!(
        std::fs::metadata(&copy).unwrap().modified().unwrap(),
        copy_mtime
    );
}

#[test]
fn forks_and_boots_run_on_prepared_vms_and_refuse_ones_that_do_not_fit() {
    if !kvm_or_skip("forks_and_boots_run_on_prepared_vms_and_refuse_ones_that_do_not_fit") {
        return;
    }
    let (other, _, _) = template(probe_config("snapshot"));
    let (template, _, _) = template(probe_config("snapshot,rng"));
    let pool = ember_vmm::VmPool::for_template("/dev/kvm", &template, 2).unwrap();
    for mark in [7u8, 8, 9] {
        let console = Console::default();
        let vm = template
            .fork()
            .unwrap()
            .prepared(pool.take().unwrap())
            .serial_output(Box::new(console.clone()))
            .build()
            .unwrap();
        let (h, join) = spawn(vm);
        h.send_serial(&[mark]);
        let outcome = join.join().unwrap().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "{out}");
        assert!(out.contains(&format!("mark={mark}\n")), "{out}");
    }
    // Another template's pool: its memory is another memfd.
    let e = other
        .fork()
        .unwrap()
        .prepared(pool.take().unwrap())
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("maps another file"), "{e}");
    // A fork that tracks dirty pages needs memory with the VMM's dirty bitmap, and this
    // (untracked) template's pool maps it without one.
    let mut tracked = template.state().clone();
    tracked.config.track_dirty_pages = true;
    let e = template
        .fork_with(tracked)
        .unwrap()
        .prepared(pool.take().unwrap())
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("no dirty bitmap"), "{e}");
    // A pool made with the bitmap serves it.
    let tracking_pool = ember_vmm::VmPool::for_template_with(
        "/dev/kvm",
        &template,
        1,
        ember_memory::DirtyBitmap::On,
    )
    .unwrap();
    let mut tracked = template.state().clone();
    tracked.config.track_dirty_pages = true;
    let vm = template
        .fork_with(tracked)
        .unwrap()
        .prepared(tracking_pool.take().unwrap())
        .build()
        .unwrap();
    assert!(ember_memory::has_dirty_bitmap(vm.memory()));
    // A boot on a prepared VM without memory; one with the wrong vCPU count is refused.
    let plain = ember_vmm::VmPool::new("/dev/kvm", 1, false, 1).unwrap();
    let console = Console::default();
    let outcome = Vm::builder(probe_config("cmdline"))
        .prepared(plain.take().unwrap())
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(outcome.exit, VmExit::Reset, "{}", console.text());
    assert!(
        console.text().contains("PROBE cmdline ok"),
        "{}",
        console.text()
    );
    let mut two = probe_config("cmdline");
    two.vcpus = 2;
    let e = Vm::builder(two)
        .prepared(plain.take().unwrap())
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 vCPUs") && e.contains("wants 2"), "{e}");
}

/// A snapshot on disk is a template (`Template::from_snapshot`): forks of it, taken from a
/// pool made from it too, run side by side, each with its own generation ID and its own
/// memory (each guest marks its region with its own byte), and the memory file the forks
/// share is unchanged by them. A memory file of the wrong size, or a missing one, is refused.
#[test]
fn a_snapshot_on_disk_is_a_template_for_forks() {
    if !kvm_or_skip("a_snapshot_on_disk_is_a_template_for_forks") {
        return;
    }
    let f = snapshot_common::files();
    let (state, mem) = (&f.state, &f.memory);
    let text = snapshot_common::take_snapshot_of(probe_config("vmgenid,snapshot,vmgenid"), &f);
    let at = region(&text);
    let booted_id = generation_id(&text);
    assert!(booted_id.is_some(), "{text}");
    let before = std::fs::read(mem).unwrap();

    let template = Template::from_snapshot(state, mem).unwrap();
    // A file on disk is not sealed: another process could not rely on it (it opens the
    // snapshot itself instead).
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let e = template.send_to(&a).unwrap_err().to_string();
    assert!(e.contains("not a sealed memfd"), "{e}");
    let pool = ember_vmm::VmPool::for_template("/dev/kvm", &template, 2).unwrap();
    let mut forks = Vec::new();
    for mark in 1..=4u8 {
        let console = Console::default();
        let mut builder = template.fork().unwrap();
        if mark % 2 == 0 {
            builder = builder.prepared(pool.take().unwrap());
        }
        let vm = builder
            .serial_output(Box::new(console.clone()))
            .build()
            .unwrap();
        let memory = vm.memory().clone();
        let (h, join) = spawn(vm);
        forks.push((mark, h, join, console, memory));
    }
    let mut ids = std::collections::HashSet::new();
    for (mark, h, ..) in &forks {
        let id = h.generation_id().expect("a generation ID");
        assert_ne!(Some(id), booted_id, "fork {mark}");
        assert!(
            ids.insert(id),
            "fork {mark} has another fork's generation ID"
        );
        h.send_serial(&[*mark]);
    }
    for (mark, _, join, console, memory) in forks {
        let outcome = join.join().unwrap().unwrap();
        let out = console.text();
        assert_eq!(outcome.exit, VmExit::Reset, "fork {mark}: {out}");
        assert!(
            out.contains(&format!("mark={mark}\n")),
            "fork {mark}: {out}"
        );
        let id = generation_id(&out).unwrap_or_else(|| panic!("fork {mark}: {out}"));
        assert!(ids.contains(&id), "fork {mark}: {out}");
        let mut b = [0u8; 256];
        memory.read_slice(&mut b, at).unwrap();
        for (j, v) in b.iter().enumerate() {
            assert_eq!(*v, pattern(j) ^ mark, "fork {mark} byte {j}");
        }
    }
    assert!(
        std::fs::read(mem).unwrap() == before,
        "the forks changed the template's memory file"
    );

    // Refusals: a memory file of another size, a missing one.
    let dir = state.parent().unwrap();
    let short = dir.join("short.mem");
    std::fs::write(&short, &before[..4096]).unwrap();
    let e = Template::from_snapshot(state, &short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("short.mem") && e.contains("4096 bytes"), "{e}");
    let e = Template::from_snapshot(state, &dir.join("none.mem"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.mem"), "{e}");
}

/// Reads what [`Template::send_to`] wrote: (the header and state bytes, the memfd).
fn read_transfer(s: &UnixStream) -> (Vec<u8>, std::fs::File) {
    use std::io::Read;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut head = [0u8; 16];
    let (n, fd) = s.recv_with_fd(&mut head).unwrap();
    let mut r = s;
    r.read_exact(&mut head[n..]).unwrap();
    let len = u64::from_le_bytes(head[8..].try_into().unwrap());
    let mut bytes = head.to_vec();
    r.take(len).read_to_end(&mut bytes).unwrap();
    (bytes, fd.expect("the memfd"))
}

/// Sends `bytes` (a header and a state) with `fd` attached, as send_to does.
fn resend(bytes: &[u8], fd: &std::fs::File) -> String {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (a, b) = UnixStream::pair().unwrap();
    a.send_with_fd(&bytes[..16], fd.as_raw_fd()).unwrap();
    (&a).write_all(&bytes[16..]).unwrap();
    Template::receive(
        &b,
        std::path::Path::new("/run/resent.sock"),
        Duration::from_secs(5),
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn a_template_sent_over_a_socket_forks_in_the_receiver_from_a_frozen_memfd() {
    use std::os::unix::fs::FileExt;
    if !kvm_or_skip("a_template_sent_over_a_socket_forks_in_the_receiver_from_a_frozen_memfd") {
        return;
    }
    let (template, _, at) = template(probe_config("vmgenid,snapshot,vmgenid"));
    let (a, b) = UnixStream::pair().unwrap();
    template.send_to(&a).unwrap();
    let received = Template::receive(
        &b,
        std::path::Path::new("/run/pair.sock"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(received.state().memory_bytes, template.state().memory_bytes);
    let console = Console::default();
    let vm = received
        .fork()
        .unwrap()
        .serial_output(Box::new(console.clone()))
        .build()
        .unwrap();
    let memory = vm.memory().clone();
    let (h, join) = spawn(vm);
    assert!(h.generation_id().is_some());
    h.send_serial(&[7]);
    let outcome = join.join().unwrap().unwrap();
    let out = console.text();
    assert_eq!(outcome.exit, VmExit::Reset, "{out}");
    assert!(
        out.contains("PROBE snapshot ok pattern=ok tsc_forward=yes"),
        "{out}"
    );
    assert!(out.contains("mark=7\n"), "{out}");
    let mut b = [0u8; 256];
    memory.read_slice(&mut b, at).unwrap();
    assert!(b.iter().enumerate().all(|(j, v)| *v == pattern(j) ^ 7));

    // What travels: a memfd sealed against writes and size changes, holding the unmarked
    // pattern.
    let (a, b) = UnixStream::pair().unwrap();
    template.send_to(&a).unwrap();
    let (bytes, memfd) = read_transfer(&b);
    assert!(ember_memory::is_sealed(&memfd));
    assert!(memfd.write_all_at(&[1], at.0).is_err());
    assert!(memfd.set_len(4096).is_err());
    // The same state with a memory the receiver cannot rely on: refused.
    let layout = ember_memory::MemoryLayout::new(128 << 20).unwrap();
    let (_, unsealed) =
        ember_memory::create_guest_memory_memfd(&layout, ember_memory::DirtyBitmap::Off).unwrap();
    let e = resend(&bytes, &unsealed);
    assert!(e.contains("not a sealed memfd"), "{e}");
    let small = ember_memory::MemoryLayout::new(64 << 20).unwrap();
    let (mem, sealed_small) =
        ember_memory::create_guest_memory_memfd(&small, ember_memory::DirtyBitmap::Off).unwrap();
    ember_memory::remap_private(&mem, &sealed_small).unwrap();
    ember_memory::seal_memory_file(&sealed_small).unwrap();
    let e = resend(&bytes, &sealed_small);
    assert!(
        e.contains("resent.sock") && e.contains("the state needs"),
        "{e}"
    );
    // A corrupted state byte: the checksum catches it.
    let mut bad = bytes.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x20;
    let e = resend(&bad, &memfd);
    assert!(e.contains("corrupt"), "{e}");
    // The intact bytes with the real memfd are a template.
    let (a, b) = UnixStream::pair().unwrap();
    {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        a.send_with_fd(&bytes[..16], memfd.as_raw_fd()).unwrap();
        (&a).write_all(&bytes[16..]).unwrap();
    }
    assert!(Template::receive(
        &b,
        std::path::Path::new("/run/again.sock"),
        Duration::from_secs(5)
    )
    .is_ok());
}
