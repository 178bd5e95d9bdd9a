//! WebDAV locks with bounds: dav-server's in-memory lock system behind a
//! limit on how many locks there are, how big an owner may be, and how long
//! any lock lives.
//!
//! Without them, 3,000 LOCKs with a 60 KB owner each kept 190 MB, and a
//! `Timeout: Second-4294967296` (which does not fit dav-server's u32, so it
//! read as "no timeout") made a lock that never expired.
//!
//! Locks live in memory and a restart of the service drops them, on
//! purpose: a WebDAV lock only coordinates editors (the files themselves are
//! durable either way), every client refreshes its locks and takes a new
//! one when a refresh fails (412), and a lock that outlived a crash would
//! block a file until it timed out with nobody holding it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dav_server::davpath::DavPath;
use dav_server::ls::{DavLock, DavLockSystem, LsFuture};
use dav_server::memls::MemLs;
use futures_util::FutureExt;
use xmltree::{Element, XMLNode};

/// Most locks held at once on the box.
pub const MAX_LOCKS: usize = 1000;
/// Largest owner element of a lock, in bytes of names and text.
pub const MAX_OWNER: usize = 4096;
/// Longest life of a lock, whatever the client asks for (it refreshes).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// A lock's life when the client names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Every live lock: token -> (path, when it expires).
type Live = HashMap<String, (DavPath, SystemTime)>;

#[derive(Debug, Clone)]
pub struct BoundedLocks {
    inner: Box<MemLs>,
    live: Arc<Mutex<Live>>,
    max: usize,
}

impl Default for BoundedLocks {
    fn default() -> Self {
        BoundedLocks::new(MAX_LOCKS)
    }
}

/// Bytes of names, attributes and text in an element (roughly its size as XML).
fn xml_size(e: &Element) -> usize {
    let mut n = e.name.len() + e.prefix.as_ref().map_or(0, String::len);
    n += e
        .attributes
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>();
    for c in &e.children {
        n += match c {
            XMLNode::Element(c) => xml_size(c),
            XMLNode::Text(t) | XMLNode::CData(t) | XMLNode::Comment(t) => t.len(),
            XMLNode::ProcessingInstruction(a, b) => a.len() + b.as_ref().map_or(0, String::len),
        };
    }
    n
}

fn bounded(timeout: Option<Duration>) -> Duration {
    timeout.unwrap_or(DEFAULT_TIMEOUT).min(MAX_TIMEOUT)
}

impl BoundedLocks {
    pub fn new(max: usize) -> BoundedLocks {
        BoundedLocks {
            inner: MemLs::new(),
            live: Arc::default(),
            max,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unlocks every lock past its time. dav-server's MemLs never looks at
    /// expiry: an expired lock kept blocking writes and kept its memory.
    async fn expire(&self) {
        let now = SystemTime::now();
        let gone: Vec<(String, DavPath)> = {
            let mut live = self.live();
            let gone: Vec<(String, DavPath)> = live
                .iter()
                .filter(|(_, (_, until))| *until <= now)
                .map(|(t, (p, _))| (t.clone(), p.clone()))
                .collect();
            for (t, _) in &gone {
                live.remove(t);
            }
            gone
        };
        for (token, path) in gone {
            let _ = self.inner.unlock(&path, &token).await;
        }
    }

    /// A refusal dav-server turns into 423 Locked: the trait has no other
    /// way to say no.
    fn refusal(path: &DavPath) -> DavLock {
        DavLock {
            token: String::new(),
            path: Box::new(path.clone()),
            principal: None,
            owner: None,
            timeout_at: None,
            timeout: None,
            shared: false,
            deep: false,
        }
    }
}

impl DavLockSystem for BoundedLocks {
    fn lock(
        &'_ self,
        path: &DavPath,
        principal: Option<&str>,
        owner: Option<&Element>,
        timeout: Option<Duration>,
        shared: bool,
        deep: bool,
    ) -> LsFuture<'_, Result<DavLock, DavLock>> {
        let path = path.clone();
        let principal = principal.map(str::to_owned);
        let owner = owner.cloned();
        async move {
            if owner.as_ref().is_some_and(|o| xml_size(o) > MAX_OWNER) {
                tracing::warn!(path = %path, "lock refused: owner over {MAX_OWNER} bytes");
                return Err(Self::refusal(&path));
            }
            self.expire().await;
            {
                let live = self.live();
                if live.len() >= self.max {
                    tracing::warn!(path = %path, "lock refused: {} locks held", live.len());
                    return Err(Self::refusal(&path));
                }
            }
            let t = bounded(timeout);
            let lock = self
                .inner
                .lock(
                    &path,
                    principal.as_deref(),
                    owner.as_ref(),
                    Some(t),
                    shared,
                    deep,
                )
                .await?;
            let until = SystemTime::now() + t;
            self.live()
                .insert(lock.token.clone(), (path.clone(), until));
            Ok(lock)
        }
        .boxed()
    }

    fn unlock(&'_ self, path: &DavPath, token: &str) -> LsFuture<'_, Result<(), ()>> {
        let (path, token) = (path.clone(), token.to_owned());
        async move {
            let r = self.inner.unlock(&path, &token).await;
            if r.is_ok() {
                self.live().remove(&token);
            }
            r
        }
        .boxed()
    }

    fn refresh(
        &'_ self,
        path: &DavPath,
        token: &str,
        timeout: Option<Duration>,
    ) -> LsFuture<'_, Result<DavLock, ()>> {
        let (path, token) = (path.clone(), token.to_owned());
        async move {
            // An expired lock cannot be refreshed (412): it is gone first.
            self.expire().await;
            let t = bounded(timeout);
            let lock = self.inner.refresh(&path, &token, Some(t)).await?;
            if let Some(entry) = self.live().get_mut(&token) {
                entry.1 = SystemTime::now() + t;
            }
            Ok(lock)
        }
        .boxed()
    }

    fn check(
        &'_ self,
        path: &DavPath,
        principal: Option<&str>,
        ignore_principal: bool,
        deep: bool,
        submitted_tokens: &[String],
    ) -> LsFuture<'_, Result<(), DavLock>> {
        let path = path.clone();
        let principal = principal.map(str::to_owned);
        let tokens = submitted_tokens.to_vec();
        async move {
            self.expire().await;
            self.inner
                .check(&path, principal.as_deref(), ignore_principal, deep, &tokens)
                .await
        }
        .boxed()
    }

