//! TLS on the services, through real processes and a real TLS client
//! (rustls): the box's identity certifies each service's key, a client that
//! pins the identity gets in with a paired device's token or key, and
//! everyone else is refused at the handshake or with 401.

mod common;

use std::sync::Arc;

use cloudlet_runtime::tls;
use cloudlet_testkit::http::{request, request_tls, Body};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A service over TLS that is stopped when the test ends.
struct Running(common::Spawned);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

/// The box's identity certificate, as the sharing service keeps it.
fn identity(data: &std::path::Path) -> CertificateDer<'static> {
    CertificateDer::from(std::fs::read(data.join("sharing/identity.crt")).unwrap())
}

/// The name a client that pinned `identity` gives the box.
fn box_name(identity: &CertificateDer<'_>) -> String {
    tls::box_dns_name(&tls::box_id(&tls::spki_of(identity).unwrap()))
}

/// A client that trusts `root` only, presenting `client` (certificate, key) if given.
fn client(
    root: &CertificateDer<'static>,
    client: Option<(CertificateDer<'static>, Vec<u8>)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

/// A device's own key and self-signed certificate, and the key's hash.
fn device_key() -> (CertificateDer<'static>, Vec<u8>, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["a device".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let hash = tls::key_hash(&rcgen::PublicKeyData::subject_public_key_info(&key));
    (cert.der().clone(), key.serialize_der(), hash)
}

#[test]
fn a_client_that_pins_the_box_gets_in_with_a_paired_token_or_key_and_no_other_way() {
    let d = tempfile::tempdir().unwrap();
    let s = Running(common::spawn_with("storage", d.path(), &[], None, true));
    let root = identity(d.path());
    let name = box_name(&root);
    let get = |config: &Arc<rustls::ClientConfig>, server: &str, auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        request_tls(
            s.0.addr,
            config,
            server,
            "GET",
            "/api/space",
            &h,
            Body::None,
        )
    };
    let bearer = format!("Bearer {}", s.0.token);
    let anonymous = client(&root, None);
    // The box's ID name, and localhost, are on the certificate.
    assert_eq!(get(&anonymous, &name, Some(&bearer)).unwrap().status, 200);
    assert_eq!(
        get(&anonymous, "localhost", Some(&bearer)).unwrap().status,
        200
    );
    assert_eq!(get(&anonymous, &name, None).unwrap().status, 401);
    assert_eq!(
        get(&anonymous, &name, Some("Bearer guess")).unwrap().status,
        401
    );
    // A name the box does not have is refused by the client.
    assert!(get(&anonymous, "example.com", Some(&bearer)).is_err());
    // A client that pinned another box refuses this one.
    let other = device_key().0;
    assert!(get(&client(&other, None), &name, Some(&bearer)).is_err());
    // Plain HTTP to a TLS port gets nothing.
    assert!(request(s.0.addr, "GET", "/health", &[], Body::None)
        .map(|r| r.status != 200)
        .unwrap_or(true));

    // A key the registry does not know: through the handshake, then 401.
    let (cert, key, hash) = device_key();
    let keyed = client(&root, Some((cert, key)));
    assert_eq!(get(&keyed, &name, None).unwrap().status, 401);
    // Paired by its key: in, with no token at all.
    let out =
        s.0.registry
            .owner(&["add-device", "pc", "device", "--key", &hash])
            .unwrap();
    assert!(!out.contains("token"), "{out}");
    assert_eq!(get(&keyed, &name, None).unwrap().status, 200);
    // Revoked: out again.
    let id = out.lines().find_map(|l| l.strip_prefix("device ")).unwrap();
    s.0.registry.owner(&["revoke", id]).unwrap();
    let mut last = 0;
    for _ in 0..50 {
        last = get(&keyed, &name, None).unwrap().status;
        if last == 401 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(last, 401);
}

#[test]
fn plain_http_is_refused_on_any_address_but_loopback() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .args(["storage", "--listen", "0.0.0.0:0", "--plain"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only on a loopback address"), "{err}");
}
