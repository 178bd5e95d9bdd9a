//! The registry on the bus: the D-Bus interface other services ask
//! ([`cloudlet_runtime::registry`] is the other end), peer to peer on a Unix
//! socket, one connection per service.
//!
//! Anyone who can connect may ask `Check` (a hash in, a yes or no out: the
//! tokens themselves never cross). The box's services may ask for TLS
//! certificates (`IssueTlsCert`) and for the paired boxes (`Boxes`).
//! Changing the registry (`AddDevice`, `Revoke`) and listing it need the
//! peer to be root or the sharing service's own user: root on the box, or
//! the developer who started a host run. The kernel tells the peer's user
//! (SO_PEERCRED), not the peer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cloudlet_runtime::registry::{INTERFACE, PATH};
use zbus::fdo;

use crate::identity::Identity;
use crate::registry::{NewDevice, PairedHow, Registry, RegistryError, Role};

/// How long one peer may take to accept a `Changed` signal.
const SIGNAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Connections one local user may hold open at once (a service needs one;
/// each `cloudletd sharing` command one while it runs).
pub const MAX_PEERS_PER_USER: usize = 16;
/// Connections all users together may hold open at once.
pub const MAX_PEERS: usize = 128;

/// Tells every connected service that the registry changed.
#[derive(Default)]
pub struct Notifier {
    /// Each peer's connection, numbered (peer-to-peer connections have no
    /// bus name to tell them apart by).
    conns: Mutex<(u64, Vec<(u64, zbus::Connection)>)>,
    /// Open connections (and handshakes) by the peer's user.
    peers: Mutex<std::collections::HashMap<u32, usize>>,
}

/// One admitted connection of `uid`: its place is given back when dropped.
struct Slot {
    notifier: Arc<Notifier>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut peers = self
            .notifier
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = peers.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                peers.remove(&self.uid);
            }
        }
    }
}

impl Notifier {
    fn add(&self, c: zbus::Connection) -> u64 {
        let mut g = self.lock();
        g.0 = g.0.wrapping_add(1);
        let n = g.0;
        g.1.push((n, c));
        n
    }

    fn remove(&self, n: u64) {
        self.lock().1.retain(|(m, _)| *m != n);
    }

    /// A place for one more connection of `uid`, unless that user or all
    /// together are at their limit.
    fn admit(self: &Arc<Self>, uid: u32) -> Option<Slot> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let all: usize = peers.values().sum();
        let mine = peers.entry(uid).or_insert(0);
        if *mine >= MAX_PEERS_PER_USER || all >= MAX_PEERS {
            return None;
        }
        *mine = mine.saturating_add(1);
        Some(Slot {
            notifier: self.clone(),
            uid,
        })
    }

    /// Connections open now.
    pub fn peers(&self) -> usize {
        self.lock().1.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<(u64, zbus::Connection)>)> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `Changed(device)` to every service at once; forgets peers that
    /// are gone or do not take it within [`SIGNAL_TIMEOUT`] (a peer that
    /// stops reading must not hold up a revocation for the others).
    pub async fn changed(&self, device: &str) {
        let conns = self.lock().1.clone();
        let sends = conns.iter().map(|(n, c)| async move {
            let sent = tokio::time::timeout(
                SIGNAL_TIMEOUT,
                c.emit_signal(None::<&str>, PATH, INTERFACE, "Changed", &(device,)),
            )
            .await;
            match sent {
                Ok(Ok(())) => None,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "a bus peer is gone");
                    Some(*n)
                }
                Err(_) => {
                    tracing::warn!("a bus peer did not take a change in time: dropped");
                    Some(*n)
                }
            }
        });
        let gone: Vec<u64> = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .flatten()
            .collect();
        let reached = conns.len().saturating_sub(gone.len());
        if !gone.is_empty() {
            self.lock().1.retain(|(n, _)| !gone.contains(n));
            // Closed, not just forgotten: a peer that missed a change must
            // not go on answering from its cache (it reconnects afresh).
            for (_, c) in conns.into_iter().filter(|(n, _)| gone.contains(n)) {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(SIGNAL_TIMEOUT, c.close()).await;
                });
            }
        }
        tracing::info!(device, peers = reached, "registry change sent");
    }
}

