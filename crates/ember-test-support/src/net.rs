//! Network tests' plumbing: a network namespace with a TAP device whose addresses exist only
//! inside it, and the peer that talks to the probe's `net` check from there.
#![allow(
    clippy::cast_possible_truncation,
    reason = "test payload bytes are taken modulo 256"
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `socklen_t` of a socket option or address type (all far below 4 GiB).
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}

/// A network namespace with a TAP (192.0.2.1/24), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    /// Its name (`ip netns exec NAME ...`).
    pub name: String,
}

impl Netns {
    /// Creates it, or records a skip of `test` and returns `None` where `ip`, root (for
    /// network namespaces) or `/dev/net/tun` is missing; where they are present, a failing
    /// step panics.
    pub fn create(test: &str) -> Option<Netns> {
        Self::create_for(test, None)
    }

    /// As [`create`](Self::create), with the TAP owned by `owner` (a uid that may then attach
    /// to it without privileges) when given.
    pub fn create_for(test: &str, owner: Option<u32>) -> Option<Netns> {
        let ip_ok = Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ip_ok {
            crate::skip(test, "`ip` (iproute2) is not installed");
            return None;
        }
        // Unique per process and per namespace: tests of one process run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("embertest{}-{n}", std::process::id());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::skip(test, "not root: cannot create network namespaces");
            return None;
        }
        if !Path::new("/dev/net/tun").exists() {
            crate::skip(test, "no /dev/net/tun: cannot create TAP devices");
            return None;
        }
        // With root and /dev/net/tun present, every step must work: a failure fails the test.
        let run = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("run ip");
            assert!(
                out.status.success(),
                "ip {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["netns", "add", &name]);
        let ns = Netns { name };
        let n = ns.name.as_str();
        let owner = owner.map(|u| u.to_string());
        let mut add = vec![
            "netns", "exec", n, "ip", "tuntap", "add", "tap0", "mode", "tap",
        ];
        if let Some(u) = &owner {
            add.extend(["user", u.as_str()]);
        }
        run(&add);
        for args in [
            &[
                "netns",
                "exec",
                n,
                "ip",
                "addr",
                "add",
                "192.0.2.1/24",
                "dev",
                "tap0",
            ][..],
            &["netns", "exec", n, "ip", "link", "set", "tap0", "up"][..],
            &["netns", "exec", n, "ip", "link", "set", "lo", "up"][..],
        ] {
            run(args);
        }
        Some(ns)
    }

    /// Moves the calling thread into the namespace.
    pub fn enter(&self) {
        let path = std::ffi::CString::new(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: open(2) of a NUL-terminated path; the descriptor is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        assert!(
            fd >= 0,
            "open {path:?}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: setns(2) with a namespace descriptor we own; it changes only this
        // thread's network namespace.
        let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        assert_eq!(r, 0, "setns: {err}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The internet checksum.
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// One ICMP echo to 192.0.2.2 through a raw socket; whether the right reply came.
pub fn ping_once(seq: u16) -> bool {
    // SAFETY: socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return false;
    }
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO with a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            socklen::<libc::timeval>(),
        )
    };
    let payload = b"ember-probe-ping";
    let mut pkt = vec![
        8u8,
        0,
        0,
        0,
        0x12,
        0x34,
        seq.to_be_bytes()[0],
        seq.to_be_bytes()[1],
    ];
    pkt.extend_from_slice(payload);
    let c = inet_csum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([192, 0, 2, 2]),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto(2) of a live buffer to a sockaddr_in of the right size.
    let sent = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const addr).cast(),
            socklen::<libc::sockaddr_in>(),
        )
    };
    let mut ok = false;
    if usize::try_from(sent).ok() == Some(pkt.len()) {
        let mut buf = [0u8; 2048];
        for _ in 0..8 {
            // SAFETY: recv(2) into a live buffer of its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                break;
            }
            let r = &buf[..usize::try_from(n).unwrap_or(0)];
            let ihl = usize::from(r[0] & 15) * 4;
            let m = &r[ihl..];
            if m.len() >= 8 && m[0] == 0 && m[4..8] == pkt[4..8] && &m[8..] == payload {
                ok = inet_csum(m) == 0;
                break;
            }
        }
    }
    // SAFETY: closing the socket opened above.
    unsafe { libc::close(fd) };
    ok
}

/// What the peer in the namespace saw.
#[derive(Debug, Default)]
pub struct PeerResult {
    /// The hello datagram and where it came from.
    pub hello: Option<(String, std::net::SocketAddr)>,
    /// Flood datagrams received.
    pub flood_rx: u64,
    /// ICMP echo replies.
    pub pings: u32,
    /// UDP datagrams echoed back byte-exact.
    pub echoes: u32,
}

/// The peer: waits for the hello on 192.0.2.1:9000, counts the flood, pings the probe and
/// has it echo UDP datagrams.
pub fn net_peer(ns: &Netns, flood: u64) -> PeerResult {
    use std::net::UdpSocket;
    ns.enter();
    let mut r = PeerResult::default();
    let s = UdpSocket::bind("192.0.2.1:9000").expect("bind 192.0.2.1:9000");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 2048];
    let Ok((n, from)) = s.recv_from(&mut buf) else {
        return r;
    };
    r.hello = Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while r.flood_rx < flood && s.recv_from(&mut buf).is_ok() {
        r.flood_rx += 1;
    }
    r.pings = (0..3u16).map(|seq| u32::from(ping_once(seq))).sum();
    let u = UdpSocket::bind("192.0.2.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for size in [1usize, 100, 1400, 1472] {
        let msg: Vec<u8> = (0..size).map(|i| ((i * 7 + size) % 256) as u8).collect();
        u.send_to(&msg, "192.0.2.2:7").unwrap();
        if let Ok((n, from)) = u.recv_from(&mut buf) {
            if &buf[..n] == msg.as_slice() && from.to_string() == "192.0.2.2:7" {
                r.echoes += 1;
            }
        }
    }
    r
}
