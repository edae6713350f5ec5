//! `ember` in Firecracker mode, driven over its Unix socket by a plain HTTP client (what
//! `curl --unix-socket` sends), and from Firecracker config files.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ember_test_support::{ember_binary, kvm_or_skip, probe_elf, write_blk_image};

/// The benchmark's null guest (prints `NULL` and resets within a few instructions), built by
/// the same code.
#[allow(
    dead_code,
    clippy::cast_possible_truncation,
    reason = "the test uses one of its modes; xtask's own lints allow its casts of small sizes"
)]
#[path = "../xtask/src/bench/null_elf.rs"]
mod null_elf;

/// One request on a new connection: (status, body).
fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then exactly Content-Length bytes (a server may keep the connection).
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "connection closed before the response head: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while raw.len() < head_end + len {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&raw[head_end..]).into_owned();
    (status, body)
}

struct Fc {
    child: Option<Child>,
    sock: PathBuf,
    dir: vmm_sys_util::tempdir::TempDir,
}

impl Fc {
    /// `ember --api-sock <tmp>/api.sock <extra>`, waiting for the socket.
    fn start(extra: &[&str]) -> Fc {
        Fc::start_with(extra, Stdio::null())
    }

    /// As [`Fc::start`], with `stdin` as the process's standard input (the serial console's).
    fn start_with(extra: &[&str], stdin: Stdio) -> Fc {
        Fc::start_bin(ember_binary().as_os_str(), extra, stdin)
    }

    /// As [`Fc::start_with`], for the VMM binary `bin` (Ember, or Firecracker itself).
    fn start_bin(bin: &std::ffi::OsStr, extra: &[&str], stdin: Stdio) -> Fc {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-test-").unwrap();
        let sock = dir.as_path().join("api.sock");
        let child = Command::new(bin)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < end, "no API socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        Fc {
            child: Some(child),
            sock,
            dir,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        call(&self.sock, method, path, body)
    }

