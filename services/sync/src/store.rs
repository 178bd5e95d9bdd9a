//! The document store: every database of the box in one redb file.
//!
//! Tables (a database is named by a number, so deleting one and making it
//! again starts clean):
//! * `dbs`: name -> [`DbMeta`] (its number, update sequence, counts, `_revs_limit`)
//! * `docs`: (db, doc id) -> [`DocRecord`] (the revision tree with the
//!   leaves' bodies, and the sequence of its last change)
//! * `changes`: (db, seq) -> doc id, one row per document, at its last change
//! * `local`: (db, id after `_local/`) -> [`LocalDoc`]
//! * `atts`: digest -> content, and `att_refs`: digest -> how many stored
//!   revisions use it; the content goes with the last of them
//! * `meta`: the box's uuid and the next database number
//!
//! Every change (a PUT, a whole `_bulk_docs`) is one write transaction,
//! committed with redb's default durability before it is acknowledged.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;

use base64::Engine;
use md5::{Digest, Md5};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::revtree::{generation, new_rev, Rev, RevTree};

const DBS: TableDefinition<&str, &[u8]> = TableDefinition::new("dbs");
const DOCS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("docs");
const CHANGES: TableDefinition<(u64, u64), &str> = TableDefinition::new("changes");
const LOCAL: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("local");
const ATTS: TableDefinition<&str, &[u8]> = TableDefinition::new("atts");
const ATT_REFS: TableDefinition<&str, u64> = TableDefinition::new("att_refs");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const NEXT_DB: &str = "next_db";
const UUID: &str = "uuid";

/// The database's page cache (read cache and write buffer together). The
/// kernel's page cache holds the file too, so redb's own only saves copies:
/// 4 MiB keeps the service's memory small (16 MiB was most of it) at no
/// cost the sync bench could see.
pub const CACHE_BYTES: usize = 4 << 20;
/// `_revs_limit` of a new database (CouchDB's default).
pub const DEFAULT_REVS_LIMIT: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// the database file failed
    #[error("database: {0}")]
    Db(#[from] redb::Error),
    /// no database of that name
    #[error("Database does not exist.")]
    NoDb,
    /// a database of that name already exists
    #[error("The database could not be created, the file already exists.")]
    DbExists,
    /// the name is not a CouchDB database name
    #[error("Name: '{0}'. Only lowercase characters (a-z), digits (0-9), and any of the characters _, $, (, ), +, -, and / are allowed. Must begin with a letter.")]
    BadDbName(String),
    /// a stored record does not decode (a bug or a damaged file)
    #[error("a stored record of {0} does not decode")]
    Corrupt(String),
    /// the directory for spooled request bodies could not be made or emptied
    #[error("spool directory {0}: {1}")]
    Spool(std::path::PathBuf, std::io::Error),
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

/// Why one document of a write was refused (the others still go in).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    /// `_rev` is not a current leaf, or a live document exists and no `_rev` was given
    #[error("Document update conflict.")]
    Conflict,
    /// the request is malformed
    #[error("{0}")]
    BadRequest(String),
    /// an attachment stub names an attachment the document does not have
    #[error("Invalid attachment stub in {0} for {1}")]
    MissingStub(String, String),
    /// a field starting with `_` that CouchDB does not know
    #[error("Bad special document member: {0}")]
    Validation(String),
}

/// A database's bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbMeta {
    pub id: u64,
    pub update_seq: u64,
    pub doc_count: u64,
    pub doc_del_count: u64,
    pub revs_limit: u64,
}

/// A stored document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DocRecord {
    pub seq: u64,
    pub tree: RevTree,
}

/// A `_local` document: no history, a counter for a revision.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalDoc {
    pub rev: u64,
    pub body: Map<String, Value>,
}

/// One document to write, as the client sent it.
#[derive(Debug, Clone)]
pub struct DocWrite {
    pub id: String,
    pub doc: Map<String, Value>,
}

/// CouchDB's rule: `^[a-z][a-z0-9_$()+/-]*$`, and the one system
/// database the box has, `_replicator` (the replicator's configuration).
pub fn is_valid_db_name(name: &str) -> bool {
    if name == "_replicator" {
        return true;
    }
    let mut b = name.bytes();
    matches!(b.next(), Some(b'a'..=b'z'))
        && b.all(|c| {
            matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'$' | b'(' | b')' | b'+' | b'-' | b'/')
        })
}

/// The digest CouchDB gives an attachment: `md5-` and the base64 of its MD5.
pub fn digest(data: &[u8]) -> String {
    let sum = Md5::digest(data);
    format!(
        "md5-{}",
        base64::engine::general_purpose::STANDARD.encode(sum)
    )
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|_| StoreError::Corrupt(what.to_owned()))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Digests the stored bodies of a tree use, with how often.
fn digests(tree: &RevTree) -> HashMap<String, i64> {
    let mut out = HashMap::new();
    for n in tree.nodes.values() {
        let Some(atts) = n
            .body
            .as_ref()
            .and_then(|b| b.get("_attachments"))
            .and_then(Value::as_object)
        else {
            continue;
        };
        for a in atts.values() {
            if let Some(d) = a.get("digest").and_then(Value::as_str) {
                *out.entry(d.to_owned()).or_insert(0) += 1;
            }
        }
    }
    out
}

pub struct Store {
    db: Database,
    spool: std::path::PathBuf,
}

