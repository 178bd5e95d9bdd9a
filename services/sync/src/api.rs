//! The HTTP API: CouchDB's, as far as replicators use it.
//!
//! Handlers parse the request, run the store's work on a blocking thread
//! (redb does file I/O) and answer JSON. `_changes` and `_all_docs` stream:
//! a blocking producer reads a snapshot and sends the response in pieces
//! through a small channel, so memory does not grow with the database.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use cloudlet_runtime::router::{AnyBody, RoutedBody};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use crate::revtree::{generation, RevTree};
use crate::store::{is_valid_db_name, DocError, DocWrite, Reader, Store, StoreError};

/// Marks a response already shaped as CouchDB's (the service's outer
/// layer reshapes the router's own errors, which lack it).
#[derive(Debug, Clone, Copy)]
pub struct CouchShaped;

/// How long a `_changes` longpoll waits when the client names no timeout.
const DEFAULT_FEED_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes gathered before a piece of a streamed answer is sent.
const CHUNK: usize = 64 << 10;

pub struct Api {
    pub store: Arc<Store>,
    /// Bumped after every committed change; feeds wait on it.
    changed: watch::Sender<u64>,
    uuid: String,
}

/// An error answer: status, CouchDB's error name, reason.
#[derive(Debug)]
pub struct ApiError(StatusCode, &'static str, String);

type Answer = Result<Response<AnyBody>, ApiError>;

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NoDb => ApiError(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            StoreError::DbExists => ApiError(
                StatusCode::PRECONDITION_FAILED,
                "file_exists",
                e.to_string(),
            ),
            StoreError::BadDbName(_) => ApiError(
                StatusCode::BAD_REQUEST,
                "illegal_database_name",
                e.to_string(),
            ),
            StoreError::Db(_) | StoreError::Corrupt(_) => {
                tracing::error!(error = %e, "store");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_server_error",
                    e.to_string(),
                )
            }
        }
    }
}

fn bad(reason: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "bad_request", reason.into())
}

fn not_found(reason: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not_found", reason.to_owned())
}

/// A per-document error as `_bulk_docs` and the status of a single write.
fn doc_error(e: &DocError) -> (StatusCode, &'static str) {
    match e {
        DocError::Conflict => (StatusCode::CONFLICT, "conflict"),
        DocError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        DocError::MissingStub(..) => (StatusCode::PRECONDITION_FAILED, "missing_stub"),
        DocError::Validation(_) => (StatusCode::BAD_REQUEST, "doc_validation"),
    }
}

/// A JSON answer, marked as CouchDB-shaped.
pub fn reply(status: StatusCode, v: &Value) -> Response<AnyBody> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.extensions_mut().insert(CouchShaped);
    r
}

impl ApiError {
    pub fn into_response(self) -> Response<AnyBody> {
        reply(self.0, &json!({"error": self.1, "reason": self.2}))
    }
}

/// A streamed answer: what the producer sends, in order; an error cuts it.
struct ChannelBody(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

fn streamed(rx: mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Response<AnyBody> {
    let mut r = Response::new(ChannelBody(rx).boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.extensions_mut().insert(CouchShaped);
    r
}

/// Gathers a streamed answer into pieces; `false` once the client is gone.
struct Out {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl Out {
    fn new(tx: mpsc::Sender<Result<Bytes, std::io::Error>>) -> Out {
        Out {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// Adds bytes (from a blocking thread), sending a piece when full.
    fn put(&mut self, b: &[u8]) -> bool {
        self.buf.extend_from_slice(b);
        self.buf.len() < CHUNK || self.flush_blocking()
    }

    fn flush_blocking(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let b = Bytes::from(std::mem::take(&mut self.buf));
        self.tx.blocking_send(Ok(b)).is_ok()
    }

    async fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let b = Bytes::from(std::mem::take(&mut self.buf));
        self.tx.send(Ok(b)).await.is_ok()
    }

    /// Cuts the answer short: the client sees a broken response, not a
    /// complete-looking one.
    fn fail(&mut self, e: StoreError) {
        tracing::error!(error = %e, "streaming an answer");
        let _ = self
            .tx
            .blocking_send(Err(std::io::Error::other(e.to_string())));
    }
}

/// The query string's parameters, decoded.
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn of<B>(req: &Request<B>) -> Query {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        Query(
            req.uri()
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (decode(k), decode(v)),
                    None => (decode(p), String::new()),
                })
                .collect(),
        )
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        self.get(k) == Some("true")
    }

    fn number(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| bad(format!("Invalid value for {k}: {v:?}"))),
        }
    }

    /// A parameter that holds JSON (`keys`, `startkey`, `open_revs`).
    fn json(&self, k: &str) -> Result<Option<Value>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => serde_json::from_str(v)
                .map(Some)
                .map_err(|_| bad(format!("{k} is not valid JSON"))),
        }
    }
}

/// Reads a JSON body (an empty one is `null`).
async fn read_json(req: Request<RoutedBody>) -> Result<Value, ApiError> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body could not be read whole: {e}"),
            )
        })?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&body).map_err(|_| bad("invalid UTF-8 JSON"))
}

