//! The HTTP API: CouchDB's, as far as replicators use it.
//!
//! Handlers parse the request, run the store's work on a blocking thread
//! (redb does file I/O) and answer JSON. `_changes`, `_all_docs` and
//! `_bulk_get` stream: a blocking producer reads a snapshot and sends the
//! response in pieces through a small channel, so memory does not grow with
//! the database. A large `_bulk_docs` (or document) body is spooled to a
//! file and written a document at a time as it is parsed.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use cloudlet_runtime::router::{AnyBody, RoutedBody};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use crate::mango::{self, Dir, Index, MangoError, Selector};
use crate::revtree::{generation, RevTree};
use crate::store::{is_valid_db_name, Batch, DocError, DocWrite, Reader, Store, StoreError};

/// Marks a response already shaped as CouchDB's (the service's outer
/// layer reshapes the router's own errors, which lack it).
#[derive(Debug, Clone, Copy)]
pub struct CouchShaped;

/// How long a `_changes` longpoll waits when the client names no timeout.
const DEFAULT_FEED_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes gathered before a piece of a streamed answer is sent.
const CHUNK: usize = 64 << 10;
/// A document body or `_bulk_docs` up to this size is read into memory
/// (a replicator's batch of ordinary documents, parsed fastest from a
/// slice); a larger one, or one of unknown length, is spooled to a file.
const IN_MEMORY_BODY: u64 = 1 << 20;
/// The write buffer in front of a spool file.
const SPOOL_BUFFER: usize = 256 << 10;

pub struct Api {
    pub store: Arc<Store>,
    /// Bumped after every committed change; feeds wait on it.
    changed: watch::Sender<u64>,
    uuid: String,
    /// `POST /_session` sessions: id -> who and until when. Only the id
    /// is kept; the token stays in the client's cookie.
    sessions: Mutex<HashMap<String, Session>>,
    /// Origins the owner allowed (CORS), as kept in the store.
    cors: RwLock<Vec<String>>,
    /// Databases being compacted.
    compacting: Arc<Mutex<HashSet<String>>>,
    /// The service answers over TLS: session cookies are `Secure`.
    tls: bool,
    /// KiB of attachment contents that answers may hold at once (a
    /// permit per KiB): PouchDB fetches a pull's attachments all at once,
    /// one request each, and each answer holds its content whole.
    att_budget: Arc<tokio::sync::Semaphore>,
}

/// What attachment answers may hold in memory together, in KiB.
const ATT_BUDGET_KIB: u32 = 8 << 10;

/// An answer's content and its share of [`Api::att_budget`], given back
/// when the answer is sent (or dropped).
struct Budgeted {
    data: Option<Bytes>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl hyper::body::Body for Budgeted {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A `POST /_session` login.
#[derive(Debug, Clone)]
struct Session {
    name: String,
    until: Instant,
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
            StoreError::Db(_) | StoreError::Corrupt(_) | StoreError::Spool(..) => {
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

/// A request body spooled to a file in the store's spool directory, so a
/// large one is never held in memory. The file goes when this is dropped,
/// on every path (errors too); what a crash leaves, the next start removes.
struct Spooled(std::path::PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A request body: in memory when small, else spooled.
enum Body {
    Memory(Bytes),
    File(Spooled),
}

fn too_large(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the request body could not be read whole: {e}"),
    )
}

fn spool_error(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "spooling a request body");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_server_error",
        format!("the request body could not be spooled: {e}"),
    )
}

impl Body {
    /// Reads the body: whole when its announced length is small, else
    /// into a new file in `dir`, a piece at a time.
    async fn of(dir: &std::path::Path, req: Request<RoutedBody>) -> Result<Body, ApiError> {
        use hyper::body::Body as _;
        use tokio::io::AsyncWriteExt;
        // The body's own hint covers the replicator's local calls, which
        // carry no Content-Length.
        let small = req
            .body()
            .size_hint()
            .exact()
            .or_else(|| {
                req.headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .is_some_and(|n| n <= IN_MEMORY_BODY);
        let mut body = req.into_body();
        if small {
            let b = body.collect().await.map_err(too_large)?.to_bytes();
            return Ok(Body::Memory(b));
        }
        let spooled = Spooled(dir.join(format!("{}.body", new_id())));
        let file = tokio::fs::File::create(&spooled.0)
            .await
            .map_err(spool_error)?;
        let mut out = tokio::io::BufWriter::with_capacity(SPOOL_BUFFER, file);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(too_large)?.into_data() {
                out.write_all(&data).await.map_err(spool_error)?;
            }
        }
        out.flush().await.map_err(spool_error)?;
        Ok(Body::File(spooled))
    }

    /// The body as one JSON value (an empty one is `null`), parsed on a
    /// blocking thread when it is in a file.
    async fn json(self) -> Result<Value, ApiError> {
        match self {
            Body::Memory(b) => {
                if b.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Value::Null);
                }
                serde_json::from_slice(&b).map_err(|_| bad("invalid UTF-8 JSON"))
            }
            Body::File(f) => tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(&f.0).map_err(spool_error)?;
                let rd = std::io::BufReader::with_capacity(SPOOL_BUFFER, file);
                serde_json::from_reader(rd).map_err(|_| bad("invalid UTF-8 JSON"))
            })
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_server_error",
                    format!("the request failed: {e}"),
                )
            })?,
        }
    }
}

/// Where the parser is in a spooled `_bulk_docs`, shared by the reader
/// (which counts) and the parser's visitor (which marks each document).
#[derive(Debug, Clone, Copy, Default)]
struct Pos {
    read: u64,
    doc_start: Option<u64>,
    over: bool,
}

/// A spooled body for the JSON parser: a document may take at most
/// [`crate::DOC_LIMIT`] bytes of it (give or take the buffer in front of
/// this), since a document being parsed is held in memory whole.
struct Bounded<R> {
    inner: R,
    pos: std::rc::Rc<std::cell::Cell<Pos>>,
}

impl<R: std::io::Read> std::io::Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut p = self.pos.get();
        if p.doc_start.is_some_and(|s| p.read - s > crate::DOC_LIMIT) {
            p.over = true;
            self.pos.set(p);
            return Err(std::io::Error::other("a document is too large"));
        }
        let n = self.inner.read(buf)?;
        p.read += n as u64;
        self.pos.set(p);
        Ok(n)
    }
}

/// The first look at a `_bulk_docs` body: `new_edits` (which may come
/// after `docs`), and that `docs` is a list; documents are skipped.
struct BulkHead {
    new_edits: bool,
    docs: bool,
}

impl<'de> serde::Deserialize<'de> for BulkHead {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BulkHead, D::Error> {
        struct Top;
        impl<'de> serde::de::Visitor<'de> for Top {
            type Value = BulkHead;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<BulkHead, A::Error> {
                let mut head = BulkHead {
                    new_edits: true,
                    docs: false,
                };
                while let Some(k) = map.next_key::<String>()? {
                    match k.as_str() {
                        "new_edits" => {
                            head.new_edits = map.next_value::<Value>()?.as_bool().unwrap_or(true);
                        }
                        "docs" => head.docs = map.next_value::<IsList>()?.0,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(head)
            }
        }
        d.deserialize_map(Top)
    }
}

/// Whether a value is a list (its items skipped, not kept).
struct IsList(bool);

impl<'de> serde::Deserialize<'de> for IsList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IsList, D::Error> {
        struct List;
        impl<'de> serde::de::Visitor<'de> for List {
            type Value = IsList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<IsList, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(IsList(true))
            }
        }
        d.deserialize_seq(List)
    }
}

/// What `_bulk_docs` answers for one document.
enum Row {
    /// refused before it reached the store (its error row)
    Refused(Value),
    /// the store's result, with the `_rev` the client sent
    Written {
        id: String,
        sent_rev: Value,
        result: Result<String, DocError>,
    },
}

