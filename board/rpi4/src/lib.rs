//! The Raspberry Pi 4 as a Cloudlet board.
//!
//! * Button: a GPIO line through the GPIO character device, with edge events
//!   (the kernel wakes us; no polling). Default: GPIO 17 (pin 11) to 3.3 V,
//!   using the line's default pull-down, so pressed reads high.
//! * LEDs: the board's ACT (status) and PWR (power) through the kernel's LED
//!   class, plus optional GPIO LEDs (embedded-hal pins over gpiocdev, the
//!   GPIO v2 character-device API).
//! * Watchdog: bcm2835's, through /dev/watchdog.
//! * Power: CPU governor, USB autosuspend, disk spin-down, HDMI, Wi-Fi, each
//!   reported applied or unsupported.
//!
//! Wiring and names come from [`Config`] (`/etc/cloudlet/board-rpi4.toml`,
//! overridden by `/data/board-rpi4.toml`), with the usual Pi 4 wiring as default.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Instant;

use cloudlet_board::led::{Led, Role};
use cloudlet_board_linux::{power, Board, DynPin, Msg, PinError, SysfsLed, Watchdog};
use embedded_hal::digital::{ErrorType, OutputPin};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LedRole {
    Status,
    Power,
}

impl From<LedRole> for Role {
    fn from(r: LedRole) -> Role {
        match r {
            LedRole::Status => Role::Status,
            LedRole::Power => Role::Power,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SysfsLedConfig {
    pub name: String,
    pub role: LedRole,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GpioLedConfig {
    pub line: u32,
    pub role: LedRole,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    pub gpio_chip: PathBuf,
    pub button_line: u32,
    /// True for a button to ground with a pull-up (pressed reads low).
    pub button_active_low: bool,
    pub leds: Vec<SysfsLedConfig>,
    pub gpio_leds: Vec<GpioLedConfig>,
    pub watchdog: PathBuf,
    pub governors: Vec<String>,
    pub disk_idle_seconds: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            gpio_chip: "/dev/gpiochip0".into(),
            button_line: 17,
            button_active_low: false,
            leds: vec![
                SysfsLedConfig {
                    name: "ACT".into(),
                    role: LedRole::Status,
                },
                SysfsLedConfig {
                    name: "PWR".into(),
                    role: LedRole::Power,
                },
            ],
            gpio_leds: Vec::new(),
            watchdog: "/dev/watchdog".into(),
            governors: vec!["ondemand".into(), "schedutil".into(), "powersave".into()],
            disk_idle_seconds: 600,
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| format!("board config: {e}"))
    }

    /// The first config file that exists, in order (data partition, then image default).
    pub fn load(paths: &[&Path]) -> Result<Config, String> {
        for p in paths {
            if let Ok(text) = std::fs::read_to_string(p) {
                return Config::parse(&text).map_err(|e| format!("{}: {e}", p.display()));
            }
        }
        Ok(Config::default())
    }
}

/// Where button edges come from (the GPIO chardev on the Pi; fakes in tests).
pub trait EdgeSource: Send + 'static {
    /// The line's level now (true = high).
    fn level(&mut self) -> std::io::Result<bool>;
    /// Blocks until the next edge; returns the level after it.
    fn next_edge(&mut self) -> std::io::Result<bool>;
}

fn gpio_error(e: gpiocdev::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// A GPIO line requested for both edges (the kernel's GPIO v2 character
/// device API, through gpiocdev).
pub struct CdevEdges {
    req: gpiocdev::Request,
    line: u32,
}

impl CdevEdges {
    pub fn open(chip: &Path, line: u32) -> std::io::Result<CdevEdges> {
        let req = gpiocdev::Request::builder()
            .on_chip(chip)
            .with_consumer("cloudlet-button")
            .with_line(line)
            .with_edge_detection(gpiocdev::line::EdgeDetection::BothEdges)
            .request()
            .map_err(gpio_error)?;
        Ok(CdevEdges { req, line })
    }
}

impl EdgeSource for CdevEdges {
    fn level(&mut self) -> std::io::Result<bool> {
        self.req
            .value(self.line)
            .map(|v| v == gpiocdev::line::Value::Active)
            .map_err(gpio_error)
    }
    fn next_edge(&mut self) -> std::io::Result<bool> {
        let ev = self.req.read_edge_event().map_err(gpio_error)?;
        Ok(ev.kind == gpiocdev::line::EdgeKind::Rising)
    }
}

/// Feeds edges from `src` to the board thread; returns whether the button is pressed now.
pub fn start_edges<S: EdgeSource>(
    mut src: S,
    active_low: bool,
    tx: Sender<Msg>,
) -> std::io::Result<bool> {
    let pressed = move |level: bool| level != active_low;
    let now = pressed(src.level()?);
    std::thread::Builder::new()
        .name("button".into())
        .spawn(move || {
            while let Ok(level) = src.next_edge() {
                if tx
                    .send(Msg::Edge {
                        pressed: pressed(level),
                        at: Instant::now(),
                    })
                    .is_err()
                {
                    return;
                }
            }
        })?;
    Ok(now)
}

/// A GPIO LED: an embedded-hal output pin over a gpiocdev line request.
struct GpioLed(gpiocdev::Request);

impl ErrorType for GpioLed {
    type Error = PinError;
}

impl GpioLed {
    fn set(&mut self, v: gpiocdev::line::Value) -> Result<(), PinError> {
        self.0
            .set_lone_value(v)
            .map_err(|e| PinError(gpio_error(e)))
    }
}

impl OutputPin for GpioLed {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        self.set(gpiocdev::line::Value::Inactive)
    }
    fn set_high(&mut self) -> Result<(), Self::Error> {
        self.set(gpiocdev::line::Value::Active)
    }
}

pub struct Rpi4 {
    pub config: Config,
    sys: PathBuf,
}

impl Rpi4 {
    pub fn new(config: Config, sys: &Path) -> Rpi4 {
        Rpi4 {
            config,
            sys: sys.to_owned(),
        }
    }

