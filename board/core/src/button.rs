//! The button: debounce and press classes.
//!
//! Fed with raw edges ([`Classifier::edge`]) and woken at the deadlines it
//! names ([`Classifier::deadline`], then [`Classifier::poll`]). A level
//! counts only after it has been stable for the debounce time, so contact
//! bounce and glitches shorter than that are ignored.

use alloc::vec::Vec;
use embedded_hal::digital::InputPin;

/// Timing, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub debounce: u64,
    pub long: u64,
    pub very_long: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            debounce: 30,
            long: 3_000,
            very_long: 10_000,
        }
    }
}

/// What the button did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The (debounced) button went down.
    Pressed,
    /// Held for the long-press time; still held (for LED feedback).
    LongReached,
    /// Held for the very-long-press time; still held.
    VeryLongReached,
    /// Held since before boot for the very-long-press time: the factory-reset gesture.
    HeldAtBoot,
    /// Released after less than the long-press time.
    Short,
    /// Released after at least the long-press time and less than the very-long one.
    Long,
    /// Released after at least the very-long-press time.
    VeryLong,
}

pub struct Classifier {
    t: Timing,
    /// Last raw level seen (true = pressed).
    raw: bool,
    /// Debounced level.
    stable: bool,
    /// When the raw level last changed, while it differs from `stable`.
    settle_at: Option<u64>,
    pressed_at: Option<u64>,
    /// The current press began before the classifier started.
    since_boot: bool,
    long_sent: bool,
    very_long_sent: bool,
}

impl Classifier {
    /// `pressed_now` is the level at start: true when the button is already
    /// held (the held-at-boot gesture begins at `now`).
    pub fn new(t: Timing, pressed_now: bool, now: u64) -> Classifier {
        Classifier {
            t,
            raw: pressed_now,
            stable: pressed_now,
            settle_at: None,
            pressed_at: pressed_now.then_some(now),
            since_boot: pressed_now,
            long_sent: false,
            very_long_sent: false,
        }
    }

    /// Starts from a pin's level (active low: a button to ground with a pull-up).
    pub fn from_pin<P: InputPin>(t: Timing, pin: &mut P, now: u64) -> Result<Classifier, P::Error> {
        Ok(Classifier::new(t, pin.is_low()?, now))
    }

    pub fn is_pressed(&self) -> bool {
        self.stable
    }

    /// A raw edge: the level is now `pressed`.
    pub fn edge(&mut self, pressed: bool, now: u64) -> Vec<Event> {
        let mut out = self.poll(now);
        if pressed != self.raw {
            self.raw = pressed;
            self.settle_at = (pressed != self.stable).then_some(now + self.t.debounce);
        }
        out.extend(self.poll(now));
        out
    }

