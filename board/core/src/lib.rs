//! The box has no screen: its LEDs and its one button are the whole physical
//! user interface. This crate is that interface's logic, with no Linux in it:
//!
//! * [`led`]: patterns for the product states (booting, ready, pairing,
//!   updating, error blink codes, off) driven by deadlines, not busy loops;
//!   any number of LEDs, each an `embedded_hal::digital::OutputPin`.
//! * [`button`]: debounce and press classes (short; long, at least 3 s;
//!   very long, at least 10 s; held at boot), fed by edges; it asks to be
//!   woken only at the deadlines it names, so a board with edge interrupts
//!   never polls.
//!
//! Time is milliseconds from any fixed start, passed in by the caller, so the
//! logic is tested without clocks or hardware (embedded-hal-mock).

#![no_std]

extern crate alloc;

pub mod button;
pub mod led;
