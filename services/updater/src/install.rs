//! Writing a bundle into the other slot: the blocking part of an install.
//!
//! In order, and nothing of a step happens before the one above it passed:
//! 1. the manifest's signature (the image's keys and keys a committed
//!    release introduced), board, version against the running release and
//!    the floors, and sizes against the slot's room ([`check`]);
//! 2. the other slot stops being a fallback (its tries go to 0 in the boot
//!    state), since its contents are about to be overwritten;
//! 3. each part streams into its place while being hashed: the kernel and
//!    initramfs as `Image-X` and `initrd-X` on the boot partition, the root
//!    filesystem onto the slot's partition; each is fsynced;
//! 4. when the bundle came from a channel, the whole file must be the one
//!    the signed index named (size and hash);
//! 5. every part is read back from the disk (the page cache dropped first)
//!    and checked against its signed hash.
//!
//! The switch of the boot state is the caller's, after this returns.
//! On any error the active slot and the boot state's choice of it are as
//! they were.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use cloudlet_bundle::{BundleError, Manifest, Part};
use cloudlet_proto::bootstate::{OnDisk, Slot};
use ed25519_dalek::VerifyingKey;
use semver::Version;

/// Where the other slot lives and what runs now.
#[derive(Debug, Clone)]
pub struct Target {
    /// The mounted boot partition (kernels, initramfs, boot state).
    pub boot_dir: PathBuf,
    /// The other slot's root partition (a block device; a file in tests).
    pub other_dev: PathBuf,
    pub running: Slot,
    /// The running slot's root partition, read (never written) for the
    /// chunks a delta update reuses; `None` reuses only the kernel and initramfs.
    pub active_dev: Option<PathBuf>,
}

impl Target {
    pub fn other(&self) -> Slot {
        self.running.other()
    }

    /// Where a part of the other slot goes.
    pub fn part_path(&self, part: &str) -> PathBuf {
        let slot = self.other();
        match part {
            "Image" => self.boot_dir.join(format!("Image-{slot}")),
            "initrd" => self.boot_dir.join(format!("initrd-{slot}")),
            _ => self.other_dev.clone(),
        }
    }
}

/// The release that runs, and what it allows.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: String,
    pub board: String,
    /// The image's own floor: no install below it, downgrade or not.
    pub floor: Option<String>,
}

/// What one install asks.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    pub allow_downgrade: bool,
    /// The whole file's size and BLAKE3, when a signed index named them.
    pub whole: Option<(u64, String)>,
    /// The floor kept on /data (the highest committed version).
    pub data_floor: Option<String>,
    /// The version a signed channel index named: a bundle of another is
    /// refused before a byte is written.
    pub expect_version: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The bundle is not acceptable: the slot is as it was or marked unbootable.
    #[error("{0}")]
    Refused(String),
    /// The box failed (a disk error): the other slot is marked unbootable.
    #[error("{0}")]
    Failed(String),
}

/// A write error of ours, told apart from the bundle's read errors.
#[derive(Debug)]
struct SlotWrite(std::io::Error, String);

impl std::fmt::Display for SlotWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing {}: {}", self.1, self.0)
    }
}

impl std::error::Error for SlotWrite {}

fn from_bundle(e: BundleError) -> InstallError {
    match e {
        BundleError::Io(io) => {
            if let Some(w) = io.get_ref().and_then(|r| r.downcast_ref::<SlotWrite>()) {
                return InstallError::Failed(w.to_string());
            }
            InstallError::Refused(format!("the bundle could not be read whole: {io}"))
        }
        BundleError::BadSignature => {
            InstallError::Refused("the bundle is not signed by a key this box trusts".into())
        }
        other => InstallError::Refused(other.to_string()),
    }
}

pub fn parse_version(v: &str) -> Result<Version, String> {
    Version::parse(v).map_err(|e| format!("version {v:?} is not a semantic version: {e}"))
}

/// Whether `a` is newer than `b` by semantic-version precedence (build
/// metadata, `+...`, does not count).
pub fn newer(a: &Version, b: &Version) -> bool {
    a.cmp_precedence(b) == std::cmp::Ordering::Greater
}

