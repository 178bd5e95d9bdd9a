//! The service side of init's contract, and the HTTP plumbing every service uses.
//!
//! * [`notify_ready`]: write `READY` to the descriptor init passed in
//!   `CLOUDLET_READY_FD` once the service accepts requests.
//! * [`serve`]: an HTTP/1.1 server loop on one listener that stops accepting
//!   on SIGTERM/SIGINT and lets requests in flight finish.
//! * [`health`]: the `/health` answer every service gives.

pub mod auth;

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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

/// Tells init the service is ready. Without init (no `CLOUDLET_READY_FD`) it does nothing.
pub fn notify_ready() -> std::io::Result<()> {
    let Ok(fd) = std::env::var("CLOUDLET_READY_FD") else {
        return Ok(());
    };
    let fd: i32 = fd.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "CLOUDLET_READY_FD is not a number",
        )
    })?;
    // SAFETY: init opened this descriptor for us and nothing else in the
    // process uses it; the File takes ownership and closes it after the write.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    std::env::remove_var("CLOUDLET_READY_FD");
    f.write_all(b"READY\n")
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
/// then waits (up to `grace`) for requests in flight.
pub async fn serve<H, F, B>(
    addr: SocketAddr,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening");
    notify_ready()?;
    serve_listener(listener, handler, shutdown, grace).await
}

/// [`serve`] on a listener the caller bound (tests bind port 0).
pub async fn serve_listener<H, F, B>(
    listener: TcpListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let handler = Arc::new(handler);
    let tracker = tokio_util_tracker::Tracker::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Answers go out as soon as they are written: a response head
                // and a small body in two writes must not wait on Nagle and the
                // peer's delayed ACK (40 ms per small file otherwise).
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let guard = tracker.enter();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let h = handler.clone();
                        async move { Ok::<_, Infallible>(h(req).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        tracing::debug!(error = %e, "connection");
                    }
                    drop(guard);
                });
            }
        }
    }
    tracing::info!("stopping");
    let _ = tokio::time::timeout(grace, tracker.idle()).await;
    Ok(())
}

/// Counts connections in flight so shutdown can wait for them.
mod tokio_util_tracker {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::Notify;

    #[derive(Default, Clone)]
    pub struct Tracker(Arc<(AtomicUsize, Notify)>);

    pub struct Guard(Arc<(AtomicUsize, Notify)>);

    impl Tracker {
        pub fn enter(&self) -> Guard {
            self.0 .0.fetch_add(1, Ordering::SeqCst);
            Guard(self.0.clone())
        }
        pub async fn idle(&self) {
            loop {
                let notified = self.0 .1.notified();
                if self.0 .0.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            if self.0 .0.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.0 .1.notify_waiters();
            }
        }
    }
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
            |req: Request<Incoming>| async move {
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

    #[test]
    fn notify_ready_writes_to_the_given_fd() {
        let (r, w) = std::io::pipe().unwrap();
        use std::os::fd::IntoRawFd;
        let fd = w.into_raw_fd();
        std::env::set_var("CLOUDLET_READY_FD", fd.to_string());
        notify_ready().unwrap();
        let mut s = String::new();
        use std::io::Read;
        let mut r = r;
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "READY\n");
        // Only once: the variable is gone.
        notify_ready().unwrap();
    }
}

/// Options every service takes.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    pub listen: SocketAddr,
    /// The service's own directory under /data.
    pub state_dir: std::path::PathBuf,
}

/// The usual life of a service: check its state directory, serve `handler`
/// on its address until SIGTERM, give requests in flight 3 s to finish.
pub async fn run_service<H, F, B>(opts: ServiceOptions, handler: H) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    check_state_dir(&opts.state_dir)?;
    serve(
        opts.listen,
        handler,
        shutdown_signal(),
        Duration::from_secs(3),
    )
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
