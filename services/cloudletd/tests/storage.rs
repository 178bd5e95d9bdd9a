//! The storage service as clients see it: the real `cloudletd storage`
//! process on loopback, driven over HTTP by our own small client, by the
//! litmus WebDAV suite and by rclone (over plain HTTP and over the TLS the
//! box serves), and killed with SIGKILL mid-upload.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cloudlet_testkit::http::{request, Body, Response};
use cloudlet_testkit::Rng;

struct Server {
    child: Child,
    addr: SocketAddr,
    token: String,
    /// The device registry the service asks (stopped with the last user).
    _registry: std::sync::Arc<common::Registry>,
    data: PathBuf,
}

impl Server {
    /// Starts the service on a free port with its state under `data`.
    fn start(data: &Path) -> Server {
        Server::start_with(data, false)
    }

    /// Over TLS with a certificate from the box's identity, as on the box.
    fn start_tls(data: &Path) -> Server {
        Server::start_with(data, true)
    }

    fn start_with(data: &Path, tls: bool) -> Server {
        let s = common::spawn_with("storage", data, &[], None, tls);
        Server {
            child: s.child,
            addr: s.addr,
            token: s.token,
            _registry: s.registry,
            data: data.to_owned(),
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Body) -> Response {
        let auth = self.auth();
        let mut h = vec![("Authorization", auth.as_str())];
        h.extend_from_slice(headers);
        request(self.addr, method, path, &h, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn put(&self, path: &str, data: &[u8]) -> Response {
        self.req("PUT", path, &[], Body::Bytes(data))
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.req("GET", path, headers, Body::None)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Files (not folders) left in the blob store's temporary directory.
    fn temp_files(&self) -> usize {
        std::fs::read_dir(self.data.join("storage/tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: scripts/setup installs it (Debian package {name})");
}

#[test]
fn every_path_needs_the_token() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    for (m, p) in [
        ("GET", "/files/"),
        ("PROPFIND", "/files/"),
        ("PUT", "/files/x"),
        ("GET", "/api/space"),
        ("GET", "/"),
    ] {
        let r = request(s.addr, m, p, &[], Body::None).unwrap();
        assert_eq!(r.status, 401, "{m} {p} without a credential");
        assert!(r.header("www-authenticate").is_some());
        let r = request(
            s.addr,
            m,
            p,
            &[("Authorization", "Bearer 0000")],
            Body::None,
        )
        .unwrap();
        assert_eq!(r.status, 401, "{m} {p} with a wrong token");
    }
    assert_eq!(
        request(s.addr, "GET", "/health", &[], Body::None)
            .unwrap()
            .status,
        200
    );
    // Basic with the token as password is what WebDAV clients send.
    let basic = base64(&format!("me:{}", s.token));
    let r = request(
        s.addr,
        "PROPFIND",
        "/files/",
        &[("Authorization", &format!("Basic {basic}")), ("Depth", "0")],
        Body::None,
    )
    .unwrap();
    assert_eq!(r.status, 207);
}

fn base64(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
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

#[test]
fn ranges_stream_media_with_the_right_type() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let mut r = Rng(0x4a11);
    let media = r.fill(3 << 20);
    assert_eq!(s.put("/files/clip.mp4", &media).status, 201);
    let full = s.get("/files/clip.mp4", &[]);
    assert_eq!(full.status, 200);
    assert_eq!(full.header("content-type"), Some("video/mp4"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    assert!(full.body == media, "whole GET differs");
    let etag = full.header("etag").unwrap().to_owned();

    let len = media.len();
    for (range, start, end) in [
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        ("bytes=1048576-", 1 << 20, len - 1),
        ("bytes=-500", len - 500, len - 1),
        ("bytes=3000000-99999999", 3_000_000, len - 1),
    ] {
        let p = s.get("/files/clip.mp4", &[("Range", range)]);
        assert_eq!(p.status, 206, "{range}");
        assert_eq!(
            p.header("content-range"),
            Some(format!("bytes {start}-{end}/{len}").as_str()),
            "{range}"
        );
        assert!(p.body == media[start..=end], "{range}: wrong bytes");
    }
    let p = s.get("/files/clip.mp4", &[("Range", &format!("bytes={len}-"))]);
    assert_eq!(p.status, 416);
    assert_eq!(
        p.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
    // If-Range: the range only while the file is what the client saw.
    let p = s.get(
        "/files/clip.mp4",
        &[("Range", "bytes=10-19"), ("If-Range", &etag)],
    );
    assert_eq!(p.status, 206);
    let p = s.get(
        "/files/clip.mp4",
        &[("Range", "bytes=10-19"), ("If-Range", "\"stale\"")],
    );
    assert_eq!(p.status, 200);
    assert_eq!(p.body.len(), len);
    let h = s.req("HEAD", "/files/clip.mp4", &[], Body::None);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-length"), Some(len.to_string().as_str()));
    assert_eq!(s.put("/files/song.mp3", b"ID3").status, 201);
    assert_eq!(
        s.get("/files/song.mp3", &[]).header("content-type"),
        Some("audio/mpeg")
    );
}

#[test]
fn etags_make_concurrent_edits_safe() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let first = s.put("/files/notes.txt", b"one");
    assert_eq!(first.status, 201);
    let etag = s
        .get("/files/notes.txt", &[])
        .header("etag")
        .unwrap()
        .to_owned();
    // The same content has the same tag; other content another.
    assert_eq!(first.header("etag"), Some(etag.as_str()));
    let r = s.req(
        "PUT",
        "/files/notes.txt",
        &[("If-Match", "\"someone-else\"")],
        Body::Bytes(b"lost update"),
    );
    assert_eq!(r.status, 412);
    assert_eq!(s.get("/files/notes.txt", &[]).body, b"one");
    let r = s.req(
        "PUT",
        "/files/notes.txt",
        &[("If-Match", &etag)],
        Body::Bytes(b"two"),
    );
    assert_eq!(r.status, 204);
    let etag2 = r.header("etag").unwrap().to_owned();
    assert_ne!(etag, etag2);
    // The first editor's tag is stale now.
    let r = s.req(
        "PUT",
        "/files/notes.txt",
        &[("If-Match", &etag)],
        Body::Bytes(b"three"),
    );
    assert_eq!(r.status, 412);
    let r = s.req(
        "PUT",
        "/files/notes.txt",
        &[("If-None-Match", "*")],
        Body::Bytes(b"create only"),
    );
    assert_eq!(r.status, 412);
    assert_eq!(
        s.get("/files/notes.txt", &[("If-None-Match", &etag2)])
            .status,
        304
    );
    assert_eq!(s.get("/files/notes.txt", &[]).body, b"two");
    // A PUT into a folder that does not exist is a conflict, not a new folder.
    assert_eq!(s.put("/files/no/such/dir/f", b"x").status, 409);
}

#[test]
fn a_full_box_says_507_and_keeps_nothing_half_written() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/keep.bin", &[7u8; 1000]).status, 201);
    let set = |body: &str| {
        s.req(
            "PUT",
            "/api/quota",
            &[("Content-Type", "application/json")],
            Body::Bytes(body.as_bytes()),
        )
    };
    assert_eq!(set("{\"bytes\": \"lots\"}").status, 400);
    assert_eq!(set("{\"bites\": 5}").status, 400);
    let r = set("{\"bytes\": 1048576}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"quota_bytes\":1048576"), "{}", r.text());
    let big = Rng(7).fill(2 << 20);
    // Announced size over the quota: refused before a byte is stored.
    assert_eq!(s.put("/files/big.bin", &big).status, 507);
    // No size announced (chunked): refused when the stream passes the quota.
    let r = s.req("PUT", "/files/big2.bin", &[], Body::Chunked(&big, 64 << 10));
    assert_eq!(r.status, 507);
    // Under the quota still fits.
    assert_eq!(s.put("/files/small.bin", &big[..500_000]).status, 201);
    // Replacing a file counts what it frees.
    assert_eq!(s.put("/files/small.bin", &big[..900_000]).status, 204);
    let list = s.req("PROPFIND", "/files/", &[("Depth", "1")], Body::None);
    assert_eq!(list.status, 207);
    let t = list.text();
    assert!(!t.contains("big"), "a refused file is visible: {t}");
    assert!(t.contains("keep.bin") && t.contains("small.bin"));
    let space = s.get("/api/space", &[]).text();
    assert!(space.contains("\"used_bytes\":901000"), "{space}");
    // The quota shows in WebDAV too (RFC 4331).
    let q = s.req(
        "PROPFIND",
        "/files/",
        &[("Depth", "0")],
        Body::Bytes(
            br#"<?xml version="1.0"?><D:propfind xmlns:D="DAV:"><D:prop><D:quota-used-bytes/><D:quota-available-bytes/></D:prop></D:propfind>"#,
        ),
    );
    let t = q.text();
    assert!(t.contains("901000</D:quota-used-bytes>"), "{t}");
    assert!(t.contains(">147576</D:quota-available-bytes>"), "{t}");
    assert_eq!(s.temp_files(), 0);
    // Lifting it lets the big file in.
    assert_eq!(set("{\"bytes\": null}").status, 200);
    assert_eq!(s.put("/files/big.bin", &big).status, 201);
    assert!(s.get("/files/big.bin", &[]).body == big);
}

#[test]
fn hostile_paths_are_refused_and_nothing_escapes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("secret"), "outside").unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/ok.txt", b"fine").status, 201);
    let long = "n".repeat(300);
    for p in [
        "/files/../secret",
        "/files/%2e%2e/%2e%2e/secret",
        "/files/a%00b",
        "/files/..%2fsecret",
        "/files/a%5c..%5csecret",
        &format!("/files/{long}"),
        &format!("/files/{}", "d/".repeat(2100)),
        "/files/%ff%fe",
    ] {
        for m in ["GET", "PUT", "MKCOL", "DELETE", "PROPFIND"] {
            let body = if m == "PUT" {
                Body::Bytes(b"x")
            } else {
                Body::None
            };
            let r = s.req(m, p, &[], body);
            assert!(
                (400..500).contains(&r.status) || r.status == 207 && m == "PROPFIND",
                "{m} {}: {}",
                &p[..p.len().min(60)],
                r.status
            );
            assert!(!r.text().contains("outside"), "{m} {p} leaked");
        }
    }
    // A Destination that climbs out is refused too.
    let r = s.req(
        "MOVE",
        "/files/ok.txt",
        &[("Destination", "/files/../../moved")],
        Body::None,
    );
    assert!((400..500).contains(&r.status), "MOVE: {}", r.status);
    assert!(!d.path().join("moved").exists());
    assert_eq!(s.get("/files/ok.txt", &[]).body, b"fine");
    assert_eq!(
        std::fs::read_to_string(d.path().join("secret")).unwrap(),
        "outside"
    );
}

fn summary_ok(out: &str, group: &str) -> bool {
    out.lines()
        .any(|l| l.contains(&format!("summary for `{group}'")) && l.contains(" 0 failed"))
}

#[test]
fn litmus_passes_basic_copymove_props_and_locks() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    litmus_passes(&format!("http://{}/files/", s.addr), &s.token);
}

#[test]
fn litmus_passes_over_tls_with_the_box_certificate() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start_tls(d.path());
    litmus_passes(&format!("https://{}/files/", s.addr), &s.token);
}

fn litmus_passes(url: &str, token: &str) {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(tool("litmus"))
        .arg(url)
        .args(["litmus", token])
        .env("TESTS", "basic copymove props locks http")
        .current_dir(work.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for g in ["basic", "copymove", "props", "locks", "http"] {
        assert!(summary_ok(&text, g), "litmus {g} failed:\n{text}");
    }
    assert!(out.status.success(), "{text}");
}

/// Files of every kind a household has: empty, tiny, text, binary of a few
/// MiB, odd names, nested folders.
fn make_tree(root: &Path) -> Vec<PathBuf> {
    let mut r = Rng(0x7ee);
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("a.txt", b"hello\n".to_vec()),
        ("photos/2026/beach.jpg", r.fill(1_500_000)),
        ("photos/2026/same-as-beach.jpg", Vec::new()),
        ("music/Song with spaces & ünïcödé.flac", r.fill(3_200_001)),
        ("docs/deep/er/still/notes.md", b"# notes\n".repeat(1000)),
        ("docs/[brackets] (parens) 100%.txt", b"odd".to_vec()),
        ("video/clip.mp4", r.fill(700_000)),
    ];
    let mut out = Vec::new();
    for (name, mut data) in files {
        if name.ends_with("same-as-beach.jpg") {
            data = std::fs::read(root.join("photos/2026/beach.jpg")).unwrap();
        }
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        out.push(PathBuf::from(name));
    }
    std::fs::create_dir_all(root.join("empty folder")).unwrap();
    out
}

#[test]
fn rclone_copies_a_tree_up_and_back_intact() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let (work, names) = rclone_round_trip(&format!("http://{}/files/", s.addr), &s.token, &[]);
    // The two identical photos are stored once.
    let up = work.path().join("up");
    let space = s.get("/api/space", &[]).text();
    let total: u64 = names
        .iter()
        .filter(|n| !n.ends_with("same-as-beach.jpg"))
        .map(|n| std::fs::metadata(up.join(n)).unwrap().len())
        .sum();
    assert!(
        space.contains(&format!("\"used_bytes\":{total}")),
        "{space} vs {total}"
    );
}

