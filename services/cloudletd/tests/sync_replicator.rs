//! The box's own replicator, as a box owner uses it: real `cloudletd sync`
//! processes on loopback replicating with each other, with PouchDB's
//! checkpoints and with `pouchdb-server` (npm, in memory), configured by
//! `_replicator` documents and watched through `_scheduler/docs`. Includes
//! restarts, a peer that goes away, conflicts on both sides and 20 rounds
//! of kill -9 during a replication.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_sync::replicator::BATCH;
use cloudlet_testkit::http::{request, Body};
use serde_json::{json, Value};

/// How long any one condition may take to come true (slow machines too).
const PATIENCE: Duration = Duration::from_secs(120);

/// One `cloudletd sync` with its state in `data`, on a port kept across
/// restarts (peers keep its URL).
struct Node {
    child: Option<Child>,
    addr: SocketAddr,
    data: PathBuf,
    token: String,
    registry: Arc<common::Registry>,
}

impl Node {
    fn start(data: &Path) -> Node {
        let registry = common::registry(data);
        let mut n = Node {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            data: data.to_owned(),
            token: registry.token.clone(),
            registry,
        };
        n.launch();
        n
    }

    fn launch(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .args(["sync", "--listen", &self.addr.to_string(), "--plain"])
            .env("CLOUDLET_DATA", &self.data)
            .env("CLOUDLET_REGISTRY_SOCKET", &self.registry.socket)
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cloudletd sync");
        let (addr, _log) = common::follow(&mut child);
        self.addr = addr;
        self.child = Some(child);
    }

    /// SIGKILL: no chance to finish anything.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// This node's database `db` as a peer URL with its credential.
    fn url(&self, db: &str) -> String {
        format!("http://peer:{}@{}/{db}", self.token, self.addr)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let auth = format!("Bearer {}", self.token);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let r = request(
            self.addr,
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            if bytes.is_empty() {
                Body::None
            } else {
                Body::Bytes(bytes.as_bytes())
            },
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        };
        (r.status, v)
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    /// Adds (or replaces) a `_replicator` document.
    fn configure(&self, id: &str, doc: Value) {
        let path = format!("/_replicator/{id}");
        let (status, old) = self.call("GET", &path, None);
        let mut doc = doc;
        if status == 200 {
            doc["_rev"] = old["_rev"].clone();
        }
        self.ok("PUT", &path, Some(doc));
    }

    /// The job of a `_replicator` document once `done` holds for it.
    fn job_when(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, || {
            let (status, v) = self.call("GET", &format!("/_scheduler/docs/_replicator/{id}"), None);
            (status == 200 && done(&v)).then_some(v)
        })
    }

    fn doc_count(&self, db: &str) -> u64 {
        match self.call("GET", &format!("/{db}"), None) {
            (200, v) => v["doc_count"].as_u64().unwrap(),
            _ => 0,
        }
    }

    fn update_seq(&self, db: &str) -> u64 {
        self.ok("GET", &format!("/{db}"), None)["update_seq"]
            .as_u64()
            .unwrap()
    }

    /// Writes `n` small documents `{prefix}{i}` in one `_bulk_docs`.
    fn write_docs(&self, db: &str, prefix: &str, n: usize) {
        let docs: Vec<Value> = (0..n)
            .map(|i| json!({"_id": format!("{prefix}{i:05}"), "n": i, "text": "small"}))
            .collect();
        self.ok(
            "POST",
            &format!("/{db}/_bulk_docs"),
            Some(json!({"docs": docs})),
        );
    }

