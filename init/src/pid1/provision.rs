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
//!
//! The sharing user owns /data/sharing, so it can put anything at
//! `provision` and in it, symlinks above all, for init (root) to follow.
//! Nothing there is followed: the directory is opened without following,
//! replaced when it is not a real directory of the right owner, and every
//! file is made, owned, synced and renamed through descriptors, under a
//! temporary name of its own made afresh (`O_EXCL|O_NOFOLLOW`).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{open, openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode, SFlag};

/// The directory `cloudlet flash` writes on the boot partition.
pub const FAT_DIR: &str = "cloudlet-provision";
/// Where the files go, under /data: the sharing service's state directory.
const DEST: &str = "sharing/provision";
/// The user the sharing service runs as (image/overlay/etc/passwd).
const SERVICE_USER: &str = "sharing";
/// The files that are moved, when they are regular files; anything else in
/// the directory (a directory above all: FAT has no symlinks) is deleted.
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

/// Moves what `cloudlet flash` left on the boot partition (mounted
/// read-write at `boot_dir` for the whole run, see `pid1/bootpart.rs`) into
/// `data_dir`. Problems are logged; the boot goes on either way (the
/// sharing service then makes an identity of its own, and pairing is by
/// the button).
pub(super) fn import(boot_dir: &Path, data_dir: &Path, etc: &Path) {
    let src = boot_dir.join(FAT_DIR);
    if !src.is_dir() {
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
}

/// Owns `path` by `owner` (uid, gid), when there is one.
fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<(), ProvisionError> {
    match owner {
        Some((u, g)) => nix::unistd::chown(path, Some(u.into()), Some(g.into()))
            .map_err(|e| io("chown", path)(e.into())),
        None => Ok(()),
    }
}

/// Owns the open `fd` by `owner` (uid, gid), when there is one.
fn fchown(fd: impl AsFd, path: &Path, owner: Option<(u32, u32)>) -> Result<(), ProvisionError> {
    match owner {
        Some((u, g)) => nix::unistd::fchown(fd, Some(u.into()), Some(g.into()))
            .map_err(|e| io("chown", path)(e.into())),
        None => Ok(()),
    }
}

fn errno<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::errno::Errno) -> ProvisionError + 'a {
    move |e| io(what, path)(e.into())
}

/// How a directory is opened here: never through a symlink.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);
/// How deep [`remove_entry`] goes, and how many names it reads in one
/// directory, in what the sharing user may have left in the way.
const MAX_DEPTH: u32 = 8;
const MAX_ENTRIES: usize = 4096;

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
}

/// Removes whatever is at `name` in the directory `dir` (`path` names it
/// for errors): a file or symlink is unlinked, never followed; a directory
/// is emptied through its own descriptor, then removed. Nothing there is
/// fine.
fn remove_entry(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    path: &Path,
    depth: u32,
) -> Result<(), ProvisionError> {
    use nix::errno::Errno;
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(errno("reading", path)(e)),
    };
    if !is_dir(&st) {
        return match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(errno("removing", path)(e)),
        };
    }
    if depth >= MAX_DEPTH {
        return Err(errno("removing (too deep)", path)(Errno::ELOOP));
    }
    let mut sub = nix::dir::Dir::openat(dir, name, DIR_FLAGS, Mode::empty())
        .map_err(errno("removing", path))?;
    let mut names = Vec::new();
    for e in sub.iter() {
        let e = e.map_err(errno("reading", path))?;
        let n = OsStr::from_bytes(e.file_name().to_bytes());
        if n == "." || n == ".." {
            continue;
        }
        if names.len() >= MAX_ENTRIES {
            return Err(errno("removing (too many entries)", path)(Errno::E2BIG));
        }
        names.push(n.to_owned());
    }
    for n in names {
        remove_entry(sub.as_fd(), &n, &path.join(&n), depth.saturating_add(1))?;
    }
    drop(sub);
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(errno("removing", path)(e)),
    }
}