/// Step 1 without the signature (checked before): board, version, sizes.
pub fn check(m: &Manifest, t: &Target, rel: &Release, ask: &Ask) -> Result<(), String> {
    if m.board != rel.board {
        return Err(format!(
            "the bundle is for board {:?}, this box is {:?}",
            m.board, rel.board
        ));
    }
    if let Some(v) = &ask.expect_version {
        if *v != m.version {
            return Err(format!(
                "the bundle is version {}, the channel index names {v}",
                m.version
            ));
        }
    }
    let new = parse_version(&m.version)?;
    if let Some(f) = &rel.floor {
        let f = parse_version(f)?;
        if f.cmp_precedence(&new) == std::cmp::Ordering::Greater {
            return Err(format!(
                "version {} is below this release's floor {f}: never installed, downgrade or not",
                m.version
            ));
        }
    }
    if !ask.allow_downgrade {
        let running = parse_version(&rel.version)?;
        if !newer(&new, &running) {
            return Err(format!(
                "version {} is not newer than the running {} (the owner may allow a downgrade)",
                m.version, rel.version
            ));
        }
        if let Some(f) = &ask.data_floor {
            let f = parse_version(f)?;
            if !newer(&new, &f) {
                return Err(format!(
                    "version {} is not newer than {f}, which this box already committed \
                     (the owner may allow a downgrade)",
                    m.version
                ));
            }
        }
    }
    // Room: the root partition's size, and the boot partition's free space
    // plus what the other slot's files there hold now.
    let part = |name: &str| {
        m.parts
            .iter()
            .find(|p| p.name == name)
            .map_or(0, |p| p.size)
    };
    let dev_size = device_size(&t.other_dev)
        .map_err(|e| format!("the other slot {}: {e}", t.other_dev.display()))?;
    if part("rootfs.squashfs") > dev_size {
        return Err(format!(
            "the root filesystem is {} bytes, the slot holds {dev_size}",
            part("rootfs.squashfs")
        ));
    }
    let held: u64 = ["Image", "initrd"]
        .iter()
        .map(|n| std::fs::metadata(t.part_path(n)).map_or(0, |m| m.len()))
        .sum();
    let free = nix::sys::statvfs::statvfs(&t.boot_dir)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .map_err(|e| format!("the boot partition {}: {e}", t.boot_dir.display()))?;
    let need = part("Image").saturating_add(part("initrd"));
    if need > free.saturating_add(held) {
        return Err(format!(
            "the kernel and initramfs need {need} bytes, the boot partition has {} for them",
            free.saturating_add(held)
        ));
    }
    Ok(())
}

/// A block device's size, or a file's.
pub fn device_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = File::open(path)?;
    f.seek(std::io::SeekFrom::End(0))
}

/// Counts and reports bytes written to one part, fsyncs on flush.
pub struct PartWriter<'a> {
    file: File,
    name: String,
    done: u64,
    total: u64,
    reported: u64,
    progress: &'a dyn Fn(&str, u64, u64),
}

impl Write for PartWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self
            .file
            .write(b)
            .map_err(|e| std::io::Error::other(SlotWrite(e, self.name.clone())))?;
        self.done = self.done.saturating_add(n as u64);
        if self.done.saturating_sub(self.reported) >= 1 << 20 || self.done == self.total {
            self.reported = self.done;
            (self.progress)(&self.name, self.done, self.total);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file
            .sync_all()
            .map_err(|e| std::io::Error::other(SlotWrite(e, self.name.clone())))
    }
}

impl<'a> PartWriter<'a> {
    /// Opens where `part` of the other slot goes: the root partition
    /// (written over in place, never created or truncated), the kernel and
    /// initramfs files (sized to the part first, then written in place: the
    /// clusters they hold on the FAT stay theirs, so the allocation table,
    /// which the running slot's files share, changes only by the difference).
    pub fn open(
        t: &Target,
        part: &Part,
        progress: &'a dyn Fn(&str, u64, u64),
    ) -> std::io::Result<PartWriter<'a>> {
        let path = t.part_path(&part.name);
        let fail = |e| std::io::Error::other(SlotWrite(e, path.display().to_string()));
        let file = if part.name == "rootfs.squashfs" {
            File::options().write(true).open(&path).map_err(fail)?
        } else {
            let f = File::options()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(fail)?;
            f.set_len(part.size).map_err(fail)?;
            f
        };
        Ok(PartWriter {
            file,
            name: part.name.clone(),
            done: 0,
            total: part.size,
            reported: 0,
            progress,
        })
    }
}

