//! Looking up service users in /etc/passwd (no NSS in a static PID 1).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// the passwd file cannot be read
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// no such user in the passwd file
    #[error("no user {name} in {path}")]
    NoUser { name: String, path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Finds `name` in a passwd file's text.
pub fn find_in(passwd: &str, name: &str) -> Option<User> {
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        let n = f.next()?;
        if n != name {
            return None;
        }
        let _pw = f.next()?;
        let uid = f.next()?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        let _gecos = f.next()?;
        let home = f.next().unwrap_or("/").to_owned();
        Some(User {
            name: n.to_owned(),
            uid,
            gid,
            home,
        })
    })
}

/// `name` from `etc`/passwd.
pub fn lookup(etc: &Path, name: &str) -> Result<User, UserError> {
    let path = etc.join("passwd");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(source) => return Err(UserError::Read { path, source }),
    };
    find_in(&text, name).ok_or_else(|| UserError::NoUser {
        name: name.to_owned(),
        path,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_users_and_skips_broken_lines() {
        let p =
            "root:x:0:0:root:/root:/bin/sh\nbroken\nstorage:x:101:101::/data/storage:/bin/false\n";
        let u = find_in(p, "storage").unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (101, 101, "/data/storage"));
        assert!(find_in(p, "broken").is_none());
        assert!(find_in(p, "nobody").is_none());
    }
}
