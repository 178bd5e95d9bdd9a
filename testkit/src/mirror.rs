//! A file server for update tests: serves files from memory over HTTP/1.1
//! (one request per connection), answers `Range: bytes=A-` and `bytes=A-B`
//! with 206, and can
//! misbehave on purpose: cut the first full answer of a bundle after some
//! bytes, or hold an answer after some bytes until released. It records
//! every request line and range, so a test can see that a client resumed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};

#[derive(Default)]
struct Inner {
    files: Vec<(String, Vec<u8>)>,
    asked: Vec<String>,
    /// Cut the next full answer of a `.cub` after this many bytes.
    cut: Option<usize>,
    /// Hold every answer of a `.cub` after this many bytes while set.
    hold: Option<usize>,
    /// Bytes sent of `.cub` files, in all.
    sent: u64,
    /// A held answer is waiting.
    holding: bool,
}

#[derive(Clone)]
pub struct Mirror {
    pub addr: SocketAddr,
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

impl Mirror {
    pub fn start() -> std::io::Result<Mirror> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let m = Mirror {
            addr,
            inner: Arc::default(),
        };
        let server = m.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let server = server.clone();
                std::thread::spawn(move || server.answer(s));
            }
        });
        Ok(m)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `body` at `path` from now on.
    pub fn put(&self, path: &str, body: Vec<u8>) {
        let mut i = self.lock();
        i.files.retain(|(p, _)| p != path);
        i.files.push((path.to_owned(), body));
    }

    /// Cuts the next full answer of a bundle after `bytes`.
    pub fn cut_next(&self, bytes: usize) {
        self.lock().cut = Some(bytes);
    }

    /// Holds answers of bundles after `bytes` (None: releases them).
    pub fn hold_at(&self, bytes: Option<usize>) {
        self.lock().hold = bytes;
        self.inner.1.notify_all();
    }

    /// Whether an answer is being held now.
    pub fn holding(&self) -> bool {
        self.lock().holding
    }

    /// Every request so far, as `PATH RANGE_START` (`-` without a range).
    pub fn asked(&self) -> Vec<String> {
        self.lock().asked.clone()
    }

    /// Bytes of bundles sent so far.
    pub fn sent(&self) -> u64 {
        self.lock().sent
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn answer(&self, mut s: TcpStream) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
            match s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        // `bytes=A-` or `bytes=A-B` (B inclusive).
        let range = head.lines().find_map(|l| {
            let l = l.to_ascii_lowercase();
            let v = l.strip_prefix("range: bytes=")?.trim().to_owned();
            let (a, b) = v.split_once('-')?;
            let a = a.parse::<usize>().ok()?;
            let b = if b.is_empty() {
                None
            } else {
                Some(b.parse::<usize>().ok()?)
            };
            Some((a, b))
        });
        let (body, cut) = {
            let mut i = self.lock();
            i.asked.push(format!(
                "{path} {}",
                match range {
                    None => "-".to_owned(),
                    Some((a, None)) => format!("{a}-"),
                    Some((a, Some(b))) => format!("{a}-{b}"),
                }
            ));
            let body = i
                .files
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, b)| b.clone());
            let bundle = path.ends_with(".cub");
            let cut = if bundle && range.is_none() {
                i.cut.take()
            } else {
                None
            };
            (body, cut)
        };
        let Some(body) = body else {
            let _ = s.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
            return;
        };
        let from = range.map_or(0, |r| r.0).min(body.len());
        let to = match range {
            Some((_, Some(b))) => b.saturating_add(1).min(body.len()).max(from),
            _ => body.len(),
        };
        if range.is_some() && from >= body.len() {
            let _ = write!(
                s,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                body.len()
            );
            return;
        }
        let head = if range.is_some() {
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                to - from,
                to.saturating_sub(1),
                body.len()
            )
        } else {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                body.len()
            )
        };
        if s.write_all(head.as_bytes()).is_err() {
            return;
        }
        let end = cut.map_or(to, |c| c.min(to));
        let bundle = path.ends_with(".cub");
        let mut at = from;
        while at < end {
            let step = (end - at).min(64 << 10);
            if bundle {
                let mut i = self.lock();
                while i.hold.is_some_and(|h| at >= h) {
                    i.holding = true;
                    i = self.inner.1.wait(i).unwrap_or_else(|p| p.into_inner());
                }
                i.holding = false;
            }
            if s.write_all(&body[at..at + step]).is_err() {
                return;
            }
            at += step;
            if bundle {
                self.lock().sent += step as u64;
            }
        }
    }
}
