//! Paths as clients send them, made safe: every path is relative to the
//! store's root, "/"-separated, with no empty, "." or ".." parts, no NUL or
//! backslash, and bounded lengths. Nothing can name a place outside the store.

/// Longest name of one file or folder, in bytes (as ext4).
pub const MAX_NAME: usize = 255;
/// Longest whole path, in bytes.
pub const MAX_PATH: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// ".." would leave the store
    #[error("the path {0:?} climbs out of the store")]
    Escapes(String),
    /// a character files cannot have
    #[error("the path {0:?} has a NUL or backslash")]
    BadChar(String),
    /// a name over 255 bytes or a path over 4096
    #[error("the path {0:?} is too long")]
    TooLong(String),
}

/// Normalizes `raw` ("/a//b/./c/" -> "a/b/c"; "/" -> "").
pub fn normalize(raw: &str) -> Result<String, PathError> {
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong(raw.chars().take(64).collect()));
    }
    if raw.contains('\0') || raw.contains('\\') {
        return Err(PathError::BadChar(raw.to_owned()));
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in raw.split('/') {
        match p {
            "" | "." => {}
            ".." => return Err(PathError::Escapes(raw.to_owned())),
            p if p.len() > MAX_NAME => {
                return Err(PathError::TooLong(raw.chars().take(64).collect()))
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// The folder holding a normalized path ("" for top-level names and the root).
pub fn parent(path: &str) -> &str {
    path.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_confines() {
        assert_eq!(normalize("/a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize("/").unwrap(), "");
        assert_eq!(normalize("").unwrap(), "");
        assert!(matches!(
            normalize("/a/../../etc/passwd"),
            Err(PathError::Escapes(_))
        ));
        assert!(matches!(normalize("a/.."), Err(PathError::Escapes(_))));
        assert!(matches!(normalize("a\0b"), Err(PathError::BadChar(_))));
        assert!(matches!(normalize("a\\..\\b"), Err(PathError::BadChar(_))));
        assert!(matches!(
            normalize(&"x".repeat(256)),
            Err(PathError::TooLong(_))
        ));
        assert!(matches!(
            normalize(&"a/".repeat(3000)),
            Err(PathError::TooLong(_))
        ));
        assert_eq!(normalize("ünï cödé/fïlé.txt").unwrap(), "ünï cödé/fïlé.txt");
        assert_eq!(parent("a/b/c"), "a/b");
        assert_eq!(parent("a"), "");
    }
}
