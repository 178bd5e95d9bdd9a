//! What a box reads from a mirror before it trusts anything: a bundle's head
//! read by ranges for a delta install (`cloudlet_bundle::delta::read_head`,
//! then `plan` against an empty local store) and a channel index
//! (`cloudlet_bundle::verify_index`). Seeded with the fixture's real bundle.
//!
//! Never panics, and:
//! * with keys that signed nothing, neither is ever accepted;
//! * with the test key trusted, an accepted head carries exactly the
//!   manifest that key signed, and its plan fetches every part whole (there
//!   is nothing local to reuse).
#![no_main]

use cloudlet_bundle::delta::{plan, read_head, Local, Step};
use cloudlet_fuzz::bundle_fixture;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = bundle_fixture();
    for keys in [&[][..], &[f.stranger][..]] {
        let mut src = data.to_vec();
        assert!(read_head(&mut src, keys).is_err(), "a head accepted with untrusted keys");
        assert!(cloudlet_bundle::verify_index(data, keys).is_err(), "an index accepted with untrusted keys");
    }
    let mut src = data.to_vec();
    if let Ok(remote) = read_head(&mut src, &[f.stranger, f.public]) {
        assert_eq!(remote.manifest, f.manifest, "accepted a manifest the key never signed");
        if let Ok(p) = plan(&remote, &Local::new()) {
            let wanted: u64 = remote.manifest.parts.iter().map(|p| p.size).sum();
            assert_eq!(p.reused_bytes, 0, "reused chunks from an empty store");
            assert!(p.parts.iter().flatten().all(|s| matches!(s, Step::Fetch { .. })));
            assert_eq!(p.fetch_bytes, wanted, "the plan does not fetch every part whole");
        }
    }
    let _ = cloudlet_bundle::verify_index(data, &[f.public]);
});
