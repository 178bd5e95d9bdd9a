//! The storage engine against a model, and against SIGKILL.
//!
//! * Every operation runs on the real store and on a `BTreeMap` model with
//!   the same rules; results (ok or refused) and whole contents must agree,
//!   and reference counts must match what the entries use, with no stray blobs.
//! * A child process writes files and prints an acknowledgement after each
//!   `put` returns; it is killed at random moments. After reopening, every
//!   acknowledged file is intact and no partial file is visible.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloudlet_storage::blobs::BlobId;
use cloudlet_storage::meta::{Content, Kind, Store};
use cloudlet_testkit::Rng;

#[derive(Debug, Clone, PartialEq)]
enum M {
    Dir,
    File(Vec<u8>),
}

fn parent(p: &str) -> &str {
    p.rsplit_once('/').map(|(a, _)| a).unwrap_or("")
}

fn is_dir(m: &BTreeMap<String, M>, p: &str) -> bool {
    p.is_empty() || matches!(m.get(p), Some(M::Dir))
}

fn under<'a>(m: &'a BTreeMap<String, M>, p: &'a str) -> impl Iterator<Item = String> + 'a {
    m.keys()
        .filter(move |k| *k == p || k.starts_with(&format!("{p}/")))
        .cloned()
}

fn read_file(s: &Store, blob: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::new();
    match s.content(&BlobId(*blob)).unwrap() {
        Content::Inline(b) => v = b,
        Content::File(mut f) => {
            f.read_to_end(&mut v).unwrap();
        }
    }
    v
}

/// How many entries use each blob.
fn uses(s: &Store) -> BTreeMap<BlobId, u64> {
    let mut want: BTreeMap<BlobId, u64> = BTreeMap::new();
    for (_, e) in s.walk().unwrap() {
        if let Kind::File { blob, .. } = e.kind {
            *want.entry(BlobId(blob)).or_default() += 1;
        }
    }
    want
}

fn check(s: &Store, m: &BTreeMap<String, M>) {
    let real: BTreeMap<String, M> = s
        .walk()
        .unwrap()
        .into_iter()
        .map(|(p, e)| {
            let v = match e.kind {
                Kind::Dir => M::Dir,
                Kind::File { blob, size, .. } => {
                    let data = read_file(s, &blob);
                    assert_eq!(data.len() as u64, size);
                    M::File(data)
                }
            };
            (p, v)
        })
        .collect();
    assert_eq!(&real, m);
    // Reference counts are exactly what the entries use; no blob is stray.
    let want = uses(s);
    let got: BTreeMap<BlobId, u64> = s.refcounts().unwrap().into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(
        s.stored_blobs().unwrap(),
        want.keys().copied().collect::<Vec<_>>()
    );
    // The space counter is the distinct contents' bytes.
    let distinct: BTreeMap<Vec<u8>, ()> = m
        .values()
        .filter_map(|v| match v {
            M::File(d) => Some((d.clone(), ())),
            M::Dir => None,
        })
        .collect();
    assert_eq!(
        s.used().unwrap(),
        distinct.keys().map(|d| d.len() as u64).sum::<u64>()
    );
}

