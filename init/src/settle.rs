//! When this boot is healthy enough to keep: every service ready, and still
//! ready after a settling period (the manifest's top-level `settle`).
//!
//! Like [`crate::supervisor`] and [`crate::panel`], a state machine: whether
//! every service is ready right now, and the time, go in; what to log and
//! when to commit come out. `pid1` feeds it after every supervisor event and
//! carries out the commit ([`crate::bootcommit::mark_good`]).
//!
//! ```text
//!   waiting ──every service ready──> settling ──period elapsed──> committing ──> committed
//!      ^                                │                                    └──> failed
//!      └──── a service not ready ───────┘
//! ```
//!
//! A crash, restart or give-up during the period cancels it; the period
//! starts again, in full, once every service is ready again. Once the boot
//! is committed (or the commit failed), nothing changes for the rest of the
//! run. A shutdown cancels a period and ends the machine uncommitted.

use std::time::{Duration, Instant};

/// What the boot commit is doing, as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not every service is ready (or the period was cancelled).
    Waiting,
    /// Every service has been ready since `since`.
    Settling { since: Instant },
    /// [`Action::Commit`] was given; waiting for [`Settle::committed`].
    Committing,
    /// The boot was marked good.
    Committed,
    /// Marking the boot good failed, or the box is shutting down.
    NotCommitted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Every service is ready: the period began. The boot is committed
    /// after `period` if they all stay ready.
    Started { period: Duration },
    /// A service stopped being ready during the period: it was cancelled.
    Cancelled { after: Duration },
    /// Every service stayed ready for `ready_for`: mark the boot good now,
    /// then tell [`Settle::committed`] how it went.
    Commit { ready_for: Duration },
}

#[derive(Debug)]
pub struct Settle {
    period: Duration,
    phase: Phase,
}

