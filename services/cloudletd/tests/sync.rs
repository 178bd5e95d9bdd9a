//! The sync service as clients see it: the real `cloudletd sync` process on
//! loopback, driven over HTTP with exact CouchDB status codes, and by real
//! PouchDB under Node (services/sync/tests-node).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cloudlet_testkit::http::{request, Body, Response};
use serde_json::{json, Value};

struct Server {
    child: Child,
    addr: SocketAddr,
    token: String,
    /// The device registry the service asks (stopped with the last user).
    _registry: std::sync::Arc<common::Registry>,
}

impl Server {
    /// Starts the service on a free port with its state under `data`.
    fn start(data: &Path) -> Server {
        let s = common::spawn("sync", data, &[], None);
        Server {
            child: s.child,
            addr: s.addr,
            token: s.token,
            _registry: s.registry,
        }
    }

    fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let auth = format!("Bearer {}", self.token);
        let mut h = vec![("Authorization", auth.as_str())];
        h.extend_from_slice(headers);
        let body = if body.is_empty() && method == "GET" {
            Body::None
        } else {
            Body::Bytes(body)
        };
        request(self.addr, method, path, &h, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A request with a JSON body (or none); the status and the JSON answer.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let r = self.raw(
            method,
            path,
            &[
                ("Content-Type", "application/json"),
                ("Accept", "application/json"),
            ],
            bytes.as_bytes(),
        );
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()))
        };
        (r.status, v)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The error answer CouchDB gives: status, `error`, `reason`.
fn error(status: u16, e: &str, reason: &str) -> (u16, Value) {
    (status, json!({"error": e, "reason": reason}))
}

#[test]
fn every_route_needs_the_token_and_errors_are_couchdb_json() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    for (m, p) in [
        ("GET", "/"),
        ("GET", "/_all_dbs"),
        ("PUT", "/db"),
        ("GET", "/db/_changes"),
        ("POST", "/db/_bulk_docs"),
        ("GET", "/db/doc"),
        ("GET", "/db/_local/x"),
        ("GET", "/no/such/route/here"),
    ] {
        let r = request(s.addr, m, p, &[], Body::None).unwrap();
        assert_eq!(r.status, 401, "{m} {p} without a credential");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            json!({"error": "unauthorized", "reason": "Name or password is incorrect."})
        );
    }
    // Basic with any user name and the token as password (PouchDB's URL form).
    let basic = format!(
        "Basic {}",
        base64_encode(format!("alice:{}", s.token).as_bytes())
    );
    let r = request(
        s.addr,
        "GET",
        "/_session",
        &[("Authorization", &basic)],
        Body::None,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["userCtx"], json!({"name": "alice", "roles": ["_admin"]}));
    // /health is public.
    assert_eq!(
        request(s.addr, "GET", "/health", &[], Body::None)
            .unwrap()
            .status,
        200
    );
    // The router's own errors are CouchDB-shaped too.
    assert_eq!(
        s.call("GET", "/a//b", None),
        error(404, "not_found", "missing")
    );
    let (st, v) = s.call("POST", "/db/x", None);
    assert_eq!((st, &v["error"]), (405, &json!("method_not_allowed")));
}

fn base64_encode(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
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
fn databases_are_made_listed_described_and_deleted() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let (st, root) = s.call("GET", "/", None);
    assert_eq!(st, 200);
    assert_eq!(root["couchdb"], "Welcome");
    assert_eq!(root["version"], "3.3.0-cloudlet");
    assert_eq!(root["uuid"].as_str().unwrap().len(), 32);
    assert_eq!(s.call("PUT", "/db", None), (201, json!({"ok": true})));
    assert_eq!(
        s.call("PUT", "/db", None),
        error(
            412,
            "file_exists",
            "The database could not be created, the file already exists."
        )
    );
    for bad in ["/Db", "/1db", "/d%20b", "/_db"] {
        let (st, v) = s.call("PUT", bad, None);
        assert_eq!(
            (st, &v["error"]),
            (400, &json!("illegal_database_name")),
            "{bad}"
        );
    }
    assert_eq!(s.call("PUT", "/a%2Fb", None).0, 201, "a slash is allowed");
    assert_eq!(
        s.call("GET", "/_all_dbs", None),
        // `_replicator` (the replicator's configuration) is always there.
        (200, json!(["_replicator", "a/b", "db"]))
    );
    let (st, info) = s.call("GET", "/db", None);
    assert_eq!(st, 200);
    assert_eq!(info["db_name"], "db");
    assert_eq!(info["doc_count"], 0);
    assert_eq!(info["doc_del_count"], 0);
    assert_eq!(info["update_seq"], 0);
    assert_eq!(info["instance_start_time"], "0");
    assert_eq!(s.raw("HEAD", "/db", &[], b"").status, 200);
    assert_eq!(s.raw("HEAD", "/nope", &[], b"").status, 404);
    assert_eq!(
        s.call("POST", "/db/_ensure_full_commit", None),
        (201, json!({"ok": true, "instance_start_time": "0"}))
    );
    assert_eq!(s.call("DELETE", "/db", None), (200, json!({"ok": true})));
    assert_eq!(
        s.call("GET", "/db", None),
        error(404, "not_found", "Database does not exist.")
    );
    assert_eq!(
        s.call("DELETE", "/db", None),
        error(404, "not_found", "Database does not exist.")
    );
    assert_eq!(
        s.call("GET", "/db/x", None),
        error(404, "not_found", "Database does not exist.")
    );
}

