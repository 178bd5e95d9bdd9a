//! Finding the box: DNS-SD over multicast DNS (`mdns-sd`), so `cloudlet
//! discover`, file managers and `avahi-browse` see it on the LAN.
//!
//! Announced, each with the box ID in TXT (`id`):
//!
//! | type | port | TXT |
//! |---|---|---|
//! | `_cloudlet._tcp` | the web UI's (pairing, devices) | `id`, `key` (SHA-256 of the identity key), `v`, `sync` (sync's port) |
//! | `_https._tcp` | the web UI's | `id`, `path=/` |
//! | `_webdavs._tcp` | storage's | `id`, `path=/files/` |
//!
//! A service listening on a loopback address (a host run, a test) announces
//! nothing unless `CLOUDLET_MDNS_INTERFACE` names the interface to use
//! (the tests use `lo`); `CLOUDLET_MDNS=off` turns announcing off. The
//! records carry the box ID, which anyone on the LAN may know: it is in
//! every TLS handshake anyway.
//!
//! Another box finds a paired box's services from the `_cloudlet._tcp`
//! record (`cloudlet_runtime::dial::resolve`): its addresses, and the port
//! of sync in TXT `sync`.

use std::net::SocketAddr;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

/// storage's port on the box (`CLOUDLET_STORAGE_PORT` says otherwise).
const STORAGE_PORT: u16 = 8081;
/// sync's port on the box (`CLOUDLET_SYNC_PORT` says otherwise).
const SYNC_PORT: u16 = 5984;

/// A port from the variable `var`, else `default`.
fn port_from(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

/// What to announce and where.
pub struct Announcement<'a> {
    pub box_id: &'a str,
    pub key_hash: &'a str,
    /// Where the sharing service (the web UI) listens.
    pub web: SocketAddr,
}

/// Starts announcing; the returned daemon announces until it is dropped
/// (or shut down). `None` when announcing is off, or when it cannot start
/// (logged: the box works without it, only unseen).
pub fn start(a: &Announcement<'_>) -> Option<ServiceDaemon> {
    if std::env::var("CLOUDLET_MDNS").is_ok_and(|v| v == "off") {
        return None;
    }
    let interface = std::env::var("CLOUDLET_MDNS_INTERFACE").ok();
    if interface.is_none() && a.web.ip().is_loopback() {
        return None;
    }
    match announce(a, interface.as_deref()) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "mDNS: not announcing the box");
            None
        }
    }
}

fn host_name() -> String {
    let h = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ok =
        !h.is_empty() && h.len() <= 63 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        h
    } else {
        "cloudlet".into()
    }
}

/// A service type, its port and its TXT pairs.
type Record<'a> = (&'static str, u16, Vec<(&'static str, &'a str)>);

fn announce(
    a: &Announcement<'_>,
    interface: Option<&str>,
) -> Result<ServiceDaemon, mdns_sd::Error> {
    let mdns = ServiceDaemon::new()?;
    if let Some(i) = interface {
        mdns.disable_interface(IfKind::All)?;
        mdns.enable_interface(i)?;
    } else {
        // The LAN only: nothing on loopback.
        mdns.disable_interface(IfKind::LoopbackV4)?;
        mdns.disable_interface(IfKind::LoopbackV6)?;
    }
    let host = host_name();
    let fqdn = format!("{host}.local.");
    let storage_port = port_from("CLOUDLET_STORAGE_PORT", STORAGE_PORT);
    let sync_port = port_from("CLOUDLET_SYNC_PORT", SYNC_PORT).to_string();
    let version = env!("CARGO_PKG_VERSION");
    let records: [Record<'_>; 3] = [
        (
            "_cloudlet._tcp.local.",
            a.web.port(),
            vec![
                ("id", a.box_id),
                ("key", a.key_hash),
                ("v", version),
                ("sync", &sync_port),
            ],
        ),
        (
            "_https._tcp.local.",
            a.web.port(),
            vec![("id", a.box_id), ("path", "/")],
        ),
        (
            "_webdavs._tcp.local.",
            storage_port,
            vec![("id", a.box_id), ("path", "/files/")],
        ),
    ];
    for (ty, port, txt) in records {
        let info = ServiceInfo::new(ty, &host, &fqdn, "", port, &txt[..])?.enable_addr_auto();
        mdns.register(info)?;
    }
    tracing::info!(host = %fqdn, box_id = a.box_id, "announcing the box over mDNS");
    Ok(mdns)
}
