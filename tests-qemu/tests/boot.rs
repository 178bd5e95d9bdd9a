//! The image boots through U-Boot, init brings every service up, restarts
//! what crashes, and shuts down cleanly on the power button.

use std::time::Duration;

use anyhow::Result;
use cloudlet_proto::control::ServiceState;
use cloudlet_tests_qemu::{BootOptions, Disk, Vm};

const SERVICES: [&str; 5] = ["dhcp", "storage", "sync", "sharing", "updater"];

#[test]
fn boots_and_every_service_reports_ready() -> Result<()> {
    let disk = Disk::new("1G")?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_console(
        "cloudlet: booting slot A (A left 2, B left 0",
        Duration::from_secs(60),
    )?;
    vm.wait_ready()?;

    // Step: init's view of every service.
    let s = vm.status()?;
    assert!(s.all_ready);
    assert_eq!(s.slot.as_deref(), Some("A"));
    for name in SERVICES {
        let svc = s
            .services
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(svc.state, ServiceState::Ready, "{name}: {svc:?}");
        assert!(svc.pid.is_some());
    }
    assert!(s.hostname.starts_with("cloudlet-"), "{}", s.hostname);

    // Step: first boot grew /data to fill the 1 GiB disk.
    let data = s.data.expect("data mounted");
    assert!(data.grown && !data.created && data.was_clean, "{data:?}");
    assert!(data.size_bytes > 700 << 20, "{data:?}");

    // Step: each service answers over the network, through QEMU's port
    // forwards: /health to anyone, everything else only with the credential.
    for (svc, path) in [
        ("sharing", "/"),
        ("sharing", "/api/status"),
        ("storage", "/api/space"),
        ("updater", "/api/version"),
        ("sync", "/"),
    ] {
        let (code, _) = vm.http_get(svc, "/health")?;
        assert_eq!(code, 200, "{svc}/health");
        let (code, _) = vm.http_get(svc, path)?;
        assert_eq!(code, 401, "{svc}{path} without the credential");
        let (code, body) = vm.http_get_private(svc, path)?;
        assert_eq!(code, 200, "{svc}{path}: {body}");
    }
    let (_, page) = vm.http_get_private("sharing", "/")?;
    assert!(
        page.contains(&s.hostname) && page.contains("all services ready"),
        "{page}"
    );
    let (_, v) = vm.http_get_private("updater", "/api/version")?;
    assert!(v.contains(r#""slot":"A""#), "{v}");

    // Step: storage serves nothing without a paired device's credential;
    // a device root pairs on the box gets in; the registry is private.
    let (code, _) = vm.http_get("storage", "/")?;
    assert_eq!(code, 401);
    let (code, _) = vm.http_get_auth("storage", "/", Some("Bearer 0000"))?;
    assert_eq!(code, 401);
    let token = vm.token()?;
    let (code, body) = vm.http_get_auth("storage", "/", Some(&format!("Bearer {token}")))?;
    assert_eq!(code, 200, "{body}");
    for private in ["registry.redb", "identity.key"] {
        assert_eq!(
            vm.sh(&format!("stat -c %a:%U /data/sharing/{private}"))?
                .trim(),
            "600:sharing",
            "{private}"
        );
    }
    // Every service answers over TLS only, with a certificate the box's
    // identity signed (the client pins it: see Vm::tls), and plain HTTP
    // gets nothing.
    let plain = cloudlet_testkit::http::request(
        std::net::SocketAddr::from(([127, 0, 0, 1], vm.ports["storage"])),
        "GET",
        "/health",
        &[],
        cloudlet_testkit::http::Body::None,
    );
    assert!(plain.map(|r| r.status != 200).unwrap_or(true));
    let identity = vm.https(
        "sharing",
        "GET",
        "/api/identity",
        &[],
        cloudlet_testkit::http::Body::None,
    )?;
    let (_, name) = vm.tls()?;
    let id: serde_json::Value = serde_json::from_slice(&identity.body)?;
    let box_id = id["box_id"].as_str().unwrap_or_default();
    assert_eq!(
        name,
        format!("{}.cloudlet", box_id.replace('-', "")),
        "{id}"
    );
    let logs = vm.sh("cloudlet service logs sharing")?;
    assert!(logs.contains(&format!("box_id={box_id}")), "{logs}");
    // A service user may ask the registry but not change it.
    let refused = vm
        .sh("busybox su -s /bin/sh storage -c 'cloudletd sharing add-device x' 2>&1; echo rc=$?")?;
    assert!(
        refused.contains("only root") && refused.contains("rc=1"),
        "{refused}"
    );

    // Step: the healthy boot was committed (tries back to 3 in the boot
    // state), once every service had stayed ready for the manifest's 60 s.
    vm.wait_console("boot marked good", Duration::from_secs(120))?;

    // Step: services run as their own users, not root.
    let ps = vm.sh("ps -o user,args | grep '[c]loudletd'")?;
    for user in ["storage", "sync", "sharing", "updater"] {
        assert!(ps.lines().any(|l| l.trim_start().starts_with(user)), "{ps}");
    }

    // Step: the box trusts the key that signed this build's update bundle,
    // and that bundle verifies with the key as the box has it.
    let on_box = vm.sh("cat /etc/cloudlet/update-keys/*.pub")?;
    assert_eq!(on_box.trim().len(), 64, "{on_box:?}");
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("box.pub"), on_box.trim())?;
    let bundle = std::fs::read_dir(cloudlet_tests_qemu::out_dir())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "cub"))
        .expect("scripts/build-image made an update bundle");
    let keys = cloudlet_bundle::load_trusted(dir.path())?;
    let m = cloudlet_bundle::verify(
        std::io::BufReader::new(std::fs::File::open(&bundle)?),
        &keys,
        |_| Ok(std::io::sink()),
    )?;
    assert_eq!(m.board, "qemu-virt");
    Ok(())
}

