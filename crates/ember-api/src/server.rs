//! The HTTP/1.1 server on a Unix socket (hyper, on a thread of its own with a single-threaded
//! tokio runtime). It parses requests ([`crate::parse`]) and hands each one to the VMM as an
//! [`ApiCall`], then answers with what the VMM replies. A request the server can refuse by
//! itself (bad path, bad JSON, too large, too slow) is answered at once, and never reaches
//! the VMM.

use std::convert::Infallible;
use std::io;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::request::{parse, ApiRequest, ApiResponse};

/// Firecracker's default `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;

/// Server limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest request body accepted, bytes.
    pub max_payload: usize,
    /// Time a client has to send a request's headers.
    pub header_timeout: Duration,
    /// Most headers in a request.
    pub max_headers: usize,
    /// Time the VMM has to answer before the client gets a 500.
    pub reply_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: DEFAULT_MAX_PAYLOAD,
            header_timeout: Duration::from_secs(5),
            max_headers: 64,
            reply_timeout: Duration::from_secs(60),
        }
    }
}

/// A parsed request waiting for the VMM's answer.
#[derive(Debug)]
pub struct ApiCall {
    /// The request.
    pub request: ApiRequest,
    reply: tokio::sync::oneshot::Sender<ApiResponse>,
}

impl ApiCall {
    /// Answers the request.
    pub fn reply(self, response: ApiResponse) {
        // The client may have gone; nothing to do then.
        let _ = self.reply.send(response);
    }
}

/// What the server did, readable from any thread.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Requests received (answered or not).
    pub requests: AtomicU64,
    /// Requests refused by the server itself (400/413/408).
    pub refused: AtomicU64,
    /// Requests whose answer could not be sent (the client went away) or came too late.
    pub sync_response_fails: AtomicU64,
    /// Requests the VMM did not answer in time.
    pub sync_vmm_send_timeout_count: AtomicU64,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Another process listens on the socket path.
    #[error("{} is in use: another process listens on it", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Binding or starting failed.
    #[error("cannot serve the API on {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A bound API socket, not yet serving.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    listener: StdUnixListener,
    counters: Arc<ServerCounters>,
    pending: Arc<Pending>,
    serving: Arc<std::sync::atomic::AtomicBool>,
    ticks: Option<tokio::sync::mpsc::UnboundedReceiver<std::sync::mpsc::Sender<()>>>,
    tick_sender: tokio::sync::mpsc::UnboundedSender<std::sync::mpsc::Sender<()>>,
}

/// Waits for the server to have written every answer it holds: what a VMM calls before its
/// process exits, so that a client whose request ended the VM (an `InstanceStart` of a guest
/// that stops at once, a `SendCtrlAltDel`) still gets its answer rather than a closed
/// connection. From [`ApiServer::drain_handle`].
#[derive(Clone, Debug)]
pub struct DrainHandle {
    pending: Arc<Pending>,
    serving: Arc<std::sync::atomic::AtomicBool>,
    ticks: tokio::sync::mpsc::UnboundedSender<std::sync::mpsc::Sender<()>>,
}

