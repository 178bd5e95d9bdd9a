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
    CertificateParams, DistinguishedName, DnType, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
};

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

impl Identity {
    /// Loads the identity from `dir`, or makes one (first start).
    pub fn load_or_create(dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = dir.join("identity.key");
        let made = match std::fs::read(&key_path) {
            Ok(der) => tls::IdentityKeys::from_pkcs8(&der)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let made = tls::IdentityKeys::generate()?;
                cloudlet_runtime::write_private(&key_path, &made.key.serialize_der())
                    .map_err(io(&key_path))?;
                tracing::info!("made the box's identity key");
                made
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        let spki = made.spki();
        let cert_path = dir.join("identity.crt");
        // The certificate is remade from the key when missing; what clients
        // pin is the key, which stays. One that names the key is kept as it
        // is (its signature's bytes differ from a new one's).
        let cert_der = match std::fs::read(&cert_path) {
            Ok(der) if tls::spki_of(&der.clone().into()).as_deref() == Some(spki.as_slice()) => der,
            _ => {
                cloudlet_runtime::write_private(&cert_path, &made.cert_der)
                    .map_err(io(&cert_path))?;
                made.cert_der
            }
        };
        Ok(Identity {
            key: made.key,
            params: made.params,
            cert_der,
            box_id: made.box_id,
            key_hash: made.key_hash,
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

    /// The identity key (PKCS#8 DER), for this box to present its identity
    /// certificate when it calls another box (box-to-box pairing).
    pub fn key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// The identity certificate as PEM, for people and browsers to install.
    pub fn cert_pem(&self) -> String {
        tls::pem("CERTIFICATE", &self.cert_der)
    }
}
