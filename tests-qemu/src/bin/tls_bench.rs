//! `cloudlet-tls-bench CLOUDLETD WORKDIR`: what TLS costs the box's
//! services. The same `cloudletd storage` runs twice on one device
//! registry (`cloudletd sharing`): once with `--plain` and once with TLS as
//! the box serves it (its certificate issued by the sharing service over
//! the bus), each on an empty store of its own under WORKDIR. The same
//! client code measures both over loopback, in three rounds that alternate
//! which goes first; each figure is the median of its three rounds.
//!
//! * 1 GiB: one PUT and one GET of a random file on one kept-alive
//!   connection (the file is deleted after the round).
//! * 1,000 small files (4 KiB, random): PUT, then GET, one after the other
//!   on one kept-alive connection.
//! * New connections per second, each doing one GET of a 4 KiB file and
//!   closed by the server: a full TLS 1.3 handshake each (resumption is
//!   off, and a resumed handshake is an error), once with the Bearer token
//!   and no client certificate and once with a device's key over mutual TLS
//!   (paired with `add-device --key`, checked by the registry) and no
//!   token. Plain HTTP has no client certificate: both rows compare with
//!   plain + token.
//! * Peak RSS (VmHWM) of each storage process after its first 1 GiB PUT.
//!
//! The client trusts the box's identity (`sharing/identity.crt`) as its
//! only root and names the server `localhost`. Client and server share the
//! machine's CPUs, so the client's half of the cryptography is in the
//! figures too, as it is for a PC on the box's own loopback. The page cache
//! is left warm (a file just written is read back from memory), so the
//! GETs show the cost of TLS itself rather than the disk's speed.
//! A figure that could not be measured is shown as `n/a`, with why.
//! Run it through `scripts/bench tls`, which builds what it needs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cloudlet_runtime::tls;
use cloudlet_testkit::http::{exchange, request_on, Body};
use cloudlet_testkit::Rng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

const BIG: u64 = 1 << 30;
const SMALL_FILES: usize = 1_000;
const SMALL: usize = 4 << 10;
/// New connections timed for each connection row.
const CONNECTIONS: usize = 500;
/// Rounds on each server, alternating (the median is reported).
const ROUNDS: usize = 3;
const PIECE: usize = 1 << 20;
/// The name the client gives the box (on every service certificate).
const SERVER_NAME: &str = "localhost";

/// A figure, or why it could not be measured.
type Figure = std::result::Result<f64, String>;

fn figure(r: Result<f64>) -> Figure {
    r.map_err(|e| format!("{e:#}"))
}

