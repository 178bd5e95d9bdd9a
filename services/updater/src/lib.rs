//! The updater service. This first cut reports the running version and slot;
//! bundles, slot writes and rollback arrive with the updater issue.

use std::sync::Arc;

use cloudlet_runtime::auth::Authenticator;
use cloudlet_runtime::router::Router;
use cloudlet_runtime::{health, json, ServiceOptions};
use hyper::{Method, StatusCode};

pub const NAME: &str = "updater";

/// The service's routes: `/health` is public, the rest needs the credential.
pub fn routes(auth: Arc<dyn Authenticator>, slot: Option<String>) -> Router {
    Router::new(auth)
        // Public: init and monitoring check liveness without a credential.
        .public(Method::GET, "/health", |_, _| async { health(NAME) })
        .route(Method::GET, "/api/version", move |_, _| {
            let slot = slot.clone();
            async move {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "slot": slot}),
                )
            }
        })
}

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    let slot = std::env::var("CLOUDLET_SLOT").ok();
    cloudlet_runtime::run_routed(opts, |auth| routes(auth, slot)).await
}
