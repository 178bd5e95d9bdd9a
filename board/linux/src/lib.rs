//! The Linux side of every board.
//!
//! A board ([`Board`]) hands over its LEDs (`OutputPin`s), starts its button's
//! edge source, and may have a watchdog and power settings. [`spawn`] runs
//! them on one thread that sleeps until the next LED or button deadline or
//! the next message: no polling, so an idle box with a steady LED wakes for
//! nothing but the watchdog.
//!
//! ```text
//! init ──Msg::Led/Pet──> board thread ──> LEDs (patterns), /dev/watchdog
//! button edges ──Msg::Edge──┘   └──> button::Event ──> init (callback)
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use cloudlet_board::button::{Classifier, Event, Timing};
use cloudlet_board::led::{Led, LedState, Panel};
use embedded_hal::digital::{ErrorType, OutputPin};

pub mod power;

/// Messages to the board thread.
#[derive(Debug)]
pub enum Msg {
    Led(LedState),
    /// The button's level changed (true = pressed), at that instant.
    Edge {
        pressed: bool,
        at: Instant,
    },
    /// init is healthy: pet the watchdog.
    Pet,
    Stop,
}

/// An I/O error as an embedded-hal pin error.
#[derive(Debug)]
pub struct PinError(pub std::io::Error);

impl embedded_hal::digital::Error for PinError {
    fn kind(&self) -> embedded_hal::digital::ErrorKind {
        embedded_hal::digital::ErrorKind::Other
    }
}

impl From<std::io::Error> for PinError {
    fn from(e: std::io::Error) -> PinError {
        PinError(e)
    }
}

/// An LED of any kind (boards mix sysfs LEDs, GPIO lines and a virtual panel).
pub struct DynPin(Box<dyn OutputPin<Error = PinError> + Send>);

impl DynPin {
    pub fn new(pin: impl OutputPin<Error = PinError> + Send + 'static) -> DynPin {
        DynPin(Box::new(pin))
    }
}

impl ErrorType for DynPin {
    type Error = PinError;
}

impl OutputPin for DynPin {
    fn set_low(&mut self) -> Result<(), PinError> {
        self.0.set_low()
    }
    fn set_high(&mut self) -> Result<(), PinError> {
        self.0.set_high()
    }
}

/// One board.
pub trait Board: Send {
    fn name(&self) -> &'static str;
    /// The LEDs, with their roles. Called once.
    fn take_leds(&mut self) -> Vec<Led<DynPin>>;
    /// Starts delivering button edges as [`Msg::Edge`] (from threads of its
    /// own that block on the hardware). Returns whether the button is held now.
    fn start_button(&mut self, tx: Sender<Msg>) -> std::io::Result<bool>;
    /// The hardware watchdog, if the board has one.
    fn watchdog(&mut self) -> Option<Watchdog> {
        None
    }
    /// Power settings, each applied or reported unsupported.
    fn power_settings(&mut self) -> Vec<power::Outcome> {
        Vec::new()
    }
}

/// `/dev/watchdog`: once opened it must be written to before its timeout or
/// the board resets.
pub struct Watchdog {
    file: std::fs::File,
    pub path: PathBuf,
}

impl Watchdog {
    pub fn open(path: &Path) -> std::io::Result<Watchdog> {
        let file = std::fs::File::options().write(true).open(path)?;
        Ok(Watchdog {
            file,
            path: path.to_owned(),
        })
    }

    pub fn pet(&mut self) -> std::io::Result<()> {
        self.file.write_all(b"\0")
    }
}

/// A handle to the running board thread.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<Msg>,
}

impl Handle {
    pub fn led(&self, s: LedState) {
        let _ = self.tx.send(Msg::Led(s));
    }
    pub fn pet(&self) {
        let _ = self.tx.send(Msg::Pet);
    }
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }
}

/// What [`spawn`] found.
pub struct Started {
    pub handle: Handle,
    /// The button was held when the board started.
    pub held_at_start: bool,
    pub has_watchdog: bool,
    pub power: Vec<power::Outcome>,
}

