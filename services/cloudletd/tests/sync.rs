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
        (200, json!(["a/b", "db"]))
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
