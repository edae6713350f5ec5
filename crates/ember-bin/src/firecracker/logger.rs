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
        // The whole line in one write: a FIFO reader never sees half a line (a write of up to
        // PIPE_BUF bytes to a pipe is atomic), nor another process's line in the middle.
        let line = format!("{now} [{prefix}] {}\n", record.args());
        // A log that cannot be written (a FIFO nobody reads) loses the line, never blocks.
        let _ = state.out.write_all(line.as_bytes());
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
        ember_bin::seccomp::report_to_log(std::os::fd::AsRawFd::as_raw_fd(&f));
        state.out = Box::new(f);
    }
    log::set_max_level(filter(settings.level));
    state.settings = settings;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records every `write` call it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_record_is_one_whole_line_in_one_write() {
        let writes = Writes::default();
        let logger = Logger {
            id: "vm7".into(),
            state: Mutex::new(Some(State {
                settings: LogSettings {
                    level: LogLevel::Info,
                    show_level: true,
                    show_origin: false,
                    module: None,
                },
                out: Box::new(writes.clone()),
            })),
        };
        log::set_max_level(log::LevelFilter::Info);
        log::Log::log(
            &logger,
            &log::Record::builder()
                .level(log::Level::Warn)
                .args(format_args!("disk {} is read-only", "rootfs"))
                .build(),
        );
        let w = writes.0.lock().unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        let line = String::from_utf8(w[0].clone()).unwrap();
        assert!(
            line.ends_with(":WARN] disk rootfs is read-only\n"),
            "{line}"
        );
        assert!(line.contains(" [vm7:"), "{line}");
    }
}
