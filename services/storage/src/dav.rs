//! WebDAV over the store: a `dav-server` filesystem backend on [`Store`].
//!
//! dav-server speaks the protocol (PROPFIND/PROPPATCH, MKCOL, GET/HEAD with
//! ranges and conditional headers, PUT, DELETE, COPY/MOVE, LOCK/UNLOCK);
//! this module gives it our files:
//!
//! * a PUT streams into an [`Upload`] (buffered 1 MiB at a time, hashed as it
//!   goes) and becomes visible only in `flush`, when [`Store::put`] has made
//!   content and metadata durable: dav-server answers 201/204 after that. A
//!   PUT that fails or is cut off leaves nothing behind.
//! * space is checked before the first byte (quota and disk, from
//!   Content-Length), while streaming, and again in the commit: a full box
//!   answers 507 Insufficient Storage.
//! * dead properties live in the entry's metadata, so they copy and move
//!   with it; ETags are the content hash.
//!
//! The store is synchronous; every call runs on tokio's blocking pool.

use std::fmt;
use std::io::SeekFrom;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use dav_server::davpath::DavPath;
use dav_server::fs::{
    DavDirEntry, DavFile, DavFileSystem, DavMetaData, DavProp, FsError, FsFuture, FsResult,
    FsStream, OpenOptions, ReadDirMeta,
};
use futures_util::FutureExt;
use http::StatusCode;

use crate::blobs::{BlobId, Upload};
use crate::meta::{Content, Entry, Kind, Prop, Store, StoreError};
use crate::path::{normalize, parent, PathError};

/// Bytes gathered from the request before one write to the upload's file.
const WRITE_CHUNK: usize = 1 << 20;
/// Space kept free on the data disk for metadata and the rest of the box.
pub const DISK_RESERVE: u64 = 32 << 20;

/// The files of the box, as dav-server sees them.
#[derive(Clone)]
pub struct StoreFs {
    store: Arc<Store>,
    /// Where the store lives (for free space).
    dir: PathBuf,
    /// Set for a DELETE, COPY or MOVE: the tree changes in one transaction.
    tree: Option<Arc<TreeOp>>,
    /// Set for a PROPFIND that names its properties: dead properties are
    /// answered one by one (`get_prop`), not all at once as well.
    named_props: bool,
}

/// What a DELETE, COPY or MOVE request does to a tree.
///
/// dav-server walks a folder member by member (one change each), so a client
/// that hangs up halfway leaves half a tree, and a refusal at the end (the
/// root cannot be deleted) comes after every member is gone. With a
/// [`TreeOp`] the backend shows dav-server no members and does the whole
/// tree in one transaction at the step that names the top folder; the
/// transaction runs on the blocking pool, so once started it finishes even
/// if the client goes away. All or nothing.
#[derive(Debug)]
pub enum TreeOp {
    /// DELETE: `remove_dir` removes the folder and everything in it.
    Delete,
    /// MOVE: the destination, if dav-server asks to delete it first, is
    /// replaced in the same transaction as the move.
    Move { replace: AtomicBool },
    /// COPY from `from`; `members` is false for Depth 0 (the folder alone);
    /// `overwrite` is the Overwrite header (dav-server does not delete an
    /// existing folder for a Depth 0 COPY, which RFC 4918 9.8.4 requires).
    Copy {
        from: String,
        members: bool,
        overwrite: bool,
        replace: AtomicBool,
    },
}

impl TreeOp {
    pub fn delete() -> TreeOp {
        TreeOp::Delete
    }

    pub fn moving() -> TreeOp {
        TreeOp::Move {
            replace: AtomicBool::new(false),
        }
    }

    pub fn copy(from: String, members: bool, overwrite: bool) -> TreeOp {
        TreeOp::Copy {
            from,
            members,
            overwrite,
            replace: AtomicBool::new(false),
        }
    }

    /// The destination's deletion, deferred to the COPY or MOVE itself;
    /// `None` for DELETE.
    fn replace(&self) -> Option<&AtomicBool> {
        match self {
            TreeOp::Delete => None,
            TreeOp::Move { replace } | TreeOp::Copy { replace, .. } => Some(replace),
        }
    }

