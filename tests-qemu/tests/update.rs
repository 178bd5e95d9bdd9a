//! Over-the-air updates on the real image: releases made from the built
//! one (its kernel and initramfs, its root filesystem with another version
//! in /etc/cloudlet/release), signed with the build's key and served by a
//! mirror on the host that the box reaches at 10.0.2.100 (QEMU `guestfwd`
//! through `tcp_pipe`). The test images settle for 5 s and give a boot 30 s
//! to become healthy, instead of the shipped 60 s and 5 min.
//!
//! QEMU runs with `-no-reboot`: every reboot (the updater's, init's after a
//! boot that never became healthy, the watchdog's) ends QEMU, and the test
//! boots the same disk again, as the box's power would stay on.

use std::time::Duration;

use anyhow::{bail, Result};
use cloudlet_testkit::mirror::Mirror;
use cloudlet_tests_qemu::update::{
    api, apply, boot_ready, boot_slot, boot_until_slot, bundle, bundle_with, hanging_bundle,
    install_and_reboot, make_release, on_box, signing_key, slot_digest, status, wait_outcome,
    Variant,
};
use cloudlet_tests_qemu::{Disk, Vm};
use serde_json::json;

const V1: &str = "0.1.1";
const V2: &str = "0.1.2";
const V3: &str = "0.1.3";

