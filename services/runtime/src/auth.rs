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
//!
//! A browser paired through the box's page holds its token as the cookie
//! [`TOKEN_COOKIE`]. A cookie is ambient: the browser sends it with
//! requests that other sites' pages cause. So the cookie counts only when
//! [`same_site`] says the request comes from a page of the box itself:
//!
//! * with an `Origin` header, that origin must be `https://` and name the
//!   host the request was sent to (`Host`), on any port (every service of
//!   the box is on that host);
//! * without one, the method must be safe (GET, HEAD, OPTIONS, PROPFIND:
//!   they change nothing), or `Sec-Fetch-Site` must say `same-origin` or
//!   `same-site`. Browsers send `Origin` on every cross-origin request and
//!   every request that may change something, so a request that fails this
//!   and still carries the cookie was caused by another site.
//!
//! A refused cookie is 403 ([`AuthError::CrossSite`]) whatever the route.
//! A bearer token, Basic or a client certificate wins over the cookie and
//! is never subject to this rule: no browser sends those by itself.

use std::future::Future;
use std::pin::Pin;

use base64::Engine;
use hyper::header::{
    HeaderMap, HeaderValue, AUTHORIZATION, COOKIE, HOST, ORIGIN, WWW_AUTHENTICATE,
};
use hyper::{Method, StatusCode};

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

/// The SHA-256 (hex) of the CA key that certified the client's key, when
/// the client presented such a chain ([`crate::tls::peer_issuer`]): another
/// box's service, certified by that box's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIssuer(pub String);

/// The cookie a browser paired through the box's page keeps its token in.
pub const TOKEN_COOKIE: &str = "cloudlet_token";

/// What a request offers as its credential.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presented {
    /// A token from `Authorization` (bearer, or Basic's password), or else
    /// from the [`TOKEN_COOKIE`] cookie of a same-site request.
    pub token: Option<String>,
    /// The hash of the client's TLS key.
    pub key: Option<String>,
    /// The hash of the CA key that certified it ([`PeerIssuer`]): counts
    /// only for a paired box, and only when `key` itself is not paired.
    pub issuer: Option<String>,
    /// `Authorization` was there but could not be read.
    pub malformed: bool,
    /// The token came from the cookie (a browser's).
    pub cookie: bool,
    /// The only credential was the cookie, on a request another site caused
    /// ([`same_site`] refused it): the token is not taken.
    pub cross_site: bool,
}

impl Presented {
    /// Reads the credential of a request from its headers and extensions.
    pub fn from_request<B>(req: &hyper::Request<B>) -> Presented {
        let mut p = Presented::from_headers(req.headers());
        p.key = req.extensions().get::<PeerKey>().map(|k| k.0.clone());
        p.issuer = req.extensions().get::<PeerIssuer>().map(|k| k.0.clone());
        let other = p.key.is_some() || p.token.is_some() || p.malformed;
        if !other {
            if let Some(t) = cookie_of(req.headers()) {
                if same_site(req.method(), req.headers()) {
                    p.token = Some(t);
                    p.cookie = true;
                } else {
                    p.cross_site = true;
                }
            }
        }
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

/// The value of the [`TOKEN_COOKIE`] cookie, if the request has one (the
/// first, if it has several: the one with the longest path comes first).
fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim_start_matches(' ').split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Methods that change nothing: a cross-site page may cause them, and its
/// script cannot read the answer (no CORS grant covers a cookie from
/// another origin: see [`same_site`]).
fn safe(method: &Method) -> bool {
    *method == Method::GET
        || *method == Method::HEAD
        || *method == Method::OPTIONS
        || method.as_str() == "PROPFIND"
}

/// The host name of a `Host` value or of an origin's authority, without
/// its port, lower-cased (an IPv6 literal keeps its brackets).
fn host_name(authority: &str) -> Option<String> {
    let a: hyper::http::uri::Authority = authority.parse().ok()?;
    if authority.contains('@') {
        return None;
    }
    Some(a.host().to_ascii_lowercase())
}

/// Whether a request comes from a page of the box itself (the rule in the
/// module's comment): an `Origin`, if sent, is `https://` on the host the
/// request was sent to (any port); without one, the method is safe or
/// `Sec-Fetch-Site` says `same-origin` or `same-site`. The browser pairing
/// routes ask it too, so only the box's page starts a browser pairing.
pub fn same_site(method: &Method, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        return safe(method) || matches!(fetch_site, Some("same-origin" | "same-site"));
    };
    let Some(authority) = origin
        .to_str()
        .ok()
        .and_then(|o| o.strip_prefix("https://"))
    else {
        // `null`, `http://…` (a page anyone on the path can write), garbage.
        return false;
    };
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(host_name);
    match (host_name(authority), host) {
        (Some(o), Some(h)) => o == h,
        _ => false,
    }
}

/// What [`Authenticator::check`] returns.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Result<Identity, AuthError>> + Send + 'a>>;

/// Decides whether a request's credential belongs to a paired device.
pub trait Authenticator: Send + Sync + 'static {
    /// Who is asking, or why they may not.
    fn check(&self, presented: Presented) -> CheckFuture<'_>;

