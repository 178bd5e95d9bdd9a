//! Sync on the real box: PouchDB (Node, on the host) pushes documents into
//! the box's sync service over TLS through QEMU's port forward, the power is
//! pulled mid-push, and after the box boots again every acknowledged
//! document is there, update_seq did not go back, and a second push resumes
//! from PouchDB's checkpoint and completes
//! (services/sync/tests-node/crash-replicate.js does the checks).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use cloudlet_tests_qemu::{root, BootOptions, Disk, Vm};

/// The directory of the Node tests, with PouchDB installed.
fn node_tests() -> Result<PathBuf> {
    let dir = root().join("services/sync/tests-node");
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        bail!("node is not installed: scripts/setup installs it (Debian package nodejs)");
    }
    if !dir.join("node_modules/pouchdb-core").is_dir() {
        bail!("PouchDB is not installed for the Node tests: run `npm ci --ignore-scripts --prefix services/sync/tests-node` (scripts/setup does)");
    }
    Ok(dir)
}

/// Boots `disk` until every service is ready and the sync service answers
/// through its forwarded port; the URL PouchDB uses (a device paired on the
/// box by root on the console).
fn boot(disk: &Disk, ca: &Path) -> Result<(Vm, String)> {
    let mut vm = Vm::boot(disk, &BootOptions::default())?;
    vm.wait_ready()?;
    let token = vm.token()?;
    let auth = format!("Bearer {token}");
    let r = vm
        .https(
            "sync",
            "GET",
            "/",
            &[("Authorization", &auth)],
            cloudlet_testkit::http::Body::None,
        )
        .context("the sync service through its forwarded port")?;
    if r.status != 200 || !r.text().contains("\"couchdb\"") {
        bail!(
            "the sync service answered GET / with {}: {}",
            r.status,
            r.text()
        );
    }
    // Node trusts the box's identity certificate (read from its disk, as a
    // paired client has it) as its only extra CA.
    let hex = vm.sh("od -An -v -tx1 /data/sharing/identity.crt")?;
    let der: Vec<u8> = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("identity.crt as hex: {e}"))?;
    std::fs::write(ca, cloudlet_runtime::tls::pem("CERTIFICATE", &der))?;
    let url = format!("https://pouch:{token}@127.0.0.1:{}", vm.ports["sync"]);
    Ok((vm, url))
}

#[test]
fn pulling_the_power_mid_pouchdb_push_loses_no_acknowledged_document() -> Result<()> {
    let dir = node_tests()?;
    let disk = Disk::new("1G")?;
    let ca = disk.dir.path().join("box-ca.pem");
    eprintln!("step: boot the box");
    let (vm, url) = boot(&disk, &ca)?;
    let mut vm = Some(vm);
    eprintln!("step: PouchDB pushes documents into the box");
    let mut node = Command::new("node")
        .arg("crash-replicate.js")
        .current_dir(&dir)
        .env("SYNC_URL", &url)
        .env("NODE_EXTRA_CA_CERTS", &ca)
        .env("CRASH_ROUNDS", "1")
        .env("CRASH_DOCS", "600")
        .env("CRASH_KILL_AFTER", "3")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running node")?;
    let mut to_node = node.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    let mut err = node.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let stderr = std::thread::spawn(move || {
        let mut t = String::new();
        let _ = err.read_to_string(&mut t);
        t
    });
    let out = node.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (mut pulls, mut passed) = (0, false);
    for line in BufReader::new(out).lines() {
        let line = line?;
        eprintln!("node: {line}");
        if line == "kill" {
            eprintln!("step: pull the power mid-push, boot again");
            vm.take().ok_or_else(|| anyhow!("no box"))?.pull_power()?;
            pulls += 1;
            let (again, url) = boot(&disk, &ca)?;
            vm = Some(again);
            writeln!(to_node, "url {url}")?;
            eprintln!("step: check what the box kept, push again");
        }
        passed |= line == "all passed";
    }
    let status = node.wait()?;
    let stderr = stderr.join().map_err(|_| anyhow!("stderr reader"))?;
    if !(status.success() && passed) {
        bail!("PouchDB's checks failed after the power pull ({status}):\n{stderr}");
    }
    assert_eq!(pulls, 1, "one power pull");
    Ok(())
}
