//! The sync service: a CouchDB-compatible document store that PouchDB's
//! and CouchDB's replicators talk to (see README.md for what is there and
//! what is not yet).
//!
//! * [`revtree`]: a document's revision tree, the winner and conflicts.
//! * [`store`]: databases, documents, changes, `_local` docs and
//!   attachments in one redb file under the service's state directory.
//! * [`api`]: the HTTP handlers; this file wires them to routes and adds
//!   what every answer needs (CORS for the box's own web UI, errors in
//!   CouchDB's shape).

pub mod api;
pub mod revtree;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use cloudlet_runtime::auth::Authenticator;
use cloudlet_runtime::router::{AnyBody, Params, RoutedBody, Router};
use cloudlet_runtime::{health, ServiceOptions};
use http_body_util::BodyExt;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, HOST, ORIGIN, VARY};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use api::{reply, Api, ApiError, CouchShaped};

pub const NAME: &str = "sync";

/// Largest `_bulk_docs` body: a replicator's batch with inline attachments.
pub const BULK_DOCS_LIMIT: u64 = 64 << 20;
/// Largest single document (with its inline attachments).
pub const DOC_LIMIT: u64 = 16 << 20;
/// `_revs_diff`, `_bulk_get`, `_all_docs` keys, `_changes` doc_ids.
pub const LIST_LIMIT: u64 = 4 << 20;
/// The port of the box's own web UI: the one origin CORS allows.
pub const WEB_UI_PORT: u16 = 8080;

type Answer = Result<Response<AnyBody>, ApiError>;

/// Adapts `async fn(api, req, params) -> Answer` to a route handler.
fn h<F, Fut>(
    api: &Arc<Api>,
    f: F,
) -> impl Fn(
    Request<RoutedBody>,
    Params,
) -> std::pin::Pin<Box<dyn Future<Output = Response<AnyBody>> + Send>>
       + Send
       + Sync
       + 'static
where
    F: Fn(Arc<Api>, Request<RoutedBody>, Params) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let api = api.clone();
    move |req, p| {
        let fut = f(api.clone(), req, p);
        Box::pin(async move { fut.await.unwrap_or_else(ApiError::into_response) })
    }
}

fn param(p: &Params, name: &str) -> String {
    p.get(name).unwrap_or("").to_owned()
}

/// The attachment name from a `{*att}` rest (raw, so decoded here).
fn att_name(p: &Params) -> String {
    percent_encoding::percent_decode_str(p.get("att").unwrap_or(""))
        .decode_utf8_lossy()
        .into_owned()
}

/// The user name of a Basic credential (what `_session` reports).
fn user_name(headers: &HeaderMap) -> String {
    use base64::Engine;
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, _)| u.to_owned()))
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "cloudlet".to_owned())
}

/// The routes over a store in memory, for tests that try every route (the
/// service itself uses [`routes_with`] over its database).
pub fn routes(auth: Arc<dyn Authenticator>) -> Router {
    match store::Store::in_memory().and_then(Api::new) {
        Ok(api) => routes_with(auth, Arc::new(api)),
        // Only if memory for an empty database cannot be had: the
        // credential check stays, every private route is then 404.
        Err(e) => {
            tracing::error!(error = %e, "in-memory store");
            Router::new(auth).public(Method::GET, "/health", |_, _| async { health(NAME) })
        }
    }
}