    fn wait_count(&self, db: &str, n: u64) {
        wait_for(&format!("{db} to hold {n} documents"), || {
            (self.doc_count(db) == n).then_some(())
        });
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it gives a value; panics after [`PATIENCE`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "waited too long for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn node_tests() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sync/tests-node");
    assert!(
        Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "node is not installed: scripts/setup installs it (Debian package nodejs)"
    );
    assert!(
        dir.join("node_modules/pouchdb-server/bin/pouchdb-server").is_file(),
        "pouchdb-server is not installed: run `npm ci --ignore-scripts --prefix services/sync/tests-node` (scripts/setup does)"
    );
    dir
}

/// `pouchdb-server --in-memory` on a free port, its files in a temporary
/// directory; killed when dropped.
struct PouchServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PouchServer {
    fn start() -> PouchServer {
        let bin = node_tests().join("node_modules/pouchdb-server/bin/pouchdb-server");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("node")
            .arg(bin)
            .args([
                "--in-memory",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting pouchdb-server");
        let s = PouchServer {
            child,
            port,
            _dir: dir,
        };
        wait_for("pouchdb-server to answer", || {
            (s.call("GET", "/", None).0 == 200).then_some(())
        });
        s
    }

    fn url(&self, db: &str) -> String {
        format!("http://127.0.0.1:{}/{db}", self.port)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        match request(
            addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            if bytes.is_empty() {
                Body::None
            } else {
                Body::Bytes(bytes.as_bytes())
            },
        ) {
            Ok(r) => (
                r.status,
                serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            ),
            Err(_) => (0, Value::Null),
        }
    }

    fn doc_count(&self, db: &str) -> u64 {
        self.call("GET", &format!("/{db}"), None).1["doc_count"]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for PouchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_replicator_document_copies_a_database_once_and_continuously_with_checkpoints() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Node::start(da.path()), Node::start(db.path()));
    a.ok("PUT", "/src", None);
    a.write_docs("src", "d", 30);

    // One-shot, creating the target.
    a.configure(
        "once",
        json!({"source": "src", "target": b.url("copy"), "create_target": true}),
    );
    let job = a.job_when("once", "the one-shot job to complete", |j| {
        j["state"] == "completed"
    });
    assert_eq!(b.doc_count("copy"), 30);
    assert_eq!(job["info"]["docs_written"], 30);
    assert_eq!(job["info"]["docs_read"], 30);
    assert_eq!(job["info"]["doc_write_failures"], 0);
    assert_eq!(job["database"], "_replicator");
    assert_eq!(job["source"], "src");
    // The credential in the URL is never shown.
    assert_eq!(job["target"], format!("http://{}/copy", b.addr));
    assert!(!job.to_string().contains(&b.token));
    // Checkpoints on both sides, in PouchDB's shape, under PouchDB's id.
    let rid = job["id"].as_str().unwrap().to_owned();
    let uuid_a = a.ok("GET", "/", None)["uuid"].as_str().unwrap().to_owned();
    let uuid_b = b.ok("GET", "/", None)["uuid"].as_str().unwrap().to_owned();
    assert_eq!(
        rid,
        pouchdb_replication_id(&format!("{uuid_a}src"), &format!("{uuid_b}copy"))
    );
    let on_target = b.ok("GET", &format!("/copy/_local/{rid}"), None);
    let on_source = a.ok("GET", &format!("/src/_local/{rid}"), None);
    for cp in [&on_target, &on_source] {
        assert_eq!(cp["_id"], format!("_local/{rid}"));
        assert_eq!(cp["version"], 1);
        assert_eq!(cp["last_seq"], a.update_seq("src"));
        assert_eq!(cp["history"][0]["session_id"], cp["session_id"]);
        assert_eq!(cp["history"][0]["last_seq"], cp["last_seq"]);
    }
    assert_eq!(on_target["session_id"], on_source["session_id"]);

    // Continuous: what is written later arrives too.
    a.configure(
        "live",
        json!({"source": "src", "target": b.url("live"), "create_target": true, "continuous": true}),
    );
    b.wait_count("live", 30);
    a.ok(
        "PUT",
        "/src/later",
        Some(json!({"v": "written after the start"})),
    );
    wait_for("the later document on the target", || {
        (b.call("GET", "/live/later", None).0 == 200).then_some(())
    });
    let job = a.job_when("live", "the continuous job to count 31 documents", |j| {
        j["info"]["docs_written"] == 31
    });
    assert_eq!(job["state"], "running");
    let tasks = a.ok("GET", "/_active_tasks", None);
    let task = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["doc_id"] == "live")
        .expect("the continuous job is an active task");
    assert_eq!(
        (&task["type"], &task["continuous"]),
        (&json!("replication"), &json!(true))
    );
    assert!(!tasks.to_string().contains(&b.token));
    let all = a.ok("GET", "/_scheduler/docs", None);
    let ids: Vec<&str> = all["docs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["doc_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["live", "once"]);

    // Deleting the document ends the job.
    let rev = a.ok("GET", "/_replicator/live", None)["_rev"]
        .as_str()
        .unwrap()
        .to_owned();
    a.ok("DELETE", &format!("/_replicator/live?rev={rev}"), None);
    wait_for("the deleted job to go", || {
        (a.call("GET", "/_scheduler/docs/_replicator/live", None).0 == 404).then_some(())
    });
    assert_eq!(
        a.call("GET", "/_scheduler/docs/_replicator/live", None),
        (
            404,
            json!({"error": "not_found", "reason": "unknown replication document"})
        )
    );
    // A document that is not a replication is shown as failed, with why.
    a.configure("broken", json!({"source": "src"}));
    let job = a.job_when("broken", "the broken document's job", |j| {
        j["state"] == "failed"
    });
    assert_eq!(job["last_error"], "target must be a database name or a URL");
    // An https URL that is not a paired box cannot be verified (the box
    // carries no public CA): failed, saying how boxes are written.
    a.configure(
        "tls",
        json!({"source": "src", "target": "https://u:p@127.0.0.1:9/x"}),
    );
    let job = a.job_when("tls", "the https job to fail", |j| j["state"] == "failed");
    assert!(
        job["last_error"]
            .as_str()
            .unwrap()
            .contains("https peers are paired boxes, written box:BOXID/db"),
        "{job}"
    );
    assert_eq!(job["target"], "https://127.0.0.1:9/x");
}

/// PouchDB's replication id of two database ids, computed by Node's md5.
fn pouchdb_replication_id(source: &str, target: &str) -> String {
    let out = Command::new("node")
        .args([
            "-e",
            "const h=require('crypto').createHash('md5').update(process.argv[1]+process.argv[2],'binary').digest('base64');\
             console.log(h.replace(/\\//g,'.').replace(/\\+/g,'_'))",
            source,
            target,
        ])
        .output()
        .expect("running node");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn post_replicate_runs_once_and_answers_with_the_history() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Node::start(da.path()), Node::start(db.path()));
    a.ok("PUT", "/src", None);
    a.write_docs("src", "d", 12);
    let (status, v) = a.call(
        "POST",
        "/_replicate",
        Some(json!({"source": "src", "target": b.url("dst"), "create_target": true})),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(
        (&v["docs_read"], &v["docs_written"]),
        (&json!(12), &json!(12))
    );
    assert_eq!(v["history"][0]["recorded_seq"], a.update_seq("src"));
    assert_eq!(b.doc_count("dst"), 12);
    // Between two databases of the same box.
    let (status, v) = a.call(
        "POST",
        "/_replicate",
        Some(json!({"source": "src", "target": "here", "create_target": true})),
    );
    assert_eq!((status, &v["docs_written"]), (200, &json!(12)), "{v}");
    assert_eq!(a.doc_count("here"), 12);
    // Again: nothing new to send.
    let (_, v) = a.call(
        "POST",
        "/_replicate",
        Some(json!({"source": "src", "target": b.url("dst")})),
    );
    assert_eq!(
        (&v["docs_written"], &v["no_changes"]),
        (&json!(0), &json!(true))
    );
    // Continuous: answered at once, shown as an active task, cancelled.
    let live =
        json!({"source": "src", "target": "live", "create_target": true, "continuous": true});
    assert_eq!(a.call("POST", "/_replicate", Some(live.clone())).0, 202);
    a.wait_count("live", 12);
    let tasks = a.ok("GET", "/_active_tasks", None);
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["target"] == "live"),
        "{tasks}"
    );
    let mut cancel = live;
    cancel["cancel"] = json!(true);
    assert_eq!(
        a.call("POST", "/_replicate", Some(cancel.clone())),
        (200, json!({"ok": true}))
    );
    assert_eq!(a.call("POST", "/_replicate", Some(cancel)).0, 404);
    let tasks = a.ok("GET", "/_active_tasks", None);
    assert!(
        !tasks
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["target"] == "live"),
        "{tasks}"
    );
    // Bad input is a CouchDB-shaped error.
    assert_eq!(
        a.call("POST", "/_replicate", Some(json!({"source": "src"}))),
        (
            400,
            json!({"error": "bad_request", "reason": "target must be a database name or a URL"})
        )
    );
    assert_eq!(
        a.call(
            "POST",
            "/_replicate",
            Some(json!({"source": "nodb", "target": "x"}))
        )
        .1["error"],
        "db_not_found"
    );
}

