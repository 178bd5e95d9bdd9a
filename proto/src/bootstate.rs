//! The A/B boot state, shared by U-Boot's `boot.scr` and the running box.
//!
//! The state lives on the FAT boot partition in two copies,
//! [`COPY_NAMES`], each a U-Boot binary environment (`env export -c`): a
//! little-endian CRC-32 of the data area, then `key=value` strings ending in
//! NUL, then an empty string, padded to [`ENV_SIZE`]. A FAT write is not
//! atomic, so a writer always overwrites the *older* copy with the sequence
//! number of the newer plus one; a torn write spoils only the copy that was
//! already stale. The newer copy is the valid one whose `BOOT_SEQ` is the
//! other's plus one (or the only valid one). Numbers are written in
//! lowercase hex without a prefix, which is what U-Boot's `setexpr` writes
//! and reads.
//!
//! Variables:
//! * `BOOT_SEQ`: the copy's sequence number.
//! * `BOOT_ORDER`: the slots to try, in order, e.g. `A B`.
//! * `BOOT_A_LEFT`, `BOOT_B_LEFT`: boot attempts left per slot. The script
//!   decrements before booting; a healthy boot sets it back to [`TRIES`].

use std::collections::BTreeMap;
use std::fmt;

/// Size of one copy, as `env export -c -s 0x1000` writes it.
pub const ENV_SIZE: usize = 0x1000;
/// File names of the two copies on the boot partition.
pub const COPY_NAMES: [&str; 2] = ["bootstate0.env", "bootstate1.env"];
/// Attempts a slot gets before the script moves on to the next.
pub const TRIES: u32 = 3;

/// A boot slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "A" | "a" => Some(Slot::A),
            "B" | "b" => Some(Slot::B),
            _ => None,
        }
    }

    fn left_key(self) -> &'static str {
        match self {
            Slot::A => "BOOT_A_LEFT",
            Slot::B => "BOOT_B_LEFT",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a copy of the boot state could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// the copy is shorter than its CRC header
    #[error("the copy is shorter than its CRC header")]
    TooShort,
    /// the CRC does not match the data (a torn or never-written copy)
    #[error("the CRC does not match the data (a torn or never-written copy)")]
    BadCrc,
    /// an entry is not `key=value` text
    #[error("entry {0:?} is not key=value text")]
    BadEntry(String),
    /// a required variable is missing or not a hex number
    #[error("variable {0} is missing or not a hex number")]
    BadVariable(&'static str),
    /// the copy is larger than U-Boot writes one ([`ENV_SIZE`])
    #[error("the copy is {0} bytes, more than {ENV_SIZE}")]
    TooLong(usize),
}

/// A decoded U-Boot environment: the raw variables plus the header layout it was read with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub vars: BTreeMap<String, String>,
    /// 4 for a plain environment, 5 when U-Boot is built with a redundant
    /// environment (a flags byte follows the CRC).
    pub header_len: usize,
}

impl Env {
    /// Decodes one copy, checking its CRC.
    pub fn decode(bytes: &[u8]) -> Result<Env, DecodeError> {
        if bytes.len() < 5 {
            return Err(DecodeError::TooShort);
        }
        let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let header_len = [4usize, 5]
            .into_iter()
            .find(|&h| crc32fast::hash(&bytes[h..]) == stored)
            .ok_or(DecodeError::BadCrc)?;
        let mut vars = BTreeMap::new();
        for entry in bytes[header_len..].split(|&b| b == 0) {
            if entry.is_empty() {
                break;
            }
            let text = std::str::from_utf8(entry)
                .map_err(|_| DecodeError::BadEntry(String::from_utf8_lossy(entry).into_owned()))?;
            let (k, v) = text
                .split_once('=')
                .ok_or_else(|| DecodeError::BadEntry(text.to_owned()))?;
            vars.insert(k.to_owned(), v.to_owned());
        }
        Ok(Env { vars, header_len })
    }

    /// Bytes [`Env::encode`] needs to hold every variable.
    pub fn encoded_len(&self) -> usize {
        self.header_len
            + self
                .vars
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
            + 1
    }

    /// Encodes to exactly `size` bytes with a valid CRC (variables past
    /// `size` are cut: check [`Env::encoded_len`] first).
    pub fn encode(&self, size: usize) -> Vec<u8> {
        let mut data = Vec::with_capacity(size);
        for (k, v) in &self.vars {
            data.extend_from_slice(k.as_bytes());
            data.push(b'=');
            data.extend_from_slice(v.as_bytes());
            data.push(0);
        }
        data.push(0);
        let mut out = vec![0u8; self.header_len];
        out.extend_from_slice(&data);
        out.resize(size, 0);
        let crc = crc32fast::hash(&out[self.header_len..]);
        out[..4].copy_from_slice(&crc.to_le_bytes());
        if self.header_len == 5 {
            // U-Boot's redundant environments carry an "active" flag byte; 1 marks it active.
            out[4] = 1;
        }
        out
    }
}