#[test]
fn rclone_copies_a_tree_over_tls_trusting_only_the_box_identity() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start_tls(d.path());
    // The box's identity certificate as the only CA rclone trusts: Go's
    // verifier checks the chain, the names and the key usages for real.
    let der = std::fs::read(d.path().join("sharing/identity.crt")).unwrap();
    let ca = d.path().join("box-ca.pem");
    std::fs::write(&ca, cloudlet_runtime::tls::pem("CERTIFICATE", &der)).unwrap();
    rclone_round_trip(
        &format!("https://{}/files/", s.addr),
        &s.token,
        &["--ca-cert", ca.to_str().unwrap()],
    );
}

/// Copies a tree up to `url` and back with rclone (and `flags`), and checks
/// every byte came back. Returns the work directory (the tree in `up`) and
/// the files' names.
fn rclone_round_trip(url: &str, token: &str, flags: &[&str]) -> (tempfile::TempDir, Vec<PathBuf>) {
    let work = tempfile::tempdir().unwrap();
    let (up, down) = (work.path().join("up"), work.path().join("down"));
    let names = make_tree(&up);
    let obscured = Command::new(tool("rclone"))
        .args(["obscure", token])
        .output()
        .unwrap();
    let pass = String::from_utf8_lossy(&obscured.stdout).trim().to_owned();
    let rclone = |args: &[&str]| {
        let out = Command::new(tool("rclone"))
            .args(args)
            .args(flags)
            .env("RCLONE_CONFIG", work.path().join("rclone.conf"))
            .env("RCLONE_CONFIG_BOX_TYPE", "webdav")
            .env("RCLONE_CONFIG_BOX_URL", url)
            .env("RCLONE_CONFIG_BOX_VENDOR", "other")
            .env("RCLONE_CONFIG_BOX_USER", "rclone")
            .env("RCLONE_CONFIG_BOX_PASS", &pass)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rclone {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    rclone(&[
        "copy",
        "--create-empty-src-dirs",
        up.to_str().unwrap(),
        "box:home",
    ]);
    rclone(&[
        "copy",
        "--create-empty-src-dirs",
        "box:home",
        down.to_str().unwrap(),
    ]);
    for n in &names {
        let a = std::fs::read(up.join(n)).unwrap();
        let b = std::fs::read(down.join(n)).unwrap_or_else(|e| panic!("{n:?}: {e}"));
        assert_eq!(
            blake3::hash(&a),
            blake3::hash(&b),
            "{n:?} came back different"
        );
    }
    assert!(down.join("empty folder").is_dir());
    // rclone's own comparison, reading every byte back from the box.
    rclone(&["check", "--download", up.to_str().unwrap(), "box:home"]);
    let listing = rclone(&["lsf", "-R", "box:home"]);
    assert!(
        listing.contains("music/Song with spaces & ünïcödé.flac"),
        "{listing}"
    );
    (work, names)
}

/// An upload in flight when the service is killed: acknowledged files must
/// come back whole; the one in flight may be absent or whole, never partial.
#[test]
fn sigkill_during_uploads_loses_nothing_acknowledged() {
    let d = tempfile::tempdir().unwrap();
    let mut r = Rng(0xdead_beef);
    let mut acked: Vec<(String, blake3::Hash)> = Vec::new();
    let mut in_flight: Vec<(String, blake3::Hash)> = Vec::new();
    for round in 0..6 {
        let mut s = Server::start(d.path());
        // What earlier rounds acknowledged is all there.
        for (p, h) in &acked {
            let g = s.get(p, &[]);
            assert_eq!(g.status, 200, "round {round}: {p} lost");
            assert_eq!(blake3::hash(&g.body), *h, "round {round}: {p} damaged");
        }
        // Whatever was in flight is whole or absent.
        for (p, h) in in_flight.drain(..) {
            let g = s.get(&p, &[]);
            if g.status == 200 {
                assert_eq!(blake3::hash(&g.body), h, "round {round}: {p} is partial");
            } else {
                assert_eq!(g.status, 404, "round {round}: {p}");
            }
        }
        assert_eq!(s.temp_files(), 0, "round {round}: temporary files left");
        let (addr, auth) = (s.addr, s.auth());
        let seed = r.next_u64();
        let (tx, rx) = std::sync::mpsc::channel::<(String, blake3::Hash, bool)>();
        let writer = std::thread::spawn(move || {
            let mut r = Rng(seed | 1);
            for i in 0.. {
                let size = match r.below(4) {
                    0 => r.below(100) as usize,
                    1 => r.below(100_000) as usize,
                    _ => (1 << 20) + r.below(3 << 20) as usize,
                };
                let data = r.fill(size);
                let path = format!("/files/r{round}-{i}.bin");
                let h = blake3::hash(&data);
                if tx.send((path.clone(), h, false)).is_err() {
                    return;
                }
                match request(
                    addr,
                    "PUT",
                    &path,
                    &[("Authorization", &auth)],
                    Body::Bytes(&data),
                ) {
                    Ok(resp) if resp.status == 201 => {
                        if tx.send((path, h, true)).is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        let kill_at = Instant::now() + Duration::from_millis(300 + r.below(1200));
        let mut pending = None;
        while Instant::now() < kill_at {
            if let Ok((p, h, done)) = rx.recv_timeout(Duration::from_millis(5)) {
                if done {
                    acked.push((p, h));
                    pending = None;
                } else {
                    pending = Some((p, h));
                }
            }
        }
        s.kill();
        let _ = writer.join();
        // Acknowledgements that arrived before the kill still count.
        for (p, h, done) in rx.try_iter() {
            if done {
                acked.push((p, h));
                pending = None;
            } else {
                pending = Some((p, h));
            }
        }
        in_flight.extend(pending);
    }
    assert!(
        acked.len() >= 6,
        "too few uploads to mean anything: {}",
        acked.len()
    );
}

/// How many resources a PROPFIND answered for.
fn responses(r: &Response) -> usize {
    r.text().matches("<D:response>").count()
}

/// Every resource under (and including) `path`, by PROPFIND Depth: infinity.
fn count_tree(s: &Server, path: &str) -> usize {
    let r = s.req("PROPFIND", path, &[("Depth", "infinity")], Body::None);
    if r.status == 404 {
        return 0;
    }
    assert_eq!(r.status, 207, "PROPFIND {path}: {}", r.text());
    responses(&r)
}

fn used_bytes(s: &Server) -> String {
    let t = s.get("/api/space", &[]).text();
    t.split("\"used_bytes\":")
        .nth(1)
        .and_then(|r| r.split([',', '}']).next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn deleting_the_root_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.req("MKCOL", "/files/docs/", &[], Body::None).status, 201);
    assert_eq!(s.put("/files/docs/a.txt", b"keep me").status, 201);
    assert_eq!(s.put("/files/b.txt", b"and me").status, 201);
    let before = used_bytes(&s);
    for path in ["/files/", "/files", "/files/./", "/files//"] {
        let r = s.req("DELETE", path, &[], Body::None);
        assert_eq!(r.status, 403, "DELETE {path}");
    }
    assert_eq!(s.get("/files/docs/a.txt", &[]).body, b"keep me");
    assert_eq!(s.get("/files/b.txt", &[]).body, b"and me");
    assert_eq!(count_tree(&s, "/files/"), 4);
    assert_eq!(used_bytes(&s), before);
}

/// Makes /files/big/ with `copies` folders of 50 files each, by COPY on the
/// box (quick: no upload per file).
fn make_big_tree(s: &Server, copies: usize) -> usize {
    assert_eq!(s.req("MKCOL", "/files/big/", &[], Body::None).status, 201);
    assert_eq!(
        s.req("MKCOL", "/files/big/d0/", &[], Body::None).status,
        201
    );
    for i in 0..50 {
        let data = format!("file {i}").repeat(i + 1);
        assert_eq!(
            s.put(&format!("/files/big/d0/f{i}"), data.as_bytes())
                .status,
            201
        );
    }
    for c in 1..copies {
        let dest = format!("http://cloudlet/files/big/d{c}/");
        let r = s.req(
            "COPY",
            "/files/big/d0/",
            &[("Destination", &dest)],
            Body::None,
        );
        assert_eq!(r.status, 201, "COPY to d{c}");
    }
    1 + copies * 51
}

/// Sends a request and hangs up soon after, without reading the answer.
fn hang_up_after(s: &Server, method: &str, path: &str, headers: &[(&str, &str)]) {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: cloudlet\r\nAuthorization: {}\r\n",
        s.auth()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    drop(c);
}

/// The count of a tree once it stops changing (two looks a second apart agree).
fn settled_count(s: &Server, path: &str) -> usize {
    let until = Instant::now() + Duration::from_secs(60);
    let mut last = count_tree(s, path);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = count_tree(s, path);
        if now == last {
            return now;
        }
        assert!(Instant::now() < until, "{path} never settles");
        last = now;
    }
}

#[test]
fn tree_delete_and_copy_finish_whole_when_the_client_hangs_up() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let total = make_big_tree(&s, 40);
    assert_eq!(count_tree(&s, "/files/big/"), total);

    // COPY, then the client goes: all of the copy or none of it (the
    // server may not have started it), never a part.
    hang_up_after(
        &s,
        "COPY",
        "/files/big/",
        &[("Destination", "/files/big2/")],
    );
    let copied = settled_count(&s, "/files/big2/");
    assert!(copied == 0 || copied == total, "{copied} of {total} copied");
    if copied == 0 {
        let r = s.req(
            "COPY",
            "/files/big/",
            &[("Destination", "/files/big2/")],
            Body::None,
        );
        assert_eq!(r.status, 201);
    }

    // DELETE, then the client goes: all of the tree goes or none of it.
    hang_up_after(&s, "DELETE", "/files/big/", &[]);
    let left = settled_count(&s, "/files/big/");
    assert!(left == 0 || left == total, "{left} of {total} left");
    assert_eq!(count_tree(&s, "/files/big2/"), total);

    // MOVE over an existing tree replaces it in one step.
    let r = s.req(
        "MOVE",
        "/files/big2/d1/",
        &[("Destination", "/files/big2/d2/"), ("Overwrite", "T")],
        Body::None,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(count_tree(&s, "/files/big2/d2/"), 51);
    assert_eq!(count_tree(&s, "/files/big2/d1/"), 0);
    assert_eq!(count_tree(&s, "/files/big2/"), total - 51);
}

#[test]
fn propfind_depth_follows_rfc_4918() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.req("MKCOL", "/files/a/", &[], Body::None).status, 201);
    assert_eq!(s.req("MKCOL", "/files/a/b/", &[], Body::None).status, 201);
    assert_eq!(s.put("/files/a/b/deep.txt", b"deep").status, 201);
    assert_eq!(s.put("/files/top.txt", b"12345").status, 201);

    // No Depth means infinity: a file answers for itself.
    let r = s.req("PROPFIND", "/files/top.txt", &[], Body::None);
    assert_eq!(r.status, 207);
    assert_eq!(responses(&r), 1, "{}", r.text());
    assert!(r.text().contains("<D:getcontentlength>5<"), "{}", r.text());
    // ... and a folder for everything below it.
    let r = s.req("PROPFIND", "/files/", &[], Body::None);
    assert_eq!(r.status, 207);
    assert!(r.text().contains("/files/a/b/deep.txt"), "{}", r.text());
    assert_eq!(responses(&r), 5);
    let r = s.req("PROPFIND", "/files/", &[("Depth", "infinity")], Body::None);
    assert_eq!((r.status, responses(&r)), (207, 5));
    assert_eq!(
        responses(&s.req("PROPFIND", "/files/", &[("Depth", "1")], Body::None)),
        3
    );
    assert_eq!(
        responses(&s.req("PROPFIND", "/files/", &[("Depth", "0")], Body::None)),
        1
    );
    // Anything else is a bad request, whatever other headers say.
    for bad in ["2", "garbage", "", "1,0"] {
        for extra in [None, Some(("X-Litmus", "props: 1 (propfind)"))] {
            let mut h = vec![("Depth", bad)];
            h.extend(extra);
            let r = s.req("PROPFIND", "/files/", &h, Body::None);
            assert_eq!(r.status, 400, "Depth {bad:?} with {extra:?}");
        }
    }
}

#[test]
fn many_ranges_get_the_whole_body_once() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let data = Rng(5).fill(1 << 20);
    assert_eq!(s.put("/files/v.bin", &data).status, 201);
    let many = format!("bytes={}", vec!["0-"; 1000].join(","));
    let r = s.get("/files/v.bin", &[("Range", &many)]);
    assert_eq!(r.status, 200);
    assert!(
        r.body == data,
        "{} bytes for a {} byte file",
        r.body.len(),
        data.len()
    );
    let r = s.get("/files/v.bin", &[("Range", "bytes=0-9,20-29")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), data.len());
    // One range is still a range.
    let r = s.get("/files/v.bin", &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert!(r.body == data[10..20]);
}

#[test]
fn a_destination_must_be_this_server_inside_files_and_not_the_root() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/x", b"x").status, 201);
    assert_eq!(s.req("MKCOL", "/files/dir/", &[], Body::None).status, 201);
    for (method, dest, status) in [
        ("COPY", "/files/", 403),
        ("MOVE", "/files/", 403),
        ("COPY", "http://cloudlet/files/", 403),
        ("MOVE", "/files", 403),
        ("COPY", "http://another.host/files/y", 502),
        ("MOVE", "http://cloudlet:8443/files/y", 502),
        ("COPY", "/elsewhere/y", 403),
        ("COPY", "/files/../y", 400),
        ("COPY", "not a url", 400),
    ] {
        for src in ["/files/x", "/files/dir/"] {
            let r = s.req(method, src, &[("Destination", dest)], Body::None);
            assert_eq!(r.status, status, "{method} {src} -> {dest}");
        }
    }
    // The service is still there, and nothing moved.
    assert_eq!(s.get("/files/x", &[]).body, b"x");
    assert_eq!(count_tree(&s, "/files/"), 3);
    // This host, by URL or by path, works.
    let r = s.req(
        "COPY",
        "/files/x",
        &[("Destination", "http://cloudlet/files/y")],
        Body::None,
    );
    assert_eq!(r.status, 201);
    let r = s.req(
        "MOVE",
        "/files/y",
        &[("Destination", "/files/dir/y")],
        Body::None,
    );
    assert_eq!(r.status, 201);
    assert_eq!(s.get("/files/dir/y", &[]).body, b"x");
}

fn proppatch(s: &Server, path: &str, props: &str) -> Response {
    let body = format!(
        r#"<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:z"><D:set><D:prop>{props}</D:prop></D:set></D:propertyupdate>"#
    );
    s.req("PROPPATCH", path, &[], Body::Bytes(body.as_bytes()))
}

#[test]
fn dead_properties_are_bounded_counted_and_listed_once() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/f", b"0123456789").status, 201);
    assert_eq!(used_bytes(&s), "10");
    let r = proppatch(&s, "/files/f", "<Z:colour>blue</Z:colour>");
    assert_eq!(r.status, 207, "{}", r.text());
    let with_prop: u64 = used_bytes(&s).parse().unwrap();
    assert!(with_prop > 10, "properties are not counted: {with_prop}");
    // Asked by name: once, and a missing one is not invented.
    let r = s.req(
        "PROPFIND",
        "/files/f",
        &[("Depth", "0")],
        Body::Bytes(br#"<?xml version="1.0"?><D:propfind xmlns:D="DAV:" xmlns:Z="urn:z"><D:prop><Z:colour/><Z:missing/></D:prop></D:propfind>"#),
    );
    let t = r.text();
    assert_eq!(t.matches("blue").count(), 1, "{t}");
    assert!(
        t.contains("missing xmlns:") && t.contains("404 Not Found"),
        "{t}"
    );
    // Too many, or too big: 507, and what was there stays.
    let big = format!("<Z:big>{}</Z:big>", "x".repeat(70_000));
    let st = proppatch(&s, "/files/f", &big).status;
    assert!(st == 413 || st == 507, "{st}");
    let half = format!("<Z:half>{}</Z:half>", "x".repeat(40_000));
    assert_eq!(proppatch(&s, "/files/f", &half).status, 207);
    assert_eq!(proppatch(&s, "/files/g", &half).status, 404);
    let other_half = format!("<Z:half2>{}</Z:half2>", "x".repeat(40_000));
    assert_eq!(proppatch(&s, "/files/f", &other_half).status, 507);
    let r = s.req("PROPPATCH", "/files/f", &[], Body::Bytes(br#"<?xml version="1.0"?><D:propertyupdate xmlns:D="DAV:" xmlns:Z="urn:z"><D:remove><D:prop><Z:half/></D:prop></D:remove></D:propertyupdate>"#));
    assert_eq!(r.status, 207);
    let many: String = (0..70).map(|i| format!("<Z:p{i}>v</Z:p{i}>")).collect();
    assert_eq!(proppatch(&s, "/files/f", &many).status, 507);
    assert_eq!(used_bytes(&s), with_prop.to_string());
    // Copies count; deleting frees.
    let r = s.req(
        "COPY",
        "/files/f",
        &[("Destination", "/files/g")],
        Body::None,
    );
    assert_eq!(r.status, 201);
    let copied: u64 = used_bytes(&s).parse().unwrap();
    assert_eq!(copied, 10 + 2 * (with_prop - 10));
    assert_eq!(s.req("DELETE", "/files/g", &[], Body::None).status, 204);
    assert_eq!(s.req("DELETE", "/files/f", &[], Body::None).status, 204);
    assert_eq!(used_bytes(&s), "0");
}

fn lock(s: &Server, path: &str, owner: &str, timeout: &str) -> Response {
    let body = format!(
        r#"<?xml version="1.0"?><D:lockinfo xmlns:D="DAV:"><D:lockscope><D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype><D:owner>{owner}</D:owner></D:lockinfo>"#
    );
    s.req(
        "LOCK",
        path,
        &[("Timeout", timeout)],
        Body::Bytes(body.as_bytes()),
    )
}

#[test]
fn locks_have_bounded_owners_and_timeouts() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/f", b"x").status, 201);
    let r = lock(&s, "/files/f", &"o".repeat(60_000), "Second-60");
    assert_eq!(r.status, 423, "a 60 KB owner was taken");
    for (asked, given) in [
        ("Second-4294967296", "Second-600"),
        ("Infinite", "Second-600"),
        ("Second-30", "Second-30"),
    ] {
        let r = lock(&s, "/files/f", "me", asked);
        assert_eq!(r.status, 200, "{asked}: {}", r.text());
        assert!(r.text().contains(given), "{asked}: {}", r.text());
        let token = r.header("lock-token").unwrap().to_owned();
        let r = s.req("UNLOCK", "/files/f", &[("Lock-Token", &token)], Body::None);
        assert_eq!(r.status, 204);
    }
}

#[test]
fn small_things_refuse_clearly() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    // A quota change must say what it sets.
    let r = s.req("PUT", "/api/quota", &[], Body::Bytes(b"{}"));
    assert_eq!(r.status, 400);
    assert!(s
        .get("/api/space", &[])
        .text()
        .contains("\"quota_bytes\":null"));
    // Nothing offers what it does not do.
    assert_eq!(s.put("/files/x", b"x").status, 201);
    let o = s.req("OPTIONS", "/files/x", &[], Body::None);
    assert!(
        !o.header("dav").unwrap_or("").contains("partialupdate"),
        "{o:?}"
    );
    assert!(!o.header("allow").unwrap_or("").contains("PATCH"), "{o:?}");
    // A file's URL has no trailing slash.
    assert_eq!(s.get("/files/x/", &[]).status, 404);
    assert_eq!(
        s.req("PROPFIND", "/files/x/", &[("Depth", "0")], Body::None)
            .status,
        404
    );
    assert_eq!(s.put("/files/new/", b"y").status, 409);
    assert_eq!(s.get("/files/new", &[]).status, 404);
    // Credentials with stray whitespace are refused under both schemes.
    let bearer = format!("Bearer  {}", s.token);
    let basic = format!("Basic {}", base64(&format!("me:{} ", s.token)));
    for auth in [&bearer, &basic] {
        let r = request(
            s.addr,
            "GET",
            "/files/x",
            &[("Authorization", auth)],
            Body::None,
        )
        .unwrap();
        assert_eq!(r.status, 401, "{auth}");
    }
}

/// A chunked upload that runs out of quota is answered 507, and the client
/// can send its whole body first (no broken pipe).
#[test]
fn a_chunked_upload_over_quota_is_read_to_the_end_and_answered_507() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let r = s.req(
        "PUT",
        "/api/quota",
        &[],
        Body::Bytes(b"{\"bytes\": 1000000}"),
    );
    assert_eq!(r.status, 200);
    for round in 0..5 {
        let mut c = std::net::TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "PUT /files/big{round} HTTP/1.1\r\nHost: cloudlet\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            s.auth()
        );
        c.write_all(head.as_bytes()).unwrap();
        let chunk = vec![round as u8; 64 << 10];
        for i in 0..128 {
            let sent = write!(c, "{:x}\r\n", chunk.len())
                .and_then(|_| c.write_all(&chunk))
                .and_then(|_| c.write_all(b"\r\n"));
            assert!(
                sent.is_ok(),
                "round {round}: the body was cut at chunk {i}: {sent:?}"
            );
        }
        c.write_all(b"0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 507"), "round {round}: {out}");
    }
    assert_eq!(s.temp_files(), 0);
}

