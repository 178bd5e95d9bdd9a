//! Pairing a browser through the box's page, through a real sharing service
//! (and storage) over TLS: the same window, presses and owner approval as a
//! native device, a token that arrives once as an HttpOnly, Secure,
//! SameSite=Strict cookie, accepted by every service of the box from the
//! box's own pages only, and refused once the browser is revoked. The
//! "browser" here is a TLS client that sends what a browser sends (the
//! Origin of the box's page, the cookie); no real browser runs.

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::Sharing;

use cloudlet_testkit::http::{request_on, request_tls, Body, Response};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

/// A TLS client that pins the box, with or without a key of its own.
struct Client {
    config: Arc<rustls::ClientConfig>,
    name: String,
}

impl Client {
    fn new(sharing: &Sharing, with_key: bool) -> Client {
        let (config, name) =
            common::pinning_client(&CertificateDer::from(sharing.identity()), with_key);
        Client { config, name }
    }

    fn call(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Response {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let b = if bytes.is_empty() {
            Body::None
        } else {
            Body::Bytes(bytes.as_bytes())
        };
        let mut h = vec![("Content-Type", "application/json")];
        h.extend_from_slice(headers);
        request_tls(addr, &self.config, &self.name, method, path, &h, b)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// A native device asks to pair over TLS with its key, in a thread.
    fn ask_native(&self, addr: SocketAddr, name: &str) -> std::thread::JoinHandle<Response> {
        let conn = rustls::ClientConnection::new(
            self.config.clone(),
            ServerName::try_from(self.name.clone()).unwrap(),
        )
        .unwrap();
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(200)))
            .unwrap();
        let s = rustls::StreamOwned::new(conn, sock);
        let body = json!({ "name": name }).to_string();
        std::thread::spawn(move || {
            request_on(
                s,
                "POST",
                "/pair",
                &[("Content-Type", "application/json")],
                Body::Bytes(body.as_bytes()),
            )
            .unwrap()
        })
    }
}

fn body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// The Origin of the box's pages as the test client names the box (its
/// Host header is `cloudlet`): any port of that host is the box.
const BOX_ORIGIN: &str = "https://cloudlet:8080";
const OTHER_SITE: &str = "https://evil.example";

/// A browser on the box's page: asks to pair, and its waits.
struct Browser<'a> {
    client: Client,
    sharing: &'a Sharing,
}

impl<'a> Browser<'a> {
    fn new(sharing: &'a Sharing) -> Browser<'a> {
        Browser {
            client: Client::new(sharing, false),
            sharing,
        }
    }

    /// `POST /pair/browser` from the page.
    fn ask(&self, name: &str) -> Response {
        self.client.call(
            self.sharing.addr,
            "POST",
            "/pair/browser",
            &[("Origin", BOX_ORIGIN)],
            Some(json!({ "name": name })),
        )
    }

    /// Waits as the page does: again while the box answers 202.
    fn wait(&self, request: &str) -> Response {
        loop {
            let r = self.client.call(
                self.sharing.addr,
                "POST",
                "/pair/browser/wait",
                &[("Origin", BOX_ORIGIN)],
                Some(json!({ "request": request })),
            );
            if r.status != 202 {
                return r;
            }
        }
    }

    /// [`Browser::wait`] in a thread.
    fn wait_in_thread(&self, request: &str) -> std::thread::JoinHandle<Response> {
        let client = Client {
            config: self.client.config.clone(),
            name: self.client.name.clone(),
        };
        let (addr, request) = (self.sharing.addr, request.to_owned());
        std::thread::spawn(move || loop {
            let r = client.call(
                addr,
                "POST",
                "/pair/browser/wait",
                &[("Origin", BOX_ORIGIN)],
                Some(json!({ "request": request })),
            );
            if r.status != 202 {
                return r;
            }
        })
    }

    /// Pairs on a box without an owner: press, ask, press; the cookie's
    /// `Set-Cookie` line and the answer.
    fn pair(&self, name: &str) -> (String, Value) {
        let asked = self.sharing.asks();
        self.sharing.press();
        let r = self.ask(name);
        assert_eq!(r.status, 202, "{}", r.text());
        self.sharing.wait_asks(asked + 1);
        self.sharing.press();
        let paired = self.wait(body(&r)["request"].as_str().unwrap());
        assert_eq!(paired.status, 200, "{}", paired.text());
        let cookie = paired.header("set-cookie").expect("a cookie").to_owned();
        (cookie, body(&paired))
    }
}

/// `cloudlet_token=VALUE` of a `Set-Cookie` line, as the browser sends it back.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_owned()
}

