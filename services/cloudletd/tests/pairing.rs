//! Pairing with the button, through a real sharing service over TLS and
//! real TLS clients that each have their own key: the press opens the
//! window, a second press pairs the one device waiting, two devices at once
//! abort both, a later device needs an owner to type the code it shows,
//! and wrong codes close the window. (`cloudletd sharing press` stands in
//! for the button on a host; the QEMU tests press the real one.)

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

mod common;

use common::Sharing;

use cloudlet_runtime::tls;
use cloudlet_testkit::http::{request_on, Body, Response};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

/// A device: its own key and certificate, pinning the box's identity.
#[derive(Clone)]
struct Device {
    config: Arc<rustls::ClientConfig>,
    name: String,
}

impl Device {
    fn new(box_identity: &CertificateDer<'static>, with_cert: bool) -> Device {
        let (config, name) = common::pinning_client(box_identity, with_cert);
        Device { config, name }
    }

    /// Connects; the session's pairing code (as the device shows it) and
    /// the stream to send one request on.
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> (
        String,
        rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    ) {
        let conn = rustls::ClientConnection::new(
            self.config.clone(),
            ServerName::try_from(self.name.clone()).unwrap(),
        )
        .unwrap();
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(200)))
            .unwrap();
        let mut s = rustls::StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        let binding = tls::session_binding(&s.conn).unwrap();
        (tls::pairing_code(&binding), s)
    }

    fn call(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (_, s) = self.connect(addr);
        answer(send(s, method, path, body))
    }

    /// Asks to pair in a thread: the code it shows at once, the answer later.
    fn ask(&self, addr: SocketAddr, name: &str) -> (String, std::thread::JoinHandle<(u16, Value)>) {
        let (code, s) = self.connect(addr);
        let name = name.to_owned();
        let t = std::thread::spawn(move || {
            answer(send(s, "POST", "/pair", Some(json!({"name": name}))))
        });
        (code, t)
    }
}

