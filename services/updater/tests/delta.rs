//! Delta installs over HTTP from a test mirror: only the chunks the active
//! slot lacks are fetched, and the other slot ends up holding the new parts.

use cloudlet_updater::{delta, fetch, install};

use std::path::{Path, PathBuf};

use cloudlet_proto::bootstate::{BootState, OnDisk, Slot, COPY_NAMES};
use cloudlet_testkit::mirror::Mirror;
use ed25519_dalek::SigningKey;
use install::{Ask, InstallError, Release, Target};

/// The other slot's partition.
const SLOT: u64 = 12 << 20;

/// Deterministic noise (xorshift), so chunk boundaries are real.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    cloudlet_testkit::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).fill(len)
}

/// A squashfs-like image: the magic, `bytes_used` at 40, then noise.
fn rootfs(seed: u64, len: usize) -> Vec<u8> {
    let mut r = noise(seed, len);
    r[..4].copy_from_slice(b"hsqs");
    r[40..48].copy_from_slice(&(len as u64).to_le_bytes());
    r
}

struct Box_ {
    dir: tempfile::TempDir,
    target: Target,
    active_dev: PathBuf,
}

/// A box running slot A with `parts`; slot B empty.
fn a_box(parts: &[Vec<u8>; 3]) -> Box_ {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    // Slot B holds an older release still worth falling back to.
    let mut s = BootState::initial();
    s.set_tries_left(Slot::B, 3);
    std::fs::write(boot.join(COPY_NAMES[0]), s.encode()).unwrap();
    let mut older = s.clone();
    older.seq = 0;
    std::fs::write(boot.join(COPY_NAMES[1]), older.encode()).unwrap();
    std::fs::write(boot.join("Image-A"), &parts[0]).unwrap();
    std::fs::write(boot.join("initrd-A"), &parts[1]).unwrap();
    // The active partition: the image, then what lies past it (not chunked).
    let active_dev = dir.path().join("slotA.img");
    let mut a = parts[2].clone();
    a.extend(noise(77, 1 << 20));
    std::fs::write(&active_dev, a).unwrap();
    let other_dev = dir.path().join("slotB.img");
    std::fs::File::create(&other_dev)
        .unwrap()
        .set_len(SLOT)
        .unwrap();
    Box_ {
        target: Target {
            boot_dir: boot,
            other_dev,
            running: Slot::A,
            active_dev: None,
        },
        active_dev,
        dir,
    }
}

fn release() -> Release {
    Release {
        version: "1.0.0".into(),
        board: "qemu-virt".into(),
        floor: None,
    }
}

fn bundle(dir: &Path, key: &SigningKey, parts: &[Vec<u8>; 3]) -> Vec<u8> {
    let paths = cloudlet_bundle::PARTS.map(|n| dir.join(format!("v2-{n}")));
    for (p, d) in paths.iter().zip(parts) {
        std::fs::write(p, d).unwrap();
    }
    let mut out = Vec::new();
    cloudlet_bundle::create(
        &mut out,
        key,
        "qemu-virt",
        "2.0.0",
        1,
        &[&paths[0], &paths[1], &paths[2]],
    )
    .unwrap();
    out
}

/// Runs a delta install on a blocking thread of a current-thread runtime,
/// as the service does.
/// `active` is the running slot's root partition, when the box has one.
fn run(
    b: &Box_,
    key: &SigningKey,
    url: &str,
    ask: Ask,
    active: Option<PathBuf>,
) -> Result<delta::Delta, delta::DeltaOutcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut t = b.target.clone();
    t.active_dev = active;
    let trusted = vec![key.verifying_key()];
    let url = fetch::Url::parse(url).unwrap();
    let h = rt.handle().clone();
    rt.block_on(async move {
        tokio::task::spawn_blocking(move || {
            let progress = |_: &str, _: u64, _: u64| {};
            delta::install_delta(&t, &release(), &trusted, &url, &ask, &progress, h)
        })
        .await
        .unwrap()
    })
}

fn v1() -> [Vec<u8>; 3] {
    [noise(1, 600_000), noise(2, 400_000), rootfs(3, 8 << 20)]
}