#[test]
fn a_replication_pouchdb_started_resumes_from_its_checkpoint() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Node::start(da.path()), Node::start(db.path()));
    a.ok("PUT", "/src", None);
    a.write_docs("src", "d", 20);
    // Real PouchDB replicates between the two boxes and checkpoints.
    let script = "const P=require('pouchdb-core').plugin(require('pouchdb-adapter-http')).plugin(require('pouchdb-replication'));\
        P.replicate(process.argv[1],process.argv[2],{create_target:true}).then(r=>{console.log(r.docs_written)}).catch(e=>{console.error(e);process.exit(1)})";
    let out = Command::new("node")
        .args(["-e", script, &a.url("src"), &b.url("dst")])
        .current_dir(node_tests())
        .output()
        .expect("running node");
    assert!(
        out.status.success(),
        "PouchDB: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "20");
    a.write_docs("src", "e", 5);
    // The box's replicator between the same databases starts after them.
    a.configure("resume", json!({"source": "src", "target": b.url("dst")}));
    let job = a.job_when("resume", "the job to complete", |j| {
        j["state"] == "completed"
    });
    assert_eq!(b.doc_count("dst"), 25);
    assert_eq!(job["info"]["revisions_checked"], 5, "{job}");
    assert_eq!(job["info"]["docs_written"], 5);
}

