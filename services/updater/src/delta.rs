//! A delta install: from a bundle URL, fetch only the chunks the active
//! slot does not already hold, with HTTP `Range` requests.
//!
//! ```text
//! bundle head (ranges) ─► signature, manifest, chunks.json checked
//! active slot files ─────► chunked (FastCDC, the bundle's sizes), indexed by BLAKE3
//! plan ──────────────────► per chunk: local copy, or a coalesced bundle range
//! install::accept ───────► board/version/room; the other slot stops being a fallback
//! execute ───────────────► parts written in order (PartWriter), each chunk and part checked
//! whole-file check ──────► the index's size and BLAKE3, recomputed (see below)
//! install::read_back ────► every part read back from the disk
//! ```
//!
//! What covers the content: the manifest is signed and names the chunk
//! index's size and hash; every chunk (local or fetched) is checked against
//! the index before it is written, and every part against the manifest's
//! size and hash before its writer is flushed, then again from the disk.
//! When a signed channel index named the whole file ([`Ask::whole`]), that
//! is checked too: every byte of the bundle that is not part data (head,
//! tar headers, end blocks) is fetched, so the whole file's BLAKE3 is
//! computed from those bytes and the parts as written, without fetching
//! the parts the box already had.
//!
//! Local chunk sources are the running slot's `Image-X`, `initrd-X` and its
//! root partition ([`Target::active_dev`]), of which only the squashfs
//! image (its superblock's `bytes_used`) is read.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_bundle::delta::{self as cdc, Local, Ranges};
use cloudlet_bundle::{BundleError, Manifest};
use ed25519_dalek::VerifyingKey;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};

use crate::fetch::{self, Url};
use crate::install::{self, Ask, InstallError, PartWriter, Release, Target};

/// Tries of one range before the install fails.
const RANGE_TRIES: u32 = 3;
/// squashfs: the magic at 0, `bytes_used` (u64 LE) at 40.
const SQUASHFS_MAGIC: &[u8; 4] = b"hsqs";
const SQUASHFS_BYTES_USED: usize = 40;

/// A finished delta install.
#[derive(Debug, Clone)]
pub struct Delta {
    pub manifest: Manifest,
    /// Bytes received from the server: the head, the tar framing and the
    /// missing chunks.
    pub fetched_bytes: u64,
    /// Bytes of parts copied from the active slot.
    pub reused_bytes: u64,
    /// The bundle's size.
    pub total_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DeltaOutcome {
    /// No delta install here (an old bundle, a server without ranges, the
    /// head could not be fetched); nothing was written: install the whole
    /// bundle instead.
    #[error("no delta install: {0}")]
    Unsupported(String),
    /// The install ran and failed, as a full one would have.
    #[error("{0}")]
    Install(InstallError),
}

/// Installs the bundle at `url` into the other slot (see the module),
/// taking chunks from the running slot's files and `t.active_dev`. Runs on
/// a blocking thread; `rt` drives the HTTP requests.
pub fn install_delta(
    t: &Target,
    rel: &Release,
    trusted: &[VerifyingKey],
    url: &Url,
    ask: &Ask,
    progress: &dyn Fn(&str, u64, u64),
    rt: tokio::runtime::Handle,
) -> Result<Delta, DeltaOutcome> {
    let install_err = |e: BundleError| DeltaOutcome::Install(install::bundle_error(e));
    let mut http = Http {
        url: url.clone(),
        rt,
        fetched: 0,
        open_ended: false,
    };
    // Before accept nothing is written: a head that cannot be had leaves
    // the full install to try (and to report why, if it fails too).
    let remote = cdc::read_head(&mut http, trusted).map_err(|e| match e {
        BundleError::Io(io) => DeltaOutcome::Unsupported(format!("{url}: {io}")),
        other => install_err(other),
    })?;
    if remote.chunks.is_none() {
        return Err(DeltaOutcome::Unsupported(format!(
            "{url}: the bundle has no chunk index (made before delta updates)"
        )));
    }
    if let Some((size, _)) = &ask.whole {
        if remote.size != *size {
            return Err(DeltaOutcome::Install(InstallError::Refused(format!(
                "the bundle is not the one the channel index names ({} bytes, {size} expected)",
                remote.size
            ))));
        }
    }
    let (mut files, index) = local_sources(t, t.active_dev.as_deref(), progress);
    let plan = cdc::plan(&remote, &index).map_err(install_err)?;
    tracing::info!(
        fetch = plan.fetch_bytes,
        reuse = plan.reused_bytes,
        bundle = remote.size,
        "delta install planned"
    );
    install::accept(&remote.manifest, t, rel, ask).map_err(install_err)?;
    let mut local: Vec<&mut dyn Ranges> = files.iter_mut().map(|f| f as &mut dyn Ranges).collect();
    let done = cdc::execute(&remote, &plan, &mut http, &mut local, |part| {
        PartWriter::open(t, part, progress)
    })
    .map_err(install_err)?;
    if let Some((_, hash)) = &ask.whole {
        if done.whole.to_hex().as_str() != hash {
            return Err(DeltaOutcome::Install(InstallError::Refused(
                "the bundle is not the one the channel index names (another hash)".into(),
            )));
        }
    }
    for part in &remote.manifest.parts {
        install::read_back(&t.part_path(&part.name), part, progress)
            .map_err(DeltaOutcome::Install)?;
    }
    Ok(Delta {
        manifest: remote.manifest,
        fetched_bytes: http.fetched,
        reused_bytes: done.reused,
        total_bytes: remote.size,
    })
}

/// The running slot's files, opened and chunked. A source that cannot be
/// read is left out (its chunks are fetched instead).
fn local_sources(
    t: &Target,
    active_dev: Option<&Path>,
    progress: &dyn Fn(&str, u64, u64),
) -> (Vec<File>, Local) {
    let mut files = Vec::new();
    let mut index = Local::new();
    let running = t.running;
    let mut paths: Vec<(PathBuf, bool)> = vec![
        (t.boot_dir.join(format!("Image-{running}")), false),
        (t.boot_dir.join(format!("initrd-{running}")), false),
    ];
    if let Some(dev) = active_dev {
        paths.push((dev.to_owned(), true));
    }
    for (path, squashfs) in paths {
        let name = path.display().to_string();
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(source = %name, error = %e, "not a delta source");
                continue;
            }
        };
        let limit = if squashfs {
            match squashfs_size(&f) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(source = %name, error = %e, "not a delta source");
                    continue;
                }
            }
        } else {
            u64::MAX
        };
        let id = files.len();
        match cdc::index_local(id, (&f).take(limit), &mut index) {
            Ok(n) => progress(&format!("index {name}"), n, n),
            // Chunks indexed so far are still checked when used.
            Err(e) => tracing::warn!(source = %name, error = %e, "indexing stopped"),
        }
        files.push(f);
    }
    (files, index)
}

