//! `cloudlet flash IMAGE TARGET`: writes a Cloudlet image to a card (or a
//! file) and provisions it, so that no pairing window is needed for the
//! first device.
//!
//! 1. The image is checked: an MBR with the Cloudlet disk signature whose
//!    first partition is FAT32 with `boot.scr` on it. The FAT is checked
//!    here before [`fatfs`] reads it (fatfs trusts it: a cluster chain that
//!    loops would hang it, a root cluster of 0 panic it), and all of it
//!    before a byte of the target is written.
//! 2. The target is checked: a block device that nothing has mounted and
//!    that is large enough (and a yes from the person, unless `--yes`), or
//!    a regular file (made if it is not there, but never under /dev: a
//!    device path that is not there is a typo or a card not in). Unless
//!    `--no-provision`, this PC's key and boxes.json are read, and
//!    boxes.json saved, so that a config that cannot pin the box fails now.
//! 3. The image is copied, with a progress bar, and synced.
//! 4. Unless `--no-provision`: the box's identity (an ECDSA P-256 key and
//!    its self-signed CA certificate, exactly as a box makes it on first
//!    start) is made here, and written with this PC's device certificate
//!    to `cloudlet-provision/` on the boot partition; the box takes them on
//!    first boot (init moves them to /data/sharing/provision, the sharing
//!    service imports them). The identity's key is not kept on the PC.
//! 5. The box is pinned in boxes.json by its identity, with no address yet:
//!    `cloudlet devices --host HOST` or mDNS discovery supply it later.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use cloudlet_runtime::tls;

use crate::remote::{Config, PinnedBox};

/// The Cloudlet MBR disk signature ("CLOU"), as image/genimage.cfg.in sets it.
pub const DISK_SIGNATURE: u32 = 0x434c_4f55;
/// The directory on the boot partition that the box imports at first boot.
pub const PROVISION_DIR: &str = "cloudlet-provision";
const SECTOR: u64 = 512;
/// Copy block size.
const CHUNK: usize = 4 << 20;
/// On a block device, sync this often so the progress bar shows what the
/// card took, not what the page cache did.
const SYNC_EVERY: u64 = 64 << 20;
/// The largest FAT read whole to be checked. A Cloudlet boot partition
/// (128 MiB) has one of about 1 MiB.
const MAX_FAT_BYTES: u64 = 64 << 20;
/// How long [`fatfs`] may work on a checked FAT: well under a second on a
/// sound one. A backstop, should the checks miss a way to make it loop.
const FAT_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    /// a file or device could not be read or written
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// the image is not one `scripts/build-image` or Buildroot made
    #[error("{0} is not a Cloudlet image: {1}")]
    NotCloudlet(PathBuf, String),
    /// writing over a mounted filesystem would corrupt it and what uses it
    #[error("{target} is in use: mounted on {mounts}; unmount it first")]
    Mounted { target: PathBuf, mounts: String },
    /// the image does not fit
    #[error("{target} is too small: it holds {have} bytes, the image needs {need}")]
    TooSmall {
        target: PathBuf,
        have: u64,
        need: u64,
    },
    /// the target is the image
    #[error("{0} is the image itself")]
    SameFile(PathBuf),
    /// a directory, a character device, a socket...
    #[error("{0} is neither a block device nor a regular file")]
    NotATarget(PathBuf),
    /// a device path that is not there: a typo, or no card in the reader
    #[error("no such device {0}: is the card in?")]
    NoSuchDevice(PathBuf),
    /// the person did not say yes
    #[error("not confirmed: nothing was written to {0}")]
    NotConfirmed(PathBuf),
    /// making the box's identity failed
    #[error("making the box identity: {0}")]
    Identity(#[from] rcgen::Error),
    /// the boot partition of the written target could not be provisioned
    #[error("writing {PROVISION_DIR}/ to the boot partition of {path}: {source} (the image is written, but not provisioned)")]
    Provision {
        path: PathBuf,
        source: std::io::Error,
    },
    /// this device's key or boxes.json
    #[error("{0}")]
    Config(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FlashError + 'a {
    move |source| FlashError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What `cloudlet flash` was asked.
pub struct Options {
    pub image: PathBuf,
    pub target: PathBuf,
    /// What the box calls this PC (default: its host name).
    pub name: String,
    pub provision: bool,
    /// Do not ask before writing a block device.
    pub yes: bool,
}

/// Where the boot partition lies in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPartition {
    pub offset: u64,
    pub len: u64,
}

/// What was flashed.
#[derive(Debug)]
pub struct Flashed {
    pub bytes: u64,
    /// The box ID, when provisioned.
    pub box_id: Option<String>,
}

/// The boot partition an MBR names, if the MBR is a Cloudlet one: the
/// signature, and entry 1 a FAT32 partition (type 0x0B or 0x0C) inside
/// `image_len` bytes.
pub fn boot_partition(mbr: &[u8; 512], image_len: u64) -> Result<BootPartition, String> {
    if mbr[510..512] != [0x55, 0xAA] {
        return Err("it has no MBR".into());
    }
    let sig = u32::from_le_bytes([mbr[440], mbr[441], mbr[442], mbr[443]]);
    if sig != DISK_SIGNATURE {
        return Err(format!(
            "its MBR disk signature is {sig:#010x}, not Cloudlet's {DISK_SIGNATURE:#010x}"
        ));
    }
    let e = &mbr[446..462];
    if !matches!(e[4], 0x0B | 0x0C) {
        return Err(format!(
            "partition 1 has type {:#04x}, not FAT32 (0x0b or 0x0c)",
            e[4]
        ));
    }
    let start = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]]));
    let sectors = u64::from(u32::from_le_bytes([e[12], e[13], e[14], e[15]]));
    let part = BootPartition {
        offset: start * SECTOR,
        len: sectors * SECTOR,
    };
    if start == 0 || sectors == 0 || part.offset + part.len > image_len {
        return Err("partition 1 does not lie inside the image".into());
    }
    Ok(part)
}

