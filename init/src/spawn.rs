//! Starting one service process: user, environment, working directory, its
//! own session and process group, output into a pipe, readiness on fd 3.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::OFlag;

use crate::manifest::{Readiness, ServiceSpec, Stdio as SpecStdio};
use crate::users::{self, UserError};

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// the manifest gave no program
    #[error("exec is empty")]
    EmptyExec,
    /// the program cannot be looked at (missing?)
    #[error("{path}: {source}")]
    Program {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the program is not an executable file
    #[error("{0}: not an executable file")]
    NotExecutable(PathBuf),
    /// the service's user is unknown
    #[error(transparent)]
    User(#[from] UserError),
    /// no pipe for the output or readiness
    #[error("pipe: {0}")]
    Pipe(std::io::Error),
    /// the console cannot be opened for a console service
    #[error("/dev/console: {0}")]
    Console(std::io::Error),
    /// fork or exec failed
    #[error("{program}: {source}")]
    Start {
        program: String,
        source: std::io::Error,
    },
}

/// The file descriptor a `notify` service writes `READY` to.
pub const READY_FD: i32 = 3;

/// A started process and init's ends of its pipes.
pub struct Spawned {
    pub pid: u32,
    /// Read end of the process's stdout+stderr (absent for console services).
    pub output: Option<OwnedFd>,
    /// Read end of the readiness pipe (notify services only).
    pub ready: Option<OwnedFd>,
}

/// Replaces `$NAME` in `arg` with init's variables.
pub fn expand(arg: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_owned();
    // Longest names first, so that $A_B is not cut by $A.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        if let Some(v) = vars.get(name) {
            out = out.replace(&format!("${name}"), v);
        }
    }
    out
}

fn check_program(path: &str) -> Result<(), SpawnError> {
    let meta = std::fs::metadata(path).map_err(|source| SpawnError::Program {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(SpawnError::NotExecutable(path.into()));
    }
    Ok(())
}

/// Starts `spec`. `etc` is where passwd is read from; `vars` are init's variables
/// (also put into the environment).
pub fn spawn(
    spec: &ServiceSpec,
    etc: &Path,
    vars: &BTreeMap<String, String>,
) -> Result<Spawned, SpawnError> {
    let argv: Vec<String> = spec.exec.iter().map(|a| expand(a, vars)).collect();
    let program = argv.first().ok_or(SpawnError::EmptyExec)?;
    // Checked here so that a missing binary is a clear error, not a failed exec in the child.
    check_program(program)?;

    let user = spec
        .user
        .as_deref()
        .map(|u| users::lookup(etc, u))
        .transpose()?;

    let mut cmd = Command::new(program);
    cmd.args(argv.iter().skip(1));
    cmd.env_clear();
    cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd.env("CLOUDLET_SERVICE", &spec.name);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    match &user {
        Some(u) => {
            cmd.env("HOME", &u.home)
                .env("USER", &u.name)
                .uid(u.uid)
                .gid(u.gid);
        }
        None => {
            cmd.env("HOME", "/").env("USER", "root");
        }
    }
    for (k, v) in &spec.env {
        cmd.env(k, expand(v, vars));
    }
    if let Some(dir) = &spec.working_dir {
        cmd.current_dir(dir);
    }

    let mut output_read = None;
    match spec.stdio {
        SpecStdio::Log => {
            let (r, w) =
                nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SpawnError::Pipe(e.into()))?;
            let w2 = w.try_clone().map_err(SpawnError::Pipe)?;
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(w))
                .stderr(Stdio::from(w2));
            output_read = Some(r);
        }
        SpecStdio::Console => {
            let open = || File::options().read(true).write(true).open("/dev/console");
            let (i, o, e) = (
                open().map_err(SpawnError::Console)?,
                open().map_err(SpawnError::Console)?,
                open().map_err(SpawnError::Console)?,
            );
            cmd.stdin(i).stdout(o).stderr(e);
        }
    }

    let mut ready_read = None;
    let mut ready_write: Option<OwnedFd> = None;
    if spec.ready == Readiness::Notify {
        let (r, w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SpawnError::Pipe(e.into()))?;
        cmd.env("CLOUDLET_READY_FD", READY_FD.to_string());
        ready_read = Some(r);
        ready_write = Some(w);
    }
    let ready_raw = ready_write.as_ref().map(|w| w.as_raw_fd());

    // SAFETY: the closure only makes async-signal-safe system calls (setsid,
    // dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if let Some(fd) = ready_raw {
                if fd == READY_FD {
                    let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
                    nix::libc::fcntl(fd, nix::libc::F_SETFD, flags & !nix::libc::FD_CLOEXEC);
                } else if nix::libc::dup2(fd, READY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| SpawnError::Start {
        program: program.clone(),
        source,
    })?;
    // The child is reaped by init's SIGCHLD handler, not through `child`.
    let pid = child.id();
    drop(child);
    drop(ready_write);
    Ok(Spawned {
        pid,
        output: output_read,
        ready: ready_read,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn expands_longest_names_first() {
        let vars = BTreeMap::from([
            ("CLOUDLET_NET".to_owned(), "x".to_owned()),
            ("CLOUDLET_NET_IFACE".to_owned(), "eth0".to_owned()),
        ]);
        assert_eq!(expand("-i$CLOUDLET_NET_IFACE", &vars), "-ieth0");
        assert_eq!(expand("$CLOUDLET_NET/$UNKNOWN", &vars), "x/$UNKNOWN");
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let spec = crate::manifest::Manifest::parse(
            "[[service]]\nname=\"a\"\nexec=[\"/nonexistent/prog\"]\n",
        )
        .unwrap()
        .services
        .remove(0);
        let err = spawn(&spec, Path::new("/etc"), &BTreeMap::new())
            .err()
            .unwrap();
        assert!(matches!(err, SpawnError::Program { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/prog"), "{err}");
    }
}