fn send(
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Response {
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let b = if bytes.is_empty() {
        Body::None
    } else {
        Body::Bytes(bytes.as_bytes())
    };
    request_on(s, method, path, &[("Content-Type", "application/json")], b).unwrap()
}

fn answer(r: Response) -> (u16, Value) {
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

#[test]
fn pairing_needs_a_press_in_the_window_then_a_second_press_and_later_an_owner() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let box_identity = CertificateDer::from(sharing.identity());
    let laptop = Device::new(&box_identity, true);

    // No press: the window is closed.
    let (status, body) = laptop.call(
        sharing.addr,
        "POST",
        "/pair",
        Some(json!({"name": "laptop"})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("window_closed")),
        "{body}"
    );
    // Without a client certificate there is nothing to pair.
    let anonymous = Device::new(&box_identity, false);
    let (status, body) = anonymous.call(sharing.addr, "POST", "/pair", Some(json!({"name": "x"})));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("needs_client_certificate"))
    );

    // Press, ask, press again: the first device becomes the owner.
    sharing.press();
    let (_code, waiting) = laptop.ask(sharing.addr, "laptop");
    sharing.wait_asks(2);
    sharing.press();
    let (status, paired) = waiting.join().unwrap();
    assert_eq!(status, 200, "{paired}");
    assert_eq!(paired["role"], "owner");
    let spki = tls::spki_of(&box_identity).unwrap();
    assert_eq!(paired["box_key"], tls::key_hash(&spki), "the key to pin");
    // From now on its key is its credential, with no token.
    let (status, list) = laptop.call(sharing.addr, "GET", "/api/devices", None);
    assert_eq!(status, 200);
    assert_eq!(list["devices"][0]["paired_how"], "button");
    assert_eq!(list["you"], paired["device"]);

    // Two devices in one window: both refused, nobody paired.
    let (phone, tablet) = (
        Device::new(&box_identity, true),
        Device::new(&box_identity, true),
    );
    sharing.press();
    let (_, a) = phone.ask(sharing.addr, "phone");
    sharing.wait_asks(3);
    let (_, b) = tablet.ask(sharing.addr, "tablet");
    for t in [a, b] {
        let (status, body) = t.join().unwrap();
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("overlap")),
            "{body}"
        );
    }
    assert_eq!(phone.call(sharing.addr, "GET", "/api/devices", None).0, 401);

    // With an owner, the press alone is not enough: the owner types the
    // code the new device shows, and a wrong one is refused.
    sharing.press();
    let (code, waiting) = phone.ask(sharing.addr, "phone");
    sharing.wait_asks(5);
    let (_, seen) = laptop.call(sharing.addr, "GET", "/api/pairing", None);
    assert_eq!(seen["pending"]["name"], "phone");
    // The owner sees where it asks from (a device spoiling pairings can be found).
    assert_eq!(seen["pending"]["from"], "127.0.0.1");
    // The owner is not shown the box's code: it must read the device's.
    assert!(seen["pending"].get("code").is_none(), "{seen}");
    sharing.press();
    let wrong = if code == "000000" { "000001" } else { "000000" };
    let (status, _) = laptop.call(
        sharing.addr,
        "POST",
        "/api/pairing/approve",
        Some(json!({"code": wrong})),
    );
    assert_eq!(status, 422);
    // Only an owner may approve.
    assert_eq!(
        tablet
            .call(
                sharing.addr,
                "POST",
                "/api/pairing/approve",
                Some(json!({"code": code}))
            )
            .0,
        401
    );
    let (status, _) = laptop.call(
        sharing.addr,
        "POST",
        "/api/pairing/approve",
        Some(json!({"code": code})),
    );
    assert_eq!(status, 200);
    let (status, paired) = waiting.join().unwrap();
    assert_eq!(
        (status, paired["role"].as_str()),
        (200, Some("device")),
        "{paired}"
    );
    let (_, list) = laptop.call(sharing.addr, "GET", "/api/devices", None);
    let phone_row = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "phone")
        .cloned()
        .unwrap();
    assert_eq!(phone_row["paired_how"], "button-and-owner");
    // A device may not approve others' pairings or revoke the owner.
    assert_eq!(phone.call(sharing.addr, "GET", "/api/pairing", None).0, 403);
}

#[test]
fn guessing_codes_is_limited_to_a_few_per_window() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let box_identity = CertificateDer::from(sharing.identity());
    let owner = Device::new(&box_identity, true);
    sharing.press();
    let (_, t) = owner.ask(sharing.addr, "owner");
    sharing.wait_asks(1);
    sharing.press();
    assert_eq!(t.join().unwrap().0, 200);

    let stranger = Device::new(&box_identity, true);
    sharing.press();
    let (code, waiting) = stranger.ask(sharing.addr, "stranger");
    sharing.wait_asks(2);
    let guesses: Vec<String> = (0..3)
        .map(|i| format!("{:06}", (code.parse::<u32>().unwrap() + 1 + i) % 1_000_000))
        .collect();
    assert_eq!(
        owner
            .call(
                sharing.addr,
                "POST",
                "/api/pairing/approve",
                Some(json!({"code": guesses[0]}))
            )
            .0,
        422
    );
    assert_eq!(
        owner
            .call(
                sharing.addr,
                "POST",
                "/api/pairing/approve",
                Some(json!({"code": guesses[1]}))
            )
            .0,
        422
    );
    let (status, body) = owner.call(
        sharing.addr,
        "POST",
        "/api/pairing/approve",
        Some(json!({"code": guesses[2]})),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("too_many_wrong_codes"))
    );
    let (status, body) = waiting.join().unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("too_many_wrong_codes"))
    );
    // The right code is of no use now: the window is closed.
    assert_eq!(
        owner
            .call(
                sharing.addr,
                "POST",
                "/api/pairing/approve",
                Some(json!({"code": code}))
            )
            .0,
        404
    );
    assert_eq!(
        stranger.call(sharing.addr, "GET", "/api/devices", None).0,
        401
    );
}