#[test]
fn agrees_with_a_model() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    let mut m: BTreeMap<String, M> = BTreeMap::new();
    let mut r = Rng(0x0C10_D1E7);
    let names = ["a", "b", "c"];
    let path = |r: &mut Rng| {
        let depth = 1 + r.below(3);
        (0..depth)
            .map(|_| names[r.below(3) as usize])
            .collect::<Vec<_>>()
            .join("/")
    };
    for step in 0..1500 {
        let p = path(&mut r);
        match r.below(5) {
            0 => {
                let ok = !m.contains_key(&p) && is_dir(&m, parent(&p));
                assert_eq!(s.mkdir(&p).is_ok(), ok, "mkdir {p} at {step}");
                if ok {
                    m.insert(p, M::Dir);
                }
            }
            1 | 2 => {
                // Few distinct contents, so blobs are shared and deduplicated.
                let data = vec![b'x' + (r.below(4) as u8); r.below(3) as usize * 40_000];
                let mut up = s.begin().unwrap();
                up.write(&data).unwrap();
                let ok = is_dir(&m, parent(&p)) && !matches!(m.get(&p), Some(M::Dir));
                assert_eq!(
                    s.put(&p, up, "application/octet-stream").is_ok(),
                    ok,
                    "put {p} at {step}"
                );
                if ok {
                    m.insert(p, M::File(data));
                }
            }
            3 => {
                let ok = m.contains_key(&p);
                assert_eq!(s.remove(&p).is_ok(), ok, "remove {p} at {step}");
                if ok {
                    let gone: Vec<String> = under(&m, &p).collect();
                    for g in gone {
                        m.remove(&g);
                    }
                }
            }
            _ => {
                let to = path(&mut r);
                let overwrite = r.below(2) == 0;
                let keep = r.below(2) == 0;
                let ok = m.contains_key(&p)
                    && to != p
                    && !to.starts_with(&format!("{p}/"))
                    && is_dir(&m, parent(&to))
                    && (overwrite || !m.contains_key(&to));
                assert_eq!(
                    s.transfer(&p, &to, overwrite, keep).is_ok(),
                    ok,
                    "transfer {p} -> {to} at {step}"
                );
                if ok {
                    for g in under(&m, &to).collect::<Vec<_>>() {
                        m.remove(&g);
                    }
                    let moved: Vec<(String, M)> =
                        under(&m, &p).map(|k| (k.clone(), m[&k].clone())).collect();
                    for (k, v) in moved {
                        if !keep {
                            m.remove(&k);
                        }
                        m.insert(format!("{to}{}", &k[p.len()..]), v);
                    }
                }
            }
        }
        if step % 100 == 0 {
            check(&s, &m);
        }
    }
    check(&s, &m);
    drop(s);
    // The same after reopening.
    let s = Store::open(d.path()).unwrap();
    check(&s, &m);
}

#[test]
fn refuses_bad_paths_and_keeps_the_root() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path()).unwrap();
    assert!(s.mkdir("../x").is_err());
    assert!(s.mkdir("a/\0").is_err());
    assert!(s.remove("/").is_err());
    let up = s.begin().unwrap();
    assert!(s.put("/", up, "text/plain").is_err());
    assert!(s.list("/").unwrap().is_empty());
    // A failed put leaves no blob behind.
    let mut up = s.begin().unwrap();
    up.write(b"orphan").unwrap();
    assert!(s.put("no/such/folder/f", up, "text/plain").is_err());
    assert!(s.stored_blobs().unwrap().is_empty());
}

