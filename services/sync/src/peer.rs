//! One end of a replication: a database in this box's store ([`Peer::Local`],
//! called in-process through the same handlers the HTTP API uses, no
//! loopback connection) or a database on another server
//! ([`Peer::Remote`], CouchDB's HTTP API over hyper, HTTP Basic from the
//! URL's user info). The replicator only uses the calls below, which are
//! the ones the CouchDB replication protocol needs.
//!
//! A paired box is the endpoint `box:BOXID/db`: a [`BoxDialer`] (the
//! mesh, `crate::mesh`) finds where the box is and gives the TLS client
//! that presents this service's certificate chain and pins the box's
//! identity key.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::api::{Api, ApiError};
use crate::store::is_valid_db_name;

/// How much of an answer one call may read, from a remote peer or from
/// this box's own API. An answer is held whole and then parsed into
/// `serde_json::Value`, where each value costs tens of bytes whatever its
/// text (`0,` is two bytes): both are bounded, so a peer cannot make this
/// service hold more than about the byte cap plus ~64 bytes per value.
#[derive(Clone, Copy, Debug)]
pub struct Cap {
    pub bytes: usize,
    pub values: usize,
}

impl Cap {
    /// The protocol's small answers: `GET /`, database info, `_local`
    /// checkpoints, a `_changes` batch, `_revs_diff`, `_bulk_docs`' answer,
    /// `_ensure_full_commit`.
    pub const SMALL: Cap = Cap {
        bytes: 8 << 20,
        values: 256 << 10,
    };
    /// Answers with documents (`_bulk_get` with attachments inline,
    /// `_changes` with `include_docs`): room for one document at
    /// [`crate::DOC_LIMIT`] and its revision history. A larger `_bulk_get`
    /// batch is asked again in halves (the replicator does).
    pub const DOCS: Cap = Cap {
        bytes: crate::DOC_LIMIT as usize + (1 << 20),
        values: 1 << 20,
    };
}
/// How long reaching a peer (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take beyond a long poll's own timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// How to reach a paired box now: its TLS client and its addresses.
pub struct BoxRoute {
    pub config: Arc<rustls::ClientConfig>,
    /// The name its certificate carries (SNI and `Host`).
    pub server_name: String,
    /// Where it answers, the likeliest first.
    pub addrs: Vec<SocketAddr>,
}

/// Finds paired boxes and makes the TLS client for one (the mesh).
pub trait BoxDialer: Send + Sync {
    /// The route to the box `box_id`, or why there is none (not paired,
    /// not found on the LAN).
    fn route<'a>(
        &'a self,
        box_id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<BoxRoute, String>> + Send + 'a>>;
}

/// The dialer peers of the form `box:BOXID/db` use.
pub type Boxes = Arc<dyn BoxDialer>;

/// The prefix of a paired box's endpoint.
pub const BOX_PREFIX: &str = "box:";

/// What went wrong talking to a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer could not be reached or the connection broke: {0}
    #[error("{0}")]
    Network(String),
    /// The peer answered with an error.
    #[error("{status} {error}: {reason}")]
    Status {
        status: u16,
        error: String,
        reason: String,
    },
    /// The peer's answer was not what the protocol says.
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
    /// An answer larger than its call may read (see [`Cap`]); the call
    /// is refused, not the peer's whole answer held.
    #[error("{0}")]
    TooLarge(String),
    /// An endpoint that is neither a database name nor a URL we can use.
    #[error("{0}")]
    BadEndpoint(String),
    /// A paired box's endpoint while this service has no way to reach
    /// boxes yet (retried: the mesh is set at start).
    #[error("{0}: the mesh is not ready to reach boxes")]
    NoTls(String),
}

