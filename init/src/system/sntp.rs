//! A small SNTP client (RFC 4330): one request, one answer, the server's
//! transmit time. The Pi has no battery-backed clock, so until this succeeds
//! the box runs with its clock flagged as unset.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds from 1900 (NTP's era 0) to 1970.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

#[derive(Debug, thiserror::Error)]
pub enum SntpError {
    /// the server name did not resolve
    #[error("resolving {0}: {1}")]
    Resolve(String, std::io::Error),
    /// sending or receiving failed (includes the timeout)
    #[error("talking to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    /// the answer is not a usable SNTP server reply
    #[error("bad answer from {0}: {1}")]
    BadReply(SocketAddr, &'static str),
}

pub fn request_packet() -> [u8; 48] {
    let mut p = [0u8; 48];
    p[0] = (4 << 3) | 3; // LI 0, version 4, mode 3 (client)
    p
}

/// The server's transmit time from a reply.
pub fn parse_reply(p: &[u8]) -> Result<SystemTime, &'static str> {
    if p.len() < 48 {
        return Err("shorter than 48 bytes");
    }
    let mode = p[0] & 7;
    if mode != 4 && mode != 5 {
        return Err("not a server reply");
    }
    if p[0] >> 6 == 3 {
        return Err("server clock not synchronized");
    }
    if p[1] == 0 {
        return Err("kiss-of-death (stratum 0)");
    }
    let secs = u32::from_be_bytes([p[40], p[41], p[42], p[43]]) as u64;
    let frac = u32::from_be_bytes([p[44], p[45], p[46], p[47]]) as u64;
    if secs == 0 {
        return Err("no transmit time");
    }
    // Era 1 starts in 2036: small values are after the wrap.
    let secs = if secs < NTP_UNIX_OFFSET {
        secs + (1u64 << 32)
    } else {
        secs
    };
    let nanos = (frac * 1_000_000_000) >> 32;
    Ok(UNIX_EPOCH + Duration::from_secs(secs - NTP_UNIX_OFFSET) + Duration::from_nanos(nanos))
}

/// Asks `server` ("host" or "host:port") for the time.
pub fn query(server: &str, timeout: Duration) -> Result<SystemTime, SntpError> {
    let with_port = if server.contains(':') {
        server.to_owned()
    } else {
        format!("{server}:123")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| SntpError::Resolve(server.to_owned(), e))?
        .next()
        .ok_or_else(|| {
            SntpError::Resolve(server.to_owned(), std::io::ErrorKind::NotFound.into())
        })?;
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).map_err(|e| SntpError::Io(addr, e))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| SntpError::Io(addr, e))?;
    sock.connect(addr).map_err(|e| SntpError::Io(addr, e))?;
    let started = std::time::Instant::now();
    sock.send(&request_packet())
        .map_err(|e| SntpError::Io(addr, e))?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).map_err(|e| SntpError::Io(addr, e))?;
    let t = parse_reply(buf.get(..n).unwrap_or(&[])).map_err(|m| SntpError::BadReply(addr, m))?;
    // Half the round trip is the usual estimate of the one-way delay.
    Ok(t + started.elapsed() / 2)
}

/// Sets the system clock.
pub fn set_clock(t: SystemTime) -> Result<(), String> {
    let d = t.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
    let ts = nix::sys::time::TimeSpec::from(d);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| format!("clock_settime: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reply(unix_secs: u64) -> [u8; 48] {
        let mut p = [0u8; 48];
        p[0] = (4 << 3) | 4;
        p[1] = 2;
        let ntp = (unix_secs + NTP_UNIX_OFFSET) as u32;
        p[40..44].copy_from_slice(&ntp.to_be_bytes());
        p[44..48].copy_from_slice(&0x8000_0000u32.to_be_bytes());
        p
    }

    #[test]
    fn parses_server_replies() {
        let t = parse_reply(&reply(1_800_000_000)).unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_800_000_000_500)
        );
        let mut bad = reply(1);
        bad[1] = 0;
        assert!(parse_reply(&bad).is_err());
        assert!(parse_reply(&request_packet()).is_err());
        assert!(parse_reply(&[0; 10]).is_err());
    }

    #[test]
    fn queries_a_server_on_loopback() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 48];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(n, 48);
            assert_eq!(buf[0] & 7, 3);
            server.send_to(&reply(2_000_000_000), from).unwrap();
        });
        let t = query(&addr.to_string(), Duration::from_secs(5)).unwrap();
        let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!((2_000_000_000..2_000_000_002).contains(&secs), "{secs}");
        h.join().unwrap();
    }

    #[test]
    fn silence_is_a_timeout_error() {
        let quiet = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = query(
            &quiet.local_addr().unwrap().to_string(),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(matches!(err, SntpError::Io(..)), "{err}");
    }
}
