//! When a boot that never became healthy is given up: U-Boot counts a try
//! only when the box boots again, so a new slot whose services never settle
//! would otherwise stay up, uncommitted, for ever, and the fall-back to the
//! other slot would never happen.
//!
//! Like [`crate::settle`], a state machine: the time and the boot commit's
//! phase go in; what to do comes out. If the boot is not committed within
//! the limit (the manifest's `health-timeout` plus `settle`, from when init
//! started the services), `pid1` reads the boot state (off the main loop: it
//! waits for the updater's lock) and hands it to [`Health::boot_state`],
//! which says to reboot only when the boot loader has another slot to fall
//! back to.
//!
//! ```text
//!   watching ──limit passed, not committed──> reading ──other slot has tries──> reboot
//!      │  └──limit passed, commit under way──> waiting-for-commit      └──no tries, or unreadable──> stay up
//!      └──committed──> done                     (then as watching, at once)
//! ```
//!
//! Every outcome is final: the machine says to reboot, or that the box
//! stays up, at most once a run.

use std::time::{Duration, Instant};

use cloudlet_proto::bootstate::{BootState, Slot};

use crate::settle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The boot is not committed yet; the limit ends at `deadline`.
    Watching { deadline: Instant },
    /// The limit passed while the commit was being written: its outcome decides.
    WaitingForCommit,
    /// [`Action::ReadBootState`] was given; waiting for [`Health::boot_state`].
    Reading,
    /// Nothing more to do this run: committed, rebooting, or staying up.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The limit passed and the boot is not committed: read the boot state
    /// and pass it to [`Health::boot_state`].
    ReadBootState,
    /// Reboot in order, so that the boot loader can fall back: the other
    /// slot has `other_left` tries.
    Reboot { limit: Duration, other_left: u32 },
    /// The boot loader has nowhere to fall back to (the other slot has no
    /// tries left, or is not in the boot order): stay up.
    StayUpNoFallback { limit: Duration },
    /// The boot state could not be read: stay up rather than reboot blind.
    StayUpUnknown { limit: Duration },
}

#[derive(Debug)]
pub struct Health {
    slot: Slot,
    limit: Duration,
    phase: Phase,
}

