//! Delta updates: installing a bundle from a random-access source (HTTP
//! ranges) while taking every chunk the box already holds from its own
//! files.
//!
//! ```text
//! read_head ── manifest + signature + chunks.json, checked as verify does,
//!    │         and every byte of the bundle that is not part data
//!    ▼
//! plan ─────── each chunk: a local copy (same BLAKE3), or a range of the
//!    │         bundle (neighbouring missing chunks in one range)
//!    ▼
//! execute ──── parts written in order into sinks; every chunk checked
//!              against its signed hash, every part against the manifest,
//!              and the whole file's BLAKE3 computed for the channel index
//! ```
//!
//! What is trusted: the signed manifest names the chunk index's size and
//! hash and each part's size and hash; each chunk is checked against the
//! index, so a local chunk that changed since it was indexed is fetched
//! instead, and a fetched chunk that is wrong fails the part.

use std::collections::HashMap;
use std::io::Write;

use ed25519_dalek::VerifyingKey;

use crate::{
    check_chunks, check_manifest, BundleError, Chunk, Manifest, Part, CHUNKS_MAX, CHUNKS_NAME,
    MANIFEST_MAX, SIG_MAX,
};

/// Bytes read at once while reading a bundle's head.
const HEAD_BLOCK: u64 = 64 << 10;
/// Largest range fetched in one request (and held in memory).
pub const FETCH_MAX: u64 = 4 << 20;
const BLOCK: u64 = 512;

/// A source of bytes by position: a bundle behind HTTP ranges, a file.
pub trait Ranges {
    /// Exactly `len` bytes from `offset`, or an error.
    fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>>;
}

impl Ranges for std::fs::File {
    fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; to_usize(len)?];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

impl Ranges for [u8] {
    fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let end = offset.checked_add(len);
        match (to_usize(offset), end.map(to_usize)) {
            (Ok(a), Some(Ok(b))) if b <= self.len() => Ok(self[a..b].to_vec()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{len} bytes at {offset}: past the end ({})", self.len()),
            )),
        }
    }
}

impl Ranges for Vec<u8> {
    fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.as_mut_slice().read_at(offset, len)
    }
}

impl<R: Ranges + ?Sized> Ranges for &mut R {
    fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        (**self).read_at(offset, len)
    }
}

fn to_usize(n: u64) -> std::io::Result<usize> {
    usize::try_from(n).map_err(|_| std::io::Error::other(format!("{n} bytes do not fit")))
}

/// A bundle's checked head and layout.
#[derive(Debug, Clone)]
pub struct Remote {
    pub manifest: Manifest,
    /// Each part's chunks; `None` for a bundle made before chunk indexes.
    pub chunks: Option<Vec<Vec<Chunk>>>,
    /// Where each part's data starts in the bundle.
    pub parts: Vec<u64>,
    /// Every byte of the bundle that is not part data, by offset: the
    /// head, the tar headers between parts, the end blocks. With the
    /// parts they make the whole file, so its hash can be computed.
    frame: Vec<(u64, Vec<u8>)>,
    /// The bundle's size.
    pub size: u64,
}

/// Reads the head in growing blocks from offset 0, so that it costs a few
/// requests and keeps exactly the prefix it read.
struct Prefix<'a, R: ?Sized> {
    src: &'a mut R,
    buf: Vec<u8>,
}

impl<R: Ranges + ?Sized> Prefix<'_, R> {
    fn get(&mut self, offset: u64, len: u64) -> Result<&[u8], BundleError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| BundleError::Malformed("sizes overflow".into()))?;
        let have = self.buf.len() as u64;
        if end > have {
            let more = (end - have).max(HEAD_BLOCK);
            let got = self.src.read_at(have, more).or_else(|e| {
                // Near the end of a small bundle a whole block is not there.
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    self.src.read_at(have, end - have)
                } else {
                    Err(e)
                }
            })?;
            self.buf.extend_from_slice(&got);
        }
        Ok(&self.buf[to_usize(offset)?..to_usize(end)?])
    }
}

fn round_up(n: u64) -> Option<u64> {
    n.checked_add(BLOCK - 1).map(|n| n / BLOCK * BLOCK)
}

/// The tar header at `at`: its member name and size.
fn header(block: &[u8]) -> Result<(String, u64), BundleError> {
    let malformed = |m: String| BundleError::Malformed(m);
    let h = tar::Header::from_byte_slice(block);
    if h.entry_type() != tar::EntryType::Regular {
        return Err(malformed(format!(
            "a member of type {:?} (only plain files are expected)",
            h.entry_type()
        )));
    }
    let name = h.path()?.to_string_lossy().into_owned();
    let size = h.entry_size()?;
    Ok((name, size))
}

