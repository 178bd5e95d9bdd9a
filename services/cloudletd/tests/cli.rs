//! The `cloudlet` command on a PC against a real sharing service over TLS:
//! `cloudlet pair` shows the box ID and the code, pairs with the second
//! press and pins the box; `cloudlet devices` then works with the device's
//! key alone; the messages for a closed window and an unknown box are
//! clear. (`cloudletd sharing press` stands in for the button.)

mod common;

use common::{cloudlet, cloudlet_bin, text, Sharing};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn cloudlet_pair_shows_the_code_pairs_on_the_second_press_and_pins_the_box() {
    let d = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let s = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let host = s.addr.to_string();

    // The window is closed: a clear message, nothing kept.
    let out = cloudlet(config.path(), &["pair", &host, "--name", "laptop"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("pairing window is closed"),
        "{}",
        text(&out)
    );

    // Paired with no box yet: `devices` says so.
    let out = cloudlet(config.path(), &["devices"]);
    assert!(text(&out).contains("paired with no box"), "{}", text(&out));

    s.press();
    let mut pair = Command::new(cloudlet_bin())
        .args(["pair", &host, "--name", "laptop"])
        .env("CLOUDLET_CONFIG_DIR", config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(pair.stdout.take().unwrap()).lines();
    let mut shown = Vec::new();
    for line in lines.by_ref().map_while(Result::ok) {
        shown.push(line.clone());
        if line.starts_with("Waiting") {
            break;
        }
    }
    let box_id = shown
        .iter()
        .find_map(|l| l.strip_prefix("Box ID:"))
        .unwrap()
        .trim()
        .to_owned();
    let code = shown
        .iter()
        .find_map(|l| l.strip_prefix("Code:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(box_id.len(), 19, "{shown:?}");
    assert_eq!(code.len(), 6, "{shown:?}");
    // The confirming press, once the request is there (the first, refused
    // for the closed window, counts as one).
    s.wait_asks(2);
    s.press();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(pair.wait().unwrap().success(), "{rest:?}");
    assert!(
        rest.iter()
            .any(|l| l.contains(&format!("Paired with box {box_id} as owner"))),
        "{rest:?}"
    );
    // The box is pinned: its ID in boxes.json.
    let boxes = std::fs::read_to_string(config.path().join("boxes.json")).unwrap();
    assert!(boxes.contains(&box_id), "{boxes}");

    // `devices` works by the device's key alone, and knows which is this one.
    let out = cloudlet(config.path(), &["devices"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("laptop  (this device)"),
        "{}",
        text(&out)
    );
    let out = cloudlet(config.path(), &["devices", "--box", "zzzz-zzzz-zzzz-zzzz"]);
    assert!(
        text(&out).contains("no box zzzz-zzzz-zzzz-zzzz is paired"),
        "{}",
        text(&out)
    );
    // The owner cannot revoke itself while it is the last owner.
    let me = text(&cloudlet(config.path(), &["devices"]))
        .lines()
        .find(|l| l.contains("(this device)"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let out = cloudlet(config.path(), &["devices", "revoke", &me]);
    assert!(!out.status.success());
    assert!(text(&out).contains("last owner"), "{}", text(&out));

    // Another device's config, not paired: the box does not know it.
    let stranger = tempfile::tempdir().unwrap();
    std::fs::copy(
        config.path().join("boxes.json"),
        stranger.path().join("boxes.json"),
    )
    .unwrap();
    let out = cloudlet(stranger.path(), &["devices"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does not know this device"),
        "{}",
        text(&out)
    );
}
