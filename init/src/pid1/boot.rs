//! PID 1's work before services start: the factory-reset gesture, then
//! loopback, /data (and flash-time provisioning), the boot partition and
//! the other slot for the updater, hostname, network and clock. Problems are logged and the box carries on in the safest state
//! it can: it never stops here.

use std::collections::BTreeMap;
use std::path::Path;

use cloudlet_proto::control::{ClockSource, DataInfo};
use tokio::sync::mpsc;

use super::{bootpart, data, provision, Msg, Options};
use crate::bootcommit::BOOT_DIR;
use crate::panel::{ResetAction, ResetGesture, ResetOutcome};
use crate::system::{clock, net};

/// The button was held when the board started: runs the factory-reset
/// gesture ([`ResetGesture`]) on the button events that come in. Returns
/// true only when a reset was armed and confirmed. Nothing is touched
/// before that; other messages in the meantime are dropped.
pub(super) async fn reset_gesture(
    board: &crate::board::Running,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
) -> bool {
    tracing::warn!("button held at boot: keep holding 10 s to arm a factory reset");
    let mut gesture = ResetGesture::new(std::time::Instant::now());
    loop {
        let deadline = tokio::time::Instant::from_std(gesture.deadline());
        let button = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Msg::Button(e))) => {
                tracing::debug!(event = ?e, armed = gesture.armed(), "button during the reset gesture");
                Some(e)
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => None,
        };
        let now = match button {
            Some(_) => std::time::Instant::now(),
            // Timed out, or no more events can come: the gesture is over.
            None => gesture.deadline(),
        };
        for action in gesture.handle(button, now) {
            match action {
                ResetAction::Led(s) => board.handle.led(s),
                ResetAction::Armed => tracing::warn!(
                    "factory reset armed: release, then press the button once within 15 s to wipe /data"
                ),
                ResetAction::Finished(how) => {
                    match how {
                        ResetOutcome::ReleasedEarly => {
                            tracing::info!("button released early: no factory reset")
                        }
                        ResetOutcome::Confirmed => tracing::warn!("factory reset confirmed"),
                        ResetOutcome::NotConfirmed => {
                            tracing::info!("factory reset not confirmed: booting normally")
                        }
                    }
                    return how == ResetOutcome::Confirmed;
                }
            }
        }
    }
}

/// What [`system_boot`] found and set up.
pub(super) struct Booted {
    pub hostname: String,
    pub data: Option<DataInfo>,
    /// The boot partition is mounted at [`crate::bootcommit::BOOT_DIR`].
    pub boot_mounted: bool,
}

/// Loopback, /data, the boot partition and the other slot (for the
/// updater), hostname, network, console and clock. Adds init's variables
/// for them to `vars`.
pub(super) fn system_boot(opts: &Options, vars: &mut BTreeMap<String, String>) -> Booted {
    if let Err(e) = net::link_up("lo") {
        tracing::error!(error = %e, "loopback");
    }
    let (data, boot_mounted) = match &opts.disk {
        Some(disk) => {
            // After /data: growing it changes the partition table, and the
            // other slot's device node is handed over once that is done.
            let data = data::prepare(disk, &opts.data_dir);
            let boot_mounted = bootpart::prepare(disk, opts.slot, &opts.etc, vars);
            match data {
                Ok(d) => {
                    // Before any service starts: what `cloudlet flash` left
                    // on the boot partition for the sharing service.
                    if boot_mounted {
                        provision::import(Path::new(BOOT_DIR), &opts.data_dir, &opts.etc);
                    }
                    (Some(d), boot_mounted)
                }
                Err(e) => {
                    tracing::error!(error = %e, "data partition unavailable; services that need /data will fail");
                    (None, boot_mounted)
                }
            }
        }
        None => {
            tracing::error!("no boot disk known; /data and /boot not mounted");
            (None, false)
        }
    };
    let hostname = hostname(&opts.data_dir);
    if let Err(e) = nix::unistd::sethostname(&hostname) {
        tracing::error!(error = %e, "sethostname");
    }
    match net::first_ethernet(Path::new("/sys/class/net")) {
        Some(iface) => {
            if let Err(e) = net::link_up(&iface) {
                tracing::error!(error = %e, "network interface");
            }
            vars.insert("CLOUDLET_NET_IFACE".to_owned(), iface);
        }
        None => tracing::warn!("no Ethernet interface; running without network"),
    }
    if Path::new("/dev/ttyAMA0").exists() || Path::new("/dev/console").exists() {
        vars.insert("CLOUDLET_CONSOLE".to_owned(), "/dev/console".to_owned());
    }
    match clock::source() {
        ClockSource::Unset => {
            tracing::warn!("clock not set (no RTC); times are wrong until SNTP succeeds")
        }
        c => tracing::info!(clock = ?c, "clock"),
    }
    Booted {
        hostname,
        data,
        boot_mounted,
    }
}

/// The box's hostname, kept in /data/init/hostname; made (and stored) on first boot.
fn hostname(data_dir: &Path) -> String {
    let path = data_dir.join("init/hostname");
    if let Some(h) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| net::valid_hostname(&t))
    {
        return h;
    }
    let h = net::new_hostname();
    let tmp = data_dir.join("init/hostname.tmp");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(data_dir.join("init"))?;
        std::fs::write(&tmp, format!("{h}\n"))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir.join("init"))?.sync_all()
    };
    if let Err(e) = write() {
        tracing::warn!(error = %e, "cannot store the hostname; it changes at next boot");
    }
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_hostname_is_made_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let first = hostname(d.path());
        assert!(net::valid_hostname(&first).is_some(), "{first}");
        assert_eq!(
            std::fs::read_to_string(d.path().join("init/hostname")).unwrap(),
            format!("{first}\n")
        );
        assert_eq!(hostname(d.path()), first);
    }
}