#[test]
fn acknowledged_writes_and_the_uuid_survive_a_kill() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Server::start(d.path());
    let uuid = s.call("GET", "/", None).1["uuid"].clone();
    s.call("PUT", "/db", None);
    for i in 0..20 {
        assert_eq!(
            s.call("PUT", &format!("/db/d{i}"), Some(json!({"i": i}))).0,
            201
        );
    }
    s.kill();
    let s = Server::start(d.path());
    assert_eq!(s.call("GET", "/", None).1["uuid"], uuid, "stable per box");
    let info = s.call("GET", "/db", None).1;
    assert_eq!(
        (info["doc_count"].clone(), info["update_seq"].clone()),
        (json!(20), json!(20))
    );
    assert_eq!(s.call("GET", "/db/d19", None).1["i"], 19);
}

#[test]
fn documents_keep_revision_trees_and_conflicts() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    s.call("PUT", "/db", None);
    let (st, v) = s.call("PUT", "/db/a", Some(json!({"v": 1})));
    assert_eq!(st, 201);
    let r1 = v["rev"].as_str().unwrap().to_owned();
    assert!(r1.starts_with("1-") && r1.len() == 34, "{r1}");
    assert_eq!(v, json!({"ok": true, "id": "a", "rev": r1}));
    let conflict = error(409, "conflict", "Document update conflict.");
    assert_eq!(s.call("PUT", "/db/a", Some(json!({"v": 2}))), conflict);
    assert_eq!(
        s.call("PUT", "/db/a", Some(json!({"_rev": "1-0000", "v": 2}))),
        conflict
    );
    let (st, v) = s.call("PUT", &format!("/db/a?rev={r1}"), Some(json!({"v": 2})));
    assert_eq!(st, 201);
    let r2 = v["rev"].as_str().unwrap().to_owned();
    assert_eq!(
        s.call("PUT", "/db/a", Some(json!({"_rev": r1, "v": 3}))),
        conflict
    );
    let (st, doc) = s.call("GET", "/db/a?revs=true&revs_info=true", None);
    assert_eq!(st, 200);
    assert_eq!(doc["_rev"], r2.as_str());
    assert_eq!(doc["v"], 2);
    assert_eq!(
        doc["_revisions"],
        json!({"start": 2, "ids": [&r2[2..], &r1[2..]]})
    );
    assert_eq!(
        doc["_revs_info"][1],
        json!({"rev": r1, "status": "missing"})
    );
    // Reserved ids and bad bodies.
    let (st, v) = s.call("PUT", "/db/_x", Some(json!({})));
    assert_eq!((st, &v["error"]), (400, &json!("bad_request")));
    let (st, v) = s.call("PUT", "/db/b", Some(json!({"_foo": 1})));
    assert_eq!((st, &v["error"]), (400, &json!("doc_validation")));
    assert_eq!(s.call("PUT", "/db/b", Some(json!([1]))).0, 400);
    // POST makes an id.
    let (st, v) = s.call("POST", "/db", Some(json!({"x": 1})));
    assert_eq!(st, 201);
    assert_eq!(v["id"].as_str().unwrap().len(), 32);

    // A replicated branch from the first revision: a conflict, kept.
    let (st, v) = s.call(
        "POST",
        "/db/_bulk_docs",
        Some(json!({"new_edits": false, "docs": [
            {"_id": "a", "_rev": "2-ffff", "_revisions": {"start": 2, "ids": ["ffff", &r1[2..]]}, "v": "other"},
            {"_id": "a", "_rev": "2-ffff", "_revisions": {"start": 2, "ids": ["ffff", &r1[2..]]}, "v": "other"},
        ]})),
    );
    assert_eq!((st, v), (201, json!([])), "only failures are listed");
    let (_, doc) = s.call("GET", "/db/a?conflicts=true", None);
    // Same generation: the higher hash as a string wins ("ffff" > hex digits).
    assert_eq!(doc["_rev"], "2-ffff");
    assert_eq!(doc["_conflicts"], json!([r2]));
    let (st, open) = s.call("GET", "/db/a?open_revs=all", None);
    assert_eq!(st, 200);
    let mut revs: Vec<&str> = open
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ok"]["_rev"].as_str().unwrap())
        .collect();
    revs.sort();
    let mut want = vec!["2-ffff", r2.as_str()];
    want.sort();
    assert_eq!(revs, want);
    let (_, open) = s.call(
        "GET",
        &format!("/db/a?open_revs=%5B%22{r1}%22,%229-nope%22%5D&latest=true"),
        None,
    );
    assert_eq!(
        open.as_array().unwrap().len(),
        3,
        "two leaves from r1, one missing"
    );
    assert_eq!(open[2], json!({"missing": "9-nope"}));
    // revs_diff and bulk_get, as a replicator asks.
    let (st, diff) = s.call(
        "POST",
        "/db/_revs_diff",
        Some(json!({"a": ["2-ffff", "3-abc"], "zz": ["1-a"]})),
    );
    assert_eq!(st, 200);
    assert_eq!(diff["a"]["missing"], json!(["3-abc"]));
    assert_eq!(diff["zz"], json!({"missing": ["1-a"]}));
    let (st, got) = s.call(
        "POST",
        "/db/_bulk_get?revs=true&latest=true",
        Some(json!({"docs": [{"id": "a", "rev": r1}, {"id": "nope"}]})),
    );
    assert_eq!(st, 200);
    assert_eq!(got["results"][0]["docs"].as_array().unwrap().len(), 2);
    assert_eq!(got["results"][0]["docs"][0]["ok"]["_revisions"]["start"], 2);
    assert_eq!(
        got["results"][1]["docs"][0]["error"],
        json!({"id": "nope", "rev": "undefined", "error": "not_found", "reason": "missing"})
    );
    // Deleting the winner: the conflict wins, the document is still live.
    let (st, v) = s.call("DELETE", "/db/a?rev=2-ffff", None);
    assert_eq!(st, 200);
    assert!(v["rev"].as_str().unwrap().starts_with("3-"));
    let (_, doc) = s.call("GET", "/db/a?conflicts=true&deleted_conflicts=true", None);
    assert_eq!(doc["_rev"], r2.as_str());
    assert_eq!(doc.get("_conflicts"), None);
    assert_eq!(doc["_deleted_conflicts"], json!([v["rev"]]));
    assert_eq!(s.call("DELETE", "/db/a", None), conflict, "no rev");
    let (st, _) = s.call("DELETE", &format!("/db/a?rev={r2}"), None);
    assert_eq!(st, 200);
    assert_eq!(
        s.call("GET", "/db/a", None),
        error(404, "not_found", "deleted")
    );
    assert_eq!(
        s.call("GET", "/db/zz", None),
        error(404, "not_found", "missing")
    );
    let info = s.call("GET", "/db", None).1;
    assert_eq!(
        (info["doc_count"].clone(), info["doc_del_count"].clone()),
        (json!(1), json!(1))
    );
    // Design documents are stored like any other.
    let (st, v) = s.call("PUT", "/db/_design/app", Some(json!({"views": {}})));
    assert_eq!((st, &v["id"]), (201, &json!("_design/app")));
    assert_eq!(s.call("GET", "/db/_design/app", None).1["views"], json!({}));
}

