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
    use super::with_port;

    #[test]
    fn an_address_without_a_port_gets_the_sharing_port() {
        assert_eq!(with_port("box.local"), "box.local:8080");
        assert_eq!(with_port("10.0.0.2:9443"), "10.0.0.2:9443");
        assert_eq!(with_port("[::1]"), "[::1]:8080");
        assert_eq!(with_port("[::1]:8443"), "[::1]:8443");
        assert_eq!(with_port("::1"), "[::1]:8080");
        assert_eq!(with_port("fe80::1"), "[fe80::1]:8080");
    }
}
