//! The pairing window: the rules of pairing with the button, as a state
//! machine with no clock and no I/O of its own (the service feeds it
//! presses, requests, approvals and time; it answers what to do), so every
//! rule is tested exactly.
//!
//! * A press opens one window for [`WINDOW`]. A device asks to pair inside
//!   it and waits: a native client over TLS with its own key (both ends
//!   derive the same six-digit code from the TLS session), or a browser
//!   through the box's page (the box makes its code from the request's
//!   secret and tells it to that browser only). Both kinds wait in the
//!   same window under the same rules ([`Credential`]).
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
//! * A browser is never made an owner: it pairs as a device.

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

/// What a waiting request would pair, and how it is told apart from
/// another request (two different ones in a window are an overlap).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A native client's key: the SHA-256 of its public key (hex), proved by
    /// mutual TLS. The key is what gets paired.
    Key(String),
    /// A browser's request on the box's page, by the hash of the request's
    /// secret id. What gets paired is a fresh token, given to that browser
    /// as a cookie.
    Browser(String),
}

impl Credential {
    /// The hash that names it (a key's, or a browser request's).
    pub fn id(&self) -> &str {
        match self {
            Credential::Key(k) | Credential::Browser(k) => k,
        }
    }

    pub fn is_browser(&self) -> bool {
        matches!(self, Credential::Browser(_))
    }
}