/// Content of the child's write number `i`.
fn content(i: u64) -> Vec<u8> {
    let mut r = Rng(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let n = (r.below(64) * 4096 + r.below(4096)) as usize;
    (0..n).map(|_| r.next_u64() as u8).collect()
}

fn target(i: u64) -> String {
    format!("f{}", i % 7)
}

/// The child: writes forever, acknowledging each durable put on stdout.
fn crash_child(dir: &Path, start: u64) {
    let s = Store::open(dir).unwrap();
    let mut out = std::io::stdout();
    for i in start.. {
        let mut up = s.begin().unwrap();
        for chunk in content(i).chunks(8192) {
            up.write(chunk).unwrap();
        }
        s.put(&target(i), up, "application/octet-stream").unwrap();
        use std::io::Write;
        writeln!(out, "ACK {i}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    if let Ok(dir) = std::env::var("CLOUDLET_STORAGE_CRASH_CHILD") {
        let start = std::env::var("CLOUDLET_STORAGE_CRASH_START")
            .unwrap()
            .parse()
            .unwrap();
        crash_child(Path::new(&dir), start);
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut r = Rng(0xDEAD_BEEF);
    let mut next = 0u64;
    // path -> the write number of its last acknowledged version
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..6 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_at_random_moments_loses_nothing_acknowledged",
                "--nocapture",
            ])
            .env("CLOUDLET_STORAGE_CRASH_CHILD", d.path())
            .env("CLOUDLET_STORAGE_CRASH_START", next.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(i) = line
                    .strip_prefix("ACK ")
                    .and_then(|i| i.parse::<u64>().ok())
                {
                    let _ = tx.send(i);
                }
            }
        });
        let kill_at = Instant::now() + Duration::from_millis(200 + r.below(800));
        let mut last = None;
        while Instant::now() < kill_at {
            if let Ok(i) = rx.recv_timeout(Duration::from_millis(5)) {
                acked.insert(target(i), i);
                last = Some(i);
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        while let Ok(i) = rx.try_recv() {
            acked.insert(target(i), i);
            last = Some(i);
        }
        // The write in flight when killed (at most one) may or may not have landed.
        let in_flight = last.map(|l| l + 1).unwrap_or(next);
        let s = Store::open(d.path()).unwrap();
        assert!(
            std::fs::read_dir(d.path().join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "round {round}: partial upload visible"
        );
        for (p, &i) in &acked {
            let e = s
                .get(p)
                .unwrap()
                .unwrap_or_else(|| panic!("round {round}: acknowledged {p} is gone"));
            let Kind::File { blob, .. } = e.kind else {
                panic!("{p} is not a file")
            };
            let data = read_file(&s, &blob);
            let ok = data == content(i) || (target(in_flight) == *p && data == content(in_flight));
            assert!(
                ok,
                "round {round}: {p} is neither write {i} nor the one in flight"
            );
        }
        let want = uses(&s);
        assert_eq!(
            s.stored_blobs().unwrap(),
            want.keys().copied().collect::<Vec<_>>(),
            "round {round}: stray blobs"
        );
        // If the in-flight write landed, its path now holds it: count it as acknowledged.
        if let Some(Kind::File { blob, .. }) = s.get(&target(in_flight)).unwrap().map(|e| e.kind) {
            if read_file(&s, &blob) == content(in_flight) {
                acked.insert(target(in_flight), in_flight);
            }
        }
        next = in_flight + 1;
    }
    assert!(
        acked.len() >= 3,
        "the child wrote too little to test anything: {acked:?}"
    );
}

/// Eight threads write, copy and remove files of three shared contents at
/// once: changes go through group commits, and content found already stored
/// must not be deleted between that and its new reference. Afterwards every
/// entry's content is there and intact, and the counts are exact.
#[test]
fn concurrent_changes_share_content_safely() {
    let d = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(Store::open(d.path()).unwrap());
    // Two contents big enough to be files (where the race was), one kept inline.
    let contents: Vec<Vec<u8>> = vec![
        b"alpha".repeat(14_000),
        b"beta".repeat(20_000),
        b"gamma".repeat(10),
    ];
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (s, contents) = (s.clone(), contents.clone());
            std::thread::spawn(move || {
                let mut r = Rng(0x5eed + t);
                for _ in 0..300 {
                    let p = format!("f{}", r.below(4));
                    match r.below(4) {
                        0 => {
                            let _ = s.remove(&p);
                        }
                        1 => {
                            let _ = s.transfer(&p, &format!("f{}", r.below(4)), true, true);
                        }
                        _ => {
                            let mut up = s.begin().unwrap();
                            up.write(&contents[r.below(3) as usize]).unwrap();
                            s.put(&p, up, "application/octet-stream").unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for (p, e) in s.walk().unwrap() {
        if let Kind::File { blob, .. } = e.kind {
            let data = read_file(&s, &blob);
            assert!(contents.contains(&data), "{p}: content damaged");
        }
    }
    let want = uses(&s);
    let got: BTreeMap<BlobId, u64> = s.refcounts().unwrap().into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(
        s.stored_blobs().unwrap(),
        want.keys().copied().collect::<Vec<_>>()
    );
    let used: u64 = want.keys().map(|b| read_file(&s, &b.0).len() as u64).sum();
    assert_eq!(s.used().unwrap(), used);
}
