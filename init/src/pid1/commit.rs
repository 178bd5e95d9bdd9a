//! Committing the boot: the settling state machine ([`crate::settle`]) fed
//! after every supervisor step, and its commit carried out.
//!
//! The commit waits for the boot-state lock, which the updater (not root)
//! also takes: it runs on a thread of its own, so a lock held for long
//! never stops the main loop (nor the watchdog it feeds). Its result comes
//! back as [`Msg::Committed`]; `status` says `settling` meanwhile.

use std::path::Path;
use std::time::Instant;

use super::{Init, Msg};
use crate::bootcommit;
use crate::settle;

impl Init {
    /// Tells the boot commit whether every service is ready now, and
    /// carries out what it says.
    pub(super) fn settle_check(&mut self) {
        let all_ready = self.all_ready_now();
        let Some(s) = self.settle.as_mut() else {
            return;
        };
        for a in s.handle(all_ready, Instant::now()) {
            match a {
                settle::Action::Started { period } => tracing::info!(
                    "all services ready; committing this boot after {} s settled",
                    period.as_secs()
                ),
                settle::Action::Cancelled { after } => tracing::warn!(
                    "a service stopped being ready after {} s; the boot commit waits until every service is ready again",
                    after.as_secs()
                ),
                settle::Action::Commit { ready_for } => {
                    let Some(slot) = self.opts.slot else {
                        tracing::error!("booted slot unknown; this boot will not be marked good");
                        let _ = self.tx.send(Msg::Committed(false));
                        continue;
                    };
                    if !self.boot_mounted {
                        tracing::error!(
                            "the boot partition is not mounted; this boot will not be marked good"
                        );
                        let _ = self.tx.send(Msg::Committed(false));
                        continue;
                    }
                    let tx = self.tx.clone();
                    let spawned = std::thread::Builder::new()
                        .name("boot-commit".into())
                        .spawn(move || {
                            let ok = bootcommit::mark_good(
                                Path::new(bootcommit::BOOT_DIR),
                                slot,
                                ready_for,
                            );
                            let _ = tx.send(Msg::Committed(ok));
                        });
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "could not mark the boot good");
                        let _ = self.tx.send(Msg::Committed(false));
                    }
                }
            }
        }
    }
}