/// The size of the squashfs image at the start of `f` (its superblock's
/// `bytes_used`), no more than the device holds.
fn squashfs_size(f: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 48];
    f.read_exact_at(&mut sb, 0)?;
    if &sb[..4] != SQUASHFS_MAGIC {
        return Err(std::io::Error::other("no squashfs superblock"));
    }
    let mut used = [0u8; 8];
    used.copy_from_slice(&sb[SQUASHFS_BYTES_USED..SQUASHFS_BYTES_USED + 8]);
    let used = u64::from_le_bytes(used);
    // A block device's size is where its end is (its metadata says 0).
    let mut g = f;
    let size = std::io::Seek::seek(&mut g, std::io::SeekFrom::End(0))?;
    std::io::Seek::seek(&mut g, std::io::SeekFrom::Start(0))?;
    Ok(used.min(size))
}

/// A bundle behind HTTP ranges. It asks `bytes=A-B` first; a server that
/// answers that with the whole file but honours `bytes=A-` (as simple
/// mirrors do) gets open ranges from then on, read only as far as needed.
struct Http {
    url: Url,
    rt: tokio::runtime::Handle,
    fetched: u64,
    open_ended: bool,
}

enum Got {
    Bytes(Vec<u8>),
    /// The server answered with the whole file: it ignored the range.
    Whole,
}

impl Ranges for Http {
    fn read_at(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut failures = 0u32;
        loop {
            let got = self
                .rt
                .block_on(get_range(&self.url, offset, len, self.open_ended));
            match got {
                Ok(Got::Bytes(b)) => {
                    self.fetched = self.fetched.saturating_add(b.len() as u64);
                    return Ok(b);
                }
                Ok(Got::Whole) if !self.open_ended => self.open_ended = true,
                Ok(Got::Whole) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "the server does not answer Range requests",
                    ))
                }
                // Past the end, or a status trying again cannot change.
                Err(e) if e.kind() != std::io::ErrorKind::Other => return Err(e),
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures >= RANGE_TRIES {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, offset, len, "range failed; trying again");
                    std::thread::sleep(Duration::from_secs(u64::from(failures)));
                }
            }
        }
    }
}

/// `len` bytes at `offset` of `url` (fewer only at the end of the file:
/// then an `UnexpectedEof` error).
async fn get_range(url: &Url, offset: u64, len: u64, open_ended: bool) -> std::io::Result<Got> {
    let other = |m: String| std::io::Error::other(format!("{url}: {m}"));
    let last = offset
        .checked_add(len.saturating_sub(1))
        .ok_or_else(|| other("range overflows".into()))?;
    let range = if open_ended {
        format!("bytes={offset}-")
    } else {
        format!("bytes={offset}-{last}")
    };
    let mut sender = fetch::connect(url).await.map_err(std::io::Error::other)?;
    let req = Request::get(&url.path)
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::RANGE, range)
        .body(Empty::<Bytes>::new())
        .map_err(|e| other(e.to_string()))?;
    let resp = tokio::time::timeout(fetch::CONNECT_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| other("no answer".into()))?
        .map_err(|e| other(e.to_string()))?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {}
        // Dropping the answer closes the connection: its body is not read.
        StatusCode::OK => return Ok(Got::Whole),
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{url}: byte {offset} is past the end"),
            ))
        }
        s if s.is_client_error() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{url}: {s}"),
            ))
        }
        s => return Err(other(s.to_string())),
    }
    if fetch::range_start(&resp) != Some(offset) {
        return Err(other(format!(
            "asked for byte {offset}, sent another range"
        )));
    }
    let want = usize::try_from(len).map_err(|_| other("range too large".into()))?;
    let mut out = Vec::with_capacity(want.min(cdc::FETCH_MAX as usize));
    let mut body = resp.into_body();
    while out.len() < want {
        let frame = tokio::time::timeout(fetch::STALL_TIMEOUT, body.frame())
            .await
            .map_err(|_| {
                other(format!(
                    "stalled at byte {}",
                    offset.saturating_add(out.len() as u64)
                ))
            })?;
        let Some(frame) = frame else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{url}: {} of {len} bytes at {offset}", out.len()),
            ));
        };
        if let Ok(data) = frame.map_err(|e| other(e.to_string()))?.into_data() {
            let take = data.len().min(want.saturating_sub(out.len()));
            out.extend_from_slice(&data[..take]);
        }
    }
    Ok(Got::Bytes(out))
}