#[test]
fn attachments_are_inline_or_raw_with_ranges_and_revs_limit_is_kept() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    s.call("PUT", "/db", None);
    let data = b"0123456789abcdef";
    let (st, v) = s.call(
        "PUT",
        "/db/f",
        Some(json!({"_attachments": {"a.txt": {"content_type": "text/plain", "data": base64_encode(data)}}})),
    );
    assert_eq!(st, 201);
    let rev = v["rev"].as_str().unwrap().to_owned();
    let (_, doc) = s.call("GET", "/db/f", None);
    assert_eq!(
        doc["_attachments"],
        json!({"a.txt": {"content_type": "text/plain", "digest": "md5-QDKvjWEDUSOQbljgZxQMxQ==",
                "length": 16, "revpos": 1, "stub": true}})
    );
    let (_, doc) = s.call("GET", "/db/f?attachments=true", None);
    assert_eq!(doc["_attachments"]["a.txt"]["data"], base64_encode(data));
    // An edit with the stub keeps it, at its first revpos.
    let (st, _) = s.call(
        "PUT",
        "/db/f",
        Some(json!({"_rev": rev, "x": 1, "_attachments": {"a.txt": {"stub": true}}})),
    );
    assert_eq!(st, 201);
    let (_, doc) = s.call("GET", "/db/f", None);
    assert_eq!(doc["_attachments"]["a.txt"]["revpos"], 1);
    let (st, v) = s.call(
        "PUT",
        &format!("/db/f?rev={}", doc["_rev"].as_str().unwrap()),
        Some(json!({"_attachments": {"b": {"stub": true}}})),
    );
    assert_eq!((st, &v["error"]), (412, &json!("missing_stub")));
    let r = s.raw("GET", "/db/f/a.txt", &[], b"");
    assert_eq!((r.status, r.body.as_slice()), (200, &data[..]));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    let r = s.raw("GET", "/db/f/a.txt", &[("Range", "bytes=4-7")], b"");
    assert_eq!((r.status, r.body.as_slice()), (206, &b"4567"[..]));
    assert_eq!(r.header("content-range"), Some("bytes 4-7/16"));
    assert_eq!(
        s.raw("GET", "/db/f/a.txt", &[("Range", "bytes=99-")], b"")
            .status,
        416
    );
    assert_eq!(s.call("GET", "/db/f/nope", None).0, 404);
    // _revs_limit: default 1000; stemming keeps the newest history.
    assert_eq!(s.call("GET", "/db/_revs_limit", None), (200, json!(1000)));
    assert_eq!(
        s.call("PUT", "/db/_revs_limit", Some(json!(3))),
        (200, json!({"ok": true}))
    );
    assert_eq!(s.call("PUT", "/db/_revs_limit", Some(json!("x"))).0, 400);
    let mut rev = s.call("PUT", "/db/s", Some(json!({}))).1["rev"].clone();
    for _ in 0..5 {
        rev = s.call("PUT", "/db/s", Some(json!({"_rev": rev}))).1["rev"].clone();
    }
    let (_, doc) = s.call("GET", "/db/s?revs=true", None);
    assert_eq!(doc["_revisions"]["start"], 6);
    assert_eq!(doc["_revisions"]["ids"].as_array().unwrap().len(), 3);
}

