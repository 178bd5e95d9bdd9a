//! The front panel's policy: what the button does and what the LED shows.
//!
//! Like [`crate::supervisor`], these are state machines: events in (button
//! presses, time passing, what the services are doing), actions out (set the
//! LED, publish a press, power off). Nothing here touches the board or a
//! clock, so every rule is tested exactly; `pid1` carries the actions out.
//!
//! * [`Panel`], while init runs: the LED shows booting until every service
//!   is ready, then ready; an error code when a service is given up (cleared
//!   when every service is ready again) or when /data is missing. A short
//!   press is published; the pairing pattern shows while the sharing
//!   service says its window is open (at most [`PAIRING_WINDOW`]), and the
//!   error pattern for [`PAIRING_FAILED`] when pairing fails; the updating
//!   pattern while the updater says it installs, and the update error code
//!   once ([`ROLLED_BACK`]) when it reports a rollback; a long press goes
//!   dark while held and powers off in order when released. Every press is
//!   published.
//! * [`ResetGesture`], at boot when the button is already held: held to the
//!   very-long time arms a factory reset, and one short press within
//!   [`RESET_CONFIRM`] confirms it. Anything else boots normally.
//! * [`ButtonLog`]: the last [`EVENTS_KEPT`] presses, numbered, for the
//!   `events` control request.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cloudlet_board::button::Event as Button;
use cloudlet_board::led::{ErrorClass, LedState};
use cloudlet_proto::control::ButtonEvent;

/// The longest the pairing pattern shows after the sharing service said a
/// window opened (its window is 120 s; this bounds a pattern whose
/// "closed" never came, say because the service died).
pub const PAIRING_WINDOW: Duration = Duration::from_secs(125);
/// How long a failed pairing shows the error pattern.
pub const PAIRING_FAILED: Duration = Duration::from_secs(5);
/// How long a rollback shows the update error code: one run of it (five
/// flashes and the pause, `cloudlet_board::led::pattern`).
pub const ROLLED_BACK: Duration = Duration::from_secs(3);
/// How long the factory-reset gesture waits for its confirming press.
pub const RESET_CONFIRM: Duration = Duration::from_secs(15);
/// How long the held button has to reach the very-long time (10 s) and arm
/// the reset, with some slack.
pub const RESET_ARM: Duration = Duration::from_secs(12);
/// Button presses kept for `events` requests.
pub const EVENTS_KEPT: usize = 64;

/// A finished press, as published to services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Press {
    Short,
    Long,
    VeryLong,
}

impl Press {
    /// The name services see (`cloudlet events`).
    pub fn name(self) -> &'static str {
        match self {
            Press::Short => "short-press",
            Press::Long => "long-press",
            Press::VeryLong => "very-long-press",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The board's button classifier reported something.
    Button(Button),
    /// Time passed: a pairing window that is due closes.
    Tick,
    /// The sharing service's pairing window opened, closed or failed.
    Pairing(cloudlet_proto::control::PairingLed),
    /// The updater began installing, finished, or rolled back.
    Update(cloudlet_proto::control::UpdateLed),
    /// Every service is ready, the first time this boot.
    AllReady,
    /// A service reported ready and every service is ready right now
    /// (for example after one that was given up is restarted by hand).
    EveryServiceReady,
    /// init gave up on a service.
    GaveUp,
    /// An orderly shutdown began (whatever asked for it).
    ShuttingDown,
    /// Every service has stopped; the power goes next.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Show this on the LEDs.
    Led(LedState),
    /// Tell services about a press.
    Publish(Press),
    /// Begin an orderly power-off (a long press).
    PowerOff,
}

/// The running box's button and LED policy.
#[derive(Debug)]
pub struct Panel {
    /// What the LED shows when nothing temporary (pairing, shutdown) is on.
    base: LedState,
    /// What the LED was last told to show.
    shown: LedState,
    pairing_until: Option<Instant>,
    /// A failed pairing shows the error pattern until then.
    failed_until: Option<Instant>,
    /// The updater is installing a bundle.
    updating: bool,
    /// A rollback shows the update error code until then.
    rolled_back_until: Option<Instant>,
    /// Held past the long-press time: dark until released.
    held_long: bool,
    shutting_down: bool,
}

impl Panel {
    /// `base` is booting, or an error found before any service started.
    pub fn new(base: LedState) -> Panel {
        Panel {
            base,
            shown: LedState::Off,
            pairing_until: None,
            failed_until: None,
            updating: false,
            rolled_back_until: None,
            held_long: false,
            shutting_down: false,
        }
    }

