//! The storage service under the attacks an independent test found it fell
//! to: the real `cloudletd storage` process on loopback, flooded with bare
//! connections, held by silent ones, and sent an upload that stalls. Each
//! attack comes from 127.0.0.1; the clients that must still be served come
//! from other loopback addresses, as other hosts on the LAN would.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudlet_testkit::http::read_head;

/// How long a test waits for what it expects before failing; longer than
/// any timeout a test sets, shorter than the defaults it leaves alone.
const GUARD: Duration = Duration::from_secs(30);

struct Server {
    child: Child,
    addr: SocketAddr,
    token: String,
    /// The device registry the service asks (stopped with the last user).
    _registry: std::sync::Arc<common::Registry>,
    data: PathBuf,
    /// Every line the service logged so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the service on a free port with its state under `data`, the
    /// environment `env`, and at most `open_files` descriptors to start
    /// with (a box's default is 1024; the service is to raise it itself).
    fn start(data: &Path, env: &[(&str, &str)], open_files: Option<u64>) -> Server {
        let s = common::spawn("storage", data, env, open_files);
        Server {
            child: s.child,
            addr: s.addr,
            token: s.token,
            _registry: s.registry,
            data: data.to_owned(),
            log: s.log,
        }
    }

    /// One request from the loopback address `from`; the status it got.
    fn status_from(&self, from: Ipv4Addr, method: &str, path: &str, authorized: bool) -> u16 {
        let mut s = connect_from(from, self.addr);
        s.set_read_timeout(Some(GUARD)).unwrap();
        let auth = if authorized {
            format!("Authorization: Bearer {}\r\n", self.token)
        } else {
            String::new()
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: cloudlet\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
        )
        .unwrap();
        read_head(&mut BufReader::new(s))
            .unwrap_or_else(|e| panic!("{method} {path} from {from}: {e}"))
            .0
    }

    /// Entries in the blob store's temporary directory.
    fn temp_files(&self) -> usize {
        std::fs::read_dir(self.data.join("storage/tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The soft and hard open-file limits the service runs with.
    fn open_file_limits(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id())).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let n: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (n[0], n[1])
    }

    fn logged(&self, what: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(what))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking connection to `addr` from the loopback address `from`
/// (std cannot bind before connecting; tokio's socket can).
fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let s = rt
        .block_on(async {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
            sock.connect(addr).await
        })
        .unwrap_or_else(|e| panic!("connecting from {from}: {e}"));
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

/// A connection from [`FLOODER`]: the address a socket to loopback gets
/// unless it binds another.
fn flooder(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).unwrap()
}

/// Polls `done` until it holds or [`GUARD`] passes.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < GUARD, "waited {GUARD:?} for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until the server closes `s`, for at most [`GUARD`].
fn wait_closed(s: &mut TcpStream) {
    s.set_read_timeout(Some(GUARD)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

const FLOODER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

#[test]
fn a_flood_of_bare_connections_from_one_host_leaves_others_served() {
    const FLOOD: usize = 1_100;
    // This test holds the whole flood open itself.
    let ours = cloudlet_runtime::raise_open_file_limit().unwrap();
    assert!(
        ours > FLOOD as u64 + 100,
        "the test needs more than {FLOOD} descriptors and may have only {ours}"
    );
    let d = tempfile::tempdir().unwrap();
    // 1024, a box's default, is what the service fell over at. Held heads
    // must not time out during the test: the caps alone are to keep it up.
    let s = Server::start(
        d.path(),
        &[("CLOUDLET_HEADER_TIMEOUT_MS", "600000")],
        Some(1024),
    );
    let (soft, hard) = s.open_file_limits();
    assert_eq!(
        soft,
        hard.min(cloudlet_runtime::OPEN_FILE_LIMIT),
        "the service raised its own open-file limit (hard limit {hard})"
    );
    let flood: Vec<TcpStream> = (0..FLOOD).map(|_| flooder(s.addr)).collect();
    assert_eq!(s.status_from(NEIGHBOUR, "GET", "/health", false), 200);
    assert_eq!(s.status_from(NEIGHBOUR, "GET", "/api/space", true), 200);
    assert_eq!(s.status_from(NEIGHBOUR, "PROPFIND", "/files/", true), 207);
    assert!(
        !s.logged("Too many open files"),
        "{:#?}",
        s.log.lock().unwrap()
    );
    drop(flood);
}

#[test]
fn silent_connections_that_fill_a_hosts_share_are_closed_after_the_header_timeout() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &[("CLOUDLET_HEADER_TIMEOUT_MS", "500")], None);
    // More than one host may hold (the per-address cap is 64): the rest
    // are refused at once, the held ones wait out the header timeout.
    let mut silent: Vec<TcpStream> = (0..100).map(|_| flooder(s.addr)).collect();
    for c in &mut silent {
        wait_closed(c);
    }
    // The host is not locked out for good: its places are free again.
    assert_eq!(s.status_from(FLOODER, "GET", "/health", false), 200);
}

#[test]
fn a_stalled_upload_is_dropped_after_the_body_idle_timeout_and_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(d.path(), &[("CLOUDLET_BODY_IDLE_TIMEOUT_MS", "3000")], None);
    let mut c = flooder(s.addr);
    write!(
        c,
        "PUT /files/big.bin HTTP/1.1\r\nHost: cloudlet\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000000\r\n\r\n",
        s.token
    )
    .unwrap();
    let chunk = vec![0x5a_u8; 1 << 20];
    for _ in 0..10 {
        c.write_all(&chunk).unwrap();
    }
    // Then silence. The upload is under way: its temporary file holds disk.
    wait_until("the upload's temporary file", || s.temp_files() > 0);
    // The server gives up on it and closes the connection ...
    wait_closed(&mut c);
    // ... and the half-written upload goes with it.
    wait_until("the temporary directory to be empty", || {
        s.temp_files() == 0
    });
    assert_eq!(s.status_from(NEIGHBOUR, "GET", "/files/big.bin", true), 404);
    assert_eq!(
        s.status_from(NEIGHBOUR, "PROPFIND", "/files/big.bin", true),
        404
    );
}