impl PeerError {
    /// Worth trying again later: the network, a server error, too many
    /// requests. Other refusals (401, 404) are retried too, with the same
    /// backoff, since a database may be made or a credential fixed.
    pub fn is_transient(&self) -> bool {
        match self {
            PeerError::Network(_) => true,
            PeerError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            PeerError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A remote database: `http(s)://[user:pass@]host[:port]/[prefix/]db`.
#[derive(Clone, PartialEq, Eq)]
pub struct RemoteUrl {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path segments before the database name (`""` or `"a/b/"`).
    pub prefix: String,
    /// The database name, as it goes in a URL (percent-encoded).
    pub db: String,
    /// `user:pass` from the URL, decoded (sent as HTTP Basic).
    userinfo: Option<String>,
}

impl std::fmt::Debug for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credential.
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for RemoteUrl {
    /// The URL without its credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(
            f,
            "{scheme}://{}:{}/{}{}/",
            self.host, self.port, self.prefix, self.db
        )
    }
}

impl RemoteUrl {
    pub fn parse(url: &str) -> Result<RemoteUrl, PeerError> {
        let bad = |why: &str| PeerError::BadEndpoint(format!("{}: {why}", strip_credentials(url)));
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("only http and https URLs are peers"));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let userinfo = userinfo.map(|u| {
            percent_encoding::percent_decode_str(u)
                .decode_utf8_lossy()
                .into_owned()
        });
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            // An IPv6 literal: [addr]:port
            let (addr, after) = h.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("bad host")),
            };
            (format!("[{addr}]"), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("bad port"))?),
                None => (hostport.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let path = path.split(['?', '#']).next().unwrap_or("");
        let mut parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let db = parts.pop().ok_or_else(|| bad("no database in the path"))?;
        let prefix: String = parts.iter().map(|p| format!("{p}/")).collect();
        Ok(RemoteUrl {
            https,
            host,
            port,
            prefix,
            db: db.to_owned(),
            userinfo,
        })
    }

    /// The database name decoded.
    pub fn db_name(&self) -> String {
        percent_encoding::percent_decode_str(&self.db)
            .decode_utf8_lossy()
            .into_owned()
    }

    fn authorization(&self) -> Option<String> {
        use base64::Engine;
        self.userinfo.as_ref().map(|u| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(u)
            )
        })
    }
}

/// An endpoint as written in a replication document, credentials removed:
/// what status answers show.
pub fn strip_credentials(endpoint: &str) -> String {
    // Any scheme, in any case, and everything up to the last `@`: a
    // password may hold a `/` or an `@` that a parser would stop at, and
    // database names never hold an `@`.
    match endpoint.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{}://{host}", scheme.to_ascii_lowercase())
        }
        None => endpoint.to_owned(),
    }
}

/// The characters JavaScript's `encodeURIComponent` escapes (PouchDB's
/// http adapter encodes a database name so in its replication ids).
const URI_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// One end of a replication.
pub enum Peer {
    Local { api: Arc<Api>, db: String },
    Remote(Remote),
}