/// A `_bulk_docs` being written while it is parsed: each document goes
/// into the batch as it comes, so memory holds one at a time (and the
/// answer's ids and revisions).
struct BulkWrite {
    batch: Batch,
    new_edits: bool,
    rows: Vec<Row>,
    /// Why the parse was stopped (the parser only carries a message).
    failed: Option<ApiError>,
    pos: Option<std::rc::Rc<std::cell::Cell<Pos>>>,
}

impl BulkWrite {
    fn mark(&self, start: bool) {
        if let Some(pos) = &self.pos {
            let mut p = pos.get();
            p.doc_start = start.then_some(p.read);
            pos.set(p);
        }
    }

    fn take(&mut self, d: Value) -> Result<(), ApiError> {
        let Value::Object(doc) = d else {
            return Err(bad("Document must be a JSON object"));
        };
        let id = match doc.get("_id") {
            Some(Value::String(id)) => id.clone(),
            None if self.new_edits => new_id(),
            _ => return Err(bad("Document id must be a string")),
        };
        let sent_rev = doc.get("_rev").cloned().unwrap_or(Value::Null);
        if let Err(e) = check_doc_id(&id) {
            self.rows.push(Row::Refused(
                json!({"id": id, "rev": sent_rev, "error": e.1, "reason": e.2}),
            ));
            return Ok(());
        }
        let result = self.batch.write(DocWrite {
            id: id.clone(),
            doc,
        })?;
        self.rows.push(Row::Written {
            id,
            sent_rev,
            result,
        });
        Ok(())
    }
}

/// The body's top level: `docs` is written, the rest skipped.
struct BulkTop<'a>(&'a mut BulkWrite);

impl<'de> serde::de::DeserializeSeed<'de> for BulkTop<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BulkTop<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut done = false;
        while let Some(k) = map.next_key::<String>()? {
            if k == "docs" && !done {
                map.next_value_seed(BulkDocs(&mut *self.0))?;
                done = true;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// `docs`, one document at a time.
struct BulkDocs<'a>(&'a mut BulkWrite);

impl<'de> serde::de::DeserializeSeed<'de> for BulkDocs<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BulkDocs<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of documents")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            self.0.mark(true);
            let Some(d) = seq.next_element::<Value>()? else {
                break;
            };
            self.0.mark(false);
            if let Err(e) = self.0.take(d) {
                self.0.failed = Some(e);
                return Err(serde::de::Error::custom("stopped"));
            }
        }
        self.0.mark(false);
        Ok(())
    }
}

/// A JSON error of a `_bulk_docs` body as CouchDB answers it.
fn bulk_json_error(e: &serde_json::Error) -> ApiError {
    match e.classify() {
        serde_json::error::Category::Data => bad("POST body must include `docs` parameter."),
        _ => bad("invalid UTF-8 JSON"),
    }
}

