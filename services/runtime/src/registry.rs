//! Asking the device registry (kept by the sharing service) whether a
//! credential belongs to a paired device, over D-Bus (zbus, peer to peer on
//! a Unix socket: no broker to run, one connection per service).
//!
//! * [`RegistryAuth`] is the [`Authenticator`] every service but sharing
//!   uses. It caches what the registry said for [`CACHE_FOR`], and drops the
//!   whole cache on the registry's `Changed` signal (a device revoked,
//!   renamed, added), so a revocation takes effect in every service at once,
//!   without a restart. While the registry cannot be reached nothing is
//!   cached and every request gets 503: a service never guesses.
//! * The interface ([`INTERFACE`] at [`PATH`]): `Check(kind, hash) ->
//!   (device, name, role)` with an empty device for "unknown" (kind `key`,
//!   `token`, or `issuer`: the key of the CA that certified a client's key,
//!   answered only for a paired box); `IssueTlsCert` and `Boxes` for the
//!   box's services; `AddDevice`, `Revoke`, `List` for root on the box
//!   (`cloudletd sharing add-device`); the `Changed(device)` signal.
//!
//! Tokens never cross the bus: a service sends the token's hash
//! ([`token_hash`]), which is how the registry keeps it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::auth::{AuthError, Authenticator, CheckFuture, Identity, Presented};

/// The D-Bus interface the registry serves.
pub const INTERFACE: &str = "org.cloudlet.Registry1";
/// The object path it serves it at.
pub const PATH: &str = "/org/cloudlet/Registry";
/// Where the registry listens unless `CLOUDLET_REGISTRY_SOCKET` says.
pub const DEFAULT_SOCKET: &str = "/run/cloudlet/bus/registry.sock";
/// The variable that moves the socket (host runs, tests).
pub const SOCKET_VAR: &str = "CLOUDLET_REGISTRY_SOCKET";
/// How long an answer is reused without asking again (a revocation does not
/// wait for this: the signal clears the cache).
pub const CACHE_FOR: Duration = Duration::from_secs(60);
/// Answers kept at most; the cache starts over when full.
const CACHE_MAX: usize = 4096;
/// How long a check waits for the registry.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The registry's socket: `$CLOUDLET_REGISTRY_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_SOCKET.into())
}

/// The hash a token is looked up by (BLAKE3, hex).
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// A peer-to-peer D-Bus connection to the registry.
pub async fn connect(socket: &Path) -> zbus::Result<zbus::Connection> {
    let io = |e: std::io::Error| zbus::Error::InputOutput(Arc::new(e));
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .and_then(|s| s.into_std())
        .map_err(io)?;
    zbus::connection::Builder::unix_stream(stream)
        .p2p()
        .build()
        .await
}

/// Calls `method` of the registry on `conn` and reads its answer.
pub async fn call<A, R>(conn: &zbus::Connection, method: &str, args: &A) -> zbus::Result<R>
where
    A: serde::Serialize + zbus::zvariant::DynamicType,
    R: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type,
{
    let reply = conn
        .call_method(None::<&str>, PATH, Some(INTERFACE), method, args)
        .await?;
    reply.body().deserialize::<R>()
}

/// A fresh TLS key and its certificate chain (service certificate, box
/// identity), from the registry's `IssueTlsCert`.
pub async fn issue_tls(conn: &zbus::Connection) -> std::io::Result<(Vec<Vec<u8>>, Vec<u8>)> {
    call::<_, (Vec<Vec<u8>>, Vec<u8>)>(conn, "IssueTlsCert", &())
        .await
        .map_err(|e| std::io::Error::other(format!("no TLS certificate from the registry: {e}")))
}

/// A box this box is paired with, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedBox {
    /// The registry's id of it.
    pub device: String,
    pub name: String,
    /// Its box ID (from its key).
    pub box_id: String,
    /// SHA-256 (hex) of its identity key: what its services' certificate
    /// chains must end with ([`crate::dial::box_client_config`]).
    pub key_hash: String,
}

/// The boxes this box is paired with (the registry's `Boxes`; the box's
/// services may ask).
pub async fn paired_boxes(conn: &zbus::Connection) -> std::io::Result<Vec<PairedBox>> {
    let listed = tokio::time::timeout(
        CALL_TIMEOUT,
        call::<_, Vec<(String, String, String)>>(conn, "Boxes", &()),
    )
    .await
    .map_err(|_| std::io::Error::other("the registry did not list the paired boxes in time"))?
    .map_err(|e| {
        std::io::Error::other(format!("the registry did not list the paired boxes: {e}"))
    })?;
    Ok(listed
        .into_iter()
        .filter_map(|(device, name, key_hash)| {
            Some(PairedBox {
                box_id: crate::tls::box_id_of_key_hash(&key_hash)?,
                device,
                name,
                key_hash,
            })
        })
        .collect())
}