    fn gpio_led(&self, line: u32) -> Result<GpioLed, gpiocdev::Error> {
        gpiocdev::Request::builder()
            .on_chip(&self.config.gpio_chip)
            .with_consumer("cloudlet-led")
            .with_line(line)
            .as_output(gpiocdev::line::Value::Inactive)
            .request()
            .map(GpioLed)
    }
}

impl Board for Rpi4 {
    fn name(&self) -> &'static str {
        "rpi4"
    }

    fn take_leds(&mut self) -> Vec<Led<DynPin>> {
        let mut leds = Vec::new();
        for l in &self.config.leds {
            if let Ok(pin) = SysfsLed::open(&self.sys.join("class/leds"), &l.name) {
                leds.push(Led::new(DynPin::new(pin), l.role.into()));
            }
        }
        for l in &self.config.gpio_leds {
            if let Ok(pin) = self.gpio_led(l.line) {
                leds.push(Led::new(DynPin::new(pin), l.role.into()));
            }
        }
        leds
    }

    fn start_button(&mut self, tx: Sender<Msg>) -> std::io::Result<bool> {
        let src = CdevEdges::open(&self.config.gpio_chip, self.config.button_line)?;
        start_edges(src, self.config.button_active_low, tx)
    }

    fn watchdog(&mut self) -> Option<Watchdog> {
        Watchdog::open(&self.config.watchdog).ok()
    }