#[test]
fn a_restarted_replicator_resumes_from_its_checkpoint() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, b) = (Node::start(da.path()), Node::start(db.path()));
    b.ok("PUT", "/src", None);
    b.write_docs("src", "d", 40);
    a.configure(
        "pull",
        json!({"source": b.url("src"), "target": "dst", "create_target": true, "continuous": true}),
    );
    let seq = b.update_seq("src");
    a.job_when("pull", "the first 40 checkpointed", |j| {
        j["info"]["checkpointed_source_seq"] == seq
    });
    a.kill();
    b.write_docs("src", "e", 7);
    a.restart();
    a.wait_count("dst", 47);
    let job = a.job_when("pull", "the job to count the new documents", |j| {
        j["info"]["docs_written"] == 7
    });
    // Only what came after the checkpoint was read.
    assert_eq!(job["info"]["revisions_checked"], 7, "{job}");
    assert_eq!(job["info"]["docs_read"], 7);
}

#[test]
fn a_peer_that_goes_away_is_retried_and_caught_up_after() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, mut b) = (Node::start(da.path()), Node::start(db.path()));
    a.ok("PUT", "/src", None);
    a.write_docs("src", "d", 10);
    a.configure(
        "push",
        json!({"source": "src", "target": b.url("dst"), "create_target": true, "continuous": true}),
    );
    b.wait_count("dst", 10);
    b.kill();
    a.write_docs("src", "e", 10);
    let job = a.job_when("push", "the job to crash while the peer is away", |j| {
        j["state"] == "crashing"
    });
    assert!(job["error_count"].as_u64().unwrap() >= 1);
    assert!(
        job["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{job}"
    );
    b.launch();
    b.wait_count("dst", 20);
    a.job_when("push", "the job to run again", |j| j["state"] == "running");
}

