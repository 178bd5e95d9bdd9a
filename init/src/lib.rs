//! Cloudlet's PID 1.
//!
//! Stage 1 ([`stage1`]) runs from the initramfs: it loads the board's kernel
//! modules, finds the disk, mounts the booted slot's read-only root and
//! switches to it. Stage 2 ([`run`]) is the real init: /data, hostname,
//! network, clock, then the supervisor ([`supervisor`]) that starts services
//! from the manifest ([`manifest`]), the front panel's policy ([`panel`]),
//! when the boot is committed ([`settle`], [`bootcommit`]) or given up
//! ([`health`]), and the control socket ([`control`]). The same binary
//! also runs unprivileged on a development machine (`--no-system`) to
//! supervise services in a temporary directory; the host tests use that.
//!
//! PID 1 must not panic (a PID 1 that exits panics the kernel): init's
//! clippy lints (in its Cargo.toml) deny unwrap, expect, panics, indexing
//! and unchecked arithmetic. Should the main loop fail anyway, init stops
//! everything and reboots ([`after_failure`]); it never starts over.

pub mod board;
pub mod bootcommit;
pub mod cli;
pub mod control;
pub mod health;
pub mod logbuf;
pub mod logging;
pub mod manifest;
pub mod panel;
mod pid1;
pub mod settle;
pub mod spawn;
pub mod stage1;
pub mod supervisor;
pub mod system;
pub mod users;

pub use pid1::{after_failure, reap_forever, run, DataError, Options, RunError, ShutdownMode};

/// The version of the image, from the build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