impl Settle {
    pub fn new(period: Duration) -> Settle {
        Settle {
            period,
            phase: Phase::Waiting,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The name `status` shows: `settling`, `committed` or `not-committed`.
    pub fn name(&self) -> &'static str {
        match self.phase {
            Phase::Settling { .. } | Phase::Committing => "settling",
            Phase::Committed => "committed",
            Phase::Waiting | Phase::NotCommitted => "not-committed",
        }
    }

    /// When the period ends, while one runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Settling { since } => since.checked_add(self.period),
            _ => None,
        }
    }

    /// Whether every service is ready at `now` (call after every change,
    /// and when [`Settle::next_deadline`] comes).
    pub fn handle(&mut self, all_ready: bool, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match (self.phase, all_ready) {
            (Phase::Waiting, true) => {
                self.phase = Phase::Settling { since: now };
                out.push(Action::Started {
                    period: self.period,
                });
                // A zero period commits at once.
                self.elapse(now, &mut out);
            }
            (Phase::Settling { since }, false) => {
                self.phase = Phase::Waiting;
                out.push(Action::Cancelled {
                    after: now.saturating_duration_since(since),
                });
            }
            (Phase::Settling { .. }, true) => self.elapse(now, &mut out),
            _ => {}
        }
        out
    }

    fn elapse(&mut self, now: Instant, out: &mut Vec<Action>) {
        if let Phase::Settling { since } = self.phase {
            let ready_for = now.saturating_duration_since(since);
            if ready_for >= self.period {
                self.phase = Phase::Committing;
                out.push(Action::Commit { ready_for });
            }
        }
    }

    /// How the commit asked for by [`Action::Commit`] went.
    pub fn committed(&mut self, ok: bool) {
        if self.phase == Phase::Committing {
            self.phase = if ok {
                Phase::Committed
            } else {
                Phase::NotCommitted
            };
        }
    }

    /// The box is shutting down: a running period is cancelled and this
    /// run never commits (services stopping is no health check).
    pub fn shutting_down(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Settling { since } => {
                out.push(Action::Cancelled {
                    after: now.saturating_duration_since(since),
                });
                self.phase = Phase::NotCommitted;
            }
            Phase::Waiting => self.phase = Phase::NotCommitted,
            Phase::Committing | Phase::Committed | Phase::NotCommitted => {}
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::unchecked_time_subtraction)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn commits_only_after_the_whole_period_of_every_service_ready() {
        let t0 = Instant::now();
        let mut s = Settle::new(MIN);
        assert_eq!(s.name(), "not-committed");
        assert_eq!(s.handle(false, t0), vec![]);
        assert_eq!(s.next_deadline(), None);
        let t1 = t0 + secs(5);
        assert_eq!(s.handle(true, t1), vec![Action::Started { period: MIN }]);
        assert_eq!(s.name(), "settling");
        assert_eq!(s.next_deadline(), Some(t1 + MIN));
        // Still ready, period not over: nothing.
        assert_eq!(s.handle(true, t1 + secs(59)), vec![]);
        assert_eq!(s.handle(true, t1 + MIN - Duration::from_millis(1)), vec![]);
        assert_eq!(
            s.handle(true, t1 + MIN),
            vec![Action::Commit { ready_for: MIN }]
        );
        assert_eq!(s.phase(), Phase::Committing);
        assert_eq!(s.next_deadline(), None);
        // Asked once only, even if the answer is slow.
        assert_eq!(s.handle(true, t1 + secs(61)), vec![]);
        s.committed(true);
        assert_eq!(s.name(), "committed");
        // After the commit, a crash changes nothing.
        assert_eq!(s.handle(false, t1 + secs(70)), vec![]);
        assert_eq!(s.handle(true, t1 + secs(200)), vec![]);
        assert_eq!(s.name(), "committed");
    }

    #[test]
    fn a_crash_during_the_period_cancels_it_and_it_starts_again_in_full() {
        let t0 = Instant::now();
        let mut s = Settle::new(MIN);
        s.handle(true, t0);
        // A service crashes 40 s in.
        assert_eq!(
            s.handle(false, t0 + secs(40)),
            vec![Action::Cancelled { after: secs(40) }]
        );
        assert_eq!(s.phase(), Phase::Waiting);
        assert_eq!(s.name(), "not-committed");
        assert_eq!(s.next_deadline(), None);
        // The old period's end passes while it is down: no commit.
        assert_eq!(s.handle(false, t0 + secs(61)), vec![]);
        // Back up at 70 s: a new period of a full minute.
        let t2 = t0 + secs(70);
        assert_eq!(s.handle(true, t2), vec![Action::Started { period: MIN }]);
        assert_eq!(s.next_deadline(), Some(t2 + MIN));
        assert_eq!(s.handle(true, t0 + secs(120)), vec![]);
        assert_eq!(
            s.handle(true, t2 + MIN + secs(1)),
            vec![Action::Commit {
                ready_for: MIN + secs(1)
            }]
        );
    }

    #[test]
    fn a_failed_commit_is_not_committed_and_not_retried() {
        let t0 = Instant::now();
        let mut s = Settle::new(MIN);
        s.handle(true, t0);
        assert_eq!(
            s.handle(true, t0 + MIN),
            vec![Action::Commit { ready_for: MIN }]
        );
        s.committed(false);
        assert_eq!(s.phase(), Phase::NotCommitted);
        assert_eq!(s.name(), "not-committed");
        assert_eq!(s.handle(false, t0 + secs(61)), vec![]);
        assert_eq!(s.handle(true, t0 + secs(62)), vec![]);
        assert_eq!(s.handle(true, t0 + secs(200)), vec![]);
    }

    #[test]
    fn a_zero_period_commits_as_soon_as_every_service_is_ready() {
        let t0 = Instant::now();
        let mut s = Settle::new(Duration::ZERO);
        assert_eq!(
            s.handle(true, t0),
            vec![
                Action::Started {
                    period: Duration::ZERO
                },
                Action::Commit {
                    ready_for: Duration::ZERO
                }
            ]
        );
    }

    #[test]
    fn a_shutdown_cancels_the_period_and_never_commits() {
        let t0 = Instant::now();
        let mut s = Settle::new(MIN);
        s.handle(true, t0);
        assert_eq!(
            s.shutting_down(t0 + secs(10)),
            vec![Action::Cancelled { after: secs(10) }]
        );
        assert_eq!(s.name(), "not-committed");
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.handle(true, t0 + secs(100)), vec![]);
        // A committed boot stays committed through the shutdown.
        let mut c = Settle::new(Duration::ZERO);
        c.handle(true, t0);
        c.committed(true);
        assert_eq!(c.shutting_down(t0), vec![]);
        assert_eq!(c.name(), "committed");
    }

    #[test]
    fn committed_is_ignored_unless_a_commit_was_asked_for() {
        let t0 = Instant::now();
        let mut s = Settle::new(MIN);
        s.committed(true);
        assert_eq!(s.phase(), Phase::Waiting);
        s.handle(true, t0);
        s.committed(true);
        assert_eq!(s.phase(), Phase::Settling { since: t0 });
    }
}