    /// The ids of devices whose registry entry changed (revoked, renamed),
    /// as they change, if this authenticator hears of it: the router then
    /// asks again for each request of such a device still running, and
    /// cuts it when the device is gone. An empty id means any device may
    /// have changed (every running request asks again).
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }
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
    /// the only credential is the browser's cookie, on a request that
    /// another site's page caused
    #[error("this browser's credential is not accepted on a request from another site's page")]
    CrossSite,
}

/// The answer for a refused credential: 401 asking for Basic credentials,
/// 403 for a browser's cookie on another site's request, or 503 when the
/// registry could not be asked.
pub fn unauthorized(e: &AuthError) -> hyper::Response<Body> {
    if *e == AuthError::CrossSite {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        );
    }
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

    fn browser(method: &str, headers: &[(&str, &str)]) -> Presented {
        let mut b = hyper::Request::builder()
            .method(method)
            .uri("/x")
            .header("host", "box.cloudlet:8443")
            .header("cookie", "theme=dark; cloudlet_token=t0k; other=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        Presented::from_request(&b.body(()).unwrap())
    }

    #[test]
    fn the_cookie_is_a_token_on_same_site_requests_and_refused_on_cross_site_changes() {
        let taken = |p: &Presented| p.token.as_deref() == Some("t0k") && p.cookie;
        // Reading: a navigation or a same-origin fetch without Origin.
        for m in ["GET", "HEAD", "OPTIONS", "PROPFIND"] {
            assert!(taken(&browser(m, &[])), "{m}");
        }
        // Changing, from the box's own pages: any port of the same host.
        for origin in [
            "https://box.cloudlet:8080",
            "https://BOX.cloudlet",
            "https://box.cloudlet:8443",
        ] {
            for m in ["PUT", "DELETE", "POST", "MOVE", "GET"] {
                assert!(taken(&browser(m, &[("origin", origin)])), "{m} {origin}");
            }
        }
        assert!(taken(&browser("PUT", &[("sec-fetch-site", "same-origin")])));
        assert!(taken(&browser("PUT", &[("sec-fetch-site", "same-site")])));
        // Another site, plain HTTP (anyone on the path writes those pages),
        // an opaque origin, or an unsafe method with nothing to tell.
        for (m, h) in [
            ("PUT", vec![("origin", "https://evil.example")]),
            ("DELETE", vec![("origin", "https://evil.example:8443")]),
            ("PUT", vec![("origin", "http://box.cloudlet:8080")]),
            ("POST", vec![("origin", "null")]),
            ("PUT", vec![("origin", "https://user@box.cloudlet")]),
            ("PUT", vec![]),
            ("DELETE", vec![("sec-fetch-site", "cross-site")]),
            // A cross-origin read that CORS might otherwise let a page see.
            ("GET", vec![("origin", "https://evil.example")]),
            ("GET", vec![("origin", "http://box.cloudlet:8080")]),
        ] {
            let p = browser(m, &h);
            assert!(p.cross_site && p.token.is_none(), "{m} {h:?}");
        }
        // A bearer token wins over the cookie and is not subject to the rule.
        let p = browser(
            "PUT",
            &[
                ("origin", "https://evil.example"),
                ("authorization", "Bearer b"),
            ],
        );
        assert_eq!(
            (p.token.as_deref(), p.cookie, p.cross_site),
            (Some("b"), false, false)
        );
        // The name must match exactly; no cookie is no credential.
        let mut req = hyper::Request::new(());
        req.headers_mut().insert(
            COOKIE,
            HeaderValue::from_static("xcloudlet_token=a; cloudlet_tokenx=b"),
        );
        assert_eq!(Presented::from_request(&req), Presented::default());
        assert_eq!(
            unauthorized(&AuthError::CrossSite).status(),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn same_site_compares_host_names_without_ports_ipv6_included() {
        let h = |host: &str, origin: &str| {
            let mut m = HeaderMap::new();
            m.insert(HOST, HeaderValue::from_str(host).unwrap());
            m.insert(ORIGIN, HeaderValue::from_str(origin).unwrap());
            same_site(&Method::PUT, &m)
        };
        assert!(h("[::1]:8443", "https://[::1]:8080"));
        assert!(!h("[::1]:8443", "https://[::2]:8080"));
        assert!(h("192.168.1.5:8443", "https://192.168.1.5:8080"));
        assert!(!h("192.168.1.5:8443", "https://192.168.1.50:8080"));
        assert!(!h("box.cloudlet", "https://box.cloudlet.evil.example"));
        // No Host: nothing to compare with.
        let mut m = HeaderMap::new();
        m.insert(ORIGIN, HeaderValue::from_static("https://box.cloudlet"));
        assert!(!same_site(&Method::PUT, &m));
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
