//! The end: once every service has stopped, the remaining processes, the
//! disks, then the power. And what PID 1 does when its main loop is gone.
//!
//! ## After a failure: reboot in order
//!
//! If the main loop panics or cannot start, init has lost what it knew about
//! its services (their pids, pipes, readiness, the control socket). Running
//! it again would mount the filesystems a second time and start services
//! whose old copies still hold their ports and their data. Carrying on
//! without supervision would leave a box that serves but cannot be managed,
//! restarted or updated. So init does what it does on a power-off request,
//! as far as it can without its state: SIGTERM to every process, 2 s, then
//! SIGKILL, sync, unmount /boot and /data (read-only if busy), and reboot
//! (or power off, if that had been asked for). A boot that never became
//! healthy has not been marked good, so U-Boot's try counter moves on to the
//! other slot if this keeps happening. If even the reboot fails, init reaps
//! orphans forever and stops feeding the watchdog, which resets the board.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::system::mounts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    PowerOff,
    Reboot,
    /// Not PID 1: just exit once services are stopped.
    Exit,
}

/// The last shutdown asked for (0: none), so that a failure during a
/// power-off still powers off.
static REQUESTED: AtomicU8 = AtomicU8::new(0);

/// Records that a shutdown in `mode` was asked for.
pub fn note_requested(mode: ShutdownMode) {
    let v = match mode {
        ShutdownMode::PowerOff => 1,
        ShutdownMode::Reboot => 2,
        ShutdownMode::Exit => 3,
    };
    REQUESTED.store(v, Ordering::Relaxed);
}

/// init's main loop is gone: stop everything in order and reboot (or power
/// off, when that was asked for). Never returns.
pub fn after_failure() -> ! {
    let mode = mode_after_failure();
    tracing::error!(
        ?mode,
        "init cannot go on: stopping every process, then restarting the box"
    );
    // /boot is unmounted if it is mounted; if not, that is a no-op.
    power_down(mode, true)
}

/// Power off if that was asked for; otherwise reboot.
fn mode_after_failure() -> ShutdownMode {
    match REQUESTED.load(Ordering::Relaxed) {
        1 => ShutdownMode::PowerOff,
        _ => ShutdownMode::Reboot,
    }
}

/// After every service stopped: the rest of the processes, then the disks,
/// then the power. Never returns.
pub fn power_down(mode: ShutdownMode, boot_mounted: bool) -> ! {
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let until = Instant::now().checked_add(Duration::from_secs(2));
    while until.is_some_and(|u| Instant::now() < u) {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Err(_) => break,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    reap_now();
    nix::unistd::sync();
    if boot_mounted {
        let _ = mounts::unmount_or_readonly(crate::bootcommit::BOOT_DIR);
    }
    match mounts::unmount_or_readonly("/data") {
        Ok(()) => tracing::info!("data unmounted cleanly"),
        Err(e) => tracing::error!(error = %e, "data"),
    }
    nix::unistd::sync();
    let how = match mode {
        ShutdownMode::Reboot => nix::sys::reboot::RebootMode::RB_AUTOBOOT,
        _ => nix::sys::reboot::RebootMode::RB_POWER_OFF,
    };
    tracing::info!(?mode, "goodbye");
    crate::logging::flush(Duration::from_secs(3));
    let _ = nix::sys::reboot::reboot(how);
    // reboot() only returns on failure. PID 1 must not exit.
    reap_forever()
}

/// Reaps every child that has already exited.
fn reap_now() {
    while let Ok(s) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
        if s == WaitStatus::StillAlive {
            break;
        }
    }
}

/// What is left for PID 1 when nothing else works: reap orphans, forever.
pub fn reap_forever() -> ! {
    loop {
        reap_now();
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_reboots_unless_a_power_off_was_asked_for() {
        assert_eq!(mode_after_failure(), ShutdownMode::Reboot);
        note_requested(ShutdownMode::Reboot);
        assert_eq!(mode_after_failure(), ShutdownMode::Reboot);
        note_requested(ShutdownMode::PowerOff);
        assert_eq!(mode_after_failure(), ShutdownMode::PowerOff);
    }
}