/// The service's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Three readers of a large file at once: the service maps only the chunks
/// in flight (a map of the whole file showed as its size in RSS per reader).
#[test]
fn parallel_reads_of_a_large_file_keep_memory_small() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let data = Rng(9).fill(96 << 20);
    assert_eq!(s.put("/files/movie.mkv", &data).status, 201);
    let before = rss_kib(s.child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (pid, flag) = (s.child.id(), done.clone());
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    });
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (addr, auth) = (s.addr, s.auth());
            std::thread::spawn(move || {
                let r = request(
                    addr,
                    "GET",
                    "/files/movie.mkv",
                    &[("Authorization", &auth)],
                    Body::None,
                )
                .unwrap();
                (r.status, blake3::hash(&r.body))
            })
        })
        .collect();
    let want = blake3::hash(&data);
    for r in readers {
        assert_eq!(r.join().unwrap(), (200, want));
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let peak = sampler.join().unwrap();
    assert!(
        peak < before + 32 * 1024,
        "RSS grew from {before} KiB to {peak} KiB reading a 96 MiB file three times"
    );
}

/// Found by an independent attack on the hardened service: a MOVE or COPY
/// onto a folder that holds the source deleted the source first.
#[test]
fn moving_or_copying_onto_an_ancestor_is_refused_and_loses_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let data = Rng(3).fill(200_000);
    assert_eq!(s.req("MKCOL", "/files/q/", &[], Body::None).status, 201);
    assert_eq!(
        s.req("MKCOL", "/files/q/child/", &[], Body::None).status,
        201
    );
    assert_eq!(s.put("/files/q/child/data.bin", &data).status, 201);
    assert_eq!(s.put("/files/q/small.txt", b"small").status, 201);
    let used = used_bytes(&s);
    for (method, src, dest) in [
        ("MOVE", "/files/q/small.txt", "/files/q"),
        ("COPY", "/files/q/small.txt", "/files/q/"),
        ("MOVE", "/files/q/child/", "/files/q/"),
        ("COPY", "/files/q/child/", "/files/q"),
        ("MOVE", "/files/q/child/data.bin", "/files/q/"),
    ] {
        let r = s.req(
            method,
            src,
            &[("Destination", dest), ("Overwrite", "T")],
            Body::None,
        );
        assert_eq!(r.status, 403, "{method} {src} onto {dest}");
    }
    assert!(s.get("/files/q/child/data.bin", &[]).body == data);
    assert_eq!(s.get("/files/q/small.txt", &[]).body, b"small");
    assert_eq!(used_bytes(&s), used);
}

