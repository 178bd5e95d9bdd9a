//! The storage service. This first cut owns /data/storage and answers
//! `/health`; WebDAV and Range streaming arrive with the storage issue.

use cloudlet_runtime::{health, json, not_found, ServiceOptions};
use hyper::StatusCode;

pub const NAME: &str = "storage";

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    cloudlet_runtime::run_service(opts, |req| async move {
        match req.uri().path() {
            "/health" => health(NAME),
            "/" => json(StatusCode::OK, &serde_json::json!({"service": NAME})),
            _ => not_found(),
        }
    })
    .await
}
