//! `ember` in Firecracker mode: Firecracker's command line, config file and REST API (see
//! docs/api.md). The quick-boot form (`--kernel`, `--config`) is the other mode.

mod controller;
mod cpu_config;
mod logger;
mod metrics;
mod resources;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ember_api::model::{FullVmConfiguration, LogLevel, Logger, Metrics};
use ember_api::{ApiServer, ServerConfig};

pub use controller::FIRECRACKER_VERSION;
use controller::{Controller, Event, Settings};

/// Firecracker's flags, as `ember` takes them.
#[derive(Debug, Default)]
pub struct FcArgs {
    pub api_sock: PathBuf,
    pub id: String,
    pub config_file: Option<PathBuf>,
    pub no_api: bool,
    pub level: Option<LogLevel>,
    pub log_path: Option<String>,
    pub show_level: bool,
    pub show_log_origin: bool,
    pub module: Option<String>,
    pub metrics_path: Option<String>,
    pub boot_timer: bool,
    pub http_api_max_payload_size: usize,
    pub start_time_us: Option<u64>,
    pub start_time_cpu_us: Option<u64>,
    pub parent_cpu_time_us: Option<u64>,
    pub seccomp: ember_bin::seccomp::Setup,
    /// `--fork-socket`.
    pub fork_socket: Option<PathBuf>,
}

/// Removes a socket file when the VMM ends.
struct RemoveOnDrop<'a>(&'a std::path::Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Most bytes of a config file.
const MAX_CONFIG_FILE: u64 = 1 << 20;

fn now_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    log::error!("{msg}");
    eprintln!("ember: error: {msg}");
    ExitCode::from(1)
}

/// Runs the Firecracker-mode VMM until its microVM ends.
pub fn run(args: FcArgs) -> ExitCode {
    let started = Instant::now();
    ember_bin::signals::exit_on_stop_signal_without_vm();
    logger::init(
        &args.id,
        logger::LogSettings {
            level: args.level.unwrap_or(LogLevel::Info),
            show_level: args.show_level,
            show_origin: args.show_log_origin,
            module: args.module.clone(),
        },
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let mut ctl = Controller::new(
        Settings {
            id: args.id.clone(),
            boot_timer: args.boot_timer,
            startup_us: 0,
            startup_cpu_us: 0,
            seccomp: args.seccomp.clone(),
        },
        tx.clone(),
    );
    if args.log_path.is_some() || args.level.is_some() {
        let l = Logger {
            level: args.level,
            log_path: args.log_path.clone(),
            show_level: Some(args.show_level),
            show_log_origin: Some(args.show_log_origin),
            module: args.module.clone(),
        };
        if let Err(e) = ctl.configure_logger(l) {
            return fail(e);
        }
    }
    log::info!(
        "Running Ember v{} (Firecracker v{FIRECRACKER_VERSION} API)",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(p) = &args.metrics_path {
        if let Err(e) = ctl.configure_metrics(Metrics {
            metrics_path: p.clone(),
        }) {
            return fail(e);
        }
    }
    let config = match &args.config_file {
        Some(path) => {
            let bytes = match ember_loader::read_small_file(path, MAX_CONFIG_FILE) {
                Ok(b) => b,
                Err(e) => return fail(format!("cannot read {}: {e}", path.display())),
            };
            match serde_json::from_slice::<FullVmConfiguration>(&bytes) {
                Ok(c) => Some(c),
                Err(e) => return fail(format!("invalid config file {}: {e}", path.display())),
            }
        }
        None => None,
    };
    if let Some(c) = &config {
        if let Some(l) = &c.logger {
            if let Err(e) = ctl.configure_logger(l.clone()) {
                return fail(e);
            }
        }
        if let Some(m) = &c.metrics {
            if let Err(e) = ctl.configure_metrics(m.clone()) {
                return fail(e);
            }
        }
        if let Err(e) = ctl.resources_mut().apply_file(c) {
            return fail(format!("config file: {e}"));
        }
    }
    // The fork socket, bound before any seccomp filter (none allows bind or listen).
    if let Some(path) = &args.fork_socket {
        if args.seccomp.filters_from_file() {
            return fail(
                "--fork-socket needs Ember's own seccomp filters (a template's thread and its \
                 sealed memfd need calls Firecracker's vmm filter does not allow); drop \
                 --seccomp-filter",
            );
        }
        match std::os::unix::net::UnixListener::bind(path) {
            Ok(l) => ctl.set_fork_listener(l),
            Err(e) => return fail(format!("--fork-socket {}: {e}", path.display())),
        }
        ember_bin::signals::set_fork_socket(path);
    }
    let _fork_socket = args.fork_socket.as_deref().map(RemoveOnDrop);
    // The API socket: accepting from here on.
    let mut drain = None;
    if !args.no_api {
        let server = match ApiServer::bind(&args.api_sock) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        // From here on a stop signal removes the socket.
        ember_bin::signals::set_api_socket(&args.api_sock);
        ctl.set_server_counters(server.counters());
        drain = Some(server.drain_handle());
        let tx = tx.clone();
        let cfg = ServerConfig {
            max_payload: args.http_api_max_payload_size,
            ..ServerConfig::default()
        };
        let seccomp = args.seccomp.clone();
        let on_start = move || seccomp.enter(ember_bin::seccomp::Thread::Api, "fc_api");
        if let Err(e) = server.spawn_with(cfg, on_start, move |call| {
            let _ = tx.send(Event::Api(call));
        }) {
            return fail(e);
        }
        log::info!("API server listening on {}", args.api_sock.display());
    }
    let wall = now_us(libc::CLOCK_REALTIME);
    let cpu = now_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    let startup_us = args.start_time_us.map_or(
        u64::try_from(started.elapsed().as_micros()).unwrap_or(0),
        |s| wall.saturating_sub(s),
    );
    let startup_cpu_us = cpu
        .saturating_sub(args.start_time_cpu_us.unwrap_or(0))
        .saturating_add(args.parent_cpu_time_us.unwrap_or(0));
    ctl.set_startup(startup_us, startup_cpu_us);
    if config.is_some() {
        if let Err(e) = ctl.start() {
            return fail(e);
        }
    } else if args.no_api {
        return fail("--no-api needs --config-file (nothing else can configure the microVM)");
    }
    let code = ctl.run(rx);
    // The answer to the request that ended the VM (a guest that stops right after
    // InstanceStart, a SendCtrlAltDel) reaches its client before the process exits.
    if let Some(d) = drain {
        if !d.wait(std::time::Duration::from_millis(500)) {
            log::warn!("exiting with API answers not yet written");
        }
    }
    ember_bin::signals::remove_api_socket();
    let signal = ember_bin::signals::STOP_SIGNAL.load(Ordering::SeqCst);
    if signal != 0 {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "only SIGTERM, SIGINT or SIGHUP (1..=15) are stored in STOP_SIGNAL"
        )]
        return ExitCode::from(128u8.wrapping_add(signal as u8));
    }
    ExitCode::from(code)
}
