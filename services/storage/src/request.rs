//! What a WebDAV request must pass before dav-server sees it: the checks and
//! corrections dav-server does not make, each for a fault it had.
//!
//! * No request header changes what the server permits: `X-Litmus` (a
//!   dav-server test hook that lifted the Depth limit) is removed.
//! * PROPFIND's Depth follows RFC 4918 9.1: none means infinity, and
//!   anything but `0`, `1` or `infinity` is 400 (dav-server treated both as
//!   "children only" and answered an empty multistatus for a file).
//! * Range: one range is served; a request for several gets the whole body
//!   (RFC 9110 14.2 lets a server ignore Range), so a 3 KB request cannot ask
//!   for gigabytes of overlapping parts.
//! * COPY/MOVE's Destination must be on this host and port, inside `/files/`
//!   and not the root (dav-server panicked on the root and copied to another
//!   host's URL locally).
//! * A URL ending in `/` names a folder: for a file it is 404, and a PUT to
//!   one is refused (it made a file).
//! * DELETE, COPY and MOVE of a tree run as one change ([`TreeOp`]); the
//!   root is never deleted.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, HOST, RANGE};
use hyper::{Method, Request, Response, StatusCode};

use crate::dav::TreeOp;
use crate::meta::{Kind, Store};
use crate::path::normalize;
use crate::FILES_PREFIX;

/// Why a request is refused before dav-server sees it.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    /// The JSON error answer.
    pub fn response(self) -> Response<cloudlet_runtime::Body> {
        crate::error(self.status, &self.reason)
    }
}

type Answer = Refusal;

/// A request body as dav-server gets it.
pub type DavBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// A property's namespace and name.
pub type PropName = (Option<String>, String);

/// How dav-server must run a request besides the usual way.
pub enum Special {
    /// DELETE, COPY or MOVE: the tree in one change.
    Tree(TreeOp),
    /// PROPFIND naming these properties: each answered once, missing ones
    /// with 404 (dav-server listed dead properties twice and left out the
    /// missing ones).
    NamedProps(Vec<PropName>),
}

/// The request, corrected, with how to run it, or the answer it gets.
pub type Prepared = Result<(Request<DavBody>, Option<Special>), Answer>;

/// Largest PROPFIND body read (they name a few properties).
const PROPFIND_BODY_MAX: usize = 64 << 10;

fn boxed_body<B>(b: B) -> DavBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    b.map_err(|e| std::io::Error::other(e.into()))
        .boxed_unsync()
}

fn error(status: StatusCode, msg: &str) -> Refusal {
    Refusal {
        status,
        reason: msg.to_owned(),
    }
}

/// A path under `/files` as the store's key (percent-decoded, normalized).
fn store_key(raw: &str) -> Result<String, Answer> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| error(StatusCode::BAD_REQUEST, "the path is not UTF-8"))?;
    let rest = decoded
        .strip_prefix(FILES_PREFIX)
        .filter(|r| r.is_empty() || r.starts_with('/'))
        .ok_or_else(|| error(StatusCode::FORBIDDEN, "the path is outside /files/"))?;
    normalize(rest).map_err(|e| match e {
        crate::path::PathError::TooLong(_) => error(StatusCode::URI_TOO_LONG, &e.to_string()),
        e => error(StatusCode::BAD_REQUEST, &e.to_string()),
    })
}

