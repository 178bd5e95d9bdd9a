//! The sync service: a CouchDB-compatible document store that PouchDB's
//! and CouchDB's replicators talk to (see README.md for what is there and
//! what is not yet).
//!
//! * [`revtree`]: a document's revision tree, the winner and conflicts.
//! * [`store`]: databases, documents, changes, `_local` docs and
//!   attachments in one redb file under the service's state directory.
//! * [`mango`]: Mango selectors, the order of JSON values, json indexes.
//! * [`api`]: the HTTP handlers; this file wires them to routes and adds
//!   what every answer needs (CORS for the box's own web UI, errors in
//!   CouchDB's shape).
//! * [`replicator`]: the box's own replicator (`_replicator`,
//!   `/_replicate`, `/_scheduler/docs`), over [`peer`]s: a database here or
//!   a URL.

pub mod api;
pub mod mango;
pub mod mesh;
pub mod peer;
pub mod replicator;
pub mod revtree;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use cloudlet_runtime::auth::{same_site, AuthError, Authenticator};
use cloudlet_runtime::router::{AnyBody, Params, RoutedBody, Router};
use cloudlet_runtime::{health, ServiceOptions};
use http_body_util::BodyExt;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, HOST, ORIGIN, VARY};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use api::{reply, Api, ApiError, CouchShaped};

pub const NAME: &str = "sync";

/// Largest `_bulk_docs` body: a replicator's batch with inline attachments
/// (PouchDB pushes 100 documents with 1 MiB attachments as ~134 MiB). A
/// large body is spooled to the state directory on /data and written a
/// document at a time, so /data's free space is the bound, not memory;
/// 1 GiB keeps one request from filling a small disk twice over (spool
/// and store).
pub const BULK_DOCS_LIMIT: u64 = 1 << 30;
/// Largest single document with its inline attachments, alone or within a
/// `_bulk_docs`. A document being parsed is held in memory whole (its
/// base64 text and then its decoded contents, ~2.5x its size), so this
/// bounds the service's memory on a 1 GiB box to ~160 MiB per write.
pub const DOC_LIMIT: u64 = 64 << 20;
/// `_revs_diff`, `_bulk_get`, `_all_docs` keys, `_changes` doc_ids.
pub const LIST_LIMIT: u64 = 4 << 20;
/// Connections one address may hold open (the runtime's default is 64).
pub const SYNC_CONNECTIONS_PER_IP: usize = 256;
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
        if p.get("db") == Some(replicator::REPLICATOR_DB) && !is_owner(&req) {
            return Box::pin(async { owners_only_answer() });
        }
        let fut = f(api.clone(), req, p);
        Box::pin(async move { fut.await.unwrap_or_else(ApiError::into_response) })
    }
}

/// Whether the request comes from an owner device.
pub fn is_owner<B>(req: &Request<B>) -> bool {
    req.extensions()
        .get::<cloudlet_runtime::auth::Identity>()
        .is_some_and(cloudlet_runtime::auth::Identity::is_owner)
}

/// The 403 for a replication asked by anyone but an owner. Replications
/// make the box connect out, with the credentials their documents hold, to
/// any server and to every paired box as this box: only owners see and
/// change them (`_replicator`, `POST /_replicate`). Their state, without
/// credentials, is for every paired device (`/_scheduler/docs`).
pub fn owners_only_answer() -> Response<AnyBody> {
    reply(
        StatusCode::FORBIDDEN,
        &json!({
            "error": "forbidden",
            "reason": "Only the box's owner may see or change its replications.",
        }),
    )
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
    routes_with_replicator(auth, api, None)
}