/// A release whose service manifest is broken serves nothing: its boot must
/// never be marked good, so the boot counter runs down and U-Boot falls back.
#[test]
fn a_boot_with_a_broken_manifest_is_not_committed() -> Result<()> {
    let disk = Disk::with_rootfs("1G", |root| {
        std::fs::write(
            root.join("etc/cloudlet/services.toml"),
            "[[service]\nthis is not a manifest\n",
        )?;
        Ok(())
    })?;
    {
        let mut vm = Vm::boot(&disk, &BootOptions::default())?;
        vm.wait_console(
            "cloudlet: booting slot A (A left 2, B left 0",
            Duration::from_secs(60),
        )?;
        // Step: init reads the manifest, runs nothing and says the boot stays unproven.
        vm.wait_console("running no services", Duration::from_secs(60))?;
        vm.wait_console(
            "no services to run; this boot will not be marked good",
            Duration::from_secs(30),
        )?;
        assert!(
            !vm.console().contains("boot marked good"),
            "a boot with no services was committed"
        );
        vm.pull_power()?;
    }
    // Step: the next boot of slot A has one try fewer: the first was not
    // committed (a committed boot puts the tries back to 3, which would show
    // as "A left 2" again).
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_console(
        "cloudlet: booting slot A (A left 1, B left 0",
        Duration::from_secs(60),
    )?;
    Ok(())
}

#[test]
fn a_crashed_service_is_restarted() -> Result<()> {
    let disk = Disk::new("1G")?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_ready()?;
    let before = vm.status()?;
    let sync = before
        .services
        .iter()
        .find(|s| s.name == "sync")
        .expect("sync")
        .clone();
    let pid = sync.pid.expect("sync pid");
    vm.sh(&format!("kill -9 {pid}"))?;
    let after = vm.poll("sync restarted", Duration::from_secs(60), |vm| {
        let s = vm.status()?;
        let x = s.services.into_iter().find(|s| s.name == "sync");
        Ok(x.filter(|x| x.restarts == 1 && x.state == ServiceState::Ready))
    })?;
    assert_ne!(after.pid, Some(pid));
    assert_eq!(after.last_exit.as_deref(), Some("killed by SIGKILL"));
    let (code, _) = vm.http_get_private("sync", "/")?;
    assert_eq!(code, 200);
    let logs = vm.sh("cloudlet service logs sync")?;
    assert!(logs.contains("exited: killed by SIGKILL"), "{logs}");
    Ok(())
}

