//! Signed update bundles: what the image builders produce for each release
//! and what the updater on the box accepts.
//!
//! A bundle is a plain tar archive whose members come in this order:
//!
//! 1. `manifest.json`: format, board, version, creation time and, for every
//!    part, its name, size and BLAKE3 hash ([`Manifest`]);
//! 2. `manifest.sig`: the Ed25519 signature of exactly those manifest bytes,
//!    in hex;
//! 3. the parts, in the manifest's order: `Image` (the kernel), `initrd`,
//!    `rootfs.squashfs`.
//!
//! Manifest first means a box can check the signature before it reads a byte
//! of the payload and then stream each part straight into the other slot,
//! hashing as it goes ([`verify`] with a sink per part): nothing unverified
//! is ever trusted, and nothing needs the whole bundle in memory or on disk.
//!
//! Keys are 32-byte Ed25519 seeds (secret) and public keys, as hex text. The
//! box trusts the public keys in `/etc/cloudlet/update-keys/*.pub`, which are
//! part of the signed root filesystem itself.

use std::io::{Read, Write};
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

pub const FORMAT: u32 = 1;
/// The parts every bundle carries, in order.
pub const PARTS: [&str; 3] = ["Image", "initrd", "rootfs.squashfs"];
/// Where a box keeps the public keys it trusts.
pub const TRUSTED_KEYS_DIR: &str = "/etc/cloudlet/update-keys";
/// Largest manifest accepted (it lists three parts).
const MANIFEST_MAX: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub name: String,
    pub size: u64,
    /// BLAKE3 of the part, hex.
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub board: String,
    pub version: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub parts: Vec<Part>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a bundle: {0}")]
    Malformed(String),
    #[error("the manifest is not signed by a trusted key")]
    BadSignature,
    #[error("part {name}: {why}")]
    BadPart { name: String, why: String },
    #[error("key {path}: {why}")]
    BadKey { path: String, why: String },
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s.trim(), &mut out).ok()?;
    Some(out)
}

fn key_error(path: &Path, why: &str) -> BundleError {
    BundleError::BadKey {
        path: path.display().to_string(),
        why: why.to_owned(),
    }
}

/// Makes a key pair: the secret seed (written 0600) and the public key.
pub fn keygen(secret: &Path, public: &Path) -> Result<(), BundleError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    let key = SigningKey::from_bytes(&seed);
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret)?;
    f.write_all(format!("{}\n", hex(&seed)).as_bytes())?;
    f.sync_all()?;
    std::fs::write(public, format!("{}\n", hex(key.verifying_key().as_bytes())))?;
    Ok(())
}

pub fn load_secret(path: &Path) -> Result<SigningKey, BundleError> {
    let text = std::fs::read_to_string(path)?;
    let seed = unhex::<32>(&text).ok_or_else(|| key_error(path, "expected 64 hex digits"))?;
    Ok(SigningKey::from_bytes(&seed))
}

pub fn load_public(path: &Path) -> Result<VerifyingKey, BundleError> {
    let text = std::fs::read_to_string(path)?;
    let raw = unhex::<32>(&text).ok_or_else(|| key_error(path, "expected 64 hex digits"))?;
    VerifyingKey::from_bytes(&raw).map_err(|_| key_error(path, "not an Ed25519 public key"))
}

/// Every `*.pub` in `dir`.
pub fn load_trusted(dir: &Path) -> Result<Vec<VerifyingKey>, BundleError> {
    let mut keys = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "pub") {
            keys.push(load_public(&p)?);
        }
    }
    Ok(keys)
}

fn append(
    t: &mut tar::Builder<impl Write>,
    name: &str,
    size: u64,
    data: impl Read,
) -> Result<(), BundleError> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, name, data)?;
    Ok(())
}