    /// Shows the starting state. Call once, when the main loop starts.
    pub fn start(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.show(&mut out);
        out
    }

    /// What the LED shows now.
    pub fn shown(&self) -> LedState {
        self.shown
    }

    /// When the pairing pattern or a failure pattern ends, if one shows.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.pairing_until,
            self.failed_until,
            self.rolled_back_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Button(b) => {
                self.button(b, &mut out);
                return out;
            }
            Event::Tick => {
                if self.pairing_until.is_some_and(|t| t <= now) {
                    self.pairing_until = None;
                }
                if self.failed_until.is_some_and(|t| t <= now) {
                    self.failed_until = None;
                }
                if self.rolled_back_until.is_some_and(|t| t <= now) {
                    self.rolled_back_until = None;
                }
            }
            Event::Pairing(led) => {
                use cloudlet_proto::control::PairingLed;
                match led {
                    PairingLed::Open => {
                        self.failed_until = None;
                        self.pairing_until = Some(now.checked_add(PAIRING_WINDOW).unwrap_or(now));
                    }
                    PairingLed::Closed => self.pairing_until = None,
                    PairingLed::Failed => {
                        self.pairing_until = None;
                        self.failed_until = Some(now.checked_add(PAIRING_FAILED).unwrap_or(now));
                    }
                }
            }
            Event::Update(led) => {
                use cloudlet_proto::control::UpdateLed;
                match led {
                    UpdateLed::Installing => {
                        self.rolled_back_until = None;
                        self.updating = true;
                    }
                    UpdateLed::Idle => {
                        self.updating = false;
                        self.rolled_back_until = None;
                    }
                    UpdateLed::RolledBack => {
                        self.updating = false;
                        self.rolled_back_until = Some(now.checked_add(ROLLED_BACK).unwrap_or(now));
                    }
                }
            }
            Event::AllReady => {
                if self.base == LedState::Booting {
                    self.base = LedState::Ready;
                }
            }
            Event::EveryServiceReady => {
                if self.base == LedState::Error(ErrorClass::Service) {
                    self.base = LedState::Ready;
                }
            }
            Event::GaveUp => self.base = LedState::Error(ErrorClass::Service),
            Event::ShuttingDown => self.shutting_down = true,
            Event::Stopped => {
                self.shown = LedState::Off;
                out.push(Action::Led(LedState::Off));
                return out;
            }
        }
        self.show(&mut out);
        out
    }

    fn button(&mut self, b: Button, out: &mut Vec<Action>) {
        let press = match b {
            Button::Short => Press::Short,
            Button::Long => Press::Long,
            Button::VeryLong => Press::VeryLong,
            Button::LongReached => {
                // Feedback while held: dark means "let go to power off".
                self.held_long = true;
                self.show(out);
                return;
            }
            Button::Pressed | Button::VeryLongReached | Button::HeldAtBoot => return,
        };
        self.held_long = false;
        out.push(Action::Publish(press));
        match press {
            // Published only: the sharing service runs the pairing window
            // and tells the LEDs (Event::Pairing).
            Press::Short => {}
            Press::Long | Press::VeryLong => {
                // Going down: the LED shows it at once.
                self.shutting_down = true;
                self.show(out);
                out.push(Action::PowerOff);
            }
        }
    }

    fn show(&mut self, out: &mut Vec<Action>) {
        let want = if self.held_long {
            LedState::Off
        } else if self.shutting_down {
            LedState::Booting
        } else if self.failed_until.is_some() {
            LedState::Error(ErrorClass::Pairing)
        } else if self.rolled_back_until.is_some() {
            LedState::Error(ErrorClass::Update)
        } else if self.pairing_until.is_some() {
            // A person pressed the button: pairing shows over an update.
            LedState::Pairing
        } else if self.updating {
            LedState::Updating
        } else {
            self.base
        };
        if want != self.shown {
            self.shown = want;
            out.push(Action::Led(want));
        }
    }
}

