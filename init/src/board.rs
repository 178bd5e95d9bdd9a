//! init owns the board: it picks the board from the device tree, starts its
//! thread, and turns its button events into messages for the main loop.

use std::path::Path;

use cloudlet_board::button::{Event, Timing};
use cloudlet_board_linux::{detect, spawn, Handle};

/// A running board.
pub struct Running {
    pub name: &'static str,
    pub handle: Handle,
    pub held_at_start: bool,
    pub watchdog: bool,
    pub power: Vec<String>,
}

/// Starts the board this kernel runs on, if it is one we know.
pub fn start(on_event: impl Fn(Event) + Send + 'static) -> Option<Running> {
    let compatible = std::fs::read("/proc/device-tree/compatible").unwrap_or_default();
    let name = detect(&compatible)?;
    let started = match name {
        "qemu-virt" => spawn(
            cloudlet_board_qemu_virt::VirtBoard::new(Path::new("/sys"), Path::new("/dev")),
            Timing::default(),
            on_event,
        ),
        "rpi4" => {
            // Read before /data is mounted (the factory-reset gesture needs the
            // button first), so the wiring lives in the image.
            let config =
                cloudlet_board_rpi4::Config::load(&[Path::new("/etc/cloudlet/board-rpi4.toml")])
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "board config; using the default wiring");
                        cloudlet_board_rpi4::Config::default()
                    });
            spawn(
                cloudlet_board_rpi4::Rpi4::new(config, Path::new("/sys")),
                Timing::default(),
                on_event,
            )
        }
        _ => return None,
    };
    match started {
        Ok(s) => Some(Running {
            name,
            handle: s.handle,
            held_at_start: s.held_at_start,
            watchdog: s.has_watchdog,
            power: s.power.iter().map(|o| o.line()).collect(),
        }),
        Err(e) => {
            tracing::error!(board = name, error = %e, "cannot start the board");
            None
        }
    }
}
