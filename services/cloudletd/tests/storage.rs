//! The storage service as clients see it: the real `cloudletd storage`
//! process on loopback, driven over HTTP by our own small client, by the
//! litmus WebDAV suite and by rclone, and killed with SIGKILL mid-upload.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudlet_testkit::http::{request, Body, Response};
use cloudlet_testkit::Rng;

struct Server {
    child: Child,
    addr: SocketAddr,
    token: String,
    data: PathBuf,
}

impl Server {
    /// Starts the service on a free port with its state under `data`.
    fn start(data: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .args(["storage", "--listen", "127.0.0.1:0"])
            .env("CLOUDLET_DATA", data)
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cloudletd storage");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.split("addr=").nth(1) {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the service says where it listens")
            .parse()
            .unwrap();
        let token = std::fs::read_to_string(data.join("storage/access-token"))
            .unwrap()
            .trim()
            .to_owned();
        Server {
            child,
            addr,
            token,
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
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(tool("litmus"))
        .arg(format!("http://{}/files/", s.addr))
        .args(["litmus", &s.token])
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
    let work = tempfile::tempdir().unwrap();
    let (up, down) = (work.path().join("up"), work.path().join("down"));
    let names = make_tree(&up);
    let obscured = Command::new(tool("rclone"))
        .args(["obscure", &s.token])
        .output()
        .unwrap();
    let pass = String::from_utf8_lossy(&obscured.stdout).trim().to_owned();
    let rclone = |args: &[&str]| {
        let out = Command::new(tool("rclone"))
            .args(args)
            .env("RCLONE_CONFIG", work.path().join("rclone.conf"))
            .env("RCLONE_CONFIG_BOX_TYPE", "webdav")
            .env("RCLONE_CONFIG_BOX_URL", format!("http://{}/files/", s.addr))
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
    // The two identical photos are stored once.
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
