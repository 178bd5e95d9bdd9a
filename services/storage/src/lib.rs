//! The storage service. So far: the storage engine ([`meta::Store`]:
//! metadata in redb over the content-addressed [`blobs::BlobStore`], with
//! safe paths from [`path`]) and `/health`; WebDAV and Range streaming over
//! it come next.

pub mod blobs;
pub mod meta;
pub mod path;

use std::sync::Arc;

use cloudlet_runtime::auth::{unauthorized, Authenticator, TokenAuth};
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
    let _store = Arc::new(store);
    // Never serve without a credential: until pairing exists, the box's access token.
    let auth: Arc<dyn Authenticator> = Arc::new(TokenAuth::load_or_create(
        &opts.state_dir.join("access-token"),
    )?);
    cloudlet_runtime::run_service(opts, move |req| {
        let auth = auth.clone();
        async move {
            if req.uri().path() == "/health" {
                return health(NAME);
            }
            if let Err(e) = auth.check(req.headers()) {
                return unauthorized(&e);
            }
            match req.uri().path() {
                "/" => json(StatusCode::OK, &serde_json::json!({"service": NAME})),
                _ => not_found(),
            }
        }
    })
    .await
}
