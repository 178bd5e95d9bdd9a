//! TLS for every service (rustls, TLS 1.3 and 1.2, ring).
//!
//! The box's identity is an ECDSA P-256 key pair kept by the sharing service
//! and shown as a self-signed CA certificate; each service serves with a
//! key of its own, made at each start and certified by the identity over the
//! bus (`IssueTlsCert`). A paired native client pins the identity: it trusts
//! that one certificate as its only root and names the box by its box ID
//! ([`box_dns_name`]), so no public CA and no warning are involved.
//!
//! Clients may present a certificate of their own (mutual TLS). It is not
//! checked against any CA: the handshake proves the client holds the key,
//! and the registry decides whether that key ([`key_hash`], SHA-256 of the
//! SubjectPublicKeyInfo) belongs to a paired device. A client without a
//! certificate (a browser, rclone with a token) is let through the
//! handshake and must then show a token.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The TLS library's ring provider, shared by servers and clients.
// rustls deprecates ring's provider in favour of aws-lc-rs (for post-quantum
// key exchange); aws-lc-rs needs CMake and a C cross build for the box that
// these machines do not have. Revisit when the image builds it.
//
// Key exchange: X25519 first. This rustls lists P-384 first for ring, and
// a client's first group is the key share it sends, so every handshake paid
// for P-384 (`scripts/bench tls` measured the handshake rate both ways).
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::kx_group;
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(p)
}

/// SHA-256 (hex) of a SubjectPublicKeyInfo (DER): how keys are pinned and
/// looked up in the registry.
pub fn key_hash(spki_der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, spki_der))
}

/// The SubjectPublicKeyInfo (DER) of a certificate, if it parses.
pub fn spki_of(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(ee.subject_public_key_info().as_ref().to_vec())
}

/// The short, human-checkable box ID of an identity key: the first 80 bits
/// of its [`key_hash`] in lower-case base32, as four groups of four
/// (`abcd-efgh-ijkm-nopq`). Two boxes share one only by breaking SHA-256's
/// second-preimage resistance at 80 bits, which nobody on a LAN does while
/// a person reads the ID aloud.
pub fn box_id(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let mut bits: u128 = 0;
    for b in digest.as_ref().iter().take(10) {
        bits = (bits << 8) | u128::from(*b);
    }
    let mut out = String::with_capacity(19);
    for i in 0..16u32 {
        let shift = 75u32.saturating_sub(i.saturating_mul(5));
        let idx = ((bits >> shift) & 31) as usize;
        if i > 0 && i % 4 == 0 {
            out.push('-');
        }
        out.push(char::from(*ALPHABET.get(idx).unwrap_or(&b'a')));
    }
    out
}

/// The DNS name every service certificate carries for the box, and that a
/// paired client verifies: `<box id without dashes>.cloudlet`.
pub fn box_dns_name(box_id: &str) -> String {
    format!("{}.cloudlet", box_id.replace('-', ""))
}

