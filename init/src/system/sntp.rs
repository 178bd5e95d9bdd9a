//! A small SNTP client (RFC 4330): one request, one answer, the server's
//! transmit time. The Pi has no battery-backed clock, so until this succeeds
//! the box runs with its clock flagged as unset.
//!
//! The answer is not trusted blindly (RFC 4330 section 5, RFC 9109):
//! * the request's transmit timestamp is 64 random bits, and the reply must
//!   carry them back as its originate timestamp, so an off-path sender that
//!   did not see the request cannot answer it (other packets are ignored);
//! * the reply must be a server reply (mode 4) of version 3 or 4, from a
//!   synchronized server (leap indicator not 3, stratum 1 to 15; stratum 0 is
//!   a kiss-of-death), with a non-zero transmit timestamp;
//! * the time must not be earlier than the image's build time
//!   ([`crate::system::clock::BUILD_EPOCH`]).

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds from 1900 (NTP's era 0) to 1970.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
/// An NTP header without extensions.
pub const PACKET_LEN: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum SntpError {
    /// the server name did not resolve
    #[error("resolving {0}: {1}")]
    Resolve(String, std::io::Error),
    /// no random bytes for the request's timestamp
    #[error("reading /dev/urandom: {0}")]
    Random(std::io::Error),
    /// sending or receiving failed (includes the timeout)
    #[error("talking to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    /// the answer is not a usable SNTP server reply
    #[error("bad answer from {0}: {1}")]
    BadReply(SocketAddr, ReplyError),
}

/// Why a reply is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// the packet is shorter than an NTP header
    #[error("shorter than {PACKET_LEN} bytes ({0})")]
    Short(usize),
    /// the originate timestamp is not the request's transmit timestamp
    #[error("it does not answer our request (originate timestamp differs)")]
    NotOurs,
    /// not a server reply
    #[error("mode {0}, not a server reply (4)")]
    Mode(u8),
    /// a protocol version this client does not speak
    #[error("NTP version {0} (only 3 and 4 are accepted)")]
    Version(u8),
    /// the server says its own clock is not synchronized (leap indicator 3)
    #[error("server clock not synchronized (leap indicator 3)")]
    Unsynchronized,
    /// stratum 0 (a kiss-of-death) or above 15 (unsynchronized)
    #[error("stratum {0} (only 1 to 15 are accepted; 0 is a kiss-of-death)")]
    Stratum(u8),
    /// the transmit timestamp is zero
    #[error("no transmit time")]
    NoTransmitTime,
    /// the time is earlier than this image's build time, so it is wrong
    #[error("time {0} s after 1970 is earlier than this image's build time")]
    BeforeBuild(u64),
}

/// A client request: version 4, mode 3, and a random transmit timestamp that
/// the server's reply must echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    packet: [u8; PACKET_LEN],
}

impl Request {
    /// A request carrying `nonce` as its transmit timestamp.
    pub fn new(nonce: [u8; 8]) -> Request {
        let mut packet = [0u8; PACKET_LEN];
        packet[0] = (4 << 3) | 3; // LI 0, version 4, mode 3 (client)
        if let Some(transmit) = packet.last_chunk_mut::<8>() {
            *transmit = nonce;
        }
        Request { packet }
    }

    /// A request with a nonce from the kernel's random source.
    pub fn random() -> std::io::Result<Request> {
        let mut nonce = [0u8; 8];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut nonce)?;
        Ok(Request::new(nonce))
    }

    pub fn bytes(&self) -> &[u8; PACKET_LEN] {
        &self.packet
    }

    fn nonce(&self) -> [u8; 8] {
        timestamp(&self.packet, 40)
    }
}

/// The server's transmit time from a reply to `sent`, if it passes every
/// check in the module comment; `not_before` is the build time.
pub fn parse_reply(
    p: &[u8],
    sent: &Request,
    not_before: SystemTime,
) -> Result<SystemTime, ReplyError> {
    let Some(header) = p.first_chunk::<PACKET_LEN>() else {
        return Err(ReplyError::Short(p.len()));
    };
    let [flags, stratum, ..] = *header;
    let origin = timestamp(header, 24);
    let transmit = timestamp(header, 40);
    // First: a packet that does not answer our request is not from our server.
    if origin != sent.nonce() {
        return Err(ReplyError::NotOurs);
    }
    let (leap, version, mode) = (flags >> 6, (flags >> 3) & 7, flags & 7);
    if mode != 4 {
        return Err(ReplyError::Mode(mode));
    }
    if !(3..=4).contains(&version) {
        return Err(ReplyError::Version(version));
    }
    if leap == 3 {
        return Err(ReplyError::Unsynchronized);
    }
    if !(1..=15).contains(&stratum) {
        return Err(ReplyError::Stratum(stratum));
    }
    if transmit == [0; 8] {
        return Err(ReplyError::NoTransmitTime);
    }
    let [s0, s1, s2, s3, f0, f1, f2, f3] = transmit;
    let secs = u64::from(u32::from_be_bytes([s0, s1, s2, s3]));
    let frac = u64::from(u32::from_be_bytes([f0, f1, f2, f3]));
    let t = ntp_to_unix(secs, frac);
    if t < not_before {
        let s = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        return Err(ReplyError::BeforeBuild(s));
    }
    Ok(t)
}