    fn replacing(&self) -> bool {
        self.replace().is_some_and(|r| r.load(Ordering::SeqCst))
    }
}

impl StoreFs {
    pub fn new(store: Arc<Store>, dir: PathBuf) -> StoreFs {
        StoreFs {
            store,
            dir,
            tree: None,
            named_props: false,
        }
    }

    /// The same files, for one PROPFIND that names its properties.
    pub fn named_props(&self) -> StoreFs {
        StoreFs {
            named_props: true,
            ..self.clone()
        }
    }

    /// The same files, for one DELETE, COPY or MOVE request.
    pub fn for_tree(&self, op: TreeOp) -> StoreFs {
        StoreFs {
            tree: Some(Arc::new(op)),
            ..self.clone()
        }
    }

    async fn blocking<T, F>(&self, f: F) -> FsResult<T>
    where
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| FsError::GeneralFailure)?
            .map_err(fs_error)
    }

    async fn reader(&self, entry: Entry) -> FsResult<Box<dyn DavFile>> {
        let Kind::File { blob, .. } = &entry.kind else {
            return Err(FsError::Forbidden);
        };
        let blob = BlobId(*blob);
        let content = self.blocking(move |s| s.content(&blob)).await?;
        Ok(Box::new(Reader::new(Meta(entry), content)))
    }

    async fn entry(&self, path: String) -> FsResult<Entry> {
        self.blocking(move |s| s.get(&path))
            .await?
            .ok_or(FsError::NotFound)
    }
}

/// Free space on the data disk for files: what non-root users could write, less the reserve.
pub fn disk_available(dir: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let avail = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    Some(avail.saturating_sub(DISK_RESERVE))
}

/// Room for new content: the smaller of the quota's and the disk's.
pub fn room(store: &Store, dir: &std::path::Path) -> Result<u64, StoreError> {
    let used = store.used()?;
    let by_quota = store.quota()?.map(|q| q.saturating_sub(used));
    let by_disk = disk_available(dir);
    Ok(match (by_quota, by_disk) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => u64::MAX,
    })
}

fn fs_error(e: StoreError) -> FsError {
    if e.disk_full() {
        return FsError::InsufficientStorage;
    }
    match e {
        StoreError::Path(PathError::TooLong(_)) => FsError::PathTooLong,
        StoreError::Path(_) => FsError::Forbidden,
        StoreError::NotFound(_) | StoreError::NoParent(_) => FsError::NotFound,
        StoreError::Exists(_) => FsError::Exists,
        StoreError::IsDir(_) | StoreError::IntoItself(_) | StoreError::OntoAncestor(_) => {
            FsError::Forbidden
        }
        StoreError::OverQuota { .. } | StoreError::TooManyProps(_) => FsError::InsufficientStorage,
        e => {
            tracing::error!(error = %e, "storage");
            FsError::GeneralFailure
        }
    }
}

/// The store's key for a request path: UTF-8, normalized, confined.
fn key(path: &DavPath) -> FsResult<String> {
    let raw = std::str::from_utf8(path.as_bytes()).map_err(|_| FsError::Forbidden)?;
    normalize(raw).map_err(|e| fs_error(StoreError::Path(e)))
}

fn content_type(key: &str) -> String {
    mime_guess::from_path(key)
        .first_raw()
        .unwrap_or("application/octet-stream")
        .to_owned()
}

#[derive(Debug, Clone)]
struct Meta(Entry);

impl DavMetaData for Meta {
    fn len(&self) -> u64 {
        match &self.0.kind {
            Kind::File { size, .. } => *size,
            Kind::Dir => 0,
        }
    }

    fn modified(&self) -> FsResult<SystemTime> {
        Ok(UNIX_EPOCH + Duration::from_secs(self.0.mtime))
    }

    fn is_dir(&self) -> bool {
        self.0.kind == Kind::Dir
    }

    fn etag(&self) -> Option<String> {
        Some(self.0.etag().trim_matches('"').to_owned())
    }
}

struct DirEntry {
    name: String,
    meta: Meta,
}

impl DavDirEntry for DirEntry {
    fn name(&self) -> Vec<u8> {
        self.name.as_bytes().to_vec()
    }

