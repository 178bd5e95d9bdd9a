//! `cloudlet sync` from a PC against a real sync service over TLS: the PC
//! is an owner paired by its key, the box pinned by its identity. It adds a
//! replication to another sync service, sees it run and its counts, never
//! prints the peer's password, removes it, and manages the CORS origins.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cloudlet_testkit::http::{request, request_tls, Body};
use common::{cloudlet, pair_pc, spawn, spawn_with, text};

fn sync(config: &Path, port: u16, args: &[&str]) -> (bool, String) {
    let p = port.to_string();
    let mut all = vec!["sync", "--port", &p];
    all.extend_from_slice(args);
    let out = cloudlet(config, &all);
    (out.status.success(), text(&out))
}

/// Stops a service when the test ends, however it ends.
struct Stop(common::Spawned);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

/// Polls `f` for up to 30 s until it holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("never: {what}");
}

#[test]
fn cloudlet_sync_adds_lists_and_removes_replications_without_showing_passwords() {
    let d = tempfile::tempdir().unwrap();
    let (data, peer_data, config) = (
        d.path().join("box"),
        d.path().join("peer"),
        d.path().join("pc"),
    );
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&peer_data).unwrap();
    let s = Stop(spawn_with("sync", &data, &[], None, true));
    let peer = Stop(spawn("sync", &peer_data, &[], None));
    let (s, peer) = (&s.0, &peer.0);
    pair_pc(&config, &data, s, "owner");
    let port = s.addr.port();

    let (ok, out) = sync(&config, port, &["list"]);
    assert!(ok, "{out}");
    assert!(out.contains("no replications"), "{out}");

    // A database on the box to replicate: made with the runtime's token.
    let auth = format!("Bearer {}", s.token);
    let put = |path: &str, body: &str| {
        let h = [
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ];
        let r = tls_raw(s.addr, "PUT", path, &h, body, &data);
        assert!(r.status / 100 == 2, "PUT {path}: {} {}", r.status, r.text());
    };
    put("/notes", "");
    put("/notes/one", r#"{"n":1}"#);

    let secret = peer.token.clone();
    let target = format!("http://pc:{secret}@{}/notes", peer.addr);
    let (ok, out) = sync(
        &config,
        port,
        &[
            "add",
            "notes",
            &target,
            "--create-target",
            "--id",
            "to-peer",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("added to-peer"), "{out}");
    assert!(
        !out.contains(&secret),
        "the password is never printed: {out}"
    );

    // It runs: the document reaches the peer, and a later one too.
    let peer_has = |id: &str| {
        let r = request(
            peer.addr,
            "GET",
            &format!("/notes/{id}"),
            &[("Authorization", &format!("Bearer {}", peer.token))],
            Body::None,
        )
        .unwrap();
        r.status == 200
    };
    eventually("the first document reaches the peer", || peer_has("one"));
    put("/notes/two", r#"{"n":2}"#);
    eventually("a later document reaches the peer (continuous)", || {
        peer_has("two")
    });

    let (ok, out) = sync(&config, port, &["list"]);
    assert!(ok, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("to-peer"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("continuous"), "{line}");
    assert!(
        line.contains(&format!("http://{}/notes", peer.addr)),
        "{line}"
    );
    assert!(
        !out.contains(&secret),
        "the password is never printed: {out}"
    );

    let (ok, out) = sync(&config, port, &["state", "to-peer"]);
    assert!(ok, "{out}");
    assert!(out.contains("docs_written"), "{out}");
    assert!(!out.contains(&secret), "{out}");

    // A second with the same name is refused with a clear message.
    let (ok, out) = sync(&config, port, &["add", "notes", &target, "--id", "to-peer"]);
    assert!(!ok);
    assert!(out.contains("exists already"), "{out}");

    let (ok, out) = sync(&config, port, &["remove", "to-peer"]);
    assert!(ok, "{out}");
    let (ok, out) = sync(&config, port, &["list"]);
    assert!(ok && out.contains("no replications"), "{out}");
    let (ok, out) = sync(&config, port, &["remove", "to-peer"]);
    assert!(!ok);
    assert!(out.contains("no replication to-peer"), "{out}");
}

#[test]
fn cloudlet_sync_cors_is_kept_by_the_box_and_checks_origins() {
    let d = tempfile::tempdir().unwrap();
    let (data, config) = (d.path().join("box"), d.path().join("pc"));
    std::fs::create_dir_all(&data).unwrap();
    let s = Stop(spawn_with("sync", &data, &[], None, true));
    let s = &s.0;
    pair_pc(&config, &data, s, "owner");
    let port = s.addr.port();

    let (ok, out) = sync(&config, port, &["cors"]);
    assert!(ok && out.contains("only the box's own pages"), "{out}");
    let (ok, out) = sync(&config, port, &["cors", "add", "https://app.example/x"]);
    assert!(!ok && out.contains("is not an origin"), "{out}");
    let (ok, out) = sync(&config, port, &["cors", "add", "https://app.example"]);
    assert!(ok, "{out}");
    let (ok, out) = sync(&config, port, &["cors", "list"]);
    assert!(ok && out.contains("https://app.example"), "{out}");

    // The box applies it: a preflight from that origin is allowed.
    let r = tls_raw(
        s.addr,
        "OPTIONS",
        "/notes",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "PUT"),
        ],
        "",
        &data,
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example"),
        "{:?}",
        r.headers
    );

    let (ok, out) = sync(&config, port, &["cors", "remove", "https://app.example"]);
    assert!(ok, "{out}");
    let (ok, out) = sync(&config, port, &["cors", "remove", "https://app.example"]);
    assert!(!ok && out.contains("was not allowed"), "{out}");
}

#[test]
fn only_an_owner_sees_or_makes_replications() {
    let d = tempfile::tempdir().unwrap();
    let (data, config) = (d.path().join("box"), d.path().join("pc"));
    std::fs::create_dir_all(&data).unwrap();
    let s = Stop(spawn_with("sync", &data, &[], None, true));
    let s = &s.0;
    pair_pc(&config, &data, s, "device");
    let (ok, out) = sync(&config, s.addr.port(), &["list"]);
    assert!(!ok && out.contains("owner"), "{out}");
    let (ok, out) = sync(
        &config,
        s.addr.port(),
        &["add", "a", "http://127.0.0.1:9/b"],
    );
    assert!(!ok && out.contains("owner"), "{out}");

    // The same with a device's token, straight to the API: `_replicator`
    // and `POST /_replicate` are the owner's; the state is everyone's.
    let made = s
        .registry
        .owner(&["add-device", "phone", "device"])
        .unwrap();
    let token = made.lines().find_map(|l| l.strip_prefix("token ")).unwrap();
    let auth = format!("Bearer {token}");
    let h = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let body = r#"{"source":"a","target":"http://127.0.0.1:9/b"}"#;
    for (method, path) in [
        ("POST", "/_replicate"),
        ("GET", "/_replicator/_all_docs"),
        ("PUT", "/_replicator/x"),
    ] {
        let r = tls_raw(s.addr, method, path, &h, body, &data);
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        assert!(r.text().contains("forbidden"), "{}", r.text());
    }
    let r = tls_raw(s.addr, "GET", "/_scheduler/docs", &h, "", &data);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn only_an_owner_changes_the_cors_origins() {
    let d = tempfile::tempdir().unwrap();
    let (data, config) = (d.path().join("box"), d.path().join("pc"));
    std::fs::create_dir_all(&data).unwrap();
    let s = Stop(spawn_with("sync", &data, &[], None, true));
    let s = &s.0;
    pair_pc(&config, &data, s, "device");
    let (ok, out) = sync(
        &config,
        s.addr.port(),
        &["cors", "add", "https://app.example"],
    );
    assert!(!ok, "{out}");
    let (ok, out) = sync(&config, s.addr.port(), &["cors"]);
    assert!(ok && !out.contains("app.example"), "{out}");
}

/// One request over TLS pinning the box of `data` (no client key: a
/// token in the headers lets it in).
fn tls_raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    data: &Path,
) -> cloudlet_testkit::http::Response {
    let identity = std::fs::read(data.join("sharing/identity.crt")).unwrap();
    let (config, name) = common::pinning_client(&identity.into(), false);
    let body = if body.is_empty() {
        Body::None
    } else {
        Body::Bytes(body.as_bytes())
    };
    request_tls(addr, &config, &name, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}
