//! The certificates any LAN client may send in a TLS handshake
//! (`cloudlet_runtime::tls`): the server names the client's key (`spki_of`
//! and `key_hash`, as `peer_key` and the client verifier do) and, for a
//! chain [leaf, issuer], the issuer's key when the issuer is a CA that
//! signed the leaf (`certified_by`, as `peer_issuer` and box-to-box calls
//! do). The input is the chain, split by `cloudlet_fuzz::ChainInput`.
//!
//! Never panics, and:
//! * the key `certified_by` names is the issuer's own (`spki_of`);
//! * a CA made at start, which signed nothing but itself, certifies no leaf;
//! * the fixture's box identity (`SERVICE_CHAIN`) certifies only the two
//!   certificates it signed: a leaf it accepts names the service's key or
//!   its own.
#![no_main]

use std::sync::OnceLock;

use cloudlet_fuzz::{ChainInput, SERVICE_CHAIN};
use cloudlet_runtime::tls::{box_id, certified_by, key_hash, spki_of, IdentityKeys};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

struct Fixture {
    /// A fresh box identity's certificate.
    stranger: CertificateDer<'static>,
    identity: CertificateDer<'static>,
    /// The keys of the two certificates `identity` signed.
    signed_keys: [Vec<u8>; 2],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let stranger = IdentityKeys::generate().expect("a fresh identity");
        let chain = ChainInput::split(SERVICE_CHAIN);
        let key = |der: &[u8]| spki_of(&CertificateDer::from(der)).expect("the fixture's key");
        Fixture {
            stranger: CertificateDer::from(stranger.cert_der),
            identity: CertificateDer::from(chain.issuer.to_vec()),
            signed_keys: [key(chain.leaf), key(chain.issuer)],
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let chain = ChainInput::split(data);
    let leaf = CertificateDer::from(chain.leaf);
    let issuer = CertificateDer::from(chain.issuer);

    for cert in [&leaf, &issuer] {
        if let Some(spki) = spki_of(cert) {
            let _ = (key_hash(&spki), box_id(&spki));
        }
    }
    for (l, i) in [(&leaf, &issuer), (&issuer, &leaf), (&leaf, &leaf)] {
        if let Some(spki) = certified_by(l, i) {
            assert_eq!(
                Some(spki),
                spki_of(i),
                "named a key the issuer does not have"
            );
        }
    }

    assert_eq!(
        certified_by(&leaf, &f.stranger),
        None,
        "certified by a CA that signed nothing"
    );
    if certified_by(&leaf, &f.identity).is_some() {
        if let Some(spki) = spki_of(&leaf) {
            assert!(
                f.signed_keys.contains(&spki),
                "the identity certified a key it never signed"
            );
        }
    }
});
