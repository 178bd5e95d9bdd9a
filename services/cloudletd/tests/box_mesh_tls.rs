//! Box-to-box TLS between services: two sharing services paired box to
//! box (as box_pairing.rs pairs them: the real `cloudlet` command as their
//! owner, a press on each), then a service of box A calls a service of
//! box B presenting its own certificate chain, [service key, A's identity],
//! and checking B's chain against the identity key B's registry pinned.
//!
//! B's service is the runtime's server loop with the registry check every
//! service uses (`RegistryAuth`) and one route that says whom it let in;
//! it runs in this process, with a certificate B's registry issued it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cloudlet_runtime::auth::{Authenticator, Identity};
use cloudlet_runtime::dial::{self, BoxService, Resolver};
use cloudlet_runtime::registry::{RegistryAuth, ServiceCert};
use cloudlet_runtime::tls;
use common::{cloudlet_bin, text, Sharing};
use hyper::{Method, StatusCode};
use rustls::pki_types::CertificateDer;

/// Pairs the device of `config` with box `s` (its first device: the
/// owner); returns the box ID.
fn pair_owner(config: &Path, s: &Sharing) -> String {
    s.press();
    let asks = s.asks();
    let mut pair = Command::new(cloudlet_bin())
        .args(["pair", &s.addr.to_string(), "--name", "laptop"])
        .env("CLOUDLET_CONFIG_DIR", config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut out = BufReader::new(pair.stdout.take().unwrap()).lines();
    for l in out.by_ref().map_while(Result::ok) {
        let waiting = l.starts_with("Waiting");
        lines.push(l);
        if waiting {
            break;
        }
    }
    s.wait_asks(asks + 1);
    s.press();
    lines.extend(out.map_while(Result::ok));
    assert!(pair.wait().unwrap().success(), "{lines:?}");
    lines
        .iter()
        .find_map(|l| l.strip_prefix("Box ID:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Pairs box `a` with box `b` the owner's way: `cloudlet pair-box`, a
/// press on each box to open its window, and a second press on A to
/// confirm B's request.
fn pair_boxes(config: &Path, a: &Sharing, a_id: &str, b: &Sharing, b_id: &str) {
    a.press();
    b.press();
    let asks = a.asks();
    let mut run = Command::new(cloudlet_bin())
        .args(["pair-box", a_id, b_id])
        .env("CLOUDLET_CONFIG_DIR", config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    let mut shown = Vec::new();
    for l in lines.by_ref().map_while(Result::ok) {
        let last = l.contains("press box");
        shown.push(l);
        if last {
            break;
        }
    }
    a.wait_asks(asks + 1);
    a.press();
    shown.extend(lines.map_while(Result::ok));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert!(run.wait().unwrap().success(), "{shown:?} {err}");
    assert!(
        shown
            .iter()
            .any(|l| l.contains("are paired with each other")),
        "{shown:?}"
    );
}

fn socket(s: &Sharing) -> std::path::PathBuf {
    s.data.join("registry.sock")
}

/// A service of the box whose registry is `s`'s, on a free loopback
/// port: TLS with the certificate the registry issues it, the registry's
/// check, and `GET /who` answering with the identity it let in.
async fn service(s: &Sharing) -> (SocketAddr, Arc<RegistryAuth>) {
    let auth = Arc::new(RegistryAuth::start_and_wait(socket(s)).await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = cloudlet_runtime::ServiceOptions {
        listen: addr,
        state_dir: s.data.join("mesh-service"),
        plain: false,
    };
    let transport = auth.transport(&opts).await.unwrap();
    serve(listener, transport, auth.clone());
    (addr, auth)
}

/// Serves `GET /who` on `listener`, letting in whom `auth` lets in.
fn serve(
    listener: tokio::net::TcpListener,
    transport: cloudlet_runtime::Transport,
    auth: Arc<RegistryAuth>,
) {
    let checker: Arc<dyn Authenticator> = auth;
    let router = Arc::new(cloudlet_runtime::router::Router::new(checker).route(
        Method::GET,
        "/who",
        |req, _| async move {
            let who = req.extensions().get::<Identity>().cloned();
            let who = who
                .map(|w| serde_json::json!({"device": w.device, "name": w.name, "role": w.role}));
            cloudlet_runtime::json(StatusCode::OK, &who)
        },
    ));
    tokio::spawn(cloudlet_runtime::serve_listener_on(
        listener,
        transport,
        cloudlet_runtime::Limits::default(),
        move |req| {
            let router = router.clone();
            async move { router.handle(req).await }
        },
        std::future::pending(),
        Duration::from_secs(1),
    ));
}

/// `GET /who` on `addr` as the service holding `own`, checking the server
/// as a service of the box whose identity key hashes to `box_key`.
async fn who(
    own: &ServiceCert,
    box_key: &str,
    addr: SocketAddr,
) -> Result<(u16, serde_json::Value), String> {
    let client = dial::box_client_config(own, box_key)?;
    let mut conn = client.connect(&addr.to_string()).await?;
    conn.call("GET", "/who", None).await
}

fn key_of(s: &Sharing) -> String {
    tls::key_hash(&tls::spki_of(&CertificateDer::from(s.identity())).unwrap())
}

#[test]
fn a_paired_box_service_is_let_in_as_the_box_and_other_chains_are_refused() {
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let config = tempfile::tempdir().unwrap();
    let a = Sharing::start(da.path(), "127.0.0.1:0", &[]);
    let b = Sharing::start(db.path(), "127.0.0.1:0", &[]);
    // C is a box too, paired with nobody.
    let c = Sharing::start(dc.path(), "127.0.0.1:0", &[]);
    let a_id = pair_owner(config.path(), &a);
    let b_id = pair_owner(config.path(), &b);
    pair_boxes(config.path(), &a, &a_id, &b, &b_id);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (b_addr, b_auth) = service(&b).await;
        let (c_addr, c_auth) = service(&c).await;
        // A service of A: its certificate (as A's registry issues it to
        // every service) and the boxes A is paired with.
        let a_auth = RegistryAuth::start_and_wait(socket(&a)).await;
        let a_cert = a_auth.service_cert().await.unwrap();
        assert_eq!(a_cert.chain.len(), 2);
        assert_eq!(
            a_cert.chain[1],
            a.identity(),
            "the chain ends with A's identity"
        );
        assert_ne!(
            tls::key_hash(&tls::spki_of(&CertificateDer::from(a_cert.chain[0].clone())).unwrap()),
            key_of(&a),
            "the service's own key is not the identity's"
        );
        let paired = a_auth.paired_boxes().await.unwrap();
        assert_eq!(paired.len(), 1, "{paired:?}");
        assert_eq!(paired[0].box_id, b_id);
        assert_eq!(paired[0].key_hash, key_of(&b));

        // A's service reaches B's as box A: B's registry names A's device.
        let on_b = b_auth.paired_boxes().await.unwrap();
        assert_eq!(on_b.len(), 1, "{on_b:?}");
        assert_eq!(on_b[0].box_id, a_id);
        let (status, answer) = who(&a_cert, &paired[0].key_hash, b_addr).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["role"], "box", "{answer}");
        assert_eq!(answer["device"], on_b[0].device.as_str(), "{answer}");

        // The same kind of chain from C, a box B never paired: refused.
        let c_cert = c_auth.service_cert().await.unwrap();
        let (status, answer) = who(&c_cert, &key_of(&b), b_addr).await.unwrap();
        assert_eq!(status, 401, "{answer}");

        // A CA key that B knows as a device, not a box: its chains do not
        // make it a box (and a device cannot mint keys that pass).
        let ca = tls::IdentityKeys::generate().unwrap();
        let added = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .args([
                "sharing",
                "add-device",
                "minter",
                "device",
                "--key",
                &ca.key_hash,
            ])
            .env("CLOUDLET_REGISTRY_SOCKET", socket(&b))
            .output()
            .unwrap();
        assert!(added.status.success(), "{}", text(&added));
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = rcgen::CertificateParams::new(vec![tls::box_dns_name(&ca.box_id)])
            .unwrap()
            .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca.params, &ca.key))
            .unwrap();
        let minted = ServiceCert {
            chain: vec![leaf.der().to_vec(), ca.cert_der.clone()],
            key: leaf_key.serialize_der(),
        };
        let (status, answer) = who(&minted, &key_of(&b), b_addr).await.unwrap();
        assert_eq!(status, 401, "{answer}");

        // C's service answering where A expects B: A's client refuses C's
        // chain (it ends with C's identity, not the one B paired with).
        let refused = who(&a_cert, &key_of(&b), c_addr).await.unwrap_err();
        assert!(refused.contains("certificate"), "{refused}");
        // Nor a server with a certificate for B's very name, issued by an
        // identity of its own.
        let fake = tls::IdentityKeys::generate().unwrap();
        let fake_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let fake_leaf = rcgen::CertificateParams::new(vec![tls::box_dns_name(&b_id)])
            .unwrap()
            .signed_by(
                &fake_key,
                &rcgen::Issuer::from_params(&fake.params, &fake.key),
            )
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake_addr = listener.local_addr().unwrap();
        let fake_tls = tls::server_config(
            vec![fake_leaf.der().to_vec(), fake.cert_der.clone()],
            fake_key.serialize_der(),
        )
        .unwrap();
        serve(
            listener,
            cloudlet_runtime::Transport::Tls(fake_tls),
            b_auth.clone(),
        );
        let refused = who(&a_cert, &key_of(&b), fake_addr).await.unwrap_err();
        assert!(refused.contains("certificate"), "{refused}");
        // And a client for C itself gets through TLS, to be refused by C.
        let (status, _) = who(&a_cert, &key_of(&c), c_addr).await.unwrap();
        assert_eq!(status, 401);
    });
}

#[test]
fn a_box_is_found_by_its_id_over_mdns_with_its_sync_port_or_by_a_fixed_address() {
    let d = tempfile::tempdir().unwrap();
    let sync_port = "45984";
    // A port of its own: the record carries the port the service was told
    // to listen on, so not 0.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = Sharing::start(
        d.path(),
        &format!("127.0.0.1:{port}"),
        &[
            ("CLOUDLET_MDNS_INTERFACE", "lo"),
            ("CLOUDLET_SYNC_PORT", sync_port),
        ],
    );
    let spki = tls::spki_of(&CertificateDer::from(s.identity())).unwrap();
    let id = tls::box_id(&spki);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let on_lo = Resolver {
        fixed: None,
        interface: Some("lo".into()),
    };
    let within = Duration::from_secs(20);
    rt.block_on(async {
        // Loopback addresses (IPv4, IPv6 or both, as they come) with the
        // port in TXT `sync`, and the record's own port for sharing.
        let sync = on_lo.resolve(&id, BoxService::Sync, within).await.unwrap();
        assert!(!sync.is_empty());
        for a in &sync {
            assert!(a.ip().is_loopback(), "{sync:?}");
            assert_eq!(a.port().to_string(), sync_port, "{sync:?}");
        }
        let sharing = on_lo
            .resolve(&id, BoxService::Sharing, within)
            .await
            .unwrap();
        assert!(!sharing.is_empty());
        for a in &sharing {
            assert!(a.ip().is_loopback(), "{sharing:?}");
            assert_eq!(a.port(), s.addr.port(), "{sharing:?}");
        }
        // A box nobody announces is not found (within a short look).
        let none = on_lo
            .resolve(
                "aaaa-bbbb-cccc-dddd",
                BoxService::Sync,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
        assert!(none.is_empty(), "{none:?}");
        // An address given by hand wins over mDNS, for that box only.
        let fixed = Resolver {
            fixed: Some(format!("box:{id}@127.0.0.1:7")),
            interface: Some("lo".into()),
        };
        assert_eq!(
            fixed.resolve(&id, BoxService::Sync, within).await.unwrap(),
            vec!["127.0.0.1:7".parse::<SocketAddr>().unwrap()]
        );
    });
}
