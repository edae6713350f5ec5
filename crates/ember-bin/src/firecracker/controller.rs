//! The Firecracker-mode VMM: takes API requests (and a config file) one at a time on the main
//! thread, keeps the pre-boot configuration, boots the microVM on `InstanceStart` (its event
//! loop on a thread of its own), and carries out the post-boot requests through the VM's
//! handle. The process ends when the microVM does, as Firecracker's does.

use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_api::model::{
    ActionType, BalloonStats, ForkLoadParams, InstanceInfo, InstanceState, Logger as LoggerModel,
    Metrics as MetricsModel, RateLimiter, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    VmState,
};
use ember_api::{ApiCall, ApiRequest, ApiResponse, ServerCounters};
use ember_devices::rate_limiter::{BucketUpdate, TokenBucketConfig};
use ember_devices::virtio::balloon::{stat, BalloonCommand};
use ember_devices::virtio::block::{BlockCommand, FileDisk};
use ember_devices::virtio::net::NetCommand;
use ember_vmm::{DeviceControl, Vm, VmExit, VmHandle, VmOutcome};

use super::logger::{self, LogSettings};
use super::metrics::{self, ApiCounts, Metrics};
use super::resources::VmResources;

/// The API version Ember implements.
pub const FIRECRACKER_VERSION: &str = "1.16.1";

/// What the main thread waits for.
pub enum Event {
    /// An API request.
    Api(ApiCall),
    /// The microVM ended.
    VmEnded(Result<VmOutcome, ember_vmm::Error>),
}

const NOT_BEFORE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";
const NOT_AFTER_BOOT: &str = "The requested operation is not supported after starting the microVM.";

/// The controller's settings from the command line.
pub struct Settings {
    pub id: String,
    pub boot_timer: bool,
    pub startup_us: u64,
    pub startup_cpu_us: u64,
    /// The threads' seccomp filters.
    pub seccomp: ember_bin::seccomp::Setup,
}

struct Running {
    handle: VmHandle,
    paused: bool,
    boot_logged: bool,
}

/// Hands `template` to each VMM that connects to `listener`, one at a time, until the process
/// ends. A peer that does not take it within [`FORK_TRANSFER_TIMEOUT`] is dropped.
fn serve_forks(
    listener: &std::os::unix::net::UnixListener,
    template: &ember_vmm::Template,
    uid: libc::uid_t,
) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or memory: wait rather than spin.
                log::warn!("fork socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Err(e) = same_user(&stream, uid) {
            log::warn!("Refused a fork socket connection: {e}");
            continue;
        }
        let r = stream
            .set_write_timeout(Some(FORK_TRANSFER_TIMEOUT))
            .map_err(|e| e.to_string())
            .and_then(|()| template.send_to(&stream).map_err(|e| e.to_string()));
        match r {
            Ok(()) => log::info!("Sent the fork template to a VMM"),
            Err(e) => log::warn!("Could not send the fork template: {e}"),
        }
    }
}

/// Checks that the peer of `stream` runs as `me`, this process's effective user
/// (`SO_PEERCRED`): a fork template carries guest memory one way and host paths the fork opens
/// the other.
fn same_user(stream: &std::os::unix::net::UnixStream, me: libc::uid_t) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len =
        libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).map_err(|e| e.to_string())?;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred of that size.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!(
            "cannot read the peer's credentials: {}",
            std::io::Error::last_os_error()
        ));
    }
    if cred.uid != me {
        return Err(format!(
            "the peer (pid {}) runs as uid {}, this VMM as uid {me}",
            cred.pid, cred.uid
        ));
    }
    Ok(())
}

/// Firecracker's `network_overrides` and `vsock_override`, as a snapshot load and a fork
/// load take them.
fn apply_overrides(
    state: &mut ember_vmm::SnapshotState,
    network: &[ember_api::model::NetworkOverride],
    vsock: Option<&ember_api::model::VsockOverride>,
) -> Result<(), ember_vmm::SnapshotError> {
    for o in network {
        state.override_tap(&o.iface_id, &o.host_dev_name)?;
    }
    if let Some(v) = vsock {
        state.override_vsock(Path::new(&v.uds_path), None)?;
    }
    Ok(())
}