#[test]
fn changes_all_docs_and_local_docs() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    s.call("PUT", "/db", None);
    for id in ["c", "a", "b", "d"] {
        assert_eq!(
            s.call("PUT", &format!("/db/{id}"), Some(json!({"id": id})))
                .0,
            201
        );
    }
    let rev_b = s.call("GET", "/db/b", None).1["_rev"].clone();
    s.call(
        "DELETE",
        &format!("/db/b?rev={}", rev_b.as_str().unwrap()),
        None,
    );
    // _local documents: no history, never in _changes or _all_docs.
    assert_eq!(
        s.call("PUT", "/db/_local/cp", Some(json!({"seq": 1}))),
        (201, json!({"ok": true, "id": "_local/cp", "rev": "0-1"}))
    );
    assert_eq!(
        s.call(
            "PUT",
            "/db/_local/cp",
            Some(json!({"_rev": "0-1", "seq": 2}))
        )
        .1["rev"],
        "0-2"
    );
    assert_eq!(
        s.call("PUT", "/db/_local/cp", Some(json!({"seq": 3}))).0,
        409
    );
    assert_eq!(
        s.call("GET", "/db/_local/cp", None),
        (200, json!({"_id": "_local/cp", "_rev": "0-2", "seq": 2}))
    );

    let ids = |v: &Value| -> Vec<String> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (st, ch) = s.call("GET", "/db/_changes", None);
    assert_eq!(st, 200);
    assert_eq!(
        ids(&ch),
        ["c", "a", "d", "b"],
        "one row per document, at its last change"
    );
    assert_eq!(ch["last_seq"], 5);
    assert_eq!(ch["results"][3]["deleted"], true);
    assert_eq!(ch["results"][3]["seq"], 5);
    let (_, ch) = s.call(
        "GET",
        "/db/_changes?since=2&limit=1&include_docs=true",
        None,
    );
    assert_eq!(ids(&ch), ["d"]);
    assert_eq!(ch["results"][0]["doc"]["id"], "d");
    assert_eq!(
        (ch["last_seq"].clone(), ch["pending"].clone()),
        (json!(4), json!(1))
    );
    let (_, ch) = s.call("GET", "/db/_changes?descending=true&limit=2", None);
    assert_eq!(ids(&ch), ["b", "d"]);
    let (_, ch) = s.call(
        "POST",
        "/db/_changes?filter=_doc_ids",
        Some(json!({"doc_ids": ["a", "zz"]})),
    );
    assert_eq!(ids(&ch), ["a"]);
    assert_eq!(ch["last_seq"], 5);
    assert_eq!(s.call("GET", "/db/_changes?filter=app/f", None).0, 400);

    let keys = |v: &Value| -> Vec<String> {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let (st, all) = s.call("GET", "/db/_all_docs", None);
    assert_eq!(st, 200);
    assert_eq!(keys(&all), ["a", "c", "d"]);
    assert_eq!(
        (all["total_rows"].clone(), all["offset"].clone()),
        (json!(3), json!(0))
    );
    let (_, all) = s.call(
        "GET",
        "/db/_all_docs?startkey=%22b%22&endkey=%22d%22&include_docs=true",
        None,
    );
    assert_eq!(keys(&all), ["c", "d"]);
    assert_eq!(all["rows"][0]["doc"]["id"], "c");
    let (_, all) = s.call("GET", "/db/_all_docs?descending=true&skip=1&limit=1", None);
    assert_eq!(keys(&all), ["c"]);
    let (_, all) = s.call(
        "POST",
        "/db/_all_docs",
        Some(json!({"keys": ["d", "b", "zz"]})),
    );
    assert_eq!(all["rows"][0]["id"], "d");
    assert_eq!(all["rows"][1]["value"]["deleted"], true);
    assert_eq!(all["rows"][1]["doc"], Value::Null);
    assert_eq!(all["rows"][2], json!({"key": "zz", "error": "not_found"}));

    // Longpoll: answers at once when there are changes after `since`,
    // otherwise waits for the next one.
    let (_, ch) = s.call("GET", "/db/_changes?feed=longpoll&since=4", None);
    assert_eq!(ids(&ch), ["b"]);
    let addr = s.addr;
    let auth = format!("Bearer {}", s.token);
    let started = Instant::now();
    let waiter = std::thread::spawn(move || {
        request(
            addr,
            "GET",
            "/db/_changes?feed=longpoll&since=5&timeout=20000&heartbeat=200",
            &[("Authorization", &auth)],
            Body::None,
        )
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(500));
    s.call("PUT", "/db/late", Some(json!({})));
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200);
    let ch: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(ids(&ch), ["late"]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "woken by the change"
    );
    // Continuous: rows, one a line, then last_seq at the timeout.
    let r = s.raw(
        "GET",
        "/db/_changes?feed=continuous&since=4&timeout=300",
        &[],
        b"",
    );
    let lines: Vec<Value> = r
        .text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", r.text());
    assert_eq!(lines[0]["id"], "b");
    assert_eq!(lines[1]["id"], "late");
    assert_eq!(lines[2], json!({"last_seq": 6}));
}

#[test]
fn cors_allows_only_the_web_ui_origin() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let pre = |origin: &str| {
        request(
            s.addr,
            "OPTIONS",
            "/db/_changes",
            &[("Origin", origin), ("Access-Control-Request-Method", "GET")],
            Body::None,
        )
        .unwrap()
    };
    // Host is "cloudlet" in the test client: the UI is http(s)://cloudlet:8080.
    let ok = pre("http://cloudlet:8080");
    assert_eq!(ok.status, 204);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("http://cloudlet:8080")
    );
    assert!(ok
        .header("access-control-allow-headers")
        .unwrap()
        .contains("Authorization"));
    assert_eq!(
        pre("https://cloudlet:8080").header("access-control-allow-origin"),
        Some("https://cloudlet:8080")
    );
    let other = pre("http://evil.example");
    assert_eq!(other.status, 204);
    assert_eq!(other.header("access-control-allow-origin"), None);
    // On answers too, with the credential still needed.
    let r = s.raw("GET", "/", &[("Origin", "http://cloudlet:8080")], b"");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://cloudlet:8080")
    );
    let r = request(
        s.addr,
        "GET",
        "/",
        &[("Origin", "http://cloudlet:8080")],
        Body::None,
    )
    .unwrap();
    assert_eq!(r.status, 401);
}

