//! The storage service: the household's files over WebDAV at `/files/`, on
//! the storage engine ([`meta::Store`]: metadata in redb over the
//! content-addressed [`blobs::BlobStore`], with safe paths from [`path`]),
//! through the [`dav`] backend.
//!
//! Routes (all but `/health` need the credential):
//! * `/files/...`: WebDAV class 1 and 2; GET streams with byte ranges.
//! * `GET /api/space`: bytes used, the quota, room left, the disk's free space.
//! * `PUT /api/quota` with `{"bytes": N}` or `{"bytes": null}`: sets or lifts the quota.

pub mod blobs;
pub mod dav;
pub mod locks;
pub mod meta;
pub mod path;
pub mod request;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use cloudlet_runtime::auth::Authenticator;
use cloudlet_runtime::router::Router;
use cloudlet_runtime::{health, json, ServiceOptions};
use dav_server::{DavConfig, DavHandler, DavMethod, DavMethodSet};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode};

pub const NAME: &str = "storage";
/// Where WebDAV is served.
pub const FILES_PREFIX: &str = "/files";
/// Bytes per read of a file being sent (two are in memory per GET: one
/// going out, one being read).
const READ_CHUNK: usize = 1 << 20;
/// Largest `/api` request body.
const API_BODY_LIMIT: usize = 4096;

pub type ResponseBody = UnsyncBoxBody<Bytes, std::io::Error>;

fn boxed_dav<B>(b: B) -> ResponseBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    b.map_err(|e| std::io::Error::other(e.into()))
        .boxed_unsync()
}