/// The service's routes: `/health` is public, the rest needs the credential.
/// Literal paths come before `{docid}`, since the first match wins.
pub fn routes_with(auth: Arc<dyn Authenticator>, api: Arc<Api>) -> Router {
    let doc_id = |p: &Params| param(p, "docid");
    let design_id = |p: &Params| format!("_design/{}", param(p, "ddoc"));
    Router::new(auth)
        // Public: init and monitoring check liveness without a credential.
        .public(Method::GET, "/health", |_, _| async { health(NAME) })
        .route(Method::GET, "/", h(&api, |a, _, _| async move { a.welcome() }))
        .route(Method::GET, "/_all_dbs", h(&api, |a, _, _| async move { a.all_dbs().await }))
        .route(
            Method::GET,
            "/_session",
            h(&api, |_, req, _| async move {
                Ok(reply(
                    StatusCode::OK,
                    &json!({
                        "ok": true,
                        "userCtx": {"name": user_name(req.headers()), "roles": ["_admin"]},
                        "info": {"authentication_handlers": ["default"], "authenticated": "default"},
                    }),
                ))
            }),
        )
        .route(Method::PUT, "/{db}", h(&api, |a, _, p| async move { a.create_db(param(&p, "db")).await }))
        .route(Method::GET, "/{db}", h(&api, |a, _, p| async move { a.db_info(param(&p, "db")).await }))
        .route(Method::DELETE, "/{db}", h(&api, |a, _, p| async move { a.delete_db(param(&p, "db")).await }))
        .route(Method::POST, "/{db}", h(&api, |a, r, p| async move { a.post_doc(param(&p, "db"), r).await }))
        .body_limit(DOC_LIMIT)
        .route(Method::GET, "/{db}/_changes", h(&api, |a, r, p| async move { a.changes(param(&p, "db"), r, false).await }))
        .route(Method::POST, "/{db}/_changes", h(&api, |a, r, p| async move { a.changes(param(&p, "db"), r, true).await }))
        .body_limit(LIST_LIMIT)
        .route(Method::GET, "/{db}/_all_docs", h(&api, |a, r, p| async move { a.all_docs(param(&p, "db"), r, false).await }))
        .route(Method::POST, "/{db}/_all_docs", h(&api, |a, r, p| async move { a.all_docs(param(&p, "db"), r, true).await }))
        .body_limit(LIST_LIMIT)
        .route(Method::POST, "/{db}/_bulk_docs", h(&api, |a, r, p| async move { a.bulk_docs(param(&p, "db"), r).await }))
        .body_limit(BULK_DOCS_LIMIT)
        .route(Method::POST, "/{db}/_bulk_get", h(&api, |a, r, p| async move { a.bulk_get(param(&p, "db"), r).await }))
        .body_limit(LIST_LIMIT)
        .route(Method::POST, "/{db}/_revs_diff", h(&api, |a, r, p| async move { a.revs_diff(param(&p, "db"), r).await }))
        .body_limit(LIST_LIMIT)
        .route(
            Method::POST,
            "/{db}/_ensure_full_commit",
            // Every acknowledged change is already durable.
            h(&api, |a, _, p| async move {
                a.db_info(param(&p, "db")).await?;
                Ok(reply(StatusCode::CREATED, &json!({"ok": true, "instance_start_time": "0"})))
            }),
        )
        .route(Method::GET, "/{db}/_revs_limit", h(&api, |a, _, p| async move { a.revs_limit(param(&p, "db")).await }))
        .route(Method::PUT, "/{db}/_revs_limit", h(&api, |a, r, p| async move { a.set_revs_limit(param(&p, "db"), r).await }))
        .route(Method::GET, "/{db}/_local/{id}", h(&api, |a, _, p| async move { a.get_local(param(&p, "db"), param(&p, "id")).await }))
        .route(Method::PUT, "/{db}/_local/{id}", h(&api, |a, r, p| async move { a.put_local(param(&p, "db"), param(&p, "id"), r, false).await }))
        .route(Method::DELETE, "/{db}/_local/{id}", h(&api, |a, r, p| async move { a.put_local(param(&p, "db"), param(&p, "id"), r, true).await }))
        .route(Method::GET, "/{db}/_design/{ddoc}", h(&api, move |a, r, p| async move { a.get_doc(param(&p, "db"), design_id(&p), r).await }))
        .route(Method::PUT, "/{db}/_design/{ddoc}", h(&api, move |a, r, p| async move { a.put_doc(param(&p, "db"), design_id(&p), r).await }))
        .body_limit(DOC_LIMIT)
        .route(Method::DELETE, "/{db}/_design/{ddoc}", h(&api, move |a, r, p| async move { a.delete_doc(param(&p, "db"), design_id(&p), r).await }))
        .route(Method::GET, "/{db}/_design/{ddoc}/{*att}", h(&api, move |a, r, p| async move { a.get_attachment(param(&p, "db"), design_id(&p), att_name(&p), r).await }))
        .route(Method::GET, "/{db}/{docid}", h(&api, move |a, r, p| async move { a.get_doc(param(&p, "db"), doc_id(&p), r).await }))
        .route(Method::PUT, "/{db}/{docid}", h(&api, move |a, r, p| async move { a.put_doc(param(&p, "db"), doc_id(&p), r).await }))
        .body_limit(DOC_LIMIT)
        .route(Method::DELETE, "/{db}/{docid}", h(&api, move |a, r, p| async move { a.delete_doc(param(&p, "db"), doc_id(&p), r).await }))
        .route(Method::GET, "/{db}/{docid}/{*att}", h(&api, move |a, r, p| async move { a.get_attachment(param(&p, "db"), doc_id(&p), att_name(&p), r).await }))
}