impl Peer {
    /// A database name on this box, an `http` URL, or a paired box's
    /// database (`box:BOXID/db`, reached through `boxes`).
    pub fn open(api: &Arc<Api>, endpoint: &str, boxes: Option<&Boxes>) -> Result<Peer, PeerError> {
        if let Some(rest) = endpoint.strip_prefix(BOX_PREFIX) {
            let (box_id, db) = parse_box_endpoint(rest).ok_or_else(|| {
                PeerError::BadEndpoint(format!(
                    "{endpoint:?}: a paired box's database is written box:BOXID/db"
                ))
            })?;
            let dialer = boxes
                .cloned()
                .ok_or_else(|| PeerError::NoTls(endpoint.to_owned()))?;
            let url = RemoteUrl {
                https: true,
                host: cloudlet_runtime::tls::box_dns_name(&box_id),
                port: 5984,
                prefix: String::new(),
                db: percent_encoding::utf8_percent_encode(&db, URI_COMPONENT).to_string(),
                userinfo: None,
            };
            return Ok(Peer::Remote(Remote {
                url,
                tls: None,
                via: Some((dialer, box_id)),
                conn: Mutex::new(None),
            }));
        }
        if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            let url = RemoteUrl::parse(endpoint)?;
            if url.https {
                return Err(PeerError::BadEndpoint(format!(
                    "{url}: https peers are paired boxes, written box:BOXID/db (this box trusts no public CA)"
                )));
            }
            return Ok(Peer::Remote(Remote {
                url,
                tls: None,
                via: None,
                conn: Mutex::new(None),
            }));
        }
        if !is_valid_db_name(endpoint) {
            return Err(PeerError::BadEndpoint(format!(
                "{:?} is neither a database name on this box, an http URL nor box:BOXID/db",
                strip_credentials(endpoint)
            )));
        }
        Ok(Peer::Local {
            api: api.clone(),
            db: endpoint.to_owned(),
        })
    }

    /// The endpoint as status answers show it.
    pub fn display(&self) -> String {
        match self {
            Peer::Local { db, .. } => db.clone(),
            Peer::Remote(Remote {
                via: Some((_, id)),
                url,
                ..
            }) => format!("{BOX_PREFIX}{id}/{}", url.db_name()),
            Peer::Remote(r) => r.url.to_string(),
        }
    }

    /// What PouchDB's http adapter calls the database's id: the server's
    /// uuid and the database name (the URL when there is no uuid).
    pub async fn id(&self) -> Result<String, PeerError> {
        match self {
            Peer::Local { api, db } => Ok(format!(
                "{}{}",
                api.uuid(),
                percent_encoding::utf8_percent_encode(db, URI_COMPONENT)
            )),
            Peer::Remote(r) => {
                let (status, v) = r
                    .send(Method::GET, &format!("/{}", r.url.prefix), None, Cap::SMALL)
                    .await
                    .map_err(|e| self.name_in(e))?;
                match v.get("uuid").and_then(Value::as_str) {
                    Some(u) if status.is_success() => Ok(format!(
                        "{u}{}",
                        percent_encoding::utf8_percent_encode(&r.url.db_name(), URI_COMPONENT)
                    )),
                    _ => Ok(r.url.to_string()),
                }
            }
        }
    }

    /// An answer too large, with which peer and call gave it.
    fn name_in(&self, e: PeerError) -> PeerError {
        match e {
            PeerError::TooLarge(why) => PeerError::TooLarge(format!("{}: {why}", self.display())),
            e => e,
        }
    }

    /// One call on the database: `sub` is the path after the database
    /// name (`""`, `"_changes"`, `"_local/ID"`), `query` without its `?`;
    /// its answer read up to `cap`.
    async fn call(
        &self,
        method: Method,
        sub: &str,
        query: &str,
        body: Option<Value>,
        cap: Cap,
    ) -> Result<(StatusCode, Value), PeerError> {
        let what = format!("{method} {}", if sub.is_empty() { "/db" } else { sub });
        let answer = match self {
            Peer::Local { api, db } => local_call(api, db, method, sub, query, body, cap).await,
            Peer::Remote(r) => {
                let mut path = format!("/{}{}/{sub}", r.url.prefix, r.url.db);
                if sub.is_empty() {
                    path.pop();
                }
                if !query.is_empty() {
                    path.push('?');
                    path.push_str(query);
                }
                r.send(method, &path, body, cap).await
            }
        };
        answer.map_err(|e| match e {
            PeerError::TooLarge(why) => self.name_in(PeerError::TooLarge(format!("{what}: {why}"))),
            e => e,
        })
    }

    /// A call whose answer must be a success.
    async fn ok(
        &self,
        method: Method,
        sub: &str,
        query: &str,
        body: Option<Value>,
        cap: Cap,
    ) -> Result<Value, PeerError> {
        let (status, v) = self.call(method, sub, query, body, cap).await?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(status_error(status, &v))
        }
    }

    /// `GET /db`: the database's info (`update_seq` among it).
    pub async fn info(&self) -> Result<Value, PeerError> {
        self.ok(Method::GET, "", "", None, Cap::SMALL).await
    }

    /// `PUT /db` (an existing database is fine).
    pub async fn create(&self) -> Result<(), PeerError> {
        let (status, v) = self.call(Method::PUT, "", "", None, Cap::SMALL).await?;
        if status.is_success() || status == StatusCode::PRECONDITION_FAILED {
            Ok(())
        } else {
            Err(status_error(status, &v))
        }
    }

    /// `GET /db/_local/ID`, `None` when there is none.
    pub async fn get_local(&self, id: &str) -> Result<Option<Value>, PeerError> {
        let (status, v) = self
            .call(
                Method::GET,
                &format!("_local/{}", encode(id)),
                "",
                None,
                Cap::SMALL,
            )
            .await?;
        match status {
            s if s.is_success() => Ok(Some(v)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error(s, &v)),
        }
    }

    /// `PUT /db/_local/ID` (the document carries the `_rev` it replaces).
    pub async fn put_local(&self, id: &str, doc: Value) -> Result<(), PeerError> {
        self.ok(
            Method::PUT,
            &format!("_local/{}", encode(id)),
            "",
            Some(doc),
            Cap::SMALL,
        )
        .await
        .map(drop)
    }

    /// One batch of `_changes` after `since` (`style=all_docs`); with
    /// `wait`, a long poll that answers when there is a change or after
    /// that long.
    pub async fn changes(
        &self,
        since: &Value,
        limit: usize,
        wait: Option<Duration>,
    ) -> Result<Value, PeerError> {
        let v = self
            .changes_as("style=all_docs", since, limit, wait, Cap::SMALL)
            .await?;
        if !v.get("results").is_some_and(Value::is_array) {
            return Err(PeerError::BadAnswer("_changes without results".into()));
        }
        Ok(v)
    }

    /// `_changes` with the documents (the replicator's own configuration).
    pub async fn changes_with_docs(
        &self,
        since: &Value,
        limit: usize,
        wait: Option<Duration>,
    ) -> Result<Value, PeerError> {
        self.changes_as("include_docs=true", since, limit, wait, Cap::DOCS)
            .await
    }

    /// `_changes?{how}` after `since`, at most `limit`, long-polling for
    /// `wait` when given; the answer within `cap`.
    async fn changes_as(
        &self,
        how: &str,
        since: &Value,
        limit: usize,
        wait: Option<Duration>,
        cap: Cap,
    ) -> Result<Value, PeerError> {
        let since = match since {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let mut query = format!("{how}&limit={limit}&since={}", encode(&since));
        if let Some(w) = wait {
            query.push_str(&format!("&feed=longpoll&timeout={}", w.as_millis()));
        }
        self.ok(Method::GET, "_changes", &query, None, cap).await
    }

    /// `_revs_diff`: which of these revisions the database lacks.
    pub async fn revs_diff(&self, revs: Map<String, Value>) -> Result<Value, PeerError> {
        self.ok(
            Method::POST,
            "_revs_diff",
            "",
            Some(Value::Object(revs)),
            Cap::SMALL,
        )
        .await
    }

    /// `_bulk_get` with revision histories and attachments inline; an
    /// answer over [`Cap::DOCS`] is [`PeerError::TooLarge`] (ask fewer).
    pub async fn bulk_get(&self, docs: &[Value]) -> Result<Value, PeerError> {
        self.ok(
            Method::POST,
            "_bulk_get",
            "revs=true&attachments=true",
            Some(json!({ "docs": docs })),
            Cap::DOCS,
        )
        .await
    }

    /// `_bulk_docs` with `new_edits:false`: the revisions as they are.
    /// The answer lists failures (CouchDB) or every document (others).
    pub async fn bulk_docs(&self, docs: Vec<Value>) -> Result<Value, PeerError> {
        self.ok(
            Method::POST,
            "_bulk_docs",
            "",
            Some(json!({"docs": docs, "new_edits": false})),
            Cap::SMALL,
        )
        .await
    }

    pub async fn ensure_full_commit(&self) -> Result<(), PeerError> {
        self.ok(
            Method::POST,
            "_ensure_full_commit",
            "",
            Some(json!({})),
            Cap::SMALL,
        )
        .await
        .map(drop)
    }
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URI_COMPONENT).to_string()
}

