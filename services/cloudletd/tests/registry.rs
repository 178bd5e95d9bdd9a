//! The device registry as every service sees it, through real processes:
//! storage, sync and updater ask the sharing service over the bus, and a
//! revocation there is applied by all of them at once.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloudlet_testkit::http::{request, Body};

/// A service that is stopped when the test ends, passed or not.
struct Running(common::Spawned);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

impl std::ops::Deref for Running {
    type Target = common::Spawned;
    fn deref(&self) -> &common::Spawned {
        &self.0
    }
}

fn start(service: &str, data: &std::path::Path) -> Running {
    Running(common::spawn(service, data, &[], None))
}

fn status(addr: SocketAddr, path: &str, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    request(
        addr,
        "GET",
        path,
        &[("Authorization", auth.as_str())],
        Body::None,
    )
    .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    .status
}

/// A private route of each service: (name, address, path).
fn private_routes(services: &[(&str, Running)]) -> Vec<(String, SocketAddr, &'static str)> {
    let mut out: Vec<(String, SocketAddr, &'static str)> = services
        .iter()
        .map(|(name, s)| {
            let path = match *name {
                "storage" => "/api/space",
                "sync" => "/_all_dbs",
                _ => "/api/version",
            };
            (name.to_string(), s.addr, path)
        })
        .collect();
    out.push((
        "sharing".into(),
        services[0].1.registry.addr,
        "/api/devices",
    ));
    out
}

fn add_device(r: &common::Registry, name: &str) -> (String, String) {
    let out = r.owner(&["add-device", name]).unwrap();
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_owned()
    };
    (field("device "), field("token "))
}

#[test]
fn a_revoked_device_is_refused_by_every_service_within_a_second() {
    let d = tempfile::tempdir().unwrap();
    let services: Vec<(&str, Running)> = ["storage", "sync", "updater"]
        .into_iter()
        .map(|n| (n, start(n, d.path())))
        .collect();
    let registry = services[0].1.registry.clone();
    let (id, token) = add_device(&registry, "phone");
    let routes = private_routes(&services);
    // Let in everywhere, which also puts the answer in each service's cache.
    for (name, addr, path) in &routes {
        assert_eq!(status(*addr, path, &token), 200, "{name} {path}");
        assert_eq!(status(*addr, path, "not-a-device"), 401, "{name} {path}");
    }
    registry.owner(&["revoke", &id]).unwrap();
    let revoked_at = Instant::now();
    for (name, addr, path) in &routes {
        // The registry's signal clears the caches; without it they would
        // let the device in for another minute.
        let mut last = 0;
        while revoked_at.elapsed() < Duration::from_secs(1) {
            last = status(*addr, path, &token);
            if last == 401 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            last, 401,
            "{name} still lets the revoked device in after a second"
        );
    }
    // The device the tests paired first is untouched.
    for (name, addr, path) in &routes {
        assert_eq!(status(*addr, path, &registry.token), 200, "{name} {path}");
    }
}

#[test]
fn without_the_registry_a_service_refuses_with_503_even_a_device_it_let_in() {
    let d = tempfile::tempdir().unwrap();
    let storage = start("storage", d.path());
    let token = storage.registry.token.clone();
    assert_eq!(status(storage.addr, "/api/space", &token), 200);
    storage.registry.stop();
    // A cached yes is not trusted once the registry is gone: it might have
    // been revoked meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = 0;
    while Instant::now() < deadline {
        last = status(storage.addr, "/api/space", &token);
        if last == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(last, 503, "fails closed");
    assert_eq!(
        status(storage.addr, "/health", ""),
        200,
        "health stays public"
    );
}

#[test]
fn the_last_owner_cannot_be_revoked_and_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let storage = start("storage", d.path());
    let r = &storage.registry;
    let list: serde_json::Value = serde_json::from_str(&r.owner(&["devices"]).unwrap()).unwrap();
    let owner = list[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(list[0]["role"], "owner");
    assert_eq!(list[0]["paired_how"], "local");
    let e = r.owner(&["revoke", &owner]).unwrap_err();
    assert!(e.contains("last owner"), "{e}");
    let e = r.owner(&["revoke", "nobody"]).unwrap_err();
    assert!(e.contains("no device"), "{e}");
    let e = r.owner(&["add-device", "x", "emperor"]).unwrap_err();
    assert!(e.contains("unknown role"), "{e}");
    assert_eq!(status(storage.addr, "/api/space", &r.token), 200);
}

#[test]
fn one_user_holding_many_bus_connections_is_capped_and_its_places_come_back() {
    let d = tempfile::tempdir().unwrap();
    let r = common::registry(d.path());
    // Sixteen connections that never finish the D-Bus handshake: this
    // user's every place (the service itself holds none of them).
    let held: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(&r.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // The seventeenth is refused: the owner command cannot get through.
    let refused = r.owner(&["devices"]);
    assert!(refused.is_err(), "{refused:?}");
    // Closed (or timed out, after 5 s), they give their places back.
    drop(held);
    let start = Instant::now();
    loop {
        match r.owner(&["devices"]) {
            Ok(list) => {
                assert!(list.contains("tests"), "{list}");
                break;
            }
            Err(_) if start.elapsed() < Duration::from_secs(15) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("the bus never took a connection again: {e}"),
        }
    }
}
