//! QEMU's virt machine as a Cloudlet board, for the end-to-end tests:
//!
//! * The button is any key of a `virtio-keyboard` device, read through evdev
//!   with blocking reads (no polling). Tests press, hold and release it with
//!   QMP `input-send-event`.
//! * The LEDs are mirrored to the virtio-serial port named `cloudlet.leds`
//!   (the "LED panel"): one line per change, `status on`, `power off`, ...
//! * The watchdog is QEMU's `i6300esb`, when the machine has one.
//!
//! (The power button, gpio-keys on the PL061, is init's on every board.)

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cloudlet_board::led::{Led, Role};
use cloudlet_board_linux::{power, Board, DynPin, Msg, NoLed, PinError, Watchdog};
use embedded_hal::digital::{ErrorType, OutputPin};

/// Name of the virtio-serial port the LED panel is on.
pub const LED_PORT: &str = "cloudlet.leds";
/// evdev name of QEMU's virtio keyboard.
pub const KEYBOARD: &str = "QEMU Virtio Keyboard";

pub struct VirtBoard {
    sys: PathBuf,
    dev: PathBuf,
}

impl VirtBoard {
    /// `sys` and `dev` are /sys and /dev (tests pass fakes).
    pub fn new(sys: &Path, dev: &Path) -> VirtBoard {
        VirtBoard {
            sys: sys.to_owned(),
            dev: dev.to_owned(),
        }
    }

    fn find_port(&self) -> Option<PathBuf> {
        let dir = std::fs::read_dir(self.sys.join("class/virtio-ports")).ok()?;
        dir.flatten().find_map(|e| {
            let name = std::fs::read_to_string(e.path().join("name")).ok()?;
            (name.trim() == LED_PORT).then(|| self.dev.join(e.file_name()))
        })
    }

    fn find_keyboard(&self) -> Option<PathBuf> {
        let dir = std::fs::read_dir(self.sys.join("class/input")).ok()?;
        let mut found: Vec<PathBuf> = dir
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
            .filter(|e| {
                std::fs::read_to_string(e.path().join("device/name"))
                    .is_ok_and(|n| n.trim() == KEYBOARD)
            })
            .map(|e| self.dev.join("input").join(e.file_name()))
            .collect();
        found.sort();
        found.into_iter().next()
    }
}

/// One LED on the panel port.
pub struct PanelLed {
    port: Arc<Mutex<File>>,
    name: &'static str,
}

impl ErrorType for PanelLed {
    type Error = PinError;
}

impl PanelLed {
    fn write(&mut self, on: bool) -> std::io::Result<()> {
        let line = format!("{} {}\n", self.name, if on { "on" } else { "off" });
        let mut f = self
            .port
            .lock()
            .map_err(|_| std::io::Error::other("LED port lock"))?;
        f.write_all(line.as_bytes())
    }
}

impl OutputPin for PanelLed {
    fn set_low(&mut self) -> Result<(), Self::Error> {
        Ok(self.write(false)?)
    }
    fn set_high(&mut self) -> Result<(), Self::Error> {
        Ok(self.write(true)?)
    }
}

/// evdev: EVIOCGKEY(96), the bitmap of keys currently down.
const EVIOCGKEY_96: nix::libc::c_ulong = 0x8060_4518;
const EV_KEY: u16 = 1;

/// The keys down now, per the kernel's key state.
fn keys_down(f: &File) -> std::io::Result<std::collections::BTreeSet<u16>> {
    let mut bits = [0u8; 96];
    // SAFETY: EVIOCGKEY(96) writes at most 96 bytes into the buffer.
    let rc = unsafe { nix::libc::ioctl(f.as_raw_fd(), EVIOCGKEY_96 as _, bits.as_mut_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(bits
        .iter()
        .enumerate()
        .flat_map(|(i, b)| {
            (0..8)
                .filter(move |j| b & (1 << j) != 0)
                .map(move |j| (i * 8 + j) as u16)
        })
        .collect())
}

/// Parses one `struct input_event` (64-bit layout): (type, code, value).
pub fn parse_event(ev: &[u8; 24]) -> (u16, u16, i32) {
    (
        u16::from_ne_bytes([ev[16], ev[17]]),
        u16::from_ne_bytes([ev[18], ev[19]]),
        i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]),
    )
}

/// Tracks keys down from key events; `Some(pressed)` when the button's level changes.
#[derive(Default)]
pub struct KeyLevel {
    down: std::collections::BTreeSet<u16>,
}

impl KeyLevel {
    pub fn event(&mut self, ty: u16, code: u16, value: i32) -> Option<bool> {
        if ty != EV_KEY {
            return None;
        }
        let before = !self.down.is_empty();
        match value {
            1 => {
                self.down.insert(code);
            }
            0 => {
                self.down.remove(&code);
            }
            _ => return None, // autorepeat
        }
        let after = !self.down.is_empty();
        (before != after).then_some(after)
    }
}