/// Clients that ask for a large file and never read the answer: each blocked
/// write held its connection's place forever, so one host's 64 such sockets
/// (or 512 from a few hosts) kept everyone out. A write that makes no
/// progress for the stall timeout now drops its connection.
#[test]
fn clients_that_stop_reading_lose_their_places() {
    let d = tempfile::tempdir().unwrap();
    let s = Server::start(
        d.path(),
        &[("CLOUDLET_WRITE_STALL_TIMEOUT_MS", "1000")],
        None,
    );
    let big = vec![0x42_u8; 32 << 20];
    let mut c = connect_from(NEIGHBOUR, s.addr);
    write!(
        c,
        "PUT /files/big.bin HTTP/1.1\r\nHost: cloudlet\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        s.token,
        big.len()
    )
    .unwrap();
    c.write_all(&big).unwrap();
    let mut head = String::new();
    c.read_to_string(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 201"), "{head}");
    // One host fills its share of places with readers that never read.
    let stuck: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut k = connect_from(Ipv4Addr::new(127, 0, 0, 3), s.addr);
            write!(
                k,
                "GET /files/big.bin HTTP/1.1\r\nHost: cloudlet\r\nAuthorization: Bearer {}\r\n\r\n",
                s.token
            )
            .unwrap();
            k
        })
        .collect();
    // Once their writes have stalled past the limit, that host is served
    // again (until then its new connections are closed unanswered).
    let health = || -> Option<u16> {
        let mut k = connect_from(Ipv4Addr::new(127, 0, 0, 3), s.addr);
        k.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        k.write_all(b"GET /health HTTP/1.1\r\nHost: cloudlet\r\nConnection: close\r\n\r\n")
            .ok()?;
        read_head(&mut BufReader::new(k))
            .ok()
            .map(|(status, _)| status)
    };
    wait_until("a place for the stuck host", || health() == Some(200));
    drop(stuck);
}

#[test]
fn silent_and_half_finished_tls_handshakes_are_closed_after_the_header_timeout() {
    let d = tempfile::tempdir().unwrap();
    let s = common::spawn_with(
        "storage",
        d.path(),
        &[("CLOUDLET_HEADER_TIMEOUT_MS", "500")],
        None,
        true,
    );
    // Silent ones, and ones that stop inside their ClientHello (a TLS
    // record header promising 512 bytes, then 3 of them).
    let mut held: Vec<TcpStream> = (0..40).map(|_| flooder(s.addr)).collect();
    for c in held.iter_mut().skip(20) {
        c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
            .unwrap();
    }
    let start = Instant::now();
    for c in &mut held {
        wait_closed(c);
    }
    // Closed by the deadline, not at once for some other reason.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < GUARD,
        "closed after {took:?}"
    );
    // The host's places are free again: a real TLS client is served.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["device".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let root = std::fs::read(d.path().join("sharing/identity.crt")).unwrap();
    let config = cloudlet_runtime::dial::client_config(
        cert.der().clone(),
        key.serialize_der(),
        cloudlet_runtime::dial::Check::Pinned(root.into()),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let mut c =
            cloudlet_runtime::dial::Conn::connect(&s.addr.to_string(), config, "localhost".into())
                .await
                .unwrap();
        c.call("GET", "/health", None).await.unwrap().0
    });
    assert_eq!(status, 200);
    let mut child = s.child;
    let _ = child.kill();
    let _ = child.wait();
}