/// The directory of the Node tests, with its packages installed.
fn node_tests() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sync/tests-node");
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is not installed: scripts/setup installs it (Debian package nodejs)"
    );
    assert!(
        dir.join("node_modules/pouchdb-core").is_dir()
            && dir.join("node_modules/pouchdb-adapter-memory").is_dir(),
        "PouchDB is not installed for the Node tests: run `npm ci --ignore-scripts --prefix services/sync/tests-node` (scripts/setup does)"
    );
    dir
}

#[test]
fn pouchdb_replicates_both_ways_live_and_with_conflicts() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    pouchdb_passes(&format!("http://pouch:{}@{}", s.token, s.addr), &[]);
}

#[test]
fn pouchdb_replicates_over_tls_trusting_only_the_box_identity() {
    let d = tempfile::tempdir().unwrap();
    let s = common::spawn_with("sync", d.path(), &[], None, true);
    // Node trusts the box's identity certificate as an extra CA: its TLS
    // checks our chain and the address the certificate names.
    let der = std::fs::read(d.path().join("sharing/identity.crt")).unwrap();
    let ca = d.path().join("box-ca.pem");
    std::fs::write(&ca, cloudlet_runtime::tls::pem("CERTIFICATE", &der)).unwrap();
    pouchdb_passes(
        &format!("https://pouch:{}@{}", s.token, s.addr),
        &[("NODE_EXTRA_CA_CERTS", ca.to_str().unwrap())],
    );
    let mut child = s.child;
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs PouchDB's checks (services/sync/tests-node/replicate.js) against
/// the sync service at `url`, with `env`.
fn pouchdb_passes(url: &str, env: &[(&str, &str)]) {
    let dir = node_tests();
    let out = Command::new("node")
        .arg("replicate.js")
        .current_dir(&dir)
        .env("SYNC_URL", url)
        .envs(env.iter().copied())
        .env(
            "SYNC_BENCH_DOCS",
            std::env::var("SYNC_BENCH_DOCS").unwrap_or_default(),
        )
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("all passed"),
        "PouchDB's checks failed:\n{stdout}\n{stderr}"
    );
}