/// Checks and corrects a request for `/files/...`.
pub async fn prepare<B>(req: Request<B>, store: &std::sync::Arc<Store>) -> Prepared
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut req = req.map(boxed_body);
    req.headers_mut().remove("x-litmus");
    let raw = req.uri().path().to_owned();
    let key = store_key(&raw)?;
    let method = req.method().clone();

    // A trailing slash names a folder.
    if raw.ends_with('/') && !key.is_empty() && method.as_str() != "MKCOL" {
        let (store, k) = (store.clone(), key.clone());
        let kind = tokio::task::spawn_blocking(move || store.get(&k))
            .await
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?
            .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?
            .map(|e| e.kind);
        match kind {
            Some(Kind::File { .. }) => {
                return Err(error(
                    StatusCode::NOT_FOUND,
                    "a file's URL does not end in /",
                ))
            }
            None if method == Method::PUT => {
                return Err(error(
                    StatusCode::CONFLICT,
                    "a file's URL does not end in / (make a folder with MKCOL)",
                ))
            }
            _ => {}
        }
    }

    match method.as_str() {
        "PROPFIND" => {
            let depth = req
                .headers()
                .get("depth")
                .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase());
            match depth.as_deref() {
                None | Some("infinity") => {
                    // dav-server serves infinity only to its litmus hook; we
                    // serve it to everyone (streamed, one folder at a time).
                    let h = req.headers_mut();
                    h.insert("depth", HeaderValue::from_static("infinity"));
                    h.insert(
                        "x-litmus",
                        HeaderValue::from_static("cloudlet: depth infinity"),
                    );
                }
                Some("0") | Some("1") => {}
                Some(_) => {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "Depth must be 0, 1 or infinity",
                    ))
                }
            }
            let (req, body) = read_xml(req).await?;
            let named = named_props(&body);
            Ok((req, named.map(Special::NamedProps)))
        }
        "PROPPATCH" => Ok((read_xml(req).await?.0, None)),
        "LOCK" => {
            depth_is(&req, &["0", "infinity"])?;
            Ok((read_xml(req).await?.0, None))
        }
        "GET" | "HEAD" => {
            let several = req
                .headers()
                .get_all(RANGE)
                .iter()
                .map(|v| v.as_bytes().iter().filter(|&&b| b == b',').count() + 1)
                .sum::<usize>()
                > 1;
            if several {
                req.headers_mut().remove(RANGE);
                req.headers_mut().remove("if-range");
            } else if let Some(open) = req
                .headers()
                .get(RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(clamp_range)
            {
                // An end past what a u64 holds wrapped in dav-server's
                // arithmetic: RFC 9110 14.1.2 reads it as "to the end".
                if let Ok(v) = HeaderValue::from_str(&open) {
                    req.headers_mut().insert(RANGE, v);
                }
            }
            Ok((req, None))
        }
        "DELETE" => {
            if key.is_empty() {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "the root folder cannot be deleted",
                ));
            }
            Ok((req, Some(Special::Tree(TreeOp::delete()))))
        }
        "COPY" | "MOVE" => {
            if method.as_str() == "COPY" {
                depth_is(&req, &["0", "infinity"])?;
            } else {
                depth_is(&req, &["infinity"])?;
            }
            if key.is_empty() && method.as_str() == "MOVE" {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "the root folder cannot be moved",
                ));
            }
            let (dest, dest_key) = destination(&req)?;
            // Onto a folder that holds the source: replacing it would delete
            // the source first. (Into the source itself is dav-server's 403.)
            if key.starts_with(&format!("{dest_key}/")) {
                return Err(error(
                    StatusCode::FORBIDDEN,
                    "the Destination holds the source: it cannot be replaced by it",
                ));
            }
            req.headers_mut().insert(
                "destination",
                HeaderValue::from_str(&dest).map_err(|_| {
                    error(
                        StatusCode::BAD_REQUEST,
                        "the Destination is not a valid URL",
                    )
                })?,
            );
            if method.as_str() == "MOVE" {
                return Ok((req, Some(Special::Tree(TreeOp::moving()))));
            }
            let members = !matches!(req.headers().get("depth").map(|v| v.as_bytes()), Some(b"0"));
            let overwrite = !matches!(
                req.headers().get("overwrite").map(|v| v.as_bytes()),
                Some(b"F") | Some(b"f")
            );
            Ok((
                req,
                Some(Special::Tree(TreeOp::copy(key, members, overwrite))),
            ))
        }
        _ => Ok((req, None)),
    }
}

/// Most levels of XML elements a request body may nest: WebDAV bodies use
/// five or six; the XML parser recurses once per level, and 9,000 levels
/// overflowed the stack.
pub const XML_DEPTH_MAX: usize = 64;