/// One partition of a file or device, as a stream for [`fatfs`].
struct Slice {
    file: File,
    part: BootPartition,
    pos: u64,
}

impl Slice {
    fn new(file: File, part: BootPartition) -> Self {
        Slice { file, part, pos: 0 }
    }

    /// How many of `want` bytes lie before the partition's end.
    fn room(&self, want: usize) -> usize {
        let left = self.part.len.saturating_sub(self.pos);
        want.min(usize::try_from(left).unwrap_or(usize::MAX))
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.room(buf.len());
        let n = self
            .file
            .read_at(&mut buf[..n], self.part.offset + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Slice {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "past the end of the boot partition",
            ));
        }
        let n = self.file.write_at(&buf[..n], self.part.offset + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.part.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match pos {
            Some(p) if p <= self.part.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek outside the boot partition",
            )),
        }
    }
}

/// What of a FAT32 boot sector the checks need, once it is known sound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fat32 {
    /// Where, in the partition, the FAT that fatfs reads begins.
    pub fat_offset: u64,
    /// Data clusters: cluster numbers run from 2 to `clusters + 1`.
    pub clusters: u32,
    /// The root directory's first cluster.
    pub root_cluster: u32,
}

/// The FAT32 layout the boot sector `bs` of a partition of `part_len`
/// bytes describes, checked so that nothing computed from it overflows or
/// points outside the partition (fatfs computes with it unchecked).
pub fn fat32_layout(bs: &[u8; 512], part_len: u64) -> Result<Fat32, String> {
    let u16_at = |i: usize| u64::from(u16::from_le_bytes([bs[i], bs[i + 1]]));
    let u32_at = |i: usize| u64::from(u32::from_le_bytes([bs[i], bs[i + 1], bs[i + 2], bs[i + 3]]));
    let no = |why: String| format!("partition 1 holds no FAT filesystem ({why})");
    if bs[510..512] != [0x55, 0xAA] {
        return Err(no("no boot sector signature".into()));
    }
    let bytes_per_sector = u16_at(11);
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
        return Err(no(format!("{bytes_per_sector} bytes per sector")));
    }
    let per_cluster = u64::from(bs[13]);
    if !per_cluster.is_power_of_two() || per_cluster > 128 {
        return Err(no(format!("{per_cluster} sectors per cluster")));
    }
    let reserved = u16_at(14);
    if reserved == 0 {
        return Err(no("no reserved sectors".into()));
    }
    let fats = u64::from(bs[16]);
    if !(1..=2).contains(&fats) {
        return Err(no(format!("{fats} FATs")));
    }
    if u16_at(17) != 0 || u16_at(19) != 0 || u16_at(22) != 0 {
        return Err(no("it is not FAT32".into()));
    }
    let total = u32_at(32);
    let fat_sectors = u32_at(36);
    let fat_bytes = fat_sectors * bytes_per_sector;
    if fat_sectors == 0 || fat_bytes > MAX_FAT_BYTES {
        return Err(no(format!("a FAT of {fat_bytes} bytes")));
    }
    if u16_at(42) != 0 {
        return Err(no(format!("FAT32 version {:#06x}", u16_at(42))));
    }
    // All of these are below 2^48: no overflow.
    if total * bytes_per_sector > part_len {
        return Err(no(format!(
            "a volume of {} bytes in a partition of {part_len}",
            total * bytes_per_sector
        )));
    }
    let first_data = reserved + fats * fat_sectors;
    if total <= first_data {
        return Err(no("no room for data after its FATs".into()));
    }
    let clusters = (total - first_data) / per_cluster;
    if !(65525..=0x0FFF_FFF4).contains(&clusters) {
        return Err(no(format!("{clusters} clusters is not FAT32")));
    }
    if fat_bytes / 4 < clusters + 2 {
        return Err(no(format!(
            "a FAT of {} entries for {clusters} clusters",
            fat_bytes / 4
        )));
    }
    // With mirroring off (bit 7), fatfs reads the FAT bits 0-3 name.
    let flags = u16_at(40);
    let active = if flags & 0x80 == 0 { 0 } else { flags & 0x0F };
    if active >= fats {
        return Err(no(format!("active FAT {active} of {fats}")));
    }
    let root = u32_at(44);
    if root < 2 || root >= clusters + 2 {
        return Err(format!(
            "its FAT is damaged: the root directory starts at cluster {root}, outside 2..={}",
            clusters + 1
        ));
    }
    // clusters <= 0x0FFF_FFF4 and root below it: both fit.
    Ok(Fat32 {
        fat_offset: (reserved + active * fat_sectors) * bytes_per_sector,
        clusters: clusters as u32,
        root_cluster: root as u32,
    })
}

