//! File and folder metadata in redb, over the blob store.
//!
//! Tables: `entries` maps a normalized path ("" is the root, "a/b.txt") to
//! its [`Entry`]; `refs` counts how many entries use each blob. Every change
//! is one redb write transaction (durable at commit). Blobs whose count falls
//! to zero are deleted after the commit; a crash in between leaves an
//! unreferenced blob, which [`Store::open`] sweeps away. So a file is either
//! there whole (metadata and content) or not at all.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::blobs::{BlobError, BlobId, BlobStore, Upload};
use crate::path::{normalize, parent, PathError};

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const REFS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("refs");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Dir,
    File {
        size: u64,
        blob: [u8; 32],
        content_type: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// Seconds since the epoch.
    pub mtime: u64,
}

impl Entry {
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
}

type Entries<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type Refs<'t> = redb::Table<'t, &'static [u8; 32], u64>;

/// Adds `delta` to a blob's count; returns the blobs that reached zero.
fn adjust(
    refs: &mut Refs<'_>,
    blob: &[u8; 32],
    delta: i64,
    freed: &mut Vec<BlobId>,
) -> Result<(), StoreError> {
    let old = refs
        .get(blob)
        .map_err(dberr)?
        .map(|g| g.value())
        .unwrap_or(0);
    let new = (old as i64 + delta).max(0) as u64;
    if new == 0 {
        refs.remove(blob).map_err(dberr)?;
        freed.push(BlobId(*blob));
    } else {
        refs.insert(blob, new).map_err(dberr)?;
    }
    Ok(())
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

/// Removes `path` (whose entry is `entry`) and everything under it, releasing their blobs.
fn remove_tree(
    entries: &mut Entries<'_>,
    refs: &mut Refs<'_>,
    freed: &mut Vec<BlobId>,
    path: &str,
    entry: Entry,
) -> Result<(), StoreError> {
    let mut gone = vec![(path.to_owned(), entry)];
    gone.extend(descendants(entries, path)?);
    for (p, e) in gone {
        if let Kind::File { blob, .. } = e.kind {
            adjust(refs, &blob, -1, freed)?;
        }
        entries.remove(p.as_str()).map_err(dberr)?;
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

impl Store {
    /// Opens the store in `dir` (metadata.redb and the blob store), making the
    /// root folder on first use and sweeping blobs no entry uses.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| BlobError::Io {
            what: "creating",
            path: dir.to_owned(),
            source,
        })?;
        let db = Database::create(dir.join("metadata.redb")).map_err(dberr)?;
        let blobs = BlobStore::open(dir)?;
        let s = Store { db, blobs };
        let txn = s.db.begin_write().map_err(dberr)?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(dberr)?;
            txn.open_table(REFS).map_err(dberr)?;
            if entries.get("").map_err(dberr)?.is_none() {
                entries
                    .insert(
                        "",
                        encode(&Entry {
                            kind: Kind::Dir,
                            mtime: now(),
                        })
                        .as_slice(),
                    )
                    .map_err(dberr)?;
            }
        }
        txn.commit().map_err(dberr)?;
        s.sweep()?;
        Ok(s)
    }

    /// Deletes blobs that no entry references (left by a crash between a
    /// commit and the deletes that follow it, or by an unacknowledged write).
    pub fn sweep(&self) -> Result<usize, StoreError> {
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
        let e = entries
            .get(path.as_str())
            .map_err(dberr)?
            .and_then(|g| decode(g.value()));
        Ok(e)
    }

    /// Direct children of a folder, by name.
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
        Ok(descendants(&entries, &dir)?
            .into_iter()
            .filter(|(p, _)| parent(p) == dir)
            .map(|(p, e)| (p.rsplit('/').next().unwrap_or("").to_owned(), e))
            .collect())
    }

    pub fn mkdir(&self, path: &str) -> Result<(), StoreError> {
        let path = normalize(path)?;
        self.write(|entries, _, _| {
            if get(entries, &path)?.is_some() {
                return Err(StoreError::Exists(path.clone()));
            }
            require_parent(entries, &path)?;
            entries
                .insert(
                    path.as_str(),
                    encode(&Entry {
                        kind: Kind::Dir,
                        mtime: now(),
                    })
                    .as_slice(),
                )
                .map_err(dberr)?;
            Ok(())
        })
    }

    /// Starts writing a file's content (see [`Store::put`]).
    pub fn begin(&self) -> Result<Upload, StoreError> {
        Ok(self.blobs.begin()?)
    }

    /// Makes `up` the content of `path` (replacing a file there). Returns
    /// once both content and metadata are durable: the write is acknowledged.
    pub fn put(&self, path: &str, up: Upload, content_type: &str) -> Result<Entry, StoreError> {
        let path = normalize(path)?;
        if path.is_empty() {
            return Err(StoreError::IsDir(path));
        }
        let (id, size) = self.blobs.commit(up)?;
        let entry = Entry {
            kind: Kind::File {
                size,
                blob: id.0,
                content_type: content_type.to_owned(),
            },
            mtime: now(),
        };
        let e2 = entry.clone();
        let r = self.write(|entries, refs, freed| {
            require_parent(entries, &path)?;
            match get(entries, &path)? {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => return Err(StoreError::IsDir(path.clone())),
                Some(Entry {
                    kind: Kind::File { blob, .. },
                    ..
                }) => adjust(refs, &blob, -1, freed)?,
                None => {}
            }
            adjust(refs, &id.0, 1, freed)?;
            freed.retain(|f| *f != id);
            entries
                .insert(path.as_str(), encode(&e2).as_slice())
                .map_err(dberr)?;
            Ok(())
        });
        if r.is_err() {
            // Not referenced: drop it unless another entry uses the same content.
            let _ = self.sweep();
        }
        r.map(|()| entry)
    }

    /// Removes a file, or a folder with everything in it.
    pub fn remove(&self, path: &str) -> Result<(), StoreError> {
        let path = normalize(path)?;
        if path.is_empty() {
            return Err(StoreError::IsDir(path));
        }
        self.write(|entries, refs, freed| {
            let Some(e) = get(entries, &path)? else {
                return Err(StoreError::NotFound(path.clone()));
            };
            remove_tree(entries, refs, freed, &path, e)
        })
    }

    /// Copies (`keep = true`) or moves `from` to `to`. With `overwrite`, what
    /// is at `to` is replaced; otherwise that is an error.
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
        self.write(|entries, refs, freed| {
            let Some(src) = get(entries, &from)? else {
                return Err(StoreError::NotFound(from.clone()));
            };
            require_parent(entries, &to)?;
            if let Some(old) = get(entries, &to)? {
                if !overwrite {
                    return Err(StoreError::Exists(to.clone()));
                }
                remove_tree(entries, refs, freed, &to, old)?;
            }
            let mut items = vec![(from.clone(), src)];
            items.extend(descendants(entries, &from)?);
            for (p, e) in items {
                let dest = format!("{to}{}", &p[from.len()..]);
                if keep {
                    if let Kind::File { blob, .. } = &e.kind {
                        adjust(refs, blob, 1, freed)?;
                    }
                } else {
                    entries.remove(p.as_str()).map_err(dberr)?;
                }
                entries
                    .insert(dest.as_str(), encode(&e).as_slice())
                    .map_err(dberr)?;
            }
            // A blob both freed and re-referenced in this change stays.
            let live: Vec<BlobId> = freed
                .iter()
                .copied()
                .filter(|b| refs.get(&b.0).ok().flatten().is_some())
                .collect();
            freed.retain(|b| !live.contains(b));
            Ok(())
        })
    }

    /// Runs `f` in one write transaction; after the commit, deletes the blobs it freed.
    fn write<F>(&self, f: F) -> Result<(), StoreError>
    where
        F: FnOnce(&mut Entries<'_>, &mut Refs<'_>, &mut Vec<BlobId>) -> Result<(), StoreError>,
    {
        let txn = self.db.begin_write().map_err(dberr)?;
        let mut freed = Vec::new();
        {
            let mut entries = txn.open_table(ENTRIES).map_err(dberr)?;
            let mut refs = txn.open_table(REFS).map_err(dberr)?;
            if let Err(e) = f(&mut entries, &mut refs, &mut freed) {
                drop(entries);
                drop(refs);
                let _ = txn.abort();
                return Err(e);
            }
        }
        txn.commit().map_err(dberr)?;
        for b in freed {
            self.blobs.remove(&b)?;
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
