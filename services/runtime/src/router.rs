//! A small router: method and path pattern to handler, with the credential
//! checked by default and a body-size limit per route.
//!
//! * Every route needs the credential ([`Authenticator`]) unless it is
//!   declared with [`Router::public`]; a service cannot forget to ask.
//! * Patterns are `/`-separated: a literal segment, `{name}` (one segment,
//!   percent-decoded) or `{*name}` at the end (the rest of the path, raw).
//!   The first route that matches the path wins; a path that matches only
//!   with another method is 405 with `Allow`.
//! * Each route has a body limit (default [`DEFAULT_BODY_LIMIT`]): a larger
//!   Content-Length is 413 before the handler runs, and a chunked body that
//!   passes the limit fails to read ([`http_body_util::LengthLimitError`]).
//!
//! The credential is checked before the body limit and the method, so a
//! stranger learns nothing about which routes exist.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};

use crate::auth::{unauthorized, AuthError, Authenticator, Presented};

/// Largest request body a route takes unless it says otherwise.
pub const DEFAULT_BODY_LIMIT: u64 = 64 << 10;

/// A request body as a routed handler gets it (limited to its route's size).
pub type RoutedBody = UnsyncBoxBody<Bytes, std::io::Error>;
/// A response body any handler can give.
pub type AnyBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// Boxes a response so handlers with different body types share one router.
pub fn boxed<B>(r: Response<B>) -> Response<AnyBody>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    r.map(|b| {
        b.map_err(|e| std::io::Error::other(e.into()))
            .boxed_unsync()
    })
}

/// The values of a route's `{name}` segments.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Params(HashMap<String, String>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Response<AnyBody>> + Send>>;
type Handler = Arc<dyn Fn(Request<RoutedBody>, Params) -> HandlerFuture + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Param(String),
    Rest(String),
}

struct Route {
    /// `None`: every method (WebDAV's own).
    method: Option<Method>,
    pattern: Vec<Seg>,
    public: bool,
    body_limit: u64,
    handler: Handler,
}

/// Routes of one service.
pub struct Router {
    routes: Vec<Route>,
    auth: Arc<dyn Authenticator>,
}

fn parse_pattern(p: &str) -> Vec<Seg> {
    p.trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            if let Some(n) = s.strip_prefix("{*").and_then(|s| s.strip_suffix('}')) {
                Seg::Rest(n.to_owned())
            } else if let Some(n) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Seg::Param(n.to_owned())
            } else {
                Seg::Lit(s.to_owned())
            }
        })
        .collect()
}

/// Matches a path against a pattern; the parameters when it does.
fn matches(pattern: &[Seg], path: &str) -> Option<Params> {
    let mut params = HashMap::new();
    let mut rest = path.strip_prefix('/')?;
    for (i, seg) in pattern.iter().enumerate() {
        if let Seg::Rest(name) = seg {
            // Only last; takes the rest as sent (it may be empty).
            if i + 1 != pattern.len() {
                return None;
            }
            params.insert(name.clone(), rest.to_owned());
            return Some(Params(params));
        }
        let (part, next) = match rest.split_once('/') {
            Some((a, b)) => (a, b),
            None => (rest, ""),
        };
        if part.is_empty() {
            return None;
        }
        match seg {
            Seg::Lit(l) if l == part => {}
            Seg::Param(name) => {
                let v = percent_encoding::percent_decode_str(part)
                    .decode_utf8()
                    .ok()?
                    .into_owned();
                params.insert(name.clone(), v);
            }
            _ => return None,
        }
        rest = next;
    }
    rest.is_empty().then_some(Params(params))
}

impl Router {
    /// A router whose private routes accept what `auth` accepts.
    pub fn new(auth: Arc<dyn Authenticator>) -> Router {
        Router {
            routes: Vec::new(),
            auth,
        }
    }

