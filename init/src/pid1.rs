//! Stage 2: the running init.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloudlet_board::button::Event as ButtonEv;
use cloudlet_board::led::{ErrorClass, LedState};
use cloudlet_proto::bootstate::Slot;
use cloudlet_proto::control::{
    BoardInfo, ButtonEvent, ClockSource, DataInfo, Request, Response, ServiceInfo, Status,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::{self, ControlRequest};
use crate::logbuf::LogBuf;
use crate::manifest::Manifest;
use crate::supervisor::{Action, Event, ExitKind, Sig, Supervisor};
use crate::system::{self, disk, ext4, mounts, net, sntp};
use crate::{bootcommit, spawn};

/// The image's build time: a clock earlier than this has not been set.
const BUILD_EPOCH: u64 = 1_767_225_600; // 2026-01-01

#[derive(Debug, Clone)]
pub struct Options {
    pub manifest: PathBuf,
    /// Where passwd is read from.
    pub etc: PathBuf,
    pub control_socket: PathBuf,
    /// PID 1 duties: mounts, /data, network, clock, power off at the end.
    pub system: bool,
    /// The boot disk (stage 1 passes it on).
    pub disk: Option<PathBuf>,
    pub slot: Option<Slot>,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    PowerOff,
    Reboot,
    /// Not PID 1: just exit once services are stopped.
    Exit,
}

enum Msg {
    Ready { svc: usize, pid: u32 },
    Control(ControlRequest),
    PowerKey,
    Clock(ClockSource),
    Button(ButtonEv),
}

/// How long the pairing window a short press opens stays open.
const PAIRING_WINDOW: Duration = Duration::from_secs(60);
/// How long the factory-reset gesture waits for its confirming press.
const RESET_CONFIRM: Duration = Duration::from_secs(15);
/// Button events kept for `events` requests.
const EVENTS_KEPT: usize = 64;

struct Init {
    opts: Options,
    sup: Supervisor,
    logs: Vec<Arc<Mutex<LogBuf>>>,
    vars: BTreeMap<String, String>,
    tx: mpsc::UnboundedSender<Msg>,
    shutdown: Option<ShutdownMode>,
    hostname: String,
    data: Option<DataInfo>,
    clock: ClockSource,
    boot_mounted: bool,
    board: Option<crate::board::Running>,
    /// What the LEDs show when nothing temporary (pairing) is on.
    led_base: LedState,
    led_now: LedState,
    pairing_until: Option<Instant>,
    events: VecDeque<ButtonEvent>,
    event_seq: tokio::sync::watch::Sender<u64>,
}

/// Runs init until shutdown. As PID 1 this does not return: it powers off or reboots.
pub fn run(opts: Options) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(main(opts))
}