impl DrainHandle {
    /// Waits, up to `timeout`, until no answer is held (every request received has been
    /// answered and its answer's body handed to the connection) and the server thread has
    /// finished the work it was doing then (writing those answers to their sockets). Returns
    /// whether it got there in time; `true` at once for a server that is not running.
    pub fn wait(&self, timeout: Duration) -> bool {
        if !self.serving.load(Ordering::SeqCst) {
            return true;
        }
        let deadline = std::time::Instant::now() + timeout;
        // A condition variable (futex), not a sleep loop: the exiting thread's seccomp filter
        // (Ember's, or a Firecracker filter given with --seccomp-filter) need not allow
        // nanosleep.
        let held = self
            .pending
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (held, _) = self
            .pending
            .zero
            .wait_timeout_while(held, timeout, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *held > 0 {
            return false;
        }
        drop(held);
        // A task of the server's (single-threaded) runtime runs only after the connection
        // task that dropped the last answer's body has returned from that poll, in which it
        // writes the answer out.
        let (tx, rx) = std::sync::mpsc::channel();
        if self.ticks.send(tx).is_err() {
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        !matches!(
            rx.recv_timeout(left),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        )
    }
}

/// How many answers the server holds, and a condition variable for when it is none.
#[derive(Debug, Default)]
struct Pending {
    count: std::sync::Mutex<u64>,
    zero: std::sync::Condvar,
}

/// One answer the server holds (counted in [`Pending`] while it lives).
struct Held(Arc<Pending>);

impl Held {
    fn new(pending: &Arc<Pending>) -> Self {
        *pending
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        Held(pending.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut n = self
            .0
            .count
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.zero.notify_all();
        }
    }
}

/// A response body that counts as held by the server until hyper drops it (when it has
/// taken all of it to write).
struct HeldBody {
    inner: Full<Bytes>,
    _held: Option<Held>,
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl ApiServer {
    /// Binds the socket at `path` (a stale socket there, which nobody listens on, is replaced;
    /// anything else is refused). Clients can connect as soon as this returns.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        use std::os::unix::fs::FileTypeExt;
        let io_err = |source| ServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServerError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = StdUnixListener::bind(path).map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let (tick_sender, ticks) = tokio::sync::mpsc::unbounded_channel();
        Ok(ApiServer {
            path: path.to_path_buf(),
            listener,
            counters: Arc::new(ServerCounters::default()),
            pending: Arc::new(Pending::default()),
            serving: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            ticks: Some(ticks),
            tick_sender,
        })
    }

    /// A handle to wait, before the process exits, for the answers the server still holds.
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle {
            pending: self.pending.clone(),
            serving: self.serving.clone(),
            ticks: self.tick_sender.clone(),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The server's counters.
    pub fn counters(&self) -> Arc<ServerCounters> {
        self.counters.clone()
    }

    /// Serves on a new thread (`fc_api`): every parsed request goes to `deliver`, which must
    /// answer it (now or later, from any thread) with [`ApiCall::reply`].
    pub fn spawn(
        self,
        config: ServerConfig,
        deliver: impl Fn(ApiCall) + Send + Sync + 'static,
    ) -> Result<std::thread::JoinHandle<()>, ServerError> {
        self.spawn_with(config, || Ok(()), deliver)
    }

    /// As [`spawn`](Self::spawn), with `on_start` run first on the new thread, before it
    /// accepts a connection (where a VMM installs the API thread's seccomp filter). If it
    /// fails, the thread logs the error and ends without serving.
    pub fn spawn_with(
        self,
        config: ServerConfig,
        on_start: impl FnOnce() -> Result<(), String> + Send + 'static,
        deliver: impl Fn(ApiCall) + Send + Sync + 'static,
    ) -> Result<std::thread::JoinHandle<()>, ServerError> {
        let path = self.path.clone();
        std::thread::Builder::new()
            .name("fc_api".into())
            .spawn(move || match on_start() {
                Ok(()) => self.run(config, Arc::new(deliver)),
                Err(e) => log::error!("API server: not serving: {e}"),
            })
            .map_err(|source| ServerError::Io { path, source })
    }

    fn run(mut self, config: ServerConfig, deliver: Arc<dyn Fn(ApiCall) + Send + Sync>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("API server: cannot start its runtime: {e}");
                return;
            }
        };
        let counters = self.counters.clone();
        let pending = self.pending.clone();
        let ticks = self.ticks.take();
        drop(self.tick_sender);
        self.serving.store(true, Ordering::SeqCst);
        rt.block_on(async move {
            if let Some(mut ticks) = ticks {
                tokio::spawn(async move {
                    while let Some(done) = ticks.recv().await {
                        let _ = done.send(());
                    }
                });
            }
            let listener = match tokio::net::UnixListener::from_std(self.listener) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("API server: {e}");
                    return;
                }
            };
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        log::warn!("API server: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let deliver = deliver.clone();
                let counters = counters.clone();
                let pending = pending.clone();
                tokio::spawn(serve_connection(stream, config, deliver, counters, pending));
            }
        });
    }
}