/// Ids of a `_find` answer's docs.
fn ids(v: &Value) -> Vec<String> {
    v["docs"]
        .as_array()
        .unwrap_or_else(|| panic!("no docs in {v}"))
        .iter()
        .map(|d| d["_id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn mango_find_matches_sorts_on_indexes_pages_with_bookmarks_and_explains() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    s.call("PUT", "/db", None);
    let docs: Vec<Value> = (0..30)
        .map(|i| {
            json!({"_id": format!("d{i:02}"), "n": i, "kind": if i % 3 == 0 { "a" } else { "b" },
                   "name": format!("x{i}"), "tags": [format!("t{i}")], "nested": {"half": i / 2}})
        })
        .collect();
    assert_eq!(
        s.call("POST", "/db/_bulk_docs", Some(json!({ "docs": docs })))
            .0,
        201
    );
    // A design document and a deleted document are never results.
    s.call(
        "PUT",
        "/db/_design/js",
        Some(json!({"kind": "a", "views": {}})),
    );
    let gone = s.call("PUT", "/db/gone", Some(json!({"kind": "a"}))).1;
    s.call(
        "DELETE",
        &format!("/db/gone?rev={}", gone["rev"].as_str().unwrap()),
        None,
    );

    let (st, v) = s.call(
        "POST",
        "/db/_find",
        Some(json!({"selector": {"kind": "a"}})),
    );
    assert_eq!(st, 200);
    let every_third: Vec<String> = (0..30).step_by(3).map(|i| format!("d{i:02}")).collect();
    assert_eq!(ids(&v), every_third);
    assert!(v["warning"].as_str().unwrap().contains("No matching index"));
    // Operators, nested fields and fields.
    let (_, v) = s.call(
        "POST",
        "/db/_find",
        Some(json!({"selector": {"$or": [{"name": {"$regex": "^x2[89]$"}}, {"tags": {"$elemMatch": {"$eq": "t5"}}}],
                                 "nested.half": {"$gte": 2}},
                    "fields": ["_id", "n"]})),
    );
    assert_eq!(
        v["docs"],
        json!([{"_id": "d05", "n": 5}, {"_id": "d28", "n": 28}, {"_id": "d29", "n": 29}])
    );
    // Pages of 4 by bookmark: every match once, in order.
    let mut seen = Vec::new();
    let mut bookmark = json!(null);
    loop {
        let (st, v) = s.call(
            "POST",
            "/db/_find",
            Some(json!({"selector": {"kind": "a"}, "limit": 4, "bookmark": bookmark})),
        );
        assert_eq!(st, 200);
        let page = ids(&v);
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 4);
        seen.extend(page);
        bookmark = v["bookmark"].clone();
    }
    assert_eq!(seen, every_third);
    // A sort needs an index on its fields.
    let sorted = json!({"selector": {"n": {"$gte": 10}}, "sort": [{"n": "desc"}], "limit": 5,
                        "execution_stats": true});
    assert_eq!(
        s.call("POST", "/db/_find", Some(sorted.clone())),
        error(
            400,
            "no_usable_index",
            "No index exists for this sort, try indexing by the sort fields."
        )
    );
    let idx = json!({"index": {"fields": ["n"]}, "name": "by-n", "ddoc": "idx", "type": "json"});
    assert_eq!(
        s.call("POST", "/db/_index", Some(idx.clone())),
        (
            200,
            json!({"result": "created", "id": "_design/idx", "name": "by-n"})
        )
    );
    assert_eq!(
        s.call("POST", "/db/_index", Some(idx)).1["result"],
        "exists"
    );
    let (_, list) = s.call("GET", "/db/_index", None);
    assert_eq!(list["total_rows"], 2);
    assert_eq!(list["indexes"][0]["name"], "_all_docs");
    assert_eq!(
        list["indexes"][1],
        json!({"ddoc": "_design/idx", "name": "by-n", "type": "json", "partitioned": false,
               "def": {"fields": [{"n": "asc"}]}})
    );
    // The index is a design document like CouchDB's, replicated as any other.
    let (st, ddoc) = s.call("GET", "/db/_design/idx", None);
    assert_eq!((st, &ddoc["language"]), (200, &json!("query")));
    let (st, v) = s.call("POST", "/db/_find", Some(sorted.clone()));
    assert_eq!(st, 200);
    assert_eq!(ids(&v), ["d29", "d28", "d27", "d26", "d25"]);
    assert_eq!(v["execution_stats"]["total_docs_examined"], 30);
    assert_eq!(v["execution_stats"]["results_returned"], 5);
    let mut next = sorted.clone();
    next["bookmark"] = v["bookmark"].clone();
    next["skip"] = json!(1);
    assert_eq!(
        ids(&s.call("POST", "/db/_find", Some(next)).1),
        ["d23", "d22", "d21", "d20", "d19"]
    );
    let (st, ex) = s.call("POST", "/db/_explain", Some(sorted));
    assert_eq!((st, &ex["index"]["name"]), (200, &json!("by-n")));
    assert_eq!(ex["limit"], 5);
    // Bad queries are CouchDB's 400s.
    assert_eq!(
        s.call(
            "POST",
            "/db/_find",
            Some(json!({"selector": {"n": {"$foo": 1}}}))
        ),
        error(400, "invalid_operator", "Invalid operator: $foo")
    );
    assert_eq!(
        s.call(
            "POST",
            "/db/_find",
            Some(json!({"selector": {}, "sort": ["n", {"kind": "desc"}]}))
        )
        .1["error"],
        "unsupported_mixed_sort"
    );
    assert_eq!(
        s.call("POST", "/db/_find", Some(json!({"limit": 1}))).0,
        400
    );
    assert_eq!(
        s.call(
            "POST",
            "/db/_find",
            Some(json!({"selector": {}, "bookmark": "!!"}))
        )
        .1["error"],
        "invalid_bookmark"
    );
    assert_eq!(
        s.call("POST", "/nodb/_find", Some(json!({"selector": {}})))
            .0,
        404
    );
    // Deleting the last index of a design document deletes it.
    assert_eq!(
        s.call("DELETE", "/db/_index/idx/json/by-n", None),
        (200, json!({"ok": true}))
    );
    assert_eq!(s.call("GET", "/db/_index", None).1["total_rows"], 1);
    assert_eq!(s.call("GET", "/db/_design/idx", None).0, 404);
    assert_eq!(
        s.call("DELETE", "/db/_index/_design/idx/json/by-n", None),
        error(404, "not_found", "Index not found")
    );
}

#[test]
fn changes_filter_by_selector_and_design_and_stream_as_eventsource() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    s.call("PUT", "/db", None);
    for (id, kind) in [("a", "x"), ("b", "y"), ("c", "x")] {
        s.call("PUT", &format!("/db/{id}"), Some(json!({"kind": kind})));
    }
    s.call(
        "PUT",
        "/db/_design/app",
        Some(json!({"filters": {"f": "function(){}"}})),
    );
    let row_ids = |v: &Value| -> Vec<String> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (st, v) = s.call(
        "POST",
        "/db/_changes?filter=_selector",
        Some(json!({"selector": {"kind": "x"}})),
    );
    assert_eq!((st, row_ids(&v)), (200, vec!["a".into(), "c".into()]));
    assert_eq!(
        row_ids(&s.call("GET", "/db/_changes?filter=_design", None).1),
        ["_design/app"]
    );
    let (st, v) = s.call("GET", "/db/_changes?filter=app/f", None);
    assert_eq!((st, &v["error"]), (400, &json!("bad_request")));
    assert!(v["reason"].as_str().unwrap().contains("JavaScript"));
    assert_eq!(
        s.call("POST", "/db/_changes?filter=_selector", Some(json!({})))
            .0,
        400
    );
    // Server-sent events: one event per change, its sequence as the id.
    let r = s.raw("GET", "/db/_changes?feed=eventsource&timeout=200", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let text = r.text();
    let events: Vec<(Value, u64)> = text
        .split("\n\n")
        .filter(|e| e.starts_with("data: "))
        .map(|e| {
            let (data, id) = e.split_once("\nid: ").unwrap();
            (
                serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap(),
                id.parse().unwrap(),
            )
        })
        .collect();
    let got: Vec<(String, u64)> = events
        .iter()
        .map(|(v, id)| (v["id"].as_str().unwrap().to_owned(), *id))
        .collect();
    assert_eq!(
        got,
        [
            ("a".to_owned(), 1),
            ("b".to_owned(), 2),
            ("c".to_owned(), 3),
            ("_design/app".to_owned(), 4)
        ]
    );
    assert!(events.iter().all(|(v, id)| v["seq"] == json!(id)));
    // A reconnecting EventSource sends the last id it saw.
    let r = s.raw(
        "GET",
        "/db/_changes?feed=eventsource&timeout=200",
        &[("Last-Event-ID", "3")],
        b"",
    );
    assert_eq!(r.text().matches("data: ").count(), 1);
    assert!(r.text().contains("\"_design/app\""));
}

#[test]
fn attachments_are_put_and_deleted_on_their_own_routes() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    s.call("PUT", "/db", None);
    let png = [0x89u8, b'P', b'N', b'G', 0, 1, 2, 255];
    // No rev and no document: the document is made.
    let r = s.raw(
        "PUT",
        "/db/pic/a.png",
        &[("Content-Type", "image/png")],
        &png,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let rev1 = v["rev"].as_str().unwrap().to_owned();
    assert!(rev1.starts_with("1-"));
    let r = s.raw("GET", "/db/pic/a.png", &[], b"");
    assert_eq!((r.status, r.body.as_slice()), (200, &png[..]));
    assert_eq!(r.header("content-type"), Some("image/png"));
    // Without the rev on an existing document: conflict.
    assert_eq!(s.raw("PUT", "/db/pic/b.txt", &[], b"x").status, 409);
    let r = s.raw(
        "PUT",
        &format!("/db/pic/dir%2Fb.txt?rev={rev1}"),
        &[("Content-Type", "text/plain")],
        b"hello",
    );
    assert_eq!(r.status, 201);
    let rev2 = serde_json::from_slice::<Value>(&r.body).unwrap()["rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, doc) = s.call("GET", "/db/pic", None);
    assert_eq!(doc["_attachments"]["a.png"]["revpos"], 1);
    assert_eq!(doc["_attachments"]["dir/b.txt"]["revpos"], 2);
    assert_eq!(doc["_attachments"]["dir/b.txt"]["length"], 5);
    // atts_since: only what changed after the client's revision has data.
    let (_, doc) = s.call(
        "GET",
        &format!("/db/pic?atts_since=%5B%22{rev1}%22%5D"),
        None,
    );
    assert_eq!(doc["_attachments"]["a.png"]["stub"], true, "{doc}");
    assert_eq!(
        doc["_attachments"]["dir/b.txt"]["data"],
        base64_encode(b"hello")
    );
    // Delete: needs the current rev; then the attachment is gone.
    assert_eq!(s.call("DELETE", "/db/pic/a.png", None).0, 409);
    assert_eq!(
        s.call("DELETE", &format!("/db/pic/a.png?rev={rev1}"), None)
            .0,
        409
    );
    let (st, v) = s.call("DELETE", &format!("/db/pic/a.png?rev={rev2}"), None);
    assert_eq!((st, &v["ok"]), (200, &json!(true)));
    assert_eq!(s.call("GET", "/db/pic/a.png", None).0, 404);
    let rev3 = v["rev"].as_str().unwrap();
    assert_eq!(
        s.call("DELETE", &format!("/db/pic/a.png?rev={rev3}"), None),
        error(404, "not_found", "Document is missing attachment")
    );
    assert_eq!(s.raw("GET", "/db/pic/dir%2Fb.txt", &[], b"").body, b"hello");
    // Design documents take attachments the same way.
    assert_eq!(
        s.raw(
            "PUT",
            "/db/_design/ui/index.html",
            &[("Content-Type", "text/html")],
            b"<p>"
        )
        .status,
        201
    );
    assert_eq!(
        s.raw("GET", "/db/_design/ui/index.html", &[], b"").body,
        b"<p>"
    );
}

/// A request with only the given headers (no bearer token).
fn bare(s: &Server, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let body = if body.is_empty() {
        Body::None
    } else {
        Body::Bytes(body)
    };
    request(s.addr, method, path, headers, body).unwrap()
}

#[test]
fn session_cookies_log_in_with_the_token_count_only_same_site_and_log_out() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    let json_ct = ("Content-Type", "application/json");
    let wrong = bare(
        &s,
        "POST",
        "/_session",
        &[json_ct],
        br#"{"name":"a","password":"nope"}"#,
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(
        serde_json::from_slice::<Value>(&wrong.body).unwrap()["error"],
        "unauthorized"
    );
    let form = format!("name=alice&password={}", s.token);
    let r = bare(
        &s,
        "POST",
        "/_session",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap(),
        json!({"ok": true, "name": "alice", "roles": ["_admin"]})
    );
    let set = r.header("set-cookie").unwrap().to_owned();
    assert!(set.starts_with("AuthSession="), "{set}");
    for part in ["; HttpOnly", "; SameSite=Strict", "; Path=/"] {
        assert!(set.contains(part), "{set} has {part}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let cookie = set.split(';').next().unwrap().to_owned();
    // The cookie is the credential now, on reading requests...
    let r = bare(&s, "GET", "/_session", &[("Cookie", &cookie)], b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&r.body).unwrap()["userCtx"]["name"],
        "alice"
    );
    // ...and on changes from the box's own https pages, never from others.
    let own = [
        ("Cookie", cookie.as_str()),
        ("Origin", "https://cloudlet:8080"),
    ];
    assert_eq!(bare(&s, "PUT", "/cookiedb", &own, b"").status, 201);
    for origin in ["https://evil.example", "http://cloudlet:8080"] {
        let r = bare(
            &s,
            "PUT",
            "/other",
            &[("Cookie", &cookie), ("Origin", origin)],
            b"",
        );
        assert_eq!(r.status, 403, "{origin}");
    }
    assert_eq!(
        bare(&s, "PUT", "/other", &[("Cookie", &cookie)], b"").status,
        403
    );
    assert_eq!(
        bare(
            &s,
            "GET",
            "/_all_dbs",
            &[("Cookie", "AuthSession=made.up")],
            b""
        )
        .status,
        401
    );
    // A JSON login works the same way.
    let body = json!({"name": "bob", "password": s.token}).to_string();
    assert_eq!(
        bare(&s, "POST", "/_session", &[json_ct], body.as_bytes()).status,
        200
    );
    // Logging out ends the session on the server, not only in the browser.
    let r = bare(&s, "DELETE", "/_session", &[("Cookie", &cookie)], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert_eq!(
        bare(&s, "GET", "/_all_dbs", &[("Cookie", &cookie)], b"").status,
        401
    );
}

#[test]
fn owner_added_cors_origins_are_checked_kept_and_applied() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Server::start(d.path());
    assert_eq!(
        s.call("GET", "/_cloudlet/cors", None),
        (200, json!({"origins": []}))
    );
    for bad in [
        "ftp://x.example",
        "https://app.example/path",
        "*",
        "https://",
    ] {
        let (st, v) = s.call("PUT", "/_cloudlet/cors", Some(json!({"origins": [bad]})));
        assert_eq!((st, &v["error"]), (400, &json!("bad_request")), "{bad}");
    }
    let (st, _) = s.call(
        "PUT",
        "/_cloudlet/cors",
        Some(json!({"origins": ["https://App.example", "http://127.0.0.1:5173"]})),
    );
    assert_eq!(st, 200);
    let pre = |s: &Server, origin: &str| {
        bare(
            s,
            "OPTIONS",
            "/db/_changes",
            &[("Origin", origin), ("Access-Control-Request-Method", "GET")],
            b"",
        )
        .header("access-control-allow-origin")
        .map(str::to_owned)
    };
    assert_eq!(
        pre(&s, "http://127.0.0.1:5173").as_deref(),
        Some("http://127.0.0.1:5173")
    );
    assert_eq!(
        pre(&s, "https://app.example").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(pre(&s, "https://other.example"), None);
    assert_eq!(
        pre(&s, "http://cloudlet:8080").as_deref(),
        Some("http://cloudlet:8080")
    );
    // Only the owner changes the list; other devices may read it.
    let out = s
        ._registry
        .owner(&["add-device", "phone", "device"])
        .unwrap();
    let phone = out
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .unwrap()
        .to_owned();
    let auth = format!("Bearer {phone}");
    let r = bare(
        &s,
        "PUT",
        "/_cloudlet/cors",
        &[("Authorization", &auth)],
        br#"{"origins":[]}"#,
    );
    assert_eq!(r.status, 403);
    assert_eq!(
        bare(
            &s,
            "GET",
            "/_cloudlet/cors",
            &[("Authorization", &auth)],
            b""
        )
        .status,
        200
    );
    // Kept across a restart.
    s.kill();
    let s = Server::start(d.path());
    assert_eq!(
        s.call("GET", "/_cloudlet/cors", None),
        (
            200,
            json!({"origins": ["https://app.example", "http://127.0.0.1:5173"]})
        )
    );
    assert_eq!(
        pre(&s, "http://127.0.0.1:5173").as_deref(),
        Some("http://127.0.0.1:5173")
    );
}

#[test]
fn compaction_stems_every_document_to_the_revs_limit_and_keeps_every_leaf() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path());
    s.call("PUT", "/db", None);
    let mut rev = s.call("PUT", "/db/doc", Some(json!({"v": 0}))).1["rev"].clone();
    for i in 1..10 {
        rev = s
            .call("PUT", "/db/doc", Some(json!({"_rev": rev, "v": i})))
            .1["rev"]
            .clone();
    }
    // A conflicting branch from generation 3.
    let (_, full) = s.call("GET", "/db/doc?revs=true", None);
    let ids: Vec<Value> = full["_revisions"]["ids"].as_array().unwrap().clone();
    let branch: Vec<Value> = std::iter::once(json!("other"))
        .chain(ids[7..].iter().cloned())
        .collect();
    let (st, _) = s.call(
        "POST",
        "/db/_bulk_docs",
        Some(json!({"new_edits": false, "docs": [
            {"_id": "doc", "_rev": "4-other", "_revisions": {"start": 4, "ids": branch}, "v": "b"}]})),
    );
    assert_eq!(st, 201);
    assert_eq!(
        s.call("GET", "/db/doc?revs=true", None).1["_revisions"]["ids"]
            .as_array()
            .unwrap()
            .len(),
        10
    );
    s.call("PUT", "/db/_revs_limit", Some(json!(2)));
    assert_eq!(
        s.call("POST", "/db/_compact", None),
        (202, json!({"ok": true}))
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.call("GET", "/db", None).1["compact_running"] == json!(true) {
        assert!(Instant::now() < deadline, "compaction did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, doc) = s.call("GET", "/db/doc?revs=true&conflicts=true", None);
    assert_eq!(doc["_rev"], rev);
    assert_eq!(doc["_revisions"]["ids"].as_array().unwrap().len(), 2);
    assert_eq!(doc["_conflicts"], json!(["4-other"]));
    let (_, other) = s.call("GET", "/db/doc?rev=4-other&revs=true", None);
    assert_eq!(other["v"], "b");
    assert_eq!(other["_revisions"]["ids"].as_array().unwrap().len(), 2);
    assert_eq!(s.call("POST", "/nodb/_compact", None).0, 404);
}

#[test]
fn session_cookies_are_secure_over_tls() {
    let d = tempfile::tempdir().unwrap();
    let s = common::spawn_with("sync", d.path(), &[], None, true);
    let der = std::fs::read(d.path().join("sharing/identity.crt")).unwrap();
    let (config, name) =
        common::pinning_client(&rustls::pki_types::CertificateDer::from(der), false);
    let body = json!({"name": "tls", "password": s.token}).to_string();
    let r = cloudlet_testkit::http::request_tls(
        s.addr,
        &config,
        &name,
        "POST",
        "/_session",
        &[("Content-Type", "application/json")],
        Body::Bytes(body.as_bytes()),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let set = r.header("set-cookie").unwrap();
    assert!(set.ends_with("; Secure"), "{set}");
    let mut child = s.child;
    let _ = child.kill();
    let _ = child.wait();
}