    fn metadata(&'_ self) -> FsFuture<'_, Box<dyn DavMetaData>> {
        let m: Box<dyn DavMetaData> = Box::new(self.meta.clone());
        futures_util::future::ready(Ok(m)).boxed()
    }
}

fn to_prop(p: &DavProp) -> Prop {
    Prop {
        namespace: p.namespace.clone(),
        prefix: p.prefix.clone(),
        name: p.name.clone(),
        xml: p
            .xml
            .as_deref()
            .map(|x| String::from_utf8_lossy(x).into_owned())
            .unwrap_or_default(),
    }
}

fn from_prop(p: &Prop, with_value: bool) -> DavProp {
    DavProp {
        name: p.name.clone(),
        prefix: p.prefix.clone(),
        namespace: p.namespace.clone(),
        xml: with_value.then(|| p.xml.clone().into_bytes()),
    }
}

impl DavFileSystem for StoreFs {
    fn open<'a>(
        &'a self,
        path: &'a DavPath,
        options: OpenOptions,
    ) -> FsFuture<'a, Box<dyn DavFile>> {
        async move {
            let key = key(path)?;
            // One trip to the blocking pool for everything open needs to know.
            let (k, dir, want_room) = (key.clone(), self.dir.clone(), options.size.is_some());
            let (existing, parent_is_dir, room) = self
                .blocking(move |s| {
                    let existing = s.get(&k)?;
                    let parent_is_dir =
                        matches!(s.get(parent(&k))?, Some(e) if e.kind == Kind::Dir);
                    let room = if want_room { room(s, &dir)? } else { u64::MAX };
                    Ok((existing, parent_is_dir, room))
                })
                .await?;
            if !options.write {
                return self.reader(existing.ok_or(FsError::NotFound)?).await;
            }
            match &existing {
                Some(e) if e.kind == Kind::Dir => return Err(FsError::Forbidden),
                Some(_) if options.create_new => return Err(FsError::Exists),
                None if !options.create => return Err(FsError::NotFound),
                _ => {}
            }
            if key.is_empty() {
                return Err(FsError::Forbidden);
            }
            if !parent_is_dir {
                return Err(FsError::NotFound);
            }
            if options.append {
                return Err(FsError::NotImplemented);
            }
            if !options.truncate {
                // A LOCK on an unmapped URL makes an empty file (RFC 4918 7.3);
                // writing into the middle of a file is not supported.
                if existing.is_some() {
                    return Err(FsError::NotImplemented);
                }
                let (k, ct) = (key.clone(), content_type(&key));
                self.blocking(move |s| s.create_empty(&k, &ct)).await?;
                return self.reader(self.entry(key).await?).await;
            }
            if let Some(size) = options.size {
                let replaced = match &existing {
                    Some(Entry {
                        kind: Kind::File { size, .. },
                        ..
                    }) => *size,
                    _ => 0,
                };
                if size > room.saturating_add(replaced) {
                    return Err(FsError::InsufficientStorage);
                }
            }
            let upload = self.store.begin().map_err(fs_error)?;
            Ok(Box::new(Writer {
                fs: self.clone(),
                content_type: content_type(&key),
                key,
                upload: Some(upload),
                buf: Vec::new(),
                expected: options.size,
                done: None,
                refused: None,
                discarded: 0,
            }) as Box<dyn DavFile>)
        }
        .boxed()
    }

    fn read_dir<'a>(
        &'a self,
        path: &'a DavPath,
        _meta: ReadDirMeta,
    ) -> FsFuture<'a, FsStream<Box<dyn DavDirEntry>>> {
        async move {
            let key = key(path)?;
            if self.tree.is_some() {
                // The tree is done in one step (see TreeOp): no walk.
                let none: Vec<FsResult<Box<dyn DavDirEntry>>> = Vec::new();
                return Ok(
                    Box::pin(futures_util::stream::iter(none)) as FsStream<Box<dyn DavDirEntry>>
                );
            }
            let list = self.blocking(move |s| s.list(&key)).await?;
            let items: Vec<FsResult<Box<dyn DavDirEntry>>> = list
                .into_iter()
                .map(|(name, e)| {
                    Ok(Box::new(DirEntry {
                        name,
                        meta: Meta(e),
                    }) as Box<dyn DavDirEntry>)
                })
                .collect();
            Ok(Box::pin(futures_util::stream::iter(items)) as FsStream<Box<dyn DavDirEntry>>)
        }
        .boxed()
    }

    fn metadata<'a>(&'a self, path: &'a DavPath) -> FsFuture<'a, Box<dyn DavMetaData>> {
        async move {
            let e = self.entry(key(path)?).await?;
            Ok(Box::new(Meta(e)) as Box<dyn DavMetaData>)
        }
        .boxed()
    }

    fn create_dir<'a>(&'a self, path: &'a DavPath) -> FsFuture<'a, ()> {
        async move {
            let key = key(path)?;
            if let Some(TreeOp::Copy {
                from,
                members,
                overwrite,
                ..
            }) = self.tree.as_deref()
            {
                // COPY of a folder: dav-server makes the destination folder
                // and would then copy member by member; the whole tree goes
                // here, in one transaction.
                let (from, replace) = (
                    from.clone(),
                    self.tree.as_ref().is_some_and(|t| t.replacing()),
                );
                let (members, overwrite) = (*members, *overwrite);
                return self
                    .blocking(move |s| {
                        if members {
                            s.transfer(&from, &key, replace, true)
                        } else {
                            s.replace_with_dir(&key, replace || overwrite)
                        }
                    })
                    .await;
            }
            self.blocking(move |s| s.mkdir(&key)).await
        }
        .boxed()
    }

    fn remove_dir<'a>(&'a self, path: &'a DavPath) -> FsFuture<'a, ()> {
        async move {
            let key = key(path)?;
            if key.is_empty() {
                // The root folder is never removed.
                return Err(FsError::Forbidden);
            }
            match self.tree.as_deref() {
                Some(TreeOp::Delete) => {
                    // The whole tree in one transaction.
                    return self
                        .blocking(move |s| match s.get(&key)? {
                            Some(e) if e.kind == Kind::Dir => s.remove(&key),
                            Some(_) => Err(StoreError::IsDir(key)),
                            None => Err(StoreError::NotFound(key)),
                        })
                        .await;
                }
                Some(op) => {
                    // COPY/MOVE over an existing destination: replaced in
                    // the same transaction as the copy or move.
                    if let Some(r) = op.replace() {
                        r.store(true, Ordering::SeqCst);
                    }
                    return Ok(());
                }
                None => {}
            }
            // dav-server empties a folder (minus anything locked) before removing it.
            self.blocking(move |s| {
                if s.has_children(&key)? {
                    return Err(StoreError::Exists(key));
                }
                s.remove(&key)
            })
            .await
        }
        .boxed()
    }

    fn remove_file<'a>(&'a self, path: &'a DavPath) -> FsFuture<'a, ()> {
        async move {
            let key = key(path)?;
            if let Some(r) = self.tree.as_deref().and_then(TreeOp::replace) {
                r.store(true, Ordering::SeqCst);
                return Ok(());
            }
            self.blocking(move |s| match s.get(&key)? {
                Some(e) if e.kind == Kind::Dir => Err(StoreError::IsDir(key)),
                Some(_) => s.remove(&key),
                None => Err(StoreError::NotFound(key)),
            })
            .await
        }
        .boxed()
    }

    fn rename<'a>(&'a self, from: &'a DavPath, to: &'a DavPath) -> FsFuture<'a, ()> {
        async move {
            let (from, to) = (key(from)?, key(to)?);
            let replace = self.tree.as_ref().is_some_and(|t| t.replacing());
            self.blocking(move |s| {
                // A file there is replaced; a folder only when the client
                // asked to overwrite (dav-server's deletion of it was deferred to here).
                let overwrite = match s.get(&to)? {
                    Some(_) if replace => true,
                    Some(e) if e.kind == Kind::Dir => return Err(StoreError::Exists(to)),
                    Some(_) => true,
                    None => false,
                };
                s.transfer(&from, &to, overwrite, false)
            })
            .await
        }
        .boxed()
    }

    fn copy<'a>(&'a self, from: &'a DavPath, to: &'a DavPath) -> FsFuture<'a, ()> {
        async move {
            let (from, to) = (key(from)?, key(to)?);
            self.blocking(move |s| s.transfer(&from, &to, true, true))
                .await
        }
        .boxed()
    }

    fn have_props<'a>(
        &'a self,
        _path: &'a DavPath,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        futures_util::future::ready(true).boxed()
    }

    fn patch_props<'a>(
        &'a self,
        path: &'a DavPath,
        patch: Vec<(bool, DavProp)>,
    ) -> FsFuture<'a, Vec<(StatusCode, DavProp)>> {
        async move {
            let key = key(path)?;
            let ours: Vec<(bool, Prop)> = patch.iter().map(|(set, p)| (*set, to_prop(p))).collect();
            self.blocking(move |s| s.patch_props(&key, ours)).await?;
            Ok(patch
                .into_iter()
                .map(|(_, mut p)| {
                    p.xml = None;
                    (StatusCode::OK, p)
                })
                .collect())
        }
        .boxed()
    }

    fn get_props<'a>(&'a self, path: &'a DavPath, do_content: bool) -> FsFuture<'a, Vec<DavProp>> {
        async move {
            if self.named_props {
                return Ok(Vec::new());
            }
            let e = self.entry(key(path)?).await?;
            Ok(e.props.iter().map(|p| from_prop(p, do_content)).collect())
        }
        .boxed()
    }

    fn get_prop<'a>(&'a self, path: &'a DavPath, prop: DavProp) -> FsFuture<'a, Vec<u8>> {
        async move {
            let e = self.entry(key(path)?).await?;
            e.props
                .iter()
                .find(|p| p.namespace == prop.namespace && p.name == prop.name)
                .map(|p| p.xml.clone().into_bytes())
                .ok_or(FsError::NotFound)
        }
        .boxed()
    }

    fn get_quota(&'_ self) -> FsFuture<'_, (u64, Option<u64>)> {
        async move {
            let dir = self.dir.clone();
            let (used, room) = self
                .blocking(move |s| Ok((s.used()?, room(s, &dir)?)))
                .await?;
            Ok((used, Some(used.saturating_add(room))))
        }
        .boxed()
    }
}