#[test]
fn a_box_updates_from_a_mirror_commits_after_settling_and_falls_back_from_a_release_that_never_gets_healthy(
) -> Result<()> {
    let key = signing_key()?;
    let work = tempfile::tempdir()?;
    let mirror = Mirror::start()?;
    let v2 = bundle(work.path(), V2, false, "qemu-virt", &key)?;
    mirror.put("/v2.cub", v2.clone());
    mirror.put("/v3.cub", bundle(work.path(), V3, true, "qemu-virt", &key)?);
    // Bad bundles, each refused before the boot state changes.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    // Streamed whole (no chunk index): a changed byte is read and refused.
    // (A delta install fetches only what slot A lacks and checks each chunk.)
    let mut corrupt = bundle_with(
        work.path(),
        V2,
        "qemu-virt",
        &key,
        Variant {
            chunk_index: false,
            ..Variant::default()
        },
    )?;
    let at = corrupt.len() / 3;
    corrupt[at] ^= 0x40;
    mirror.put("/corrupt.cub", corrupt);
    mirror.put(
        "/wrong-key.cub",
        bundle(work.path(), V2, false, "qemu-virt", &stranger)?,
    );
    mirror.put(
        "/wrong-board.cub",
        bundle(work.path(), V2, false, "rpi4", &key)?,
    );
    mirror.put(
        "/downgrade.cub",
        bundle(work.path(), "0.1.0", false, "qemu-virt", &key)?,
    );
    mirror.put("/truncated.cub", v2[..v2.len() / 2].to_vec());
    mirror.put("/unsigned.cub", b"this is not a signed bundle".to_vec());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let expired = cloudlet_bundle::Index {
        format: cloudlet_bundle::FORMAT,
        board: "qemu-virt".into(),
        version: V2.into(),
        url: "v2.cub".into(),
        size: v2.len() as u64,
        blake3: blake3::hash(&v2).to_hex().to_string(),
        created: now - 7200,
        expires: now - 3600,
    };
    mirror.put(
        "/expired/index",
        cloudlet_bundle::sign_index(&key, &expired)?.into_bytes(),
    );

    let disk = Disk::with_rootfs("1G", |t| make_release(t, V1, false))?;
    let (mut vm, slot) = boot_ready(&disk, &mirror)?;
    assert_eq!(slot, "A");
    let a = slot_digest(&mut vm, "A")?;
    for (name, says) in [
        ("/corrupt.cub", "does not match its hash"),
        ("/wrong-key.cub", "not signed by a key this box trusts"),
        ("/wrong-board.cub", "board"),
        ("/downgrade.cub", "not newer"),
        ("/truncated.cub", "ends|could not be read"),
        ("/unsigned.cub", "not a bundle|could not be read"),
    ] {
        let last = apply(&mut vm, &on_box(name), false)?;
        assert_eq!(last["kind"], "refused", "{name}: {last}");
        let message = last["message"].as_str().unwrap_or_default();
        assert!(
            says.split('|').any(|w| message.contains(w)),
            "{name}: {last}"
        );
    }
    let (code, v) = api(
        &mut vm,
        "PUT",
        "/api/update/channel",
        Some(json!({"url": on_box("/expired/index"), "auto_install": false})),
    )?;
    assert_eq!(code, 200, "{v}");
    let (code, v) = api(&mut vm, "POST", "/api/update/check", Some(json!({})))?;
    assert_eq!(code, 502, "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("expired"),
        "{v}"
    );
    assert_eq!(
        slot_digest(&mut vm, "A")?,
        a,
        "slot A changed while bad bundles were refused"
    );
    let s = status(&mut vm)?;
    assert_eq!(s["boot"]["order"], json!(["A", "B"]), "{s}");

    // v2 from the mirror: installed, the box reboots into it and commits it.
    let last = apply(&mut vm, &on_box("/v2.cub"), true)?;
    assert_eq!(last["kind"], "installed", "{last}");
    // init showed the updating pattern while it ran.
    assert!(
        vm.console().contains("update LED state=Installing"),
        "no updating LED"
    );
    vm.wait_exit(Duration::from_secs(90))?;
    drop(vm);
    let (mut vm, slot) = boot_ready(&disk, &mirror)?;
    assert_eq!(slot, "B");
    let s = wait_outcome(&mut vm, "committed", Duration::from_secs(30))?;
    assert_eq!(
        (s["version"].clone(), s["floor"].clone()),
        (json!(V2), json!(V2)),
        "{s}"
    );
    assert_eq!(slot_digest(&mut vm, "A")?, a, "the old slot A changed");

    // v3 never gets healthy: init reboots each try; U-Boot falls back to B.
    install_and_reboot(vm, &on_box("/v3.cub"))?;
    let (mut vm, tries) = boot_until_slot(
        &disk,
        &mirror,
        "B",
        "did not become healthy",
        Duration::from_secs(90),
    )?;
    assert_eq!(tries, 3, "slot A (v3) was tried {tries} times");
    let s = wait_outcome(&mut vm, "rolled-back", Duration::from_secs(30))?;
    assert_eq!(s["version"], V2, "{s}");
    assert!(
        s["last"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(V3),
        "{s}"
    );
    assert_eq!(s["boot"]["order"], json!(["B", "A"]), "{s}");
    // The error pattern, once.
    vm.poll("the rolled-back LED", Duration::from_secs(10), |vm| {
        Ok(vm
            .console()
            .contains("update LED state=RolledBack")
            .then_some(()))
    })?;
    Ok(())
}

/// Starts an install of `url` and pulls the power once `at` says so.
fn cut_when(vm: Vm, url: &str, mut at: impl FnMut(&mut Vm) -> Result<bool>) -> Result<()> {
    let mut vm = vm;
    let (code, v) = api(
        &mut vm,
        "POST",
        "/api/update/apply",
        Some(json!({"url": url, "reboot": true})),
    )?;
    if code != 202 {
        bail!("apply {url}: {code} {v}");
    }
    vm.poll(
        "the moment to pull the power",
        Duration::from_secs(300),
        |vm| at(vm).map(|b| b.then_some(())),
    )?;
    vm.pull_power()
}

#[test]
fn power_cuts_at_each_step_of_an_install_leave_a_box_that_boots_a_good_slot_and_updates_again(
) -> Result<()> {
    let key = signing_key()?;
    let work = tempfile::tempdir()?;
    let mirror = Mirror::start()?;
    // Streamed whole (no chunk index), so that download, write and
    // read-back each take long enough to be cut in.
    let v2 = bundle_with(
        work.path(),
        V2,
        "qemu-virt",
        &key,
        Variant {
            chunk_index: false,
            ..Variant::default()
        },
    )?;
    let size = v2.len();
    mirror.put("/v2.cub", v2);
    mirror.put(
        "/v3.cub",
        bundle(work.path(), V3, false, "qemu-virt", &key)?,
    );
    let disk = Disk::with_rootfs("1G", |t| make_release(t, V1, false))?;
    let phase = |vm: &mut Vm| -> Result<(String, String, u64, u64)> {
        let s = status(vm)?;
        let p = &s["progress"];
        Ok((
            s["phase"].as_str().unwrap_or_default().to_owned(),
            p["part"].as_str().unwrap_or_default().to_owned(),
            p["done"].as_u64().unwrap_or(0),
            p["total"].as_u64().unwrap_or(0),
        ))
    };

    // 1. mid-download, 2. mid-write of the root partition (the mirror holds
    // the answer there), 3. after the write, while it is read back (before
    // the boot-state change), 4. at the end of the read-back, next to the
    // boot-state write.
    let holds = [Some(size / 10), Some(size * 9 / 10), None, None];
    for (point, hold) in holds.into_iter().enumerate() {
        let (vm, slot) = boot_ready(&disk, &mirror)?;
        assert_eq!(slot, "A", "cut {point}: booted slot {slot}");
        mirror.hold_at(hold);
        let m = mirror.clone();
        cut_when(vm, &on_box("/v2.cub"), |vm| match point {
            0 | 1 => Ok(m.holding()),
            2 => Ok(phase(vm)?.0 == "verifying"),
            _ => match phase(vm) {
                // The last part read back, or the switch just written (the
                // reboot follows 1 s later): the cut lands around the
                // boot-state write.
                Ok((phase, part, done, total)) => Ok(phase == "reboot-pending"
                    || (part == "verify rootfs.squashfs" && done * 10 >= total * 9)),
                // Already going down for the reboot: cut now.
                Err(_) => Ok(true),
            },
        })?;
        mirror.hold_at(None);
    }
    // The box boots a good slot after each cut (A, or B had the switch been
    // written at the last one); the next install goes through.
    let (mut vm, slot) = boot_ready(&disk, &mirror)?;
    let s = status(&mut vm)?;
    if slot == "A" {
        assert_eq!(s["version"], V1, "{s}");
        install_and_reboot(vm, &on_box("/v2.cub"))?;
    } else {
        assert_eq!(s["version"], V2, "{s}");
        vm.pull_power()?;
    }
    // 5. during the first boot of the new slot, while the kernel starts.
    let (vm, slot) = boot_slot(&disk, &mirror)?;
    assert_eq!(slot, "B", "the new slot is not tried first");
    vm.pull_power()?;
    let (mut vm, slot) = boot_ready(&disk, &mirror)?;
    assert_eq!(slot, "B", "the new slot had tries left after one cut boot");
    let s = vm.poll("the commit", Duration::from_secs(30), |vm| {
        let s = status(vm)?;
        Ok((s["last"]["kind"] == "committed").then_some(s))
    })?;
    assert_eq!(s["version"], V2, "{s}");
    // And it updates again.
    let last = apply(&mut vm, &on_box("/v3.cub"), false)?;
    assert_eq!(last["kind"], "installed", "{last}");
    Ok(())
}

#[test]
fn a_full_data_partition_does_not_stop_an_install() -> Result<()> {
    let key = signing_key()?;
    let work = tempfile::tempdir()?;
    let mirror = Mirror::start()?;
    mirror.put(
        "/v2.cub",
        bundle(work.path(), V2, false, "qemu-virt", &key)?,
    );
    let disk = Disk::with_rootfs("1G", |t| make_release(t, V1, false))?;
    let (mut vm, _) = boot_ready(&disk, &mirror)?;
    // Paired first: the registry cannot add a device to a full disk.
    vm.token()?;
    // /data filled to the last block a service may have (ext4 keeps its
    // reserved blocks for root), as a user's files would fill it.
    vm.sh("fallocate -l $(($(df /data | tail -1 | awk '{print $4}') * 1024)) /data/storage/fill; sync")?;
    let free = vm.sh("df /data | tail -1 | awk '{print $4}'")?;
    assert_eq!(free.trim(), "0", "/data is not full: {free}");
    let last = apply(&mut vm, &on_box("/v2.cub"), false)?;
    assert_eq!(last["kind"], "installed", "{last}");
    let s = status(&mut vm)?;
    assert_eq!(s["boot"]["order"], json!(["B", "A"]), "{s}");
    Ok(())
}

#[test]
fn a_new_slot_whose_boot_hangs_is_reset_by_the_watchdog_and_the_box_falls_back() -> Result<()> {
    let key = signing_key()?;
    let work = tempfile::tempdir()?;
    let mirror = Mirror::start()?;
    mirror.put("/hang.cub", hanging_bundle(work.path(), V2, &key)?);
    let disk = Disk::with_rootfs("1G", |t| make_release(t, V1, false))?;
    let (vm, _) = boot_ready(&disk, &mirror)?;
    assert!(
        vm.console().contains("cloudlet: watchdog armed"),
        "U-Boot did not arm the watchdog"
    );
    install_and_reboot(vm, &on_box("/hang.cub"))?;
    // Only the watchdog ends those boots: nothing in them reboots.
    let (mut vm, hung) = boot_until_slot(
        &disk,
        &mirror,
        "A",
        "this initramfs hangs",
        Duration::from_secs(240),
    )?;
    assert_eq!(hung, 3, "slot B was tried {hung} times");
    let s = wait_outcome(&mut vm, "rolled-back", Duration::from_secs(60))?;
    assert_eq!(s["version"], V1, "{s}");
    Ok(())
}
