//! The device registry: who may reach the box. One redb database in the
//! sharing service's state directory (`registry.redb`), kept across updates
//! and rollbacks (it is on /data), gone only with a factory reset.
//!
//! A device is known by a credential of one of two kinds, never stored in
//! the clear:
//! * a key: the SHA-256 of its TLS certificate's public key (SPKI), which it
//!   proves by mutual TLS;
//! * a token: 256 random bits the box gave it (browsers, and clients that
//!   cannot present a certificate), kept as its BLAKE3 hash. The token has
//!   full entropy, so a fast hash is enough: nobody can guess a preimage.
//!
//! Looking a hash up in a table leaks at most which hashes exist, through
//! timing, never a token; the service compares nothing byte by byte itself.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// Device id -> [`Device`] as JSON.
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// "key:HEX" or "token:HEX" -> device id.
const CREDENTIALS: TableDefinition<&str, &str> = TableDefinition::new("credentials");
/// Counters: "serial", the number of the latest pairing; markers:
/// [`PROVISIONED`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Set (to 1) once flash-time provisioning was imported: any later
/// provision directory is refused, so that files the FAT partition kept
/// cannot pair again an owner revoked meanwhile.
const PROVISIONED: &str = "provisioned";

/// Longest device name kept.
pub const MAX_NAME: usize = 64;
/// Most devices a box keeps: a household's, with room to spare.
pub const MAX_DEVICES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Manages the box: approves later pairings, revokes devices.
    Owner,
    /// Reaches the box's data, manages nothing.
    Device,
    /// Another Cloudlet, for sync and shares between boxes.
    Box,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Device => "device",
            Role::Box => "box",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "owner" => Some(Role::Owner),
            "device" => Some(Role::Device),
            "box" => Some(Role::Box),
            _ => None,
        }
    }
}

/// How a device came to be paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairedHow {
    /// Two presses of the box's button, the first device of the box.
    Button,
    /// Two presses and the approval of an owner device.
    ButtonAndOwner,
    /// Written to the card when it was flashed.
    Flash,
    /// Added on the box itself by root (`cloudletd sharing add-device`).
    Local,
}

/// One paired device as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub paired_how: PairedHow,
    /// Seconds since the Unix epoch (the box's clock, which may be unset).
    pub paired_at: u64,
    /// When a service last let it in (at most a minute stale).
    pub last_seen: Option<u64>,
    /// SHA-256 of the device's public key (SPKI DER), hex.
    pub key: Option<String>,
    /// Whether a token credential exists (the token itself is not kept).
    pub has_token: bool,
    /// The number of this pairing: 1 for the box's first, counting up
    /// (0 for devices paired before pairings were numbered).
    #[serde(default)]
    pub serial: u64,
    /// For an owner, the latest pairing it has been told of
    /// ([`Registry::take_news`]).
    #[serde(default)]
    pub told_up_to: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database: {0}")]
    Db(#[from] redb::Error),
    #[error("registry record: {0}")]
    Record(#[from] serde_json::Error),
    #[error("no device {0:?}")]
    NoSuchDevice(String),
    #[error("the last owner cannot be removed: pair another owner first")]
    LastOwner,
    #[error("a device name must be 1 to {MAX_NAME} printable characters")]
    BadName,
    #[error("this key is already paired as {0:?}")]
    KeyTaken(String),
    #[error("the registry is full ({MAX_DEVICES} devices): revoke one first")]
    Full,
    #[error("cannot read random bytes: {0}")]
    Random(std::io::Error),
    #[error("the registry's worker failed: {0}")]
    Task(String),
}

fn db<E: Into<redb::Error>>(e: E) -> RegistryError {
    RegistryError::Db(e.into())
}

pub use cloudlet_runtime::registry::token_hash;

fn credential_key(kind: &str, hash: &str) -> String {
    format!("{kind}:{hash}")
}

/// A name is 1 to [`MAX_NAME`] characters, none of them control characters.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.trim().is_empty()
        && name.chars().count() <= MAX_NAME
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadName)
    }
}