async fn main(opts: Options) -> Result<(), String> {
    let started = system::uptime();
    tracing::info!(
        version = crate::VERSION,
        system = opts.system,
        "cloudlet-init starting (uptime {:.3} s)",
        started.as_secs_f64()
    );
    let mut vars = BTreeMap::new();
    vars.insert("CLOUDLET_VERSION".to_owned(), crate::VERSION.to_owned());
    vars.insert(
        "CLOUDLET_DATA".to_owned(),
        opts.data_dir.display().to_string(),
    );
    vars.insert(
        "CLOUDLET_CONTROL_SOCKET".to_owned(),
        opts.control_socket.display().to_string(),
    );
    if let Some(s) = opts.slot {
        vars.insert("CLOUDLET_SLOT".to_owned(), s.to_string());
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
    let mut hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut data = None;
    let mut clock = clock_source();
    let mut board = None;
    if opts.system {
        for problem in mounts::early() {
            tracing::error!("{problem}");
        }
        let btx = tx.clone();
        board = crate::board::start(move |e| {
            let _ = btx.send(Msg::Button(e));
        });
        match &board {
            Some(b) => tracing::info!(board = b.name, watchdog = b.watchdog, "board"),
            None => tracing::info!("no known board: no LEDs or button"),
        }
        let wipe = match &board {
            Some(b) if b.held_at_start => factory_reset_gesture(b, &mut rx).await,
            _ => false,
        };
        if wipe {
            if let Some(disk) = &opts.disk {
                wipe_data(disk);
            }
        }
        let (h, d) = system_boot(&opts, &mut vars);
        hostname = h;
        data = d;
        clock = clock_source();
        watch_power_keys(tx.clone());
    } else if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a subreaper; orphans go to the real init");
    }
    vars.insert("CLOUDLET_HOSTNAME".to_owned(), hostname.clone());

    let manifest = load_manifest(&opts.manifest);
    let services: Vec<_> = manifest
        .map(|m| m.services)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| match &s.only_if {
            Some(v) => vars.contains_key(v),
            None => true,
        })
        .collect();
    for s in &services {
        prepare_state_dirs(s, &opts.etc);
    }
    let logs = services
        .iter()
        .map(|s| Arc::new(Mutex::new(LogBuf::new(s.log_lines))))
        .collect();

    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<ControlRequest>();
    let (seq_tx, seq_rx) = tokio::sync::watch::channel(0u64);
    match control::bind(&opts.control_socket) {
        Ok(l) => {
            tokio::spawn(control::serve(l, ctl_tx, seq_rx));
        }
        Err(e) => {
            tracing::error!(error = %e, path = %opts.control_socket.display(), "control socket unavailable")
        }
    }
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(r) = ctl_rx.recv().await {
                if tx.send(Msg::Control(r)).is_err() {
                    return;
                }
            }
        });
    }

    // No services (a manifest that failed to load, or names none) is never
    // a healthy boot: the supervisor never reports all ready, so the slot
    // is not committed and the boot counter falls back; the LED says so.
    let led_base = if init_data_failed(&opts, &data) {
        LedState::Error(ErrorClass::Storage)
    } else if services.is_empty() {
        tracing::error!("no services to run; this boot will not be marked good");
        LedState::Error(ErrorClass::Service)
    } else {
        LedState::Booting
    };
    let mut init = Init {
        opts,
        sup: Supervisor::new(services),
        logs,
        vars,
        tx,
        shutdown: None,
        hostname,
        data,
        clock,
        boot_mounted: false,
        board,
        led_base,
        led_now: LedState::Off,
        pairing_until: None,
        events: VecDeque::new(),
        event_seq: seq_tx,
    };
    init.show_led();

    let sig = |k| signal(k).map_err(|e| format!("signal handler: {e}"));
    let mut sigchld = sig(SignalKind::child())?;
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sigint = sig(SignalKind::interrupt())?;
    if init.opts.system {
        // Ctrl-Alt-Del becomes SIGINT to init instead of an instant reboot.
        let _ = nix::sys::reboot::set_cad_enabled(false);
    }

    init.start();
    let mut pet = tokio::time::interval(Duration::from_secs(10));
    pet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let has_watchdog = init.board.as_ref().is_some_and(|b| b.watchdog);
    loop {
        let deadline = [init.sup.next_deadline(), init.pairing_until]
            .into_iter()
            .flatten()
            .min();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigchld.recv() => init.reap(),
            _ = sigterm.recv() => init.begin_shutdown(if init.opts.system { ShutdownMode::PowerOff } else { ShutdownMode::Exit }, "SIGTERM"),
            _ = sigint.recv() => init.begin_shutdown(if init.opts.system { ShutdownMode::Reboot } else { ShutdownMode::Exit }, "SIGINT"),
            Some(m) = rx.recv() => init.message(m),
            _ = sleep => {
                init.event(Event::Tick);
                init.pairing_timeout();
            }
            // The watchdog is fed only from here: if this loop stops, the board resets.
            _ = pet.tick(), if has_watchdog => {
                if let Some(b) = &init.board {
                    b.handle.pet();
                }
            }
        }
        if init.shutdown.is_some() && init.sup.shutting_down() && init.done_stopping() {
            break;
        }
    }
    let mode = init.shutdown.unwrap_or(ShutdownMode::Exit);
    if let Some(b) = &init.board {
        b.handle.led(LedState::Off);
    }
    if init.opts.system {
        final_shutdown(mode, init.boot_mounted).await;
    }
    tracing::info!("all services stopped");
    Ok(())
}