/// Writes a `_bulk_docs` body into database `db` in one transaction,
/// committed before this returns: `new_edits` and a row per document.
/// The body is read twice: first for `new_edits` (which may come after
/// the documents) and its shape, then to write the documents as they come.
fn bulk_write(store: &Store, db: &str, body: &Body) -> Result<(bool, Vec<Row>), ApiError> {
    let open = |f: &Spooled| std::fs::File::open(&f.0).map_err(spool_error);
    let file = |f: &Spooled| -> Result<_, ApiError> {
        Ok(std::io::BufReader::with_capacity(SPOOL_BUFFER, open(f)?))
    };
    let head = match body {
        Body::Memory(b) => {
            let mut de = serde_json::Deserializer::from_slice(b);
            serde::Deserialize::deserialize(&mut de).and_then(|h| de.end().map(|()| h))
        }
        Body::File(f) => {
            let mut de = serde_json::Deserializer::from_reader(file(f)?);
            serde::Deserialize::deserialize(&mut de).and_then(|h| de.end().map(|()| h))
        }
    };
    let head: BulkHead = head.map_err(|e| bulk_json_error(&e))?;
    if !head.docs {
        return Err(bad("POST body must include `docs` parameter."));
    }
    let mut w = BulkWrite {
        batch: store.batch(db, head.new_edits)?,
        new_edits: head.new_edits,
        rows: Vec::new(),
        failed: None,
        pos: None,
    };
    let parsed = match body {
        Body::Memory(b) => {
            let mut de = serde_json::Deserializer::from_slice(b);
            serde::de::DeserializeSeed::deserialize(BulkTop(&mut w), &mut de)
        }
        Body::File(f) => {
            let pos = std::rc::Rc::new(std::cell::Cell::new(Pos::default()));
            w.pos = Some(pos.clone());
            let rd = std::io::BufReader::with_capacity(
                SPOOL_BUFFER,
                Bounded {
                    inner: open(f)?,
                    pos,
                },
            );
            let mut de = serde_json::Deserializer::from_reader(rd);
            serde::de::DeserializeSeed::deserialize(BulkTop(&mut w), &mut de)
        }
    };
    if let Some(e) = w.failed.take() {
        return Err(e);
    }
    if w.pos.as_ref().is_some_and(|p| p.get().over) {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("a document may be at most {} bytes", crate::DOC_LIMIT),
        ));
    }
    parsed.map_err(|e| bulk_json_error(&e))?;
    w.batch.commit()?;
    Ok((w.new_edits, w.rows))
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
    /// `atts_since`: attachments whose `revpos` is at most this stay stubs.
    pub atts_since: Option<u64>,
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
            atts_since: None,
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
                let revpos = a.get("revpos").and_then(Value::as_u64).unwrap_or(0);
                if show.atts_since.is_some_and(|g| revpos <= g) {
                    continue;
                }
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
        let cors = store.cors_origins()?;
        Ok(Api {
            store: Arc::new(store),
            changed: watch::channel(0).0,
            uuid,
            sessions: Mutex::new(HashMap::new()),
            cors: RwLock::new(cors),
            compacting: Arc::new(Mutex::new(HashSet::new())),
            tls: false,
            att_budget: Arc::new(tokio::sync::Semaphore::new(ATT_BUDGET_KIB as usize)),
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
                "compact_running": self.compacting.lock().is_ok_and(|c| c.contains(&name)),
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
        let body = Body::of(self.store.spool_dir(), req).await?;
        let Value::Object(mut doc) = body.json().await? else {
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
        let body = Body::of(self.store.spool_dir(), req).await?;
        let Value::Object(doc) = body.json().await? else {
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
        let mut show = Show::of(&q);
        let atts_since: Option<Vec<String>> = match q.json("atts_since")? {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
            ),
            Some(_) => return Err(bad("atts_since must be a JSON array of revisions")),
        };
        if atts_since.is_some() {
            show.attachments = true;
        }
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
                // The client has the attachments up to the newest of its
                // revisions that this tree knows.
                if let (Some(since), Some(r)) = (&atts_since, &rec) {
                    show.atts_since = since
                        .iter()
                        .filter(|v| r.tree.contains(v))
                        .map(|v| generation(v))
                        .max();
                }
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
        // Its length first, to wait for room for it in the budget.
        let length = {
            let (db, id, name, rev) = (db.clone(), id.clone(), name.clone(), rev.clone());
            self.run(move |s| -> Result<Result<u64, ApiError>, StoreError> {
                let rd = s.reader(&db)?;
                let Some(rec) = rd.doc(&id)? else {
                    return Ok(Err(not_found("missing")));
                };
                let rev = match rev {
                    Some(r) => r,
                    None if rec.tree.deleted() => return Ok(Err(not_found("deleted"))),
                    None => rec.tree.winner().unwrap_or("").to_owned(),
                };
                Ok(Ok(rec
                    .tree
                    .node(&rev)
                    .and_then(|n| n.body.as_ref())
                    .and_then(|b| b.get("_attachments"))
                    .and_then(|a| a.get(&name))
                    .and_then(|a| a.get("length"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)))
            })
            .await??
        };
        let kib = u32::try_from(length.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, ATT_BUDGET_KIB);
        let permit = self
            .att_budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_server_error",
                    e.to_string(),
                )
            })?;
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
        let body = Budgeted {
            data: (!body.is_empty()).then_some(body),
            _permit: permit,
        };
        let mut r = b
            .body(body.boxed_unsync())
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

    /// `_bulk_docs`: all the documents in one transaction, durable before
    /// the answer; a large body is spooled and written as it is parsed.
    pub async fn bulk_docs(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let body = Body::of(self.store.spool_dir(), req).await?;
        let store = self.store.clone();
        let (new_edits, rows) = tokio::task::spawn_blocking(move || bulk_write(&store, &db, &body))
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_server_error",
                    format!("the request failed: {e}"),
                )
            })??;
        if rows
            .iter()
            .any(|r| matches!(r, Row::Written { result: Ok(_), .. }))
        {
            self.notify();
        }
        let mut out = Vec::new();
        for row in rows {
            match row {
                Row::Refused(row) => out.push(row),
                Row::Written {
                    id,
                    result: Ok(rev),
                    ..
                } if new_edits => out.push(json!({"ok": true, "id": id, "rev": rev})),
                Row::Written { result: Ok(_), .. } => {}
                Row::Written {
                    id,
                    sent_rev,
                    result: Err(e),
                } => {
                    let (_, name) = doc_error(&e);
                    let mut row = json!({"id": id, "error": name, "reason": e.to_string()});
                    if !sent_rev.is_null() {
                        row["rev"] = sent_rev;
                    }
                    out.push(row);
                }
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
        // Fail before the 200 when the database is not there.
        let meta_db = db.clone();
        self.run(move |s| s.db_meta(&meta_db)).await?;
        // Streamed a document at a time: with attachments inline, a batch
        // can be far larger than the memory the service should use.
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Out::new(tx);
            if let Err(e) = bulk_get(&store, &db, &asks, show, latest, &mut out) {
                out.fail(e);
            }
        });
        Ok(streamed(rx))
    }

    /// `_changes`: the normal feed streams one snapshot; longpoll first waits
    /// for a change after `since`; continuous keeps sending rows as they come.
    pub async fn changes(&self, db: String, req: Request<RoutedBody>, post: bool) -> Answer {
        check_db(&db)?;
        let q = Query::of(&req);
        // A browser's EventSource resumes with the last id it saw.
        let last_event = req
            .headers()
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = if post {
            read_json(req).await?
        } else {
            Value::Null
        };
        let meta_db = db.clone();
        let now = self.run(move |s| s.db_meta(&meta_db)).await?.update_seq;
        let feed = q.get("feed").unwrap_or("normal").to_owned();
        if !matches!(
            feed.as_str(),
            "normal" | "longpoll" | "continuous" | "eventsource"
        ) {
            return Err(bad(format!(
                "Supported feeds are normal, longpoll, continuous and eventsource, not {feed:?}"
            )));
        }
        let sse = feed == "eventsource";
        let last_event = last_event.filter(|_| sse);
        let since = match q.get("since").map(str::to_owned).or(last_event) {
            Some(s) if s == "now" => now,
            Some(s) => parse_since(Some(&Value::String(s)), now)?,
            None => 0,
        };
        let filter = match q.get("filter") {
            None => ChangeFilter::All,
            Some("_design") => ChangeFilter::Design,
            Some("_selector") => {
                let sel = body
                    .get_mut("selector")
                    .map(Value::take)
                    .ok_or_else(|| bad("filter=_selector needs a selector in the body"))?;
                let sel = off_worker(move || Selector::parse(&sel).map_err(mango_error)).await?;
                ChangeFilter::Selector(sel)
            }
            Some("_doc_ids") => {
                let ids = match body.get("doc_ids") {
                    Some(v) => Some(v.clone()),
                    None => q.json("doc_ids")?,
                };
                let Some(Value::Array(ids)) = ids else {
                    return Err(bad("filter=_doc_ids needs a JSON array doc_ids"));
                };
                ChangeFilter::DocIds(
                    ids.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect(),
                )
            }
            Some(f) => {
                return Err(bad(format!(
                    "filter {f:?} is not supported: this server runs no JavaScript filter functions (only _doc_ids, _selector and _design)"
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
            filter,
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
            let beat: &[u8] = if sse { b": heartbeat\n\n" } else { b"\n" };
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
                    if !wait(&mut changed, &mut out, deadline, heartbeat, beat).await {
                        break;
                    }
                }
            }
            if feed != "continuous" && !sse {
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
                    let r = changes_rows(&store2, &db2, since, &opts2, &mut out, sent, sse);
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
                if !wait(&mut changed, &mut out, deadline, heartbeat, beat).await {
                    break;
                }
            }
            if sse {
                return;
            }
            out.buf
                .extend_from_slice(format!("{{\"last_seq\":{since}}}\n").as_bytes());
            out.flush().await;
        });
        let mut r = streamed(rx);
        if sse {
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache"),
            );
        }
        Ok(r)
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

/// Mango (`_find`, `_explain`, `_index`): how many rows a sorted query may
/// hold at once (`skip` + `limit`); above it the query is refused, since a
/// sort keeps that many keys in memory.
pub const MAX_SORTED_ROWS: u64 = 10_000;
/// `limit` when the client names none (CouchDB's).
const DEFAULT_FIND_LIMIT: u64 = 25;
/// How long a `POST /_session` login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest user name a session keeps.
const MAX_SESSION_NAME: usize = 256;
/// Sessions kept at most (the oldest go first).
const MAX_SESSIONS: usize = 10_000;
/// The cookie of a `POST /_session` login.
pub const SESSION_COOKIE: &str = "AuthSession";
/// Most origins the owner may add.
const MAX_CORS_ORIGINS: usize = 64;
/// Documents stemmed per transaction of a compaction.
const COMPACT_BATCH: usize = 256;

fn mango_error(e: MangoError) -> ApiError {
    match e {
        MangoError::InvalidOperator(_) => {
            ApiError(StatusCode::BAD_REQUEST, "invalid_operator", e.to_string())
        }
        MangoError::MixedSort => ApiError(
            StatusCode::BAD_REQUEST,
            "unsupported_mixed_sort",
            e.to_string(),
        ),
        MangoError::BadArg(_) => bad(e.to_string()),
    }
}

/// A `_find` (or `_explain`) request, checked against the database's
/// indexes before any answer starts.
struct FindPlan {
    selector: Selector,
    selector_json: Value,
    fields: Option<Vec<String>>,
    sort: Vec<String>,
    dir: Dir,
    limit: u64,
    skip: u64,
    /// Rows strictly after this (key, id) in the query's order.
    bookmark: Option<(Vec<Value>, String)>,
    /// The json index used; `None`: `_all_docs`.
    index: Option<Index>,
    conflicts: bool,
    stats: bool,
    warnings: Vec<String>,
}

impl FindPlan {
    /// Whether the rows come in `_id` order (no sort, or on `_id` alone).
    fn by_id(&self) -> bool {
        self.sort.is_empty() || self.sort == ["_id"]
    }

    fn describe_index(&self) -> Value {
        match &self.index {
            Some(i) => i.describe(),
            None => all_docs_index(),
        }
    }
}

fn all_docs_index() -> Value {
    json!({"ddoc": null, "name": "_all_docs", "type": "special", "def": {"fields": [{"_id": "asc"}]}})
}

fn encode_bookmark(key: &[Value], id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!([key, id])).unwrap_or_default())
}

fn decode_bookmark(b: &str) -> Result<(Vec<Value>, String), ApiError> {
    let invalid = || {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid_bookmark",
            format!("Invalid bookmark value: {b}"),
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b)
        .map_err(|_| invalid())?;
    match serde_json::from_slice::<Value>(&raw).map_err(|_| invalid())? {
        Value::Array(mut a) if a.len() == 2 => match (a.pop(), a.pop()) {
            (Some(Value::String(id)), Some(Value::Array(key))) => Ok((key, id)),
            _ => Err(invalid()),
        },
        _ => Err(invalid()),
    }
}

