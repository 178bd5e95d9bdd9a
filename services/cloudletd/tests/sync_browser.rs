//! The browser as a peer of the box: real PouchDB (its browser build, on
//! IndexedDB) in Debian's headless Chromium, driven by playwright-core
//! (services/sync/tests-browser/browser.js), replicating with the real
//! `cloudletd sync`. The page's origin is refused until the owner adds it
//! with `PUT /_cloudlet/cors`; then it pulls, pushes, syncs live, keeps
//! writing offline while the box takes writes, and catches up. What the
//! page holds at the end is read back through playwright and compared here
//! with what the box holds.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cloudlet_testkit::http::{request, Body};
use serde_json::{json, Value};

/// Where Debian's chromium package puts the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser scenario, startup included, on a slow machine.
const SCENARIO_LIMIT: Duration = Duration::from_secs(300);

/// A process killed when the test ends, passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn browser_tests() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sync/tests-browser");
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is not installed: scripts/setup installs it (Debian package nodejs)"
    );
    let chromium = Command::new(CHROMIUM).arg("--version").output();
    assert!(
        chromium.is_ok_and(|o| o.status.success()),
        "{CHROMIUM} does not run: scripts/setup installs it (Debian packages chromium chromium-driver)"
    );
    assert!(
        dir.join("node_modules/playwright-core").is_dir()
            && dir.join("node_modules/pouchdb/dist/pouchdb.min.js").is_file(),
        "playwright-core and PouchDB are not installed for the browser test: run `npm ci --ignore-scripts --prefix services/sync/tests-browser` (scripts/setup does)"
    );
    dir
}

/// A JSON call to the box with the device's token.
fn call(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let b = if bytes.is_empty() {
        Body::None
    } else {
        Body::Bytes(bytes.as_bytes())
    };
    let r = request(
        addr,
        method,
        path,
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ],
        b,
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let v = if r.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()))
    };
    (r.status, v)
}

/// The box's live documents: id -> {rev, sorted conflicts}, as the page
/// reports its own.
fn box_docs(addr: SocketAddr, token: &str) -> Value {
    let (st, v) = call(
        addr,
        token,
        "GET",
        "/notes/_all_docs?include_docs=true&conflicts=true",
        None,
    );
    assert_eq!(st, 200, "{v}");
    let mut out = serde_json::Map::new();
    for row in v["rows"].as_array().unwrap() {
        let mut conflicts: Vec<String> = row["doc"]["_conflicts"]
            .as_array()
            .map(|c| c.iter().map(|r| r.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        conflicts.sort();
        out.insert(
            row["id"].as_str().unwrap().to_owned(),
            json!({"rev": row["value"]["rev"], "conflicts": conflicts}),
        );
    }
    Value::Object(out)
}

#[test]
fn pouchdb_in_chromium_syncs_live_keeps_writing_offline_and_catches_up_after_owner_allows_its_origin(
) {
    let dir = browser_tests();
    let d = tempfile::tempdir().unwrap();
    let s = common::spawn("sync", d.path(), &[], None);
    let (addr, token) = (s.addr, s.token.clone());
    // Dropped in reverse: the service before its registry.
    let _registry = s.registry;
    let _sync = Killed(s.child);

    let mut node = Killed(
        Command::new("node")
            .arg("browser.js")
            .current_dir(&dir)
            .env("SYNC_ADDR", addr.to_string())
            .env("SYNC_TOKEN", &token)
            .env("CHROMIUM", CHROMIUM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running node"),
    );
    let (tx, rx) = mpsc::channel();
    let stdout = node.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = node.0.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });

    let until = Instant::now() + SCENARIO_LIMIT;
    let mut lines = Vec::new();
    let next = |lines: &mut Vec<String>| -> Option<String> {
        let left = until.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).ok()?;
        lines.push(line.clone());
        Some(line)
    };
    // The page is up and refused by CORS; the owner allows its origin.
    let origin = loop {
        match next(&mut lines) {
            Some(l) => {
                if let Some(o) = l.strip_prefix("origin ") {
                    break o.to_owned();
                }
            }
            None => {
                drop(node);
                panic!(
                    "the page never said its origin:\n{}\n{}",
                    lines.join("\n"),
                    errors.join().unwrap()
                );
            }
        }
    };
    assert!(origin.starts_with("http://127.0.0.1:"), "{origin}");
    let (st, v) = call(
        addr,
        &token,
        "PUT",
        "/_cloudlet/cors",
        Some(json!({"origins": [origin]})),
    );
    assert_eq!(st, 200, "PUT /_cloudlet/cors: {v}");
    let (st, v) = call(addr, &token, "GET", "/_cloudlet/cors", None);
    assert_eq!((st, &v["origins"]), (200, &json!([origin])));
    node.0
        .stdin
        .take()
        .unwrap()
        .write_all(b"allowed\n")
        .expect("telling the page its origin is allowed");

    while next(&mut lines).is_some() {}
    if Instant::now() >= until {
        let _ = node.0.kill();
    }
    let status = node.0.wait().unwrap();
    let errors = errors.join().unwrap();
    assert!(
        status.success() && lines.iter().any(|l| l == "all passed"),
        "the browser scenario failed ({status}):\n{}\n{errors}",
        lines.join("\n")
    );
    let result: Value = lines
        .iter()
        .find_map(|l| l.strip_prefix("result "))
        .map(|r| serde_json::from_str(r).expect("the result is JSON"))
        .expect("the scenario printed its result");

    assert_eq!(result["blocked_before_cors"], true);
    assert_eq!(result["reaches_after_cors"], true);
    assert_eq!(result["adapter"], "idb");
    assert_eq!(
        (&result["pulled"], &result["pushed"]),
        (&json!(20), &json!(10))
    );
    assert_eq!(result["reaches_while_offline"], false);
    assert_eq!(result["offline_local_writes"], 7);
    assert_eq!(result["box_writes_seen_offline"], 0);

    // What the page holds (read through playwright) is what the box holds:
    // same documents, same winning revisions, same conflicts.
    let page = &result["page_docs"];
    let boxed = box_docs(addr, &token);
    assert_eq!(page, &boxed);
    let ids: Vec<&String> = boxed.as_object().unwrap().keys().collect();
    for i in 0..5 {
        assert!(ids.contains(&&format!("page-offline-{i}")), "{ids:?}");
        assert!(ids.contains(&&format!("box-offline-{i}")), "{ids:?}");
    }
    assert!(!ids.contains(&&"page-00".to_owned()), "deleted offline");
    assert_eq!(ids.len(), 42);
    // The document edited on both sides while apart: one winner, one
    // conflict, the same on both.
    let shared = &boxed["shared"];
    assert_eq!(shared["conflicts"].as_array().unwrap().len(), 1, "{shared}");
    assert!(
        shared["rev"].as_str().unwrap().starts_with("2-"),
        "{shared}"
    );
    let (st, gone) = call(addr, &token, "GET", "/notes/page-00", None);
    assert_eq!((st, &gone["reason"]), (404, &json!("deleted")));
}