/// What the bus serves from.
#[derive(Clone)]
pub struct Shared {
    pub registry: Arc<Registry>,
    pub notifier: Arc<Notifier>,
    pub identity: Arc<Identity>,
    pub pairing: Arc<crate::pair::Pairing>,
}

/// One peer's view of the interface: what it may do depends on its user.
struct Iface {
    registry: Arc<Registry>,
    notifier: Arc<Notifier>,
    identity: Arc<Identity>,
    pairing: Arc<crate::pair::Pairing>,
    /// The peer may change the registry.
    admin: bool,
    /// The peer is a service of the box, which may get a TLS certificate.
    service: bool,
}

/// The users that run the box's services (and may get TLS certificates in
/// the box's name): root, this service's own user, and the users of the
/// other network services.
fn service_uids() -> Vec<u32> {
    let mut uids = vec![0, nix::unistd::geteuid().as_raw()];
    for name in ["storage", "sync", "updater"] {
        if let Ok(Some(u)) = nix::unistd::User::from_name(name) {
            uids.push(u.uid.as_raw());
        }
    }
    uids
}

fn failed(e: RegistryError) -> fdo::Error {
    fdo::Error::Failed(e.to_string())
}

impl Iface {
    fn need_admin(&self) -> fdo::Result<()> {
        if self.admin {
            Ok(())
        } else {
            Err(fdo::Error::AccessDenied(
                "only root on the box may change the registry".into(),
            ))
        }
    }

    async fn blocking<T, F>(&self, f: F) -> fdo::Result<T>
    where
        F: FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
        T: Send + 'static,
    {
        let r = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&r))
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?
            .map_err(failed)
    }
}

#[zbus::interface(name = "org.cloudlet.Registry1")]
impl Iface {
    /// Whose credential this is: `kind` is "key" or "token", `hash` its
    /// hash. An empty device id means nobody's. Kind "issuer" is the key of
    /// a CA that certified the client's key (another box's service,
    /// certified by its identity): it names a device only when that key is
    /// a paired box's, so a device cannot let in keys of its own making.
    async fn check(&self, kind: String, hash: String) -> fdo::Result<(String, String, String)> {
        if !matches!(kind.as_str(), "key" | "token" | "issuer") {
            return Err(fdo::Error::InvalidArgs(format!("unknown kind {kind:?}")));
        }
        let found = self
            .blocking(move |r| {
                let d = match kind.as_str() {
                    "issuer" => r.lookup_box(&hash)?,
                    _ => r.lookup(&kind, &hash)?,
                };
                if let Some(d) = &d {
                    // Only bookkeeping: a full /data must not lock every
                    // device out (found by the update test on a full disk).
                    if let Err(e) = r.seen(&d.id, crate::now()) {
                        tracing::warn!(device = %d.id, error = %e, "could not record when the device was last seen");
                    }
                }
                Ok(d)
            })
            .await?;
        Ok(match found {
            Some(d) => (d.id, d.name, d.role.as_str().to_owned()),
            None => (String::new(), String::new(), String::new()),
        })
    }