/// The manifest, or `None` (logged) when it cannot be read or parsed.
fn load_manifest(path: &Path) -> Option<Manifest> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the service manifest; running no services");
            return None;
        }
    };
    match Manifest::parse(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(path = %path.display(), "{e}; running no services");
            None
        }
    }
}

fn prepare_state_dirs(s: &crate::manifest::ServiceSpec, etc: &Path) {
    let owner = s
        .user
        .as_deref()
        .and_then(|u| crate::users::lookup(etc, u).ok());
    for d in &s.state_dirs {
        if let Err(e) = std::fs::create_dir_all(d) {
            tracing::warn!(service = %s.name, dir = %d.display(), error = %e, "cannot create state dir");
            continue;
        }
        if let Some(u) = &owner {
            let _ = nix::unistd::chown(d, Some(u.uid.into()), Some(u.gid.into()));
        }
    }
}

fn clock_source() -> ClockSource {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if now < BUILD_EPOCH {
        ClockSource::Unset
    } else {
        ClockSource::Rtc
    }
}

impl Init {
    fn message(&mut self, m: Msg) {
        match m {
            Msg::Ready { svc, pid } => {
                self.note(svc, format!("ready, pid {pid}"));
                self.event(Event::Ready { svc, pid });
                // A service given up on and then restarted by hand clears the error.
                if self.led_base == LedState::Error(ErrorClass::Service) && self.all_ready_now() {
                    self.led_base = LedState::Ready;
                    self.show_led();
                }
            }
            Msg::Control(c) => {
                let resp = self.control(c.request);
                let _ = c.reply.send(resp);
            }
            Msg::PowerKey => self.begin_shutdown(ShutdownMode::PowerOff, "power button"),
            Msg::Clock(c) => self.clock = c,
            Msg::Button(e) => self.button(e),
        }
    }

    fn button(&mut self, e: ButtonEv) {
        let kind = match e {
            ButtonEv::Short => "short-press",
            ButtonEv::Long => "long-press",
            ButtonEv::VeryLong => "very-long-press",
            ButtonEv::LongReached => {
                // Feedback while held: dark means "let go to power off".
                if let Some(b) = &self.board {
                    b.handle.led(LedState::Off);
                }
                return;
            }
            ButtonEv::Pressed | ButtonEv::VeryLongReached | ButtonEv::HeldAtBoot => return,
        };
        tracing::info!(kind, "button");
        self.publish(kind);
        match e {
            ButtonEv::Short => {
                // A short press opens the pairing window; a second one closes it.
                self.pairing_until = match self.pairing_until {
                    Some(_) => None,
                    None => Some(Instant::now() + PAIRING_WINDOW),
                };
                self.show_led();
            }
            _ => self.begin_shutdown(ShutdownMode::PowerOff, "long press"),
        }
    }

    fn publish(&mut self, kind: &str) {
        let seq = self.events.back().map(|e| e.seq + 1).unwrap_or(1);
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(ButtonEvent {
            seq,
            kind: kind.to_owned(),
            uptime_ms: system::uptime().as_millis() as u64,
        });
        let _ = self.event_seq.send(seq);
    }

    fn pairing_timeout(&mut self) {
        if self.pairing_until.is_some_and(|t| t <= Instant::now()) {
            self.pairing_until = None;
            self.show_led();
        }
    }

    /// Every service is ready right now.
    fn all_ready_now(&self) -> bool {
        (0..self.sup.specs().len()).all(|i| {
            self.sup
                .runtime(i)
                .is_some_and(|r| r.state == cloudlet_proto::control::ServiceState::Ready)
        })
    }