    fn add<H, F, B>(
        mut self,
        method: Option<Method>,
        pattern: &str,
        public: bool,
        handler: H,
    ) -> Router
    where
        H: Fn(Request<RoutedBody>, Params) -> F + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let handler: Handler = Arc::new(move |req, params| {
            let f = handler(req, params);
            Box::pin(async move { boxed(f.await) })
        });
        self.routes.push(Route {
            method,
            pattern: parse_pattern(pattern),
            public,
            body_limit: DEFAULT_BODY_LIMIT,
            handler,
        });
        self
    }

    /// A route that needs the credential.
    pub fn route<H, F, B>(self, method: Method, pattern: &str, handler: H) -> Router
    where
        H: Fn(Request<RoutedBody>, Params) -> F + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.add(Some(method), pattern, false, handler)
    }

    /// A route for every method (a WebDAV tree), needing the credential.
    pub fn any<H, F, B>(self, pattern: &str, handler: H) -> Router
    where
        H: Fn(Request<RoutedBody>, Params) -> F + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.add(None, pattern, false, handler)
    }

    /// A route anyone may use (`/health`): say why at the call.
    pub fn public<H, F, B>(self, method: Method, pattern: &str, handler: H) -> Router
    where
        H: Fn(Request<RoutedBody>, Params) -> F + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.add(Some(method), pattern, true, handler)
    }

    /// Sets the body limit of the route added last (`u64::MAX`: none, for
    /// routes that stream uploads to disk and bound them themselves).
    pub fn body_limit(mut self, bytes: u64) -> Router {
        if let Some(r) = self.routes.last_mut() {
            r.body_limit = bytes;
        }
        self
    }

    /// The routes' methods (`None`: any), patterns and whether they are
    /// public, for tests that try every route.
    pub fn describe(&self) -> Vec<(Option<Method>, String, bool)> {
        self.routes
            .iter()
            .map(|r| {
                let p: Vec<String> = r
                    .pattern
                    .iter()
                    .map(|s| match s {
                        Seg::Lit(l) => l.clone(),
                        Seg::Param(n) => format!("{{{n}}}"),
                        Seg::Rest(n) => format!("{{*{n}}}"),
                    })
                    .collect();
                (r.method.clone(), format!("/{}", p.join("/")), r.public)
            })
            .collect()
    }

    /// Answers one request (the runtime's body, or any other in tests).
    pub async fn handle<B>(&self, req: Request<B>) -> Response<AnyBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let found: Vec<(&Route, Params)> = self
            .routes
            .iter()
            .filter_map(|r| matches(&r.pattern, &path).map(|p| (r, p)))
            .collect();
        // HEAD is answered by a GET route (hyper drops the body).
        let same = |r: &Route| match &r.method {
            None => true,
            Some(m) => m == req.method() || (req.method() == Method::HEAD && m == Method::GET),
        };
        let chosen = found.iter().find(|(r, _)| same(r));
        let public = chosen.is_some_and(|(r, _)| r.public);
        let mut req = req;
        let mut watch = None;
        if !public {
            let presented = Presented::from_request(&req);
            // Listening before asking: a revocation that lands between the
            // answer and the subscription is not missed.
            let changes = self.auth.changes();
            let checked = if presented.cross_site {
                Err(AuthError::CrossSite)
            } else {
                self.auth.check(presented.clone()).await
            };
            match checked {
                // Handlers that act on who asks (an owner's requests) read it here.
                Ok(who) => {
                    if let Some(rx) = changes {
                        let auth = self.auth.clone();
                        let device = who.device.clone();
                        watch = Some(Box::pin(revoked(auth, presented, device, rx)) as Revoked);
                    }
                    req.extensions_mut().insert(who);
                }
                Err(e) => return boxed(unauthorized(&e)),
            }
        }
        let Some((route, params)) = chosen else {
            if found.is_empty() {
                return boxed(crate::not_found());
            }
            let mut allow: Vec<&str> = found
                .iter()
                .filter_map(|(r, _)| r.method.as_ref().map(Method::as_str))
                .collect();
            allow.dedup();
            let mut r = crate::json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": format!("{} is not allowed here", req.method())}),
            );
            if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
                r.headers_mut().insert(ALLOW, v);
            }
            return boxed(r);
        };
        let announced = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > route.body_limit) {
            return boxed(crate::json(
                StatusCode::PAYLOAD_TOO_LARGE,
                &serde_json::json!({"error": format!("the body may be at most {} bytes", route.body_limit)}),
            ));
        }
        let limit = route.body_limit;
        let req = req.map(|b| {
            if limit == u64::MAX {
                b.map_err(|e| std::io::Error::other(e.into()))
                    .boxed_unsync()
            } else {
                http_body_util::Limited::new(b, usize::try_from(limit).unwrap_or(usize::MAX))
                    .map_err(std::io::Error::other)
                    .boxed_unsync()
            }
        });
        let answer = (route.handler)(req, params.clone());
        let Some(mut watch) = watch else {
            return answer.await;
        };
        // A device revoked while its request runs loses it: before the
        // answer, a 401; while the answer's body streams, the connection.
        let answer = tokio::select! {
            a = answer => a,
            () = &mut watch => return boxed(unauthorized(&AuthError::Invalid)),
        };
        answer.map(|inner| {
            Cut {
                inner,
                watch: Some(watch),
            }
            .boxed_unsync()
        })
    }
}