/// The boot state itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    pub seq: u64,
    pub order: Vec<Slot>,
    pub a_left: u32,
    pub b_left: u32,
    /// Variables this version does not know; kept so that a newer writer's
    /// additions survive an older reader's write.
    pub extra: BTreeMap<String, String>,
    header_len: usize,
}

fn hex_var(vars: &BTreeMap<String, String>, key: &'static str) -> Result<u64, DecodeError> {
    let v = vars.get(key).ok_or(DecodeError::BadVariable(key))?;
    let v = v.trim_start_matches("0x");
    u64::from_str_radix(v, 16).map_err(|_| DecodeError::BadVariable(key))
}

impl BootState {
    /// A fresh state: slot A with full tries, slot B empty.
    pub fn initial() -> BootState {
        BootState {
            seq: 1,
            order: vec![Slot::A, Slot::B],
            a_left: TRIES,
            b_left: 0,
            extra: BTreeMap::new(),
            header_len: 4,
        }
    }

    pub fn from_env(env: Env) -> Result<BootState, DecodeError> {
        let mut vars = env.vars;
        let seq = hex_var(&vars, "BOOT_SEQ")?;
        let a_left = hex_var(&vars, "BOOT_A_LEFT")? as u32;
        let b_left = hex_var(&vars, "BOOT_B_LEFT")? as u32;
        let order_text = vars
            .get("BOOT_ORDER")
            .ok_or(DecodeError::BadVariable("BOOT_ORDER"))?;
        let order = order_text
            .split_whitespace()
            .map(Slot::parse)
            .collect::<Option<Vec<_>>>()
            .filter(|o| !o.is_empty())
            .ok_or(DecodeError::BadVariable("BOOT_ORDER"))?;
        for k in ["BOOT_SEQ", "BOOT_A_LEFT", "BOOT_B_LEFT", "BOOT_ORDER"] {
            vars.remove(k);
        }
        Ok(BootState {
            seq,
            order,
            a_left,
            b_left,
            extra: vars,
            header_len: env.header_len,
        })
    }

    pub fn to_env(&self) -> Env {
        let mut vars = self.extra.clone();
        vars.insert("BOOT_SEQ".into(), format!("{:x}", self.seq));
        vars.insert("BOOT_A_LEFT".into(), format!("{:x}", self.a_left));
        vars.insert("BOOT_B_LEFT".into(), format!("{:x}", self.b_left));
        let order: Vec<&str> = self.order.iter().map(|s| s.name()).collect();
        vars.insert("BOOT_ORDER".into(), order.join(" "));
        Env {
            vars,
            header_len: self.header_len,
        }
    }

    /// Decodes one copy; a copy larger than U-Boot writes is refused (it
    /// could not be written back whole).
    pub fn decode(bytes: &[u8]) -> Result<BootState, DecodeError> {
        if bytes.len() > ENV_SIZE {
            return Err(DecodeError::TooLong(bytes.len()));
        }
        BootState::from_env(Env::decode(bytes)?)
    }

    /// Encodes one copy of [`ENV_SIZE`] bytes that always decodes to the
    /// boot's own variables: other variables are kept while they fit and
    /// dropped when they would not (cutting them would have cut ours too).
    pub fn encode(&self) -> Vec<u8> {
        let env = self.to_env();
        if env.encoded_len() <= ENV_SIZE {
            return env.encode(ENV_SIZE);
        }
        let mut lean = self.clone();
        lean.extra.clear();
        lean.to_env().encode(ENV_SIZE)
    }

    pub fn tries_left(&self, slot: Slot) -> u32 {
        match slot {
            Slot::A => self.a_left,
            Slot::B => self.b_left,
        }
    }

    pub fn set_tries_left(&mut self, slot: Slot, n: u32) {
        match slot {
            Slot::A => self.a_left = n,
            Slot::B => self.b_left = n,
        }
    }

    /// Name of the variable holding a slot's tries (for messages).
    pub fn tries_key(slot: Slot) -> &'static str {
        slot.left_key()
    }
}

/// Which copy is newest, given the raw bytes of both (`None` for a missing
/// file). Returns the index of the newest valid copy and its state, or `None`
/// when neither copy is valid.
pub fn newest(copies: [Option<&[u8]>; 2]) -> Option<(usize, BootState)> {
    let decoded: Vec<Option<BootState>> = copies
        .iter()
        .map(|c| c.and_then(|b| BootState::decode(b).ok()))
        .collect();
    match (&decoded[0], &decoded[1]) {
        (Some(a), Some(b)) => {
            // The same rule as boot.scr: copy 1 wins only if it is exactly one newer.
            if b.seq == a.seq.wrapping_add(1) {
                Some((1, b.clone()))
            } else {
                Some((0, a.clone()))
            }
        }
        (Some(a), None) => Some((0, a.clone())),
        (None, Some(b)) => Some((1, b.clone())),
        (None, None) => None,
    }
}