    fn discover(&'_ self, path: &DavPath) -> LsFuture<'_, Vec<DavLock>> {
        let path = path.clone();
        async move {
            self.expire().await;
            self.inner.discover(&path).await
        }
        .boxed()
    }

    fn delete(&'_ self, path: &DavPath) -> LsFuture<'_, Result<(), ()>> {
        let path = path.clone();
        async move {
            let r = self.inner.delete(&path).await;
            // Whole path segments: /d/m is not under /d/m0.
            let top = path
                .as_bytes()
                .strip_suffix(b"/")
                .unwrap_or(path.as_bytes())
                .to_vec();
            self.live().retain(|_, (p, _)| {
                let p = p.as_bytes();
                !(p.strip_suffix(b"/").unwrap_or(p) == top.as_slice()
                    || (p.starts_with(&top) && p.get(top.len()) == Some(&b'/')))
            });
            r
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> DavPath {
        DavPath::new(p).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn locks_are_counted_capped_and_freed_by_unlock() {
        let ls = BoundedLocks::new(2);
        let a = ls
            .lock(&path("/a"), None, None, None, false, false)
            .await
            .unwrap();
        ls.lock(&path("/b"), None, None, None, false, false)
            .await
            .unwrap();
        assert!(ls
            .lock(&path("/c"), None, None, None, false, false)
            .await
            .is_err());
        ls.unlock(&path("/a"), &a.token).await.unwrap();
        assert!(ls
            .lock(&path("/c"), None, None, None, false, false)
            .await
            .is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_lock_gets_a_bounded_timeout() {
        let ls = BoundedLocks::default();
        let none = ls
            .lock(&path("/a"), None, None, None, false, false)
            .await
            .unwrap();
        assert_eq!(none.timeout, Some(DEFAULT_TIMEOUT));
        let huge = Some(Duration::from_secs(u64::from(u32::MAX) * 10));
        let big = ls
            .lock(&path("/b"), None, None, huge, false, false)
            .await
            .unwrap();
        assert_eq!(big.timeout, Some(MAX_TIMEOUT));
        let r = ls.refresh(&path("/b"), &big.token, None).await.unwrap();
        assert_eq!(r.timeout, Some(DEFAULT_TIMEOUT));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_large_owner_is_refused() {
        let ls = BoundedLocks::default();
        let mut owner = Element::new("owner");
        owner
            .children
            .push(XMLNode::Text("x".repeat(MAX_OWNER + 1)));
        assert!(ls
            .lock(&path("/a"), None, Some(&owner), None, false, false)
            .await
            .is_err());
        let mut small = Element::new("owner");
        small.children.push(XMLNode::Text("me".into()));
        assert!(ls
            .lock(&path("/a"), None, Some(&small), None, false, false)
            .await
            .is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_expired_lock_blocks_nothing_and_cannot_be_refreshed() {
        let ls = BoundedLocks::new(1);
        let a = ls
            .lock(&path("/a"), None, None, Some(Duration::ZERO), false, false)
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(ls.check(&path("/a"), None, false, false, &[]).await.is_ok());
        assert!(ls.discover(&path("/a")).await.is_empty());
        assert!(ls.refresh(&path("/a"), &a.token, None).await.is_err());
        // And it no longer counts against the cap.
        assert!(ls
            .lock(&path("/b"), None, None, None, false, false)
            .await
            .is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn deleting_a_path_frees_only_locks_below_it_by_segment() {
        let ls = BoundedLocks::new(2);
        ls.lock(&path("/d/m0"), None, None, None, false, false)
            .await
            .unwrap();
        ls.lock(&path("/d/m"), None, None, None, false, false)
            .await
            .unwrap();
        ls.delete(&path("/d/m")).await.unwrap();
        // /d/m0 still counts: one place free, not two.
        assert!(ls
            .lock(&path("/e"), None, None, None, false, false)
            .await
            .is_ok());
        assert!(ls
            .lock(&path("/f"), None, None, None, false, false)
            .await
            .is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn deleting_a_tree_frees_its_locks_for_the_count() {
        let ls = BoundedLocks::new(1);
        ls.lock(&path("/d/x"), None, None, None, false, false)
            .await
            .unwrap();
        ls.delete(&path("/d/")).await.unwrap();
        assert!(ls
            .lock(&path("/e"), None, None, None, false, false)
            .await
            .is_ok());
    }
}
