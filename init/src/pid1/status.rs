//! The answer to a `status` request: every service, /data, the clock, the board.

use cloudlet_board::led::LedState;
use cloudlet_proto::control::{BoardInfo, ServiceInfo, Status};

use super::Init;
use crate::system::{self, ext4};

impl Init {
    pub(super) fn status(&self) -> Status {
        let services = self
            .sup
            .specs()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let r = self.sup.runtime(i)?;
                Some(ServiceInfo {
                    name: s.name.clone(),
                    state: r.state,
                    pid: r.pid,
                    restarts: r.restarts,
                    last_exit: r.last_exit.clone(),
                    rss_kib: r.pid.and_then(system::rss_kib),
                })
            })
            .collect();
        let mut data = self.data.clone();
        if let Some(d) = data.as_mut() {
            if let Some((size, free)) = ext4::space(&self.opts.data_dir) {
                d.size_bytes = size;
                d.free_bytes = free;
            }
        }
        Status {
            hostname: self.hostname.clone(),
            version: crate::VERSION.to_owned(),
            slot: self.opts.slot.map(|s| s.to_string()),
            clock: self.clock,
            data,
            all_ready: self.sup.all_ready(),
            uptime_ms: uptime_ms(),
            init_rss_kib: system::rss_kib(std::process::id()),
            services,
            boot_commit: self.settle.as_ref().map(|s| s.name().to_owned()),
            board: self.board.as_ref().map(|b| BoardInfo {
                name: b.name.to_owned(),
                led: led_name(self.panel.shown()),
                watchdog: b.watchdog,
                power: b.power.clone(),
            }),
        }
    }
}

/// Milliseconds since boot, as status and events report them.
pub(super) fn uptime_ms() -> u64 {
    u64::try_from(system::uptime().as_millis()).unwrap_or(u64::MAX)
}

/// The LED state as `cloudlet status` shows it.
fn led_name(s: LedState) -> String {
    match s {
        LedState::Off => "off".into(),
        LedState::Booting => "booting".into(),
        LedState::Ready => "ready".into(),
        LedState::Pairing => "pairing".into(),
        LedState::Updating => "updating".into(),
        LedState::ResetArmed => "reset-armed".into(),
        LedState::Error(c) => format!("error-{}", c as u32),
    }
}

#[cfg(test)]
mod tests {
    use cloudlet_board::led::ErrorClass;

    use super::*;

    #[test]
    fn led_names() {
        assert_eq!(led_name(LedState::Ready), "ready");
        assert_eq!(led_name(LedState::ResetArmed), "reset-armed");
        assert_eq!(led_name(LedState::Error(ErrorClass::Storage)), "error-3");
    }
}