    /// Pairs a device by hand (root only): by its key (the SHA-256 of its
    /// public key, hex) when `key` is not empty, else with a new token.
    /// Returns its id and its token (empty for a key).
    async fn add_device(
        &self,
        name: String,
        role: String,
        key: String,
    ) -> fdo::Result<(String, String)> {
        self.need_admin()?;
        let role = Role::parse(&role)
            .ok_or_else(|| fdo::Error::InvalidArgs(format!("unknown role {role:?}")))?;
        let key = if key.is_empty() {
            None
        } else if key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(key.to_ascii_lowercase())
        } else {
            return Err(fdo::Error::InvalidArgs(
                "a key is the SHA-256 of the device's public key: 64 hex digits".into(),
            ));
        };
        let (device, token) = self
            .blocking(move |r| {
                r.add(NewDevice {
                    name,
                    role,
                    how: PairedHow::Local,
                    token: key.is_none(),
                    key,
                })
            })
            .await?;
        tracing::info!(device = %device.id, name = %device.name, role = role.as_str(), "device added on the box");
        self.notifier.changed(&device.id).await;
        Ok((device.id, token.unwrap_or_default()))
    }

    /// Forgets a device (root only); every service refuses it at once.
    async fn revoke(&self, id: String) -> fdo::Result<()> {
        self.need_admin()?;
        let gone = self.blocking(move |r| r.remove(&id)).await?;
        tracing::info!(device = %gone.id, name = %gone.name, "device revoked on the box");
        self.notifier.changed(&gone.id).await;
        Ok(())
    }

    /// A fresh TLS key for the calling service and its certificate chain
    /// (its certificate, then the box's identity certificate), signed by
    /// the identity. Only the box's services may ask.
    async fn issue_tls_cert(&self) -> fdo::Result<(Vec<Vec<u8>>, Vec<u8>)> {
        if !self.service {
            return Err(fdo::Error::AccessDenied(
                "only the box's services get certificates in its name".into(),
            ));
        }
        let identity = self.identity.clone();
        tokio::task::spawn_blocking(move || identity.issue(&crate::identity::host_names()))
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))?
            .map_err(|e| fdo::Error::Failed(e.to_string()))
    }

    /// Presses the box's button, as far as pairing is concerned (root
    /// only): for host runs and tests, which have no button. Root on the
    /// box can pair a device directly anyway.
    async fn press(&self) -> fdo::Result<()> {
        self.need_admin()?;
        tracing::info!("button press from the bus (cloudletd sharing press)");
        self.pairing.press().await;
        Ok(())
    }

    /// The paired boxes, as (device id, name, identity key hash): whom a
    /// service of this box may call as a box ([`cloudlet_runtime::dial`]).
    /// The box's services may ask.
    async fn boxes(&self) -> fdo::Result<Vec<(String, String, String)>> {
        if !self.service {
            return Err(fdo::Error::AccessDenied(
                "only the box's services may list the paired boxes".into(),
            ));
        }
        let boxes = self.blocking(|r| r.boxes()).await?;
        Ok(boxes
            .into_iter()
            .filter_map(|d| Some((d.id, d.name, d.key?)))
            .collect())
    }

    /// Every device, as JSON (root only).
    async fn list(&self) -> fdo::Result<String> {
        self.need_admin()?;
        let all = self.blocking(|r| r.list()).await?;
        serde_json::to_string(&all).map_err(|e| fdo::Error::Failed(e.to_string()))
    }
}

/// Binds the registry's socket at `path` (replacing a stale one), open to
/// every local user: what each may do is decided per call.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

/// Serves the registry to every peer that connects, until the task ends.
pub async fn serve(listener: tokio::net::UnixListener, socket: PathBuf, shared: Shared) {
    let own = nix::unistd::geteuid().as_raw();
    let services = service_uids();
    tracing::info!(socket = %socket.display(), "registry on the bus");
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "bus accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                tracing::warn!(error = %e, "bus peer without credentials: refused");
                continue;
            }
        };
        let Some(slot) = shared.notifier.admit(uid) else {
            tracing::warn!(uid, "bus: too many connections from this user: refused");
            continue;
        };
        let iface = Iface {
            registry: shared.registry.clone(),
            notifier: shared.notifier.clone(),
            identity: shared.identity.clone(),
            pairing: shared.pairing.clone(),
            admin: uid == 0 || uid == own,
            service: services.contains(&uid),
        };
        let notifier = shared.notifier.clone();
        // The handshake runs on its own, so one slow peer holds up nobody.
        tokio::spawn(async move {
            let built = async {
                let std = stream.into_std()?;
                zbus::connection::Builder::unix_stream(std)
                    .server(zbus::Guid::generate())
                    .p2p()
                    .serve_at(PATH, iface)
                    .build()
                    .await
                    .map_err(std::io::Error::other)
            };
            match tokio::time::timeout(std::time::Duration::from_secs(5), built).await {
                Ok(Ok(conn)) => {
                    tracing::debug!(uid, "bus peer connected");
                    let n = notifier.add(conn.clone());
                    // When the peer goes (or is dropped for not taking a
                    // change), its place and its slot are given back.
                    conn.closed().await;
                    notifier.remove(n);
                    tracing::debug!(uid, "bus peer gone");
                }
                Ok(Err(e)) => tracing::warn!(uid, error = %e, "bus handshake"),
                Err(_) => tracing::warn!(uid, "bus handshake timed out"),
            }
            drop(slot);
        });
    }
}
