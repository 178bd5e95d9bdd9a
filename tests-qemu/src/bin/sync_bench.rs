//! `cloudlet-sync-bench CLOUDLETD WORKDIR`: the box's sync service against
//! `pouchdb-server` (npm, 4.2, LevelDB on disk), one run on one machine,
//! every store under WORKDIR (the project's disk, as the box keeps its
//! databases on its data disk).
//!
//! * PouchDB under Node (memory adapter, services/sync/tests-node/
//!   bench-pouch.js) pushes 10,000 documents of 1 KiB to the server, then a
//!   second PouchDB pulls them; then the same with 100 documents carrying a
//!   1 MiB attachment each. Each pull is checked against the push.
//! * Box to box: 100,000 small documents loaded into one server
//!   (`_bulk_docs`, 1,000 a request), then replicated to a second: ours by
//!   the box's own replicator (`POST /_replicate` on the target, CouchDB's
//!   API, `create_target`), theirs by PouchDB's replicator under Node
//!   between two pouchdb-servers (bench-replicate.js, both sides over HTTP).
//! * Peak RSS (VmHWM) of every server process.
//!
//! Our service runs as the box runs it: redb with immediate durability
//! (every acknowledged write is on disk). pouchdb-server runs with its
//! defaults (LevelDB without a sync per write). Both over plain HTTP on
//! loopback: these figures compare the stores and the protocol, not TLS.
//! A figure that could not be measured says so, with why.
//! Run it through `scripts/bench sync`, which builds what it needs.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cloudlet_testkit::http::{request_on, Body, Response};
use serde_json::{json, Value};

/// Box-to-box: documents replicated, and how many go in one `_bulk_docs`
/// while loading the source.
const B2B_DOCS: usize = 100_000;
const LOAD_BATCH: usize = 1_000;
/// The longest one request may take (a one-shot `_replicate` of the whole
/// database answers when it is done).
const REQUEST_LIMIT: Duration = Duration::from_secs(1800);

/// A figure, or why it could not be measured.
type Figure = std::result::Result<f64, String>;

/// A process that is killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn peak_rss_kib(&self) -> Figure {
        let pid = self.0.id();
        let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no VmHWM in /proc/{pid}/status"))
    }
}

/// A CouchDB-compatible server under test.
struct Server {
    proc: Proc,
    addr: SocketAddr,
    /// `user:password@` for URLs, and the header that goes with it.
    userinfo: String,
    auth: Option<String>,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}{}", self.userinfo, self.addr)
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let bytes = body.map(Value::to_string).unwrap_or_default();
        let mut h = vec![
            ("Content-Type", "application/json"),
            ("Accept", "application/json"),
        ];
        if let Some(a) = &self.auth {
            h.push(("Authorization", a.as_str()));
        }
        let s = TcpStream::connect(self.addr)?;
        s.set_read_timeout(Some(REQUEST_LIMIT))?;
        let b = if bytes.is_empty() {
            Body::None
        } else {
            Body::Bytes(bytes.as_bytes())
        };
        let r: Response =
            request_on(s, method, path, &h, b).with_context(|| format!("{method} {path}"))?;
        let v = if r.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&r.body)
                .with_context(|| format!("{method} {path}: not JSON: {}", r.text()))?
        };
        Ok((r.status, v))
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_listening(addr: SocketAddr, what: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what}: nothing listens on {addr}")
}

/// The device registry (`cloudletd sharing`) our services ask, and the
/// token of a device paired in it by the owner command.
struct Registry {
    _proc: Proc,
    data: PathBuf,
    socket: PathBuf,
    token: String,
}

fn start_registry(bin: &Path, data: &Path) -> Result<Registry> {
    std::fs::create_dir_all(data)?;
    let socket = data.join("registry.sock");
    let addr = free_addr()?;
    let proc = Proc(
        Command::new(bin)
            .args(["sharing", "--listen", &addr.to_string(), "--plain"])
            .env("CLOUDLET_DATA", data)
            .env("CLOUDLET_REGISTRY_SOCKET", &socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} sharing", bin.display()))?,
    );
    wait_listening(addr, "cloudletd sharing")?;
    let out = Command::new(bin)
        .args(["sharing", "add-device", "bench", "owner"])
        .env("CLOUDLET_REGISTRY_SOCKET", &socket)
        .output()?;
    let token = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("token ").map(|t| t.trim().to_owned()))
        .ok_or_else(|| anyhow!("add-device: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(Registry {
        _proc: proc,
        data: data.to_owned(),
        socket,
        token,
    })
}

