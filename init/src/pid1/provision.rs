//! Flash-time provisioning, init's part. `cloudlet flash` writes the box's
//! identity and its owner's certificate to `cloudlet-provision/` on the
//! FAT boot partition, which anyone reading the card can see. On the first
//! boot, after /data is mounted and before any service starts, init moves
//! those files into the sharing service's state directory
//! (`/data/sharing/provision/`, 0700, files 0600, owned by its user) and
//! deletes them from the boot partition; the sharing service imports them
//! when it starts (services/sharing/src/provision.rs).
//!
//! The order makes a power cut harmless at any instant: every file is
//! copied (temporary file, fsync, rename) and the directory synced before
//! the first deletion on the FAT side, and a copy overwrites what an
//! interrupted one left. The next boot finds whatever is still on the boot
//! partition and finishes the job.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::system::{disk, mounts};

/// Where the boot partition is mounted meanwhile (as for the boot commit).
const BOOT_MOUNT: &str = "/boot";
/// The directory `cloudlet flash` writes on the boot partition.
pub const FAT_DIR: &str = "cloudlet-provision";
/// Where the files go, under /data: the sharing service's state directory.
const DEST: &str = "sharing/provision";
/// The user the sharing service runs as (image/overlay/etc/passwd).
const SERVICE_USER: &str = "sharing";
/// The files that are moved; anything else in the directory is deleted.
const FILES: [&str; 4] = ["identity.key", "identity.crt", "owner.crt", "owner.name"];
/// `cloudlet flash` writes a few hundred bytes each; larger is not its.
const MAX_FILE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// a file or directory could not be read, written, synced or removed
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ProvisionError + 'a {
    move |source| ProvisionError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Moves what `cloudlet flash` left on `disk`'s boot partition into
/// `data_dir`. Problems are logged; the boot goes on either way (the
/// sharing service then makes an identity of its own, and pairing is by
/// the button).
pub(super) fn import(disk: &Path, data_dir: &Path, etc: &Path) {
    use nix::mount::MsFlags;
    let dev = disk::partition_path(disk, disk::PART_BOOT);
    // Read-only to look: most boots find nothing, and leave the FAT
    // partition as clean as they found it.
    let flags = MsFlags::MS_NOATIME | MsFlags::MS_NODEV;
    if let Err(e) = mounts::mount_fs(
        &dev.to_string_lossy(),
        BOOT_MOUNT,
        "vfat",
        flags | MsFlags::MS_RDONLY,
        None,
    ) {
        tracing::error!(error = %e, "cannot look for flash-time provisioning");
        return;
    }
    let src = Path::new(BOOT_MOUNT).join(FAT_DIR);
    if !src.is_dir() {
        if let Err(e) = mounts::unmount_or_readonly(BOOT_MOUNT) {
            tracing::warn!(error = %e, "boot partition");
        }
        return;
    }
    let rw = nix::mount::mount(
        None::<&str>,
        BOOT_MOUNT,
        None::<&str>,
        flags | MsFlags::MS_REMOUNT,
        None::<&str>,
    );
    if let Err(e) = rw {
        tracing::error!(error = %e, "cannot make the boot partition writable for flash-time provisioning");
        if let Err(e) = mounts::unmount_or_readonly(BOOT_MOUNT) {
            tracing::warn!(error = %e, "boot partition");
        }
        return;
    }
    let owner = match crate::users::lookup(etc, SERVICE_USER) {
        Ok(u) => Some((u.uid, u.gid)),
        Err(e) => {
            tracing::warn!(error = %e, "provisioned files stay owned by root");
            None
        }
    };
    match move_files(&src, &data_dir.join(DEST), owner, |_| Ok(())) {
        Ok(Some(n)) => tracing::info!(
            files = n,
            "flash-time provisioning moved from the boot partition to /data/{DEST}"
        ),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "flash-time provisioning; the next boot tries again"),
    }
    if let Err(e) = mounts::unmount_or_readonly(BOOT_MOUNT) {
        tracing::warn!(error = %e, "boot partition");
    }
}

