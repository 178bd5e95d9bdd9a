//! Stage 2: the running init. This file is the event loop: it owns init's
//! state, waits for signals, messages and timers, feeds them to the state
//! machines ([`Supervisor`] for services, [`Panel`] for the button and LED)
//! and carries out the actions they return. Each other job has its own file:
//!
//! * `pid1/boot.rs`: the factory-reset gesture, then loopback, /data,
//!   hostname, network and clock, before any service starts;
//! * `pid1/bootpart.rs`: the boot partition (mounted for the run) and the
//!   other slot's device, for the updater;
//! * `pid1/commit.rs`: committing the boot once every service settled;
//! * `pid1/health.rs`: rebooting a boot that never commits, so that the boot
//!   loader can fall back;
//! * `pid1/data.rs`: preparing the data partition, and wiping it;
//! * `pid1/provision.rs`: moving what `cloudlet flash` left on the boot
//!   partition into /data, for the sharing service;
//! * `pid1/services.rs`: the services to run, from the manifest;
//! * `pid1/inputs.rs`: reading service output, readiness and the power key;
//! * `pid1/dispatch.rs` and `pid1/status.rs`: answering control requests;
//! * `pid1/shutdown.rs`: the end (and what happens when the loop fails).

mod boot;
mod bootpart;
mod commit;
mod data;
mod dispatch;
mod health;
mod inputs;
mod provision;
mod services;
mod shutdown;
mod status;

pub use data::DataError;
pub use shutdown::{after_failure, reap_forever, ShutdownMode};

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudlet_board::button::Event as ButtonEv;
use cloudlet_board::led::{ErrorClass, LedState};
use cloudlet_proto::bootstate::{BootState, Slot};
use cloudlet_proto::control::{ClockSource, DataInfo};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::control::{self, ControlRequest};
use crate::health::Health;
use crate::logbuf::LogBuf;
use crate::panel::{self, ButtonLog, Panel};
use crate::settle::Settle;
use crate::spawn;
use crate::supervisor::{Action, Event, ExitKind, Sig, Supervisor};
use crate::system::{self, clock};

#[derive(Debug, Clone)]
pub struct Options {
    pub manifest: PathBuf,
    /// Where passwd is read from.
    pub etc: PathBuf,
    pub control_socket: PathBuf,
    /// PID 1 duties: /data, network, clock, power off at the end. The
    /// caller has mounted the API filesystems ([`crate::system::mounts::early`]).
    pub system: bool,
    /// The boot disk (stage 1 passes it on).
    pub disk: Option<PathBuf>,
    pub slot: Option<Slot>,
    pub data_dir: PathBuf,
}

/// Why init could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// the async runtime could not be built
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
    /// a signal handler could not be installed
    #[error("signal handler: {0}")]
    Signals(std::io::Error),
}

/// What the readers and the board thread tell the main loop.
enum Msg {
    Ready {
        svc: usize,
        pid: u32,
    },
    Control(ControlRequest),
    PowerKey,
    Clock(ClockSource),
    Button(ButtonEv),
    /// The boot commit finished: whether the boot is now marked good.
    Committed(bool),
    /// The boot state, read for the health watch (`None`: unreadable).
    BootState(Option<BootState>),
}

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
    /// The boot partition is mounted at [`crate::bootcommit::BOOT_DIR`] (for the
    /// whole run; the shutdown unmounts it).
    boot_mounted: bool,
    /// When this boot is committed; `None` outside a box (no boot state).
    settle: Option<Settle>,
    /// Reboots this boot if it never commits; `None` outside a box, or
    /// with the disk or slot unknown.
    health: Option<Health>,
    board: Option<crate::board::Running>,
    panel: Panel,
    presses: ButtonLog,
    /// The newest press's number, for `events` requests that wait.
    press_seq: tokio::sync::watch::Sender<u64>,
}

/// Runs init until shutdown. As PID 1 this does not return: it powers off or reboots.
pub fn run(opts: Options) -> Result<(), RunError> {
    let system = opts.system;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Runtime)?;
    let (mode, boot_mounted) = rt.block_on(main(opts))?;
    // Said before the power-down steps (which end in the power-off on a
    // box): the log then shows the order, services stopped before /data
    // is unmounted.
    tracing::info!("all services stopped");
    // Dropping the runtime closes the control socket and the services' pipes.
    drop(rt);
    if system {
        shutdown::power_down(mode, boot_mounted);
    }
    Ok(())
}