    fn show_led(&mut self) {
        let want = if self.shutdown.is_some() {
            LedState::Booting
        } else if self.pairing_until.is_some() {
            LedState::Pairing
        } else {
            self.led_base
        };
        if want != self.led_now {
            self.led_now = want;
            if let Some(b) = &self.board {
                b.handle.led(want);
            }
        }
    }

    fn control(&mut self, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Logs { service, lines } => match self.sup.index_of(&service) {
                Some(i) => {
                    let lines = self
                        .logs
                        .get(i)
                        .map(|l| l.lock().map(|b| b.tail(lines)).unwrap_or_default())
                        .unwrap_or_default();
                    Response::Logs { service, lines }
                }
                None => Response::Error {
                    message: format!("no service named {service:?}"),
                },
            },
            Request::Restart { service } => match self.sup.index_of(&service) {
                Some(svc) => {
                    if self.shutdown.is_some() {
                        return Response::Error {
                            message: "shutting down".into(),
                        };
                    }
                    self.note(svc, "restart requested over the control socket".into());
                    self.event(Event::RestartRequested { svc });
                    Response::Accepted
                }
                None => Response::Error {
                    message: format!("no service named {service:?}"),
                },
            },
            Request::Events { after, .. } => Response::Events {
                events: self
                    .events
                    .iter()
                    .filter(|e| e.seq > after)
                    .cloned()
                    .collect(),
            },
            Request::Reboot => {
                self.begin_shutdown(ShutdownMode::Reboot, "control request");
                Response::Accepted
            }
            Request::PowerOff => {
                self.begin_shutdown(ShutdownMode::PowerOff, "control request");
                Response::Accepted
            }
        }
    }

    fn status(&self) -> Status {
        let services = self
            .sup
            .specs()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let r = self.sup.runtime(i)?;
                Some(ServiceInfo {
                    name: s.name.clone(),
                    state: r.state,
                    pid: r.pid,
                    restarts: r.restarts,
                    last_exit: r.last_exit.clone(),
                    rss_kib: r.pid.and_then(system::rss_kib),
                })
            })
            .collect();
        let mut data = self.data.clone();
        if let Some(d) = data.as_mut() {
            if let Some((size, free)) = ext4::space(&self.opts.data_dir) {
                d.size_bytes = size;
                d.free_bytes = free;
            }
        }
        Status {
            hostname: self.hostname.clone(),
            version: crate::VERSION.to_owned(),
            slot: self.opts.slot.map(|s| s.to_string()),
            clock: self.clock,
            data,
            all_ready: self.sup.all_ready(),
            uptime_ms: system::uptime().as_millis() as u64,
            init_rss_kib: system::rss_kib(std::process::id()),
            services,
            board: self.board.as_ref().map(|b| BoardInfo {
                name: b.name.to_owned(),
                led: led_name(self.led_now),
                watchdog: b.watchdog,
                power: b.power.clone(),
            }),
        }
    }

    fn service_name(&self, svc: usize) -> String {
        self.sup
            .specs()
            .get(svc)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    fn note(&self, svc: usize, line: String) {
        if let Some(Ok(mut b)) = self.logs.get(svc).map(|l| l.lock()) {
            if b.has_partial() {
                b.flush_partial();
            }
            let t = system::uptime();
            b.push_line(format!(
                "[init {}.{:03}] {line}",
                t.as_secs(),
                t.subsec_millis()
            ));
        }
    }

    fn begin_shutdown(&mut self, mode: ShutdownMode, why: &str) {
        if self.shutdown.is_some() {
            return;
        }
        tracing::info!(reason = why, ?mode, "orderly shutdown");
        self.shutdown = Some(mode);
        self.show_led();
        self.event(Event::ShutdownRequested);
    }

    fn done_stopping(&self) -> bool {
        (0..self.sup.specs().len()).all(|i| self.sup.runtime(i).is_none_or(|r| r.pid.is_none()))
    }

    fn start(&mut self) {
        let actions = self.sup.start(Instant::now());
        let mut queue = VecDeque::from(self.apply(actions));
        while let Some(e) = queue.pop_front() {
            let actions = self.sup.handle(e, Instant::now());
            queue.extend(self.apply(actions));
        }
    }

    fn event(&mut self, e: Event) {
        let mut queue = VecDeque::from([e]);
        while let Some(e) = queue.pop_front() {
            let actions = self.sup.handle(e, Instant::now());
            queue.extend(self.apply(actions));
        }
    }

    /// Carries out actions; returns the events they caused.
    fn apply(&mut self, actions: Vec<Action>) -> Vec<Event> {
        let mut events = Vec::new();
        for a in actions {
            match a {
                Action::Spawn(svc) => events.push(self.spawn(svc)),
                Action::Signal { svc, pid, sig } => {
                    let s = match sig {
                        Sig::Term => Signal::SIGTERM,
                        Sig::Kill => Signal::SIGKILL,
                    };
                    self.note(svc, format!("sending {}", s.as_str()));
                    // The whole process group: a service's own children go too.
                    if kill(Pid::from_raw(-(pid as i32)), s).is_err() {
                        let _ = kill(Pid::from_raw(pid as i32), s);
                    }
                }
                Action::AllReady => {
                    if self.led_base == LedState::Booting {
                        self.led_base = LedState::Ready;
                        self.show_led();
                    }
                    let up = system::uptime();
                    tracing::info!("all services ready (uptime {:.3} s)", up.as_secs_f64());
                    if self.opts.system {
                        self.commit_boot();
                        // Network time is not needed to serve; ask once the boot's work is done.
                        if self.clock != ClockSource::Ntp {
                            sntp_task(self.tx.clone());
                        }
                    }
                }
                Action::GaveUp(svc) => {
                    let name = self.service_name(svc);
                    tracing::error!(service = %name, "service failed too often; giving up until restarted");
                    self.led_base = LedState::Error(ErrorClass::Service);
                    self.show_led();
                    self.note(
                        svc,
                        "failed too often; init gave up (restart it to try again)".into(),
                    );
                }
                Action::ShutdownComplete => {}
            }
        }
        events
    }

    fn spawn(&mut self, svc: usize) -> Event {
        let Some(spec) = self.sup.specs().get(svc) else {
            return Event::SpawnFailed {
                svc,
                error: "unknown service".into(),
            };
        };
        match spawn::spawn(spec, &self.opts.etc, &self.vars) {
            Ok(s) => {
                tracing::debug!(service = %spec.name, pid = s.pid, "started");
                if let (Some(fd), Some(buf)) = (s.output, self.logs.get(svc)) {
                    tokio::spawn(read_output(fd, buf.clone()));
                }
                if let Some(fd) = s.ready {
                    tokio::spawn(read_ready(fd, svc, s.pid, self.tx.clone()));
                }
                self.note(svc, format!("started, pid {}", s.pid));
                Event::Spawned { svc, pid: s.pid }
            }
            Err(error) => {
                tracing::warn!(service = %spec.name, %error, "could not start");
                self.note(svc, format!("could not start: {error}"));
                Event::SpawnFailed { svc, error }
            }
        }
    }

    /// Reaps every child that has exited: services and orphans alike.
    fn reap(&mut self) {
        loop {
            let (pid, how) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitKind::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, ExitKind::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            let pid = pid.as_raw() as u32;
            if let Some(svc) = self.sup.index_of_pid(pid) {
                let name = self.service_name(svc);
                if self.shutdown.is_none() {
                    tracing::warn!(service = %name, pid, "exited: {}", how.describe());
                }
                self.note(svc, format!("exited: {}", how.describe()));
                self.event(Event::Exited { svc, pid, how });
            }
        }
    }

    fn commit_boot(&mut self) {
        let (Some(disk), Some(slot)) = (self.opts.disk.clone(), self.opts.slot) else {
            return;
        };
        let dev = disk::partition_path(&disk, disk::PART_BOOT);
        let target = "/boot";
        let r = mounts::mount_fs(
            &dev.to_string_lossy(),
            target,
            "vfat",
            nix::mount::MsFlags::MS_NOATIME,
            None,
        )
        .and_then(|()| {
            self.boot_mounted = true;
            bootcommit::commit(Path::new(target), slot)
        });
        match r {
            Ok(c) => tracing::info!(slot = %slot, "boot marked good: {c:?}"),
            Err(e) => tracing::error!(slot = %slot, error = %e, "could not mark the boot good"),
        }
        if self.boot_mounted {
            match mounts::unmount_or_readonly(target) {
                Ok(()) => self.boot_mounted = false,
                Err(e) => tracing::warn!(error = %e, "boot partition"),
            }
        }
    }
}