/// Writes a bundle of `parts` (file paths, in [`PARTS`] order) signed with `key`.
pub fn create(
    out: impl Write,
    key: &SigningKey,
    board: &str,
    version: &str,
    created: u64,
    parts: &[&Path; 3],
) -> Result<Manifest, BundleError> {
    let mut listed = Vec::new();
    for (name, path) in PARTS.iter().zip(parts) {
        let mut h = blake3::Hasher::new();
        let size = std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
        listed.push(Part {
            name: (*name).to_owned(),
            size,
            blake3: h.finalize().to_hex().to_string(),
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        board: board.to_owned(),
        version: version.to_owned(),
        created,
        parts: listed,
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let sig = hex(&key.sign(&text).to_bytes());
    let mut t = tar::Builder::new(out);
    append(&mut t, "manifest.json", text.len() as u64, &text[..])?;
    append(&mut t, "manifest.sig", sig.len() as u64, sig.as_bytes())?;
    for (part, path) in manifest.parts.iter().zip(parts) {
        append(&mut t, &part.name, part.size, std::fs::File::open(path)?)?;
    }
    t.into_inner()?.flush()?;
    Ok(manifest)
}

/// Reads a bundle from `input`, checks the manifest's signature against
/// `trusted`, then streams each part into `sink(part)` while checking its
/// size and hash. Any failure is an error before anything is reported good;
/// a caller writing parts somewhere must discard them on an error.
pub fn verify<W: Write>(
    input: impl Read,
    trusted: &[VerifyingKey],
    mut sink: impl FnMut(&Part) -> std::io::Result<W>,
) -> Result<Manifest, BundleError> {
    let malformed = |m: &str| BundleError::Malformed(m.to_owned());
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries()?;
    let mut next = |want: &str| -> Result<tar::Entry<'_, _>, BundleError> {
        let e = entries
            .next()
            .ok_or_else(|| malformed(&format!("ends before {want}")))??;
        let name = e.path()?.to_string_lossy().into_owned();
        if name != want {
            return Err(malformed(&format!("expected {want}, found {name:?}")));
        }
        Ok(e)
    };
    let mut text = Vec::new();
    let m = next("manifest.json")?;
    if m.size() > MANIFEST_MAX {
        return Err(malformed("manifest.json is too big"));
    }
    m.take(MANIFEST_MAX).read_to_end(&mut text)?;
    let mut sig = String::new();
    next("manifest.sig")?.take(256).read_to_string(&mut sig)?;
    let sig = unhex::<64>(&sig).ok_or_else(|| malformed("manifest.sig is not 64 bytes of hex"))?;
    let sig = Signature::from_bytes(&sig);
    if !trusted.iter().any(|k| k.verify_strict(&text, &sig).is_ok()) {
        return Err(BundleError::BadSignature);
    }
    // Signed: from here the manifest is trusted, but still checked for sense.
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| malformed(&format!("manifest.json: {e}")))?;
    if manifest.format != FORMAT {
        return Err(malformed(&format!(
            "format {} (this reads {FORMAT})",
            manifest.format
        )));
    }
    let names: Vec<&str> = manifest.parts.iter().map(|p| p.name.as_str()).collect();
    if names != PARTS {
        return Err(malformed(&format!("parts {names:?}, expected {PARTS:?}")));
    }
    for part in &manifest.parts {
        let bad = |why: String| BundleError::BadPart {
            name: part.name.clone(),
            why,
        };
        let e = next(&part.name)?;
        if e.size() != part.size {
            return Err(bad(format!(
                "{} bytes, the manifest says {}",
                e.size(),
                part.size
            )));
        }
        let mut out = sink(part)?;
        let mut h = blake3::Hasher::new();
        let mut r = e.take(part.size);
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            let k = r.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            out.write_all(&buf[..k])?;
            n += k as u64;
        }
        out.flush()?;
        if n != part.size {
            return Err(bad(format!("ends after {n} of {} bytes", part.size)));
        }
        if h.finalize().to_hex().as_str() != part.blake3 {
            return Err(bad("content does not match its hash".into()));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        parts: [std::path::PathBuf; 3],
        key: SigningKey,
        public: VerifyingKey,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let parts = PARTS.map(|n| dir.path().join(n));
        for (i, p) in parts.iter().enumerate() {
            std::fs::write(p, vec![i as u8 + 1; 1000 * (i + 1) + 7]).unwrap();
        }
        keygen(&dir.path().join("k"), &dir.path().join("k.pub")).unwrap();
        let key = load_secret(&dir.path().join("k")).unwrap();
        let public = load_public(&dir.path().join("k.pub")).unwrap();
        Fixture {
            _dir: dir,
            parts,
            key,
            public,
        }
    }

    fn bundle(f: &Fixture) -> Vec<u8> {
        let mut out = Vec::new();
        let p = [&*f.parts[0], &*f.parts[1], &*f.parts[2]];
        create(&mut out, &f.key, "qemu-virt", "1.2.3", 42, &p).unwrap();
        out
    }

    fn check(b: &[u8], keys: &[VerifyingKey]) -> Result<(Manifest, Vec<Vec<u8>>), BundleError> {
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut sinks: Vec<std::rc::Rc<std::cell::RefCell<Vec<u8>>>> = Vec::new();
        struct Sink(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.borrow_mut().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let m = verify(b, keys, |_| {
            let s = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            sinks.push(s.clone());
            Ok(Sink(s))
        })?;
        for s in sinks {
            got.push(s.borrow().clone());
        }
        Ok((m, got))
    }

    #[test]
    fn a_bundle_verifies_and_yields_its_parts() {
        let f = fixture();
        let b = bundle(&f);
        let (m, parts) = check(&b, &[f.public]).unwrap();
        assert_eq!(m.board, "qemu-virt");
        assert_eq!(m.version, "1.2.3");
        for (got, path) in parts.iter().zip(&f.parts) {
            assert!(*got == std::fs::read(path).unwrap());
        }
    }

    #[test]
    fn another_key_a_changed_byte_or_a_cut_is_refused() {
        let f = fixture();
        let b = bundle(&f);
        let other = SigningKey::from_bytes(&[9u8; 32]).verifying_key();
        assert!(matches!(
            check(&b, &[other]),
            Err(BundleError::BadSignature)
        ));
        assert!(matches!(check(&b, &[]), Err(BundleError::BadSignature)));
        // A byte of the manifest (the version "1.2.3" -> "1.2.4").
        let at = b.windows(5).position(|w| w == b"1.2.3").unwrap();
        let mut m = b.clone();
        m[at + 4] = b'4';
        assert!(matches!(
            check(&m, &[f.public]),
            Err(BundleError::BadSignature)
        ));
        // A byte of the last part (the rootfs): the tar layout stays valid,
        // the hash does not.
        let mut p = b.clone();
        let last = b.len() - 1024 - 512 - 10;
        p[last] ^= 0xff;
        let r = check(&p, &[f.public]);
        assert!(
            matches!(r, Err(BundleError::BadPart { ref name, .. }) if name == "rootfs.squashfs"),
            "{r:?}"
        );
        // Cut short.
        assert!(check(&b[..b.len() / 2], &[f.public]).is_err());
        assert!(check(b"not a tar at all", &[f.public]).is_err());
    }

    #[test]
    fn keys_are_read_back_and_bad_ones_are_named() {
        let d = tempfile::tempdir().unwrap();
        keygen(&d.path().join("a.key"), &d.path().join("a.pub")).unwrap();
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        assert_eq!(load_trusted(d.path()).unwrap().len(), 1);
        // keygen never overwrites a secret.
        assert!(keygen(&d.path().join("a.key"), &d.path().join("b.pub")).is_err());
        std::fs::write(d.path().join("z.pub"), "xyz").unwrap();
        let e = load_trusted(d.path()).unwrap_err().to_string();
        assert!(e.contains("z.pub") && e.contains("64 hex"), "{e}");
    }
}