/// Step 1 and 2 for a signed manifest: [`check`], then the other slot
/// stops being a fallback. For `cloudlet_bundle::verify_with`'s `accept`.
pub fn accept(m: &Manifest, t: &Target, rel: &Release, ask: &Ask) -> Result<(), BundleError> {
    check(m, t, rel, ask).map_err(BundleError::Refused)?;
    let other = t.other();
    OnDisk::new(&t.boot_dir)
        .update(|s| s.set_tries_left(other, 0))
        .map_err(|e| {
            BundleError::Io(std::io::Error::other(SlotWrite(e, "the boot state".into())))
        })?;
    Ok(())
}

/// Maps a bundle error to what an install answers (a write error of ours
/// is the box's failure; anything else is the bundle's).
pub fn bundle_error(e: BundleError) -> InstallError {
    from_bundle(e)
}

/// Hashes and counts what passes through.
struct Whole<R> {
    inner: R,
    hash: blake3::Hasher,
    n: u64,
}

impl<R: Read> Read for Whole<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(b)?;
        self.hash.update(&b[..n]);
        self.n = self.n.saturating_add(n as u64);
        Ok(n)
    }
}

/// Steps 1 to 5 (see the module). `progress(part, done, total)` is called
/// as bytes are written and read back.
pub fn install(
    t: &Target,
    rel: &Release,
    trusted: &[VerifyingKey],
    input: impl Read,
    ask: &Ask,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<Manifest, InstallError> {
    let mut input = Whole {
        inner: input,
        hash: blake3::Hasher::new(),
        n: 0,
    };
    let manifest = cloudlet_bundle::verify_with(
        &mut input,
        trusted,
        |m| accept(m, t, rel, ask),
        |part| PartWriter::open(t, part, progress),
    )
    .map_err(from_bundle)?;
    if let Some((size, hash)) = &ask.whole {
        // The tar's end blocks follow the last part.
        let rest = size.saturating_sub(input.n).saturating_add(1);
        std::io::copy(&mut (&mut input).take(rest), &mut std::io::sink()).map_err(|e| {
            InstallError::Refused(format!("the bundle could not be read whole: {e}"))
        })?;
        if input.n != *size || input.hash.finalize().to_hex().as_str() != hash {
            return Err(InstallError::Refused(format!(
                "the bundle is not the one the channel index names ({} bytes read, {size} expected, \
                 or another hash)",
                input.n
            )));
        }
    }
    for part in &manifest.parts {
        read_back(&t.part_path(&part.name), part, progress)?;
    }
    Ok(manifest)
}

/// Reads `part.size` bytes of `path` from the disk (not the page cache)
/// and compares their hash with the signed one.
pub fn read_back(
    path: &Path,
    part: &Part,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<(), InstallError> {
    let failed =
        |e: std::io::Error| InstallError::Failed(format!("reading back {}: {e}", path.display()));
    let f = File::open(path).map_err(failed)?;
    // Written and fsynced: drop the cached pages so the read comes from the disk.
    let _ = nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let mut h = blake3::Hasher::new();
    let mut r = f.take(part.size);
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    let name = format!("verify {}", part.name);
    loop {
        let k = r.read(&mut buf).map_err(failed)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n = n.saturating_add(k as u64);
        if n % (8 << 20) < k as u64 || n == part.size {
            progress(&name, n, part.size);
        }
    }
    if n != part.size || h.finalize().to_hex().as_str() != part.blake3 {
        return Err(InstallError::Failed(format!(
            "{} read back from {} does not match its signed hash: the disk did not keep what was written",
            part.name,
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_precedence_without_build_metadata() {
        let v = |s: &str| parse_version(s).unwrap();
        assert!(newer(&v("0.2.0"), &v("0.1.9")));
        assert!(!newer(&v("0.1.0+gabc"), &v("0.1.0+gdef")));
        assert!(newer(&v("0.1.0"), &v("0.1.0-rc.1")));
        assert!(parse_version("one").is_err());
    }
}