/// Reads a bundle's head from `src`, checks it exactly as
/// [`crate::verify_with`] does (signature, manifest, chunk index), and
/// learns where each part is. Reads nothing of the parts.
pub fn read_head<R: Ranges + ?Sized>(
    src: &mut R,
    trusted: &[VerifyingKey],
) -> Result<Remote, BundleError> {
    let malformed = |m: String| BundleError::Malformed(m);
    let mut p = Prefix {
        src,
        buf: Vec::new(),
    };
    // One member of the head: (name, data offset, size) after its header at `at`.
    let member = |p: &mut Prefix<'_, R>, at: u64| -> Result<(String, u64, u64), BundleError> {
        let (name, size) = header(p.get(at, BLOCK)?)?;
        Ok((name, at.saturating_add(BLOCK), size))
    };
    let next_at = |data: u64, size: u64| {
        data.checked_add(size)
            .and_then(round_up)
            .ok_or_else(|| malformed("sizes overflow".into()))
    };
    let (name, at, size) = member(&mut p, 0)?;
    if name != "manifest.json" {
        return Err(malformed(format!("expected manifest.json, found {name:?}")));
    }
    if size > MANIFEST_MAX {
        return Err(malformed("manifest.json is too big".into()));
    }
    let text = p.get(at, size)?.to_vec();
    let (name, sig_at, sig_size) = member(&mut p, next_at(at, size)?)?;
    if name != "manifest.sig" {
        return Err(malformed(format!("expected manifest.sig, found {name:?}")));
    }
    // Its size is not signed: a large one would move the rest of the head.
    if sig_size > SIG_MAX {
        return Err(malformed("manifest.sig is too big".into()));
    }
    let sig = p.get(sig_at, sig_size)?.to_vec();
    let manifest = check_manifest(&text, &sig, trusted)?;
    let mut header_at = next_at(sig_at, sig_size)?;
    let (mut name, mut at, mut size) = member(&mut p, header_at)?;
    let mut raw_chunks = None;
    if name == CHUNKS_NAME {
        if size > CHUNKS_MAX {
            return Err(malformed("chunks.json is too big".into()));
        }
        raw_chunks = Some(p.get(at, size)?.to_vec());
        header_at = next_at(at, size)?;
        (name, at, size) = member(&mut p, header_at)?;
    }
    let chunks = check_chunks(&manifest, raw_chunks.as_deref())?;
    // The parts: each one's header is read (a small range between parts)
    // to be sure of the layout, and kept for the whole file's hash.
    let mut frame = vec![(0u64, p.buf[..to_usize(at)?].to_vec())];
    let src = p.src;
    let mut parts = Vec::new();
    for (i, part) in manifest.parts.iter().enumerate() {
        if i > 0 {
            let gap_at = frame_end(&manifest.parts[i - 1], parts[i - 1])?;
            let block_at = next_at(parts[i - 1], manifest.parts[i - 1].size)?;
            let gap = src.read_at(
                gap_at,
                block_at.saturating_sub(gap_at).saturating_add(BLOCK),
            )?;
            let hdr = gap
                .get(gap.len().saturating_sub(BLOCK as usize)..)
                .ok_or_else(|| malformed("a cut header".into()))?;
            (name, size) = header(hdr)?;
            at = block_at.saturating_add(BLOCK);
            frame.push((gap_at, gap));
        }
        if name != part.name {
            return Err(malformed(format!("expected {}, found {name:?}", part.name)));
        }
        if size != part.size {
            return Err(BundleError::BadPart {
                name: part.name.clone(),
                why: format!("{size} bytes, the manifest says {}", part.size),
            });
        }
        parts.push(at);
    }
    // The end: the last part's padding and tar's two zero blocks.
    let (last, last_at) = match (manifest.parts.last(), parts.last()) {
        (Some(l), Some(a)) => (l, *a),
        _ => return Err(malformed("no parts".into())),
    };
    let end_at = frame_end(last, last_at)?;
    let tail_len = next_at(last_at, last.size)?
        .saturating_sub(end_at)
        .saturating_add(2 * BLOCK);
    let tail = src.read_at(end_at, tail_len)?;
    if tail.iter().any(|b| *b != 0) {
        return Err(malformed("something follows the last part".into()));
    }
    let size = end_at.saturating_add(tail_len);
    frame.push((end_at, tail));
    Ok(Remote {
        manifest,
        chunks,
        parts,
        frame,
        size,
    })
}

