//! Flash-time provisioning, the box's side. `cloudlet flash` made the box's
//! identity on the owner's PC and wrote it, with the PC's device
//! certificate, to the card's boot partition; init moved the files into
//! `<state dir>/provision/` on first boot. Here, before the identity is
//! loaded, they become the box's identity and its first owner:
//!
//! ```text
//! identity.key   the box's key (PKCS#8, PEM)
//! identity.crt   its self-signed CA certificate (PEM); must name that key
//! owner.crt      the PC's device certificate (PEM): paired as owner, how "flash"
//! owner.name     what the box calls that PC (one line; "owner" if absent or unusable)
//! ```
//!
//! Every step can be done again: a start killed half-way imports the rest
//! next time (the identity's certificate is written before its key, and a
//! key already in the registry is not added twice), and the directory goes
//! only once everything in it is durable. What is refused (a certificate
//! that does not name the key, a box that has an identity already, an
//! owner without the identity it came with) is logged and discarded whole:
//! nothing of it is imported.

use std::path::{Path, PathBuf};

use cloudlet_runtime::tls;

use crate::registry::{self, NewDevice, PairedHow, Registry, RegistryError, Role};

/// The directory under the state directory that init fills.
pub const DIR: &str = "provision";
/// Larger files than this are not what `cloudlet flash` writes.
const MAX_FILE: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// reading or writing a file failed (the import is tried again at the next start)
    #[error("provisioning {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the registry failed (tried again at the next start)
    #[error("provisioning the owner: {0}")]
    Registry(#[from] RegistryError),
    /// a file is not what `cloudlet flash` writes
    #[error("provisioned {0} is not a PEM {1} (refused)")]
    Malformed(&'static str, &'static str),
    /// only one half of the identity is there
    #[error(
        "provisioned identity.key and identity.crt come together; only {0} is there (refused)"
    )]
    Incomplete(&'static str),
    /// the certificate is for another key
    #[error("provisioned identity.crt does not name the key in identity.key (refused)")]
    Mismatch,
    /// an owner with no identity: it would add an owner to a box the PC never pinned
    #[error("provisioned owner.crt comes without the box identity it was made with (refused)")]
    OwnerWithoutIdentity,
    /// the box made or imported another identity before
    #[error("this box already has the identity {have}; the provisioned identity {offered} is discarded with its owner")]
    IdentityExists { have: String, offered: String },
}

impl ProvisionError {
    /// Whether the provisioned files themselves are refused (and so
    /// discarded), rather than this attempt having failed.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            ProvisionError::Io { .. } | ProvisionError::Registry(_)
        )
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub box_id: String,
    /// The owner device's id in the registry, and whether this import added it.
    pub owner: Option<(String, bool)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A provisioned file's text; `None` when it is not there.