/// Prepares the next write: the copy index to overwrite (the older one) and
/// the bytes, with `BOOT_SEQ` advanced past the newest.
pub fn next_write(newest_index: usize, state: &BootState) -> (usize, Vec<u8>) {
    let mut next = state.clone();
    next.seq = state.seq.wrapping_add(1);
    (1 - newest_index, next.encode())
}

/// The boot state on a mounted boot partition, read and written under one
/// lock so that init (committing a healthy boot) and the updater (switching
/// slots) never both write the older copy from the same reading.
///
/// The lock is `flock(LOCK_EX)` on the first copy's file (advisory, held by
/// every writer on the box). A write goes to the older copy, in place (the
/// file keeps its clusters), and is fsynced before the lock is released.
pub struct OnDisk {
    dir: std::path::PathBuf,
}

/// The longest [`OnDisk`] waits for another writer's lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// What [`OnDisk::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Updated {
    /// The change left the state as it was: nothing was written.
    Unchanged(BootState),
    /// Copy `index` was written with this state (its `seq` is the new one).
    Written { index: usize, state: BootState },
}

impl OnDisk {
    pub fn new(dir: impl Into<std::path::PathBuf>) -> OnDisk {
        OnDisk { dir: dir.into() }
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Takes the lock, waiting at most [`LOCK_WAIT`]: a holder that never
    /// lets go makes an error, not a hung commit or install.
    fn lock(&self) -> std::io::Result<std::fs::File> {
        let f = std::fs::File::open(self.dir.join(COPY_NAMES[0]))?;
        let until = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(f),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the boot state in {} stayed locked for {} s",
                            self.dir.display(),
                            LOCK_WAIT.as_secs()
                        ),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
    }

    fn read_copies(&self) -> [Option<Vec<u8>>; 2] {
        COPY_NAMES.map(|n| std::fs::read(self.dir.join(n)).ok())
    }

    /// The newest valid copy's index and state, or `None` when neither is valid.
    pub fn read(&self) -> std::io::Result<Option<(usize, BootState)>> {
        let _lock = self.lock()?;
        let c = self.read_copies();
        Ok(newest([c[0].as_deref(), c[1].as_deref()]))
    }

