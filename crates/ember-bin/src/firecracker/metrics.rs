//! Metrics in Firecracker's model: one JSON object per flush, written to the file or named pipe
//! of `--metrics-path` / `PUT /metrics`, every 60 s and on `FlushMetrics`. Counters are what
//! happened since the previous flush (Firecracker's `SharedIncMetric`); the start-up times are
//! absolute. Group and counter names follow Firecracker's where the meaning is the same
//! (docs/api.md lists them).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use ember_vmm::{DeviceCounters, DeviceReport, ExitCounts};
use serde_json::{json, Map, Value};

/// How often metrics are written by themselves.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Counters the controller keeps itself.
#[derive(Debug, Default)]
pub struct ApiCounts {
    /// `(group, name)` → count, e.g. `("put_api_requests", "drive_count")`.
    pub counts: BTreeMap<(&'static str, String), u64>,
}

impl ApiCounts {
    /// Counts a request, and its failure (`*_fails`) when it failed.
    pub fn record(&mut self, group: &'static str, name: &'static str, failed: bool) {
        *self.counts.entry((group, name.to_string())).or_default() += 1;
        if failed {
            let fails = name.replace("_count", "_fails");
            *self.counts.entry((group, fails)).or_default() += 1;
        }
    }
}

/// What one flush reports.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub startup_us: u64,
    pub startup_cpu_us: u64,
    pub api: Vec<((&'static str, String), u64)>,
    pub api_server: [u64; 2],
    pub devices: Vec<DeviceReport>,
    pub exits: ExitCounts,
    pub serial: Option<ember_devices::serial::SerialCounters>,
    pub missed_log: u64,
}

/// The metrics sink.
pub struct Metrics {
    out: std::fs::File,
    previous: BTreeMap<String, u64>,
    /// Flushes that could not be written.
    pub fails: u64,
}

fn set(groups: &mut BTreeMap<String, Map<String, Value>>, g: &str, k: &str, v: u64) {
    groups
        .entry(g.to_string())
        .or_default()
        .insert(k.to_string(), json!(v));
}

impl Metrics {
    /// Opens the metrics file or named pipe (without blocking).
    pub fn open(path: &str) -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let out = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| format!("Cannot open the metrics file {path}: {e}"))?;
        ember_bin::seccomp::report_to_metrics(std::os::fd::AsRawFd::as_raw_fd(&out));
        Ok(Metrics {
            out,
            previous: BTreeMap::new(),
            fails: 0,
        })
    }