/// A sequence as the client sent it (`now` is the database's current one).
fn parse_since(v: Option<&Value>, now: u64) -> Result<u64, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| bad("Invalid since")),
        Some(Value::String(s)) if s == "now" => Ok(now),
        Some(Value::String(s)) => {
            // Ours are numbers; CouchDB 2+ sends "N-opaque": take the N.
            let head = s.split('-').next().unwrap_or("");
            head.parse()
                .map_err(|_| bad(format!("Invalid since: {s:?}")))
        }
        Some(_) => Err(bad("Invalid since")),
    }
}

/// What to add to a document when it is shown.
#[derive(Debug, Default, Clone, Copy)]
pub struct Show {
    pub revs: bool,
    pub revs_info: bool,
    pub conflicts: bool,
    pub deleted_conflicts: bool,
    pub attachments: bool,
}

impl Show {
    fn of(q: &Query) -> Show {
        let meta = q.flag("meta");
        Show {
            revs: q.flag("revs"),
            revs_info: q.flag("revs_info") || meta,
            conflicts: q.flag("conflicts") || meta,
            deleted_conflicts: q.flag("deleted_conflicts") || meta,
            attachments: q.flag("attachments"),
        }
    }
}

/// The document `id` at `rev` as a client sees it; `None` if its body is gone.
pub fn show_doc(
    rd: &Reader,
    id: &str,
    tree: &RevTree,
    rev: &str,
    show: Show,
) -> Result<Option<Value>, StoreError> {
    let Some(node) = tree.node(rev) else {
        return Ok(None);
    };
    let Some(body) = &node.body else {
        return Ok(None);
    };
    let mut doc = Map::new();
    doc.insert("_id".into(), json!(id));
    doc.insert("_rev".into(), json!(rev));
    if node.deleted {
        doc.insert("_deleted".into(), json!(true));
    }
    for (k, v) in body {
        doc.insert(k.clone(), v.clone());
    }
    if show.attachments {
        if let Some(Value::Object(atts)) = doc.get_mut("_attachments") {
            for att in atts.values_mut() {
                let Some(a) = att.as_object_mut() else {
                    continue;
                };
                let digest = a.get("digest").and_then(Value::as_str).unwrap_or("");
                if let Some(data) = rd.attachment(digest)? {
                    a.remove("stub");
                    a.remove("length");
                    a.insert(
                        "data".into(),
                        json!(base64::engine::general_purpose::STANDARD.encode(data)),
                    );
                }
            }
        }
    }
    let is_winner = tree.winner() == Some(rev);
    if show.conflicts && is_winner {
        let c = tree.conflicts();
        if !c.is_empty() {
            doc.insert("_conflicts".into(), json!(c));
        }
    }
    if show.deleted_conflicts && is_winner {
        let c = tree.deleted_conflicts();
        if !c.is_empty() {
            doc.insert("_deleted_conflicts".into(), json!(c));
        }
    }
    if show.revs {
        doc.insert("_revisions".into(), tree.revisions(rev));
    }
    if show.revs_info {
        doc.insert("_revs_info".into(), tree.revs_info(rev));
    }
    Ok(Some(Value::Object(doc)))
}

impl Api {
    pub fn new(store: Store) -> Result<Api, StoreError> {
        let uuid = store.uuid()?;
        Ok(Api {
            store: Arc::new(store),
            changed: watch::channel(0).0,
            uuid,
        })
    }