impl Store {
    /// Opens (or makes) `sync.redb` in `dir`, and the box's uuid.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join("sync.redb"))
            .map_err(dberr)?;
        // Bodies spooled by a run that ended mid-request are of no use.
        let spool = dir.join("spool");
        match std::fs::remove_dir_all(&spool) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::Spool(spool, e))
            }
            _ => {}
        }
        std::fs::create_dir_all(&spool).map_err(|e| StoreError::Spool(spool.clone(), e))?;
        Store::init(db, spool)
    }

    /// A store in memory (nothing durable): for tests of the routes.
    pub fn in_memory() -> Result<Store, StoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(dberr)?;
        Store::init(db, std::env::temp_dir())
    }

    /// Makes the tables and the box's uuid on first use.
    fn init(db: Database, spool: std::path::PathBuf) -> Result<Store, StoreError> {
        let s = Store { db, spool };
        let tx = s.db.begin_write().map_err(dberr)?;
        {
            let mut meta = tx.open_table(META).map_err(dberr)?;
            if meta.get(UUID).map_err(dberr)?.is_none() {
                let uuid = uuid::Uuid::new_v4().simple().to_string();
                meta.insert(UUID, uuid.as_str()).map_err(dberr)?;
            }
            // Every table exists from the start, so readers can open them.
            tx.open_table(DBS).map_err(dberr)?;
            tx.open_table(DOCS).map_err(dberr)?;
            tx.open_table(CHANGES).map_err(dberr)?;
            tx.open_table(LOCAL).map_err(dberr)?;
            tx.open_table(ATTS).map_err(dberr)?;
            tx.open_table(ATT_REFS).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(s)
    }

    /// The box's uuid (made once, kept in the database).
    pub fn uuid(&self) -> Result<String, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let meta = tx.open_table(META).map_err(dberr)?;
        Ok(meta
            .get(UUID)
            .map_err(dberr)?
            .map(|g| g.value().to_owned())
            .unwrap_or_default())
    }

    pub fn create_db(&self, name: &str) -> Result<(), StoreError> {
        if !is_valid_db_name(name) {
            return Err(StoreError::BadDbName(name.to_owned()));
        }
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut dbs = tx.open_table(DBS).map_err(dberr)?;
            if dbs.get(name).map_err(dberr)?.is_some() {
                return Err(StoreError::DbExists);
            }
            let mut meta = tx.open_table(META).map_err(dberr)?;
            let id: u64 = meta
                .get(NEXT_DB)
                .map_err(dberr)?
                .and_then(|g| g.value().parse().ok())
                .unwrap_or(1);
            meta.insert(NEXT_DB, (id + 1).to_string().as_str())
                .map_err(dberr)?;
            let m = DbMeta {
                id,
                update_seq: 0,
                doc_count: 0,
                doc_del_count: 0,
                revs_limit: DEFAULT_REVS_LIMIT,
            };
            dbs.insert(name, encode(&m).as_slice()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(())
    }

    /// Deletes a database with its documents, local documents and the
    /// attachments only it used.
    pub fn delete_db(&self, name: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut dbs = tx.open_table(DBS).map_err(dberr)?;
            let m: DbMeta = match dbs.remove(name).map_err(dberr)? {
                Some(g) => decode(g.value(), name)?,
                None => return Err(StoreError::NoDb),
            };
            let mut released: HashMap<String, i64> = HashMap::new();
            let mut docs = tx.open_table(DOCS).map_err(dberr)?;
            let mut bad = false;
            docs.retain_in((m.id, "")..(m.id + 1, ""), |_, v| {
                match serde_json::from_slice::<DocRecord>(v) {
                    Ok(r) => {
                        for (d, n) in digests(&r.tree) {
                            *released.entry(d).or_insert(0) -= n;
                        }
                    }
                    Err(_) => bad = true,
                }
                false
            })
            .map_err(dberr)?;
            if bad {
                tracing::warn!(
                    db = name,
                    "undecodable documents deleted with their database"
                );
            }
            tx.open_table(CHANGES)
                .map_err(dberr)?
                .retain_in((m.id, 0)..(m.id + 1, 0), |_, _| false)
                .map_err(dberr)?;
            tx.open_table(LOCAL)
                .map_err(dberr)?
                .retain_in((m.id, "")..(m.id + 1, ""), |_, _| false)
                .map_err(dberr)?;
            adjust_refs(&tx, &released)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(())
    }

    pub fn list_dbs(&self) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let dbs = tx.open_table(DBS).map_err(dberr)?;
        let mut out = Vec::new();
        for item in dbs.iter().map_err(dberr)? {
            out.push(item.map_err(dberr)?.0.value().to_owned());
        }
        Ok(out)
    }

    pub fn db_meta(&self, name: &str) -> Result<DbMeta, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let dbs = tx.open_table(DBS).map_err(dberr)?;
        meta_of(&dbs, name)
    }

    pub fn set_revs_limit(&self, name: &str, limit: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut dbs = tx.open_table(DBS).map_err(dberr)?;
            let mut m = meta_of(&dbs, name)?;
            m.revs_limit = limit;
            dbs.insert(name, encode(&m).as_slice()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(())
    }

    /// A snapshot to read a database from (documents, changes, local docs).
    pub fn reader(&self, name: &str) -> Result<Reader, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let meta = meta_of(&tx.open_table(DBS).map_err(dberr)?, name)?;
        Ok(Reader {
            docs: tx.open_table(DOCS).map_err(dberr)?,
            changes: tx.open_table(CHANGES).map_err(dberr)?,
            local: tx.open_table(LOCAL).map_err(dberr)?,
            atts: tx.open_table(ATTS).map_err(dberr)?,
            meta,
        })
    }

    /// Writes documents in one transaction. With `new_edits` each is an
    /// edit of the leaf its `_rev` names; without, each carries its own
    /// revision (and `_revisions`) and is merged into the tree. One
    /// document's refusal does not stop the others.
    pub fn write_docs(
        &self,
        name: &str,
        writes: Vec<DocWrite>,
        new_edits: bool,
    ) -> Result<Vec<Result<String, DocError>>, StoreError> {
        let mut batch = self.batch(name, new_edits)?;
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            out.push(batch.write(w)?);
        }
        batch.commit()?;
        Ok(out)
    }

    /// Starts a write of documents one at a time in one transaction (what
    /// [`Store::write_docs`] does with a list): a large `_bulk_docs` goes in
    /// as it is parsed, so only one document is in memory at a time.
    /// Nothing is written unless [`Batch::commit`] is called.
    pub fn batch(&self, name: &str, new_edits: bool) -> Result<Batch, StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let m = meta_of(&tx.open_table(DBS).map_err(dberr)?, name)?;
        Ok(Batch {
            tx,
            name: name.to_owned(),
            m,
            new_edits,
            refs: HashMap::new(),
            changed: false,
        })
    }

    /// Where request bodies too large to hold in memory are spooled
    /// (emptied when the store opens, so a crash leaves nothing behind).
    pub fn spool_dir(&self) -> &Path {
        &self.spool
    }

    /// Writes (or with `delete`, removes) a `_local` document. `rev` is the
    /// revision the client named; a mismatch with an existing one is a conflict.
    pub fn put_local(
        &self,
        name: &str,
        id: &str,
        rev: Option<&str>,
        body: Map<String, Value>,
        delete: bool,
    ) -> Result<Result<String, DocError>, StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let result;
        {
            let m = meta_of(&tx.open_table(DBS).map_err(dberr)?, name)?;
            let mut local = tx.open_table(LOCAL).map_err(dberr)?;
            let old: Option<LocalDoc> = match local.get((m.id, id)).map_err(dberr)? {
                Some(g) => Some(decode(g.value(), id)?),
                None => None,
            };
            let current = old.as_ref().map(|o| format!("0-{}", o.rev));
            result = match (&current, rev) {
                // A write that names no revision over an existing document,
                // or names another one, is a conflict; naming one for a
                // document that is not there is tolerated (a checkpoint
                // whose database was made again).
                (Some(c), Some(r)) if c != r => Err(DocError::Conflict),
                (Some(_), None) => Err(DocError::Conflict),
                (None, _) if delete => Err(DocError::Conflict),
                _ => {
                    let n = old.as_ref().map_or(0, |o| o.rev) + 1;
                    if delete {
                        local.remove((m.id, id)).map_err(dberr)?;
                        Ok("0-0".to_owned())
                    } else {
                        local
                            .insert((m.id, id), encode(&LocalDoc { rev: n, body }).as_slice())
                            .map_err(dberr)?;
                        Ok(format!("0-{n}"))
                    }
                }
            };
        }
        tx.commit().map_err(dberr)?;
        Ok(result)
    }
}