/// A service's TLS certificate chain (its certificate, then the box's
/// identity certificate, DER) and its key (PKCS#8 DER), as the registry
/// issued them: what the service serves with, and presents when it calls
/// another box.
#[derive(Clone)]
pub struct ServiceCert {
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ServiceCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ServiceCert")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    conn: Option<zbus::Connection>,
    cache: HashMap<String, (Identity, Instant)>,
    /// Bumped whenever the cache is dropped, so an answer asked for before
    /// a revocation is not cached after it.
    generation: u64,
}

impl Inner {
    fn forget(&mut self) {
        self.cache.clear();
        self.generation = self.generation.wrapping_add(1);
    }
}

/// The registry's answer, cached, as an [`Authenticator`].
pub struct RegistryAuth {
    inner: Arc<Mutex<Inner>>,
    /// The certificate the service serves with, once issued.
    cert: tokio::sync::Mutex<Option<ServiceCert>>,
    /// Each `Changed(device)`, after the cache is dropped for it.
    changed: tokio::sync::broadcast::Sender<String>,
    /// Ends the background task when the service drops this.
    _watch: tokio_util::sync::DropGuard,
}

impl RegistryAuth {
    /// Starts keeping a connection to the registry at `socket` (in the
    /// background, reconnecting whenever it drops). Needs a tokio runtime.
    pub fn start(socket: PathBuf) -> RegistryAuth {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (changed, _) = tokio::sync::broadcast::channel(64);
        tokio::spawn(watch(socket, inner.clone(), changed.clone(), stop.clone()));
        RegistryAuth {
            inner,
            cert: tokio::sync::Mutex::new(None),
            changed,
            _watch: stop.drop_guard(),
        }
    }

    /// [`RegistryAuth::start`], then waits a little for the first
    /// connection, so that a service that reports ready can answer at once.
    /// Without the registry it starts anyway (and answers 503 until it comes).
    pub async fn start_and_wait(socket: PathBuf) -> RegistryAuth {
        let auth = RegistryAuth::start(socket.clone());
        if !auth.connected(Duration::from_secs(5)).await {
            tracing::warn!(socket = %socket.display(), "the device registry is not reachable yet: requests get 503 until it is");
        }
        auth
    }

    /// How the service is to serve: TLS with a fresh key certified by the
    /// box's identity (asked of the registry), or plain HTTP when the
    /// options say so (loopback only, checked by [`crate::ServiceOptions::check`]).
    pub async fn transport(
        &self,
        opts: &crate::ServiceOptions,
    ) -> std::io::Result<crate::Transport> {
        opts.check().map_err(std::io::Error::other)?;
        if opts.plain {
            tracing::warn!(listen = %opts.listen, "plain HTTP on loopback, no TLS (--plain)");
            return Ok(crate::Transport::Plain);
        }
        let ServiceCert { chain, key } = self.service_cert().await?;
        let config = crate::tls::server_config(chain, key).map_err(std::io::Error::other)?;
        Ok(crate::Transport::Tls(config))
    }

    /// The service's certificate chain and key: the ones it serves with
    /// ([`RegistryAuth::transport`]), asked of the registry on first use and
    /// kept for the service's life. A service presents them when it calls
    /// another box ([`crate::dial::box_client_config`]).
    pub async fn service_cert(&self) -> std::io::Result<ServiceCert> {
        let mut kept = self.cert.lock().await;
        if let Some(c) = kept.as_ref() {
            return Ok(c.clone());
        }
        let conn = self
            .conn()
            .map_err(|e| std::io::Error::other(format!("no TLS certificate: {e}")))?;
        let (chain, key) = issue_tls(&conn).await?;
        let c = ServiceCert { chain, key };
        *kept = Some(c.clone());
        Ok(c)
    }

    /// The boxes this box is paired with, asked of the registry now (not
    /// cached: a box unpaired a moment ago is not listed).
    pub async fn paired_boxes(&self) -> std::io::Result<Vec<PairedBox>> {
        paired_boxes(&self.conn()?).await
    }

    fn conn(&self) -> std::io::Result<zbus::Connection> {
        lock(&self.inner)
            .conn
            .clone()
            .ok_or_else(|| std::io::Error::other("the device registry is not reachable"))
    }