/// Owns `path` by `owner` (uid, gid), when there is one.
fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), ProvisionError> {
    match owner {
        Some((u, g)) => nix::unistd::chown(path, Some(u.into()), Some(g.into()))
            .map_err(|e| io("chown", path)(e.into())),
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), ProvisionError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

/// Copies `src` to `dest` durably: a temporary file (0600, `owner`),
/// fsync, rename. The caller syncs the directory.
fn copy_file(src: &Path, dest: &Path, owner: Option<(u32, u32)>) -> Result<(), ProvisionError> {
    let mut bytes = Vec::new();
    File::open(src)
        .and_then(|f| f.take(MAX_FILE).read_to_end(&mut bytes))
        .map_err(io("reading", src))?;
    let tmp = dest.with_extension("tmp");
    let mut f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("writing", &tmp))?;
    f.write_all(&bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    drop(f);
    chown(&tmp, owner)?;
    std::fs::rename(&tmp, dest).map_err(io("renaming", &tmp))
}

/// Moves the known files of `src` (the FAT directory) into `dest`, owned
/// by `owner`, then deletes `src` whole and syncs its filesystem. `step`
/// is called before each change, with its name (the tests stop the move
/// there, as a power cut would). `Ok(None)`: there was no `src`.
pub fn move_files(
    src: &Path,
    dest: &Path,
    owner: Option<(u32, u32)>,
    mut step: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<Option<usize>, ProvisionError> {
    if !src.is_dir() {
        return Ok(None);
    }
    let mut at = |name: &str, path: &Path| step(name).map_err(io(name_of(name), path));
    // The state directory may not exist yet: init makes state directories
    // only once the manifest is read, after this.
    if let Some(parent) = dest.parent() {
        if !parent.is_dir() {
            at("make the state directory", parent)?;
            std::fs::create_dir_all(parent).map_err(io("making", parent))?;
            chown(parent, owner)?;
        }
    }
    at("make the provision directory", dest)?;
    match std::fs::create_dir(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("making", dest)(e)),
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700))
        .map_err(io("chmod", dest))?;
    chown(dest, owner)?;
    let mut moved = 0usize;
    for name in FILES {
        let from = src.join(name);
        let len = match std::fs::metadata(&from) {
            Ok(m) => m.len(),
            // Deleted by a boot that stopped half-way: copied already.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("reading", &from)(e)),
        };
        if len > MAX_FILE {
            tracing::warn!(file = %from.display(), bytes = len, "not what `cloudlet flash` writes: deleted, not copied");
            continue;
        }
        at("copy", &from)?;
        copy_file(&from, &dest.join(name), owner)?;
        moved = moved.saturating_add(1);
    }
    at("sync the provision directory", dest)?;
    sync_dir(dest)?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent)?;
    }
    // Only now, with every copy durable, does the boot partition lose them.
    let entries = std::fs::read_dir(src).map_err(io("reading", src))?;
    for e in entries {
        let path = e.map_err(io("reading", src))?.path();
        at("delete", &path)?;
        std::fs::remove_file(&path).map_err(io("deleting", &path))?;
    }
    at("delete the directory", src)?;
    std::fs::remove_dir(src).map_err(io("deleting", src))?;
    let fat = src.parent().unwrap_or(Path::new("/"));
    File::open(fat)
        .and_then(|d| {
            nix::unistd::syncfs(&d)?;
            d.sync_all()
        })
        .map_err(io("syncing", fat))?;
    Ok(Some(moved))
}

/// The verb of a step's name, for its error.
fn name_of(step: &str) -> &'static str {
    match step {
        "copy" => "copying",
        "delete" | "delete the directory" => "deleting",
        _ => "making",
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    fn flashed(boot: &Path) -> PathBuf {
        let src = boot.join(FAT_DIR);
        std::fs::create_dir_all(&src).unwrap();
        for name in FILES {
            std::fs::write(src.join(name), format!("{name} as flashed\n")).unwrap();
        }
        std::fs::write(src.join("stray"), "not ours").unwrap();
        src
    }

    fn assert_moved(boot: &Path, data: &Path) {
        let dest = data.join(DEST);
        assert!(!boot.join(FAT_DIR).exists(), "gone from the boot partition");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dest), 0o700);
        let mut names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want: Vec<String> = FILES.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(names, want, "the four files, no temporary or stray one");
        for name in FILES {
            let p = dest.join(name);
            assert_eq!(mode(&p), 0o600, "{name}");
            assert_eq!(
                std::fs::read_to_string(&p).unwrap(),
                format!("{name} as flashed\n")
            );
        }
    }

    #[test]
    fn provisioned_files_move_to_data_privately_and_leave_the_boot_partition() {
        let boot = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let src = flashed(boot.path());
        let dest = data.path().join(DEST);
        assert_eq!(move_files(&src, &dest, None, |_| Ok(())).unwrap(), Some(4));
        assert_moved(boot.path(), data.path());
        // Nothing left to do at the next boot, and nothing changes.
        assert_eq!(move_files(&src, &dest, None, |_| Ok(())).unwrap(), None);
        assert_moved(boot.path(), data.path());
    }

    #[test]
    fn a_move_cut_at_any_step_is_finished_by_the_next_boot() {
        let mut cut_at = 0usize;
        loop {
            let boot = tempfile::tempdir().unwrap();
            let data = tempfile::tempdir().unwrap();
            let src = flashed(boot.path());
            let dest = data.path().join(DEST);
            let mut steps = Vec::new();
            let first = move_files(&src, &dest, None, |name| {
                steps.push(name.to_owned());
                if steps.len() > cut_at {
                    Err(std::io::Error::other("power cut"))
                } else {
                    Ok(())
                }
            });
            if first.is_ok() {
                assert_moved(boot.path(), data.path());
                assert!(cut_at > 8, "the move has steps to cut: {steps:?}");
                break;
            }
            let deleting = steps.iter().any(|s| s.starts_with("delete"));
            for name in FILES {
                if deleting {
                    // The first deletion comes after every copy.
                    assert!(dest.join(name).exists(), "cut at {steps:?}: {name}");
                } else {
                    assert!(src.join(name).exists(), "cut at {steps:?}: {name}");
                }
            }
            // The next boot.
            move_files(&src, &dest, None, |_| Ok(())).unwrap();
            assert_moved(boot.path(), data.path());
            cut_at += 1;
        }
    }
}
