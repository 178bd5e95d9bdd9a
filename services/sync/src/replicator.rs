//! The box's own replicator: CouchDB's replication protocol between any two
//! [`Peer`]s (a database on this box or an `http(s)` URL), configured the
//! way CouchDB configures it.
//!
//! ```text
//! _replicator db ── watch its _changes ──► jobs (one task each)
//! POST /_replicate ─────────────────────► one-shot (answered when done)
//!                                          or continuous (transient)
//! a job: source _changes (batches) → target _revs_diff → source _bulk_get
//!        → target _bulk_docs new_edits:false → _ensure_full_commit
//!        → checkpoint in _local/<replication id> on both sides
//! errors: state `crashing`, retried with exponential backoff (≤ 60 s),
//!         resumed from the checkpoint
//! ```
//!
//! Replication ids are PouchDB's (`md5(source id + target id)` in base64,
//! where a database's id is its server's uuid and its name), and so are the
//! checkpoint documents, so a replication PouchDB made between the same
//! two databases resumes where it stopped, and the other way round.
//! CouchDB's own checkpoints (`source_last_seq`, `history[].recorded_seq`)
//! are read too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use cloudlet_runtime::router::{AnyBody, Params, RoutedBody, Router};
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode};
use md5::{Digest, Md5};
use serde_json::{json, Map, Value};

use crate::api::{reply, Api};
use crate::peer::{strip_credentials, Boxes, Peer, PeerError};

/// Changes read per batch.
pub const BATCH: usize = 100;
/// The configuration database.
pub const REPLICATOR_DB: &str = "_replicator";
/// How long a continuous job's `_changes` long poll waits.
const LONGPOLL: Duration = Duration::from_secs(30);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Checkpoint history entries kept (as PouchDB does).
const HISTORY: usize = 5;
/// Largest `POST /_replicate` body.
const REPLICATE_LIMIT: u64 = 64 << 10;

/// What a replication document or `POST /_replicate` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub source: String,
    pub target: String,
    pub continuous: bool,
    pub create_target: bool,
}

impl Spec {
    /// `source` and `target` as strings or `{"url": ...}`, the flags
    /// as booleans (absent: false).
    pub fn from_json(v: &Value) -> Result<Spec, String> {
        let endpoint = |k: &str| -> Result<String, String> {
            match v.get(k) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(Value::Object(o)) => match o.get("url") {
                    Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(format!("{k} must be a database name or a URL")),
                },
                _ => Err(format!("{k} must be a database name or a URL")),
            }
        };
        let flag = |k: &str| -> Result<bool, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(format!("{k} must be true or false")),
            }
        };
        Ok(Spec {
            source: endpoint("source")?,
            target: endpoint("target")?,
            continuous: flag("continuous")?,
            create_target: flag("create_target")?,
        })
    }
}

/// A job's state, as CouchDB's scheduler names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Running,
    Completed,
    Crashing,
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Completed => "completed",
            State::Crashing => "crashing",
            State::Failed => "failed",
        }
    }
}

/// What a job did so far (since this process started it).
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub replication_id: Option<String>,
    /// Revisions asked about with `_revs_diff` (the changes read).
    pub revisions_checked: u64,
    pub missing_revisions_found: u64,
    pub docs_read: u64,
    pub docs_written: u64,
    pub doc_write_failures: u64,
    pub changes_pending: Option<u64>,
    pub checkpointed_source_seq: Value,
    pub error_count: u64,
    pub last_error: Option<String>,
    pub start_time: SystemTime,
    pub last_updated: SystemTime,
    /// The checkpoint history written by this run (`POST /_replicate`'s answer).
    pub history: Vec<Value>,
}

impl Status {
    fn new() -> Status {
        let now = SystemTime::now();
        Status {
            state: State::Pending,
            replication_id: None,
            revisions_checked: 0,
            missing_revisions_found: 0,
            docs_read: 0,
            docs_written: 0,
            doc_write_failures: 0,
            changes_pending: None,
            checkpointed_source_seq: json!(0),
            error_count: 0,
            last_error: None,
            start_time: now,
            last_updated: now,
            history: Vec::new(),
        }
    }
}

type Shared = Arc<Mutex<Status>>;