    fn power_settings(&mut self) -> Vec<power::Outcome> {
        let prefer: Vec<&str> = self.config.governors.iter().map(String::as_str).collect();
        vec![
            power::cpu_governor(&self.sys, &prefer),
            power::hdmi(&self.sys),
            power::usb_autosuspend(&self.sys),
            power::wifi(&self.sys),
            power::disk_spindown(&self.sys, self.config.disk_idle_seconds * 1000),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    struct FakeLine {
        now: bool,
        edges: VecDeque<bool>,
    }

    impl EdgeSource for FakeLine {
        fn level(&mut self) -> std::io::Result<bool> {
            Ok(self.now)
        }
        fn next_edge(&mut self) -> std::io::Result<bool> {
            self.edges
                .pop_front()
                .ok_or_else(|| std::io::Error::other("closed"))
        }
    }

    #[test]
    fn default_config_is_the_usual_pi_wiring_and_files_override_it() {
        let c = Config::default();
        assert_eq!((c.button_line, c.button_active_low), (17, false));
        assert_eq!(
            c.leds[0],
            SysfsLedConfig {
                name: "ACT".into(),
                role: LedRole::Status
            }
        );
        let c = Config::parse("button-line = 4\nbutton-active-low = true\ngpio-leds = [{ line = 27, role = \"status\" }]\n").unwrap();
        assert_eq!(
            (c.button_line, c.button_active_low, c.gpio_leds.len()),
            (4, true, 1)
        );
        assert_eq!(c.leds.len(), 2, "unset fields keep their defaults");
        assert!(Config::parse("buton-line = 4")
            .unwrap_err()
            .contains("buton-line"));
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data.toml");
        let image = d.path().join("image.toml");
        std::fs::write(&image, "button-line = 5\n").unwrap();
        assert_eq!(Config::load(&[&data, &image]).unwrap().button_line, 5);
        std::fs::write(&data, "button-line = 6\n").unwrap();
        assert_eq!(Config::load(&[&data, &image]).unwrap().button_line, 6);
    }

    #[test]
    fn edges_become_presses_for_either_polarity() {
        let (tx, rx) = channel();
        let held = start_edges(
            FakeLine {
                now: false,
                edges: VecDeque::from([true, false]),
            },
            false,
            tx,
        )
        .unwrap();
        assert!(!held);
        let got: Vec<bool> = rx
            .iter()
            .take(2)
            .map(|m| match m {
                Msg::Edge { pressed, .. } => pressed,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, [true, false]);

        let (tx, rx) = channel();
        let held = start_edges(
            FakeLine {
                now: false,
                edges: VecDeque::from([true]),
            },
            true,
            tx,
        )
        .unwrap();
        assert!(held, "active low: a low line is a pressed button");
        match rx.recv_timeout(Duration::from_secs(2)).unwrap() {
            Msg::Edge { pressed, .. } => assert!(!pressed),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn leds_and_power_against_a_fake_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path();
        for led in ["ACT", "PWR"] {
            std::fs::create_dir_all(sys.join("class/leds").join(led)).unwrap();
            std::fs::write(sys.join("class/leds").join(led).join("brightness"), "0").unwrap();
            std::fs::write(sys.join("class/leds").join(led).join("max_brightness"), "1").unwrap();
        }
        std::fs::create_dir_all(sys.join("devices/system/cpu/cpufreq/policy0")).unwrap();
        std::fs::write(
            sys.join("devices/system/cpu/cpufreq/policy0/scaling_available_governors"),
            "ondemand performance",
        )
        .unwrap();
        std::fs::write(
            sys.join("devices/system/cpu/cpufreq/policy0/scaling_governor"),
            "performance",
        )
        .unwrap();
        let mut config = Config::default();
        config.gpio_leds.push(GpioLedConfig {
            line: 27,
            role: LedRole::Status,
        });
        config.gpio_chip = sys.join("no-such-gpiochip");
        let mut b = Rpi4::new(config, sys);
        let leds = b.take_leds();
        assert_eq!(
            leds.iter().map(|l| l.role()).collect::<Vec<_>>(),
            [Role::Status, Role::Power],
            "the missing GPIO chip is skipped"
        );
        let mut pins: Vec<DynPin> = leds.into_iter().map(Led::release).collect();
        pins[1].set_high().unwrap();
        assert_eq!(
            std::fs::read_to_string(sys.join("class/leds/PWR/brightness")).unwrap(),
            "1"
        );
        let report: Vec<String> = b.power_settings().iter().map(|o| o.line()).collect();
        assert_eq!(report[0], "cpu governor: ondemand on 1 policies");
        assert_eq!(report.len(), 5);
        assert!(
            report.iter().skip(1).all(|l| l.contains("unsupported")),
            "{report:?}"
        );
        let (tx, _rx) = channel();
        assert!(
            b.start_button(tx).is_err(),
            "no GPIO chip: a clear error, not a hang"
        );
    }
}