/// The controller.
pub struct Controller {
    settings: Settings,
    resources: VmResources,
    logger: Option<LoggerModel>,
    metrics_model: Option<MetricsModel>,
    metrics: Option<Metrics>,
    counts: ApiCounts,
    server: Option<Arc<ServerCounters>>,
    events: Sender<Event>,
    vm: Option<Running>,
    /// Boot-specific resources were configured (a snapshot load is then refused).
    boot_path: bool,
    /// What the VM reported at its end (for the last flush).
    ended: Option<VmOutcome>,
    last_flush: Instant,
    /// `--fork-socket`: bound at start-up, served once the microVM is a template.
    fork_listener: Option<std::os::unix::net::UnixListener>,
    /// This process's effective user, read before any seccomp filter (none allows geteuid).
    euid: libc::uid_t,
}

/// How long a fork's VMM waits for the whole template (and the template for each write to a
/// fork's VMM) before giving up.
const FORK_TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

fn done(r: Result<(), String>) -> ApiResponse {
    match r {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::bad_request(e),
    }
}

/// Firecracker's bucket update of a `PATCH`: an absent bucket stays, a bucket of size 0 or
/// refill time 0 is removed.
fn updates(r: &Option<RateLimiter>) -> (BucketUpdate, BucketUpdate) {
    let one = |b: &Option<ember_api::model::TokenBucket>| match b {
        None => BucketUpdate::Keep,
        Some(b) if b.size == 0 || b.refill_time == 0 => BucketUpdate::Disable,
        Some(b) => BucketUpdate::Set(TokenBucketConfig {
            size: b.size,
            one_time_burst: b.one_time_burst.unwrap_or(0),
            refill_time: Duration::from_millis(b.refill_time),
        }),
    };
    match r {
        None => (BucketUpdate::Keep, BucketUpdate::Keep),
        Some(r) => (one(&r.bandwidth), one(&r.ops)),
    }
}

impl Controller {
    pub fn new(settings: Settings, events: Sender<Event>) -> Self {
        Controller {
            settings,
            resources: VmResources::default(),
            logger: None,
            metrics_model: None,
            metrics: None,
            counts: ApiCounts::default(),
            server: None,
            events,
            vm: None,
            boot_path: false,
            ended: None,
            last_flush: Instant::now(),
            fork_listener: None,
            // SAFETY: geteuid has no preconditions.
            euid: unsafe { libc::geteuid() },
        }
    }

    /// `--fork-socket`: the microVM's guest memory goes in a memfd, so that, paused, it can
    /// become a fork template (`PUT /fork/template`) served on `listener`.
    pub fn set_fork_listener(&mut self, listener: std::os::unix::net::UnixListener) {
        self.fork_listener = Some(listener);
    }

    pub fn set_startup(&mut self, us: u64, cpu_us: u64) {
        self.settings.startup_us = us;
        self.settings.startup_cpu_us = cpu_us;
    }

    pub fn set_server_counters(&mut self, c: Arc<ServerCounters>) {
        self.server = Some(c);
    }

    pub fn resources_mut(&mut self) -> &mut VmResources {
        self.boot_path = true;
        &mut self.resources
    }

    /// `--log-path` and friends, or `PUT /logger`.
    pub fn configure_logger(&mut self, l: LoggerModel) -> Result<(), String> {
        let settings = LogSettings {
            level: l.level.unwrap_or(ember_api::model::LogLevel::Info),
            show_level: l.show_level.unwrap_or(false),
            show_origin: l.show_log_origin.unwrap_or(false),
            module: l.module.clone(),
        };
        logger::configure(settings, l.log_path.as_deref())?;
        self.logger = Some(l);
        Ok(())
    }

