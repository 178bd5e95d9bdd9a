//! File and folder metadata in redb, over the blob store.
//!
//! Tables: `entries` maps a normalized path ("" is the root, "a/b.txt") to
//! its [`Entry`]; `refs` counts how many entries use each blob; `counters`
//! holds the bytes the stored blobs take ("used") and the box's quota
//! ("quota", absent when there is none); `inline` holds small contents (see
//! [`crate::blobs::INLINE_MAX`]) by hash, written with the entry that first
//! uses them and deleted with the last. Every change
//! is one redb write transaction (durable at commit). Blobs whose count falls
//! to zero are deleted after the commit; a crash in between leaves an
//! unreferenced blob, which [`Store::open`] sweeps away. So a file is either
//! there whole (metadata and content) or not at all.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::blobs::{BlobError, BlobId, BlobStore, Stored, Upload};
use crate::path::{normalize, parent, PathError};

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const REFS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("refs");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const INLINE: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("inline");
const USED: &str = "used";
const QUOTA: &str = "quota";
/// Bytes of dead properties on all entries (counted in [`Store::used`]).
const PROPS: &str = "props";
/// The metadata database's page cache: enough for the hot part of a large
/// tree, small beside a 1 GiB box's memory.
pub const CACHE_BYTES: usize = 16 << 20;
/// Most dead properties on one entry.
pub const MAX_PROPS: usize = 64;
/// Most bytes of dead properties on one entry (names and values).
pub const MAX_PROPS_BYTES: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Dir,
    File {
        size: u64,
        blob: [u8; 32],
        content_type: String,
    },
}

/// A file's content, as [`Store::content`] finds it.
pub enum Content {
    Inline(Vec<u8>),
    File(std::fs::File),
}

/// A dead property a client set with PROPPATCH, kept with its entry (so it
/// moves and copies with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prop {
    pub namespace: Option<String>,
    pub prefix: Option<String>,
    pub name: String,
    /// The property element as the client sent it, XML.
    pub xml: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// Seconds since the epoch.
    pub mtime: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub props: Vec<Prop>,
}

impl Entry {
    /// Bytes its dead properties take (names and values).
    pub fn props_bytes(&self) -> u64 {
        self.props
            .iter()
            .map(|p| {
                (p.name.len()
                    + p.xml.len()
                    + p.namespace.as_ref().map_or(0, String::len)
                    + p.prefix.as_ref().map_or(0, String::len)) as u64
            })
            .sum()
    }