/// An owner made on the box by root; its token.
fn add_owner(sharing: &Sharing) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .args(["sharing", "add-device", "laptop", "owner"])
        .env(
            "CLOUDLET_REGISTRY_SOCKET",
            sharing.data.join("registry.sock"),
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .unwrap()
        .to_owned()
}

/// Storage over TLS, asking the registry of `sharing`; killed when dropped.
struct Storage {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn storage(sharing: &Sharing) -> Storage {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .args(["storage", "--listen", "127.0.0.1:0"])
        .env("CLOUDLET_DATA", &sharing.data)
        .env(
            "CLOUDLET_REGISTRY_SOCKET",
            sharing.data.join("registry.sock"),
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _) = common::follow(&mut child);
    Storage { child, addr }
}

#[test]
fn a_browser_pairs_only_in_the_window_with_a_second_press_and_later_an_owner_approving_its_code() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let browser = Browser::new(&sharing);

    // No press: the window is closed, and the browser is told so.
    let r = browser.ask("kitchen");
    assert_eq!(
        (r.status, body(&r)["error"].as_str()),
        (403, Some("window_closed")),
        "{}",
        r.text()
    );
    assert!(body(&r)["reason"].as_str().unwrap().contains("press"));

    // One press and the request: it waits; without the second press the
    // wait only says so.
    sharing.press();
    let r = browser.ask("kitchen");
    assert_eq!(r.status, 202, "{}", r.text());
    let asked = body(&r);
    let request = asked["request"].as_str().unwrap().to_owned();
    assert_eq!(request.len(), 64, "256 bits");
    assert_eq!(asked["code"].as_str().unwrap().len(), 6);
    assert!(r.header("set-cookie").is_none());
    sharing.wait_asks(2);
    let started = Instant::now();
    let still = browser.client.call(
        sharing.addr,
        "POST",
        "/pair/browser/wait",
        &[("Origin", BOX_ORIGIN)],
        Some(json!({ "request": request })),
    );
    assert_eq!(still.status, 202, "{}", still.text());
    assert!(started.elapsed() >= Duration::from_secs(20), "a long poll");
    // A request id nobody was given is unknown.
    let unknown = browser.client.call(
        sharing.addr,
        "POST",
        "/pair/browser/wait",
        &[("Origin", BOX_ORIGIN)],
        Some(json!({ "request": "00".repeat(32) })),
    );
    assert_eq!(unknown.status, 404);
    // The second press pairs it: a device, never an owner, by the button.
    let waiting = browser.wait_in_thread(&request);
    sharing.press();
    let paired = waiting.join().unwrap();
    assert_eq!(paired.status, 200, "{}", paired.text());
    let p = body(&paired);
    assert_eq!(
        (p["role"].as_str(), p["name"].as_str()),
        (Some("device"), Some("kitchen"))
    );
    assert!(paired.header("set-cookie").is_some());
    // The answer was given once: the id is of no use now.
    let again = browser.client.call(
        sharing.addr,
        "POST",
        "/pair/browser/wait",
        &[("Origin", BOX_ORIGIN)],
        Some(json!({ "request": request })),
    );
    assert_eq!(again.status, 404);

    // Once an owner exists, the presses are not enough: an owner types the
    // code the browser shows, and a wrong one is refused.
    let owner = add_owner(&sharing);
    let bearer = format!("Bearer {owner}");
    let owner_call = |method: &str, path: &str, b: Option<Value>| {
        browser.client.call(
            sharing.addr,
            method,
            path,
            &[("Authorization", bearer.as_str())],
            b,
        )
    };
    sharing.press();
    let r = browser.ask("tablet");
    assert_eq!(r.status, 202);
    let (request, code) = (
        body(&r)["request"].as_str().unwrap().to_owned(),
        body(&r)["code"].as_str().unwrap().to_owned(),
    );
    sharing.wait_asks(3);
    let waiting = browser.wait_in_thread(&request);
    sharing.press();
    let seen = body(&owner_call("GET", "/api/pairing", None));
    assert_eq!(seen["pending"]["name"], "tablet", "{seen}");
    assert_eq!(seen["pending"]["kind"], "browser");
    assert_eq!(seen["pending"]["from"], "127.0.0.1");
    assert_eq!(seen["pending"]["pressed"], true);
    // The owner is not shown the code: it must read the browser's.
    assert!(seen["pending"].get("code").is_none(), "{seen}");
    assert!(!seen.to_string().contains(&code));
    let wrong = if code == "000000" { "000001" } else { "000000" };
    assert_eq!(
        owner_call("POST", "/api/pairing/approve", Some(json!({"code": wrong}))).status,
        422
    );
    assert_eq!(
        owner_call("POST", "/api/pairing/approve", Some(json!({"code": code}))).status,
        200
    );
    let paired = waiting.join().unwrap();
    assert_eq!(paired.status, 200, "{}", paired.text());
    let list = body(&owner_call("GET", "/api/devices", None));
    let row = |name: &str| {
        list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("kitchen")["paired_how"], "button");
    assert_eq!(row("tablet")["paired_how"], "button-and-owner");
    for name in ["kitchen", "tablet"] {
        assert_eq!(row(name)["role"], "device");
        assert_eq!(row(name)["has_token"], true);
        assert!(row(name)["key"].is_null());
    }
}