/// What one batch of a compaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compacted {
    /// Revisions stemmed away.
    pub revs: u64,
    /// Where the next batch starts (after this id); `None`: done.
    pub next: Option<String>,
}

const CORS_ORIGINS: &str = "cors_origins";

/// Compaction and the service's settings.
impl Store {
    /// One batch of a compaction of database `name`: the documents after
    /// `after` (at most `batch` of them) are stemmed to the current
    /// `_revs_limit`, in one write transaction. Every leaf stays; only
    /// leaves have bodies, so no attachment loses a user here.
    pub fn compact_batch(
        &self,
        name: &str,
        after: Option<&str>,
        batch: usize,
    ) -> Result<Compacted, StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let mut out = Compacted::default();
        {
            let m = meta_of(&tx.open_table(DBS).map_err(dberr)?, name)?;
            let limit = usize::try_from(m.revs_limit).unwrap_or(usize::MAX);
            let mut docs = tx.open_table(DOCS).map_err(dberr)?;
            let mut taken: Vec<(String, DocRecord)> = Vec::new();
            for item in docs
                .range((m.id, after.unwrap_or(""))..(m.id + 1, ""))
                .map_err(dberr)?
            {
                let (k, v) = item.map_err(dberr)?;
                let id = k.value().1;
                if after == Some(id) {
                    continue;
                }
                if taken.len() == batch {
                    out.next = taken.last().map(|(i, _)| i.clone());
                    break;
                }
                taken.push((id.to_owned(), decode(v.value(), id)?));
            }
            let mut refs: HashMap<String, i64> = HashMap::new();
            for (id, mut rec) in taken {
                let before = digests(&rec.tree);
                let gone = rec.tree.stem(limit);
                if gone == 0 {
                    continue;
                }
                out.revs += gone as u64;
                for (d, n) in digests(&rec.tree) {
                    *refs.entry(d).or_insert(0) += n;
                }
                for (d, n) in before {
                    *refs.entry(d).or_insert(0) -= n;
                }
                docs.insert((m.id, id.as_str()), encode(&rec).as_slice())
                    .map_err(dberr)?;
            }
            drop(docs);
            adjust_refs(&tx, &refs)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(out)
    }

