//! The service side of init's contract, and the HTTP plumbing every service uses.
//!
//! * [`notify_ready`]: write `READY` to the descriptor init passed in
//!   `CLOUDLET_READY_FD` once the service accepts requests.
//! * [`serve`]: an HTTP/1.1 server loop on one listener that stops accepting
//!   on SIGTERM/SIGINT and lets requests in flight finish. It holds every
//!   client to [`Limits`]: a cap on connections in all and per peer address,
//!   a deadline for request heads (which also closes idle keep-alive
//!   connections) and one for request bodies that stop arriving
//!   ([`RequestBody`]), so a flood, a slowloris or a stalled upload from one
//!   host cannot take the service from the others.
//! * [`health`]: the `/health` answer every service gives.

pub mod auth;
mod body;
mod conn_limit;
pub mod dial;
mod limits;
pub mod registry;
pub mod router;
pub mod stall;
pub mod tls;

pub use body::{BodyError, IdleTimeout, RequestBody};
pub use limits::{
    raise_open_file_limit, Limits, LimitsError, BODY_IDLE_TIMEOUT_VAR, HEADER_TIMEOUT_VAR,
    OPEN_FILE_LIMIT,
};

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use conn_limit::{ConnLimiter, RateLimitedLog};

pub type Body = Full<Bytes>;

/// What a handler may answer with: a whole body ([`Body`]) or a stream.
pub trait ResponseBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<T> ResponseBody for T where
    T: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// Tells init the service is ready, once. Without init (no
/// `CLOUDLET_READY_FD`) it does nothing.
///
/// The variable is left in the environment (removing it is unsound once
/// threads exist); a flag makes sure the descriptor is used once, since a
/// second use could hit whatever file reused its number.
pub fn notify_ready() -> std::io::Result<()> {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(fd) = std::env::var("CLOUDLET_READY_FD") else {
        return Ok(());
    };
    if DONE.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(());
    }
    write_ready(&fd)
}

/// Writes `READY` to the descriptor numbered `fd` and closes it.
fn write_ready(fd: &str) -> std::io::Result<()> {
    let fd: i32 = fd.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "CLOUDLET_READY_FD is not a number",
        )
    })?;
    // SAFETY: init opened this descriptor for us and nothing else in the
    // process uses it; the File takes ownership and closes it after the write.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(b"READY\n")
}

/// `N` random bytes from the kernel (getrandom(2) through /dev/urandom's
/// interface, which blocks only before the pool is first seeded).
pub fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut raw = [0u8; N];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut raw)?;
    Ok(raw)
}

/// Writes `bytes` to `path` durably (a temporary file, fsynced, renamed,
/// the directory fsynced), readable only by this user: keys and the like.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Logging to stderr, which init captures into the service's log buffer.
pub fn init_logging(service: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    tracing::debug!(service, "logging ready");
}

/// A JSON response.
pub fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// A plain-text response.
pub fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// The `/health` answer.
pub fn health(service: &str) -> Response<Body> {
    json(
        StatusCode::OK,
        &serde_json::json!({"service": service, "status": "ok", "version": env!("CARGO_PKG_VERSION")}),
    )
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Binds `addr`, reports ready, serves `handler` until `shutdown` resolves,
/// then waits (up to `grace`) for requests in flight. [`Limits::default`] apply.
pub async fn serve<H, F, B>(
    addr: SocketAddr,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    serve_with(
        addr,
        Transport::Plain,
        Limits::default(),
        handler,
        shutdown,
        grace,
    )
    .await
}

/// [`serve`] with the given limits.
pub async fn serve_with<H, F, B>(
    addr: SocketAddr,
    transport: Transport,
    limits: Limits,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let listener = TcpListener::bind(addr).await?;
    let tls = matches!(transport, Transport::Tls(_));
    tracing::info!(addr = %listener.local_addr()?, tls, "listening");
    notify_ready()?;
    serve_listener_on(listener, transport, limits, handler, shutdown, grace).await
}

/// [`serve`] on a listener the caller bound (tests bind port 0).
pub async fn serve_listener<H, F, B>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    serve_listener_with(listener, Limits::default(), handler, shutdown, grace).await
}

