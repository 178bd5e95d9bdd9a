//! The seed corpora under `seeds/<target>/`: every seed is a valid input its
//! parser accepts, so the fuzzer's mutations start past the magic numbers,
//! CRCs and signatures.
//!
//! `write_seeds` (ignored) makes the seeds that must be computed; run it after
//! changing a format, then commit what it writes:
//!
//!     cargo test --manifest-path fuzz/Cargo.toml --test seeds -- --ignored write_seeds
//!
//! It needs mke2fs (e2fsprogs), sfdisk (fdisk) and mkenvimage (u-boot-tools).

use std::path::{Path, PathBuf};
use std::process::Command;

use cloudlet_fuzz::{bundle_fixture, ChainInput, MbrInput, MBR_LEN, SNTP_NONCE};
use cloudlet_init::manifest::Manifest;
use cloudlet_init::system::{clock, disk, ext4, sntp};
use cloudlet_proto::bootstate::{BootState, Env, Slot, ENV_SIZE};
use cloudlet_runtime::tls::{self, IdentityKeys};
use cloudlet_sync::mango::{self, Index, Selector};
use rustls_pki_types::CertificateDer;
use serde_json::Value;

fn seeds(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target)
}

/// Every seed of `target`, by name; fails on a target without seeds.
fn read_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seeds(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} has no seeds", dir.display());
    out
}

#[test]
fn manifest_seeds_parse() {
    for (name, bytes) in read_seeds("manifest") {
        let text = String::from_utf8(bytes).unwrap();
        if let Err(e) = Manifest::parse(&text) {
            panic!("manifest/{name}: {e}");
        }
    }
}

#[test]
fn bootstate_seeds_decode() {
    for (name, bytes) in read_seeds("bootstate") {
        if let Err(e) = BootState::decode(&bytes) {
            panic!("bootstate/{name}: {e}");
        }
    }
}

#[test]
fn ext4_seeds_are_clean_superblocks() {
    for (name, bytes) in read_seeds("ext4") {
        assert_eq!(bytes.len(), 1024, "ext4/{name}");
        let sb = ext4::parse(&bytes).unwrap_or_else(|| panic!("ext4/{name}: not ext4"));
        assert!(sb.clean, "ext4/{name}: {sb:?}");
    }
}

#[test]
fn mbr_seeds_are_cloudlet_disks() {
    for (name, bytes) in read_seeds("mbr") {
        let input = MbrInput::split(&bytes);
        assert_eq!(input.mbr.len(), MBR_LEN, "mbr/{name}");
        assert_eq!(
            disk::mbr_signature(input.mbr),
            Some(disk::DISK_SIGNATURE),
            "mbr/{name}"
        );
        let e = disk::mbr_entry(input.mbr, input.n);
        assert!(e.is_some_and(|e| e.kind != 0), "mbr/{name}: {e:?}");
    }
}

#[test]
fn path_seeds_normalize() {
    for (name, bytes) in read_seeds("path") {
        let raw = String::from_utf8(bytes).unwrap();
        if let Err(e) = cloudlet_storage::path::normalize(&raw) {
            panic!("path/{name}: {e}");
        }
    }
}

#[test]
fn bundle_seed_is_the_fixture_and_verifies() {
    let f = bundle_fixture();
    let seeds = read_seeds("bundle");
    assert_eq!(
        seeds.len(),
        1,
        "the bundle target knows one signed manifest"
    );
    let (name, bytes) = &seeds[0];
    // The target accepts only what the fixture's key signed: a seed made any
    // other way would make every accepted run look like a forgery.
    assert!(
        *bytes == f.bytes,
        "bundle/{name} is not the fixture's bundle: run write_seeds"
    );
    let m = cloudlet_bundle::verify(&bytes[..], &[f.public], |_| Ok(std::io::sink())).unwrap();
    assert_eq!(m, f.manifest);
}

#[test]
fn bundle_head_seed_is_the_fixture_and_its_head_reads() {
    let f = bundle_fixture();
    let seeds = read_seeds("bundle_head");
    assert_eq!(seeds.len(), 1, "the head target knows one signed bundle");
    let (name, bytes) = &seeds[0];
    assert!(
        *bytes == f.bytes,
        "bundle_head/{name} is not the fixture's bundle: run write_seeds"
    );
    let mut src = bytes.clone();
    let remote = cloudlet_bundle::delta::read_head(&mut src, &[f.public]).unwrap();
    assert_eq!(remote.manifest, f.manifest);
}

#[test]
fn sntp_seeds_are_accepted_replies() {
    let sent = sntp::Request::new(SNTP_NONCE);
    for (name, bytes) in read_seeds("sntp") {
        if let Err(e) = sntp::parse_reply(&bytes, &sent, clock::build_time()) {
            panic!("sntp/{name}: {e}");
        }
    }
}