/// Resolves once the device behind `presented` is let in no more.
type Revoked = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Waits for a change to `device`'s registry entry, asks again, and
/// resolves when the answer is no. Never resolves otherwise (a rename, or a
/// registry that cannot say right now, leaves the request alone).
async fn revoked(
    auth: Arc<dyn Authenticator>,
    presented: Presented,
    device: String,
    mut changes: tokio::sync::broadcast::Receiver<String>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match changes.recv().await {
            // An empty id: the registry could not say which device changed
            // (a reconnect, where changes may have been missed): ask again.
            Ok(d) if !d.is_empty() && d != device => continue,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return std::future::pending().await,
        }
        match auth.check(presented.clone()).await {
            Err(AuthError::Invalid | AuthError::Missing) => return,
            Ok(who) if who.device != device => return,
            _ => {}
        }
    }
}

/// An answer's body that ends in an error (hyper then drops the
/// connection) once its device is revoked.
struct Cut {
    inner: AnyBody,
    /// `None` once it resolved.
    watch: Option<Revoked>,
}

impl hyper::body::Body for Cut {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(w) = this.watch.as_mut() {
            if w.as_mut().poll(cx).is_ready() {
                this.watch = None;
                tracing::warn!("a revoked device's answer was cut off");
                return std::task::Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the device was revoked",
                ))));
            }
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenAuth;
    use http_body_util::Full;

    fn router() -> Router {
        Router::new(Arc::new(TokenAuth::new("sesame")))
            .public(Method::GET, "/health", |_, _| async { crate::health("t") })
            .route(Method::GET, "/{db}", |_, p: Params| async move {
                crate::json(StatusCode::OK, &serde_json::json!({"db": p.get("db")}))
            })
            .route(
                Method::PUT,
                "/{db}",
                |req: Request<RoutedBody>, _| async move {
                    match req.into_body().collect().await {
                        Ok(b) => crate::json(
                            StatusCode::OK,
                            &serde_json::json!({"got": b.to_bytes().len()}),
                        ),
                        Err(e) => crate::json(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &serde_json::json!({"error": e.to_string()}),
                        ),
                    }
                },
            )
            .body_limit(10)
    }

    fn req(
        method: Method,
        path: &str,
        auth: bool,
        body: &'static [u8],
        length: bool,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder().method(method).uri(path);
        if auth {
            b = b.header("authorization", "Bearer sesame");
        }
        if length {
            b = b.header("content-length", body.len());
        }
        b.body(Full::new(Bytes::from_static(body))).unwrap()
    }

    /// Lets "sesame" in as device "d1" until told otherwise, and reports
    /// changes as the registry would.
    struct Switch {
        allowed: std::sync::atomic::AtomicBool,
        changes: tokio::sync::broadcast::Sender<String>,
    }

    impl Authenticator for Switch {
        fn check(&self, p: Presented) -> crate::auth::CheckFuture<'_> {
            let ok = self.allowed.load(std::sync::atomic::Ordering::SeqCst)
                && p.token.as_deref() == Some("sesame");
            Box::pin(async move {
                if ok {
                    Ok(crate::auth::Identity {
                        device: "d1".into(),
                        name: "phone".into(),
                        role: "device".into(),
                    })
                } else {
                    Err(AuthError::Invalid)
                }
            })
        }

        fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
            Some(self.changes.subscribe())
        }
    }

    /// A streaming answer cut by a change naming `changed`, once the device
    /// is let in no more; whether it was cut.
    async fn cut_by(changed: &str, still_allowed: bool) -> bool {
        let auth = Arc::new(Switch {
            allowed: true.into(),
            changes: tokio::sync::broadcast::channel(8).0,
        });
        let (tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(1);
        let body = std::sync::Mutex::new(Some(body));
        let r = Router::new(auth.clone()).route(Method::GET, "/feed", move |_, _| {
            let b = body.lock().unwrap().take().unwrap();
            async move { Response::new(b.boxed_unsync()) }
        });
        let mut answer = r.handle(req(Method::GET, "/feed", true, b"", false)).await;
        assert_eq!(answer.status(), StatusCode::OK);
        auth.allowed
            .store(still_allowed, std::sync::atomic::Ordering::SeqCst);
        auth.changes.send(changed.to_owned()).unwrap();
        let _keep_open = tx;
        let frame = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            answer.body_mut().frame(),
        )
        .await;
        matches!(frame, Ok(Some(Err(_))))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_running_answer_is_cut_when_its_device_is_let_in_no_more() {
        // Its own id, or "" (a reconnect: any device may have changed).
        assert!(cut_by("d1", false).await);
        assert!(cut_by("", false).await);
        // Another device's change, or a change that still lets it in (a
        // rename): the answer goes on.
        assert!(!cut_by("d2", false).await);
        assert!(!cut_by("d1", true).await);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn private_routes_need_the_credential_public_ones_do_not() {
        let r = router();
        assert_eq!(
            r.handle(req(Method::GET, "/health", false, b"", false))
                .await
                .status(),
            200
        );
        for (m, p, public) in r.describe() {
            let m = m.unwrap_or(Method::POST);
            let path = p.replace("{db}", "x");
            let st = r
                .handle(req(m.clone(), &path, false, b"", false))
                .await
                .status();
            if public {
                assert_eq!(st, 200, "{m} {path}");
            } else {
                assert_eq!(st, 401, "{m} {path} without the credential");
            }
        }
        // Unknown paths and methods tell a stranger nothing either.
        assert_eq!(
            r.handle(req(Method::GET, "/a/b", false, b"", false))
                .await
                .status(),
            401
        );
        assert_eq!(
            r.handle(req(Method::DELETE, "/x", false, b"", false))
                .await
                .status(),
            401
        );
        let ok = r
            .handle(req(Method::GET, "/my%20db", true, b"", false))
            .await;
        assert_eq!(ok.status(), 200);
        let body = ok.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], br#"{"db":"my db"}"#);
        let no = r.handle(req(Method::DELETE, "/x", true, b"", false)).await;
        assert_eq!(no.status(), 405);
        assert_eq!(no.headers()["allow"], "GET, PUT");
        assert_eq!(
            r.handle(req(Method::GET, "/a/b", true, b"", false))
                .await
                .status(),
            404
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bodies_over_the_route_limit_are_refused() {
        let r = router();
        let small = r
            .handle(req(Method::PUT, "/x", true, b"0123456789", true))
            .await;
        assert_eq!(small.status(), 200);
        let big = r
            .handle(req(Method::PUT, "/x", true, b"0123456789a", true))
            .await;
        assert_eq!(big.status(), 413, "announced over the limit");
        // Without a Content-Length, reading stops at the limit.
        let chunked = r
            .handle(req(Method::PUT, "/x", true, b"0123456789a", false))
            .await;
        assert_eq!(chunked.status(), 413, "streamed over the limit");
    }

    #[test]
    fn patterns_match_literals_params_and_rests() {
        let p = parse_pattern("/{db}/_changes");
        let m = matches(&p, "/my%20db/_changes").unwrap();
        assert_eq!(m.get("db"), Some("my db"));
        assert!(matches(&p, "/db/_changes/x").is_none());
        assert!(matches(&p, "//_changes").is_none());
        assert!(matches(&p, "/db").is_none());
        let r = parse_pattern("/files/{*path}");
        assert_eq!(
            matches(&r, "/files/a/b%20c").unwrap().get("path"),
            Some("a/b%20c")
        );
        assert_eq!(matches(&r, "/files/").unwrap().get("path"), Some(""));
        assert!(matches(&r, "/other/a").is_none());
        assert!(matches(&parse_pattern("/"), "/").is_some());
        assert!(matches(&parse_pattern("/"), "/x").is_none());
        assert!(matches(&parse_pattern("/health"), "/health").is_some());
        assert!(matches(&parse_pattern("/health"), "/health/").is_some());
    }
}
