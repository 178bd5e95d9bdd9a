//! The SNTP reply parser (`cloudlet_init::system::sntp::parse_reply`): any
//! host on the network can send init a UDP packet while it waits for the time.
//!
//! Each input is parsed as a reply to a request with the fixed nonce
//! `cloudlet_fuzz::SNTP_NONCE`, and again as a reply to a request whose nonce
//! it does echo, so mutations also reach the checks behind the nonce. Never
//! panics, and:
//! * only the 48-byte header counts (extension fields change nothing);
//! * a reply that does not echo the nonce is refused as not ours, first;
//! * an accepted reply is a mode-4, version 3 or 4, synchronized reply of
//!   stratum 1 to 15 with a transmit time, no earlier than `not_before`, and
//!   the time is the transmit seconds read in NTP era 0 or 1 (1970 to 2106).
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cloudlet_fuzz::SNTP_NONCE;
use cloudlet_init::system::clock::build_time;
use cloudlet_init::system::sntp::{parse_reply, ReplyError, Request, PACKET_LEN};
use libfuzzer_sys::fuzz_target;

const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

fuzz_target!(|data: &[u8]| {
    let fixed = Request::new(SNTP_NONCE);
    let echoed = data
        .get(24..32)
        .and_then(|o| <[u8; 8]>::try_from(o).ok())
        .map(Request::new);
    for not_before in [UNIX_EPOCH, build_time()] {
        for sent in [Some(&fixed), echoed.as_ref()].into_iter().flatten() {
            check(data, sent, not_before);
        }
    }
});

fn check(p: &[u8], sent: &Request, not_before: SystemTime) {
    let got = parse_reply(p, sent, not_before);
    let Some(header) = p.get(..PACKET_LEN) else {
        assert_eq!(got, Err(ReplyError::Short(p.len())));
        return;
    };
    assert_eq!(
        parse_reply(header, sent, not_before),
        got,
        "read past the header"
    );
    if header[24..32] != sent.bytes()[40..48] {
        assert_eq!(got, Err(ReplyError::NotOurs));
        return;
    }
    let Ok(t) = got else { return };
    let (leap, version, mode) = (header[0] >> 6, (header[0] >> 3) & 7, header[0] & 7);
    assert_eq!(mode, 4, "accepted mode {mode}");
    assert!((3..=4).contains(&version), "accepted version {version}");
    assert_ne!(leap, 3, "accepted an unsynchronized server");
    assert!(
        (1..=15).contains(&header[1]),
        "accepted stratum {}",
        header[1]
    );
    assert_ne!(header[40..48], [0; 8], "accepted no transmit time");
    assert!(t >= not_before, "{t:?} is before {not_before:?}");
    let since = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_else(|_| panic!("{t:?} is before 1970"));
    assert!(
        since < Duration::from_secs(1 << 32),
        "{since:?} is past 2106"
    );
    let secs = u32::from_be_bytes([header[40], header[41], header[42], header[43]]);
    assert_eq!(
        (since.as_secs() + NTP_UNIX_OFFSET) % (1 << 32),
        u64::from(secs),
        "{since:?} is not the transmit seconds {secs}"
    );
}
