//! The board's physical interface under QEMU: LEDs read from the LED panel
//! (a virtio-serial port), the button pressed through QMP.

use std::time::{Duration, Instant};

use anyhow::Result;
use cloudlet_tests_qemu::{cloudlet_bin, BootOptions, Disk, Vm};

/// Status LED changes (true = on) after `from`.
fn status_changes(vm: &Vm, from: Duration) -> Vec<(Duration, bool)> {
    vm.leds()
        .into_iter()
        .filter(|(t, l)| *t >= from && l.starts_with("status "))
        .map(|(t, l)| (t, l.ends_with(" on")))
        .collect()
}

fn led_state(vm: &mut Vm) -> Result<String> {
    Ok(vm.status()?.board.map(|b| b.led).unwrap_or_default())
}

#[test]
fn leds_blink_while_booting_and_hold_steady_when_ready() -> Result<()> {
    let disk = Disk::new("1G")?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    let ready = vm.wait_ready()?;
    let booting = status_changes(&vm, Duration::ZERO);
    let before: Vec<_> = booting.iter().filter(|(t, _)| *t < ready).collect();
    // Booting starts on, then alternates every 500 ms until ready.
    let first = before.first().expect("the status LED lit while booting");
    assert!(first.1, "booting starts with the LED on: {booting:?}");
    assert!(
        before.windows(2).all(|w| w[0].1 != w[1].1),
        "it alternates: {before:?}"
    );
    if ready.saturating_sub(first.0) > Duration::from_millis(700) {
        assert!(
            before.len() >= 2,
            "a boot this long shows a blink: {booting:?}"
        );
    }
    vm.poll("status LED on", Duration::from_secs(10), |vm| {
        Ok(status_changes(vm, Duration::ZERO)
            .last()
            .filter(|(_, on)| *on)
            .map(|_| ()))
    })?;
    assert!(vm.leds().iter().any(|(_, l)| l == "power on"));
    // Ready is steady: no changes over a 2 s window.
    let settled = vm.started.elapsed();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(
            status_changes(&vm, settled).is_empty(),
            "ready must not blink"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = vm.status()?;
    let board = s.board.expect("a board");
    assert_eq!(
        (board.name.as_str(), board.led.as_str(), board.watchdog),
        ("qemu-virt", "ready", true)
    );
    assert!(
        board.power.iter().any(|p| p.starts_with("cpu governor")),
        "{:?}",
        board.power
    );
    Ok(())
}

/// Pairing as a person does it: a press on the box (through QMP), `cloudlet
/// pair` on the host through the port forward, the code shown, the box's
/// owner (the device the tests pair as root) approving that code, a second
/// press; then the host's device reaches the box by its key alone.
#[test]
fn pressing_the_button_and_running_cloudlet_pair_pairs_the_host() -> Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let disk = Disk::new("1G")?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_ready()?;
    vm.poll("LED ready", Duration::from_secs(10), |vm| {
        Ok((led_state(vm)? == "ready").then_some(()))
    })?;
    let pressed = vm.started.elapsed();
    vm.press(200)?;
    let events = vm.poll("a short-press event", Duration::from_secs(20), |vm| {
        let out = vm.sh("cloudlet events")?;
        Ok(out.contains("short-press").then_some(out))
    })?;
    assert!(
        events.lines().any(|l| l.starts_with("1 short-press")),
        "{events}"
    );
    // The sharing service opened its window and the LED says so.
    vm.poll("LED pairing", Duration::from_secs(20), |vm| {
        Ok((led_state(vm)? == "pairing").then_some(()))
    })?;
    // Fast blink: 100 ms on, 100 ms off.
    vm.poll("pairing blinks", Duration::from_secs(20), |vm| {
        Ok((status_changes(vm, pressed).len() >= 10).then_some(()))
    })?;

    let config = tempfile::tempdir()?;
    let host = format!("127.0.0.1:{}", vm.ports["sharing"]);
    let mut pair = Command::new(cloudlet_bin())
        .args(["pair", &host, "--name", "qemu-host"])
        .env("CLOUDLET_CONFIG_DIR", config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(pair.stdout.take().expect("stdout")).lines();
    let mut shown = Vec::new();
    for line in lines.by_ref().map_while(std::result::Result::ok) {
        shown.push(line.clone());
        if line.starts_with("Waiting") {
            break;
        }
    }
    let code = shown
        .iter()
        .find_map(|l| l.strip_prefix("Code:"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_default();
    assert_eq!(code.len(), 6, "{shown:?}");
    // The box has the request, then the confirming press; a long poll on
    // the box sees that press too.
    vm.poll("the request on the box", Duration::from_secs(30), |vm| {
        let log = vm.sh("cloudlet service logs sharing")?;
        Ok(log
            .contains("a device asks to pair name=qemu-host")
            .then_some(()))
    })?;
    // The box has an owner (the tests' own device, which reads the LED
    // state): the owner approves by the code the host shows.
    let owner = format!("Bearer {}", vm.token()?);
    let body = format!("{{\"code\": \"{code}\"}}");
    let approved = vm.https(
        "sharing",
        "POST",
        "/api/pairing/approve",
        &[
            ("Authorization", &owner),
            ("Content-Type", "application/json"),
        ],
        cloudlet_testkit::http::Body::Bytes(body.as_bytes()),
    )?;
    assert_eq!(approved.status, 200, "{}", approved.text());
    let waiter = vm.sh("(cloudlet events --after 1 --wait 60 > /tmp/ev.txt &)")?;
    assert!(waiter.trim().is_empty(), "{waiter}");
    vm.press(200)?;
    let next = vm.poll("the waiter's event", Duration::from_secs(30), |vm| {
        let out = vm.sh("cat /tmp/ev.txt")?;
        Ok(out.contains("short-press").then_some(out))
    })?;
    assert!(next.trim_start().starts_with("2 short-press"), "{next}");
    let rest: Vec<String> = lines.map_while(std::result::Result::ok).collect();
    let status = pair.wait()?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = pair.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let log = vm.sh("cloudlet service logs sharing")?;
        panic!("cloudlet pair failed: {shown:?} {rest:?} {err}\nsharing's log:\n{log}");
    }
    assert!(rest.iter().any(|l| l.contains("as device")), "{rest:?}");
    // One success closes the window: the LED is back to ready.
    vm.poll("LED back to ready", Duration::from_secs(10), |vm| {
        Ok((led_state(vm)? == "ready").then_some(()))
    })?;
    // The host reaches the box by its key alone, pinning the box.
    let out = Command::new(cloudlet_bin())
        .args(["devices"])
        .env("CLOUDLET_CONFIG_DIR", config.path())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("qemu-host  (this device)"), "{text}");
    // And asks the box's status from the PC (no init socket here): the
    // same report as on the box, every service ready.
    let out = Command::new(cloudlet_bin())
        .args(["status", "--socket", "/nonexistent/control.sock"])
        .env("CLOUDLET_CONFIG_DIR", config.path())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ready:   yes"), "{text}");
    assert!(
        text.contains("sharing") && text.contains("storage"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_long_press_shuts_down_in_order() -> Result<()> {
    let disk = Disk::new("1G")?;
    let mut vm = Vm::boot(&disk, &BootOptions::default())?;
    vm.wait_ready()?;
    vm.press(3500)?;
    // Each step is looked for after the one before it on the console, so
    // this asserts the order: the request, every service stopped, /data
    // unmounted, then the power off (QEMU exits, LEDs dark).
    vm.wait_console("reason=\"long press\"", Duration::from_secs(30))?;
    vm.wait_console("all services stopped", Duration::from_secs(60))?;
    vm.wait_console("data unmounted cleanly", Duration::from_secs(60))?;
    assert!(vm.wait_exit(Duration::from_secs(60))?.success());
    let tail = vm.leds().last().cloned();
    assert_eq!(
        tail.map(|t| t.1).as_deref(),
        Some("power off"),
        "LEDs go dark at power-off"
    );
    Ok(())
}

/// Boots with the button pressed from the moment its driver is up (the
/// initramfs has loaded virtio_input by "mounting root") until init sees it.
fn boot_with_button_held(disk: &Disk) -> Result<Vm> {
    let mut vm = Vm::boot(disk, &BootOptions::default())?;
    vm.wait_console("mounting root", Duration::from_secs(60))?;
    vm.button(true)?;
    vm.wait_console("keep holding 10 s", Duration::from_secs(30))?;
    Ok(vm)
}

#[test]
fn factory_reset_needs_the_held_button_and_a_confirming_press() -> Result<()> {
    let disk = Disk::new("1G")?;
    {
        let mut vm = Vm::boot(&disk, &BootOptions::default())?;
        vm.wait_ready()?;
        vm.sh("mkdir -p /data/test && echo mine > /data/test/file")?;
        vm.power_off()?;
    }
    // A device paired before the reset, and the box's identity then.
    let (old_token, old_name) = {
        let mut vm = Vm::boot(&disk, &BootOptions::default())?;
        vm.wait_ready()?;
        let t = vm.token()?;
        let (code, _) = vm.http_get_auth("storage", "/api/space", Some(&format!("Bearer {t}")))?;
        assert_eq!(code, 200);
        let (_, name) = vm.tls()?;
        vm.power_off()?;
        (t, name)
    };
    // Held briefly at boot, then let go: nothing happens to /data.
    {
        let mut vm = boot_with_button_held(&disk)?;
        vm.button(false)?;
        vm.wait_console("no factory reset", Duration::from_secs(30))?;
        vm.wait_ready()?;
        assert_eq!(vm.sh("cat /data/test/file")?.trim(), "mine");
        vm.power_off()?;
    }
    // Held 10 s, released, confirmed with a short press: /data starts over.
    let mut vm = boot_with_button_held(&disk)?;
    let armed = vm.wait_console("factory reset armed", Duration::from_secs(30))?;
    vm.button(false)?;
    // The LED blinks while armed (its 50 ms pattern is checked in board/core's
    // unit tests; under emulation a test cannot assert how fast it blinks).
    vm.poll("reset-armed blinking", Duration::from_secs(10), |vm| {
        Ok((status_changes(vm, armed).len() >= 4).then_some(()))
    })?;
    // A person lets go, then presses again: not within the 30 ms debounce.
    std::thread::sleep(Duration::from_millis(500));
    vm.press(200)?;
    vm.wait_console("factory reset confirmed", Duration::from_secs(30))?;
    vm.wait_console("/data wiped", Duration::from_secs(30))?;
    vm.wait_ready()?;
    let data = vm.status()?.data.expect("data");
    assert!(data.created, "{data:?}");
    let (_, code) = vm.shell("test -e /data/test/file")?;
    assert_ne!(code, 0, "the old file is gone");
    // Every device is forgotten, and the box has a new identity.
    let (code, _) = vm.http_get_auth(
        "storage",
        "/api/space",
        Some(&format!("Bearer {old_token}")),
    )?;
    assert_eq!(code, 401, "a device paired before the reset is refused");
    let (_, name) = vm.tls()?;
    assert_ne!(name, old_name, "a new box identity");
    Ok(())
}
