//! The mesh with two boxes as two host processes each (not two QEMU boxes):
//! each box is a sharing service (its identity and device registry) and a
//! sync service over TLS on its own data directory. The boxes are paired
//! by their identity keys (`cloudletd sharing add-device NAME box --key`,
//! what `cloudlet pair-box` leaves in each registry; box pairing itself is
//! tested in box_pairing.rs), and each replicates `notes` continuously to
//! the other as `box:BOXID/notes` from `_replicator`: both ways, over TLS
//! where each side presents its service chain and pins the other's key.
//! Addresses come from `CLOUDLET_BOX_ADDRS` here (mDNS lookup of a box's
//! sync port is tested in box_mesh_tls.rs).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_runtime::tls;
use cloudlet_testkit::http::{request_tls, Body};
use serde_json::{json, Value};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One box: its registry, its identity, and its sync service when running.
struct Box_ {
    data: PathBuf,
    port: u16,
    registry: Arc<common::Registry>,
    id: String,
    key_hash: String,
    sync: Option<common::Spawned>,
}

impl Box_ {
    fn new(root: &Path, name: &str) -> Box_ {
        let data = root.join(name);
        std::fs::create_dir_all(&data).unwrap();
        let registry = common::registry(&data);
        let identity = std::fs::read(data.join("sharing/identity.crt")).unwrap();
        let spki = tls::spki_of(&identity.into()).unwrap();
        Box_ {
            data,
            port: free_port(),
            registry,
            id: tls::box_id(&spki),
            key_hash: tls::key_hash(&spki),
            sync: None,
        }
    }

    /// Pairs `other` into this box's registry as a box.
    fn pair(&self, other: &Box_, name: &str) {
        self.registry
            .owner(&["add-device", name, "box", "--key", &other.key_hash])
            .unwrap();
    }

    /// Starts its sync service on its port, knowing where `others` are.
    fn start(&mut self, others: &[&Box_]) {
        let addrs: Vec<String> = others
            .iter()
            .map(|o| format!("{}@127.0.0.1:{}", o.id, o.port))
            .collect();
        let addrs = addrs.join(",");
        let listen = format!("127.0.0.1:{}", self.port);
        self.sync = Some(common::spawn_on(
            "sync",
            &self.data,
            &[("CLOUDLET_BOX_ADDRS", &addrs), ("CLOUDLET_MDNS", "off")],
            None,
            true,
            &listen,
        ));
    }

    /// Stops its sync service (kill -9: the box is off).
    fn stop(&mut self) {
        if let Some(mut s) = self.sync.take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }

    /// A JSON call to its sync service over TLS that pins this box.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let identity = std::fs::read(self.data.join("sharing/identity.crt")).unwrap();
        let (config, name) = common::pinning_client(&identity.into(), false);
        let auth = format!("Bearer {}", self.registry.token);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let r = request_tls(
            addr,
            &config,
            &name,
            method,
            path,
            &[
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ],
            if bytes.is_empty() {
                Body::None
            } else {
                Body::Bytes(bytes.as_bytes())
            },
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    fn doc(&self, id: &str) -> Option<Value> {
        let (status, v) = self.call("GET", &format!("/notes/{id}?conflicts=true"), None);
        (status == 200).then_some(v)
    }

    fn put(&self, id: &str, body: Value) -> String {
        let (status, v) = self.call("PUT", &format!("/notes/{id}"), Some(body));
        assert_eq!(status, 201, "{v}");
        v["rev"].as_str().unwrap().to_owned()
    }
}

impl Drop for Box_ {
    fn drop(&mut self) {
        self.stop();
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(120);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("never: {what}");
}

/// Whether `id` on the box has the revision `rev`.
fn has(b: &Box_, id: &str, rev: &str) -> bool {
    b.doc(id).is_some_and(|d| d["_rev"] == rev)
}

#[test]
fn two_paired_boxes_replicate_both_ways_catch_up_after_being_off_and_agree_on_conflicts() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Box_::new(root.path(), "a");
    let mut b = Box_::new(root.path(), "b");
    a.pair(&b, "box-b");
    b.pair(&a, "box-a");
    a.start(&[&b]);
    b.start(&[&a]);
    for (x, y) in [(&a, &b), (&b, &a)] {
        assert_eq!(x.call("PUT", "/notes", None).0, 201);
        let job =
            json!({"source": "notes", "target": format!("box:{}/notes", y.id), "continuous": true});
        let (status, v) = x.call("PUT", "/_replicator/mesh", Some(job));
        assert_eq!(status, 201, "{v}");
    }