fn status_error(status: StatusCode, v: &Value) -> PeerError {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    PeerError::Status {
        status: status.as_u16(),
        error: text("error"),
        reason: text("reason"),
    }
}

/// A call on a database of this box, through the API's own handlers.
async fn local_call(
    api: &Arc<Api>,
    db: &str,
    method: Method,
    sub: &str,
    query: &str,
    body: Option<Value>,
    cap: Cap,
) -> Result<(StatusCode, Value), PeerError> {
    let uri = if query.is_empty() {
        format!("/{db}/{sub}")
    } else {
        format!("/{db}/{sub}?{query}")
    };
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(bytes))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| PeerError::BadEndpoint(e.to_string()))?;
    let db = db.to_owned();
    let answer = match (method, sub) {
        (Method::GET, "") => api.db_info(db).await,
        (Method::PUT, "") => api.create_db(db).await,
        (Method::GET, "_changes") => api.changes(db, req, false).await,
        (Method::POST, "_revs_diff") => api.revs_diff(db, req).await,
        (Method::POST, "_bulk_get") => api.bulk_get(db, req).await,
        (Method::POST, "_bulk_docs") => api.bulk_docs(db, req).await,
        (Method::POST, "_ensure_full_commit") => api.db_info(db).await,
        (m, s) => match s.strip_prefix("_local/") {
            Some(id) => {
                let id = percent_encoding::percent_decode_str(id)
                    .decode_utf8_lossy()
                    .into_owned();
                match m {
                    Method::GET => api.get_local(db, id).await,
                    _ => api.put_local(db, id, req, false).await,
                }
            }
            None => return Err(PeerError::BadEndpoint(format!("no local call {m} {s}"))),
        },
    };
    let resp = answer.unwrap_or_else(ApiError::into_response);
    read_answer(resp, cap).await
}