    /// A strong ETag: the content hash for files, the path's mtime for folders.
    pub fn etag(&self) -> String {
        match &self.kind {
            Kind::File { blob, .. } => format!("\"{}\"", &BlobId(*blob).hex()[..32]),
            Kind::Dir => format!("\"d{:x}\"", self.mtime),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// the path is not acceptable
    #[error(transparent)]
    Path(#[from] PathError),
    /// the blob store failed
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// the metadata database failed
    #[error("metadata database: {0}")]
    Db(#[from] redb::Error),
    /// nothing at that path
    #[error("{0:?} does not exist")]
    NotFound(String),
    /// the parent folder is missing or is a file
    #[error("the folder holding {0:?} does not exist")]
    NoParent(String),
    /// something is already there
    #[error("{0:?} already exists")]
    Exists(String),
    /// a folder where a file was expected, or the other way round
    #[error("{0:?} is a folder")]
    IsDir(String),
    /// a folder cannot be moved or copied into itself
    #[error("{0:?} cannot go inside itself")]
    IntoItself(String),
    /// a file or folder cannot replace a folder that holds it
    #[error("{0:?} cannot replace a folder it is in")]
    OntoAncestor(String),
    /// a bug: the change was not made
    #[error("internal error: {0}")]
    Internal(String),
    /// storing this would pass the box's quota
    #[error("the quota of {quota} bytes would be passed ({used} used, {more} more)")]
    OverQuota { quota: u64, used: u64, more: u64 },
    /// an entry may carry only so many dead properties
    #[error(
        "{0:?} would have more than {MAX_PROPS} properties or {MAX_PROPS_BYTES} bytes of them"
    )]
    TooManyProps(String),
}

impl StoreError {
    /// True when the disk itself is full (ENOSPC/EDQUOT) somewhere below.
    pub fn disk_full(&self) -> bool {
        let io = match self {
            StoreError::Blob(BlobError::Io { source, .. }) => Some(source),
            StoreError::Db(redb::Error::Io(e)) => Some(e),
            _ => None,
        };
        io.and_then(|e| e.raw_os_error())
            .is_some_and(|n| n == nix::libc::ENOSPC || n == nix::libc::EDQUOT)
    }
}

fn dberr<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

fn encode(e: &Entry) -> Vec<u8> {
    serde_json::to_vec(e).unwrap_or_default()
}

fn decode(b: &[u8]) -> Option<Entry> {
    serde_json::from_slice(b).ok()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct Store {
    db: Database,
    pub blobs: BlobStore,
    /// Held (shared) from storing an upload's blob until its reference is
    /// committed; held alone to delete blobs.
    gate: RwLock<()>,
    group: Group,
}

/// A change to the metadata, run in a write transaction; it may run twice
/// (in a group that fails, then alone), so it must not consume what it captures.
type Op = Arc<dyn Fn(&mut Tx<'_>) -> OpResult + Send + Sync>;
/// What a change gives back: the entry it wrote, for those that write one.
type OpResult = Result<Option<Entry>, StoreError>;

#[derive(Default)]
struct Group {
    state: Mutex<GroupState>,
    wake: Condvar,
}

impl Group {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct GroupState {
    queue: Vec<(u64, Op)>,
    /// A caller is running a group right now.
    leading: bool,
    next: u64,
    done: HashMap<u64, OpResult>,
}

type Entries<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type Refs<'t> = redb::Table<'t, &'static [u8; 32], u64>;
type Counters<'t> = redb::Table<'t, &'static str, u64>;
type Inline<'t> = redb::Table<'t, &'static [u8; 32], &'static [u8]>;

/// The tables of one write transaction, and the blobs it frees.
struct Tx<'t> {
    entries: Entries<'t>,
    refs: Refs<'t>,
    counters: Counters<'t>,
    inline: Inline<'t>,
    freed: Vec<BlobId>,
}

impl Tx<'_> {
    fn counter(&self, name: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.counters.get(name).map_err(dberr)?.map(|g| g.value()))
    }

    /// Adds `delta` to the count of a blob of `size` bytes, keeping the
    /// bytes used in step; a blob that reaches zero is freed after the
    /// commit, one that comes back to life in the same change is kept.
    fn adjust(&mut self, blob: &[u8; 32], size: u64, delta: i64) -> Result<(), StoreError> {
        let old = self
            .refs
            .get(blob)
            .map_err(dberr)?
            .map(|g| g.value())
            .unwrap_or(0);
        let new = (old as i64 + delta).max(0) as u64;
        if new == 0 {
            self.refs.remove(blob).map_err(dberr)?;
            self.freed.push(BlobId(*blob));
        } else {
            self.refs.insert(blob, new).map_err(dberr)?;
            self.freed.retain(|f| f.0 != *blob);
        }
        // The byte count moves only when a content appears or goes.
        if (old == 0) != (new == 0) {
            let used = self.counter(USED)?.unwrap_or(0);
            let used = if new > 0 {
                used.saturating_add(size)
            } else {
                used.saturating_sub(size)
            };
            self.counters.insert(USED, used).map_err(dberr)?;
        }
        Ok(())
    }

    /// Releases (`delta` -1) or adds (+1) a reference for each file in
    /// `entry`, and its dead properties' bytes.
    fn reference(&mut self, entry: &Entry, delta: i64) -> Result<(), StoreError> {
        if let Kind::File { blob, size, .. } = &entry.kind {
            self.adjust(blob, *size, delta)?;
        }
        let bytes = entry.props_bytes();
        if bytes > 0 {
            self.adjust_props(bytes, delta > 0)?;
        }
        Ok(())
    }

    fn adjust_props(&mut self, bytes: u64, add: bool) -> Result<(), StoreError> {
        let now = self.counter(PROPS)?.unwrap_or(0);
        let new = if add {
            now.saturating_add(bytes)
        } else {
            now.saturating_sub(bytes)
        };
        self.counters.insert(PROPS, new).map_err(dberr)?;
        Ok(())
    }
}

fn get<T: ReadableTable<&'static str, &'static [u8]>>(
    entries: &T,
    path: &str,
) -> Result<Option<Entry>, StoreError> {
    Ok(entries
        .get(path)
        .map_err(dberr)?
        .and_then(|g| decode(g.value())))
}

/// Paths under `dir` ("" for everything), dir itself excluded.
fn descendants<T: ReadableTable<&'static str, &'static [u8]>>(
    entries: &T,
    dir: &str,
) -> Result<Vec<(String, Entry)>, StoreError> {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut out = Vec::new();
    for item in entries.range(prefix.as_str()..).map_err(dberr)? {
        let (k, v) = item.map_err(dberr)?;
        let key = k.value();
        if !key.starts_with(&prefix) {
            break;
        }
        if key.is_empty() {
            continue;
        }
        if let Some(e) = decode(v.value()) {
            out.push((key.to_owned(), e));
        }
    }
    Ok(out)
}

/// Small contents nothing references any more go with the transaction; the
/// rest of `tx.freed` are files, deleted after the commit.
fn drop_inline(tx: &mut Tx<'_>) -> Result<(), StoreError> {
    let mut files = Vec::new();
    for b in std::mem::take(&mut tx.freed) {
        if tx.refs.get(&b.0).map_err(dberr)?.is_some() {
            continue;
        }
        if tx.inline.remove(&b.0).map_err(dberr)?.is_none() {
            files.push(b);
        }
    }
    tx.freed = files;
    Ok(())
}

/// Removes `path` (whose entry is `entry`) and everything under it, releasing their blobs.
fn remove_tree(tx: &mut Tx<'_>, path: &str, entry: Entry) -> Result<(), StoreError> {
    let mut gone = vec![(path.to_owned(), entry)];
    gone.extend(descendants(&tx.entries, path)?);
    for (p, e) in gone {
        tx.reference(&e, -1)?;
        tx.entries.remove(p.as_str()).map_err(dberr)?;
    }
    Ok(())
}

fn put_entry(tx: &mut Tx<'_>, path: &str, e: &Entry) -> Result<(), StoreError> {
    tx.entries
        .insert(path, encode(e).as_slice())
        .map_err(dberr)?;
    Ok(())
}

/// The folder's mtime moves when its members change (and with it its ETag).
fn touch_parent(tx: &mut Tx<'_>, path: &str) -> Result<(), StoreError> {
    let dir = parent(path).to_owned();
    if let Some(mut e) = get(&tx.entries, &dir)? {
        e.mtime = now();
        put_entry(tx, &dir, &e)?;
    }
    Ok(())
}

fn require_parent(entries: &Entries<'_>, path: &str) -> Result<(), StoreError> {
    match get(entries, parent(path))? {
        Some(Entry {
            kind: Kind::Dir, ..
        }) => Ok(()),
        _ => Err(StoreError::NoParent(path.to_owned())),
    }
}

fn dir_entry() -> Entry {
    Entry {
        kind: Kind::Dir,
        mtime: now(),
        props: Vec::new(),
    }
}

/// A dead property's key: its namespace and name.
fn same_prop(a: &Prop, namespace: &Option<String>, name: &str) -> bool {
    a.namespace == *namespace && a.name == name
}

impl Store {
    /// Opens the store in `dir` (metadata.redb and the blob store), making the
    /// root folder on first use and sweeping blobs no entry uses.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| BlobError::Io {
            what: "creating",
            path: dir.to_owned(),
            source,
        })?;
        // redb's default cache is 1 GiB: most of a small box's memory.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join("metadata.redb"))
            .map_err(dberr)?;
        let blobs = BlobStore::open(dir)?;
        let s = Store {
            db,
            blobs,
            gate: RwLock::new(()),
            group: Group::default(),
        };
        s.txn(|tx| {
            if get(&tx.entries, "")?.is_none() {
                put_entry(tx, "", &dir_entry())?;
            }
            if tx.counter(USED)?.is_none() {
                // A store from before the counter: count what the blobs hold.
                let mut used = 0u64;
                for item in tx.refs.iter().map_err(dberr)? {
                    let (k, _) = item.map_err(dberr)?;
                    let p = s.blobs.path(&BlobId(*k.value()));
                    used += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                }
                tx.counters.insert(USED, used).map_err(dberr)?;
            }
            Ok(())
        })?;
        s.sweep()?;
        Ok(s)
    }

    /// Deletes blobs that no entry references (left by a crash between a
    /// commit and the deletes that follow it, or by an unacknowledged write).
    pub fn sweep(&self) -> Result<usize, StoreError> {
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_read().map_err(dberr)?;
        let refs = txn.open_table(REFS).map_err(dberr)?;
        let mut n = 0;
        for id in self.blobs.list()? {
            if refs.get(&id.0).map_err(dberr)?.is_none() {
                self.blobs.remove(&id)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub fn get(&self, path: &str) -> Result<Option<Entry>, StoreError> {
        let path = normalize(path)?;
        let txn = self.db.begin_read().map_err(dberr)?;
        let entries = txn.open_table(ENTRIES).map_err(dberr)?;
        get(&entries, &path)
    }

    /// Direct children of a folder, by name. Costs what the folder holds,
    /// not what is below it: keys sort so that a child's subtree ("a/...")
    /// lies between "a/" and "a0" ('0' follows '/'), and the scan jumps over
    /// each subtree instead of reading it.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let dir = normalize(dir)?;
        let txn = self.db.begin_read().map_err(dberr)?;
        let entries = txn.open_table(ENTRIES).map_err(dberr)?;
        match get(&entries, &dir)? {
            Some(Entry {
                kind: Kind::Dir, ..
            }) => {}
            Some(_) => return Err(StoreError::IsDir(dir)),
            None => return Err(StoreError::NotFound(dir)),
        }
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut out = Vec::new();
        let mut from = prefix.clone();
        'seek: loop {
            for item in entries.range(from.as_str()..).map_err(dberr)? {
                let (k, v) = item.map_err(dberr)?;
                let key = k.value();
                let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                    break 'seek;
                };
                if rest.is_empty() {
                    continue;
                }
                match rest.split_once('/') {
                    // Below a child: skip the child's whole subtree.
                    Some((child, _)) => {
                        from = format!("{prefix}{child}0");
                        continue 'seek;
                    }
                    None => {
                        if let Some(e) = decode(v.value()) {
                            out.push((rest.to_owned(), e));
                        }
                    }
                }
            }
            break;
        }
        Ok(out)
    }

    /// Whether a folder has anything in it (one look-up, whatever its size).
    pub fn has_children(&self, dir: &str) -> Result<bool, StoreError> {
        let dir = normalize(dir)?;
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let txn = self.db.begin_read().map_err(dberr)?;
        let entries = txn.open_table(ENTRIES).map_err(dberr)?;
        for item in entries.range(prefix.as_str()..).map_err(dberr)? {
            let (k, _) = item.map_err(dberr)?;
            let k = k.value();
            if k.is_empty() {
                continue;
            }
            return Ok(k.starts_with(&prefix));
        }
        Ok(false)
    }

    /// Makes an empty folder at `path`; with `replace`, whatever is there
    /// goes in the same transaction (COPY of a folder at Depth 0).
    pub fn replace_with_dir(&self, path: &str, replace: bool) -> Result<(), StoreError> {
        let path = normalize(path)?;
        if path.is_empty() {
            return Err(StoreError::IsDir(path));
        }
        self.change(move |tx| {
            if let Some(old) = get(&tx.entries, &path)? {
                if !replace {
                    return Err(StoreError::Exists(path.clone()));
                }
                remove_tree(tx, &path, old)?;
            }
            require_parent(&tx.entries, &path)?;
            put_entry(tx, &path, &dir_entry())?;
            touch_parent(tx, &path)?;
            Ok(None)
        })
        .map(drop)
    }

    pub fn mkdir(&self, path: &str) -> Result<(), StoreError> {
        let path = normalize(path)?;
        self.change(move |tx| {
            if get(&tx.entries, &path)?.is_some() {
                return Err(StoreError::Exists(path.clone()));
            }
            require_parent(&tx.entries, &path)?;
            put_entry(tx, &path, &dir_entry())?;
            touch_parent(tx, &path)?;
            Ok(None)
        })
        .map(drop)
    }

    /// Starts writing a file's content (see [`Store::put`]).
    pub fn begin(&self) -> Result<Upload, StoreError> {
        Ok(self.blobs.begin()?)
    }

    /// Makes `up` the content of `path` (replacing a file there, keeping its
    /// properties). Returns once both content and metadata are durable: the
    /// write is acknowledged. Refused, with nothing stored, when it would
    /// pass the quota.
    pub fn put(&self, path: &str, up: Upload, content_type: &str) -> Result<Entry, StoreError> {
        let path = normalize(path)?;
        if path.is_empty() {
            return Err(StoreError::IsDir(path));
        }
        // Between storing the content and referencing it, no blob may be
        // deleted: an identical blob found in place must still be there when
        // the reference lands.
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let (id, size, stored) = self.blobs.commit(up)?;
        let inline = match stored {
            Stored::Inline(bytes) => Some(Arc::new(bytes)),
            Stored::File => None,
        };
        let entry = Entry {
            kind: Kind::File {
                size,
                blob: id.0,
                content_type: content_type.to_owned(),
            },
            mtime: now(),
            props: Vec::new(),
        };
        let (r, freed) = self.write(Arc::new(move |tx: &mut Tx<'_>| {
            let mut entry = entry.clone();
            require_parent(&tx.entries, &path)?;
            let old = get(&tx.entries, &path)?;
            if let Some(old) = &old {
                if old.kind == Kind::Dir {
                    return Err(StoreError::IsDir(path.clone()));
                }
                entry.props = old.props.clone();
                tx.reference(old, -1)?;
            }
            let before = tx.counter(USED)?.unwrap_or(0);
            tx.reference(&entry, 1)?;
            let after = tx.counter(USED)?.unwrap_or(0);
            if let Some(bytes) = &inline {
                if tx.inline.get(&id.0).map_err(dberr)?.is_none() {
                    tx.inline.insert(&id.0, bytes.as_slice()).map_err(dberr)?;
                }
            }
            if let Some(quota) = tx.counter(QUOTA)? {
                // Dead properties count against the quota as contents do.
                let props = tx.counter(PROPS)?.unwrap_or(0);
                if after.saturating_add(props) > quota && after > before {
                    return Err(StoreError::OverQuota {
                        quota,
                        used: before.saturating_add(props),
                        more: after - before,
                    });
                }
            }
            put_entry(tx, &path, &entry)?;
            if old.is_none() {
                touch_parent(tx, &path)?;
            }
            Ok(Some(entry))
        }));
        drop(gate);
        self.release(freed)?;
        match r {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(StoreError::NotFound(String::new())),
            Err(e) => {
                // Not referenced: drop it unless another entry uses the same content.
                self.release(vec![id])?;
                Err(e)
            }
        }
    }

    /// Makes an empty file at `path` if nothing is there (a LOCK on an
    /// unmapped URL). Returns whether it made one.
    pub fn create_empty(&self, path: &str, content_type: &str) -> Result<bool, StoreError> {
        let path = normalize(path)?;
        if self.get(&path)?.is_some() {
            return Ok(false);
        }
        let up = self.begin()?;
        self.put(&path, up, content_type).map(|_| true)
    }

    /// Removes a file, or a folder with everything in it.
    pub fn remove(&self, path: &str) -> Result<(), StoreError> {
        let path = normalize(path)?;
        if path.is_empty() {
            return Err(StoreError::IsDir(path));
        }
        self.change(move |tx| {
            let Some(e) = get(&tx.entries, &path)? else {
                return Err(StoreError::NotFound(path.clone()));
            };
            remove_tree(tx, &path, e)?;
            touch_parent(tx, &path)?;
            Ok(None)
        })
        .map(drop)
    }

    /// Copies (`keep = true`) or moves `from` to `to`. With `overwrite`, what
    /// is at `to` is replaced; otherwise that is an error. Content is shared,
    /// not duplicated, so a copy takes no space.
    pub fn transfer(
        &self,
        from: &str,
        to: &str,
        overwrite: bool,
        keep: bool,
    ) -> Result<(), StoreError> {
        let from = normalize(from)?;
        let to = normalize(to)?;
        if from.is_empty() || to.is_empty() {
            return Err(StoreError::IsDir(String::new()));
        }
        if to == from || to.starts_with(&format!("{from}/")) {
            return Err(StoreError::IntoItself(from));
        }
        // Onto a folder that holds the source: replacing it would delete the
        // source first (and lose it).
        if from.starts_with(&format!("{to}/")) {
            return Err(StoreError::OntoAncestor(from));
        }
        self.change(move |tx| {
            let Some(src) = get(&tx.entries, &from)? else {
                return Err(StoreError::NotFound(from.clone()));
            };
            let before = tx.counter(USED)?.unwrap_or(0) + tx.counter(PROPS)?.unwrap_or(0);
            require_parent(&tx.entries, &to)?;
            if let Some(old) = get(&tx.entries, &to)? {
                if !overwrite {
                    return Err(StoreError::Exists(to.clone()));
                }
                remove_tree(tx, &to, old)?;
            }
            let mut items = vec![(from.clone(), src)];
            items.extend(descendants(&tx.entries, &from)?);
            for (p, e) in items {
                let dest = format!("{to}{}", &p[from.len()..]);
                if dest.len() > crate::path::MAX_PATH {
                    return Err(StoreError::Path(PathError::TooLong(
                        dest.chars().take(64).collect(),
                    )));
                }
                if keep {
                    tx.reference(&e, 1)?;
                } else {
                    tx.entries.remove(p.as_str()).map_err(dberr)?;
                }
                put_entry(tx, &dest, &e)?;
            }
            // A copy shares contents but not dead properties: those count.
            let after = tx.counter(USED)?.unwrap_or(0) + tx.counter(PROPS)?.unwrap_or(0);
            if let Some(quota) = tx.counter(QUOTA)? {
                if after > quota && after > before {
                    return Err(StoreError::OverQuota {
                        quota,
                        used: before,
                        more: after - before,
                    });
                }
            }
            touch_parent(tx, &to)?;
            if !keep {
                touch_parent(tx, &from)?;
            }
            Ok(None)
        })
        .map(drop)
    }

    /// Sets (`true`) or removes (`false`) dead properties of `path`, all
    /// or nothing.
    pub fn patch_props(&self, path: &str, patch: Vec<(bool, Prop)>) -> Result<(), StoreError> {
        let path = normalize(path)?;
        self.change(move |tx| {
            let Some(mut e) = get(&tx.entries, &path)? else {
                return Err(StoreError::NotFound(path.clone()));
            };
            let before = e.props_bytes();
            let count_before = e.props.len();
            for (set, p) in &patch {
                e.props.retain(|q| !same_prop(q, &p.namespace, &p.name));
                if *set {
                    e.props.push(p.clone());
                }
            }
            let after = e.props_bytes();
            if (e.props.len() > MAX_PROPS && e.props.len() > count_before)
                || (after > MAX_PROPS_BYTES && after > before)
            {
                return Err(StoreError::TooManyProps(path.clone()));
            }
            if after > before {
                let used = tx.counter(USED)?.unwrap_or(0) + tx.counter(PROPS)?.unwrap_or(0);
                if let Some(quota) = tx.counter(QUOTA)? {
                    if used + (after - before) > quota {
                        return Err(StoreError::OverQuota {
                            quota,
                            used,
                            more: after - before,
                        });
                    }
                }
                tx.adjust_props(after - before, true)?;
            } else {
                tx.adjust_props(before - after, false)?;
            }
            put_entry(tx, &path, &e)?;
            Ok(None)
        })
        .map(drop)
    }

    /// A file's content: small ones from the database, others as their blob file.
    pub fn content(&self, blob: &BlobId) -> Result<Content, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let inline = txn.open_table(INLINE).map_err(dberr)?;
        if let Some(v) = inline.get(&blob.0).map_err(dberr)? {
            return Ok(Content::Inline(v.value().to_vec()));
        }
        Ok(Content::File(self.blobs.open_blob(blob)?))
    }

    /// Every content stored, inline or as a file (for consistency checks).
    pub fn stored_blobs(&self) -> Result<Vec<BlobId>, StoreError> {
        let mut out = self.blobs.list()?;
        let txn = self.db.begin_read().map_err(dberr)?;
        let inline = txn.open_table(INLINE).map_err(dberr)?;
        for item in inline.iter().map_err(dberr)? {
            let (k, _) = item.map_err(dberr)?;
            out.push(BlobId(*k.value()));
        }
        out.sort();
        Ok(out)
    }

    /// Bytes the stored content takes (each distinct content counted
    /// once), and the dead properties.
    pub fn used(&self) -> Result<u64, StoreError> {
        let content = self.counter(USED)?.unwrap_or(0);
        Ok(content.saturating_add(self.counter(PROPS)?.unwrap_or(0)))
    }

    /// The box's quota in bytes, if one is set.
    pub fn quota(&self) -> Result<Option<u64>, StoreError> {
        self.counter(QUOTA)
    }

    /// Sets (or with `None` lifts) the quota. Content already stored stays
    /// even when it is over the new quota; only new content is refused.
    pub fn set_quota(&self, quota: Option<u64>) -> Result<(), StoreError> {
        self.change(move |tx| {
            match quota {
                Some(q) => tx.counters.insert(QUOTA, q).map(|_| ()),
                None => tx.counters.remove(QUOTA).map(|_| ()),
            }
            .map_err(dberr)?;
            Ok(None)
        })
        .map(drop)
    }

    fn counter(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let t = txn.open_table(COUNTERS).map_err(dberr)?;
        Ok(t.get(name).map_err(dberr)?.map(|g| g.value()))
    }

    /// Runs `op` as part of the next group commit and then deletes the
    /// blobs it freed.
    fn change<F>(&self, op: F) -> OpResult
    where
        F: Fn(&mut Tx<'_>) -> OpResult + Send + Sync + 'static,
    {
        let (r, freed) = self.write(Arc::new(op));
        self.release(freed)?;
        r
    }

    /// Group commit: changes from concurrent callers share one transaction
    /// (one fsync). The first caller to find no commit running leads: it
    /// takes every queued change, runs them in one transaction and commits;
    /// the others wait for their result. If any change in a group fails,
    /// the group is rolled back and each change runs alone, so one failure
    /// never affects another. Returns the change's result and, for the
    /// leader, the blobs its group freed (to [`Store::release`]).
    fn write(&self, op: Op) -> (OpResult, Vec<BlobId>) {
        let mut st = self.group.lock();
        let id = st.next;
        st.next += 1;
        st.queue.push((id, op));
        let mut freed = Vec::new();
        loop {
            if let Some(r) = st.done.remove(&id) {
                return (r, freed);
            }
            if st.leading {
                st = self.group.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.leading = true;
            let batch = std::mem::take(&mut st.queue);
            drop(st);
            // A change that panicked must not leave its group waiting forever.
            let ids: Vec<u64> = batch.iter().map(|(id, _)| *id).collect();
            let (results, f) =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_group(batch)))
                    .unwrap_or_else(|_| {
                        let failed = ids
                            .into_iter()
                            .map(|id| (id, Err(StoreError::Internal("a change panicked".into()))))
                            .collect();
                        (failed, Vec::new())
                    });
            freed.extend(f);
            st = self.group.lock();
            st.leading = false;
            st.done.extend(results);
            self.group.wake.notify_all();
        }
    }

    fn run_group(&self, batch: Vec<(u64, Op)>) -> (Vec<(u64, OpResult)>, Vec<BlobId>) {
        if batch.len() > 1 {
            let together = self.txn(|tx| {
                batch
                    .iter()
                    .map(|(id, op)| Ok((*id, op(tx)?)))
                    .collect::<Result<Vec<_>, StoreError>>()
            });
            if let Ok((outs, freed)) = together {
                return (outs.into_iter().map(|(id, o)| (id, Ok(o))).collect(), freed);
            }
        }
        let mut freed = Vec::new();
        let results = batch
            .into_iter()
            .map(|(id, op)| match self.txn(|tx| op(tx)) {
                Ok((out, f)) => {
                    freed.extend(f);
                    (id, Ok(out))
                }
                Err(e) => (id, Err(e)),
            })
            .collect();
        (results, freed)
    }

    /// Runs `f` in one write transaction and commits it (durably); returns
    /// its result and the blobs it left unreferenced.
    fn txn<T, F>(&self, f: F) -> Result<(T, Vec<BlobId>), StoreError>
    where
        F: FnOnce(&mut Tx<'_>) -> Result<T, StoreError>,
    {
        let txn = self.db.begin_write().map_err(dberr)?;
        let (out, freed) = {
            let mut tx = Tx {
                entries: txn.open_table(ENTRIES).map_err(dberr)?,
                refs: txn.open_table(REFS).map_err(dberr)?,
                counters: txn.open_table(COUNTERS).map_err(dberr)?,
                inline: txn.open_table(INLINE).map_err(dberr)?,
                freed: Vec::new(),
            };
            match f(&mut tx).and_then(|out| Ok((out, drop_inline(&mut tx)?))) {
                Ok((out, ())) => (out, tx.freed),
                Err(e) => {
                    drop(tx);
                    let _ = txn.abort();
                    return Err(e);
                }
            }
        };
        txn.commit().map_err(dberr)?;
        Ok((out, freed))
    }

    /// Deletes those of `blobs` that no entry references, with no upload
    /// between storing and referencing its content (which might be one of them).
    fn release(&self, mut blobs: Vec<BlobId>) -> Result<(), StoreError> {
        if blobs.is_empty() {
            return Ok(());
        }
        blobs.sort();
        blobs.dedup();
        let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_read().map_err(dberr)?;
        let refs = txn.open_table(REFS).map_err(dberr)?;
        for b in blobs {
            if refs.get(&b.0).map_err(dberr)?.is_none() {
                self.blobs.remove(&b)?;
            }
        }
        Ok(())
    }

    /// (blobs referenced, reference total) — for consistency checks.
    pub fn refcounts(&self) -> Result<Vec<(BlobId, u64)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let refs = txn.open_table(REFS).map_err(dberr)?;
        let mut out = Vec::new();
        for item in refs.iter().map_err(dberr)? {
            let (k, v) = item.map_err(dberr)?;
            out.push((BlobId(*k.value()), v.value()));
        }
        Ok(out)
    }

    /// Every entry below the root: for checks and the model test.
    pub fn walk(&self) -> Result<Vec<(String, Entry)>, StoreError> {
        let txn = self.db.begin_read().map_err(dberr)?;
        let entries = txn.open_table(ENTRIES).map_err(dberr)?;
        descendants(&entries, "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_skips_subtrees_and_matches_a_full_scan() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        // Names whose bytes sort around '/' and '0', nested at several depths.
        for dir in [
            "a", "a/x", "a/x/y", "a0", "b", "b/a", "b/a b", "b/a/c", "b/a/c/d",
        ] {
            s.mkdir(dir).unwrap();
        }
        for f in [
            "a b",
            "a-",
            "a.txt",
            "a/x/f",
            "a/x/y/g",
            "a0/h",
            "b/a-",
            "b/a/c/d/e",
            "b/a0",
            "z",
        ] {
            let up = s.begin().unwrap();
            s.put(f, up, "text/plain").unwrap();
        }
        let all = s.walk().unwrap();
        for dir in [
            "", "a", "a/x", "a/x/y", "a0", "b", "b/a", "b/a/c", "b/a/c/d", "b/a b",
        ] {
            let mut want: Vec<String> = all
                .iter()
                .filter(|(p, _)| parent(p) == dir)
                .map(|(p, _)| p.rsplit('/').next().unwrap().to_owned())
                .collect();
            want.sort();
            let mut got: Vec<String> = s.list(dir).unwrap().into_iter().map(|(n, _)| n).collect();
            got.sort();
            assert_eq!(got, want, "listing {dir:?}");
            assert_eq!(s.has_children(dir).unwrap(), !want.is_empty(), "{dir:?}");
        }
    }

    #[test]
    fn a_panicking_change_fails_alone_and_nothing_hangs() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let r = s.change(|_| panic!("a bug in a change"));
        assert!(matches!(r, Err(StoreError::Internal(_))), "{r:?}");
        s.mkdir("after").unwrap();
        assert!(s.get("after").unwrap().is_some());
    }
}