    /// Runs store work on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r.map_err(ApiError::from),
            Err(e) => Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_server_error",
                format!("the request failed: {e}"),
            )),
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn welcome(&self) -> Answer {
        Ok(reply(
            StatusCode::OK,
            &json!({
                "couchdb": "Welcome",
                "version": "3.3.0-cloudlet",
                "uuid": self.uuid,
                "vendor": {"name": "Cloudlet", "version": env!("CARGO_PKG_VERSION")},
                "features": [],
            }),
        ))
    }

    pub async fn all_dbs(&self) -> Answer {
        let dbs = self.run(|s| s.list_dbs()).await?;
        Ok(reply(StatusCode::OK, &json!(dbs)))
    }

    pub async fn create_db(&self, db: String) -> Answer {
        self.run(move |s| s.create_db(&db)).await?;
        Ok(reply(StatusCode::CREATED, &json!({"ok": true})))
    }

    pub async fn delete_db(&self, db: String) -> Answer {
        check_db(&db)?;
        self.run(move |s| s.delete_db(&db)).await?;
        self.notify();
        Ok(reply(StatusCode::OK, &json!({"ok": true})))
    }

    pub async fn db_info(&self, db: String) -> Answer {
        check_db(&db)?;
        let name = db.clone();
        let m = self.run(move |s| s.db_meta(&db)).await?;
        Ok(reply(
            StatusCode::OK,
            &json!({
                "db_name": name,
                "doc_count": m.doc_count,
                "doc_del_count": m.doc_del_count,
                "update_seq": m.update_seq,
                "purge_seq": 0,
                "compact_running": false,
                "instance_start_time": "0",
                "disk_format_version": 8,
                "props": {},
            }),
        ))
    }

    pub async fn revs_limit(&self, db: String) -> Answer {
        check_db(&db)?;
        let m = self.run(move |s| s.db_meta(&db)).await?;
        Ok(reply(StatusCode::OK, &json!(m.revs_limit)))
    }

    pub async fn set_revs_limit(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let n = read_json(req)
            .await?
            .as_u64()
            .filter(|n| *n > 0)
            .ok_or_else(|| bad("_revs_limit takes a positive integer"))?;
        self.run(move |s| s.set_revs_limit(&db, n)).await?;
        Ok(reply(StatusCode::OK, &json!({"ok": true})))
    }

    /// Writes documents and tells feeds; the per-document results.
    async fn write(
        &self,
        db: String,
        writes: Vec<DocWrite>,
        new_edits: bool,
    ) -> Result<Vec<Result<String, DocError>>, ApiError> {
        let out = self
            .run(move |s| s.write_docs(&db, writes, new_edits))
            .await?;
        if out.iter().any(Result::is_ok) {
            self.notify();
        }
        Ok(out)
    }

    /// PUT (and POST, DELETE) of one document.
    async fn write_one(
        &self,
        db: String,
        id: String,
        doc: Map<String, Value>,
        q: &Query,
    ) -> Answer {
        check_doc_id(&id)?;
        let new_edits = q.get("new_edits") != Some("false");
        let mut out = self
            .write(
                db,
                vec![DocWrite {
                    id: id.clone(),
                    doc,
                }],
                new_edits,
            )
            .await?;
        match out.pop() {
            Some(Ok(rev)) => {
                let mut r = reply(
                    StatusCode::CREATED,
                    &json!({"ok": true, "id": id, "rev": rev}),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("\"{rev}\"")) {
                    r.headers_mut().insert(hyper::header::ETAG, v);
                }
                Ok(r)
            }
            Some(Err(e)) => {
                let (status, name) = doc_error(&e);
                Err(ApiError(status, name, e.to_string()))
            }
            None => Err(bad("nothing written")),
        }
    }

    pub async fn put_doc(&self, db: String, id: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let Value::Object(mut doc) = read_json(req).await? else {
            return Err(bad("Document must be a JSON object"));
        };
        if let Some(rev) = q.get("rev") {
            doc.entry("_rev").or_insert_with(|| json!(rev));
        }
        self.write_one(db, id, doc, &q).await
    }

    pub async fn post_doc(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let Value::Object(doc) = read_json(req).await? else {
            return Err(bad("Document must be a JSON object"));
        };
        let id = match doc.get("_id") {
            Some(Value::String(id)) => id.clone(),
            Some(_) => return Err(bad("Document id must be a string")),
            None => new_id(),
        };
        self.write_one(db, id, doc, &q).await
    }

    pub async fn delete_doc(&self, db: String, id: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let Some(rev) = q.get("rev") else {
            return Err(ApiError(
                StatusCode::CONFLICT,
                "conflict",
                "Document update conflict.".into(),
            ));
        };
        let mut doc = Map::new();
        doc.insert("_rev".into(), json!(rev));
        doc.insert("_deleted".into(), json!(true));
        let r = self.write_one(db, id, doc, &q).await?;
        // A deletion is 200, not 201.
        let (mut parts, body) = r.into_parts();
        parts.status = StatusCode::OK;
        Ok(Response::from_parts(parts, body))
    }

    pub async fn get_doc(&self, db: String, id: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let show = Show::of(&q);
        let rev = q.get("rev").map(str::to_owned);
        let latest = q.flag("latest");
        let open_revs = match q.get("open_revs") {
            None => None,
            Some("all") => Some(None),
            Some(_) => match q.json("open_revs")? {
                Some(Value::Array(a)) => Some(Some(
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect::<Vec<_>>(),
                )),
                _ => return Err(bad("open_revs must be \"all\" or a JSON array")),
            },
        };
        let answer = self
            .run(move |s| -> Result<Result<Value, ApiError>, StoreError> {
                let rd = s.reader(&db)?;
                let rec = rd.doc(&id)?;
                if let Some(wanted) = open_revs {
                    let tree = rec.map(|r| r.tree).unwrap_or_default();
                    let revs: Vec<String> = match wanted {
                        None => tree.leaves().into_iter().map(str::to_owned).collect(),
                        Some(w) => w,
                    };
                    let mut out = Vec::new();
                    for r in revs {
                        let targets: Vec<String> = if latest && tree.contains(&r) {
                            tree.leaves_from(&r)
                                .into_iter()
                                .map(str::to_owned)
                                .collect()
                        } else {
                            vec![r.clone()]
                        };
                        for t in targets {
                            match show_doc(&rd, &id, &tree, &t, show)? {
                                Some(d) => out.push(json!({"ok": d})),
                                None => out.push(json!({"missing": t})),
                            }
                        }
                    }
                    return Ok(Ok(Value::Array(out)));
                }
                let Some(rec) = rec else {
                    return Ok(Err(not_found("missing")));
                };
                let target = match &rev {
                    Some(r) => r.clone(),
                    None => {
                        if rec.tree.deleted() {
                            return Ok(Err(not_found("deleted")));
                        }
                        rec.tree.winner().unwrap_or("").to_owned()
                    }
                };
                match show_doc(&rd, &id, &rec.tree, &target, show)? {
                    Some(d) => Ok(Ok(d)),
                    None => Ok(Err(not_found("missing"))),
                }
            })
            .await??;
        let mut r = reply(StatusCode::OK, &answer);
        if let Some(rev) = answer.get("_rev").and_then(Value::as_str) {
            if let Ok(v) = HeaderValue::from_str(&format!("\"{rev}\"")) {
                r.headers_mut().insert(hyper::header::ETAG, v);
            }
        }
        Ok(r)
    }

    pub async fn get_attachment(
        &self,
        db: String,
        id: String,
        name: String,
        req: Request<RoutedBody>,
    ) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let rev = q.get("rev").map(str::to_owned);
        let (meta, data) = self
            .run(
                move |s| -> Result<Result<(Value, Vec<u8>), ApiError>, StoreError> {
                    let rd = s.reader(&db)?;
                    let Some(rec) = rd.doc(&id)? else {
                        return Ok(Err(not_found("missing")));
                    };
                    let rev = match rev {
                        Some(r) => r,
                        None if rec.tree.deleted() => return Ok(Err(not_found("deleted"))),
                        None => rec.tree.winner().unwrap_or("").to_owned(),
                    };
                    let att = rec
                        .tree
                        .node(&rev)
                        .and_then(|n| n.body.as_ref())
                        .and_then(|b| b.get("_attachments"))
                        .and_then(|a| a.get(&name))
                        .cloned();
                    let Some(att) = att else {
                        return Ok(Err(not_found("Document is missing attachment")));
                    };
                    let digest = att.get("digest").and_then(Value::as_str).unwrap_or("");
                    match rd.attachment(digest)? {
                        Some(d) => Ok(Ok((att, d))),
                        None => Ok(Err(not_found("Document is missing attachment"))),
                    }
                },
            )
            .await??;
        let content_type = meta
            .get("content_type")
            .and_then(Value::as_str)
            .unwrap_or("application/octet-stream");
        let digest = meta.get("digest").and_then(Value::as_str).unwrap_or("");
        let total = data.len() as u64;
        let range = req
            .headers()
            .get(hyper::header::RANGE)
            .and_then(|v| v.to_str().ok())
            .map(|v| parse_range(v, total));
        let mut b = Response::builder()
            .header(CONTENT_TYPE, content_type)
            .header(hyper::header::ACCEPT_RANGES, "bytes")
            .header(hyper::header::ETAG, format!("\"{digest}\""));
        let body = match range {
            None | Some(RangeAsk::Ignore) => {
                b = b.status(StatusCode::OK);
                Bytes::from(data)
            }
            Some(RangeAsk::Unsatisfiable) => {
                b = b
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(hyper::header::CONTENT_RANGE, format!("bytes */{total}"));
                Bytes::new()
            }
            Some(RangeAsk::Bytes(start, end)) => {
                b = b.status(StatusCode::PARTIAL_CONTENT).header(
                    hyper::header::CONTENT_RANGE,
                    format!("bytes {start}-{end}/{total}"),
                );
                Bytes::from(data).slice(start as usize..=end as usize)
            }
        };
        let mut r = b
            .body(
                Full::new(body)
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| bad(e.to_string()))?;
        r.extensions_mut().insert(CouchShaped);
        Ok(r)
    }

    pub async fn get_local(&self, db: String, id: String) -> Answer {
        check_db(&db)?;
        let full = format!("_local/{id}");
        let doc = self
            .run(move |s| s.reader(&db)?.local(&id))
            .await?
            .ok_or_else(|| not_found("missing"))?;
        let mut out = Map::new();
        out.insert("_id".into(), json!(full));
        out.insert("_rev".into(), json!(format!("0-{}", doc.rev)));
        out.extend(doc.body);
        Ok(reply(StatusCode::OK, &Value::Object(out)))
    }

    pub async fn put_local(
        &self,
        db: String,
        id: String,
        req: Request<RoutedBody>,
        delete: bool,
    ) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let mut body = if delete {
            Map::new()
        } else {
            match read_json(req).await? {
                Value::Object(m) => m,
                _ => return Err(bad("Document must be a JSON object")),
            }
        };
        let rev = match body.remove("_rev") {
            Some(Value::String(r)) => Some(r),
            _ => q.get("rev").map(str::to_owned),
        };
        body.remove("_id");
        body.remove("_revisions");
        let full = format!("_local/{id}");
        let out = self
            .run(move |s| s.put_local(&db, &id, rev.as_deref(), body, delete))
            .await?;
        match out {
            Ok(rev) => Ok(reply(
                if delete {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                },
                &json!({"ok": true, "id": full, "rev": rev}),
            )),
            Err(DocError::Conflict) if delete => Err(not_found("missing")),
            Err(e) => {
                let (status, name) = doc_error(&e);
                Err(ApiError(status, name, e.to_string()))
            }
        }
    }

    pub async fn bulk_docs(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let body = read_json(req).await?;
        let new_edits = body
            .get("new_edits")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let Some(Value::Array(docs)) = body.get("docs") else {
            return Err(bad("POST body must include `docs` parameter."));
        };
        // Documents that cannot be written at all answer in place (their
        // error row); the others by their id, from the store's results.
        let mut slots: Vec<Result<String, Value>> = Vec::new();
        let mut writes = Vec::new();
        for d in docs {
            let Value::Object(doc) = d else {
                return Err(bad("Document must be a JSON object"));
            };
            let id = match doc.get("_id") {
                Some(Value::String(id)) => id.clone(),
                None if new_edits => new_id(),
                _ => return Err(bad("Document id must be a string")),
            };
            if let Err(e) = check_doc_id(&id) {
                let rev = doc.get("_rev").cloned().unwrap_or(Value::Null);
                slots.push(Err(
                    json!({"id": id, "rev": rev, "error": e.1, "reason": e.2}),
                ));
                continue;
            }
            slots.push(Ok(id.clone()));
            writes.push(DocWrite {
                id,
                doc: doc.clone(),
            });
        }
        let sent_revs: Vec<Value> = writes
            .iter()
            .map(|w| w.doc.get("_rev").cloned().unwrap_or(Value::Null))
            .collect();
        let results = self.write(db, writes, new_edits).await?;
        let mut results = results.into_iter().zip(sent_revs);
        let mut out = Vec::new();
        for slot in slots {
            match slot {
                Err(row) => out.push(row),
                Ok(id) => match results.next() {
                    Some((Ok(rev), _)) if new_edits => {
                        out.push(json!({"ok": true, "id": id, "rev": rev}));
                    }
                    Some((Ok(_), _)) => {}
                    Some((Err(e), rev)) => {
                        let (_, name) = doc_error(&e);
                        let mut row = json!({"id": id, "error": name, "reason": e.to_string()});
                        if !rev.is_null() {
                            row["rev"] = rev;
                        }
                        out.push(row);
                    }
                    None => {}
                },
            }
        }
        Ok(reply(StatusCode::CREATED, &Value::Array(out)))
    }

    pub async fn revs_diff(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let Value::Object(ask) = read_json(req).await? else {
            return Err(bad("Request body must be a JSON object"));
        };
        let out = self
            .run(move |s| -> Result<Value, StoreError> {
                let rd = s.reader(&db)?;
                let mut out = Map::new();
                for (id, revs) in ask {
                    let revs: Vec<&str> = revs
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let tree = rd.doc(&id)?.map(|r| r.tree).unwrap_or_default();
                    let missing: Vec<&str> =
                        revs.into_iter().filter(|r| !tree.contains(r)).collect();
                    if missing.is_empty() {
                        continue;
                    }
                    let top = missing.iter().map(|r| generation(r)).max().unwrap_or(0);
                    let ancestors: Vec<&str> = tree
                        .leaves()
                        .into_iter()
                        .filter(|l| generation(l) < top)
                        .collect();
                    let mut row = json!({"missing": missing});
                    if !ancestors.is_empty() {
                        row["possible_ancestors"] = json!(ancestors);
                    }
                    out.insert(id, row);
                }
                Ok(Value::Object(out))
            })
            .await?;
        Ok(reply(StatusCode::OK, &out))
    }

    pub async fn bulk_get(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let show = Show {
            revs: q.flag("revs"),
            attachments: q.flag("attachments"),
            ..Show::default()
        };
        let latest = q.flag("latest");
        let body = read_json(req).await?;
        let Some(Value::Array(asks)) = body.get("docs").cloned() else {
            return Err(bad("Missing JSON list of 'docs'."));
        };
        let out = self
            .run(move |s| -> Result<Value, StoreError> {
                let rd = s.reader(&db)?;
                let mut results = Vec::new();
                for ask in asks {
                    let id = ask.get("id").and_then(Value::as_str).unwrap_or("").to_owned();
                    let rev = ask.get("rev").and_then(Value::as_str).map(str::to_owned);
                    let error = |rev: &str, reason: &str| {
                        json!({"error": {"id": id, "rev": rev, "error": "not_found", "reason": reason}})
                    };
                    let tree = rd.doc(&id)?.map(|r| r.tree).unwrap_or_default();
                    let targets: Vec<String> = match &rev {
                        None => tree.winner().into_iter().map(str::to_owned).collect(),
                        Some(r) if latest && tree.contains(r) => {
                            tree.leaves_from(r).into_iter().map(str::to_owned).collect()
                        }
                        Some(r) => vec![r.clone()],
                    };
                    let mut docs = Vec::new();
                    if targets.is_empty() {
                        docs.push(error(rev.as_deref().unwrap_or("undefined"), "missing"));
                    }
                    for t in targets {
                        match show_doc(&rd, &id, &tree, &t, show)? {
                            Some(d) => docs.push(json!({"ok": d})),
                            None => docs.push(error(&t, "missing")),
                        }
                    }
                    results.push(json!({"id": id, "docs": docs}));
                }
                Ok(json!({"results": results}))
            })
            .await?;
        Ok(reply(StatusCode::OK, &out))
    }

    /// `_changes`: the normal feed streams one snapshot; longpoll first waits
    /// for a change after `since`; continuous keeps sending rows as they come.
    pub async fn changes(&self, db: String, req: Request<RoutedBody>, post: bool) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let body = if post {
            read_json(req).await?
        } else {
            Value::Null
        };
        let meta_db = db.clone();
        let now = self.run(move |s| s.db_meta(&meta_db)).await?.update_seq;
        let since = match q.get("since") {
            Some("now") => now,
            Some(s) => parse_since(Some(&Value::String(s.to_owned())), now)?,
            None => 0,
        };
        let feed = q.get("feed").unwrap_or("normal").to_owned();
        if !matches!(feed.as_str(), "normal" | "longpoll" | "continuous") {
            return Err(bad(format!(
                "Supported feeds are normal, longpoll and continuous, not {feed:?}"
            )));
        }
        let doc_ids: Option<HashSet<String>> = match q.get("filter") {
            None => None,
            Some("_doc_ids") => {
                let ids = match body.get("doc_ids") {
                    Some(v) => Some(v.clone()),
                    None => q.json("doc_ids")?,
                };
                let Some(Value::Array(ids)) = ids else {
                    return Err(bad("filter=_doc_ids needs a JSON array doc_ids"));
                };
                Some(
                    ids.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                )
            }
            Some(f) => {
                return Err(bad(format!(
                    "filter {f:?} is not supported: this server runs no filter functions (only _doc_ids)"
                )))
            }
        };
        let opts = ChangesOpts {
            limit: q.number("limit")?.filter(|n| *n > 0),
            descending: q.flag("descending"),
            all_docs: q.get("style") == Some("all_docs"),
            include_docs: q.flag("include_docs"),
            show: Show {
                conflicts: q.flag("conflicts"),
                attachments: q.flag("attachments"),
                ..Show::default()
            },
            doc_ids,
        };
        let timeout = q
            .number("timeout")?
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_FEED_TIMEOUT);
        let heartbeat = match q.get("heartbeat") {
            Some("true") => Some(Duration::from_secs(60)),
            _ => q
                .number("heartbeat")?
                .filter(|n| *n > 0)
                .map(Duration::from_millis),
        };
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            let mut out = Out::new(tx);
            let deadline = tokio::time::Instant::now() + timeout;
            let mut since = since;
            let opts = Arc::new(opts);
            if feed == "longpoll" && since >= now && !opts.descending {
                // Wait for this database to pass `since`, with heartbeats.
                loop {
                    let db = db.clone();
                    let store = store.clone();
                    let seq = tokio::task::spawn_blocking(move || store.db_meta(&db))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|m| m.update_seq);
                    match seq {
                        Some(s) if s > since => break,
                        Some(_) => {}
                        None => break,
                    }
                    if !wait(&mut changed, &mut out, deadline, heartbeat).await {
                        break;
                    }
                }
            }
            if feed != "continuous" {
                let db = db.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    changes_normal(&store, &db, since, &opts, &mut out)
                })
                .await;
                return;
            }
            let mut sent = 0u64;
            loop {
                let (db2, store2, opts2) = (db.clone(), store.clone(), opts.clone());
                let pass = tokio::task::spawn_blocking(move || {
                    let r = changes_rows(&store2, &db2, since, &opts2, &mut out, sent);
                    (r, out)
                })
                .await;
                let Ok((Ok((last, n, alive)), o)) = pass else {
                    return;
                };
                out = o;
                since = last;
                sent += n;
                if !alive || !out.flush().await || opts.limit.is_some_and(|l| sent >= l) {
                    break;
                }
                if !wait(&mut changed, &mut out, deadline, heartbeat).await {
                    break;
                }
            }
            out.buf
                .extend_from_slice(format!("{{\"last_seq\":{since}}}\n").as_bytes());
            out.flush().await;
        });
        Ok(streamed(rx))
    }

    /// `_all_docs`, streamed; with `keys`, one row per key asked.
    pub async fn all_docs(&self, db: String, req: Request<RoutedBody>, post: bool) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        let body = if post {
            read_json(req).await?
        } else {
            Value::Null
        };
        let keys = match body.get("keys") {
            Some(k) => Some(k.clone()),
            None => q.json("keys")?,
        };
        let keys: Option<Vec<String>> = match keys {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|k| {
                        k.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| bad("keys must be strings"))
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(bad("`keys` member must be an array.")),
        };
        let key = |names: &[&str]| -> Result<Option<String>, ApiError> {
            for n in names {
                match q.json(n)? {
                    Some(Value::String(s)) => return Ok(Some(s)),
                    Some(Value::Null) | None => {}
                    Some(_) => return Err(bad(format!("{n} must be a string"))),
                }
            }
            Ok(None)
        };
        let opts = AllDocsOpts {
            keys,
            start: key(&[
                "startkey",
                "start_key",
                "startkey_docid",
                "start_key_doc_id",
            ])?,
            end: key(&["endkey", "end_key", "endkey_docid", "end_key_doc_id"])?,
            inclusive_end: q.get("inclusive_end") != Some("false"),
            descending: q.flag("descending"),
            limit: q.number("limit")?,
            skip: q.number("skip")?.unwrap_or(0),
            include_docs: q.flag("include_docs"),
            show: Show {
                conflicts: q.flag("conflicts"),
                attachments: q.flag("attachments"),
                ..Show::default()
            },
            update_seq: q.flag("update_seq"),
        };
        // Fail before the 200 when the database is not there.
        let meta_db = db.clone();
        self.run(move |s| s.db_meta(&meta_db)).await?;
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Out::new(tx);
            if let Err(e) = all_docs(&store, &db, &opts, &mut out) {
                out.fail(e);
            }
        });
        Ok(streamed(rx))
    }
}

