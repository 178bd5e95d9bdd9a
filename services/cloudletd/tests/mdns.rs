//! The box on the LAN: the sharing service announces `_cloudlet._tcp`,
//! `_https._tcp` and `_webdavs._tcp` with its box ID, and both Debian's
//! `avahi-browse` and `cloudlet discover` find it. Everything stays on the
//! loopback interface: the test runs its own avahi-daemon limited to `lo`
//! (it needs root, as the README's test command has).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A system bus and an avahi-daemon that sees only `lo`, unless one runs.
fn avahi(dir: &Path) -> Vec<Killed> {
    let mut started = Vec::new();
    let running = |name: &str| {
        Command::new("pgrep")
            .args(["-x", name])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !running("dbus-daemon") {
        std::fs::create_dir_all("/run/dbus").unwrap();
        let _ = std::fs::remove_file("/run/dbus/pid");
        let c = Command::new("dbus-daemon")
            .args(["--system", "--nofork", "--nopidfile"])
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (Debian package dbus; scripts/setup installs it)");
        started.push(Killed(c));
        std::thread::sleep(Duration::from_millis(300));
    }
    if !running("avahi-daemon") {
        let conf = dir.join("avahi-daemon.conf");
        std::fs::write(
            &conf,
            "[server]\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces=lo\nenable-dbus=yes\n\
             [publish]\npublish-hinfo=no\npublish-workstation=no\n",
        )
        .unwrap();
        let c = Command::new("avahi-daemon")
            .arg("-f")
            .arg(&conf)
            .args(["--no-drop-root", "--no-chroot", "--no-rlimits"])
            .stderr(Stdio::null())
            .spawn()
            .expect("avahi-daemon (Debian package avahi-daemon; scripts/setup installs it)");
        started.push(Killed(c));
    }
    started
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_box_is_announced_with_its_id_and_avahi_browse_and_cloudlet_discover_find_it() {
    let d = tempfile::tempdir().unwrap();
    let _avahi = avahi(d.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let sharing = common::Sharing::start(d.path(), &listen, &[("CLOUDLET_MDNS_INTERFACE", "lo")]);
    // The identity is made at start; its box ID is what the records carry.
    let cert = sharing.identity();
    let spki =
        cloudlet_runtime::tls::spki_of(&rustls::pki_types::CertificateDer::from(cert)).unwrap();
    let box_id = cloudlet_runtime::tls::box_id(&spki);

    // avahi-browse: resolved records, parsable lines (-p), then exit (-t).
    let until = Instant::now() + Duration::from_secs(60);
    for ty in ["_cloudlet._tcp", "_https._tcp", "_webdavs._tcp"] {
        let seen = loop {
            let out = Command::new("avahi-browse")
                .args(["-rtp", ty])
                .output()
                .expect("avahi-browse (Debian package avahi-utils)");
            let seen = String::from_utf8_lossy(&out.stdout).into_owned();
            let found = seen
                .lines()
                .any(|l| l.starts_with('=') && l.contains(&format!("\"id={box_id}\"")));
            if found {
                break seen;
            }
            assert!(
                Instant::now() < until,
                "avahi-browse never saw {ty}: {seen}"
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        match ty {
            "_cloudlet._tcp" | "_https._tcp" => {
                assert!(seen.contains(&format!(";{port};")), "{seen}")
            }
            _ => assert!(
                seen.contains("\"path=/files/\"") && seen.contains(";8081;"),
                "{seen}"
            ),
        }
    }

    // cloudlet discover, on lo only.
    let cloudlet = Path::new(env!("CARGO_BIN_EXE_cloudletd")).with_file_name("cloudlet");
    assert!(
        cloudlet.exists(),
        "build the binaries first (cargo build --bins; scripts/test does)"
    );
    let config = tempfile::tempdir().unwrap();
    let out = Command::new(&cloudlet)
        .args(["discover", "--seconds", "4"])
        .env("CLOUDLET_MDNS_INTERFACE", "lo")
        .env("CLOUDLET_CONFIG_DIR", config.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&box_id) && l.contains(&format!(":{port}"))),
        "{text}"
    );

    // `cloudlet pair` finds the box by its ID, or as the one box on the
    // LAN, with no address given: the box answers (its window is closed).
    let pair = |args: &[&str]| {
        let out = Command::new(&cloudlet)
            .arg("pair")
            .args(args)
            .env("CLOUDLET_MDNS_INTERFACE", "lo")
            .env("CLOUDLET_CONFIG_DIR", config.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for args in [vec![box_id.as_str()], vec![]] {
        let said = pair(&args);
        assert!(
            said.contains(&format!("Box ID:  {box_id}")),
            "{args:?}: {said}"
        );
        assert!(
            said.contains("pairing window is closed"),
            "{args:?}: {said}"
        );
    }
    let said = pair(&["zzzz-zzzz-zzzz-zzzz"]);
    assert!(said.contains("did not answer on the LAN"), "{said}");
}
