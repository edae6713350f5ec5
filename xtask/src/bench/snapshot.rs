//! The `snapshot` section: full snapshot and restore of the probe guest, Ember beside
//! Firecracker (`FIRECRACKER=`), each VMM restoring its own snapshot.
//!
//! The probe runs its `snapshot` check: it fills 64 KiB with a pattern (`probe.snapshot_kib=64`:
//! on a PVM host every first touch of a page after a restore is an emulated fault, about
//! 35 µs, which 1 MiB turns into 18 ms for both VMMs) and waits for a byte on
//! its serial console. Each VMM boots it to that wait and writes a full snapshot (Ember:
//! `--snapshot-dir` and SIGUSR1; Firecracker: `PATCH /vm` Paused then `PUT /snapshot/create`,
//! timed from the request to its answer). Then, per run, a new VMM process restores it
//! (Ember: `ember --restore DIR`; Firecracker: `PUT /snapshot/load` with `resume_vm`), the byte
//! is already waiting on its standard input, and the time is exec → the restored guest's
//! `PROBE snapshot ok` line (it checked its pattern, so its memory is there). For Ember the
//! VMM's own "first KVM_RUN after VMM start" is reported too: exec → the restored vCPU running.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::peers::{Kind, Peer};
use super::stats::Summary;

/// One VMM at one size.
pub struct Cell {
    /// The VMM.
    pub peer: String,
    /// Guest memory, MiB.
    pub mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Snapshot create, ms.
    pub create_ms: Option<f64>,
    /// exec → the restored guest answered, ms.
    pub answered: Option<Summary>,
    /// Its 99th percentile.
    pub answered_p99: Option<f64>,
    /// exec → the restored vCPU's first KVM_RUN (Ember's own figure), ms.
    pub first_run: Option<Summary>,
    /// Why a cell is empty.
    pub error: Option<String>,
    /// Ember's forks by process (`PUT /fork/template`, then `PUT /fork/load` in each new
    /// VMM) rather than a snapshot restore.
    pub fork: bool,
}

/// The `p`-th percentile (nearest rank) of `v`.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within a short sample"
    )]
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// Lines of a child's stdout, as they come.
fn lines(child: &mut Child) -> Result<mpsc::Receiver<(Instant, String)>, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Waits for a line holding `needle`; when it came.
fn wait_line(
    rx: &mpsc::Receiver<(Instant, String)>,
    needle: &str,
    timeout: Duration,
) -> Result<(Instant, String), String> {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((t, l)) if l.contains(needle) => return Ok((t, l)),
            Ok(_) => {}
            Err(_) => return Err(format!("no `{needle}` line")),
        }
    }
}

fn ok(sock: &Path, method: &str, path: &str, body: &str) -> Result<(), String> {
    match super::api::request(sock, method, path, body)? {
        204 => Ok(()),
        st => Err(format!("{method} {path}: {st}")),
    }
}

fn wait_socket(sock: &Path) -> Result<(), String> {
    super::api::wait_socket(sock, Instant::now()).map(drop)
}

/// Writes the byte the restored probe waits for to the VMM's standard input (its console).
fn release_guest(child: &mut Child) -> Result<(), String> {
    child
        .stdin
        .as_mut()
        .ok_or("no stdin")?
        .write_all(b"g")
        .map_err(|e| e.to_string())
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 probe=snapshot probe.snapshot_ms=30000 probe.snapshot_kib=64";

/// Ember: boots to the wait, snapshots into `dir`; the VMM's own create time, ms.
fn ember_create(peer: &Peer, probe: &Path, dir: &Path, mib: u64, vcpus: u8) -> Result<f64, String> {
    let mut child = Command::new(&peer.bin)
        .arg("--kernel")
        .arg(probe)
        .args(["--cmdline", CMDLINE])
        .args([
            "--memory-mib",
            &mib.to_string(),
            "--vcpus",
            &vcpus.to_string(),
        ])
        .arg("--snapshot-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", peer.bin.display()))?;
    let result = (|| {
        let rx = lines(&mut child)?;
        wait_line(&rx, "PROBE snapshot waiting", Duration::from_secs(60))?;
        let err = child.stderr.take().ok_or("no stderr")?;
        let pid = i32::try_from(child.id()).map_err(|e| e.to_string())?;
        // SAFETY: signals the child this function started.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        let mut err = BufReader::new(err);
        let mut line = String::new();
        while err.read_line(&mut line).map_err(|e| e.to_string())? > 0 {
            if line.contains("snapshot written") {
                // "... (N MiB of memory, X ms)"
                return line
                    .rsplit(", ")
                    .next()
                    .and_then(|s| s.trim().trim_end_matches(')').strip_suffix(" ms"))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("no time in {line:?}"));
            }
            if line.contains("snapshot failed") {
                return Err(line);
            }
            line.clear();
        }
        Err("no snapshot line".into())
    })();
    kill(child);
    result
}

