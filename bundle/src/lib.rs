//! Signed update bundles: what the image builders produce for each release
//! and what the updater on the box accepts.
//!
//! A bundle is a plain tar archive whose members come in this order:
//!
//! 1. `manifest.json`: format, board, version, creation time and, for every
//!    part, its name, size and BLAKE3 hash ([`Manifest`]);
//! 2. `manifest.sig`: the Ed25519 signature of exactly those manifest bytes,
//!    in hex;
//! 3. `chunks.json` (bundles made since delta updates; older ones lack it):
//!    every part cut into content-defined chunks, each as its length and
//!    BLAKE3 ([`ChunkIndex`]); the signed manifest names its size and hash
//!    ([`ChunksRef`]), so it is as trusted as the manifest. A box that already
//!    holds most chunks (in its active slot) fetches only the others with
//!    HTTP ranges ([`delta`]);
//! 4. the parts, in the manifest's order: `Image` (the kernel), `initrd`,
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

pub mod delta;

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
/// Largest signature member read (128 hex digits and a newline fit).
const SIG_MAX: u64 = 256;
/// The chunk index's member name.
pub const CHUNKS_NAME: &str = "chunks.json";
/// Largest chunk index accepted: about 75 bytes a chunk, so 16 MiB lists
/// some 200,000 chunks of 64 KiB on average (12 GiB of parts).
const CHUNKS_MAX: u64 = 16 << 20;
/// FastCDC (2020) chunk sizes: a box must cut its local files with exactly
/// these to find the same chunks.
pub const CHUNK_MIN: u32 = 16 << 10;
pub const CHUNK_AVG: u32 = 64 << 10;
pub const CHUNK_MAX: u32 = 256 << 10;

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
    /// Public keys (hex) this release introduces: once a box commits it, a
    /// bundle signed by one of them is trusted too. This is how the signing
    /// key is rotated: a release signed by the old key names the new one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// The chunk index member (`chunks.json`), absent in older bundles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<ChunksRef>,
}

/// What the signed manifest says of `chunks.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunksRef {
    pub size: u64,
    /// BLAKE3 of the member's bytes, hex.
    pub blake3: String,
}

/// `chunks.json`: for each part, in the manifest's order, its chunks in
/// order as `[length, "blake3 hex"]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkIndex {
    pub parts: Vec<PartChunks>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartChunks {
    pub name: String,
    pub chunks: Vec<(u64, String)>,
}

/// One chunk of a part, as checked against the signed manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Where it starts in its part.
    pub offset: u64,
    pub len: u64,
    pub hash: [u8; 32],
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
    /// Signed and whole, but not for this box (board, version, sizes).
    #[error("{0}")]
    Refused(String),
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

/// Parses a public key given as hex text (as in a manifest's `keys`).
pub fn parse_public(text: &str) -> Option<VerifyingKey> {
    VerifyingKey::from_bytes(&unhex::<32>(text)?).ok()
}

/// A public key as hex text.
pub fn public_hex(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
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
    create_introducing(out, key, board, version, created, parts, &[])
}

/// [`create`], naming public keys the release introduces ([`Manifest::keys`]).
pub fn create_introducing(
    out: impl Write,
    key: &SigningKey,
    board: &str,
    version: &str,
    created: u64,
    parts: &[&Path; 3],
    introduces: &[VerifyingKey],
) -> Result<Manifest, BundleError> {
    create_with(out, key, board, version, created, parts, introduces, true)
}

