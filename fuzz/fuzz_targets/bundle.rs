//! The update bundle verifier (`cloudlet_bundle::verify`): a tar of a signed
//! manifest, its signature, then the parts. Seeded with a real bundle signed
//! by the fixture's test key (`cloudlet_fuzz::bundle_fixture`).
//!
//! Never panics, and:
//! * with keys that signed nothing (none at all, or a stranger's), it never
//!   accepts, and never hands a byte of payload to a sink: the signature is
//!   checked before any part is read;
//! * with the test key trusted, whatever it accepts is the one manifest that
//!   key signed, and the sinks received exactly that bundle's parts.
#![no_main]

use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;

use cloudlet_bundle::verify;
use cloudlet_fuzz::bundle_fixture;
use libfuzzer_sys::fuzz_target;

/// Collects what `verify` streams into one part.
struct Collect(Rc<RefCell<Vec<u8>>>);

impl Write for Collect {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let f = bundle_fixture();

    for keys in [&[][..], &[f.stranger][..]] {
        let r = verify(data, keys, |part| -> std::io::Result<std::io::Sink> {
            panic!(
                "part {:?} opened without a trusted signature ({} keys)",
                part.name,
                keys.len()
            )
        });
        assert!(r.is_err(), "accepted with {} untrusted keys", keys.len());
    }

    let mut sinks = Vec::new();
    let r = verify(data, &[f.stranger, f.public], |part| {
        let buf = Rc::new(RefCell::new(Vec::new()));
        sinks.push((part.name.clone(), buf.clone()));
        Ok(Collect(buf))
    });
    if let Ok(m) = r {
        assert_eq!(m, f.manifest, "accepted a manifest the key never signed");
        let got: Vec<(String, Vec<u8>)> = sinks
            .into_iter()
            .map(|(name, buf)| (name, buf.take()))
            .collect();
        let want: Vec<(String, Vec<u8>)> = cloudlet_bundle::PARTS
            .iter()
            .map(|n| n.to_string())
            .zip(f.parts.iter().cloned())
            .collect();
        assert!(
            got == want,
            "accepted, but the parts streamed are not the signed ones"
        );
    }
});