/// What a FAT32 entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Free,
    Next(u32),
    End,
    Bad,
}

/// Checks `fat` (the entries of `layout`, 4 bytes each): the root
/// directory's chain ends, within the volume, and so does every chain in
/// the FAT, without looping and without a link to a free cluster, so that
/// whatever fatfs follows ends. Linear in the number of clusters.
pub fn check_chains(fat: &[u8], layout: Fat32) -> Result<(), String> {
    let damaged = |why: String| format!("its FAT is damaged: {why}");
    let end = u64::from(layout.clusters) + 2;
    let entry = |c: u32| -> Entry {
        let i = c as usize * 4;
        let raw = fat
            .get(i..i + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match raw & 0x0FFF_FFFF {
            0 => Entry::Free,
            0x0FFF_FFF7 => Entry::Bad,
            0x0FFF_FFF8.. => Entry::End,
            n => Entry::Next(n),
        }
    };
    let in_range = |n: u32| (2..end).contains(&u64::from(n));
    // The root directory first, to say so when it is the one.
    let mut c = layout.root_cluster;
    let mut steps = 0u64;
    loop {
        match entry(c) {
            Entry::End => break,
            Entry::Free | Entry::Bad if c == layout.root_cluster => {
                return Err(damaged(format!(
                    "the root directory starts at cluster {c}, which is not in use"
                )))
            }
            Entry::Free | Entry::Bad => {
                return Err(damaged(format!(
                    "the root directory's chain reaches cluster {c}, which is free or bad"
                )))
            }
            Entry::Next(n) if !in_range(n) => {
                return Err(damaged(format!(
                    "the root directory's chain links cluster {c} to {n}, outside the volume"
                )))
            }
            Entry::Next(n) => c = n,
        }
        steps += 1;
        if steps > u64::from(layout.clusters) {
            return Err(damaged("the root directory's cluster chain loops".into()));
        }
    }
    // Then every chain: 0 not seen, 1 on the path being followed, 2 ends.
    let mut state = vec![0u8; end as usize];
    let mut path = Vec::new();
    for first in 2..end as u32 {
        let mut c = first;
        loop {
            match state[c as usize] {
                2 => break,
                1 => return Err(damaged(format!("the cluster chain through {c} loops"))),
                _ => {}
            }
            state[c as usize] = 1;
            path.push(c);
            match entry(c) {
                Entry::Next(n) if !in_range(n) => {
                    return Err(damaged(format!(
                        "cluster {c} links to {n}, outside the volume"
                    )))
                }
                Entry::Next(n) if entry(n) == Entry::Free => {
                    return Err(damaged(format!("cluster {c} links to free cluster {n}")))
                }
                Entry::Next(n) => c = n,
                Entry::Free | Entry::End | Entry::Bad => break,
            }
        }
        for c in path.drain(..) {
            state[c as usize] = 2;
        }
    }
    Ok(())
}

/// Checks the FAT32 filesystem on partition `part` of `file` as far as
/// fatfs needs it to be sound; the reason it is not a Cloudlet image if not.
pub fn check_fat(file: &File, part: BootPartition) -> Result<(), String> {
    let mut bs = [0u8; 512];
    file.read_exact_at(&mut bs, part.offset)
        .map_err(|e| format!("its boot partition cannot be read ({e})"))?;
    let layout = fat32_layout(&bs, part.len)?;
    let mut fat = vec![0u8; (u64::from(layout.clusters) + 2) as usize * 4];
    file.read_exact_at(&mut fat, part.offset + layout.fat_offset)
        .map_err(|e| format!("its FAT cannot be read ({e})"))?;
    check_chains(&fat, layout)
}

/// Runs `work` (fatfs on a checked FAT) on a thread of its own and waits
/// at most `deadline` for it: should a damaged FAT still make fatfs loop
/// or panic, `cloudlet flash` fails with that instead of hanging (the
/// thread is left behind; the command ends soon after).
fn bounded<T: Send + 'static>(
    deadline: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("fatfs".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    match rx.recv_timeout(deadline) {
        Ok(t) => Ok(t),
        Err(RecvTimeoutError::Timeout) => Err(format!(
            "reading its FAT filesystem took over {}s; it is damaged",
            deadline.as_secs_f32()
        )),
        Err(RecvTimeoutError::Disconnected) => {
            Err("its FAT filesystem is damaged (reading it failed)".into())
        }
    }
}

/// Checks that `image` is a Cloudlet image; returns its size and boot partition.
pub fn check_image(image: &Path) -> Result<(u64, BootPartition), FlashError> {
    let f = File::open(image).map_err(io("opening", image))?;
    let len = f.metadata().map_err(io("reading", image))?.len();
    let not = |why: String| FlashError::NotCloudlet(image.to_owned(), why);
    let mut mbr = [0u8; 512];
    f.read_exact_at(&mut mbr, 0)
        .map_err(|_| not("it is shorter than an MBR".into()))?;
    let part = boot_partition(&mbr, len).map_err(not)?;
    check_fat(&f, part).map_err(not)?;
    let has_script = bounded(FAT_DEADLINE, move || {
        let fs = fatfs::FileSystem::new(Slice::new(f, part), fatfs::FsOptions::new())
            .map_err(|e| format!("partition 1 holds no FAT filesystem ({e})"))?;
        let found = fs.root_dir().open_file("boot.scr").is_ok();
        Ok::<_, String>(found)
    })
    .and_then(|r| r)
    .map_err(not)?;
    if !has_script {
        return Err(not("its boot partition has no boot.scr".into()));
    }
    Ok((len, part))
}

/// The mount points in `mountinfo` (/proc/self/mountinfo's text) of the
/// device `dev` or of its partitions; `parent` names the whole disk a
/// partition belongs to (from sysfs).
pub fn mounts_of(
    mountinfo: &str,
    dev: (u64, u64),
    parent: impl Fn((u64, u64)) -> Option<(u64, u64)>,
) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let numbers = f.nth(2)?;
            let point = f.nth(1)?;
            let (maj, min) = numbers.split_once(':')?;
            let d = (maj.parse().ok()?, min.parse().ok()?);
            (d == dev || parent(d) == Some(dev)).then(|| point.replace("\\040", " "))
        })
        .collect()
}

