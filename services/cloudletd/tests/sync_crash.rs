//! Crash safety of the sync service (issue 13 item 7): the real `cloudletd
//! sync` is SIGKILLed while it writes a large `_bulk_docs`, and while real
//! PouchDB (Node, services/sync/tests-node/crash-replicate.js) replicates
//! into it, 20 rounds each on one data directory. After every restart what
//! was acknowledged is there, a `_bulk_docs` is all or nothing, sequences
//! never go back, and PouchDB resumes from the checkpoint it kept in the box.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudlet_testkit::http::{request, Body};
use serde_json::{json, Value};

const ROUNDS: usize = 20;
/// Documents written before the first kill, that the rounds edit.
const SEED_DOCS: usize = 1500;
/// Existing documents each `_bulk_docs` edits...
const EDITS_PER_BATCH: usize = 800;
/// ...and new documents it adds.
const NEW_PER_BATCH: usize = 200;
/// Batches a round sends at most; the kill comes before the last.
const BATCHES: usize = 4;
/// Every this many new documents has an attachment.
const ATT_EVERY: usize = 25;

/// A running `cloudletd sync`, killed with SIGKILL when dropped.
struct Sync {
    child: Child,
    addr: SocketAddr,
    auth: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sync {
    fn start(data: &Path) -> Sync {
        let s = common::spawn("sync", data, &[], None);
        Sync {
            child: s.child,
            addr: s.addr,
            auth: format!("Bearer {}", s.token),
            log: s.log,
        }
    }

    /// A request with a JSON body (or none): the status and the JSON answer.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let bytes = body.map(Value::to_string).unwrap_or_default();
        let b = if body.is_some() {
            Body::Bytes(bytes.as_bytes())
        } else {
            Body::None
        };
        let r = request(
            self.addr,
            method,
            path,
            &[
                ("Authorization", &self.auth),
                ("Content-Type", "application/json"),
            ],
            b,
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()));
        (r.status, v)
    }

    fn get(&self, path: &str) -> Value {
        let (st, v) = self.call("GET", path, None);
        assert_eq!(st, 200, "GET {path}: {v}");
        v
    }

    /// The raw bytes of an attachment.
    fn attachment(&self, path: &str) -> Vec<u8> {
        let r = request(
            self.addr,
            "GET",
            path,
            &[("Authorization", &self.auth)],
            Body::None,
        )
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.body
    }

    /// Lines the service logged at error level (a store that opened badly
    /// or failed a read says so there).
    fn errors(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("ERROR"))
            .cloned()
            .collect()
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Sync {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (attachments travel inline in `_bulk_docs`).
fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Deterministic bytes for the attachment with this seed (4 to 12 KiB).
fn att_bytes(seed: u64) -> Vec<u8> {
    let n = 4096 + (seed % 9) as usize * 1024;
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the test knows a document to be.
#[derive(Clone, Debug)]
struct Known {
    rev: String,
    /// The body without `_id`, `_rev` and `_attachments`.
    body: Value,
    /// The seed of its attachment `a.bin`, if it has one.
    att: Option<u64>,
}

/// One document of a batch.
struct Write1 {
    id: String,
    /// The revision it edits (None: a new document).
    parent: Option<String>,
    body: Value,
    att: Option<u64>,
}

fn batch_json(writes: &[Write1]) -> Value {
    let docs: Vec<Value> = writes
        .iter()
        .map(|w| {
            let mut d = w.body.clone();
            d["_id"] = json!(w.id);
            if let Some(p) = &w.parent {
                d["_rev"] = json!(p);
            }
            if let Some(seed) = w.att {
                d["_attachments"] = if w.parent.is_some() {
                    // An edit keeps the attachment it has, as a stub.
                    json!({"a.bin": {"stub": true}})
                } else {
                    json!({"a.bin": {
                        "content_type": "application/octet-stream",
                        "data": base64(&att_bytes(seed)),
                    }})
                };
            }
            d
        })
        .collect();
    json!({ "docs": docs })
}

/// The writes of batch `b` of round `r`: edits of up to
/// [`EDITS_PER_BATCH`] documents of `cur` (a window that moves with each
/// batch; an edit keeps the attachment, as a stub) and `new` new documents,
/// some with an attachment.
fn make_batch(r: usize, b: usize, new: usize, cur: &BTreeMap<String, Known>) -> Vec<Write1> {
    let mut out = Vec::new();
    let ids: Vec<&String> = cur.keys().collect();
    if !ids.is_empty() {
        let first = (r * 7919 + b * EDITS_PER_BATCH) % ids.len();
        for k in 0..EDITS_PER_BATCH.min(ids.len()) {
            let id = ids[(first + k) % ids.len()];
            let old = &cur[id];
            let mut body = old.body.clone();
            body["edits"] = json!(body["edits"].as_u64().unwrap_or(0) + 1);
            body["edited_in"] = json!([r, b]);
            out.push(Write1 {
                id: id.clone(),
                parent: Some(old.rev.clone()),
                body,
                att: old.att,
            });
        }
    }
    for i in 0..new {
        let id = format!("r{r:02}-b{b}-{i:04}");
        let seed = (r * 1_000_000 + b * 10_000 + i) as u64;
        out.push(Write1 {
            body: json!({"round": r, "batch": b, "i": i, "text": format!("document {id}")}),
            att: (i % ATT_EVERY == 0).then_some(seed),
            id,
            parent: None,
        });
    }
    out
}

/// Posts one batch; the revs it got, or None when the service went away.
fn post_batch(addr: SocketAddr, auth: &str, writes: &[Write1]) -> Option<Vec<String>> {
    let body = batch_json(writes).to_string();
    let resp = request(
        addr,
        "POST",
        "/db/_bulk_docs",
        &[
            ("Authorization", auth),
            ("Content-Type", "application/json"),
        ],
        Body::Bytes(body.as_bytes()),
    )
    .ok()?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let v: Value = serde_json::from_slice(&resp.body).unwrap();
    let revs: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["ok"], true, "{e}");
            e["rev"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(revs.len(), writes.len());
    Some(revs)
}

/// What the writes of an acknowledged batch made of the documents.
fn apply(model: &mut BTreeMap<String, Known>, writes: &[Write1], revs: &[String]) {
    for (w, rev) in writes.iter().zip(revs) {
        if let Some(p) = &w.parent {
            assert_eq!(generation(rev), generation(p) + 1, "{}", w.id);
        }
        model.insert(
            w.id.clone(),
            Known {
                rev: rev.clone(),
                body: w.body.clone(),
                att: w.att,
            },
        );
    }
}

/// The size and modification time of a file.
fn stamp(p: &Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// The generation of a revision (`N-hash`).
fn generation(rev: &str) -> u64 {
    rev.split('-').next().unwrap().parse().unwrap()
}

/// A document as the service returns it, split into what [`Known`] holds:
/// (rev, body, the attachment stub).
fn split(doc: &Value) -> (String, Value, Option<Value>) {
    let mut body = doc.clone();
    let m = body.as_object_mut().unwrap();
    m.remove("_id");
    let rev = m.remove("_rev").unwrap().as_str().unwrap().to_owned();
    let att = m.remove("_attachments").map(|a| a["a.bin"].clone());
    (rev, body, att)
}

/// Every document of `db`, by id (`_all_docs?include_docs=true`).
fn all_docs(s: &Sync, db: &str) -> BTreeMap<String, Value> {
    let v = s.get(&format!("/{db}/_all_docs?include_docs=true"));
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r["doc"].clone()))
        .collect()
}

/// `_changes` of `db` from the start: its sequences strictly increase, one
/// row per document, and `last_seq` is the database's `update_seq`.
/// Returns the rows' (id, rev).
fn changes_are_ordered(s: &Sync, db: &str, update_seq: u64) -> BTreeMap<String, String> {
    let v = s.get(&format!("/{db}/_changes"));
    let rows = v["results"].as_array().unwrap();
    let mut last = 0;
    let mut out = BTreeMap::new();
    for row in rows {
        let seq = row["seq"].as_u64().unwrap();
        assert!(seq > last, "_changes went from {last} to {seq}");
        last = seq;
        let id = row["id"].as_str().unwrap().to_owned();
        let rev = row["changes"][0]["rev"].as_str().unwrap().to_owned();
        assert!(out.insert(id, rev).is_none(), "a document listed twice");
    }
    assert_eq!(v["last_seq"], json!(update_seq), "last_seq is update_seq");
    out
}

#[test]
fn sigkill_during_bulk_docs_keeps_acknowledged_batches_whole_and_seqs_monotonic() {
    let d = tempfile::tempdir().unwrap();
    // The registry outlives every restart of the service.
    let registry = common::registry(d.path());
    let mut s = Sync::start(d.path());
    let file = d.path().join("sync/sync.redb");
    assert!(file.exists(), "the store is {}", file.display());
    assert_eq!(s.call("PUT", "/db", None).0, 201);
    // The documents the rounds edit, written before the first kill.
    let mut model: BTreeMap<String, Known> = BTreeMap::new();
    let seed = make_batch(ROUNDS, 0, SEED_DOCS, &model);
    let revs = post_batch(s.addr, &s.auth, &seed).expect("the seed batch");
    apply(&mut model, &seed, &revs);
    let mut update_seq = revs.len() as u64;
    let (mut applied_unacked, mut lost_unacked) = (0, 0);
    // How long the last acknowledged batch took, to aim the kills.
    let last_batch = Arc::new(Mutex::new(Duration::ZERO));
    for r in 0..ROUNDS {
        let start = model.clone();
        // The client makes and sends one batch after another, keeping the
        // revs of each acknowledged one, until a request fails (the kill).
        let (sending_tx, sending) = mpsc::channel::<usize>();
        let (addr, auth) = (s.addr, s.auth.clone());
        let took = last_batch.clone();
        let client = std::thread::spawn(move || {
            let mut cur = start;
            let mut sent: Vec<Vec<Write1>> = Vec::new();
            let mut acked: Vec<Vec<String>> = Vec::new();
            for b in 0..BATCHES {
                sent.push(make_batch(r, b, NEW_PER_BATCH, &cur));
                let _ = sending_tx.send(b);
                let t = Instant::now();
                let Some(revs) = post_batch(addr, &auth, &sent[b]) else {
                    break;
                };
                *took.lock().unwrap() = t.elapsed();
                apply(&mut cur, &sent[b], &revs);
                acked.push(revs);
            }
            (sent, acked)
        });
        // Kill after 0 or 1 acknowledged batches, once the next one was
        // sent: in some rounds a fraction of the time a batch last took
        // later, in others as soon as the store file changes (its commit
        // is being written) or just after. The moment is chosen, never
        // checked: any moment must be safe.
        let before = r % 2;
        while sending.recv().unwrap() < before {}
        if r % 3 == 0 {
            let fraction = [0.3, 0.6, 0.9, 1.1][r / 3 % 4];
            std::thread::sleep(last_batch.lock().unwrap().mul_f64(fraction));
        } else {
            let was = stamp(&file);
            let until = Instant::now() + Duration::from_secs(30);
            while stamp(&file) == was && Instant::now() < until {
                std::hint::spin_loop();
            }
            std::thread::sleep(Duration::from_micros([0, 0, 300, 2000][r % 4]));
        }
        s.kill();
        let (batches, acked) = client.join().unwrap();
        assert!(
            acked.len() < BATCHES,
            "round {r}: the kill came after the last batch"
        );
        // What the acknowledged batches wrote is now known.
        for (b, revs) in acked.iter().enumerate() {
            apply(&mut model, &batches[b], revs);
            update_seq += revs.len() as u64;
        }
        s = Sync::start(d.path());
        let info = s.get("/db");
        let docs = all_docs(&s, "db");
        // The batch in flight at the kill: all of it or none of it.
        let unacked = &batches[acked.len()];
        let visible = unacked
            .iter()
            .filter(|w| match (docs.get(&w.id), &w.parent) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(d), Some(p)) => split(d).0 != *p,
            })
            .count();
        assert!(
            visible == 0 || visible == unacked.len(),
            "round {r}: {visible} of the {} writes of the unacknowledged batch are visible",
            unacked.len()
        );
        if visible > 0 {
            applied_unacked += 1;
            for w in unacked {
                let rev = split(&docs[&w.id]).0;
                if let Some(p) = &w.parent {
                    assert_eq!(generation(&rev), generation(p) + 1);
                }
                model.insert(
                    w.id.clone(),
                    Known {
                        rev,
                        body: w.body.clone(),
                        att: w.att,
                    },
                );
                update_seq += 1;
            }
        } else {
            lost_unacked += 1;
        }
        // Every acknowledged document, with its rev, body and attachment.
        assert_eq!(
            info["update_seq"],
            json!(update_seq),
            "round {r}: update_seq counts exactly the committed writes (it never goes back)"
        );
        assert_eq!(info["doc_count"], json!(model.len()), "round {r}");
        assert_eq!(
            docs.keys().collect::<Vec<_>>(),
            model.keys().collect::<Vec<_>>(),
            "round {r}: the documents are exactly the committed ones"
        );
        for (id, k) in &model {
            let (rev, body, att) = split(&docs[id]);
            assert_eq!((&rev, &body), (&k.rev, &k.body), "round {r}: {id}");
            match (k.att, att) {
                (None, None) => {}
                (Some(seed), Some(stub)) => {
                    assert_eq!(stub["stub"], true);
                    assert_eq!(stub["length"], json!(att_bytes(seed).len()), "{id}");
                    assert_eq!(
                        stub["digest"],
                        json!(cloudlet_sync::store::digest(&att_bytes(seed))),
                        "round {r}: {id}"
                    );
                }
                (want, got) => panic!("round {r}: {id}: attachment {want:?}, found {got:?}"),
            }
        }
        // The bytes of the attachments this round wrote, read back raw.
        for (id, k) in model.range(format!("r{r:02}-")..format!("r{:02}-", r + 1)) {
            if let Some(seed) = k.att {
                assert!(
                    s.attachment(&format!("/db/{id}/a.bin")) == att_bytes(seed),
                    "round {r}: the attachment of {id} differs"
                );
            }
        }
        let feed = changes_are_ordered(&s, "db", update_seq);
        assert_eq!(feed.len(), model.len());
        for (id, k) in &model {
            assert_eq!(feed.get(id), Some(&k.rev), "round {r}: _changes of {id}");
        }
        assert_eq!(s.errors(), Vec::<String>::new(), "round {r}: errors logged");
    }
    // The attachments of every round, read raw once more at the end.
    for (id, k) in &model {
        if let Some(seed) = k.att {
            assert!(s.attachment(&format!("/db/{id}/a.bin")) == att_bytes(seed));
        }
    }
    println!(
        "{ROUNDS} kills: the batch in flight was committed whole {applied_unacked} times and \
         not at all {lost_unacked} times; {} documents, update_seq {update_seq}",
        model.len()
    );
    drop(s);
    drop(registry);
}