/// The json indexes of a database (from its `language: "query"` design
/// documents), in design document order.
fn indexes(rd: &Reader) -> Result<Vec<Index>, StoreError> {
    let mut out = Vec::new();
    rd.all_docs(
        Some("_design/"),
        Some("_design0"),
        false,
        false,
        |id, rec| {
            if !rec.tree.deleted() {
                let body = rec
                    .tree
                    .winner()
                    .and_then(|w| rec.tree.node(w))
                    .and_then(|n| n.body.as_ref());
                if let Some(b) = body {
                    out.extend(Index::of_ddoc(id, b));
                }
            }
            Ok(ControlFlow::Continue(()))
        },
    )?;
    Ok(out)
}

/// `use_index`: `"ddoc"`, `"_design/ddoc"` or `["ddoc", "name"]`.
fn parse_use_index(v: Option<&Value>) -> Result<Option<(String, Option<String>)>, ApiError> {
    let full = |d: &str| {
        if d.starts_with("_design/") {
            d.to_owned()
        } else {
            format!("_design/{d}")
        }
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(d)) => Ok(Some((full(d), None))),
        Some(Value::Array(a)) if a.is_empty() => Ok(None),
        Some(Value::Array(a)) => match (a.first().and_then(Value::as_str), a.get(1)) {
            (Some(d), None) if a.len() == 1 => Ok(Some((full(d), None))),
            (Some(d), Some(Value::String(n))) if a.len() == 2 => {
                Ok(Some((full(d), Some(n.clone()))))
            }
            _ => Err(bad("use_index is a design document name or [ddoc, name]")),
        },
        Some(_) => Err(bad("use_index is a design document name or [ddoc, name]")),
    }
}

/// Runs CPU work of a request that is not store work on a blocking
/// thread: parsing a selector compiles its `$regex`es, which must not
/// hold up the async workers that answer every other request.
async fn off_worker<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            format!("the request failed: {e}"),
        ))
    })
}

/// Reads a `_find` body and chooses the index (the rules are in the README).
fn plan_find(body: &Value, idx: Vec<Index>) -> Result<FindPlan, ApiError> {
    let Value::Object(b) = body else {
        return Err(bad("Request body must be a JSON object"));
    };
    let selector_json = b
        .get("selector")
        .cloned()
        .ok_or_else(|| bad("Missing required key: selector"))?;
    let selector = Selector::parse(&selector_json).map_err(mango_error)?;
    let number = |k: &str, default: u64| -> Result<u64, ApiError> {
        match b.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| bad(format!("{k} must be a non-negative integer"))),
        }
    };
    let limit = number("limit", DEFAULT_FIND_LIMIT)?;
    let skip = number("skip", 0)?;
    let fields = match b.get("fields") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) if a.is_empty() => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|f| {
                    f.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad("fields must be an array of field names"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(bad("fields must be an array of field names")),
    };
    let (sort, dir) = match b.get("sort") {
        None | Some(Value::Null) => (Vec::new(), Dir::Asc),
        Some(v) => mango::parse_sort(v).map_err(mango_error)?,
    };
    let bookmark = match b.get("bookmark") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "nil" || s.is_empty() => None,
        Some(Value::String(s)) => Some(decode_bookmark(s)?),
        Some(_) => return Err(bad("bookmark must be a string")),
    };
    let wanted = parse_use_index(b.get("use_index"))?;
    let named = |i: &Index| {
        wanted
            .as_ref()
            .is_some_and(|(d, n)| *d == i.ddoc && n.as_ref().is_none_or(|n| *n == i.name))
    };
    let mut warnings = Vec::new();
    let by_id = sort.is_empty() || sort == ["_id"];
    let index = if !by_id {
        // A sort needs an index whose leading fields are the sort fields.
        let fits: Vec<&Index> = idx.iter().filter(|i| i.sorts(&sort)).collect();
        let chosen = fits
            .iter()
            .find(|i| named(i))
            .or_else(|| fits.first())
            .copied()
            .cloned();
        match chosen {
            Some(i) => Some(i),
            None => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "no_usable_index",
                    "No index exists for this sort, try indexing by the sort fields.".into(),
                ))
            }
        }
    } else {
        // Without a sort: an index whose fields the selector requires.
        let required = selector.required_fields();
        let usable = |i: &&Index| i.fields.iter().all(|(f, _)| required.contains(f));
        let fits: Vec<&Index> = idx.iter().filter(usable).collect();
        let chosen = fits
            .iter()
            .find(|i| named(i))
            .or_else(|| fits.first())
            .copied()
            .cloned();
        if chosen.is_none() {
            warnings.push(
                "No matching index found, create an index to optimize query time.".to_owned(),
            );
        }
        chosen
    };
    if let Some((d, _)) = &wanted {
        if index.as_ref().is_none_or(|i| !named(i)) {
            warnings.push(format!(
                "{d} was not used because it does not contain a valid index for this query."
            ));
        }
    }
    if !by_id && skip.saturating_add(limit) > MAX_SORTED_ROWS {
        return Err(bad(format!(
            "a sorted query holds skip + limit rows while it scans: at most {MAX_SORTED_ROWS} here; page with bookmark instead"
        )));
    }
    Ok(FindPlan {
        selector,
        selector_json,
        fields,
        sort,
        dir,
        limit,
        skip,
        bookmark,
        index,
        conflicts: b.get("conflicts").and_then(Value::as_bool) == Some(true),
        stats: b.get("execution_stats").and_then(Value::as_bool) == Some(true),
        warnings,
    })
}

/// A row of a sorted scan in a heap whose top is the row to drop first
/// (the last in the query's order).
struct Ranked {
    key: (Vec<Value>, String),
    desc: bool,
}

impl Ranked {
    fn order(&self, other: &Ranked) -> std::cmp::Ordering {
        let o = mango::compare_rows(&self.key, &other.key);
        if self.desc {
            o.reverse()
        } else {
            o
        }
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Ranked) -> bool {
        self.order(other).is_eq()
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Ranked) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Ranked) -> std::cmp::Ordering {
        self.order(other)
    }
}

