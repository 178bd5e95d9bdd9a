//! The sync service. This first cut owns /data/sync and answers like a
//! CouchDB server's root, so replication clients can find it; the replication
//! protocol arrives with the sync issue.

use std::sync::Arc;

use cloudlet_runtime::auth::Authenticator;
use cloudlet_runtime::router::Router;
use cloudlet_runtime::{health, json, ServiceOptions};
use hyper::{Method, StatusCode};

pub const NAME: &str = "sync";

/// The service's routes: `/health` is public, the rest needs the credential.
pub fn routes(auth: Arc<dyn Authenticator>) -> Router {
    Router::new(auth)
        // Public: init and monitoring check liveness without a credential.
        .public(Method::GET, "/health", |_, _| async { health(NAME) })
        .route(Method::GET, "/", |_, _| async {
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "couchdb": "Welcome",
                    "version": env!("CARGO_PKG_VERSION"),
                    "vendor": {"name": "Cloudlet"},
                }),
            )
        })
}

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    cloudlet_runtime::run_routed(opts, routes).await
}
