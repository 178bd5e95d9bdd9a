//! Stage 1, from the initramfs: modules, disk, the slot's root, switch.
//!
//! On any failure it waits a little and reboots: U-Boot has already counted
//! this boot attempt down, so a slot that cannot boot is left for the other.

use std::convert::Infallible;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_proto::bootstate::Slot;
use nix::mount::{mount, MsFlags};

use crate::system::{cmdline, disk, kmod, mounts};

const NEWROOT: &str = "/newroot";

/// Runs stage 1. Only returns on failure (after which the caller reboots).
pub fn run() -> String {
    match try_run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_run() -> Result<Infallible, String> {
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
        .map_err(|e| format!("uname: {e}"))?;
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
    let disk = disk::find(Duration::from_secs(15)).map_err(|e| e.to_string())?;
    let part = match slot {
        Slot::A => disk::PART_ROOT_A,
        Slot::B => disk::PART_ROOT_B,
    };
    let root = disk::partition_path(&disk, part);
    tracing::info!(slot = %slot, root = %root.display(), "mounting root");
    std::fs::create_dir_all(NEWROOT).map_err(|e| format!("{NEWROOT}: {e}"))?;
    mount(
        Some(&root),
        NEWROOT,
        Some("squashfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(|e| format!("mounting {} on {NEWROOT}: {e}", root.display()))?;
    if !Path::new(NEWROOT).join("sbin/init").exists() {
        return Err(format!("{} has no /sbin/init", root.display()));
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
        .map_err(|e| format!("moving {m} to {to}: {e}"))?;
    }
    free_initramfs();
    std::env::set_current_dir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;

    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let args = [
        c("/sbin/init")?,
        c("--disk")?,
        c(&disk.to_string_lossy())?,
        c("--slot")?,
        c(slot.name())?,
    ];
    // Queued console lines would die with this process image.
    crate::logging::flush(Duration::from_secs(2));
    let e = nix::unistd::execv(&c("/sbin/init")?, &args);
    Err(format!("exec /sbin/init: {e:?}"))
}

/// The initramfs has no /dev/console node (it is built without root), so the
/// kernel started us with fds 0-2 closed. Point them at the console now, or
/// the first files we open would become "stdout"; stage 2 inherits them.
pub fn ensure_stdio() {
    use std::os::fd::IntoRawFd;
    for fd in 0..3 {
        if nix::fcntl::fcntl(unsafe_fd(fd), nix::fcntl::FcntlArg::F_GETFD).is_ok() {
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
        if let Ok(f) = f {
            let raw = f.into_raw_fd();
            if raw != fd {
                // SAFETY: both are plain descriptor numbers; dup2 onto a closed fd.
                unsafe {
                    nix::libc::dup2(raw, fd);
                    nix::libc::close(raw);
                }
            }
        }
    }
}

fn unsafe_fd(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for F_GETFD, which is harmless on a closed descriptor.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
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
pub fn fail(msg: &str) -> ! {
    tracing::error!("stage 1 failed: {msg}; rebooting in 5 s");
    crate::logging::flush(Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(5));
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