fn boxed(r: Response<cloudlet_runtime::Body>) -> Response<ResponseBody> {
    r.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

/// Everything a request needs.
pub struct Storage {
    store: Arc<meta::Store>,
    dir: PathBuf,
    fs: dav::StoreFs,
    dav: DavHandler,
}

impl Storage {
    /// Opens the engine in `dir` and sets up WebDAV over it.
    pub fn open(dir: PathBuf) -> Result<Storage, meta::StoreError> {
        let store = Arc::new(meta::Store::open(&dir)?);
        let fs = dav::StoreFs::new(store.clone(), dir.clone());
        // PATCH (sabredav's partial update) is not supported: not offered.
        let mut methods = DavMethodSet::all();
        methods.remove(DavMethod::Patch);
        let dav = DavHandler::builder()
            .filesystem(Box::new(fs.clone()))
            .locksystem(Box::new(locks::BoundedLocks::default()))
            .strip_prefix(FILES_PREFIX)
            .methods(methods)
            .autoindex(true)
            .read_buf_size(READ_CHUNK)
            .build_handler();
        Ok(Storage {
            store,
            dir,
            fs,
            dav,
        })
    }

    pub fn store(&self) -> &meta::Store {
        &self.store
    }

    /// The service's routes: `/health` is public, everything else needs the
    /// credential. WebDAV bodies are bounded by the room on the disk and the
    /// quota (checked as they stream), not by the router.
    pub fn routes(self: &Arc<Self>, auth: Arc<dyn Authenticator>) -> Router {
        let (dav, space, quota) = (self.clone(), self.clone(), self.clone());
        Router::new(auth)
            // Public: init and monitoring check liveness without a credential.
            .public(Method::GET, "/health", |_, _| async { health(NAME) })
            .route(Method::GET, "/", |_, _| async {
                json(
                    StatusCode::OK,
                    &serde_json::json!({"service": NAME, "webdav": format!("{FILES_PREFIX}/")}),
                )
            })
            .route(Method::GET, "/api/space", move |_, _| {
                let s = space.clone();
                async move { s.space().await }
            })
            .route(Method::PUT, "/api/quota", move |req, _| {
                let s = quota.clone();
                async move { s.set_quota(req).await }
            })
            .body_limit(API_BODY_LIMIT as u64)
            .any("/files/{*path}", move |req, _| {
                let s = dav.clone();
                async move { s.handle_files(req).await }
            })
            .body_limit(u64::MAX)
    }

    /// Answers a WebDAV request for `/files/...` (any body type).
    pub async fn handle_files<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path();
        {
            if let Some(r) = check_path(path) {
                return boxed(r);
            }
            use request::Special;
            let mut resp = match request::prepare(req, &self.store).await {
                Err(r) => return boxed(r.response()),
                Ok((req, None)) => self.dav.handle(req).await.map(boxed_dav),
                Ok((req, Some(Special::Tree(op)))) => {
                    let config = DavConfig::new().filesystem(Box::new(self.fs.for_tree(op)));
                    self.dav.handle_with(config, req).await.map(boxed_dav)
                }
                Ok((req, Some(Special::NamedProps(names)))) => {
                    let config = DavConfig::new().filesystem(Box::new(self.fs.named_props()));
                    let resp = self.dav.handle_with(config, req).await;
                    if resp.status() == StatusCode::MULTI_STATUS {
                        resp.map(|b| boxed_dav(request::add_missing_props(b, names)))
                    } else {
                        resp.map(boxed_dav)
                    }
                }
            };
            if resp.headers().contains_key("dav") {
                // dav-server offers sabredav's partial update, which we do not do.
                resp.headers_mut()
                    .insert("dav", hyper::header::HeaderValue::from_static("1, 2, 3"));
            }
            // A stored HTML or SVG file runs no script in the box's origin
            // (it would reach /api with the owner's credential), and no
            // browser guesses a type other than the one sent.
            let h = resp.headers_mut();
            h.insert(
                "content-security-policy",
                hyper::header::HeaderValue::from_static("sandbox"),
            );
            h.insert(
                "x-content-type-options",
                hyper::header::HeaderValue::from_static("nosniff"),
            );
            resp
        }
    }

    async fn space(&self) -> Response<cloudlet_runtime::Body> {
        let (store, dir) = (self.store.clone(), self.dir.clone());
        let r = tokio::task::spawn_blocking(move || -> Result<_, meta::StoreError> {
            Ok(serde_json::json!({
                "used_bytes": store.used()?,
                "quota_bytes": store.quota()?,
                "room_bytes": dav::room(&store, &dir)?,
                "disk_available_bytes": dav::disk_available(&dir),
            }))
        })
        .await;
        match r {
            Ok(Ok(v)) => json(StatusCode::OK, &v),
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    async fn set_quota<B>(&self, req: Request<B>) -> Response<cloudlet_runtime::Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // `bytes` must be there: a number, or null to lift the quota (a
        // missing field must not lift it silently).
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct SetQuota {
            #[serde(deserialize_with = "present")]
            bytes: Option<u64>,
        }
        fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            serde::Deserialize::deserialize(d)
        }
        let body = match http_body_util::Limited::new(req.into_body(), API_BODY_LIMIT)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
        };
        let q: SetQuota = match serde_json::from_slice(&body) {
            Ok(q) => q,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("expected {{\"bytes\": N or null}}: {e}"),
                )
            }
        };
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.set_quota(q.bytes)).await {
            Ok(Ok(())) => self.space().await,
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }
}

/// Refuses, before dav-server sees it, a path that is not UTF-8 or that
/// [`path::normalize`] would not accept (`..`, NUL, backslash, too long).
fn check_path(raw: &str) -> Option<Response<cloudlet_runtime::Body>> {
    let Ok(decoded) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return Some(error(StatusCode::BAD_REQUEST, "the path is not UTF-8"));
    };
    match path::normalize(&decoded) {
        Ok(_) => None,
        Err(e @ path::PathError::TooLong(_)) => {
            Some(error(StatusCode::URI_TOO_LONG, &e.to_string()))
        }
        Err(e) => Some(error(StatusCode::BAD_REQUEST, &e.to_string())),
    }
}

fn error(status: StatusCode, msg: &str) -> Response<cloudlet_runtime::Body> {
    json(status, &serde_json::json!({"error": msg}))
}

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    // Ready only once the engine is open: its database, and the sweep of
    // whatever a crash left half-done.
    let dir = opts.state_dir.clone();
    let storage = tokio::task::spawn_blocking(move || Storage::open(dir))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    let storage = Arc::new(storage);
    // Never serve without a credential: until pairing exists, the box's access token.
    cloudlet_runtime::run_routed(opts, |auth| storage.routes(auth)).await
}
