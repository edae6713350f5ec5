//! The host side of virtio-vsock: Firecracker's hybrid vsock over Unix sockets.
//!
//! * A host program connects to the listening socket (`uds_path`) and writes
//!   `CONNECT <port>\n`; the muxer sends the guest a connection `REQUEST` to `<port>` from a
//!   fresh host port, and when the guest accepts, answers `OK <host port>\n` and relays bytes.
//! * A guest connecting to host port P makes the muxer connect to the Unix socket
//!   `<uds_path>_P` (refused: the guest gets `RST`).
//!
//! Flow control is virtio-vsock's credit: the muxer advertises [`CONN_BUF_SIZE`] bytes of
//! receive buffer per connection and never holds more than that of guest data a host peer has
//! not read yet (a guest that sends beyond its credit is reset), and it reads from a host peer
//! only as much as the guest has credit for. Nothing else grows: at most [`MAX_CONNECTIONS`]
//! connections, [`MAX_PENDING_ACCEPTS`] host sockets that have not sent their `CONNECT` line yet,
//! [`MAX_PENDING_RESETS`] resets for unknown connections.
//!
//! Every error path resets the connection: the guest gets `RST`, the host peer's socket is
//! closed. A connection the guest has not answered in [`CONNECT_TIMEOUT`], a `CONNECT` line not
//! received in as long, and a closing connection whose host peer does not take the last bytes
//! in as long, are reset too.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};
use super::{Counters, VsockError};

/// Receive buffer the muxer advertises per connection (and the most guest data it holds for a
/// host peer that does not read).
pub const CONN_BUF_SIZE: u32 = 256 << 10;
/// Most connections at once (both directions).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most accepted host sockets waiting for their `CONNECT` line.
pub const MAX_PENDING_ACCEPTS: usize = 64;
/// Most queued resets for packets of unknown connections.
pub const MAX_PENDING_RESETS: usize = 1024;
/// How long a handshake or a closing connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// First host port given to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Host events handled per call.
const EVENTS_PER_CALL: usize = 64;
/// Epoll token of the listener.
const LISTENER: u64 = 0;

const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_SHUTDOWN: u8 = 4;
const PENDING_CREDIT: u8 = 8;
const PENDING_RST: u8 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's `RESPONSE`.
    Connecting,
    Established,
    /// The guest shut both directions; the last guest bytes are being flushed to the host.
    Closing,
}

/// (host port, guest port).
type Key = (u32, u32);

struct Conn {
    stream: Option<UnixStream>,
    token: u64,
    state: State,
    since: Instant,
    /// Bytes received from the host before the connection was up (after the CONNECT line).
    early: Vec<u8>,
    /// The host peer may have data (an edge was seen and no `WouldBlock` since).
    host_readable: bool,
    /// The host peer will send no more (we told, or will tell, the guest).
    host_eof: bool,
    guest_rcv_shut: bool,
    guest_send_shut: bool,
    /// Host -> guest bytes sent, and the guest's credit information.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest -> host bytes not yet taken by the host peer.
    pending_tx: Vec<u8>,
    pending_tx_at: usize,
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    pending: u8,
    queued: bool,
    /// The guest already reset the connection: when the last bytes are flushed it goes
    /// without an `RST` back.
    guest_reset: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State, pending: u8) -> Self {
        Conn {
            stream: Some(stream),
            token,
            state,
            since: Instant::now(),
            early: Vec::new(),
            host_readable: true,
            host_eof: false,
            guest_rcv_shut: false,
            guest_send_shut: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            pending_tx: Vec::new(),
            pending_tx_at: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            pending,
            queued: false,
            guest_reset: false,
        }
    }

    /// Bytes the guest can take from us now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn unflushed(&self) -> usize {
        self.pending_tx.len() - self.pending_tx_at
    }

    /// Whether the connection has a packet for the guest.
    fn has_rx(&self) -> bool {
        if self.guest_reset {
            return false;
        }
        self.pending != 0
            || (self.state == State::Established
                && !self.guest_rcv_shut
                && !self.host_eof
                && (self.host_readable || !self.early.is_empty())
                && self.peer_credit() > 0)
    }
}

