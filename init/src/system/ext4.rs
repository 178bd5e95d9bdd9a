//! The data partition's ext4: reading the superblock to learn whether the last
//! shutdown was clean, making a filesystem on an empty partition, and growing
//! it online.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const SB_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xEF53;
const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_64BIT: u32 = 0x80;

/// What the superblock says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub blocks: u64,
    pub block_size: u64,
    /// Unmounted cleanly: valid, no errors recorded, no journal to replay.
    pub clean: bool,
    pub needs_recovery: bool,
    pub has_errors: bool,
}

fn le16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(*b.get(o..)?.first_chunk()?))
}
fn le32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(*b.get(o..)?.first_chunk()?))
}

/// Parses the 1024-byte superblock; `None` if it is not ext2/3/4.
pub fn parse(sb: &[u8]) -> Option<Superblock> {
    if le16(sb, 0x38)? != MAGIC {
        return None;
    }
    let state = le16(sb, 0x3A)?;
    let incompat = le32(sb, 0x60)?;
    let log = le32(sb, 0x18)?;
    if log > 6 {
        return None;
    }
    let mut blocks = le32(sb, 0x4)? as u64;
    if incompat & INCOMPAT_64BIT != 0 {
        blocks |= (le32(sb, 0x150)? as u64) << 32;
    }
    let needs_recovery = incompat & INCOMPAT_RECOVER != 0;
    let has_errors = state & STATE_ERROR != 0;
    Some(Superblock {
        blocks,
        block_size: 1024u64 << log,
        clean: state & STATE_VALID != 0 && !has_errors && !needs_recovery,
        needs_recovery,
        has_errors,
    })
}

pub fn read(dev: &Path) -> std::io::Result<Option<Superblock>> {
    let mut sb = [0u8; 1024];
    File::open(dev)?.read_exact_at(&mut sb, SB_OFFSET)?;
    Ok(parse(&sb))
}

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// the tool could not be started
    #[error("{program}: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    /// the tool ran and failed
    #[error("{program} {dev}: {status}: {stderr}")]
    Failed {
        program: &'static str,
        dev: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// the mount point cannot be opened for the resize ioctl
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the kernel refused to grow the filesystem
    #[error("growing ext4 on {path}: {source}")]
    Resize {
        path: PathBuf,
        source: std::io::Error,
    },
}

const MKE2FS: &str = "/sbin/mke2fs";
const E2FSCK: &str = "/sbin/e2fsck";

/// Makes a new ext4 on `dev` (an empty partition, or a factory reset).
pub fn mkfs(dev: &Path, label: &str) -> Result<(), Ext4Error> {
    let out = Command::new(MKE2FS)
        .args(["-q", "-F", "-t", "ext4", "-L", label, "-m", "1"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(dev)
        .output()
        .map_err(|source| Ext4Error::Spawn {
            program: MKE2FS,
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Ext4Error::Failed {
            program: MKE2FS,
            dev: dev.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Repairs a filesystem that recorded errors (journal replay alone is the kernel's job).
pub fn fsck(dev: &Path) -> Result<(), Ext4Error> {
    let out = Command::new(E2FSCK)
        .arg("-p")
        .arg(dev)
        .output()
        .map_err(|source| Ext4Error::Spawn {
            program: E2FSCK,
            source,
        })?;
    // 0: clean, 1: errors corrected. Anything else needs a person.
    match out.status.code() {
        Some(0) | Some(1) => Ok(()),
        _ => Err(Ext4Error::Failed {
            program: E2FSCK,
            dev: dev.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

const EXT4_IOC_RESIZE_FS: nix::libc::c_ulong = 0x4008_6610;

/// Grows the mounted filesystem at `mountpoint` to `blocks` blocks, online.
pub fn resize_online(mountpoint: &Path, blocks: u64) -> Result<(), Ext4Error> {
    let dir = File::open(mountpoint).map_err(|source| Ext4Error::Open {
        path: mountpoint.to_owned(),
        source,
    })?;
    let n: u64 = blocks;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which is valid for the call.
    let rc =
        unsafe { nix::libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS as _, &n as *const u64) };
    if rc < 0 {
        return Err(Ext4Error::Resize {
            path: mountpoint.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// (size, free) in bytes of the filesystem at `path`.
pub fn space(path: &Path) -> Option<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    let f = s.fragment_size() as u64;
    Some((
        (s.blocks() as u64).saturating_mul(f),
        (s.blocks_available() as u64).saturating_mul(f),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn sb(state: u16, incompat: u32, blocks: u32, log: u32) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        b[0x3A..0x3C].copy_from_slice(&state.to_le_bytes());
        b[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        b[0x4..0x8].copy_from_slice(&blocks.to_le_bytes());
        b[0x18..0x1C].copy_from_slice(&log.to_le_bytes());
        b
    }

    #[test]
    fn clean_dirty_and_errors() {
        let clean = parse(&sb(1, 0, 1000, 2)).unwrap();
        assert!(clean.clean);
        assert_eq!((clean.blocks, clean.block_size), (1000, 4096));
        let dirty = parse(&sb(1, INCOMPAT_RECOVER, 1000, 2)).unwrap();
        assert!(!dirty.clean && dirty.needs_recovery);
        let err = parse(&sb(3, 0, 1000, 2)).unwrap();
        assert!(!err.clean && err.has_errors);
        assert!(parse(&[0u8; 1024]).is_none());
        assert!(parse(&[0u8; 10]).is_none());
    }

    #[test]
    fn sixty_four_bit_block_counts() {
        let mut b = sb(1, INCOMPAT_64BIT, 5, 2);
        b[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(parse(&b).unwrap().blocks, (1 << 32) | 5);
    }

    #[test]
    fn reads_a_real_mke2fs_superblock() {
        // When the host has mke2fs, check the parser against the real thing.
        let Ok(dir) = tempfile::tempdir() else { return };
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let made = Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
            .arg(&img)
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("mke2fs not available; skipped");
            return;
        }
        let s = read(&img).unwrap().unwrap();
        assert!(s.clean);
        assert_eq!(s.blocks * s.block_size, 8 << 20);
    }
}