/// A process that is killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The device registry (the sharing service) and what pairing gave us.
struct Registry {
    _proc: Proc,
    data: PathBuf,
    socket: PathBuf,
    /// `Bearer T` of a device paired by the owner command.
    bearer: String,
    /// The box's identity certificate: the client's only root.
    identity: CertificateDer<'static>,
    /// A device's certificate and PKCS#8 key, paired by the key.
    device: (CertificateDer<'static>, Vec<u8>),
}

/// How the client reaches one storage service.
struct Storage {
    proc: Proc,
    addr: SocketAddr,
    /// TLS without a client certificate (then the token), and with the
    /// device's key (no token); None for plain HTTP.
    tls: Option<(Arc<ClientConfig>, Arc<ClientConfig>)>,
}

/// A connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(b),
            Conn::Tls(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(b),
            Conn::Tls(s) => s.write(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on {addr}")
}

fn owner(bin: &Path, socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .arg("sharing")
        .args(args)
        .env("CLOUDLET_REGISTRY_SOCKET", socket)
        .output()?;
    if !out.status.success() {
        bail!("sharing {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn start_registry(bin: &Path, data: &Path) -> Result<Registry> {
    std::fs::create_dir_all(data)?;
    let socket = data.join("registry.sock");
    let addr = free_addr()?;
    let proc = Proc(
        Command::new(bin)
            .args(["sharing", "--listen", &addr.to_string()])
            .env("CLOUDLET_DATA", data)
            .env("CLOUDLET_REGISTRY_SOCKET", &socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} sharing", bin.display()))?,
    );
    wait_listening(addr)?;
    let paired = owner(bin, &socket, &["add-device", "bench", "owner"])?;
    let token = paired
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .ok_or_else(|| anyhow!("add-device printed no token: {paired}"))?;
    let identity = std::fs::read(data.join("sharing/identity.crt"))
        .context("the box's identity certificate")?;
    // A device's own P-256 key and a self-signed certificate for it (the
    // runtime's identity helper makes exactly that), paired by its key.
    let dev = tls::IdentityKeys::generate()?;
    owner(
        bin,
        &socket,
        &["add-device", "bench-pc", "device", "--key", &dev.key_hash],
    )?;
    Ok(Registry {
        _proc: proc,
        data: data.to_owned(),
        bearer: format!("Bearer {}", token.trim()),
        identity: CertificateDer::from(identity),
        device: (CertificateDer::from(dev.cert_der), dev.key.serialize_der()),
        socket,
    })
}

/// A client that trusts `reg`'s identity only and never resumes a session,
/// presenting the device's key when `keyed`.
fn client_config(reg: &Registry, keyed: bool) -> Result<Arc<ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(reg.identity.clone())?;
    let b = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut c = if keyed {
        let (cert, key) = reg.device.clone();
        b.with_client_auth_cert(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )?
    } else {
        b.with_no_client_auth()
    };
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

fn start_storage(bin: &Path, reg: &Registry, plain: bool) -> Result<Storage> {
    let addr = free_addr()?;
    let state = reg.data.join(if plain {
        "storage-plain"
    } else {
        "storage-tls"
    });
    let mut cmd = Command::new(bin);
    cmd.args(["storage", "--listen", &addr.to_string(), "--state-dir"])
        .arg(&state);
    if plain {
        cmd.arg("--plain");
    }
    let proc = Proc(
        cmd.env("CLOUDLET_DATA", &reg.data)
            .env("CLOUDLET_REGISTRY_SOCKET", &reg.socket)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} storage", bin.display()))?,
    );
    wait_listening(addr)?;
    let tls = if plain {
        None
    } else {
        Some((client_config(reg, false)?, client_config(reg, true)?))
    };
    Ok(Storage { proc, addr, tls })
}

impl Storage {
    /// A new connection; over TLS with the device's key when `keyed`, its
    /// handshake finished (and checked to be a full one).
    fn connect(&self, keyed: bool) -> Result<Conn> {
        let s = TcpStream::connect(self.addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let Some((anon, key)) = &self.tls else {
            return Ok(Conn::Plain(s));
        };
        let config = if keyed { key } else { anon };
        let conn = ClientConnection::new(config.clone(), ServerName::try_from(SERVER_NAME)?)?;
        let mut t = StreamOwned::new(conn, s);
        while t.conn.is_handshaking() {
            t.conn.complete_io(&mut t.sock).context("TLS handshake")?;
        }
        if t.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            bail!("the TLS session was resumed, not a full handshake");
        }
        Ok(Conn::Tls(Box::new(t)))
    }

    fn peak_rss_kib(&self) -> Result<f64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.proc.0.id()))?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{}/status", self.proc.0.id()))
    }
}

/// One request on `c` with the token; the answer's body is thrown away.
/// Fails unless the status is `want`.
fn call(
    c: &mut Conn,
    bearer: &str,
    method: &str,
    path: &str,
    body: Option<(&mut dyn Read, u64)>,
    want: &[u16],
) -> Result<u64> {
    let (status, n) = exchange(
        c,
        method,
        &format!("/files{path}"),
        &[("Authorization", bearer)],
        body,
        &mut std::io::sink(),
        PIECE,
    )
    .with_context(|| format!("{method} {path}"))?;
    if !want.contains(&status) {
        bail!("{method} {path}: {status}");
    }
    Ok(n)
}

