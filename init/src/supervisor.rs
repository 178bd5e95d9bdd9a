//! The supervisor as a state machine: events in, actions out.
//!
//! Nothing here forks, signals or sleeps; [`crate::run`] turns [`Action`]s
//! into system calls and feeds what happens back as [`Event`]s. That keeps
//! the restart, backoff, give-up and shutdown-ordering rules testable on any
//! machine, without being PID 1.

use std::time::{Duration, Instant};

use cloudlet_proto::control::ServiceState;

use crate::manifest::{Readiness, RestartPolicy, ServiceSpec};

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

impl ExitKind {
    pub fn success(&self) -> bool {
        matches!(self, ExitKind::Code(0))
    }

    pub fn describe(&self) -> String {
        match self {
            ExitKind::Code(c) => format!("exit status {c}"),
            ExitKind::Signal(s) => match nix::sys::signal::Signal::try_from(*s) {
                Ok(sig) => format!("killed by {}", sig.as_str()),
                Err(_) => format!("killed by signal {s}"),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A [`Action::Spawn`] worked.
    Spawned {
        svc: usize,
        pid: u32,
    },
    /// A [`Action::Spawn`] failed before the program ran (missing binary, bad user...).
    SpawnFailed {
        svc: usize,
        error: String,
    },
    /// The service said it is ready.
    Ready {
        svc: usize,
        pid: u32,
    },
    Exited {
        svc: usize,
        pid: u32,
        how: ExitKind,
    },
    /// A control request to restart the service.
    RestartRequested {
        svc: usize,
    },
    ShutdownRequested,
    /// Time passed; timers that are due fire.
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Kill,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn(usize),
    Signal {
        svc: usize,
        pid: u32,
        sig: Sig,
    },
    /// Every service is ready (sent once per boot).
    AllReady,
    /// The service failed too often; init stops trying.
    GaveUp(usize),
    /// Shutdown asked for and every service has stopped.
    ShutdownComplete,
}

#[derive(Debug, Clone)]
pub struct Runtime {
    pub state: ServiceState,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    failures: u32,
    started_at: Option<Instant>,
    deadline: Option<Instant>,
    restart_pending: bool,
    ever_started: bool,
}

pub struct Supervisor {
    specs: Vec<ServiceSpec>,
    rt: Vec<Runtime>,
    shutting_down: bool,
    all_ready_sent: bool,
    shutdown_sent: bool,
}

impl Supervisor {
    /// `specs` must be in dependency order (as [`crate::manifest::Manifest`] gives them).
    pub fn new(specs: Vec<ServiceSpec>) -> Supervisor {
        let rt = specs
            .iter()
            .map(|_| Runtime {
                state: ServiceState::Waiting,
                pid: None,
                restarts: 0,
                last_exit: None,
                failures: 0,
                started_at: None,
                deadline: None,
                restart_pending: false,
                ever_started: false,
            })
            .collect();
        Supervisor {
            specs,
            rt,
            shutting_down: false,
            all_ready_sent: false,
            shutdown_sent: false,
        }
    }

    pub fn specs(&self) -> &[ServiceSpec] {
        &self.specs
    }

    pub fn runtime(&self, svc: usize) -> Option<&Runtime> {
        self.rt.get(svc)
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    pub fn index_of_pid(&self, pid: u32) -> Option<usize> {
        self.rt.iter().position(|r| r.pid == Some(pid))
    }

    pub fn all_ready(&self) -> bool {
        self.all_ready_sent
    }

    /// Every service is ready right now (never true of zero services:
    /// no services is no healthy boot).
    pub fn all_ready_now(&self) -> bool {
        !self.rt.is_empty() && self.rt.iter().all(|r| r.state == ServiceState::Ready)
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// The earliest pending timer, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.rt.iter().filter_map(|r| r.deadline).min()
    }

    /// Starts whatever can start now. Call once at boot (and it is called after every event).
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.progress(now, &mut out);
        out
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Spawned { svc, pid } => self.on_spawned(svc, pid, now, &mut out),
            Event::SpawnFailed { svc, error } => {
                if let Some(r) = self.rt.get_mut(svc) {
                    r.last_exit = Some(format!("could not start: {error}"));
                    r.started_at = Some(now);
                }
                self.on_ended(svc, false, now, &mut out);
            }
            Event::Ready { svc, pid } => {
                if let Some(r) = self.rt.get_mut(svc) {
                    if r.pid == Some(pid) && r.state == ServiceState::Starting {
                        r.state = ServiceState::Ready;
                    }
                }
            }
            Event::Exited { svc, pid, how } => {
                let Some(r) = self.rt.get_mut(svc) else {
                    return out;
                };
                if r.pid != Some(pid) {
                    return out;
                }
                r.pid = None;
                r.last_exit = Some(how.describe());
                self.on_ended(svc, how.success(), now, &mut out);
            }
            Event::RestartRequested { svc } => self.on_restart_request(svc, now, &mut out),
            Event::ShutdownRequested => {
                self.shutting_down = true;
                for r in &mut self.rt {
                    r.restart_pending = false;
                    if r.pid.is_none() {
                        r.state = ServiceState::Stopped;
                        r.deadline = None;
                    }
                }
            }
            Event::Tick => self.on_tick(now, &mut out),
        }
        self.progress(now, &mut out);
        out
    }

    fn on_spawned(&mut self, svc: usize, pid: u32, now: Instant, out: &mut Vec<Action>) {
        let Some(spec) = self.specs.get(svc) else {
            return;
        };
        let Some(r) = self.rt.get_mut(svc) else {
            return;
        };
        if r.ever_started {
            r.restarts = r.restarts.saturating_add(1);
        }
        r.ever_started = true;
        r.pid = Some(pid);
        r.started_at = Some(now);
        r.deadline = None;
        r.state = match spec.ready {
            Readiness::Started => ServiceState::Ready,
            Readiness::Notify => ServiceState::Starting,
        };
        if self.shutting_down {
            // Raced with a shutdown request: stop it at once.
            r.state = ServiceState::Stopping;
            r.deadline = Some(later(now, spec.stop_timeout));
            out.push(Action::Signal {
                svc,
                pid,
                sig: Sig::Term,
            });
        }
    }

    fn on_ended(&mut self, svc: usize, success: bool, now: Instant, out: &mut Vec<Action>) {
        let Some(spec) = self.specs.get(svc) else {
            return;
        };
        let Some(r) = self.rt.get_mut(svc) else {
            return;
        };
        r.pid = None;
        r.deadline = None;
        if self.shutting_down {
            r.state = ServiceState::Stopped;
            return;
        }
        if r.restart_pending {
            r.restart_pending = false;
            r.failures = 0;
            r.state = ServiceState::Waiting;
            return;
        }
        let ran = r
            .started_at
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        let restart = match spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        if !restart {
            r.state = if success {
                ServiceState::Stopped
            } else {
                ServiceState::Failed
            };
            return;
        }
        if ran >= spec.stable_after {
            r.failures = 0;
        }
        r.failures = r.failures.saturating_add(1);
        if r.failures > spec.give_up_after {
            r.state = ServiceState::Failed;
            out.push(Action::GaveUp(svc));
            return;
        }
        r.state = ServiceState::Backoff;
        r.deadline = Some(later(now, backoff(spec, r.failures)));
    }

    fn on_restart_request(&mut self, svc: usize, now: Instant, out: &mut Vec<Action>) {
        if self.shutting_down {
            return;
        }
        let Some(spec) = self.specs.get(svc) else {
            return;
        };
        let Some(r) = self.rt.get_mut(svc) else {
            return;
        };
        r.failures = 0;
        match r.pid {
            Some(pid) => {
                if r.state != ServiceState::Stopping {
                    r.restart_pending = true;
                    r.state = ServiceState::Stopping;
                    r.deadline = Some(later(now, spec.stop_timeout));
                    out.push(Action::Signal {
                        svc,
                        pid,
                        sig: Sig::Term,
                    });
                }
            }
            None => {
                r.deadline = None;
                r.state = ServiceState::Waiting;
            }
        }
    }

    fn on_tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        for (svc, r) in self.rt.iter_mut().enumerate() {
            let Some(due) = r.deadline else { continue };
            if due > now {
                continue;
            }
            r.deadline = None;
            match (r.state, r.pid) {
                (ServiceState::Backoff, None) => r.state = ServiceState::Waiting,
                (ServiceState::Stopping, Some(pid)) => out.push(Action::Signal {
                    svc,
                    pid,
                    sig: Sig::Kill,
                }),
                _ => {}
            }
        }
    }

    fn deps_ready(&self, svc: usize) -> bool {
        self.specs.get(svc).is_some_and(|s| {
            s.after.iter().all(|d| {
                self.index_of(d)
                    .and_then(|j| self.rt.get(j))
                    .is_some_and(|r| r.state == ServiceState::Ready)
            })
        })
    }

    /// Services that list `svc` in `after` and are not stopped yet.
    fn dependents_running(&self, svc: usize) -> bool {
        let Some(name) = self.specs.get(svc).map(|s| s.name.as_str()) else {
            return false;
        };
        self.specs
            .iter()
            .zip(&self.rt)
            .any(|(s, r)| s.after.iter().any(|d| d == name) && r.state != ServiceState::Stopped)
    }

    fn progress(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.shutting_down {
            for svc in (0..self.specs.len()).rev() {
                let running = self
                    .rt
                    .get(svc)
                    .is_some_and(|r| r.pid.is_some() && r.state != ServiceState::Stopping);
                if running && !self.dependents_running(svc) {
                    let stop = self
                        .specs
                        .get(svc)
                        .map(|s| s.stop_timeout)
                        .unwrap_or_default();
                    if let Some(r) = self.rt.get_mut(svc) {
                        r.state = ServiceState::Stopping;
                        r.deadline = Some(later(now, stop));
                        if let Some(pid) = r.pid {
                            out.push(Action::Signal {
                                svc,
                                pid,
                                sig: Sig::Term,
                            });
                        }
                    }
                }
            }
            if !self.shutdown_sent && self.rt.iter().all(|r| r.pid.is_none()) {
                self.shutdown_sent = true;
                out.push(Action::ShutdownComplete);
            }
            return;
        }
        for svc in 0..self.specs.len() {
            let waiting = self
                .rt
                .get(svc)
                .is_some_and(|r| r.state == ServiceState::Waiting);
            if waiting && self.deps_ready(svc) {
                if let Some(r) = self.rt.get_mut(svc) {
                    // Marked Starting until Spawned/SpawnFailed comes back.
                    r.state = ServiceState::Starting;
                }
                out.push(Action::Spawn(svc));
            }
        }
        // All of zero services is no healthy boot: a manifest that names
        // none (or failed to load) never reports ready.
        if !self.all_ready_sent
            && !self.rt.is_empty()
            && self.rt.iter().all(|r| r.state == ServiceState::Ready)
        {
            self.all_ready_sent = true;
            out.push(Action::AllReady);
        }
    }
}

/// `now + d` that cannot overflow: a deadline past what `Instant` holds is
/// as good as never (the manifest bounds durations; this bounds arithmetic).
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(crate::manifest::MAX_DURATION))
        .unwrap_or(now)
}

