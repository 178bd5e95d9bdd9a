//! The boot-state files (`bootstate0.env`, `bootstate1.env` on the FAT boot
//! partition): U-Boot binary environments with a CRC-32.
//!
//! Each input is decoded as it is, and again with its CRC made right (for
//! the plain and the redundant header), so mutations also reach the
//! variables behind the CRC. Never panics, and:
//! * `Env`: what decodes, encodes and decodes back to the same variables;
//! * `BootState`: the same, at the real file size `ENV_SIZE`, for copies
//!   of up to that size (see below);
//! * the write protocol: a write from a copy goes to the other copy and is
//!   then the newest, with `BOOT_SEQ` one more and nothing else changed,
//!   whichever of the two copies it started from.
#![no_main]

use cloudlet_proto::bootstate::{newest, next_write, BootState, Env, ENV_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    for header_len in [4, 5] {
        if data.len() > header_len {
            let mut fixed = data.to_vec();
            let crc = crc32fast::hash(&fixed[header_len..]);
            fixed[..4].copy_from_slice(&crc.to_le_bytes());
            check(&fixed);
        }
    }
});

fn check(bytes: &[u8]) {
    let Ok(env) = Env::decode(bytes) else { return };
    let needed = env.header_len
        + env
            .vars
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
        + 1;
    let again = env.encode(needed.max(bytes.len()));
    assert_eq!(Env::decode(&again).as_ref(), Ok(&env), "Env round trip");

    let Ok(state) = BootState::from_env(env) else {
        return;
    };
    // A copy longer than U-Boot writes is refused whole (it could not be
    // written back: found by this target, see proto's regression test).
    if bytes.len() > ENV_SIZE {
        assert!(BootState::decode(bytes).is_err(), "an oversize copy decoded");
        return;
    }
    let written = state.encode();
    assert_eq!(
        BootState::decode(&written).as_ref(),
        Ok(&state),
        "BootState round trip"
    );

    for (i, copies) in [[Some(bytes), None], [None, Some(bytes)]]
        .into_iter()
        .enumerate()
    {
        let Some((at, current)) = newest(copies) else {
            panic!("the only valid copy was not chosen");
        };
        assert_eq!((at, &current), (i, &state), "newest of one valid copy");
        let (to, new) = next_write(at, &current);
        assert_eq!(to, 1 - at, "a write goes to the other copy");
        let mut both = copies;
        both[to] = Some(&new);
        let Some((now, after)) = newest(both) else {
            panic!("no valid copy after a write");
        };
        let mut expected = state.clone();
        expected.seq = state.seq.wrapping_add(1);
        assert_eq!((now, &after), (to, &expected), "the write is the newest");
    }
}