/// [`create_introducing`]; without `chunk_index`, the bundle has no
/// `chunks.json` (boxes then always fetch it whole, as they do a bundle
/// made before delta updates).
#[allow(clippy::too_many_arguments)]
pub fn create_with(
    out: impl Write,
    key: &SigningKey,
    board: &str,
    version: &str,
    created: u64,
    parts: &[&Path; 3],
    introduces: &[VerifyingKey],
    chunk_index: bool,
) -> Result<Manifest, BundleError> {
    let mut listed = Vec::new();
    let mut index = ChunkIndex { parts: Vec::new() };
    for (name, path) in PARTS.iter().zip(parts) {
        let mut h = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let size = chunk(std::fs::File::open(path)?, |_, data| {
            h.update(data);
            chunks.push((data.len() as u64, blake3::hash(data).to_hex().to_string()));
            Ok(())
        })?;
        listed.push(Part {
            name: (*name).to_owned(),
            size,
            blake3: h.finalize().to_hex().to_string(),
        });
        index.parts.push(PartChunks {
            name: (*name).to_owned(),
            chunks,
        });
    }
    let index = serde_json::to_vec(&index).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let manifest = Manifest {
        format: FORMAT,
        board: board.to_owned(),
        version: version.to_owned(),
        created,
        parts: listed,
        keys: introduces.iter().map(public_hex).collect(),
        chunks: chunk_index.then(|| ChunksRef {
            size: index.len() as u64,
            blake3: blake3::hash(&index).to_hex().to_string(),
        }),
    };
    let text =
        serde_json::to_vec_pretty(&manifest).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let sig = hex(&key.sign(&text).to_bytes());
    let mut t = tar::Builder::new(out);
    append(&mut t, "manifest.json", text.len() as u64, &text[..])?;
    append(&mut t, "manifest.sig", sig.len() as u64, sig.as_bytes())?;
    if chunk_index {
        append(&mut t, CHUNKS_NAME, index.len() as u64, &index[..])?;
    }
    for (part, path) in manifest.parts.iter().zip(parts) {
        append(&mut t, &part.name, part.size, std::fs::File::open(path)?)?;
    }
    t.into_inner()?.flush()?;
    Ok(manifest)
}

/// Cuts what `r` yields into content-defined chunks (FastCDC 2020 with
/// [`CHUNK_MIN`], [`CHUNK_AVG`], [`CHUNK_MAX`]), calling `each(offset,
/// bytes)` for each in order; returns how many bytes there were.
pub fn chunk(
    r: impl Read,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), BundleError>,
) -> Result<u64, BundleError> {
    let cdc = fastcdc::v2020::StreamCDC::new(
        r,
        CHUNK_MIN as usize,
        CHUNK_AVG as usize,
        CHUNK_MAX as usize,
    );
    let mut n = 0u64;
    for c in cdc {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => BundleError::Io(e),
            other => BundleError::Malformed(format!("chunking: {other}")),
        })?;
        each(c.offset, &c.data)?;
        n = n.saturating_add(c.data.len() as u64);
    }
    Ok(n)
}

fn entry_name<R: Read>(e: &tar::Entry<'_, R>) -> Result<String, BundleError> {
    Ok(e.path()?.to_string_lossy().into_owned())
}

/// The entry, if it is the one named `want`.
fn expect<'a, R: Read>(
    e: Option<tar::Entry<'a, R>>,
    want: &str,
) -> Result<tar::Entry<'a, R>, BundleError> {
    let e = e.ok_or_else(|| BundleError::Malformed(format!("ends before {want}")))?;
    let name = entry_name(&e)?;
    if name != want {
        return Err(BundleError::Malformed(format!(
            "expected {want}, found {name:?}"
        )));
    }
    Ok(e)
}

/// The manifest's bytes checked against their signature (hex) and
/// `trusted`, then for sense: the one check every way of reading a bundle
/// makes ([`verify_with`], [`delta::read_head`]).
pub(crate) fn check_manifest(
    text: &[u8],
    sig: &[u8],
    trusted: &[VerifyingKey],
) -> Result<Manifest, BundleError> {
    let malformed = |m: &str| BundleError::Malformed(m.to_owned());
    let sig = std::str::from_utf8(sig)
        .ok()
        .and_then(unhex::<64>)
        .ok_or_else(|| malformed("manifest.sig is not 64 bytes of hex"))?;
    let sig = Signature::from_bytes(&sig);
    if !trusted.iter().any(|k| k.verify_strict(text, &sig).is_ok()) {
        return Err(BundleError::BadSignature);
    }
    // Signed: from here the manifest is trusted, but still checked for sense.
    let manifest: Manifest =
        serde_json::from_slice(text).map_err(|e| malformed(&format!("manifest.json: {e}")))?;
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
    if let Some(k) = manifest.keys.iter().find(|k| parse_public(k).is_none()) {
        return Err(malformed(&format!(
            "introduced key {k:?} is not an Ed25519 public key"
        )));
    }
    Ok(manifest)
}