/// A chunk of a file being read on the blocking pool.
type ChunkRead = tokio::task::JoinHandle<FsResult<Bytes>>;

/// Files at least this big are sent from memory maps of their blob, one
/// chunk at a time.
const MAP_MIN: u64 = 256 << 10;

/// One chunk of a blob mapped into memory; unmapped when the chunk is sent.
struct MapOwner(memmap2::Mmap);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Where a file's bytes come from.
enum Source {
    /// Small contents, from the metadata database.
    Inline(Bytes),
    /// Read into a buffer (small files).
    File(Arc<std::fs::File>),
    /// Sent straight from the page cache: one copy fewer, no buffers. Each
    /// chunk is its own map, so a process sending a large file maps only the
    /// chunks in flight (mapping the whole file showed as 650 MB of RSS for
    /// three GETs of a 200 MiB file).
    Map(Arc<std::fs::File>),
}

/// A file opened for reading. While one chunk goes out to the client the
/// next is already being read (a sequential GET keeps the disk and the
/// network busy at once).
struct Reader {
    meta: Meta,
    source: Source,
    pos: u64,
    /// The chunk being read ahead: where, how much, and the read.
    ahead: Option<(u64, usize, ChunkRead)>,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").field("pos", &self.pos).finish()
    }
}

impl Reader {
    fn new(meta: Meta, content: Content) -> Reader {
        let file = match content {
            Content::Inline(v) => {
                return Reader {
                    meta,
                    source: Source::Inline(Bytes::from(v)),
                    pos: 0,
                    ahead: None,
                }
            }
            Content::File(f) => f,
        };
        let source = if meta.len() >= MAP_MIN {
            Source::Map(Arc::new(file))
        } else {
            Source::File(Arc::new(file))
        };
        Reader {
            meta,
            source,
            pos: 0,
            ahead: None,
        }
    }