/// How the factory-reset gesture ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetOutcome {
    /// Let go before the reset armed.
    ReleasedEarly,
    /// Armed and confirmed: wipe /data.
    Confirmed,
    /// Never armed, or no confirming press in time.
    NotConfirmed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetAction {
    Led(LedState),
    /// Held long enough: now release and press once to confirm.
    Armed,
    /// The gesture is over.
    Finished(ResetOutcome),
}

/// The factory-reset gesture, started when the button is held as the board starts.
#[derive(Debug)]
pub struct ResetGesture {
    armed: bool,
    finished: bool,
    until: Instant,
}

impl ResetGesture {
    pub fn new(now: Instant) -> ResetGesture {
        ResetGesture {
            armed: false,
            finished: false,
            until: now
                .checked_add(RESET_ARM.saturating_add(RESET_CONFIRM))
                .unwrap_or(now),
        }
    }

    pub fn armed(&self) -> bool {
        self.armed
    }

    /// When the gesture gives up waiting.
    pub fn deadline(&self) -> Instant {
        self.until
    }

    /// A button event (`Some`), or only time passing (`None`).
    pub fn handle(&mut self, button: Option<Button>, now: Instant) -> Vec<ResetAction> {
        if self.finished {
            return Vec::new();
        }
        match (self.armed, button) {
            (false, Some(Button::HeldAtBoot)) => {
                self.armed = true;
                vec![ResetAction::Led(LedState::ResetArmed), ResetAction::Armed]
            }
            (false, Some(Button::Short | Button::Long)) => {
                // The LED still shows booting, as the board started it.
                self.finish(Vec::new(), ResetOutcome::ReleasedEarly)
            }
            (true, Some(Button::Short)) => self.finish(
                vec![ResetAction::Led(LedState::Booting)],
                ResetOutcome::Confirmed,
            ),
            _ if now >= self.until => self.finish(
                vec![ResetAction::Led(LedState::Booting)],
                ResetOutcome::NotConfirmed,
            ),
            _ => Vec::new(),
        }
    }

    fn finish(&mut self, mut out: Vec<ResetAction>, how: ResetOutcome) -> Vec<ResetAction> {
        self.finished = true;
        out.push(ResetAction::Finished(how));
        out
    }
}

/// The last presses, numbered from 1, for services that ask what happened.
#[derive(Debug, Default)]
pub struct ButtonLog {
    events: VecDeque<ButtonEvent>,
}

impl ButtonLog {
    /// Records `press` at `uptime_ms`; returns its number.
    pub fn push(&mut self, press: Press, uptime_ms: u64) -> u64 {
        let seq = self.events.back().map_or(1, |e| e.seq.saturating_add(1));
        if self.events.len() >= EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(ButtonEvent {
            seq,
            kind: press.name().to_owned(),
            uptime_ms,
        });
        seq
    }

    /// Every kept press numbered after `seq`.
    pub fn after(&self, seq: u64) -> Vec<ButtonEvent> {
        self.events
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }
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
    use Action::{Led, PowerOff, Publish};

    fn started(base: LedState) -> Panel {
        let mut p = Panel::new(base);
        assert_eq!(p.start(), vec![Led(base)]);
        p
    }

    fn button(b: Button) -> Event {
        Event::Button(b)
    }

    #[test]
    fn boots_blinking_and_turns_ready_once_every_service_is() {
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        assert_eq!(p.handle(Event::Tick, t0), vec![]);
        assert_eq!(p.handle(Event::AllReady, t0), vec![Led(LedState::Ready)]);
        assert_eq!(p.shown(), LedState::Ready);
        // Once ready, nothing more to show.
        assert_eq!(p.handle(Event::AllReady, t0), vec![]);
        assert_eq!(p.handle(Event::EveryServiceReady, t0), vec![]);
    }

