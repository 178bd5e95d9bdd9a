//! Stage 1, from the initramfs: modules, disk, the slot's root, switch.
//!
//! On any failure it waits a little and reboots: U-Boot has already counted
//! this boot attempt down, so a slot that cannot boot is left for the other.

use std::convert::Infallible;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_proto::bootstate::Slot;
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

use crate::system::disk::DiskError;
use crate::system::mounts::MountError;
use crate::system::{cmdline, disk, kmod, mounts};

const NEWROOT: &str = "/newroot";

/// Why stage 1 could not hand over to the root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    /// an API filesystem could not be mounted
    #[error(transparent)]
    Mount(#[from] MountError),
    /// the kernel release (for the modules directory) is unknown
    #[error("uname: {0}")]
    Uname(Errno),
    /// the boot disk did not appear
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// the new root's mount point cannot be made
    #[error("{path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the slot's root filesystem cannot be mounted
    #[error("mounting {root} on {NEWROOT}: {errno}")]
    MountRoot { root: PathBuf, errno: Errno },
    /// the slot's root has no init to run
    #[error("{0} has no /sbin/init")]
    NoInit(PathBuf),
    /// an API filesystem cannot be moved into the new root
    #[error("moving {from} to {to}: {errno}")]
    Move {
        from: &'static str,
        to: String,
        errno: Errno,
    },
    /// changing directory failed
    #[error("chdir {path}: {source}")]
    Chdir {
        path: &'static str,
        source: std::io::Error,
    },
    /// the new root cannot be moved onto /
    #[error("moving root: {0}")]
    MoveRoot(Errno),
    /// chroot into the new root failed
    #[error("chroot: {0}")]
    Chroot(Errno),
    /// an argument for stage 2 contains a NUL byte
    #[error("argument for /sbin/init: {0}")]
    Nul(#[from] std::ffi::NulError),
    /// exec of stage 2 failed
    #[error("exec /sbin/init: {0}")]
    Exec(Errno),
    /// stage 1 panicked (a bug; the panic's message is logged before this)
    #[error("it panicked")]
    Panicked,
}

/// Runs stage 1. Only returns on failure (after which the caller reboots).
pub fn run() -> Stage1Error {
    match try_run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_run() -> Result<Infallible, Stage1Error> {
    for (what, target, fs) in [
        ("devtmpfs", "/dev", "devtmpfs"),
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
    ] {
        mounts::mount_fs(what, target, fs, MsFlags::MS_NOSUID, None)?;
    }
    crate::logging::init_system();
    tracing::info!(
        "stage 1 (initramfs), uptime {:.3} s",
        crate::system::uptime().as_secs_f64()
    );

    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(Stage1Error::Uname)?;
    let moddir = PathBuf::from("/lib/modules").join(&release);
    let wanted: Vec<String> = std::fs::read_to_string("/etc/cloudlet/modules")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    for p in kmod::load(&moddir, &wanted) {
        tracing::warn!("{p}");
    }

    let cmd = cmdline::read();
    let slot = cmd
        .get("cloudlet.slot")
        .and_then(|s| Slot::parse(s))
        .unwrap_or(Slot::A);
    let disk = disk::find(Duration::from_secs(15))?;
    let root = disk::partition_path(&disk, disk::root_partition(slot));
    tracing::info!(slot = %slot, root = %root.display(), "mounting root");
    std::fs::create_dir_all(NEWROOT).map_err(|source| Stage1Error::CreateDir {
        path: NEWROOT.into(),
        source,
    })?;
    mount(
        Some(&root),
        NEWROOT,
        Some("squashfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|errno| Stage1Error::MountRoot {
        root: root.clone(),
        errno,
    })?;
    if !Path::new(NEWROOT).join("sbin/init").exists() {
        return Err(Stage1Error::NoInit(root));
    }
    for m in ["/dev", "/proc", "/sys"] {
        let to = format!("{NEWROOT}{m}");
        mount(
            Some(m),
            to.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|errno| Stage1Error::Move { from: m, to, errno })?;
    }
    free_initramfs();
    let chdir = |path: &'static str| {
        std::env::set_current_dir(path).map_err(|source| Stage1Error::Chdir { path, source })
    };
    chdir(NEWROOT)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(Stage1Error::MoveRoot)?;
    nix::unistd::chroot(".").map_err(Stage1Error::Chroot)?;
    chdir("/")?;

    let c = |s: &str| CString::new(s);
    let args = [
        c("/sbin/init")?,
        c("--disk")?,
        c(&disk.to_string_lossy())?,
        c("--slot")?,
        c(slot.name())?,
    ];
    // Queued console lines would die with this process image.
    crate::logging::flush(Duration::from_secs(2));
    let e = match nix::unistd::execv(&c("/sbin/init")?, &args) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    Err(Stage1Error::Exec(e))
}

/// The initramfs has no /dev/console node (it is built without root), so the
/// kernel started us with fds 0-2 closed. Point them at the console now, or
/// the first files we open would become "stdout"; stage 2 inherits them.
pub fn ensure_stdio() {
    use std::os::fd::{AsRawFd, IntoRawFd};
    type Dup = fn(&std::fs::File) -> nix::Result<()>;
    let dups: [(i32, Dup); 3] = [
        (0, |f| nix::unistd::dup2_stdin(f)),
        (1, |f| nix::unistd::dup2_stdout(f)),
        (2, |f| nix::unistd::dup2_stderr(f)),
    ];
    for (fd, dup) in dups {
        if is_open(fd) {
            continue;
        }
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/console")
            .or_else(|_| {
                std::fs::File::options()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            });
        let Ok(f) = f else { continue };
        if f.as_raw_fd() == fd {
            // Opened as the lowest free descriptor: it already is this one; keep it open.
            let _ = f.into_raw_fd();
        } else {
            // `f` is closed when it goes; the copy on `fd` stays.
            let _ = dup(&f);
        }
    }
}

/// Whether `fd` is an open descriptor in this process.
fn is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD takes no argument and touches no memory; on a
    // descriptor that is not open it fails with EBADF, which is the answer.
    // (A BorrowedFd cannot be used here: it must only name open descriptors.)
    unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) != -1 }
}

/// The initramfs stays in RAM until its files are deleted.
fn free_initramfs() {
    let Ok(entries) = std::fs::read_dir("/") else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if ["/newroot", "/dev", "/proc", "/sys"]
            .iter()
            .any(|k| p == Path::new(k))
        {
            continue;
        }
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

/// Stage 1 failed: say so, give a person time to read it, reboot.
pub fn fail(err: &Stage1Error) -> ! {
    tracing::error!("stage 1 failed: {err}; rebooting in 5 s");
    crate::logging::flush(Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(5));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