#[test]
fn the_browser_cookie_is_httponly_secure_samesite_strict_and_works_on_storage_too() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let browser = Browser::new(&sharing);
    let (set_cookie, paired) = browser.pair("laptop browser");
    let attributes: Vec<String> = set_cookie
        .split(';')
        .map(|a| a.trim().to_ascii_lowercase())
        .collect();
    for a in ["httponly", "secure", "samesite=strict", "path=/"] {
        assert!(attributes.iter().any(|x| x == a), "{a} in {set_cookie}");
    }
    let max_age: u64 = attributes
        .iter()
        .find_map(|a| a.strip_prefix("max-age="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age >= 365 * 24 * 3600, "a long-lived cookie: {max_age}");
    assert!(
        !attributes.iter().any(|a| a.starts_with("domain=")),
        "host-only"
    );
    let cookie = cookie_pair(&set_cookie);
    let token = cookie.strip_prefix("cloudlet_token=").unwrap();
    assert_eq!(token.len(), 64, "256 bits");
    // The token is kept hashed on the box, never in the clear.
    let registry = std::fs::read(d.path().join("sharing/registry.redb")).unwrap();
    assert!(!registry.windows(64).any(|w| w == token.as_bytes()));

    // The cookie is this browser's credential on sharing...
    let me = browser.client.call(
        sharing.addr,
        "GET",
        "/api/devices",
        &[("Cookie", cookie.as_str())],
        None,
    );
    assert_eq!(me.status, 200, "{}", me.text());
    assert_eq!(body(&me)["you"], paired["device"]);
    // ...and on storage, another port of the same host.
    let storage = storage(&sharing);
    let space = browser.client.call(
        storage.addr,
        "GET",
        "/api/space",
        &[("Cookie", cookie.as_str())],
        None,
    );
    assert_eq!(space.status, 200, "{}", space.text());
    let put = browser.client.call(
        storage.addr,
        "PUT",
        "/files/note.txt",
        &[("Cookie", cookie.as_str()), ("Origin", BOX_ORIGIN)],
        Some(json!("hello")),
    );
    assert!(put.status == 201 || put.status == 204, "{}", put.text());
    // Without it, or with a made-up one, nothing.
    assert_eq!(
        browser
            .client
            .call(storage.addr, "GET", "/api/space", &[], None)
            .status,
        401
    );
    let forged = format!("cloudlet_token={}", "ab".repeat(32));
    assert_eq!(
        browser
            .client
            .call(
                storage.addr,
                "GET",
                "/api/space",
                &[("Cookie", forged.as_str())],
                None
            )
            .status,
        401
    );
}

#[test]
fn a_browser_and_a_native_device_in_one_window_abort_both() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let browser = Browser::new(&sharing);
    let native = Client::new(&sharing, true);

    // The browser first, then the device.
    sharing.press();
    let r = browser.ask("browser");
    assert_eq!(r.status, 202);
    let waiting = browser.wait_in_thread(body(&r)["request"].as_str().unwrap());
    sharing.wait_asks(1);
    let device = native.ask_native(sharing.addr, "phone");
    for r in [waiting.join().unwrap(), device.join().unwrap()] {
        assert_eq!(
            (r.status, body(&r)["error"].as_str()),
            (409, Some("overlap")),
            "{}",
            r.text()
        );
        assert!(r.header("set-cookie").is_none());
    }
    // The device first, then the browser: refused at once.
    sharing.press();
    let device = native.ask_native(sharing.addr, "phone");
    sharing.wait_asks(3);
    let r = browser.ask("browser");
    assert_eq!(
        (r.status, body(&r)["error"].as_str()),
        (409, Some("overlap")),
        "{}",
        r.text()
    );
    assert!(body(&r)["reason"].as_str().unwrap().contains("two devices"));
    assert_eq!(device.join().unwrap().status, 409);
    // Nobody was paired, and the window is closed: a press opens a new one.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .args(["sharing", "devices"])
        .env(
            "CLOUDLET_REGISTRY_SOCKET",
            sharing.data.join("registry.sock"),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        !text.contains("browser") && !text.contains("phone"),
        "{text}"
    );
    assert_eq!(browser.ask("browser").status, 403);
}