/// Runs a planned `_find` over one snapshot and streams the answer. Every
/// live, non-design document is read and matched; in `_id` order rows are
/// sent as they match, otherwise the best `skip + limit` keys are kept in
/// a bounded heap and their documents read again at the end.
fn run_find(store: &Store, db: &str, plan: &FindPlan, out: &mut Out) -> Result<(), StoreError> {
    let started = Instant::now();
    let rd = store.reader(db)?;
    let show = Show {
        conflicts: plan.conflicts,
        ..Show::default()
    };
    // Live, non-design documents read.
    let examined = std::cell::Cell::new(0u64);
    let mut rows = Rows { n: 0, alive: true };
    let mut last: Option<(Vec<Value>, String)> = None;
    out.put(b"{\"docs\":[\n");
    let desc = plan.dir == Dir::Desc;
    // The document as the query sees it, if it is one the query may return.
    let candidate =
        |id: &str, rec: &crate::store::DocRecord| -> Result<Option<Value>, StoreError> {
            if id.starts_with("_design/") || rec.tree.deleted() {
                return Ok(None);
            }
            examined.set(examined.get() + 1);
            let winner = rec.tree.winner().unwrap_or("");
            let Some(doc) = show_doc(&rd, id, &rec.tree, winner, show)? else {
                return Ok(None);
            };
            let indexed = plan.index.as_ref().is_none_or(|i| i.covers(&doc));
            Ok((indexed && plan.selector.matches(&doc)).then_some(doc))
        };
    let emit = |rows: &mut Rows, out: &mut Out, doc: &Value| {
        let shown = match &plan.fields {
            Some(f) => mango::project(doc, f),
            None => doc.clone(),
        };
        rows.emit(out, &shown);
    };
    if plan.by_id() {
        let after = plan.bookmark.as_ref().map(|(_, id)| id.clone());
        let mut skipped = 0u64;
        rd.all_docs(after.as_deref(), None, true, desc, |id, rec| {
            if after.as_deref() == Some(id) {
                return Ok(ControlFlow::Continue(()));
            }
            if rows.n >= plan.limit || !rows.alive {
                return Ok(ControlFlow::Break(()));
            }
            let Some(doc) = candidate(id, &rec)? else {
                return Ok(ControlFlow::Continue(()));
            };
            if skipped < plan.skip {
                skipped += 1;
                return Ok(ControlFlow::Continue(()));
            }
            emit(&mut rows, out, &doc);
            last = Some((Vec::new(), id.to_owned()));
            Ok(ControlFlow::Continue(()))
        })?;
    } else {
        let keep = usize::try_from(plan.skip.saturating_add(plan.limit)).unwrap_or(usize::MAX);
        let mut heap: std::collections::BinaryHeap<Ranked> = std::collections::BinaryHeap::new();
        let after = plan.bookmark.clone().map(|key| Ranked { key, desc });
        if keep > 0 {
            rd.all_docs(None, None, true, false, |id, rec| {
                let Some(doc) = candidate(id, &rec)? else {
                    return Ok(ControlFlow::Continue(()));
                };
                let row = Ranked {
                    key: (mango::sort_key(&doc, &plan.sort), id.to_owned()),
                    desc,
                };
                if after.as_ref().is_some_and(|a| row <= *a) {
                    return Ok(ControlFlow::Continue(()));
                }
                if heap.len() < keep {
                    heap.push(row);
                } else if heap.peek().is_some_and(|top| row < *top) {
                    heap.pop();
                    heap.push(row);
                }
                Ok(ControlFlow::Continue(()))
            })?;
        }
        let ordered = heap.into_sorted_vec();
        for r in ordered
            .into_iter()
            .skip(usize::try_from(plan.skip).unwrap_or(usize::MAX))
        {
            if !rows.alive {
                break;
            }
            let Some(rec) = rd.doc(&r.key.1)? else {
                continue;
            };
            let winner = rec.tree.winner().unwrap_or("").to_owned();
            if let Some(doc) = show_doc(&rd, &r.key.1, &rec.tree, &winner, show)? {
                emit(&mut rows, out, &doc);
            }
            last = Some(r.key);
        }
    }
    let bookmark = match &last {
        Some((k, id)) => encode_bookmark(k, id),
        None => plan
            .bookmark
            .as_ref()
            .map_or_else(|| "nil".to_owned(), |(k, id)| encode_bookmark(k, id)),
    };
    let mut tail = format!("\n],\n\"bookmark\":{}", json!(bookmark));
    if !plan.warnings.is_empty() {
        tail.push_str(&format!(
            ",\n\"warning\":{}",
            json!(plan.warnings.join("\n"))
        ));
    }
    if plan.stats {
        let stats = json!({
            "total_keys_examined": 0,
            "total_docs_examined": examined.get(),
            "total_quorum_docs_examined": 0,
            "results_returned": rows.n,
            "execution_time_ms": started.elapsed().as_secs_f64() * 1000.0,
        });
        tail.push_str(&format!(",\n\"execution_stats\":{stats}"));
    }
    tail.push_str("}\n");
    out.put(tail.as_bytes());
    out.flush_blocking();
    Ok(())
}

/// The name CouchDB's clients get for an index they did not name: a
/// digest of its fields.
fn index_name(fields: &[(String, Dir)]) -> String {
    let def: Vec<Value> = fields
        .iter()
        .map(|(f, d)| json!({ f.clone(): d.name() }))
        .collect();
    use md5::Digest;
    hex::encode(md5::Md5::digest(json!(def).to_string().as_bytes()))
}

/// The cookie value of `name` in a request's `Cookie` headers.
pub fn cookie(headers: &hyper::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim_start_matches(' ').split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_owned())
}

/// An origin as CORS compares it: `http(s)://host[:port]`, lower-cased, or
/// `None` if it is not one.
fn normalize_origin(o: &str) -> Option<String> {
    let lower = o.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))?;
    let ok = !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    let authority: hyper::http::uri::Authority = rest.parse().ok()?;
    (ok && !authority.host().is_empty()).then_some(lower)
}

/// Mango, attachments as their own routes, sessions, CORS origins and
/// compaction.
impl Api {
    /// Marks the service as answering over TLS (its session cookies are
    /// then `Secure`).
    pub fn served_over_tls(mut self, tls: bool) -> Api {
        self.tls = tls;
        self
    }

    /// The json indexes of `db`; a 404 when it is not there.
    async fn indexes_of(&self, db: String) -> Result<Vec<Index>, ApiError> {
        self.run(move |s| indexes(&s.reader(&db)?)).await
    }