#[test]
fn deeply_nested_xml_is_refused_and_the_service_stays_up() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/f", b"x").status, 201);
    let deep = |n: usize| {
        format!(
            r#"<D:propfind xmlns:D="DAV:"><D:prop>{}{}</D:prop></D:propfind>"#,
            "<a>".repeat(n),
            "</a>".repeat(n)
        )
    };
    for method in ["PROPFIND", "PROPPATCH", "LOCK"] {
        let r = s.req(
            method,
            "/files/f",
            &[("Depth", "0")],
            Body::Bytes(deep(9000).as_bytes()),
        );
        assert_eq!(r.status, 400, "{method} with 9,000 levels");
    }
    assert_eq!(
        s.get("/files/f", &[]).body,
        b"x",
        "the service is still there"
    );
}

#[test]
fn an_expired_lock_stops_blocking_and_cannot_be_refreshed() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/f", b"x").status, 201);
    let r = lock(&s, "/files/f", "me", "Second-1");
    assert_eq!(r.status, 200);
    let token = r.header("lock-token").unwrap().to_owned();
    assert_eq!(s.put("/files/f", b"y").status, 423, "locked");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.put("/files/f", b"y").status, 204, "the lock expired");
    let refresh = s.req(
        "LOCK",
        "/files/f",
        &[("If", &format!("({token})")), ("Timeout", "Second-60")],
        Body::None,
    );
    assert_eq!(refresh.status, 412, "{}", refresh.text());
}