    /// Writes `bytes` to the process's standard input (the guest's serial console).
    fn type_in(&mut self, bytes: &[u8]) {
        let stdin = self.child.as_mut().unwrap().stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    fn ok(&self, method: &str, path: &str, body: &str) {
        let (st, b) = self.call(method, path, Some(body));
        assert_eq!(st, 204, "{method} {path} {body}: {st} {b}");
    }

    fn fails(&self, method: &str, path: &str, body: Option<&str>, needle: &str) {
        let (st, b) = self.call(method, path, body);
        assert_eq!(st, 400, "{method} {path}: {b}");
        assert!(b.contains("fault_message"), "{b}");
        assert!(b.contains(needle), "{method} {path}: `{needle}` not in {b}");
    }

    /// Waits for the process to end; (exit code, stdout, stderr).
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn wait(&mut self, timeout: Duration) -> (Option<i32>, String, String) {
        let mut child = self.child.take().unwrap();
        let end = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Fc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn boot_source(args: &str) -> String {
    format!(
        r#"{{"kernel_image_path":"{}","boot_args":"{args}"}}"#,
        probe_elf().display()
    )
}

#[test]
fn a_whole_life_over_the_socket() {
    if !kvm_or_skip("a_whole_life_over_the_socket") {
        return;
    }
    let mut fc = Fc::start(&["--boot-timer", "--level", "Info"]);
    let metrics = fc.dir.as_path().join("metrics.json");
    let img = fc.dir.as_path().join("data.img");
    write_blk_image(&img, 2048, 0x5a).unwrap();

    let (st, b) = fc.call("GET", "/", None);
    assert_eq!(st, 200);
    assert!(b.contains(r#""state":"Not started""#), "{b}");
    let (st, b) = fc.call("GET", "/version", None);
    assert_eq!(
        (st, b.as_str()),
        (200, r#"{"firecracker_version":"1.16.1"}"#)
    );
    let (st, b) = fc.call("GET", "/machine-config", None);
    assert_eq!(st, 200);
    assert!(
        b.contains(r#""vcpu_count":1"#) && b.contains(r#""mem_size_mib":128"#),
        "{b}"
    );

    fc.ok("PUT", "/logger", r#"{"level":"Debug","show_level":true}"#);
    fc.ok(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path":"{}"}}"#, metrics.display()),
    );
    fc.ok(
        "PUT",
        "/boot-source",
        &boot_source("probe=boottimer,blk,rng,ctrlaltdel"),
    );
    fc.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":256}"#,
    );
    fc.ok("PATCH", "/machine-config", r#"{"mem_size_mib":192}"#);
    fc.ok(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id":"data","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
            img.display()
        ),
    );
    fc.ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter":{"bandwidth":{"size":65536,"refill_time":100}}}"#,
    );
    fc.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib":0,"deflate_on_oom":true,"stats_polling_interval_s":1}"#,
    );
    let (st, b) = fc.call("GET", "/vm/config", None);
    assert_eq!(st, 200, "{b}");
    let cfg: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(cfg["machine-config"]["mem_size_mib"], 192);
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert_eq!(cfg["drives"][0]["drive_id"], "data");
    assert_eq!(cfg["balloon"]["stats_polling_interval_s"], 1);

    fc.ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let (_, b) = fc.call("GET", "/", None);
    assert!(b.contains(r#""state":"Running""#), "{b}");
    // Every thread runs under its seccomp filter (Firecracker's three: api, vmm, vcpu).
    let pid = fc.child.as_ref().unwrap().id();
    let names = ["ember", "fc_api", "fc_vmm", "vcpu0", "vcpu1"];
    if let Err(seen) = ember_test_support::wait_for_filtered_threads(pid, &names) {
        panic!("threads and their seccomp modes: {seen:?}");
    }
    // Pre-boot only now.
    fc.fails(
        "PUT",
        "/boot-source",
        Some(&boot_source("x")),
        "after starting the microVM",
    );
    fc.fails(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        "after starting the microVM",
    );
    fc.ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
    let (_, b) = fc.call("GET", "/", None);
    assert!(b.contains(r#""state":"Paused""#), "{b}");
    fc.ok("PATCH", "/vm", r#"{"state":"Resumed"}"#);
    // The probe does not drive the balloon: like Firecracker, no target for a device the
    // guest has not activated.
    fc.fails(
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib":8}"#),
        "Device not activated yet",
    );
    let (st, b) = fc.call("GET", "/balloon", None);
    assert_eq!(st, 200);
    assert!(b.contains(r#""amount_mib":0"#), "{b}");
    fc.ok(
        "PATCH",
        "/drives/data",
        r#"{"drive_id":"data","rate_limiter":{"ops":{"size":1000,"refill_time":1000}}}"#,
    );
    fc.fails(
        "PATCH",
        "/drives/data",
        Some(r#"{"drive_id":"data","path_on_host":"/nonexistent/x.img"}"#),
        "Unable to patch the block device",
    );
    // Give the probe time for its blk and rng checks, then flush.
    std::thread::sleep(Duration::from_millis(500));
    fc.ok("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#);
    fc.ok("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#);
    let (code, out, err) = fc.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("PROBE blk ok"), "{out}");
    assert!(out.contains("PROBE rng ok"), "{out}");
    assert!(out.contains("PROBE ctrlaltdel ok"), "{out}");
    assert!(err.contains("Guest-boot-time ="), "{err}");
    assert!(err.contains(":INFO] VM paused"), "levels shown: {err}");
    // One JSON object per flush: the explicit one and the one at exit.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    let first = &lines[0];
    assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 0);
    assert!(
        first["put_api_requests"]["drive_count"].as_u64().unwrap() >= 1,
        "{first}"
    );
    assert!(
        first["vcpu"]["exit_io_out"].as_u64().unwrap() > 0,
        "{first}"
    );
    // Per-flush deltas add up to what the guest did.
    let total =
        |g: &str, k: &str| -> u64 { lines.iter().map(|l| l[g][k].as_u64().unwrap_or(0)).sum() };
    assert!(total("block_data", "read_count") > 0, "{text}");
    assert!(total("entropy", "entropy_bytes") >= 4096, "{text}");
    assert!(
        first["uart"]["write_count"].as_u64().unwrap() > 0,
        "{first}"
    );
    // Counters are per flush: the second line has no boot-time API requests.
    assert_eq!(
        lines[1]["put_api_requests"]["boot_source_count"], 0,
        "{}",
        lines[1]
    );
    assert!(
        !fc_sock_exists(&metrics),
        "the API socket is removed at exit"
    );
}

fn fc_sock_exists(metrics: &Path) -> bool {
    metrics.with_file_name("api.sock").exists()
}

#[test]
fn bad_requests_are_refused_and_the_vmm_keeps_going() {
    let mut fc = Fc::start(&["--http-api-max-payload-size", "300"]);
    fc.fails(
        "PATCH",
        "/vm",
        Some(r#"{"state":"Paused"}"#),
        "before starting the microVM",
    );
    fc.fails(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        "before starting the microVM",
    );
    fc.fails(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        "boot source is missing",
    );
    fc.fails(
        "PUT",
        "/boot-source",
        Some("{}"),
        "missing field `kernel_image_path`",
    );
    fc.fails(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path":"/nonexistent/vmlinux"}"#),
        "The kernel file cannot be opened",
    );
    fc.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":"two","mem_size_mib":128}"#),
        "invalid type",
    );
    fc.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":64,"mem_size_mib":128}"#),
        "vCPU number is invalid",
    );
    fc.fails(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":128,"gpus":1}"#),
        "unknown field `gpus`",
    );
    fc.fails(
        "PUT",
        "/drives/root",
        Some(r#"{"drive_id":"root","path_on_host":"/nonexistent.img","is_root_device":true}"#),
        "Unable to open the block device backing file",
    );
    fc.fails(
        "PUT",
        "/drives/a",
        Some(r#"{"drive_id":"b","path_on_host":"/x","is_root_device":false}"#),
        "does not match the id from the body",
    );
    fc.fails("PUT", "/mmds", Some("{}"), "MMDS is not supported");
    fc.fails(
        "GET",
        "/nowhere",
        None,
        "Invalid request method and/or path: GET /nowhere.",
    );
    fc.fails("PUT", "/logger", Some(""), "Empty PUT request.");
    let big = format!(r#"{{"kernel_image_path":"{}"}}"#, "x".repeat(400));
    fc.fails(
        "PUT",
        "/boot-source",
        Some(&big),
        "larger than the limit of 300",
    );
    fc.fails(
        "GET",
        "/balloon/statistics",
        None,
        "No balloon device configured",
    );
    fc.fails(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid":2,"uds_path":"/tmp/v"}"#),
        "Invalid guest CID",
    );
    fc.fails(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib":4096,"deflate_on_oom":false}"#),
        "too large",
    );
    fc.ok("PUT", "/metrics", r#"{"metrics_path":"/dev/null"}"#);
    fc.fails(
        "PUT",
        "/metrics",
        Some(r#"{"metrics_path":"/dev/null"}"#),
        "Reinitialization of metrics not allowed",
    );
    // Still alive and answering.
    let (st, _) = fc.call("GET", "/", None);
    assert_eq!(st, 200);
    // SIGTERM before InstanceStart ends the process and removes the socket.
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(fc.pid() as libc::pid_t, libc::SIGTERM) };
    let sock = fc.sock.clone();
    let (code, _, _) = fc.wait(Duration::from_secs(10));
    assert_eq!(code, Some(128 + 15));
    assert!(!sock.exists());
}

/// The config file a Firecracker user writes to boot the probe (the same `cargo xtask bench`
/// gives Firecracker).
fn firecracker_config(dir: &Path, args: &str) -> PathBuf {
    let cfg = format!(
        r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "boot_args": "{args}"
  }},
  "drives": [],
  "machine-config": {{
    "vcpu_count": 1,
    "mem_size_mib": 128,
    "smt": false
  }}
}}"#,
        probe_elf().display()
    );
    let path = dir.join("vm_config.json");
    std::fs::write(&path, cfg).unwrap();
    path
}

#[test]
fn a_firecracker_config_file_boots_with_no_api() {
    if !kvm_or_skip("a_firecracker_config_file_boots_with_no_api") {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-test-").unwrap();
    let cfg = firecracker_config(
        dir.as_path(),
        "console=ttyS0 reboot=k panic=1 probe=memmap,boottimer",
    );
    let out = Command::new(ember_binary())
        .args(["--no-api", "--config-file"])
        .arg(&cfg)
        .args(["--level", "Error"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PROBE memmap ok"), "{stdout}");
    assert!(stdout.contains("PROBE done checks=2 failed=0"), "{stdout}");
}

#[test]
fn flags_ember_does_not_implement_are_refused() {
    for (flags, needle) in [
        (&["--enable-pci"][..], "no PCI"),
        (&["--metadata", "/tmp/m.json"][..], "no MMDS"),
        (
            &["--seccomp-filter", "/nonexistent/f.bpf"][..],
            "--seccomp-filter /nonexistent/f.bpf",
        ),
        (&["--no-api"][..], "--no-api needs --config-file"),
        (&["--level", "loud"][..], "unknown log level"),
    ] {
        let out = Command::new(ember_binary()).args(flags).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{flags:?}");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
    let out = Command::new(ember_binary())
        .args(["--kernel", "/k", "--api-sock", "/tmp/x.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Firecracker-mode flag"));
}

/// The same request sequence against Firecracker (`EMBER_FIRECRACKER=/path/to/firecracker`)
/// and Ember gives the same status codes. Skipped, counted, where no Firecracker binary is
/// given.
#[test]
fn the_same_requests_get_the_same_status_codes_as_firecracker() {
    let test = "the_same_requests_get_the_same_status_codes_as_firecracker";
    let Some(fc_bin) = std::env::var_os("EMBER_FIRECRACKER") else {
        ember_test_support::skip(
            test,
            "EMBER_FIRECRACKER is not set (a Firecracker v1.16.1 binary)",
        );
        return;
    };
    if !kvm_or_skip(test) {
        return;
    }
    let requests: Vec<(&str, &str, Option<String>)> = vec![
        ("GET", "/", None),
        ("GET", "/version", None),
        ("GET", "/machine-config", None),
        ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#.into())),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#.into()),
        ),
        ("PUT", "/boot-source", Some("{}".into())),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/nonexistent"}"#.into()),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":128,"x":1}"#.into()),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#.into()),
        ),
        ("PUT", "/boot-source", Some(boot_source("probe=ctrlaltdel"))),
        (
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id":"b","is_root_device":false}"#.into()),
        ),
        ("GET", "/nowhere", None),
        ("GET", "/balloon", None),
        (
            "PUT",
            "/balloon",
            Some(r#"{"amount_mib":16,"deflate_on_oom":false}"#.into()),
        ),
        ("GET", "/balloon", None),
        ("PUT", "/entropy", Some("{}".into())),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#.into()),
        ),
        ("PUT", "/boot-source", Some(boot_source("x"))),
        ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#.into())),
        ("GET", "/", None),
        ("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#.into())),
        ("PATCH", "/balloon", Some(r#"{"amount_mib":8}"#.into())),
        ("GET", "/balloon/statistics", None),
        (
            "PATCH",
            "/machine-config",
            Some(r#"{"vcpu_count":1}"#.into()),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"FlushMetrics"}"#.into()),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#.into()),
        ),
    ];
    let run = |bin: &std::ffi::OsStr, extra: &[&str]| -> Vec<u16> {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-fc-side-").unwrap();
        let sock = dir.as_path().join("api.sock");
        let mut child = Command::new(bin)
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < end, "{bin:?}: no API socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        let codes = requests
            .iter()
            .map(|(m, p, b)| call(&sock, m, p, b.as_deref()).0)
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        codes
    };
    let theirs = run(&fc_bin, &["--no-seccomp"]);
    let ours = run(ember_binary().as_os_str(), &[]);
    let diff: Vec<String> = requests
        .iter()
        .zip(theirs.iter().zip(&ours))
        .filter(|(_, (a, b))| a != b)
        .map(|((m, p, b), (a, o))| format!("{m} {p} {b:?}: Firecracker {a}, Ember {o}"))
        .collect();
    assert!(diff.is_empty(), "differences:\n{}", diff.join("\n"));
}

/// Waits until `file` holds `needle`; its text.
fn wait_for_text(file: &Path, needle: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) || Instant::now() > end {
            return text;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_snapshot_over_the_api_restores_in_a_new_process() {
    if !kvm_or_skip("a_snapshot_over_the_api_restores_in_a_new_process") {
        return;
    }
    // The first VMM: boot the probe to its snapshot wait, pause, snapshot, stop.
    let fc = Fc::start_with(&[], Stdio::piped());
    let files = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-snap-").unwrap();
    let dir = files.as_path().to_path_buf();
    let (img, state, mem) = (dir.join("d.img"), dir.join("vm.state"), dir.join("vm.mem"));
    let (serial1, serial2) = (dir.join("serial1.txt"), dir.join("serial2.txt"));
    write_blk_image(&img, 2048, 0x5a).unwrap();
    fc.ok(
        "PUT",
        "/serial",
        &format!(r#"{{"serial_out_path":"{}"}}"#, serial1.display()),
    );
    fc.ok(
        "PUT",
        "/boot-source",
        &boot_source("probe=snapshot,blk,rng"),
    );
    fc.ok(
        "PUT",
        "/drives/probe",
        &format!(
            r#"{{"drive_id":"probe","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
            img.display()
        ),
    );
    fc.ok("PUT", "/entropy", "{}");
    let create = format!(
        r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
        state.display(),
        mem.display()
    );
    fc.fails("PUT", "/snapshot/create", Some(&create), "before starting");
    fc.ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let text = wait_for_text(&serial1, "PROBE snapshot waiting", Duration::from_secs(30));
    assert!(text.contains("PROBE snapshot waiting"), "{text}");
    fc.fails("PUT", "/snapshot/create", Some(&create), "not paused");
    fc.ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
    fc.fails(
        "PUT",
        "/snapshot/create",
        Some(&create.replace("Full", "Diff")),
        "needs dirty page tracking",
    );
    fc.ok("PUT", "/snapshot/create", &create);
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 128 << 20);
    drop(fc);

    // Its version, as Firecracker's --describe-snapshot prints it.
    let out = Command::new(ember_binary())
        .arg("--describe-snapshot")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v1.0.0");
    let out = Command::new(ember_binary())
        .arg("--describe-snapshot")
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an Ember snapshot"));

    // Loading is refused once boot resources are configured.
    let load = |extra: &str| {
        format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}}{extra}}}"#,
            state.display(),
            mem.display()
        )
    };
    let fc3 = Fc::start(&[]);
    fc3.ok("PUT", "/boot-source", &boot_source("x"));
    fc3.fails(
        "PUT",
        "/snapshot/load",
        Some(&load("")),
        "not allowed after configuring",
    );
    drop(fc3);

    // A second VMM restores it: bad loads are refused and leave nothing behind, then the
    // good one resumes the guest, which finds its memory and its devices.
    let mut fc = Fc::start_with(&[], Stdio::piped());
    fc.ok(
        "PUT",
        "/serial",
        &format!(r#"{{"serial_out_path":"{}"}}"#, serial2.display()),
    );
    fc.fails(
        "PUT",
        "/snapshot/load",
        Some(&load(
            r#","network_overrides":[{"iface_id":"eth9","host_dev_name":"tap9"}]"#,
        )),
        r#"no network device \"eth9\""#,
    );
    fc.fails(
        "PUT",
        "/snapshot/load",
        Some(&load(r#","vsock_override":{"uds_path":"/tmp/x.sock"}"#)),
        "no vsock device",
    );
    fc.fails(
        "PUT",
        "/snapshot/load",
        Some(&load("").replace(r#""File""#, r#""Shm""#)),
        "not supported",
    );
    fc.fails(
        "PUT",
        "/snapshot/load",
        Some(&load("").replace("vm.state", "d.img")),
        "not an Ember snapshot",
    );
    let (_, b) = fc.call("GET", "/", None);
    assert!(b.contains(r#""state":"Not started""#), "{b}");
    fc.ok(
        "PUT",
        "/snapshot/load",
        &load(r#","resume_vm":false,"track_dirty_pages":true"#),
    );
    let (_, b) = fc.call("GET", "/", None);
    assert!(b.contains(r#""state":"Paused""#), "{b}");
    // Dirty pages are tracked from the load on: a diff snapshot of the paused clone, written
    // over the memory file it was restored from, is a state and nothing else (no page dirtied).
    let state2 = dir.join("vm2.state");
    fc.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type":"Diff","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state2.display(),
            mem.display()
        ),
    );
    assert_eq!(ember_vmm::describe_snapshot(&state2).unwrap(), 1);
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 128 << 20);
    let (_, b) = fc.call("GET", "/machine-config", None);
    assert!(b.contains(r#""track_dirty_pages":true"#), "{b}");
    let (_, b) = fc.call("GET", "/machine-config", None);
    assert!(b.contains(r#""mem_size_mib":128"#), "{b}");
    fc.fails("PUT", "/snapshot/load", Some(&load("")), "after starting");
    fc.ok("PATCH", "/vm", r#"{"state":"Resumed"}"#);
    fc.type_in(b"g");
    let (code, _, stderr) = fc.wait(Duration::from_secs(60));
    let text = std::fs::read_to_string(&serial2).unwrap_or_default();
    assert_eq!(code, Some(0), "{text}\n{stderr}");
    assert!(
        text.contains("PROBE snapshot ok pattern=ok tsc_forward=yes"),
        "{text}"
    );
    assert!(text.contains("PROBE blk ok"), "{text}");
    assert!(text.contains("PROBE rng ok"), "{text}");
    assert!(text.contains("PROBE done checks=3 failed=0"), "{text}");
    // The restored guest did not print its start again.
    assert!(!text.contains("PROBE start"), "{text}");
}

/// A guest that ends right after `InstanceStart` (the benchmark's null guest: it prints a line
/// and resets within a few instructions) still gets `InstanceStart`'s 204: the process waits
/// for the API server to write the answers it holds before it exits. 60 rounds: without that
/// wait, about one answer in 25 was lost (the client saw the connection close).
#[test]
fn the_answer_to_instance_start_arrives_when_the_guest_ends_at_once() {
    if !kvm_or_skip("the_answer_to_instance_start_arrives_when_the_guest_ends_at_once") {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-null-").unwrap();
    let kernel = dir.as_path().join("null.elf");
    std::fs::write(
        &kernel,
        null_elf::build(null_elf::NullMode::Exit, null_elf::Entries::PvhAndLinux64),
    )
    .unwrap();
    let boot = format!(r#"{{"kernel_image_path":"{}"}}"#, kernel.display());
    for round in 0..60 {
        let mut fc = Fc::start(&["--level", "Error"]);
        fc.ok("PUT", "/boot-source", &boot);
        fc.ok(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128}"#,
        );
        let (st, body) = fc.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        );
        assert_eq!(st, 204, "round {round}: {body}");
        let (code, out, err) = fc.wait(Duration::from_secs(10));
        assert!(out.contains(null_elf::LINE), "round {round}: {out}{err}");
        assert_eq!(code, Some(0), "round {round}: {err}");
    }
}

/// The ID in the last `PROBE vmgenid ok ... id=<hex>` line of `text`.
fn last_generation_id(text: &str) -> Option<String> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("PROBE vmgenid ok"))?;
    Some(
        line.split("id=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string(),
    )
}

/// Ember's fork endpoints: a VMM started with `--fork-socket` boots the probe to its wait and
/// becomes a template (`PUT /fork/template`); three new VMM processes each load a fork of it
/// (`PUT /fork/load`) with their own disk image, and run on after the template's process is
/// killed. Released one after the other, each fork finds the template's memory as it was (the
/// pattern, not an earlier fork's mark), its devices working and a generation ID of its own.
#[test]
fn forks_of_a_paused_microvm_run_in_vmm_processes_of_their_own() {
    if !kvm_or_skip("forks_of_a_paused_microvm_run_in_vmm_processes_of_their_own") {
        return;
    }
    let files = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-fork-").unwrap();
    let dir = files.as_path().to_path_buf();
    let (img, fork_sock) = (dir.join("base.img"), dir.join("fork.sock"));
    write_blk_image(&img, 2048, 0x5a).unwrap();
    let base = std::fs::read(&img).unwrap();
    let serial = dir.join("template.txt");
    let fork_flag = fork_sock.to_str().unwrap();
    let template = Fc::start_with(&["--fork-socket", fork_flag], Stdio::piped());
    // The socket is taken: a second template on it is refused at start-up.
    let out = Command::new(ember_binary())
        .args(["--api-sock", dir.join("x.sock").to_str().unwrap()])
        .args(["--fork-socket", fork_flag])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--fork-socket"),
        "{out:?}"
    );
    template.ok(
        "PUT",
        "/serial",
        &format!(r#"{{"serial_out_path":"{}"}}"#, serial.display()),
    );
    template.ok(
        "PUT",
        "/boot-source",
        &boot_source("probe=vmgenid,snapshot,blk,rng,vmgenid"),
    );
    template.ok(
        "PUT",
        "/drives/probe",
        &format!(
            r#"{{"drive_id":"probe","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
            img.display()
        ),
    );
    template.ok("PUT", "/entropy", "{}");
    template.fails("PUT", "/fork/template", None, "before starting");
    template.ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let text = wait_for_text(&serial, "PROBE snapshot waiting", Duration::from_secs(30));
    assert!(text.contains("PROBE snapshot waiting"), "{text}");
    let template_id = last_generation_id(&text).expect("the template's generation ID");
    template.fails("PUT", "/fork/template", None, "not paused");
    template.ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
    template.ok("PUT", "/fork/template", "{}");
    template.fails("PUT", "/fork/template", None, "already a template");

    // Without --fork-socket there is nothing to serve forks on.
    let other = Fc::start(&[]);
    other.fails("PUT", "/fork/template", None, "before starting");
    let other_serial = dir.join("other.txt");
    other.ok(
        "PUT",
        "/serial",
        &format!(r#"{{"serial_out_path":"{}"}}"#, other_serial.display()),
    );
    other.ok("PUT", "/boot-source", &boot_source("probe=snapshot"));
    other.ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let text = wait_for_text(
        &other_serial,
        "PROBE snapshot waiting",
        Duration::from_secs(30),
    );
    assert!(text.contains("PROBE snapshot waiting"), "{text}");
    other.ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
    other.fails("PUT", "/fork/template", None, "no fork socket");
    drop(other);
    let other = Fc::start(&[]);
    let load = |extra: &str| {
        format!(
            r#"{{"template_socket":"{}","resume_vm":true{extra}}}"#,
            fork_sock.display()
        )
    };
    other.fails(
        "PUT",
        "/fork/load",
        Some(&load("").replace("fork.sock", "none.sock")),
        "none.sock",
    );
    drop(other);

    let mut forks = Vec::new();
    for mark in 1..=3u8 {
        let fork = Fc::start_with(&[], Stdio::piped());
        let serial = dir.join(format!("fork{mark}.txt"));
        let disk = dir.join(format!("fork{mark}.img"));
        std::fs::copy(&img, &disk).unwrap();
        fork.ok(
            "PUT",
            "/serial",
            &format!(r#"{{"serial_out_path":"{}"}}"#, serial.display()),
        );
        // A fork must not write the template's disk; unknown drives are named.
        fork.fails("PUT", "/fork/load", Some(&load("")), "writable disk");
        fork.fails(
            "PUT",
            "/fork/load",
            Some(&load(
                r#","drive_overrides":[{"drive_id":"nope","path_on_host":"/x.img"}]"#,
            )),
            "nope",
        );
        let (_, b) = fork.call("GET", "/", None);
        assert!(b.contains(r#""state":"Not started""#), "{b}");
        fork.ok(
            "PUT",
            "/fork/load",
            &load(&format!(
                r#","drive_overrides":[{{"drive_id":"probe","path_on_host":"{}"}}]"#,
                disk.display()
            )),
        );
        fork.fails("PUT", "/fork/load", Some(&load("")), "after starting");
        let (_, b) = fork.call("GET", "/", None);
        assert!(b.contains(r#""state":"Running""#), "{b}");
        let (_, b) = fork.call("GET", "/machine-config", None);
        assert!(b.contains(r#""mem_size_mib":128"#), "{b}");
        forks.push((mark, fork, serial, disk));
    }
    // The forks need nothing more of the template's process.
    drop(template);

    // A fork socket is removed when its VMM ends, a signal before boot included.
    let ended = dir.join("ended.sock");
    let mut vmm = Fc::start(&["--fork-socket", ended.to_str().unwrap()]);
    assert!(ended.exists());
    // SAFETY: signals the child this test started.
    unsafe { libc::kill(i32::try_from(vmm.pid()).unwrap(), libc::SIGTERM) };
    let (code, _, stderr) = vmm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!ended.exists(), "the fork socket outlived its VMM");

    let mut ids = std::collections::HashSet::from([template_id]);
    for (mark, mut fork, serial, disk) in forks {
        fork.type_in(&[mark]);
        let (code, _, stderr) = fork.wait(Duration::from_secs(60));
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        assert_eq!(code, Some(0), "fork {mark}: {text}\n{stderr}");
        assert!(
            text.contains("PROBE snapshot ok pattern=ok tsc_forward=yes"),
            "fork {mark}: {text}"
        );
        assert!(
            text.contains(&format!("mark={mark}\n")),
            "fork {mark}: {text}"
        );
        assert!(text.contains("PROBE blk ok"), "fork {mark}: {text}");
        assert!(text.contains("PROBE rng ok"), "fork {mark}: {text}");
        assert!(text.contains("failed=0"), "fork {mark}: {text}");
        assert!(!text.contains("PROBE start"), "fork {mark}: {text}");
        let id = last_generation_id(&text).unwrap_or_else(|| panic!("fork {mark}: {text}"));
        assert!(
            ids.insert(id),
            "fork {mark} has a generation ID seen before: {text}"
        );
        // It wrote its own image, not the template's.
        assert_ne!(std::fs::read(&disk).unwrap(), base, "fork {mark}");
    }
    assert_eq!(std::fs::read(&img).unwrap(), base);
}

/// `PUT /snapshot/load` with `mem_backend` `Uffd`, as Firecracker's: the restored guest's memory
/// is filled page by page by a handler process (here a thread of the test, in the role of
/// Firecracker's example handlers) that got Firecracker's handshake: the regions in JSON with
/// the userfaultfd attached. Only the pages touched are served; with no handler listening the
/// load is refused, naming the socket, and the VMM can still load.
#[test]
fn a_snapshot_loads_with_its_memory_served_by_a_page_fault_handler() {
    if !kvm_or_skip("a_snapshot_loads_with_its_memory_served_by_a_page_fault_handler") {
        return;
    }
    let files = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-api-uffd-").unwrap();
    let dir = files.as_path().to_path_buf();
    let (state, mem, handler) = (
        dir.join("vm.state"),
        dir.join("vm.mem"),
        dir.join("uffd.sock"),
    );
    let (serial1, serial2) = (dir.join("serial1.txt"), dir.join("serial2.txt"));
    let fc = Fc::start_with(&[], Stdio::piped());
    fc.ok(
        "PUT",
        "/serial",
        &format!(r#"{{"serial_out_path":"{}"}}"#, serial1.display()),
    );
    fc.ok("PUT", "/boot-source", &boot_source("probe=snapshot,rng"));
    fc.ok("PUT", "/entropy", "{}");
    fc.ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let text = wait_for_text(&serial1, "PROBE snapshot waiting", Duration::from_secs(30));
    assert!(text.contains("PROBE snapshot waiting"), "{text}");
    fc.ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
    fc.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    drop(fc);

    let load = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"Uffd","backend_path":"{}"}},"resume_vm":true}}"#,
        state.display(),
        handler.display()
    );
    let mut fc = Fc::start_with(&[], Stdio::piped());
    fc.ok(
        "PUT",
        "/serial",
        &format!(r#"{{"serial_out_path":"{}"}}"#, serial2.display()),
    );
    fc.fails("PUT", "/snapshot/load", Some(&load), "uffd.sock");
    let (_, b) = fc.call("GET", "/", None);
    assert!(b.contains(r#""state":"Not started""#), "{b}");

    let server = ember_test_support::uffd::PageServer::serve_file(
        &handler,
        std::fs::File::open(&mem).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap();
    fc.ok("PUT", "/snapshot/load", &load);
    fc.type_in(b"g");
    let (code, _, stderr) = fc.wait(Duration::from_secs(60));
    let text = std::fs::read_to_string(&serial2).unwrap_or_default();
    assert_eq!(code, Some(0), "{text}\n{stderr}");
    assert!(
        text.contains("PROBE snapshot ok pattern=ok tsc_forward=yes"),
        "{text}"
    );
    assert!(text.contains("PROBE rng ok"), "{text}");
    assert!(text.contains("failed=0"), "{text}");
    assert!(!text.contains("PROBE start"), "{text}");
    let served = server.finish().unwrap();
    eprintln!("the handler served {} pages", served.pages);
    // One region (128 MiB sits below the MMIO gap) at the memory file's start.
    assert_eq!(served.regions.len(), 1, "{served:?}");
    assert_eq!(served.regions[0].size, 128 << 20, "{served:?}");
    assert_eq!(served.regions[0].offset, 0, "{served:?}");
    assert_eq!(served.regions[0].page_size, 4096, "{served:?}");
    // The probe read its 1 MiB region back (256 pages), and ran its code from served pages;
    // nothing near all of memory was touched.
    assert!(
        served.pages >= 256 && served.pages < 4096,
        "{} pages served",
        served.pages
    );
}

/// The snapshot scenario of `a_snapshot_over_the_api_restores_in_a_new_process`, driven the
/// same way against the VMM binary `bin`: boot the probe (`snapshot,blk,rng`) to its wait,
/// pause, full snapshot, then restore it in a new process of the same VMM; the restored
/// guest's console.
fn snapshot_scenario(bin: &std::ffi::OsStr, extra: &[&str]) -> String {
    let files = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-side-snap-").unwrap();
    let dir = files.as_path().to_path_buf();
    let (img, state, mem) = (dir.join("d.img"), dir.join("vm.state"), dir.join("vm.mem"));
    let serial1 = dir.join("serial1.txt");
    write_blk_image(&img, 2048, 0x5a).unwrap();
    let before = std::fs::read(&img).unwrap();
    let fc = Fc::start_bin(bin, extra, Stdio::piped());
    fc.ok(
        "PUT",
        "/serial",
        &format!(r#"{{"serial_out_path":"{}"}}"#, serial1.display()),
    );
    fc.ok(
        "PUT",
        "/boot-source",
        &boot_source("probe=snapshot,blk,rng"),
    );
    fc.ok(
        "PUT",
        "/drives/probe",
        &format!(
            r#"{{"drive_id":"probe","path_on_host":"{}","is_root_device":false,"is_read_only":false}}"#,
            img.display()
        ),
    );
    fc.ok("PUT", "/entropy", "{}");
    fc.ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
    let text = wait_for_text(&serial1, "PROBE snapshot waiting", Duration::from_secs(30));
    assert!(text.contains("PROBE snapshot waiting"), "{bin:?}: {text}");
    fc.ok("PATCH", "/vm", r#"{"state":"Paused"}"#);
    fc.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            state.display(),
            mem.display()
        ),
    );
    drop(fc);
    // The restored console is the VMM's standard output (Firecracker takes no serial
    // configuration for a restore).
    let mut fc = Fc::start_bin(bin, extra, Stdio::piped());
    fc.ok(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true}}"#,
            state.display(),
            mem.display()
        ),
    );
    fc.type_in(b"g");
    // The guest resets once its checks are done, which ends either VMM.
    let (_, text, stderr) = fc.wait(Duration::from_secs(60));
    // The restored guest wrote the disk it was given.
    assert!(
        std::fs::read(&img).unwrap() != before,
        "{bin:?}: the disk is unchanged; the restored console: {text}\n{stderr}"
    );
    text
}

/// The same snapshot scenario under Firecracker v1.16.1 (`EMBER_FIRECRACKER`) and Ember,
/// over the same API calls: each VMM restores its own snapshot and the restored probe passes
/// the same checks (its memory pattern, its clock, disk reads and writes, entropy). The time
/// each takes is the benchmark's (`cargo xtask bench --only snapshot`), not this test's.
#[test]
fn a_snapshot_scenario_passes_the_same_under_firecracker_and_ember() {
    let test = "a_snapshot_scenario_passes_the_same_under_firecracker_and_ember";
    let Some(fc_bin) = std::env::var_os("EMBER_FIRECRACKER") else {
        ember_test_support::skip(
            test,
            "EMBER_FIRECRACKER is not set (a Firecracker v1.16.1 binary)",
        );
        return;
    };
    if !kvm_or_skip(test) {
        return;
    }
    for (name, bin, extra) in [
        ("Firecracker", fc_bin.as_os_str(), &["--no-seccomp"][..]),
        ("Ember", ember_binary().as_os_str(), &[][..]),
    ] {
        let text = snapshot_scenario(bin, extra);
        for want in [
            "PROBE snapshot ok pattern=ok tsc_forward=yes",
            "PROBE blk ok",
            "PROBE rng ok",
            "PROBE done checks=3 failed=0",
        ] {
            assert!(text.contains(want), "{name}: no `{want}` in {text}");
        }
        assert!(!text.contains("PROBE start"), "{name}: {text}");
    }
}