/// Starts the board thread. `on_event` gets every button event.
pub fn spawn<B, F>(mut board: B, timing: Timing, on_event: F) -> std::io::Result<Started>
where
    B: Board + 'static,
    F: Fn(Event) + Send + 'static,
{
    let (tx, rx) = channel();
    let leds = board.take_leds();
    let held = board.start_button(tx.clone()).unwrap_or(false);
    let watchdog = board.watchdog();
    let has_watchdog = watchdog.is_some();
    let power = board.power_settings();
    let epoch = Instant::now();
    let classifier = Classifier::new(timing, held, 0);
    std::thread::Builder::new()
        .name(format!("board-{}", board.name()))
        .spawn(move || run(rx, Panel::new(leds), classifier, watchdog, epoch, on_event))?;
    Ok(Started {
        handle: Handle { tx },
        held_at_start: held,
        has_watchdog,
        power,
    })
}

fn ms(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_millis() as u64
}

fn run<F: Fn(Event)>(
    rx: Receiver<Msg>,
    mut panel: Panel<DynPin>,
    mut button: Classifier,
    mut watchdog: Option<Watchdog>,
    epoch: Instant,
    on_event: F,
) {
    let _ = panel.set(LedState::Booting, 0);
    loop {
        let now = ms(epoch, Instant::now());
        let next = [panel.deadline(), button.deadline()]
            .into_iter()
            .flatten()
            .min();
        let msg = match next {
            Some(d) => rx.recv_timeout(Duration::from_millis(d.saturating_sub(now))),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let now = ms(epoch, Instant::now());
        match msg {
            Ok(Msg::Led(s)) => {
                if s != panel.state() {
                    let _ = panel.set(s, now);
                }
            }
            Ok(Msg::Edge { pressed, at }) => {
                for e in button.edge(pressed, ms(epoch, at)) {
                    on_event(e);
                }
            }
            Ok(Msg::Pet) => {
                if let Some(w) = watchdog.as_mut() {
                    let _ = w.pet();
                }
            }
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let _ = panel.poll(now);
        for e in button.poll(now) {
            on_event(e);
        }
    }
}

/// An LED in the kernel's LED class (`/sys/class/leds/NAME/brightness`).
pub struct SysfsLed {
    brightness: PathBuf,
    max: String,
}

impl SysfsLed {
    /// Opens LED `name` under `leds_dir` (normally /sys/class/leds), taking
    /// it over from any kernel trigger.
    pub fn open(leds_dir: &Path, name: &str) -> std::io::Result<SysfsLed> {
        let dir = leds_dir.join(name);
        let max =
            std::fs::read_to_string(dir.join("max_brightness")).unwrap_or_else(|_| "1".into());
        // The kernel's default trigger (mmc0 activity, heartbeat) would fight our patterns.
        if dir.join("trigger").exists() {
            std::fs::write(dir.join("trigger"), "none")?;
        }
        let brightness = dir.join("brightness");
        if !brightness.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no LED {}", dir.display()),
            ));
        }
        Ok(SysfsLed {
            brightness,
            max: max.trim().to_owned(),
        })
    }
}

impl ErrorType for SysfsLed {
    type Error = PinError;
}

impl OutputPin for SysfsLed {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        Ok(std::fs::write(&self.brightness, "0")?)
    }
    fn set_high(&mut self) -> Result<(), Self::Error> {
        Ok(std::fs::write(&self.brightness, &self.max)?)
    }
}

/// An LED that goes nowhere (a board without one in that role).
pub struct NoLed;

impl ErrorType for NoLed {
    type Error = PinError;
}