/// A device waiting in the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub credential: Credential,
    pub name: String,
    pub kind: Kind,
    /// The six digits the new device shows: from the TLS session for a
    /// key, made by the box for a browser.
    pub code: String,
    /// The confirming press came.
    pub pressed: bool,
    /// An owner typed the matching code.
    pub approved: bool,
    /// The address it asked from, for the log and the owners (so that a
    /// device that keeps spoiling pairings can be found).
    pub from: Option<std::net::IpAddr>,
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
    #[error("a newer request from the same device took this one's place")]
    Replaced,
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
    Refuse {
        credential: Credential,
        why: Refusal,
    },
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
                credential: p.credential,
                why: Refusal::Closed,
            });
            return out;
        }
        match self.pending.take() {
            // The same device again (its connection dropped): it waits on,
            // keeping a press or an approval it already has.
            Some(old) if old.credential == p.credential => {
                self.pending = Some(Pending {
                    pressed: old.pressed,
                    approved: old.approved,
                    ..p
                });
            }
            Some(old) => {
                out.extend(self.close());
                out.push(Action::Failed(Refusal::Overlap));
                for credential in [old.credential, p.credential] {
                    out.push(Action::Refuse {
                        credential,
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
                let credential = p.credential.clone();
                out.extend(self.close());
                out.push(Action::Failed(Refusal::TooManyWrongCodes));
                out.push(Action::Refuse {
                    credential,
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
    pub fn withdraw(&mut self, credential: &Credential) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.credential == *credential)
        {
            self.pending = None;
        }
    }

    /// This box paired with another box it asked to (box-to-box pairing):
    /// that success closes the window like any other, refusing whoever
    /// waits in it.
    pub fn used(&mut self) -> Vec<Action> {
        let waiting = self.pending.as_ref().map(|p| p.credential.clone());
        let mut out = self.close();
        if let Some(credential) = waiting {
            out.push(Action::Refuse {
                credential,
                why: Refusal::Closed,
            });
        }
        out
    }

    /// Time passed: a window that is due closes, refusing who waits.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        match self.open_until {
            Some(t) if t <= now => {
                let waiting = self.pending.as_ref().map(|p| p.credential.clone());
                let mut out = self.close();
                if let Some(credential) = waiting {
                    out.push(Action::Refuse {
                        credential,
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
        // The first device of a box is its owner; other boxes are boxes. A
        // browser is not: its cookie is an ambient credential, and it cannot
        // pin the box's key, so owning the box is left to a native client.
        let owner = !has_owner && p.kind == Kind::Device && !p.credential.is_browser();
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
            credential: Credential::Key(key.into()),
            name: format!("device {key}"),
            kind: Kind::Device,
            code: code.into(),
            pressed: false,
            approved: false,
            from: None,
        }
    }

    fn paired(actions: &[Action]) -> Option<(&str, bool)> {
        actions.iter().find_map(|a| match a {
            Action::Pair { pending, owner } => Some((pending.credential.id(), *owner)),
            _ => None,
        })
    }

    fn refused(actions: &[Action], key: &str) -> Option<Refusal> {
        actions.iter().find_map(|a| match a {
            Action::Refuse { credential, why } if credential.id() == key => Some(why.clone()),
            _ => None,
        })
    }

    #[test]
    fn pairing_with_another_box_uses_up_the_window_and_refuses_who_waits() {
        let t = Instant::now();
        let mut w = Window::default();
        w.press(t, true);
        w.request(t, dev("a", "111111"));
        let out = w.used();
        assert!(out.contains(&Action::WindowClosed));
        assert_eq!(refused(&out, "a"), Some(Refusal::Closed));
        assert!(!w.is_open());
        // A second press opens a fresh window, as after any success.
        assert!(w.press(t, true).contains(&Action::WindowOpened));
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

    fn browser(id: &str, code: &str) -> Pending {
        Pending {
            credential: Credential::Browser(id.into()),
            ..dev(id, code)
        }
    }

    fn refused_browser(actions: &[Action], id: &str) -> Option<Refusal> {
        actions.iter().find_map(|a| match a {
            Action::Refuse {
                credential: Credential::Browser(b),
                why,
            } if b == id => Some(why.clone()),
            _ => None,
        })
    }

    #[test]
    fn a_browser_needs_the_window_and_a_second_press_and_is_never_made_owner() {
        let t = Instant::now();
        let mut w = Window::default();
        let out = w.request(t, browser("b", "123456"));
        assert_eq!(refused_browser(&out, "b"), Some(Refusal::Closed));
        w.press(t, false);
        assert!(w.request(t, browser("b", "123456")).is_empty(), "it waits");
        assert!(w.pending().unwrap().credential.is_browser());
        let out = w.press(t, false);
        let (pending, owner) = out
            .iter()
            .find_map(|a| match a {
                Action::Pair { pending, owner } => Some((pending, *owner)),
                _ => None,
            })
            .unwrap();
        assert_eq!(pending.credential, Credential::Browser("b".into()));
        assert!(
            !owner,
            "a browser pairs as a device even on a box without owner"
        );
        assert!(!w.is_open());
        // Without the second press, the window times out on it.
        w.press(t, false);
        w.request(t, browser("c", "1"));
        let out = w.tick(t + WINDOW);
        assert_eq!(refused_browser(&out, "c"), Some(Refusal::TimedOut));
    }

    #[test]
    fn once_an_owner_exists_a_browser_needs_its_code_approved_and_guesses_are_limited() {
        let t = Instant::now();
        let mut w = Window::default();
        w.press(t, true);
        w.request(t, browser("b", "246810"));
        assert!(paired(&w.press(t, true)).is_none(), "the press alone");
        assert_eq!(w.approve(t, "135791"), Err(Refusal::WrongCode));
        assert_eq!(paired(&w.approve(t, "246810").unwrap()), Some(("b", false)));
        // Wrong codes close the window on a browser as on a key.
        w.press(t, true);
        w.request(t, browser("c", "246810"));
        for _ in 1..MAX_WRONG_CODES {
            assert_eq!(w.approve(t, "000000"), Err(Refusal::WrongCode));
        }
        let out = w.approve(t, "000000").unwrap();
        assert_eq!(refused_browser(&out, "c"), Some(Refusal::TooManyWrongCodes));
        assert!(!w.is_open());
    }

    #[test]
    fn a_browser_and_a_native_device_in_one_window_abort_both() {
        let t = Instant::now();
        for browser_first in [true, false] {
            let mut w = Window::default();
            w.press(t, false);
            let (first, second) = if browser_first {
                (browser("x", "1"), dev("x", "2"))
            } else {
                (dev("x", "2"), browser("x", "1"))
            };
            assert!(w.request(t, first).is_empty());
            // Same hash, other kind: still two different requests.
            let out = w.request(t, second);
            assert_eq!(refused_browser(&out, "x"), Some(Refusal::Overlap));
            assert!(out.contains(&Action::Refuse {
                credential: Credential::Key("x".into()),
                why: Refusal::Overlap
            }));
            assert!(out.contains(&Action::Failed(Refusal::Overlap)));
            assert!(!w.is_open());
        }
        // Two browser requests abort both too; the same one again does not.
        let mut w = Window::default();
        w.press(t, false);
        assert!(w.request(t, browser("a", "1")).is_empty());
        assert!(w.request(t, browser("a", "1")).is_empty());
        let out = w.request(t, browser("b", "2"));
        assert_eq!(refused_browser(&out, "a"), Some(Refusal::Overlap));
        assert_eq!(refused_browser(&out, "b"), Some(Refusal::Overlap));
    }

    #[test]
    fn a_withdrawn_browser_is_not_paired_by_a_later_press() {
        let t = Instant::now();
        let mut w = Window::default();
        w.press(t, false);
        w.request(t, browser("b", "1"));
        // A key with the same hash does not withdraw the browser.
        w.withdraw(&Credential::Key("b".into()));
        assert!(w.pending().is_some());
        w.withdraw(&Credential::Browser("b".into()));
        assert!(w.pending().is_none());
        assert!(paired(&w.press(t, false)).is_none());
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
