//! What the updater keeps on /data (`state.json`, written whole and
//! durably): the version floor, an install waiting for its first boot or its
//! commit, the last outcome, the channel, and keys committed releases
//! introduced (`keys/*.pub`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cloudlet_proto::update::Outcome;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The highest version this box committed: installs must be newer
    /// unless the owner allows a downgrade. Only ever raised.
    pub floor: Option<String>,
    /// An install whose slot has not been committed yet.
    pub pending: Option<Pending>,
    pub last: Option<Outcome>,
    /// The release each slot holds, as far as the updater knows.
    #[serde(default)]
    pub slots: BTreeMap<String, String>,
    pub channel: Option<Channel>,
    /// The newest `created` of a channel index this box believed: an older
    /// index (a replay) is refused even before it expires.
    #[serde(default)]
    pub index_created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub slot: String,
    pub version: String,
    /// Keys the release introduces, trusted once it is committed.
    #[serde(default)]
    pub keys: Vec<String>,
    /// The kernel's boot id when the install switched the boot state: a
    /// different one means the box has rebooted since.
    pub boot_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    pub url: String,
    pub interval_s: u64,
    pub auto_install: bool,
}

/// Bytes kept aside on /data for the state file ([`Store::ensure_reserve`]).
pub const RESERVE: usize = 64 << 10;

pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_owned(),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }

    /// The saved state; a damaged file is set aside (kept for a person to
    /// read) and the updater starts from nothing, which is safe: the floor
    /// in the image and the running version still hold.
    pub fn load(&self) -> Saved {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "{} is damaged; set aside as state.json.bad", path.display());
                    let _ = std::fs::rename(&path, self.dir.join("state.json.bad"));
                    Saved::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => {
                tracing::error!(error = %e, "reading {}", path.display());
                Saved::default()
            }
        }
    }

    fn reserve(&self) -> PathBuf {
        self.dir.join("state.reserve")
    }

    /// Keeps [`RESERVE`] bytes of real blocks aside, so that the state can
    /// still be written when /data is full (an install must be able to keep
    /// its pending record, or the box could not tell a fall-back later).
    pub fn ensure_reserve(&self) {
        let path = self.reserve();
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE as u64) {
            return;
        }
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, &[0u8; RESERVE])?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(error = %e, "no room for the updater's reserve on /data");
        }
    }

    /// Writes the state whole and durably; on a full disk, gives up the
    /// reserve and tries again.
    pub fn save(&self, s: &Saved) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
        match cloudlet_runtime::write_private(&self.path(), &bytes) {
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => {
                tracing::warn!("/data is full: using the updater's reserve to keep its state");
                let _ = std::fs::remove_file(self.path().with_extension("tmp"));
                std::fs::remove_file(self.reserve())?;
                // ext4 reuses freed blocks only once the journal commits the
                // unlink: the folder's fsync commits it.
                std::fs::File::open(&self.dir)?.sync_all()?;
                cloudlet_runtime::write_private(&self.path(), &bytes)
            }
            r => r,
        }
    }

    /// Trusts `keys` (hex) from now on.
    pub fn add_keys(&self, keys: &[String]) -> std::io::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(self.keys_dir())?;
        for k in keys {
            let short: String = k.chars().take(16).collect();
            cloudlet_runtime::write_private(
                &self.keys_dir().join(format!("{short}.pub")),
                format!("{k}\n").as_bytes(),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_reads_back_and_a_damaged_file_is_set_aside() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        assert_eq!(store.load(), Saved::default());
        let s = Saved {
            floor: Some("0.1.2".into()),
            index_created: 9,
            ..Saved::default()
        };
        store.save(&s).unwrap();
        assert_eq!(store.load(), s);
        std::fs::write(d.path().join("state.json"), b"{nope").unwrap();
        assert_eq!(store.load(), Saved::default());
        assert!(d.path().join("state.json.bad").exists());
    }
}