/// The status and JSON of an answer (`null` when empty or not JSON), read
/// no further than `cap`: a larger one is [`PeerError::TooLarge`] and the
/// rest is not read (a remote connection is then dropped, not reused).
async fn read_answer<B>(resp: Response<B>, cap: Cap) -> Result<(StatusCode, Value), PeerError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let status = resp.status();
    let mut body = std::pin::pin!(resp.into_body());
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| PeerError::Network(format!("reading the answer: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > cap.bytes {
                return Err(PeerError::TooLarge(format!(
                    "the answer is larger than {} MiB",
                    cap.bytes >> 20
                )));
            }
            buf.extend_from_slice(&data);
        }
    }
    if json_values(&buf) > cap.values {
        return Err(PeerError::TooLarge(format!(
            "the answer holds more than {} JSON values",
            cap.values
        )));
    }
    let v = if buf.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&buf).map_err(|e| {
            if status.is_success() {
                PeerError::BadAnswer(format!("not JSON: {e}"))
            } else {
                PeerError::Status {
                    status: status.as_u16(),
                    error: "unknown".into(),
                    reason: String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned(),
                }
            }
        })?
    };
    Ok((status, v))
}

/// About how many values the JSON text holds (its commas, colons and
/// opening brackets outside strings, plus one; never fewer than it holds),
/// counted before parsing since parsing is what costs memory.
fn json_values(text: &[u8]) -> usize {
    let mut n = 1;
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b',' | b':' | b'[' | b'{' => n += 1,
                _ => {}
            }
        }
    }
    n
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// HTTP/1.1 over a connection; the connection is driven by its own task.
async fn handshake<IO>(io: IO) -> Result<Sender, PeerError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| PeerError::Network(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// `BOXID/db` split, the box ID as written (with or without dashes) and
/// the database name non-empty.
pub fn parse_box_endpoint(rest: &str) -> Option<(String, String)> {
    let (id, db) = rest.split_once('/')?;
    let valid_id = !id.is_empty()
        && id
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    (valid_id && is_valid_db_name(db)).then(|| (id.to_owned(), db.to_owned()))
}

/// A database on another server, over one kept-alive connection.
pub struct Remote {
    pub url: RemoteUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// A paired box: reached as the dialer says, by this box ID.
    via: Option<(Boxes, String)>,
    conn: Mutex<Option<Sender>>,
}

impl Remote {
    /// A paired box: each of its addresses in turn, over TLS that pins it.
    async fn connect_box(&self, dialer: &Boxes, box_id: &str) -> Result<Sender, PeerError> {
        let route = dialer.route(box_id).await.map_err(PeerError::Network)?;
        let name = rustls::pki_types::ServerName::try_from(route.server_name.clone())
            .map_err(|e| PeerError::BadEndpoint(format!("{}: {e}", route.server_name)))?;
        let mut why = format!("box {box_id} has no address");
        for addr in &route.addrs {
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("cannot reach box {box_id} at {addr}: {e}"))?;
                let _ = tcp.set_nodelay(true);
                tokio_rustls::TlsConnector::from(route.config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with box {box_id} at {addr}: {e}"))
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(tls)) => return handshake(tls).await,
                Ok(Err(e)) => why = e,
                Err(_) => why = format!("box {box_id} at {addr} did not answer in time"),
            }
        }
        Err(PeerError::Network(why))
    }

    async fn connect(&self) -> Result<Sender, PeerError> {
        if let Some((dialer, box_id)) = &self.via {
            return self.connect_box(dialer, box_id).await;
        }
        let addr = format!("{}:{}", self.url.host, self.url.port);
        let net = |e: std::io::Error| PeerError::Network(format!("cannot reach {addr}: {e}"));
        let open = async {
            let tcp = tokio::net::TcpStream::connect(&addr).await.map_err(net)?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => handshake(tcp).await,
                Some(config) => {
                    let host = self.url.host.trim_start_matches('[').trim_end_matches(']');
                    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| PeerError::BadEndpoint(format!("{host}: {e}")))?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| PeerError::Network(format!("TLS with {addr}: {e}")))?;
                    handshake(tls).await
                }
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| PeerError::Network(format!("{addr} did not answer in time")))?
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        cap: Cap,
    ) -> Result<(StatusCode, Value), PeerError> {
        let kept = self.conn.lock().ok().and_then(|mut c| c.take());
        let body = Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
        let (sender, answer) = match kept.filter(|s| !s.is_closed()) {
            Some(sender) => match self.send_on(sender, &method, path, body.clone(), cap).await {
                // A kept connection the server closed meanwhile: once
                // more on a new one (every call here may be repeated).
                Err(PeerError::Network(_)) => {
                    let sender = self.connect().await?;
                    self.send_on(sender, &method, path, body, cap).await?
                }
                other => other?,
            },
            None => {
                let sender = self.connect().await?;
                self.send_on(sender, &method, path, body, cap).await?
            }
        };
        if let Ok(mut c) = self.conn.lock() {
            *c = Some(sender);
        }
        Ok(answer)
    }

    /// One request on a connection; the connection back for the next.
    async fn send_on(
        &self,
        mut sender: Sender,
        method: &Method,
        path: &str,
        body: Bytes,
        cap: Cap,
    ) -> Result<(Sender, (StatusCode, Value)), PeerError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(
                hyper::header::HOST,
                format!("{}:{}", self.url.host, self.url.port),
            )
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(a) = self.url.authorization() {
            req = req.header(hyper::header::AUTHORIZATION, a);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| PeerError::BadEndpoint(e.to_string()))?;
        let call = async {
            sender
                .ready()
                .await
                .map_err(|e| PeerError::Network(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| PeerError::Network(e.to_string()))?;
            read_answer(resp, cap).await
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| PeerError::Network(format!("{} did not answer in time", self.url)))??;
        Ok((sender, answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_survive_in_what_is_shown() {
        for e in [
            "HTTP://alice:s3cret@10.0.0.1/db",
            "http://alice:pa/ss@10.0.0.1/db",
            "https://a:b@c:s3cret@h:5984/db",
        ] {
            let shown = strip_credentials(e);
            assert!(
                !shown.contains("s3cret") && !shown.contains("pa/ss"),
                "{shown}"
            );
            assert!(shown.ends_with("/db"), "{shown}");
        }
        assert_eq!(strip_credentials("notes"), "notes");
        assert_eq!(strip_credentials("http://h:1/db"), "http://h:1/db");
    }

    #[test]
    fn a_url_gives_host_port_database_and_a_basic_credential() {
        let u = RemoteUrl::parse("http://alice:s%40cret@box.local:5984/pre/fix/my%2Fdb").unwrap();
        assert_eq!(u.host, "box.local");
        assert_eq!(u.port, 5984);
        assert_eq!(u.prefix, "pre/fix/");
        assert_eq!(u.db, "my%2Fdb");
        assert_eq!(u.db_name(), "my/db");
        assert_eq!(u.authorization().unwrap(), "Basic YWxpY2U6c0BjcmV0");
        assert_eq!(u.to_string(), "http://box.local:5984/pre/fix/my%2Fdb/");
        let v6 = RemoteUrl::parse("https://[::1]/db").unwrap();
        assert_eq!((v6.host.as_str(), v6.port, v6.https), ("[::1]", 443, true));
        assert!(RemoteUrl::parse("http://host:5984/").is_err());
        assert!(RemoteUrl::parse("ftp://host/db").is_err());
        assert!(RemoteUrl::parse("http://host:x/db").is_err());
    }

    #[test]
    fn credentials_are_stripped_from_what_status_shows() {
        assert_eq!(strip_credentials("http://u:p@h:1/db"), "http://h:1/db");
        assert_eq!(strip_credentials("https://h/db"), "https://h/db");
        assert_eq!(strip_credentials("local"), "local");
        assert!(
            !format!("{:?}", RemoteUrl::parse("http://u:secret@h/db").unwrap()).contains("secret")
        );
    }

    #[test]
    fn values_are_counted_outside_strings_and_never_undercounted() {
        assert_eq!(json_values(b"0"), 1);
        assert!(json_values(b"[0,0,0,0]") >= 5);
        assert!(json_values(br#"{"a":[1,{"b":2}],"c":"x"}"#) >= 6);
        // Brackets, commas and escaped quotes inside a string are text.
        assert_eq!(json_values(br#""[,{:\"],""#), 1);
        let zeros = format!("[{}0]", "0,".repeat(300_000));
        assert!(json_values(zeros.as_bytes()) > Cap::SMALL.values);
    }

    #[tokio::test]
    async fn an_answer_over_its_cap_is_refused_before_it_is_parsed() {
        let answer = |text: String| Response::new(Full::new(Bytes::from(text)));
        let small = Cap {
            bytes: 1 << 10,
            values: 100,
        };
        let (status, v) = read_answer(answer(r#"{"ok":true}"#.into()), small)
            .await
            .unwrap();
        assert_eq!((status, v), (StatusCode::OK, json!({"ok": true})));
        let long = format!(r#"{{"text":"{}"}}"#, "a".repeat(2 << 10));
        let e = read_answer(answer(long), small).await.unwrap_err();
        assert!(
            matches!(&e, PeerError::TooLarge(m) if m.contains("larger than")),
            "{e}"
        );
        let many = format!("[{}0]", "0,".repeat(200));
        let e = read_answer(answer(many), small).await.unwrap_err();
        assert!(
            matches!(&e, PeerError::TooLarge(m) if m.contains("values")),
            "{e}"
        );
        assert!(!e.is_transient());
    }

    #[test]
    fn database_names_are_encoded_like_encode_uri_component() {
        assert_eq!(encode("a/b$c+d(e)"), "a%2Fb%24c%2Bd(e)");
    }
}