/// How deeply a body's elements nest (start tags minus end tags, at most),
/// counted on the bytes before any parser sees them.
fn xml_depth(body: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut i = 0;
    while i < body.len() {
        if body[i] != b'<' {
            i += 1;
            continue;
        }
        if body[i..].starts_with(b"<!--") {
            // A comment ends at "-->", whatever it holds.
            i = body[i..]
                .windows(3)
                .position(|w| w == b"-->")
                .map_or(body.len(), |p| i + p + 3);
            continue;
        }
        let next = body.get(i + 1).copied();
        let end = body[i..]
            .iter()
            .position(|&b| b == b'>')
            .map_or(body.len(), |p| i + p);
        match next {
            Some(b'/') => depth = depth.saturating_sub(1),
            Some(b'?') | Some(b'!') => {}
            _ if end > 0 && body.get(end - 1) == Some(&b'/') => {}
            _ => {
                depth += 1;
                max = max.max(depth);
            }
        }
        i = end + 1;
    }
    max
}

/// Reads an XML request body whole (bounded), refusing one that nests too deeply.
async fn read_xml(req: Request<DavBody>) -> Result<(Request<DavBody>, Bytes), Refusal> {
    let (parts, body) = req.into_parts();
    let body = http_body_util::Limited::new(body, PROPFIND_BODY_MAX)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("reading the body: {e}"),
            )
        })?
        .to_bytes();
    if xml_depth(&body) > XML_DEPTH_MAX {
        return Err(error(
            StatusCode::BAD_REQUEST,
            &format!("the XML nests more than {XML_DEPTH_MAX} levels"),
        ));
    }
    let req = Request::from_parts(parts, boxed_body(http_body_util::Full::new(body.clone())));
    Ok((req, body))
}

/// Refuses a Depth header that is present and not one of `allowed`.
fn depth_is<B>(req: &Request<B>, allowed: &[&str]) -> Result<(), Refusal> {
    match req.headers().get("depth").map(|v| v.to_str().unwrap_or("")) {
        None => Ok(()),
        Some(d) if allowed.iter().any(|a| a.eq_ignore_ascii_case(d.trim())) => Ok(()),
        Some(_) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("Depth must be {}", allowed.join(" or ")),
        )),
    }
}

/// A single `bytes=A-B` range whose end does not fit in a u64 (or is past
/// 2^62), as the open range `bytes=A-`; `None` for every other Range.
fn clamp_range(v: &str) -> Option<String> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start = start.trim();
    if start.is_empty() || start.parse::<u64>().is_err() {
        return None;
    }
    let end = end.trim();
    if end.is_empty() || !end.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match end.parse::<u64>() {
        Ok(e) if e < 1 << 62 => None,
        _ => Some(format!("bytes={start}-")),
    }
}

/// The properties a PROPFIND body names (`<D:prop>`), if it names any.
fn named_props(body: &[u8]) -> Option<Vec<PropName>> {
    if body.is_empty() {
        return None;
    }
    let root = xmltree::Element::parse(body).ok()?;
    let prop = root
        .children
        .iter()
        .filter_map(|c| c.as_element())
        .find(|e| e.name == "prop" && e.namespace.as_deref() == Some("DAV:"))?;
    Some(
        prop.children
            .iter()
            .filter_map(|c| c.as_element())
            .map(|e| (e.namespace.clone(), e.name.clone()))
            .collect(),
    )
}

fn escape_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('"', "&quot;")
}

