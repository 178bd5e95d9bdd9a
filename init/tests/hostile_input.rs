//! Parsers of input from outside init (files on disk, the kernel, the
//! network, the control socket) must answer garbage with an error, never a
//! panic: a panicking PID 1 panics the kernel. Each parser gets thousands of
//! random and mutated inputs from a fixed-seed generator, so a failure
//! reproduces.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use cloudlet_init::manifest::Manifest;
use cloudlet_init::system::{disk, ext4, kmod, sntp};
use cloudlet_proto::bootstate::{BootState, Env};
use cloudlet_proto::control::Request;
use cloudlet_testkit::Rng;

/// `seed` with a few bytes flipped, cut or repeated.
fn mutate(r: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(8) {
        if v.is_empty() {
            v.push(r.next_u64() as u8);
            continue;
        }
        let i = r.below(v.len() as u64) as usize;
        match r.below(4) {
            0 => v[i] = r.next_u64() as u8,
            1 => v.truncate(i),
            2 => {
                let b = v[i];
                v.insert(i, b)
            }
            _ => v[i] ^= 1 << r.below(8),
        }
    }
    v
}

const ROUNDS: usize = 3000;

#[test]
fn boot_state_copies() {
    let mut r = Rng(0x5eed_0001);
    let good = BootState::initial().encode();
    for _ in 0..ROUNDS {
        let _ = BootState::decode(&mutate(&mut r, &good));
        let _ = Env::decode(&r.bytes(64));
    }
    // A copy whose CRC is right but whose text is nonsense is still only an error.
    for _ in 0..ROUNDS {
        let mut data = r.bytes(200);
        data.push(0);
        let mut buf = vec![0u8; 4];
        buf.extend_from_slice(&data);
        buf.resize(4096, 0);
        let crc = crc32fast::hash(&buf[4..]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        let _ = BootState::decode(&buf);
    }
}

#[test]
fn service_manifests() {
    let mut r = Rng(0x5eed_0002);
    let good = br#"[[service]]
name = "storage"
exec = ["/usr/bin/cloudletd", "storage"]
after = ["dhcp"]
backoff-initial = "100ms"
env = { A = "1" }
[[service]]
name = "dhcp"
exec = ["/sbin/udhcpc"]
ready = "started"
"#;
    for _ in 0..ROUNDS {
        let m = mutate(&mut r, good);
        let _ = Manifest::parse(&String::from_utf8_lossy(&m));
    }
}

#[test]
fn control_requests() {
    let mut r = Rng(0x5eed_0003);
    let good = br#"{"op":"logs","service":"sync","lines":10}"#;
    for _ in 0..ROUNDS {
        let m = mutate(&mut r, good);
        let _ = serde_json::from_slice::<Request>(&m);
    }
}

#[test]
fn disk_structures_and_network_replies() {
    let mut r = Rng(0x5eed_0004);
    for _ in 0..ROUNDS {
        let b = r.bytes(1100);
        let _ = ext4::parse(&b);
        let _ = disk::mbr_signature(&b);
        let _ = disk::mbr_entry(&b, 1 + r.below(4) as u32);
        let mut m = b.clone();
        m.resize(512, 0);
        let _ = disk::grow_entry(&mut m, 4, r.next_u64());
        let sent = sntp::Request::new([0; 8]);
        let _ = sntp::parse_reply(&r.bytes(60), &sent, std::time::UNIX_EPOCH);
        let mut echoed = r.fill(48);
        echoed.get_mut(24..32).unwrap().fill(0);
        let _ = sntp::parse_reply(&echoed, &sent, std::time::UNIX_EPOCH);
        let dep = String::from_utf8_lossy(&r.bytes(300)).into_owned();
        let _ = kmod::load_order(
            &kmod::parse_modules_dep(&dep),
            &["virtio_blk".into(), dep.clone()],
        );
    }
}
