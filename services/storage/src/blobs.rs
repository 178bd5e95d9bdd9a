//! The content-addressed blob store: file contents, named by their BLAKE3
//! hash, under `blobs/ab/abcdef...`. A blob is written to `tmp/` while it
//! streams in, then fsynced, renamed into place and its directory fsynced:
//! a blob path either holds the complete content or does not exist. Whatever
//! is in `tmp/` when the store opens is a write that was never acknowledged,
//! and is deleted.
//!
//! Contents of at most [`INLINE_MAX`] bytes never become files: an upload
//! keeps them in memory and [`BlobStore::commit`] hands them back, for the
//! metadata database to store in the same transaction as the entry (one
//! fsync instead of three, no inode per small file).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A blob's name: the BLAKE3 hash of its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The id a blob file's name spells (64 hex digits), if it is one.
    pub fn from_hex(s: &str) -> Option<BlobId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(BlobId(out))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// a file operation in the store failed
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))
}

/// The largest content kept inline in the metadata database.
pub const INLINE_MAX: usize = 64 << 10;

pub struct BlobStore {
    root: PathBuf,
}

/// Where committed content lives.
pub enum Stored {
    /// Small: the bytes, for the caller to keep.
    Inline(Vec<u8>),
    /// A blob file, durable.
    File,
}