#[test]
fn conflicts_made_on_both_sides_converge_to_the_same_winner() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Node::start(da.path()), Node::start(db.path()));
    a.ok("PUT", "/c", None);
    b.ok("PUT", "/c", None);
    // The same id made on both sides, and one document edited on both.
    a.ok("PUT", "/c/x", Some(json!({"side": "a"})));
    b.ok("PUT", "/c/x", Some(json!({"side": "b"})));
    let y = a.ok("PUT", "/c/y", Some(json!({"v": 0})));
    a.ok(
        "POST",
        "/_replicate",
        Some(json!({"source": "c", "target": b.url("c")})),
    );
    a.ok("PUT", "/c/y", Some(json!({"_rev": y["rev"], "v": "a"})));
    b.ok(
        "PUT",
        "/c/y",
        Some(json!({"_rev": y["rev"], "v": "b", "more": true})),
    );
    a.configure(
        "push",
        json!({"source": "c", "target": b.url("c"), "continuous": true}),
    );
    a.configure(
        "pull",
        json!({"source": b.url("c"), "target": "c", "continuous": true}),
    );
    for id in ["x", "y"] {
        let path = format!("/c/{id}?conflicts=true");
        let (on_a, on_b) = wait_for(&format!("{id} to converge"), || {
            let (on_a, on_b) = (a.ok("GET", &path, None), b.ok("GET", &path, None));
            (on_a == on_b && on_a["_conflicts"].is_array()).then_some((on_a, on_b))
        });
        assert_eq!(on_a["_rev"], on_b["_rev"]);
        assert_eq!(on_a["_conflicts"].as_array().unwrap().len(), 1, "{on_a}");
    }
}

#[test]
fn pouchdb_server_is_a_peer_both_ways() {
    let da = tempfile::tempdir().unwrap();
    let a = Node::start(da.path());
    let p = PouchServer::start();
    a.ok("PUT", "/src", None);
    a.write_docs("src", "d", 24);
    // One with an attachment (inline base64 both ways).
    a.ok(
        "PUT",
        "/src/with-att",
        Some(json!({"_attachments": {"a.bin": {"content_type": "application/octet-stream", "data": "AAECA/8="}}})),
    );
    // Push to it.
    a.configure(
        "push",
        json!({"source": "src", "target": p.url("pdb"), "create_target": true}),
    );
    let job = a.job_when("push", "the push to complete", |j| {
        j["state"] == "completed"
    });
    assert_eq!(job["info"]["docs_written"], 25, "{job}");
    assert_eq!(p.doc_count("pdb"), 25);
    let there = p.call("GET", "/pdb/with-att?attachments=true", None).1;
    assert_eq!(
        there["_attachments"]["a.bin"]["data"], "AAECA/8=",
        "{there}"
    );
    // Pull from it, continuously: a write made there arrives.
    a.configure(
        "pull",
        json!({"source": p.url("pdb"), "target": "back", "create_target": true, "continuous": true}),
    );
    a.wait_count("back", 25);
    let (status, _) = p.call(
        "PUT",
        "/pdb/from-pouchdb-server",
        Some(json!({"hello": "box"})),
    );
    assert_eq!(status, 201);
    wait_for("the pouchdb-server write on the box", || {
        let (s, v) = a.call("GET", "/back/from-pouchdb-server", None);
        (s == 200).then_some(v)
    });
    assert_eq!(a.doc_count("back"), 26);
    // The attachment made the round trip byte for byte, digest and all.
    let auth = format!("Bearer {}", a.token);
    let raw = request(
        a.addr,
        "GET",
        "/back/with-att/a.bin",
        &[("Authorization", &auth)],
        Body::None,
    )
    .unwrap();
    assert_eq!((raw.status, raw.body), (200, vec![0, 1, 2, 3, 255]));
    let stub = a.ok("GET", "/back/with-att", None)["_attachments"]["a.bin"].clone();
    let orig = a.ok("GET", "/src/with-att", None)["_attachments"]["a.bin"].clone();
    assert_eq!(stub["digest"], orig["digest"]);
}