    /// The JSON line of `s` (counters as deltas since the previous call).
    pub fn line(&mut self, s: &Snapshot) -> String {
        let mut g: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
        // Absolute counters first; turned into deltas below.
        for ((group, name), v) in &s.api {
            set(&mut g, group, name, *v);
        }
        set(&mut g, "api_server", "sync_response_fails", s.api_server[0]);
        set(
            &mut g,
            "api_server",
            "sync_vmm_send_timeout_count",
            s.api_server[1],
        );
        set(&mut g, "vcpu", "exit_io_in", s.exits.io_in);
        set(&mut g, "vcpu", "exit_io_out", s.exits.io_out);
        set(&mut g, "vcpu", "exit_mmio_read", s.exits.mmio_read);
        set(&mut g, "vcpu", "exit_mmio_write", s.exits.mmio_write);
        set(&mut g, "vcpu", "failures", s.exits.failures);
        if let Some(u) = &s.serial {
            set(&mut g, "uart", "write_count", u.tx_bytes);
            set(&mut g, "uart", "read_count", u.rx_bytes);
            set(&mut g, "uart", "missed_read_count", u.rx_dropped);
            set(&mut g, "uart", "missed_write_count", u.tx_errors);
            set(
                &mut g,
                "uart",
                "error_count",
                u.bad_accesses + u.signal_errors,
            );
        }
        set(&mut g, "logger", "missed_log_count", s.missed_log);
        set(&mut g, "logger", "metrics_fails", self.fails);
        set(
            &mut g,
            "seccomp",
            "num_faults",
            ember_bin::seccomp::faults(),
        );
        for d in &s.devices {
            let mut add = |group: String, pairs: &[(&str, u64)]| {
                for (k, v) in pairs {
                    set(&mut g, &group, k, *v);
                    let agg = group.split('_').next().unwrap_or(&group).to_string();
                    if agg != group {
                        let e = g.entry(agg).or_default();
                        let cur = e.get(*k).and_then(Value::as_u64).unwrap_or(0);
                        e.insert(k.to_string(), json!(cur + v));
                    }
                }
            };
            match &d.counters {
                DeviceCounters::Block(c) => add(
                    format!("block_{}", d.id),
                    &[
                        ("read_count", c.reads),
                        ("write_count", c.writes),
                        ("flush_count", c.flushes),
                        ("read_bytes", c.read_bytes),
                        ("write_bytes", c.write_bytes),
                        ("execute_fails", c.io_errors),
                        (
                            "invalid_reqs_count",
                            c.malformed_chains + c.out_of_range + c.unsupported,
                        ),
                        ("rate_limiter_throttled_events", c.rate_limited),
                        ("update_count", c.disk_replacements),
                        ("event_fails", c.queue_errors),
                    ],
                ),
                DeviceCounters::Net(c) => add(
                    format!("net_{}", d.id),
                    &[
                        ("rx_packets_count", c.rx_frames),
                        ("rx_bytes_count", c.rx_bytes),
                        ("tx_packets_count", c.tx_frames),
                        ("tx_bytes_count", c.tx_bytes),
                        ("rx_fails", c.rx_errors + c.rx_too_big),
                        ("tx_fails", c.tx_errors),
                        ("tx_malformed_frames", c.tx_malformed_chains),
                        ("no_rx_avail_buffer", c.rx_no_buffers),
                        ("rx_rate_limiter_throttled", c.rx_rate_limited),
                        ("tx_rate_limiter_throttled", c.tx_rate_limited),
                    ],
                ),
                DeviceCounters::Vsock(c) => add(
                    "vsock".to_string(),
                    &[
                        ("rx_packets_count", c.rx_packets),
                        ("tx_packets_count", c.tx_packets),
                        ("rx_bytes_count", c.rx_bytes),
                        ("tx_bytes_count", c.tx_bytes),
                        ("conns_added", c.connections_opened),
                        ("conns_removed", c.connections_closed),
                        ("conns_killed", c.resets_sent),
                        ("tx_write_fails", c.host_errors),
                    ],
                ),
                DeviceCounters::Rng(c) => add(
                    "entropy".to_string(),
                    &[
                        ("entropy_event_count", c.requests),
                        ("entropy_bytes", c.bytes),
                        ("host_rng_fails", c.errors),
                        ("entropy_rate_limiter_throttled", c.rate_limited),
                    ],
                ),
                DeviceCounters::Balloon(c) => add(
                    "balloon".to_string(),
                    &[
                        ("inflate_count", c.inflated_pages),
                        ("deflate_count", c.deflated_pages),
                        ("stats_updates_count", c.stats_updates),
                        ("free_page_report_count", c.reported_pages),
                    ],
                ),
                _ => {}
            }
        }
        // Deltas against the previous flush.
        for (group, map) in g.iter_mut() {
            for (k, v) in map.iter_mut() {
                let key = format!("{group}.{k}");
                let now = v.as_u64().unwrap_or(0);
                let before = self.previous.insert(key, now).unwrap_or(0);
                *v = json!(now.saturating_sub(before));
            }
        }
        // Absolute values.
        set(
            &mut g,
            "api_server",
            "process_startup_time_us",
            s.startup_us,
        );
        set(
            &mut g,
            "api_server",
            "process_startup_time_cpu_us",
            s.startup_cpu_us,
        );
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut root = Map::new();
        root.insert("utc_timestamp_ms".into(), json!(ms));
        for (k, v) in g {
            root.insert(k, Value::Object(v));
        }
        Value::Object(root).to_string()
    }

    /// Writes one flush (a FIFO that cannot take it now loses the line, counted).
    pub fn flush(&mut self, s: &Snapshot) {
        let mut line = self.line(s);
        line.push('\n');
        if self.out.write_all(line.as_bytes()).is_err() {
            self.fails += 1;
        }
    }
}