fn frame_end(part: &Part, at: u64) -> Result<u64, BundleError> {
    at.checked_add(part.size)
        .ok_or_else(|| BundleError::Malformed("sizes overflow".into()))
}

/// Where a chunk is on this box: (source id, offset, length).
pub type Local = HashMap<[u8; 32], (usize, u64, u64)>;

/// Cuts what `r` yields into chunks as bundles are cut, adding each to
/// `into` as found in source `id`. Returns how many bytes were read.
pub fn index_local(id: usize, r: impl std::io::Read, into: &mut Local) -> Result<u64, BundleError> {
    crate::chunk(r, |offset, data| {
        into.entry(*blake3::hash(data).as_bytes())
            .or_insert((id, offset, data.len() as u64));
        Ok(())
    })
}

/// How one run of a part's chunks is got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Chunk `chunk` of the part, copied from a local source.
    Local {
        chunk: usize,
        source: usize,
        offset: u64,
    },
    /// Chunks `first..end` of the part, one range of the bundle.
    Fetch {
        first: usize,
        end: usize,
        offset: u64,
        len: u64,
    },
}

/// Per part, in order, how its chunks are got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub parts: Vec<Vec<Step>>,
    /// Bytes of part data the plan fetches (the head comes on top).
    pub fetch_bytes: u64,
    pub reused_bytes: u64,
}

impl Plan {
    /// The bundle ranges the plan fetches, as (offset, length).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.parts
            .iter()
            .flatten()
            .filter_map(|s| match s {
                Step::Fetch { offset, len, .. } => Some((*offset, *len)),
                Step::Local { .. } => None,
            })
            .collect()
    }
}

/// Decides, chunk by chunk, what to copy from `local` and which ranges of
/// the bundle to fetch. A bundle without a chunk index has no plan.
pub fn plan(remote: &Remote, local: &Local) -> Result<Plan, BundleError> {
    let all = remote
        .chunks
        .as_ref()
        .ok_or_else(|| BundleError::Malformed(format!("the bundle has no {CHUNKS_NAME}")))?;
    let mut plan = Plan {
        parts: Vec::new(),
        fetch_bytes: 0,
        reused_bytes: 0,
    };
    for (chunks, part_at) in all.iter().zip(&remote.parts) {
        let mut steps: Vec<Step> = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            if let Some(&(source, offset, len)) = local.get(&c.hash) {
                if len == c.len {
                    steps.push(Step::Local {
                        chunk: i,
                        source,
                        offset,
                    });
                    plan.reused_bytes = plan.reused_bytes.saturating_add(c.len);
                    continue;
                }
            }
            plan.fetch_bytes = plan.fetch_bytes.saturating_add(c.len);
            if let Some(Step::Fetch { end, len, .. }) = steps.last_mut() {
                if *end == i && len.saturating_add(c.len) <= FETCH_MAX {
                    *end = i.saturating_add(1);
                    *len = len.saturating_add(c.len);
                    continue;
                }
            }
            steps.push(Step::Fetch {
                first: i,
                end: i.saturating_add(1),
                offset: part_at.saturating_add(c.offset),
                len: c.len,
            });
        }
        plan.parts.push(steps);
    }
    Ok(plan)
}

/// What an executed plan did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// Bytes of part data fetched from the bundle (with chunks refetched
    /// because a local copy was not what it had been).
    pub fetched: u64,
    pub reused: u64,
    /// The whole bundle file's BLAKE3 (frame and parts), for a channel
    /// index's hash.
    pub whole: blake3::Hash,
}

