//! Mounting and unmounting.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// the mount point is missing and cannot be made
    #[error("creating {target}: {source}")]
    CreateDir {
        target: PathBuf,
        source: std::io::Error,
    },
    /// the kernel refused the mount
    #[error("mounting {what} ({fstype}) on {target}: {errno}")]
    Mount {
        what: String,
        fstype: String,
        target: PathBuf,
        errno: Errno,
    },
}

/// Neither unmounting nor the read-only fallback worked.
#[derive(Debug, thiserror::Error)]
#[error("unmounting {target}: {umount}; remounting read-only: {remount}")]
pub struct UnmountError {
    pub target: PathBuf,
    pub umount: Errno,
    pub remount: Errno,
}

/// Whether something is mounted on `path`: it is on another filesystem than
/// its parent. (`/` is never reported: it has no parent to differ from.)
pub fn is_mount_point(path: &Path) -> bool {
    let Some(parent) = path.parent() else {
        return false;
    };
    match (nix::sys::stat::stat(path), nix::sys::stat::stat(parent)) {
        (Ok(a), Ok(b)) => a.st_dev != b.st_dev,
        _ => false,
    }
}

/// Mounts `what` on `target`, creating the directory. A target that already
/// has a filesystem on it is left as it is, not mounted over: stage 1 mounts
/// some of these before stage 2 runs, and a second tmpfs on /run would hide
/// the first one's files.
pub fn mount_fs(
    what: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    if let Err(e) = std::fs::create_dir_all(target) {
        // A read-only root already has its mount points; only a missing one is a problem.
        if !Path::new(target).is_dir() {
            return Err(MountError::CreateDir {
                target: target.into(),
                source: e,
            });
        }
    }
    if is_mount_point(Path::new(target)) {
        tracing::debug!(target, "already mounted");
        return Ok(());
    }
    match mount(Some(what), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(errno) => Err(MountError::Mount {
            what: what.to_owned(),
            fstype: fstype.to_owned(),
            target: target.into(),
            errno,
        }),
    }
}

/// The API filesystems every Linux userland expects. Safe to call again:
/// what is already mounted stays as it is.
pub fn early() -> Vec<MountError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=16m"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777,size=64m"),
        ),
    ];
    mounts
        .iter()
        .filter_map(|(what, target, fs, flags, data)| {
            mount_fs(what, target, fs, *flags, *data).err()
        })
        .collect()
}

/// Unmounts `target`; if something still holds it, remounts it read-only so
/// that its filesystem is consistent when the power goes.
pub fn unmount_or_readonly(target: &str) -> Result<(), UnmountError> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(umount) => {
            let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, target, None::<&str>, ro, None::<&str>).map_err(|remount| {
                UnmountError {
                    target: target.into(),
                    umount,
                    remount,
                }
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tells_mount_points_from_plain_directories() {
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(d.path()));
        assert!(!is_mount_point(Path::new("/")));
        assert!(!is_mount_point(&d.path().join("missing")));
        // The host's /proc is a mount point wherever these tests run.
        if Path::new("/proc/self").exists() {
            assert!(is_mount_point(Path::new("/proc")));
        }
    }
}
