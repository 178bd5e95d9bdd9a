//! What the updater says about itself: the JSON of `GET /api/update` on the
//! updater service (port 8082), which `cloudlet update status` prints and the
//! web UI's status page shows. The updater also keeps the latest copy at
//! [`STATUS_PATH`], readable by every local user, so that the status page
//! needs no credential of its own to show it.

use serde::{Deserialize, Serialize};

/// Where the updater keeps its latest [`UpdateStatus`] on the box.
pub const STATUS_PATH: &str = "/run/cloudlet/updater/status.json";

/// The updater's whole state, as one answer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// The running release (from `/etc/cloudlet/release` on the slot).
    pub version: String,
    pub board: String,
    /// The slot the box booted from ("A" or "B"), when known.
    pub slot: Option<String>,
    /// The lowest version an install may bring (the highest version this box
    /// ever committed, kept on /data); an equal or older one needs the
    /// owner's explicit downgrade.
    pub floor: Option<String>,
    /// The boot state on the boot partition.
    pub boot: Option<BootView>,
    /// What the updater is doing now.
    pub phase: Phase,
    /// Bytes done and in all, while installing.
    pub progress: Option<Progress>,
    /// The outcome of the last install, check or rollback.
    pub last: Option<Outcome>,
    /// The update channel, when one is set.
    pub channel: Option<ChannelView>,
}

/// The A/B boot state as the updater read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootView {
    /// Slots in the order U-Boot tries them.
    pub order: Vec<String>,
    pub a_left: u32,
    pub b_left: u32,
    /// Whether the running slot is committed (its tries are full again after
    /// a healthy, settled boot).
    pub committed: bool,
    /// The other slot: whether it can still be booted (it has tries left), and
    /// the release it holds, when the updater knows it.
    pub other_bootable: bool,
    pub other_version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Nothing under way.
    #[default]
    Idle,
    /// Fetching the channel's index.
    Checking,
    /// Reading a bundle (pushed, or downloaded from a URL) and writing its
    /// parts into the other slot while hashing them.
    Installing,
    /// Reading the written slot back against the signed hashes.
    Verifying,
    /// The other slot holds the new release and the boot state points at it:
    /// the next boot tries it.
    RebootPending,
    /// Running a newly installed slot that is not committed yet.
    Trial,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The part being written (`Image`, `initrd`, `rootfs.squashfs`, or
    /// `download` before the manifest is read).
    pub part: String,
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `installed`, `committed`, `refused`, `failed`, `rolled-back`,
    /// `up-to-date` or `available`.
    pub kind: String,
    pub version: Option<String>,
    /// What happened, in words a person reads.
    pub message: String,
    /// Seconds since the epoch (0 when the clock was not set).
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    /// The signed index's URL.
    pub url: String,
    /// Seconds between checks (each check waits a random part of it more).
    pub interval_s: u64,
    /// Whether a newer release is installed by itself when the channel has
    /// one.
    pub auto_install: bool,
    /// When the index was last read, seconds since the epoch.
    pub checked_at: Option<u64>,
    /// The newest release the index offers, when it is newer than this one.
    pub available: Option<String>,
    /// Why the last check failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reads_back_what_it_wrote() {
        let s = UpdateStatus {
            version: "0.1.2".into(),
            board: "qemu-virt".into(),
            slot: Some("B".into()),
            phase: Phase::RebootPending,
            progress: Some(Progress {
                part: "rootfs.squashfs".into(),
                done: 1,
                total: 2,
            }),
            ..UpdateStatus::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"phase\":\"reboot-pending\""), "{text}");
        assert_eq!(serde_json::from_str::<UpdateStatus>(&text).unwrap(), s);
    }
}