/// The whole disk a partition `(major, minor)` belongs to, from sysfs.
fn sysfs_parent(d: (u64, u64)) -> Option<(u64, u64)> {
    let part = PathBuf::from(format!("/sys/dev/block/{}:{}", d.0, d.1));
    if !part.join("partition").exists() {
        return None;
    }
    let text = std::fs::read_to_string(part.canonicalize().ok()?.parent()?.join("dev")).ok()?;
    let (maj, min) = text.trim().split_once(':')?;
    Some((maj.parse().ok()?, min.parse().ok()?))
}

/// Whether `target` may be written: not the image, a regular file or a
/// block device, and a block device unmounted and large enough. Returns
/// whether it is a block device, and its size if so.
fn check_target(target: &Path, image: &Path, need: u64) -> Result<Option<u64>, FlashError> {
    let meta = match std::fs::metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            check_new_file(target)?;
            return Ok(None);
        }
        Err(e) => return Err(io("reading", target)(e)),
    };
    let im = std::fs::metadata(image).map_err(io("reading", image))?;
    if meta.dev() == im.dev() && meta.ino() == im.ino() {
        return Err(FlashError::SameFile(target.to_owned()));
    }
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(None);
    }
    if !ft.is_block_device() {
        return Err(FlashError::NotATarget(target.to_owned()));
    }
    let rdev = meta.rdev();
    let dev = (
        u64::from(nix::sys::stat::major(rdev) as u32),
        u64::from(nix::sys::stat::minor(rdev) as u32),
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading", Path::new("/proc/self/mountinfo")))?;
    let mounts = mounts_of(&info, dev, sysfs_parent);
    if !mounts.is_empty() {
        return Err(FlashError::Mounted {
            target: target.to_owned(),
            mounts: mounts.join(", "),
        });
    }
    let have = File::open(target)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(io("reading the size of", target))?;
    check_size(target, have, need)?;
    Ok(Some(have))
}

/// A target that is not there is made, as an image file, except under
/// /dev: there it is a mistyped device or a card not in the reader, and
/// the image would fill /dev's tmpfs (RAM) instead.
pub fn check_new_file(target: &Path) -> Result<(), FlashError> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The directory it would be made in, symlinks and `..` resolved (a
    // relative name typed in /dev, /tmp/x/../../dev/sdc).
    let dir = std::fs::canonicalize(parent)
        .or_else(|_| std::path::absolute(parent))
        .unwrap_or_else(|_| parent.to_owned());
    if dir.starts_with("/dev") || target.starts_with("/dev") {
        return Err(FlashError::NoSuchDevice(target.to_owned()));
    }
    Ok(())
}

/// A device of `have` bytes holds an image of `need` bytes.
pub fn check_size(target: &Path, have: u64, need: u64) -> Result<(), FlashError> {
    if have < need {
        return Err(FlashError::TooSmall {
            target: target.to_owned(),
            have,
            need,
        });
    }
    Ok(())
}

/// Asks on the terminal before a block device is overwritten.
fn confirm(target: &Path, size: u64) -> bool {
    let model = target
        .file_name()
        .map(|n| format!("/sys/class/block/{}/device/model", n.to_string_lossy()))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|m| format!(", {}", m.trim()))
        .unwrap_or_default();
    eprint!(
        "This erases everything on {} ({:.1} GB{model}). Type yes to go on: ",
        target.display(),
        size as f64 / 1e9
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).is_ok() && answer.trim() == "yes"
}

/// Copies `len` bytes of `image` to `target`, with a progress bar, and syncs.
fn copy(image: &Path, target: &Path, len: u64, block: bool) -> Result<(), FlashError> {
    let mut src = File::open(image).map_err(io("opening", image))?;
    let mut dst = File::options()
        .write(true)
        .create(!block)
        .truncate(!block)
        .open(target)
        .map_err(io("opening", target))?;
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    let mut synced = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(io("reading", image))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(io("writing", target))?;
        done += n as u64;
        if block && done - synced >= SYNC_EVERY {
            dst.sync_data().map_err(io("syncing", target))?;
            synced = done;
        }
        bar.set_position(done);
    }
    dst.sync_all().map_err(io("syncing", target))?;
    bar.finish_and_clear();
    if done != len {
        return Err(io("reading", image)(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("it changed while it was copied ({done} of {len} bytes)"),
        )));
    }
    Ok(())
}

