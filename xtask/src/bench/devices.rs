//! The `devices` section: the probe guest's virtio-net, virtio-vsock and virtio-blk throughput,
//! Ember beside QEMU's `microvm` (both without vhost) in the same run.
//!
//! - net, guest → host: the probe floods UDP datagrams of 1024 bytes to a socket on the host
//!   side of a TAP in a network namespace made for the run (192.0.2.0/24 exists only there);
//!   the probe reports datagrams per second and Mbit/s, the host counts what arrived.
//! - net, host → guest → host: the host sends one datagram of 1024 bytes at a time to the
//!   probe's UDP echo port for 2 s and times each echo: the round trip (both VMMs' RX and TX
//!   paths, the exits and interrupts of one packet each way).
//! - vsock (Ember only: QEMU's vsock needs vhost): a 64 MiB guest → host stream, and a 64 MiB
//!   echo (host → guest and back at once), in MiB/s.
//! - blk: 4 KiB read IOPS, the probe polling and waiting for interrupts (`probe.irq=1`), on
//!   both VMMs. On a PVM host the guest's interrupt handler runs in emulated ring 0, which
//!   costs both VMMs the same and dominates the interrupt-mode figure.

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::measure;
use super::peers::{Kind, Peer};
use super::stats::Summary;

/// Results of the devices section.
#[derive(Default)]
pub struct Report {
    /// Per VMM: (name, guest → host datagrams/s, Mbit/s, host → guest echoes/s, blk IOPS).
    pub cells: Vec<Cell>,
    /// Ember's vsock: (guest → host MiB/s, echo MiB/s each way).
    pub vsock: Option<(Summary, Summary)>,
    /// Why a part did not run.
    pub notes: Vec<String>,
}

/// One VMM's figures.
pub struct Cell {
    /// The VMM.
    pub peer: String,
    /// Whether it is Ember.
    pub is_ember: bool,
    /// Guest → host datagrams per second (the probe's figure).
    pub tx_pps: Option<Summary>,
    /// Guest → host Mbit/s of UDP payload.
    pub tx_mbit: Option<Summary>,
    /// Share of the flood the host received.
    pub tx_delivered: Option<Summary>,
    /// Host → guest → host round trip of one datagram, µs.
    pub echo_rtt: Option<Summary>,
    /// 4 KiB read IOPS, the probe polling the used ring.
    pub blk_polled: Option<Summary>,
    /// 4 KiB read IOPS, the probe waiting for each interrupt.
    pub blk_irq: Option<Summary>,
}

/// A network namespace with `tap0` at 192.0.2.1/24, removed on drop.
struct Netns(String);

