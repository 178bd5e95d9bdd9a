//! Giving up a boot that never became healthy ([`crate::health`]): if it is
//! not committed within `health-timeout` + `settle` of the services
//! starting, and the boot state says the other slot still has tries, init
//! reboots in order (as a `reboot` request would), so that U-Boot counts
//! the try and, once the slot's tries run out, falls back. With nowhere to
//! fall back to, it stays up and says so once.
//!
//! The boot state is read under its lock, which the updater also takes:
//! like the commit, the read runs on a thread of its own and comes back as
//! [`Msg::BootState`], so the main loop (and the watchdog) never wait.

use std::path::Path;
use std::time::{Duration, Instant};

use cloudlet_proto::bootstate::{BootState, OnDisk};

use super::{Init, Msg, Options, ShutdownMode};
use crate::bootcommit::BOOT_DIR;
use crate::health::{Action, Health};
use crate::settle::{self, Settle};

/// The watch over this boot, started now (as the services start): only on
/// a box whose disk and booted slot are known.
pub(super) fn watch(opts: &Options, health_timeout: Duration, settle: Duration) -> Option<Health> {
    let slot = match (opts.system, &opts.disk, opts.slot) {
        (true, Some(_), Some(slot)) => slot,
        _ => return None,
    };
    let h = Health::new(slot, Instant::now(), health_timeout, settle);
    tracing::info!(
        slot = %slot,
        "this boot is given up if not committed within {} s",
        h.limit().as_secs()
    );
    Some(h)
}

impl Init {
    /// Where the boot commit is, for the watch.
    fn commit_phase(&self) -> settle::Phase {
        self.settle
            .as_ref()
            .map_or(settle::Phase::NotCommitted, Settle::phase)
    }

    /// Tells the watch the time and the commit's phase (when its deadline
    /// comes, and when a commit finishes), and carries out what it says.
    pub(super) fn health_check(&mut self) {
        // A box already shutting down is going where it was asked to.
        if self.shutdown.is_some() {
            return;
        }
        let commit = self.commit_phase();
        let Some(h) = self.health.as_mut() else {
            return;
        };
        let action = h.handle(commit, Instant::now());
        self.health_act(action);
    }

    /// What the boot-state read found (`None`: nothing readable).
    pub(super) fn health_boot_state(&mut self, state: Option<BootState>) {
        if self.shutdown.is_some() {
            return;
        }
        let commit = self.commit_phase();
        let Some(h) = self.health.as_mut() else {
            return;
        };
        let action = h.boot_state(state.as_ref(), commit);
        self.health_act(action);
    }

    fn health_act(&mut self, action: Option<Action>) {
        let slot = self.opts.slot.map(|s| s.to_string()).unwrap_or_default();
        match action {
            None => {}
            Some(Action::ReadBootState) => self.read_boot_state(),
            Some(Action::Reboot { limit, other_left }) => {
                tracing::error!(
                    slot = %slot,
                    other_left,
                    "this boot did not become healthy within {} s; rebooting so that the boot loader can fall back",
                    limit.as_secs()
                );
                self.begin_shutdown(ShutdownMode::Reboot, "boot not healthy");
            }
            Some(Action::StayUpNoFallback { limit }) => tracing::error!(
                slot = %slot,
                "this boot did not become healthy within {} s, but the other slot has no tries left: staying up (nowhere better to go)",
                limit.as_secs()
            ),
            Some(Action::StayUpUnknown { limit }) => tracing::error!(
                slot = %slot,
                "this boot did not become healthy within {} s, but the boot state cannot be read: staying up",
                limit.as_secs()
            ),
        }
    }

    /// Reads the boot state on a thread; the answer comes as [`Msg::BootState`].
    fn read_boot_state(&mut self) {
        if !self.boot_mounted {
            tracing::error!("the boot partition is not mounted; the boot state cannot be read");
            self.health_boot_state(None);
            return;
        }
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("boot-state".into())
            .spawn(move || {
                let state = match OnDisk::new(Path::new(BOOT_DIR)).read() {
                    Ok(Some((_, s))) => Some(s),
                    Ok(None) => {
                        tracing::error!("no valid boot state in {BOOT_DIR}");
                        None
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the boot state in {BOOT_DIR}");
                        None
                    }
                };
                let _ = tx.send(Msg::BootState(state));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot read the boot state");
            self.health_boot_state(None);
        }
    }
}
