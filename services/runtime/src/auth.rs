//! Who may use a service. Every request but the public routes (`/health`)
//! must carry a credential of a paired device ([`Authenticator`]): on the box
//! the device registry decides ([`crate::registry::RegistryAuth`], over the
//! bus); tests may use a fixed one ([`TokenAuth`]).
//!
//! A request presents what it has ([`Presented`]): a token, as a bearer
//! token or as the password of HTTP Basic (any user name, which every WebDAV
//! and CouchDB client can send), and over mutual TLS the hash of the key the
//! connection proved ([`PeerKey`], put in the request's extensions by the
//! server loop).

use std::future::Future;
use std::pin::Pin;

use base64::Engine;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use hyper::StatusCode;

use crate::{text, Body};

/// Who a request comes from, once let in: a device of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The registry's id of the device.
    pub device: String,
    pub name: String,
    /// `owner`, `device` or `box`.
    pub role: String,
}

impl Identity {
    pub fn is_owner(&self) -> bool {
        self.role == "owner"
    }
}

/// The SHA-256 (hex) of the public key a client proved over mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKey(pub String);

/// What a request offers as its credential.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presented {
    /// A token from `Authorization` (bearer, or Basic's password).
    pub token: Option<String>,
    /// The hash of the client's TLS key.
    pub key: Option<String>,
    /// `Authorization` was there but could not be read.
    pub malformed: bool,
}

impl Presented {
    /// Reads the credential of a request from its headers and extensions.
    pub fn from_request<B>(req: &hyper::Request<B>) -> Presented {
        let mut p = Presented::from_headers(req.headers());
        p.key = req.extensions().get::<PeerKey>().map(|k| k.0.clone());
        p
    }

    /// The token of an `Authorization` header, if any.
    pub fn from_headers(headers: &HeaderMap) -> Presented {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Presented::default();
        };
        match token_of(value) {
            Some(t) => Presented {
                token: Some(t),
                ..Presented::default()
            },
            None => Presented {
                malformed: true,
                ..Presented::default()
            },
        }
    }
}

/// The token in an `Authorization` value. No trimming: a credential with
/// stray whitespace is not the credential, whichever scheme carries it.
fn token_of(value: &HeaderValue) -> Option<String> {
    let value = value.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(rest.to_owned()),
        "basic" => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let text = String::from_utf8(raw).ok()?;
            let (_user, pass) = text.split_once(':')?;
            Some(pass.to_owned())
        }
        _ => None,
    }
}

/// What [`Authenticator::check`] returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, AuthError>> + Send + 'a>>;

/// Decides whether a request's credential belongs to a paired device.
pub trait Authenticator: Send + Sync + 'static {
    /// Who is asking, or why they may not.
    fn check(&self, presented: Presented) -> CheckFuture<'_>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// the request carries no credential
    #[error("no credential")]
    Missing,
    /// the credential is not valid
    #[error("invalid credential")]
    Invalid,
    /// nobody can say now whether it is (the registry is not reachable)
    #[error("the device registry is not reachable; try again")]
    Unavailable,
}

/// The answer for a refused credential: 401 asking for Basic credentials,
/// or 503 when the registry could not be asked.
pub fn unauthorized(e: &AuthError) -> hyper::Response<Body> {
    if *e == AuthError::Unavailable {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        );
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
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

/// Constant time in the length: no early exit on the first difference.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// One fixed token, for tests and tools that embed a service: it lets in
/// one device named "token" with the owner role.
pub struct TokenAuth {
    token: String,
}

impl TokenAuth {
    pub fn new(token: &str) -> TokenAuth {
        TokenAuth {
            token: token.to_owned(),
        }
    }

    fn decide(&self, p: &Presented) -> Result<Identity, AuthError> {
        match &p.token {
            Some(t) if equal(t.as_bytes(), self.token.as_bytes()) => Ok(Identity {
                device: "token".into(),
                name: "token".into(),
                role: "owner".into(),
            }),
            Some(_) => Err(AuthError::Invalid),
            None if p.malformed => Err(AuthError::Invalid),
            None => Err(AuthError::Missing),
        }
    }
}

impl Authenticator for TokenAuth {
    fn check(&self, presented: Presented) -> CheckFuture<'_> {
        let r = self.decide(&presented);
        Box::pin(async move { r })
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

    fn check(a: &TokenAuth, h: &HeaderMap) -> Result<String, AuthError> {
        a.decide(&Presented::from_headers(h)).map(|i| i.device)
    }

    #[test]
    fn bearer_and_basic_with_the_token_pass_nothing_else_does() {
        let a = TokenAuth::new("00ff");
        assert_eq!(check(&a, &headers("Bearer 00ff")), Ok("token".into()));
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:00ff");
        assert!(check(&a, &headers(&format!("Basic {basic}"))).is_ok());
        assert_eq!(check(&a, &HeaderMap::new()), Err(AuthError::Missing));
        assert_eq!(check(&a, &headers("Bearer 00fe")), Err(AuthError::Invalid));
        assert_eq!(check(&a, &headers("Bearer 00ff0")), Err(AuthError::Invalid));
        assert_eq!(check(&a, &headers("Basic !!!")), Err(AuthError::Invalid));
        let nopass = base64::engine::general_purpose::STANDARD.encode("anyone");
        assert_eq!(
            check(&a, &headers(&format!("Basic {nopass}"))),
            Err(AuthError::Invalid)
        );
        assert_eq!(check(&a, &headers("Digest x")), Err(AuthError::Invalid));
        // Stray whitespace is refused the same way under both schemes.
        assert_eq!(
            check(&a, &headers("Bearer 00ff\t")),
            Err(AuthError::Invalid)
        );
        assert_eq!(check(&a, &headers("Bearer  00ff")), Err(AuthError::Invalid));
        let spaced = base64::engine::general_purpose::STANDARD.encode("anyone:00ff ");
        assert_eq!(
            check(&a, &headers(&format!("Basic {spaced}"))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            unauthorized(&AuthError::Missing).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            unauthorized(&AuthError::Unavailable).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn the_key_a_connection_proved_is_presented_with_the_headers() {
        let mut req = hyper::Request::new(());
        req.headers_mut()
            .insert(AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        req.extensions_mut().insert(PeerKey("ab".into()));
        let p = Presented::from_request(&req);
        assert_eq!(p.token.as_deref(), Some("t"));
        assert_eq!(p.key.as_deref(), Some("ab"));
        assert!(!p.malformed);
    }
}