    pub async fn find(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let body = read_json(req).await?;
        let idx = self.indexes_of(db.clone()).await?;
        let plan = off_worker(move || plan_find(&body, idx)).await?;
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Out::new(tx);
            if let Err(e) = run_find(&store, &db, &plan, &mut out) {
                out.fail(e);
            }
        });
        Ok(streamed(rx))
    }

    pub async fn explain(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let body = read_json(req).await?;
        let idx = self.indexes_of(db.clone()).await?;
        let (plan, body) = off_worker(move || plan_find(&body, idx).map(|p| (p, body))).await?;
        let sort: Map<String, Value> = plan
            .sort
            .iter()
            .map(|f| (f.clone(), json!(plan.dir.name())))
            .collect();
        let fields = match &plan.fields {
            Some(f) => json!(f),
            None => json!("all_fields"),
        };
        Ok(reply(
            StatusCode::OK,
            &json!({
                "dbname": db,
                "index": plan.describe_index(),
                "partitioned": false,
                "selector": plan.selector_json,
                "opts": {
                    "use_index": body.get("use_index").cloned().unwrap_or(json!([])),
                    "bookmark": body.get("bookmark").cloned().unwrap_or(json!("nil")),
                    "limit": plan.limit, "skip": plan.skip, "sort": sort, "fields": fields,
                    "conflicts": plan.conflicts, "execution_stats": plan.stats,
                },
                "limit": plan.limit,
                "skip": plan.skip,
                "fields": fields,
                // What this server does with the index: every document is
                // read; the index decides the order and which documents
                // are in it (those with all its fields).
                "scan": "every document of the database, in one snapshot",
                "warning": plan.warnings.join("\n"),
            }),
        ))
    }

    pub async fn get_indexes(&self, db: String) -> Answer {
        check_db(&db)?;
        let idx = self.indexes_of(db).await?;
        let mut list = vec![all_docs_index()];
        list.extend(idx.iter().map(Index::describe));
        Ok(reply(
            StatusCode::OK,
            &json!({"total_rows": list.len(), "indexes": list}),
        ))
    }

    /// Writes design document `ddoc` as `change` makes it from the current
    /// one (its winner's body, or none), retrying a few times when another
    /// write gets in first. `change` answers the body to write (`None`:
    /// nothing to do) and what to tell the client.
    async fn edit_ddoc<T: Send + 'static>(
        &self,
        db: String,
        ddoc: String,
        change: impl Fn(Option<&Map<String, Value>>) -> Result<(Option<Map<String, Value>>, T), ApiError>
            + Send
            + Sync
            + 'static,
    ) -> Result<T, ApiError> {
        let change = Arc::new(change);
        for _ in 0..5 {
            let (d2, id2, ch) = (db.clone(), ddoc.clone(), change.clone());
            let (write, told) = self
                .run(move |s| -> Result<Result<_, ApiError>, StoreError> {
                    let rd = s.reader(&d2)?;
                    let rec = rd.doc(&id2)?;
                    let current = rec.as_ref().filter(|r| !r.tree.deleted()).and_then(|r| {
                        let w = r.tree.winner()?;
                        Some((w.to_owned(), r.tree.node(w)?.body.clone()?))
                    });
                    Ok(match ch(current.as_ref().map(|(_, b)| b)) {
                        Err(e) => Err(e),
                        Ok((None, t)) => Ok((None, t)),
                        Ok((Some(mut body), t)) => {
                            if let Some((rev, _)) = &current {
                                body.insert("_rev".into(), json!(rev));
                            }
                            Ok((Some(body), t))
                        }
                    })
                })
                .await??;
            let Some(doc) = write else {
                return Ok(told);
            };
            let out = self
                .write(
                    db.clone(),
                    vec![DocWrite {
                        id: ddoc.clone(),
                        doc,
                    }],
                    true,
                )
                .await?;
            match out.into_iter().next() {
                Some(Ok(_)) => return Ok(told),
                Some(Err(DocError::Conflict)) => continue,
                Some(Err(e)) => {
                    let (status, name) = doc_error(&e);
                    return Err(ApiError(status, name, e.to_string()));
                }
                None => return Err(bad("nothing written")),
            }
        }
        Err(ApiError(
            StatusCode::CONFLICT,
            "conflict",
            "Document update conflict.".into(),
        ))
    }

    pub async fn create_index(&self, db: String, req: Request<RoutedBody>) -> Answer {
        check_db(&db)?;
        let body = read_json(req).await?;
        let Value::Object(b) = body else {
            return Err(bad("Request body must be a JSON object"));
        };
        match b.get("type").and_then(Value::as_str) {
            None | Some("json") => {}
            Some(t) => {
                return Err(bad(format!(
                    "index type {t:?} is not supported here (only json)"
                )))
            }
        }
        let fields_json = b
            .get("index")
            .and_then(|i| i.get("fields"))
            .ok_or_else(|| bad("Missing required key: index.fields"))?;
        let fields = mango::parse_fields(fields_json, "index.fields").map_err(mango_error)?;
        if fields.is_empty() {
            return Err(bad("index.fields must name at least one field"));
        }
        let digest = index_name(&fields);
        let name = match b.get("name") {
            None | Some(Value::Null) => digest.clone(),
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            Some(_) => return Err(bad("name must be a non-empty string")),
        };
        let ddoc = match b.get("ddoc") {
            None | Some(Value::Null) => format!("_design/{digest}"),
            Some(Value::String(d)) if d.starts_with("_design/") && d.len() > 8 => d.clone(),
            Some(Value::String(d)) if !d.is_empty() => format!("_design/{d}"),
            Some(_) => return Err(bad("ddoc must be a non-empty string")),
        };
        let index = Index {
            ddoc: ddoc.clone(),
            name: name.clone(),
            fields,
        };
        let result = self
            .edit_ddoc(db, ddoc.clone(), move |cur| {
                let mut body = match cur {
                    Some(b) if b.get("language").and_then(Value::as_str) != Some("query") => {
                        return Err(bad(format!(
                            "{} is a design document of another language; choose another ddoc",
                            index.ddoc
                        )))
                    }
                    Some(b) => b.clone(),
                    None => {
                        let mut m = Map::new();
                        m.insert("language".into(), json!("query"));
                        m
                    }
                };
                let existing = Index::of_ddoc(&index.ddoc, &body);
                if existing.contains(&index) {
                    return Ok((None, "exists"));
                }
                let views = body
                    .entry("views")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !views.is_object() {
                    *views = Value::Object(Map::new());
                }
                if let Some(v) = views.as_object_mut() {
                    v.insert(index.name.clone(), index.view());
                }
                Ok((Some(body), "created"))
            })
            .await?;
        Ok(reply(
            StatusCode::OK,
            &json!({"result": result, "id": ddoc, "name": name}),
        ))
    }

    pub async fn delete_index(&self, db: String, ddoc: String, name: String) -> Answer {
        check_db(&db)?;
        let ddoc = if ddoc.starts_with("_design/") {
            ddoc
        } else {
            format!("_design/{ddoc}")
        };
        let missing = || not_found("Index not found");
        self.edit_ddoc(db, ddoc.clone(), move |cur| {
            let Some(cur) = cur else {
                return Err(missing());
            };
            let mut body = cur.clone();
            let views = body.get_mut("views").and_then(Value::as_object_mut);
            let Some(views) = views.filter(|v| v.contains_key(&name)) else {
                return Err(missing());
            };
            if Index::of_ddoc(&ddoc, cur).iter().all(|i| i.name != name) {
                return Err(missing());
            }
            views.remove(&name);
            if views.is_empty() {
                // The last index goes with its design document.
                let mut gone = Map::new();
                gone.insert("_deleted".into(), json!(true));
                return Ok((Some(gone), ()));
            }
            Ok((Some(body), ()))
        })
        .await?;
        Ok(reply(StatusCode::OK, &json!({"ok": true})))
    }

    /// `PUT /{db}/{doc}/{att}?rev=`: the raw body becomes the attachment
    /// (its Content-Type kept) in a new revision; without `rev` the
    /// document is made (a 409 if it exists).
    pub async fn put_attachment(
        &self,
        db: String,
        id: String,
        name: String,
        req: Request<RoutedBody>,
    ) -> Answer {
        check_db(&db)?;
        check_doc_id(&id)?;
        if name.is_empty() || name.starts_with('_') {
            return Err(bad(
                "Attachment name must not be empty or start with an underscore",
            ));
        }
        let q = Query::of(&req);
        let rev = q.get("rev").map(str::to_owned).or_else(|| {
            req.headers()
                .get(hyper::header::IF_MATCH)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim_matches('"').to_owned())
        });
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let data = req
            .into_body()
            .collect()
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the attachment could not be read whole: {e}"),
                )
            })?
            .to_bytes();
        let att = json!({
            "content_type": content_type,
            "data": base64::engine::general_purpose::STANDARD.encode(&data),
        });
        self.edit_attachment(db, id, rev, name, Some(att)).await
    }

    /// `DELETE /{db}/{doc}/{att}?rev=`: a new revision without it.
    pub async fn delete_attachment(
        &self,
        db: String,
        id: String,
        name: String,
        req: Request<RoutedBody>,
    ) -> Answer {
        check_db(&db)?;
        check_doc_id(&id)?;
        let q = Query::of(&req);
        let Some(rev) = q.get("rev").map(str::to_owned) else {
            return Err(ApiError(
                StatusCode::CONFLICT,
                "conflict",
                "Document update conflict.".into(),
            ));
        };
        let r = self.edit_attachment(db, id, Some(rev), name, None).await?;
        let (mut parts, body) = r.into_parts();
        parts.status = StatusCode::OK;
        Ok(Response::from_parts(parts, body))
    }

    /// A new revision of `id` on `rev` with attachment `name` set to `att`
    /// (inline data) or removed.
    async fn edit_attachment(
        &self,
        db: String,
        id: String,
        rev: Option<String>,
        name: String,
        att: Option<Value>,
    ) -> Answer {
        let (d2, id2, rev2) = (db.clone(), id.clone(), rev.clone());
        let base = self
            .run(
                move |s| -> Result<Result<Map<String, Value>, ApiError>, StoreError> {
                    let rd = s.reader(&d2)?;
                    let rec = rd.doc(&id2)?;
                    let conflict = || {
                        ApiError(
                            StatusCode::CONFLICT,
                            "conflict",
                            "Document update conflict.".into(),
                        )
                    };
                    Ok(match (&rev2, rec) {
                        (Some(r), Some(rec)) => match rec.tree.node(r).and_then(|n| n.body.clone())
                        {
                            Some(b) if rec.tree.is_leaf(r) => Ok(b),
                            _ => Err(conflict()),
                        },
                        (Some(_), None) => Err(not_found("missing")),
                        (None, Some(rec)) if !rec.tree.deleted() => Err(conflict()),
                        (None, _) => Ok(Map::new()),
                    })
                },
            )
            .await??;
        let mut doc = base;
        if let Some(r) = &rev {
            doc.insert("_rev".into(), json!(r));
        }
        let atts = doc
            .entry("_attachments")
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(atts) = atts.as_object_mut() else {
            return Err(bad("_attachments is not an object"));
        };
        match att {
            Some(a) => {
                atts.insert(name, a);
            }
            None => {
                if atts.remove(&name).is_none() {
                    return Err(not_found("Document is missing attachment"));
                }
            }
        }
        if atts.is_empty() {
            doc.remove("_attachments");
        }
        self.write_one(db, id, doc, &Query(Vec::new())).await
    }

    /// `POST /_session`: `name` and `password` (a form or JSON); the
    /// password is a paired device's token, checked like Basic's. The
    /// answer sets the `AuthSession` cookie: a session id and the token.
    pub async fn login(
        &self,
        req: Request<RoutedBody>,
        auth: Arc<dyn cloudlet_runtime::auth::Authenticator>,
    ) -> Answer {
        let form = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let raw = req
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
        let (name, password) = if form {
            let text = String::from_utf8_lossy(&raw);
            let fake = Request::builder()
                .uri(format!("/?{text}"))
                .body(())
                .map_err(|_| bad("the form does not parse"))?;
            let q = Query::of(&fake);
            (
                q.get("name").map(str::to_owned),
                q.get("password").map(str::to_owned),
            )
        } else {
            let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("invalid UTF-8 JSON"))?;
            let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
            (field("name"), field("password"))
        };
        let (Some(name), Some(password)) = (name, password) else {
            return Err(bad("name and password are required"));
        };
        if name.len() > MAX_SESSION_NAME {
            return Err(bad(format!("name may be at most {MAX_SESSION_NAME} bytes")));
        }
        let presented = cloudlet_runtime::auth::Presented {
            token: Some(password.clone()),
            ..Default::default()
        };
        match auth.check(presented).await {
            Ok(_) => {}
            Err(cloudlet_runtime::auth::AuthError::Unavailable) => {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "service_unavailable",
                    "the device registry is not reachable; try again".into(),
                ))
            }
            Err(_) => {
                return Err(ApiError(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Name or password is incorrect.".into(),
                ))
            }
        }
        let sid = new_id();
        if let Ok(mut s) = self.sessions.lock() {
            let now = Instant::now();
            s.retain(|_, v| v.until > now);
            if s.len() >= MAX_SESSIONS {
                if let Some(oldest) = s
                    .iter()
                    .min_by_key(|(_, v)| v.until)
                    .map(|(k, _)| k.clone())
                {
                    s.remove(&oldest);
                }
            }
            s.insert(
                sid.clone(),
                Session {
                    name: name.clone(),
                    until: now + SESSION_TTL,
                },
            );
        }
        let value = format!(
            "{sid}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(password.as_bytes())
        );
        let secure = if self.tls { "; Secure" } else { "" };
        let mut r = reply(
            StatusCode::OK,
            &json!({"ok": true, "name": name, "roles": ["_admin"]}),
        );
        let set = format!(
            "{SESSION_COOKIE}={value}; Version=1; Path=/; HttpOnly; SameSite=Strict{secure}"
        );
        if let Ok(v) = HeaderValue::from_str(&set) {
            r.headers_mut().insert(hyper::header::SET_COOKIE, v);
        }
        Ok(r)
    }

    /// `DELETE /_session`: ends the session of the cookie, if any, and
    /// clears the cookie.
    pub fn logout(&self, headers: &hyper::HeaderMap) -> Answer {
        if let Some(v) = cookie(headers, SESSION_COOKIE) {
            let sid = v.split('.').next().unwrap_or("");
            if let Ok(mut s) = self.sessions.lock() {
                s.remove(sid);
            }
        }
        let mut r = reply(StatusCode::OK, &json!({"ok": true}));
        r.headers_mut().insert(
            hyper::header::SET_COOKIE,
            HeaderValue::from_static(
                "AuthSession=; Version=1; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            ),
        );
        Ok(r)
    }

    /// The user name and token of a live session whose cookie this is.
    pub fn session(&self, value: &str) -> Option<(String, String)> {
        let (sid, token) = value.split_once('.')?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|t| String::from_utf8(t).ok())?;
        let mut s = self.sessions.lock().ok()?;
        let now = Instant::now();
        match s.get(sid) {
            Some(v) if v.until > now => Some((v.name.clone(), token)),
            Some(_) => {
                s.remove(sid);
                None
            }
            None => None,
        }
    }

    /// Whether the owner allowed `origin` to call from a browser.
    pub fn cors_allows(&self, origin: &str) -> bool {
        let Some(o) = normalize_origin(origin) else {
            return false;
        };
        self.cors.read().is_ok_and(|c| c.contains(&o))
    }

    pub fn get_cors(&self) -> Answer {
        let origins = self.cors.read().map(|c| c.clone()).unwrap_or_default();
        Ok(reply(StatusCode::OK, &json!({"origins": origins})))
    }

    /// `PUT /_cloudlet/cors` `{"origins": [...]}`: the owner's list, whole.
    pub async fn put_cors(&self, req: Request<RoutedBody>) -> Answer {
        let owner = req
            .extensions()
            .get::<cloudlet_runtime::auth::Identity>()
            .is_some_and(cloudlet_runtime::auth::Identity::is_owner);
        if !owner {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Only the box's owner may change the allowed origins.".into(),
            ));
        }
        let body = read_json(req).await?;
        let Some(Value::Array(list)) = body.get("origins") else {
            return Err(bad(
                "the body is {\"origins\": [\"https://app.example\", ...]}",
            ));
        };
        if list.len() > MAX_CORS_ORIGINS {
            return Err(bad(format!("at most {MAX_CORS_ORIGINS} origins")));
        }
        let mut origins = Vec::new();
        for o in list {
            let n = o.as_str().and_then(normalize_origin).ok_or_else(|| {
                bad(format!(
                    "{o} is not an origin (http:// or https://, a host, an optional port, nothing after)"
                ))
            })?;
            if !origins.contains(&n) {
                origins.push(n);
            }
        }
        let keep = origins.clone();
        self.run(move |s| s.set_cors_origins(&keep)).await?;
        if let Ok(mut c) = self.cors.write() {
            *c = origins.clone();
        }
        Ok(reply(
            StatusCode::OK,
            &json!({"ok": true, "origins": origins}),
        ))
    }

    /// `POST /{db}/_compact`: stems every document to the current
    /// `_revs_limit` in batches of transactions, then frees attachment
    /// contents nothing uses; runs in the background (`compact_running`).
    pub async fn compact(&self, db: String) -> Answer {
        check_db(&db)?;
        let d2 = db.clone();
        self.run(move |s| s.db_meta(&d2)).await?;
        let started = match self.compacting.lock() {
            Ok(mut c) => c.insert(db.clone()),
            Err(_) => false,
        };
        if started {
            let store = self.store.clone();
            let compacting = self.compacting.clone();
            tokio::spawn(async move {
                let mut after: Option<String> = None;
                let mut revs = 0u64;
                loop {
                    let (s, d, a) = (store.clone(), db.clone(), after.clone());
                    let r = tokio::task::spawn_blocking(move || {
                        s.compact_batch(&d, a.as_deref(), COMPACT_BATCH)
                    })
                    .await;
                    match r {
                        Ok(Ok(c)) => {
                            revs += c.revs;
                            after = c.next;
                            if after.is_none() {
                                break;
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(db = %db, error = %e, "compaction stopped");
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let mut freed = 0u64;
                let mut at: Option<String> = None;
                loop {
                    let (s, a) = (store.clone(), at.clone());
                    let r = tokio::task::spawn_blocking(move || {
                        s.sweep_attachments(a.as_deref(), COMPACT_BATCH)
                    })
                    .await;
                    match r {
                        Ok(Ok((n, next))) => {
                            freed += n;
                            at = next;
                            if at.is_none() {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
                tracing::info!(db = %db, revs, freed, "compacted");
                if let Ok(mut c) = compacting.lock() {
                    c.remove(&db);
                }
            });
        }
        Ok(reply(StatusCode::ACCEPTED, &json!({"ok": true})))
    }
}

/// Waits for a change, sending heartbeats; false at the deadline.
async fn wait(
    changed: &mut watch::Receiver<u64>,
    out: &mut Out,
    deadline: tokio::time::Instant,
    heartbeat: Option<Duration>,
    beat: &[u8],
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
                out.buf.extend_from_slice(beat);
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
    filter: ChangeFilter,
}

/// Which documents a `_changes` feed lists.
enum ChangeFilter {
    All,
    DocIds(HashSet<String>),
    /// Those whose winning revision matches (`filter=_selector`).
    Selector(Selector),
    /// Design documents only (`filter=_design`).
    Design,
}

/// One `_changes` row for a document, or none when the filter drops it.
fn change_row(
    rd: &Reader,
    seq: u64,
    id: &str,
    opts: &ChangesOpts,
) -> Result<Option<Value>, StoreError> {
    match &opts.filter {
        ChangeFilter::DocIds(ids) if !ids.contains(id) => return Ok(None),
        ChangeFilter::Design if !id.starts_with("_design/") => return Ok(None),
        _ => {}
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
    if let ChangeFilter::Selector(sel) = &opts.filter {
        let doc = show_doc(rd, id, &rec.tree, winner, Show::default())?;
        if !doc.is_some_and(|d| sel.matches(&d)) {
            return Ok(None);
        }
    }
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
    sse: bool,
) -> Result<(u64, u64, bool), StoreError> {
    let rd = store.reader(db)?;
    let mut last = since;
    let mut n = 0u64;
    let mut alive = true;
    rd.changes(since, false, |seq, id| {
        if let Some(row) = change_row(&rd, seq, id, opts)? {
            let json = serde_json::to_vec(&row).unwrap_or_default();
            if sse {
                alive &= out.put(b"data: ");
                alive &= out.put(&json);
                alive &= out.put(format!("\nid: {seq}\n\n").as_bytes());
            } else {
                alive &= out.put(&json);
                alive &= out.put(b"\n");
            }
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

/// `_bulk_get`'s answer, one requested document at a time.
fn bulk_get(
    store: &Store,
    db: &str,
    asks: &[Value],
    show: Show,
    latest: bool,
    out: &mut Out,
) -> Result<(), StoreError> {
    let rd = store.reader(db)?;
    let mut alive = out.put(b"{\"results\":[\n");
    for (i, ask) in asks.iter().enumerate() {
        let id = ask.get("id").and_then(Value::as_str).unwrap_or("");
        let rev = ask.get("rev").and_then(Value::as_str);
        let error = |rev: &str, reason: &str| json!({"error": {"id": id, "rev": rev, "error": "not_found", "reason": reason}});
        let tree = rd.doc(id)?.map(|r| r.tree).unwrap_or_default();
        let targets: Vec<String> = match rev {
            None => tree.winner().into_iter().map(str::to_owned).collect(),
            Some(r) if latest && tree.contains(r) => {
                tree.leaves_from(r).into_iter().map(str::to_owned).collect()
            }
            Some(r) => vec![r.to_owned()],
        };
        let mut docs = Vec::new();
        if targets.is_empty() {
            docs.push(error(rev.unwrap_or("undefined"), "missing"));
        }
        for t in targets {
            match show_doc(&rd, id, &tree, &t, show)? {
                Some(d) => docs.push(json!({"ok": d})),
                None => docs.push(error(&t, "missing")),
            }
        }
        if i > 0 {
            alive &= out.put(b",\n");
        }
        let row = json!({"id": id, "docs": docs});
        alive &= out.put(&serde_json::to_vec(&row).unwrap_or_default());
        if !alive {
            return Ok(());
        }
    }
    out.put(b"\n]}\n");
    out.flush_blocking();
    Ok(())
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

/// The box's uuid (as `GET /` shows it): part of replication ids.
impl Api {
    pub fn uuid(&self) -> &str {
        &self.uuid
    }
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

    #[tokio::test(start_paused = true)]
    async fn feeds_send_heartbeats_until_the_deadline_and_wake_on_a_change() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut out = Out::new(tx);
        let (changes, mut changed) = watch::channel(0u64);
        let beat: &[u8] = b": heartbeat\n\n";
        let every = Some(Duration::from_millis(10));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(35);
        assert!(!wait(&mut changed, &mut out, deadline, every, beat).await);
        let far = tokio::time::Instant::now() + Duration::from_secs(60);
        changes.send_modify(|n| *n += 1);
        assert!(wait(&mut changed, &mut out, far, every, beat).await);
        drop(out);
        let mut got = Vec::new();
        while let Some(Ok(b)) = rx.recv().await {
            got.extend_from_slice(&b);
        }
        assert_eq!(
            got,
            beat.repeat(3),
            "one per 10 ms before the 35 ms deadline"
        );
    }

    #[tokio::test]
    async fn a_costly_or_crowded_regex_selector_is_a_bad_request_planned_off_the_worker() {
        let plan = |b: Value| off_worker(move || plan_find(&b, Vec::new()));
        let e = plan(json!({"selector": {"s": {"$regex": r"\w{200}"}}}))
            .await
            .err()
            .unwrap();
        assert_eq!((e.0, e.1), (StatusCode::BAD_REQUEST, "bad_request"));
        assert!(e.2.contains("$regex too complex"), "{}", e.2);
        let many: Map<String, Value> = (0..9)
            .map(|i| (format!("f{i}"), json!({"$regex": "^a"})))
            .collect();
        let e = plan(json!({ "selector": many })).await.err().unwrap();
        assert_eq!((e.0, e.1), (StatusCode::BAD_REQUEST, "bad_request"));
        assert!(e.2.contains("at most 8 $regex"), "{}", e.2);
        assert!(plan(json!({"selector": {"s": {"$regex": "^a.c$"}}}))
            .await
            .unwrap()
            .selector
            .matches(&json!({"s": "abc"})));
    }

    #[test]
    fn find_plans_need_an_index_to_sort_and_bound_what_a_sort_holds() {
        let idx = vec![Index {
            ddoc: "_design/i".into(),
            name: "by-n".into(),
            fields: vec![("n".into(), Dir::Asc), ("m".into(), Dir::Asc)],
        }];
        let plan = |b: Value| plan_find(&b, idx.clone());
        let p = plan(json!({"selector": {}, "sort": ["n", "m"]})).unwrap();
        assert_eq!(p.index.as_ref().map(|i| i.name.as_str()), Some("by-n"));
        assert_eq!(p.limit, DEFAULT_FIND_LIMIT);
        assert_eq!(
            plan(json!({"selector": {}, "sort": ["m"]}))
                .err()
                .unwrap()
                .1,
            "no_usable_index"
        );
        assert!(plan(json!({"selector": {}, "sort": ["_id"]}))
            .unwrap()
            .index
            .is_none());
        // Without a sort: used when the selector requires its fields.
        let p = plan(json!({"selector": {"n": 1, "m": {"$gt": 0}}})).unwrap();
        assert!(p.index.is_some() && p.warnings.is_empty());
        let p = plan(json!({"selector": {"n": 1}, "use_index": "i"})).unwrap();
        assert!(p.index.is_none());
        assert_eq!(p.warnings.len(), 2, "no index, and the named one not used");
        let big = json!({"selector": {}, "sort": ["n"], "limit": MAX_SORTED_ROWS, "skip": 1});
        assert_eq!(plan(big).err().unwrap().0, StatusCode::BAD_REQUEST);
        let big = json!({"selector": {}, "limit": MAX_SORTED_ROWS * 10});
        assert!(plan(big).is_ok(), "rows in _id order stream: no bound");
        for bad in [
            json!({"selector": {}, "limit": -1}),
            json!({"selector": {}, "fields": "a"}),
            json!({"selector": 1}),
        ] {
            assert!(plan(bad).is_err());
        }
        let (k, id) = decode_bookmark(&encode_bookmark(&[json!(3)], "d")).unwrap();
        assert_eq!((k, id.as_str()), (vec![json!(3)], "d"));
    }

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        assert_eq!(
            normalize_origin("https://App.Example").as_deref(),
            Some("https://app.example")
        );
        assert_eq!(
            normalize_origin("http://[::1]:5173").as_deref(),
            Some("http://[::1]:5173")
        );
        for bad in [
            "https://a.example/",
            "https://u@a.example",
            "ftp://a",
            "https://",
            "null",
            "https://a b",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
    }

    #[test]
    fn doc_ids_with_underscores_are_reserved() {
        assert!(check_doc_id("a").is_ok());
        assert!(check_doc_id("_design/x").is_ok());
        assert!(check_doc_id("_x").is_err());
        assert!(check_doc_id("").is_err());
    }
}