#[test]
fn mango_seeds_parse() {
    for (name, bytes) in read_seeds("mango") {
        let v: Value =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("mango/{name}: {e}"));
        // A `_find` or `_changes` body, or a bare selector.
        let selector = v.get("selector").unwrap_or(&v);
        if let Err(e) = Selector::parse(selector) {
            panic!("mango/{name}: {e}");
        }
        if let Some(Err(e)) = v.get("sort").map(mango::parse_sort) {
            panic!("mango/{name}: sort: {e}");
        }
        if let Some(fields) = v.pointer("/index/fields") {
            if let Err(e) = mango::parse_fields(fields, "index.fields") {
                panic!("mango/{name}: {e}");
            }
        }
        if v.get("language").and_then(Value::as_str) == Some("query") {
            let indexes = Index::of_ddoc("_design/seed", v.as_object().unwrap());
            assert!(
                !indexes.is_empty(),
                "mango/{name}: a design document without json indexes"
            );
        }
    }
}

#[test]
fn client_chain_seeds_name_their_keys() {
    for (name, bytes) in read_seeds("client_chain") {
        let c = ChainInput::split(&bytes);
        let (leaf, issuer) = (CertificateDer::from(c.leaf), CertificateDer::from(c.issuer));
        assert!(
            tls::spki_of(&leaf).is_some(),
            "client_chain/{name}: the leaf does not parse"
        );
        if !c.issuer.is_empty() {
            let issuer_key = tls::spki_of(&issuer);
            assert!(
                issuer_key.is_some(),
                "client_chain/{name}: the issuer does not parse"
            );
            assert_eq!(
                tls::certified_by(&leaf, &issuer),
                issuer_key,
                "client_chain/{name}: the issuer did not certify the leaf"
            );
        }
    }
}

/// An SNTP server's reply to the fuzz target's request: `flags` (leap
/// indicator, version, mode), `stratum`, reference id, and the time sent as
/// seconds since 1970 (written in whichever NTP era holds it).
fn sntp_reply(flags: u8, stratum: u8, ref_id: [u8; 4], unix: u64) -> Vec<u8> {
    let ntp = |secs: u64, frac: u32| {
        let mut t = [0u8; 8];
        t[..4].copy_from_slice(&((secs + 2_208_988_800) as u32).to_be_bytes());
        t[4..].copy_from_slice(&frac.to_be_bytes());
        t
    };
    let mut p = vec![flags, stratum, 6, 0xe9]; // poll 2^6 s, precision 2^-23 s
    p.extend_from_slice(&0x0000_0123u32.to_be_bytes()); // root delay
    p.extend_from_slice(&0x0000_0456u32.to_be_bytes()); // root dispersion
    p.extend_from_slice(&ref_id);
    p.extend_from_slice(&ntp(unix - 64, 0x1000_0000)); // reference time
    p.extend_from_slice(&SNTP_NONCE); // originate: our request's transmit time
    p.extend_from_slice(&ntp(unix, 0x8000_0000)); // receive
    p.extend_from_slice(&ntp(unix, 0x8000_4000)); // transmit
    assert_eq!(p.len(), sntp::PACKET_LEN);
    p
}