const STORED: &[u16] = &[200, 201, 204];

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn small_name(round: usize, i: usize) -> String {
    format!("/s{round}/f{i:04}")
}

/// One round's figures from one server, or why each could not be measured.
struct Round {
    big_put: Result<f64>,
    big_get: Result<f64>,
    small_put: Result<f64>,
    small_get: Result<f64>,
    conns_token: Result<f64>,
    /// TLS only: new connections with the device's key and no token.
    conns_key: Option<Result<f64>>,
}

/// What TLS the connection negotiated.
fn negotiated(c: &ClientConnection) -> String {
    format!(
        "{:?}, {}, key exchange {}",
        c.protocol_version()
            .unwrap_or(rustls::ProtocolVersion::Unknown(0)),
        c.negotiated_cipher_suite()
            .map_or("?".to_owned(), |s| format!("{:?}", s.suite())),
        c.negotiated_key_exchange_group()
            .map_or("?".to_owned(), |g| format!("{:?}", g.name())),
    )
}

/// Round `n` on `s`: 1 GiB up and down on one kept-alive connection (then
/// deleted), the small files up and down on another, then new connections.
fn round(s: &Storage, n: usize, bearer: &str, big: &Path, small: &[Vec<u8>]) -> Round {
    let big_path = format!("/big{n}.bin");
    let mut c = s.connect(false);
    let big_put = (|| {
        let c = c.as_mut().map_err(|e| anyhow!("{e:#}"))?;
        let mut src = std::fs::File::open(big)?;
        let t = Instant::now();
        call(c, bearer, "PUT", &big_path, Some((&mut src, BIG)), STORED)?;
        Ok(mib_s(BIG, t.elapsed().as_secs_f64()))
    })();
    let big_get = (|| {
        let c = c.as_mut().map_err(|e| anyhow!("{e:#}"))?;
        let t = Instant::now();
        let got = call(c, bearer, "GET", &big_path, None, &[200])?;
        if got != BIG {
            bail!("GET {big_path}: {got} bytes of {BIG}");
        }
        let rate = mib_s(got, t.elapsed().as_secs_f64());
        call(c, bearer, "DELETE", &big_path, None, &[200, 204])?;
        Ok(rate)
    })();
    drop(c);

    let mut c = s.connect(false);
    let small_put = (|| {
        let c = c.as_mut().map_err(|e| anyhow!("{e:#}"))?;
        call(c, bearer, "MKCOL", &format!("/s{n}"), None, &[201])?;
        let t = Instant::now();
        for (i, d) in small.iter().enumerate() {
            let mut body = &d[..];
            let len = d.len() as u64;
            call(
                c,
                bearer,
                "PUT",
                &small_name(n, i),
                Some((&mut body, len)),
                STORED,
            )?;
        }
        Ok(SMALL_FILES as f64 / t.elapsed().as_secs_f64())
    })();
    let small_get = (|| {
        let c = c.as_mut().map_err(|e| anyhow!("{e:#}"))?;
        let t = Instant::now();
        for (i, d) in small.iter().enumerate() {
            let got = call(c, bearer, "GET", &small_name(n, i), None, &[200])?;
            if got != d.len() as u64 {
                bail!("GET {}: {got} bytes of {}", small_name(n, i), d.len());
            }
        }
        Ok(SMALL_FILES as f64 / t.elapsed().as_secs_f64())
    })();
    drop(c);

    // New connections, one small GET each, closed by the server.
    let conns = |keyed: bool| -> Result<f64> {
        let auth: Vec<(&str, &str)> = if keyed {
            Vec::new()
        } else {
            vec![("Authorization", bearer)]
        };
        let path = format!("/files{}", small_name(n, 0));
        let t = Instant::now();
        for _ in 0..CONNECTIONS {
            let r = request_on(s.connect(keyed)?, "GET", &path, &auth, Body::None)?;
            if r.status != 200 || r.body.len() != SMALL {
                bail!("GET {path}: {}, {} bytes", r.status, r.body.len());
            }
        }
        Ok(CONNECTIONS as f64 / t.elapsed().as_secs_f64())
    };
    Round {
        big_put,
        big_get,
        small_put,
        small_get,
        conns_token: conns(false),
        conns_key: s.tls.is_some().then(|| conns(true)),
    }
}