impl BlobStore {
    /// Opens (creating) the store under `root` and drops unfinished writes.
    pub fn open(root: &Path) -> Result<BlobStore, BlobError> {
        for d in ["blobs", "tmp"] {
            std::fs::create_dir_all(root.join(d)).map_err(io("creating", &root.join(d)))?;
        }
        let tmp = root.join("tmp");
        for e in std::fs::read_dir(&tmp)
            .map_err(io("listing", &tmp))?
            .flatten()
        {
            std::fs::remove_file(e.path()).map_err(io("removing", &e.path()))?;
        }
        Ok(BlobStore {
            root: root.to_owned(),
        })
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        let hex = id.hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    /// Starts a streamed write.
    pub fn begin(&self) -> Result<Upload, BlobError> {
        Ok(Upload {
            file: None,
            mem: Vec::new(),
            path: PathBuf::new(),
            tmp: self.root.join("tmp"),
            hasher: blake3::Hasher::new(),
            size: 0,
        })
    }

    /// Makes an upload durable under its hash, or hands back its bytes when
    /// it is small enough to keep inline. Content that is already stored is
    /// not written twice. On an error the temporary file is gone too.
    pub fn commit(&self, mut up: Upload) -> Result<(BlobId, u64, Stored), BlobError> {
        let id = BlobId(*up.hasher.finalize().as_bytes());
        let size = up.size;
        let Some(file) = up.file.take() else {
            return Ok((id, size, Stored::Inline(std::mem::take(&mut up.mem))));
        };
        let path = up.path.clone();
        let dest = self.path(&id);
        if dest.exists() {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Ok((id, size, Stored::File));
        }
        let r = (|| {
            file.sync_all().map_err(io("syncing", &path))?;
            drop(file);
            let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
            if !dir.exists() {
                std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
                sync_dir(&self.root.join("blobs"))?;
            }
            std::fs::rename(&path, &dest).map_err(io("renaming into", &dest))?;
            sync_dir(&dir)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        r.map(|()| (id, size, Stored::File))
    }

    pub fn open_blob(&self, id: &BlobId) -> Result<File, BlobError> {
        let p = self.path(id);
        File::open(&p).map_err(io("opening", &p))
    }

    pub fn remove(&self, id: &BlobId) -> Result<(), BlobError> {
        let p = self.path(id);
        match std::fs::remove_file(&p) {
            Ok(()) => sync_dir(p.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &p)(e)),
        }
    }

    /// Every stored blob.
    pub fn list(&self) -> Result<Vec<BlobId>, BlobError> {
        let mut out = Vec::new();
        let blobs = self.root.join("blobs");
        for d in std::fs::read_dir(&blobs)
            .map_err(io("listing", &blobs))?
            .flatten()
        {
            for f in std::fs::read_dir(d.path())
                .map_err(io("listing", &d.path()))?
                .flatten()
            {
                if let Some(id) = f.file_name().to_str().and_then(BlobId::from_hex) {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// A blob being written: in memory while it is small, then in a temporary
/// file. Dropped without [`BlobStore::commit`], its temporary file is removed.
pub struct Upload {
    file: Option<File>,
    mem: Vec<u8>,
    path: PathBuf,
    tmp: PathBuf,
    hasher: blake3::Hasher,
    size: u64,
}

impl Upload {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        if self.file.is_none() && self.mem.len() + chunk.len() > INLINE_MAX {
            self.spill()?;
        }
        match self.file.as_mut() {
            Some(file) => file.write_all(chunk).map_err(io("writing", &self.path))?,
            None => self.mem.extend_from_slice(chunk),
        }
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        Ok(())
    }

    /// Moves what is in memory to a new temporary file.
    fn spill(&mut self) -> Result<(), BlobError> {
        for n in 0u32..10_000 {
            let path = self.tmp.join(format!("up-{}-{n}", std::process::id()));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    self.path = path;
                    let mem = std::mem::take(&mut self.mem);
                    let r = file.write_all(&mem).map_err(io("writing", &self.path));
                    self.file = Some(file);
                    return r;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io("creating", &path)(e)),
            }
        }
        Err(io("creating a temporary file in", &self.tmp)(
            std::io::ErrorKind::AlreadyExists.into(),
        ))
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn blobs_are_named_by_content_and_stored_once() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let big = vec![b'x'; INLINE_MAX + 1];
        let mut up = s.begin().unwrap();
        up.write(&big[..10]).unwrap();
        up.write(&big[10..]).unwrap();
        let (id, size, stored) = s.commit(up).unwrap();
        assert!(matches!(stored, Stored::File));
        assert_eq!(size, big.len() as u64);
        assert_eq!(id.0, *blake3::hash(&big).as_bytes());
        let mut back = Vec::new();
        s.open_blob(&id).unwrap().read_to_end(&mut back).unwrap();
        assert!(back == big);
        let mut again = s.begin().unwrap();
        again.write(&big).unwrap();
        assert_eq!(s.commit(again).unwrap().0, id);
        let mut dropped = s.begin().unwrap();
        dropped.write(&big).unwrap();
        drop(dropped);
        // Small content stays in memory and comes back to the caller.
        let mut small = s.begin().unwrap();
        small.write(b"hello world").unwrap();
        let (sid, _, stored) = s.commit(small).unwrap();
        assert_eq!(sid.0, *blake3::hash(b"hello world").as_bytes());
        assert!(matches!(stored, Stored::Inline(ref b) if b == b"hello world"));
        assert_eq!(s.list().unwrap(), vec![id]);
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        s.remove(&id).unwrap();
        s.remove(&id).unwrap();
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn unfinished_uploads_vanish_on_open() {
        let d = tempfile::tempdir().unwrap();
        let s = BlobStore::open(d.path()).unwrap();
        let mut up = s.begin().unwrap();
        up.write(&vec![1u8; INLINE_MAX + 5]).unwrap();
        // A crash leaves the file (a drop would remove it).
        std::mem::forget(up);
        drop(s);
        let s = BlobStore::open(d.path()).unwrap();
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let id = BlobId([0xab; 32]);
        assert_eq!(BlobId::from_hex(&id.hex()), Some(id));
        assert_eq!(BlobId::from_hex("abc"), None);
        assert_eq!(BlobId::from_hex(&"zz".repeat(32)), None);
        // from_str_radix took a sign: "+f" was a hex byte.
        assert_eq!(BlobId::from_hex(&"+f".repeat(32)), None);
    }
}
