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
//!
//! An import happens once in a box's life: the registry records that it
//! was done ([`Registry::provisioned`], in the transaction that adds the
//! owner), and every later provision directory is refused. Init copies the
//! files again at each boot for as long as it fails to delete them from
//! the FAT partition; without the record, the next start would pair again
//! an owner revoked meanwhile.
//!
//! Files that cannot be read for good (permissions, a directory where a
//! file should be) are discarded like refused ones, and the service
//! starts: stopping it would stop it at every start, and with it every
//! credential of the box ([`ProvisionError::is_transient`]).

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
    /// provisioning was imported once already; files found later (copied
    /// again from a card init could not clean) would pair again an owner
    /// revoked since
    #[error("flash-time provisioning was imported already; these files are discarded (refused)")]
    AlreadyImported,
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

    /// Whether the next start may do better, so that this one should stop
    /// rather than discard the files.
    ///
    /// Only errors that say nothing about the files and that go away by
    /// themselves (or with the box) count: a full /data (ENOSPC, EDQUOT),
    /// a failing read or write of the card (EIO), or a lack of memory,
    /// descriptors or time. Discarding then would lose the owner for good
    /// (the PC pinned this identity: only a reflash mends it), while the
    /// start would fail anyway, or soon, at writing an identity or the
    /// registry. The registry failing is such an error too. Everything
    /// else, above all errors about the files themselves (EACCES on files
    /// root left when init could not name the service user, EISDIR,
    /// invalid data), would come back at every start: the service would
    /// never start, and the box would refuse every credential. Those are
    /// discarded; an error not known here is taken as lasting, since
    /// losing the provisioning is mended by the button, and a service
    /// that never starts is not.
    pub fn is_transient(&self) -> bool {
        use nix::libc;
        match self {
            ProvisionError::Registry(_) => true,
            ProvisionError::Io { source, .. } => {
                matches!(
                    source.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::OutOfMemory
                ) || matches!(
                    source.raw_os_error(),
                    Some(
                        libc::ENOSPC
                            | libc::EDQUOT
                            | libc::EIO
                            | libc::EBUSY
                            | libc::EMFILE
                            | libc::ENFILE
                            | libc::ENOMEM
                    )
                )
            }
            _ => false,
        }
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
    if registry.provisioned()? {
        return Err(ProvisionError::AlreadyImported);
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

    // The owner and the record that the import is over, in one
    // transaction: an import that stopped before is finished, one that
    // got here is not done again.
    let owner = match owner_hash {
        Some(hash) => Some(add_owner(registry, hash, owner_name.as_deref())?),
        None => {
            registry.mark_provisioned()?;
            None
        }
    };
    remove(&dir, state_dir)?;
    Ok(Some(Imported {
        box_id: offered.box_id,
        owner,
    }))
}

/// Pairs the flashing PC's key as an owner, unless it is paired already,
/// and records that provisioning was imported.
fn add_owner(
    registry: &Registry,
    hash: String,
    name: Option<&str>,
) -> Result<(String, bool), ProvisionError> {
    if let Some(d) = registry.lookup("key", &hash)? {
        // Paired by a start of a version that kept no record.
        registry.mark_provisioned()?;
        return Ok((d.id, false));
    }
    let name = name
        .map(str::trim)
        .filter(|n| registry::check_name(n).is_ok())
        .unwrap_or("owner");
    let (d, _) = registry.add_provisioned_owner(NewDevice {
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
/// files and files that cannot be read for good. An error returned (a
/// transient one, [`ProvisionError::is_transient`]) stops the start, so
/// that the service does not make an identity of its own over a
/// provisioned one it could not read this time; init starts it again.
pub fn at_start(state_dir: &Path, registry: &Registry) -> std::io::Result<()> {
    let e = match import(state_dir, registry) {
        Ok(_) => return Ok(()),
        Err(e) if e.is_transient() => return Err(std::io::Error::other(e)),
        Err(e) => e,
    };
    if e.is_refusal() {
        tracing::error!(error = %e, "flash-time provisioning refused; nothing more of it is imported");
    } else {
        tracing::error!(error = %e, "flash-time provisioning cannot be imported, and trying again would not help: discarded");
    }
    let dir = state_dir.join(DIR);
    if let Err(e) = remove(&dir, state_dir) {
        // Started all the same: it is refused again at every start.
        tracing::error!(error = %e, "cannot discard the flash-time provisioning; it is ignored");
    }
    Ok(())
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
    fn an_import_cut_short_before_the_owner_finishes_on_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let id = tls::IdentityKeys::generate().unwrap();
        let owner = tls::IdentityKeys::generate().unwrap();
        provision(d.path(), &id, Some(&owner.cert_der));
        // As if a start had written the identity, then died before the
        // owner was added.
        cloudlet_runtime::write_private(&d.path().join("identity.crt"), &id.cert_der).unwrap();
        cloudlet_runtime::write_private(&d.path().join("identity.key"), &id.key.serialize_der())
            .unwrap();
        assert!(!r.provisioned().unwrap());
        let done = import(d.path(), &r).unwrap().unwrap();
        assert_eq!(done.box_id, id.box_id);
        assert!(done.owner.unwrap().1, "the owner is added now");
        assert!(r.provisioned().unwrap(), "and the import recorded");
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
    fn an_owner_paired_by_a_start_that_kept_no_record_is_not_added_twice() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let id = tls::IdentityKeys::generate().unwrap();
        let owner = tls::IdentityKeys::generate().unwrap();
        provision(d.path(), &id, Some(&owner.cert_der));
        // An earlier version paired the owner and died before removing
        // the directory, with no record of the import.
        r.add(NewDevice {
            name: "laptop".into(),
            role: Role::Owner,
            how: PairedHow::Flash,
            key: Some(owner.key_hash.clone()),
            token: false,
        })
        .unwrap();
        let again = import(d.path(), &r).unwrap().unwrap();
        assert!(!again.owner.unwrap().1, "the owner is not added twice");
        assert_eq!(r.list().unwrap().len(), 1);
        assert!(r.provisioned().unwrap());
        assert!(!d.path().join(DIR).exists());
    }

    #[test]
    fn provisioning_copied_again_after_an_import_does_not_bring_a_revoked_owner_back() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let id = tls::IdentityKeys::generate().unwrap();
        let owner = tls::IdentityKeys::generate().unwrap();
        provision(d.path(), &id, Some(&owner.cert_der));
        at_start(d.path(), &r).unwrap();
        let (flashed, _) = r
            .list()
            .unwrap()
            .into_iter()
            .map(|d| (d.id, d.key))
            .next()
            .unwrap();
        // Another owner revokes the flashing PC.
        let (other, _) = r
            .add(NewDevice {
                name: "desktop".into(),
                role: Role::Owner,
                how: PairedHow::Local,
                key: None,
                token: true,
            })
            .unwrap();
        r.remove(&flashed).unwrap();
        // Init could not delete the files from the FAT partition, and
        // copies the very same ones again at the next boot.
        provision(d.path(), &id, Some(&owner.cert_der));
        assert!(matches!(
            import(d.path(), &r),
            Err(ProvisionError::AlreadyImported)
        ));
        at_start(d.path(), &r).unwrap();
        assert!(!d.path().join(DIR).exists(), "discarded");
        let all = r.list().unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].id, other.id);
        assert!(r.lookup("key", &owner.key_hash).unwrap().is_none());
        // An identity alone is refused just the same, on a reopened registry.
        drop(r);
        let r = Registry::open(d.path()).unwrap();
        provision(d.path(), &id, None);
        at_start(d.path(), &r).unwrap();
        assert!(!d.path().join(DIR).exists());
        assert_eq!(r.list().unwrap().len(), 1);
    }

    #[test]
    fn files_that_cannot_be_read_for_good_are_discarded_and_the_service_starts() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let id = tls::IdentityKeys::generate().unwrap();
        let owner = tls::IdentityKeys::generate().unwrap();
        provision(d.path(), &id, Some(&owner.cert_der));
        // A directory where a file should be (read: EISDIR).
        let key = d.path().join(DIR).join("identity.key");
        std::fs::remove_file(&key).unwrap();
        std::fs::create_dir(&key).unwrap();
        let e = import(d.path(), &r).unwrap_err();
        assert!(matches!(e, ProvisionError::Io { .. }), "{e}");
        assert!(!e.is_transient(), "{e}");
        at_start(d.path(), &r).unwrap();
        assert!(!d.path().join(DIR).exists(), "discarded");
        assert!(r.list().unwrap().is_empty());
        assert!(!r.provisioned().unwrap());
        let made = crate::identity::Identity::load_or_create(d.path()).unwrap();
        assert_ne!(
            made.box_id, id.box_id,
            "the box made an identity of its own"
        );
    }

    #[test]
    fn only_errors_that_may_go_away_stop_the_start() {
        let io = |e: std::io::Error| ProvisionError::Io {
            path: "x".into(),
            source: e,
        };
        let os = |n| io(std::io::Error::from_raw_os_error(n));
        use nix::libc;
        for n in [
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EIO,
            libc::EINTR,
            libc::ENOMEM,
            libc::EMFILE,
        ] {
            assert!(os(n).is_transient(), "{n}");
        }
        for n in [
            libc::EACCES,
            libc::EPERM,
            libc::EISDIR,
            libc::ENOTDIR,
            libc::ELOOP,
            libc::EROFS,
        ] {
            assert!(!os(n).is_transient(), "{n}");
        }
        assert!(!io(std::io::ErrorKind::InvalidData.into()).is_transient());
        assert!(!ProvisionError::Mismatch.is_transient());
        assert!(!ProvisionError::AlreadyImported.is_transient());
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
