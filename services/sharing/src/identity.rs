//! The box's identity: an ECDSA P-256 key pair made on first start and kept
//! in the sharing service's state directory (`identity.key`, PKCS#8 DER,
//! 0600, the service's own user), its box ID ([`tls::box_id`]), and the
//! self-signed CA certificate that says so (`identity.crt`, DER).
//!
//! P-256 because browsers accept it (they refuse Ed25519 certificates).
//! The identity key signs only certificates: each service's TLS key is made
//! fresh at each start and certified here ([`Identity::issue`]), so the one
//! long-lived secret never leaves this service.

use std::path::Path;

use cloudlet_runtime::tls;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::PrivatePkcs8KeyDer;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("identity key or certificate: {0}")]
    Cert(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub struct Identity {
    key: KeyPair,
    params: CertificateParams,
    /// The CA certificate (DER) as kept in `identity.crt`.
    pub cert_der: Vec<u8>,
    pub box_id: String,
    /// SHA-256 of the identity's public key: what clients pin.
    pub key_hash: String,
}

/// The box's own names for its certificates: its host name and
/// `HOSTNAME.local` (mDNS), when it has one.
pub fn host_names() -> Vec<String> {
    let Ok(h) = nix::unistd::gethostname() else {
        return Vec::new();
    };
    let h = h.to_string_lossy().into_owned();
    let valid =
        !h.is_empty() && h.len() <= 63 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid {
        return Vec::new();
    }
    vec![format!("{h}.local"), h]
}

fn ca_params(box_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Cloudlet {box_id}"));
    dn.push(DnType::OrganizationName, "Cloudlet box");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Valid from 2000 to 9999: the box's clock may be unset, and what a
    // client trusts is the pinned key, not a date.
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(9999, 12, 31);
    p
}

impl Identity {
    /// Loads the identity from `dir`, or makes one (first start).
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = dir.join("identity.key");
        let key = match std::fs::read(&key_path) {
            Ok(der) => KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(der),
                &PKCS_ECDSA_P256_SHA256,
            )?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
                cloudlet_runtime::write_private(&key_path, &key.serialize_der())
                    .map_err(io(&key_path))?;
                tracing::info!("made the box's identity key");
                key
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let box_id = tls::box_id(&spki);
        let key_hash = tls::key_hash(&spki);
        let params = ca_params(&box_id);
        let cert_path = dir.join("identity.crt");
        // The certificate is remade from the key when missing; what clients
        // pin is the key, which stays.
        let cert_der = match std::fs::read(&cert_path) {
            Ok(der) if tls::spki_of(&der.clone().into()).as_deref() == Some(spki.as_slice()) => der,
            _ => {
                let der = params.self_signed(&key)?.der().to_vec();
                cloudlet_runtime::write_private(&cert_path, &der).map_err(io(&cert_path))?;
                der
            }
        };
        Ok(Identity {
            key,
            params,
            cert_der,
            box_id,
            key_hash,
        })
    }

    /// A fresh TLS key and its certificate, signed by the identity, for a
    /// service answering as the box: the box ID's DNS name, `localhost`,
    /// the loopback addresses and `extra_names` (the box's host name).
    /// Returns the chain (service certificate, identity certificate) and
    /// the key (PKCS#8 DER).
    pub fn issue(&self, extra_names: &[String]) -> Result<(Vec<Vec<u8>>, Vec<u8>), IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut names = vec![tls::box_dns_name(&self.box_id), "localhost".to_owned()];
        names.extend(extra_names.iter().cloned());
        let mut p = CertificateParams::new(names)?;
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Cloudlet {}", self.box_id));
        p.distinguished_name = dn;
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(9999, 12, 31);
        p.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok((
            vec![cert.der().to_vec(), self.cert_der.clone()],
            key.serialize_der(),
        ))
    }

    /// The identity certificate as PEM, for people and browsers to install.
    pub fn cert_pem(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.cert_der);
        let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
        out
    }
}