/// The directory of the Node tests, with its packages installed.
fn node_tests() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sync/tests-node");
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is not installed: scripts/setup installs it (Debian package nodejs)"
    );
    assert!(
        dir.join("node_modules/pouchdb-core").is_dir(),
        "PouchDB is not installed for the Node tests: run `npm ci --ignore-scripts --prefix services/sync/tests-node` (scripts/setup does)"
    );
    dir
}

#[test]
fn sigkill_during_pouchdb_push_loses_nothing_and_the_push_resumes_from_its_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let registry = common::registry(d.path());
    let mut s = Sync::start(d.path());
    let url = |s: &Sync| format!("http://pouch:{}@{}", registry.token, s.addr);
    // The script asks for each kill (`kill`) and is told where the service
    // listens again (`url URL`); it checks the box and the resumed push.
    let mut node = Command::new("node")
        .arg("crash-replicate.js")
        .current_dir(node_tests())
        .env("SYNC_URL", url(&s))
        .env("CRASH_ROUNDS", ROUNDS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running node");
    let mut to_node = node.stdin.take().unwrap();
    let mut err = node.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut t = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut t);
        t
    });
    let (mut kills, mut passed) = (0, false);
    for line in BufReader::new(node.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        println!("{line}");
        if line == "kill" {
            // A varying moment after the acknowledgement the script
            // waited for: at the checkpoint write or in the next batch.
            std::thread::sleep(Duration::from_millis((kills * 17 % 60) as u64));
            s.kill();
            kills += 1;
            s = Sync::start(d.path());
            writeln!(to_node, "url {}", url(&s)).unwrap();
        }
        passed |= line == "all passed";
    }
    let status = node.wait().unwrap();
    let stderr = stderr.join().unwrap();
    assert!(
        status.success() && passed,
        "the PouchDB crash checks failed ({status}):\n{stderr}"
    );
    assert_eq!(kills, ROUNDS, "one kill a round");
    assert_eq!(s.errors(), Vec::<String>::new(), "errors logged");
}