#[test]
fn a_range_end_past_u64_reads_to_the_end() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let data = Rng(4).fill(1_000_000);
    assert_eq!(s.put("/files/r.bin", &data).status, 201);
    for (range, start) in [
        ("bytes=0-18446744073709551615", 0),
        ("bytes=5-18446744073709551615", 5),
    ] {
        let r = s.get("/files/r.bin", &[("Range", range)]);
        assert_eq!(r.status, 206, "{range}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-999999/1000000").as_str())
        );
        assert!(r.body == data[start..], "{range}");
    }
}

#[test]
fn copies_of_properties_count_against_the_quota() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.put("/files/f", b"0123456789").status, 201);
    let big = format!("<Z:p>{}</Z:p>", "x".repeat(50_000));
    assert_eq!(proppatch(&s, "/files/f", &big).status, 207);
    let used: u64 = used_bytes(&s).parse().unwrap();
    let quota = used + 60_000;
    let r = s.req(
        "PUT",
        "/api/quota",
        &[],
        Body::Bytes(format!("{{\"bytes\": {quota}}}").as_bytes()),
    );
    assert_eq!(r.status, 200);
    let first = s.req(
        "COPY",
        "/files/f",
        &[("Destination", "/files/g1")],
        Body::None,
    );
    assert_eq!(first.status, 201, "one copy fits");
    let second = s.req(
        "COPY",
        "/files/f",
        &[("Destination", "/files/g2")],
        Body::None,
    );
    assert_eq!(second.status, 507, "a second does not");
    assert_eq!(s.get("/files/g2", &[]).status, 404);
    let now: u64 = used_bytes(&s).parse().unwrap();
    assert!(now <= quota, "{now} over the quota {quota}");
}