#[test]
fn kill_9_during_replication_loses_nothing_and_resumes_from_the_checkpoint() {
    const DOCS: u64 = 3000;
    const ROUNDS: usize = 20;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, b) = (Node::start(da.path()), Node::start(db.path()));
    b.ok("PUT", "/src", None);
    for batch in 0..3 {
        b.write_docs("src", &format!("b{batch}-"), (DOCS / 3) as usize);
    }
    assert_eq!(b.update_seq("src"), DOCS);
    // A one-shot pull (it runs again each time the service starts).
    a.ok("PUT", "/dst", None);
    a.configure("pull", json!({"source": b.url("src"), "target": "dst"}));
    let mut acked = (0u64, 0u64); // (doc_count, update_seq) seen on the target
    let mut checkpoint = 0u64; // the source side's checkpoint
    let mut rid = String::new();
    let mut written = 0u64;
    let mut interrupted = 0;
    for round in 0..ROUNDS {
        // Progress since the last round, then no warning at all.
        let before = acked.1;
        let now = wait_for(&format!("round {round}: progress"), || {
            let seq = a.update_seq("dst");
            (seq > before || a.doc_count("dst") == DOCS).then_some(seq)
        });
        let job = a.ok("GET", "/_scheduler/docs/_replicator/pull", None);
        if let Some(id) = job["id"].as_str() {
            rid = id.to_owned();
        }
        // What the job read this run: only the changes after the checkpoint
        // it started from, up to what the target holds and at most one
        // batch in flight (a restart from 0 would read everything before
        // the checkpoint again).
        let count = a.doc_count("dst");
        let checked = job["info"]["revisions_checked"].as_u64().unwrap();
        assert!(
            checked <= (count + BATCH as u64).saturating_sub(checkpoint),
            "round {round}: {checked} revisions checked for {count} documents after the checkpoint at {checkpoint}"
        );
        written += job["info"]["docs_written"].as_u64().unwrap();
        a.kill();
        println!("round {round}: killed with {count} documents on the target, {checked} checked this run");
        interrupted += usize::from(count < DOCS);
        acked = (count, now.max(acked.1));
        // The source's checkpoint (the peer stays up) only moves forward.
        if !rid.is_empty() {
            if let (200, cp) = b.call("GET", &format!("/src/_local/{rid}"), None) {
                let seq = cp["last_seq"].as_u64().unwrap();
                assert!(seq >= checkpoint, "round {round}: checkpoint went back");
                checkpoint = seq;
            }
        }
        a.restart();
        // Nothing the target acknowledged is lost; its sequence only grows.
        assert!(
            a.doc_count("dst") >= acked.0,
            "round {round}: documents lost"
        );
        assert!(
            a.update_seq("dst") >= acked.1,
            "round {round}: sequence went back"
        );
    }
    assert!(
        checkpoint > 0,
        "no checkpoint was written in {ROUNDS} rounds"
    );
    assert!(
        interrupted >= ROUNDS / 2,
        "only {interrupted} of {ROUNDS} kills came during the replication"
    );
    a.job_when("pull", "the last run to complete", |j| {
        j["state"] == "completed"
    });
    assert_eq!(a.doc_count("dst"), DOCS);
    let job = a.ok("GET", "/_scheduler/docs/_replicator/pull", None);
    written += job["info"]["docs_written"].as_u64().unwrap();
    // Nothing was written twice: every run sent only what the target lacked.
    assert!(written <= DOCS, "{written} documents written for {DOCS}");
    let last = a.ok("GET", "/dst/b2-00999", None);
    assert_eq!(last["n"], 999);
}

/// The service's peak resident memory (VmHWM), in bytes.
fn peak_memory(node: &Node) -> u64 {
    let pid = node.child.as_ref().expect("the node runs").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib << 10
}

