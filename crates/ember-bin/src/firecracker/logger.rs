//! The log, as Firecracker writes it: one line per record,
//! `<RFC 3339 time, ns> [<instance id>:<thread>(:<LEVEL>)(:<file>:<line>)] <message>`, to
//! stderr or to the file or named pipe of `--log-path` / `PUT /logger`, through the `log`
//! facade.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use ember_api::model::LogLevel;

/// The settings of the log.
#[derive(Clone, Debug)]
pub struct LogSettings {
    pub level: LogLevel,
    pub show_level: bool,
    pub show_origin: bool,
    pub module: Option<String>,
}

struct State {
    settings: LogSettings,
    out: Box<dyn Write + Send>,
}

struct Logger {
    id: String,
    state: Mutex<Option<State>>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn filter(level: LogLevel) -> log::LevelFilter {
    match level {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warning => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    }
}

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = guard.as_mut() else {
            return;
        };
        if let Some(m) = &state.settings.module {
            if !record.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let thread = std::thread::current();
        let mut prefix = format!("{}:{}", self.id, thread.name().unwrap_or("-"));
        if state.settings.show_level {
            prefix.push(':');
            prefix.push_str(record.level().as_str());
        }
        if state.settings.show_origin {
            prefix.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        let now = humantime::format_rfc3339_nanos(std::time::SystemTime::now());
        // A log that cannot be written (a FIFO nobody reads) loses the line, never blocks.
        let _ = writeln!(state.out, "{now} [{prefix}] {}", record.args());
        let _ = state.out.flush();
    }

    fn flush(&self) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = guard.as_mut() {
            let _ = s.out.flush();
        }
    }
}

/// Installs the logger for instance `id`, writing to stderr at `settings.level`.
pub fn init(id: &str, settings: LogSettings) {
    let level = settings.level;
    let logger = LOGGER.get_or_init(|| Logger {
        id: id.to_string(),
        state: Mutex::new(Some(State {
            settings,
            out: Box::new(std::io::stderr()),
        })),
    });
    let _ = log::set_logger(logger);
    log::set_max_level(filter(level));
}

/// Opens a log file or named pipe for appending without blocking.
pub fn open_output(path: &str) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("Cannot open the log file {path}: {e}"))
}

/// `--log-path` / `PUT /logger`: a new destination and settings (the latest wins).
pub fn configure(settings: LogSettings, path: Option<&str>) -> Result<(), String> {
    let logger = LOGGER.get().ok_or("the logger is not installed")?;
    let mut guard = logger.state.lock().unwrap_or_else(|p| p.into_inner());
    let state = guard.as_mut().ok_or("the logger is not installed")?;
    if let Some(p) = path {
        let f = open_output(p)?;
        crate::seccomp::report_to_log(std::os::fd::AsRawFd::as_raw_fd(&f));
        state.out = Box::new(f);
    }
    log::set_max_level(filter(settings.level));
    state.settings = settings;
    Ok(())
}