/// [`serve_listener_on`] in plain HTTP.
pub async fn serve_listener_with<H, F, B>(
    listener: TcpListener,
    limits: Limits,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    serve_listener_on(listener, Transport::Plain, limits, handler, shutdown, grace).await
}

/// How a listener's connections are carried.
#[derive(Clone)]
pub enum Transport {
    /// Plain HTTP: tests, and host runs on loopback (`--plain`).
    Plain,
    /// HTTPS with this configuration ([`tls::server_config`]).
    Tls(Arc<rustls::ServerConfig>),
}

/// What a TLS connection knows of its client, put in each request's
/// extensions as [`auth::PeerKey`] and [`tls::SessionBinding`].
#[derive(Clone)]
struct TlsPeer {
    key: Option<String>,
    /// As [`auth::PeerIssuer`].
    issuer: Option<String>,
    binding: Option<tls::SessionBinding>,
}

/// Where a request came from (the TCP peer), in its extensions: for logs
/// that must say who did something (who asked to pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// One accepted connection, served by its own task.
struct Conn<H> {
    handler: Arc<H>,
    body_idle_timeout: Duration,
    http: hyper::server::conn::http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
    cut: CancellationToken,
    peer: SocketAddr,
}

impl<H> Conn<H> {
    async fn serve<IO, F, B>(self, io: IO, tls: Option<TlsPeer>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<B>> + Send + 'static,
        B: ResponseBody,
    {
        let Conn {
            handler,
            body_idle_timeout,
            http,
            watcher,
            cut,
            peer,
        } = self;
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let h = handler.clone();
            let mut req = req.map(|b| IdleTimeout::new(b, body_idle_timeout));
            req.extensions_mut().insert(PeerAddr(peer));
            if let Some(t) = &tls {
                if let Some(k) = &t.key {
                    req.extensions_mut().insert(auth::PeerKey(k.clone()));
                }
                if let Some(k) = &t.issuer {
                    req.extensions_mut().insert(auth::PeerIssuer(k.clone()));
                }
                if let Some(b) = t.binding {
                    req.extensions_mut().insert(b);
                }
            }
            async move { Ok::<_, Infallible>(h(req).await) }
        });
        let conn = watcher.watch(http.serve_connection(TokioIo::new(io), svc));
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection");
            },
            _ = cut.cancelled() => tracing::debug!(%peer, "connection cut at shutdown"),
        }
    }
}