impl Netns {
    fn create() -> Result<Netns, String> {
        let name = format!("emberbench{}", std::process::id());
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {args:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        let n = ns.0.as_str();
        ip(&[
            "netns", "exec", n, "ip", "tuntap", "add", "tap0", "mode", "tap",
        ])?;
        ip(&[
            "netns",
            "exec",
            n,
            "ip",
            "addr",
            "add",
            "192.0.2.1/24",
            "dev",
            "tap0",
        ])?;
        ip(&["netns", "exec", n, "ip", "link", "set", "tap0", "up"])?;
        Ok(ns)
    }
}

/// Moves the calling thread into network namespace `name`.
fn enter(name: &str) -> Result<(), String> {
    {
        let f =
            std::fs::File::open(format!("/run/netns/{name}")).map_err(|e| format!("netns: {e}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) with a namespace descriptor we hold open; it changes only this
        // thread's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The command booting the probe with `cmdline` on `peer`, with a net device on `tap0` and/or
/// a disk.
fn probe_command(
    peer: &Peer,
    probe: &Path,
    cmdline: &str,
    net: bool,
    disk: Option<&Path>,
    netns: Option<&Netns>,
) -> Command {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.0]).arg(&peer.bin);
            c
        }
        None => Command::new(&peer.bin),
    };
    match peer.kind {
        Kind::Qemu => {
            c.args([
                "-M",
                "microvm,acpi=on",
                "-global",
                "virtio-mmio.force-legacy=false",
                "-enable-kvm",
                "-cpu",
                "kvm64",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
                "-no-reboot",
                "-m",
                "256",
            ])
            .arg("-kernel")
            .arg(probe)
            .arg("-append")
            .arg(cmdline);
            if net {
                c.args([
                    "-netdev",
                    "tap,id=n0,ifname=tap0,script=no,downscript=no",
                    "-device",
                    "virtio-net-device,netdev=n0",
                ]);
            }
            if let Some(d) = disk {
                c.arg("-drive")
                    .arg(format!("id=d0,file={},format=raw,if=none", d.display()))
                    .args(["-device", "virtio-blk-device,drive=d0"]);
            }
        }
        _ => {
            c.arg("--kernel")
                .arg(probe)
                .args(["--memory-mib", "256", "--cmdline", cmdline]);
            if net {
                c.args(["--net", "tap=tap0"]);
            }
            if let Some(d) = disk {
                c.arg("--disk").arg(format!("{},id=probe", d.display()));
            }
        }
    }
    c
}

fn run_probe(cmd: &mut Command, check: &str) -> Result<String, String> {
    let run = measure::run(
        cmd,
        &measure::Options {
            line: None,
            timeout: Duration::from_secs(90),
            sample_memory: None,
            stop_after_line: false,
            guest_bytes: 256 << 20,
        },
    )?;
    let prefix = format!("PROBE {check} ");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .ok_or_else(|| format!("no {check} line ({})", run.failure()))?;
    if !line.starts_with(&format!("PROBE {check} ok")) {
        return Err(line.to_string());
    }
    Ok(line.to_string())
}

const FLOOD: u64 = 20_000;
const SIZE: usize = 1024;

/// One guest → host flood: (pps, Mbit/s, share delivered).
fn net_tx(peer: &Peer, probe: &Path, ns: &Netns) -> Result<(f64, f64, f64), String> {
    let ns_name = ns.0.clone();
    let receiver = std::thread::spawn(move || -> Result<u64, String> {
        enter(&ns_name)?;
        let s = UdpSocket::bind("192.0.2.1:9000").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut buf = [0u8; 2048];
        // The hello first.
        s.recv_from(&mut buf)
            .map_err(|e| format!("no hello: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok();
        let mut n = 0;
        while n < FLOOD && s.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        Ok(n)
    });
    std::thread::sleep(Duration::from_millis(100));
    let cmdline = format!(
        "probe=net probe.net.ip=192.0.2.2/24 probe.net.peer=192.0.2.1:9000 \
         probe.net.flood={FLOOD} probe.net.size={SIZE}"
    );
    let line = run_probe(
        &mut probe_command(peer, probe, &cmdline, true, None, Some(ns)),
        "net",
    );
    let got = receiver.join().map_err(|_| "receiver panicked")??;
    let line = line?;
    let pps: f64 = field(&line, "pps")
        .and_then(|v| v.parse().ok())
        .ok_or("no pps")?;
    let mbit: f64 = field(&line, "mbit_s")
        .and_then(|v| v.parse().ok())
        .ok_or("no mbit_s")?;
    Ok((pps, mbit, got as f64 / FLOOD as f64))
}

/// One host → guest → host echo run: the median round trip of one 1024-byte datagram, µs
/// (one in flight at a time, for 2 s).
fn net_echo(peer: &Peer, probe: &Path, ns: &Netns) -> Result<f64, String> {
    let ns_name = ns.0.clone();
    let host = std::thread::spawn(move || -> Result<f64, String> {
        enter(&ns_name)?;
        let s = UdpSocket::bind("192.0.2.1:9000").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut buf = [0u8; 2048];
        s.recv_from(&mut buf)
            .map_err(|e| format!("no hello: {e}"))?;
        let u = UdpSocket::bind("192.0.2.1:0").map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(Duration::from_millis(100))).ok();
        let msg = vec![0x42u8; SIZE];
        let t = Instant::now();
        let mut rtts = Vec::new();
        while t.elapsed() < Duration::from_secs(2) {
            let sent = Instant::now();
            u.send_to(&msg, "192.0.2.2:7").map_err(|e| e.to_string())?;
            if let Ok((n, _)) = u.recv_from(&mut buf) {
                if n == SIZE {
                    rtts.push(sent.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        // The first ones include the host's ARP resolution.
        let rtts = &rtts[rtts.len().min(10)..];
        Summary::of(rtts)
            .map(|s| s.median)
            .ok_or_else(|| "no echo came back".to_string())
    });
    std::thread::sleep(Duration::from_millis(100));
    let cmdline = "probe=net probe.net.ip=192.0.2.2/24 probe.net.peer=192.0.2.1:9000 \
                   probe.net.serve_ms=4000";
    let line = run_probe(
        &mut probe_command(peer, probe, cmdline, true, None, Some(ns)),
        "net",
    );
    let rtt = host.join().map_err(|_| "host thread panicked")??;
    line?;
    Ok(rtt)
}

/// 4 KiB read IOPS from the probe's `blk` line.
fn blk_iops(peer: &Peer, probe: &Path, disk: &Path, irq: bool) -> Result<f64, String> {
    let cmdline = format!(
        "probe=blk probe.blk.iops_n=5000 probe.blk.mib_n=0{}",
        if irq { " probe.irq=1" } else { "" }
    );
    let line = run_probe(
        &mut probe_command(peer, probe, &cmdline, false, Some(disk), None),
        "blk",
    )?;
    field(&line, "iops_4k")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no iops_4k in {line}"))
}

fn pattern(offset: u64, n: usize) -> Vec<u8> {
    (0..n as u64).map(|i| ((offset + i) % 251) as u8).collect()
}

/// Ember's vsock: (guest → host MiB/s, echo MiB/s each way).
fn vsock_run(ember: &Peer, probe: &Path, dir: &Path) -> Result<(f64, f64), String> {
    const TOTAL: u64 = 64 << 20;
    let uds = dir.join("bench-vsock.sock");
    let _ = std::fs::remove_file(&uds);
    let side = PathBuf::from(format!("{}_5000", uds.display()));
    let _ = std::fs::remove_file(&side);
    // Guest -> host.
    let listener = UnixListener::bind(&side).map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || -> Result<f64, String> {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).map_err(|e| e.to_string())?;
        s.write_all(b"go\n").map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        let t = Instant::now();
        while got < TOTAL {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        if got != TOTAL {
            return Err(format!("guest -> host stream ended after {got} bytes"));
        }
        Ok(TOTAL as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
    });
    let vsock = format!("cid=3,uds={}", uds.display());
    let cmdline = format!("probe=vsock probe.vsock.connect=5000 probe.vsock.bytes={TOTAL}");
    let mut c = Command::new(&ember.bin);
    c.arg("--kernel").arg(probe).args([
        "--memory-mib",
        "256",
        "--vsock",
        &vsock,
        "--cmdline",
        &cmdline,
    ]);
    run_probe(&mut c, "vsock")?;
    let up = reader.join().map_err(|_| "reader panicked")??;
    let _ = std::fs::remove_file(&side);

    // Echo.
    let mut c = Command::new(&ember.bin);
    c.arg("--kernel").arg(probe).args([
        "--memory-mib",
        "256",
        "--vsock",
        &vsock,
        "--cmdline",
        "probe=vsock probe.vsock.listen=52 probe.vsock.serve_ms=30000",
    ]);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = (|| -> Result<f64, String> {
        let end = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            if let Ok(mut s) = UnixStream::connect(&uds) {
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                s.write_all(b"CONNECT 52\n").map_err(|e| e.to_string())?;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    line.push(b[0]);
                    if b[0] == b'\n' {
                        break;
                    }
                }
                if line.starts_with(b"OK ") {
                    break s;
                }
            }
            if Instant::now() > end {
                return Err("no guest listener".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let t = Instant::now();
        let writer = std::thread::spawn(move || {
            let mut sent = 0u64;
            while sent < TOTAL {
                let n = (TOTAL - sent).min(1 << 16) as usize;
                if w.write_all(&pattern(sent, n)).is_err() {
                    break;
                }
                sent += n as u64;
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        while got < TOTAL {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        let _ = writer.join();
        if got != TOTAL {
            return Err(format!("echo ended after {got} bytes"));
        }
        Ok(TOTAL as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64())
    })();
    let _ = child.kill();
    let _ = child.wait();
    Ok((up, result?))
}

/// Runs the section: `runs` runs of each measurement per VMM.
pub fn run(peers: &[Peer], probe: &Path, scratch: &Path, runs: usize) -> Result<Report, String> {
    let mut report = Report::default();
    let disk = scratch.join("bench-blk.img");
    crate::disk::run(&crate::disk::Args {
        path: disk.clone(),
        size: 4 << 20,
        pattern: "probe".into(),
        seed: 0x5a,
    })?;
    if let Err(e) = crate::ensure_packages(&["iproute2"]) {
        report.notes.push(format!("cannot install iproute2: {e}"));
    }
    let ns = match Netns::create() {
        Ok(ns) => Some(ns),
        Err(e) => {
            report
                .notes
                .push(format!("net not measured: no network namespace ({e})"));
            None
        }
    };
    for p in peers
        .iter()
        .filter(|p| !matches!(p.kind, Kind::Firecracker | Kind::CloudHypervisor))
    {
        eprintln!("xtask bench: devices, {} ({runs} runs)", p.name);
        let (mut pps, mut mbit, mut share, mut echo, mut polled, mut irq) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for _ in 0..runs {
            if let Some(ns) = &ns {
                match net_tx(p, probe, ns) {
                    Ok((a, b, c)) => {
                        pps.push(a);
                        mbit.push(b);
                        share.push(c);
                    }
                    Err(e) => report.notes.push(format!("{}: net tx: {e}", p.name)),
                }
                match net_echo(p, probe, ns) {
                    Ok(r) => echo.push(r),
                    Err(e) => report.notes.push(format!("{}: net echo: {e}", p.name)),
                }
            }
            for (with_irq, out) in [(false, &mut polled), (true, &mut irq)] {
                match blk_iops(p, probe, &disk, with_irq) {
                    Ok(v) => out.push(v),
                    Err(e) => report.notes.push(format!("{}: blk: {e}", p.name)),
                }
            }
        }
        report.cells.push(Cell {
            peer: p.name.clone(),
            is_ember: p.kind == Kind::Ember,
            tx_pps: Summary::of(&pps),
            tx_mbit: Summary::of(&mbit),
            tx_delivered: Summary::of(&share),
            echo_rtt: Summary::of(&echo),
            blk_polled: Summary::of(&polled),
            blk_irq: Summary::of(&irq),
        });
    }
    if let Some(ember) = peers.iter().find(|p| p.kind == Kind::Ember) {
        let (mut up, mut echo) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            match vsock_run(ember, probe, scratch) {
                Ok((a, b)) => {
                    up.push(a);
                    echo.push(b);
                }
                Err(e) => report.notes.push(format!("vsock: {e}")),
            }
        }
        if let (Some(a), Some(b)) = (Summary::of(&up), Summary::of(&echo)) {
            report.vsock = Some((a, b));
        }
    }
    Ok(report)
}

impl Report {
    /// The section's markdown.
    pub fn markdown(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "### Devices (probe guest; net on a TAP in a namespace, both VMMs without vhost)\n"
        );
        let _ = writeln!(
            s,
            "| VMM | UDP guest→host, datagrams/s | Mbit/s | received by the host socket | UDP echo round trip host→guest→host, µs | blk 4 KiB IOPS, polled | blk 4 KiB IOPS, interrupts |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        let f = |v: &Option<Summary>, d: usize| v.map_or("–".to_string(), |x| x.fmt(d));
        for c in &self.cells {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                c.peer,
                f(&c.tx_pps, 0),
                f(&c.tx_mbit, 0),
                c.tx_delivered
                    .map_or("–".into(), |x| format!("{:.0}%", x.median * 100.0)),
                f(&c.echo_rtt, 0),
                f(&c.blk_polled, 0),
                f(&c.blk_irq, 0),
            );
        }
        let ember = self.cells.iter().find(|c| c.is_ember);
        let qemu = self.cells.iter().find(|c| !c.is_ember);
        if let (Some(e), Some(q)) = (ember, qemu) {
            let r = |a: &Option<Summary>, b: &Option<Summary>| match (a, b) {
                (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}×", a.median / b.median),
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "\nEmber ÷ QEMU (medians): UDP guest→host {}, echo round trip {} (lower is \
                 better), blk IOPS polled {}, with interrupts {}, Ember with interrupts ÷ QEMU \
                 polled {}. Per packet, \
                 guest→host: {:.1} µs in Ember, {:.1} µs in QEMU (1 / datagrams per second: the \
                 probe batches its ring and kicks once, the VMM writes each frame to the TAP). \
                 The guest→host rate is the guest's (every frame completed by the VMM); the host \
                 socket drops what it cannot queue.",
                r(&e.tx_pps, &q.tx_pps),
                r(&e.echo_rtt, &q.echo_rtt),
                r(&e.blk_polled, &q.blk_polled),
                r(&e.blk_irq, &q.blk_irq),
                r(&e.blk_irq, &q.blk_polled),
                e.tx_pps.map_or(0.0, |x| 1e6 / x.median),
                q.tx_pps.map_or(0.0, |x| 1e6 / x.median),
            );
        }
        if let Some((up, echo)) = &self.vsock {
            let _ = writeln!(
                s,
                "\nEmber's vsock (QEMU's needs vhost, absent here): 64 MiB guest→host {} MiB/s; \
                 64 MiB echoed host→guest→host at once {} MiB/s each way.",
                up.fmt(1),
                echo.fmt(1)
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n- {n}");
        }
        let _ = writeln!(s);
    }
}
