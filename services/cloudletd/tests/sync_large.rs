//! Large `_bulk_docs` bodies (PouchDB pushes attachments inline, base64):
//! the real `cloudletd sync` takes one larger than it could hold in memory,
//! writes every attachment intact, stays small while it does, and keeps
//! such a write all-or-nothing.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;

use cloudlet_testkit::http::{request, Body, Response};
use serde_json::{json, Value};

/// Documents in the large push, each with one attachment of `ATT` bytes.
const DOCS: usize = 80;
const ATT: usize = 1 << 20;

struct Server {
    child: Child,
    addr: SocketAddr,
    token: String,
    _registry: std::sync::Arc<common::Registry>,
}

impl Server {
    fn start(data: &Path) -> Server {
        let s = common::spawn("sync", data, &[], None);
        Server {
            child: s.child,
            addr: s.addr,
            token: s.token,
            _registry: s.registry,
        }
    }

    fn send(&self, method: &str, path: &str, body: &[u8]) -> Response {
        let auth = format!("Bearer {}", self.token);
        let h = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ];
        let body = if body.is_empty() {
            Body::None
        } else {
            Body::Bytes(body)
        };
        request(self.addr, method, path, &h, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn json(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let r = self.send(method, path, body);
        let v = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()));
        (r.status, v)
    }

    /// A line of the service's /proc status, in KiB (`VmHWM`: its peak
    /// resident memory so far).
    fn status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Content that does not compress: a xorshift stream seeded per document.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn base64_encode(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A replicated revision of document `id` with one inline attachment,
/// as PouchDB pushes it (`new_edits: false`).
fn replicated(id: &str, data: &[u8]) -> String {
    json!({
        "_id": id,
        "_rev": "1-0123456789abcdef0123456789abcdef",
        "_revisions": {"start": 1, "ids": ["0123456789abcdef0123456789abcdef"]},
        "n": id,
        "_attachments": {"blob": {"content_type": "application/octet-stream", "data": base64_encode(data)}},
    })
    .to_string()
}

/// A `_bulk_docs` body of these documents; `new_edits` after `docs`, as
/// PouchDB writes it.
fn bulk(docs: &[String]) -> Vec<u8> {
    format!(r#"{{"docs":[{}],"new_edits":false}}"#, docs.join(",")).into_bytes()
}

/// The service's spool directory (under its state directory).
fn spool_dirs(data: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![data.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "spool") {
                    found.push(p.clone());
                }
                todo.push(p);
            }
        }
    }
    found
}

fn spooled_files(data: &Path) -> usize {
    spool_dirs(data)
        .iter()
        .map(|d| std::fs::read_dir(d).unwrap().count())
        .sum()
}

#[test]
fn a_bulk_docs_larger_than_64_mib_is_written_whole_with_memory_well_below_its_size() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.json("PUT", "/big", b"").0, 201);
    let docs: Vec<String> = (0..DOCS)
        .map(|i| replicated(&format!("doc-{i:03}"), &content(i as u64, ATT)))
        .collect();
    let body = bulk(&docs);
    drop(docs);
    assert!(body.len() > 64 << 20, "the body is {} bytes", body.len());
    let (status, rows) = s.json("POST", "/big/_bulk_docs", &body);
    assert_eq!((status, &rows), (201, &json!([])), "every revision written");
    let body_kib = body.len() as u64 / 1024;
    drop(body);

    for i in 0..DOCS {
        let id = format!("doc-{i:03}");
        let want = content(i as u64, ATT);
        let r = s.send("GET", &format!("/big/{id}/blob"), b"");
        assert_eq!(r.status, 200, "{id}'s attachment");
        assert!(
            r.body == want,
            "{id}'s attachment reads back byte-identical"
        );
        let (status, doc) = s.json("GET", &format!("/big/{id}"), b"");
        assert_eq!(status, 200);
        assert_eq!(doc["_rev"], "1-0123456789abcdef0123456789abcdef");
        assert_eq!(doc["n"], id.as_str());
        assert_eq!(doc["_attachments"]["blob"]["length"], ATT);
    }
    let (_, info) = s.json("GET", "/big", b"");
    assert_eq!(info["doc_count"], DOCS);

    // A memory bound, not a timing: the service never held the body.
    let peak = s.status_kib("VmHWM");
    eprintln!("peak resident memory {peak} KiB, body {body_kib} KiB");
    assert!(
        peak < 64 << 10,
        "peak resident memory {peak} KiB while taking a {body_kib} KiB body"
    );
    assert_eq!(spooled_files(d.path()), 0, "the spooled body is removed");
}

#[test]
fn a_large_bulk_docs_that_fails_part_way_writes_nothing_and_leaves_no_spool() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.json("PUT", "/db", b"").0, 201);
    let docs: Vec<String> = (0..3)
        .map(|i| replicated(&format!("doc-{i}"), &content(i, ATT)))
        .collect();

    // Cut off inside the last document: not JSON, so none of them is kept.
    let mut cut = bulk(&docs);
    cut.truncate(cut.len() - 1000);
    let (status, v) = s.json("POST", "/db/_bulk_docs", &cut);
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "bad_request");

    // A document that is not an object after two good ones.
    let mut bad = docs[..2].to_vec();
    bad.push("42".into());
    let (status, v) = s.json("POST", "/db/_bulk_docs", &bulk(&bad));
    assert_eq!(
        (status, v),
        (
            400,
            json!({"error": "bad_request", "reason": "Document must be a JSON object"})
        )
    );

    // One document over the per-document limit (64 MiB) after a good one.
    let huge = replicated("huge", &content(9, 50 << 20));
    let (status, v) = s.json("POST", "/db/_bulk_docs", &bulk(&[docs[0].clone(), huge]));
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"], "too_large");

    for i in 0..3 {
        let (status, _) = s.json("GET", &format!("/db/doc-{i}"), b"");
        assert_eq!(
            status, 404,
            "doc-{i} of a refused _bulk_docs is not written"
        );
    }
    let (_, info) = s.json("GET", "/db", b"");
    assert_eq!(
        (info["doc_count"].clone(), info["update_seq"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(spooled_files(d.path()), 0, "refused bodies are removed too");
}

#[test]
fn a_start_removes_bodies_spooled_by_an_earlier_run() {
    let d = tempfile::tempdir().unwrap();
    let spool = {
        let s = Server::start(d.path());
        assert_eq!(s.json("PUT", "/db", b"").0, 201);
        let dirs = spool_dirs(d.path());
        assert_eq!(dirs.len(), 1, "one spool directory: {dirs:?}");
        dirs[0].clone()
    };
    // What a run killed mid-request would leave.
    std::fs::write(spool.join("left-over.body"), b"{\"docs\":[").unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.json("GET", "/db", b"").0, 200);
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}