/// Opens the directory `name` of `parent` (`dest` is its path), 0700 and
/// owned by `owner`. The sharing user owns `parent` and may have put
/// anything there: what is not a real directory owned by the right user
/// (a symlink above all) is removed, never followed, and the directory
/// made afresh; everything after works on the descriptor.
fn open_dest(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    dest: &Path,
    owner: Option<(u32, u32)>,
) -> Result<OwnedFd, ProvisionError> {
    use nix::errno::Errno;
    let me = nix::unistd::geteuid().as_raw();
    let want = owner.map_or(me, |(u, _)| u);
    let mut last = Errno::EAGAIN;
    // Another try only when the name changed between two calls, which
    // only the sharing user racing this can do.
    for _ in 0..3 {
        match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_dir(&st) && st.st_uid == want => {}
            Ok(_) => remove_entry(parent, name, dest, 0)?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(errno("reading", dest)(e)),
        }
        let made = match mkdirat(parent, name, Mode::S_IRWXU) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => return Err(errno("making", dest)(e)),
        };
        match openat(parent, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => {
                let st = fstat(&fd).map_err(errno("reading", dest))?;
                if st.st_uid == want || (made && st.st_uid == me) {
                    fchown(&fd, dest, owner)?;
                    fchmod(&fd, Mode::S_IRWXU).map_err(errno("chmod", dest))?;
                    return Ok(fd);
                }
                last = Errno::EEXIST;
            }
            Err(e @ (Errno::ELOOP | Errno::ENOTDIR | Errno::ENOENT)) => last = e,
            Err(e) => return Err(errno("opening", dest)(e)),
        }
    }
    Err(errno("making (it keeps changing)", dest)(last))
}

/// Copies `src` to `name` in the directory `dir` (`dest` is its path)
/// durably: a temporary file of its own (made anew, 0600, `owner`),
/// fsync, rename. Nothing in `dir` is followed. The caller syncs `dir`.
fn copy_file(
    src: &Path,
    dir: BorrowedFd<'_>,
    dest: &Path,
    name: &str,
    owner: Option<(u32, u32)>,
) -> Result<(), ProvisionError> {
    let mut bytes = Vec::new();
    File::open(src)
        .and_then(|f| f.take(MAX_FILE).read_to_end(&mut bytes))
        .map_err(io("reading", src))?;
    let tmp_name = OsString::from(format!(".{name}.tmp"));
    let tmp = dest.join(&tmp_name);
    // What an interrupted copy left, or what the sharing user put there.
    remove_entry(dir, &tmp_name, &tmp, 0)?;
    let fd = openat(
        dir,
        tmp_name.as_os_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(errno("making", &tmp))?;
    let mut f = File::from(fd);
    fchmod(&f, Mode::S_IRUSR | Mode::S_IWUSR).map_err(errno("chmod", &tmp))?;
    fchown(&f, &tmp, owner)?;
    f.write_all(&bytes).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    drop(f);
    // A rename does not replace a directory: one in the way goes first.
    let to = dest.join(name);
    if fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| is_dir(&st)) {
        remove_entry(dir, OsStr::new(name), &to, 0)?;
    }
    renameat(dir, tmp_name.as_os_str(), dir, name).map_err(errno("renaming", &tmp))
}

fn sync_fd(fd: impl AsFd, path: &Path) -> Result<(), ProvisionError> {
    nix::unistd::fsync(fd).map_err(errno("syncing", path))
}

