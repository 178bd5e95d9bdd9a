//! The storage service. So far: the storage engine ([`meta::Store`]:
//! metadata in redb over the content-addressed [`blobs::BlobStore`], with
//! safe paths from [`path`]) and `/health`; WebDAV and Range streaming over
//! it come next.

pub mod blobs;
pub mod meta;
pub mod path;

use cloudlet_runtime::{health, json, not_found, ServiceOptions};
use hyper::StatusCode;

pub const NAME: &str = "storage";

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    // Ready only once the engine is open: its database, and the sweep of
    // whatever a crash left half-done.
    let dir = opts.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || meta::Store::open(&dir))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    let _store = std::sync::Arc::new(store);
    cloudlet_runtime::run_service(opts, |req| async move {
        match req.uri().path() {
            "/health" => health(NAME),
            "/" => json(StatusCode::OK, &serde_json::json!({"service": NAME})),
            _ => not_found(),
        }
    })
    .await
}
