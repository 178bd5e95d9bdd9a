//! Every route of every service refuses a request without the credential,
//! or with a wrong one, unless the service declares it public: the routes
//! are enumerated from each service's router, so a route added later is
//! checked without anyone remembering to add it here.

use std::sync::Arc;

use cloudlet_runtime::auth::Authenticator;
use cloudlet_runtime::router::Router;
use cloudlet_sharing::registry::{NewDevice, PairedHow, Registry, Role};
use cloudlet_sharing::LocalAuth;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request};

/// The methods a route for "every method" is tried with (WebDAV's and HTTP's).
const EVERY: [&str; 12] = [
    "GET",
    "HEAD",
    "PUT",
    "DELETE",
    "OPTIONS",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
];

/// A registry with one paired device and one revoked; the authenticator
/// over it (the one the sharing service uses), and the two tokens.
struct Paired {
    _dir: tempfile::TempDir,
    registry: Arc<Registry>,
    notifier: Arc<cloudlet_sharing::bus::Notifier>,
    good: String,
    revoked: String,
}

fn paired() -> Paired {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(Registry::open(dir.path()).unwrap());
    let add = |name: &str| {
        registry
            .add(NewDevice {
                name: name.into(),
                role: Role::Owner,
                how: PairedHow::Local,
                key: None,
                token: true,
            })
            .unwrap()
    };
    let (_, good) = add("kept");
    let (gone, revoked) = add("revoked");
    registry.remove(&gone.id).unwrap();
    Paired {
        _dir: dir,
        registry,
        notifier: Arc::default(),
        good: good.unwrap(),
        revoked: revoked.unwrap(),
    }
}

impl Paired {
    fn auth(&self) -> Arc<dyn Authenticator> {
        Arc::new(LocalAuth(self.registry.clone()))
    }
}

fn request(method: &Method, path: &str, credential: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method.clone()).uri(path);
    if let Some(c) = credential {
        b = b.header("authorization", c);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

async fn check(service: &str, router: Router, p: &Paired) {
    let routes = router.describe();
    assert!(
        routes
            .iter()
            .any(|(_, p, public)| p == "/health" && *public),
        "{service}: /health"
    );
    for (method, pattern, public) in routes {
        let path = pattern
            .replace("{*path}", "some/file")
            .replace(['{', '}'], "");
        let methods: Vec<Method> = match method {
            Some(m) => vec![m],
            None => EVERY.iter().map(|m| m.parse().unwrap()).collect(),
        };
        for m in methods {
            let revoked = format!("Bearer {}", p.revoked);
            for credential in [
                None,
                Some("Bearer wrong"),
                Some("Basic d3Jvbmc6d3Jvbmc="),
                Some(revoked.as_str()),
            ] {
                let status = router.handle(request(&m, &path, credential)).await.status();
                if public {
                    assert_ne!(status, 401, "{service}: {m} {path} is public");
                } else {
                    assert_eq!(status, 401, "{service}: {m} {path} with {credential:?}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_private_route_of_every_service_refuses_unpaired_and_revoked_devices() {
    let p = paired();
    check("sync", cloudlet_sync::routes(p.auth()), &p).await;
    let dir = tempfile::tempdir().unwrap();
    let identity =
        Arc::new(cloudlet_sharing::identity::Identity::load_or_create(dir.path()).unwrap());
    let pairing = cloudlet_sharing::pair::Pairing::new(
        dir.path().join("no-init.sock"),
        p.registry.clone(),
        p.notifier.clone(),
        identity.clone(),
    );
    let devices = cloudlet_sharing::Devices {
        registry: p.registry.clone(),
        notifier: p.notifier.clone(),
        identity: Some(identity),
        pairing: Some(pairing),
    };
    check(
        "sharing",
        cloudlet_sharing::routes(p.auth(), Some(devices)),
        &p,
    )
    .await;
    check(
        "updater",
        cloudlet_updater::routes(p.auth(), Some("A".into())),
        &p,
    )
    .await;
    let d = tempfile::tempdir().unwrap();
    let storage = Arc::new(cloudlet_storage::Storage::open(d.path().to_owned()).unwrap());
    check("storage", storage.routes(p.auth()), &p).await;
    // The paired device gets through (so the refusals above mean something).
    let r = cloudlet_sync::routes(p.auth());
    let ok = r
        .handle(request(
            &Method::GET,
            "/",
            Some(&format!("Bearer {}", p.good)),
        ))
        .await;
    assert_eq!(ok.status(), 200);
}
