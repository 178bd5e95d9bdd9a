//! Every route of every service refuses a request without the credential,
//! or with a wrong one, unless the service declares it public: the routes
//! are enumerated from each service's router, so a route added later is
//! checked without anyone remembering to add it here.

use std::sync::Arc;

use cloudlet_runtime::auth::{Authenticator, TokenAuth};
use cloudlet_runtime::router::Router;
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

fn auth() -> Arc<dyn Authenticator> {
    Arc::new(TokenAuth::new("the-right-token"))
}

fn request(method: &Method, path: &str, credential: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method.clone()).uri(path);
    if let Some(c) = credential {
        b = b.header("authorization", c);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

async fn check(service: &str, router: Router) {
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
            for credential in [None, Some("Bearer wrong"), Some("Basic d3Jvbmc6d3Jvbmc=")] {
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
async fn every_private_route_of_every_service_needs_the_credential() {
    check("sync", cloudlet_sync::routes(auth())).await;
    check("sharing", cloudlet_sharing::routes(auth())).await;
    check(
        "updater",
        cloudlet_updater::routes(auth(), Some("A".into())),
    )
    .await;
    let d = tempfile::tempdir().unwrap();
    let storage = Arc::new(cloudlet_storage::Storage::open(d.path().to_owned()).unwrap());
    check("storage", storage.routes(auth())).await;
    // The right credential gets through (so the refusals above mean something).
    let r = cloudlet_sync::routes(auth());
    let ok = r
        .handle(request(&Method::GET, "/", Some("Bearer the-right-token")))
        .await;
    assert_eq!(ok.status(), 200);
}
