//! The sync service. This first cut owns /data/sync and answers like a
//! CouchDB server's root, so replication clients can find it; the replication
//! protocol arrives with the sync issue.

use cloudlet_runtime::{health, json, not_found, ServiceOptions};
use hyper::StatusCode;

pub const NAME: &str = "sync";

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    cloudlet_runtime::run_service(opts, |req| async move {
        match req.uri().path() {
            "/health" => health(NAME),
            "/" => json(
                StatusCode::OK,
                &serde_json::json!({
                    "couchdb": "Welcome",
                    "version": env!("CARGO_PKG_VERSION"),
                    "vendor": {"name": "Cloudlet"},
                }),
            ),
            _ => not_found(),
        }
    })
    .await
}