    /// One batch of the attachment sweep: stored contents after `after`
    /// (at most `batch`) that no revision uses any more are freed. The
    /// counts free them as their last user goes; this catches any the
    /// counts missed. The count freed and where to go on (`None`: done).
    pub fn sweep_attachments(
        &self,
        after: Option<&str>,
        batch: usize,
    ) -> Result<(u64, Option<String>), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        let mut freed = 0;
        let mut next = None;
        {
            let refs = tx.open_table(ATT_REFS).map_err(dberr)?;
            let mut atts = tx.open_table(ATTS).map_err(dberr)?;
            let mut seen: Vec<String> = Vec::new();
            for item in atts.range(after.unwrap_or("")..).map_err(dberr)? {
                let (k, _) = item.map_err(dberr)?;
                let d = k.value();
                if after == Some(d) {
                    continue;
                }
                if seen.len() == batch {
                    next = seen.last().cloned();
                    break;
                }
                seen.push(d.to_owned());
            }
            for d in &seen {
                if refs.get(d.as_str()).map_err(dberr)?.is_none() {
                    atts.remove(d.as_str()).map_err(dberr)?;
                    freed += 1;
                }
            }
        }
        tx.commit().map_err(dberr)?;
        Ok((freed, next))
    }

    /// The origins the owner allowed to call from a browser (CORS), besides
    /// the box's own web UI.
    pub fn cors_origins(&self) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let meta = tx.open_table(META).map_err(dberr)?;
        match meta.get(CORS_ORIGINS).map_err(dberr)? {
            Some(g) => decode(g.value().as_bytes(), CORS_ORIGINS),
            None => Ok(Vec::new()),
        }
    }

    pub fn set_cors_origins(&self, origins: &[String]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut meta = tx.open_table(META).map_err(dberr)?;
            let v = serde_json::to_string(origins).unwrap_or_else(|_| "[]".into());
            meta.insert(CORS_ORIGINS, v.as_str()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)?;
        Ok(())
    }
}

/// Documents being written in one transaction (see [`Store::batch`]).
pub struct Batch {
    tx: redb::WriteTransaction,
    name: String,
    m: DbMeta,
    new_edits: bool,
    /// Reference count changes of attachment contents, applied at commit.
    refs: HashMap<String, i64>,
    changed: bool,
}

impl Batch {
    /// Writes one document (its inline attachments' contents go into the
    /// store now, in this transaction); its new revision or why it was
    /// refused.
    pub fn write(&mut self, w: DocWrite) -> Result<Result<String, DocError>, StoreError> {
        let DocWrite { id, doc } = w;
        let m = &mut self.m;
        let mut docs = self.tx.open_table(DOCS).map_err(dberr)?;
        let old: Option<DocRecord> = match docs.get((m.id, id.as_str())).map_err(dberr)? {
            Some(g) => Some(decode(g.value(), &id)?),
            None => None,
        };
        let mut rec = old.clone().unwrap_or_default();
        let mut blobs = Vec::new();
        let applied = if self.new_edits {
            edit(&mut rec.tree, &id, doc, &mut blobs)
        } else {
            merge(&mut rec.tree, &id, doc, &mut blobs)
        };
        let rev = match applied {
            Ok(Written::New(rev)) => rev,
            // Already known: nothing to write.
            Ok(Written::Known(rev)) => return Ok(Ok(rev)),
            Err(e) => return Ok(Err(e)),
        };
        rec.tree
            .stem(usize::try_from(m.revs_limit).unwrap_or(usize::MAX));
        {
            let mut atts = self.tx.open_table(ATTS).map_err(dberr)?;
            for (d, data) in blobs {
                if atts.get(d.as_str()).map_err(dberr)?.is_none() {
                    atts.insert(d.as_str(), data.as_slice()).map_err(dberr)?;
                }
            }
        }
        let before = old.as_ref().map(|o| digests(&o.tree)).unwrap_or_default();
        for (d, n) in digests(&rec.tree) {
            *self.refs.entry(d).or_insert(0) += n;
        }
        for (d, n) in before {
            *self.refs.entry(d).or_insert(0) -= n;
        }
        // Counts: a document is live or deleted by its winner.
        match &old {
            Some(o) if o.tree.deleted() => m.doc_del_count -= 1,
            Some(_) => m.doc_count -= 1,
            None => {}
        }
        if rec.tree.deleted() {
            m.doc_del_count += 1;
        } else {
            m.doc_count += 1;
        }
        let mut changes = self.tx.open_table(CHANGES).map_err(dberr)?;
        if let Some(o) = &old {
            changes.remove((m.id, o.seq)).map_err(dberr)?;
        }
        m.update_seq += 1;
        rec.seq = m.update_seq;
        changes
            .insert((m.id, rec.seq), id.as_str())
            .map_err(dberr)?;
        docs.insert((m.id, id.as_str()), encode(&rec).as_slice())
            .map_err(dberr)?;
        self.changed = true;
        Ok(Ok(rev))
    }

    /// Commits every document written (durable when this returns).
    pub fn commit(self) -> Result<(), StoreError> {
        adjust_refs(&self.tx, &self.refs)?;
        if self.changed {
            let mut dbs = self.tx.open_table(DBS).map_err(dberr)?;
            dbs.insert(self.name.as_str(), encode(&self.m).as_slice())
                .map_err(dberr)?;
        }
        self.tx.commit().map_err(dberr)?;
        Ok(())
    }
}