/// Waits for a change, sending heartbeats; false at the deadline.
async fn wait(
    changed: &mut watch::Receiver<u64>,
    out: &mut Out,
    deadline: tokio::time::Instant,
    heartbeat: Option<Duration>,
) -> bool {
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return false;
        }
        let until = match heartbeat {
            Some(h) => deadline.min(now + h),
            None => deadline,
        };
        match tokio::time::timeout_at(until, changed.changed()).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => return false,
            Err(_) if until < deadline => {
                out.buf.push(b'\n');
                if !out.flush().await {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

struct ChangesOpts {
    limit: Option<u64>,
    descending: bool,
    all_docs: bool,
    include_docs: bool,
    show: Show,
    doc_ids: Option<HashSet<String>>,
}

/// One `_changes` row for a document, or none when the filter drops it.
fn change_row(
    rd: &Reader,
    seq: u64,
    id: &str,
    opts: &ChangesOpts,
) -> Result<Option<Value>, StoreError> {
    if opts.doc_ids.as_ref().is_some_and(|ids| !ids.contains(id)) {
        return Ok(None);
    }
    let Some(rec) = rd.doc(id)? else {
        return Ok(None);
    };
    let leaves = rec.tree.leaves();
    let winner = leaves.first().copied().unwrap_or("");
    let revs: Vec<Value> = if opts.all_docs {
        leaves.iter().map(|r| json!({"rev": r})).collect()
    } else {
        vec![json!({"rev": winner})]
    };
    let mut row = json!({"seq": seq, "id": id, "changes": revs});
    if rec.tree.deleted() {
        row["deleted"] = json!(true);
    }
    if opts.include_docs {
        row["doc"] = show_doc(rd, id, &rec.tree, winner, opts.show)?.unwrap_or(Value::Null);
    }
    Ok(Some(row))
}

/// The normal (and longpoll) feed: one JSON object.
fn changes_normal(store: &Store, db: &str, since: u64, opts: &ChangesOpts, out: &mut Out) {
    let run = |out: &mut Out| -> Result<(), StoreError> {
        let rd = store.reader(db)?;
        let mut last = if opts.descending { 0 } else { since };
        let mut n = 0u64;
        let mut pending = 0u64;
        let mut alive = out.put(b"{\"results\":[\n");
        rd.changes(since, opts.descending, |seq, id| {
            if opts.limit.is_some_and(|l| n >= l) {
                pending += 1;
                return Ok(ControlFlow::Continue(()));
            }
            if let Some(row) = change_row(&rd, seq, id, opts)? {
                if n > 0 {
                    alive &= out.put(b",\n");
                }
                alive &= out.put(&serde_json::to_vec(&row).unwrap_or_default());
                n += 1;
            }
            last = seq;
            Ok(if alive {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            })
        })?;
        if !opts.descending && opts.limit.is_none_or(|l| n < l) {
            last = last.max(rd.meta.update_seq);
        }
        out.put(format!("\n],\n\"last_seq\":{last},\"pending\":{pending}}}\n").as_bytes());
        out.flush_blocking();
        Ok(())
    };
    if let Err(e) = run(out) {
        out.fail(e);
    }
}

/// Continuous rows after `since`: the last sequence seen, rows sent, and
/// whether the client is still there.
fn changes_rows(
    store: &Store,
    db: &str,
    since: u64,
    opts: &ChangesOpts,
    out: &mut Out,
    already: u64,
) -> Result<(u64, u64, bool), StoreError> {
    let rd = store.reader(db)?;
    let mut last = since;
    let mut n = 0u64;
    let mut alive = true;
    rd.changes(since, false, |seq, id| {
        if let Some(row) = change_row(&rd, seq, id, opts)? {
            alive &= out.put(&serde_json::to_vec(&row).unwrap_or_default());
            alive &= out.put(b"\n");
            n += 1;
        }
        last = seq;
        let more = alive && opts.limit.is_none_or(|l| already + n < l);
        Ok(if more {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        })
    })?;
    alive &= out.flush_blocking();
    Ok((last, n, alive))
}

struct AllDocsOpts {
    keys: Option<Vec<String>>,
    start: Option<String>,
    end: Option<String>,
    inclusive_end: bool,
    descending: bool,
    limit: Option<u64>,
    skip: u64,
    include_docs: bool,
    show: Show,
    update_seq: bool,
}

/// Rows of a streamed list: how many were sent, whether the client is there.
struct Rows {
    n: u64,
    alive: bool,
}

impl Rows {
    fn emit(&mut self, out: &mut Out, row: &Value) {
        if self.n > 0 {
            self.alive &= out.put(b",\n");
        }
        self.alive &= out.put(&serde_json::to_vec(row).unwrap_or_default());
        self.n += 1;
    }
}

fn all_docs(store: &Store, db: &str, opts: &AllDocsOpts, out: &mut Out) -> Result<(), StoreError> {
    let rd = store.reader(db)?;
    let total = rd.meta.doc_count;
    out.put(
        format!(
            "{{\"total_rows\":{total},\"offset\":{},\"rows\":[\n",
            opts.skip
        )
        .as_bytes(),
    );
    let mut rows = Rows { n: 0, alive: true };
    let mut skipped = 0u64;
    if let Some(keys) = &opts.keys {
        let mut keys: Vec<&String> = keys.iter().collect();
        if opts.descending {
            keys.reverse();
        }
        for k in keys.into_iter().skip(opts.skip as usize) {
            if opts.limit.is_some_and(|l| rows.n >= l) || !rows.alive {
                break;
            }
            let row = match rd.doc(k)? {
                None => json!({"key": k, "error": "not_found"}),
                Some(rec) => {
                    let winner = rec.tree.winner().unwrap_or("").to_owned();
                    if rec.tree.deleted() {
                        json!({"id": k, "key": k, "value": {"rev": winner, "deleted": true}, "doc": null})
                    } else {
                        let mut row = json!({"id": k, "key": k, "value": {"rev": winner}});
                        if opts.include_docs {
                            row["doc"] = show_doc(&rd, k, &rec.tree, &winner, opts.show)?
                                .unwrap_or(Value::Null);
                        }
                        row
                    }
                }
            };
            rows.emit(out, &row);
        }
    } else {
        rd.all_docs(
            opts.start.as_deref(),
            opts.end.as_deref(),
            opts.inclusive_end,
            opts.descending,
            |id, rec| {
                if rec.tree.deleted() {
                    return Ok(ControlFlow::Continue(()));
                }
                if skipped < opts.skip {
                    skipped += 1;
                    return Ok(ControlFlow::Continue(()));
                }
                if opts.limit.is_some_and(|l| rows.n >= l) {
                    return Ok(ControlFlow::Break(()));
                }
                let winner = rec.tree.winner().unwrap_or("").to_owned();
                let mut row = json!({"id": id, "key": id, "value": {"rev": winner}});
                if opts.include_docs {
                    row["doc"] =
                        show_doc(&rd, id, &rec.tree, &winner, opts.show)?.unwrap_or(Value::Null);
                }
                rows.emit(out, &row);
                Ok(if rows.alive {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                })
            },
        )?;
    }
    let tail = if opts.update_seq {
        format!("\n],\n\"update_seq\":{}}}\n", rd.meta.update_seq)
    } else {
        "\n]}\n".to_owned()
    };
    out.put(tail.as_bytes());
    out.flush_blocking();
    Ok(())
}

/// A Range header: one `bytes=` range (several, or another unit: the whole).
#[derive(Debug, PartialEq, Eq)]
enum RangeAsk {
    Ignore,
    Unsatisfiable,
    Bytes(u64, u64),
}

fn parse_range(v: &str, total: u64) -> RangeAsk {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeAsk::Ignore;
    };
    if spec.contains(',') {
        return RangeAsk::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Ignore;
    };
    let (start, end) = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(s), Ok(e)) if s <= e => (s, e.min(total.saturating_sub(1))),
        (Ok(s), Err(_)) if b.is_empty() => (s, total.saturating_sub(1)),
        (Err(_), Ok(n)) if a.is_empty() && n > 0 => {
            (total.saturating_sub(n), total.saturating_sub(1))
        }
        _ => return RangeAsk::Ignore,
    };
    if total == 0 || start >= total {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Bytes(start, end)
}

