//! Cloudlet's PID 1.
//!
//! Stage 1 ([`stage1`]) runs from the initramfs: it loads the board's kernel
//! modules, finds the disk, mounts the booted slot's read-only root and
//! switches to it. Stage 2 ([`run`]) is the real init: API filesystems,
//! /data, hostname, network, clock, then the supervisor ([`supervisor`]) that
//! starts services from the manifest ([`manifest`]) and answers the control
//! socket ([`control`]). The same binary also runs unprivileged on a
//! development machine (`--no-system`) to supervise services in a temporary
//! directory; the host tests use that.

pub mod board;
pub mod bootcommit;
pub mod control;
pub mod logbuf;
pub mod logging;
pub mod manifest;
mod pid1;
pub mod spawn;
pub mod stage1;
pub mod supervisor;
pub mod system;
pub mod users;

pub use pid1::{run, Options, ShutdownMode};

/// The version of the image, from the build.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
