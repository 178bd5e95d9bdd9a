//! `cloudlet-update-bench`: the updater on the QEMU box against the same
//! box writing the same bytes raw, in one run.
//!
//! * Install time: a whole bundle (no chunk index, so it streams) from the
//!   host mirror into the other slot, timed from the request to the
//!   installed outcome (download, write, fsync, read-back of every part,
//!   boot-state switch); against root on the box piping the same bundle
//!   from the same mirror through `wget` into `dd` onto the other slot's
//!   partition, then `sync`. Both timed on the host.
//! * Bytes downloaded for an update that changes only the services
//!   (`/usr/bin/cloudletd`, the multi-call binary every service is, with a
//!   byte in every 64 KiB changed): a delta install against the running
//!   slot, counted by the mirror, against the whole bundle's size.
//!
//! Run it through `scripts/bench update`, which builds what it needs.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use cloudlet_testkit::mirror::Mirror;
use cloudlet_tests_qemu::update::{
    api, apply, boot_ready, bundle_with, make_release, on_box, signing_key, Variant,
};
use cloudlet_tests_qemu::Disk;
use serde_json::json;

fn main() -> Result<()> {
    let key = signing_key()?;
    let work = tempfile::tempdir()?;
    let mirror = Mirror::start()?;
    eprintln!("making the releases");
    let whole = bundle_with(
        work.path(),
        "0.1.2",
        "qemu-virt",
        &key,
        Variant {
            chunk_index: false,
            ..Variant::default()
        },
    )?;
    let delta = bundle_with(
        work.path(),
        "0.1.3",
        "qemu-virt",
        &key,
        Variant {
            rebuilt_services: true,
            ..Variant::default()
        },
    )?;
    mirror.put("/whole.cub", whole.clone());
    mirror.put("/delta.cub", delta.clone());
    let disk = Disk::with_rootfs("1G", |t| make_release(t, "0.1.1", false))?;
    eprintln!("booting the box");
    let (mut vm, _) = boot_ready(&disk, &mirror)?;

    const RUNS: usize = 3;
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for run in 0..RUNS {
        eprintln!("run {}: raw write", run + 1);
        let t = Instant::now();
        vm.sh(&format!(
            "wget -q -O - {} | dd of=/dev/vda3 bs=1M 2>/dev/null; sync",
            on_box("/whole.cub")
        ))?;
        raw.push(t.elapsed());
        eprintln!("run {}: install", run + 1);
        let t = Instant::now();
        let last = apply(&mut vm, &on_box("/whole.cub"), false)?;
        ours.push(t.elapsed());
        if last["kind"] != "installed" {
            bail!("the install did not finish: {last}");
        }
        // Cancel the switch, so that the next run installs again.
        let (code, v) = api(&mut vm, "POST", "/api/update/rollback", Some(json!({})))?;
        if code != 200 {
            bail!("cancelling the install: {code} {v}");
        }
    }

    eprintln!("delta install");
    let before = mirror.sent();
    let last = apply(&mut vm, &on_box("/delta.cub"), false)?;
    if last["kind"] != "installed" {
        bail!("the delta install did not finish: {last}");
    }
    let fetched = mirror.sent() - before;
    let message = last["message"].as_str().unwrap_or_default().to_owned();
    drop(vm);

    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (raw_t, ours_t) = (median(&mut raw), median(&mut ours));
    let mb = whole.len() as f64 / 1e6;
    println!(
        "update: the updater vs raw writes of the same bytes, QEMU (TCG, 1 CPU) box, mirror on the host"
    );
    println!("{:<52}{:>10}{:>12}{:>10}", "", "ours", "baseline", "ratio");
    println!(
        "{:<52}{:>10.2}{:>12.2}{:>9.2}x",
        format!("install {mb:.1} MB bundle, median of {RUNS} (s)"),
        ours_t.as_secs_f64(),
        raw_t.as_secs_f64(),
        ours_t.as_secs_f64() / raw_t.as_secs_f64()
    );
    println!(
        "{:<52}{:>10}{:>12}{:>9.1}%",
        "bytes downloaded, services rebuilt (delta vs whole)",
        fetched,
        delta.len(),
        fetched as f64 * 100.0 / delta.len() as f64
    );
    println!("baseline: install = wget | dd to the other slot's partition + sync; bytes = the whole bundle");
    println!("ours: download, write, fsync, read-back of every part, boot-state switch; delta: {message}");
    println!("goals: install within 1.2x of the raw write; a one-service update downloads < 10% of the bundle");
    Ok(())
}