/// Sets up, then runs the main loop; returns how to end once every service
/// has stopped, and whether /boot is still mounted.
async fn main(opts: Options) -> Result<(ShutdownMode, bool), RunError> {
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
    let mut clock = clock::source();
    let mut board = None;
    let mut boot_mounted = false;
    if opts.system {
        let btx = tx.clone();
        board = crate::board::start(move |e| {
            let _ = btx.send(Msg::Button(e));
        });
        match &board {
            Some(b) => tracing::info!(board = b.name, watchdog = b.watchdog, "board"),
            None => tracing::info!("no known board: no LEDs or button"),
        }
        let wipe = match &board {
            Some(b) if b.held_at_start => boot::reset_gesture(b, &mut rx).await,
            _ => false,
        };
        if wipe {
            if let Some(disk) = &opts.disk {
                data::wipe(disk);
            }
        }
        let booted = boot::system_boot(&opts, &mut vars);
        hostname = booted.hostname;
        data = booted.data;
        boot_mounted = booted.boot_mounted;
        clock = clock::source();
        inputs::watch_power_keys(tx.clone());
    } else if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a subreaper; orphans go to the real init");
    }
    vars.insert("CLOUDLET_HOSTNAME".to_owned(), hostname.clone());

    let services::Loaded {
        services,
        logs,
        settle: settle_period,
        health_timeout,
    } = services::load(&opts, &vars);
    let press_seq = serve_control(&opts, &tx);

    // No services (a manifest that failed to load, or names none) is never
    // a healthy boot: the supervisor never reports all ready, so the slot
    // is not committed and the boot counter falls back; the LED says so.
    let led_base = if opts.system && data.is_none() {
        LedState::Error(ErrorClass::Storage)
    } else if services.is_empty() {
        tracing::error!("no services to run; this boot will not be marked good");
        LedState::Error(ErrorClass::Service)
    } else {
        LedState::Booting
    };
    let settle = opts.system.then(|| Settle::new(settle_period));
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
        boot_mounted,
        settle,
        health: None,
        board,
        panel: Panel::new(led_base),
        presses: ButtonLog::default(),
        press_seq,
    };
    let shown = init.panel.start();
    init.apply_panel(shown);

    let sig = |k| signal(k).map_err(RunError::Signals);
    let mut sigchld = sig(SignalKind::child())?;
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sigint = sig(SignalKind::interrupt())?;
    if init.opts.system {
        // Ctrl-Alt-Del becomes SIGINT to init instead of an instant reboot.
        let _ = nix::sys::reboot::set_cad_enabled(false);
    }

    init.health = health::watch(&init.opts, health_timeout, settle_period);
    init.start();
    let mut pet = tokio::time::interval(Duration::from_secs(10));
    pet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let has_watchdog = init.board.as_ref().is_some_and(|b| b.watchdog);
    let (on_term, on_int) = if init.opts.system {
        (ShutdownMode::PowerOff, ShutdownMode::Reboot)
    } else {
        (ShutdownMode::Exit, ShutdownMode::Exit)
    };
    loop {
        let deadline = [
            init.sup.next_deadline(),
            init.panel.next_deadline(),
            init.settle.as_ref().and_then(Settle::next_deadline),
            init.health.as_ref().and_then(Health::next_deadline),
        ]
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
            _ = sigterm.recv() => init.begin_shutdown(on_term, "SIGTERM"),
            _ = sigint.recv() => init.begin_shutdown(on_int, "SIGINT"),
            Some(m) = rx.recv() => init.message(m),
            _ = sleep => {
                init.event(Event::Tick);
                init.panel_event(panel::Event::Tick);
                init.health_check();
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
    init.panel_event(panel::Event::Stopped);
    Ok((mode, init.boot_mounted))
}

/// Opens the control socket (a failure is logged: init runs without it) and
/// forwards its requests to the main loop. Returns the sender that tells
/// waiting `events` requests about new presses.
fn serve_control(
    opts: &Options,
    tx: &mpsc::UnboundedSender<Msg>,
) -> tokio::sync::watch::Sender<u64> {
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<ControlRequest>();
    let (seq_tx, seq_rx) = tokio::sync::watch::channel(0u64);
    // The updater may reboot the box into the slot it installed.
    let uid_of = |name: &str| crate::users::lookup(&opts.etc, name).ok().map(|u| u.uid);
    let access = control::Access {
        updater_uid: uid_of(bootpart::UPDATER_USER),
        sharing_uid: uid_of("sharing"),
    };
    match control::bind(&opts.control_socket) {
        Ok(l) => {
            tokio::spawn(control::serve(l, ctl_tx, seq_rx, access));
        }
        Err(e) => {
            tracing::error!(error = %e, path = %opts.control_socket.display(), "control socket unavailable")
        }
    }
    let tx = tx.clone();
    tokio::spawn(async move {
        while let Some(r) = ctl_rx.recv().await {
            if tx.send(Msg::Control(r)).is_err() {
                return;
            }
        }
    });
    seq_tx
}

impl Init {
    fn message(&mut self, m: Msg) {
        match m {
            Msg::Ready { svc, pid } => {
                self.note(svc, format!("ready, pid {pid}"));
                self.event(Event::Ready { svc, pid });
                // A service given up on and then restarted by hand clears the error.
                if self.all_ready_now() {
                    self.panel_event(panel::Event::EveryServiceReady);
                }
            }
            Msg::Control(c) => {
                let resp = self.control(c.request);
                let _ = c.reply.send(resp);
            }
            Msg::PowerKey => self.begin_shutdown(ShutdownMode::PowerOff, "power button"),
            Msg::Clock(c) => self.clock = c,
            Msg::Button(e) => self.panel_event(panel::Event::Button(e)),
            Msg::Committed(ok) => {
                if let Some(s) = self.settle.as_mut() {
                    s.committed(ok);
                }
                // A commit the health watch waited for has an outcome now.
                self.health_check();
            }
            Msg::BootState(state) => self.health_boot_state(state),
        }
    }

    /// Feeds the panel and carries out what it says.
    fn panel_event(&mut self, e: panel::Event) {
        let actions = self.panel.handle(e, Instant::now());
        self.apply_panel(actions);
    }

    fn apply_panel(&mut self, actions: Vec<panel::Action>) {
        for a in actions {
            match a {
                panel::Action::Led(s) => {
                    if let Some(b) = &self.board {
                        b.handle.led(s);
                    }
                }
                panel::Action::Publish(press) => {
                    tracing::info!(kind = press.name(), "button");
                    let seq = self.presses.push(press, status::uptime_ms());
                    let _ = self.press_seq.send(seq);
                }
                panel::Action::PowerOff => {
                    self.begin_shutdown(ShutdownMode::PowerOff, "long press")
                }
            }
        }
    }

    /// Every service is ready right now.
    fn all_ready_now(&self) -> bool {
        self.sup.all_ready_now()
    }

    fn service_name(&self, svc: usize) -> String {
        self.sup
            .specs()
            .get(svc)
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    /// Adds one of init's own lines to a service's log.
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
        shutdown::note_requested(mode);
        self.shutdown = Some(mode);
        let cancelled = self
            .settle
            .as_mut()
            .is_some_and(|s| !s.shutting_down(Instant::now()).is_empty());
        if cancelled {
            tracing::info!(
                "shutting down before every service settled; this boot is not committed"
            );
        }
        self.panel_event(panel::Event::ShuttingDown);
        self.event(Event::ShutdownRequested);
    }

    fn done_stopping(&self) -> bool {
        (0..self.sup.specs().len()).all(|i| self.sup.runtime(i).is_none_or(|r| r.pid.is_none()))
    }

    fn start(&mut self) {
        let actions = self.sup.start(Instant::now());
        let mut queue = VecDeque::from(self.apply(actions));
        self.settle_check();
        while let Some(e) = queue.pop_front() {
            let actions = self.sup.handle(e, Instant::now());
            queue.extend(self.apply(actions));
            self.settle_check();
        }
    }

    /// Feeds the supervisor, and what carrying out its actions causes, until
    /// quiet. The boot commit sees every step, so a service that stops being
    /// ready for even one step cancels its settling period.
    fn event(&mut self, e: Event) {
        let mut queue = VecDeque::from([e]);
        while let Some(e) = queue.pop_front() {
            let actions = self.sup.handle(e, Instant::now());
            queue.extend(self.apply(actions));
            self.settle_check();
        }
    }

    /// Carries out the supervisor's actions; returns the events they caused.
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
                    if let Ok(pid) = i32::try_from(pid) {
                        let group = Pid::from_raw(pid.saturating_neg());
                        if kill(group, s).is_err() {
                            let _ = kill(Pid::from_raw(pid), s);
                        }
                    }
                }
                Action::AllReady => {
                    self.panel_event(panel::Event::AllReady);
                    let up = system::uptime();
                    tracing::info!("all services ready (uptime {:.3} s)", up.as_secs_f64());
                    // The boot is committed later, once every service has
                    // stayed ready for the settling period (settle_check).
                    if self.opts.system {
                        // Network time is not needed to serve; ask once the boot's work is done.
                        if self.clock != ClockSource::Ntp {
                            let tx = self.tx.clone();
                            clock::set_by_sntp_in_background(move || {
                                let _ = tx.send(Msg::Clock(ClockSource::Ntp));
                            });
                        }
                    }
                }
                Action::GaveUp(svc) => {
                    let name = self.service_name(svc);
                    tracing::error!(service = %name, "service failed too often; giving up until restarted");
                    self.panel_event(panel::Event::GaveUp);
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
                    tokio::spawn(inputs::read_output(fd, buf.clone()));
                }
                if let Some(fd) = s.ready {
                    tokio::spawn(inputs::read_ready(fd, svc, s.pid, self.tx.clone()));
                }
                self.note(svc, format!("started, pid {}", s.pid));
                Event::Spawned { svc, pid: s.pid }
            }
            Err(error) => {
                tracing::warn!(service = %spec.name, %error, "could not start");
                self.note(svc, format!("could not start: {error}"));
                Event::SpawnFailed {
                    svc,
                    error: error.to_string(),
                }
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
}
