//! Types that more than one Cloudlet crate speaks.
//!
//! * [`control`]: the request/response protocol on init's control socket.
//! * [`bootstate`]: the A/B boot-state file that U-Boot's `boot.scr` and the
//!   box (init and the updater) both read and write.
//! * [`update`]: the updater's status, for the client and the web UI.

pub mod bootstate;
pub mod control;
pub mod update;