/// The chunk index's bytes (`None`: the bundle has none) checked against
/// the signed manifest, and each part's chunks against the part's size.
pub(crate) fn check_chunks(
    m: &Manifest,
    raw: Option<&[u8]>,
) -> Result<Option<Vec<Vec<Chunk>>>, BundleError> {
    let malformed = |m: String| BundleError::Malformed(m);
    let (named, raw) = match (&m.chunks, raw) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(malformed(format!(
                "the manifest names a {CHUNKS_NAME} the bundle lacks"
            )))
        }
        (None, Some(_)) => {
            return Err(malformed(format!(
                "{CHUNKS_NAME} is not named by the signed manifest"
            )))
        }
        (Some(n), Some(r)) => (n, r),
    };
    if raw.len() as u64 != named.size || blake3::hash(raw).to_hex().as_str() != named.blake3 {
        return Err(malformed(format!(
            "{CHUNKS_NAME} is not the one the signed manifest names"
        )));
    }
    let index: ChunkIndex =
        serde_json::from_slice(raw).map_err(|e| malformed(format!("{CHUNKS_NAME}: {e}")))?;
    if index.parts.len() != m.parts.len() {
        return Err(malformed(format!("{CHUNKS_NAME}: not one list per part")));
    }
    let mut all = Vec::new();
    for (part, listed) in m.parts.iter().zip(&index.parts) {
        let bad = |why: &str| malformed(format!("{CHUNKS_NAME}: part {}: {why}", part.name));
        if listed.name != part.name {
            return Err(bad("listed out of order"));
        }
        let mut chunks = Vec::with_capacity(listed.chunks.len());
        let mut offset = 0u64;
        for (len, hash) in &listed.chunks {
            if *len == 0 || *len > u64::from(CHUNK_MAX) {
                return Err(bad("a chunk of impossible length"));
            }
            let hash = unhex::<32>(hash).ok_or_else(|| bad("a hash is not 32 bytes of hex"))?;
            chunks.push(Chunk {
                offset,
                len: *len,
                hash,
            });
            offset = offset
                .checked_add(*len)
                .ok_or_else(|| bad("chunks overflow"))?;
        }
        if offset != part.size {
            return Err(bad("chunks do not add up to the part's size"));
        }
        all.push(chunks);
    }
    Ok(Some(all))
}

/// Bytes of a bundle read before its manifest is trusted: the manifest,
/// its signature and their tar headers, with room to spare.
const HEAD_BUDGET: u64 = MANIFEST_MAX + SIG_MAX + (16 << 10);
/// Tar framing past the head: headers and padding of four members and the
/// end blocks, with room to spare.
const FRAMING_BUDGET: u64 = 64 << 10;

/// A reader that fails once it has given `left` bytes: what a bundle may
/// hold is known (from its signed manifest), so more is an attack.
struct Budget<R> {
    inner: R,
    left: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.left.get();
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the bundle is larger than its manifest allows (extra or oversized tar members)",
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left.set(left.saturating_sub(n as u64));
        Ok(n)
    }
}

/// Reads a bundle from `input`, checks the manifest's signature against
/// `trusted`, then streams each part into `sink(part)` while checking its
/// size and hash. Any failure is an error before anything is reported good;
/// a caller writing parts somewhere must discard them on an error.
pub fn verify<W: Write>(
    input: impl Read,
    trusted: &[VerifyingKey],
    sink: impl FnMut(&Part) -> std::io::Result<W>,
) -> Result<Manifest, BundleError> {
    verify_with(input, trusted, |_| Ok(()), sink)
}