    /// Reads the newest state, lets `change` edit it and, when it changed,
    /// writes it over the older copy with the next sequence number. Fails
    /// when neither copy is valid (U-Boot would use its defaults; writing
    /// over them needs a person to look).
    pub fn update(&self, change: impl FnOnce(&mut BootState)) -> std::io::Result<Updated> {
        use std::os::unix::fs::FileExt;
        let _lock = self.lock()?;
        let c = self.read_copies();
        let (index, state) = newest([c[0].as_deref(), c[1].as_deref()]).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no valid boot state in {}", self.dir.display()),
            )
        })?;
        let mut next = state.clone();
        change(&mut next);
        if next == state {
            return Ok(Updated::Unchanged(state));
        }
        let (write, bytes) = next_write(index, &next);
        let path = self
            .dir
            .join(COPY_NAMES.get(write).copied().unwrap_or(COPY_NAMES[1]));
        let f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        f.write_all_at(&bytes, 0)?;
        f.set_len(bytes.len() as u64)?;
        f.sync_all()?;
        next.seq = state.seq.wrapping_add(1);
        Ok(Updated::Written {
            index: write,
            state: next,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_oversize_copy_is_refused_and_a_crowded_one_writes_back_whole() {
        // Found by the bootstate fuzz target: a copy past ENV_SIZE decoded,
        // and writing it back cut BOOT_SEQ off.
        let mut env = BootState::initial().to_env();
        env.vars.insert("AAAA".into(), "x".repeat(5000));
        let big = env.encode(env.encoded_len());
        assert!(matches!(
            BootState::decode(&big),
            Err(DecodeError::TooLong(_))
        ));
        // A state whose other variables no longer fit still writes its own.
        let mut s = BootState::initial();
        s.extra.insert("AAAA".into(), "x".repeat(5000));
        let written = s.encode();
        assert_eq!(written.len(), ENV_SIZE);
        let back = BootState::decode(&written).unwrap();
        assert_eq!((back.seq, back.a_left, back.extra.len()), (1, TRIES, 0));
    }

    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let mut s = BootState::initial();
        s.extra.insert("UPDATE_VERSION".into(), "0.2.0".into());
        let bytes = s.encode();
        assert_eq!(bytes.len(), ENV_SIZE);
        assert_eq!(BootState::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn reads_what_uboot_setexpr_writes() {
        // Hand-built the way `env export -c` lays it out: sorted, NUL-separated, zero padded.
        let data = b"BOOT_A_LEFT=2\0BOOT_B_LEFT=0\0BOOT_ORDER=A B\0BOOT_SEQ=a\0\0";
        let mut buf = vec![0u8; ENV_SIZE];
        buf[4..4 + data.len()].copy_from_slice(data);
        let crc = crc32fast::hash(&buf[4..]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        let s = BootState::decode(&buf).unwrap();
        assert_eq!((s.seq, s.a_left, s.b_left), (10, 2, 0));
        assert_eq!(s.order, vec![Slot::A, Slot::B]);
    }

    #[test]
    fn redundant_env_header_is_read_and_kept() {
        let data = b"BOOT_A_LEFT=3\0BOOT_B_LEFT=1\0BOOT_ORDER=B A\0BOOT_SEQ=5\0\0";
        let mut buf = vec![0u8; ENV_SIZE];
        buf[4] = 1;
        buf[5..5 + data.len()].copy_from_slice(data);
        let crc = crc32fast::hash(&buf[5..]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        let s = BootState::decode(&buf).unwrap();
        assert_eq!(s.order, vec![Slot::B, Slot::A]);
        let again = s.encode();
        assert_eq!(again[4], 1);
        assert_eq!(BootState::decode(&again).unwrap(), s);
    }

    #[test]
    fn torn_copy_is_rejected() {
        let mut bytes = BootState::initial().encode();
        bytes[20] ^= 0xff;
        assert_eq!(BootState::decode(&bytes), Err(DecodeError::BadCrc));
        assert_eq!(BootState::decode(&[0; 3]), Err(DecodeError::TooShort));
        assert_eq!(BootState::decode(&[0; ENV_SIZE]), Err(DecodeError::BadCrc));
    }

    #[test]
    fn missing_variables_are_errors() {
        let env = Env {
            vars: BTreeMap::from([("BOOT_SEQ".into(), "1".into())]),
            header_len: 4,
        };
        let bytes = env.encode(ENV_SIZE);
        assert!(matches!(
            BootState::decode(&bytes),
            Err(DecodeError::BadVariable(_))
        ));
    }

    #[test]
    fn newest_follows_the_plus_one_rule() {
        let mut s = BootState::initial();
        s.seq = 7;
        let a = s.encode();
        s.seq = 8;
        s.a_left = 1;
        let b = s.encode();
        let (i, n) = newest([Some(&a), Some(&b)]).unwrap();
        assert_eq!((i, n.seq, n.a_left), (1, 8, 1));
        let (i, _) = newest([Some(&b), Some(&a)]).unwrap();
        assert_eq!(i, 0);
        // A torn newer copy leaves the older one in charge.
        let mut torn = b.clone();
        torn[100] = 0x55;
        let (i, n) = newest([Some(&a), Some(&torn)]).unwrap();
        assert_eq!((i, n.seq), (0, 7));
        assert!(newest([None, Some(&torn)]).is_none());
    }

    #[test]
    fn on_disk_updates_write_the_older_copy_and_skip_no_change() {
        let d = tempfile::tempdir().unwrap();
        let s = BootState::initial();
        std::fs::write(d.path().join(COPY_NAMES[0]), s.encode()).unwrap();
        let disk = OnDisk::new(d.path());
        // Only copy 0 exists: it is the newest; copy 1 is made.
        let u = disk.update(|s| s.b_left = 2).unwrap();
        assert!(
            matches!(u, Updated::Written { index: 1, ref state } if state.seq == 2 && state.b_left == 2)
        );
        let (i, now) = disk.read().unwrap().unwrap();
        assert_eq!((i, now.seq, now.b_left), (1, 2, 2));
        assert!(matches!(
            disk.update(|s| s.b_left = 2).unwrap(),
            Updated::Unchanged(_)
        ));
        let u = disk.update(|s| s.order = vec![Slot::B, Slot::A]).unwrap();
        assert!(matches!(u, Updated::Written { index: 0, .. }));
        // Neither copy valid: an error, nothing written.
        std::fs::write(d.path().join(COPY_NAMES[0]), b"x").unwrap();
        std::fs::write(d.path().join(COPY_NAMES[1]), b"y").unwrap();
        assert!(disk.update(|s| s.a_left = 1).is_err());
        assert_eq!(std::fs::read(d.path().join(COPY_NAMES[1])).unwrap(), b"y");
    }

    #[test]
    fn a_write_goes_to_the_older_copy_and_becomes_newest() {
        let s = BootState::initial();
        let c0 = s.encode();
        let (idx, bytes) = next_write(0, &s);
        assert_eq!(idx, 1);
        let (i, n) = newest([Some(&c0), Some(&bytes)]).unwrap();
        assert_eq!((i, n.seq), (1, 2));
    }
}