/// What [`Registry::add`] makes.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub name: String,
    pub role: Role,
    pub how: PairedHow,
    /// SHA-256 of the public key, hex, for a device that proves a key.
    pub key: Option<String>,
    /// Whether to make a token for it.
    pub token: bool,
}

pub struct Registry {
    db: Database,
}

impl Registry {
    /// Opens (or makes) the registry in `dir`.
    pub fn open(dir: &Path) -> Result<Registry, RegistryError> {
        std::fs::create_dir_all(dir).map_err(|e| db(redb::StorageError::Io(e)))?;
        let path = dir.join("registry.redb");
        let db_ = Database::builder()
            .set_cache_size(1 << 20)
            .create(&path)
            .map_err(db)?;
        // Only the service reads who is paired (no secret is in it, but
        // the list of devices and keys is the owner's business).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| db(redb::StorageError::Io(e)))?;
        }
        let r = Registry { db: db_ };
        let tx = r.db.begin_write().map_err(db)?;
        tx.open_table(DEVICES).map_err(db)?;
        tx.open_table(CREDENTIALS).map_err(db)?;
        tx.open_table(META).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(r)
    }

    /// Every device, by id.
    pub fn list(&self) -> Result<Vec<Device>, RegistryError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(DEVICES).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Option<Device>, RegistryError> {
        let tx = self.db.begin_read().map_err(db)?;
        let t = tx.open_table(DEVICES).map_err(db)?;
        match t.get(id).map_err(db)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    /// Whether any owner is paired (after that, pairing needs an owner's approval).
    pub fn has_owner(&self) -> Result<bool, RegistryError> {
        Ok(self.list()?.iter().any(|d| d.role == Role::Owner))
    }

    /// The device a credential belongs to: `kind` is "key" or "token",
    /// `hash` the credential's hash ([`token_hash`] for tokens).
    pub fn lookup(&self, kind: &str, hash: &str) -> Result<Option<Device>, RegistryError> {
        let tx = self.db.begin_read().map_err(db)?;
        let creds = tx.open_table(CREDENTIALS).map_err(db)?;
        let Some(id) = creds.get(credential_key(kind, hash).as_str()).map_err(db)? else {
            return Ok(None);
        };
        let devices = tx.open_table(DEVICES).map_err(db)?;
        let found = devices.get(id.value()).map_err(db)?;
        match found {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    /// The paired box whose identity key hashes to `hash`: what a CA key
    /// that certified a client's key may be let in as. Any other device's
    /// key is not, so a device cannot mint keys of its own that pass.
    pub fn lookup_box(&self, hash: &str) -> Result<Option<Device>, RegistryError> {
        Ok(self.lookup("key", hash)?.filter(|d| d.role == Role::Box))
    }

    /// The paired boxes (each with the hash of its identity key).
    pub fn boxes(&self) -> Result<Vec<Device>, RegistryError> {
        let mut all = self.list()?;
        all.retain(|d| d.role == Role::Box && d.key.is_some());
        Ok(all)
    }

    /// Whether flash-time provisioning was imported already ([`Registry::mark_provisioned`]).
    pub fn provisioned(&self) -> Result<bool, RegistryError> {
        let tx = self.db.begin_read().map_err(db)?;
        let meta = tx.open_table(META).map_err(db)?;
        Ok(meta
            .get(PROVISIONED)
            .map_err(db)?
            .is_some_and(|v| v.value() != 0))
    }

    /// Records, durably, that flash-time provisioning was imported.
    pub fn mark_provisioned(&self) -> Result<(), RegistryError> {
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(META)
            .map_err(db)?
            .insert(PROVISIONED, 1)
            .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// Pairs a device; returns it and its token if one was asked for. The
    /// change is durable when this returns.
    pub fn add(&self, new: NewDevice) -> Result<(Device, Option<String>), RegistryError> {
        self.add_marked(new, false)
    }

    /// [`Registry::add`] for the owner that flash-time provisioning names,
    /// marking provisioning done in the same transaction: the owner is
    /// added and the import is over at once, or neither.
    pub fn add_provisioned_owner(
        &self,
        new: NewDevice,
    ) -> Result<(Device, Option<String>), RegistryError> {
        self.add_marked(new, true)
    }

    fn add_marked(
        &self,
        new: NewDevice,
        provisioned: bool,
    ) -> Result<(Device, Option<String>), RegistryError> {
        check_name(&new.name)?;
        let id = hex::encode(random::<5>()?);
        let token = if new.token {
            Some(hex::encode(random::<32>()?))
        } else {
            None
        };
        let mut device = Device {
            id: id.clone(),
            name: new.name.trim().to_owned(),
            role: new.role,
            paired_how: new.how,
            paired_at: crate::now(),
            last_seen: None,
            key: new.key.clone(),
            has_token: token.is_some(),
            serial: 0,
            told_up_to: 0,
        };
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut devices = tx.open_table(DEVICES).map_err(db)?;
            let mut creds = tx.open_table(CREDENTIALS).map_err(db)?;
            let mut meta = tx.open_table(META).map_err(db)?;
            if devices.len().map_err(db)? >= MAX_DEVICES as u64 {
                return Err(RegistryError::Full);
            }
            let last = meta.get("serial").map_err(db)?.map_or(0, |v| v.value());
            device.serial = last.saturating_add(1);
            // A new owner is told of pairings after its own, not before.
            device.told_up_to = device.serial;
            meta.insert("serial", device.serial).map_err(db)?;
            if provisioned {
                meta.insert(PROVISIONED, 1).map_err(db)?;
            }
            if let Some(k) = &new.key {
                if let Some(other) = creds.get(credential_key("key", k).as_str()).map_err(db)? {
                    return Err(RegistryError::KeyTaken(other.value().to_owned()));
                }
                creds
                    .insert(credential_key("key", k).as_str(), id.as_str())
                    .map_err(db)?;
            }
            if let Some(t) = &token {
                creds
                    .insert(
                        credential_key("token", &token_hash(t)).as_str(),
                        id.as_str(),
                    )
                    .map_err(db)?;
            }
            devices
                .insert(id.as_str(), serde_json::to_vec(&device)?.as_slice())
                .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok((device, token))
    }

    /// Forgets a device and every credential of it. The last owner stays.
    pub fn remove(&self, id: &str) -> Result<Device, RegistryError> {
        let tx = self.db.begin_write().map_err(db)?;
        let device = {
            let mut devices = tx.open_table(DEVICES).map_err(db)?;
            let mut creds = tx.open_table(CREDENTIALS).map_err(db)?;
            let device: Device = match devices.get(id).map_err(db)? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => return Err(RegistryError::NoSuchDevice(id.to_owned())),
            };
            if device.role == Role::Owner {
                let mut owners = 0usize;
                for row in devices.iter().map_err(db)? {
                    let (_, v) = row.map_err(db)?;
                    let d: Device = serde_json::from_slice(v.value())?;
                    if d.role == Role::Owner {
                        owners = owners.saturating_add(1);
                    }
                }
                if owners <= 1 {
                    return Err(RegistryError::LastOwner);
                }
            }
            devices.remove(id).map_err(db)?;
            // Tokens are kept only as hashes: find them by the id they map to.
            let mut gone = Vec::new();
            for row in creds.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                if v.value() == id {
                    gone.push(k.value().to_owned());
                }
            }
            for k in gone {
                creds.remove(k.as_str()).map_err(db)?;
            }
            device
        };
        tx.commit().map_err(db)?;
        Ok(device)
    }

    /// The devices paired since owner `id` was last told, other than
    /// itself, oldest first; from now on it counts as told of them. Owners
    /// are told of every new pairing this way (`cloudlet devices` shows
    /// them), besides the log.
    pub fn take_news(&self, id: &str) -> Result<Vec<Device>, RegistryError> {
        let tx = self.db.begin_write().map_err(db)?;
        let news = {
            let mut devices = tx.open_table(DEVICES).map_err(db)?;
            let mut me: Device = match devices.get(id).map_err(db)? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => return Err(RegistryError::NoSuchDevice(id.to_owned())),
            };
            let mut news = Vec::new();
            let mut latest = me.told_up_to;
            for row in devices.iter().map_err(db)? {
                let (_, v) = row.map_err(db)?;
                let d: Device = serde_json::from_slice(v.value())?;
                latest = latest.max(d.serial);
                if d.serial > me.told_up_to && d.id != me.id {
                    news.push(d);
                }
            }
            news.sort_by_key(|d| d.serial);
            if latest != me.told_up_to {
                me.told_up_to = latest;
                devices
                    .insert(id, serde_json::to_vec(&me)?.as_slice())
                    .map_err(db)?;
            }
            news
        };
        tx.commit().map_err(db)?;
        Ok(news)
    }

    pub fn rename(&self, id: &str, name: &str) -> Result<Device, RegistryError> {
        check_name(name)?;
        self.update(id, |d| d.name = name.trim().to_owned())
    }

    /// Records that `id` was let in at `when`, if the record is more than a
    /// minute older: a busy client costs one write a minute, not one a request.
    pub fn seen(&self, id: &str, when: u64) -> Result<(), RegistryError> {
        let stale = match self.get(id)? {
            Some(d) => d.last_seen.is_none_or(|t| when.saturating_sub(t) >= 60),
            None => false,
        };
        if stale {
            self.update(id, |d| d.last_seen = Some(when))?;
        }
        Ok(())
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut Device)) -> Result<Device, RegistryError> {
        let tx = self.db.begin_write().map_err(db)?;
        let device = {
            let mut devices = tx.open_table(DEVICES).map_err(db)?;
            let mut device: Device = match devices.get(id).map_err(db)? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => return Err(RegistryError::NoSuchDevice(id.to_owned())),
            };
            change(&mut device);
            devices
                .insert(id, serde_json::to_vec(&device)?.as_slice())
                .map_err(db)?;
            device
        };
        tx.commit().map_err(db)?;
        Ok(device)
    }
}

