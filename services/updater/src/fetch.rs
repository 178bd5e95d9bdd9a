//! Bytes for an install: a bundle downloaded over HTTP (resumed with
//! `Range` when the connection drops), or an upload's body, handed to the
//! blocking install through a small channel ([`ChanReader`]) so that at most a
//! few chunks are ever in memory.
//!
//! Only `http://` is fetched: the box carries no public certificate
//! authorities, and it needs none for updates: the channel index and the
//! bundle's manifest are signed, and every part is checked against the
//! signed hash, so the transport adds nothing an attacker on the path could
//! not already see (that an update is being fetched).

use std::io::Read;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use tokio::sync::mpsc;

/// Chunks in flight between the network and the install.
pub const CHANNEL_DEPTH: usize = 8;
/// How many times a download is resumed before it fails.
pub const RESUMES: u32 = 8;
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a whole download may take (a slow link included); past it
/// the install fails and the slot is free again.
pub const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(3 * 3600);
/// The longest fetching a channel index may take.
const SMALL_DEADLINE: Duration = Duration::from_secs(60);
/// A response whose body sends nothing for this long is cut and resumed.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            return Err(format!(
                "{url}: the box fetches updates over http:// only (it carries no public \
                 certificate authorities; bundles and channel indexes are signed, so \
                 http:// cannot change them unnoticed)"
            ));
        } else {
            return Err(format!("{url}: not an http:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!(
                "{url}: user names in update URLs are not supported"
            ));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url}: bad port {p:?}"))?,
            ),
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        Ok(Url {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// `reference` resolved against this URL (an absolute `http://` URL, an
    /// absolute path, or a name beside this URL's last segment).
    pub fn join(&self, reference: &str) -> Result<Url, String> {
        if reference.contains("://") {
            return Url::parse(reference);
        }
        let path = if reference.starts_with('/') {
            reference.to_owned()
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{reference}")
        };
        Ok(Url {
            path,
            ..self.clone()
        })
    }

    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

pub(crate) async fn connect(url: &Url) -> Result<Sender, String> {
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((url.host.as_str(), url.port)),
    )
    .await
    .map_err(|_| format!("{url}: no connection within {CONNECT_TIMEOUT:?}"))?
    .map_err(|e| format!("{url}: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn send(
    url: &Url,
    range_from: Option<u64>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut sender = connect(url).await?;
    let mut req = Request::get(&url.path).header(hyper::header::HOST, url.authority());
    if let Some(from) = range_from {
        req = req.header(hyper::header::RANGE, format!("bytes={from}-"));
    }
    let req = req.body(Empty::new()).map_err(|e| format!("{url}: {e}"))?;
    tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(req))
        .await
        .map_err(|_| format!("{url}: no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))
}

/// Where the range a 206 answer carries starts (`Content-Range: bytes A-B/N`).
pub(crate) fn range_start<B>(resp: &hyper::Response<B>) -> Option<u64> {
    resp.headers()
        .get(hyper::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok())
}

/// A small document (a channel index): at most `max` bytes, within a minute.
pub async fn get_small(url: &Url, max: u64) -> Result<Vec<u8>, String> {
    tokio::time::timeout(SMALL_DEADLINE, get_small_now(url, max))
        .await
        .map_err(|_| format!("{url}: not fetched within {} s", SMALL_DEADLINE.as_secs()))?
}

async fn get_small_now(url: &Url, max: u64) -> Result<Vec<u8>, String> {
    let resp = send(url, None).await?;
    if resp.status() != StatusCode::OK {
        return Err(format!("{url}: {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = tokio::time::timeout(STALL_TIMEOUT, body.frame())
        .await
        .map_err(|_| format!("{url}: the answer stalled"))?
    {
        let frame = frame.map_err(|e| format!("{url}: {e}"))?;
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
            if out.len() as u64 > max {
                return Err(format!("{url}: larger than {max} bytes"));
            }
        }
    }
    Ok(out)
}

/// Where a download is: for status, and for tests that check it resumed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    pub bytes: u64,
    /// Requests that resumed with `Range` after a cut.
    pub resumed: u32,
    /// The size the server gave, when it gave one.
    pub total: Option<u64>,
}

/// Streams `url` into `tx`, resuming with `Range: bytes=N-` after a dropped
/// connection (up to [`RESUMES`] times, waiting 1 s, 2 s, 4 s ... up to
/// 30 s between). A server that answers a resume with anything but the
/// bytes from N on ends the download with an error. Ends when the whole
/// body was sent, or with the error as the last item.
pub async fn download(
    url: Url,
    limit: u64,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    on_progress: impl Fn(Fetched) + Send + 'static,
) -> Fetched {
    let mut got = Fetched::default();
    let mut failures = 0u32;
    let until = tokio::time::Instant::now() + DOWNLOAD_DEADLINE;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let result = match tokio::time::timeout(
            left,
            download_from(&url, limit, &tx, &mut got, &on_progress),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Stop::Fatal(format!(
                "{url}: not downloaded within {} h",
                DOWNLOAD_DEADLINE.as_secs() / 3600
            ))),
        };
        match result {
            Ok(()) => return got,
            Err(Stop::Receiver) => return got,
            Err(Stop::Fatal(e)) => {
                let _ = tx.send(Err(std::io::Error::other(e))).await;
                return got;
            }
            Err(Stop::Retry(e)) => {
                failures = failures.saturating_add(1);
                if failures > RESUMES {
                    let _ = tx
                        .send(Err(std::io::Error::other(format!(
                            "{e} (gave up after {RESUMES} resumes)"
                        ))))
                        .await;
                    return got;
                }
                let wait = Duration::from_secs(1u64 << failures.min(5).saturating_sub(1));
                tracing::warn!(error = %e, at = got.bytes, "download cut; resuming in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

enum Stop {
    /// The install stopped reading (it failed or finished).
    Receiver,
    /// Worth another try from where it stopped.
    Retry(String),
    /// Trying again cannot help.
    Fatal(String),
}

async fn download_from(
    url: &Url,
    limit: u64,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
    got: &mut Fetched,
    on_progress: &(impl Fn(Fetched) + Send),
) -> Result<(), Stop> {
    let from = got.bytes;
    let resp = send(url, (from > 0).then_some(from))
        .await
        .map_err(Stop::Retry)?;
    let status = resp.status();
    if from > 0 {
        if status != StatusCode::PARTIAL_CONTENT {
            return Err(Stop::Fatal(format!(
                "{url}: asked to resume at byte {from}, the server answered {status} \
                 (it does not support Range)"
            )));
        }
        if range_start(&resp) != Some(from) {
            return Err(Stop::Fatal(format!(
                "{url}: asked to resume at byte {from}, the server sent another range"
            )));
        }
        got.resumed = got.resumed.saturating_add(1);
    } else if status != StatusCode::OK {
        let e = format!("{url}: {status}");
        return Err(if status.is_server_error() {
            Stop::Retry(e)
        } else {
            Stop::Fatal(e)
        });
    } else {
        got.total = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
    }
    let mut body = resp.into_body();
    loop {
        let frame = match tokio::time::timeout(STALL_TIMEOUT, body.frame()).await {
            Err(_) => return Err(Stop::Retry(format!("{url}: stalled at byte {}", got.bytes))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Stop::Retry(format!("{url}: {e}"))),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        got.bytes = got.bytes.saturating_add(data.len() as u64);
        if got.bytes > limit {
            return Err(Stop::Fatal(format!(
                "{url}: larger than {limit} bytes, more than this bundle may be"
            )));
        }
        if tx.send(Ok(data)).await.is_err() {
            return Err(Stop::Receiver);
        }
        on_progress(*got);
    }
    if let Some(total) = got.total {
        if got.bytes < total {
            return Err(Stop::Retry(format!(
                "{url}: the answer ended at byte {} of {total}",
                got.bytes
            )));
        }
    }
    Ok(())
}

/// The blocking end of the channel: reads what the network (or an upload)
/// sends, in order; an error item becomes the read's error.
pub struct ChanReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    buf: Bytes,
}

impl ChanReader {
    pub fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> ChanReader {
        ChanReader {
            rx,
            buf: Bytes::new(),
        }
    }
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(b)) => self.buf = b,
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// Sends a request body into `tx` frame by frame.
pub async fn pump<B>(mut body: B, tx: mpsc::Sender<std::io::Result<Bytes>>)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    if tx.send(Ok(data)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx
                    .send(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the upload ended early: {e}"),
                    )))
                    .await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_join_and_refuse_what_the_box_cannot_fetch() {
        let u = Url::parse("http://10.0.2.2:8000/rel/index").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("10.0.2.2", 8000, "/rel/index")
        );
        assert_eq!(
            u.join("b.cub").unwrap().to_string(),
            "http://10.0.2.2:8000/rel/b.cub"
        );
        assert_eq!(u.join("/x").unwrap().path, "/x");
        assert_eq!(
            u.join("http://h/y").unwrap(),
            Url {
                host: "h".into(),
                port: 80,
                path: "/y".into()
            }
        );
        assert_eq!(Url::parse("http://[::1]:81/").unwrap().host, "::1");
        assert!(Url::parse("https://h/x")
            .unwrap_err()
            .contains("http:// only"));
        assert!(Url::parse("ftp://h/x").is_err());
        assert!(Url::parse("http://u:p@h/x").is_err());
        assert!(Url::parse("http://h:99999/x").is_err());
        assert!(Url::parse("http:///x").is_err());
    }

    #[test]
    fn the_reader_gives_bytes_in_order_then_the_error() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(Bytes::from_static(b"abc"))).unwrap();
        tx.try_send(Ok(Bytes::from_static(b"de"))).unwrap();
        tx.try_send(Err(std::io::Error::other("cut"))).unwrap();
        let mut r = ChanReader::new(rx);
        let mut two = [0u8; 2];
        r.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"ab");
        let mut rest = Vec::new();
        let e = r.read_to_end(&mut rest).unwrap_err();
        assert_eq!(rest, b"cde");
        assert_eq!(e.to_string(), "cut");
    }
}