impl Board for VirtBoard {
    fn name(&self) -> &'static str {
        "qemu-virt"
    }

    fn take_leds(&mut self) -> Vec<Led<DynPin>> {
        let port = self.find_port().and_then(|p| {
            // Non-blocking: with nobody on the host side, a write must not stall the board thread.
            File::options()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(p)
                .ok()
        });
        match port {
            Some(f) => {
                let f = Arc::new(Mutex::new(f));
                vec![
                    Led::new(
                        DynPin::new(PanelLed {
                            port: f.clone(),
                            name: "status",
                        }),
                        Role::Status,
                    ),
                    Led::new(
                        DynPin::new(PanelLed {
                            port: f,
                            name: "power",
                        }),
                        Role::Power,
                    ),
                ]
            }
            None => vec![Led::new(DynPin::new(NoLed), Role::Status)],
        }
    }

    fn start_button(&mut self, tx: Sender<Msg>) -> std::io::Result<bool> {
        let path = self.find_keyboard().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no virtio keyboard")
        })?;
        let mut f = File::open(&path)?;
        let down = keys_down(&f)?;
        let held = !down.is_empty();
        std::thread::Builder::new()
            .name("button".into())
            .spawn(move || {
                let mut level = KeyLevel { down };
                let mut ev = [0u8; 24];
                while f.read_exact(&mut ev).is_ok() {
                    let (ty, code, value) = parse_event(&ev);
                    if let Some(pressed) = level.event(ty, code, value) {
                        if tx
                            .send(Msg::Edge {
                                pressed,
                                at: Instant::now(),
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            })?;
        Ok(held)
    }

    fn watchdog(&mut self) -> Option<Watchdog> {
        if !self.sys.join("class/watchdog/watchdog0").exists() {
            return None;
        }
        Watchdog::open(&self.dev.join("watchdog")).ok()
    }

    fn power_settings(&mut self) -> Vec<power::Outcome> {
        vec![
            power::cpu_governor(&self.sys, &["schedutil", "ondemand", "powersave"]),
            power::usb_autosuspend(&self.sys),
            power::disk_spindown(&self.sys, 600_000),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_level_follows_any_key_and_ignores_repeats() {
        let mut k = KeyLevel::default();
        assert_eq!(k.event(EV_KEY, 28, 1), Some(true));
        assert_eq!(k.event(EV_KEY, 28, 2), None);
        assert_eq!(k.event(EV_KEY, 30, 1), None);
        assert_eq!(k.event(EV_KEY, 28, 0), None);
        assert_eq!(k.event(EV_KEY, 30, 0), Some(false));
        assert_eq!(k.event(0, 0, 0), None, "SYN events are not key changes");
    }

    #[test]
    fn parses_input_events() {
        let mut ev = [0u8; 24];
        ev[16..18].copy_from_slice(&1u16.to_ne_bytes());
        ev[18..20].copy_from_slice(&28u16.to_ne_bytes());
        ev[20..24].copy_from_slice(&1i32.to_ne_bytes());
        assert_eq!(parse_event(&ev), (1, 28, 1));
    }

    #[test]
    fn finds_the_led_port_and_keyboard_in_sysfs() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let dev = d.path().join("dev");
        for (port, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport2p1", LED_PORT),
        ] {
            std::fs::create_dir_all(sys.join("class/virtio-ports").join(port)).unwrap();
            std::fs::write(
                sys.join("class/virtio-ports").join(port).join("name"),
                format!("{name}\n"),
            )
            .unwrap();
        }
        for (ev, name) in [("event0", "gpio-keys"), ("event1", KEYBOARD)] {
            std::fs::create_dir_all(sys.join("class/input").join(ev).join("device")).unwrap();
            std::fs::write(
                sys.join("class/input").join(ev).join("device/name"),
                format!("{name}\n"),
            )
            .unwrap();
        }
        let b = VirtBoard::new(&sys, &dev);
        assert_eq!(b.find_port(), Some(dev.join("vport2p1")));
        assert_eq!(b.find_keyboard(), Some(dev.join("input/event1")));

        // The panel protocol: one line per change.
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vport2p1"), "").unwrap();
        let mut b = VirtBoard::new(&sys, &dev);
        let leds = b.take_leds();
        assert_eq!(leds.len(), 2);
        let mut pins: Vec<DynPin> = leds.into_iter().map(Led::release).collect();
        pins[0].set_high().unwrap();
        pins[1].set_high().unwrap();
        pins[0].set_low().unwrap();
        assert_eq!(
            std::fs::read_to_string(dev.join("vport2p1")).unwrap(),
            "status on\npower on\nstatus off\n"
        );
    }
}
