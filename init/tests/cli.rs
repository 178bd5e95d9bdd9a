//! The binary's command line and exit codes, as a caller sees them.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use cloudlet_init::cli::Exit;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloudlet-init"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_bad_command_line_exits_with_the_usage_code() {
    for args in [
        &["--no-system", "--bogus"][..],
        &["--no-system", "--slot", "C"],
        &["--no-system", "--manifest"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(Exit::Usage as i32), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("usage: cloudlet-init") || err.contains("--slot C"),
            "{err}"
        );
    }
}
