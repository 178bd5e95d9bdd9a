//! Types that more than one Cloudlet crate speaks.
//!
//! * [`control`]: the request/response protocol on init's control socket.
//! * [`bootstate`]: the A/B boot-state file that U-Boot's `boot.scr` and the
//!   box (init now, the updater later) both read and write.

pub mod bootstate;
pub mod control;
