//! init's control protocol.
//!
//! One JSON [`Request`] per line on the Unix socket [`SOCKET_PATH`]; init
//! answers each with one JSON [`Response`] line. Read-only requests, and
//! the LED news of `pairing` and `update`, are open to every local user;
//! requests that change something need uid 0, except `reboot`, which the
//! `updater` user may also send (init checks the peer's credentials).

use serde::{Deserialize, Serialize};

/// Where init listens.
pub const SOCKET_PATH: &str = "/run/cloudlet/control.sock";

/// A request to init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The box's status: identity, clock, data partition, every service.
    Status,
    /// Stop a service (if running) and start it again, clearing its give-up state.
    Restart { service: String },
    /// The last `lines` lines of a service's captured stdout/stderr (all kept if `None`).
    Logs {
        service: String,
        lines: Option<usize>,
    },
    /// Button events with a sequence number above `after`. With `wait_ms`,
    /// waits up to that long for one to happen (a long poll).
    Events { after: u64, wait_ms: Option<u64> },
    /// What the pairing window shows on the LEDs (from the sharing
    /// service, which runs pairing).
    Pairing { state: PairingLed },
    /// What the updater shows on the LEDs while it installs a bundle.
    Update { state: UpdateLed },
    /// Orderly shutdown, then reboot (root, or the updater to boot the new slot).
    Reboot,
    /// Orderly shutdown, then power off.
    PowerOff,
}

impl Request {
    /// Whether the request changes the box (and so needs root).
    pub fn is_privileged(&self) -> bool {
        // The pairing and update LED requests change only what the LEDs
        // show: the sharing and updater services (not root) send them.
        // init lets only those two users (and root) send them on a box
        // (init's `control::Access`).
        !matches!(
            self,
            Request::Status
                | Request::Logs { .. }
                | Request::Events { .. }
                | Request::Pairing { .. }
                | Request::Update { .. }
        )
    }
}

/// The updater's news for the LEDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateLed {
    /// Installing a bundle: the updating pattern, until told otherwise.
    Installing,
    /// Done installing (or nothing to do): the normal pattern.
    Idle,
    /// The new slot failed and the box rolled back: the update error
    /// pattern once, a few seconds.
    RolledBack,
}

/// The pairing window's news for the LEDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairingLed {
    /// A window is open: the pairing pattern.
    Open,
    /// It closed (a device paired, or time ran out): the normal pattern.
    Closed,
    /// Pairing failed (two devices at once, too many wrong codes): the
    /// error pattern for a few seconds.
    Failed,
}

/// init's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(Box<Status>),
    Logs {
        service: String,
        lines: Vec<String>,
    },
    Events {
        events: Vec<ButtonEvent>,
    },
    /// The request was accepted (restart begun, shutdown begun).
    Accepted,
    Error {
        message: String,
    },
}

/// What a service is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceState {
    /// Waiting for the services it depends on to be ready.
    Waiting,
    /// Started, not yet ready.
    Starting,
    /// Running and ready.
    Ready,
    /// Exited; waiting out its backoff before the next start.
    Backoff,
    /// Exited too often in a row; init gave up on it until a restart request.
    Failed,
    /// Being stopped.
    Stopping,
    /// Not running (before start or after shutdown).
    Stopped,
}

/// One supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub state: ServiceState,
    pub pid: Option<u32>,
    /// Times init has started it again after it exited.
    pub restarts: u32,
    /// How the last run ended, e.g. "exit status 1" or "killed by SIGKILL".
    pub last_exit: Option<String>,
    /// Resident memory of the running process, KiB.
    pub rss_kib: Option<u64>,
}

/// A button press init published (pairing listens for `short-press`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ButtonEvent {
    pub seq: u64,
    /// `short-press`, `long-press`, `very-long-press`.
    pub kind: String,
    pub uptime_ms: u64,
}

/// The board init drives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoardInfo {
    pub name: String,
    /// What the LEDs show: booting, ready, pairing, error, ...
    pub led: String,
    pub watchdog: bool,
    /// Each power setting, applied or unsupported, as a line.
    pub power: Vec<String>,
}

