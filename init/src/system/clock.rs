//! The wall clock: whether it is set, and setting it. The Pi has no
//! battery-backed clock, so it starts in 1970; a clock that reads earlier
//! than the image's build time has not been set, and init never sets one
//! earlier than that (a forged or broken time server cannot wind it back).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudlet_proto::control::ClockSource;

include!(concat!(env!("OUT_DIR"), "/build_epoch.rs"));

/// [`BUILD_EPOCH`] as a time.
pub fn build_time() -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(BUILD_EPOCH))
        .unwrap_or(UNIX_EPOCH)
}

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    /// the time is earlier than the image's build time, so it is wrong
    #[error("refusing to set the clock to {secs} s after 1970: earlier than this image's build time ({BUILD_EPOCH} s)")]
    BeforeBuild { secs: u64 },
    /// the kernel refused the new time
    #[error("clock_settime: {0}")]
    Set(nix::errno::Errno),
}

/// `Unset` when the clock reads earlier than the build time, else `Rtc`
/// (something before init set it: a real-time clock).
pub fn source() -> ClockSource {
    source_at(SystemTime::now(), build_time())
}

fn source_at(now: SystemTime, built: SystemTime) -> ClockSource {
    if now < built {
        ClockSource::Unset
    } else {
        ClockSource::Rtc
    }
}

/// Sets the system clock to `t`, which must not be earlier than the build time.
pub fn set(t: SystemTime) -> Result<(), ClockError> {
    check(t, build_time())?;
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    nix::time::clock_settime(
        nix::time::ClockId::CLOCK_REALTIME,
        nix::sys::time::TimeSpec::from(d),
    )
    .map_err(ClockError::Set)
}

/// The NTP servers to ask, one per line (`#` comments).
const NTP_SERVERS: &str = "/etc/cloudlet/ntp-servers";

/// Keeps trying SNTP with growing pauses (10 s doubling to an hour) until
/// the clock is set, then calls `on_set`. A plain thread that sleeps between
/// tries: it costs the idle box one wake-up per try and nothing else.
pub fn set_by_sntp_in_background(on_set: impl FnOnce() + Send + 'static) {
    let servers: Vec<String> = std::fs::read_to_string(NTP_SERVERS)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if servers.is_empty() {
        tracing::info!("no NTP servers configured");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("sntp".into())
        .spawn(move || {
            let mut pause = Duration::from_secs(10);
            loop {
                for s in &servers {
                    match super::sntp::query(s, Duration::from_secs(3)) {
                        Ok(t) => match set(t) {
                            Ok(()) => {
                                tracing::info!(server = %s, "clock set by SNTP");
                                on_set();
                                return;
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot set the clock"),
                        },
                        Err(e) => tracing::debug!(error = %e, "SNTP"),
                    }
                }
                std::thread::sleep(pause);
                pause = pause.saturating_mul(2).min(Duration::from_secs(3600));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start SNTP");
    }
}

fn check(t: SystemTime, built: SystemTime) -> Result<(), ClockError> {
    if t < built {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        return Err(ClockError::BeforeBuild { secs });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn the_build_time_is_recorded_and_recent() {
        // build.rs never goes below its floor (2026-01-01).
        const { assert!(BUILD_EPOCH >= 1_767_225_600) };
        assert_eq!(
            build_time().duration_since(UNIX_EPOCH).unwrap().as_secs(),
            BUILD_EPOCH
        );
    }

    #[test]
    fn a_clock_before_the_build_is_unset() {
        let built = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(source_at(UNIX_EPOCH, built), ClockSource::Unset);
        assert_eq!(
            source_at(built - Duration::from_secs(1), built),
            ClockSource::Unset
        );
        assert_eq!(source_at(built, built), ClockSource::Rtc);
    }

    #[test]
    fn never_sets_a_time_before_the_build() {
        let built = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let err = check(built - Duration::from_secs(1), built).unwrap_err();
        assert!(
            matches!(
                err,
                ClockError::BeforeBuild {
                    secs: 1_799_999_999
                }
            ),
            "{err}"
        );
        assert!(check(built, built).is_ok());
        // (`set`, which checks this first, is not called here: tests may
        // run as root, and a mistake would set the host's clock.)
    }
}
