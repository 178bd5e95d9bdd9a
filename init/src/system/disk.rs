//! The box's disk: finding it, naming its partitions, and growing the data
//! partition (the last MBR entry) to the end of the disk on first boot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// MBR disk signature of Cloudlet images ("CLOU"), set by the genimage config.
pub const DISK_SIGNATURE: u32 = 0x434c_4f55;
/// Partition numbers in the image layout.
pub const PART_BOOT: u32 = 1;
pub const PART_ROOT_A: u32 = 2;
pub const PART_ROOT_B: u32 = 3;
pub const PART_DATA: u32 = 4;
const SECTOR: u64 = 512;
/// Partition ends are kept on 1 MiB boundaries; growth under 1 MiB is not worth a write.
const ALIGN_SECTORS: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// no disk with the Cloudlet MBR signature appeared
    #[error("no disk with the Cloudlet MBR signature {DISK_SIGNATURE:#x} appeared in /sys/block")]
    NotFound,
    /// reading or writing the partition table failed
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// the disk's size is not in sysfs
    #[error("no size for {0} in sysfs")]
    NoSize(PathBuf),
}

/// `/dev/vda` + 2 -> `/dev/vda2`; `/dev/mmcblk0` + 2 -> `/dev/mmcblk0p2`.
pub fn partition_path(disk: &Path, n: u32) -> PathBuf {
    let s = disk.to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

/// The root partition of `slot`.
pub fn root_partition(slot: cloudlet_proto::bootstate::Slot) -> u32 {
    match slot {
        cloudlet_proto::bootstate::Slot::A => PART_ROOT_A,
        cloudlet_proto::bootstate::Slot::B => PART_ROOT_B,
    }
}

/// An MBR partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbrEntry {
    pub kind: u8,
    pub start: u64,
    pub sectors: u64,
}

/// The first MBR entry's offset; entries are 16 bytes each.
const ENTRIES_AT: usize = 446;

pub fn mbr_signature(mbr: &[u8]) -> Option<u32> {
    if mbr.get(510..512)? != [0x55, 0xAA] {
        return None;
    }
    Some(u32::from_le_bytes(*mbr.get(440..)?.first_chunk()?))
}

/// Where entry `n` (1..=4 in an MBR) starts; `None` for 0.
fn entry_offset(n: u32) -> Option<usize> {
    let i = usize::try_from(n.checked_sub(1)?).ok()?;
    i.checked_mul(16)?.checked_add(ENTRIES_AT)
}

/// Entry `n` (1..=4).
pub fn mbr_entry(mbr: &[u8], n: u32) -> Option<MbrEntry> {
    let e: &[u8; 16] = mbr.get(entry_offset(n)?..)?.first_chunk()?;
    let [_, _, _, _, kind, _, _, _, s0, s1, s2, s3, n0, n1, n2, n3] = *e;
    Some(MbrEntry {
        kind,
        start: u64::from(u32::from_le_bytes([s0, s1, s2, s3])),
        sectors: u64::from(u32::from_le_bytes([n0, n1, n2, n3])),
    })
}

/// Grows entry `n` to the last whole MiB of a disk of `disk_sectors`. Returns
/// the new entry, or `None` when there is nothing (worth) growing.
pub fn grow_entry(mbr: &mut [u8], n: u32, disk_sectors: u64) -> Option<MbrEntry> {
    let e = mbr_entry(mbr, n)?;
    if e.kind == 0 || e.start == 0 {
        return None;
    }
    let whole_mib = disk_sectors
        .checked_div(ALIGN_SECTORS)?
        .checked_mul(ALIGN_SECTORS)?;
    // An MBR entry holds at most 2^32 - 1 sectors.
    let end = whole_mib.min(e.start.saturating_add(u64::from(u32::MAX)));
    let new_sectors = end.checked_sub(e.start)?;
    if new_sectors < e.sectors.saturating_add(ALIGN_SECTORS) {
        return None;
    }
    let size: &mut [u8; 4] = mbr
        .get_mut(entry_offset(n)?.checked_add(12)?..)?
        .first_chunk_mut()?;
    *size = u32::try_from(new_sectors).ok()?.to_le_bytes();
    Some(MbrEntry {
        sectors: new_sectors,
        ..e
    })
}

