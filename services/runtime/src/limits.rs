//! How much one client, and all of them together, may hold of a service: the
//! bounds [`crate::serve_listener_with`] enforces.

use std::time::Duration;

/// Bounds on connections and how long a client may keep the server waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, from everyone. Each may hold a descriptor
    /// for the socket and one for a file being read or written, so this
    /// times two must fit under the process's open-file limit
    /// ([`raise_open_file_limit`]).
    pub max_connections: usize,
    /// Connections open at once from one IP address, so that one LAN host
    /// (a flooding script, a sync client gone wrong) cannot use up
    /// `max_connections` and lock everyone else out.
    pub max_connections_per_ip: usize,
    /// How long a client has to send a request head, counted from when the
    /// server starts waiting for it. This covers a keep-alive connection
    /// waiting for its next request too: hyper arms the same timer whenever
    /// it starts reading a head, so an idle keep-alive connection is closed
    /// after this long (a client reconnects; it cannot park sockets).
    pub header_read_timeout: Duration,
    /// How long a request body may deliver nothing while the handler waits
    /// for it before reading it fails ([`crate::BodyError::Idle`]), so a
    /// stalled upload stops holding its temporary file and memory.
    pub body_idle_timeout: Duration,
    /// How long a response write may make no progress (the client stopped
    /// reading) before the connection is dropped ([`crate::stall`]).
    pub write_stall_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 512,
            max_connections_per_ip: 64,
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            write_stall_timeout: Duration::from_secs(60),
        }
    }
}

/// Environment variable overriding [`Limits::header_read_timeout`], in milliseconds.
pub const HEADER_TIMEOUT_VAR: &str = "CLOUDLET_HEADER_TIMEOUT_MS";
/// Environment variable overriding [`Limits::body_idle_timeout`], in milliseconds.
pub const BODY_IDLE_TIMEOUT_VAR: &str = "CLOUDLET_BODY_IDLE_TIMEOUT_MS";
/// Environment variable overriding [`Limits::write_stall_timeout`], in milliseconds.
pub const WRITE_STALL_TIMEOUT_VAR: &str = "CLOUDLET_WRITE_STALL_TIMEOUT_MS";

/// Why the limits in the environment were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitsError {
    /// A variable that is set but is not a whole, positive number of milliseconds.
    #[error("{var}={value:?} is not a positive whole number of milliseconds")]
    NotMilliseconds { var: &'static str, value: String },
}

impl From<LimitsError> for std::io::Error {
    fn from(e: LimitsError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

impl Limits {
    /// The defaults with the timeouts the environment overrides
    /// ([`HEADER_TIMEOUT_VAR`], [`BODY_IDLE_TIMEOUT_VAR`]); tests use them
    /// to see a timeout fire without waiting for the real one.
    pub fn from_env() -> Result<Limits, LimitsError> {
        Limits::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Limits::from_env`] over any lookup. A value that does not parse is
    /// an error, not the default: a mistyped override must not pass unseen.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Limits, LimitsError> {
        let mut limits = Limits::default();
        let millis = |var: &'static str| -> Result<Option<Duration>, LimitsError> {
            let Some(value) = get(var) else {
                return Ok(None);
            };
            match value.trim().parse::<u64>() {
                Ok(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms))),
                _ => Err(LimitsError::NotMilliseconds { var, value }),
            }
        };
        if let Some(d) = millis(HEADER_TIMEOUT_VAR)? {
            limits.header_read_timeout = d;
        }
        if let Some(d) = millis(BODY_IDLE_TIMEOUT_VAR)? {
            limits.body_idle_timeout = d;
        }
        if let Some(d) = millis(WRITE_STALL_TIMEOUT_VAR)? {
            limits.write_stall_timeout = d;
        }
        Ok(limits)
    }
}

/// The soft open-file limit a service asks for. The box's default soft limit
/// (1024) is less than [`Limits::default`] needs: 512 connections, each with
/// a socket and perhaps a file being sent or received, plus the database, the
/// listener and logs. 4096 covers that twice over; asking for more would only
/// let a flood pin more kernel memory on a small board.
pub const OPEN_FILE_LIMIT: u64 = 4096;

/// Raises this process's soft open-file limit to `min(hard limit,
/// OPEN_FILE_LIMIT)`; never lowers it. Returns the soft limit now in force.
pub fn raise_open_file_limit() -> Result<u64, nix::Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let want = hard.min(OPEN_FILE_LIMIT);
    if soft >= want {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    Ok(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn no_variables_give_the_defaults() {
        assert_eq!(Limits::from_vars(vars(&[])), Ok(Limits::default()));
    }

    #[test]
    fn variables_override_only_their_timeout() {
        let l = Limits::from_vars(vars(&[
            (HEADER_TIMEOUT_VAR, "250"),
            (BODY_IDLE_TIMEOUT_VAR, "1500"),
        ]))
        .unwrap();
        assert_eq!(l.header_read_timeout, Duration::from_millis(250));
        assert_eq!(l.body_idle_timeout, Duration::from_millis(1500));
        assert_eq!(l.max_connections, Limits::default().max_connections);
        assert_eq!(
            l.max_connections_per_ip,
            Limits::default().max_connections_per_ip
        );
    }

    #[test]
    fn a_value_that_is_not_positive_milliseconds_is_refused() {
        for bad in ["", "0", "-5", "10s", "1.5"] {
            assert_eq!(
                Limits::from_vars(vars(&[(BODY_IDLE_TIMEOUT_VAR, bad)])),
                Err(LimitsError::NotMilliseconds {
                    var: BODY_IDLE_TIMEOUT_VAR,
                    value: bad.to_owned()
                }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn open_file_limit_is_raised_from_the_usual_1024_to_the_cap_or_the_hard_limit() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Where a box starts a service; the other tests here need far fewer.
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(1024), hard).unwrap();
        let got = raise_open_file_limit().unwrap();
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(got, soft);
        assert_eq!(soft, hard.min(OPEN_FILE_LIMIT), "hard limit {hard}");
        // Never lowered: asking again changes nothing.
        assert_eq!(raise_open_file_limit().unwrap(), soft);
    }
}
