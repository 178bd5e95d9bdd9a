//! The data partition: made, grown, checked and mounted at boot; wiped by a
//! confirmed factory reset. Everything mutable on the box lives here.

use std::path::{Path, PathBuf};

use cloudlet_proto::control::DataInfo;

use crate::system::{disk, ext4, mounts};

/// Why the data partition is not mounted.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// the superblock cannot be read (no such partition?)
    #[error("reading {dev}: {source}")]
    Superblock {
        dev: PathBuf,
        source: std::io::Error,
    },
    /// making, checking or growing the filesystem failed
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    /// mounting it failed
    #[error(transparent)]
    Mount(#[from] mounts::MountError),
}

/// Finds, creates, grows, checks and mounts the data partition of `disk` on `target`.
pub fn prepare(disk: &Path, target: &Path) -> Result<DataInfo, DataError> {
    let dev = disk::partition_path(disk, disk::PART_DATA);
    let mut info = DataInfo {
        device: dev.display().to_string(),
        ..DataInfo::default()
    };
    match disk::grow_data_partition(disk) {
        Ok(Some(bytes)) => {
            tracing::info!(device = %dev.display(), bytes, "data partition grown to the end of the disk");
            info.grown = true;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot grow the data partition"),
    }
    let sb = ext4::read(&dev).map_err(|source| DataError::Superblock {
        dev: dev.clone(),
        source,
    })?;
    match sb {
        None => {
            tracing::info!(device = %dev.display(), "no filesystem on the data partition: making one");
            ext4::mkfs(&dev, "cloudlet-data")?;
            info.created = true;
            info.was_clean = true;
        }
        Some(sb) => {
            info.was_clean = sb.clean;
            if sb.clean {
                tracing::info!(device = %dev.display(), "data partition was unmounted cleanly");
            } else {
                tracing::warn!(device = %dev.display(), recovery = sb.needs_recovery, errors = sb.has_errors, "data partition was not unmounted cleanly");
            }
            if sb.has_errors {
                ext4::fsck(&dev)?;
            }
        }
    }
    mounts::mount_fs(
        &dev.to_string_lossy(),
        &target.to_string_lossy(),
        "ext4",
        nix::mount::MsFlags::MS_NOATIME | nix::mount::MsFlags::MS_NODEV,
        None,
    )?;
    if !info.created {
        if let (Ok(Some(sb)), Some(part_sectors)) = (ext4::read(&dev), disk::sectors(&dev)) {
            if let Some(blocks) = grown_blocks(part_sectors, sb.blocks, sb.block_size) {
                ext4::resize_online(target, blocks)?;
                tracing::info!(blocks, "data filesystem grown");
                info.grown = true;
            }
        }
    }
    if let Some((size, free)) = ext4::space(target) {
        info.size_bytes = size;
        info.free_bytes = free;
    }
    Ok(info)
}

/// The block count to grow a filesystem of `blocks` blocks to, on a
/// partition of `part_sectors` sectors; `None` when the gain is under 1 MiB.
fn grown_blocks(part_sectors: u64, blocks: u64, block_size: u64) -> Option<u64> {
    let want = part_sectors.saturating_mul(512).checked_div(block_size)?;
    let slack = (1u64 << 20).checked_div(block_size)?;
    (want > blocks.saturating_add(slack)).then_some(want)
}

/// Destroys the data filesystem's superblocks so that the next step makes a
/// new, empty one. Only /data: the boot and root partitions are untouched.
pub fn wipe(disk: &Path) {
    use std::os::unix::fs::FileExt;
    let dev = disk::partition_path(disk, disk::PART_DATA);
    let r = std::fs::File::options()
        .write(true)
        .open(&dev)
        .and_then(|f| {
            f.write_all_at(&vec![0u8; 1 << 20], 0)?;
            f.sync_all()
        });
    match r {
        Ok(()) => tracing::warn!(device = %dev.display(), "factory reset: /data wiped"),
        Err(e) => tracing::error!(device = %dev.display(), error = %e, "factory reset failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_the_filesystem_only_by_a_mib_or_more() {
        // A 1 GiB partition (2 Mi sectors) with 4 KiB blocks holds 262144 blocks.
        assert_eq!(grown_blocks(2 << 20, 100_000, 4096), Some(262_144));
        assert_eq!(grown_blocks(2 << 20, 262_144 - 256, 4096), None);
        assert_eq!(grown_blocks(2 << 20, 262_144 - 257, 4096), Some(262_144));
        assert_eq!(grown_blocks(2 << 20, 100, 0), None);
    }
}