impl Health {
    /// Watches the boot of `slot`, whose services were started at
    /// `started`; the limit is `health_timeout` plus `settle`. A limit
    /// too large for the clock never ends (the manifest bounds both).
    pub fn new(slot: Slot, started: Instant, health_timeout: Duration, settle: Duration) -> Health {
        let limit = health_timeout.saturating_add(settle);
        let phase = match started.checked_add(limit) {
            Some(deadline) => Phase::Watching { deadline },
            None => Phase::Done,
        };
        Health { slot, limit, phase }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// How long the boot has to be committed in (`health-timeout` + `settle`).
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// When the limit ends, while it is watched.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Watching { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// The time is `now` and the boot commit is in phase `commit` (call
    /// when [`Health::next_deadline`] comes and whenever the commit
    /// finishes).
    pub fn handle(&mut self, commit: settle::Phase, now: Instant) -> Option<Action> {
        match (self.phase, commit) {
            (Phase::Done | Phase::Reading, _) => None,
            (_, settle::Phase::Committed) => {
                self.phase = Phase::Done;
                None
            }
            (Phase::Watching { deadline }, _) if now < deadline => None,
            // A commit being written may still succeed: wait for it.
            (_, settle::Phase::Committing) => {
                self.phase = Phase::WaitingForCommit;
                None
            }
            (
                Phase::Watching { .. } | Phase::WaitingForCommit,
                settle::Phase::Waiting
                | settle::Phase::Settling { .. }
                | settle::Phase::NotCommitted,
            ) => {
                self.phase = Phase::Reading;
                Some(Action::ReadBootState)
            }
        }
    }

    /// What the boot state says (`None`: it could not be read), and the
    /// boot commit's phase now (it may have finished while reading).
    pub fn boot_state(
        &mut self,
        state: Option<&BootState>,
        commit: settle::Phase,
    ) -> Option<Action> {
        if self.phase != Phase::Reading {
            return None;
        }
        match commit {
            settle::Phase::Committed => {
                self.phase = Phase::Done;
                return None;
            }
            settle::Phase::Committing => {
                self.phase = Phase::WaitingForCommit;
                return None;
            }
            settle::Phase::Waiting
            | settle::Phase::Settling { .. }
            | settle::Phase::NotCommitted => {}
        }
        self.phase = Phase::Done;
        let limit = self.limit;
        let Some(state) = state else {
            return Some(Action::StayUpUnknown { limit });
        };
        let other = self.slot.other();
        // boot.scr tries only the slots in BOOT_ORDER, each while it has tries.
        let other_left = state.tries_left(other);
        if other_left > 0 && state.order.contains(&other) {
            Some(Action::Reboot { limit, other_left })
        } else {
            Some(Action::StayUpNoFallback { limit })
        }
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::unchecked_time_subtraction)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(300);
    const SETTLE: Duration = Duration::from_secs(60);
    const LIMIT: Duration = Duration::from_secs(360);

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// The state just after an update to B: B first with its tries, A (the old slot) full.
    fn state(order: &[Slot], a_left: u32, b_left: u32) -> BootState {
        let mut s = BootState::initial();
        s.order = order.to_vec();
        s.a_left = a_left;
        s.b_left = b_left;
        s
    }

    #[test]
    fn an_uncommitted_boot_reboots_exactly_at_timeout_plus_settle_when_the_other_slot_has_tries() {
        let t0 = Instant::now();
        let mut h = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
        assert_eq!(h.limit(), LIMIT);
        assert_eq!(h.next_deadline(), Some(t0 + LIMIT));
        assert_eq!(h.handle(settle::Phase::Waiting, t0 + secs(10)), None);
        assert_eq!(
            h.handle(
                settle::Phase::Waiting,
                t0 + LIMIT - Duration::from_millis(1)
            ),
            None
        );
        assert_eq!(
            h.handle(settle::Phase::Waiting, t0 + LIMIT),
            Some(Action::ReadBootState)
        );
        assert_eq!(h.phase(), Phase::Reading);
        assert_eq!(h.next_deadline(), None);
        // Asked once only, however slow the read.
        assert_eq!(h.handle(settle::Phase::Waiting, t0 + LIMIT + secs(5)), None);
        let s = state(&[Slot::B, Slot::A], 3, 2);
        assert_eq!(
            h.boot_state(Some(&s), settle::Phase::Waiting),
            Some(Action::Reboot {
                limit: LIMIT,
                other_left: 3
            })
        );
        assert_eq!(h.phase(), Phase::Done);
        // Said once: nothing after.
        assert_eq!(h.boot_state(Some(&s), settle::Phase::Waiting), None);
        assert_eq!(
            h.handle(settle::Phase::Waiting, t0 + LIMIT + secs(60)),
            None
        );
    }

    #[test]
    fn a_settling_period_still_running_at_the_limit_does_not_save_the_boot() {
        let t0 = Instant::now();
        let mut h = Health::new(Slot::A, t0, TIMEOUT, SETTLE);
        let settling = settle::Phase::Settling {
            since: t0 + secs(320),
        };
        assert_eq!(h.handle(settling, t0 + LIMIT), Some(Action::ReadBootState));
        assert_eq!(
            h.boot_state(Some(&state(&[Slot::A, Slot::B], 1, 3)), settling),
            Some(Action::Reboot {
                limit: LIMIT,
                other_left: 3
            })
        );
    }

    #[test]
    fn a_committed_boot_is_never_rebooted() {
        let t0 = Instant::now();
        let mut h = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
        assert_eq!(h.handle(settle::Phase::Committed, t0 + secs(200)), None);
        assert_eq!(h.phase(), Phase::Done);
        assert_eq!(h.next_deadline(), None);
        // Even if a service later fails for good.
        assert_eq!(h.handle(settle::Phase::Waiting, t0 + LIMIT + secs(1)), None);
        // Committed while the boot state was being read: no reboot either.
        let mut r = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
        assert_eq!(
            r.handle(settle::Phase::Waiting, t0 + LIMIT),
            Some(Action::ReadBootState)
        );
        let s = state(&[Slot::B, Slot::A], 3, 2);
        assert_eq!(r.boot_state(Some(&s), settle::Phase::Committed), None);
        assert_eq!(r.phase(), Phase::Done);
    }

    #[test]
    fn a_commit_under_way_at_the_limit_is_waited_for() {
        let t0 = Instant::now();
        let s = state(&[Slot::B, Slot::A], 3, 2);
        // It succeeds: no reboot.
        let mut ok = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
        assert_eq!(ok.handle(settle::Phase::Committing, t0 + LIMIT), None);
        assert_eq!(ok.phase(), Phase::WaitingForCommit);
        assert_eq!(ok.next_deadline(), None);
        assert_eq!(
            ok.handle(settle::Phase::Committed, t0 + LIMIT + secs(30)),
            None
        );
        assert_eq!(ok.phase(), Phase::Done);
        // It fails: the boot is not committed, so it is given up at once.
        let mut bad = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
        assert_eq!(bad.handle(settle::Phase::Committing, t0 + LIMIT), None);
        assert_eq!(
            bad.handle(settle::Phase::NotCommitted, t0 + LIMIT + secs(30)),
            Some(Action::ReadBootState)
        );
        assert_eq!(
            bad.boot_state(Some(&s), settle::Phase::NotCommitted),
            Some(Action::Reboot {
                limit: LIMIT,
                other_left: 3
            })
        );
        // A commit that began while the boot state was read is waited for too.
        let mut late = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
        assert_eq!(
            late.handle(settle::Phase::Settling { since: t0 }, t0 + LIMIT),
            Some(Action::ReadBootState)
        );
        assert_eq!(late.boot_state(Some(&s), settle::Phase::Committing), None);
        assert_eq!(late.phase(), Phase::WaitingForCommit);
        assert_eq!(late.handle(settle::Phase::Committed, t0 + LIMIT), None);
        assert_eq!(late.phase(), Phase::Done);
    }

    #[test]
    fn with_no_slot_to_fall_back_to_the_box_stays_up_and_says_so_once() {
        let t0 = Instant::now();
        let no_tries = state(&[Slot::B, Slot::A], 0, 2);
        let not_in_order = state(&[Slot::B], 3, 2);
        for s in [no_tries, not_in_order] {
            let mut h = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
            assert_eq!(
                h.handle(settle::Phase::Waiting, t0 + LIMIT),
                Some(Action::ReadBootState)
            );
            assert_eq!(
                h.boot_state(Some(&s), settle::Phase::Waiting),
                Some(Action::StayUpNoFallback { limit: LIMIT }),
                "{s:?}"
            );
            assert_eq!(h.phase(), Phase::Done);
            assert_eq!(h.next_deadline(), None);
            assert_eq!(
                h.handle(settle::Phase::Waiting, t0 + LIMIT + secs(600)),
                None
            );
            assert_eq!(h.boot_state(Some(&s), settle::Phase::Waiting), None);
        }
    }

    #[test]
    fn an_unreadable_boot_state_keeps_the_box_up() {
        let t0 = Instant::now();
        let mut h = Health::new(Slot::A, t0, TIMEOUT, SETTLE);
        assert_eq!(
            h.handle(settle::Phase::NotCommitted, t0 + LIMIT),
            Some(Action::ReadBootState)
        );
        assert_eq!(
            h.boot_state(None, settle::Phase::NotCommitted),
            Some(Action::StayUpUnknown { limit: LIMIT })
        );
        assert_eq!(h.phase(), Phase::Done);
    }

    #[test]
    fn the_other_slot_is_the_one_checked_for_tries() {
        let t0 = Instant::now();
        // Booted from A: B's tries count, A's do not.
        let s = state(&[Slot::A, Slot::B], 3, 0);
        let mut a = Health::new(Slot::A, t0, TIMEOUT, SETTLE);
        a.handle(settle::Phase::Waiting, t0 + LIMIT);
        assert_eq!(
            a.boot_state(Some(&s), settle::Phase::Waiting),
            Some(Action::StayUpNoFallback { limit: LIMIT })
        );
        // Booted from B with the same state: A has tries, so it reboots.
        let mut b = Health::new(Slot::B, t0, TIMEOUT, SETTLE);
        b.handle(settle::Phase::Waiting, t0 + LIMIT);
        assert_eq!(
            b.boot_state(Some(&s), settle::Phase::Waiting),
            Some(Action::Reboot {
                limit: LIMIT,
                other_left: 3
            })
        );
    }

    #[test]
    fn a_boot_state_nobody_asked_for_is_ignored() {
        let t0 = Instant::now();
        let mut h = Health::new(Slot::A, t0, TIMEOUT, SETTLE);
        let s = state(&[Slot::A, Slot::B], 1, 3);
        assert_eq!(h.boot_state(Some(&s), settle::Phase::Waiting), None);
        assert_eq!(
            h.phase(),
            Phase::Watching {
                deadline: t0 + LIMIT
            }
        );
    }

    #[test]
    fn a_limit_past_the_clock_never_fires_and_never_panics() {
        let t0 = Instant::now();
        let mut h = Health::new(Slot::A, t0, Duration::MAX, Duration::MAX);
        assert_eq!(h.limit(), Duration::MAX);
        assert_eq!(h.next_deadline(), None);
        assert_eq!(h.handle(settle::Phase::Waiting, t0 + secs(1_000_000)), None);
    }
}
