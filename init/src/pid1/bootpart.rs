//! What the updater may touch, set up before any service starts: the FAT
//! boot partition, mounted read-write at [`BOOT_DIR`] for the whole run and
//! owned (as far as vfat has owners) by the `updater` user, and the
//! inactive slot's root partition device, handed to that user (0600). The
//! active slot's device is left root-only. init (root) can still write the
//! boot partition: it commits the boot there (`bootcommit`) and moves
//! flash-time provisioning off it (`provision`).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cloudlet_proto::bootstate::Slot;
use nix::mount::MsFlags;

use crate::bootcommit::BOOT_DIR;
use crate::system::{disk, mounts};
use crate::users::User;

/// The user the updater service runs as (image/overlay/etc/passwd).
pub(super) const UPDATER_USER: &str = "updater";

/// What services learn about it (init's variables, their environment).
pub(super) const VAR_BOOT_DIR: &str = "CLOUDLET_BOOT_DIR";
pub(super) const VAR_OTHER_SLOT_DEV: &str = "CLOUDLET_OTHER_SLOT_DEV";
pub(super) const VAR_ACTIVE_SLOT_DEV: &str = "CLOUDLET_ACTIVE_SLOT_DEV";

/// The vfat options that give the boot partition's files to `owner` and
/// nobody else (root aside): files rw-------, directories rwx------, so no
/// other service can read the boot state or hold its lock. `None` (no
/// updater user): the defaults, owned by root.
pub(super) fn mount_options(owner: Option<&User>) -> Option<String> {
    owner.map(|u| format!("uid={},gid={},fmask=0177,dmask=0077", u.uid, u.gid))
}

/// The root partition device of the slot that did not boot.
pub(super) fn other_slot_device(disk: &Path, booted: Slot) -> PathBuf {
    disk::partition_path(disk, disk::root_partition(booted.other()))
}

/// Mounts the boot partition and hands the inactive slot to the updater;
/// adds [`VAR_BOOT_DIR`] and [`VAR_OTHER_SLOT_DEV`] to `vars`. Returns
/// whether the boot partition is mounted (the shutdown unmounts it).
pub(super) fn prepare(
    disk: &Path,
    slot: Option<Slot>,
    etc: &Path,
    vars: &mut BTreeMap<String, String>,
) -> bool {
    let updater = match crate::users::lookup(etc, UPDATER_USER) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::warn!(error = %e, "no updater user: the boot partition stays root's, the other slot too");
            None
        }
    };
    let mounted = mount_boot(disk, updater.as_ref());
    let Some(slot) = slot else {
        tracing::warn!("booted slot unknown: no other slot for the updater");
        return mounted;
    };
    if mounted {
        vars.insert(VAR_BOOT_DIR.to_owned(), BOOT_DIR.to_owned());
    }
    let other = other_slot_device(disk, slot);
    let active = disk::partition_path(disk, disk::root_partition(slot));
    if let Some(u) = &updater {
        // The running slot stays root's, but the updater may read it: a
        // delta update reuses its chunks (it is the signed release, no secret).
        match give_device(&active, 0, u.gid, 0o640) {
            Ok(()) => vars.insert(VAR_ACTIVE_SLOT_DEV.to_owned(), active.display().to_string()),
            Err(e) => {
                tracing::warn!(device = %active.display(), error = %e, "the updater cannot read the running slot (delta updates reuse less)");
                None
            }
        };
        match give_device(&other, u.uid, u.gid, 0o600) {
            Ok(()) => tracing::info!(
                slot = %slot.other(),
                device = %other.display(),
                user = UPDATER_USER,
                "other slot's partition handed to the updater"
            ),
            Err(e) => {
                tracing::error!(device = %other.display(), error = %e, "cannot hand the other slot to the updater")
            }
        }
    }
    vars.insert(VAR_OTHER_SLOT_DEV.to_owned(), other.display().to_string());
    mounted
}

/// Mounts the boot partition read-write at [`BOOT_DIR`]; returns whether it is mounted.
fn mount_boot(disk: &Path, owner: Option<&User>) -> bool {
    let dev = disk::partition_path(disk, disk::PART_BOOT);
    let options = mount_options(owner);
    // Nothing on it runs on Linux: kernels and boot state are data here.
    let flags = MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    match mounts::mount_fs(
        &dev.to_string_lossy(),
        BOOT_DIR,
        "vfat",
        flags,
        options.as_deref(),
    ) {
        Ok(()) => {
            tracing::info!(
                device = %dev.display(),
                options = options.as_deref().unwrap_or("owned by root"),
                "boot partition mounted at {BOOT_DIR}"
            );
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "boot partition unavailable: no boot commit, no updates");
            false
        }
    }
}

/// Why a device could not be handed over.
#[derive(Debug, thiserror::Error)]
pub(super) enum GiveError {
    /// the device node could not be looked at or changed
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// the path is not a block device (the disk layout is not what init expects)
    #[error("{0} is not a block device")]
    NotBlock(PathBuf),
}

/// Gives the block device at `path` to `uid`:`gid` with `mode`.
fn give_device(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), GiveError> {
    let io = |what: &'static str| {
        move |source: std::io::Error| GiveError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    };
    let meta = std::fs::symlink_metadata(path).map_err(io("reading"))?;
    if !meta.file_type().is_block_device() {
        return Err(GiveError::NotBlock(path.to_owned()));
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io("chown"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_partition_is_mounted_for_the_updater_user_alone() {
        let u = crate::users::find_in(
            "root:x:0:0:root:/root:/bin/sh\nupdater:x:104:105:Cloudlet updater:/data/updater:/bin/false\n",
            UPDATER_USER,
        )
        .unwrap();
        assert_eq!(
            mount_options(Some(&u)).as_deref(),
            Some("uid=104,gid=105,fmask=0177,dmask=0077")
        );
        assert_eq!(mount_options(None), None);
    }

    #[test]
    fn the_other_slot_is_the_partition_that_did_not_boot() {
        assert_eq!(
            other_slot_device(Path::new("/dev/vda"), Slot::A),
            Path::new("/dev/vda3")
        );
        assert_eq!(
            other_slot_device(Path::new("/dev/vda"), Slot::B),
            Path::new("/dev/vda2")
        );
        assert_eq!(
            other_slot_device(Path::new("/dev/mmcblk0"), Slot::A),
            Path::new("/dev/mmcblk0p3")
        );
    }

    #[test]
    fn only_a_block_device_is_handed_over() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vda3");
        std::fs::write(&f, b"").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        assert!(matches!(
            give_device(&f, uid, gid, 0o600),
            Err(GiveError::NotBlock(p)) if p == f
        ));
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(matches!(
            give_device(&d.path().join("missing"), uid, gid, 0o600),
            Err(GiveError::Io {
                what: "reading",
                ..
            })
        ));
    }
}
