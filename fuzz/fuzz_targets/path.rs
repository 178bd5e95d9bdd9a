//! WebDAV path normalization: every path a client sends goes through
//! `cloudlet_storage::path::normalize` before it names anything in the store.
//!
//! Checks the contract on every input: an accepted path is "" (the root) or
//! "/"-joined names, none empty, "." or "..", without NUL or backslash,
//! names of at most 255 bytes and at most 4096 in all; normalizing it again
//! changes nothing; its parent is accepted too; and a path is refused only
//! for one of the reasons the error names.
#![no_main]

use cloudlet_storage::path::{normalize, parent, PathError, MAX_NAME, MAX_PATH};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Clients send percent-decoded UTF-8; invalid bytes become U+FFFD
    // (what a lossy decoder upstream would hand over) rather than being skipped.
    let raw = String::from_utf8_lossy(data);
    match normalize(&raw) {
        Ok(n) => {
            assert!(n.len() <= MAX_PATH, "{} bytes from {raw:?}", n.len());
            assert!(!n.contains(['\0', '\\']), "{n:?} from {raw:?}");
            if !n.is_empty() {
                for name in n.split('/') {
                    assert!(
                        !matches!(name, "" | "." | ".."),
                        "segment {name:?} in {n:?} from {raw:?}"
                    );
                    assert!(name.len() <= MAX_NAME, "name of {} bytes", name.len());
                }
            }
            assert_eq!(normalize(&n).as_ref(), Ok(&n), "not idempotent: {raw:?}");
            let up = parent(&n);
            assert!(n.starts_with(up), "parent {up:?} of {n:?}");
            assert_eq!(normalize(up).as_deref(), Ok(up), "parent of {n:?}");
        }
        Err(e) => {
            let names = || raw.split('/');
            let why_ok = match &e {
                PathError::Escapes(_) => names().any(|p| p == ".."),
                PathError::BadChar(_) => raw.contains(['\0', '\\']),
                PathError::TooLong(_) => {
                    raw.len() > MAX_PATH || names().any(|p| p.len() > MAX_NAME)
                }
            };
            assert!(why_ok, "{raw:?} refused as {e:?}");
        }
    }
});