#[test]
fn copy_at_depth_0_replaces_an_existing_folder() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(s.req("MKCOL", "/files/a/", &[], Body::None).status, 201);
    assert_eq!(s.put("/files/a/in-a", b"a").status, 201);
    assert_eq!(s.req("MKCOL", "/files/b/", &[], Body::None).status, 201);
    assert_eq!(s.put("/files/b/in-b", b"b").status, 201);
    let r = s.req(
        "COPY",
        "/files/a/",
        &[
            ("Destination", "/files/b/"),
            ("Depth", "0"),
            ("Overwrite", "T"),
        ],
        Body::None,
    );
    assert_eq!(r.status, 204);
    // RFC 4918 9.8.4: the destination is deleted, then the folder alone copied.
    assert_eq!(count_tree(&s, "/files/b/"), 1);
    assert_eq!(s.get("/files/a/in-a", &[]).body, b"a");
    for (method, depth) in [("COPY", "2"), ("MOVE", "0"), ("LOCK", "bogus")] {
        let r = s.req(
            method,
            "/files/a/",
            &[("Destination", "/files/c/"), ("Depth", depth)],
            Body::None,
        );
        assert_eq!(r.status, 400, "{method} with Depth {depth}");
    }
}

#[test]
fn stored_pages_are_served_sandboxed() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    assert_eq!(
        s.put("/files/page.html", b"<script>fetch('/api/space')</script>")
            .status,
        201
    );
    let r = s.get("/files/page.html", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-security-policy"), Some("sandbox"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}