/// Writes each part of `remote` into `sink(part)` as `plan` says: local
/// chunks read from `local[source]`, the rest from `bundle`. Every chunk is
/// checked against the index (a local one that does not match is fetched
/// instead); each part is checked whole against the manifest before its
/// sink is flushed. On an error whatever a sink got must be discarded.
pub fn execute<W: Write>(
    remote: &Remote,
    plan: &Plan,
    bundle: &mut dyn Ranges,
    local: &mut [&mut dyn Ranges],
    mut sink: impl FnMut(&Part) -> std::io::Result<W>,
) -> Result<Done, BundleError> {
    let all = remote
        .chunks
        .as_ref()
        .ok_or_else(|| BundleError::Malformed(format!("the bundle has no {CHUNKS_NAME}")))?;
    let mut done = Done {
        fetched: 0,
        reused: 0,
        whole: blake3::hash(b""),
    };
    let mut whole = blake3::Hasher::new();
    let mut frame = remote.frame.iter();
    for (i, part) in remote.manifest.parts.iter().enumerate() {
        let bad = |why: String| BundleError::BadPart {
            name: part.name.clone(),
            why,
        };
        let (chunks, steps, part_at) = match (all.get(i), plan.parts.get(i), remote.parts.get(i)) {
            (Some(c), Some(s), Some(a)) => (c, s, *a),
            _ => return Err(bad("the plan does not cover it".into())),
        };
        if let Some((_, bytes)) = frame.next() {
            whole.update(bytes);
        }
        let mut out = sink(part)?;
        let mut h = blake3::Hasher::new();
        let mut n = 0u64;
        let mut put = |data: &[u8], out: &mut W| -> Result<(), BundleError> {
            h.update(data);
            whole.update(data);
            out.write_all(data)?;
            n = n.saturating_add(data.len() as u64);
            Ok(())
        };
        for step in steps {
            match *step {
                Step::Local {
                    chunk,
                    source,
                    offset,
                } => {
                    let c = chunks
                        .get(chunk)
                        .ok_or_else(|| bad(format!("the plan names chunk {chunk}")))?;
                    let data = local
                        .get_mut(source)
                        .and_then(|s| s.read_at(offset, c.len).ok())
                        .filter(|d| blake3::hash(d).as_bytes() == &c.hash);
                    match data {
                        Some(d) => {
                            done.reused = done.reused.saturating_add(c.len);
                            put(&d, &mut out)?;
                        }
                        None => {
                            // The local copy changed since it was indexed.
                            let d = bundle.read_at(part_at.saturating_add(c.offset), c.len)?;
                            if blake3::hash(&d).as_bytes() != &c.hash {
                                return Err(bad(format!("chunk {chunk} does not match its hash")));
                            }
                            done.fetched = done.fetched.saturating_add(c.len);
                            put(&d, &mut out)?;
                        }
                    }
                }
                Step::Fetch {
                    first,
                    end,
                    offset,
                    len,
                } => {
                    let d = bundle.read_at(offset, len)?;
                    let run = chunks
                        .get(first..end)
                        .ok_or_else(|| bad(format!("the plan names chunks {first}..{end}")))?;
                    let mut at = 0usize;
                    for (k, c) in run.iter().enumerate() {
                        let piece = at
                            .checked_add(to_usize(c.len)?)
                            .and_then(|e| d.get(at..e))
                            .ok_or_else(|| bad("a fetched range is short".into()))?;
                        if blake3::hash(piece).as_bytes() != &c.hash {
                            return Err(bad(format!(
                                "chunk {} from the bundle does not match its hash",
                                first.saturating_add(k)
                            )));
                        }
                        at = at.saturating_add(piece.len());
                    }
                    if at != d.len() {
                        return Err(bad("a fetched range is not its chunks".into()));
                    }
                    done.fetched = done.fetched.saturating_add(len);
                    put(&d, &mut out)?;
                }
            }
        }
        if n != part.size {
            return Err(bad(format!("{n} bytes written of {}", part.size)));
        }
        if h.finalize().to_hex().as_str() != part.blake3 {
            return Err(bad("content does not match its hash".into()));
        }
        out.flush()?;
    }
    for (_, bytes) in frame {
        whole.update(bytes);
    }
    done.whole = whole.finalize();
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, keygen, load_public, load_secret, verify, PARTS};
    use ed25519_dalek::{Signer, SigningKey};

    /// Deterministic noise (xorshift), so chunk boundaries are real.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        cloudlet_testkit::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).fill(len)
    }

    struct Fix {
        dir: tempfile::TempDir,
        key: SigningKey,
        public: VerifyingKey,
    }

    fn fix() -> Fix {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("k"), &dir.path().join("k.pub")).unwrap();
        Fix {
            key: load_secret(&dir.path().join("k")).unwrap(),
            public: load_public(&dir.path().join("k.pub")).unwrap(),
            dir,
        }
    }

    fn make(f: &Fix, tag: &str, parts: &[Vec<u8>; 3]) -> Vec<u8> {
        let paths = PARTS.map(|n| f.dir.path().join(format!("{tag}-{n}")));
        for (p, d) in paths.iter().zip(parts) {
            std::fs::write(p, d).unwrap();
        }
        let mut out = Vec::new();
        create(
            &mut out,
            &f.key,
            "qemu-virt",
            "2.0.0",
            7,
            &[&paths[0], &paths[1], &paths[2]],
        )
        .unwrap();
        out
    }

    /// Records every range read.
    struct Counted<'a> {
        inner: &'a mut Vec<u8>,
        asked: Vec<(u64, u64)>,
    }

    impl Ranges for Counted<'_> {
        fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
            self.asked.push((offset, len));
            self.inner.read_at(offset, len)
        }
    }

    fn v1() -> [Vec<u8>; 3] {
        [noise(1, 300_000), noise(2, 200_000), noise(3, 4 << 20)]
    }

    /// A sink whose bytes the test keeps.
    #[derive(Clone, Default)]
    struct Kept(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

    impl Write for Kept {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn index(local: &[Vec<u8>]) -> Local {
        let mut idx = Local::new();
        for (i, l) in local.iter().enumerate() {
            index_local(i, &l[..], &mut idx).unwrap();
        }
        idx
    }

    /// Executes `p`, returning what each part's sink got.
    fn run(
        remote: &Remote,
        p: &Plan,
        bundle: &mut dyn Ranges,
        local: &mut [Vec<u8>],
    ) -> Result<(Done, Vec<Vec<u8>>), BundleError> {
        let mut srcs: Vec<&mut dyn Ranges> =
            local.iter_mut().map(|l| l as &mut dyn Ranges).collect();
        let mut sinks: Vec<Kept> = Vec::new();
        let done = execute(remote, p, bundle, &mut srcs, |_| {
            let k = Kept::default();
            sinks.push(k.clone());
            Ok(k)
        })?;
        Ok((done, sinks.iter().map(|k| k.0.borrow().clone()).collect()))
    }

    #[test]
    fn a_rootfs_changed_in_one_region_fetches_only_chunks_around_it() {
        let f = fix();
        let old = v1();
        let mut new = old.clone();
        // 40 KB rewritten in the middle of the 4 MiB rootfs.
        let (from, to) = (2_000_000usize, 2_040_000usize);
        new[2][from..to].copy_from_slice(&noise(9, to - from));
        let mut b = make(&f, "v2", &new);
        let whole = blake3::hash(&b);
        let size = b.len() as u64;
        let mut src = Counted {
            inner: &mut b,
            asked: Vec::new(),
        };
        let remote = read_head(&mut src, &[f.public]).unwrap();
        assert_eq!(remote.size, size);
        let head_asked = src.asked.len();
        let p = plan(&remote, &index(&old)).unwrap();
        // Kernel and initramfs are all local; the rootfs fetches the region
        // and at most a chunk of the largest size on either side.
        assert!(p.parts[0]
            .iter()
            .chain(&p.parts[1])
            .all(|s| matches!(s, Step::Local { .. })));
        let rootfs_at = remote.parts[2];
        let lo = rootfs_at + from as u64 - u64::from(crate::CHUNK_MAX);
        let hi = rootfs_at + to as u64 + u64::from(crate::CHUNK_MAX);
        let ranges = p.ranges();
        assert!(!ranges.is_empty());
        for (o, l) in &ranges {
            assert!(*o >= lo && o + l <= hi, "range {o}+{l} outside {lo}..{hi}");
        }
        assert!(p.fetch_bytes <= (to - from) as u64 + 2 * u64::from(crate::CHUNK_MAX));
        assert_eq!(
            p.fetch_bytes + p.reused_bytes,
            remote.manifest.parts.iter().map(|x| x.size).sum::<u64>()
        );
        let mut local = old.to_vec();
        let (done, got) = run(&remote, &p, &mut src, &mut local).unwrap();
        assert_eq!(got, new.to_vec());
        assert_eq!(done.fetched, p.fetch_bytes);
        assert_eq!(
            done.whole, whole,
            "the whole file's hash was not reproduced"
        );
        // Executing read exactly the planned ranges of the bundle.
        assert_eq!(src.asked[head_asked..], ranges[..]);
    }

    #[test]
    fn a_local_chunk_that_changed_is_fetched_instead() {
        let f = fix();
        let parts = v1();
        let mut b = make(&f, "v1", &parts);
        let remote = read_head(&mut b, &[f.public]).unwrap();
        let p = plan(&remote, &index(&parts)).unwrap();
        assert_eq!(p.fetch_bytes, 0);
        let mut local = parts.to_vec();
        local[2][100_000] ^= 1;
        let (done, got) = run(&remote, &p, &mut b, &mut local).unwrap();
        assert_eq!(got, parts.to_vec());
        assert!(done.fetched > 0 && done.fetched <= u64::from(crate::CHUNK_MAX));
    }

    #[test]
    fn a_wrong_chunk_from_the_bundle_fails_its_part() {
        let f = fix();
        let parts = v1();
        let mut b = make(&f, "v1", &parts);
        let remote = read_head(&mut b, &[f.public]).unwrap();
        let p = plan(&remote, &Local::new()).unwrap();
        let at = usize::try_from(remote.parts[1]).unwrap() + 10;
        b[at] ^= 0xff;
        let mut local = Vec::new();
        let r = run(&remote, &p, &mut b, &mut local);
        assert!(
            matches!(r, Err(BundleError::BadPart { ref name, .. }) if name == "initrd"),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn a_tampered_chunk_index_is_refused() {
        let f = fix();
        let parts = v1();
        let b = make(&f, "v1", &parts);
        // chunks.json is `{"parts":[{"name":"Image","chunks":[[LEN,"HEX"],...`:
        // the first digit of the first hash changed.
        let at = b.windows(11).position(|w| w == br#""chunks":[["#).unwrap();
        let mut t = b.clone();
        let q = at + 11 + t[at + 11..].iter().position(|c| *c == b'"').unwrap() + 1;
        t[q] = if t[q] == b'0' { b'1' } else { b'0' };
        let r = read_head(&mut t.clone(), &[f.public]);
        assert!(
            matches!(r, Err(BundleError::Malformed(ref m)) if m.contains("chunks.json")),
            "{:?}",
            r.err()
        );
        let r = verify(&t[..], &[f.public], |_| Ok(std::io::sink()));
        assert!(matches!(r, Err(BundleError::Malformed(ref m)) if m.contains("chunks.json")));
        // And the untouched bundle passes both.
        assert!(read_head(&mut b.clone(), &[f.public]).is_ok());
        assert!(verify(&b[..], &[f.public], |_| Ok(std::io::sink())).is_ok());
    }

    /// A bundle as made before chunk indexes: no `chunks` in the manifest,
    /// no `chunks.json`.
    fn old_bundle(f: &Fix, parts: &[Vec<u8>; 3]) -> Vec<u8> {
        let m = Manifest {
            format: crate::FORMAT,
            board: "qemu-virt".into(),
            version: "1.0.0".into(),
            created: 1,
            parts: PARTS
                .iter()
                .zip(parts)
                .map(|(n, d)| Part {
                    name: (*n).into(),
                    size: d.len() as u64,
                    blake3: blake3::hash(d).to_hex().to_string(),
                })
                .collect(),
            keys: Vec::new(),
            chunks: None,
        };
        let text = serde_json::to_vec_pretty(&m).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("chunks"));
        let sig = hex::encode(f.key.sign(&text).to_bytes());
        let mut t = tar::Builder::new(Vec::new());
        crate::append(&mut t, "manifest.json", text.len() as u64, &text[..]).unwrap();
        crate::append(&mut t, "manifest.sig", sig.len() as u64, sig.as_bytes()).unwrap();
        for (n, d) in PARTS.iter().zip(parts) {
            crate::append(&mut t, n, d.len() as u64, &d[..]).unwrap();
        }
        t.into_inner().unwrap()
    }

    #[test]
    fn an_old_bundle_without_chunks_still_verifies_and_has_no_plan() {
        let f = fix();
        let parts = v1();
        let mut b = old_bundle(&f, &parts);
        let mut got = Vec::new();
        let m = verify(&b[..], &[f.public], |_| {
            let k = Kept::default();
            got.push(k.clone());
            Ok(k)
        })
        .unwrap();
        assert_eq!(m.chunks, None);
        let got: Vec<Vec<u8>> = got.iter().map(|k| k.0.borrow().clone()).collect();
        assert_eq!(got, parts.to_vec());
        let remote = read_head(&mut b, &[f.public]).unwrap();
        assert!(remote.chunks.is_none());
        assert_eq!(remote.size, b.len() as u64);
        assert!(plan(&remote, &Local::new()).is_err());
    }

    #[test]
    fn a_head_signed_by_another_key_is_refused() {
        let f = fix();
        let mut b = make(&f, "v1", &v1());
        let other = SigningKey::from_bytes(&[3u8; 32]).verifying_key();
        assert!(matches!(
            read_head(&mut b, &[other]),
            Err(BundleError::BadSignature)
        ));
    }
}
