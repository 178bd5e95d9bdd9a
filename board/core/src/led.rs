//! LED patterns.

use alloc::vec::Vec;
use embedded_hal::digital::OutputPin;

/// Classes of error, shown as that many short flashes then a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A service failed and init gave up on it.
    Service = 2,
    /// The data partition could not be mounted.
    Storage = 3,
    /// No network.
    Network = 4,
    /// An update failed.
    Update = 5,
    /// Pairing failed (two devices at once, or wrong codes).
    Pairing = 6,
}

/// What the box is doing, as the LEDs show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedState {
    Off,
    /// Slow blink: starting up.
    Booting,
    /// Solid: every service ready.
    Ready,
    /// Fast blink: a pairing window is open.
    Pairing,
    /// Double blink: installing an update.
    Updating,
    /// Very fast blink: factory reset armed, waiting for the confirming press.
    ResetArmed,
    /// Blink code.
    Error(ErrorClass),
}

/// What an LED does for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub on: bool,
    /// How long; 0 means "until the state changes".
    pub ms: u32,
}

const fn on(ms: u32) -> Step {
    Step { on: true, ms }
}
const fn off(ms: u32) -> Step {
    Step { on: false, ms }
}

/// Which LED this is on the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The LED that shows the state patterns (the Pi's green ACT).
    Status,
    /// On while the box runs (the Pi's red PWR); blinks the error code.
    Power,
}

/// The steps an LED of `role` runs through, repeated, in `state`.
pub fn pattern(role: Role, state: LedState) -> Vec<Step> {
    match (role, state) {
        (_, LedState::Off) => alloc::vec![off(0)],
        (Role::Power, LedState::Error(class)) | (Role::Status, LedState::Error(class)) => {
            let mut v = Vec::new();
            for _ in 0..class as u32 {
                v.push(on(200));
                v.push(off(200));
            }
            if let Some(last) = v.last_mut() {
                last.ms = 1200;
            }
            v
        }
        (Role::Power, _) => alloc::vec![on(0)],
        (Role::Status, LedState::Booting) => alloc::vec![on(500), off(500)],
        (Role::Status, LedState::Ready) => alloc::vec![on(0)],
        (Role::Status, LedState::Pairing) => alloc::vec![on(100), off(100)],
        (Role::Status, LedState::Updating) => alloc::vec![on(100), off(100), on(100), off(700)],
        (Role::Status, LedState::ResetArmed) => alloc::vec![on(50), off(50)],
    }
}

/// One LED running a pattern.
pub struct Led<P> {
    pin: P,
    role: Role,
    steps: Vec<Step>,
    index: usize,
    /// Level last written (None before the first write).
    level: Option<bool>,
    deadline: Option<u64>,
}