/// Adds to one `<D:response>` a 404 propstat for the named properties it does not carry.
fn fill_response(fragment: &[u8], names: &[PropName]) -> Vec<u8> {
    const END: &[u8] = b"</D:response>";
    let mut wrapped = br#"<D:multistatus xmlns:D="DAV:">"#.to_vec();
    wrapped.extend_from_slice(fragment);
    wrapped.extend_from_slice(b"</D:multistatus>");
    let mut found: Vec<PropName> = Vec::new();
    if let Ok(root) = xmltree::Element::parse(wrapped.as_slice()) {
        for r in root.children.iter().filter_map(|c| c.as_element()) {
            for ps in r.children.iter().filter_map(|c| c.as_element()) {
                for p in ps.children.iter().filter_map(|c| c.as_element()) {
                    if p.name == "prop" {
                        found.extend(
                            p.children
                                .iter()
                                .filter_map(|c| c.as_element())
                                .map(|e| (e.namespace.clone(), e.name.clone())),
                        );
                    }
                }
            }
        }
    }
    let missing: Vec<&PropName> = names.iter().filter(|n| !found.contains(n)).collect();
    let Some(at) = fragment
        .windows(END.len())
        .rposition(|w| w == END)
        .filter(|_| !missing.is_empty())
    else {
        return fragment.to_vec();
    };
    let mut extra = String::from("<D:propstat><D:prop>");
    for (i, (ns, name)) in missing.iter().enumerate() {
        match ns.as_deref() {
            Some("DAV:") => extra.push_str(&format!("<D:{name}/>")),
            Some(ns) => extra.push_str(&format!(
                "<x{i}:{name} xmlns:x{i}=\"{}\"/>",
                escape_attr(ns)
            )),
            None => extra.push_str(&format!("<{name} xmlns=\"\"/>")),
        }
    }
    extra.push_str("</D:prop><D:status>HTTP/1.1 404 Not Found</D:status></D:propstat>");
    let mut out = fragment[..at].to_vec();
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(&fragment[at..]);
    out
}

/// dav-server's PROPFIND answer with a 404 propstat added to each resource
/// for the named properties it lacks; streamed one `<D:response>` at a time.
pub fn add_missing_props<B>(body: B, names: Vec<PropName>) -> DavBody
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    const END: &[u8] = b"</D:response>";
    struct State<B> {
        body: B,
        buf: Vec<u8>,
        names: Vec<PropName>,
        done: bool,
    }
    let state = State {
        body,
        buf: Vec::new(),
        names,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            // Everything up to the last complete response goes out, filled in.
            if let Some(end) = st.buf.windows(END.len()).rposition(|w| w == END) {
                let cut = end + END.len();
                let rest = st.buf.split_off(cut);
                let ready = std::mem::replace(&mut st.buf, rest);
                let mut out = Vec::with_capacity(ready.len());
                let mut from = 0;
                while let Some(i) = ready[from..].windows(END.len()).position(|w| w == END) {
                    let stop = from + i + END.len();
                    // The first response carries what came before it (the XML head).
                    let start = ready[from..stop]
                        .windows(b"<D:response>".len())
                        .position(|w| w == b"<D:response>")
                        .map_or(from, |p| from + p);
                    out.extend_from_slice(&ready[from..start]);
                    out.extend(fill_response(&ready[start..stop], &st.names));
                    from = stop;
                }
                return Some((Ok(Frame::data(Bytes::from(out))), st));
            }
            if st.done {
                if st.buf.is_empty() {
                    return None;
                }
                let rest = Bytes::from(std::mem::take(&mut st.buf));
                return Some((Ok(Frame::data(rest)), st));
            }
            match st.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        st.buf.extend_from_slice(&d);
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    st.buf.clear();
                    return Some((Err(std::io::Error::other(e.into())), st));
                }
                None => st.done = true,
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// The Destination's path (still percent-encoded) and its store key, once it
/// is known to be on this server, inside `/files/` and not the root.
fn destination<B>(req: &Request<B>) -> Result<(String, String), Answer> {
    let v = req
        .headers()
        .get("destination")
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "COPY and MOVE need a Destination"))?
        .to_str()
        .map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "the Destination is not a valid URL",
            )
        })?;
    let path = if v.starts_with('/') {
        v.split(['?', '#']).next().unwrap_or(v).to_owned()
    } else {
        let uri: hyper::Uri = v.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "the Destination is not a valid URL",
            )
        })?;
        let (Some(scheme), Some(auth)) = (uri.scheme_str(), uri.authority()) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "the Destination is not a valid URL",
            ));
        };
        let ours = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("");
        if !same_authority(scheme, auth.as_str(), ours) {
            return Err(error(
                StatusCode::BAD_GATEWAY,
                "the Destination is on another server",
            ));
        }
        uri.path().to_owned()
    };
    let key = store_key(&path)?;
    if key.is_empty() {
        return Err(error(
            StatusCode::FORBIDDEN,
            "the root folder cannot be a Destination",
        ));
    }
    Ok((path, key))
}

