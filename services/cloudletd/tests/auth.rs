//! Every route of every service refuses a request without the credential,
//! or with a wrong one, unless the service declares it public: the routes
//! are enumerated from each service's router, so a route added later is
//! checked without anyone remembering to add it here. The public routes
//! are listed here on purpose: making a route public is a decision a
//! reviewer sees in this file.

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

/// Every public route of every service: (service, method, path).
const PUBLIC: &[(&str, &str, &str)] = &[
    ("sync", "GET", "/health"),
    // CouchDB's login: the password is a paired device's token.
    ("sync", "POST", "/_session"),
    ("sync", "DELETE", "/_session"),
    ("sharing", "GET", "/health"),
    // Pairing: a native device's request, and a browser's page and calls.
    ("sharing", "POST", "/pair"),
    ("sharing", "GET", "/pair"),
    ("sharing", "GET", "/pair.js"),
    ("sharing", "POST", "/pair/browser"),
    ("sharing", "POST", "/pair/browser/wait"),
    // The identity certificate every handshake shows anyway.
    ("sharing", "GET", "/api/identity"),
    ("updater", "GET", "/health"),
    ("storage", "GET", "/health"),
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

/// How a request presents its credential.
#[derive(Debug, Clone, Copy)]
enum Via<'a> {
    None,
    /// An `Authorization` value.
    Header(&'a str),
    /// A browser's cookie, from a page of the box itself.
    Cookie(&'a str),
    /// A browser's cookie, on a request another site's page caused.
    CrossSiteCookie(&'a str),
}

fn request(method: &Method, path: &str, credential: Via<'_>) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method.clone())
        .uri(path)
        .header("host", "cloudlet:8443");
    b = match credential {
        Via::None => b,
        Via::Header(c) => b.header("authorization", c),
        Via::Cookie(t) => b
            .header("cookie", format!("cloudlet_token={t}"))
            .header("origin", "https://cloudlet:8080"),
        Via::CrossSiteCookie(t) => b
            .header("cookie", format!("cloudlet_token={t}"))
            .header("origin", "https://evil.example"),
    };
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
    let mut public: Vec<(String, String)> = routes
        .iter()
        .filter(|(_, _, public)| *public)
        .map(|(m, p, _)| {
            (
                m.as_ref().map(Method::to_string).unwrap_or_default(),
                p.clone(),
            )
        })
        .collect();
    let mut listed: Vec<(String, String)> = PUBLIC
        .iter()
        .filter(|(s, _, _)| *s == service)
        .map(|(_, m, p)| (m.to_string(), p.to_string()))
        .collect();
    public.sort();
    listed.sort();
    assert_eq!(
        public, listed,
        "{service}: the public routes are the ones listed"
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
                Via::None,
                Via::Header("Bearer wrong"),
                Via::Header("Basic d3Jvbmc6d3Jvbmc="),
                Via::Header(revoked.as_str()),
                Via::Cookie("wrong"),
                Via::Cookie(&p.revoked),
            ] {
                let status = router.handle(request(&m, &path, credential)).await.status();
                if public {
                    assert_ne!(status, 401, "{service}: {m} {path} is public");
                } else {
                    assert_eq!(status, 401, "{service}: {m} {path} with {credential:?}");
                }
            }
            // A good cookie on a request from another site is refused
            // before the route is looked at.
            if !public {
                let status = router
                    .handle(request(&m, &path, Via::CrossSiteCookie(&p.good)))
                    .await
                    .status();
                assert_eq!(
                    status, 403,
                    "{service}: {m} {path} with another site's cookie"
                );
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
    let join = cloudlet_sharing::join::Join::new(
        p.registry.clone(),
        p.notifier.clone(),
        identity.clone(),
        pairing.clone(),
    );
    let devices = cloudlet_sharing::Devices {
        registry: p.registry.clone(),
        notifier: p.notifier.clone(),
        identity: Some(identity),
        pairing: Some(pairing),
        join: Some(join),
    };
    check(
        "sharing",
        cloudlet_sharing::routes(p.auth(), Some(devices)),
        &p,
    )
    .await;
    let updater_dir = tempfile::tempdir().unwrap();
    check(
        "updater",
        cloudlet_updater::routes(
            p.auth(),
            cloudlet_updater::Updater::new(cloudlet_updater::Config::from_env(updater_dir.path())),
        ),
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
            Via::Header(&format!("Bearer {}", p.good)),
        ))
        .await;
    assert_eq!(ok.status(), 200);
    let ok = r
        .handle(request(&Method::GET, "/", Via::Cookie(&p.good)))
        .await;
    assert_eq!(ok.status(), 200, "the cookie of a paired browser");
}