#[test]
fn the_cookie_is_refused_from_another_site_for_put_and_delete_and_accepted_from_the_box() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let browser = Browser::new(&sharing);
    let (set_cookie, paired) = browser.pair("browser");
    let cookie = cookie_pair(&set_cookie);
    let storage = storage(&sharing);
    let call = |addr, method: &str, path: &str, origin: Option<&str>| {
        let mut h = vec![("Cookie", cookie.as_str())];
        if let Some(o) = origin {
            h.push(("Origin", o));
        }
        let b = (method == "PUT").then(|| json!("x"));
        browser.client.call(addr, method, path, &h, b)
    };
    for (method, path) in [("PUT", "/files/a.txt"), ("DELETE", "/files/a.txt")] {
        for origin in [
            Some(OTHER_SITE),
            Some("http://cloudlet:8080"),
            Some("null"),
            None,
        ] {
            let r = call(storage.addr, method, path, origin);
            assert_eq!(
                r.status,
                403,
                "{method} {path} from {origin:?}: {}",
                r.text()
            );
        }
        let r = call(storage.addr, method, path, Some(BOX_ORIGIN));
        assert!(
            (200..300).contains(&r.status),
            "{method} from the box: {}",
            r.text()
        );
    }
    // Sec-Fetch-Site without Origin counts as the browser says it.
    let r = browser.client.call(
        storage.addr,
        "PUT",
        "/files/b.txt",
        &[
            ("Cookie", cookie.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        Some(json!("x")),
    );
    assert!((200..300).contains(&r.status), "{}", r.text());
    let r = browser.client.call(
        storage.addr,
        "PUT",
        "/files/b.txt",
        &[
            ("Cookie", cookie.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        Some(json!("x")),
    );
    assert_eq!(r.status, 403);
    // Another site's page cannot rename or revoke it either.
    let id = paired["device"].as_str().unwrap();
    let rename = format!("/api/devices/{id}/name");
    let r = browser.client.call(
        sharing.addr,
        "PUT",
        &rename,
        &[("Cookie", cookie.as_str()), ("Origin", OTHER_SITE)],
        Some(json!({"name": "pwned"})),
    );
    assert_eq!(r.status, 403);
    let r = browser.client.call(
        sharing.addr,
        "PUT",
        &rename,
        &[("Cookie", cookie.as_str()), ("Origin", BOX_ORIGIN)],
        Some(json!({"name": "my browser"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(body(&r)["name"], "my browser");
    assert_eq!(
        call(
            sharing.addr,
            "DELETE",
            &format!("/api/devices/{id}"),
            Some(OTHER_SITE)
        )
        .status,
        403
    );
    // Another site cannot start a browser pairing in the box's window.
    sharing.press();
    let r = browser.client.call(
        sharing.addr,
        "POST",
        "/pair/browser",
        &[("Origin", OTHER_SITE)],
        Some(json!({"name": "intruder"})),
    );
    assert_eq!(
        (r.status, body(&r)["error"].as_str()),
        (403, Some("cross_site"))
    );
}

#[test]
fn a_revoked_browser_is_refused_by_sharing_and_storage_within_a_second() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let browser = Browser::new(&sharing);
    let (set_cookie, paired) = browser.pair("browser");
    let cookie = cookie_pair(&set_cookie);
    let storage = storage(&sharing);
    let get = |addr| {
        browser
            .client
            .call(
                addr,
                "GET",
                "/api/space",
                &[("Cookie", cookie.as_str())],
                None,
            )
            .status
    };
    assert_eq!(get(storage.addr), 200, "cached as a valid credential first");
    // An owner revokes it, like any device (root on the box here).
    let id = paired["device"].as_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .args(["sharing", "revoke", id])
        .env(
            "CLOUDLET_REGISTRY_SOCKET",
            sharing.data.join("registry.sock"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = Instant::now();
    loop {
        let (s, m) = (
            get(storage.addr),
            browser
                .client
                .call(
                    sharing.addr,
                    "GET",
                    "/api/devices",
                    &[("Cookie", cookie.as_str())],
                    None,
                )
                .status,
        );
        if s == 401 && m == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "still let in a second after revocation: storage {s}, sharing {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_pairing_page_and_its_script_are_public_and_carry_the_csp() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let client = Client::new(&sharing, false);
    let page = client.call(sharing.addr, "GET", "/pair", &[], None);
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let script = client.call(sharing.addr, "GET", "/pair.js", &[], None);
    assert_eq!(script.status, 200);
    assert!(script
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    for r in [&page, &script] {
        let csp = r.header("content-security-policy").expect("a CSP");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
    let html = page.text();
    assert!(html.contains("<script src=\"/pair.js\""));
    assert!(!html.contains("<script>"), "no inline script");
    assert!(script.text().contains("/pair/browser/wait"));
    // The rest of the box's UI still needs a credential.
    assert_eq!(client.call(sharing.addr, "GET", "/", &[], None).status, 401);
}

#[test]
fn a_browser_that_leaves_while_it_waits_is_withdrawn_and_its_next_request_is_no_overlap() {
    use std::io::Write;
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let browser = Browser::new(&sharing);
    sharing.press();
    let r = browser.ask("first");
    assert_eq!(r.status, 202);
    let request = body(&r)["request"].as_str().unwrap().to_owned();
    sharing.wait_asks(1);
    // The page starts a wait, then is reloaded: the connection closes.
    {
        let conn = rustls::ClientConnection::new(
            browser.client.config.clone(),
            ServerName::try_from(browser.client.name.clone()).unwrap(),
        )
        .unwrap();
        let mut s = rustls::StreamOwned::new(conn, TcpStream::connect(sharing.addr).unwrap());
        let b = json!({ "request": request }).to_string();
        write!(
            s,
            "POST /pair/browser/wait HTTP/1.1\r\nHost: cloudlet\r\nOrigin: {BOX_ORIGIN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .unwrap();
        s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.conn.send_close_notify();
        let _ = s.flush();
    }
    let left = Instant::now();
    while !sharing
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("went away while it waited to pair"))
    {
        assert!(left.elapsed() < Duration::from_secs(5), "never withdrawn");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its id is over; the reloaded page asks again in the same window,
    // alone, and the second press pairs it.
    let again = browser.client.call(
        sharing.addr,
        "POST",
        "/pair/browser/wait",
        &[("Origin", BOX_ORIGIN)],
        Some(json!({ "request": request })),
    );
    assert_eq!(again.status, 404, "{}", again.text());
    let r = browser.ask("second");
    assert_eq!(r.status, 202, "not an overlap: {}", r.text());
    sharing.wait_asks(2);
    let waiting = browser.wait_in_thread(body(&r)["request"].as_str().unwrap());
    sharing.press();
    let paired = waiting.join().unwrap();
    assert_eq!(paired.status, 200, "{}", paired.text());
    assert_eq!(body(&paired)["name"], "second");
}

#[test]
fn a_pairing_whose_cookie_nobody_collects_is_undone() {
    let d = tempfile::tempdir().unwrap();
    let sharing = Sharing::start(d.path(), "127.0.0.1:0", &[]);
    let browser = Browser::new(&sharing);
    let devices = || {
        let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .args(["sharing", "devices"])
            .env(
                "CLOUDLET_REGISTRY_SOCKET",
                sharing.data.join("registry.sock"),
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    sharing.press();
    let r = browser.ask("gone");
    assert_eq!(r.status, 202);
    sharing.wait_asks(1);
    // Paired while no wait runs (the page was closed after asking): the
    // answer is held for a wait that never comes.
    sharing.press();
    let paired = Instant::now();
    while !devices().contains("gone") {
        assert!(paired.elapsed() < Duration::from_secs(5), "never paired");
        std::thread::sleep(Duration::from_millis(50));
    }
    while devices().contains("gone") {
        assert!(
            paired.elapsed() < Duration::from_secs(30),
            "a token nobody holds is still paired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        paired.elapsed() >= Duration::from_secs(15),
        "it was held a while"
    );
    assert!(sharing
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("never took its cookie")));
}