/// [`routes_with`] and, when given, the replicator's own routes
/// (`/_replicate`, `/_scheduler/docs`, `/_active_tasks`).
pub fn routes_with_replicator(
    auth: Arc<dyn Authenticator>,
    api: Arc<Api>,
    rep: Option<Arc<replicator::Replicator>>,
) -> Router {
    let doc_id = |p: &Params| param(p, "docid");
    let design_id = |p: &Params| format!("_design/{}", param(p, "ddoc"));
    let login_auth = auth.clone();
    let router = Router::new(auth)
        // Public: init and monitoring check liveness without a credential.
        .public(Method::GET, "/health", |_, _| async { health(NAME) });
    // Before `/{db}` and `/{db}/{docid}`, which would match them too.
    let router = match rep {
        Some(rep) => replicator::routes(router, rep),
        None => router,
    };
    router
        .route(Method::GET, "/", h(&api, |a, _, _| async move { a.welcome() }))
        .route(Method::GET, "/_all_dbs", h(&api, |a, _, _| async move { a.all_dbs().await }))
        // Public: logging in is how a client gets its credential (the
        // password is checked here, as Basic's would be), and logging out
        // only ends the session its cookie names.
        .public(Method::POST, "/_session", h(&api, move |a, r, _| {
            let auth = login_auth.clone();
            async move { a.login(r, auth).await }
        }))
        .public(Method::DELETE, "/_session", h(&api, |a, r, _| async move { a.logout(r.headers()) }))
        .route(Method::GET, "/_cloudlet/cors", h(&api, |a, _, _| async move { a.get_cors() }))
        .route(Method::PUT, "/_cloudlet/cors", h(&api, |a, r, _| async move { a.put_cors(r).await }))
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
        .route(Method::POST, "/{db}/_find", h(&api, |a, r, p| async move { a.find(param(&p, "db"), r).await }))
        .route(Method::POST, "/{db}/_explain", h(&api, |a, r, p| async move { a.explain(param(&p, "db"), r).await }))
        .route(Method::GET, "/{db}/_index", h(&api, |a, _, p| async move { a.get_indexes(param(&p, "db")).await }))
        .route(Method::POST, "/{db}/_index", h(&api, |a, r, p| async move { a.create_index(param(&p, "db"), r).await }))
        .route(Method::DELETE, "/{db}/_index/_design/{ddoc}/json/{name}", h(&api, |a, _, p| async move { a.delete_index(param(&p, "db"), param(&p, "ddoc"), param(&p, "name")).await }))
        .route(Method::DELETE, "/{db}/_index/{ddoc}/json/{name}", h(&api, |a, _, p| async move { a.delete_index(param(&p, "db"), param(&p, "ddoc"), param(&p, "name")).await }))
        .route(Method::POST, "/{db}/_compact", h(&api, |a, _, p| async move { a.compact(param(&p, "db")).await }))
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
        .route(Method::PUT, "/{db}/_design/{ddoc}/{*att}", h(&api, move |a, r, p| async move { a.put_attachment(param(&p, "db"), design_id(&p), att_name(&p), r).await }))
        .body_limit(DOC_LIMIT)
        .route(Method::DELETE, "/{db}/_design/{ddoc}/{*att}", h(&api, move |a, r, p| async move { a.delete_attachment(param(&p, "db"), design_id(&p), att_name(&p), r).await }))
        .route(Method::GET, "/{db}/{docid}", h(&api, move |a, r, p| async move { a.get_doc(param(&p, "db"), doc_id(&p), r).await }))
        .route(Method::PUT, "/{db}/{docid}", h(&api, move |a, r, p| async move { a.put_doc(param(&p, "db"), doc_id(&p), r).await }))
        .body_limit(DOC_LIMIT)
        .route(Method::DELETE, "/{db}/{docid}", h(&api, move |a, r, p| async move { a.delete_doc(param(&p, "db"), doc_id(&p), r).await }))
        .route(Method::GET, "/{db}/{docid}/{*att}", h(&api, move |a, r, p| async move { a.get_attachment(param(&p, "db"), doc_id(&p), att_name(&p), r).await }))
        .route(Method::PUT, "/{db}/{docid}/{*att}", h(&api, move |a, r, p| async move { a.put_attachment(param(&p, "db"), doc_id(&p), att_name(&p), r).await }))
        .body_limit(DOC_LIMIT)
        .route(Method::DELETE, "/{db}/{docid}/{*att}", h(&api, move |a, r, p| async move { a.delete_attachment(param(&p, "db"), doc_id(&p), att_name(&p), r).await }))
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

/// A `POST /_session` cookie, for the router: on a request without
/// `Authorization`, a live session's token becomes its Basic credential.
/// The cookie is ambient like the runtime's own, so the runtime's
/// same-site rule ([`same_site`]) applies: a request another site's page
/// caused gets 403 (the answer returned), whatever its cookie. Logging in
/// and out are left alone.
fn session_credential<B>(api: &Api, req: &mut Request<B>) -> Option<Response<AnyBody>> {
    use base64::Engine;
    let login = req.uri().path() == "/_session"
        && (req.method() == Method::POST || req.method() == Method::DELETE);
    if login || req.headers().contains_key(AUTHORIZATION) {
        return None;
    }
    let value = api::cookie(req.headers(), api::SESSION_COOKIE)?;
    if !same_site(req.method(), req.headers()) {
        return Some(reply(
            StatusCode::FORBIDDEN,
            &json!({"error": "forbidden", "reason": AuthError::CrossSite.to_string()}),
        ));
    }
    if let Some((name, token)) = api.session(&value) {
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{token}", name.replace(':', "_")));
        if let Ok(v) = HeaderValue::from_str(&format!("Basic {basic}")) {
            req.headers_mut().insert(AUTHORIZATION, v);
        }
    }
    None
}

/// Everything the service answers: CORS preflights without a credential
/// (they carry none), the router's answers with CORS headers added, and
/// the router's own errors (401, 404, 405, 413) reshaped as CouchDB's.
/// CORS allows the box's web UI and the origins the owner added.
pub async fn handle<B>(router: &Router, api: &Api, req: Request<B>) -> Response<AnyBody>
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut req = req;
    let origin = allowed_origin(req.headers()).or_else(|| {
        let o = req.headers().get(ORIGIN)?;
        api.cors_allows(o.to_str().ok()?).then(|| o.clone())
    });
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
                    "Accept, Authorization, Content-Type, If-Match, Last-Event-ID, Origin, Referer, X-Requested-With",
                ),
            );
            h.insert("access-control-max-age", HeaderValue::from_static("600"));
        }
        r
    } else if let Some(refused) = session_credential(api, &mut req) {
        refused
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
    let registry = Arc::new(registry);
    let auth: Arc<dyn Authenticator> = registry.clone();
    let dir = opts.state_dir.clone();
    let store = tokio::task::spawn_blocking(move || store::Store::open(&dir))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    let tls = matches!(transport, cloudlet_runtime::Transport::Tls(_));
    let api = Arc::new(
        Api::new(store)
            .map_err(std::io::Error::other)?
            .served_over_tls(tls),
    );
    // Replications configured in `_replicator` start now and follow it.
    let replicator = replicator::Replicator::new(api.clone());
    // Paired boxes are peers too (`box:BOXID/db`).
    replicator.set_boxes(Arc::new(mesh::Mesh::new(
        registry,
        cloudlet_runtime::dial::Resolver::from_env(),
    )));
    let _watching = replicator.start();
    let service_api = api.clone();
    let router = Arc::new(routes_with_replicator(auth, api, Some(replicator)));
    let mut limits = cloudlet_runtime::Limits::from_env()?;
    // PouchDB's replicator asks for every attachment of a batch (100
    // documents by default) at once, one request each, and Node opens a
    // connection per request: one client needs more than 100 at a time.
    limits.max_connections_per_ip = SYNC_CONNECTIONS_PER_IP;
    cloudlet_runtime::run_service_with(opts, transport, limits, move |req| {
        let router = router.clone();
        let api = service_api.clone();
        async move { handle(&router, &api, req).await }
    })
    .await
}