/// Where the wall clock came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClockSource {
    /// Not set: the clock is earlier than the image's build time. Times are wrong.
    Unset,
    /// Set by a battery-backed real-time clock at boot.
    Rtc,
    /// Set by SNTP.
    Ntp,
}

/// What init found and did to the data partition at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataInfo {
    pub device: String,
    /// The filesystem had been unmounted cleanly (no journal recovery, no errors).
    pub was_clean: bool,
    /// A new filesystem was made this boot (first boot on an empty partition or a factory reset).
    pub created: bool,
    /// The partition and filesystem were grown this boot.
    pub grown: bool,
    pub size_bytes: u64,
    pub free_bytes: u64,
}

/// The box as init sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub hostname: String,
    pub version: String,
    /// The slot this boot came from ("A" or "B"), if the boot script said.
    pub slot: Option<String>,
    pub clock: ClockSource,
    pub data: Option<DataInfo>,
    /// True once every service has been ready at the same time since boot.
    pub all_ready: bool,
    pub uptime_ms: u64,
    pub init_rss_kib: Option<u64>,
    pub services: Vec<ServiceInfo>,
    #[serde(default)]
    pub board: Option<BoardInfo>,
    /// Whether this boot is committed (marked good in the boot state):
    /// `settling` (every service ready, waiting out the settling period),
    /// `committed` or `not-committed`. `None` outside a box (no boot state).
    #[serde(default)]
    pub boot_commit: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let reqs = [
            Request::Status,
            Request::Restart {
                service: "sync".into(),
            },
            Request::Logs {
                service: "storage".into(),
                lines: Some(10),
            },
            Request::Update {
                state: UpdateLed::RolledBack,
            },
            Request::Reboot,
            Request::PowerOff,
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        }
        assert_eq!(
            serde_json::to_string(&Request::PowerOff).unwrap(),
            r#"{"op":"power-off"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Update {
                state: UpdateLed::Installing
            })
            .unwrap(),
            r#"{"op":"update","state":"installing"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"update","state":"rolled-back"}"#).unwrap(),
            Request::Update {
                state: UpdateLed::RolledBack
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"update","state":"flashing"}"#).is_err());
    }

    #[test]
    fn a_status_without_boot_commit_still_decodes() {
        // What an init from before the field answers.
        let old = r#"{"hostname":"h","version":"0.1.0","slot":"A","clock":"unset","data":null,
            "all_ready":true,"uptime_ms":5,"init_rss_kib":null,"services":[]}"#;
        let s: Status = serde_json::from_str(old).unwrap();
        assert_eq!(s.boot_commit, None);
        let mut new = s.clone();
        new.boot_commit = Some("settling".into());
        let line = serde_json::to_string(&new).unwrap();
        assert!(line.contains(r#""boot_commit":"settling""#), "{line}");
        assert_eq!(serde_json::from_str::<Status>(&line).unwrap(), new);
    }

    #[test]
    fn only_reads_are_unprivileged() {
        assert!(!Request::Status.is_privileged());
        assert!(!Request::Logs {
            service: "x".into(),
            lines: None
        }
        .is_privileged());
        assert!(!Request::Update {
            state: UpdateLed::Installing
        }
        .is_privileged());
        assert!(Request::Reboot.is_privileged());
        assert!(Request::Restart {
            service: "x".into()
        }
        .is_privileged());
    }

    #[test]
    fn unknown_ops_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format-disk"}"#).is_err());
    }
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// init's control socket could not be reached
    #[error("cannot reach init at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    /// the connection failed mid-call
    #[error("talking to init: {0}")]
    Io(#[from] std::io::Error),
    /// init's answer was not a response
    #[error("init's answer is not a control response: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request to init and waits for its answer (blocking).
pub fn call(path: &std::path::Path, request: &Request) -> Result<Response, CallError> {
    use std::io::{BufRead, Write};
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| CallError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer)?;
    Ok(serde_json::from_str(answer.trim())?)
}