async fn read_output(fd: OwnedFd, buf: Arc<Mutex<LogBuf>>) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut chunk = [0u8; 4096];
    loop {
        match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let (Ok(mut b), Some(bytes)) = (buf.lock(), chunk.get(..n)) {
                    b.push_bytes(bytes);
                }
            }
        }
    }
    if let Ok(mut b) = buf.lock() {
        if b.has_partial() {
            b.flush_partial();
        }
    }
}

async fn read_ready(fd: OwnedFd, svc: usize, pid: u32, tx: mpsc::UnboundedSender<Msg>) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut got = Vec::new();
    let mut chunk = [0u8; 64];
    while got.len() < 1024 {
        match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
        }
        if got.windows(5).any(|w| w == b"READY") {
            let _ = tx.send(Msg::Ready { svc, pid });
            return;
        }
    }
}

/// Keeps trying SNTP with growing pauses (10 s doubling to an hour) until
/// the clock is set. A plain thread that sleeps between tries: it costs the
/// idle box one wake-up per try and nothing else.
fn sntp_task(tx: mpsc::UnboundedSender<Msg>) {
    let servers: Vec<String> = std::fs::read_to_string("/etc/cloudlet/ntp-servers")
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if servers.is_empty() {
        tracing::info!("no NTP servers configured");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("sntp".into())
        .spawn(move || {
            let mut pause = Duration::from_secs(10);
            loop {
                for s in &servers {
                    match sntp::query(s, Duration::from_secs(3)) {
                        Ok(t) => match sntp::set_clock(t) {
                            Ok(()) => {
                                tracing::info!(server = %s, "clock set by SNTP");
                                let _ = tx.send(Msg::Clock(ClockSource::Ntp));
                                return;
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot set the clock"),
                        },
                        Err(e) => tracing::debug!(error = %e, "SNTP"),
                    }
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(3600));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start SNTP");
    }
}

/// Sends PowerKey when any input device reports KEY_POWER pressed
/// (gpio-keys on the board's power line; QEMU's `system_powerdown`).
fn watch_power_keys(tx: mpsc::UnboundedSender<Msg>) {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let Ok(dir) = std::fs::read_dir("/dev/input") else {
        return;
    };
    for e in dir.flatten() {
        if !e.file_name().to_string_lossy().starts_with("event") {
            continue;
        }
        let path = e.path();
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("power-key".into())
            .spawn(move || {
                use std::io::Read;
                let Ok(mut f) = std::fs::File::open(&path) else {
                    return;
                };
                // struct input_event on 64-bit: 16 bytes of time, u16 type, u16 code, i32 value.
                let mut ev = [0u8; 24];
                while f.read_exact(&mut ev).is_ok() {
                    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
                    let code = u16::from_ne_bytes([ev[18], ev[19]]);
                    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
                    if ty == EV_KEY
                        && code == KEY_POWER
                        && value == 1
                        && tx.send(Msg::PowerKey).is_err()
                    {
                        return;
                    }
                }
            });
    }
}

/// PID 1's boot work before services start. Problems are logged and the box
/// carries on in the safest state it can: it never stops here.
fn system_boot(opts: &Options, vars: &mut BTreeMap<String, String>) -> (String, Option<DataInfo>) {
    if let Err(e) = net::link_up("lo") {
        tracing::error!(error = %e, "loopback");
    }
    let data = match &opts.disk {
        Some(disk) => match prepare_data(disk, &opts.data_dir) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::error!(error = %e, "data partition unavailable; services that need /data will fail");
                None
            }
        },
        None => {
            tracing::error!("no boot disk known; /data not mounted");
            None
        }
    };
    let hostname = hostname(&opts.data_dir);
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        tracing::error!(error = %e, "sethostname");
    }
    match net::first_ethernet(Path::new("/sys/class/net")) {
        Some(iface) => {
            if let Err(e) = net::link_up(&iface) {
                tracing::error!(error = %e, "network interface");
            }
            vars.insert("CLOUDLET_NET_IFACE".to_owned(), iface);
        }
        None => tracing::warn!("no Ethernet interface; running without network"),
    }
    if std::path::Path::new("/dev/ttyAMA0").exists()
        || std::path::Path::new("/dev/console").exists()
    {
        vars.insert("CLOUDLET_CONSOLE".to_owned(), "/dev/console".to_owned());
    }
    match clock_source() {
        ClockSource::Unset => {
            tracing::warn!("clock not set (no RTC); times are wrong until SNTP succeeds")
        }
        c => tracing::info!(clock = ?c, "clock"),
    }
    (hostname, data)
}

fn hostname(data_dir: &Path) -> String {
    let path = data_dir.join("init/hostname");
    if let Some(h) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| net::valid_hostname(&t))
    {
        return h;
    }
    let h = net::new_hostname();
    let tmp = data_dir.join("init/hostname.tmp");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(data_dir.join("init"))?;
        std::fs::write(&tmp, format!("{h}\n"))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir.join("init"))?.sync_all()
    };
    if let Err(e) = write() {
        tracing::warn!(error = %e, "cannot store the hostname; it changes at next boot");
    }
    h
}