#[test]
fn power_button_shuts_down_cleanly_and_data_survives() -> Result<()> {
    let disk = Disk::new("1G")?;
    {
        let mut vm = Vm::boot(&disk, &BootOptions::default())?;
        vm.wait_ready()?;
        // Committed after every service has stayed ready for 60 s.
        vm.wait_console("boot marked good", Duration::from_secs(120))?;
        // No sync: the orderly shutdown must get it to the disk.
        vm.sh("mkdir -p /data/test && echo 'kept across power-off' > /data/test/hello")?;
        vm.power_button()?;
        vm.wait_console("orderly shutdown", Duration::from_secs(30))?;
        vm.wait_console("data unmounted cleanly", Duration::from_secs(60))?;
        let st = vm.wait_exit(Duration::from_secs(60))?;
        assert!(st.success(), "{st}");
    }
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    // The first boot's commit put A back to 3 tries, so this boot shows 2 again.
    vm.wait_console(
        "cloudlet: booting slot A (A left 2",
        Duration::from_secs(60),
    )?;
    vm.wait_ready()?;
    let s = vm.status()?;
    let data = s.data.expect("data mounted");
    assert!(
        data.was_clean,
        "the next boot found /data not cleanly unmounted: {data:?}"
    );
    assert!(!data.grown && !data.created);
    assert_eq!(
        vm.sh("cat /data/test/hello")?.trim(),
        "kept across power-off"
    );
    Ok(())
}

#[test]
fn control_request_reboots_into_the_same_slot() -> Result<()> {
    let disk = Disk::new("1G")?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_ready()?;
    let first = vm.status()?.hostname;
    // -no-reboot turns the guest's reboot into a QEMU exit.
    // The console shell is stopped by the reboot it asks for: do not wait on it.
    vm.type_line("cloudlet reboot")?;
    vm.wait_console("reason=\"control request\"", Duration::from_secs(30))?;
    vm.wait_console("data unmounted cleanly", Duration::from_secs(60))?;
    vm.wait_exit(Duration::from_secs(60))?;
    drop(vm);
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_ready()?;
    let s = vm.status()?;
    assert_eq!(s.hostname, first, "the hostname is kept on /data");
    assert!(s.data.expect("data").was_clean);
    Ok(())
}

#[test]
fn an_empty_data_partition_gets_a_new_filesystem() -> Result<()> {
    let disk = Disk::new("1G")?;
    let (offset, _) = disk.partition(4)?;
    // No ext4 superblock any more: as on a card whose data partition was never formatted.
    disk.zero(offset, 4 << 20)?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_console("making one", Duration::from_secs(90))?;
    vm.wait_ready()?;
    let data = vm.status()?.data.expect("data mounted");
    assert!(data.created && data.grown, "{data:?}");
    assert!(
        data.size_bytes > 700 << 20,
        "made to fill the grown partition: {data:?}"
    );
    assert!(vm.sh("grep ' /data ext4 ' /proc/mounts")?.contains("rw"));
    Ok(())
}

#[test]
fn pulling_the_power_loses_no_synced_file() -> Result<()> {
    let disk = Disk::new("1G")?;
    {
        let mut vm = Vm::boot(&disk, &BootOptions::default())?;
        vm.wait_ready()?;
        vm.sh("mkdir -p /data/test && echo durable > /data/test/synced && sync")?;
        vm.pull_power()?;
    }
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_ready()?;
    let data = vm.status()?.data.expect("data mounted after a power cut");
    assert!(
        !data.was_clean,
        "a power cut must show as an unclean unmount: {data:?}"
    );
    assert_eq!(vm.sh("cat /data/test/synced")?.trim(), "durable");
    Ok(())
}
