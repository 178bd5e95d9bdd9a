//! The pairing window: the rules of pairing with the button, as a state
//! machine with no clock and no I/O of its own (the service feeds it
//! presses, requests, approvals and time; it answers what to do), so every
//! rule is tested exactly.
//!
//! * A press opens one window for [`WINDOW`]. A device asks to pair inside
//!   it (over TLS with its own key; both ends derive the same six-digit code
//!   from the TLS session) and waits.
//! * A second press inside the window confirms the one waiting device. On a
//!   box with no owner yet, that is enough: the device becomes its owner.
//!   Once an owner exists, an owner device must also approve, by typing the
//!   code the new device shows; the box compares it with the code of its
//!   own session with that device, so a relay on the LAN (two sessions, two
//!   codes) is caught.
//! * Two different devices asking in one window abort both (the WPS overlap
//!   rule): nobody is paired, the window closes, the LED shows an error and
//!   a fresh press is needed.
//! * [`MAX_WRONG_CODES`] wrong codes close the window: codes cannot be guessed.
//! * One success closes the window.

use std::time::{Duration, Instant};

/// How long a press keeps the window open.
pub const WINDOW: Duration = Duration::from_secs(120);
/// Wrong codes an owner may type in one window.
pub const MAX_WRONG_CODES: u32 = 3;

/// What a device asks to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A phone, a PC, a browser.
    Device,
    /// Another Cloudlet.
    Box,
}

/// A device waiting in the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// SHA-256 of its public key (hex).
    pub key: String,
    pub name: String,
    pub kind: Kind,
    /// The six digits both ends derive from their TLS session.
    pub code: String,
    /// The confirming press came.
    pub pressed: bool,
    /// An owner typed the matching code.
    pub approved: bool,
}

/// Why a request or an approval did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the pairing window is closed: press the box's button once, then try again")]
    Closed,
    #[error("two devices asked to pair at once, so neither was paired: press the button again and pair one at a time")]
    Overlap,
    #[error("the pairing window closed before the pairing was confirmed: a second press of the box's button, and an owner's approval once the box has an owner")]
    TimedOut,
    #[error("the code does not match the device waiting to pair")]
    WrongCode,
    #[error("too many wrong codes: the window is closed")]
    TooManyWrongCodes,
    #[error("no device is waiting to pair")]
    NothingPending,
    #[error("the box could not pair this device: {0}")]
    Registry(String),
}

/// What the service is to do after an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Show the pairing LED pattern.
    WindowOpened,
    /// Back to the normal LED.
    WindowClosed,
    /// Show the error LED once (an overlap, or too many wrong codes).
    Failed(Refusal),
    /// Pair this device (as owner when `owner`), answer its request.
    Pair { pending: Pending, owner: bool },
    /// Answer the waiting device's request with this refusal.
    Refuse { key: String, why: Refusal },
}

#[derive(Debug, Default)]
pub struct Window {
    open_until: Option<Instant>,
    pending: Option<Pending>,
    wrong_codes: u32,
}