/// A server's figures: the median of its rounds.
struct Figures {
    big_put: Figure,
    big_get: Figure,
    small_put: Figure,
    small_get: Figure,
    conns_token: Figure,
    conns_key: Option<Figure>,
    rss_kib: Figure,
}

/// The median of `rounds`' `pick`, or the first round's error.
fn median(rounds: &[Round], pick: impl Fn(&Round) -> Option<&Result<f64>>) -> Option<Figure> {
    let mut v = Vec::new();
    for r in rounds {
        match pick(r)? {
            Ok(x) => v.push(*x),
            Err(e) => return Some(Err(format!("{e:#}"))),
        }
    }
    v.sort_by(f64::total_cmp);
    Some(
        v.get(v.len() / 2)
            .copied()
            .ok_or_else(|| "no rounds".to_owned()),
    )
}

impl Figures {
    fn of(rounds: &[Round], rss_kib: Figure) -> Figures {
        let m = |pick: fn(&Round) -> &Result<f64>| {
            median(rounds, |r| Some(pick(r))).unwrap_or_else(|| Err("no rounds".to_owned()))
        };
        Figures {
            big_put: m(|r| &r.big_put),
            big_get: m(|r| &r.big_get),
            small_put: m(|r| &r.small_put),
            small_get: m(|r| &r.small_get),
            conns_token: m(|r| &r.conns_token),
            conns_key: median(rounds, |r| r.conns_key.as_ref()),
            rss_kib,
        }
    }