/// Whether two authorities (`host[:port]`) name the same server, the
/// default port filled in from the Destination's scheme.
fn same_authority(scheme: &str, theirs: &str, ours: &str) -> bool {
    let default = if scheme.eq_ignore_ascii_case("https") {
        "443"
    } else {
        "80"
    };
    let split = |a: &str| -> (String, String) {
        let a = a.to_ascii_lowercase();
        // An IPv6 literal keeps its colons inside brackets.
        match a.rfind(':') {
            Some(i) if !a[i..].contains(']') => (a[..i].to_owned(), a[i + 1..].to_owned()),
            _ => (a, default.to_owned()),
        }
    };
    !ours.is_empty() && split(theirs) == split(ours)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_named_properties_get_a_404_propstat() {
        let names = vec![
            (Some("urn:z".to_owned()), "colour".to_owned()),
            (Some("urn:z".to_owned()), "missing".to_owned()),
            (Some("DAV:".to_owned()), "getetag".to_owned()),
        ];
        let frag = br#"<D:response><D:href>/files/f</D:href><D:propstat><D:prop><Z:colour xmlns:Z="urn:z">blue</Z:colour></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"#;
        let out = String::from_utf8(fill_response(frag, &names)).unwrap();
        assert!(out.contains(r#"<x0:missing xmlns:x0="urn:z"/>"#), "{out}");
        assert!(out.contains("<D:getetag/>"), "{out}");
        assert!(out.contains("404 Not Found"), "{out}");
        assert!(!out.contains(r#"colour xmlns:x"#), "{out}");
        assert!(out.ends_with("</D:response>"), "{out}");
        let all = vec![(Some("urn:z".to_owned()), "colour".to_owned())];
        assert_eq!(fill_response(frag, &all), frag.to_vec());
    }

    #[test]
    fn named_props_are_read_from_a_propfind_body() {
        let body = br#"<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:Z="urn:z"><D:prop><Z:a/><D:getetag/></D:prop></D:propfind>"#;
        assert_eq!(
            named_props(body),
            Some(vec![
                (Some("urn:z".into()), "a".into()),
                (Some("DAV:".into()), "getetag".into())
            ])
        );
        let all = br#"<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:allprop/></D:propfind>"#;
        assert_eq!(named_props(all), None);
        assert_eq!(named_props(b""), None);
    }

    #[test]
    fn deep_xml_is_measured_before_parsing() {
        let deep = format!("<a>{}{}</a>", "<b>".repeat(100), "</b>".repeat(100));
        assert_eq!(xml_depth(deep.as_bytes()), 101);
        let lock = br#"<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope></D:lockinfo>"#;
        assert_eq!(xml_depth(lock), 2);
        assert_eq!(xml_depth(b"<!-- <a><a><a> -->"), 0);
    }

    #[test]
    fn range_ends_past_u64_read_as_open_ranges() {
        assert_eq!(
            clamp_range("bytes=0-18446744073709551615").as_deref(),
            Some("bytes=0-")
        );
        assert_eq!(
            clamp_range("bytes=5-99999999999999999999999").as_deref(),
            Some("bytes=5-")
        );
        assert_eq!(clamp_range("bytes=0-99"), None);
        assert_eq!(clamp_range("bytes=-500"), None);
        assert_eq!(clamp_range("bytes=7-"), None);
    }

    #[test]
    fn authorities_compare_with_default_ports_and_case() {
        assert!(same_authority("http", "Box.local", "box.local:80"));
        assert!(same_authority("https", "box:443", "box"));
        assert!(same_authority("http", "127.0.0.1:8081", "127.0.0.1:8081"));
        assert!(!same_authority("http", "127.0.0.1:8082", "127.0.0.1:8081"));
        assert!(!same_authority("http", "another.host", "box.local"));
        assert!(same_authority("http", "[::1]:8081", "[::1]:8081"));
        assert!(!same_authority("http", "[::1]", "[::1]:8081"));
        assert!(!same_authority("http", "box", ""));
    }
}