/// The files of `cloudlet-provision/`, by name.
pub fn provision_files(
    identity: &tls::IdentityKeys,
    owner_cert: &[u8],
    owner_name: &str,
) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "identity.key",
            tls::pem("PRIVATE KEY", &identity.key.serialize_der()).into_bytes(),
        ),
        (
            "identity.crt",
            tls::pem("CERTIFICATE", &identity.cert_der).into_bytes(),
        ),
        (
            "owner.crt",
            tls::pem("CERTIFICATE", owner_cert).into_bytes(),
        ),
        ("owner.name", format!("{owner_name}\n").into_bytes()),
    ]
}

/// Writes `files` into `cloudlet-provision/` on the boot partition of
/// `target`, replacing what a directory of that name held, and syncs.
fn write_provision(
    target: &Path,
    part: BootPartition,
    files: &[(&str, Vec<u8>)],
) -> Result<(), FlashError> {
    let err = |source| FlashError::Provision {
        path: target.to_owned(),
        source,
    };
    let f = File::options()
        .read(true)
        .write(true)
        .open(target)
        .map_err(io("opening", target))?;
    // What was written is what was checked, unless the image changed
    // while it was copied: checked again, as fatfs is about to use it.
    check_fat(&f, part).map_err(|why| err(std::io::Error::other(why)))?;
    let fs_file = f.try_clone().map_err(io("opening", target))?;
    let files: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(n, b)| ((*n).to_owned(), b.clone()))
        .collect();
    bounded(FAT_DEADLINE, move || -> std::io::Result<()> {
        let fs = fatfs::FileSystem::new(Slice::new(fs_file, part), fatfs::FsOptions::new())?;
        {
            let dir = fs.root_dir().create_dir(PROVISION_DIR)?;
            for e in dir.iter() {
                let name = e?.file_name();
                if name != "." && name != ".." {
                    dir.remove(&name)?;
                }
            }
            for (name, bytes) in &files {
                let mut file = dir.create_file(name)?;
                file.truncate()?;
                file.write_all(bytes)?;
                file.flush()?;
            }
        }
        fs.unmount()
    })
    .map_err(|why| err(std::io::Error::new(std::io::ErrorKind::TimedOut, why)))?
    .map_err(err)?;
    f.sync_all().map_err(io("syncing", target))
}

/// The configuration `cloudlet flash` pins the box in. Writing a card
/// usually needs root: under sudo (no `$CLOUDLET_CONFIG_DIR`, `$SUDO_USER`
/// set) that is the invoking user's configuration, not root's, since the
/// box is theirs; [`give_back`] then hands them what was written.
pub fn config() -> Result<(Config, Option<nix::unistd::User>), String> {
    let sudo_user = std::env::var("SUDO_USER").ok().filter(|_| {
        std::env::var_os("CLOUDLET_CONFIG_DIR").is_none() && nix::unistd::geteuid().is_root()
    });
    if let Some(name) = sudo_user {
        if let Ok(Some(u)) = nix::unistd::User::from_name(&name) {
            if !u.uid.is_root() {
                let config_home = u.dir.join(".config");
                let fresh = !config_home.exists();
                let cfg = Config::at(config_home.join("cloudlet"))?;
                let own = |p: &Path| nix::unistd::chown(p, Some(u.uid), Some(u.gid));
                if fresh {
                    own(&config_home).map_err(|e| format!("{}: {e}", config_home.display()))?;
                }
                own(cfg.dir()).map_err(|e| format!("{}: {e}", cfg.dir().display()))?;
                return Ok((cfg, Some(u)));
            }
        }
    }
    Ok((Config::open()?, None))
}