/// Runs a tool, failing with its output.
fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = seeds(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
#[ignore = "writes the computed seeds into seeds/; run by hand (see the top of this file)"]
fn write_seeds() {
    let tmp = tempfile::tempdir().unwrap();

    // The manifest the image ships.
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/overlay/etc/cloudlet/services.toml");
    write(
        "manifest",
        "image-services.toml",
        &std::fs::read(shipped).unwrap(),
    );

    // Boot state: as this crate writes it (plain and redundant header), and
    // as U-Boot's own tool does.
    let mut s = BootState::initial();
    write("bootstate", "initial.env", &s.encode());
    s.seq = 0x2a;
    s.order = vec![Slot::B, Slot::A];
    s.b_left = 2;
    s.extra.insert("UPDATE_VERSION".into(), "0.2.0".into());
    let mut env = s.to_env();
    env.header_len = 5;
    write("bootstate", "redundant.env", &env.encode(ENV_SIZE));
    // A small copy: the same variables, less padding for the fuzzer to wade through.
    let small = Env::decode(&s.encode()).unwrap().encode(96);
    write("bootstate", "small.env", &small);
    let text = tmp.path().join("env.txt");
    std::fs::write(
        &text,
        "BOOT_A_LEFT=2\nBOOT_B_LEFT=0\nBOOT_ORDER=A B\nBOOT_SEQ=a\n",
    )
    .unwrap();
    for (name, flags) in [
        ("mkenvimage.env", &[][..]),
        ("mkenvimage-r.env", &["-r"][..]),
    ] {
        let out = tmp.path().join(name);
        run(Command::new("mkenvimage")
            .args(flags)
            .args(["-s", "4096", "-o"])
            .arg(&out)
            .arg(&text));
        write("bootstate", name, &std::fs::read(&out).unwrap());
    }

    // ext4 superblocks from mke2fs, made repeatable (fixed UUID, hash seed, time).
    for (name, args) in [
        ("ext4-4k.sb", &["-t", "ext4", "-b", "4096"][..]),
        (
            "ext4-64bit.sb",
            &["-t", "ext4", "-O", "64bit", "-b", "1024"][..],
        ),
        ("ext2-1k.sb", &["-t", "ext2", "-b", "1024"][..]),
    ] {
        let img = tmp.path().join(name);
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        run(Command::new("mke2fs")
            .env("E2FSPROGS_FAKE_TIME", "1767225600")
            .args(["-q", "-F", "-L", "cloudlet-data"])
            .args(["-U", "c10d1e70-0000-4000-8000-000000000001"])
            .args(["-E", "hash_seed=c10d1e70-0000-4000-8000-000000000002"])
            .args(args)
            .arg(&img));
        write("ext4", name, &read_at(&img, 1024, 1024));
    }

    // The image's MBR (image/genimage.cfg.in: signature "CLOU", boot 128 MiB
    // at 1 MiB, two 64 MiB root slots, 64 MiB data), from sfdisk.
    let img = tmp.path().join("disk.img");
    let image_sectors: u64 = 657_408;
    std::fs::File::create(&img)
        .unwrap()
        .set_len(image_sectors * 512)
        .unwrap();
    let layout = "label: dos\nlabel-id: 0x434c4f55\n\
        start=2048, size=262144, type=c, bootable\n\
        start=264192, size=131072, type=83\n\
        start=395264, size=131072, type=83\n\
        start=526336, size=131072, type=83\n";
    let mut sfdisk = Command::new("sfdisk")
        .args(["--no-reread", "--no-tell-kernel", "-q"])
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (package fdisk)");
    std::io::Write::write_all(&mut sfdisk.stdin.take().unwrap(), layout.as_bytes()).unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    let mbr = read_at(&img, 0, MBR_LEN);
    // Flashed onto a 4 GiB card (grows), and onto a disk of exactly the image's size (does not).
    write("mbr", "card-4g.mbr", &MbrInput::join(&mbr, 4, 8 << 20));
    write(
        "mbr",
        "image-size.mbr",
        &MbrInput::join(&mbr, 4, image_sectors),
    );

    // SNTP replies: version 4 from a stratum-2 server (its reference id is
    // its upstream's address), version 3 from a stratum-1 GPS clock, one in
    // NTP era 1 (after 2036), and one followed by a MAC (key id, digest).
    // Times after 2030, so later than any build time for years.
    let v4 = sntp_reply((4 << 3) | 4, 2, [192, 0, 2, 1], 1_906_000_000);
    write("sntp", "v4-stratum2", &v4);
    write(
        "sntp",
        "v3-gps",
        &sntp_reply((3 << 3) | 4, 1, *b"GPS\0", 1_910_000_000),
    );
    write(
        "sntp",
        "era1",
        &sntp_reply((4 << 3) | 4, 3, [198, 51, 100, 7], 2_300_000_000),
    );
    let mut mac = v4;
    mac.extend_from_slice(&7u32.to_be_bytes());
    mac.extend_from_slice(&[0xa5; 20]);
    write("sntp", "v4-mac", &mac);

    // The signed fixture bundle, for the whole-bundle and the head targets.
    write("bundle", "signed.tar", &bundle_fixture().bytes);
    write("bundle_head", "signed.tar", &bundle_fixture().bytes);

    // Client chains (fresh keys each time; the target reads its fixture
    // from the seed): a service's certificate and its box identity, as the
    // sharing service issues them (services/sharing/src/identity.rs); an
    // identity showing itself, as a box calling another does; a device's
    // self-signed certificate, as `cloudlet` makes it (client/src/remote.rs).
    let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
    let id = IdentityKeys::generate().unwrap();
    let key = rcgen::KeyPair::generate_for(p256).unwrap();
    let mut p =
        rcgen::CertificateParams::new(vec![tls::box_dns_name(&id.box_id), "localhost".into()])
            .unwrap();
    for ip in [
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ] {
        p.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    }
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, format!("Cloudlet {}", id.box_id));
    p.distinguished_name = dn;
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(9999, 12, 31);
    p.use_authority_key_identifier_extension = true;
    let service = p
        .signed_by(&key, &rcgen::Issuer::from_params(&id.params, &id.key))
        .unwrap();
    write(
        "client_chain",
        "service-chain.der",
        &[service.der().as_ref(), &id.cert_der].concat(),
    );
    write(
        "client_chain",
        "identity.der",
        &[id.cert_der.as_slice(), &id.cert_der].concat(),
    );
    let device = rcgen::CertificateParams::new(vec!["laptop".into()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate_for(p256).unwrap())
        .unwrap();
    write("client_chain", "device.der", device.der());
}