/// The web UI's origins on the host the client reached us by: the one
/// cross-origin caller allowed (`http(s)://<host>:8080`).
fn allowed_origin(headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(ORIGIN)?.to_str().ok()?;
    let host = headers.get(HOST)?.to_str().ok()?;
    // The Host header's name without its port (an IPv6 literal keeps its brackets).
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    let ok = ["http", "https"]
        .iter()
        .any(|s| origin == format!("{s}://{name}:{WEB_UI_PORT}"));
    ok.then(|| HeaderValue::from_str(origin).ok()).flatten()
}

/// Everything the service answers: CORS preflights without a credential
/// (they carry none), the router's answers with CORS headers added, and
/// the router's own errors (401, 404, 405, 413) reshaped as CouchDB's.
pub async fn handle<B>(router: &Router, req: Request<B>) -> Response<AnyBody>
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let origin = allowed_origin(req.headers());
    let preflight = req.method() == Method::OPTIONS
        && req.headers().contains_key("access-control-request-method");
    let mut r = if preflight {
        let mut r = reply(StatusCode::NO_CONTENT, &json!(null));
        *r.body_mut() = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        r.headers_mut().remove(hyper::header::CONTENT_TYPE);
        if origin.is_some() {
            let h = r.headers_mut();
            h.insert(
                "access-control-allow-methods",
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS"),
            );
            h.insert(
                "access-control-allow-headers",
                HeaderValue::from_static(
                    "Accept, Authorization, Content-Type, Origin, Referer, X-Requested-With",
                ),
            );
            h.insert("access-control-max-age", HeaderValue::from_static("600"));
        }
        r
    } else {
        let r = router.handle(req).await;
        if r.status().is_client_error() && r.extensions().get::<CouchShaped>().is_none() {
            reshape(r)
        } else {
            r
        }
    };
    if let Some(o) = origin {
        let h = r.headers_mut();
        h.insert("access-control-allow-origin", o);
        h.insert(
            "access-control-allow-credentials",
            HeaderValue::from_static("true"),
        );
        h.insert(
            "access-control-expose-headers",
            HeaderValue::from_static("Content-Type, ETag, Cache-Control"),
        );
    }
    r.headers_mut()
        .append(VARY, HeaderValue::from_static("Origin"));
    r
}

/// One of the router's own errors as CouchDB says it (its headers kept).
fn reshape(r: Response<AnyBody>) -> Response<AnyBody> {
    let (error, reason) = match r.status() {
        StatusCode::UNAUTHORIZED => ("unauthorized", "Name or password is incorrect."),
        StatusCode::NOT_FOUND => ("not_found", "missing"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "Only the methods in Allow are allowed here.",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "the request entity is too large"),
        _ => ("bad_request", "bad request"),
    };
    let (parts, _) = r.into_parts();
    let mut new = reply(parts.status, &json!({"error": error, "reason": reason}));
    for (k, v) in &parts.headers {
        if k != hyper::header::CONTENT_TYPE && k != hyper::header::CONTENT_LENGTH {
            new.headers_mut().insert(k, v.clone());
        }
    }
    new
}

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    std::fs::create_dir_all(&opts.state_dir)?;
    let registry = cloudlet_runtime::registry::RegistryAuth::start_and_wait(
        cloudlet_runtime::registry::socket_path(),
    )
    .await;
    let transport = registry.transport(&opts).await?;
    let auth: Arc<dyn Authenticator> = Arc::new(registry);
    let dir = opts.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&dir))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    let api = Arc::new(Api::new(store).map_err(std::io::Error::other)?);
    let router = Arc::new(routes_with(auth, api));
    cloudlet_runtime::run_service(opts, transport, move |req| {
        let router = router.clone();
        async move { handle(&router, req).await }
    })
    .await
}