/// Gives the files of `cfg` to `user` (after a flash under sudo).
pub fn give_back(cfg: &Config, user: &nix::unistd::User) -> Result<(), String> {
    for name in ["device.key", "device.crt", "boxes.json"] {
        let p = cfg.dir().join(name);
        if p.exists() {
            nix::unistd::chown(&p, Some(user.uid), Some(user.gid))
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    Ok(())
}

/// Runs `cloudlet flash`: see the module's documentation.
pub fn flash(opts: &Options, cfg: &Config) -> Result<Flashed, FlashError> {
    let (len, part) = check_image(&opts.image)?;
    let block_size = check_target(&opts.target, &opts.image, len)?;
    if let Some(size) = block_size {
        if !opts.yes && !confirm(&opts.target, size) {
            return Err(FlashError::NotConfirmed(opts.target.clone()));
        }
    }
    // Made before a byte is written: a PC without a usable config directory
    // (no key, a boxes.json it cannot read, or cannot write) fails here, not
    // after the card was erased and holds a box nobody pinned.
    let owner = if opts.provision {
        let owner = cfg.device().map_err(FlashError::Config)?.0;
        let boxes = cfg.boxes().map_err(FlashError::Config)?;
        cfg.save_boxes(&boxes).map_err(FlashError::Config)?;
        Some((owner, boxes))
    } else {
        None
    };
    copy(&opts.image, &opts.target, len, block_size.is_some())?;
    let Some((owner, boxes_before)) = owner else {
        return Ok(Flashed {
            bytes: len,
            box_id: None,
        });
    };
    let identity = tls::IdentityKeys::generate()?;
    write_provision(
        &opts.target,
        part,
        &provision_files(&identity, owner.as_ref(), &opts.name),
    )?;
    // Read again: another `cloudlet` may have changed it while the card
    // was written (and if it broke it meanwhile, what was read stands).
    let mut boxes = cfg.boxes().unwrap_or(boxes_before);
    boxes.insert(
        identity.box_id.clone(),
        PinnedBox {
            addr: String::new(),
            identity: base64::engine::general_purpose::STANDARD.encode(&identity.cert_der),
            key: identity.key_hash.clone(),
            device: String::new(),
            role: "owner".into(),
        },
    );
    cfg.save_boxes(&boxes).map_err(FlashError::Config)?;
    Ok(Flashed {
        bytes: len,
        box_id: Some(identity.box_id),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cloudlet_testkit::image;

    fn test_image(dir: &Path) -> PathBuf {
        let p = dir.join("cloudlet.img");
        image::cloudlet_image(&p, &[("boot.scr", b"script")], &[7u8; 4096]).unwrap();
        p
    }

    fn opts(image: &Path, target: &Path, provision: bool) -> Options {
        Options {
            image: image.to_owned(),
            target: target.to_owned(),
            name: "laptop".into(),
            provision,
            yes: false,
        }
    }

    #[test]
    fn flashing_a_file_writes_the_image_and_a_provision_dir_that_names_the_pinned_box() {
        let d = tempfile::tempdir().unwrap();
        let img = test_image(d.path());
        let target = d.path().join("card.img");
        let cfg = Config::at(d.path().join("config")).unwrap();
        let done = flash(&opts(&img, &target, true), &cfg).unwrap();
        let box_id = done.box_id.unwrap();

        // Outside the boot partition, the bytes are the image's.
        let (a, b) = (
            std::fs::read(&img).unwrap(),
            std::fs::read(&target).unwrap(),
        );
        assert_eq!(a.len(), b.len());
        let boot_end = (image::BOOT_START + image::BOOT_SIZE) as usize;
        assert_eq!(
            a[..image::BOOT_START as usize],
            b[..image::BOOT_START as usize]
        );
        assert_eq!(a[boot_end..], b[boot_end..]);

        let names = image::list_boot_dir(&target, PROVISION_DIR)
            .unwrap()
            .unwrap();
        assert_eq!(
            names,
            ["identity.crt", "identity.key", "owner.crt", "owner.name"]
        );
        let read = |n: &str| {
            String::from_utf8(
                image::read_boot_file(&target, &format!("{PROVISION_DIR}/{n}"))
                    .unwrap()
                    .unwrap(),
            )
            .unwrap()
        };
        let key = tls::from_pem("PRIVATE KEY", &read("identity.key")).unwrap();
        let crt = tls::from_pem("CERTIFICATE", &read("identity.crt")).unwrap();
        let id = tls::IdentityKeys::from_pkcs8(&key).unwrap();
        assert_eq!(id.box_id, box_id);
        assert_eq!(tls::spki_of(&crt.clone().into()).unwrap(), id.spki());
        let owner = tls::from_pem("CERTIFICATE", &read("owner.crt")).unwrap();
        assert_eq!(owner, cfg.device().unwrap().0.as_ref());
        assert_eq!(read("owner.name"), "laptop\n");
        // The original boot files are still there.
        assert_eq!(
            image::read_boot_file(&target, "boot.scr").unwrap().unwrap(),
            b"script"
        );

        let (pinned_id, pinned) = cfg.pinned(None).unwrap();
        assert_eq!(pinned_id, box_id);
        assert_eq!(pinned.key, id.key_hash);
        assert_eq!(pinned.addr, "");
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&pinned.identity)
                .unwrap(),
            crt
        );
        // The image itself is untouched.
        assert_eq!(image::list_boot_dir(&img, PROVISION_DIR).unwrap(), None);

        // Flashing again replaces the directory: a new box, two pins.
        let again = flash(&opts(&img, &target, true), &cfg).unwrap();
        assert_ne!(again.box_id.unwrap(), box_id);
        assert_eq!(cfg.boxes().unwrap().len(), 2);
        assert_eq!(
            image::list_boot_dir(&target, PROVISION_DIR)
                .unwrap()
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn no_provision_copies_the_image_byte_for_byte_and_pins_nothing() {
        let d = tempfile::tempdir().unwrap();
        let img = test_image(d.path());
        let target = d.path().join("card.img");
        std::fs::write(&target, vec![1u8; 100 << 20]).unwrap();
        let cfg = Config::at(d.path().join("config")).unwrap();
        let done = flash(&opts(&img, &target, false), &cfg).unwrap();
        assert_eq!(done.box_id, None);
        assert_eq!(
            std::fs::read(&img).unwrap(),
            std::fs::read(&target).unwrap()
        );
        assert!(cfg.boxes().unwrap().is_empty());
    }

    #[test]
    fn images_that_are_not_cloudlet_ones_are_refused_and_nothing_is_written() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config::at(d.path().join("config")).unwrap();
        let target = d.path().join("card.img");
        let refused = |img: &Path, why: &str| {
            let e = flash(&opts(img, &target, true), &cfg).unwrap_err();
            assert!(
                matches!(&e, FlashError::NotCloudlet(_, w) if w.contains(why)),
                "{e}"
            );
            assert!(!target.exists());
        };
        let good = test_image(d.path());
        let bytes = std::fs::read(&good).unwrap();

        let p = d.path().join("random.img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        refused(&p, "no MBR");

        let mut other = bytes.clone();
        other[440..444].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        std::fs::write(&p, &other).unwrap();
        refused(&p, "disk signature is 0x12345678");

        let mut linux = bytes.clone();
        linux[446 + 4] = 0x83;
        std::fs::write(&p, &linux).unwrap();
        refused(&p, "type 0x83");

        let mut no_fat = bytes.clone();
        let at = image::BOOT_START as usize;
        no_fat[at..at + 4096].fill(0);
        std::fs::write(&p, &no_fat).unwrap();
        refused(&p, "no FAT filesystem");

        std::fs::write(&p, &bytes[..(image::BOOT_START as usize + 4096)]).unwrap();
        refused(&p, "does not lie inside the image");

        let q = d.path().join("no-script.img");
        image::cloudlet_image(&q, &[("other", b"x")], &[]).unwrap();
        refused(&q, "no boot.scr");

        // And the image is not its own target.
        assert!(matches!(
            flash(&opts(&good, &good, true), &cfg),
            Err(FlashError::SameFile(_))
        ));
        assert_eq!(std::fs::read(&good).unwrap(), bytes);
        assert!(cfg.boxes().unwrap().is_empty());
    }

    #[test]
    fn mounted_devices_and_their_partitions_are_found_in_mountinfo() {
        let info = "\
22 1 8:17 / / rw,relatime shared:1 - ext4 /dev/sdb1 rw
23 22 8:0 / /home rw shared:2 - ext4 /dev/sda rw
24 22 179:1 / /media/my\\040card rw shared:3 - vfat /dev/mmcblk0p1 rw
25 22 0:5 / /proc rw shared:4 - proc proc rw
";
        let parent = |d: (u64, u64)| match d {
            (8, 17) => Some((8, 16)),
            (179, 1) => Some((179, 0)),
            _ => None,
        };
        assert_eq!(mounts_of(info, (8, 16), parent), ["/"]);
        assert_eq!(mounts_of(info, (8, 0), parent), ["/home"]);
        assert_eq!(mounts_of(info, (179, 0), parent), ["/media/my card"]);
        assert!(mounts_of(info, (8, 32), parent).is_empty());
    }

    #[test]
    fn a_config_that_cannot_pin_the_box_is_refused_before_the_card_is_written() {
        let d = tempfile::tempdir().unwrap();
        let img = test_image(d.path());
        let target = d.path().join("card.img");
        let cfg = Config::at(d.path().join("config")).unwrap();
        let boxes = cfg.dir().join("boxes.json");
        // Unreadable.
        std::fs::write(&boxes, "{ not json").unwrap();
        let e = flash(&opts(&img, &target, true), &cfg).unwrap_err();
        assert!(
            matches!(&e, FlashError::Config(w) if w.contains("boxes.json")),
            "{e}"
        );
        assert!(!target.exists(), "nothing was written");
        // Readable, but it cannot be saved (its temporary name is taken by
        // a directory: root writes anywhere, so no chmod would do).
        std::fs::remove_file(&boxes).unwrap();
        std::fs::create_dir(cfg.dir().join("boxes.tmp")).unwrap();
        let e = flash(&opts(&img, &target, true), &cfg).unwrap_err();
        assert!(matches!(&e, FlashError::Config(_)), "{e}");
        assert!(!target.exists(), "nothing was written");
        // Mended, the same flash pins the box.
        std::fs::remove_dir(cfg.dir().join("boxes.tmp")).unwrap();
        let done = flash(&opts(&img, &target, true), &cfg).unwrap();
        assert!(cfg.boxes().unwrap().contains_key(&done.box_id.unwrap()));
    }

    #[test]
    fn a_device_path_that_is_not_there_is_not_made_but_a_file_elsewhere_is() {
        for t in [
            "/dev/sdc",
            "/dev/disk/by-id/usb-card",
            "/dev/../dev/mmcblk0",
        ] {
            let e = check_new_file(Path::new(t)).unwrap_err();
            assert!(matches!(&e, FlashError::NoSuchDevice(_)), "{t}: {e}");
            assert_eq!(
                e.to_string(),
                format!("no such device {t}: is the card in?")
            );
        }
        let d = tempfile::tempdir().unwrap();
        check_new_file(&d.path().join("card.img")).unwrap();
        check_new_file(&d.path().join("dev/sdc")).unwrap();
        check_new_file(Path::new("card.img")).unwrap();
        // Through a symlink to /dev, or named from inside it.
        std::os::unix::fs::symlink("/dev", d.path().join("devices")).unwrap();
        assert!(matches!(
            check_new_file(&d.path().join("devices/sdc")),
            Err(FlashError::NoSuchDevice(_))
        ));
        // And flash says so before anything else.
        let img = test_image(d.path());
        let cfg = Config::at(d.path().join("config")).unwrap();
        let e = flash(&opts(&img, &d.path().join("devices/sdc"), true), &cfg).unwrap_err();
        assert!(matches!(&e, FlashError::NoSuchDevice(_)), "{e}");
        assert!(cfg.boxes().unwrap().is_empty());
    }

    #[test]
    fn a_device_smaller_than_the_image_is_refused() {
        let t = Path::new("/dev/sdz");
        assert!(matches!(
            check_size(t, 100, 101),
            Err(FlashError::TooSmall {
                have: 100,
                need: 101,
                ..
            })
        ));
        check_size(t, 101, 101).unwrap();
    }

    /// Damaged boot partitions of an image whose root holds `boot.scr`:
    /// each is refused, quickly, before anything is written to a target
    /// that is already there.
    #[test]
    fn a_damaged_fat_is_refused_quickly_before_anything_is_written() {
        let d = tempfile::tempdir().unwrap();
        let cfg = Config::at(d.path().join("config")).unwrap();
        let good = test_image(d.path());
        let (_, clusters) = image::fat32_layout(&good).unwrap();
        let root = {
            let mut bs = [0u8; 4];
            File::open(&good)
                .unwrap()
                .read_exact_at(&mut bs, image::BOOT_START + image::ROOT_CLUSTER_AT)
                .unwrap();
            u32::from_le_bytes(bs)
        };
        let target = d.path().join("card.img");
        let before = vec![9u8; 1 << 20];
        let img = d.path().join("damaged.img");
        let damaged = |damage: &dyn Fn(&Path), why: &str| {
            std::fs::copy(&good, &img).unwrap();
            damage(&img);
            std::fs::write(&target, &before).unwrap();
            let t = std::time::Instant::now();
            let e = match flash(&opts(&img, &target, true), &cfg) {
                Err(e) => e,
                Ok(_) => panic!("{why}: flashed"),
            };
            assert!(t.elapsed() < Duration::from_secs(10), "{why}: slow");
            assert!(
                matches!(&e, FlashError::NotCloudlet(_, w) if w.contains(why)),
                "{why}: {e}"
            );
            assert_eq!(std::fs::read(&target).unwrap(), before, "{why}");
        };
        let root_at = |c: u32| {
            move |p: &Path| {
                image::patch_boot_sector(p, image::ROOT_CLUSTER_AT, &c.to_le_bytes()).unwrap()
            }
        };

        damaged(
            &|p| image::set_fat_entry(p, root, root).unwrap(),
            "FAT is damaged: the root directory's cluster chain loops",
        );
        // A longer loop, through a cluster of its own.
        damaged(
            &|p| {
                image::set_fat_entry(p, root, clusters).unwrap();
                image::set_fat_entry(p, clusters, root).unwrap();
            },
            "the root directory's cluster chain loops",
        );
        damaged(&root_at(0), "root directory starts at cluster 0, outside");
        damaged(&root_at(1), "root directory starts at cluster 1, outside");
        damaged(
            &root_at(clusters + 2),
            &format!("root directory starts at cluster {}, outside", clusters + 2),
        );
        damaged(&root_at(u32::MAX), "outside");
        damaged(
            &|p| image::set_fat_entry(p, root, clusters + 2).unwrap(),
            &format!(
                "links cluster {root} to {}, outside the volume",
                clusters + 2
            ),
        );
        damaged(
            &|p| image::set_fat_entry(p, root, clusters).unwrap(),
            "which is free or bad",
        );
        damaged(&root_at(clusters), "which is not in use");
        // A loop elsewhere: fatfs could meet it when it frees a chain.
        damaged(
            &|p| {
                image::set_fat_entry(p, clusters - 1, clusters).unwrap();
                image::set_fat_entry(p, clusters, clusters - 1).unwrap();
            },
            "loops",
        );
        // The geometry itself, which fatfs computes with unchecked.
        let patch = |at: u64, bytes: &'static [u8]| {
            move |p: &Path| image::patch_boot_sector(p, at, bytes).unwrap()
        };
        damaged(&patch(11, &[0, 0]), "0 bytes per sector");
        damaged(&patch(13, &[3]), "3 sectors per cluster");
        damaged(&patch(14, &[0, 0]), "no reserved sectors");
        damaged(&patch(16, &[0]), "0 FATs");
        damaged(&patch(16, &[3]), "3 FATs");
        damaged(&patch(36, &[0, 0, 0, 0]), "a FAT of 0 bytes");
        damaged(&patch(36, &[0xff, 0xff, 0xff, 0xff]), "a FAT of");
        damaged(&patch(32, &[0xff, 0xff, 0xff, 0x00]), "a volume of");
        damaged(&patch(40, &[0x82, 0]), "active FAT 2 of 2");
        damaged(&patch(510, &[0, 0]), "no boot sector signature");
        assert!(cfg.boxes().unwrap().is_empty());
    }

    #[test]
    fn fatfs_work_that_does_not_end_fails_at_the_deadline() {
        let t = std::time::Instant::now();
        let e = bounded(Duration::from_millis(100), || {
            std::thread::sleep(Duration::from_secs(30))
        })
        .unwrap_err();
        assert!(e.contains("took over 0.1s; it is damaged"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        #[allow(unreachable_code)]
        let e = bounded(Duration::from_secs(5), || -> () {
            panic!("as fatfs might")
        })
        .unwrap_err();
        assert!(e.contains("damaged"), "{e}");
        assert_eq!(bounded(Duration::from_secs(5), || 7).unwrap(), 7);
    }
}