/// initial * 2^(failures-1), capped at max.
fn backoff(spec: &ServiceSpec, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    spec.backoff_initial
        .saturating_mul(1u32 << exp)
        .min(spec.backoff_max)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unchecked_time_subtraction
)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;

    fn sup(toml: &str) -> Supervisor {
        Supervisor::new(Manifest::parse(toml).unwrap().services)
    }

    const TWO: &str = r#"
        [[service]]
        name = "db"
        exec = ["/db"]
        backoff-initial = "1s"
        backoff-max = "4s"
        give-up-after = 3
        [[service]]
        name = "web"
        exec = ["/web"]
        after = ["db"]
    "#;

    #[test]
    fn no_services_is_never_all_ready() {
        let mut s = Supervisor::new(Vec::new());
        let t0 = Instant::now();
        assert!(s.start(t0).is_empty());
        assert!(s.handle(Event::Tick, t0).is_empty());
        assert!(!s.all_ready());
        assert!(!s.all_ready_now());
    }

    #[test]
    fn a_deadline_past_what_instant_holds_does_not_panic() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }

    #[test]
    fn starts_in_dependency_order_and_reports_all_ready_once() {
        let t0 = Instant::now();
        let mut s = sup(TWO);
        assert_eq!(s.start(t0), vec![Action::Spawn(0)]);
        assert!(s.handle(Event::Spawned { svc: 0, pid: 10 }, t0).is_empty());
        assert_eq!(
            s.handle(Event::Ready { svc: 0, pid: 10 }, t0),
            vec![Action::Spawn(1)]
        );
        s.handle(Event::Spawned { svc: 1, pid: 11 }, t0);
        assert_eq!(
            s.handle(Event::Ready { svc: 1, pid: 11 }, t0),
            vec![Action::AllReady]
        );
        assert!(s.all_ready());
        assert!(s.all_ready_now());
        // A later crash and recovery does not repeat AllReady.
        s.handle(
            Event::Exited {
                svc: 1,
                pid: 11,
                how: ExitKind::Signal(9),
            },
            t0,
        );
        // all_ready stays (it was reached once); all_ready_now does not.
        assert!(s.all_ready());
        assert!(!s.all_ready_now());
        let acts = s.handle(Event::Tick, t0 + Duration::from_secs(1));
        assert_eq!(acts, vec![Action::Spawn(1)]);
        s.handle(Event::Spawned { svc: 1, pid: 12 }, t0);
        assert!(!s.all_ready_now());
        assert!(s.handle(Event::Ready { svc: 1, pid: 12 }, t0).is_empty());
        assert!(s.all_ready_now());
        assert_eq!(s.runtime(1).unwrap().restarts, 1);
        assert_eq!(
            s.runtime(1).unwrap().last_exit.as_deref(),
            Some("killed by SIGKILL")
        );
    }

    #[test]
    fn backs_off_exponentially_then_gives_up() {
        let t0 = Instant::now();
        let mut s = sup(TWO);
        s.start(t0);
        let mut pid = 100;
        let mut now = t0;
        let mut waits = Vec::new();
        s.handle(Event::Spawned { svc: 0, pid }, now);
        loop {
            let acts = s.handle(
                Event::Exited {
                    svc: 0,
                    pid,
                    how: ExitKind::Code(1),
                },
                now,
            );
            if acts.contains(&Action::GaveUp(0)) {
                break;
            }
            let due = s.next_deadline().unwrap();
            waits.push(due - now);
            // Nothing happens before the deadline.
            assert!(s
                .handle(Event::Tick, due - Duration::from_millis(1))
                .is_empty());
            now = due;
            assert_eq!(s.handle(Event::Tick, now), vec![Action::Spawn(0)]);
            pid += 1;
            s.handle(Event::Spawned { svc: 0, pid }, now);
        }
        // Initial launch plus three retries, with 1 s, 2 s, 4 s between.
        assert_eq!(waits, [1, 2, 4].map(Duration::from_secs));
        assert_eq!(s.runtime(0).unwrap().state, ServiceState::Failed);
        assert_eq!(s.runtime(0).unwrap().restarts, 3);
        assert_eq!(s.runtime(1).unwrap().state, ServiceState::Waiting);
        // A restart request clears the give-up.
        assert_eq!(
            s.handle(Event::RestartRequested { svc: 0 }, now),
            vec![Action::Spawn(0)]
        );
    }

    #[test]
    fn a_stable_run_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut s = sup(TWO);
        s.start(t0);
        s.handle(Event::Spawned { svc: 0, pid: 1 }, t0);
        s.handle(
            Event::Exited {
                svc: 0,
                pid: 1,
                how: ExitKind::Code(1),
            },
            t0,
        );
        let t1 = t0 + Duration::from_secs(1);
        s.handle(Event::Tick, t1);
        s.handle(Event::Spawned { svc: 0, pid: 2 }, t1);
        let t2 = t1 + Duration::from_secs(60);
        s.handle(
            Event::Exited {
                svc: 0,
                pid: 2,
                how: ExitKind::Code(1),
            },
            t2,
        );
        assert_eq!(s.next_deadline(), Some(t2 + Duration::from_secs(1)));
    }

    #[test]
    fn spawn_failures_count_as_failures() {
        let t0 = Instant::now();
        let mut s = sup(TWO);
        s.start(t0);
        s.handle(
            Event::SpawnFailed {
                svc: 0,
                error: "no such file".into(),
            },
            t0,
        );
        assert_eq!(s.runtime(0).unwrap().state, ServiceState::Backoff);
        assert!(s
            .runtime(0)
            .unwrap()
            .last_exit
            .as_deref()
            .unwrap()
            .contains("no such file"));
    }

    #[test]
    fn restart_request_stops_then_starts_without_counting_a_failure() {
        let t0 = Instant::now();
        let mut s = sup(TWO);
        s.start(t0);
        s.handle(Event::Spawned { svc: 0, pid: 5 }, t0);
        s.handle(Event::Ready { svc: 0, pid: 5 }, t0);
        let acts = s.handle(Event::RestartRequested { svc: 0 }, t0);
        assert!(acts.contains(&Action::Signal {
            svc: 0,
            pid: 5,
            sig: Sig::Term
        }));
        let acts = s.handle(
            Event::Exited {
                svc: 0,
                pid: 5,
                how: ExitKind::Signal(15),
            },
            t0,
        );
        assert_eq!(acts, vec![Action::Spawn(0)]);
    }

    #[test]
    fn shutdown_stops_dependents_first_and_escalates_to_kill() {
        let t0 = Instant::now();
        let mut s = sup(TWO);
        s.start(t0);
        s.handle(Event::Spawned { svc: 0, pid: 1 }, t0);
        s.handle(Event::Ready { svc: 0, pid: 1 }, t0);
        s.handle(Event::Spawned { svc: 1, pid: 2 }, t0);
        s.handle(Event::Ready { svc: 1, pid: 2 }, t0);
        let acts = s.handle(Event::ShutdownRequested, t0);
        assert_eq!(
            acts,
            vec![Action::Signal {
                svc: 1,
                pid: 2,
                sig: Sig::Term
            }]
        );
        // web ignores SIGTERM: after its stop timeout (5 s default) it gets SIGKILL.
        assert!(s
            .handle(Event::Tick, t0 + Duration::from_secs(4))
            .is_empty());
        let acts = s.handle(Event::Tick, t0 + Duration::from_secs(5));
        assert_eq!(
            acts,
            vec![Action::Signal {
                svc: 1,
                pid: 2,
                sig: Sig::Kill
            }]
        );
        let acts = s.handle(
            Event::Exited {
                svc: 1,
                pid: 2,
                how: ExitKind::Signal(9),
            },
            t0,
        );
        assert_eq!(
            acts,
            vec![Action::Signal {
                svc: 0,
                pid: 1,
                sig: Sig::Term
            }]
        );
        let acts = s.handle(
            Event::Exited {
                svc: 0,
                pid: 1,
                how: ExitKind::Code(0),
            },
            t0,
        );
        assert_eq!(acts, vec![Action::ShutdownComplete]);
        // Nothing restarts during shutdown.
        assert!(s
            .handle(Event::Tick, t0 + Duration::from_secs(100))
            .is_empty());
    }

    #[test]
    fn shutdown_with_nothing_running_completes_at_once() {
        let mut s = sup(TWO);
        assert_eq!(
            s.handle(Event::ShutdownRequested, Instant::now()),
            vec![Action::ShutdownComplete]
        );
    }

    #[test]
    fn stale_pids_are_ignored() {
        let t0 = Instant::now();
        let mut s = sup(TWO);
        s.start(t0);
        s.handle(Event::Spawned { svc: 0, pid: 7 }, t0);
        assert!(s
            .handle(
                Event::Exited {
                    svc: 0,
                    pid: 99,
                    how: ExitKind::Code(1)
                },
                t0
            )
            .is_empty());
        assert!(s.handle(Event::Ready { svc: 0, pid: 99 }, t0).is_empty());
        assert_eq!(s.runtime(0).unwrap().state, ServiceState::Starting);
    }
}