    /// Fires whatever is due at `now`.
    pub fn poll(&mut self, now: u64) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(at) = self.settle_at {
            if now >= at {
                self.settle_at = None;
                if self.raw != self.stable {
                    // The change took effect when the level last moved, not now.
                    let when = at - self.t.debounce;
                    self.stable = self.raw;
                    if self.stable {
                        self.pressed_at = Some(when);
                        self.since_boot = false;
                        self.long_sent = false;
                        self.very_long_sent = false;
                        out.push(Event::Pressed);
                    } else {
                        self.thresholds(when, &mut out);
                        let held = self.pressed_at.map(|p| when.saturating_sub(p)).unwrap_or(0);
                        self.pressed_at = None;
                        out.push(if held >= self.t.very_long {
                            Event::VeryLong
                        } else if held >= self.t.long {
                            Event::Long
                        } else {
                            Event::Short
                        });
                        self.since_boot = false;
                    }
                }
            }
        }
        if self.stable {
            self.thresholds(now, &mut out);
        }
        out
    }

    fn thresholds(&mut self, now: u64, out: &mut Vec<Event>) {
        let Some(p) = self.pressed_at else { return };
        if !self.long_sent && now >= p + self.t.long {
            self.long_sent = true;
            out.push(Event::LongReached);
        }
        if !self.very_long_sent && now >= p + self.t.very_long {
            self.very_long_sent = true;
            out.push(if self.since_boot {
                Event::HeldAtBoot
            } else {
                Event::VeryLongReached
            });
        }
    }

    /// When to call [`Classifier::poll`] next; `None`: only on the next edge.
    pub fn deadline(&self) -> Option<u64> {
        let mut d = self.settle_at;
        if self.stable {
            if let Some(p) = self.pressed_at {
                let next = if !self.long_sent {
                    Some(p + self.t.long)
                } else if !self.very_long_sent {
                    Some(p + self.t.very_long)
                } else {
                    None
                };
                d = match (d, next) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};

    /// Feeds edges at the given times, waking at deadlines in between as a board loop does.
    fn drive(c: &mut Classifier, edges: &[(u64, bool)], until: u64) -> Vec<(u64, Event)> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let next_edge = edges.get(i).map(|e| e.0);
            let next = match (c.deadline(), next_edge) {
                (Some(d), Some(e)) => d.min(e),
                (d, e) => match d.or(e) {
                    Some(x) => x,
                    None => break,
                },
            };
            if next > until {
                break;
            }
            if Some(next) == next_edge {
                let (t, level) = edges[i];
                i += 1;
                out.extend(c.edge(level, t).into_iter().map(|e| (t, e)));
            } else {
                out.extend(c.poll(next).into_iter().map(|e| (next, e)));
            }
        }
        out
    }

    fn events(v: &[(u64, Event)]) -> Vec<Event> {
        v.iter().map(|e| e.1).collect()
    }

    #[test]
    fn short_press_with_contact_bounce() {
        let mut c = Classifier::new(Timing::default(), false, 0);
        // Bounces for 10 ms on press and on release.
        let edges = [
            (1000, true),
            (1003, false),
            (1006, true),
            (1010, true),
            (1500, false),
            (1502, true),
            (1505, false),
        ];
        let got = drive(&mut c, &edges, 5000);
        assert_eq!(events(&got), [Event::Pressed, Event::Short]);
        assert_eq!(got[0].0, 1036, "pressed once stable for 30 ms");
    }

    #[test]
    fn glitches_shorter_than_the_debounce_are_ignored() {
        let mut c = Classifier::new(Timing::default(), false, 0);
        let edges = [(100, true), (110, false), (400, true), (429, false)];
        assert!(drive(&mut c, &edges, 5000).is_empty());
        assert_eq!(c.deadline(), None, "nothing to wake for");
    }

    #[test]
    fn long_press_reports_the_threshold_while_held_then_on_release() {
        let mut c = Classifier::new(Timing::default(), false, 0);
        let got = drive(&mut c, &[(0, true), (4000, false)], 10_000);
        assert_eq!(
            got,
            [
                (30, Event::Pressed),
                (3000, Event::LongReached),
                (4030, Event::Long)
            ]
        );
    }

    #[test]
    fn very_long_press() {
        let mut c = Classifier::new(Timing::default(), false, 0);
        let got = drive(&mut c, &[(0, true), (12_000, false)], 20_000);
        assert_eq!(
            events(&got),
            [
                Event::Pressed,
                Event::LongReached,
                Event::VeryLongReached,
                Event::VeryLong
            ]
        );
        assert_eq!(got[2].0, 10_000);
    }

    #[test]
    fn held_at_boot_is_its_own_gesture() {
        let mut pin = Mock::new(&[T::get(State::Low)]);
        let mut c = Classifier::from_pin(Timing::default(), &mut pin, 0).unwrap();
        pin.done();
        assert!(c.is_pressed());
        let got = drive(&mut c, &[(11_000, false)], 20_000);
        assert_eq!(
            events(&got),
            [Event::LongReached, Event::HeldAtBoot, Event::VeryLong]
        );
        // The next press is an ordinary one.
        let got = drive(&mut c, &[(30_000, true), (30_200, false)], 40_000);
        assert_eq!(events(&got), [Event::Pressed, Event::Short]);
    }

    #[test]
    fn released_at_boot_pin_starts_idle() {
        let mut pin = Mock::new(&[T::get(State::High)]);
        let c = Classifier::from_pin(Timing::default(), &mut pin, 0).unwrap();
        pin.done();
        assert!(!c.is_pressed());
        assert_eq!(c.deadline(), None);
    }

    #[test]
    fn thresholds_are_not_missed_by_a_late_wakeup() {
        let mut c = Classifier::new(Timing::default(), false, 0);
        c.edge(true, 0);
        // Nobody woke us until after release settled: the press still classifies as long.
        let got = c.edge(false, 5000);
        assert_eq!(got, vec![Event::Pressed, Event::LongReached]);
        let got = c.poll(5030);
        assert_eq!(got, vec![Event::Long]);
    }
}