    fn none(why: &str) -> Figures {
        let f = || Err(why.to_owned());
        Figures {
            big_put: f(),
            big_get: f(),
            small_put: f(),
            small_get: f(),
            conns_token: f(),
            conns_key: Some(f()),
            rss_kib: f(),
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn print_table(
    work: &Path,
    plain: &Figures,
    tls: &Figures,
    negotiated: Option<String>,
    load: (String, String),
) {
    let disk = Command::new("df")
        .args(["--output=source,fstype"])
        .arg(work)
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(&o.stdout);
            s.lines()
                .nth(1)
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "TLS cost: cloudletd storage --plain vs TLS, one registry, over loopback on {} ({disk})",
        work.display()
    );
    println!(
        "TLS: {}; client trusts the box identity only, server name {SERVER_NAME}",
        negotiated.as_deref().unwrap_or("n/a")
    );
    println!(
        "{cpus} CPUs shared by client and server (and others: load {} before, {} after); page cache warm",
        load.0, load.1
    );
    println!(
        "{:<46} {:>10} {:>10} {:>10}",
        "", "plain", "TLS", "TLS/plain"
    );
    let mut missing = Vec::new();
    let mut row = |name: &str, a: &Figure, b: &Figure, digits: usize| {
        let cell = |f: &Figure, col: &str, missing: &mut Vec<String>| match f {
            Ok(v) => format!("{v:.digits$}"),
            Err(e) => {
                missing.push(format!("{}, {col}: {e}", name.trim()));
                "n/a".to_owned()
            }
        };
        let (ca, cb) = (cell(a, "plain", &mut missing), cell(b, "TLS", &mut missing));
        let ratio = match (a, b) {
            (Ok(a), Ok(b)) if *a > 0.0 => format!("{:.0}%", 100.0 * b / a),
            _ => "n/a".to_owned(),
        };
        println!("{name:<46} {ca:>10} {cb:>10} {ratio:>10}");
    };
    row("1 GiB PUT (MiB/s)", &plain.big_put, &tls.big_put, 1);
    row("1 GiB GET (MiB/s)", &plain.big_get, &tls.big_get, 1);
    row(
        &format!("{SMALL_FILES} files PUT, 4 KiB (files/s)"),
        &plain.small_put,
        &tls.small_put,
        1,
    );
    row(
        &format!("{SMALL_FILES} files GET, 4 KiB (files/s)"),
        &plain.small_get,
        &tls.small_get,
        1,
    );
    row(
        "new connection + GET, token (conn/s)",
        &plain.conns_token,
        &tls.conns_token,
        1,
    );
    let no_key = Err("not measured".to_owned());
    row(
        "  TLS with device key, no token (conn/s)",
        &plain.conns_token,
        tls.conns_key.as_ref().unwrap_or(&no_key),
        1,
    );
    row(
        "peak RSS after 1 GiB PUT (KiB)",
        &plain.rss_kib,
        &tls.rss_kib,
        0,
    );
    println!(
        "(medians of {ROUNDS} alternating rounds; kept-alive rows: one connection per round; \
         connection rows: {CONNECTIONS} full handshakes per round, one after the other; \
         the key row's plain figure is plain HTTP with the token)"
    );
    for m in &missing {
        println!("not measured: {m}");
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bin, work] = args.as_slice() else {
        bail!("usage: cloudlet-tls-bench CLOUDLETD WORKDIR");
    };
    let (bin, work) = (PathBuf::from(bin), PathBuf::from(work));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let result = measure(&bin, &work);
    std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    result
}

fn measure(bin: &Path, work: &Path) -> Result<()> {
    eprintln!("making the test data (1 GiB file, {SMALL_FILES} files of 4 KiB)");
    let big = work.join("source.bin");
    {
        let mut r = Rng(0xb16);
        let mut f = std::io::BufWriter::with_capacity(PIECE, std::fs::File::create(&big)?);
        for _ in 0..BIG / PIECE as u64 {
            f.write_all(&r.fill(PIECE))?;
        }
        f.flush()?;
    }
    let mut r = Rng(0x5a11);
    let small: Vec<Vec<u8>> = (0..SMALL_FILES).map(|_| r.fill(SMALL)).collect();

    let reg = start_registry(bin, &work.join("box"))?;
    let servers = [true, false].map(|plain| start_storage(bin, &reg, plain));
    let before = loadavg();
    let mut rounds: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
    let mut rss: [Figure; 2] = [Err("no 1 GiB PUT".into()), Err("no 1 GiB PUT".into())];
    let mut tls_said = None;
    for n in 0..ROUNDS {
        // Plain first, then TLS first, and so on: neither always meets the
        // other's write-back or someone else's load.
        for k in [n % 2, 1 - n % 2] {
            let Ok(s) = &servers[k] else { continue };
            eprintln!("round {} of {ROUNDS}: {}", n + 1, ["plain", "TLS"][k]);
            let r = round(s, n, &reg.bearer, &big, &small);
            if n == 0 {
                rss[k] = if r.big_put.is_ok() {
                    figure(s.peak_rss_kib())
                } else {
                    Err("the 1 GiB PUT failed".into())
                };
            }
            rounds[k].push(r);
        }
    }
    if let Ok(s) = &servers[1] {
        if let Ok(Conn::Tls(t)) = s.connect(false) {
            tls_said = Some(negotiated(&t.conn));
        }
    }
    let [rss_plain, rss_tls] = rss;
    let figures = |k: usize, rss: Figure| match &servers[k] {
        Ok(_) => Figures::of(&rounds[k], rss),
        Err(e) => Figures::none(&format!("storage did not start: {e:#}")),
    };
    let (plain, tls) = (figures(0, rss_plain), figures(1, rss_tls));
    print_table(work, &plain, &tls, tls_said, (before, loadavg()));
    Ok(())
}
