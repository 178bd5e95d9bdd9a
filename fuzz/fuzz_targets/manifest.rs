//! The service manifest (`/etc/cloudlet/services.toml`, TOML).
//!
//! Never panics; an accepted manifest keeps every promise `Manifest::parse`
//! makes to the supervisor: valid unique names, absolute programs and state
//! dirs, bounded durations, sane backoff, and start order after dependencies.
#![no_main]

use std::collections::HashMap;

use cloudlet_init::manifest::{Manifest, MAX_DURATION};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(m) = Manifest::parse(text) else {
        return;
    };
    let mut position = HashMap::new();
    for (i, s) in m.services.iter().enumerate() {
        assert!(
            !s.name.is_empty()
                && s.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "accepted name {:?}",
            s.name
        );
        assert!(
            position.insert(s.name.as_str(), i).is_none(),
            "{:?} accepted twice",
            s.name
        );
        assert!(
            s.exec.first().is_some_and(|p| p.starts_with('/')),
            "{:?}: accepted exec {:?}",
            s.name,
            s.exec
        );
        for d in [
            s.backoff_initial,
            s.backoff_max,
            s.stable_after,
            s.stop_timeout,
        ] {
            assert!(d <= MAX_DURATION, "{:?}: accepted duration {d:?}", s.name);
        }
        assert!(!s.backoff_initial.is_zero(), "{:?}: zero backoff", s.name);
        assert!(s.backoff_max >= s.backoff_initial, "{:?}: backoff", s.name);
        assert!(s.log_lines >= 1, "{:?}: no log lines", s.name);
        assert!(
            s.state_dirs.iter().all(|d| d.is_absolute()),
            "{:?}: relative state dir in {:?}",
            s.name,
            s.state_dirs
        );
    }
    // Start order: everything a service is after comes before it.
    for (i, s) in m.services.iter().enumerate() {
        for dep in &s.after {
            let j = position.get(dep.as_str());
            assert!(
                j.is_some_and(|&j| j < i),
                "{:?} starts at {i}, its dependency {dep:?} at {j:?}",
                s.name
            );
        }
    }
});