/// Finds, creates, grows, checks and mounts the data partition.
fn prepare_data(disk: &Path, target: &Path) -> Result<DataInfo, String> {
    let dev = disk::partition_path(disk, disk::PART_DATA);
    let mut info = DataInfo {
        device: dev.display().to_string(),
        ..DataInfo::default()
    };
    match disk::grow_data_partition(disk) {
        Ok(Some(bytes)) => {
            tracing::info!(device = %dev.display(), bytes, "data partition grown to the end of the disk");
            info.grown = true;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot grow the data partition"),
    }
    let sb = ext4::read(&dev).map_err(|e| format!("reading {}: {e}", dev.display()))?;
    match sb {
        None => {
            tracing::info!(device = %dev.display(), "no filesystem on the data partition: making one");
            ext4::mkfs(&dev, "cloudlet-data")?;
            info.created = true;
            info.was_clean = true;
        }
        Some(sb) => {
            info.was_clean = sb.clean;
            if sb.clean {
                tracing::info!(device = %dev.display(), "data partition was unmounted cleanly");
            } else {
                tracing::warn!(device = %dev.display(), recovery = sb.needs_recovery, errors = sb.has_errors, "data partition was not unmounted cleanly");
            }
            if sb.has_errors {
                ext4::fsck(&dev)?;
            }
        }
    }
    mounts::mount_fs(
        &dev.to_string_lossy(),
        &target.to_string_lossy(),
        "ext4",
        nix::mount::MsFlags::MS_NOATIME | nix::mount::MsFlags::MS_NODEV,
        None,
    )?;
    if !info.created {
        if let (Ok(Some(sb)), Some(part_sectors)) = (ext4::read(&dev), disk::sectors(&dev)) {
            let want = part_sectors * 512 / sb.block_size;
            if want > sb.blocks + (1 << 20) / sb.block_size {
                ext4::resize_online(target, want)?;
                tracing::info!(blocks = want, "data filesystem grown");
                info.grown = true;
            }
        }
    }
    if let Some((size, free)) = ext4::space(target) {
        info.size_bytes = size;
        info.free_bytes = free;
    }
    Ok(info)
}

/// After every service stopped: the rest of the processes, then the disks, then the power.
async fn final_shutdown(mode: ShutdownMode, boot_mounted: bool) {
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Err(_) => break,
            Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(_) => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while let Ok(s) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
    nix::unistd::sync();
    if boot_mounted {
        let _ = mounts::unmount_or_readonly("/boot");
    }
    match mounts::unmount_or_readonly("/data") {
        Ok(()) => tracing::info!("data unmounted cleanly"),
        Err(e) => tracing::error!(error = %e, "data"),
    }
    nix::unistd::sync();
    let how = match mode {
        ShutdownMode::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
        _ => nix::sys::reboot::RebootMode::RB_POWER_OFF,
    };
    tracing::info!(?mode, "goodbye");
    crate::logging::flush(Duration::from_secs(3));
    let _ = nix::sys::reboot::reboot(how);
    // reboot() only returns on failure. PID 1 must not exit: wait forever.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

fn led_name(s: LedState) -> String {
    match s {
        LedState::Off => "off".into(),
        LedState::Booting => "booting".into(),
        LedState::Ready => "ready".into(),
        LedState::Pairing => "pairing".into(),
        LedState::Updating => "updating".into(),
        LedState::ResetArmed => "reset-armed".into(),
        LedState::Error(c) => format!("error-{}", c as u32),
    }
}

fn init_data_failed(opts: &Options, data: &Option<DataInfo>) -> bool {
    opts.system && data.is_none()
}

/// The button was held when the board started: if it stays held for the
/// very-long time, arm a factory reset, then wait for one confirming short
/// press. Returns true only when confirmed. Nothing is touched before that.
async fn factory_reset_gesture(
    board: &crate::board::Running,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
) -> bool {
    tracing::warn!("button held at boot: keep holding 10 s to arm a factory reset");
    let mut armed = false;
    let limit = tokio::time::Instant::now() + Duration::from_secs(12) + RESET_CONFIRM;
    loop {
        let msg = tokio::time::timeout_at(limit, rx.recv()).await;
        let e = match msg {
            Ok(Some(Msg::Button(e))) => e,
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        };
        tracing::debug!(event = ?e, armed, "button during the reset gesture");
        match (armed, e) {
            (false, ButtonEv::HeldAtBoot) => {
                armed = true;
                board.handle.led(LedState::ResetArmed);
                tracing::warn!("factory reset armed: release, then press the button once within 15 s to wipe /data");
            }
            (false, ButtonEv::Short | ButtonEv::Long) => {
                tracing::info!("button released early: no factory reset");
                return false;
            }
            (true, ButtonEv::Short) => {
                tracing::warn!("factory reset confirmed");
                board.handle.led(LedState::Booting);
                return true;
            }
            _ => {}
        }
    }
    board.handle.led(LedState::Booting);
    tracing::info!("factory reset not confirmed: booting normally");
    false
}

/// Destroys the data filesystem's superblocks so that the next step makes a
/// new, empty one. Only /data: the boot and root partitions are untouched.
fn wipe_data(disk: &Path) {
    use std::os::unix::fs::FileExt;
    let dev = disk::partition_path(disk, disk::PART_DATA);
    let r = std::fs::File::options()
        .write(true)
        .open(&dev)
        .and_then(|f| {
            f.write_all_at(&vec![0u8; 1 << 20], 0)?;
            f.sync_all()
        });
    match r {
        Ok(()) => tracing::warn!(device = %dev.display(), "factory reset: /data wiped"),
        Err(e) => tracing::error!(device = %dev.display(), error = %e, "factory reset failed"),
    }
}