async fn serve_connection(
    stream: tokio::net::UnixStream,
    config: ServerConfig,
    deliver: Arc<dyn Fn(ApiCall) + Send + Sync>,
    counters: Arc<ServerCounters>,
    pending: Arc<Pending>,
) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let deliver = deliver.clone();
        let counters = counters.clone();
        let pending = pending.clone();
        async move {
            let (response, held) = handle(req, config, &*deliver, &counters, &pending).await;
            let (parts, inner) = response.into_parts();
            let body = HeldBody { inner, _held: held };
            Ok::<_, Infallible>(Response::from_parts(parts, body))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_headers(config.max_headers);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        log::debug!("API connection ended: {e}");
    }
}

fn respond(r: ApiResponse) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(r.status)
        .header("Server", "Ember API");
    let body = match r.body {
        Some(body) => {
            b = b.header("Content-Type", "application/json");
            Bytes::from(body)
        }
        None => Bytes::new(),
    };
    b.body(Full::new(body)).unwrap_or_else(|_| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// The answer to `req`, and, for a request the VMM saw, what holds it until written (held from
/// before the VMM sees the request until hyper has the whole answer).
async fn handle(
    req: Request<Incoming>,
    config: ServerConfig,
    deliver: &(dyn Fn(ApiCall) + Send + Sync),
    counters: &ServerCounters,
    pending: &Arc<Pending>,
) -> (Response<Full<Bytes>>, Option<Held>) {
    let answer = refuse_or_deliver(req, config, deliver, counters, pending).await;
    match answer {
        Ok((rx, held)) => (await_reply(rx, config, counters).await, Some(held)),
        Err(refused) => (*refused, None),
    }
}

/// A request the server answers by itself (`Err`), or the one delivered to the VMM: the
/// channel of its answer and what holds it.
async fn refuse_or_deliver(
    req: Request<Incoming>,
    config: ServerConfig,
    deliver: &(dyn Fn(ApiCall) + Send + Sync),
    counters: &ServerCounters,
    pending: &Arc<Pending>,
) -> Result<(tokio::sync::oneshot::Receiver<ApiResponse>, Held), Box<Response<Full<Bytes>>>> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let refuse = |r: ApiResponse| {
        counters.refused.fetch_add(1, Ordering::Relaxed);
        Err(Box::new(respond(r)))
    };
    let method = req.method().as_str().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let too_large = |size: String| {
        ApiResponse::bad_request(format!(
            "Request payload with size {size} is larger than the limit of {} allowed by server.",
            config.max_payload
        ))
    };
    if let Some(len) = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > config.max_payload as u64 {
            return refuse(too_large(len.to_string()));
        }
    }
    let body = match Limited::new(req.into_body(), config.max_payload)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return refuse(too_large(format!("over {}", config.max_payload)));
            }
            return refuse(ApiResponse::bad_request(format!(
                "cannot read the request body: {e}"
            )));
        }
    };
    let request = match parse(&method, &path, &body) {
        Ok(r) => r,
        Err(e) => return refuse(e.into()),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let held = Held::new(pending);
    deliver(ApiCall { request, reply: tx });
    Ok((rx, held))
}

/// The VMM's answer, or a 500 if it dropped the request or did not answer in time.
async fn await_reply(
    rx: tokio::sync::oneshot::Receiver<ApiResponse>,
    config: ServerConfig,
    counters: &ServerCounters,
) -> Response<Full<Bytes>> {
    match tokio::time::timeout(config.reply_timeout, rx).await {
        Ok(Ok(r)) => respond(r),
        Ok(Err(_)) => {
            counters.sync_response_fails.fetch_add(1, Ordering::Relaxed);
            respond(ApiResponse::error(500, "The VMM dropped the request."))
        }
        Err(_) => {
            counters
                .sync_vmm_send_timeout_count
                .fetch_add(1, Ordering::Relaxed);
            respond(ApiResponse::error(500, "The VMM did not answer in time."))
        }
    }
}
