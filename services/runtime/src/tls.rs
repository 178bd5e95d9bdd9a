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
//!
//! A service of another box presents its chain, [its own fresh key, its
//! box's identity]: when the identity is a CA and signed the key
//! ([`certified_by`]), [`peer_issuer`] names the identity's key too, and
//! the registry lets the client in as that key only if it is a paired
//! box's. Calling such a service works the other way round
//! ([`crate::dial::box_client_config`]).

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
    box_id_from_digest(ring::digest::digest(&ring::digest::SHA256, spki_der).as_ref())
}

fn box_id_from_digest(digest: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bits: u128 = 0;
    for b in digest.iter().take(10) {
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

/// The SubjectPublicKeyInfo (DER) of `issuer` when `issuer` is a CA
/// certificate and `leaf` carries its signature: how one box's service
/// shows that its fresh key was certified by the box's identity. No dates
/// are checked (a box's clock may be unset): what is trusted is a key, and
/// the caller decides whose key it is.
pub fn certified_by(leaf: &CertificateDer<'_>, issuer: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let (signed, alg, signature) = signed_parts(leaf)?;
    if !is_ca(issuer) {
        return None;
    }
    let ca = webpki::EndEntityCert::try_from(issuer).ok()?;
    // One identifier may name several algorithms (ECDSA with SHA-256 over
    // P-256 or P-384): the one matching the issuer's key verifies.
    let verified = provider()
        .signature_verification_algorithms
        .all
        .iter()
        .filter(|a| a.signature_alg_id().as_ref() == alg.as_slice())
        .any(|a| ca.verify_signature(*a, &signed, &signature).is_ok());
    verified.then(|| ca.subject_public_key_info().as_ref().to_vec())
}

/// A certificate's signed part (DER), the contents of its signature
/// algorithm's identifier (as rustls names algorithms) and its signature.
fn signed_parts(cert: &[u8]) -> Option<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    yasna::parse_der(cert, |r| {
        r.read_sequence(|r| {
            let signed = r.next().read_der()?;
            let alg = r.next().read_sequence(|r| {
                let mut parts = r.next().read_der()?;
                while let Some(more) = r.read_optional(|r| r.read_der())? {
                    parts.extend(more);
                }
                Ok(parts)
            })?;
            let (signature, unused_bits) = r.next().read_bitvec_bytes()?;
            Ok((signed, alg, signature, unused_bits))
        })
    })
    .ok()
    .filter(|(_, _, _, unused_bits)| *unused_bits % 8 == 0)
    .map(|(signed, alg, signature, _)| (signed, alg, signature))
}

/// Whether a certificate's basic constraints say it is a CA's.
fn is_ca(cert: &[u8]) -> bool {
    let said = yasna::parse_der(cert, |r| {
        r.read_sequence(|r| {
            let ca = r.next().read_sequence(|tbs| {
                // Version, serial, algorithm, names, dates, key and unique
                // ids are skipped: the extensions are the `[3]`.
                let mut ca = false;
                while let Some(raw) = tbs.read_optional(|r| r.read_der())? {
                    if raw.first() == Some(&0xa3) {
                        ca = yasna::parse_der(&raw, extensions_say_ca)?;
                    }
                }
                Ok(ca)
            })?;
            r.next().read_der()?;
            r.next().read_der()?;
            Ok(ca)
        })
    });
    said.unwrap_or(false)
}

/// The `cA` flag of the basicConstraints (RFC 5280 section 4.2.1.9) among
/// a certificate's extensions; false without one.
fn extensions_say_ca(r: yasna::BERReader<'_, '_>) -> yasna::ASN1Result<bool> {
    let basic = yasna::models::ObjectIdentifier::from_slice(&[2, 5, 29, 19]);
    r.read_tagged(yasna::Tag::context(3), |r| {
        let mut ca = false;
        r.read_sequence_of(|r| {
            r.read_sequence(|r| {
                let id = r.next().read_oid()?;
                let _critical = r.read_default(false, |r| r.read_bool())?;
                let value = r.next().read_bytes()?;
                if id == basic {
                    ca = yasna::parse_der(&value, |r| {
                        r.read_sequence(|r| {
                            let ca = r.read_default(false, |r| r.read_bool())?;
                            let _path_length = r.read_optional(|r| r.read_u64())?;
                            Ok(ca)
                        })
                    })?;
                }
                Ok(())
            })
        })?;
        Ok(ca)
    })
}

/// The [`key_hash`] of the CA that certified the client's key on `conn`,
/// when the client presented a chain `[its certificate, that CA's]` that
/// [`certified_by`] accepts. The registry lets such a client in as the CA's
/// key only when that key is a paired box's.
pub fn peer_issuer(conn: &rustls::ServerConnection) -> Option<String> {
    match conn.peer_certificates()? {
        [leaf, issuer, ..] => certified_by(leaf, issuer).map(|spki| key_hash(&spki)),
        _ => None,
    }
}

/// The box ID of the identity key whose [`key_hash`] is `hash` (both come
/// from the same SHA-256): how a box known to the registry only by its key
/// is named, and its services' certificates checked ([`box_dns_name`]).
pub fn box_id_of_key_hash(hash: &str) -> Option<String> {
    let digest = hex::decode(hash).ok().filter(|d| d.len() == 32)?;
    Some(box_id_from_digest(&digest))
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
    fn a_box_id_follows_from_its_key_hash_alone() {
        let a = IdentityKeys::generate().unwrap();
        assert_eq!(box_id_of_key_hash(&a.key_hash).unwrap(), a.box_id);
        assert_eq!(box_id_of_key_hash("abcd"), None, "too short");
        assert_eq!(box_id_of_key_hash(&"zz".repeat(32)), None, "not hex");
    }

    /// A service certificate for `box_id`, signed by `issuer` (made the way
    /// the sharing service issues them).
    fn service_cert(
        box_id: &str,
        issuer: &rcgen::CertificateParams,
        issuer_key: &rcgen::KeyPair,
    ) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let p = rcgen::CertificateParams::new(vec![box_dns_name(box_id)]).unwrap();
        let issuer = rcgen::Issuer::from_params(issuer, issuer_key);
        p.signed_by(&key, &issuer).unwrap().der().to_vec()
    }

    #[test]
    fn a_chain_names_its_issuer_only_when_the_issuer_is_a_ca_that_signed_the_leaf() {
        let a = IdentityKeys::generate().unwrap();
        let b = IdentityKeys::generate().unwrap();
        let leaf = CertificateDer::from(service_cert(&a.box_id, &a.params, &a.key));
        let ca_a = CertificateDer::from(a.cert_der.clone());
        let ca_b = CertificateDer::from(b.cert_der.clone());
        assert_eq!(certified_by(&leaf, &ca_a), Some(a.spki()));
        assert_eq!(certified_by(&leaf, &ca_b), None, "signed by another key");
        assert_eq!(certified_by(&ca_a, &ca_a), Some(a.spki()), "self-signed CA");

        // The right key, but in a certificate that is not a CA's.
        let mut not_ca = rcgen::CertificateParams::new(vec!["x.cloudlet".into()]).unwrap();
        not_ca.is_ca = rcgen::IsCa::ExplicitNoCa;
        let not_ca = CertificateDer::from(not_ca.self_signed(&a.key).unwrap().der().to_vec());
        assert_eq!(spki_of(&not_ca).unwrap(), a.spki());
        assert_eq!(certified_by(&leaf, &not_ca), None, "issuer is no CA");

        // A leaf whose dates are long past still counts: no clock is trusted.
        let mut old = rcgen::CertificateParams::new(vec!["old.cloudlet".into()]).unwrap();
        old.not_before = rcgen::date_time_ymd(1990, 1, 1);
        old.not_after = rcgen::date_time_ymd(1991, 1, 1);
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let old = old
            .signed_by(&k, &rcgen::Issuer::from_params(&a.params, &a.key))
            .unwrap();
        let old = CertificateDer::from(old.der().to_vec());
        assert_eq!(certified_by(&old, &ca_a), Some(a.spki()));

        assert_eq!(
            certified_by(&CertificateDer::from(vec![1, 2, 3]), &ca_a),
            None
        );
        // Cut short anywhere, or flipped anywhere in the signed part,
        // neither certificate passes (and nothing panics).
        for n in 0..leaf.len() {
            let cut = CertificateDer::from(leaf[..n].to_vec());
            assert_eq!(certified_by(&cut, &ca_a), None);
            let cut_ca = CertificateDer::from(a.cert_der[..n.min(a.cert_der.len() - 1)].to_vec());
            assert_eq!(certified_by(&leaf, &cut_ca), None);
        }
        let (signed, _, _) = signed_parts(&leaf).unwrap();
        assert_eq!(&leaf[4..4 + signed.len()], signed.as_slice());
        for i in (0..signed.len()).step_by(7) {
            let mut bent = leaf.to_vec();
            // The signed part starts after the outer header (4 bytes here).
            bent[4 + i] ^= 0x01;
            assert_eq!(
                certified_by(&CertificateDer::from(bent), &ca_a),
                None,
                "byte {i}"
            );
        }
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
