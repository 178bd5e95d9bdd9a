//! A blocking HTTP/1.1 client for tests: one request per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The body of a request.
pub enum Body<'a> {
    None,
    /// Sent with Content-Length.
    Bytes(&'a [u8]),
    /// Sent with Transfer-Encoding: chunked, in pieces of this size.
    Chunked(&'a [u8], usize),
}

/// Sends one request (with `Connection: close`) and reads the whole answer.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> std::io::Result<Response> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    request_on(s, method, path, headers, body)
}

/// [`request`] over TLS with `config`, naming the server `server_name`
/// (what its certificate must say). The handshake's failure is the error.
pub fn request_tls(
    addr: SocketAddr,
    config: &std::sync::Arc<rustls::ClientConfig>,
    server_name: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> std::io::Result<Response> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| bad(&e.to_string()))?;
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    // Finish the handshake first, so that its failure is told as such.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| std::io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    }
    request_on(tls, method, path, headers, body)
}

/// [`request`] on a connected stream.
pub fn request_on<S: Read + Write>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body<'_>,
) -> std::io::Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: cloudlet\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Body::None => {}
        Body::Bytes(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::Chunked(..) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    // A server may answer (507, 401) before reading the body and close: what
    // it said still counts, so write errors give way to its answer.
    let sent = match body {
        Body::None => Ok(()),
        Body::Bytes(b) => s.write_all(b),
        Body::Chunked(b, n) => (|| {
            for c in b.chunks(n.max(1)) {
                write!(s, "{:x}\r\n", c.len())?;
                s.write_all(c)?;
                s.write_all(b"\r\n")?;
            }
            s.write_all(b"0\r\n\r\n")
        })(),
    };
    match read_response(&mut s, method == "HEAD") {
        Ok(r) => Ok(r),
        Err(e) => Err(sent.err().unwrap_or(e)),
    }
}

/// Reads a response's status line and headers.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad(l))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok((status, headers))
}

fn bad(m: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned())
}

fn read_response<S: Read>(s: &mut S, head_only: bool) -> std::io::Result<Response> {
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let mut line = String::new();
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only || status == 204 || status == 304 {
        return Ok(resp);
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(&format!("bad chunk size {line:?}")))?;
            if n == 0 {
                break;
            }
            let start = resp.body.len();
            resp.body.resize(start + n, 0);
            r.read_exact(&mut resp.body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = resp.header("content-length").and_then(|n| n.parse().ok()) {
        resp.body.resize(n, 0);
        r.read_exact(&mut resp.body)?;
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

/// One request on a kept-alive connection `s` (plain TCP or a TLS stream),
/// for benchmarks that move gigabytes: sends the head (`headers`, and
/// Content-Length when there is a body), then `body` (`len` bytes read
/// from it) in pieces of `piece` bytes, the first piece in the head's
/// write; then reads the answer's head and copies its body (by its
/// Content-Length, or chunked; none without either) to `out`. Returns the
/// status and how many body bytes came. At most one piece is held in
/// memory. The answer must be all the server sent, as it is without
/// pipelining.
pub fn exchange<S: Read + Write>(
    s: &mut S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&mut dyn Read, u64)>,
    out: &mut dyn Write,
    piece: usize,
) -> std::io::Result<(u16, u64)> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: cloudlet\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some((_, len)) = &body {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    head.push_str("\r\n");
    let mut buf = head.into_bytes();
    if let Some((src, len)) = body {
        let start = buf.len();
        buf.resize(start + piece.max(1), 0);
        let mut left = len;
        let mut first = start;
        loop {
            let want = (buf.len() - first).min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = src.read(&mut buf[first..first + want])?;
            if n == 0 && left > 0 {
                return Err(bad(&format!("body ended {left} bytes short")));
            }
            left -= n as u64;
            s.write_all(&buf[..first + n])?;
            if left == 0 {
                break;
            }
            first = 0;
        }
    } else {
        s.write_all(&buf)?;
    }
    let mut r = BufReader::with_capacity(piece.max(8 << 10), &mut *s);
    let (status, headers) = read_head(&mut r)?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let chunked = header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
    let mut got = 0;
    if method == "HEAD" || status == 204 || status == 304 {
        // No body.
    } else if chunked {
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = u64::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(&format!("bad chunk size {line:?}")))?;
            if n == 0 {
                break;
            }
            let k = std::io::copy(&mut (&mut r).take(n), out)?;
            got += k;
            if k != n {
                return Err(bad(&format!("a chunk ended at {k} of {n} bytes")));
            }
            line.clear();
            r.read_line(&mut line)?;
        }
        // Trailers, to the empty line.
        loop {
            line.clear();
            r.read_line(&mut line)?;
            if line.trim_end().is_empty() {
                break;
            }
        }
    } else if let Some(v) = header("content-length") {
        let len = v
            .parse::<u64>()
            .map_err(|_| bad(&format!("bad Content-Length {v:?}")))?;
        got = std::io::copy(&mut (&mut r).take(len), out)?;
        if got != len {
            return Err(bad(&format!("answer ended at {got} of {len} bytes")));
        }
    }
    if !r.buffer().is_empty() {
        return Err(bad("the server sent more than its answer"));
    }
    Ok((status, got))
}
