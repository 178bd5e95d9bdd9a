//! What the fuzz targets and the seed test share: how a target's input is
//! laid out when one parser call needs more than the bytes, and the signed
//! bundle the bundle target starts from.

use std::sync::OnceLock;

/// The MBR target's input: the 512-byte sector as read from the disk, then
/// the arguments of `grow_entry` (little-endian: `n` as u32, the disk size in
/// sectors as u64). A seed is a real MBR with those 12 bytes appended, so the
/// MBR sits at offset 0 where the mutations expect it.
pub struct MbrInput<'a> {
    pub mbr: &'a [u8],
    pub n: u32,
    pub disk_sectors: u64,
}

pub const MBR_LEN: usize = 512;

impl<'a> MbrInput<'a> {
    pub fn split(data: &'a [u8]) -> MbrInput<'a> {
        let (mbr, rest) = data.split_at(data.len().min(MBR_LEN));
        let mut args = [0u8; 12];
        let k = rest.len().min(12);
        args[..k].copy_from_slice(&rest[..k]);
        let [a, b, c, d, tail @ ..] = args;
        MbrInput {
            mbr,
            n: u32::from_le_bytes([a, b, c, d]),
            disk_sectors: u64::from_le_bytes(tail),
        }
    }

    /// A seed file: `mbr` followed by the arguments.
    pub fn join(mbr: &[u8], n: u32, disk_sectors: u64) -> Vec<u8> {
        let mut out = mbr.to_vec();
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&disk_sectors.to_le_bytes());
        out
    }
}

/// The bundle target's fixture: a real bundle made by `cloudlet_bundle::create`
/// with a fixed test key, and a second key that signed nothing. Deterministic
/// (fixed key, parts, time; tar headers carry no owner or time), so the
/// committed seed `seeds/bundle/signed.tar` is exactly `bytes`, which
/// tests/seeds.rs checks.
pub struct BundleFixture {
    /// The key that signed `bytes`.
    pub public: ed25519_dalek::VerifyingKey,
    /// A key that signed nothing.
    pub stranger: ed25519_dalek::VerifyingKey,
    pub bytes: Vec<u8>,
    /// The only manifest the test key ever signed.
    pub manifest: cloudlet_bundle::Manifest,
    /// The parts' contents, in `cloudlet_bundle::PARTS` order.
    pub parts: [Vec<u8>; 3],
}

/// Test keys, never used for anything but fuzzing.
const TEST_SEED: [u8; 32] = [0x5e; 32];
const STRANGER_SEED: [u8; 32] = [0xa7; 32];

/// Small parts keep the seed (and so libFuzzer's default `-max_len`) small.
fn part_contents() -> [Vec<u8>; 3] {
    [
        b"kernel Image, fuzz fixture\n".to_vec(),
        b"initrd\n".to_vec(),
        (0u8..=255).cycle().take(600).collect(),
    ]
}

/// The fixture, made once per process. Panics if the bundle cannot be made:
/// a target without its fixture has nothing to check.
pub fn bundle_fixture() -> &'static BundleFixture {
    static FIXTURE: OnceLock<BundleFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = ed25519_dalek::SigningKey::from_bytes(&TEST_SEED);
        let parts = part_contents();
        let dir = tempfile::tempdir().expect("a temporary directory for the bundle's parts");
        let paths = cloudlet_bundle::PARTS.map(|n| dir.path().join(n));
        for (path, content) in paths.iter().zip(&parts) {
            std::fs::write(path, content).expect("writing a part");
        }
        let mut bytes = Vec::new();
        let manifest = cloudlet_bundle::create(
            &mut bytes,
            &key,
            "qemu-virt",
            "0.0.1-fuzz",
            1_767_225_600,
            &[&paths[0], &paths[1], &paths[2]],
        )
        .expect("making the fixture bundle");
        BundleFixture {
            public: key.verifying_key(),
            stranger: ed25519_dalek::SigningKey::from_bytes(&STRANGER_SEED).verifying_key(),
            bytes,
            manifest,
            parts,
        }
    })
}

/// The SNTP target's request nonce (its transmit timestamp); the seeds'
/// replies echo it as their originate timestamp.
pub const SNTP_NONCE: [u8; 8] = *b"cl0udl3t";

/// The client_chain target's input: certificates one after the other, as a
/// TLS peer sends its chain. The leaf is the first DER element, as long as
/// its header says (cut at the end of the input), or the whole input when
/// that header does not read; the issuer is whatever follows. A seed is
/// just the DER certificates concatenated.
pub struct ChainInput<'a> {
    pub leaf: &'a [u8],
    pub issuer: &'a [u8],
}

impl<'a> ChainInput<'a> {
    pub fn split(data: &'a [u8]) -> ChainInput<'a> {
        let n = der_element_len(data).unwrap_or(data.len()).min(data.len());
        let (leaf, issuer) = data.split_at(n);
        ChainInput { leaf, issuer }
    }
}

/// The length of the DER element at the start of `d` (header included),
/// from its one-byte tag and its length (short form, or long form of up to
/// four bytes).
fn der_element_len(d: &[u8]) -> Option<usize> {
    let (&first, rest) = d.get(1..)?.split_first()?;
    let (header, body) = match first {
        0..=0x7f => (2, usize::from(first)),
        0x81..=0x84 => {
            let k = usize::from(first & 0x7f);
            let len = rest.get(..k)?;
            (2 + k, len.iter().fold(0, |a, b| (a << 8) | usize::from(*b)))
        }
        _ => return None,
    };
    header.checked_add(body)
}

/// The client_chain target's fixture: the seed `service-chain.der`, a
/// service's certificate and its box identity (a CA) as the box issues
/// them. That identity signed only these two certificates, which the target
/// relies on; tests/seeds.rs checks the chain.
pub const SERVICE_CHAIN: &[u8] = include_bytes!("../seeds/client_chain/service-chain.der");