fn check_db(db: &str) -> Result<(), ApiError> {
    if is_valid_db_name(db) {
        Ok(())
    } else {
        Err(StoreError::BadDbName(db.to_owned()).into())
    }
}

/// Ids starting with `_` are reserved (design documents are the one kind
/// stored as documents; `_local` ones have their own routes).
fn check_doc_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(bad("Document id must not be empty"));
    }
    if id.starts_with('_') && !id.starts_with("_design/") {
        return Err(bad("Only reserved document ids may start with underscore."));
    }
    Ok(())
}

/// A new document id: 128 random bits, hex (as CouchDB's uuids).
fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(parse_range("bytes=0-3", 10), RangeAsk::Bytes(0, 3));
        assert_eq!(parse_range("bytes=5-", 10), RangeAsk::Bytes(5, 9));
        assert_eq!(parse_range("bytes=-4", 10), RangeAsk::Bytes(6, 9));
        assert_eq!(parse_range("bytes=8-100", 10), RangeAsk::Bytes(8, 9));
        assert_eq!(parse_range("bytes=10-", 10), RangeAsk::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), RangeAsk::Ignore);
        assert_eq!(parse_range("items=0-1", 10), RangeAsk::Ignore);
    }

    #[test]
    fn since_takes_numbers_now_and_couchdb_sequences() {
        assert_eq!(parse_since(None, 7).unwrap(), 0);
        assert_eq!(parse_since(Some(&json!(3)), 7).unwrap(), 3);
        assert_eq!(parse_since(Some(&json!("now")), 7).unwrap(), 7);
        assert_eq!(parse_since(Some(&json!("12-g1AAAA")), 7).unwrap(), 12);
        assert!(parse_since(Some(&json!("x")), 7).is_err());
    }

    #[test]
    fn doc_ids_with_underscores_are_reserved() {
        assert!(check_doc_id("a").is_ok());
        assert!(check_doc_id("_design/x").is_ok());
        assert!(check_doc_id("_x").is_err());
        assert!(check_doc_id("").is_err());
    }
}
