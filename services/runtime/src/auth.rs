//! Who may use a service. Every request but `/health` must carry a
//! credential; the one credential so far is the box's access token, made at
//! first boot and readable on the box (root only). Pairing replaces it behind
//! the same [`Authenticator`] trait, without touching request handlers.
//!
//! The token is 256 random bits, hex. Clients send it as a bearer token or as
//! the password of HTTP Basic (any user name), which every WebDAV client can.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::StatusCode;

use crate::{text, Body};

/// Decides whether a request's headers carry a valid credential.
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(name)` of who is asking, or why not.
    fn check(&self, headers: &HeaderMap) -> Result<String, AuthError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// the request carries no credential
    #[error("no credential")]
    Missing,
    /// the credential is not valid
    #[error("invalid credential")]
    Invalid,
}

/// The 401 answer, asking for Basic credentials.
pub fn unauthorized(e: &AuthError) -> hyper::Response<Body> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "text/plain; charset=utf-8",
        format!("{e}\n"),
    );
    r.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"Cloudlet\", charset=\"UTF-8\""),
    );
    r
}

/// The box's access token.
pub struct TokenAuth {
    token: String,
}

fn equal(a: &[u8], b: &[u8]) -> bool {
    // Constant time in the token's length: no early exit on the first difference.
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

impl TokenAuth {
    pub fn new(token: &str) -> TokenAuth {
        TokenAuth {
            token: token.to_owned(),
        }
    }

    /// Reads the token at `path`, or makes one (mode 0600, written durably).
    pub fn load_or_create(path: &Path) -> std::io::Result<TokenAuth> {
        if let Ok(t) = std::fs::read_to_string(path) {
            let t = t.trim();
            if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(TokenAuth::new(t));
            }
        }
        let mut raw = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
        let token = hex::encode(raw);
        let tmp = path.with_extension("tmp");
        {
            let mut f = std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{token}\n").as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(TokenAuth::new(&token))
    }
}

impl Authenticator for TokenAuth {
    fn check(&self, headers: &HeaderMap) -> Result<String, AuthError> {
        let value = headers.get(AUTHORIZATION).ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::Invalid)?;
        let (scheme, rest) = value.split_once(' ').ok_or(AuthError::Invalid)?;
        // No trimming: a credential with stray whitespace is not the
        // credential, whichever scheme carries it.
        let given = match scheme.to_ascii_lowercase().as_str() {
            "bearer" => rest.to_owned(),
            "basic" => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .map_err(|_| AuthError::Invalid)?;
                let text = String::from_utf8(raw).map_err(|_| AuthError::Invalid)?;
                let (_user, pass) = text.split_once(':').ok_or(AuthError::Invalid)?;
                pass.to_owned()
            }
            _ => return Err(AuthError::Invalid),
        };
        if equal(given.as_bytes(), self.token.as_bytes()) {
            Ok("token".into())
        } else {
            Err(AuthError::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_and_basic_with_the_token_pass_nothing_else_does() {
        let a = TokenAuth::new("00ff");
        assert_eq!(a.check(&headers("Bearer 00ff")), Ok("token".into()));
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:00ff");
        assert!(a.check(&headers(&format!("Basic {basic}"))).is_ok());
        assert_eq!(a.check(&HeaderMap::new()), Err(AuthError::Missing));
        assert_eq!(a.check(&headers("Bearer 00fe")), Err(AuthError::Invalid));
        assert_eq!(a.check(&headers("Bearer 00ff0")), Err(AuthError::Invalid));
        assert_eq!(a.check(&headers("Basic !!!")), Err(AuthError::Invalid));
        let nopass = base64::engine::general_purpose::STANDARD.encode("anyone");
        assert_eq!(
            a.check(&headers(&format!("Basic {nopass}"))),
            Err(AuthError::Invalid)
        );
        assert_eq!(a.check(&headers("Digest x")), Err(AuthError::Invalid));
        // Stray whitespace is refused the same way under both schemes.
        assert_eq!(a.check(&headers("Bearer 00ff\t")), Err(AuthError::Invalid));
        assert_eq!(a.check(&headers("Bearer  00ff")), Err(AuthError::Invalid));
        let spaced = base64::engine::general_purpose::STANDARD.encode("anyone:00ff ");
        assert_eq!(
            a.check(&headers(&format!("Basic {spaced}"))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            unauthorized(&AuthError::Missing).status(),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn the_token_is_made_once_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("access-token");
        let a = TokenAuth::load_or_create(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = TokenAuth::load_or_create(&p).unwrap();
        assert_eq!(a.token, b.token);
        // A damaged file is replaced, not trusted.
        std::fs::write(&p, "short").unwrap();
        let c = TokenAuth::load_or_create(&p).unwrap();
        assert_ne!(c.token, "short");
        assert_eq!(c.token.len(), 64);
    }
}
