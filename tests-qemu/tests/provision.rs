//! Flash-time provisioning on the real image: `cloudlet flash` writes the
//! built image to a card (a file here) with the box's identity and this
//! PC's key on the boot partition; the box's first boot takes them, and
//! the PC is its owner with no button pressed and no window opened.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use cloudlet_tests_qemu::{cloudlet_bin, out_dir, BootOptions, Disk, Vm};

fn cloudlet(config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(cloudlet_bin())
        .args(args)
        .env("CLOUDLET_CONFIG_DIR", config)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("cloudlet {args:?} failed: {text}");
    }
    Ok(text)
}

/// The names in a directory of the boot partition of a raw image (mtools),
/// or `None` when there is no such directory.
fn boot_dir(raw: &Path, dir: &str) -> Result<Option<String>> {
    let out = Command::new("mdir")
        .arg("-b")
        .arg("-i")
        .arg(format!("{}@@1M", raw.display()))
        .arg(format!("::{dir}"))
        .output()
        .map_err(|e| anyhow!("running mdir (scripts/setup installs mtools): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(out.status.success().then_some(text))
}

#[test]
fn a_flashed_card_boots_with_the_pc_as_owner_and_no_button() -> Result<()> {
    let config = tempfile::tempdir()?;
    let image = out_dir().join("cloudlet-qemu-aarch64.img");
    let mut flashed = String::new();
    let disk = Disk::written("1G", |card| {
        flashed = cloudlet(
            config.path(),
            &[
                "flash",
                &image.to_string_lossy(),
                &card.to_string_lossy(),
                "--name",
                "qemu-pc",
            ],
        )?;
        // The card holds the provisioning before its first boot.
        let on_card = boot_dir(card, "cloudlet-provision")?.unwrap_or_default();
        for name in ["identity.key", "identity.crt", "owner.crt", "owner.name"] {
            if !on_card.contains(name) {
                bail!("{name} is not on the flashed card: {on_card}");
            }
        }
        Ok(())
    })?;
    let box_id = flashed
        .lines()
        .find_map(|l| l.strip_prefix("Box ID:").map(|s| s.trim().to_owned()))
        .ok_or_else(|| anyhow!("flash printed no box ID: {flashed}"))?;

    // Step: first boot moves the files to /data before any service starts.
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_console("flash-time provisioning moved", Duration::from_secs(90))?;
    vm.wait_ready()?;

    // Step: the box is the one flash made, as its public route says.
    let identity = vm.https(
        "sharing",
        "GET",
        "/api/identity",
        &[],
        cloudlet_testkit::http::Body::None,
    )?;
    let id: serde_json::Value = serde_json::from_slice(&identity.body)?;
    assert_eq!(id["box_id"].as_str(), Some(box_id.as_str()), "{id}");

    // Step: the PC reaches it with its own key and the identity it pinned
    // when flashing, and is the owner, paired by flash. No press was made.
    let host = format!("127.0.0.1:{}", vm.ports["sharing"]);
    let list = cloudlet(
        config.path(),
        &["devices", "--box", &box_id, "--host", &host],
    )?;
    let me = list
        .lines()
        .find(|l| l.contains("(this device)"))
        .ok_or_else(|| anyhow!("the PC is not listed: {list}"))?;
    assert!(
        me.contains("owner") && me.contains("flash") && me.contains("qemu-pc"),
        "{list}"
    );
    assert_eq!(list.lines().count(), 2, "the owner alone: {list}");
    // As the owner it sees the pairing window, which nobody opened; the
    // address it reached the box at is kept, so no --host is needed now.
    let window = cloudlet(config.path(), &["pairing", "--box", &box_id, "show"])?;
    assert!(window.contains("the pairing window is closed"), "{window}");
    let log = vm.sh("cloudlet service logs sharing")?;
    assert!(!log.contains("pairing window open"), "{log}");

    // Step: the provisioned files are the sharing service's alone, and gone
    // once imported; the identity the box keeps is the one flashed.
    let left = vm.sh(
        "ls -A /data/sharing; test -e /data/sharing/provision && echo provision-left || echo provision-gone",
    )?;
    assert!(
        left.contains("identity.key") && left.contains("provision-gone"),
        "{left}"
    );
    let logs = vm.sh("cloudlet service logs sharing")?;
    assert!(
        logs.contains("imported the box identity") && logs.contains(&format!("box_id={box_id}")),
        "{logs}"
    );

    // Step: after a clean shutdown the boot partition no longer holds them.
    assert!(vm.power_off()?.success());
    let raw = disk.dir.path().join("after.img");
    disk.to_raw(&raw)?;
    assert_eq!(boot_dir(&raw, "cloudlet-provision")?, None);
    let root = boot_dir(&raw, "")?.unwrap_or_default();
    assert!(root.contains("boot.scr"), "the rest is there: {root}");
    Ok(())
}