/// A TCP relay for one connection that keeps what the client sent and, if
/// asked, flips one byte in the client's second flight (its certificate,
/// its signature over the handshake and its Finished, all encrypted).
fn relay(to: SocketAddr, tamper: bool) -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = sent.clone();
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(to).unwrap();
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let (mut s_in, mut c_out) = (server, client);
        std::thread::spawn(move || {
            let mut buf = [0u8; 16384];
            while let Ok(n) = s_in.read(&mut buf) {
                if n == 0 || c_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = c_out.shutdown(std::net::Shutdown::Both);
        });
        let mut buf = [0u8; 16384];
        let mut reads = 0;
        while let Ok(n) = c_in.read(&mut buf) {
            if n == 0 {
                break;
            }
            reads += 1;
            keep.lock().unwrap().extend_from_slice(&buf[..n]);
            if tamper && reads == 2 {
                buf[n / 2] ^= 0x01;
            }
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_out.shutdown(std::net::Shutdown::Both);
    });
    (addr, sent)
}

#[test]
fn a_replayed_or_tampered_handshake_pairs_nothing() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let device = Device::new(&CertificateDer::from(sharing.identity()), true);

    // A real request through the relay, recorded (refused: no window).
    let (via, recorded) = relay(sharing.addr, false);
    let (status, _) = device.call(via, "POST", "/pair", Some(json!({"name": "laptop"})));
    assert_eq!(status, 403);
    sharing.wait_asks(1);

    // The window opens; the recorded bytes sent again get nothing: the box
    // answers with a new handshake that the old bytes cannot finish.
    sharing.press();
    let bytes = recorded.lock().unwrap().clone();
    assert!(bytes.len() > 500, "a whole exchange was recorded");
    let mut raw = TcpStream::connect(sharing.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = raw.write_all(&bytes);
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        !answer.windows(8).any(|w| w == b"HTTP/1.1"),
        "no answer in clear"
    );
    // A byte changed in the client's second flight: the handshake fails.
    let (via, _) = relay(sharing.addr, true);
    let conn = rustls::ClientConnection::new(
        device.config.clone(),
        ServerName::try_from(device.name.clone()).unwrap(),
    )
    .unwrap();
    let sock = TcpStream::connect(via).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    let failed = (|| {
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        s.write_all(
            b"POST /pair HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n{\"name\": \"relay\"}",
        )?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok::<_, std::io::Error>(out)
    })();
    assert!(
        failed.as_ref().map(|o| o.is_empty()).unwrap_or(true),
        "the tampered session got an answer: {failed:?}"
    );
    // Neither reached pairing: the box saw only the first, honest request.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sharing.asks(), 1);
}

#[test]
fn a_device_that_hangs_up_while_it_waits_is_withdrawn_and_the_next_one_pairs() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let box_identity = CertificateDer::from(sharing.identity());
    sharing.press();
    // It asks, then goes away before any press (closes the connection).
    let leaver = Device::new(&box_identity, true);
    let (_, mut s) = leaver.connect(sharing.addr);
    let body = json!({"name": "leaver"}).to_string();
    write!(
        s,
        "POST /pair HTTP/1.1\r\nHost: box\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.flush().unwrap();
    sharing.wait_asks(1);
    s.conn.send_close_notify();
    let _ = s.conn.complete_io(&mut s.sock);
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    // Another device in the same window is not an overlap with it: the
    // second press pairs this one, as the box's owner.
    let phone = Device::new(&box_identity, true);
    let (_, waiting) = phone.ask(sharing.addr, "phone");
    sharing.wait_asks(2);
    sharing.press();
    let (status, body) = waiting.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "owner", "{body}");
    assert!(
        !sharing
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("leaver") && l.contains("was paired")),
        "the device that left was paired"
    );
}