    /// Reads `len` bytes at `pos` on the blocking pool: from the map, by
    /// faulting its pages in there (so the async thread that sends them
    /// never waits on the disk), or into a buffer from the file.
    fn start_read(&self, pos: u64, len: usize) -> ChunkRead {
        match &self.source {
            Source::Inline(bytes) => {
                let end = (pos as usize + len).min(bytes.len());
                let chunk = bytes.slice((pos as usize).min(end)..end);
                tokio::task::spawn(async move { Ok(chunk) })
            }
            Source::Map(file) if len > 0 => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    // SAFETY: a blob is never written after it is renamed
                    // into place (its name is its content's hash); it is only
                    // ever unlinked, which leaves an existing map intact. So
                    // the mapped bytes cannot change under us.
                    let map = unsafe {
                        memmap2::MmapOptions::new()
                            .offset(pos)
                            .len(len)
                            .populate()
                            .map(&*file)
                    };
                    match map {
                        Ok(m) => Ok(Bytes::from_owner(MapOwner(m))),
                        Err(e) => {
                            tracing::error!(error = %e, "mapping a blob");
                            Err(FsError::GeneralFailure)
                        }
                    }
                })
            }
            Source::File(file) | Source::Map(file) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    let mut got = 0;
                    while got < len {
                        match file.read_at(&mut buf[got..], pos + got as u64) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                tracing::error!(error = %e, "reading a blob");
                                return Err(FsError::GeneralFailure);
                            }
                        }
                    }
                    buf.truncate(got);
                    Ok(Bytes::from(buf))
                })
            }
        }
    }
}