/// Ember: one restore; (exec → answer, exec → first KVM_RUN), ms.
fn ember_restore(peer: &Peer, dir: &Path) -> Result<(f64, f64), String> {
    let t0 = Instant::now();
    let mut child = Command::new(&peer.bin)
        .arg("--restore")
        .arg(dir)
        .arg("--timings")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", peer.bin.display()))?;
    let result = (|| {
        release_guest(&mut child)?;
        let rx = lines(&mut child)?;
        let (t, _) = wait_line(&rx, "PROBE snapshot ok", Duration::from_secs(30))?;
        let answered = t.duration_since(t0).as_secs_f64() * 1e3;
        let _ = child.wait();
        let mut err = String::new();
        child
            .stderr
            .take()
            .ok_or("no stderr")?
            .read_to_string(&mut err)
            .map_err(|e| e.to_string())?;
        let first = err
            .lines()
            .find_map(|l| l.strip_prefix("ember: first KVM_RUN "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no first KVM_RUN line in {err}"))?;
        Ok((answered, first))
    })();
    kill(child);
    result
}

fn fc_spawn(peer: &Peer, sock: &Path) -> Result<Child, String> {
    let _ = std::fs::remove_file(sock);
    Command::new(&peer.bin)
        .arg("--api-sock")
        .arg(sock)
        .args(["--level", "Error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", peer.bin.display()))
}

/// Boots `probe` with `cmdline` over the Firecracker API at `sock`: boot source, the
/// machine configuration `machine` (JSON), `InstanceStart`.
fn boot_over_api(sock: &Path, probe: &Path, cmdline: &str, machine: &str) -> Result<(), String> {
    ok(
        sock,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","boot_args":"{cmdline}"}}"#,
            probe.display()
        ),
    )?;
    ok(sock, "PUT", "/machine-config", machine)?;
    ok(
        sock,
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#,
    )
}

/// Firecracker: boots to the wait, snapshots into `dir`; `PUT /snapshot/create`, ms.
fn fc_create(peer: &Peer, probe: &Path, dir: &Path, mib: u64, vcpus: u8) -> Result<f64, String> {
    let sock = dir.join("fc.sock");
    let mut child = fc_spawn(peer, &sock)?;
    let result = (|| {
        wait_socket(&sock)?;
        let rx = lines(&mut child)?;
        boot_over_api(
            &sock,
            probe,
            CMDLINE,
            &format!(r#"{{"vcpu_count":{vcpus},"mem_size_mib":{mib}}}"#),
        )?;
        wait_line(&rx, "PROBE snapshot waiting", Duration::from_secs(60))?;
        ok(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
        let t = Instant::now();
        ok(
            &sock,
            "PUT",
            "/snapshot/create",
            &format!(
                r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
                dir.join("vm.state").display(),
                dir.join("vm.mem").display()
            ),
        )?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    })();
    kill(child);
    result
}

/// Firecracker: one restore; exec → answer, ms.
fn fc_restore(peer: &Peer, dir: &Path) -> Result<f64, String> {
    let sock = dir.join("fc-restore.sock");
    let t0 = Instant::now();
    let mut child = fc_spawn(peer, &sock)?;
    let result = (|| {
        release_guest(&mut child)?;
        let rx = lines(&mut child)?;
        wait_socket(&sock)?;
        ok(
            &sock,
            "PUT",
            "/snapshot/load",
            &format!(
                r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true}}"#,
                dir.join("vm.state").display(),
                dir.join("vm.mem").display()
            ),
        )?;
        let (t, _) = wait_line(&rx, "PROBE snapshot ok", Duration::from_secs(30))?;
        Ok(t.duration_since(t0).as_secs_f64() * 1e3)
    })();
    kill(child);
    let _ = std::fs::remove_file(&sock);
    result
}

/// Ember: boots the probe to its wait over the API in a VMM with a fork socket, pauses it and
/// makes it a fork template; (the template's VMM, `PUT /fork/template` in ms).
fn ember_fork_template(
    peer: &Peer,
    probe: &Path,
    dir: &Path,
    mib: u64,
    vcpus: u8,
) -> Result<(Child, f64), String> {
    let sock = dir.join("template.sock");
    let mut child = Command::new(&peer.bin)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--fork-socket")
        .arg(dir.join("fork.sock"))
        .args(["--level", "Error"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", peer.bin.display()))?;
    let result = (|| {
        wait_socket(&sock)?;
        let rx = lines(&mut child)?;
        boot_over_api(
            &sock,
            probe,
            CMDLINE,
            &format!(r#"{{"vcpu_count":{vcpus},"mem_size_mib":{mib}}}"#),
        )?;
        wait_line(&rx, "PROBE snapshot waiting", Duration::from_secs(60))?;
        ok(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
        let t = Instant::now();
        ok(&sock, "PUT", "/fork/template", "{}")?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    })();
    match result {
        Ok(ms) => Ok((child, ms)),
        Err(e) => {
            kill(child);
            Err(e)
        }
    }
}

/// Ember: one fork in a new VMM process; exec → the fork's guest answered, ms.
fn ember_fork(peer: &Peer, dir: &Path) -> Result<f64, String> {
    let sock = dir.join("fork-api.sock");
    let t0 = Instant::now();
    let mut child = fc_spawn(peer, &sock)?;
    let result = (|| {
        release_guest(&mut child)?;
        let rx = lines(&mut child)?;
        wait_socket(&sock)?;
        ok(
            &sock,
            "PUT",
            "/fork/load",
            &format!(
                r#"{{"template_socket":"{}","resume_vm":true}}"#,
                dir.join("fork.sock").display()
            ),
        )?;
        let (t, _) = wait_line(&rx, "PROBE snapshot ok", Duration::from_secs(30))?;
        Ok(t.duration_since(t0).as_secs_f64() * 1e3)
    })();
    kill(child);
    let _ = std::fs::remove_file(&sock);
    result
}

/// Ember's forks by process at one size: a template, then `runs` forks one after the other.
fn fork_cell(peer: &Peer, probe: &Path, scratch: &Path, runs: usize, mib: u64, vcpus: u8) -> Cell {
    eprintln!(
        "xtask bench: forks by process, {} ({mib} MiB, {vcpus} vCPU, {runs} forks)",
        peer.name
    );
    let mut cell = Cell {
        peer: format!("{}, forks by process", peer.name),
        mib,
        vcpus,
        create_ms: None,
        answered: None,
        answered_p99: None,
        first_run: None,
        error: None,
        fork: true,
    };
    let dir: PathBuf = scratch.join(format!("fork-{mib}-{vcpus}"));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        cell.error = Some(e.to_string());
        return cell;
    }
    match ember_fork_template(peer, probe, &dir, mib, vcpus) {
        Ok((template, ms)) => {
            cell.create_ms = Some(ms);
            let mut answered = Vec::new();
            for _ in 0..runs {
                match ember_fork(peer, &dir) {
                    Ok(a) => answered.push(a),
                    Err(e) => {
                        cell.error = Some(format!("fork: {e}"));
                        break;
                    }
                }
            }
            kill(template);
            cell.answered = Summary::of(&answered);
            cell.answered_p99 = percentile(&answered, 99.0);
        }
        Err(e) => cell.error = Some(format!("template: {e}")),
    }
    let _ = std::fs::remove_dir_all(&dir);
    cell
}

/// Runs the section: every size for Ember and Firecracker.
pub fn run(
    peers: &[Peer],
    probe: &Path,
    scratch: &Path,
    runs: usize,
    sizes: &[(u64, u8)],
) -> Vec<Cell> {
    let mut cells = Vec::new();
    for p in peers
        .iter()
        .filter(|p| matches!(p.kind, Kind::Ember | Kind::Firecracker))
    {
        for &(mib, vcpus) in sizes {
            eprintln!(
                "xtask bench: snapshot/restore, {} ({mib} MiB, {vcpus} vCPU, {runs} restores)",
                p.name
            );
            let dir: PathBuf = scratch.join(format!("snapshot-{:?}-{mib}-{vcpus}", p.kind));
            let _ = std::fs::remove_dir_all(&dir);
            let mut cell = Cell {
                peer: p.name.clone(),
                mib,
                vcpus,
                create_ms: None,
                answered: None,
                answered_p99: None,
                first_run: None,
                error: None,
                fork: false,
            };
            if let Err(e) = std::fs::create_dir_all(&dir) {
                cell.error = Some(e.to_string());
                cells.push(cell);
                continue;
            }
            let is_ember = p.kind == Kind::Ember;
            let created = if is_ember {
                ember_create(p, probe, &dir, mib, vcpus)
            } else {
                fc_create(p, probe, &dir, mib, vcpus)
            };
            match created {
                Ok(ms) => cell.create_ms = Some(ms),
                Err(e) => cell.error = Some(format!("snapshot: {e}")),
            }
            let (mut answered, mut first) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                if cell.error.is_some() {
                    break;
                }
                let r = if is_ember {
                    ember_restore(p, &dir).map(|(a, f)| (a, Some(f)))
                } else {
                    fc_restore(p, &dir).map(|a| (a, None))
                };
                match r {
                    Ok((a, f)) => {
                        answered.push(a);
                        first.extend(f);
                    }
                    Err(e) => cell.error = Some(format!("restore: {e}")),
                }
            }
            cell.answered = Summary::of(&answered);
            cell.answered_p99 = percentile(&answered, 99.0);
            cell.first_run = Summary::of(&first);
            let _ = std::fs::remove_dir_all(&dir);
            cells.push(cell);
            if is_ember {
                cells.push(fork_cell(p, probe, scratch, runs, mib, vcpus));
            }
        }
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
        "### Snapshot and restore (probe guest, full snapshot, each VMM restoring its own)\n"
    );
    let _ = writeln!(
        s,
        "| VMM | memory | vCPUs | snapshot create, ms | exec → restored guest answered, ms (median, min–max) | p99, ms | exec → restored vCPU running, ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let f = |v: &Option<Summary>| v.map_or("–".to_string(), |x| x.fmt(2));
    for c in cells {
        let _ = writeln!(
            s,
            "| {} | {} MiB | {} | {} | {} | {} | {} |{}",
            c.peer,
            c.mib,
            c.vcpus,
            c.create_ms.map_or("–".into(), |v| format!("{v:.1}")),
            f(&c.answered),
            c.answered_p99.map_or("–".into(), |v| format!("{v:.2}")),
            f(&c.first_run),
            c.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"))
        );
    }
    if cells.iter().any(|c| c.fork) {
        let _ = writeln!(
            s,
            "\n\"Forks by process\": the template's VMM (`--fork-socket`) is booted over the API \
             to the wait and paused; its \"snapshot create\" is `PUT /fork/template`; each run \
             is a new `ember` process given `PUT /fork/load` with `resume_vm`, timed exec → \
             the fork's guest answered."
        );
    }
    // Ember's restores report their first KVM_RUN, its forks are marked: the rest is
    // Firecracker.
    let ember: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.first_run.is_some() || c.fork)
        .collect();
    for e in ember {
        if let Some(fc) = cells
            .iter()
            .find(|c| c.first_run.is_none() && !c.fork && c.mib == e.mib && c.vcpus == e.vcpus)
        {
            if let (Some(a), Some(b)) = (e.answered, fc.answered) {
                let _ = writeln!(
                    s,
                    "\n{} MiB, {} vCPU: {} ÷ {} restore {:.2}× (medians){}",
                    e.mib,
                    e.vcpus,
                    if e.fork { "Ember's fork" } else { "Ember" },
                    fc.peer,
                    a.median / b.median,
                    match (e.create_ms, fc.create_ms) {
                        (Some(x), Some(y)) if y > 0.0 => format!(
                            ", {} {:.3}×",
                            if e.fork {
                                "template ÷ snapshot create"
                            } else {
                                "snapshot create"
                            },
                            x / y
                        ),
                        _ => String::new(),
                    }
                );
            }
        }
    }
    let _ = writeln!(s);
}

/// Diff snapshots: one VMM's figures.
pub struct DiffCell {
    /// The VMM.
    pub peer: String,
    /// `PUT /snapshot/create` Full of the tracked VM, ms.
    pub full_ms: Option<Summary>,
    /// `PUT /snapshot/create` Diff after the guest dirtied 1 MiB, ms.
    pub diff_ms: Option<Summary>,
    /// Bytes the diff memory file holds (allocated), KiB, median.
    pub diff_kib: Option<f64>,
    /// Why a cell is empty.
    pub error: Option<String>,
}

/// The probe fills 1 MiB before each of its two waits (and marks it after the first).
const DIFF_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 probe=snapshot,snapshot probe.snapshot_ms=30000";

/// Boots the probe with dirty pages tracked over the Firecracker API (Ember in its Firecracker
/// mode, or Firecracker), takes a full snapshot at its first wait and a diff at its second;
/// (full ms, diff ms, diff file KiB).
fn api_diff(peer: &Peer, probe: &Path, dir: &Path) -> Result<(f64, f64, f64), String> {
    use std::os::unix::fs::MetadataExt;
    let sock = dir.join("diff.sock");
    let mut child = fc_spawn(peer, &sock)?;
    let create = |kind: &str, state: &str, mem: &str| -> Result<f64, String> {
        let t = Instant::now();
        ok(
            &sock,
            "PUT",
            "/snapshot/create",
            &format!(
                r#"{{"snapshot_type":"{kind}","snapshot_path":"{}","mem_file_path":"{}"}}"#,
                dir.join(state).display(),
                dir.join(mem).display()
            ),
        )?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let result = (|| {
        wait_socket(&sock)?;
        let rx = lines(&mut child)?;
        boot_over_api(
            &sock,
            probe,
            DIFF_CMDLINE,
            r#"{"vcpu_count":1,"mem_size_mib":128,"track_dirty_pages":true}"#,
        )?;
        wait_line(&rx, "PROBE snapshot waiting", Duration::from_secs(60))?;
        ok(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
        let full = create("Full", "full.state", "full.mem")?;
        ok(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#)?;
        release_guest(&mut child)?;
        wait_line(&rx, "PROBE snapshot waiting", Duration::from_secs(60))?;
        ok(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
        let diff = create("Diff", "diff.state", "diff.mem")?;
        let blocks = std::fs::metadata(dir.join("diff.mem"))
            .map_err(|e| e.to_string())?
            .blocks();
        #[allow(clippy::cast_precision_loss, reason = "a file's size in KiB")]
        Ok((full, diff, (blocks * 512) as f64 / 1024.0))
    })();
    kill(child);
    for f in [
        "full.state",
        "full.mem",
        "diff.state",
        "diff.mem",
        "diff.sock",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    result
}

/// Runs the diff-snapshot part: `runs` boots per VMM, Ember and Firecracker.
pub fn run_diff(peers: &[Peer], probe: &Path, scratch: &Path, runs: usize) -> Vec<DiffCell> {
    let mut cells = Vec::new();
    for p in peers
        .iter()
        .filter(|p| matches!(p.kind, Kind::Ember | Kind::Firecracker) && p.flags.is_empty())
    {
        eprintln!("xtask bench: diff snapshot, {} ({runs} boots)", p.name);
        let dir = scratch.join(format!("diff-{:?}", p.kind));
        let mut cell = DiffCell {
            peer: p.name.clone(),
            full_ms: None,
            diff_ms: None,
            diff_kib: None,
            error: None,
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            cell.error = Some(e.to_string());
            cells.push(cell);
            continue;
        }
        let (mut full, mut diff, mut kib) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            match api_diff(p, probe, &dir) {
                Ok((f, d, k)) => {
                    full.push(f);
                    diff.push(d);
                    kib.push(k);
                }
                Err(e) => {
                    cell.error = Some(e);
                    break;
                }
            }
        }
        cell.full_ms = Summary::of(&full);
        cell.diff_ms = Summary::of(&diff);
        cell.diff_kib = Summary::of(&kib).map(|s| s.median);
        let _ = std::fs::remove_dir_all(&dir);
        cells.push(cell);
    }
    cells
}

/// The diff-snapshot table.
pub fn diff_markdown(cells: &[DiffCell], s: &mut String) {
    use std::fmt::Write as _;
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "### Diff snapshot (probe guest, 128 MiB, 1 vCPU, dirty pages tracked, 1 MiB dirtied)\n\n\
         Over the Firecracker API for both VMMs: a full snapshot at the probe's first wait, then \
         the guest marks and refills its 1 MiB region and waits again, and a diff snapshot is \
         written into a new file. Times are the `PUT /snapshot/create` requests, answer \
         included; the diff's size is what its file allocates.\n"
    );
    let _ = writeln!(
        s,
        "| VMM | full snapshot, ms (median, min–max) | diff snapshot, ms | diff file, KiB |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    let f = |v: &Option<Summary>| v.map_or("–".to_string(), |x| x.fmt(2));
    for c in cells {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |{}",
            c.peer,
            f(&c.full_ms),
            f(&c.diff_ms),
            c.diff_kib.map_or("–".into(), |v| format!("{v:.0}")),
            c.error
                .as_ref()
                .map_or(String::new(), |e| format!(" ({e})"))
        );
    }
    if let (Some(e), Some(fc)) = (
        cells.iter().find(|c| c.peer.starts_with("Ember")),
        cells.iter().find(|c| c.peer.starts_with("Firecracker")),
    ) {
        if let (Some(a), Some(b)) = (e.diff_ms, fc.diff_ms) {
            let _ = writeln!(
                s,
                "\nEmber ÷ {}: diff snapshot {:.2}× (medians)",
                fc.peer,
                a.median / b.median
            );
        }
    }
    let _ = writeln!(s);
}