    #[test]
    fn a_storage_error_stays_when_services_become_ready() {
        let t0 = Instant::now();
        let storage = LedState::Error(ErrorClass::Storage);
        let mut p = started(storage);
        assert_eq!(p.handle(Event::AllReady, t0), vec![]);
        assert_eq!(p.handle(Event::EveryServiceReady, t0), vec![]);
        assert_eq!(p.shown(), storage);
    }

    #[test]
    fn a_given_up_service_shows_an_error_until_all_are_ready_again() {
        let t0 = Instant::now();
        let service = LedState::Error(ErrorClass::Service);
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        assert_eq!(p.handle(Event::GaveUp, t0), vec![Led(service)]);
        // The first-boot AllReady rule does not clear an error...
        assert_eq!(p.handle(Event::AllReady, t0), vec![]);
        // ...every service ready again does.
        assert_eq!(
            p.handle(Event::EveryServiceReady, t0),
            vec![Led(LedState::Ready)]
        );
    }

    #[test]
    fn a_short_press_is_published_and_the_led_shows_what_pairing_says() {
        use cloudlet_proto::control::PairingLed;
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        assert_eq!(
            p.handle(button(Button::Pressed), t0),
            vec![],
            "nothing until released"
        );
        // The press is published; the sharing service runs the window.
        assert_eq!(
            p.handle(button(Button::Short), t0),
            vec![Publish(Press::Short)]
        );
        assert_eq!(
            p.handle(Event::Pairing(PairingLed::Open), t0),
            vec![Led(LedState::Pairing)]
        );
        assert_eq!(p.next_deadline(), Some(t0 + PAIRING_WINDOW));
        assert_eq!(
            p.handle(Event::Pairing(PairingLed::Closed), t0),
            vec![Led(LedState::Ready)]
        );
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn the_pairing_pattern_ends_by_itself_if_closed_never_comes() {
        use cloudlet_proto::control::PairingLed;
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        p.handle(Event::Pairing(PairingLed::Open), t0);
        assert_eq!(
            p.handle(Event::Tick, t0 + PAIRING_WINDOW - Duration::from_millis(1)),
            vec![]
        );
        assert_eq!(
            p.handle(Event::Tick, t0 + PAIRING_WINDOW),
            vec![Led(LedState::Ready)]
        );
    }

    #[test]
    fn a_failed_pairing_shows_the_error_pattern_for_a_few_seconds() {
        use cloudlet_proto::control::PairingLed;
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        p.handle(Event::Pairing(PairingLed::Open), t0);
        assert_eq!(
            p.handle(Event::Pairing(PairingLed::Failed), t0),
            vec![Led(LedState::Error(ErrorClass::Pairing))]
        );
        assert_eq!(p.next_deadline(), Some(t0 + PAIRING_FAILED));
        assert_eq!(
            p.handle(Event::Tick, t0 + PAIRING_FAILED),
            vec![Led(LedState::Ready)]
        );
    }

    #[test]
    fn pairing_shows_over_an_error_and_the_error_comes_back() {
        let t0 = Instant::now();
        let service = LedState::Error(ErrorClass::Service);
        let mut p = started(service);
        assert_eq!(
            p.handle(
                Event::Pairing(cloudlet_proto::control::PairingLed::Open),
                t0
            ),
            vec![Led(LedState::Pairing)]
        );
        assert_eq!(
            p.handle(Event::Tick, t0 + PAIRING_WINDOW),
            vec![Led(service)]
        );
    }

    #[test]
    fn a_long_press_goes_dark_while_held_then_powers_off() {
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        assert_eq!(p.handle(button(Button::Pressed), t0), vec![]);
        assert_eq!(
            p.handle(button(Button::LongReached), t0),
            vec![Led(LedState::Off)]
        );
        // Dark while held, whatever else happens.
        assert_eq!(p.handle(Event::Tick, t0 + Duration::from_secs(1)), vec![]);
        assert_eq!(p.handle(Event::GaveUp, t0), vec![]);
        // Released: published, and the shutdown shows the booting pattern.
        assert_eq!(
            p.handle(button(Button::Long), t0),
            vec![Publish(Press::Long), Led(LedState::Booting), PowerOff]
        );
        // pid1 begins the shutdown: nothing more to show...
        assert_eq!(p.handle(Event::ShuttingDown, t0), vec![]);
        // ...until everything has stopped.
        assert_eq!(p.handle(Event::Stopped, t0), vec![Led(LedState::Off)]);
        assert_eq!(p.shown(), LedState::Off);
    }

    #[test]
    fn a_long_press_while_booting_still_shows_the_shutdown() {
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        assert_eq!(
            p.handle(button(Button::LongReached), t0),
            vec![Led(LedState::Off)]
        );
        assert_eq!(
            p.handle(button(Button::Long), t0),
            vec![Publish(Press::Long), Led(LedState::Booting), PowerOff]
        );
    }

    #[test]
    fn a_very_long_press_also_powers_off() {
        let t0 = Instant::now();
        let mut p = started(LedState::Ready);
        p.handle(button(Button::Pressed), t0);
        assert_eq!(
            p.handle(button(Button::LongReached), t0),
            vec![Led(LedState::Off)]
        );
        assert_eq!(p.handle(button(Button::VeryLongReached), t0), vec![]);
        assert_eq!(
            p.handle(button(Button::VeryLong), t0),
            vec![Publish(Press::VeryLong), Led(LedState::Booting), PowerOff]
        );
    }

    #[test]
    fn other_shutdowns_show_the_booting_pattern() {
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        assert_eq!(
            p.handle(Event::ShuttingDown, t0),
            vec![Led(LedState::Booting)]
        );
    }

    #[test]
    fn during_shutdown_presses_are_published_but_the_led_stays() {
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::ShuttingDown, t0);
        assert_eq!(
            p.handle(button(Button::Short), t0),
            vec![Publish(Press::Short)]
        );
        assert_eq!(p.handle(Event::GaveUp, t0), vec![]);
        assert_eq!(p.shown(), LedState::Booting);
    }

