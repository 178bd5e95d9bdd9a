//! Calling a box over HTTPS: what the `cloudlet` command on a PC and a box
//! asking another box to pair both do. One connection (hyper over rustls)
//! presenting the caller's own certificate, checking the box either by the
//! identity pinned at pairing or, on first contact, by a chain that hangs
//! together ([`FirstContact`]), and the six-digit code of the session.

use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::tls;

/// The sharing service's port (pairing, devices) unless an address says.
pub const DEFAULT_PORT: u16 = 8080;

/// Largest answer read from a box: device lists and pairing state are small.
const ANSWER_LIMIT: usize = 1 << 20;

/// How long reaching a box (TCP and the TLS handshake) may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `HOST`, `HOST:PORT`, an IPv6 address bare or in brackets, with the port
/// made explicit.
pub fn with_port(addr: &str) -> String {
    if let Ok(ip) = addr.parse::<std::net::Ipv6Addr>() {
        return std::net::SocketAddr::from((ip, DEFAULT_PORT)).to_string();
    }
    match addr.parse::<hyper::http::uri::Authority>() {
        Ok(a) if a.port_u16().is_some() => addr.to_owned(),
        _ => format!("{addr}:{DEFAULT_PORT}"),
    }
}

/// What a box showed on first contact: its box ID and identity certificate.
#[derive(Debug, Default)]
pub struct Seen(Mutex<Option<(String, CertificateDer<'static>)>>);

impl Seen {
    /// The box ID and identity certificate the handshake showed, once it has.
    pub fn get(&self) -> Option<(String, CertificateDer<'static>)> {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

/// First contact: accepts a chain that hangs together (a certificate for
/// the box ID's name, signed by the identity the chain ends with), and
/// keeps that identity in [`Seen`]. What it proves is only that the box
/// holds that key: whether it is the right box is for the caller to check
/// (the box ID a person reads, the key an owner pinned, the code).
#[derive(Debug)]
pub struct FirstContact {
    seen: Arc<Seen>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl FirstContact {
    pub fn new() -> (Arc<FirstContact>, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let v = Arc::new(FirstContact {
            seen: seen.clone(),
            provider: tls::provider(),
        });
        (v, seen)
    }
}

impl ServerCertVerifier for FirstContact {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bad = || rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding);
        let identity = intermediates.last().ok_or_else(bad)?.clone().into_owned();
        let spki = tls::spki_of(&identity).ok_or_else(bad)?;
        let box_id = tls::box_id(&spki);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.clone())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = ServerName::try_from(tls::box_dns_name(&box_id)).map_err(|_| bad())?;
        let ok = inner.verify_server_cert(end_entity, &[], &name, ocsp, now)?;
        if let Ok(mut s) = self.seen.0.lock() {
            *s = Some((box_id, identity));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How the caller checks the box it calls.
pub enum Check {
    /// The box is met for the first time.
    FirstContact(Arc<FirstContact>),
    /// The identity certificate pinned at pairing (DER): the only root.
    Pinned(CertificateDer<'static>),
}

/// A TLS client configuration presenting `cert` (with its PKCS#8 `key`).
pub fn client_config(
    cert: CertificateDer<'static>,
    key: Vec<u8>,
    check: Check,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let b = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let b = match check {
        Check::FirstContact(v) => b.dangerous().with_custom_certificate_verifier(v),
        Check::Pinned(root) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(root).map_err(|e| e.to_string())?;
            b.with_root_certificates(roots)
        }
    };
    let config = b
        .with_client_auth_cert(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// Calling a service of a paired box: its chain must end with the box's
/// identity (pinned by [`tls::key_hash`], which is all the registry keeps
/// of a paired box), the service certificate must carry the identity's
/// signature and the box's name ([`tls::box_dns_name`]), and the handshake
/// must be signed by the service certificate's key. No dates: a box's
/// clock may be unset, and a pinned key is what is trusted.
#[derive(Debug)]
pub struct PinnedBox {
    key_hash: String,
    name: ServerName<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedBox {
    /// The check for the box whose identity key hashes to `key_hash`.
    pub fn new(key_hash: &str) -> Result<PinnedBox, String> {
        let box_id = tls::box_id_of_key_hash(key_hash)
            .ok_or_else(|| format!("{key_hash:?} is not the SHA-256 of a key"))?;
        let name = ServerName::try_from(tls::box_dns_name(&box_id)).map_err(|e| e.to_string())?;
        Ok(PinnedBox {
            key_hash: key_hash.to_ascii_lowercase(),
            name,
            provider: tls::provider(),
        })
    }
}

impl ServerCertVerifier for PinnedBox {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as E;
        let refuse = |e: E| rustls::Error::InvalidCertificate(e);
        if *server_name != self.name {
            return Err(refuse(E::NotValidForName));
        }
        let identity = intermediates.last().ok_or(refuse(E::UnknownIssuer))?;
        let spki = tls::certified_by(end_entity, identity).ok_or(refuse(E::BadSignature))?;
        if tls::key_hash(&spki) != self.key_hash {
            return Err(refuse(E::UnknownIssuer));
        }
        webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| refuse(E::BadEncoding))?
            .verify_is_valid_for_subject_name(server_name)
            .map_err(|_| refuse(E::NotValidForName))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a service needs to call a paired box's service: the TLS client
/// configuration and the name to ask for.
#[derive(Debug, Clone)]
pub struct BoxClient {
    /// Presents the calling service's own chain and checks the other box
    /// by its pinned identity ([`PinnedBox`]).
    pub config: Arc<rustls::ClientConfig>,
    /// The server name to connect with (SNI and `Host`): the box's
    /// `<box id>.cloudlet` name.
    pub server_name: String,
    /// The other box's ID.
    pub box_id: String,
}

impl BoxClient {
    /// One connection to the box's service at `addr` (`HOST:PORT`).
    pub async fn connect(&self, addr: &str) -> Result<Conn, String> {
        Conn::connect(addr, self.config.clone(), self.server_name.clone()).await
    }
}

/// A client for calling the services of the paired box whose identity key
/// hashes to `box_key_hash` ([`crate::registry::PairedBox::key_hash`]),
/// presenting `own` (this service's chain and key,
/// [`crate::registry::RegistryAuth::service_cert`]): the other box's
/// services let it in as that box, by the identity that certified it.
pub fn box_client_config(
    own: &crate::registry::ServiceCert,
    box_key_hash: &str,
) -> Result<BoxClient, String> {
    let check = PinnedBox::new(box_key_hash)?;
    let server_name = check.name.to_str().into_owned();
    let box_id = tls::box_id_of_key_hash(box_key_hash).unwrap_or_default();
    let chain: Vec<CertificateDer<'static>> = own
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(check))
        .with_client_auth_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(own.key.clone())),
        )
        .map_err(|e| e.to_string())?;
    Ok(BoxClient {
        config: Arc::new(config),
        server_name,
        box_id,
    })
}

/// The variable that gives boxes' addresses by hand, for tests and for
/// networks without multicast: entries `[box:]<box id>@<host>:<port>`,
/// separated by commas or spaces. An address given here is used instead of
/// mDNS for that box, whatever service is asked for.
pub const BOX_ADDRS_VAR: &str = "CLOUDLET_BOX_ADDRS";

/// The `_cloudlet._tcp` record every box announces over mDNS (with its box
/// ID in TXT `id`).
pub const MDNS_TYPE: &str = "_cloudlet._tcp.local.";

/// How long [`Resolver::resolve`] goes on listening once a box answered,
/// for the rest of its addresses.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Which service of a box to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoxService {
    /// The sharing service: the record's own port.
    Sharing,
    /// Sync: the port in TXT `sync`.
    Sync,
}

impl BoxService {
    /// The TXT entry that carries the service's port, if not the record's.
    pub fn txt_key(self) -> Option<&'static str> {
        match self {
            BoxService::Sharing => None,
            BoxService::Sync => Some("sync"),
        }
    }
}

/// The addresses `spec` ([`BOX_ADDRS_VAR`]'s form) gives for `box_id`
/// (compared without dashes or case). Entries that do not parse are skipped.
pub fn fixed_addresses(spec: &str, box_id: &str) -> Vec<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let want = normal_id(box_id);
    spec.split(|c: char| c == ',' || c.is_whitespace())
        .filter_map(|e| e.trim().split_once('@'))
        .filter(|(id, _)| normal_id(id.strip_prefix("box:").unwrap_or(id)) == want)
        .filter_map(|(_, addr)| addr.to_socket_addrs().ok())
        .flatten()
        .collect()
}

fn normal_id(id: &str) -> String {
    id.chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Where the services of other boxes are looked for: addresses given by
/// hand ([`BOX_ADDRS_VAR`]'s form), else mDNS on one interface or all.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    /// Addresses given by hand; a box named here is not looked for.
    pub fixed: Option<String>,
    /// The one interface mDNS uses (`lo` in tests), else every one.
    pub interface: Option<String>,
}

impl Resolver {
    /// [`BOX_ADDRS_VAR`] and `CLOUDLET_MDNS_INTERFACE` (the interface the
    /// sharing service announces on, when set).
    pub fn from_env() -> Resolver {
        Resolver {
            fixed: std::env::var(BOX_ADDRS_VAR).ok(),
            interface: std::env::var("CLOUDLET_MDNS_INTERFACE").ok(),
        }
    }

    /// Where `service` of the box `box_id` can be reached: the addresses
    /// given by hand for it, else those of the `_cloudlet._tcp` record
    /// that announces that box ID over mDNS, looked for at most `within`.
    /// Empty when the box was not found. The addresses are not trusted:
    /// the TLS check ([`box_client_config`]) is what says it is the box.
    pub async fn resolve(
        &self,
        box_id: &str,
        service: BoxService,
        within: std::time::Duration,
    ) -> Result<Vec<std::net::SocketAddr>, String> {
        let box_id = box_id.to_owned();
        let me = self.clone();
        // Both block: a host name given by hand is looked up, and mDNS waits.
        tokio::task::spawn_blocking(move || {
            if let Some(spec) = &me.fixed {
                let fixed = fixed_addresses(spec, &box_id);
                if !fixed.is_empty() {
                    return Ok(fixed);
                }
            }
            browse(&box_id, service, within, me.interface.as_deref())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// [`Resolver::resolve`] as the environment says ([`Resolver::from_env`]).
pub async fn resolve(
    box_id: &str,
    service: BoxService,
    within: std::time::Duration,
) -> Result<Vec<std::net::SocketAddr>, String> {
    Resolver::from_env().resolve(box_id, service, within).await
}

fn browse(
    box_id: &str,
    service: BoxService,
    within: std::time::Duration,
    interface: Option<&str>,
) -> Result<Vec<std::net::SocketAddr>, String> {
    use mdns_sd::{IfKind, ScopedIp, ServiceDaemon, ServiceEvent};
    use std::net::{SocketAddr, SocketAddrV6};
    let mdns = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    if let Some(i) = interface {
        mdns.disable_interface(IfKind::All)
            .map_err(|e| format!("mDNS: {e}"))?;
        mdns.enable_interface(i).map_err(|e| format!("mDNS: {e}"))?;
    }
    let events = mdns.browse(MDNS_TYPE).map_err(|e| format!("mDNS: {e}"))?;
    let want = normal_id(box_id);
    let mut until = std::time::Instant::now() + within;
    let mut found = Vec::new();
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        let Ok(event) = events.recv_timeout(left) else {
            break;
        };
        let ServiceEvent::ServiceResolved(s) = event else {
            continue;
        };
        if s.get_property_val_str("id").map(normal_id).as_deref() != Some(want.as_str()) {
            continue;
        }
        let port = match service.txt_key() {
            None => Some(s.get_port()),
            Some(k) => s.get_property_val_str(k).and_then(|p| p.parse().ok()),
        };
        let Some(port) = port.filter(|p| *p != 0) else {
            tracing::warn!(
                box_id,
                ?service,
                "the box announces no port for this service"
            );
            continue;
        };
        for ip in s.get_addresses() {
            let addr = match ip {
                ScopedIp::V6(v6) if (v6.addr().segments()[0] & 0xffc0) == 0xfe80 => {
                    // Link-local: only with its interface.
                    SocketAddr::V6(SocketAddrV6::new(*v6.addr(), port, 0, v6.scope_id().index))
                }
                other => SocketAddr::new(other.to_ip_addr(), port),
            };
            if !found.contains(&addr) {
                found.push(addr);
            }
        }
        // The box's addresses may come in more than one answer: once it
        // is found, a moment more for the rest, not the whole `within`.
        if !found.is_empty() {
            until = until.min(std::time::Instant::now() + SETTLE);
        }
    }
    let _ = mdns.shutdown();
    // IPv4 first: the LAN's usual way, and no scope to get wrong.
    found.sort_by_key(|a| !a.is_ipv4());
    Ok(found)
}

/// One HTTPS connection to a box.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    /// The session's pairing code (empty unless TLS 1.3).
    pub code: String,
}

impl Conn {
    /// Connects to `addr` (`HOST:PORT`), checking the box's certificate
    /// for `server_name` as `config` says, within [`CONNECT_TIMEOUT`].
    pub async fn connect(
        addr: &str,
        config: Arc<rustls::ClientConfig>,
        server_name: String,
    ) -> Result<Conn, String> {
        tokio::time::timeout(CONNECT_TIMEOUT, Conn::open(addr, config, server_name))
            .await
            .map_err(|_| format!("{addr} did not answer within {CONNECT_TIMEOUT:?}"))?
    }

    async fn open(
        addr: &str,
        config: Arc<rustls::ClientConfig>,
        server_name: String,
    ) -> Result<Conn, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach {addr}: {e}"))?;
        let name = ServerName::try_from(server_name.clone()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {addr}: {e}"))?;
        let code = tls::session_binding(tls.get_ref().1)
            .map(|b| tls::pairing_code(&b))
            .unwrap_or_default();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            host: server_name,
            code,
        })
    }

    /// One JSON call: the status and the answer (`null` when not JSON).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), String> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let limited = http_body_util::Limited::new(resp.into_body(), ANSWER_LIMIT);
        let body = limited
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_port_gets_the_sharing_port() {
        assert_eq!(with_port("box.local"), "box.local:8080");
        assert_eq!(with_port("10.0.0.2:9443"), "10.0.0.2:9443");
        assert_eq!(with_port("[::1]"), "[::1]:8080");
        assert_eq!(with_port("[::1]:8443"), "[::1]:8443");
        assert_eq!(with_port("::1"), "[::1]:8080");
        assert_eq!(with_port("fe80::1"), "[fe80::1]:8080");
    }

    #[test]
    fn fixed_addresses_name_boxes_by_id_with_or_without_dashes() {
        let spec = "box:abcd-efgh-ijkm-nopq@127.0.0.1:5984, qrst-uvwx-yz23-4567@[::1]:6000 junk";
        assert_eq!(
            fixed_addresses(spec, "abcd-efgh-ijkm-nopq"),
            vec!["127.0.0.1:5984".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert_eq!(
            fixed_addresses(spec, "QRSTUVWXYZ234567"),
            vec!["[::1]:6000".parse::<std::net::SocketAddr>().unwrap()]
        );
        assert!(fixed_addresses(spec, "aaaa-bbbb-cccc-dddd").is_empty());
        assert!(fixed_addresses("abcd-efgh-ijkm-nopq@nowhere", "abcd-efgh-ijkm-nopq").is_empty());
    }

    #[test]
    fn a_box_client_needs_the_sha256_of_a_key() {
        let own = crate::registry::ServiceCert {
            chain: vec![],
            key: vec![],
        };
        assert!(PinnedBox::new("not hex").is_err());
        assert!(box_client_config(&own, "abcd").is_err());
    }
}