fn update(s: &Shared, f: impl FnOnce(&mut Status)) {
    if let Ok(mut st) = s.lock() {
        f(&mut st);
        st.last_updated = SystemTime::now();
    }
}

fn snapshot(s: &Shared) -> Option<Status> {
    s.lock().ok().map(|s| s.clone())
}

/// The wait before retry `n` (1-based): 1 s doubling up to [`MAX_BACKOFF`].
pub fn backoff(n: u32) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// PouchDB's replication id for two database ids (without `_local/`):
/// the base64 MD5 of both, with `/` as `.` and `+` as `_`.
pub fn replication_id(source_id: &str, target_id: &str) -> String {
    use base64::Engine;
    let mut h = Md5::new();
    h.update(source_id.as_bytes());
    h.update(target_id.as_bytes());
    base64::engine::general_purpose::STANDARD
        .encode(h.finalize())
        .replace('/', ".")
        .replace('+', "_")
}

/// A checkpoint's sequence: PouchDB's `last_seq` or CouchDB's
/// `source_last_seq` (history entries: `recorded_seq`).
fn seq_of(doc: &Value) -> Value {
    doc.get("last_seq")
        .or_else(|| doc.get("source_last_seq"))
        .or_else(|| doc.get("recorded_seq"))
        .cloned()
        .unwrap_or(json!(0))
}

fn session_of(doc: &Value) -> Option<&str> {
    doc.get("session_id").and_then(Value::as_str)
}

/// Where to start from the two sides' checkpoints: the sequence of the
/// newest session both recorded (CouchDB's `compare_replication_logs`,
/// which PouchDB ported), else the beginning.
pub fn start_seq(source: Option<&Value>, target: Option<&Value>) -> Value {
    let (Some(s), Some(t)) = (source, target) else {
        return json!(0);
    };
    if session_of(s).is_some() && session_of(s) == session_of(t) {
        return seq_of(s);
    }
    let empty = Vec::new();
    let sh = s.get("history").and_then(Value::as_array).unwrap_or(&empty);
    let th = t.get("history").and_then(Value::as_array).unwrap_or(&empty);
    let has =
        |hist: &[Value], id: Option<&str>| id.is_some() && hist.iter().any(|h| session_of(h) == id);
    for i in 0..sh.len().max(th.len()) {
        if let Some(e) = sh.get(i) {
            if has(th, session_of(e)) {
                return seq_of(e);
            }
        }
        if let Some(e) = th.get(i) {
            if has(sh, session_of(e)) {
                return seq_of(e);
            }
        }
    }
    json!(0)
}

