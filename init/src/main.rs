//! `cloudlet-init`: PID 1 on the box (stage 1 in the initramfs, stage 2 on
//! the root), or a plain supervisor with `--no-system` on a development machine.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

use cloudlet_init::cli::{self, Exit};
use cloudlet_init::{run, stage1, system, Options};

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    if pid1 {
        // A panic is a bug; its message goes where init's logs go (console, kmsg).
        std::panic::set_hook(Box::new(|info| {
            tracing::error!("init panicked: {info}");
        }));
    }
    if pid1 && std::path::Path::new("/etc/cloudlet/initramfs").exists() {
        let err = catch_unwind(stage1::run).unwrap_or(stage1::Stage1Error::Panicked);
        stage1::fail(&err);
    }
    let opts = match cli::parse_args(std::env::args().skip(1), pid1) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return Exit::Usage.into();
        }
    };
    if !opts.system {
        cloudlet_init::logging::init_stderr();
        return match catch_unwind(|| run(opts)) {
            Ok(Ok(())) => Exit::Success.into(),
            Ok(Err(e)) => {
                eprintln!("cloudlet-init: {e}");
                Exit::Failure.into()
            }
            Err(_) => Exit::Failure.into(),
        };
    }
    // PID 1 must not exit, and must not start over either: a second run would
    // mount again and start services whose old copies still hold their ports.
    // So whatever ends the main loop, the box stops everything and reboots
    // (`cloudlet_init::after_failure` says why a reboot).
    let _ = catch_unwind(AssertUnwindSafe(|| system_main(opts)));
    let _ = catch_unwind(cloudlet_init::after_failure);
    // Even that failed: reap orphans until the watchdog or a person resets the box.
    cloudlet_init::reap_forever()
}

/// Stage 2 as PID 1. Returns only when init cannot go on.
fn system_main(opts: Options) {
    // The API filesystems, once: /dev may not be mounted yet when PID 1 is
    // started without stage 1, and logging needs it.
    let mount_problems = system::mounts::early();
    stage1::ensure_stdio();
    cloudlet_init::logging::init_system();
    for problem in mount_problems {
        tracing::error!("{problem}");
    }
    match catch_unwind(AssertUnwindSafe(|| run(opts))) {
        Ok(Ok(())) => tracing::error!("init main loop returned"),
        Ok(Err(e)) => tracing::error!(error = %e, "init failed"),
        Err(_) => tracing::error!("init main loop panicked"),
    }
}
