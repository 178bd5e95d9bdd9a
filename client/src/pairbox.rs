//! `cloudlet pair-box A B`: pairs two boxes this device owns with each
//! other, so that they can sync and share. The device is the one both boxes
//! trust, so it is what compares their codes:
//!
//! 1. both windows must be open (a press on each box);
//! 2. box B is asked to join box A, at the address this device knows for A
//!    (or `--address`), and checks that A shows the key pinned here;
//! 3. the code of B's session with A is read from B and approved on A,
//!    then a second press on A confirms;
//! 4. A pairs B as a box, and B, told so, adds A.
//!
//! The protocol and what it proves: services/sharing/README.md.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::remote::{call, Config};

/// How long to wait for the second press on the first box.
const SETTLE: Duration = Duration::from_secs(135);

fn open(which: &str, state: &serde_json::Value) -> Result<(), String> {
    if state["open"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(format!(
            "box {which}'s pairing window is closed: press its button once (and the other box's), then run this again"
        ))
    }
}

pub async fn pair_box(a: &str, b: &str, address: Option<&str>) -> Result<String, String> {
    let cfg = Config::open()?;
    let (a_id, a_box) = cfg.pinned(Some(a))?;
    let (b_id, b_box) = cfg.pinned(Some(b))?;
    if a_id == b_id {
        return Err("name two different boxes".into());
    }
    for (id, pinned) in [(&a_id, &a_box), (&b_id, &b_box)] {
        if pinned.role != "owner" {
            return Err(format!(
                "this device is not an owner of box {id}: only an owner of both boxes can pair them"
            ));
        }
    }
    open(
        &a_id,
        &call(Some(&a_id), "GET", "/api/pairing", None).await?,
    )?;
    open(
        &b_id,
        &call(Some(&b_id), "GET", "/api/pairing", None).await?,
    )?;
    // Read again: the call above keeps the address A answered at (a box
    // pinned at flashing has none until then).
    let (_, a_box) = cfg.pinned(Some(&a_id))?;
    let address = address.unwrap_or(&a_box.addr);
    let joined = call(
        Some(&b_id),
        "POST",
        "/api/pairing/join",
        Some(serde_json::json!({"address": address, "key": a_box.key})),
    )
    .await?;
    let code = joined["code"].as_str().unwrap_or_default().to_owned();
    if joined["box_id"].as_str() != Some(a_id.as_str()) || code.is_empty() {
        return Err(format!("box {b_id} answered the join oddly: {joined}"));
    }
    println!("Box {b_id} asked box {a_id} to pair; the code of their session is {code}.");
    // B answers once its session with A is up and asks right after: wait
    // until A has the request before approving it.
    let asked_by = Instant::now()
        .checked_add(Duration::from_secs(10))
        .unwrap_or_else(Instant::now);
    loop {
        let state = call(Some(&a_id), "GET", "/api/pairing", None).await?;
        if state["pending"]["kind"] == "box" {
            break;
        }
        if Instant::now() >= asked_by {
            return Err(format!("box {a_id} never saw box {b_id}'s request to pair"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Approve on A the code B's session shows: a relay between the boxes
    // would show A another code, and A would refuse this one.
    call(
        Some(&a_id),
        "POST",
        "/api/pairing/approve",
        Some(serde_json::json!({"code": code})),
    )
    .await?;
    println!("Approved on box {a_id}. Now press box {a_id}'s button once more to confirm.");
    let _ = std::io::stdout().flush();
    let until = Instant::now()
        .checked_add(SETTLE)
        .unwrap_or_else(Instant::now);
    loop {
        let state = call(Some(&b_id), "GET", "/api/pairing/join", None).await?;
        match state["state"].as_str() {
            Some("paired") => {
                return Ok(format!(
                    "Boxes {a_id} and {b_id} are paired with each other."
                ))
            }
            Some("refused") => {
                return Err(state["reason"]
                    .as_str()
                    .unwrap_or("the pairing was refused")
                    .to_owned())
            }
            _ if Instant::now() >= until => {
                return Err("the boxes did not finish pairing in time".into())
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}
