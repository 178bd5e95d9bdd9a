//! Marking this boot good: once every service is ready, the booted slot's
//! tries go back to full, so U-Boot keeps choosing it. (The updater issue
//! moves this decision into the updater; the file format is shared through
//! `cloudlet_proto::bootstate`.)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cloudlet_proto::bootstate::{self, BootState, Slot, COPY_NAMES, TRIES};

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

/// Reads both copies from `dir` (the mounted boot partition) and, if the
/// booted `slot` has fewer than [`TRIES`] left, writes the older copy with
/// full tries. The write goes to the stale copy, so a power cut during it
/// leaves the newest valid copy in place.
pub fn commit(dir: &Path, slot: Slot) -> Result<Commit, String> {
    let read = |name: &str| std::fs::read(dir.join(name)).ok();
    let c0 = read(COPY_NAMES[0]);
    let c1 = read(COPY_NAMES[1]);
    let (newest, state) = bootstate::newest([c0.as_deref(), c1.as_deref()])
        .ok_or_else(|| format!("no valid boot state in {}", dir.display()))?;
    let was_left = state.tries_left(slot);
    if was_left == TRIES {
        return Ok(Commit::AlreadyGood);
    }
    let mut next: BootState = state.clone();
    next.set_tries_left(slot, TRIES);
    let (index, bytes) = bootstate::next_write(newest, &next);
    let name = COPY_NAMES.get(index).ok_or("bad copy index")?;
    let path = dir.join(name);
    // Overwrite in place without truncating: the file keeps its clusters and size.
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all_at(&bytes, 0)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(bytes.len() as u64)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Commit::Written {
        index,
        seq: state.seq + 1,
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
        assert!(commit(d.path(), Slot::A).is_err());
        assert!(!d.path().join(COPY_NAMES[1]).exists());
    }
}