/// Moves the known files of `src` (the FAT directory) into `dest`, owned
/// by `owner`, then deletes `src` whole and syncs its filesystem. `step`
/// is called before each change, with its name (the tests stop the move
/// there, as a power cut would). `Ok(None)`: there was no `src`.
///
/// `dest`'s parent is root's to name (under /data) but the sharing user's
/// to fill: `dest` and everything in it are treated as hostile, reached
/// only through descriptors and never through a symlink.
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
    let (Some(parent), Some(dest_name)) = (dest.parent(), dest.file_name()) else {
        return Err(io("making", dest)(std::io::ErrorKind::InvalidInput.into()));
    };
    // The state directory may not exist yet: init makes state directories
    // only once the manifest is read, after this.
    if !parent.is_dir() {
        at("make the state directory", parent)?;
        std::fs::create_dir_all(parent).map_err(io("making", parent))?;
        chown(parent, owner)?;
    }
    let parent_fd = open(parent, DIR_FLAGS, Mode::empty()).map_err(errno("opening", parent))?;
    at("make the provision directory", dest)?;
    let dir = open_dest(parent_fd.as_fd(), dest_name, dest, owner)?;
    let mut moved = 0usize;
    for name in FILES {
        let from = src.join(name);
        let meta = match std::fs::symlink_metadata(&from) {
            Ok(m) => m,
            // Deleted by a boot that stopped half-way: copied already.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("reading", &from)(e)),
        };
        let len = meta.len();
        if !meta.file_type().is_file() {
            // Not what `cloudlet flash` writes, and reading it would fail
            // at every boot, leaving the rest (the box's key) on the card.
            tracing::warn!(file = %from.display(), "not a regular file: deleted, not copied");
            continue;
        }
        if len > MAX_FILE {
            tracing::warn!(file = %from.display(), bytes = len, "not what `cloudlet flash` writes: deleted, not copied");
            continue;
        }
        at("copy", &from)?;
        copy_file(&from, dir.as_fd(), dest, name, owner)?;
        moved = moved.saturating_add(1);
    }
    at("sync the provision directory", dest)?;
    sync_fd(&dir, dest)?;
    sync_fd(&parent_fd, parent)?;
    // Only now, with every copy durable, does the boot partition lose them.
    // Everything goes, directories too: one left behind would keep `src`,
    // and with it the next boot copying the files again.
    let entries = std::fs::read_dir(src).map_err(io("reading", src))?;
    for e in entries {
        let e = e.map_err(io("reading", src))?;
        let path = e.path();
        let dir = e.file_type().map_err(io("reading", &path))?.is_dir();
        at("delete", &path)?;
        if dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .map_err(io("deleting", &path))?;
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
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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
    fn directories_in_the_fat_directory_are_deleted_and_not_copied() {
        let boot = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let src = flashed(boot.path());
        std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
        std::fs::write(src.join("sub/deeper/file"), "x").unwrap();
        let dest = data.path().join(DEST);
        assert_eq!(move_files(&src, &dest, None, |_| Ok(())).unwrap(), Some(4));
        assert_moved(boot.path(), data.path());

        // One of the four names as a directory: the others are copied, and
        // everything leaves the boot partition.
        let boot = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let src = flashed(boot.path());
        std::fs::remove_file(src.join("owner.crt")).unwrap();
        std::fs::create_dir_all(src.join("owner.crt/inside")).unwrap();
        let dest = data.path().join(DEST);
        assert_eq!(move_files(&src, &dest, None, |_| Ok(())).unwrap(), Some(3));
        assert!(!src.exists(), "gone from the boot partition");
        assert!(!dest.join("owner.crt").exists());
        assert!(dest.join("identity.key").is_file());
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

    /// A file and a directory of someone else's that the sharing user's
    /// symlinks point at, and how they looked.
    struct Victim {
        dir: tempfile::TempDir,
        before: Vec<(String, u32, u32, Vec<u8>)>,
    }

    impl Victim {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::write(dir.path().join("shadow"), "root's secret\n").unwrap();
            std::fs::set_permissions(
                dir.path().join("shadow"),
                std::fs::Permissions::from_mode(0o640),
            )
            .unwrap();
            let mut v = Victim {
                dir,
                before: Vec::new(),
            };
            v.before = v.state();
            v
        }

        fn file(&self) -> PathBuf {
            self.dir.path().join("shadow")
        }

        fn state(&self) -> Vec<(String, u32, u32, Vec<u8>)> {
            let look = |p: &Path| {
                let m = std::fs::symlink_metadata(p).unwrap();
                (m.mode(), m.uid())
            };
            let (mode, uid) = look(self.dir.path());
            let mut s = vec![(".".to_owned(), mode, uid, Vec::new())];
            for e in std::fs::read_dir(self.dir.path()).unwrap() {
                let p = e.unwrap().path();
                let (mode, uid) = look(&p);
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                s.push((name, mode, uid, std::fs::read(&p).unwrap()));
            }
            s.sort();
            s
        }

        fn assert_untouched(&self) {
            assert_eq!(self.state(), self.before, "the symlinks' targets changed");
        }
    }

    #[test]
    fn a_symlink_planted_as_the_provision_directory_is_not_followed() {
        let victim = Victim::new();
        for target in [victim.dir.path().to_owned(), victim.file()] {
            let boot = tempfile::tempdir().unwrap();
            let data = tempfile::tempdir().unwrap();
            let src = flashed(boot.path());
            let dest = data.path().join(DEST);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&target, &dest).unwrap();
            assert_eq!(move_files(&src, &dest, None, |_| Ok(())).unwrap(), Some(4));
            victim.assert_untouched();
            assert!(std::fs::symlink_metadata(&dest).unwrap().is_dir());
            assert_moved(boot.path(), data.path());
        }
        // Nor a file, or a directory in the way of a file.
        let boot = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let src = flashed(boot.path());
        let dest = data.path().join(DEST);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, "a file").unwrap();
        move_files(&src, &dest, None, |_| Ok(())).unwrap();
        assert_moved(boot.path(), data.path());
    }

    #[test]
    fn symlinks_planted_in_the_provision_directory_are_not_followed() {
        let victim = Victim::new();
        let boot = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let src = flashed(boot.path());
        let dest = data.path().join(DEST);
        std::fs::create_dir_all(&dest).unwrap();
        let link = |name: &str, to: &Path| std::os::unix::fs::symlink(to, dest.join(name)).unwrap();
        // Every temporary name, and the final names, as symlinks to the
        // victim's file or directory.
        link(".identity.key.tmp", &victim.file());
        link(".identity.crt.tmp", victim.dir.path());
        link(".owner.name.tmp", &victim.file());
        link("identity.key", &victim.file());
        link("owner.crt", victim.dir.path());
        // And directories in the way, holding symlinks of their own.
        let dir = dest.join(".owner.crt.tmp");
        std::fs::create_dir_all(dir.join("deeper")).unwrap();
        std::os::unix::fs::symlink(victim.dir.path(), dir.join("deeper/escape")).unwrap();
        std::fs::create_dir(dest.join("owner.name")).unwrap();
        std::os::unix::fs::symlink(victim.file(), dest.join("owner.name/x")).unwrap();

        assert_eq!(move_files(&src, &dest, None, |_| Ok(())).unwrap(), Some(4));
        victim.assert_untouched();
        assert_moved(boot.path(), data.path());
        for name in FILES {
            assert!(std::fs::symlink_metadata(dest.join(name))
                .unwrap()
                .file_type()
                .is_file());
        }
    }

    #[test]
    fn the_provision_directory_and_files_belong_to_the_service_user() {
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let root = me.0 == 0;
        // Only root can give files away; anyone can to themselves.
        let owner = if root { (4242, 4343) } else { me };
        let boot = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let src = flashed(boot.path());
        let dest = data.path().join(DEST);
        if root {
            // A directory of someone else's in its place is replaced,
            // not given to the service user.
            std::fs::create_dir_all(&dest).unwrap();
            std::fs::write(dest.join("theirs"), "x").unwrap();
            nix::unistd::chown(&dest, Some(7777.into()), Some(7777.into())).unwrap();
        }
        move_files(&src, &dest, Some(owner), |_| Ok(())).unwrap();
        assert_moved(boot.path(), data.path());
        let ids = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(ids(&dest), owner);
        for name in FILES {
            assert_eq!(ids(&dest.join(name)), owner, "{name}");
        }
    }
}