impl Window {
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }

    /// When the window closes, if it is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.open_until
    }

    /// The device waiting, for an owner to see (name, kind, code).
    pub fn pending(&self) -> Option<&Pending> {
        self.pending.as_ref()
    }

    /// The box's button was pressed. `has_owner`: an owner is paired.
    pub fn press(&mut self, now: Instant, has_owner: bool) -> Vec<Action> {
        let mut out = self.tick(now);
        match (&mut self.pending, self.open_until) {
            (_, None) => {
                self.open_until = Some(now.checked_add(WINDOW).unwrap_or(now));
                self.wrong_codes = 0;
                out.push(Action::WindowOpened);
            }
            (Some(p), Some(_)) => {
                p.pressed = true;
                out.extend(self.settle(has_owner));
            }
            // Open, nobody waiting: the window stays as it is.
            (None, Some(_)) => {}
        }
        out
    }

    /// A device asks to pair: it waits (no action about it), or is refused
    /// at once (an action says so).
    pub fn request(&mut self, now: Instant, p: Pending) -> Vec<Action> {
        let mut out = self.tick(now);
        if self.open_until.is_none() {
            out.push(Action::Refuse {
                key: p.key,
                why: Refusal::Closed,
            });
            return out;
        }
        match self.pending.take() {
            // The same device again (its connection dropped): it waits on,
            // keeping a press or an approval it already has.
            Some(old) if old.key == p.key => {
                self.pending = Some(Pending {
                    pressed: old.pressed,
                    approved: old.approved,
                    ..p
                });
            }
            Some(old) => {
                out.extend(self.close());
                out.push(Action::Failed(Refusal::Overlap));
                for key in [old.key, p.key] {
                    out.push(Action::Refuse {
                        key,
                        why: Refusal::Overlap,
                    });
                }
            }
            None => self.pending = Some(p),
        }
        out
    }

    /// An owner typed `code` for the waiting device.
    pub fn approve(&mut self, now: Instant, code: &str) -> Result<Vec<Action>, Refusal> {
        let mut out = self.tick(now);
        let Some(p) = &mut self.pending else {
            return Err(Refusal::NothingPending);
        };
        if !cloudlet_runtime::auth::equal(p.code.as_bytes(), code.as_bytes()) {
            self.wrong_codes = self.wrong_codes.saturating_add(1);
            if self.wrong_codes >= MAX_WRONG_CODES {
                let key = p.key.clone();
                out.extend(self.close());
                out.push(Action::Failed(Refusal::TooManyWrongCodes));
                out.push(Action::Refuse {
                    key,
                    why: Refusal::TooManyWrongCodes,
                });
                // The owner's request is answered with the same reason.
                return Ok(out);
            }
            return Err(Refusal::WrongCode);
        }
        p.approved = true;
        out.extend(self.settle(true));
        Ok(out)
    }

    /// A device gave up waiting (its request ended): it is no longer pending.
    pub fn withdraw(&mut self, key: &str) {
        if self.pending.as_ref().is_some_and(|p| p.key == key) {
            self.pending = None;
        }
    }

    /// Time passed: a window that is due closes, refusing who waits.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        match self.open_until {
            Some(t) if t <= now => {
                let waiting = self.pending.as_ref().map(|p| p.key.clone());
                let mut out = self.close();
                if let Some(key) = waiting {
                    out.push(Action::Refuse {
                        key,
                        why: Refusal::TimedOut,
                    });
                }
                out
            }
            _ => Vec::new(),
        }
    }

    /// Pairs the waiting device if it has what it needs: the press, and an
    /// owner's approval once the box has an owner.
    fn settle(&mut self, has_owner: bool) -> Vec<Action> {
        let ready = self
            .pending
            .as_ref()
            .is_some_and(|p| p.pressed && (p.approved || !has_owner));
        if !ready {
            return Vec::new();
        }
        let Some(p) = self.pending.take() else {
            return Vec::new();
        };
        let mut out = self.close();
        // The first device of a box is its owner; other boxes are boxes.
        let owner = !has_owner && p.kind == Kind::Device;
        out.push(Action::Pair { pending: p, owner });
        out
    }

    fn close(&mut self) -> Vec<Action> {
        self.pending = None;
        self.wrong_codes = 0;
        match self.open_until.take() {
            Some(_) => vec![Action::WindowClosed],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    fn dev(key: &str, code: &str) -> Pending {
        Pending {
            key: key.into(),
            name: format!("device {key}"),
            kind: Kind::Device,
            code: code.into(),
            pressed: false,
            approved: false,
        }
    }

    fn paired(actions: &[Action]) -> Option<(&str, bool)> {
        actions.iter().find_map(|a| match a {
            Action::Pair { pending, owner } => Some((pending.key.as_str(), *owner)),
            _ => None,
        })
    }

    fn refused(actions: &[Action], key: &str) -> Option<Refusal> {
        actions.iter().find_map(|a| match a {
            Action::Refuse { key: k, why } if k == key => Some(why.clone()),
            _ => None,
        })
    }

    #[test]
    fn the_first_device_pairs_as_owner_with_a_press_in_the_window_and_a_second_press() {
        let t = Instant::now();
        let mut w = Window::default();
        assert_eq!(w.press(t, false), vec![Action::WindowOpened]);
        assert!(w.request(t, dev("a", "123456")).is_empty(), "it waits");
        assert_eq!(w.pending().unwrap().code, "123456");
        let out = w.press(t + Duration::from_secs(5), false);
        assert_eq!(paired(&out), Some(("a", true)));
        assert!(out.contains(&Action::WindowClosed), "one success closes it");
        assert!(!w.is_open());
    }

    #[test]
    fn without_a_press_nobody_pairs_and_the_window_times_out() {
        let t = Instant::now();
        let mut w = Window::default();
        // Closed: refused at once.
        let out = w.request(t, dev("a", "1"));
        assert_eq!(refused(&out, "a"), Some(Refusal::Closed));
        w.press(t, false);
        assert!(w.request(t, dev("a", "1")).is_empty());
        let out = w.tick(t + WINDOW);
        assert_eq!(refused(&out, "a"), Some(Refusal::TimedOut));
        assert!(out.contains(&Action::WindowClosed));
        // The next press opens a new window rather than confirming.
        assert_eq!(w.press(t + WINDOW, false), vec![Action::WindowOpened]);
        assert!(w.pending().is_none());
    }

    #[test]
    fn two_devices_in_one_window_abort_both_and_need_a_fresh_press() {
        let t = Instant::now();
        let mut w = Window::default();
        w.press(t, false);
        assert!(w.request(t, dev("a", "1")).is_empty());
        let out = w.request(t, dev("b", "2"));
        assert_eq!(refused(&out, "a"), Some(Refusal::Overlap));
        assert_eq!(refused(&out, "b"), Some(Refusal::Overlap));
        assert!(out.contains(&Action::Failed(Refusal::Overlap)));
        assert!(!w.is_open());
        // A second press now opens a window; it pairs nobody.
        assert_eq!(w.press(t, false), vec![Action::WindowOpened]);
        // The same device asking twice is not an overlap.
        assert!(w.request(t, dev("a", "1")).is_empty());
        assert!(w.request(t, dev("a", "1")).is_empty());
        assert_eq!(paired(&w.press(t, false)), Some(("a", true)));
    }

    #[test]
    fn once_an_owner_exists_a_press_is_not_enough_an_owner_must_type_the_code() {
        let t = Instant::now();
        let mut w = Window::default();
        w.press(t, true);
        w.request(t, dev("b", "654321"));
        assert!(paired(&w.press(t, true)).is_none(), "the press alone");
        assert_eq!(w.approve(t, "000000"), Err(Refusal::WrongCode));
        let out = w.approve(t, "654321").unwrap();
        assert_eq!(paired(&out), Some(("b", false)), "paired, not as owner");
        // Approval first, then the press, works the same.
        w.press(t, true);
        w.request(t, dev("c", "111111"));
        assert!(paired(&w.approve(t, "111111").unwrap()).is_none());
        assert_eq!(paired(&w.press(t, true)), Some(("c", false)));
    }

    #[test]
    fn wrong_codes_are_limited_and_close_the_window() {
        let t = Instant::now();
        let mut w = Window::default();
        w.press(t, true);
        w.request(t, dev("b", "654321"));
        for _ in 1..MAX_WRONG_CODES {
            assert_eq!(w.approve(t, "999999"), Err(Refusal::WrongCode));
        }
        let out = w.approve(t, "999999").unwrap();
        assert_eq!(refused(&out, "b"), Some(Refusal::TooManyWrongCodes));
        assert!(out.contains(&Action::Failed(Refusal::TooManyWrongCodes)));
        assert!(!w.is_open());
        assert_eq!(w.approve(t, "654321"), Err(Refusal::NothingPending));
    }

    #[test]
    fn another_box_pairs_as_a_box_never_as_owner() {
        let t = Instant::now();
        let mut w = Window::default();
        w.press(t, false);
        w.request(
            t,
            Pending {
                kind: Kind::Box,
                ..dev("box", "1")
            },
        );
        assert_eq!(paired(&w.press(t, false)), Some(("box", false)));
    }
}
