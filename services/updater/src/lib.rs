//! The updater service. This first cut reports the running version and slot;
//! bundles, slot writes and rollback arrive with the updater issue.

use cloudlet_runtime::{health, json, not_found, ServiceOptions};
use hyper::StatusCode;

pub const NAME: &str = "updater";

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    let slot = std::env::var("CLOUDLET_SLOT").ok();
    cloudlet_runtime::run_service(opts, move |req| {
        let slot = slot.clone();
        async move {
            match req.uri().path() {
                "/health" => health(NAME),
                "/api/version" => json(
                    StatusCode::OK,
                    &serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "slot": slot}),
                ),
                _ => not_found(),
            }
        }
    })
    .await
}