/// The server loop: plain HTTP or TLS (`transport`), with the given limits.
///
/// On `shutdown` it stops accepting, closes idle keep-alive connections at
/// once, lets requests in flight finish (their connections close after the
/// answer) for up to `grace`, then cuts what is still open.
pub async fn serve_listener_on<H, F, B>(
    listener: TcpListener,
    transport: Transport,
    limits: Limits,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let handler = Arc::new(handler);
    let conns = ConnLimiter::new(limits.max_connections, limits.max_connections_per_ip);
    let mut http = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper enforces no timeout at all.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A request head over 64 KiB is refused (431), not buffered: 512
        // connections of unfinished 400 KB heads held 200 MB.
        .max_buf_size(64 << 10);
    let graceful = GracefulShutdown::new();
    let tasks = TaskTracker::new();
    // Cancelled when the grace period is over: ends the connections left.
    let cut = CancellationToken::new();
    let mut accept_failures = RateLimitedLog::new(Duration::from_secs(1));
    let mut refusals = RateLimitedLog::new(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    if let Some(held_back) = accept_failures.allow(Instant::now()) {
                        tracing::warn!(error = %e, held_back, "accept");
                    }
                    // Out of descriptors or memory, the listener stays
                    // readable and accept fails again at once: wait for
                    // connections to end instead of spinning.
                    if out_of_resources(&e) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
        };
        let permit = match conns.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                // Accepted and closed at once rather than left unaccepted:
                // a full kernel backlog would stall every other client's
                // connect, not just this peer's.
                if let Some(held_back) = refusals.allow(Instant::now()) {
                    tracing::warn!(%peer, reason = %why, held_back, "connection refused");
                }
                drop(stream);
                continue;
            }
        };
        // Answers go out as soon as they are written: a response head
        // and a small body in two writes must not wait on Nagle and the
        // peer's delayed ACK (40 ms per small file otherwise).
        let _ = stream.set_nodelay(true);
        let stream = stall::WriteStall::new(stream, limits.write_stall_timeout);
        let conn = Conn {
            handler: handler.clone(),
            body_idle_timeout: limits.body_idle_timeout,
            http: http.clone(),
            watcher: graceful.watcher(),
            cut: cut.clone(),
            peer,
        };
        let tls = match &transport {
            Transport::Plain => None,
            Transport::Tls(config) => Some((
                tokio_rustls::TlsAcceptor::from(config.clone()),
                limits.header_read_timeout,
            )),
        };
        tasks.spawn(async move {
            match tls {
                None => conn.serve(stream, None).await,
                Some((acceptor, deadline)) => {
                    // The handshake is held to the header deadline: a client
                    // that starts one and stalls is a slowloris too.
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let (_, session) = tls.get_ref();
                            let who = TlsPeer {
                                key: tls::peer_key(session),
                                issuer: tls::peer_issuer(session),
                                binding: tls::session_binding(session),
                            };
                            conn.serve(tls, Some(who)).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    // New connections are refused by the kernel from here on, not queued.
    drop(listener);
    tracing::info!(open = graceful.count(), "stopping");
    tasks.close();
    // Tells every connection to finish: idle ones close now, busy ones
    // after their answer.
    let finished = async {
        graceful.shutdown().await;
        tasks.wait().await;
    };
    if tokio::time::timeout(grace, finished).await.is_err() {
        tracing::warn!(grace = ?grace, "requests still running after the grace period: cut");
        cut.cancel();
        tasks.wait().await;
    }
    Ok(())
}

/// Accept failures that say the process or the system has run out of
/// something (descriptors, buffers), as opposed to one connection's trouble.
fn out_of_resources(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|n| {
        matches!(
            Errno::from_raw(n),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
        )
    })
}

/// Status code helper for handlers.
pub fn not_found() -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn serves_until_shutdown_and_finishes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_listener(
            listener,
            |req: Request<RequestBody>| async move {
                if req.uri().path() == "/health" {
                    health("test")
                } else {
                    not_found()
                }
            },
            async {
                let _ = rx.await;
            },
            Duration::from_secs(1),
        ));
        let body = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains(r#""service":"test""#), "{body}");
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    /// How long a test waits for what it expects before failing: longer
    /// than any timeout a test waits out, shorter than [`LONG`].
    const GUARD: Duration = Duration::from_secs(10);
    /// A timeout that must not fire during a test.
    const LONG: Duration = Duration::from_secs(120);
    /// A timeout a test waits out.
    const SHORT: Duration = Duration::from_millis(300);

    /// A server on loopback with a handler for every case: `/health`,
    /// `/slow` (answers once the test releases it), `/upload` (reads the
    /// whole body, answers 500 with the error when that fails).
    struct Harness {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
        /// Notified when a `/slow` request has reached the handler.
        entered: Arc<tokio::sync::Notify>,
        /// Lets one `/slow` request answer.
        release: Arc<tokio::sync::Notify>,
    }

    fn start(limits: Limits, grace: Duration) -> Harness {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (e, r) = (entered.clone(), release.clone());
        let handler = move |req: Request<RequestBody>| {
            let (entered, release) = (e.clone(), r.clone());
            async move {
                use http_body_util::BodyExt;
                let plain = "text/plain; charset=utf-8";
                match req.uri().path() {
                    "/health" => health("test"),
                    "/slow" => {
                        entered.notify_one();
                        release.notified().await;
                        text(StatusCode::OK, plain, "finished")
                    }
                    "/upload" => match req.into_body().collect().await {
                        Ok(b) => text(StatusCode::OK, plain, format!("{}", b.to_bytes().len())),
                        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, plain, e.to_string()),
                    },
                    _ => not_found(),
                }
            }
        };
        let server = tokio::spawn(serve_listener_with(
            listener,
            limits,
            handler,
            async {
                let _ = stopped.await;
            },
            grace,
        ));
        Harness {
            addr,
            stop: Some(stop),
            server,
            entered,
            release,
        }
    }

    impl Harness {
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            tokio::time::timeout(GUARD, self.server)
                .await
                .expect("the server stops")
                .unwrap()
                .unwrap();
        }
    }

    /// Limits that never get in the way of a test but for what it changes.
    fn roomy() -> Limits {
        Limits {
            max_connections: 1000,
            max_connections_per_ip: 1000,
            header_read_timeout: LONG,
            body_idle_timeout: LONG,
            write_stall_timeout: LONG,
        }
    }

    /// A connection to `addr` from the loopback address `from`.
    async fn connect_from(from: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((from, 0))).unwrap();
        s.connect(addr).await.unwrap()
    }

    async fn send(s: &mut tokio::net::TcpStream, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        s.write_all(bytes).await.unwrap();
    }

    /// Reads one response (status and body; bodies have Content-Length).
    async fn response(s: &mut tokio::net::TcpStream) -> (u16, String) {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        let read = async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if buf.len() >= end + 4 + len {
                        let status = head[9..12].parse().unwrap();
                        let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]);
                        return (status, body.into_owned());
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before a whole response: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(GUARD, read).await.expect("an answer")
    }

    async fn get(s: &mut tokio::net::TcpStream, path: &str) -> (u16, String) {
        send(
            s,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        response(s).await
    }

    /// Waits for the server to close `s`; returns what it sent before.
    async fn closed_by_server(s: &mut tokio::net::TcpStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        let read = async {
            loop {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) => return,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    // A close with unread data in the server's buffer is a reset.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                    Err(e) => panic!("reading: {e}"),
                }
            }
        };
        tokio::time::timeout(GUARD, read)
            .await
            .expect("the server closes the connection");
        got
    }

    #[tokio::test(flavor = "current_thread")]
    async fn header_timeout_closes_a_silent_connection_and_a_slow_head() {
        let h = start(
            Limits {
                header_read_timeout: SHORT,
                ..roomy()
            },
            GUARD,
        );
        let mut silent = connect_from([127, 0, 0, 1], h.addr).await;
        // Slowloris: a head begun and never finished.
        let mut slow = connect_from([127, 0, 0, 1], h.addr).await;
        send(&mut slow, b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
        assert_eq!(closed_by_server(&mut silent).await, b"");
        assert_eq!(closed_by_server(&mut slow).await, b"");
        h.stop().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn header_timeout_also_closes_an_idle_keep_alive_connection() {
        let h = start(
            Limits {
                header_read_timeout: SHORT,
                ..roomy()
            },
            GUARD,
        );
        let mut s = connect_from([127, 0, 0, 1], h.addr).await;
        assert_eq!(get(&mut s, "/health").await.0, 200);
        // Kept alive after the answer, then nothing more from the client.
        assert_eq!(closed_by_server(&mut s).await, b"");
        h.stop().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn per_ip_cap_closes_extra_connections_from_one_peer_while_others_are_served() {
        let h = start(
            Limits {
                max_connections_per_ip: 4,
                ..roomy()
            },
            GUARD,
        );
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(connect_from([127, 0, 0, 1], h.addr).await);
        }
        // The server accepts in order, so these come after the four.
        let mut extra = Vec::new();
        for _ in 0..3 {
            extra.push(connect_from([127, 0, 0, 1], h.addr).await);
        }
        for s in &mut extra {
            assert_eq!(closed_by_server(s).await, b"", "closed unanswered");
        }
        // Another host is not locked out.
        let mut other = connect_from([127, 0, 0, 2], h.addr).await;
        assert_eq!(get(&mut other, "/health").await.0, 200);
        // The flooding peer's connections within the cap still work.
        assert_eq!(get(&mut held[0], "/health").await.0, 200);
        // And once one of them ends, the peer may connect again. The server
        // may see the new connection before the old one's end and refuse
        // it: then the client tries again.
        drop(held.pop());
        let mut answered = false;
        for _ in 0..100 {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut again = connect_from([127, 0, 0, 1], h.addr).await;
            let _ = again
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let mut status = [0u8; 12];
            if again.read_exact(&mut status).await.is_ok() && status.ends_with(b"200") {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            answered,
            "a place freed by a closed connection is given again"
        );
        h.stop().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn total_cap_closes_connections_over_it_from_any_peer() {
        let h = start(
            Limits {
                max_connections: 3,
                ..roomy()
            },
            GUARD,
        );
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(connect_from([127, 0, 0, 1], h.addr).await);
        }
        let mut over = connect_from([127, 0, 0, 3], h.addr).await;
        assert_eq!(closed_by_server(&mut over).await, b"");
        assert_eq!(get(&mut held[2], "/health").await.0, 200);
        h.stop().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn body_idle_timeout_fails_a_stalled_body_for_the_handler() {
        let h = start(
            Limits {
                body_idle_timeout: SHORT,
                ..roomy()
            },
            GUARD,
        );
        let mut s = connect_from([127, 0, 0, 1], h.addr).await;
        send(
            &mut s,
            b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .await;
        let (status, body) = response(&mut s).await;
        assert_eq!(status, 500);
        assert_eq!(
            body,
            BodyError::<Infallible>::Idle(SHORT).to_string(),
            "the handler saw the idle error"
        );
        // The rest of the body never came: the connection cannot be reused.
        closed_by_server(&mut s).await;
        // A body that arrives in full is unaffected.
        let mut s = connect_from([127, 0, 0, 1], h.addr).await;
        send(
            &mut s,
            b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789",
        )
        .await;
        assert_eq!(response(&mut s).await, (200, "10".to_owned()));
        h.stop().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_closes_idle_keep_alive_connections_and_lets_a_request_in_flight_finish() {
        let h = start(roomy(), LONG);
        let mut idle = connect_from([127, 0, 0, 1], h.addr).await;
        assert_eq!(get(&mut idle, "/health").await.0, 200);
        let mut busy = connect_from([127, 0, 0, 1], h.addr).await;
        send(&mut busy, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
        tokio::time::timeout(GUARD, h.entered.notified())
            .await
            .expect("the slow request reaches its handler");
        let Harness {
            addr,
            mut stop,
            server,
            release,
            ..
        } = h;
        let _ = stop.take().unwrap().send(());
        // Closed at once, with no answer, though the grace period is long.
        assert_eq!(closed_by_server(&mut idle).await, b"");
        // No new connections once stopping: the listener is closed.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert!(!server.is_finished(), "waits for the request in flight");
        release.notify_one();
        assert_eq!(response(&mut busy).await, (200, "finished".to_owned()));
        closed_by_server(&mut busy).await;
        tokio::time::timeout(GUARD, server)
            .await
            .expect("the server stops once the request is done")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_cuts_a_request_still_running_after_the_grace_period() {
        let h = start(roomy(), SHORT);
        let mut busy = connect_from([127, 0, 0, 1], h.addr).await;
        send(&mut busy, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
        tokio::time::timeout(GUARD, h.entered.notified())
            .await
            .expect("the slow request reaches its handler");
        // Never released: the server returns anyway, and the client sees
        // its connection end without an answer.
        h.stop().await;
        assert_eq!(closed_by_server(&mut busy).await, b"");
    }

    #[test]
    fn notify_ready_writes_to_the_given_fd() {
        let (r, w) = std::io::pipe().unwrap();
        use std::os::fd::IntoRawFd;
        let fd = w.into_raw_fd();
        // Not through the environment: setting variables while other tests'
        // threads read them is a data race.
        write_ready(&fd.to_string()).unwrap();
        let mut s = String::new();
        use std::io::Read;
        let mut r = r;
        // The write end was closed after the write, so this ends.
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "READY\n");
        assert!(write_ready("not a number").is_err());
    }
}

/// Options every service takes.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub listen: SocketAddr,
    /// The service's own directory under /data.
    pub state_dir: std::path::PathBuf,
    /// Plain HTTP instead of TLS: only on a loopback address (host runs
    /// and tests with clients that cannot be given the box's certificate).
    pub plain: bool,
}

impl ServiceOptions {
    /// Refuses plain HTTP anywhere but on loopback.
    pub fn check(&self) -> Result<(), String> {
        if self.plain && !self.listen.ip().is_loopback() {
            return Err(format!(
                "--plain serves without TLS, so only on a loopback address, not {}",
                self.listen
            ));
        }
        Ok(())
    }
}

/// The usual life of a service: check its state directory, raise the
/// open-file limit ([`raise_open_file_limit`]), serve `handler` on its
/// address until SIGTERM, give requests in flight 3 s to finish.
///
/// The limits are [`Limits::default`] but for the timeouts the environment
/// overrides, in milliseconds: `CLOUDLET_HEADER_TIMEOUT_MS`
/// ([`Limits::header_read_timeout`]) and `CLOUDLET_BODY_IDLE_TIMEOUT_MS`
/// ([`Limits::body_idle_timeout`]). Tests set them to see a timeout fire
/// without waiting for the real one; a value that does not parse stops the
/// service ([`LimitsError`]).
pub async fn run_service<H, F, B>(
    opts: ServiceOptions,
    transport: Transport,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    run_service_with(opts, transport, Limits::from_env()?, handler).await
}

/// [`run_service`] with `limits` (from [`Limits::from_env`], changed where a
/// service's clients need other bounds).
pub async fn run_service_with<H, F, B>(
    opts: ServiceOptions,
    transport: Transport,
    limits: Limits,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(Request<RequestBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    check_state_dir(&opts.state_dir)?;
    // Two descriptors per connection (socket, file) and some to spare for
    // the database, the listener and logs.
    let needed = (limits.max_connections as u64).saturating_mul(2) + 64;
    match raise_open_file_limit() {
        Ok(n) if n < needed => {
            tracing::warn!(
                open_files = n,
                needed,
                "the open-file limit is low for the connection limit"
            )
        }
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    serve_with(
        opts.listen,
        transport,
        limits,
        handler,
        shutdown_signal(),
        Duration::from_secs(3),
    )
    .await
}

/// [`run_service`] with a [`router::Router`]: the device registry (over the
/// bus, [`registry::RegistryAuth`]) guards every route but the public ones
/// `routes` declares.
pub async fn run_routed(
    opts: ServiceOptions,
    routes: impl FnOnce(std::sync::Arc<dyn auth::Authenticator>) -> router::Router,
) -> std::io::Result<()> {
    let auth = registry::RegistryAuth::start_and_wait(registry::socket_path()).await;
    let transport = auth.transport(&opts).await?;
    let router = std::sync::Arc::new(routes(std::sync::Arc::new(auth)));
    run_service(opts, transport, move |req| {
        let router = router.clone();
        async move { router.handle(req).await }
    })
    .await
}

/// Makes sure the service's state directory exists and can be written (not
/// read-only, not someone else's); a service is not ready before it can keep
/// what it is sent. No fsync: this runs on every boot and proves only access.
pub fn check_state_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".write-probe");
    std::fs::File::create(&probe)?.write_all(b"ok")?;
    std::fs::remove_file(&probe)
}

#[cfg(test)]
mod state_dir_tests {
    #[test]
    fn state_dir_is_made_and_left_clean() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("svc");
        super::check_state_dir(&s).unwrap();
        assert_eq!(std::fs::read_dir(&s).unwrap().count(), 0);
        let file = d.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(super::check_state_dir(&file.join("sub")).is_err());
    }
}
