//! Counting open connections, in all and per peer address, so the accept loop
//! can turn away one over [`crate::Limits`]; and logging that at a bounded rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The server holds as many connections as it allows from everyone.
    #[error("the server is at its connection limit ({0})")]
    Total(usize),
    /// The peer holds as many connections as one address may.
    #[error("the peer is at its per-address connection limit ({0})")]
    PerIp(usize),
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Open connections, counted; a [`Permit`] is one of them.
#[derive(Clone)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    counts: Arc<Mutex<Counts>>,
}

/// One counted connection; dropping it frees its place.
pub struct Permit {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> ConnLimiter {
        ConnLimiter {
            max_total,
            max_per_ip,
            counts: Arc::default(),
        }
    }

    /// Counts a connection from `ip`, or says which limit it is over.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<Permit, Refused> {
        // An IPv4 client reaching a dual-stack socket shows up as ::ffff:a.b.c.d;
        // it is still the same host as a.b.c.d.
        let ip = ip.to_canonical();
        // The counts are plain integers, consistent after every statement:
        // a panic elsewhere while the lock was held leaves nothing half-done.
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if c.total >= self.max_total {
            return Err(Refused::Total(self.max_total));
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Refused::PerIp(self.max_per_ip));
        }
        *n += 1;
        c.total += 1;
        Ok(Permit {
            ip,
            counts: self.counts.clone(),
        })
    }

    /// Connections open now: in all, and from `ip`.
    #[cfg(test)]
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        (
            c.total,
            c.per_ip.get(&ip.to_canonical()).copied().unwrap_or(0),
        )
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            // Gone peers leave no entry: the map stays as small as the
            // set of peers connected now.
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Lets a message through at most once per `every`, counting the ones held
/// back, so a flood of refused connections or failing accepts (EMFILE)
/// cannot fill the service's log buffer.
pub struct RateLimitedLog {
    every: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimitedLog {
    pub fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog {
            every,
            last: None,
            held_back: 0,
        }
    }

    /// At `now`: `Some(n)` to log now, `n` being how many were held back
    /// since the last one logged; `None` to stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_ip_limit_refuses_only_that_peer() {
        let l = ConnLimiter::new(10, 2);
        let a1 = l.try_acquire(ip("10.0.0.1")).unwrap();
        let _a2 = l.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(l.try_acquire(ip("10.0.0.1")).err(), Some(Refused::PerIp(2)));
        // The same host over a dual-stack socket counts as the same peer.
        assert_eq!(
            l.try_acquire(ip("::ffff:10.0.0.1")).err(),
            Some(Refused::PerIp(2))
        );
        let _b = l.try_acquire(ip("10.0.0.2")).unwrap();
        drop(a1);
        let _a3 = l.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(l.open(ip("10.0.0.1")), (3, 2));
    }

    #[test]
    fn total_limit_refuses_everyone_until_a_connection_ends() {
        let l = ConnLimiter::new(2, 5);
        let a = l.try_acquire(ip("10.0.0.1")).unwrap();
        let _b = l.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(l.try_acquire(ip("10.0.0.3")).err(), Some(Refused::Total(2)));
        drop(a);
        let _c = l.try_acquire(ip("10.0.0.3")).unwrap();
    }

    #[test]
    fn a_refused_connection_takes_no_place_and_gone_peers_leave_no_entry() {
        let l = ConnLimiter::new(1, 1);
        let a = l.try_acquire(ip("10.0.0.1")).unwrap();
        for _ in 0..3 {
            assert!(l.try_acquire(ip("10.0.0.2")).is_err());
        }
        drop(a);
        assert_eq!(l.open(ip("10.0.0.1")), (0, 0));
        assert!(l.counts.lock().unwrap().per_ip.is_empty());
    }

    #[test]
    fn log_passes_once_per_interval_and_counts_what_it_held_back() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut log = RateLimitedLog::new(s);
        assert_eq!(log.allow(t0), Some(0));
        assert_eq!(log.allow(t0 + Duration::from_millis(10)), None);
        assert_eq!(log.allow(t0 + Duration::from_millis(999)), None);
        assert_eq!(log.allow(t0 + s), Some(2));
        assert_eq!(log.allow(t0 + s + Duration::from_millis(1)), None);
        assert_eq!(log.allow(t0 + s * 5), Some(1));
    }
}