fn meta_of<T: ReadableTable<&'static str, &'static [u8]>>(
    dbs: &T,
    name: &str,
) -> Result<DbMeta, StoreError> {
    match dbs.get(name).map_err(dberr)? {
        Some(g) => decode(g.value(), name),
        None => Err(StoreError::NoDb),
    }
}

/// Applies reference count changes; content nobody uses any more goes.
fn adjust_refs(
    tx: &redb::WriteTransaction,
    delta: &HashMap<String, i64>,
) -> Result<(), StoreError> {
    let mut refs = tx.open_table(ATT_REFS).map_err(dberr)?;
    let mut atts = tx.open_table(ATTS).map_err(dberr)?;
    for (d, n) in delta {
        if *n == 0 {
            continue;
        }
        let old = refs
            .get(d.as_str())
            .map_err(dberr)?
            .map_or(0, |g| g.value());
        let new = (old as i64 + n).max(0) as u64;
        if new == 0 {
            refs.remove(d.as_str()).map_err(dberr)?;
            atts.remove(d.as_str()).map_err(dberr)?;
        } else {
            refs.insert(d.as_str(), new).map_err(dberr)?;
        }
    }
    Ok(())
}

/// A read snapshot of one database.
pub struct Reader {
    docs: redb::ReadOnlyTable<(u64, &'static str), &'static [u8]>,
    changes: redb::ReadOnlyTable<(u64, u64), &'static str>,
    local: redb::ReadOnlyTable<(u64, &'static str), &'static [u8]>,
    atts: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    pub meta: DbMeta,
}

impl Reader {
    pub fn doc(&self, id: &str) -> Result<Option<DocRecord>, StoreError> {
        match self.docs.get((self.meta.id, id)).map_err(dberr)? {
            Some(g) => Ok(Some(decode(g.value(), id)?)),
            None => Ok(None),
        }
    }

    pub fn local(&self, id: &str) -> Result<Option<LocalDoc>, StoreError> {
        match self.local.get((self.meta.id, id)).map_err(dberr)? {
            Some(g) => Ok(Some(decode(g.value(), id)?)),
            None => Ok(None),
        }
    }

    pub fn attachment(&self, digest: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .atts
            .get(digest)
            .map_err(dberr)?
            .map(|g| g.value().to_vec()))
    }

    /// Calls `f` with the sequence and id of each document changed after
    /// `since`, in sequence order (or newest first), until it says stop.
    pub fn changes(
        &self,
        since: u64,
        descending: bool,
        mut f: impl FnMut(u64, &str) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        let id = self.meta.id;
        let range = self
            .changes
            .range((id, since.saturating_add(1))..(id + 1, 0))
            .map_err(dberr)?;
        let iter: Box<dyn Iterator<Item = _>> = if descending {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        for item in iter {
            let (k, v) = item.map_err(dberr)?;
            if f(k.value().1, v.value())?.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Calls `f` with each document whose id is in the range, in id order
    /// (or reversed), until it says stop.
    pub fn all_docs(
        &self,
        start: Option<&str>,
        end: Option<&str>,
        inclusive_end: bool,
        descending: bool,
        mut f: impl FnMut(&str, DocRecord) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        let id = self.meta.id;
        // In descending order the start key is the high end.
        let (lo, hi) = if descending {
            (end, start)
        } else {
            (start, end)
        };
        let lo_incl = if descending { inclusive_end } else { true };
        let hi_incl = if descending { true } else { inclusive_end };
        let range = self
            .docs
            .range((id, lo.unwrap_or(""))..(id + 1, ""))
            .map_err(dberr)?;
        let in_range = |k: &str| {
            let above = match lo {
                Some(l) if lo_incl => k >= l,
                Some(l) => k > l,
                None => true,
            };
            let below = match hi {
                Some(h) if hi_incl => k <= h,
                Some(h) => k < h,
                None => true,
            };
            (above, below)
        };
        let mut visit = |k: &str, v: &[u8]| -> Result<ControlFlow<()>, StoreError> {
            let rec: DocRecord = decode(v, k)?;
            f(k, rec)
        };
        if descending {
            for item in range.rev() {
                let (k, v) = item.map_err(dberr)?;
                let key = k.value().1;
                let (above, below) = in_range(key);
                if !above {
                    break;
                }
                if below && visit(key, v.value())?.is_break() {
                    break;
                }
            }
        } else {
            for item in range {
                let (k, v) = item.map_err(dberr)?;
                let key = k.value().1;
                let (above, below) = in_range(key);
                if !below {
                    break;
                }
                if above && visit(key, v.value())?.is_break() {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// Fields a client may send that are not stored (computed on reading).
const IGNORED_SPECIAL: &[&str] = &[
    "_conflicts",
    "_deleted_conflicts",
    "_revs_info",
    "_local_seq",
];

/// Splits what the client sent into the stored body; checks special fields.
/// Takes the document, so its (perhaps large) values are moved, not copied.
fn body_of(doc: Map<String, Value>) -> Result<Map<String, Value>, DocError> {
    let mut body = Map::new();
    for (k, v) in doc {
        if k.starts_with('_') {
            match k.as_str() {
                "_id" | "_rev" | "_deleted" | "_revisions" => continue,
                "_attachments" => {}
                k if IGNORED_SPECIAL.contains(&k) => continue,
                _ => return Err(DocError::Validation(k)),
            }
        }
        body.insert(k, v);
    }
    Ok(body)
}

fn is_deleted(doc: &Map<String, Value>) -> bool {
    doc.get("_deleted")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Replaces the attachments of `body` by stored stubs: inline data is
/// decoded (its content queued in `blobs`), stubs are looked up in
/// `known` (attachment maps of revisions the edit builds on).
fn settle_attachments(
    id: &str,
    body: &mut Map<String, Value>,
    known: &[&Map<String, Value>],
    revpos: u64,
    blobs: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), DocError> {
    let Some(atts) = body.get_mut("_attachments") else {
        return Ok(());
    };
    let Some(atts) = atts.as_object_mut() else {
        return Err(DocError::BadRequest("_attachments is not an object".into()));
    };
    for (name, att) in atts.iter_mut() {
        let Some(a) = att.as_object() else {
            return Err(DocError::BadRequest(format!(
                "attachment {name} is not an object"
            )));
        };
        if let Some(data) = a.get("data") {
            let data = data
                .as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .ok_or_else(|| {
                    DocError::BadRequest(format!("attachment {name}: data is not base64"))
                })?;
            let d = digest(&data);
            let content_type = a
                .get("content_type")
                .and_then(Value::as_str)
                .unwrap_or("application/octet-stream");
            let pos = a.get("revpos").and_then(Value::as_u64).unwrap_or(revpos);
            *att = serde_json::json!({
                "content_type": content_type,
                "digest": d,
                "length": data.len(),
                "revpos": pos,
                "stub": true,
            });
            blobs.push((d, data));
        } else if a.get("stub").and_then(Value::as_bool) == Some(true) {
            let want = a.get("digest").and_then(Value::as_str);
            let found = known
                .iter()
                .filter_map(|m| m.get(name))
                .find(|k| want.is_none() || k.get("digest").and_then(Value::as_str) == want)
                .cloned();
            match found {
                Some(k) => *att = k,
                None => return Err(DocError::MissingStub(id.to_owned(), name.clone())),
            }
        } else {
            return Err(DocError::BadRequest(format!(
                "attachment {name} has neither data nor stub"
            )));
        }
    }
    Ok(())
}

fn attachments_of(body: &Option<Map<String, Value>>) -> Option<&Map<String, Value>> {
    body.as_ref()?.get("_attachments")?.as_object()
}

/// What a write did to a document's tree.
enum Written {
    /// a new revision
    New(String),
    /// the revision was already there (a replicated one)
    Known(String),
}

/// A new edit (`new_edits=true`): the new revision id.
fn edit(
    tree: &mut RevTree,
    id: &str,
    doc: Map<String, Value>,
    blobs: &mut Vec<(String, Vec<u8>)>,
) -> Result<Written, DocError> {
    let deleted = is_deleted(&doc);
    let parent: Option<String> = match doc.get("_rev") {
        Some(Value::String(r)) => {
            if Rev::parse(r).is_none() {
                return Err(DocError::BadRequest("Invalid rev format".into()));
            }
            if !tree.is_leaf(r) {
                return Err(DocError::Conflict);
            }
            Some(r.clone())
        }
        Some(_) => return Err(DocError::BadRequest("Invalid rev format".into())),
        None => match tree.winner() {
            None => None,
            // A deleted document is made again on top of its deletion.
            Some(w) if tree.deleted() => Some(w.to_owned()),
            Some(_) => return Err(DocError::Conflict),
        },
    };
    let mut body = body_of(doc)?;
    let known: Vec<&Map<String, Value>> = parent
        .as_deref()
        .and_then(|p| tree.node(p))
        .and_then(|n| attachments_of(&n.body))
        .into_iter()
        .collect();
    let revpos = parent.as_deref().map_or(0, generation) + 1;
    settle_attachments(id, &mut body, &known, revpos, blobs)?;
    let rev = new_rev(parent.as_deref(), deleted, &body);
    tree.add_child(parent.as_deref(), rev.clone(), deleted, body);
    Ok(Written::New(rev))
}

/// A replicated revision (`new_edits=false`): merged as sent, or known
/// when it was already here.
fn merge(
    tree: &mut RevTree,
    id: &str,
    doc: Map<String, Value>,
    blobs: &mut Vec<(String, Vec<u8>)>,
) -> Result<Written, DocError> {
    let rev = match doc.get("_rev") {
        Some(Value::String(r)) => r.clone(),
        _ => {
            return Err(DocError::BadRequest(
                "a document needs _rev with new_edits=false".into(),
            ))
        }
    };
    let Some(parsed) = Rev::parse(&rev) else {
        return Err(DocError::BadRequest("Invalid rev format".into()));
    };
    let path: Vec<String> = match doc.get("_revisions") {
        None => vec![rev.clone()],
        Some(r) => {
            let start = r.get("start").and_then(Value::as_u64);
            let ids = r.get("ids").and_then(Value::as_array);
            let (Some(start), Some(ids)) = (start, ids) else {
                return Err(DocError::BadRequest(
                    "_revisions needs start and ids".into(),
                ));
            };
            let ok = start == parsed.generation
                && ids.first().and_then(Value::as_str) == Some(parsed.hash.as_str())
                && ids.len() as u64 <= start
                && ids
                    .iter()
                    .all(|i| i.as_str().is_some_and(|s| !s.is_empty()));
            if !ok {
                return Err(DocError::BadRequest(
                    "_revisions does not match _rev".into(),
                ));
            }
            ids.iter()
                .enumerate()
                .map(|(i, h)| format!("{}-{}", start - i as u64, h.as_str().unwrap_or("")))
                .collect()
        }
    };
    if tree.contains(&rev) {
        return Ok(Written::Known(rev));
    }
    let deleted = is_deleted(&doc);
    let mut body = body_of(doc)?;
    // Stubs refer to an attachment some stored revision has.
    let known: Vec<&Map<String, Value>> = tree
        .nodes
        .values()
        .filter_map(|n| attachments_of(&n.body))
        .collect();
    settle_attachments(id, &mut body, &known, parsed.generation, blobs)?;
    tree.merge_path(&path, deleted, body);
    Ok(Written::New(rev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;
    use serde_json::json;

    fn write(id: &str, doc: Value) -> DocWrite {
        DocWrite {
            id: id.into(),
            doc: doc.as_object().unwrap().clone(),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.create_db("db").unwrap();
        (d, s)
    }

    #[test]
    fn database_names_follow_couchdb() {
        for ok in ["a", "a1_$()+-/", "z/x"] {
            assert!(is_valid_db_name(ok), "{ok}");
        }
        for bad in ["", "A", "1a", "_users", "a b", "a.b", "ä"] {
            assert!(!is_valid_db_name(bad), "{bad}");
        }
    }

    #[test]
    fn edits_check_the_rev_and_count_documents() {
        let (_d, s) = open();
        let r = s
            .write_docs("db", vec![write("a", json!({"v": 1}))], true)
            .unwrap();
        let r1 = r[0].clone().unwrap();
        // No _rev over a live document, or a stale one: conflict.
        let r = s
            .write_docs(
                "db",
                vec![
                    write("a", json!({"v": 2})),
                    write("a", json!({"_rev": "1-nothere", "v": 2})),
                    write("a", json!({"_rev": r1, "v": 2})),
                    write("b", json!({"_bad": 1})),
                ],
                true,
            )
            .unwrap();
        assert_eq!(r[0], Err(DocError::Conflict));
        assert_eq!(r[1], Err(DocError::Conflict));
        let r2 = r[2].clone().unwrap();
        assert!(r2.starts_with("2-"));
        assert_eq!(r[3], Err(DocError::Validation("_bad".into())));
        let m = s.db_meta("db").unwrap();
        assert_eq!((m.update_seq, m.doc_count, m.doc_del_count), (2, 1, 0));
        let del = s
            .write_docs(
                "db",
                vec![write("a", json!({"_rev": r2, "_deleted": true}))],
                true,
            )
            .unwrap();
        assert!(del[0].clone().unwrap().starts_with("3-"));
        let m = s.db_meta("db").unwrap();
        assert_eq!((m.update_seq, m.doc_count, m.doc_del_count), (3, 0, 1));
        // Made again on top of its deletion.
        let again = s
            .write_docs("db", vec![write("a", json!({"v": 3}))], true)
            .unwrap();
        assert!(again[0].clone().unwrap().starts_with("4-"));
        // One row per document in the changes, at its last sequence.
        let rd = s.reader("db").unwrap();
        let mut seen = Vec::new();
        rd.changes(0, false, |seq, id| {
            seen.push((seq, id.to_owned()));
            Ok(ControlFlow::Continue(()))
        })
        .unwrap();
        assert_eq!(seen, vec![(4, "a".to_owned())]);
    }

    #[test]
    fn attachments_are_stored_once_and_freed_with_the_last_user() {
        let (_d, s) = open();
        let data = base64::engine::general_purpose::STANDARD.encode(b"hello");
        let att = json!({"t.txt": {"content_type": "text/plain", "data": data}});
        let r = s
            .write_docs(
                "db",
                vec![
                    write("a", json!({"_attachments": att})),
                    write("b", json!({"_attachments": att})),
                ],
                true,
            )
            .unwrap();
        let d = digest(b"hello");
        assert_eq!(d, "md5-XUFAKrxLKna5cZ2REBfFkg==");
        let rd = s.reader("db").unwrap();
        let a = rd.doc("a").unwrap().unwrap();
        let w = a.tree.winner().unwrap().to_owned();
        assert_eq!(
            a.tree.node(&w).unwrap().body.as_ref().unwrap()["_attachments"],
            json!({"t.txt": {"content_type": "text/plain", "digest": d, "length": 5, "revpos": 1, "stub": true}})
        );
        assert_eq!(rd.attachment(&d).unwrap().unwrap(), b"hello");
        drop(rd);
        // A stub keeps it; a missing stub is refused.
        let ra = r[0].clone().unwrap();
        let stub = json!({"t.txt": {"stub": true}});
        let r2 = s
            .write_docs(
                "db",
                vec![
                    write("a", json!({"_rev": ra, "_attachments": stub, "x": 1})),
                    write("b", json!({"_rev": r[1].clone().unwrap(), "_attachments": {"nope": {"stub": true}}})),
                ],
                true,
            )
            .unwrap();
        assert!(r2[0].is_ok());
        assert_eq!(r2[1], Err(DocError::MissingStub("b".into(), "nope".into())));
        s.delete_db("db").unwrap();
        let tx = s.db.begin_read().unwrap();
        assert_eq!(tx.open_table(ATTS).unwrap().len().unwrap(), 0);
        assert_eq!(tx.open_table(ATT_REFS).unwrap().len().unwrap(), 0);
    }

    #[test]
    fn replicated_paths_merge_and_make_conflicts() {
        let (_d, s) = open();
        let docs = vec![
            write(
                "a",
                json!({"_rev": "2-b", "_revisions": {"start": 2, "ids": ["b", "a"]}, "v": "b"}),
            ),
            write(
                "a",
                json!({"_rev": "2-c", "_revisions": {"start": 2, "ids": ["c", "a"]}, "v": "c"}),
            ),
            write("a", json!({"_rev": "2-c", "v": "again"})),
            write(
                "a",
                json!({"_rev": "3-x", "_revisions": {"start": 3, "ids": ["y"]}}),
            ),
        ];
        let r = s.write_docs("db", docs, false).unwrap();
        assert_eq!(r[0], Ok("2-b".into()));
        assert_eq!(r[1], Ok("2-c".into()));
        assert_eq!(r[2], Ok("2-c".into()), "already known is not an error");
        assert!(matches!(r[3], Err(DocError::BadRequest(_))));
        let rd = s.reader("db").unwrap();
        let a = rd.doc("a").unwrap().unwrap();
        assert_eq!(a.tree.winner(), Some("2-c"));
        assert_eq!(a.tree.conflicts(), vec!["2-b"]);
        assert_eq!(a.tree.node("2-c").unwrap().body.as_ref().unwrap()["v"], "c");
        assert_eq!(rd.meta.update_seq, 2, "the known revision made no change");
    }

    #[test]
    fn compaction_stems_in_batches_keeps_leaves_and_sweeps_unused_contents() {
        let (_d, s) = open();
        let mut revs = Vec::new();
        for id in ["a", "b", "c"] {
            let mut rev = s
                .write_docs("db", vec![write(id, json!({"v": 0}))], true)
                .unwrap()[0]
                .clone()
                .unwrap();
            for i in 1..6 {
                rev = s
                    .write_docs("db", vec![write(id, json!({"_rev": rev, "v": i}))], true)
                    .unwrap()[0]
                    .clone()
                    .unwrap();
            }
            revs.push(rev);
        }
        s.set_revs_limit("db", 2).unwrap();
        // Two documents per batch: two batches, the second says done.
        let first = s.compact_batch("db", None, 2).unwrap();
        assert_eq!(
            first,
            Compacted {
                revs: 8,
                next: Some("b".into())
            }
        );
        let second = s.compact_batch("db", first.next.as_deref(), 2).unwrap();
        assert_eq!(
            second,
            Compacted {
                revs: 4,
                next: None
            }
        );
        let rd = s.reader("db").unwrap();
        for (id, rev) in ["a", "b", "c"].iter().zip(&revs) {
            let t = rd.doc(id).unwrap().unwrap().tree;
            assert_eq!(t.winner(), Some(rev.as_str()));
            assert_eq!(t.path(rev).len(), 2, "{id}");
        }
        drop(rd);
        assert_eq!(
            s.compact_batch("db", None, 10).unwrap().revs,
            0,
            "nothing left to stem"
        );
        // Content nobody counts any more goes with the sweep; counted stays.
        let data = base64::engine::general_purpose::STANDARD.encode(b"kept");
        s.write_docs(
            "db",
            vec![write("k", json!({"_attachments": {"k": {"data": data}}}))],
            true,
        )
        .unwrap();
        let tx = s.db.begin_write().unwrap();
        tx.open_table(ATTS)
            .unwrap()
            .insert("md5-orphan", b"x".as_slice())
            .unwrap();
        tx.commit().unwrap();
        assert_eq!(s.sweep_attachments(None, 10).unwrap(), (1, None));
        let rd = s.reader("db").unwrap();
        assert!(rd.attachment("md5-orphan").unwrap().is_none());
        assert_eq!(rd.attachment(&digest(b"kept")).unwrap().unwrap(), b"kept");
    }

    #[test]
    fn cors_origins_are_kept() {
        let (d, s) = open();
        assert!(s.cors_origins().unwrap().is_empty());
        s.set_cors_origins(&["https://a.example".into()]).unwrap();
        drop(s);
        let s = Store::open(d.path()).unwrap();
        assert_eq!(
            s.cors_origins().unwrap(),
            vec!["https://a.example".to_owned()]
        );
    }

    #[test]
    fn local_docs_have_counter_revs_and_conflicts() {
        let (_d, s) = open();
        let b = Map::new();
        assert_eq!(
            s.put_local("db", "cp", None, b.clone(), false).unwrap(),
            Ok("0-1".into())
        );
        assert_eq!(
            s.put_local("db", "cp", Some("0-1"), b.clone(), false)
                .unwrap(),
            Ok("0-2".into())
        );
        assert_eq!(
            s.put_local("db", "cp", Some("0-1"), b.clone(), false)
                .unwrap(),
            Err(DocError::Conflict)
        );
        assert_eq!(
            s.put_local("db", "cp", Some("0-2"), b, true).unwrap(),
            Ok("0-0".into())
        );
        assert!(s.reader("db").unwrap().local("cp").unwrap().is_none());
        assert_eq!(s.db_meta("db").unwrap().update_seq, 0, "never a change");
    }
}
