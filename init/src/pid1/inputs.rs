//! What init reads besides signals and the control socket: each service's
//! output and readiness pipes, and the kernel's input devices (the power key).
//! Each reader turns what it reads into a log line or a [`Msg`] for the main loop.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::Msg;
use crate::logbuf::LogBuf;

/// Copies a service's stdout and stderr into its log buffer until it closes them.
pub(super) async fn read_output(fd: OwnedFd, buf: Arc<Mutex<LogBuf>>) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut chunk = [0u8; 4096];
    loop {
        match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let (Ok(mut b), Some(bytes)) = (buf.lock(), chunk.get(..n)) {
                    b.push_bytes(bytes);
                }
            }
        }
    }
    if let Ok(mut b) = buf.lock() {
        if b.has_partial() {
            b.flush_partial();
        }
    }
}

/// Waits for a `notify` service to write `READY` (within its first KiB) on
/// its readiness pipe, and tells the main loop.
pub(super) async fn read_ready(fd: OwnedFd, svc: usize, pid: u32, tx: mpsc::UnboundedSender<Msg>) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut got = Vec::new();
    let mut chunk = [0u8; 64];
    while got.len() < 1024 {
        match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(chunk.get(..n).unwrap_or(&[])),
        }
        if got.windows(5).any(|w| w == b"READY") {
            let _ = tx.send(Msg::Ready { svc, pid });
            return;
        }
    }
}

/// Sends PowerKey when any input device reports KEY_POWER pressed
/// (gpio-keys on the board's power line; QEMU's `system_powerdown`).
pub(super) fn watch_power_keys(tx: mpsc::UnboundedSender<Msg>) {
    let Ok(dir) = std::fs::read_dir("/dev/input") else {
        return;
    };
    for e in dir.flatten() {
        if !e.file_name().to_string_lossy().starts_with("event") {
            continue;
        }
        let path = e.path();
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("power-key".into())
            .spawn(move || {
                use std::io::Read;
                let Ok(mut f) = std::fs::File::open(&path) else {
                    return;
                };
                let mut ev = [0u8; 24];
                while f.read_exact(&mut ev).is_ok() {
                    if is_power_key_press(&ev) && tx.send(Msg::PowerKey).is_err() {
                        return;
                    }
                }
            });
    }
}

/// Whether a `struct input_event` (64-bit: 16 bytes of time, u16 type, u16
/// code, i32 value) is KEY_POWER going down.
fn is_power_key_press(ev: &[u8; 24]) -> bool {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let ty = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    ty == EV_KEY && code == KEY_POWER && value == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ty: u16, code: u16, value: i32) -> [u8; 24] {
        let mut ev = [0u8; 24];
        for (d, s) in ev.iter_mut().skip(16).zip(
            ty.to_ne_bytes()
                .into_iter()
                .chain(code.to_ne_bytes())
                .chain(value.to_ne_bytes()),
        ) {
            *d = s;
        }
        ev
    }

    #[test]
    fn only_the_power_key_going_down_counts() {
        assert!(is_power_key_press(&event(1, 116, 1)));
        assert!(!is_power_key_press(&event(1, 116, 0)), "release");
        assert!(!is_power_key_press(&event(1, 116, 2)), "autorepeat");
        assert!(!is_power_key_press(&event(1, 115, 1)), "another key");
        assert!(!is_power_key_press(&event(0, 116, 1)), "EV_SYN");
    }
}