struct PendingAccept {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

enum Token {
    Conn(Key),
    Accept,
}

/// The host side of a vsock device (see the [module docs](self)).
pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Token>,
    accepts: HashMap<u64, PendingAccept>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with something for the guest, in turn.
    rx_queue: VecDeque<Key>,
    /// Resets owed for packets of unknown connections: (guest port, host port).
    resets: VecDeque<Header>,
}

/// Sends without blocking and without `SIGPIPE`.
fn send(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for `data.len()` bytes of reads; `stream` is an open socket.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Connects to a Unix socket without blocking (a full backlog is an error, not a wait).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "AF_UNIX (1) fits sa_family_t; sockaddr_un (110 bytes) fits socklen_t; path bytes are copied into c_char as they are"
)]
fn connect(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket() just returned this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Binds the listening socket, replacing a stale one (a socket nobody listens on) but never
/// anything else.
fn bind(path: &Path) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => return Err(VsockError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Muxer {
    pub(super) fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let listener = bind(uds_path)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            accepts: HashMap::new(),
            next_token: 1,
            next_local_port: FIRST_LOCAL_PORT,
            rx_queue: VecDeque::new(),
            resets: VecDeque::new(),
        })
    }

    pub(super) fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub(super) fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether a timed handshake or close is under way (the device then runs its sweep timer).
    pub(super) fn needs_sweep(&self) -> bool {
        !self.accepts.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.state != State::Established && c.stream.is_some())
    }

    fn register(&mut self, fd: RawFd, token: Token) -> io::Result<u64> {
        let t = self.next_token;
        self.next_token += 1;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(stream_events(), t),
        )?;
        self.tokens.insert(t, token);
        Ok(t)
    }

    fn unregister(&mut self, token: u64, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.tokens.remove(&token);
    }

    fn queue(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.queued && c.has_rx() {
                c.queued = true;
                self.rx_queue.push_back(key);
            }
        }
    }

    /// Closes the host side now and owes the guest an `RST` (the entry goes once it is sent).
    fn reset(&mut self, key: Key, c: &Counters) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.pending = PENDING_RST;
        conn.pending_tx = Vec::new();
        conn.pending_tx_at = 0;
        let token = conn.token;
        if let Some(stream) = conn.stream.take() {
            self.unregister(token, stream.as_raw_fd());
            Counters::add(&c.connections_closed, 1);
        }
        self.queue(key);
    }

    /// Removes a connection without telling the guest (it reset, or was told).
    fn remove(&mut self, key: Key, c: &Counters) {
        if let Some(mut conn) = self.conns.remove(&key) {
            if let Some(stream) = conn.stream.take() {
                self.unregister(conn.token, stream.as_raw_fd());
                Counters::add(&c.connections_closed, 1);
            }
        }
    }

    fn owe_reset(&mut self, to: &Header, c: &Counters) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            Counters::add(&c.dropped_packets, 1);
            return;
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        });
    }

    /// Host events: accepts, `CONNECT` lines, readable and writable peers.
    pub(super) fn process_events(&mut self, c: &Counters) {
        let mut events = [EpollEvent::default(); EVENTS_PER_CALL];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(_) => return,
        };
        for e in &events[..n] {
            let token = e.data();
            let set = e.event_set();
            if token == LISTENER {
                self.accept(c);
                continue;
            }
            match self.tokens.get(&token) {
                Some(Token::Accept) => self.read_connect_line(token, c),
                Some(Token::Conn(key)) => {
                    let key = *key;
                    if set.intersects(
                        EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                    ) {
                        if let Some(conn) = self.conns.get_mut(&key) {
                            conn.host_readable = true;
                        }
                    }
                    if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                        self.flush(key, c);
                    }
                    self.queue(key);
                }
                None => {}
            }
        }
    }

    fn accept(&mut self, c: &Counters) {
        for _ in 0..EVENTS_PER_CALL {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(_) => return,
            };
            if self.accepts.len() >= MAX_PENDING_ACCEPTS
                || self.conns.len() >= MAX_CONNECTIONS
                || stream.set_nonblocking(true).is_err()
            {
                Counters::add(&c.refused_host_connections, 1);
                continue;
            }
            let Ok(token) = self.register(stream.as_raw_fd(), Token::Accept) else {
                Counters::add(&c.refused_host_connections, 1);
                continue;
            };
            self.accepts.insert(
                token,
                PendingAccept {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
            // Data may already be there (edge-triggered: read now).
            self.read_connect_line(token, c);
        }
    }

    fn read_connect_line(&mut self, token: u64, c: &Counters) {
        let Some(pa) = self.accepts.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - pa.line.len();
        let done = match (&pa.stream).read(&mut buf[..room]) {
            Ok(0) => Some(None),
            Ok(n) => {
                pa.line.extend_from_slice(&buf[..n]);
                match pa.line.iter().position(|&b| b == b'\n') {
                    Some(nl) => Some(Some(nl)),
                    None if pa.line.len() >= MAX_CONNECT_LINE => Some(None),
                    None => None,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(_) => Some(None),
        };
        let Some(line_end) = done else {
            return;
        };
        let Some(pa) = self.accepts.remove(&token) else {
            return;
        };
        self.unregister(token, pa.stream.as_raw_fd());
        let port = line_end.and_then(|nl| super::packet::parse_connect(&pa.line[..=nl]));
        let (Some(port), Some(nl)) = (port, line_end) else {
            Counters::add(&c.refused_host_connections, 1);
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            Counters::add(&c.refused_host_connections, 1);
            return;
        }
        let Some(local) = self.allocate_local_port(port) else {
            Counters::add(&c.refused_host_connections, 1);
            return;
        };
        let key = (local, port);
        let Ok(token) = self.register(pa.stream.as_raw_fd(), Token::Conn(key)) else {
            Counters::add(&c.refused_host_connections, 1);
            return;
        };
        let mut conn = Conn::new(pa.stream, token, State::Connecting, PENDING_REQUEST);
        conn.early = pa.line[nl + 1..].to_vec();
        self.conns.insert(key, conn);
        Counters::add(&c.connections_opened, 1);
        self.queue(key);
    }

    fn allocate_local_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return Some(p);
            }
        }
        None
    }

    /// Writes what the host peer can take of the guest's bytes.
    fn flush(&mut self, key: Key, c: &Counters) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(stream) = conn.stream.as_ref() else {
            return;
        };
        let mut failed = false;
        while conn.pending_tx_at < conn.pending_tx.len() {
            match send(stream, &conn.pending_tx[conn.pending_tx_at..]) {
                Ok(n) => {
                    conn.pending_tx_at += n;
                    // n <= CONN_BUF_SIZE.
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let mut closed = false;
        if !failed && conn.pending_tx_at == conn.pending_tx.len() {
            conn.pending_tx.clear();
            conn.pending_tx_at = 0;
            if conn.pending_tx.capacity() > 64 << 10 {
                conn.pending_tx.shrink_to(0);
            }
            if conn.guest_send_shut {
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
            closed = conn.state == State::Closing;
        }
        // Tell the guest about the room it has again once a quarter of the buffer freed up.
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= CONN_BUF_SIZE / 4 {
            conn.pending |= PENDING_CREDIT;
        }
        let guest_reset = conn.guest_reset;
        if failed {
            Counters::add(&c.host_errors, 1);
            if guest_reset {
                self.remove(key, c);
            } else {
                self.reset(key, c);
            }
        } else if closed && guest_reset {
            self.remove(key, c);
        } else if closed {
            self.reset(key, c);
        } else {
            self.queue(key);
        }
    }

    /// A packet from the guest (header checked to be complete; `payload` has at most
    /// `hdr.len` bytes).
    pub(super) fn guest_packet(&mut self, hdr: &Header, payload: &[u8], c: &Counters) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            Counters::add(&c.dropped_packets, 1);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.kind != TYPE_STREAM {
            Counters::add(&c.dropped_packets, 1);
            if hdr.op != op::RST {
                if self.conns.contains_key(&key) {
                    self.reset(key, c);
                } else {
                    self.owe_reset(hdr, c);
                }
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match hdr.op {
                op::REQUEST => self.guest_connect(hdr, key, c),
                op::RST => {}
                _ => self.owe_reset(hdr, c),
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.pending & PENDING_RST != 0 {
            // Already being reset: only the guest's own RST matters.
            if hdr.op == op::RST {
                self.remove(key, c);
            }
            return;
        }
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            op::RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                let sent = conn.stream.as_ref().map(|s| send(s, ok.as_bytes()));
                if !matches!(sent, Some(Ok(n)) if n == ok.len()) {
                    Counters::add(&c.host_errors, 1);
                    self.reset(key, c);
                    return;
                }
            }
            op::RW if conn.state == State::Established && !conn.guest_send_shut => {
                if conn.unflushed() + payload.len() > CONN_BUF_SIZE as usize {
                    Counters::add(&c.credit_violations, 1);
                    self.reset(key, c);
                    return;
                }
                conn.pending_tx.extend_from_slice(payload);
                Counters::add(&c.tx_bytes, payload.len() as u64);
                self.flush(key, c);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => conn.pending |= PENDING_CREDIT,
            op::SHUTDOWN => {
                if hdr.flags & shutdown::RCV != 0 {
                    conn.guest_rcv_shut = true;
                }
                if hdr.flags & shutdown::SEND != 0 {
                    conn.guest_send_shut = true;
                }
                if conn.guest_rcv_shut && conn.guest_send_shut {
                    conn.state = State::Closing;
                    conn.since = Instant::now();
                }
                self.flush(key, c);
            }
            op::RST => {
                // Bytes the guest sent before its reset still reach the host peer (a guest
                // agent that writes its answer and closes abruptly loses nothing); then the
                // connection goes, without an answer.
                if conn.unflushed() > 0 && conn.stream.is_some() {
                    conn.guest_reset = true;
                    conn.guest_send_shut = true;
                    conn.guest_rcv_shut = true;
                    conn.state = State::Closing;
                    conn.since = Instant::now();
                    self.flush(key, c);
                } else {
                    self.remove(key, c);
                }
                return;
            }
            _ => {
                Counters::add(&c.dropped_packets, 1);
                self.reset(key, c);
                return;
            }
        }
        self.queue(key);
    }

    fn guest_connect(&mut self, hdr: &Header, key: Key, c: &Counters) {
        if self.conns.len() >= MAX_CONNECTIONS {
            Counters::add(&c.refused_guest_connections, 1);
            self.owe_reset(hdr, c);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect(Path::new(&path)) {
            Ok(s) => s,
            Err(_) => {
                Counters::add(&c.refused_guest_connections, 1);
                self.owe_reset(hdr, c);
                return;
            }
        };
        let Ok(token) = self.register(stream.as_raw_fd(), Token::Conn(key)) else {
            Counters::add(&c.refused_guest_connections, 1);
            self.owe_reset(hdr, c);
            return;
        };
        let mut conn = Conn::new(stream, token, State::Established, PENDING_RESPONSE);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        self.conns.insert(key, conn);
        Counters::add(&c.connections_opened, 1);
        self.queue(key);
    }

    /// Whether a packet for the guest is waiting.
    pub(super) fn has_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_queue.is_empty()
    }

    /// Writes the next packet for the guest into `buf` (header, then at most
    /// `buf.len() - HDR_LEN` bytes of payload) and returns its length; `None` when there is
    /// none. `buf` holds at least [`HDR_LEN`] bytes.
    pub(super) fn next_rx(&mut self, buf: &mut [u8], c: &Counters) -> Option<usize> {
        if let Some(h) = self.resets.pop_front() {
            buf[..HDR_LEN].copy_from_slice(&h.encode());
            Counters::add(&c.resets_sent, 1);
            return Some(HDR_LEN);
        }
        while let Some(key) = self.rx_queue.pop_front() {
            if let Some(len) = self.conn_rx(key, buf, c) {
                return Some(len);
            }
        }
        None
    }

    fn conn_rx(&mut self, key: Key, buf: &mut [u8], c: &Counters) -> Option<usize> {
        let guest_cid = self.guest_cid;
        let conn = self.conns.get_mut(&key)?;
        conn.queued = false;
        let mut h = Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.0,
            dst_port: key.1,
            kind: TYPE_STREAM,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: conn.fwd_cnt,
            ..Header::default()
        };
        let mut len = HDR_LEN;
        if conn.pending & PENDING_RST != 0 {
            h.op = op::RST;
            buf[..HDR_LEN].copy_from_slice(&h.encode());
            Counters::add(&c.resets_sent, 1);
            self.remove(key, c);
            return Some(HDR_LEN);
        } else if conn.pending & PENDING_REQUEST != 0 {
            conn.pending &= !PENDING_REQUEST;
            h.op = op::REQUEST;
        } else if conn.pending & PENDING_RESPONSE != 0 {
            conn.pending &= !PENDING_RESPONSE;
            h.op = op::RESPONSE;
        } else if conn.pending & PENDING_SHUTDOWN != 0 {
            conn.pending &= !PENDING_SHUTDOWN;
            h.op = op::SHUTDOWN;
            h.flags = shutdown::SEND;
        } else if conn.pending & PENDING_CREDIT != 0 {
            conn.pending &= !PENDING_CREDIT;
            h.op = op::CREDIT_UPDATE;
        } else if conn.has_rx() {
            let room = (buf.len() - HDR_LEN)
                .min(MAX_PAYLOAD)
                .min(conn.peer_credit() as usize);
            let n = if !conn.early.is_empty() {
                let n = room.min(conn.early.len());
                buf[HDR_LEN..HDR_LEN + n].copy_from_slice(&conn.early[..n]);
                conn.early.drain(..n);
                n
            } else {
                let stream = conn.stream.as_ref()?;
                match (&*stream).read(&mut buf[HDR_LEN..HDR_LEN + room]) {
                    Ok(0) => {
                        conn.host_eof = true;
                        conn.pending |= PENDING_SHUTDOWN;
                        0
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.host_readable = false;
                        0
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(_) => {
                        Counters::add(&c.host_errors, 1);
                        self.reset(key, c);
                        return self.conn_rx(key, buf, c);
                    }
                }
            };
            if n == 0 {
                // Nothing to send after all (or a SHUTDOWN now owed): look again.
                self.queue(key);
                return None;
            }
            h.op = op::RW;
            // n <= MAX_PAYLOAD.
            h.len = u32::try_from(n).unwrap_or(0);
            conn.rx_cnt = conn.rx_cnt.wrapping_add(h.len);
            Counters::add(&c.rx_bytes, n as u64);
            len += n;
        } else {
            return None;
        }
        conn.fwd_cnt_sent = conn.fwd_cnt;
        buf[..HDR_LEN].copy_from_slice(&h.encode());
        self.queue(key);
        Some(len)
    }

    /// Resets handshakes and closes that took longer than [`CONNECT_TIMEOUT`].
    pub(super) fn sweep(&mut self, c: &Counters) {
        let now = Instant::now();
        let stale: Vec<u64> = self
            .accepts
            .iter()
            .filter(|(_, a)| now.duration_since(a.since) >= CONNECT_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            if let Some(pa) = self.accepts.remove(&t) {
                self.unregister(t, pa.stream.as_raw_fd());
                Counters::add(&c.refused_host_connections, 1);
            }
        }
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, conn)| {
                conn.state != State::Established
                    && conn.stream.is_some()
                    && now.duration_since(conn.since) >= CONNECT_TIMEOUT
            })
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            Counters::add(&c.timeouts, 1);
            if self.conns.get(&key).is_some_and(|c| c.guest_reset) {
                self.remove(key, c);
            } else {
                self.reset(key, c);
            }
        }
    }

    /// Drops every connection (device reset, or a restored VM: the guest gets a transport
    /// reset event instead).
    pub(super) fn clear(&mut self, c: &Counters) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k, c);
        }
        let tokens: Vec<u64> = self.accepts.keys().copied().collect();
        for t in tokens {
            if let Some(pa) = self.accepts.remove(&t) {
                self.unregister(t, pa.stream.as_raw_fd());
            }
        }
        self.rx_queue.clear();
        self.resets.clear();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