#[test]
fn a_delta_install_fetches_under_a_quarter_and_writes_the_new_parts() {
    let old = v1();
    let mut new = old.clone();
    // One service changed: 200 KB rewritten in the middle of the rootfs.
    let (from, to) = (4_000_000usize, 4_200_000usize);
    new[2][from..to].copy_from_slice(&noise(9, to - from));
    let b = a_box(&old);
    let key = SigningKey::from_bytes(&[4u8; 32]);
    let cub = bundle(b.dir.path(), &key, &new);
    let mirror = Mirror::start().unwrap();
    mirror.put("/v2.cub", cub.clone());
    let ask = Ask {
        whole: Some((cub.len() as u64, blake3::hash(&cub).to_hex().to_string())),
        ..Ask::default()
    };
    let d = run(
        &b,
        &key,
        &mirror.url("/v2.cub"),
        ask,
        Some(b.active_dev.clone()),
    )
    .map_err(|e| e.to_string())
    .unwrap();
    println!(
        "bundle {} bytes; fetched {} ({:.1}%), reused {}; the mirror sent {}",
        cub.len(),
        d.fetched_bytes,
        d.fetched_bytes as f64 * 100.0 / cub.len() as f64,
        d.reused_bytes,
        mirror.sent()
    );
    assert_eq!(d.manifest.version, "2.0.0");
    assert_eq!(d.total_bytes, cub.len() as u64);
    assert!(
        d.fetched_bytes * 4 < cub.len() as u64,
        "fetched {} of {}",
        d.fetched_bytes,
        cub.len()
    );
    assert!(d.reused_bytes > (new[2].len() as u64) / 2);
    let boot = &b.target.boot_dir;
    assert!(std::fs::read(boot.join("Image-B")).unwrap() == new[0]);
    assert!(std::fs::read(boot.join("initrd-B")).unwrap() == new[1]);
    let slot = std::fs::read(&b.target.other_dev).unwrap();
    assert!(
        slot[..new[2].len()] == new[2][..],
        "slot B is not v2's rootfs"
    );
    // Every request asked a closed range, and the mirror sent no more than
    // the client counted.
    let asked = mirror.asked();
    assert!(
        asked
            .iter()
            .all(|a| a.starts_with("/v2.cub ") && !a.ends_with('-')),
        "{asked:?}"
    );
    assert_eq!(mirror.sent(), d.fetched_bytes);
    // The other slot is no fallback until the caller switches to it.
    let (_, s) = OnDisk::new(boot).read().unwrap().unwrap();
    assert_eq!(s.tries_left(Slot::B), 0);
}

#[test]
fn without_the_active_partition_the_rootfs_is_fetched_and_a_wrong_whole_hash_is_refused() {
    let old = v1();
    let b = a_box(&old);
    let key = SigningKey::from_bytes(&[4u8; 32]);
    let cub = bundle(b.dir.path(), &key, &old);
    let mirror = Mirror::start().unwrap();
    mirror.put("/v2.cub", cub.clone());
    let ask = Ask {
        whole: Some((
            cub.len() as u64,
            blake3::hash(b"another").to_hex().to_string(),
        )),
        ..Ask::default()
    };
    let r = run(&b, &key, &mirror.url("/v2.cub"), ask, None);
    assert!(
        matches!(r, Err(delta::DeltaOutcome::Install(InstallError::Refused(ref m))) if m.contains("channel index")),
        "{r:?}"
    );
    // The parts were all fetched and written before the whole-file check.
    assert!(mirror.sent() >= old[2].len() as u64);
}

#[test]
fn a_missing_bundle_is_unsupported_and_nothing_is_written() {
    let old = v1();
    let b = a_box(&old);
    let key = SigningKey::from_bytes(&[4u8; 32]);
    let mirror = Mirror::start().unwrap();
    let r = run(&b, &key, &mirror.url("/none.cub"), Ask::default(), None);
    assert!(
        matches!(r, Err(delta::DeltaOutcome::Unsupported(_))),
        "{r:?}"
    );
    assert!(!b.target.boot_dir.join("Image-B").exists());
    let (_, s) = OnDisk::new(&b.target.boot_dir).read().unwrap().unwrap();
    assert_eq!(s.tries_left(Slot::B), 3, "slot B stopped being a fallback");
}