    /// `--metrics-path` or `PUT /metrics`.
    pub fn configure_metrics(&mut self, m: MetricsModel) -> Result<(), String> {
        if self.metrics.is_some() {
            return Err("Reinitialization of metrics not allowed.".into());
        }
        self.metrics = Some(Metrics::open(&m.metrics_path)?);
        self.metrics_model = Some(m);
        Ok(())
    }

    fn snapshot(&self) -> metrics::Snapshot {
        let (devices, exits, serial) = match (&self.ended, &self.vm) {
            (Some(o), _) => (o.devices.clone(), o.exits, Some(o.serial)),
            (None, Some(r)) => (
                r.handle.devices(),
                r.handle.exits(),
                r.handle.serial_counters(),
            ),
            (None, None) => (Vec::new(), ember_vmm::ExitCounts::default(), None),
        };
        metrics::Snapshot {
            startup_us: self.settings.startup_us,
            startup_cpu_us: self.settings.startup_cpu_us,
            api: self
                .counts
                .counts
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            api_server: self.server.as_ref().map_or([0, 0], |c| {
                [
                    c.sync_response_fails.load(Ordering::Relaxed),
                    c.sync_vmm_send_timeout_count.load(Ordering::Relaxed),
                ]
            }),
            devices,
            exits,
            serial,
            missed_log: 0,
        }
    }

    fn flush_metrics(&mut self) -> Result<(), String> {
        // Without a metrics destination a flush is a no-op, as in Firecracker.
        if self.metrics.is_none() {
            return Ok(());
        }
        let snap = self.snapshot();
        if let Some(m) = self.metrics.as_mut() {
            m.flush(&snap);
        }
        self.last_flush = Instant::now();
        Ok(())
    }

    fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            app_name: "Ember".into(),
            id: self.settings.id.clone(),
            state: match &self.vm {
                None => InstanceState::NotStarted,
                Some(r) if r.paused => InstanceState::Paused,
                Some(_) => InstanceState::Running,
            },
            vmm_version: FIRECRACKER_VERSION.into(),
        }
    }

    /// Boots the configured microVM.
    pub fn start(&mut self) -> Result<(), String> {
        if self.vm.is_some() {
            return Err(NOT_AFTER_BOOT.into());
        }
        let config = self.resources.vm_config()?;
        let mut builder = Vm::builder(config).fork_template(self.fork_listener.is_some());
        if let Some(t) = self.resources.cpu_template.clone() {
            builder = builder.cpu_template(t);
        }
        self.launch(builder, false, "Start microvm error")?;
        log::info!("Successfully started microvm");
        Ok(())
    }

    /// Builds the VM (serial output and input attached) and runs it on its own thread.
    fn launch(
        &mut self,
        mut builder: ember_vmm::VmBuilder,
        paused: bool,
        what: &str,
    ) -> Result<(), String> {
        if let Some(p) = self
            .resources
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.clone())
        {
            let f = logger::open_output(&p).map_err(|e| format!("serial_out_path: {e}"))?;
            builder = builder.serial_output_fd(f.into());
        }
        if let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() {
            builder = builder.serial_input(fd);
        }
        let vm = builder
            .start_paused(paused)
            .thread_hook(self.settings.seccomp.hook("fc_vmm"))
            .build()
            .map_err(|e| format!("{what}: {e}"))?;
        let handle = vm.handle();
        ember_bin::signals::STOP_FD.store(handle.stop_fd(), Ordering::SeqCst);
        let events = self.events.clone();
        std::thread::Builder::new()
            .name("fc_vmm".into())
            .spawn(move || {
                let r = vm.run();
                let _ = events.send(Event::VmEnded(r));
            })
            .map_err(|e| format!("{what}: cannot start its thread: {e}"))?;
        // This thread's filter after the VM thread started (which must not inherit it).
        if let Err(e) = self
            .settings
            .seccomp
            .enter(ember_bin::seccomp::Thread::Vmm, "fc_main")
        {
            handle.stop();
            return Err(format!("{what}: {e}"));
        }
        self.vm = Some(Running {
            handle,
            paused,
            boot_logged: false,
        });
        Ok(())
    }

    /// `PUT /snapshot/create`: a full or (`snapshot_type` `Diff`) diff snapshot of the paused
    /// microVM.
    fn create_snapshot(&mut self, p: &SnapshotCreateParams) -> Result<(), String> {
        let r = self.running()?;
        let diff = p.snapshot_type == Some(SnapshotType::Diff);
        if !r.paused {
            return Err("Create snapshot error: Cannot save the microVM state: \
                        Operation not allowed: the microVM is not paused"
                .into());
        }
        let t = Instant::now();
        let (state, memory) = (Path::new(&p.snapshot_path), Path::new(&p.mem_file_path));
        if diff {
            r.handle.diff_snapshot(state, memory)
        } else {
            r.handle.snapshot(state, memory)
        }
        .map_err(|e| format!("Create snapshot error: {e}"))?;
        log::info!(
            "'create {} snapshot' VMM action took {} us.",
            if diff { "diff" } else { "full" },
            t.elapsed().as_micros()
        );
        Ok(())
    }

    /// A load (of `what`) replaces the boot: refused once the microVM started or boot
    /// resources were configured, as Firecracker refuses a snapshot load.
    fn check_loadable(&self, what: &str) -> Result<(), String> {
        if self.vm.is_some() {
            return Err(NOT_AFTER_BOOT.into());
        }
        if self.boot_path {
            return Err(format!(
                "Loading {what} not allowed after configuring boot-specific resources."
            ));
        }
        Ok(())
    }

    /// `PUT /snapshot/load`: restores a snapshot instead of booting.
    fn load_snapshot(&mut self, p: &SnapshotLoadParams) -> Result<(), String> {
        self.check_loadable("a microVM snapshot")?;
        let t = Instant::now();
        let fail = |e: String| format!("Load snapshot error: Failed to restore from snapshot: {e}");
        let (mem_path, uffd) = match (&p.mem_backend, &p.mem_file_path) {
            (Some(b), None) if b.backend_type == "File" => (b.backend_path.clone(), false),
            (Some(b), None) if b.backend_type == "Uffd" => (b.backend_path.clone(), true),
            (Some(b), None) => {
                return Err(fail(format!(
                    "memory backend {:?} is not supported (File or Uffd)",
                    b.backend_type
                )))
            }
            (None, Some(f)) => (f.clone(), false),
            _ => {
                return Err("Load snapshot error: give exactly one of mem_backend and \
                            mem_file_path"
                    .into())
            }
        };
        let mut state = ember_vmm::read_snapshot(Path::new(&p.snapshot_path))
            .map_err(|e| fail(e.to_string()))?;
        if p.clock_realtime == Some(true) {
            state.advance_clock_to_now();
        }
        // Dirty pages are tracked from the restore on (for diff snapshots of the clone).
        state.config.track_dirty_pages =
            p.track_dirty_pages == Some(true) || p.enable_diff_snapshots == Some(true);
        apply_overrides(&mut state, &p.network_overrides, p.vsock_override.as_ref())
            .map_err(|e| fail(e.to_string()))?;
        let config = state.config.clone();
        let builder = if uffd {
            // The handler listening on the socket serves every page (Firecracker's handshake).
            ember_vmm::VmBuilder::restore_with_uffd(state, Path::new(&mem_path))
        } else {
            let memory =
                std::fs::File::open(&mem_path).map_err(|e| fail(format!("{mem_path}: {e}")))?;
            ember_vmm::VmBuilder::restore(state, memory, Path::new(&mem_path))
        };
        let paused = !p.resume_vm.unwrap_or(false);
        self.launch(
            builder,
            paused,
            "Load snapshot error: Failed to restore from snapshot",
        )?;
        // Only a load that worked changes what GET /machine-config and friends report.
        self.resources.adopt(&config);
        log::info!(
            "'load snapshot' VMM action took {} us.",
            t.elapsed().as_micros()
        );
        Ok(())
    }

    /// `PUT /fork/template`: the paused microVM becomes a fork template, and the fork socket
    /// hands it to every VMM that connects (`PUT /fork/load` there), on a thread of its own.
    fn create_fork_template(&mut self) -> Result<(), String> {
        let fail = |e: String| format!("Create fork template error: {e}");
        let r = self.running()?;
        if !r.paused {
            return Err(fail("the microVM is not paused".into()));
        }
        let handle = r.handle.clone();
        let Some(listener) = self.fork_listener.take() else {
            return Err(fail(
                "no fork socket: start the VMM with --fork-socket PATH (or the microVM is \
                 already a template)"
                    .into(),
            ));
        };
        let template = match handle.template() {
            Ok(t) => t,
            Err(e) => {
                self.fork_listener = Some(listener);
                return Err(fail(format!(
                    "{e} (only a microVM booted by this VMM with --fork-socket can be one; a \
                     restored or forked microVM cannot)"
                )));
            }
        };
        if !template.can_send() {
            // The VM is a template in this process now (remapped copy-on-write), but no other
            // process could rely on its memory.
            return Err(fail(
                "the kernel refused to seal the guest memory memfd, so no other process could \
                 rely on it"
                    .into(),
            ));
        }
        let t = Instant::now();
        // The thread inherits this thread's seccomp filter (vmm), which allows accept4,
        // sendmsg, setsockopt and getsockopt.
        std::thread::Builder::new()
            .name("fc_fork".into())
            .spawn({
                let uid = self.euid;
                move || serve_forks(&listener, &template, uid)
            })
            .map_err(|e| fail(format!("cannot start the fork thread: {e}")))?;
        log::info!(
            "'create fork template' VMM action took {} us.",
            t.elapsed().as_micros()
        );
        Ok(())
    }

    /// `PUT /fork/load`: the microVM is a fork of the template another VMM serves, instead of
    /// booting.
    fn load_fork(&mut self, p: &ForkLoadParams) -> Result<(), String> {
        self.check_loadable("a fork")?;
        let t = Instant::now();
        let fail = |e: String| format!("Load fork error: {e}");
        let path = Path::new(&p.template_socket);
        let socket = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| fail(format!("{}: {e}", path.display())))?;
        same_user(&socket, self.euid).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        let template = ember_vmm::Template::receive(&socket, path, FORK_TRANSFER_TIMEOUT)
            .map_err(|e| fail(e.to_string()))?;
        drop(socket);
        let mut state = template.state().clone();
        state.config.track_dirty_pages = p.track_dirty_pages == Some(true);
        apply_overrides(&mut state, &p.network_overrides, p.vsock_override.as_ref())
            .map_err(|e| fail(e.to_string()))?;
        for d in &p.drive_overrides {
            state
                .override_disk(&d.drive_id, Path::new(&d.path_on_host))
                .map_err(|e| fail(e.to_string()))?;
        }
        let config = state.config.clone();
        let builder = template.fork_with(state).map_err(|e| fail(e.to_string()))?;
        let paused = !p.resume_vm.unwrap_or(false);
        self.launch(builder, paused, "Load fork error")?;
        self.resources.adopt(&config);
        log::info!(
            "'load fork' VMM action took {} us.",
            t.elapsed().as_micros()
        );
        Ok(())
    }

    fn pre_boot<T>(
        &mut self,
        f: impl FnOnce(&mut VmResources) -> Result<T, String>,
    ) -> Result<T, String> {
        if self.vm.is_some() {
            return Err(NOT_AFTER_BOOT.into());
        }
        self.boot_path = true;
        f(&mut self.resources)
    }

    fn running(&self) -> Result<&Running, String> {
        self.vm.as_ref().ok_or_else(|| NOT_BEFORE_BOOT.to_string())
    }

    fn control(&self, id: &str) -> Result<DeviceControl, String> {
        self.running()?
            .handle
            .device_control(id)
            .ok_or_else(|| format!("No such device: {id}"))
    }

    fn balloon_stats(&self) -> Result<BalloonStats, String> {
        let b = self
            .resources
            .balloon
            .as_ref()
            .ok_or("No balloon device configured.")?;
        if b.stats_polling_interval_s == 0 {
            return Err("Statistics for the balloon device are not enabled".into());
        }
        let running = self.running()?;
        let Ok(DeviceControl::Balloon(h)) = self.control("balloon") else {
            return Err("No balloon device.".into());
        };
        let _ = running;
        let c = h.snapshot();
        let st = h.stats();
        let get = |t| st.get(t);
        Ok(BalloonStats {
            target_pages: c.target_pages,
            actual_pages: c.actual_pages,
            target_mib: c.target_pages / 256,
            actual_mib: c.actual_pages / 256,
            swap_in: get(stat::SWAP_IN),
            swap_out: get(stat::SWAP_OUT),
            major_faults: get(stat::MAJOR_FAULTS),
            minor_faults: get(stat::MINOR_FAULTS),
            free_memory: get(stat::FREE_MEMORY),
            total_memory: get(stat::TOTAL_MEMORY),
            available_memory: get(stat::AVAILABLE_MEMORY),
            disk_caches: get(stat::DISK_CACHES),
            hugetlb_allocations: get(stat::HUGETLB_ALLOCATIONS),
            hugetlb_failures: get(stat::HUGETLB_FAILURES),
        })
    }

    /// Carries out one request.
    pub fn handle(&mut self, req: &ApiRequest) -> ApiResponse {
        use ApiRequest::*;
        match req {
            GetInstanceInfo => ApiResponse::ok(&self.instance_info()),
            GetVersion => ApiResponse::ok(&ember_api::model::FirecrackerVersion {
                firecracker_version: FIRECRACKER_VERSION.into(),
            }),
            GetMachineConfig => ApiResponse::ok(&self.resources.machine),
            GetVmConfig => ApiResponse::ok(
                &self
                    .resources
                    .full(self.logger.clone(), self.metrics_model.clone()),
            ),
            Action(ActionType::InstanceStart) => done(self.start()),
            Action(ActionType::FlushMetrics) => done(self.flush_metrics()),
            Action(ActionType::SendCtrlAltDel) => done(
                self.running()
                    .and_then(|r| r.handle.send_ctrl_alt_del().map_err(|e| e.to_string())),
            ),
            PutBootSource(b) => done(self.pre_boot(|r| r.set_boot_source(b.clone()))),
            PutMachineConfig(m) => done(self.pre_boot(|r| r.set_machine(m.clone()))),
            PatchMachineConfig(m) => done(self.pre_boot(|r| r.patch_machine(m.clone()))),
            PutCpuConfig(c) => done(self.pre_boot(|r| r.set_cpu_config(c.clone()))),
            PutDrive(d) => done(self.pre_boot(|r| r.set_drive(d.clone()))),
            PutNetworkInterface(n) => done(self.pre_boot(|r| r.set_net(n.clone()))),
            PutVsock(v) => done(self.pre_boot(|r| r.set_vsock(v.clone()))),
            PutEntropy(e) => done(self.pre_boot(|r| {
                r.entropy = Some(e.clone());
                Ok(())
            })),
            PutBalloon(b) => done(self.pre_boot(|r| r.set_balloon(b.clone()))),
            // Not boot-specific: a restored VM's console goes there too.
            PutSerial(s) => done(if self.vm.is_some() {
                Err(NOT_AFTER_BOOT.into())
            } else {
                self.resources.set_serial(s.clone())
            }),
            PutLogger(l) => done(self.configure_logger(l.clone())),
            PutMetrics(m) => done(self.configure_metrics(m.clone())),
            // The configuration as last set (the device takes a new target a moment later).
            GetBalloon => match &self.resources.balloon {
                Some(b) => ApiResponse::ok(b),
                None => ApiResponse::bad_request("No balloon device configured."),
            },
            PatchBalloon(u) => done(self.patch_balloon(u.amount_mib)),
            GetBalloonStats => match self.balloon_stats() {
                Ok(s) => ApiResponse::ok(&s),
                Err(e) => ApiResponse::bad_request(e),
            },
            PatchBalloonStats(u) => done(self.patch_balloon_stats(u.stats_polling_interval_s)),
            PatchDrive(d) => done(self.patch_drive(d)),
            PatchNetworkInterface(n) => done(self.patch_net(n)),
            PatchVm(state) => done(self.patch_vm(*state)),
            CreateSnapshot(p) => done(self.create_snapshot(p)),
            LoadSnapshot(p) => done(self.load_snapshot(p)),
            CreateForkTemplate => done(self.create_fork_template()),
            LoadFork(p) => done(self.load_fork(p)),
            _ => ApiResponse::bad_request("Unsupported request."),
        }
    }

    fn patch_balloon(&mut self, mib: u32) -> Result<(), String> {
        if self.resources.balloon.is_none() {
            return Err("No balloon device configured.".into());
        }
        if u64::from(mib) > self.resources.machine.mem_size_mib {
            return Err(format!(
                "Amount of pages requested is too large: {mib} MiB for a {} MiB guest.",
                self.resources.machine.mem_size_mib
            ));
        }
        if let Some(r) = &self.vm {
            let active = r
                .handle
                .devices()
                .iter()
                .any(|d| d.id == "balloon" && d.activated);
            if !active {
                return Err("Balloon update error: Balloon: Device not activated yet.".into());
            }
        }
        let b = self
            .resources
            .balloon
            .as_mut()
            .ok_or("No balloon device configured.")?;
        b.amount_mib = mib;
        if self.vm.is_some() {
            match self.control("balloon")? {
                DeviceControl::Balloon(h) => h
                    .send(BalloonCommand::SetTargetPages(mib.saturating_mul(256)))
                    .map_err(|e| format!("The balloon is busy: {e}"))?,
                _ => return Err("No balloon device.".into()),
            }
        }
        Ok(())
    }

    fn patch_balloon_stats(&mut self, secs: u16) -> Result<(), String> {
        let b = self
            .resources
            .balloon
            .as_mut()
            .ok_or("No balloon device configured.")?;
        if self.vm.is_some() {
            if (b.stats_polling_interval_s == 0) != (secs == 0) {
                return Err("Cannot enable/disable balloon statistics after boot.".into());
            }
            b.stats_polling_interval_s = secs;
            match self.control("balloon")? {
                DeviceControl::Balloon(h) => h
                    .send(BalloonCommand::SetStatsInterval(Duration::from_secs(
                        u64::from(secs),
                    )))
                    .map_err(|e| format!("The balloon is busy: {e}"))?,
                _ => return Err("No balloon device.".into()),
            }
        } else {
            b.stats_polling_interval_s = secs;
        }
        Ok(())
    }

    fn patch_drive(&mut self, d: &ember_api::model::PartialDrive) -> Result<(), String> {
        let Some(existing) = self
            .resources
            .drives
            .iter()
            .find(|x| x.drive_id == d.drive_id)
        else {
            return Err(format!("Invalid block device ID: {}", d.drive_id));
        };
        let read_only = existing.is_read_only == Some(true);
        let DeviceControl::Block(tx) = self.control(&d.drive_id)? else {
            return Err(format!("{} is not a drive", d.drive_id));
        };
        if let Some(path) = &d.path_on_host {
            let disk = FileDisk::open(Path::new(path), read_only)
                .map_err(|e| format!("Unable to patch the block device: {e}"))?;
            tx.send(BlockCommand::ReplaceDisk(disk))
                .map_err(|e| format!("The drive is busy: {e}"))?;
        }
        if d.rate_limiter.is_some() {
            let (bandwidth, ops) = updates(&d.rate_limiter);
            tx.send(BlockCommand::UpdateRateLimiter { bandwidth, ops })
                .map_err(|e| format!("The drive is busy: {e}"))?;
        }
        if let Some(x) = self
            .resources
            .drives
            .iter_mut()
            .find(|x| x.drive_id == d.drive_id)
        {
            if let Some(p) = &d.path_on_host {
                x.path_on_host = Some(p.clone());
            }
            if d.rate_limiter.is_some() {
                x.rate_limiter = d.rate_limiter;
            }
        }
        Ok(())
    }

    fn patch_net(&mut self, n: &ember_api::model::PartialNetworkInterface) -> Result<(), String> {
        if !self.resources.nets.iter().any(|x| x.iface_id == n.iface_id) {
            return Err(format!("Invalid network interface ID: {}", n.iface_id));
        }
        let DeviceControl::Net(tx) = self.control(&n.iface_id)? else {
            return Err(format!("{} is not a network interface", n.iface_id));
        };
        let (rx_bandwidth, rx_ops) = updates(&n.rx_rate_limiter);
        let (tx_bandwidth, tx_ops) = updates(&n.tx_rate_limiter);
        tx.send(NetCommand::UpdateRateLimiters {
            rx_bandwidth,
            rx_ops,
            tx_bandwidth,
            tx_ops,
        })
        .map_err(|e| format!("The interface is busy: {e}"))?;
        Ok(())
    }

    fn patch_vm(&mut self, state: VmState) -> Result<(), String> {
        let r = self
            .vm
            .as_mut()
            .ok_or_else(|| NOT_BEFORE_BOOT.to_string())?;
        match state {
            VmState::Paused => {
                if !r.handle.pause() {
                    return Err("Failed to pause the vCPUs.".into());
                }
                r.paused = true;
                log::info!("VM paused");
            }
            VmState::Resumed => {
                r.handle.resume();
                r.paused = false;
                log::info!("VM resumed");
            }
        }
        Ok(())
    }

    fn log_boot_time(&mut self) {
        let boot_timer = self.settings.boot_timer;
        let at_end = self.ended.as_ref().and_then(|o| o.boot_time);
        if let Some(r) = self.vm.as_mut() {
            if !r.boot_logged {
                if let Some(t) = r.handle.boot_time().or(at_end) {
                    r.boot_logged = true;
                    if boot_timer {
                        log::info!(
                            "Guest-boot-time = {:>6} us {} ms",
                            t.as_micros(),
                            t.as_millis()
                        );
                    }
                }
            }
        }
    }

    /// Serves until the microVM ends; returns the process exit status.
    pub fn run(&mut self, events: Receiver<Event>) -> u8 {
        loop {
            // Wake often while the guest's boot time is still to log.
            let tick = match &self.vm {
                Some(r) if !r.boot_logged => Duration::from_millis(2),
                _ => metrics::FLUSH_INTERVAL
                    .checked_sub(self.last_flush.elapsed())
                    .unwrap_or(Duration::ZERO)
                    .max(Duration::from_millis(1)),
            };
            match events.recv_timeout(tick) {
                Ok(Event::Api(call)) => {
                    let resp = self.handle(&call.request);
                    let (group, name) = call.request.metric();
                    self.counts.record(group, name, resp.status >= 400);
                    if resp.status >= 400 {
                        log::warn!(
                            "API request {:?} refused: {}",
                            name,
                            resp.body.as_deref().unwrap_or("")
                        );
                    }
                    call.reply(resp);
                }
                Ok(Event::VmEnded(r)) => {
                    if let Ok(o) = &r {
                        self.ended = Some(o.clone());
                    }
                    self.log_boot_time();
                    let _ = self.flush_metrics();
                    ember_bin::signals::STOP_FD.store(-1, Ordering::SeqCst);
                    return match r {
                        Ok(o) => {
                            log::info!("Vmm is stopping: {}", o.exit);
                            if o.exit.is_clean() || o.exit == VmExit::Stopped {
                                0
                            } else {
                                1
                            }
                        }
                        Err(e) => {
                            log::error!("The microVM failed: {e}");
                            1
                        }
                    };
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return 0,
            }
            self.log_boot_time();
            if self.metrics.is_some() && self.last_flush.elapsed() >= metrics::FLUSH_INTERVAL {
                let _ = self.flush_metrics();
            }
        }
    }
}