/// Accepts any client certificate whose handshake signature verifies (the
/// client holds its key); the registry then decides about the key.
#[derive(Debug)]
struct AnyClientKey {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientKey {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // No CA and no dates: the key is what is paired, and a box's clock
        // may be unset. It must parse, so its key can be named.
        match spki_of(end_entity) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A server configuration for `chain` (the service's certificate, then the
/// box's identity certificate) and its PKCS#8 key, asking clients for an
/// optional certificate.
pub fn server_config(
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(AnyClientKey {
        algs: provider.signature_verification_algorithms,
    });
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The [`key_hash`] of the certificate a client presented on `conn`.
pub fn peer_key(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    spki_of(cert).map(|spki| key_hash(&spki))
}

/// The label of the keying material pairing codes come from.
pub const PAIRING_EXPORTER_LABEL: &[u8] = b"EXPORTER-cloudlet-pairing-code";

/// What a TLS connection tells its requests (in their extensions): the
/// 32 bytes of keying material pairing derives its code from (RFC 8446
/// section 7.5, [`PAIRING_EXPORTER_LABEL`]); both ends compute the same
/// bytes, and a relay that holds two sessions gets two different ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionBinding(pub [u8; 32]);

/// [`SessionBinding`] of a finished TLS 1.3 handshake (TLS 1.2's exporter
/// is sound only with extended master secret: pairing asks for 1.3).
pub fn session_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Option<SessionBinding> {
    if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return None;
    }
    conn.export_keying_material([0u8; 32], PAIRING_EXPORTER_LABEL, None)
        .ok()
        .map(SessionBinding)
}

/// The six digits a pairing shows, from a session's [`SessionBinding`].
pub fn pairing_code(b: &SessionBinding) -> String {
    let e = &b.0;
    let n = u32::from_be_bytes([e[0], e[1], e[2], e[3]]) % 1_000_000;
    format!("{n:06}")
}

/// The box identity's self-signed CA certificate for `box_id`: a CA that
/// may sign service certificates only (path length 0), valid from 2000 to
/// 9999 (the box's clock may be unset, and what a client trusts is the
/// pinned key, not a date). The sharing service makes it on first start,
/// and `cloudlet flash` makes it on a PC in exactly the same form.
pub fn identity_params(box_id: &str) -> rcgen::CertificateParams {
    use rcgen::{BasicConstraints, DnType, IsCa, KeyUsagePurpose};
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Cloudlet {box_id}"));
    dn.push(DnType::OrganizationName, "Cloudlet box");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(9999, 12, 31);
    p
}

/// A box identity: its ECDSA P-256 key, the self-signed certificate that
/// says so, and the names derived from the key.
pub struct IdentityKeys {
    pub key: rcgen::KeyPair,
    pub params: rcgen::CertificateParams,
    /// The certificate (DER).
    pub cert_der: Vec<u8>,
    pub box_id: String,
    /// [`key_hash`] of the key: what clients pin.
    pub key_hash: String,
}

impl IdentityKeys {
    /// A new identity key and its certificate.
    pub fn generate() -> Result<IdentityKeys, rcgen::Error> {
        IdentityKeys::from_key(rcgen::KeyPair::generate_for(
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )?)
    }

    /// The identity of an existing key (PKCS#8 DER), its certificate made anew.
    pub fn from_pkcs8(der: &[u8]) -> Result<IdentityKeys, rcgen::Error> {
        IdentityKeys::from_key(rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(der),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )?)
    }

    fn from_key(key: rcgen::KeyPair) -> Result<IdentityKeys, rcgen::Error> {
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let box_id = box_id(&spki);
        let params = identity_params(&box_id);
        let cert_der = params.self_signed(&key)?.der().to_vec();
        Ok(IdentityKeys {
            key_hash: key_hash(&spki),
            key,
            params,
            cert_der,
            box_id,
        })
    }

    /// The key's SubjectPublicKeyInfo (DER).
    pub fn spki(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key)
    }
}

/// DER as PEM text with `label` (`CERTIFICATE`, `PRIVATE KEY`).
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The DER inside the first PEM block labelled `label` in `text`, if
/// there is one and it decodes.
pub fn from_pem(label: &str, text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let (_, rest) = text.split_once(begin.as_str())?;
    let (body, _) = rest.split_once(end.as_str())?;
    let b64: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_ids_are_four_groups_of_base32_and_follow_the_key() {
        let a = box_id(b"key one");
        let b = box_id(b"key two");
        assert_eq!(a.len(), 19);
        assert_eq!(a.matches('-').count(), 3);
        assert!(a
            .chars()
            .all(|c| c == '-' || c.is_ascii_lowercase() || ('2'..='7').contains(&c)));
        assert_ne!(a, b);
        assert_eq!(a, box_id(b"key one"));
        assert_eq!(box_dns_name("abcd-efgh"), "abcdefgh.cloudlet");
        // The first 10 bytes of SHA-256("abc") in RFC 4648 base32, as
        // Python's base64.b32encode gives them.
        assert_eq!(box_id(b"abc"), "xj4b-np4p-ahh6-uqkb");
    }

    #[test]
    fn pairing_codes_are_six_digits_from_the_session() {
        assert_eq!(pairing_code(&SessionBinding([0; 32])), "000000");
        let mut e = [0u8; 32];
        e[..4].copy_from_slice(&1_234_567u32.to_be_bytes());
        assert_eq!(pairing_code(&SessionBinding(e)), "234567");
        assert_eq!(
            pairing_code(&SessionBinding([0xff; 32])),
            format!("{:06}", u32::MAX % 1_000_000)
        );
    }

    #[test]
    fn an_identity_names_its_own_key_and_survives_pem() {
        let a = IdentityKeys::generate().unwrap();
        let cert = CertificateDer::from(a.cert_der.clone());
        assert_eq!(spki_of(&cert).unwrap(), a.spki());
        assert_eq!(a.box_id, box_id(&a.spki()));
        assert_eq!(a.key_hash, key_hash(&a.spki()));
        let key_pem = pem("PRIVATE KEY", &a.key.serialize_der());
        assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = IdentityKeys::from_pkcs8(&from_pem("PRIVATE KEY", &key_pem).unwrap()).unwrap();
        assert_eq!(again.box_id, a.box_id);
        let cert_pem = pem("CERTIFICATE", &a.cert_der);
        assert_eq!(from_pem("CERTIFICATE", &cert_pem).unwrap(), a.cert_der);
        assert_eq!(from_pem("PRIVATE KEY", &cert_pem), None, "wrong label");
        assert_eq!(
            from_pem(
                "CERTIFICATE",
                "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n"
            ),
            None
        );
        assert_ne!(IdentityKeys::generate().unwrap().box_id, a.box_id);
    }
}