/// `N` random bytes from the kernel.
pub fn random<const N: usize>() -> Result<[u8; N], RegistryError> {
    cloudlet_runtime::random::<N>().map_err(RegistryError::Random)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn device(name: &str, role: Role) -> NewDevice {
        NewDevice {
            name: name.into(),
            role,
            how: PairedHow::Local,
            key: None,
            token: true,
        }
    }

    #[test]
    fn each_owner_is_told_once_of_every_pairing_after_its_own() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let (first, _) = r.add(device("laptop", Role::Owner)).unwrap();
        assert!(r.take_news(&first.id).unwrap().is_empty());
        let (phone, _) = r.add(device("phone", Role::Device)).unwrap();
        let (second, _) = r.add(device("desktop", Role::Owner)).unwrap();
        let (tv, _) = r.add(device("tv", Role::Device)).unwrap();
        let names = |v: Vec<Device>| v.into_iter().map(|d| d.name).collect::<Vec<_>>();
        // The first owner: everything after it, oldest first, once.
        assert_eq!(
            names(r.take_news(&first.id).unwrap()),
            ["phone", "desktop", "tv"]
        );
        assert!(r.take_news(&first.id).unwrap().is_empty());
        // The second owner: only what came after it.
        assert_eq!(names(r.take_news(&second.id).unwrap()), ["tv"]);
        // What an owner was told stays told across a revocation and a reopen;
        // what comes later is news to both.
        r.remove(&phone.id).unwrap();
        drop(r);
        let r = Registry::open(d.path()).unwrap();
        let (_, _) = r.add(device("watch", Role::Device)).unwrap();
        assert_eq!(names(r.take_news(&first.id).unwrap()), ["watch"]);
        assert_eq!(names(r.take_news(&second.id).unwrap()), ["watch"]);
        assert!(tv.serial > second.serial);
        assert!(r.take_news("nobody").is_err());
    }

    #[test]
    fn a_token_finds_its_device_until_it_is_removed_and_is_not_kept_in_the_clear() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let (owner, _) = r.add(device("laptop", Role::Owner)).unwrap();
        let (phone, token) = r.add(device("phone", Role::Device)).unwrap();
        let token = token.unwrap();
        assert_eq!(token.len(), 64);
        let found = r.lookup("token", &token_hash(&token)).unwrap().unwrap();
        assert_eq!(found.id, phone.id);
        assert!(r.lookup("token", &token_hash("guess")).unwrap().is_none());
        // The token is nowhere in the database file.
        drop(r);
        let raw = std::fs::read(d.path().join("registry.redb")).unwrap();
        assert!(!raw.windows(token.len()).any(|w| w == token.as_bytes()));
        let r = Registry::open(d.path()).unwrap();
        assert_eq!(r.list().unwrap().len(), 2, "kept across a reopen");
        r.remove(&phone.id).unwrap();
        assert!(r.lookup("token", &token_hash(&token)).unwrap().is_none());
        assert!(r.get(&owner.id).unwrap().is_some());
    }

    #[test]
    fn the_last_owner_cannot_be_removed_but_a_second_one_can() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let (a, _) = r.add(device("a", Role::Owner)).unwrap();
        assert!(matches!(r.remove(&a.id), Err(RegistryError::LastOwner)));
        let (b, _) = r.add(device("b", Role::Owner)).unwrap();
        r.remove(&a.id).unwrap();
        assert!(matches!(r.remove(&b.id), Err(RegistryError::LastOwner)));
        assert!(matches!(
            r.remove("nope"),
            Err(RegistryError::NoSuchDevice(_))
        ));
    }

    #[test]
    fn only_a_box_key_is_found_as_an_issuer_and_listed_as_a_box() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let keyed = |name: &str, role: Role, key: &str| NewDevice {
            key: Some(key.into()),
            token: false,
            ..device(name, role)
        };
        let (other_box, _) = r.add(keyed("garage", Role::Box, &"aa".repeat(32))).unwrap();
        r.add(keyed("pc", Role::Device, &"bb".repeat(32))).unwrap();
        r.add(keyed("phone", Role::Owner, &"cc".repeat(32)))
            .unwrap();
        r.add(device("browser", Role::Device)).unwrap();
        assert_eq!(
            r.lookup_box(&"aa".repeat(32)).unwrap().map(|d| d.id),
            Some(other_box.id.clone())
        );
        assert_eq!(r.lookup_box(&"bb".repeat(32)).unwrap(), None, "a device");
        assert_eq!(r.lookup_box(&"cc".repeat(32)).unwrap(), None, "an owner");
        assert_eq!(r.lookup_box(&"dd".repeat(32)).unwrap(), None, "nobody");
        let boxes: Vec<String> = r.boxes().unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(boxes, vec![other_box.id]);
    }

    #[test]
    fn a_key_is_paired_once_and_names_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let key = "ab".repeat(32);
        let with_key = |name: &str| NewDevice {
            key: Some(key.clone()),
            token: false,
            ..device(name, Role::Device)
        };
        let (dev, token) = r.add(with_key("pc")).unwrap();
        assert!(token.is_none());
        assert_eq!(r.lookup("key", &key).unwrap().unwrap().id, dev.id);
        assert!(matches!(
            r.add(with_key("again")),
            Err(RegistryError::KeyTaken(_))
        ));
        for bad in ["", "  ", "a\nb", &"x".repeat(MAX_NAME + 1)] {
            assert!(matches!(
                r.add(device(bad, Role::Device)),
                Err(RegistryError::BadName)
            ));
        }
        let renamed = r.rename(&dev.id, "work pc").unwrap();
        assert_eq!(renamed.name, "work pc");
    }

    #[test]
    fn last_seen_is_written_at_most_once_a_minute() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::open(d.path()).unwrap();
        let (dev, _) = r.add(device("pc", Role::Owner)).unwrap();
        r.seen(&dev.id, 1000).unwrap();
        r.seen(&dev.id, 1030).unwrap();
        assert_eq!(r.get(&dev.id).unwrap().unwrap().last_seen, Some(1000));
        r.seen(&dev.id, 1060).unwrap();
        assert_eq!(r.get(&dev.id).unwrap().unwrap().last_seen, Some(1060));
    }
}