    #[test]
    fn the_update_pattern_shows_until_idle_and_a_rollback_shows_the_error_once() {
        use cloudlet_proto::control::UpdateLed;
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        assert_eq!(
            p.handle(Event::Update(UpdateLed::Installing), t0),
            vec![Led(LedState::Updating)]
        );
        // No deadline: it shows until the updater says otherwise.
        assert_eq!(p.next_deadline(), None);
        assert_eq!(p.handle(Event::Tick, t0 + Duration::from_secs(600)), vec![]);
        assert_eq!(p.shown(), LedState::Updating);
        assert_eq!(
            p.handle(Event::Update(UpdateLed::Idle), t0),
            vec![Led(LedState::Ready)]
        );
        // A rollback: the update error code for one run, then normal.
        p.handle(Event::Update(UpdateLed::Installing), t0);
        assert_eq!(
            p.handle(Event::Update(UpdateLed::RolledBack), t0),
            vec![Led(LedState::Error(ErrorClass::Update))]
        );
        assert_eq!(p.next_deadline(), Some(t0 + ROLLED_BACK));
        assert_eq!(
            p.handle(Event::Tick, t0 + ROLLED_BACK - Duration::from_millis(1)),
            vec![]
        );
        assert_eq!(
            p.handle(Event::Tick, t0 + ROLLED_BACK),
            vec![Led(LedState::Ready)]
        );
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn pairing_shows_over_an_update_and_the_update_pattern_comes_back() {
        use cloudlet_proto::control::{PairingLed, UpdateLed};
        let t0 = Instant::now();
        let mut p = started(LedState::Booting);
        p.handle(Event::AllReady, t0);
        p.handle(Event::Update(UpdateLed::Installing), t0);
        assert_eq!(
            p.handle(Event::Pairing(PairingLed::Open), t0),
            vec![Led(LedState::Pairing)]
        );
        assert_eq!(
            p.handle(Event::Pairing(PairingLed::Closed), t0),
            vec![Led(LedState::Updating)]
        );
        // A shutdown (the updater's reboot) shows over the update.
        assert_eq!(
            p.handle(Event::ShuttingDown, t0),
            vec![Led(LedState::Booting)]
        );
        assert_eq!(p.handle(Event::Update(UpdateLed::Idle), t0), vec![]);
    }

    #[test]
    fn the_reset_gesture_arms_then_needs_a_short_press() {
        let t0 = Instant::now();
        let mut g = ResetGesture::new(t0);
        assert_eq!(g.handle(Some(Button::Pressed), t0), vec![]);
        assert_eq!(
            g.handle(Some(Button::HeldAtBoot), t0 + Duration::from_secs(10)),
            vec![ResetAction::Led(LedState::ResetArmed), ResetAction::Armed]
        );
        assert!(g.armed());
        // Releasing the held button (a very long press) is not the confirmation.
        assert_eq!(
            g.handle(Some(Button::VeryLong), t0 + Duration::from_secs(11)),
            vec![]
        );
        assert_eq!(
            g.handle(Some(Button::Long), t0 + Duration::from_secs(12)),
            vec![]
        );
        assert_eq!(
            g.handle(Some(Button::Short), t0 + Duration::from_secs(13)),
            vec![
                ResetAction::Led(LedState::Booting),
                ResetAction::Finished(ResetOutcome::Confirmed)
            ]
        );
        // Over: nothing more happens.
        assert_eq!(
            g.handle(Some(Button::Short), t0 + Duration::from_secs(14)),
            vec![]
        );
    }

    #[test]
    fn letting_go_early_boots_normally() {
        for release in [Button::Short, Button::Long] {
            let t0 = Instant::now();
            let mut g = ResetGesture::new(t0);
            assert_eq!(
                g.handle(Some(release), t0 + Duration::from_secs(3)),
                vec![ResetAction::Finished(ResetOutcome::ReleasedEarly)]
            );
        }
    }

    #[test]
    fn no_confirmation_in_time_boots_normally() {
        let t0 = Instant::now();
        let mut g = ResetGesture::new(t0);
        assert_eq!(g.deadline(), t0 + RESET_ARM + RESET_CONFIRM);
        g.handle(Some(Button::HeldAtBoot), t0 + Duration::from_secs(10));
        assert_eq!(
            g.handle(None, g.deadline() - Duration::from_millis(1)),
            vec![]
        );
        assert_eq!(
            g.handle(None, g.deadline()),
            vec![
                ResetAction::Led(LedState::Booting),
                ResetAction::Finished(ResetOutcome::NotConfirmed)
            ]
        );
        // Never armed, held past the deadline: the same.
        let mut g = ResetGesture::new(t0);
        assert_eq!(
            g.handle(None, g.deadline()),
            vec![
                ResetAction::Led(LedState::Booting),
                ResetAction::Finished(ResetOutcome::NotConfirmed)
            ]
        );
    }

    #[test]
    fn the_button_log_numbers_presses_and_keeps_the_last_64() {
        let mut log = ButtonLog::default();
        assert_eq!(log.push(Press::Short, 10), 1);
        assert_eq!(log.push(Press::Long, 20), 2);
        let after1 = log.after(1);
        assert_eq!(after1.len(), 1);
        assert_eq!(
            (after1[0].seq, after1[0].kind.as_str(), after1[0].uptime_ms),
            (2, "long-press", 20)
        );
        for i in 0..100 {
            log.push(Press::Short, i);
        }
        let all = log.after(0);
        assert_eq!(all.len(), EVENTS_KEPT);
        assert_eq!(all.first().unwrap().seq, 102 - 64 + 1);
        assert_eq!(all.last().unwrap().seq, 102);
    }
}
