//! Marking this boot good: once every service has stayed ready for the
//! settling period ([`crate::settle`]), the booted slot's tries go back to
//! full, so U-Boot keeps choosing it. The boot partition stays mounted at
//! [`BOOT_DIR`] for the whole run (`pid1/bootpart.rs`), so this writes in
//! place. The file format and its lock are shared with the updater through
//! `cloudlet_proto::bootstate`: every read-modify-write of the boot state,
//! init's and the updater's, holds `flock(LOCK_EX)` on `bootstate0.env`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_proto::bootstate::{OnDisk, Slot, Updated, TRIES};

/// Where the boot partition is mounted, read-write, for the whole run.
pub const BOOT_DIR: &str = "/boot";

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// the boot state could not be locked, read or written (or neither
    /// copy is valid: U-Boot has nothing to go on)
    #[error("boot state in {dir}: {source}")]
    BootState {
        dir: PathBuf,
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

/// Marks the boot of `slot` good in the boot partition mounted at
/// `boot_dir`, after every service was ready for `ready_for`. Problems are
/// logged: the box serves either way. Returns whether the boot state now
/// says this slot is good.
pub fn mark_good(boot_dir: &Path, slot: Slot, ready_for: Duration) -> bool {
    match commit(boot_dir, slot) {
        Ok(c) => {
            tracing::info!(
                slot = %slot,
                "boot marked good after {} s of every service ready: {c}",
                ready_for.as_secs()
            );
            true
        }
        Err(e) => {
            tracing::error!(slot = %slot, error = %e, "could not mark the boot good");
            false
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

/// Under the boot-state lock, reads both copies from `dir` (the mounted
/// boot partition) and, if the booted `slot` has fewer than [`TRIES`] left,
/// writes the older copy with full tries. The write goes to the stale copy,
/// so a power cut during it leaves the newest valid copy in place; the lock
/// keeps the updater from writing that same copy from the same reading.
pub fn commit(dir: &Path, slot: Slot) -> Result<Commit, CommitError> {
    let mut was_left = TRIES;
    let updated = OnDisk::new(dir)
        .update(|state| {
            was_left = state.tries_left(slot);
            state.set_tries_left(slot, TRIES);
        })
        .map_err(|source| CommitError::BootState {
            dir: dir.to_owned(),
            source,
        })?;
    Ok(match updated {
        Updated::Unchanged(_) => Commit::AlreadyGood,
        Updated::Written { index, state } => Commit::Written {
            index,
            seq: state.seq,
            was_left,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use cloudlet_proto::bootstate::{self, BootState, COPY_NAMES};

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
        let e = commit(d.path(), Slot::A).unwrap_err();
        assert!(e.to_string().contains("no valid boot state"), "{e}");
        assert!(!d.path().join(COPY_NAMES[1]).exists());
        assert!(!mark_good(d.path(), Slot::A, Duration::from_secs(60)));
    }

    #[test]
    fn the_commit_waits_for_the_boot_state_lock() {
        use nix::fcntl::{Flock, FlockArg};
        let d = tempfile::tempdir().unwrap();
        let mut s = BootState::initial();
        s.b_left = 1;
        std::fs::write(d.path().join(COPY_NAMES[0]), s.encode()).unwrap();
        // The updater holds the lock (a separate open file description).
        let held = std::fs::File::open(d.path().join(COPY_NAMES[0])).unwrap();
        let lock = Flock::lock(held, FlockArg::LockExclusiveNonblock).unwrap();
        let dir = d.path().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || tx.send(commit(&dir, Slot::B).unwrap()).unwrap());
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "committed while another writer held the lock"
        );
        assert!(!d.path().join(COPY_NAMES[1]).exists());
        drop(lock);
        let c = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(
            c,
            Commit::Written {
                index: 1,
                seq: 2,
                was_left: 1
            }
        );
        // The lock is taken on the file opened read-only, and released.
        let again = std::fs::File::open(d.path().join(COPY_NAMES[0])).unwrap();
        assert!(Flock::lock(again, FlockArg::LockExclusiveNonblock).is_ok());
    }

    #[test]
    fn a_missing_first_copy_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(COPY_NAMES[1]), BootState::initial().encode()).unwrap();
        assert!(matches!(
            commit(d.path(), Slot::A),
            Err(CommitError::BootState { .. })
        ));
    }
}
