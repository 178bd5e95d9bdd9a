//! Mounting and unmounting.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mounts `what` on `target`, creating the directory. An already mounted
/// target is not an error (stage 1 mounts some of these before stage 2 runs).
pub fn mount_fs(
    what: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    if let Err(e) = std::fs::create_dir_all(target) {
        // A read-only root already has its mount points; only a missing one is a problem.
        if !Path::new(target).is_dir() {
            return Err(format!("creating {target}: {e}"));
        }
    }
    match mount(Some(what), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("mounting {what} ({fstype}) on {target}: {e}")),
    }
}

/// The API filesystems every Linux userland expects.
pub fn early() -> Vec<String> {
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
pub fn unmount_or_readonly(target: &str) -> Result<(), String> {
    match umount2(target, MntFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => {
            let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            mount(None::<&str>, target, None::<&str>, ro, None::<&str>)
                .map_err(|e2| format!("unmounting {target}: {e}; remounting read-only: {e2}"))
        }
    }
}