/// The checkpoint document after recording `seq` for `session`.
pub fn next_checkpoint(existing: Option<Value>, id: &str, session: &str, seq: &Value) -> Value {
    let mut doc = match existing {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    doc.insert("_id".into(), json!(format!("_local/{id}")));
    let mut history: Vec<Value> = doc
        .get("history")
        .and_then(Value::as_array)
        .map(|h| {
            h.iter()
                .filter(|e| session_of(e) != Some(session))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    history.insert(
        0,
        json!({"last_seq": seq, "session_id": session, "recorded_seq": seq}),
    );
    history.truncate(HISTORY);
    doc.insert("history".into(), Value::Array(history));
    doc.insert("session_id".into(), json!(session));
    doc.insert("last_seq".into(), seq.clone());
    // CouchDB reads this name.
    doc.insert("source_last_seq".into(), seq.clone());
    doc.insert("replicator".into(), json!("cloudlet"));
    doc.insert("version".into(), json!(1));
    Value::Object(doc)
}

async fn write_checkpoint(
    peer: &Peer,
    id: &str,
    session: &str,
    seq: &Value,
) -> Result<(), PeerError> {
    let existing = peer.get_local(id).await?;
    if existing
        .as_ref()
        .is_some_and(|d| session_of(d) == Some(session) && d.get("last_seq") == Some(seq))
    {
        return Ok(());
    }
    peer.put_local(id, next_checkpoint(existing, id, session, seq))
        .await
}

/// One run of a replication: from the checkpoint to the source's end
/// (one-shot) or on and on (continuous). Errors end the run; the caller
/// retries.
async fn replicate(
    source: &Peer,
    target: &Peer,
    spec: &Spec,
    status: &Shared,
) -> Result<(), PeerError> {
    source.info().await?;
    match target.info().await {
        Ok(_) => {}
        Err(e) if e.status() == Some(404) && spec.create_target => target.create().await?,
        Err(e) => return Err(e),
    }
    let id = replication_id(&source.id().await?, &target.id().await?);
    let session = uuid::Uuid::new_v4().simple().to_string();
    let src_cp = source.get_local(&id).await?;
    let tgt_cp = target.get_local(&id).await?;
    let mut since = start_seq(src_cp.as_ref(), tgt_cp.as_ref());
    tracing::info!(source = %source.display(), target = %target.display(), replication = %id, since = %since, "replicating");
    update(status, |s| {
        s.state = State::Running;
        s.replication_id = Some(id.clone());
        s.checkpointed_source_seq = since.clone();
    });
    let mut caught_up = false;
    loop {
        let wait = (spec.continuous && caught_up).then_some(LONGPOLL);
        let mut changes = source.changes(&since, BATCH, wait).await?;
        // Moved out of the answer, not copied.
        let results = match changes.get_mut("results").map(Value::take) {
            Some(Value::Array(r)) => r,
            _ => Vec::new(),
        };
        let last_seq = changes
            .get("last_seq")
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or_else(|| since.clone());
        let pending = changes.get("pending").and_then(Value::as_u64);
        if results.is_empty() {
            if !spec.continuous {
                update(status, |s| s.changes_pending = Some(0));
                return Ok(());
            }
            caught_up = true;
            update(status, |s| s.changes_pending = Some(0));
            if last_seq != since {
                since = last_seq;
            }
            continue;
        }
        caught_up = results.len() < BATCH || pending == Some(0);
        let written = copy_batch(source, target, &results, status).await?;
        // Everything the target acknowledged is durable before the
        // checkpoint says so.
        if written > 0 {
            target.ensure_full_commit().await?;
        }
        write_checkpoint(target, &id, &session, &last_seq).await?;
        if let Err(e) = write_checkpoint(source, &id, &session, &last_seq).await {
            // A source we may only read keeps no checkpoint (PouchDB
            // tolerates that too): the target's alone cannot be trusted
            // on its own, so the next run starts over, checking revisions.
            if !matches!(e.status(), Some(401 | 403)) {
                return Err(e);
            }
        }
        since = last_seq;
        update(status, |s| {
            s.checkpointed_source_seq = since.clone();
            s.changes_pending = pending;
            s.history
                .insert(0, json!({"session_id": session, "recorded_seq": since}));
            s.history.truncate(HISTORY);
        });
    }
}

/// One batch: the revisions the target lacks, read from the source with
/// their histories and attachments, written as they are. The number of
/// documents written.
async fn copy_batch(
    source: &Peer,
    target: &Peer,
    results: &[Value],
    status: &Shared,
) -> Result<u64, PeerError> {
    let mut ask = Map::new();
    for r in results {
        let Some(id) = r.get("id").and_then(Value::as_str) else {
            continue;
        };
        let revs: Vec<Value> = r
            .get("changes")
            .and_then(Value::as_array)
            .map(|c| c.iter().filter_map(|c| c.get("rev").cloned()).collect())
            .unwrap_or_default();
        if !revs.is_empty() {
            ask.insert(id.to_owned(), Value::Array(revs));
        }
    }
    if ask.is_empty() {
        return Ok(0);
    }
    let checked: usize = ask.values().filter_map(Value::as_array).map(Vec::len).sum();
    let diff = target.revs_diff(ask).await?;
    let Some(diff) = diff.as_object() else {
        return Err(PeerError::BadAnswer("_revs_diff is not an object".into()));
    };
    let mut wanted = Vec::new();
    for (id, d) in diff {
        for rev in d
            .get("missing")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            wanted.push(json!({"id": id, "rev": rev}));
        }
    }
    update(status, |s| {
        s.revisions_checked += checked as u64;
        s.missing_revisions_found += wanted.len() as u64;
    });
    if wanted.is_empty() {
        return Ok(0);
    }
    // Read in groups whose answer fits the `_bulk_get` cap: a group too
    // large is asked again in halves, down to one document, so large
    // attachments replicate while what is held stays bounded by the cap.
    let mut groups = vec![&wanted[..]];
    let mut written = 0;
    while let Some(group) = groups.pop() {
        match source.bulk_get(group).await {
            Ok(got) => written += write_docs(target, got, status).await?,
            Err(PeerError::TooLarge(why)) if group.len() > 1 => {
                tracing::debug!(source = %source.display(), docs = group.len(), reason = %why, "_bulk_get in halves");
                let (first, second) = group.split_at(group.len() / 2);
                groups.push(second);
                groups.push(first);
            }
            Err(PeerError::TooLarge(why)) => {
                return Err(PeerError::TooLarge(format!(
                    "document {} revision {} cannot be read: {why}",
                    group[0]["id"], group[0]["rev"]
                )))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Writes the documents of one `_bulk_get` answer to the target. The
/// number of documents written.
async fn write_docs(target: &Peer, mut got: Value, status: &Shared) -> Result<u64, PeerError> {
    // The documents are moved out of the answer, not copied: a batch with
    // attachments inline is held once.
    let mut docs = Vec::new();
    let mut unreadable = 0u64;
    let results = match got.get_mut("results") {
        Some(Value::Array(r)) => std::mem::take(r),
        _ => Vec::new(),
    };
    drop(got);
    for mut r in results {
        let found = match r.get_mut("docs") {
            Some(Value::Array(d)) => std::mem::take(d),
            _ => Vec::new(),
        };
        for mut d in found {
            match d.get_mut("ok").map(Value::take) {
                Some(doc @ Value::Object(_)) => docs.push(doc),
                _ => unreadable += 1,
            }
        }
    }
    let read = docs.len() as u64;
    let answer = if docs.is_empty() {
        json!([])
    } else {
        target.bulk_docs(docs).await?
    };
    let failed = answer
        .as_array()
        .map(|a| a.iter().filter(|r| r.get("error").is_some()).count() as u64)
        .unwrap_or(0);
    for r in answer
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r.get("error").is_some())
    {
        tracing::warn!(target = %target.display(), doc = %r["id"], error = %r["error"], reason = %r["reason"], "document not written");
    }
    let written = read.saturating_sub(failed);
    update(status, |s| {
        s.docs_read += read;
        s.docs_written += written;
        s.doc_write_failures += failed + unreadable;
    });
    Ok(written)
}

/// Runs a replication until it completes (one-shot) or is stopped,
/// retrying after errors with backoff.
async fn run_job(api: Arc<Api>, boxes: Arc<RwLock<Option<Boxes>>>, spec: Spec, status: Shared) {
    let mut failures = 0u32;
    loop {
        // Read each time: the mesh may be given later.
        let dialer = boxes.read().ok().and_then(|t| t.clone());
        let opened = Peer::open(&api, &spec.source, dialer.as_ref())
            .and_then(|s| Ok((s, Peer::open(&api, &spec.target, dialer.as_ref())?)));
        let (source, target) = match opened {
            Ok(p) => p,
            Err(e @ PeerError::NoTls(_)) => {
                failures += 1;
                update(&status, |s| {
                    s.state = State::Crashing;
                    s.error_count += 1;
                    s.last_error = Some(e.to_string());
                });
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
            Err(e) => {
                update(&status, |s| {
                    s.state = State::Failed;
                    s.error_count += 1;
                    s.last_error = Some(e.to_string());
                });
                return;
            }
        };
        let before = snapshot(&status).map(|s| s.checkpointed_source_seq);
        match replicate(&source, &target, &spec, &status).await {
            Ok(()) => {
                update(&status, |s| {
                    s.state = State::Completed;
                    s.last_error = None;
                });
                return;
            }
            Err(e) => {
                let progressed = snapshot(&status).map(|s| s.checkpointed_source_seq) != before;
                failures = if progressed { 1 } else { failures + 1 };
                let wait = backoff(failures);
                tracing::warn!(source = %source.display(), target = %target.display(), error = %e, retry_in = ?wait, "replication failed");
                update(&status, |s| {
                    s.state = State::Crashing;
                    s.error_count += 1;
                    s.last_error = Some(e.to_string());
                });
                tokio::time::sleep(wait).await;
            }
        }
    }
}

struct Job {
    spec: Spec,
    status: Shared,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The replication jobs of this box.
pub struct Replicator {
    api: Arc<Api>,
    boxes: Arc<RwLock<Option<Boxes>>>,
    /// By `_replicator` document id.
    docs: Mutex<HashMap<String, Job>>,
    /// Continuous ones from `POST /_replicate`, by replication spec.
    transient: Mutex<Vec<Job>>,
}

impl Replicator {
    pub fn new(api: Arc<Api>) -> Arc<Replicator> {
        Arc::new(Replicator {
            api,
            boxes: Arc::new(RwLock::new(None)),
            docs: Mutex::new(HashMap::new()),
            transient: Mutex::new(Vec::new()),
        })
    }

    /// How `box:BOXID/db` peers are reached (the mesh). Jobs waiting for
    /// it use it at their next try.
    pub fn set_boxes(&self, dialer: Boxes) {
        if let Ok(mut t) = self.boxes.write() {
            *t = Some(dialer);
        }
    }

    fn boxes(&self) -> Option<Boxes> {
        self.boxes.read().ok().and_then(|t| t.clone())
    }

    fn spawn(&self, spec: Spec) -> Job {
        let status = Arc::new(Mutex::new(Status::new()));
        let task = tokio::spawn(run_job(
            self.api.clone(),
            self.boxes.clone(),
            spec.clone(),
            status.clone(),
        ));
        Job {
            spec,
            status,
            task: Some(task),
        }
    }

    /// Watches `_replicator` and keeps one job per valid document.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.watch().await })
    }

    async fn watch(self: Arc<Self>) {
        let config = Peer::Local {
            api: self.api.clone(),
            db: REPLICATOR_DB.to_owned(),
        };
        let mut since = json!(0);
        // The first read takes what is there; then each waits for more.
        let mut first = true;
        let mut failures = 0u32;
        loop {
            let answer = config
                .changes_with_docs(&since, BATCH, (!first).then_some(LONGPOLL))
                .await;
            let changes = match answer {
                Ok(c) => {
                    failures = 0;
                    c
                }
                Err(e) => {
                    if e.status() == Some(404) {
                        // Deleted (or never made): its jobs go with it.
                        if let Ok(mut d) = self.docs.lock() {
                            d.clear();
                        }
                        since = json!(0);
                        first = true;
                        if let Err(e) = config.create().await {
                            tracing::error!(error = %e, "cannot create {REPLICATOR_DB}");
                            failures += 1;
                            tokio::time::sleep(backoff(failures)).await;
                        }
                        continue;
                    }
                    failures += 1;
                    tracing::error!(error = %e, "reading {REPLICATOR_DB}");
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            };
            let results = changes["results"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for r in results {
                self.apply(r);
            }
            if results.len() < BATCH {
                first = false;
            }
            if let Some(s) = changes.get("last_seq").filter(|v| !v.is_null()) {
                since = s.clone();
            }
        }
    }

    /// One change of `_replicator`: start, replace or stop its job.
    fn apply(&self, change: &Value) {
        let Some(id) = change.get("id").and_then(Value::as_str) else {
            return;
        };
        if id.starts_with("_design/") {
            return;
        }
        let Ok(mut docs) = self.docs.lock() else {
            return;
        };
        if change.get("deleted") == Some(&json!(true)) {
            if docs.remove(id).is_some() {
                tracing::info!(doc = id, "replication removed");
            }
            return;
        }
        let doc = change.get("doc").cloned().unwrap_or(Value::Null);
        match Spec::from_json(&doc) {
            Ok(spec) => {
                if docs.get(id).is_some_and(|j| j.spec == spec) {
                    return;
                }
                tracing::info!(doc = id, source = %strip_credentials(&spec.source), target = %strip_credentials(&spec.target), continuous = spec.continuous, "replication (re)started");
                let job = self.spawn(spec);
                docs.insert(id.to_owned(), job);
            }
            Err(why) => {
                tracing::warn!(doc = id, reason = %why, "replication document refused");
                let mut status = Status::new();
                status.state = State::Failed;
                status.last_error = Some(why);
                let spec = Spec {
                    source: doc["source"].as_str().unwrap_or("").to_owned(),
                    target: doc["target"].as_str().unwrap_or("").to_owned(),
                    continuous: false,
                    create_target: false,
                };
                docs.insert(
                    id.to_owned(),
                    Job {
                        spec,
                        status: Arc::new(Mutex::new(status)),
                        task: None,
                    },
                );
            }
        }
    }

    /// `GET /_scheduler/docs` entries.
    fn scheduler_docs(&self) -> Vec<Value> {
        let Ok(docs) = self.docs.lock() else {
            return Vec::new();
        };
        let mut ids: Vec<&String> = docs.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| docs.get(id).map(|j| scheduler_doc(id, j)))
            .collect()
    }

    fn scheduler_doc(&self, id: &str) -> Option<Value> {
        let docs = self.docs.lock().ok()?;
        docs.get(id).map(|j| scheduler_doc(id, j))
    }

    fn active_tasks(&self) -> Vec<Value> {
        let mut out = Vec::new();
        if let Ok(docs) = self.docs.lock() {
            for (id, j) in docs.iter() {
                out.extend(active_task(Some(id), j));
            }
        }
        if let Ok(t) = self.transient.lock() {
            for j in t.iter() {
                out.extend(active_task(None, j));
            }
        }
        out
    }

    /// `POST /_replicate`.
    async fn replicate_now(&self, body: Value) -> Response<AnyBody> {
        let spec = match Spec::from_json(&body) {
            Ok(s) => s,
            Err(why) => return error(StatusCode::BAD_REQUEST, "bad_request", &why),
        };
        let cancel = body.get("cancel") == Some(&json!(true));
        if cancel {
            let Ok(mut t) = self.transient.lock() else {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_server_error",
                    "lock",
                );
            };
            let before = t.len();
            t.retain(|j| j.spec.source != spec.source || j.spec.target != spec.target);
            return if t.len() < before {
                reply(StatusCode::OK, &json!({"ok": true}))
            } else {
                error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such continuous replication",
                )
            };
        }
        if spec.continuous {
            let job = self.spawn(spec.clone());
            let Ok(mut t) = self.transient.lock() else {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_server_error",
                    "lock",
                );
            };
            // The same replication asked again replaces the running one.
            t.retain(|j| j.spec.source != spec.source || j.spec.target != spec.target);
            t.push(job);
            return reply(StatusCode::ACCEPTED, &json!({"ok": true}));
        }
        let dialer = self.boxes();
        let opened = Peer::open(&self.api, &spec.source, dialer.as_ref())
            .and_then(|s| Ok((s, Peer::open(&self.api, &spec.target, dialer.as_ref())?)));
        let (source, target) = match opened {
            Ok(p) => p,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
        };
        let status = Arc::new(Mutex::new(Status::new()));
        // Shown in _active_tasks while it runs (the task is this request).
        let shown = Job {
            spec: spec.clone(),
            status: status.clone(),
            task: None,
        };
        if let Ok(mut t) = self.transient.lock() {
            t.push(shown);
        }
        let result = replicate(&source, &target, &spec, &status).await;
        if let Ok(mut t) = self.transient.lock() {
            t.retain(|j| !Arc::ptr_eq(&j.status, &status));
        }
        let Some(s) = snapshot(&status) else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_server_error",
                "lock",
            );
        };
        match result {
            Ok(()) => reply(
                StatusCode::OK,
                &json!({
                    "ok": true,
                    "session_id": s.history.first().and_then(|h| h.get("session_id")).cloned().unwrap_or(Value::Null),
                    "source_last_seq": s.checkpointed_source_seq,
                    "replication_id_version": 1,
                    "history": s.history,
                    "docs_read": s.docs_read,
                    "docs_written": s.docs_written,
                    "doc_write_failures": s.doc_write_failures,
                    "no_changes": s.docs_read == 0,
                }),
            ),
            Err(e) => match e.status() {
                Some(404) => error(StatusCode::NOT_FOUND, "db_not_found", &e.to_string()),
                Some(401 | 403) => error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
                _ => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "replication_failed",
                    &e.to_string(),
                ),
            },
        }
    }
}

fn error(status: StatusCode, e: &str, reason: &str) -> Response<AnyBody> {
    reply(status, &json!({"error": e, "reason": reason}))
}

fn info(s: &Status) -> Value {
    let mut info = json!({
        "revisions_checked": s.revisions_checked,
        "missing_revisions_found": s.missing_revisions_found,
        "docs_read": s.docs_read,
        "docs_written": s.docs_written,
        "doc_write_failures": s.doc_write_failures,
        "changes_pending": s.changes_pending,
        "checkpointed_source_seq": s.checkpointed_source_seq,
    });
    if matches!(s.state, State::Crashing | State::Failed) {
        info["error"] = json!(s.last_error);
    }
    info
}

fn scheduler_doc(id: &str, j: &Job) -> Value {
    let s = snapshot(&j.status).unwrap_or_else(Status::new);
    let mut v = json!({
        "database": REPLICATOR_DB,
        "doc_id": id,
        "id": s.replication_id,
        "node": "cloudlet",
        "source": strip_credentials(&j.spec.source),
        "target": strip_credentials(&j.spec.target),
        "continuous": j.spec.continuous,
        "state": s.state.name(),
        "info": info(&s),
        "error_count": s.error_count,
        "last_updated": rfc3339(s.last_updated),
        "start_time": rfc3339(s.start_time),
    });
    if matches!(s.state, State::Crashing | State::Failed) {
        v["last_error"] = json!(s.last_error);
    }
    v
}

fn active_task(doc_id: Option<&str>, j: &Job) -> Option<Value> {
    let s = snapshot(&j.status)?;
    if !matches!(s.state, State::Running | State::Crashing | State::Pending) {
        return None;
    }
    Some(json!({
        "type": "replication",
        "replication_id": s.replication_id,
        "doc_id": doc_id,
        "database": doc_id.map(|_| REPLICATOR_DB),
        "source": strip_credentials(&j.spec.source),
        "target": strip_credentials(&j.spec.target),
        "continuous": j.spec.continuous,
        "revisions_checked": s.revisions_checked,
        "missing_revisions_found": s.missing_revisions_found,
        "docs_read": s.docs_read,
        "docs_written": s.docs_written,
        "doc_write_failures": s.doc_write_failures,
        "changes_pending": s.changes_pending,
        "checkpointed_source_seq": s.checkpointed_source_seq,
        "started_on": unix(s.start_time),
        "updated_on": unix(s.last_updated),
    }))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-12-05T11:50:52Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = unix(t);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's method).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `/_scheduler/docs`: every job, in CouchDB's list shape.
fn scheduler_list(rep: &Replicator) -> Response<AnyBody> {
    let docs = rep.scheduler_docs();
    reply(
        StatusCode::OK,
        &json!({"total_rows": docs.len(), "offset": 0, "docs": docs}),
    )
}

/// The replicator's routes, added to the service's (before `/{db}`,
/// whose patterns would match these paths too).
pub fn routes(router: Router, rep: Arc<Replicator>) -> Router {
    let r1 = rep.clone();
    let r2 = rep.clone();
    let r3 = rep.clone();
    let r4 = rep.clone();
    router
        .route(
            Method::POST,
            "/_replicate",
            move |req: Request<RoutedBody>, _: Params| {
                let rep = r1.clone();
                async move {
                    if !crate::is_owner(&req) {
                        return crate::owners_only_answer();
                    }
                    let body = match req.into_body().collect().await {
                        Ok(b) => b.to_bytes(),
                        Err(e) => {
                            return error(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "too_large",
                                &e.to_string(),
                            )
                        }
                    };
                    match serde_json::from_slice::<Value>(&body) {
                        Ok(v @ Value::Object(_)) => rep.replicate_now(v).await,
                        _ => error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            "the body must be a JSON object",
                        ),
                    }
                }
            },
        )
        .body_limit(REPLICATE_LIMIT)
        // Every job is a `_replicator` one here: both list them all.
        .route(
            Method::GET,
            "/_scheduler/docs",
            move |_: Request<RoutedBody>, _: Params| {
                let answer = scheduler_list(&r2);
                async move { answer }
            },
        )
        .route(
            Method::GET,
            "/_scheduler/docs/_replicator",
            move |_: Request<RoutedBody>, _: Params| {
                let answer = scheduler_list(&r3);
                async move { answer }
            },
        )
        .route(
            Method::GET,
            "/_scheduler/docs/_replicator/{docid}",
            move |_: Request<RoutedBody>, p: Params| {
                let doc = r4.scheduler_doc(p.get("docid").unwrap_or(""));
                async move {
                    match doc {
                        Some(d) => reply(StatusCode::OK, &d),
                        None => error(
                            StatusCode::NOT_FOUND,
                            "not_found",
                            "unknown replication document",
                        ),
                    }
                }
            },
        )
        .route(
            Method::GET,
            "/_active_tasks",
            move |_: Request<RoutedBody>, _: Params| {
                let tasks = rep.active_tasks();
                async move { reply(StatusCode::OK, &json!(tasks)) }
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replication_ids_are_pouchdbs_md5_of_both_database_ids() {
        // md5("a40b") in base64 is "4NS/VHDST+KRC5rV9PfzBA==".
        assert_eq!(replication_id("a40", "b"), "4NS.VHDST_KRC5rV9PfzBA==");
    }

    #[test]
    fn the_start_is_the_newest_session_both_sides_recorded() {
        let s = json!({"session_id": "s3", "last_seq": 30,
            "history": [{"session_id": "s3", "last_seq": 30}, {"session_id": "s2", "last_seq": 20}, {"session_id": "s1", "last_seq": 10}]});
        let same = s.clone();
        assert_eq!(start_seq(Some(&s), Some(&same)), json!(30));
        // The target missed the last session's checkpoint.
        let t = json!({"session_id": "s2", "last_seq": 20,
            "history": [{"session_id": "s2", "last_seq": 20}, {"session_id": "s1", "last_seq": 10}]});
        assert_eq!(start_seq(Some(&s), Some(&t)), json!(20));
        // Nothing in common, or one side without a checkpoint: the beginning.
        let other = json!({"session_id": "x", "last_seq": 5, "history": [{"session_id": "x", "last_seq": 5}]});
        assert_eq!(start_seq(Some(&s), Some(&other)), json!(0));
        assert_eq!(start_seq(None, Some(&t)), json!(0));
        assert_eq!(start_seq(Some(&s), None), json!(0));
    }

    #[test]
    fn couchdb_checkpoints_are_read_by_their_own_names() {
        let s = json!({"session_id": "c2", "source_last_seq": "7-g1AAAA",
            "history": [{"session_id": "c2", "recorded_seq": "7-g1AAAA"}, {"session_id": "c1", "recorded_seq": "3-g1AAAA"}]});
        let t = json!({"session_id": "c1", "source_last_seq": "3-g1AAAA",
            "history": [{"session_id": "c1", "recorded_seq": "3-g1AAAA"}]});
        assert_eq!(start_seq(Some(&s), Some(&t)), json!("3-g1AAAA"));
    }

    #[test]
    fn a_checkpoint_keeps_five_sessions_newest_first_and_its_rev() {
        let mut doc = None;
        for i in 0..7 {
            let mut d = next_checkpoint(doc, "rid", &format!("s{i}"), &json!(i * 10));
            d["_rev"] = json!(format!("0-{}", i + 1));
            doc = Some(d);
        }
        let d = doc.unwrap();
        assert_eq!(d["_id"], "_local/rid");
        assert_eq!(d["_rev"], "0-7");
        assert_eq!(d["session_id"], "s6");
        assert_eq!(d["last_seq"], 60);
        assert_eq!(d["version"], 1);
        let h: Vec<&str> = d["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["session_id"].as_str().unwrap())
            .collect();
        assert_eq!(h, ["s6", "s5", "s4", "s3", "s2"]);
        // The same session again replaces its entry.
        let d = next_checkpoint(Some(d), "rid", "s6", &json!(70));
        assert_eq!(
            d["history"][0],
            json!({"session_id": "s6", "last_seq": 70, "recorded_seq": 70})
        );
        assert_eq!(d["history"][1]["session_id"], "s5");
    }

    #[test]
    fn backoff_doubles_from_one_second_to_a_minute() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn specs_take_strings_or_url_objects_and_refuse_the_rest() {
        let s = Spec::from_json(
            &json!({"source": "a", "target": {"url": "http://h/b"}, "continuous": true}),
        )
        .unwrap();
        assert_eq!(
            s,
            Spec {
                source: "a".into(),
                target: "http://h/b".into(),
                continuous: true,
                create_target: false
            }
        );
        assert!(Spec::from_json(&json!({"source": "a"})).is_err());
        assert!(
            Spec::from_json(&json!({"source": "a", "target": "b", "continuous": "yes"})).is_err()
        );
        assert!(Spec::from_json(&json!({"source": 1, "target": "b"})).is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_471_452);
        assert_eq!(rfc3339(t), "2026-12-05T11:50:52Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }
}