    // Both ways while both are on.
    let r = a.put("from-a", json!({"n": 1}));
    eventually("a's document reaches b", || has(&b, "from-a", &r));
    let r = b.put("from-b", json!({"n": 2}));
    eventually("b's document reaches a", || has(&a, "from-b", &r));
    let (_, sched) = a.call("GET", "/_scheduler/docs/_replicator/mesh", None);
    assert_eq!(sched["state"], "running", "{sched}");
    assert_eq!(sched["target"], format!("box:{}/notes", b.id), "{sched}");

    // B is off: a change on A arrives once B is back.
    b.stop();
    let r = a.put("while-b-was-off", json!({"n": 3}));
    b.start(&[&a]);
    eventually("a change made while b was off arrives", || {
        has(&b, "while-b-was-off", &r)
    });
    // And the other way round.
    a.stop();
    let r = b.put("while-a-was-off", json!({"n": 4}));
    a.start(&[&b]);
    eventually("a change made while a was off arrives", || {
        has(&a, "while-a-was-off", &r)
    });

    // Concurrent edits of one document, each made while the other box
    // was off: both end with the same winner and the same conflicts.
    let base = a.doc("from-a").unwrap()["_rev"]
        .as_str()
        .unwrap()
        .to_owned();
    a.stop();
    let on_b = b.put("from-a", json!({"n": 10, "_rev": base}));
    b.stop();
    a.start(&[&b]);
    let on_a = a.put("from-a", json!({"n": 20, "_rev": base, "longer": true}));
    b.start(&[&a]);
    let winner = if on_a > on_b { &on_a } else { &on_b };
    let loser = if on_a > on_b { &on_b } else { &on_a };
    for x in [&a, &b] {
        eventually("both edits are on both boxes", || {
            x.doc("from-a")
                .is_some_and(|d| d["_rev"] == winner.as_str() && d["_conflicts"] == json!([loser]))
        });
    }
    assert_eq!(
        a.doc("from-a"),
        b.doc("from-a"),
        "the same winner, body and conflicts"
    );
}

#[test]
fn a_box_that_is_not_paired_is_not_replicated_with() {
    let root = tempfile::tempdir().unwrap();
    let mut a = Box_::new(root.path(), "a");
    let mut c = Box_::new(root.path(), "c");
    // C knows A, but A never paired C: A will not dial it.
    c.pair(&a, "box-a");
    a.start(&[&c]);
    c.start(&[&a]);
    assert_eq!(a.call("PUT", "/notes", None).0, 201);
    assert_eq!(c.call("PUT", "/notes", None).0, 201);
    let job =
        json!({"source": "notes", "target": format!("box:{}/notes", c.id), "continuous": true});
    assert_eq!(a.call("PUT", "/_replicator/to-c", Some(job)).0, 201);
    a.put("secret", json!({"n": 1}));
    eventually("the job says why it cannot run", || {
        let (_, s) = a.call("GET", "/_scheduler/docs/_replicator/to-c", None);
        s["state"] == "crashing"
            && s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("not paired"))
    });
    assert!(c.doc("secret").is_none());

    // And A, unpaired on C's side, is refused when it dials C: C pairs
    // nothing but A's key is not a box there. (C replicating to A: A does
    // not know C, so A refuses it with 401.)
    let job =
        json!({"source": "notes", "target": format!("box:{}/notes", a.id), "continuous": true});
    assert_eq!(c.call("PUT", "/_replicator/to-a", Some(job)).0, 201);
    c.put("from-c", json!({"n": 2}));
    eventually("A refuses the unpaired box's pushes", || {
        let (_, s) = c.call("GET", "/_scheduler/docs/_replicator/to-a", None);
        s["state"] == "crashing" && s["last_error"].as_str().is_some_and(|e| e.contains("401"))
    });
    assert!(a.doc("from-c").is_none());
}