    /// Waits (up to `timeout`) until the registry is connected.
    pub async fn connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if lock(&self.inner).conn.is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding it leaves only a cache behind: use it anyway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the connection: connect, drop the cache on every `Changed`, and
/// when the connection ends, forget everything and connect again.
async fn watch(
    socket: PathBuf,
    inner: Arc<Mutex<Inner>>,
    changed: tokio::sync::broadcast::Sender<String>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut wait = Duration::from_millis(50);
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = connect(&socket) => c,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(socket = %socket.display(), error = %e, "registry not reachable yet");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {},
                }
                wait = (wait * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        wait = Duration::from_millis(50);
        let mut messages = zbus::MessageStream::from(&conn);
        {
            let mut i = lock(&inner);
            i.forget();
            i.conn = Some(conn.clone());
        }
        // Changes made while there was no connection were not heard: every
        // running request asks again ("" names no one device).
        let _ = changed.send(String::new());
        tracing::info!(socket = %socket.display(), "registry connected");
        loop {
            let m = tokio::select! {
                _ = stop.cancelled() => return,
                m = messages.next() => m,
            };
            let m = match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "registry message");
                    continue;
                }
                None => break,
            };
            let header = m.header();
            if m.message_type() == zbus::message::Type::Signal
                && header.member().is_some_and(|n| n.as_str() == "Changed")
            {
                // Unreadable, it names no device: "" makes every running
                // request ask again.
                let device: String = m.body().deserialize().unwrap_or_default();
                tracing::info!(device, "registry changed: credentials are checked again");
                lock(&inner).forget();
                // Requests of that device still running are checked again
                // (nobody listening is fine).
                let _ = changed.send(device);
            }
        }
        tracing::warn!("registry connection lost: every request waits for it");
        let mut i = lock(&inner);
        i.conn = None;
        i.forget();
    }
}

impl Authenticator for RegistryAuth {
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.changed.subscribe())
    }

    fn check(&self, p: Presented) -> CheckFuture<'_> {
        Box::pin(async move {
            // A proved key wins over a token: it cannot be replayed.
            let (kind, hash) = match (&p.key, &p.token) {
                (Some(k), _) => ("key", k.clone()),
                (None, Some(t)) => ("token", token_hash(t)),
                (None, None) if p.malformed => return Err(AuthError::Invalid),
                (None, None) => return Err(AuthError::Missing),
            };
            // A key certified by a CA is also asked about as the CA's key
            // (another box's service): the registry answers that only for
            // a paired box.
            let issuer = p.issuer.as_deref().filter(|_| kind == "key");
            let cache_key = match issuer {
                Some(i) => format!("{kind}:{hash}/{i}"),
                None => format!("{kind}:{hash}"),
            };
            let (conn, generation) = {
                let mut i = lock(&self.inner);
                if let Some((who, at)) = i.cache.get(&cache_key) {
                    if at.elapsed() < CACHE_FOR {
                        return Ok(who.clone());
                    }
                }
                i.cache.remove(&cache_key);
                (i.conn.clone(), i.generation)
            };
            let conn = conn.ok_or(AuthError::Unavailable)?;
            let mut answer = ask(&conn, kind, &hash).await?;
            if let (true, Some(i)) = (answer.0.is_empty(), issuer) {
                answer = ask(&conn, "issuer", i).await?;
            }
            let (device, name, role) = answer;
            if device.is_empty() {
                return Err(AuthError::Invalid);
            }
            let who = Identity { device, name, role };
            let mut i = lock(&self.inner);
            if i.generation == generation {
                if i.cache.len() >= CACHE_MAX {
                    i.cache.clear();
                }
                i.cache.insert(cache_key, (who.clone(), Instant::now()));
            }
            Ok(who)
        })
    }
}

/// One `Check` of the registry: (device, name, role), the device empty for
/// nobody's; unavailable when the registry does not answer in time.
async fn ask(
    conn: &zbus::Connection,
    kind: &str,
    hash: &str,
) -> Result<(String, String, String), AuthError> {
    let answer = tokio::time::timeout(
        CALL_TIMEOUT,
        call::<_, (String, String, String)>(conn, "Check", &(kind, hash)),
    )
    .await;
    match answer {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, kind, "registry check failed");
            Err(AuthError::Unavailable)
        }
        Err(_) => {
            tracing::warn!(kind, "registry check timed out");
            Err(AuthError::Unavailable)
        }
    }
}