fn read(dir: &Path, name: &str) -> Result<Option<String>, ProvisionError> {
    use std::io::Read;
    let path = dir.join(name);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(io(&path))?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Imports `<state_dir>/provision` if it is there: the identity (unless
/// the box has another one), then the owner; then removes the directory.
/// `Ok(None)`: nothing to import.
pub fn import(state_dir: &Path, registry: &Registry) -> Result<Option<Imported>, ProvisionError> {
    let dir = state_dir.join(DIR);
    if !dir.is_dir() {
        return Ok(None);
    }
    let key = read(&dir, "identity.key")?;
    let crt = read(&dir, "identity.crt")?;
    let owner = read(&dir, "owner.crt")?;
    let owner_name = read(&dir, "owner.name")?;
    let (key, crt) = match (key, crt) {
        (Some(k), Some(c)) => (k, c),
        (None, None) if owner.is_some() => return Err(ProvisionError::OwnerWithoutIdentity),
        (None, None) => {
            remove(&dir, state_dir)?;
            return Ok(None);
        }
        (Some(_), None) => return Err(ProvisionError::Incomplete("identity.key")),
        (None, Some(_)) => return Err(ProvisionError::Incomplete("identity.crt")),
    };
    let key_der = tls::from_pem("PRIVATE KEY", &key)
        .ok_or(ProvisionError::Malformed("identity.key", "PRIVATE KEY"))?;
    let cert_der = tls::from_pem("CERTIFICATE", &crt)
        .ok_or(ProvisionError::Malformed("identity.crt", "CERTIFICATE"))?;
    let offered = tls::IdentityKeys::from_pkcs8(&key_der)
        .map_err(|_| ProvisionError::Malformed("identity.key", "ECDSA P-256 PRIVATE KEY"))?;
    let names = tls::spki_of(&cert_der.clone().into())
        .ok_or(ProvisionError::Malformed("identity.crt", "CERTIFICATE"))?;
    if names != offered.spki() {
        return Err(ProvisionError::Mismatch);
    }
    let owner_hash = match &owner {
        Some(text) => {
            let der = tls::from_pem("CERTIFICATE", text)
                .ok_or(ProvisionError::Malformed("owner.crt", "CERTIFICATE"))?;
            let spki = tls::spki_of(&der.into())
                .ok_or(ProvisionError::Malformed("owner.crt", "CERTIFICATE"))?;
            Some(tls::key_hash(&spki))
        }
        None => None,
    };

    // The identity: the certificate first, the key last, since a key on
    // disk is what says the box has an identity.
    let key_path = state_dir.join("identity.key");
    match std::fs::read(&key_path) {
        Ok(have) if have == key_der => {} // imported by a start that stopped half-way
        Ok(have) => {
            let have = tls::IdentityKeys::from_pkcs8(&have)
                .map(|h| h.box_id)
                .unwrap_or_else(|_| "(unreadable)".into());
            return Err(ProvisionError::IdentityExists {
                have,
                offered: offered.box_id,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let cert_path = state_dir.join("identity.crt");
            cloudlet_runtime::write_private(&cert_path, &cert_der).map_err(io(&cert_path))?;
            cloudlet_runtime::write_private(&key_path, &key_der).map_err(io(&key_path))?;
            tracing::info!(box_id = %offered.box_id, "imported the box identity made when the card was flashed");
        }
        Err(e) => return Err(io(&key_path)(e)),
    }

    let owner = match owner_hash {
        Some(hash) => Some(add_owner(registry, hash, owner_name.as_deref())?),
        None => None,
    };
    remove(&dir, state_dir)?;
    Ok(Some(Imported {
        box_id: offered.box_id,
        owner,
    }))
}

/// Pairs the flashing PC's key as an owner, unless it is paired already.
fn add_owner(
    registry: &Registry,
    hash: String,
    name: Option<&str>,
) -> Result<(String, bool), ProvisionError> {
    if let Some(d) = registry.lookup("key", &hash)? {
        return Ok((d.id, false));
    }
    let name = name
        .map(str::trim)
        .filter(|n| registry::check_name(n).is_ok())
        .unwrap_or("owner");
    let (d, _) = registry.add(NewDevice {
        name: name.to_owned(),
        role: Role::Owner,
        how: PairedHow::Flash,
        key: Some(hash),
        token: false,
    })?;
    tracing::info!(device = %d.id, name = %d.name, "a new device was paired: the owner named when the card was flashed");
    Ok((d.id, true))
}

/// Removes the provision directory and makes that durable.
fn remove(dir: &Path, state_dir: &Path) -> Result<(), ProvisionError> {
    std::fs::remove_dir_all(dir).map_err(io(dir))?;
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(state_dir))
}

/// The start's hook: imports, logs what happened, and discards refused
/// files. An error returned (a file or the registry failing) stops the
/// start, so that the service does not make an identity of its own over a
/// provisioned one it could not read; init starts it again.
pub fn at_start(state_dir: &Path, registry: &Registry) -> std::io::Result<()> {
    match import(state_dir, registry) {
        Ok(_) => Ok(()),
        Err(e) if e.is_refusal() => {
            tracing::error!(error = %e, "flash-time provisioning refused; nothing of it is imported");
            let dir = state_dir.join(DIR);
            remove(&dir, state_dir).map_err(std::io::Error::other)
        }
        Err(e) => Err(std::io::Error::other(e)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn provision(state: &Path, id: &tls::IdentityKeys, owner_der: Option<&[u8]>) {
        let dir = state.join(DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("identity.key"),
            tls::pem("PRIVATE KEY", &id.key.serialize_der()),
        )
        .unwrap();
        std::fs::write(
            dir.join("identity.crt"),
            tls::pem("CERTIFICATE", &id.cert_der),
        )
        .unwrap();
        if let Some(o) = owner_der {
            std::fs::write(dir.join("owner.crt"), tls::pem("CERTIFICATE", o)).unwrap();
            std::fs::write(dir.join("owner.name"), "laptop\n").unwrap();
        }
    }

    #[test]
    fn an_import_cut_short_finishes_on_the_next_start_without_a_second_owner() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let id = tls::IdentityKeys::generate().unwrap();
        let owner = tls::IdentityKeys::generate().unwrap();
        provision(d.path(), &id, Some(&owner.cert_der));
        // As if a start had written the identity and the owner, then died
        // before removing the directory.
        import(d.path(), &r).unwrap();
        provision(d.path(), &id, Some(&owner.cert_der));
        let again = import(d.path(), &r).unwrap().unwrap();
        assert_eq!(again.box_id, id.box_id);
        assert!(!again.owner.unwrap().1, "the owner is not added twice");
        let all = r.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, "laptop");
        assert_eq!(all[0].paired_how, PairedHow::Flash);
        assert_eq!(all[0].key.as_deref(), Some(owner.key_hash.as_str()));
        assert!(!d.path().join(DIR).exists());
        assert_eq!(
            crate::identity::Identity::load_or_create(d.path())
                .unwrap()
                .box_id,
            id.box_id
        );
    }

    #[test]
    fn another_identity_on_the_box_is_kept_and_the_provisioned_one_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let had = crate::identity::Identity::load_or_create(d.path()).unwrap();
        let id = tls::IdentityKeys::generate().unwrap();
        let owner = tls::IdentityKeys::generate().unwrap();
        provision(d.path(), &id, Some(&owner.cert_der));
        let e = import(d.path(), &r).unwrap_err();
        assert!(
            matches!(&e, ProvisionError::IdentityExists { have, offered } if *have == had.box_id && *offered == id.box_id),
            "{e}"
        );
        at_start(d.path(), &r).unwrap();
        assert!(!d.path().join(DIR).exists(), "discarded");
        assert!(r.list().unwrap().is_empty(), "no owner came with it");
        assert_eq!(
            crate::identity::Identity::load_or_create(d.path())
                .unwrap()
                .box_id,
            had.box_id
        );
    }

    #[test]
    fn half_an_identity_or_an_owner_alone_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let id = tls::IdentityKeys::generate().unwrap();
        provision(d.path(), &id, Some(&id.cert_der));
        std::fs::remove_file(d.path().join(DIR).join("identity.crt")).unwrap();
        assert!(matches!(
            import(d.path(), &r),
            Err(ProvisionError::Incomplete("identity.key"))
        ));
        std::fs::remove_file(d.path().join(DIR).join("identity.key")).unwrap();
        assert!(matches!(
            import(d.path(), &r),
            Err(ProvisionError::OwnerWithoutIdentity)
        ));
        assert!(!d.path().join("identity.key").exists());
        assert!(r.list().unwrap().is_empty());
    }
}