/// Waits up to `timeout` for a disk with the Cloudlet signature (block devices
/// appear asynchronously after their driver loads).
pub fn find(timeout: std::time::Duration) -> Result<PathBuf, DiskError> {
    let started = std::time::Instant::now();
    loop {
        if let Some(d) = scan() {
            return Ok(d);
        }
        if started.elapsed() >= timeout {
            return Err(DiskError::NotFound);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn scan() -> Option<PathBuf> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with("loop") && !n.starts_with("ram") && !n.starts_with("zram"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| PathBuf::from(format!("/dev/{n}")))
        .find(|dev| {
            let mut mbr = [0u8; 512];
            File::open(dev)
                .and_then(|f| f.read_exact_at(&mut mbr, 0))
                .is_ok()
                && mbr_signature(&mbr) == Some(DISK_SIGNATURE)
        })
}

/// Size of a block device in 512-byte sectors, from sysfs.
pub fn sectors(dev: &Path) -> Option<u64> {
    let name = dev.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: i32,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: i32,
    flags: i32,
    datalen: i32,
    data: *mut BlkpgPartition,
}

const BLKPG: nix::libc::c_ulong = 0x1269;
const BLKPG_RESIZE_PARTITION: i32 = 3;

/// Grows the data partition to the end of the disk: rewrites its MBR entry,
/// syncs, and tells the kernel the new size (works while other partitions are
/// in use). Returns the new size in bytes, or `None` if it already fills the disk.
pub fn grow_data_partition(disk: &Path) -> Result<Option<u64>, DiskError> {
    let io = |what, source| DiskError::Io {
        what,
        path: disk.to_owned(),
        source,
    };
    let f = File::options()
        .read(true)
        .write(true)
        .open(disk)
        .map_err(|e| io("opening", e))?;
    let mut mbr = [0u8; 512];
    f.read_exact_at(&mut mbr, 0)
        .map_err(|e| io("reading the MBR of", e))?;
    let disk_sectors = sectors(disk).ok_or_else(|| DiskError::NoSize(disk.to_owned()))?;
    let Some(entry) = grow_entry(&mut mbr, PART_DATA, disk_sectors) else {
        return Ok(None);
    };
    f.write_all_at(&mbr, 0)
        .map_err(|e| io("writing the MBR of", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    // Both are under 2^32 sectors of 2^9 bytes: well inside i64.
    let bytes = |sectors: u64| i64::try_from(sectors.saturating_mul(SECTOR)).unwrap_or(i64::MAX);
    let mut part = BlkpgPartition {
        start: bytes(entry.start),
        length: bytes(entry.sectors),
        pno: PART_DATA as i32,
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as i32,
        data: &mut part,
    };
    // SAFETY: BLKPG takes a pointer to a blkpg_ioctl_arg whose data points to a
    // blkpg_partition; both live on this stack frame for the call.
    let rc = unsafe { nix::libc::ioctl(f.as_raw_fd(), BLKPG as _, &mut arg as *mut BlkpgIoctlArg) };
    if rc < 0 {
        return Err(io(
            "telling the kernel about the grown partition on",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(Some(entry.sectors.saturating_mul(SECTOR)))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    fn mbr_with(entries: &[(u8, u32, u32)]) -> [u8; 512] {
        let mut m = [0u8; 512];
        m[440..444].copy_from_slice(&DISK_SIGNATURE.to_le_bytes());
        for (i, (kind, start, size)) in entries.iter().enumerate() {
            let o = 446 + 16 * i;
            m[o + 4] = *kind;
            m[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
            m[o + 12..o + 16].copy_from_slice(&size.to_le_bytes());
        }
        m[510] = 0x55;
        m[511] = 0xAA;
        m
    }

    #[test]
    fn names_partitions_like_the_kernel() {
        assert_eq!(
            partition_path(Path::new("/dev/vda"), 4),
            Path::new("/dev/vda4")
        );
        assert_eq!(
            partition_path(Path::new("/dev/mmcblk0"), 2),
            Path::new("/dev/mmcblk0p2")
        );
    }

    #[test]
    fn slot_a_is_partition_2_and_slot_b_partition_3() {
        use cloudlet_proto::bootstate::Slot;
        assert_eq!(root_partition(Slot::A), 2);
        assert_eq!(root_partition(Slot::B), 3);
    }

    #[test]
    fn reads_signature_and_entries() {
        let m = mbr_with(&[(0x0c, 2048, 100), (0x83, 4096, 200)]);
        assert_eq!(mbr_signature(&m), Some(DISK_SIGNATURE));
        assert_eq!(
            mbr_entry(&m, 2),
            Some(MbrEntry {
                kind: 0x83,
                start: 4096,
                sectors: 200
            })
        );
        let mut bad = m;
        bad[511] = 0;
        assert_eq!(mbr_signature(&bad), None);
        assert_eq!(mbr_entry(&m, 0), None);
        assert_eq!(mbr_entry(&m, 5), None);
    }

    #[test]
    fn grows_the_last_entry_to_the_last_whole_mib() {
        let mut m = mbr_with(&[
            (0x0c, 2048, 2048),
            (0x83, 4096, 2048),
            (0x83, 6144, 2048),
            (0x83, 8192, 4096),
        ]);
        // A 64 MiB + 5 sectors disk: the end is cut to 64 MiB.
        let e = grow_entry(&mut m, 4, 131072 + 5).unwrap();
        assert_eq!((e.start, e.sectors), (8192, 131072 - 8192));
        assert_eq!(mbr_entry(&m, 4).unwrap().sectors, 131072 - 8192);
        // Nothing more to grow; the other entries are untouched.
        assert_eq!(grow_entry(&mut m, 4, 131072 + 5), None);
        assert_eq!(mbr_entry(&m, 3).unwrap().sectors, 2048);
        // Less than a MiB of slack is left alone.
        assert_eq!(grow_entry(&mut m, 4, 131072 + 2047), None);
        // An empty entry is never grown.
        assert_eq!(grow_entry(&mut mbr_with(&[]), 4, 1 << 20), None);
    }
}
