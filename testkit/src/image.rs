//! Disk images shaped like Cloudlet's for tests that cannot build the real
//! one: an MBR with the Cloudlet disk signature, a FAT32 boot partition at
//! 1 MiB holding the files asked for, and room for the rest. The real
//! layout is image/genimage.cfg.in.

use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The Cloudlet MBR disk signature ("CLOU").
pub const SIGNATURE: u32 = 0x434c_4f55;
/// Where the boot partition starts.
pub const BOOT_START: u64 = 1 << 20;
/// The boot partition's size: FAT32 needs 65525 clusters, so 40 MiB of
/// 512-byte clusters.
pub const BOOT_SIZE: u64 = 40 << 20;

/// An MBR with `signature` and partitions `(type, first byte, bytes)`.
pub fn mbr(signature: u32, parts: &[(u8, u64, u64)]) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, (kind, start, len)) in parts.iter().enumerate() {
        let e = 446 + 16 * i;
        m[e + 4] = *kind;
        m[e + 8..e + 12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        m[e + 12..e + 16].copy_from_slice(&((len / 512) as u32).to_le_bytes());
    }
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// Writes an image of `total` bytes (at least [`BOOT_START`] +
/// [`BOOT_SIZE`]) to `path`: the MBR, a FAT32 boot partition with `files`
/// in its root, and `tail` (a stand-in for the other partitions) after it.
pub fn cloudlet_image(path: &Path, files: &[(&str, &[u8])], tail: &[u8]) -> std::io::Result<()> {
    let mut fat = Cursor::new(vec![0u8; BOOT_SIZE as usize]);
    fatfs::format_volume(
        &mut fat,
        fatfs::FormatVolumeOptions::new()
            .fat_type(fatfs::FatType::Fat32)
            .bytes_per_cluster(512)
            .volume_label(*b"CLOUDLET   "),
    )?;
    fat.seek(SeekFrom::Start(0))?;
    {
        let fs = fatfs::FileSystem::new(&mut fat, fatfs::FsOptions::new())?;
        for (name, bytes) in files {
            let mut f = fs.root_dir().create_file(name)?;
            f.truncate()?;
            f.write_all(bytes)?;
            f.flush()?;
        }
        fs.unmount()?;
    }
    let f = std::fs::File::create(path)?;
    let tail_at = BOOT_START + BOOT_SIZE;
    f.write_all_at(
        &mbr(
            SIGNATURE,
            &[
                (0x0C, BOOT_START, BOOT_SIZE),
                (0x83, tail_at, tail.len() as u64),
            ],
        ),
        0,
    )?;
    f.write_all_at(fat.get_ref(), BOOT_START)?;
    f.write_all_at(tail, tail_at)?;
    f.sync_all()
}

/// The boot partition (entry 1 of the MBR) of the image at `path`, read
/// whole into memory for [`fatfs`].
pub fn boot_partition(path: &Path) -> std::io::Result<Cursor<Vec<u8>>> {
    let f = std::fs::File::open(path)?;
    let mut m = [0u8; 512];
    f.read_exact_at(&mut m, 0)?;
    let start = u64::from(u32::from_le_bytes([m[454], m[455], m[456], m[457]])) * 512;
    let len = u64::from(u32::from_le_bytes([m[458], m[459], m[460], m[461]])) * 512;
    let mut part = vec![0u8; len as usize];
    f.read_exact_at(&mut part, start)?;
    Ok(Cursor::new(part))
}

/// The file at `path_in_fat` ("dir/name") on the image's boot partition;
/// `None` when it is not there.
pub fn read_boot_file(image: &Path, path_in_fat: &str) -> std::io::Result<Option<Vec<u8>>> {
    let mut part = boot_partition(image)?;
    let fs = fatfs::FileSystem::new(&mut part, fatfs::FsOptions::new())?;
    let mut f = match fs.root_dir().open_file(path_in_fat) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(Some(out))
}

/// The names in the directory `dir` of the image's boot partition ("" for
/// the root), or `None` when there is no such directory.
pub fn list_boot_dir(image: &Path, dir: &str) -> std::io::Result<Option<Vec<String>>> {
    let mut part = boot_partition(image)?;
    let fs = fatfs::FileSystem::new(&mut part, fatfs::FsOptions::new())?;
    let d = if dir.is_empty() {
        fs.root_dir()
    } else {
        match fs.root_dir().open_dir(dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    let mut names = Vec::new();
    for e in d.iter() {
        let name = e?.file_name();
        if name != "." && name != ".." {
            names.push(name);
        }
    }
    names.sort();
    Ok(Some(names))
}

/// Where FAT32 keeps the root directory's first cluster in a boot sector.
pub const ROOT_CLUSTER_AT: u64 = 44;

/// The FAT32 layout of the boot partition of an image
/// [`cloudlet_image`] made: the bytes where each FAT starts, and the
/// number of data clusters.
pub fn fat32_layout(image: &Path) -> std::io::Result<(Vec<u64>, u32)> {
    let f = std::fs::File::open(image)?;
    let mut bs = [0u8; 512];
    f.read_exact_at(&mut bs, BOOT_START)?;
    let u16_at = |i: usize| u64::from(u16::from_le_bytes([bs[i], bs[i + 1]]));
    let u32_at = |i: usize| u64::from(u32::from_le_bytes([bs[i], bs[i + 1], bs[i + 2], bs[i + 3]]));
    let (sector, reserved, fats) = (u16_at(11), u16_at(14), u64::from(bs[16]));
    let (total, fat_sectors) = (u32_at(32), u32_at(36));
    let starts = (0..fats)
        .map(|i| BOOT_START + (reserved + i * fat_sectors) * sector)
        .collect();
    let clusters = (total - reserved - fats * fat_sectors) / u64::from(bs[13]);
    Ok((starts, clusters as u32))
}

/// Sets the entry of `cluster` to `value` in every FAT of the boot
/// partition of an image [`cloudlet_image`] made (to damage it).
pub fn set_fat_entry(image: &Path, cluster: u32, value: u32) -> std::io::Result<()> {
    let (starts, _) = fat32_layout(image)?;
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    for start in starts {
        f.write_all_at(&value.to_le_bytes(), start + u64::from(cluster) * 4)?;
    }
    f.sync_all()
}

/// Writes `bytes` at `offset` in the boot sector of the boot partition of
/// an image [`cloudlet_image`] made (to damage it).
pub fn patch_boot_sector(image: &Path, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(image)?;
    f.write_all_at(bytes, BOOT_START + offset)?;
    f.sync_all()
}