impl DavFile for Reader {
    fn metadata(&'_ mut self) -> FsFuture<'_, Box<dyn DavMetaData>> {
        let m: Box<dyn DavMetaData> = Box::new(self.meta.clone());
        futures_util::future::ready(Ok(m)).boxed()
    }

    fn write_buf(&'_ mut self, _buf: Box<dyn Buf + Send>) -> FsFuture<'_, ()> {
        futures_util::future::ready(Err(FsError::Forbidden)).boxed()
    }

    fn write_bytes(&'_ mut self, _buf: Bytes) -> FsFuture<'_, ()> {
        futures_util::future::ready(Err(FsError::Forbidden)).boxed()
    }

    fn read_bytes(&'_ mut self, count: usize) -> FsFuture<'_, Bytes> {
        async move {
            let size = self.meta.len();
            let len = count.min(size.saturating_sub(self.pos) as usize);
            let read = match self.ahead.take() {
                Some((p, n, h)) if p == self.pos && n == len => h,
                _ => self.start_read(self.pos, len),
            };
            let data = read.await.map_err(|_| FsError::GeneralFailure)??;
            self.pos += data.len() as u64;
            let next = count.min(size.saturating_sub(self.pos) as usize);
            if next > 0 && !data.is_empty() {
                self.ahead = Some((self.pos, next, self.start_read(self.pos, next)));
            }
            Ok(data)
        }
        .boxed()
    }

    fn seek(&'_ mut self, pos: SeekFrom) -> FsFuture<'_, u64> {
        let len = self.meta.len() as i128;
        let new = match pos {
            SeekFrom::Start(n) => n as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
            SeekFrom::End(d) => len + d as i128,
        };
        let r = if (0..=len).contains(&new) {
            self.pos = new as u64;
            Ok(self.pos)
        } else {
            Err(FsError::GeneralFailure)
        };
        futures_util::future::ready(r).boxed()
    }

    fn flush(&'_ mut self) -> FsFuture<'_, ()> {
        futures_util::future::ready(Ok(())).boxed()
    }
}

/// A file being written by a PUT: nothing is visible until `flush` commits it.
struct Writer {
    fs: StoreFs,
    key: String,
    content_type: String,
    upload: Option<Upload>,
    buf: Vec<u8>,
    /// The Content-Length the client announced.
    expected: Option<u64>,
    /// The committed entry, once flushed.
    done: Option<Entry>,
    /// Why the upload was refused part way (no room): the rest of the body
    /// is read and dropped, up to [`DISCARD_MAX`], so the client gets the
    /// 507 instead of a broken pipe.
    refused: Option<FsError>,
    discarded: u64,
}

/// Most bytes of a refused upload read and dropped before the connection is cut.
const DISCARD_MAX: u64 = 64 << 20;

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer").field("key", &self.key).finish()
    }
}

impl Writer {
    fn written(&self) -> u64 {
        self.upload.as_ref().map(Upload::size).unwrap_or(0) + self.buf.len() as u64
    }

    /// Writes the gathered bytes to the upload's file, checking for room.
    async fn drain(&mut self) -> FsResult<()> {
        let mut up = self.upload.take().ok_or(FsError::GeneralFailure)?;
        let buf = std::mem::take(&mut self.buf);
        let dir = self.fs.dir.clone();
        let unannounced = self.expected.is_none();
        let (up, buf) = self
            .fs
            .blocking(move |s| {
                // Without a Content-Length the size is learnt as it comes.
                if unannounced && up.size() + buf.len() as u64 > room(s, &dir)? {
                    return Err(StoreError::OverQuota {
                        quota: s.quota()?.unwrap_or(0),
                        used: s.used()?,
                        more: up.size() + buf.len() as u64,
                    });
                }
                up.write(&buf)?;
                Ok((up, buf))
            })
            .await?;
        self.upload = Some(up);
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }
}

impl DavFile for Writer {
    fn metadata(&'_ mut self) -> FsFuture<'_, Box<dyn DavMetaData>> {
        let entry = self.done.clone().unwrap_or(Entry {
            kind: Kind::File {
                size: self.written(),
                blob: [0; 32],
                content_type: self.content_type.clone(),
            },
            mtime: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            props: Vec::new(),
        });
        let m: Box<dyn DavMetaData> = Box::new(Meta(entry));
        futures_util::future::ready(Ok(m)).boxed()
    }

    fn write_buf(&'_ mut self, mut buf: Box<dyn Buf + Send>) -> FsFuture<'_, ()> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        self.write_bytes(bytes)
    }

    fn write_bytes(&'_ mut self, buf: Bytes) -> FsFuture<'_, ()> {
        async move {
            if let Some(e) = &self.refused {
                self.discarded += buf.len() as u64;
                return if self.discarded > DISCARD_MAX {
                    Err(*e)
                } else {
                    Ok(())
                };
            }
            if self.upload.is_none() {
                return Err(FsError::Forbidden);
            }
            if self
                .expected
                .is_some_and(|n| self.written() + buf.len() as u64 > n)
            {
                return Err(FsError::TooLarge);
            }
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(WRITE_CHUNK);
            }
            self.buf.extend_from_slice(&buf);
            if self.buf.len() >= WRITE_CHUNK {
                if let Err(e) = self.drain().await {
                    if e != FsError::InsufficientStorage {
                        return Err(e);
                    }
                    // Out of room: nothing of it is kept (the upload's file
                    // goes with it); the rest of the body is read and dropped.
                    self.upload = None;
                    self.buf = Vec::new();
                    self.refused = Some(e);
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn read_bytes(&'_ mut self, _count: usize) -> FsFuture<'_, Bytes> {
        futures_util::future::ready(Err(FsError::Forbidden)).boxed()
    }

    fn seek(&'_ mut self, _pos: SeekFrom) -> FsFuture<'_, u64> {
        // Writing at an offset (partial PUT) is not supported.
        futures_util::future::ready(Err(FsError::NotImplemented)).boxed()
    }

    fn flush(&'_ mut self) -> FsFuture<'_, ()> {
        async move {
            if self.done.is_some() {
                return Ok(());
            }
            if let Some(e) = self.refused {
                return Err(e);
            }
            let mut up = self.upload.take().ok_or(FsError::GeneralFailure)?;
            let buf = std::mem::take(&mut self.buf);
            if self
                .expected
                .is_some_and(|n| n != up.size() + buf.len() as u64)
            {
                // Short of what was announced: never make it visible.
                return Err(FsError::GeneralFailure);
            }
            let (key, ct) = (self.key.clone(), self.content_type.clone());
            // The last bytes and the commit in one trip to the blocking pool.
            let entry = self
                .fs
                .blocking(move |s| {
                    up.write(&buf)?;
                    s.put(&key, up, &ct)
                })
                .await?;
            self.done = Some(entry);
            self.buf = Vec::new();
            Ok(())
        }
        .boxed()
    }
}