/// [`verify`], with `accept` judging the signed manifest (board, version,
/// sizes) before the first part reaches a sink: a refusal there means not a
/// byte was written anywhere.
pub fn verify_with<W: Write>(
    input: impl Read,
    trusted: &[VerifyingKey],
    accept: impl FnOnce(&Manifest) -> Result<(), BundleError>,
    mut sink: impl FnMut(&Part) -> std::io::Result<W>,
) -> Result<Manifest, BundleError> {
    let malformed = |m: &str| BundleError::Malformed(m.to_owned());
    // Until the manifest is trusted, only its head may be read (the tar
    // crate would otherwise read a huge extension header into memory);
    // then as much as the signed parts and their framing take.
    let budget = std::rc::Rc::new(std::cell::Cell::new(HEAD_BUDGET));
    let input = Budget {
        inner: input,
        left: budget.clone(),
    };
    let mut archive = tar::Archive::new(input);
    let mut entries = archive.entries()?;
    let mut next =
        || -> Result<Option<tar::Entry<'_, _>>, BundleError> { Ok(entries.next().transpose()?) };
    let mut text = Vec::new();
    let m = expect(next()?, "manifest.json")?;
    if m.size() > MANIFEST_MAX {
        return Err(malformed("manifest.json is too big"));
    }
    m.take(MANIFEST_MAX).read_to_end(&mut text)?;
    let mut sig = Vec::new();
    expect(next()?, "manifest.sig")?
        .take(SIG_MAX)
        .read_to_end(&mut sig)?;
    let manifest = check_manifest(&text, &sig, trusted)?;
    let parts: u64 = manifest
        .parts
        .iter()
        .fold(0u64, |a, p| a.saturating_add(p.size));
    budget.set(
        budget
            .get()
            .saturating_add(CHUNKS_MAX)
            .saturating_add(parts)
            .saturating_add(FRAMING_BUDGET),
    );
    // Then the chunk index, if this bundle has one, checked against the
    // signed manifest; the updater's delta path reads it, this path only
    // makes sure it is the signed one.
    let mut first = next()?;
    let has_chunks = match &first {
        Some(e) => entry_name(e)? == CHUNKS_NAME,
        None => false,
    };
    let mut raw_chunks = None;
    if has_chunks {
        if let Some(e) = first.take() {
            if e.size() > CHUNKS_MAX {
                return Err(malformed("chunks.json is too big"));
            }
            let mut b = Vec::new();
            e.take(CHUNKS_MAX).read_to_end(&mut b)?;
            raw_chunks = Some(b);
        }
        first = next()?;
    }
    check_chunks(&manifest, raw_chunks.as_deref())?;
    accept(&manifest)?;
    for part in &manifest.parts {
        let bad = |why: String| BundleError::BadPart {
            name: part.name.clone(),
            why,
        };
        let e = match first.take() {
            Some(e) => Some(e),
            None => next()?,
        };
        let e = expect(e, &part.name)?;
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

/// Largest channel index accepted.
pub const INDEX_MAX: u64 = 16 << 10;

/// An update channel's index: the newest release of a board, signed, with an
/// expiry, so that a mirror can neither change it nor keep serving an old one
/// unnoticed past `expires`. As text it is two lines: the index as JSON, then
/// the Ed25519 signature of exactly that line's bytes, in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: u32,
    pub board: String,
    pub version: String,
    /// Where the bundle is: absolute, or relative to the index's own URL.
    pub url: String,
    /// The whole bundle file's size and BLAKE3.
    pub size: u64,
    pub blake3: String,
    /// Seconds since the epoch: when the index was signed, and after when
    /// a box must no longer believe it.
    pub created: u64,
    pub expires: u64,
}

/// The signed text of `index`.
pub fn sign_index(key: &SigningKey, index: &Index) -> Result<String, BundleError> {
    let line = serde_json::to_string(index).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let sig = hex(&key.sign(line.as_bytes()).to_bytes());
    Ok(format!("{line}\n{sig}\n"))
}

/// Reads a signed index, checking its signature against `trusted`. Its
/// freshness (`expires`), board and version are the caller's to judge.
pub fn verify_index(text: &[u8], trusted: &[VerifyingKey]) -> Result<Index, BundleError> {
    let malformed = |m: &str| BundleError::Malformed(format!("channel index: {m}"));
    if text.len() as u64 > INDEX_MAX {
        return Err(malformed("too big"));
    }
    let text = std::str::from_utf8(text).map_err(|_| malformed("not UTF-8"))?;
    let mut lines = text.lines();
    let line = lines.next().ok_or_else(|| malformed("empty"))?;
    let sig = lines
        .next()
        .and_then(unhex::<64>)
        .ok_or_else(|| malformed("the second line is not 64 bytes of hex"))?;
    let sig = Signature::from_bytes(&sig);
    if !trusted
        .iter()
        .any(|k| k.verify_strict(line.as_bytes(), &sig).is_ok())
    {
        return Err(BundleError::BadSignature);
    }
    let index: Index = serde_json::from_str(line).map_err(|e| malformed(&e.to_string()))?;
    if index.format != FORMAT {
        return Err(malformed(&format!(
            "format {} (this reads {FORMAT})",
            index.format
        )));
    }
    Ok(index)
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
    fn an_index_verifies_and_a_changed_one_does_not() {
        let f = fixture();
        let index = Index {
            format: FORMAT,
            board: "qemu-virt".into(),
            version: "1.2.3".into(),
            url: "cloudlet-1.2.3.cub".into(),
            size: 10,
            blake3: "00".into(),
            created: 1,
            expires: 2,
        };
        let text = sign_index(&f.key, &index).unwrap();
        assert_eq!(verify_index(text.as_bytes(), &[f.public]).unwrap(), index);
        let changed = text.replace("1.2.3", "1.2.4");
        assert!(matches!(
            verify_index(changed.as_bytes(), &[f.public]),
            Err(BundleError::BadSignature)
        ));
        let other = SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        assert!(verify_index(text.as_bytes(), &[other]).is_err());
        assert!(verify_index(b"{}", &[f.public]).is_err());
    }

    #[test]
    fn a_manifest_names_the_keys_it_introduces_and_accept_sees_them_first() {
        let f = fixture();
        let new = SigningKey::from_bytes(&[5u8; 32]).verifying_key();
        let mut out = Vec::new();
        let p = [&*f.parts[0], &*f.parts[1], &*f.parts[2]];
        create_introducing(&mut out, &f.key, "qemu-virt", "2.0.0", 1, &p, &[new]).unwrap();
        let mut sinks = 0;
        let r = verify_with(
            &out[..],
            &[f.public],
            |m| {
                assert_eq!(m.keys, vec![public_hex(&new)]);
                Err(BundleError::Refused("not for this box".into()))
            },
            |_| {
                sinks += 1;
                Ok(std::io::sink())
            },
        );
        assert!(matches!(r, Err(BundleError::Refused(_))));
        assert_eq!(sinks, 0, "a refused manifest reached a sink");
    }

    #[test]
    fn a_huge_extension_header_before_the_manifest_is_refused_without_reading_it() {
        // A GNU long-name member of 1 GiB: the tar crate would read it all
        // into memory to name the next member.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(1 << 30);
        h.set_path("././@LongLink").unwrap();
        h.set_cksum();
        struct Endless(u64);
        impl Read for Endless {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                b.fill(b'a');
                self.0 += b.len() as u64;
                Ok(b.len())
            }
        }
        let mut fed = Endless(0);
        let r = verify(
            std::io::Read::chain(&h.as_bytes()[..], &mut fed),
            &[],
            |_| Ok(std::io::sink()),
        );
        assert!(r.is_err());
        assert!(fed.0 < 1 << 20, "read {} bytes of the header", fed.0);
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