impl<P: OutputPin> Led<P> {
    pub fn new(pin: P, role: Role) -> Led<P> {
        Led {
            pin,
            role,
            steps: Vec::new(),
            index: 0,
            level: None,
            deadline: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Starts `state`'s pattern from its first step.
    pub fn set(&mut self, state: LedState, now: u64) -> Result<(), P::Error> {
        self.steps = pattern(self.role, state);
        self.index = 0;
        self.apply(now)
    }

    fn apply(&mut self, now: u64) -> Result<(), P::Error> {
        let Some(step) = self.steps.get(self.index).copied() else {
            self.deadline = None;
            return Ok(());
        };
        if self.level != Some(step.on) {
            if step.on {
                self.pin.set_high()?;
            } else {
                self.pin.set_low()?;
            }
            self.level = Some(step.on);
        }
        self.deadline = (step.ms > 0).then(|| now + step.ms as u64);
        Ok(())
    }

    /// Advances past every step whose time is up. Call at (or after) [`Led::deadline`].
    pub fn poll(&mut self, now: u64) -> Result<(), P::Error> {
        while let Some(d) = self.deadline {
            if d > now {
                break;
            }
            self.index = (self.index + 1) % self.steps.len().max(1);
            // Steps are timed from their own start, so a late wake-up does
            // not stretch the pattern.
            self.apply(d)?;
        }
        Ok(())
    }

    /// When this LED next changes; `None` while it holds steady.
    pub fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// Gives the pin back (tests call `done()` on mocks).
    pub fn release(self) -> P {
        self.pin
    }
}

/// All of a board's LEDs, showing one state.
pub struct Panel<P> {
    leds: Vec<Led<P>>,
    state: LedState,
}

impl<P: OutputPin> Panel<P> {
    pub fn new(leds: Vec<Led<P>>) -> Panel<P> {
        Panel {
            leds,
            state: LedState::Off,
        }
    }

    pub fn state(&self) -> LedState {
        self.state
    }

    pub fn set(&mut self, state: LedState, now: u64) -> Result<(), P::Error> {
        self.state = state;
        for l in &mut self.leds {
            l.set(state, now)?;
        }
        Ok(())
    }

    pub fn poll(&mut self, now: u64) -> Result<(), P::Error> {
        for l in &mut self.leds {
            l.poll(now)?;
        }
        Ok(())
    }

    /// The earliest time any LED changes.
    pub fn deadline(&self) -> Option<u64> {
        self.leds.iter().filter_map(Led::deadline).min()
    }

    pub fn release(self) -> Vec<P> {
        self.leds.into_iter().map(Led::release).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};

    /// `n` pin writes alternating high, low, high, ... from high.
    fn alternating(n: usize) -> Vec<T> {
        (0..n)
            .map(|i| T::set(if i % 2 == 0 { State::High } else { State::Low }))
            .collect()
    }

    fn run(led: &mut Led<Mock>, until: u64) -> Vec<u64> {
        // Wakes only at deadlines, as a board loop would; returns the wake times.
        let mut wakes = Vec::new();
        while let Some(d) = led.deadline() {
            if d > until {
                break;
            }
            led.poll(d).unwrap();
            wakes.push(d);
        }
        wakes
    }

    #[test]
    fn booting_blinks_slowly_then_ready_holds_steady() {
        let mut led = Led::new(Mock::new(&alternating(5)), Role::Status);
        led.set(LedState::Booting, 0).unwrap();
        assert_eq!(run(&mut led, 1999), [500, 1000, 1500]);
        // Ready while the LED is off: it turns on and stays on, no more wake-ups.
        led.set(LedState::Ready, 1700).unwrap();
        assert_eq!(led.deadline(), None);
        led.release().done();
    }

    #[test]
    fn pairing_blinks_fast_and_updating_double_blinks() {
        let mut led = Led::new(Mock::new(&alternating(11)), Role::Status);
        led.set(LedState::Pairing, 0).unwrap();
        assert_eq!(
            run(&mut led, 1000),
            [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
        );
        led.release().done();

        let mut led = Led::new(Mock::new(&alternating(5)), Role::Status);
        led.set(LedState::Updating, 0).unwrap();
        assert_eq!(run(&mut led, 1000), [100, 200, 300, 1000]);
        led.release().done();
    }

    #[test]
    fn error_codes_flash_their_class_then_pause() {
        let mut expect = Vec::new();
        for _ in 0..2 {
            for _ in 0..3 {
                expect.push(T::set(State::High));
                expect.push(T::set(State::Low));
            }
        }
        let mut led = Led::new(Mock::new(&expect), Role::Status);
        led.set(LedState::Error(ErrorClass::Storage), 0).unwrap();
        // on 200 off 200, on 200 off 200, on 200 off 1200: a 2.2 s cycle.
        let wakes = run(&mut led, 2200 + 1000);
        assert_eq!(&wakes[..6], [200, 400, 600, 800, 1000, 2200]);
        led.release().done();
        assert_eq!(
            pattern(Role::Status, LedState::Error(ErrorClass::Update))
                .iter()
                .filter(|s| s.on)
                .count(),
            5
        );
    }

    #[test]
    fn power_led_is_steady_and_off_means_off() {
        let pin = Mock::new(&[T::set(State::High), T::set(State::Low)]);
        let mut led = Led::new(pin, Role::Power);
        led.set(LedState::Booting, 0).unwrap();
        led.set(LedState::Pairing, 10).unwrap(); // still on: no write
        assert_eq!(led.deadline(), None);
        led.set(LedState::Off, 20).unwrap();
        led.release().done();
    }

    #[test]
    fn a_late_wakeup_catches_up_without_stretching() {
        let pin = Mock::new(&[T::set(State::High), T::set(State::Low), T::set(State::High)]);
        let mut led = Led::new(pin, Role::Status);
        led.set(LedState::Booting, 0).unwrap();
        // Woken 1.2 s late: two steps are due; the next deadline stays on the grid.
        led.poll(1200).unwrap();
        assert_eq!(led.deadline(), Some(1500));
        led.release().done();
    }

    #[test]
    fn a_panel_drives_every_led_and_wakes_at_the_earliest() {
        let status = Mock::new(&[T::set(State::High), T::set(State::Low)]);
        let power = Mock::new(&[T::set(State::High)]);
        let mut p = Panel::new(vec![
            Led::new(status, Role::Status),
            Led::new(power, Role::Power),
        ]);
        p.set(LedState::Booting, 0).unwrap();
        assert_eq!(p.deadline(), Some(500));
        p.poll(500).unwrap();
        assert_eq!(p.state(), LedState::Booting);
        for mut pin in p.release() {
            pin.done();
        }
    }
}
