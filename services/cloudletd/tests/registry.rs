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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Sixteen connections that finished the D-Bus handshake and stay open:
    // this user's every place (the service itself holds none of them).
    let held: Vec<zbus::Connection> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..16 {
            v.push(
                cloudlet_runtime::registry::connect(&r.socket)
                    .await
                    .unwrap(),
            );
        }
        v
    });
    // The seventeenth is refused: the owner command cannot get through.
    let refused = r.owner(&["devices"]);
    assert!(refused.is_err(), "{refused:?}");
    // Closed, they give their places back.
    drop(held);
    drop(rt);
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

/// Sends a request's head (and `body`) on a fresh connection to `addr`.
fn raw(addr: SocketAddr, head: &str, body: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body).unwrap();
    c
}

#[test]
fn a_device_revoked_mid_request_loses_its_running_upload_and_download() {
    use std::io::Read;
    let d = tempfile::tempdir().unwrap();
    let storage = start("storage", d.path());
    let registry = storage.registry.clone();
    let (id, token) = add_device(&registry, "phone");
    const BIG: usize = 64 << 20;
    let owner = format!("Bearer {}", registry.token);
    let put = request(
        storage.addr,
        "PUT",
        "/files/big.bin",
        &[("Authorization", owner.as_str())],
        Body::Bytes(&vec![7u8; BIG]),
    )
    .unwrap();
    assert_eq!(put.status / 100, 2, "{}", put.text());

    // A download the device reads slowly, and an upload it has not finished.
    let mut down = raw(
        storage.addr,
        &format!(
            "GET /files/big.bin HTTP/1.1\r\nHost: box\r\nAuthorization: Bearer {token}\r\n\r\n"
        ),
        b"",
    );
    let mut first = vec![0u8; 1 << 20];
    down.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"), "{:?}", &first[..40]);
    let mut up = raw(
        storage.addr,
        &format!(
            "PUT /files/half.bin HTTP/1.1\r\nHost: box\r\nAuthorization: Bearer {token}\r\nContent-Length: {BIG}\r\n\r\n"
        ),
        &vec![1u8; 1 << 20],
    );
    std::thread::sleep(Duration::from_millis(300));

    registry.owner(&["revoke", &id]).unwrap();
    // The upload is answered 401 at once, not left to finish.
    let mut answer = String::new();
    let _ = up.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    // The download ends early: the connection is cut, not the whole file sent.
    let mut rest = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match down.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => rest += n,
        }
    }
    assert!(
        first.len() + rest < BIG,
        "the revoked device got the whole file ({} bytes)",
        first.len() + rest
    );
    // Nothing of the cut upload is kept; the owner still gets the file.
    let half = request(
        storage.addr,
        "GET",
        "/files/half.bin",
        &[("Authorization", owner.as_str())],
        Body::None,
    )
    .unwrap();
    assert_eq!(half.status, 404);
    assert_eq!(status(storage.addr, "/api/space", &registry.token), 200);
}

#[test]
fn sigkill_of_the_registry_mid_write_loses_no_acknowledged_device() {
    use std::process::{Command, Stdio};
    let d = tempfile::tempdir().unwrap();
    let socket = d.path().join("registry.sock");
    let start = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .args(["sharing", "--listen", "127.0.0.1:0", "--plain"])
            .env("CLOUDLET_DATA", d.path())
            .env("CLOUDLET_REGISTRY_SOCKET", &socket)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        common::follow(&mut c);
        c
    };
    let owner = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .arg("sharing")
            .args(args)
            .env("CLOUDLET_REGISTRY_SOCKET", &socket)
            .output()
            .unwrap()
    };
    let mut acknowledged: Vec<String> = Vec::new();
    // Rounds where the kill cut the adding short (a write was under way).
    let mut cut = 0;
    for round in 0..20u64 {
        let mut sharing = start();
        // Devices added as fast as the owner command goes, from a thread,
        // while this one kills the service at a different moment each round.
        let adder = {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for n in 0..50 {
                    let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
                        .args(["sharing", "add-device", &format!("r{round}-d{n}")])
                        .env("CLOUDLET_REGISTRY_SOCKET", &socket)
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        break;
                    }
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    if let Some(id) = text.lines().find_map(|l| l.strip_prefix("device ")) {
                        ids.push(id.trim().to_owned());
                    }
                }
                ids
            })
        };
        std::thread::sleep(Duration::from_millis(40 + 37 * (round % 7)));
        sharing.kill().unwrap();
        sharing.wait().unwrap();
        let added = adder.join().unwrap();
        if added.len() < 50 {
            cut += 1;
        }
        acknowledged.extend(added);
        // The registry opens again and lists every device it acknowledged.
        let mut again = start();
        let out = owner(&["devices"]);
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = String::from_utf8_lossy(&out.stdout).into_owned();
        for id in &acknowledged {
            assert!(
                list.contains(id.as_str()),
                "round {round}: device {id} was lost"
            );
        }
        again.kill().unwrap();
        again.wait().unwrap();
    }
    assert!(
        acknowledged.len() >= 20 && cut >= 15,
        "too little to test anything: {} devices added, {cut} of 20 rounds cut short",
        acknowledged.len()
    );
}
