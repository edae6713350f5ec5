//! The `api` section: Firecracker-mode start-up, Ember beside Firecracker (`FIRECRACKER=`).
//!
//! - exec → the API socket accepts a connection (polled every 20 µs);
//! - exec → `InstanceStart` answered, and exec → the null guest's first console line, with the
//!   microVM configured over the API (`PUT /boot-source`, `PUT /machine-config`, then
//!   `PUT /actions`), as an SDK does it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::peers::{Kind, Peer};
use super::stats::Summary;

/// One VMM's figures, ms.
pub struct Cell {
    /// The VMM.
    pub peer: String,
    /// exec → socket accepting.
    pub socket: Option<Summary>,
    /// exec → InstanceStart answered.
    pub started: Option<Summary>,
    /// exec → first guest console line.
    pub first_line: Option<Summary>,
    /// Why a cell is empty.
    pub error: Option<String>,
}

/// One request on a new connection; its status.
pub(super) fn request(sock: &Path, method: &str, path: &str, body: &str) -> Result<u16, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))
}

fn spawn(peer: &Peer, sock: &Path) -> Result<std::process::Child, String> {
    let mut c = Command::new(&peer.bin);
    c.arg("--api-sock").arg(sock).args(["--level", "Error"]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", peer.bin.display()))
}

/// Polls until `sock` accepts; ms since `t0`.
pub(super) fn wait_socket(sock: &Path, t0: Instant) -> Result<f64, String> {
    loop {
        if UnixStream::connect(sock).is_ok() {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        if t0.elapsed() > Duration::from_secs(5) {
            return Err("the API socket never accepted".into());
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// One run: (socket ms, started ms, first line ms).
fn one(peer: &Peer, kernel: &Path, scratch: &Path) -> Result<(f64, f64, f64), String> {
    let sock = scratch.join(format!("bench-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut child = spawn(peer, &sock)?;
    let result = (|| {
        let socket = wait_socket(&sock, t0)?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(_)) = lines.next() {
                let _ = tx.send(Instant::now());
            }
            for _ in lines {}
        });
        let boot = format!(
            r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1"}}"#,
            kernel.display()
        );
        for (m, p, b) in [
            ("PUT", "/boot-source", boot.as_str()),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":128}"#,
            ),
            ("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        ] {
            let st = request(&sock, m, p, b)?;
            if st != 204 {
                return Err(format!("{m} {p}: {st}"));
            }
        }
        let started = t0.elapsed().as_secs_f64() * 1e3;
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "no console line".to_string())?;
        Ok((socket, started, line.duration_since(t0).as_secs_f64() * 1e3))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    result
}

/// Runs the section.
pub fn run(peers: &[Peer], kernel: &Path, scratch: &Path, runs: usize) -> Vec<Cell> {
    let mut cells = Vec::new();
    for p in peers
        .iter()
        .filter(|p| matches!(p.kind, Kind::Ember | Kind::Firecracker))
    {
        eprintln!("xtask bench: API start-up, {} ({runs} runs)", p.name);
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        let mut error = None;
        for _ in 0..runs {
            match one(p, kernel, scratch) {
                Ok((x, y, z)) => {
                    a.push(x);
                    b.push(y);
                    c.push(z);
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        cells.push(Cell {
            peer: p.name.clone(),
            socket: Summary::of(&a),
            started: Summary::of(&b),
            first_line: Summary::of(&c),
            error,
        });
    }
    cells
}

/// The section's markdown.
pub fn markdown(cells: &[Cell], s: &mut String) {
    use std::fmt::Write as _;
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "### Firecracker-mode start-up (null guest configured over the API, 128 MiB, 1 vCPU)\n"
    );
    let _ = writeln!(
        s,
        "| VMM | exec → API socket accepting, ms | exec → InstanceStart answered, ms | exec → first console line, ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    let f = |v: &Option<Summary>| v.map_or("–".to_string(), |x| x.fmt(2));
    for c in cells {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |{}",
            c.peer,
            f(&c.socket),
            f(&c.started),
            f(&c.first_line),
            c.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"))
        );
    }
    if let (Some(e), Some(fc)) = (cells.first(), cells.get(1)) {
        let r = |a: &Option<Summary>, b: &Option<Summary>| match (a, b) {
            (Some(a), Some(b)) if b.median > 0.0 => format!("{:.2}×", a.median / b.median),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "\nEmber ÷ {} (medians): socket {}, InstanceStart {}, first line {}.",
            fc.peer,
            r(&e.socket, &fc.socket),
            r(&e.started, &fc.started),
            r(&e.first_line, &fc.first_line)
        );
    }
    let _ = writeln!(s);
}