/// The 64-bit timestamp at byte `at` of a header (zero if out of range).
fn timestamp(p: &[u8; PACKET_LEN], at: usize) -> [u8; 8] {
    p.get(at..)
        .and_then(|s| s.first_chunk::<8>())
        .copied()
        .unwrap_or_default()
}

/// An NTP timestamp as a time. Era 0 ends in 2036: seconds that would be
/// before 1970 are read as era 1 (up to 2106).
fn ntp_to_unix(secs: u64, frac: u64) -> SystemTime {
    let unix = match secs.checked_sub(NTP_UNIX_OFFSET) {
        Some(s) => s,
        // secs < offset here, so this is at most 2^32 and cannot overflow.
        None => (secs | (1u64 << 32)).saturating_sub(NTP_UNIX_OFFSET),
    };
    // frac < 2^32, so frac * 10^9 < 2^62.
    let nanos = frac.saturating_mul(1_000_000_000) >> 32;
    UNIX_EPOCH
        .checked_add(Duration::from_secs(unix))
        .and_then(|t| t.checked_add(Duration::from_nanos(nanos)))
        .unwrap_or(UNIX_EPOCH)
}

/// Asks `server` ("host" or "host:port") for the time. Packets that do not
/// answer this request are ignored until `timeout`.
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
    let request = Request::random().map_err(SntpError::Random)?;
    let io = |e| SntpError::Io(addr, e);
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).map_err(io)?;
    // connect() also makes the kernel drop datagrams from other addresses.
    sock.connect(addr).map_err(io)?;
    let started = Instant::now();
    sock.send(request.bytes()).map_err(io)?;
    let mut buf = [0u8; 512];
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(io(std::io::ErrorKind::TimedOut.into()));
        }
        sock.set_read_timeout(Some(left)).map_err(io)?;
        let n = sock.recv(&mut buf).map_err(io)?;
        match parse_reply(
            buf.get(..n).unwrap_or(&[]),
            &request,
            super::clock::build_time(),
        ) {
            Ok(t) => {
                // Half the round trip is the usual estimate of the one-way delay.
                let half = started.elapsed().checked_div(2).unwrap_or_default();
                return Ok(t.checked_add(half).unwrap_or(t));
            }
            Err(ReplyError::NotOurs) => {
                tracing::debug!(server = %addr, "ignored an SNTP packet that does not answer our request");
            }
            Err(e) => return Err(SntpError::BadReply(addr, e)),
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    const NONCE: [u8; 8] = [0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4];

    fn sent() -> Request {
        Request::new(NONCE)
    }

    /// A good reply to [`sent`]: version 4, mode 4, stratum 2, at `unix_secs` and a half.
    fn reply(unix_secs: u64) -> [u8; 48] {
        let mut p = [0u8; 48];
        p[0] = (4 << 3) | 4;
        p[1] = 2;
        p[24..32].copy_from_slice(&NONCE);
        let ntp = (unix_secs + NTP_UNIX_OFFSET) as u32;
        p[40..44].copy_from_slice(&ntp.to_be_bytes());
        p[44..48].copy_from_slice(&0x8000_0000u32.to_be_bytes());
        p
    }

    fn at(unix_secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix_secs)
    }

    fn parse(p: &[u8]) -> Result<SystemTime, ReplyError> {
        parse_reply(p, &sent(), at(1_700_000_000))
    }

    #[test]
    fn the_request_is_a_v4_client_packet_carrying_the_nonce() {
        let r = sent();
        assert_eq!(r.bytes()[0], 0b00_100_011);
        assert_eq!(&r.bytes()[40..48], &NONCE);
        assert!(r.bytes()[1..40].iter().all(|&b| b == 0));
        // Two random requests differ.
        let (a, b) = (Request::random().unwrap(), Request::random().unwrap());
        assert_ne!(a.bytes()[40..48], b.bytes()[40..48]);
    }

    #[test]
    fn a_good_reply_gives_the_transmit_time() {
        let t = parse(&reply(1_800_000_000)).unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_800_000_000_500)
        );
        // Version 3 servers are fine; so is a longer packet (extensions).
        let mut v3 = reply(1_800_000_000);
        v3[0] = (3 << 3) | 4;
        assert!(parse(&v3).is_ok());
        let mut long = reply(1_800_000_000).to_vec();
        long.extend_from_slice(&[0; 20]);
        assert!(parse(&long).is_ok());
    }

    #[test]
    fn a_reply_must_echo_the_nonce() {
        let mut p = reply(1_800_000_000);
        p[31] ^= 1;
        assert_eq!(parse(&p), Err(ReplyError::NotOurs));
        p[24..32].fill(0);
        assert_eq!(parse(&p), Err(ReplyError::NotOurs));
        // Another request's nonce is not ours either.
        let other = Request::new([9; 8]);
        assert_eq!(
            parse_reply(&reply(1_800_000_000), &other, at(0)),
            Err(ReplyError::NotOurs)
        );
    }

    #[test]
    fn only_server_mode_is_accepted() {
        for mode in [0, 1, 2, 3, 5, 6, 7] {
            let mut p = reply(1_800_000_000);
            p[0] = (4 << 3) | mode;
            assert_eq!(parse(&p), Err(ReplyError::Mode(mode)), "mode {mode}");
        }
    }

    #[test]
    fn only_versions_3_and_4_are_accepted() {
        for v in [0, 1, 2, 5, 6, 7] {
            let mut p = reply(1_800_000_000);
            p[0] = (v << 3) | 4;
            assert_eq!(parse(&p), Err(ReplyError::Version(v)), "version {v}");
        }
    }

    #[test]
    fn an_unsynchronized_server_is_refused() {
        let mut p = reply(1_800_000_000);
        p[0] |= 3 << 6;
        assert_eq!(parse(&p), Err(ReplyError::Unsynchronized));
        // Leap second warnings (1, 2) are fine.
        for li in [1, 2] {
            let mut p = reply(1_800_000_000);
            p[0] |= li << 6;
            assert!(parse(&p).is_ok(), "LI {li}");
        }
    }

    #[test]
    fn stratum_must_be_1_to_15() {
        for (stratum, ok) in [(0, false), (1, true), (15, true), (16, false), (255, false)] {
            let mut p = reply(1_800_000_000);
            p[1] = stratum;
            if ok {
                assert!(parse(&p).is_ok(), "stratum {stratum}");
            } else {
                assert_eq!(parse(&p), Err(ReplyError::Stratum(stratum)));
            }
        }
    }

    #[test]
    fn a_zero_transmit_time_is_refused() {
        let mut p = reply(1_800_000_000);
        p[40..48].fill(0);
        assert_eq!(parse(&p), Err(ReplyError::NoTransmitTime));
    }

    #[test]
    fn a_time_before_the_build_is_refused() {
        let built = at(1_800_000_000);
        assert_eq!(
            parse_reply(&reply(1_799_999_999), &sent(), built),
            Err(ReplyError::BeforeBuild(1_799_999_999))
        );
        assert!(parse_reply(&reply(1_800_000_000), &sent(), built).is_ok());
    }

    #[test]
    fn short_packets_and_our_own_request_are_refused() {
        assert_eq!(parse(&[0; 10]), Err(ReplyError::Short(10)));
        assert_eq!(
            parse(&reply(1_800_000_000)[..47]),
            Err(ReplyError::Short(47))
        );
        // Our own request reflected back: not an answer to it.
        assert_eq!(parse(sent().bytes()), Err(ReplyError::NotOurs));
    }

    #[test]
    fn era_1_timestamps_are_after_2036() {
        // NTP seconds 1 in era 1 is 2036-02-07T06:28:17Z.
        let t = ntp_to_unix(1, 0);
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            (1u64 << 32) + 1 - NTP_UNIX_OFFSET
        );
    }

    /// Answers one request on loopback, with `answer(request)` as the reply(s).
    fn server(answer: impl FnOnce(&[u8; 48]) -> Vec<Vec<u8>> + Send + 'static) -> String {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 48];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(n, 48);
            for r in answer(&buf) {
                server.send_to(&r, from).unwrap();
            }
        });
        addr.to_string()
    }

    fn echo(req: &[u8; 48], mut reply: [u8; 48]) -> Vec<u8> {
        reply[24..32].copy_from_slice(&req[40..48]);
        reply.to_vec()
    }

    #[test]
    fn queries_a_server_on_loopback() {
        let addr = server(|req| {
            assert_eq!(req[0] & 7, 3);
            vec![echo(req, reply(2_000_000_000))]
        });
        let t = query(&addr, Duration::from_secs(5)).unwrap();
        let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!((2_000_000_000..2_000_000_002).contains(&secs), "{secs}");
    }

    #[test]
    fn a_forged_answer_is_ignored_and_the_real_one_used() {
        let addr = server(|req| {
            // First an answer to someone else's request, then the real one.
            vec![
                reply(2_100_000_000).to_vec(),
                echo(req, reply(2_000_000_000)),
            ]
        });
        let t = query(&addr, Duration::from_secs(5)).unwrap();
        let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!((2_000_000_000..2_000_000_002).contains(&secs), "{secs}");
    }

    #[test]
    fn a_bad_answer_to_our_request_is_an_error() {
        let addr = server(|req| {
            let mut r = reply(2_000_000_000);
            r[1] = 0;
            vec![echo(req, r)]
        });
        let err = query(&addr, Duration::from_secs(5)).unwrap_err();
        assert!(
            matches!(err, SntpError::BadReply(_, ReplyError::Stratum(0))),
            "{err}"
        );
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
