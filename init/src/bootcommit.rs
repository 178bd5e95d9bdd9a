//! Marking this boot good: once every service is ready, the booted slot's
//! tries go back to full, so U-Boot keeps choosing it. (The updater issue
//! moves this decision into the updater; the file format is shared through
//! `cloudlet_proto::bootstate`.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cloudlet_proto::bootstate::{self, BootState, Slot, COPY_NAMES, TRIES};

use crate::system::{disk, mounts};

/// Where the boot partition is mounted while the boot state is written.
const BOOT_MOUNT: &str = "/boot";

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// neither copy of the boot state is valid: U-Boot has nothing to go on
    #[error("no valid boot state in {0}")]
    NoValidState(PathBuf),
    /// the boot-state code chose a copy that does not exist
    #[error("boot state copy {0} does not exist")]
    BadIndex(usize),
    /// writing the copy failed
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    /// Nothing to change: the slot already had full tries.
    AlreadyGood,
    /// Wrote copy `index` with the new sequence number.
    Written {
        index: usize,
        seq: u64,
        was_left: u32,
    },
}

/// Marks the boot of `slot` good on `disk`'s boot partition: mounts it,
/// [`commit`]s, unmounts it. Problems are logged: the box serves either way.
/// Returns whether the partition is still mounted (unmounting failed), so
/// that the shutdown unmounts it.
pub fn mark_good(disk: &Path, slot: Slot) -> bool {
    let dev = disk::partition_path(disk, disk::PART_BOOT);
    if let Err(e) = mounts::mount_fs(
        &dev.to_string_lossy(),
        BOOT_MOUNT,
        "vfat",
        nix::mount::MsFlags::MS_NOATIME,
        None,
    ) {
        tracing::error!(slot = %slot, error = %e, "could not mark the boot good");
        return false;
    }
    match commit(Path::new(BOOT_MOUNT), slot) {
        Ok(c) => tracing::info!(slot = %slot, "boot marked good: {c}"),
        Err(e) => tracing::error!(slot = %slot, error = %e, "could not mark the boot good"),
    }
    match mounts::unmount_or_readonly(BOOT_MOUNT) {
        Ok(()) => false,
        Err(e) => {
            tracing::warn!(error = %e, "boot partition");
            true
        }
    }
}

impl std::fmt::Display for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Commit::AlreadyGood => write!(f, "it already had every try left"),
            Commit::Written {
                index,
                seq,
                was_left,
            } => write!(
                f,
                "wrote copy {index} (sequence {seq}); it had {was_left} tries left"
            ),
        }
    }
}

/// Reads both copies from `dir` (the mounted boot partition) and, if the
/// booted `slot` has fewer than [`TRIES`] left, writes the older copy with
/// full tries. The write goes to the stale copy, so a power cut during it
/// leaves the newest valid copy in place.
pub fn commit(dir: &Path, slot: Slot) -> Result<Commit, CommitError> {
    let read = |name: &str| std::fs::read(dir.join(name)).ok();
    let c0 = read(COPY_NAMES[0]);
    let c1 = read(COPY_NAMES[1]);
    let (newest, state) = bootstate::newest([c0.as_deref(), c1.as_deref()])
        .ok_or_else(|| CommitError::NoValidState(dir.to_owned()))?;
    let was_left = state.tries_left(slot);
    if was_left == TRIES {
        return Ok(Commit::AlreadyGood);
    }
    let mut next: BootState = state.clone();
    next.set_tries_left(slot, TRIES);
    let (index, bytes) = bootstate::next_write(newest, &next);
    let name = COPY_NAMES.get(index).ok_or(CommitError::BadIndex(index))?;
    let path = dir.join(name);
    // Overwrite in place without truncating: the file keeps its clusters and size.
    let write = || -> std::io::Result<()> {
        let f = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        f.write_all_at(&bytes, 0)?;
        f.set_len(bytes.len() as u64)?;
        f.sync_all()
    };
    if let Err(source) = write() {
        return Err(CommitError::Write { path, source });
    }
    Ok(Commit::Written {
        index,
        seq: state.seq.wrapping_add(1),
        was_left,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn restores_full_tries_in_the_older_copy() {
        let d = tempfile::tempdir().unwrap();
        let mut s = BootState::initial();
        s.seq = 4;
        s.a_left = 1;
        std::fs::write(d.path().join(COPY_NAMES[1]), s.encode()).unwrap();
        let mut old = s.clone();
        old.seq = 3;
        std::fs::write(d.path().join(COPY_NAMES[0]), old.encode()).unwrap();

        let c = commit(d.path(), Slot::A).unwrap();
        assert_eq!(
            c,
            Commit::Written {
                index: 0,
                seq: 5,
                was_left: 1
            }
        );
        let c0 = std::fs::read(d.path().join(COPY_NAMES[0])).unwrap();
        let c1 = std::fs::read(d.path().join(COPY_NAMES[1])).unwrap();
        let (i, n) = bootstate::newest([Some(&c0), Some(&c1)]).unwrap();
        assert_eq!((i, n.seq, n.a_left, n.b_left), (0, 5, TRIES, 0));
        assert_eq!(commit(d.path(), Slot::A).unwrap(), Commit::AlreadyGood);
    }

    #[test]
    fn no_valid_copy_is_an_error_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(COPY_NAMES[0]), [0u8; 4096]).unwrap();
        assert!(matches!(
            commit(d.path(), Slot::A),
            Err(CommitError::NoValidState(_))
        ));
        assert!(!d.path().join(COPY_NAMES[1]).exists());
    }
}