impl OutputPin for NoLed {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
    fn set_high(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Which board this is, from the device tree's `compatible` strings.
pub fn detect(compatible: &[u8]) -> Option<&'static str> {
    let list: Vec<&[u8]> = compatible.split(|&b| b == 0).collect();
    if list.iter().any(|c| *c == b"linux,dummy-virt") {
        Some("qemu-virt")
    } else if list
        .iter()
        .any(|c| c.starts_with(b"raspberrypi,4") || *c == b"brcm,bcm2711")
    {
        Some("rpi4")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_board::led::Role;
    use std::sync::{Arc, Mutex};

    struct FakeBoard {
        log: Arc<Mutex<Vec<String>>>,
        held: bool,
    }

    struct LogPin(Arc<Mutex<Vec<String>>>);
    impl ErrorType for LogPin {
        type Error = PinError;
    }
    impl OutputPin for LogPin {
        fn set_low(&mut self) -> Result<(), PinError> {
            self.0.lock().unwrap().push("off".into());
            Ok(())
        }
        fn set_high(&mut self) -> Result<(), PinError> {
            self.0.lock().unwrap().push("on".into());
            Ok(())
        }
    }

    impl Board for FakeBoard {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn take_leds(&mut self) -> Vec<Led<DynPin>> {
            vec![Led::new(
                DynPin::new(LogPin(self.log.clone())),
                Role::Status,
            )]
        }
        fn start_button(&mut self, _tx: Sender<Msg>) -> std::io::Result<bool> {
            Ok(self.held)
        }
    }

    #[test]
    fn the_board_thread_blinks_while_booting_and_classifies_presses() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (etx, erx) = channel();
        let started = spawn(
            FakeBoard {
                log: log.clone(),
                held: false,
            },
            Timing {
                debounce: 5,
                long: 300,
                very_long: 1000,
            },
            move |e| etx.send(e).unwrap(),
        )
        .unwrap();
        assert!(!started.held_at_start);
        std::thread::sleep(Duration::from_millis(1200));
        let blinks = log.lock().unwrap().len();
        assert!(blinks >= 2, "booting blinks: {:?}", log.lock().unwrap());
        started.handle.led(LedState::Ready);
        std::thread::sleep(Duration::from_millis(100));
        let steady = log.lock().unwrap().len();
        assert_eq!(log.lock().unwrap().last().map(String::as_str), Some("on"));
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(log.lock().unwrap().len(), steady, "ready is steady");

        let tx = started.handle.tx.clone();
        let t = Instant::now();
        tx.send(Msg::Edge {
            pressed: true,
            at: t,
        })
        .unwrap();
        tx.send(Msg::Edge {
            pressed: false,
            at: t + Duration::from_millis(50),
        })
        .unwrap();
        assert_eq!(
            erx.recv_timeout(Duration::from_secs(2)).unwrap(),
            Event::Pressed
        );
        assert_eq!(
            erx.recv_timeout(Duration::from_secs(2)).unwrap(),
            Event::Short
        );
        started.handle.stop();
    }

    #[test]
    fn sysfs_leds_take_over_from_triggers() {
        let d = tempfile::tempdir().unwrap();
        let led = d.path().join("ACT");
        std::fs::create_dir(&led).unwrap();
        std::fs::write(led.join("max_brightness"), "255\n").unwrap();
        std::fs::write(led.join("brightness"), "0").unwrap();
        std::fs::write(led.join("trigger"), "none [mmc0] heartbeat").unwrap();
        let mut pin = SysfsLed::open(d.path(), "ACT").unwrap();
        assert_eq!(
            std::fs::read_to_string(led.join("trigger")).unwrap(),
            "none"
        );
        pin.set_high().unwrap();
        assert_eq!(
            std::fs::read_to_string(led.join("brightness")).unwrap(),
            "255"
        );
        pin.set_low().unwrap();
        assert_eq!(
            std::fs::read_to_string(led.join("brightness")).unwrap(),
            "0"
        );
        assert!(SysfsLed::open(d.path(), "PWR").is_err());
    }

    #[test]
    fn detects_boards_from_the_device_tree() {
        assert_eq!(detect(b"linux,dummy-virt\0"), Some("qemu-virt"));
        assert_eq!(
            detect(b"raspberrypi,4-model-b\0brcm,bcm2711\0"),
            Some("rpi4")
        );
        assert_eq!(detect(b"pine64,rockpro64\0rockchip,rk3399\0"), None);
    }
}
