//! `cloudlet-init`: PID 1 on the box (stage 1 in the initramfs, stage 2 on
//! the root), or a plain supervisor with `--no-system` on a development machine.

use std::path::PathBuf;
use std::process::ExitCode;

use cloudlet_init::{run, stage1, Options};
use cloudlet_proto::bootstate::Slot;

const USAGE: &str =
    "usage: cloudlet-init [--no-system] [--manifest FILE] [--etc DIR] [--control-socket PATH]
                     [--data DIR] [--disk DEV] [--slot A|B]";

fn parse_args(pid1: bool) -> Result<Options, String> {
    let mut o = Options {
        manifest: PathBuf::from("/etc/cloudlet/services.toml"),
        etc: PathBuf::from("/etc"),
        control_socket: PathBuf::from(cloudlet_proto::control::SOCKET_PATH),
        system: pid1,
        disk: None,
        slot: None,
        data_dir: PathBuf::from("/data"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--no-system" => o.system = false,
            "--manifest" => o.manifest = value()?.into(),
            "--etc" => o.etc = value()?.into(),
            "--control-socket" => o.control_socket = value()?.into(),
            "--data" => o.data_dir = value()?.into(),
            "--disk" => o.disk = Some(value()?.into()),
            "--slot" => {
                let v = value()?;
                o.slot =
                    Some(Slot::parse(&v).ok_or_else(|| format!("--slot {v:?}: expected A or B"))?);
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            // The kernel passes unknown command-line words to init as arguments.
            _ if pid1 => {}
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    if pid1 && std::path::Path::new("/etc/cloudlet/initramfs").exists() {
        let err = stage1::run();
        stage1::fail(&err);
    }
    let opts = match parse_args(pid1) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if opts.system {
        // /dev may not be mounted yet when PID 1 is started without stage 1.
        let _ = cloudlet_init::system::mounts::early();
        stage1::ensure_stdio();
        cloudlet_init::logging::init_system();
    } else {
        cloudlet_init::logging::init_stderr();
    }
    loop {
        let r = std::panic::catch_unwind(|| run(opts.clone()));
        match r {
            Ok(Ok(())) if !opts.system => return ExitCode::SUCCESS,
            Ok(Err(e)) if !opts.system => {
                eprintln!("cloudlet-init: {e}");
                return ExitCode::FAILURE;
            }
            // PID 1 must not exit: log and start over (services are still ours to reap).
            Ok(Ok(())) => tracing::error!("init main loop returned; restarting it"),
            Ok(Err(e)) => tracing::error!(error = %e, "init failed; restarting its main loop"),
            Err(_) => tracing::error!("init main loop panicked; restarting it"),
        }
        if !opts.system {
            return ExitCode::FAILURE;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