/// `cloudletd sync` with its store in `state` (plain HTTP on loopback).
fn start_ours(bin: &Path, reg: &Registry, state: &Path) -> Result<Server> {
    let addr = free_addr()?;
    let proc = Proc(
        Command::new(bin)
            .args([
                "sync",
                "--listen",
                &addr.to_string(),
                "--plain",
                "--state-dir",
            ])
            .arg(state)
            .env("CLOUDLET_DATA", &reg.data)
            .env("CLOUDLET_REGISTRY_SOCKET", &reg.socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} sync", bin.display()))?,
    );
    wait_listening(addr, "cloudletd sync")?;
    Ok(Server {
        proc,
        addr,
        userinfo: format!("bench:{}@", reg.token),
        auth: Some(format!("Bearer {}", reg.token)),
    })
}

/// `pouchdb-server --dir DIR --port N` (LevelDB in DIR, its config and log
/// there too), run by node directly so that its pid is the server's.
fn start_theirs(node_dir: &Path, dir: &Path) -> Result<Server> {
    std::fs::create_dir_all(dir)?;
    let addr = free_addr()?;
    let proc = Proc(
        Command::new("node")
            .arg(node_dir.join("node_modules/pouchdb-server/bin/pouchdb-server"))
            .args(["--dir"])
            .arg(dir)
            .args(["--port", &addr.port().to_string(), "--no-stdout-logs"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting pouchdb-server")?,
    );
    wait_listening(addr, "pouchdb-server")?;
    Ok(Server {
        proc,
        addr,
        userinfo: String::new(),
        auth: None,
    })
}

/// Runs `node SCRIPT` in the Node tests' directory with `env`; the JSON of
/// its `result` line.
fn node(node_dir: &Path, script: &str, env: &[(&str, String)]) -> Result<Value> {
    let mut child = Command::new("node")
        .arg(script)
        .current_dir(node_dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running node {script}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(r) = line.strip_prefix("result ") {
            result = Some(serde_json::from_str(r)?);
        }
    }
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("piped"), &mut err)?;
    let status = child.wait()?;
    if !status.success() {
        // The error's first line (its stack follows).
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        bail!("node {script}: {status}: {}", first.trim());
    }
    result.ok_or_else(|| anyhow!("node {script} printed no result: {}", err.trim()))
}

/// What the PouchDB workloads measured on one server.
struct Pouch {
    docs_push: Figure,
    docs_pull: Figure,
    atts_push: Figure,
    atts_pull: Figure,
    rss_kib: Figure,
}

fn pouch_workloads(node_dir: &Path, s: &Server) -> Pouch {
    let run = |workload: &str| {
        node(
            node_dir,
            "bench-pouch.js",
            &[
                ("BENCH_URL", s.url()),
                ("BENCH_WORKLOAD", workload.to_owned()),
            ],
        )
    };
    let (docs, atts) = (run("docs"), run("atts"));
    let get = |r: &Result<Value>, k: &str| -> Figure {
        match r {
            Ok(v) => v[k].as_f64().ok_or_else(|| format!("no {k} in {v}")),
            Err(e) => Err(format!("{e:#}")),
        }
    };
    Pouch {
        docs_push: get(&docs, "docs_push_per_s"),
        docs_pull: get(&docs, "docs_pull_per_s"),
        atts_push: get(&atts, "atts_push_mib_s"),
        atts_pull: get(&atts, "atts_pull_mib_s"),
        rss_kib: s.proc.peak_rss_kib(),
    }
}

/// Loads `B2B_DOCS` small documents into `db` on `s`.
fn load(s: &Server, db: &str) -> Result<()> {
    let (st, v) = s.call("PUT", &format!("/{db}"), None)?;
    if st != 201 {
        bail!("PUT /{db}: {st} {v}");
    }
    for start in (0..B2B_DOCS).step_by(LOAD_BATCH) {
        let docs: Vec<Value> = (start..(start + LOAD_BATCH).min(B2B_DOCS))
            .map(|i| json!({"_id": format!("d{i:07}"), "n": i, "text": format!("document number {i} of the box-to-box run")}))
            .collect();
        let (st, v) = s.call(
            "POST",
            &format!("/{db}/_bulk_docs"),
            Some(&json!({"docs": docs})),
        )?;
        let failed = v
            .as_array()
            .map_or(usize::MAX, |a| a.iter().filter(|r| r["ok"] != true).count());
        if st != 201 || failed != 0 {
            bail!("_bulk_docs at {start}: {st}, {failed} failed");
        }
    }
    Ok(())
}

fn doc_count(s: &Server, db: &str) -> Result<u64> {
    let (st, v) = s.call("GET", &format!("/{db}"), None)?;
    if st != 200 {
        bail!("GET /{db}: {st} {v}");
    }
    v["doc_count"]
        .as_u64()
        .ok_or_else(|| anyhow!("GET /{db}: no doc_count in {v}"))
}

/// Box to box: the source and target's peak RSS, and docs/s.
struct B2b {
    rate: Figure,
    source_rss: Figure,
    target_rss: Figure,
}

/// Ours: `POST /_replicate` on the target, pulling from the source.
fn b2b_ours(a: &Server, b: &Server) -> B2b {
    let rate = (|| -> Result<f64> {
        load(a, "b2b").context("loading the source")?;
        let t = Instant::now();
        let (st, v) = b.call(
            "POST",
            "/_replicate",
            Some(&json!({"source": format!("{}/b2b", a.url()), "target": "b2b", "create_target": true})),
        )?;
        let secs = t.elapsed().as_secs_f64();
        if st == 404 || st == 405 {
            bail!("POST /_replicate answered {st} {v}: the box's replicator is not in this build");
        }
        if st != 200 || v["ok"] != true {
            bail!("POST /_replicate: {st} {v}");
        }
        let n = doc_count(b, "b2b")?;
        if n != B2B_DOCS as u64 {
            bail!("the target holds {n} documents of {B2B_DOCS}");
        }
        Ok(B2B_DOCS as f64 / secs)
    })()
    .map_err(|e| format!("{e:#}"));
    B2b {
        rate,
        source_rss: a.proc.peak_rss_kib(),
        target_rss: b.proc.peak_rss_kib(),
    }
}

/// Theirs: PouchDB's replicator under Node between two pouchdb-servers.
fn b2b_theirs(node_dir: &Path, a: &Server, b: &Server) -> B2b {
    let rate = (|| -> Result<f64> {
        load(a, "b2b").context("loading the source")?;
        let r = node(
            node_dir,
            "bench-replicate.js",
            &[
                ("BENCH_SOURCE", format!("{}/b2b", a.url())),
                ("BENCH_TARGET", format!("{}/b2b", b.url())),
            ],
        )?;
        let secs = r["seconds"]
            .as_f64()
            .ok_or_else(|| anyhow!("no seconds in {r}"))?;
        let n = doc_count(b, "b2b")?;
        if n != B2B_DOCS as u64 {
            bail!("the target holds {n} documents of {B2B_DOCS}");
        }
        Ok(B2B_DOCS as f64 / secs)
    })()
    .map_err(|e| format!("{e:#}"));
    B2b {
        rate,
        source_rss: a.proc.peak_rss_kib(),
        target_rss: b.proc.peak_rss_kib(),
    }
}

fn show(f: &Figure, digits: usize) -> String {
    match f {
        Ok(v) => format!("{v:.digits$}"),
        Err(_) => "n/a".to_owned(),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bin, work] = &args[..] else {
        bail!("usage: cloudlet-sync-bench CLOUDLETD WORKDIR");
    };
    let (bin, work) = (PathBuf::from(bin), PathBuf::from(work));
    let node_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/sync/tests-node");
    if !node_dir
        .join("node_modules/pouchdb-server/bin/pouchdb-server")
        .is_file()
        || !node_dir.join("node_modules/pouchdb-core").is_dir()
    {
        bail!(
            "PouchDB and pouchdb-server are not installed: run `npm ci --ignore-scripts --prefix {}` (scripts/setup does)",
            node_dir.display()
        );
    }
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    let reg = start_registry(&bin, &work.join("registry"))?;

    eprintln!("PouchDB workloads against our sync service");
    let ours = start_ours(&bin, &reg, &work.join("ours"))?;
    let p_ours = pouch_workloads(&node_dir, &ours);
    drop(ours);
    eprintln!("PouchDB workloads against pouchdb-server");
    let theirs = start_theirs(&node_dir, &work.join("theirs"))?;
    let p_theirs = pouch_workloads(&node_dir, &theirs);
    drop(theirs);

    eprintln!("box to box, {B2B_DOCS} documents: our replicator");
    let a = start_ours(&bin, &reg, &work.join("ours-a"))?;
    let b = start_ours(&bin, &reg, &work.join("ours-b"))?;
    let r_ours = b2b_ours(&a, &b);
    drop((a, b));
    eprintln!("box to box, {B2B_DOCS} documents: PouchDB's replicator between two pouchdb-servers");
    let a = start_theirs(&node_dir, &work.join("theirs-a"))?;
    let b = start_theirs(&node_dir, &work.join("theirs-b"))?;
    let r_theirs = b2b_theirs(&node_dir, &a, &b);
    drop((a, b));

    println!();
    println!(
        "sync: ours (redb, durable per request) vs pouchdb-server 4.2 (LevelDB), loopback, {}",
        work.display()
    );
    println!(
        "{:<44} {:>12} {:>14} {:>8}",
        "", "ours", "pouchdb-server", "ratio"
    );
    let row = |name: &str, a: &Figure, b: &Figure, digits: usize, higher_better: bool| {
        let ratio = match (a, b) {
            (Ok(a), Ok(b)) if *a > 0.0 && *b > 0.0 => {
                format!("{:.2}x", if higher_better { a / b } else { b / a })
            }
            _ => "-".to_owned(),
        };
        println!(
            "{:<44} {:>12} {:>14} {:>8}",
            name,
            show(a, digits),
            show(b, digits),
            ratio
        );
    };
    row(
        "PouchDB push 10,000 x 1 KiB (docs/s)",
        &p_ours.docs_push,
        &p_theirs.docs_push,
        0,
        true,
    );
    row(
        "PouchDB pull 10,000 x 1 KiB (docs/s)",
        &p_ours.docs_pull,
        &p_theirs.docs_pull,
        0,
        true,
    );
    row(
        "PouchDB push 100 x 1 MiB attachment (MiB/s)",
        &p_ours.atts_push,
        &p_theirs.atts_push,
        1,
        true,
    );
    row(
        "PouchDB pull 100 x 1 MiB attachment (MiB/s)",
        &p_ours.atts_pull,
        &p_theirs.atts_pull,
        1,
        true,
    );
    row(
        "peak RSS, PouchDB workloads (KiB)",
        &p_ours.rss_kib,
        &p_theirs.rss_kib,
        0,
        false,
    );
    row(
        "box to box, 100,000 docs (docs/s)",
        &r_ours.rate,
        &r_theirs.rate,
        0,
        true,
    );
    row(
        "peak RSS, replication source (KiB)",
        &r_ours.source_rss,
        &r_theirs.source_rss,
        0,
        false,
    );
    row(
        "peak RSS, replication target (KiB)",
        &r_ours.target_rss,
        &r_theirs.target_rss,
        0,
        false,
    );
    println!("ratio: ours / pouchdb-server for rates, pouchdb-server / ours for RSS (higher is better for us)");
    println!("box to box: ours is the target's POST /_replicate; theirs is PouchDB's replicator under Node between two pouchdb-servers");
    println!("goals: >= 2x on the PouchDB rows, >= 5x box to box, < 16384 KiB RSS for our service while replicating");
    let mut missing = Vec::new();
    for (what, f) in [
        ("ours, PouchDB push docs", &p_ours.docs_push),
        ("ours, PouchDB pull docs", &p_ours.docs_pull),
        ("ours, PouchDB push attachments", &p_ours.atts_push),
        ("ours, PouchDB pull attachments", &p_ours.atts_pull),
        ("ours, peak RSS", &p_ours.rss_kib),
        ("pouchdb-server, PouchDB push docs", &p_theirs.docs_push),
        ("pouchdb-server, PouchDB pull docs", &p_theirs.docs_pull),
        (
            "pouchdb-server, PouchDB push attachments",
            &p_theirs.atts_push,
        ),
        (
            "pouchdb-server, PouchDB pull attachments",
            &p_theirs.atts_pull,
        ),
        ("pouchdb-server, peak RSS", &p_theirs.rss_kib),
        ("ours, box to box", &r_ours.rate),
        ("ours, replication source RSS", &r_ours.source_rss),
        ("ours, replication target RSS", &r_ours.target_rss),
        ("pouchdb-server, box to box", &r_theirs.rate),
        (
            "pouchdb-server, replication source RSS",
            &r_theirs.source_rss,
        ),
        (
            "pouchdb-server, replication target RSS",
            &r_theirs.target_rss,
        ),
    ] {
        if let Err(e) = f {
            missing.push(format!("not measured: {what}: {e}"));
        }
    }
    for m in &missing {
        println!("{m}");
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