/// A hostile peer: a fake CouchDB whose database `x` answers `_changes`
/// with a JSON array of `changes_bytes` (everything else is small and
/// honest, or 404). Answers keep-alive HTTP/1.1, a thread per connection.
fn hostile_peer(changes_bytes: usize) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve_hostile(conn, changes_bytes));
        }
    });
    addr
}

fn serve_hostile(conn: std::net::TcpStream, changes_bytes: usize) -> std::io::Result<()> {
    use std::io::{BufRead, Read, Write};
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let mut length = 0;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            match h.trim_end().split_once(':') {
                Some((k, v)) if k.eq_ignore_ascii_case("content-length") => {
                    length = v.trim().parse().unwrap_or(0)
                }
                Some(_) => {}
                None => break,
            }
        }
        reader.read_exact(&mut vec![0; length])?;
        let (status, body) = match target.split('?').next().unwrap_or("") {
            "/" => ("200 OK", json!({"couchdb": "Welcome", "uuid": "hostile"})),
            "/x" => (
                "200 OK",
                json!({"db_name": "x", "update_seq": 1, "doc_count": 1}),
            ),
            "/x/_changes" => {
                // `{"results":[0,0,...,0]}`: tiny to send, ~30 times its
                // size once parsed into serde_json::Value.
                let zeros = (changes_bytes - 14) / 2;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{\"results\":[",
                    zeros * 2 + 14
                );
                out.write_all(head.as_bytes())?;
                let chunk = "0,".repeat(1 << 19);
                let mut left = zeros;
                while left > 0 {
                    let n = left.min(1 << 19);
                    out.write_all(&chunk.as_bytes()[..n * 2])?;
                    left -= n;
                }
                out.write_all(b"0]}")?;
                continue;
            }
            _ => (
                "404 Object Not Found",
                json!({"error": "not_found", "reason": "missing"}),
            ),
        };
        let body = body.to_string();
        write!(
            out,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
    }
}

#[test]
fn a_peer_answering_a_huge_changes_feed_is_refused_within_bounded_memory() {
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(data.path());
    let peer = hostile_peer(20 << 20);
    node.configure(
        "hostile",
        json!({"source": format!("http://{peer}/x"), "target": "loot", "create_target": true}),
    );
    // Twice: retries do not add up either.
    let job = node.job_when("hostile", "the job to crash twice", |j| {
        j["state"] == "crashing" && j["error_count"].as_u64() >= Some(2)
    });
    let peak = peak_memory(&node);
    assert!(
        peak < 200 << 20,
        "the service peaked at {} MiB reading a 20 MiB answer",
        peak >> 20
    );
    let error = job["last_error"].as_str().unwrap_or("");
    assert!(
        error.contains("_changes") && error.contains("larger than 8 MiB"),
        "{job}"
    );
    assert!(error.contains(&peer.to_string()), "{job}");
    assert_eq!(node.doc_count("loot"), 0);
}

#[test]
fn documents_larger_together_than_a_bulk_get_answer_are_read_in_halves() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (Node::start(da.path()), Node::start(db.path()));
    a.ok("PUT", "/big", None);
    // Two documents of 34 MiB of base64 each (25.5 MiB of attachment):
    // together more than the largest `_bulk_get` answer read at once.
    let data = "QUJD".repeat(34 << 18);
    for i in 0..2 {
        a.ok(
            "PUT",
            &format!("/big/d{i}"),
            Some(json!({"n": i, "_attachments": {"file": {
                "content_type": "application/octet-stream", "data": data}}})),
        );
    }
    drop(data);
    b.configure(
        "pull",
        json!({"source": a.url("big"), "target": "big", "create_target": true}),
    );
    let job = b.job_when("pull", "the large documents to be copied", |j| {
        j["state"] == "completed"
    });
    assert_eq!(job["info"]["docs_written"], 2, "{job}");
    assert_eq!(job["info"]["doc_write_failures"], 0, "{job}");
    for i in 0..2 {
        let doc = b.ok("GET", &format!("/big/d{i}"), None);
        assert_eq!(doc["n"], i);
        assert_eq!(doc["_attachments"]["file"]["length"], 102 << 18, "{doc}");
    }
}
