//! Box-to-box pairing with two real sharing services on this host (two
//! processes, each with its own identity and registry; `cloudletd sharing
//! press` stands in for each box's button) and the real `cloudlet` command
//! as the owner device both boxes trust.

mod common;

use common::{cloudlet, cloudlet_bin, text, Sharing};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use cloudlet_runtime::dial::{self, Check, Conn};
use rustls::pki_types::CertificateDer;

/// Pairs the device of `config` with box `s` (its first device: the
/// owner); returns the box ID.
fn pair_owner(config: &Path, s: &Sharing) -> String {
    s.press();
    let asks = s.asks();
    let mut pair = Command::new(cloudlet_bin())
        .args(["pair", &s.addr.to_string(), "--name", "laptop"])
        .env("CLOUDLET_CONFIG_DIR", config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = {
        let mut out = Vec::new();
        let mut r = BufReader::new(pair.stdout.take().unwrap()).lines();
        for l in r.by_ref().map_while(Result::ok) {
            let waiting = l.starts_with("Waiting");
            out.push(l);
            if waiting {
                break;
            }
        }
        s.wait_asks(asks + 1);
        s.press();
        out.extend(r.map_while(Result::ok));
        out
    };
    assert!(pair.wait().unwrap().success(), "{lines:?}");
    lines
        .iter()
        .find_map(|l| l.strip_prefix("Box ID:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The device list of box `id` as the owner's `cloudlet devices` prints it.
fn devices(config: &Path, id: &str) -> String {
    let out = cloudlet(config, &["devices", "--box", id]);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

/// `GET path` on `to`, presenting box `from`'s identity (its key and
/// certificate as the sharing service keeps them) and pinning `to`'s.
fn as_box(from: &Sharing, to: &Sharing, to_id: &str, path: &str) -> u16 {
    let key = std::fs::read(from.data.join("sharing/identity.key")).unwrap();
    let cert = CertificateDer::from(from.identity());
    let root = CertificateDer::from(to.identity());
    let config = dial::client_config(cert, key, Check::Pinned(root)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Conn::connect(
            &to.addr.to_string(),
            config,
            cloudlet_runtime::tls::box_dns_name(to_id),
        )
        .await
        .unwrap();
        c.call("GET", path, None).await.unwrap().0
    })
}

#[test]
fn two_boxes_pair_with_a_press_on_each_and_the_owner_comparing_their_codes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = tempfile::tempdir().unwrap();
    let a = Sharing::start(da.path(), "127.0.0.1:0", &[]);
    let b = Sharing::start(db.path(), "127.0.0.1:0", &[]);
    let a_id = pair_owner(config.path(), &a);
    let b_id = pair_owner(config.path(), &b);
    // Before: neither box lets the other in.
    assert_eq!(as_box(&b, &a, &a_id, "/api/devices"), 401);

    // Only A's window open: B has not consented.
    a.press();
    let out = cloudlet(config.path(), &["pair-box", &a_id, &b_id]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("box {b_id}'s pairing window is closed")),
        "{}",
        text(&out)
    );

    b.press();
    let asks = a.asks();
    let mut run = Command::new(cloudlet_bin())
        .args(["pair-box", &a_id, &b_id])
        .env("CLOUDLET_CONFIG_DIR", config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    let mut shown = Vec::new();
    for l in lines.by_ref().map_while(Result::ok) {
        let last = l.contains("press box");
        shown.push(l);
        if last {
            break;
        }
    }
    assert!(
        shown
            .iter()
            .any(|l| l.contains("the code of their session is")),
        "{shown:?}"
    );
    // A second press on A confirms B's waiting request.
    a.wait_asks(asks + 1);
    a.press();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert!(run.wait().unwrap().success(), "{shown:?} {rest:?} {err}");
    assert!(
        rest.iter()
            .any(|l| l.contains("are paired with each other")),
        "{rest:?}"
    );

    // Each box lists the other as a box, paired by button and owner, and
    // tells the owner of that pairing once.
    let on_a = devices(config.path(), &a_id);
    assert!(on_a.contains(&format!("box {b_id}")), "{on_a}");
    let told = on_a
        .split("Paired since this device last looked:")
        .nth(1)
        .unwrap_or_else(|| panic!("the owner was not told: {on_a}"));
    assert!(
        told.contains(&format!("box {b_id} (box, button-and-owner)")),
        "{on_a}"
    );
    let again = devices(config.path(), &a_id);
    assert!(!again.contains("Paired since"), "told twice: {again}");
    let on_b = devices(config.path(), &b_id);
    assert!(on_b.contains(&format!("box {a_id}")), "{on_b}");
    assert!(
        on_b.contains("Paired since this device last looked:"),
        "{on_b}"
    );
    // And each lets the other in with its identity key, both ways.
    assert_eq!(as_box(&b, &a, &a_id, "/api/devices"), 200);
    assert_eq!(as_box(&a, &b, &b_id, "/api/devices"), 200);
    // A third box, never paired, is still refused.
    let dc = tempfile::tempdir().unwrap();
    let c = Sharing::start(dc.path(), "127.0.0.1:0", &[]);
    assert_eq!(as_box(&c, &a, &a_id, "/api/devices"), 401);
}

#[test]
fn a_box_refuses_to_join_a_box_other_than_the_one_the_owner_pinned() {
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let config = tempfile::tempdir().unwrap();
    let a = Sharing::start(da.path(), "127.0.0.1:0", &[]);
    let b = Sharing::start(db.path(), "127.0.0.1:0", &[]);
    // C stands at the address the owner gives for A: an impostor.
    let c = Sharing::start(dc.path(), "127.0.0.1:0", &[]);
    let a_id = pair_owner(config.path(), &a);
    let b_id = pair_owner(config.path(), &b);
    a.press();
    b.press();
    c.press();
    let out = cloudlet(
        config.path(),
        &["pair-box", &a_id, &b_id, "--address", &c.addr.to_string()],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is not the one you pinned"),
        "{}",
        text(&out)
    );
    // Nobody asked C to pair, and B added nobody.
    assert_eq!(c.asks(), 0);
    assert!(
        !devices(config.path(), &b_id).contains(" box "),
        "B added a box"
    );
}

/// A call to box `on` as the owner device of `config`.
async fn owner_call(
    config: &Path,
    on: &Sharing,
    on_id: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let key = std::fs::read(config.join("device.key")).unwrap();
    let cert = CertificateDer::from(std::fs::read(config.join("device.crt")).unwrap());
    let root = CertificateDer::from(on.identity());
    let tls = dial::client_config(cert, key, Check::Pinned(root)).unwrap();
    let mut c = Conn::connect(
        &on.addr.to_string(),
        tls,
        cloudlet_runtime::tls::box_dns_name(on_id),
    )
    .await
    .unwrap();
    c.call(method, path, body).await.unwrap()
}

/// `POST /api/pairing/join` on `on` as the owner device of `config`.
async fn join(
    config: &Path,
    on: &Sharing,
    on_id: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    owner_call(config, on, on_id, "POST", "/api/pairing/join", Some(body)).await
}

#[test]
fn a_join_tells_only_that_no_box_answered_and_runs_one_at_a_time() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = tempfile::tempdir().unwrap();
    let a = Sharing::start(da.path(), "127.0.0.1:0", &[]);
    let b = Sharing::start(db.path(), "127.0.0.1:0", &[]);
    pair_owner(config.path(), &a);
    let b_id = pair_owner(config.path(), &b);
    let a_key = cloudlet_runtime::tls::key_hash(
        &cloudlet_runtime::tls::spki_of(&CertificateDer::from(a.identity())).unwrap(),
    );
    b.press();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Nothing listens there, or something that is not a Cloudlet: the
    // owner is told no box answered, not what the port said.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let talker = plain.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in plain.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut &s, b"SSH-2.0-OpenSSH_9.2\r\n");
        }
    });
    for to in ["127.0.0.1:1".to_owned(), talker.to_string()] {
        let (status, answer) = rt.block_on(join(
            config.path(),
            &b,
            &b_id,
            serde_json::json!({"address": to, "key": a_key}),
        ));
        assert_eq!(status, 502, "{answer}");
        assert_eq!(
            answer["reason"],
            format!("no Cloudlet answered at {to}"),
            "{answer}"
        );
    }
    // Two joins at once: one goes, the other is told the box is busy.
    let ask = || {
        join(
            config.path(),
            &b,
            &b_id,
            serde_json::json!({"address": a.addr.to_string(), "key": a_key}),
        )
    };
    let (first, second) = rt.block_on(async { tokio::join!(ask(), ask()) });
    let mut statuses = [first.0, second.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409], "{first:?} {second:?}");
    // A's window is closed: A refuses, and B says so.
    let mut state = serde_json::Value::Null;
    for _ in 0..100 {
        state = rt
            .block_on(owner_call(
                config.path(),
                &b,
                &b_id,
                "GET",
                "/api/pairing/join",
                None,
            ))
            .1;
        if state["state"] != "waiting" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(state["state"], "refused", "{state}");
    assert!(
        state["reason"]
            .as_str()
            .unwrap_or("")
            .contains("window is closed"),
        "{state}"
    );
}
