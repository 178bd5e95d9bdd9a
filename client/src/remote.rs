//! The `cloudlet` command on a PC: its own key, the boxes it pinned, and
//! HTTPS to them (hyper over rustls).
//!
//! Kept in the user's config directory (`directories`; `$CLOUDLET_CONFIG_DIR`
//! moves it), each file 0600:
//!
//!     device.key     this device's ECDSA P-256 key (PKCS#8 DER)
//!     device.crt     its self-signed certificate (DER): what the box pairs
//!     boxes.json     box ID -> address, the box's identity certificate
//!                    (base64 DER), its key's SHA-256, our device id there
//!                    (a box pinned by `cloudlet flash` has no address
//!                    until `--host` or mDNS gives one, nor a device id)
//!
//! Pairing ([`pair`]) meets a box it does not know yet: it accepts the
//! certificate chain the box shows if it hangs together (the service's
//! certificate signed by the identity, for the box ID's name), shows the
//! box ID and the six-digit code of the session, and keeps the identity once
//! the box says yes. After that every call pins that identity and presents
//! the device's certificate.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use cloudlet_runtime::dial::{self, with_port, Check, Conn, FirstContact};
use cloudlet_runtime::tls;
use http_body_util::BodyExt;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

/// A box this device paired with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PinnedBox {
    /// Where it answered, `HOST:PORT`; empty until known (a box pinned
    /// by `cloudlet flash` that was never reached).
    pub addr: String,
    /// Its identity certificate, base64 DER.
    pub identity: String,
    /// SHA-256 of its identity key.
    pub key: String,
    /// Our device id on it, and our role there.
    pub device: String,
    pub role: String,
}

pub struct Config {
    dir: PathBuf,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    cloudlet_runtime::write_private(path, bytes).map_err(|e| io_err("writing", path, e))
}

impl Config {
    /// `$CLOUDLET_CONFIG_DIR`, else the user's config directory for cloudlet.
    pub fn open() -> Result<Config, String> {
        let dir = match std::env::var_os("CLOUDLET_CONFIG_DIR") {
            Some(d) => PathBuf::from(d),
            None => directories::ProjectDirs::from("", "", "cloudlet")
                .ok_or("no home directory to keep this device's key in")?
                .config_dir()
                .to_owned(),
        };
        Config::at(dir)
    }

    /// Where it is kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration kept in `dir`.
    pub fn at(dir: PathBuf) -> Result<Config, String> {
        std::fs::create_dir_all(&dir).map_err(|e| io_err("making", &dir, e))?;
        Ok(Config { dir })
    }

    /// This device's certificate and key, made on first use.
    pub fn device(&self) -> Result<(CertificateDer<'static>, Vec<u8>), String> {
        let (crt, key) = (self.dir.join("device.crt"), self.dir.join("device.key"));
        if let (Ok(c), Ok(k)) = (std::fs::read(&crt), std::fs::read(&key)) {
            return Ok((CertificateDer::from(c), k));
        }
        // The key is what boxes paired: keep it if it is there, and only
        // make its certificate again.
        let pair = match std::fs::read(&key) {
            Ok(k) => rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(k),
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            Err(_) => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        }
        .map_err(|e| e.to_string())?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "device".into());
        let cert = rcgen::CertificateParams::new(vec![host])
            .and_then(|p| p.self_signed(&pair))
            .map_err(|e| e.to_string())?;
        write_private(&key, &pair.serialize_der())?;
        write_private(&crt, cert.der())?;
        Ok((cert.der().clone(), pair.serialize_der()))
    }

    pub fn boxes(&self) -> Result<BTreeMap<String, PinnedBox>, String> {
        let p = self.dir.join("boxes.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err("reading", &p, e)),
        }
    }

    pub fn save_boxes(&self, boxes: &BTreeMap<String, PinnedBox>) -> Result<(), String> {
        let text = serde_json::to_vec_pretty(boxes).map_err(|e| e.to_string())?;
        write_private(&self.dir.join("boxes.json"), &text)
    }

    /// The box named by `which` (a box ID, or none when exactly one is paired).
    pub fn pinned(&self, which: Option<&str>) -> Result<(String, PinnedBox), String> {
        let boxes = self.boxes()?;
        match which {
            Some(id) => boxes
                .get(id)
                .cloned()
                .map(|b| (id.to_owned(), b))
                .ok_or_else(|| {
                    format!("no box {id} is paired with this device: run `cloudlet pair` first")
                }),
            None => {
                let mut it = boxes.into_iter();
                match (it.next(), it.next()) {
                    (Some(one), None) => Ok(one),
                    (None, _) => {
                        Err("this device is paired with no box: run `cloudlet pair HOST`".into())
                    }
                    _ => Err(
                        "this device is paired with several boxes: say which with --box ID".into(),
                    ),
                }
            }
        }
    }
}

/// A TLS client configuration with this device's certificate.
fn client_config(cfg: &Config, check: Check) -> Result<Arc<rustls::ClientConfig>, String> {
    let (cert, key) = cfg.device()?;
    dial::client_config(cert, key, check)
}

/// What the box said, as a message for a person.
fn explain(status: u16, body: &serde_json::Value) -> String {
    match body["error"].as_str() {
        Some("window_closed") => "the box's pairing window is closed: press its button once, then run this again".into(),
        Some("overlap") => "another device asked to pair at the same time, so neither was paired: press the button again and pair one device at a time".into(),
        Some("timed_out") => "the pairing window closed before the pairing was confirmed (a second press of the button, and an owner's approval once the box has an owner): try again".into(),
        Some("too_many_wrong_codes") => "an owner typed the wrong code too often: the window is closed; try again".into(),
        Some(e) => body["reason"].as_str().unwrap_or(e).to_owned(),
        None if status == 401 => "the box does not know this device (not paired, or revoked)".into(),
        None if status == 403 => "only an owner device may do this".into(),
        None => format!("the box answered {status}: {body}"),
    }
}

/// Whether `s` is written as a box ID (`xxxx-xxxx-xxxx-xxxx`, base32).
fn is_box_id(s: &str) -> bool {
    s.len() == 19
        && s.split('-').count() == 4
        && s.split('-').all(|g| {
            g.len() == 4
                && g.bytes()
                    .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        })
}

/// Where `cloudlet pair [TARGET]` goes: an address as given; a box ID, or
/// nothing, looked up on the LAN (mDNS). Returns the address and the box ID
/// the box there must show, when one was asked for.
pub async fn pair_target(target: Option<&str>) -> Result<(String, Option<String>), String> {
    match target {
        Some(t) if is_box_id(t) => {
            let id = t.to_owned();
            let found = tokio::task::spawn_blocking(move || discover_one(&id, 3))
                .await
                .map_err(|e| e.to_string())??;
            let addr = found.ok_or_else(|| {
                format!("box {t} did not answer on the LAN (mDNS): give its address, `cloudlet pair HOST`")
            })?;
            Ok((addr, Some(t.to_owned())))
        }
        Some(t) => Ok((t.to_owned(), None)),
        None => {
            let found = tokio::task::spawn_blocking(|| discover(3))
                .await
                .map_err(|e| e.to_string())??;
            match found.as_slice() {
                [] => Err(
                    "no box answered on the LAN (mDNS): give its address, `cloudlet pair HOST`"
                        .into(),
                ),
                [one] => {
                    let ip = one
                        .addresses
                        .iter()
                        .find(|a| a.is_ipv4())
                        .or(one.addresses.first())
                        .ok_or_else(|| format!("box {} gave no address", one.box_id))?;
                    let addr = std::net::SocketAddr::new(*ip, one.port).to_string();
                    Ok((addr, Some(one.box_id.clone())))
                }
                many => Err(format!(
                    "several boxes answered: say which, `cloudlet pair BOX_ID` ({})",
                    many.iter()
                        .map(|f| f.box_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
    }
}

/// `cloudlet pair HOST[:PORT]`: asks the box to pair this device; `expect`
/// is the box ID the box there must show, when the person named one.
pub async fn pair(
    addr: &str,
    expect: Option<&str>,
    name: &str,
    as_box: bool,
) -> Result<String, String> {
    let cfg = Config::open()?;
    let addr = with_port(addr);
    let (verifier, seen) = FirstContact::new();
    let config = client_config(&cfg, Check::FirstContact(verifier))?;
    // The name is checked by the verifier against the box ID the chain
    // shows; this one only has to be a valid name for the handshake.
    let mut conn = Conn::connect(&addr, config, "cloudlet".into()).await?;
    let (box_id, identity) = seen.get().ok_or("the box showed no identity")?;
    if let Some(want) = expect {
        if box_id != want {
            return Err(format!(
                "the box at {addr} is {box_id}, not {want}: not pairing"
            ));
        }
    }
    println!("Box ID:  {box_id}");
    println!("Code:    {}", conn.code);
    println!("Check the box ID, press the box's button once more to confirm, and");
    println!("if the box already has an owner, have the owner approve this code.");
    println!("Waiting (up to two minutes)...");
    let _ = std::io::stdout().flush();
    let kind = if as_box { "box" } else { "device" };
    let (status, body) = conn
        .call(
            "POST",
            "/pair",
            Some(serde_json::json!({"name": name, "kind": kind})),
        )
        .await?;
    if status != 200 {
        return Err(explain(status, &body));
    }
    let key = body["box_key"].as_str().unwrap_or_default().to_owned();
    let spki = tls::spki_of(&identity).ok_or("bad identity")?;
    if key != tls::key_hash(&spki) {
        return Err("the box named a key other than the one it showed: not pairing".into());
    }
    let mut boxes = cfg.boxes()?;
    boxes.insert(
        box_id.clone(),
        PinnedBox {
            addr,
            identity: base64::engine::general_purpose::STANDARD.encode(identity.as_ref()),
            key,
            device: body["device"].as_str().unwrap_or_default().to_owned(),
            role: body["role"].as_str().unwrap_or_default().to_owned(),
        },
    );
    cfg.save_boxes(&boxes)?;
    Ok(format!(
        "Paired with box {box_id} as {} (device {}).",
        body["role"].as_str().unwrap_or("?"),
        body["device"].as_str().unwrap_or("?")
    ))
}

/// One call to a paired box, pinning its identity.
pub async fn call(
    which: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    call_at(which, None, method, path, body).await
}

/// Where to reach a pinned box: `host` when given, else the address it
/// answered at last, else where it announces itself over mDNS.
async fn address(box_id: &str, pinned: &PinnedBox, host: Option<&str>) -> Result<String, String> {
    if let Some(h) = host {
        return Ok(with_port(h));
    }
    if !pinned.addr.is_empty() {
        return Ok(pinned.addr.clone());
    }
    let id = box_id.to_owned();
    let found = tokio::task::spawn_blocking(move || discover_one(&id, 3))
        .await
        .map_err(|e| e.to_string())??;
    found.ok_or_else(|| {
        format!(
            "box {box_id} has no known address and did not answer on the LAN (mDNS): \
             give it with --host HOST[:PORT]"
        )
    })
}

/// [`call`] at `host` (`HOST[:PORT]`) when given. The address a box
/// answered at with its pinned identity is kept for the next calls.
pub async fn call_at(
    which: Option<&str>,
    host: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    call_service(which, host, None, method, path, body).await
}

/// `addr` (`HOST:PORT`, as [`with_port`] makes it) with another port.
fn on_port(addr: &str, port: u16) -> String {
    match addr.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{port}"),
        None => format!("{addr}:{port}"),
    }
}

/// A paired box's service, ready to be reached: where, how to check it (its
/// pinned identity), and by what name. What [`call_service`] and
/// [`upload_service`] share.
struct Reach {
    cfg: Config,
    box_id: String,
    /// The address kept for the box, to learn whether it moved.
    pinned_addr: String,
    addr: String,
    /// The call goes to the web UI's port, the one address kept for the box.
    web: bool,
    config: Arc<rustls::ClientConfig>,
    server_name: String,
}

impl Reach {
    async fn new(
        which: Option<&str>,
        host: Option<&str>,
        port: Option<u16>,
    ) -> Result<Reach, String> {
        let cfg = Config::open()?;
        let (box_id, b) = cfg.pinned(which)?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(&b.identity)
            .map_err(|e| format!("boxes.json: {e}"))?;
        let web = address(&box_id, &b, host).await?;
        let addr = port.map_or_else(|| web.clone(), |p| on_port(&web, p));
        let config = client_config(&cfg, Check::Pinned(CertificateDer::from(der)))?;
        Ok(Reach {
            server_name: tls::box_dns_name(&box_id),
            cfg,
            box_id,
            pinned_addr: b.addr,
            addr,
            web: port.is_none(),
            config,
        })
    }

    /// Once a handshake proved the pinned identity: this is where the box
    /// is, kept for the next calls.
    fn reached(&self) -> Result<(), String> {
        if self.web && self.addr != self.pinned_addr {
            let mut boxes = self.cfg.boxes()?;
            if let Some(p) = boxes.get_mut(&self.box_id) {
                p.addr = self.addr.clone();
                self.cfg.save_boxes(&boxes)?;
            }
        }
        Ok(())
    }
}

/// [`call_at`] to another service of the box: the same host as its web
/// UI, at `port` (sync's 5984, say) when given. Every service presents a
/// certificate issued by the same pinned identity.
pub async fn call_service(
    which: Option<&str>,
    host: Option<&str>,
    port: Option<u16>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, String> {
    let reach = Reach::new(which, host, port).await?;
    let mut conn =
        Conn::connect(&reach.addr, reach.config.clone(), reach.server_name.clone()).await?;
    reach.reached()?;
    let (status, answer) = conn.call(method, path, body).await?;
    if status / 100 != 2 {
        return Err(explain(status, &answer));
    }
    Ok(answer)
}

/// Bytes read from the file per body frame.
const UPLOAD_CHUNK: usize = 256 << 10;

/// A file as a request body, read as hyper sends it: never whole in
/// memory. `sent` is told the bytes handed on so far.
struct FileBody {
    file: tokio::fs::File,
    path: PathBuf,
    /// Bytes still to send: the length announced in Content-Length.
    left: u64,
    done: u64,
    buf: Vec<u8>,
    sent: Box<dyn FnMut(u64) + Send>,
}

impl hyper::body::Body for FileBody {
    type Data = hyper::body::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let want = usize::try_from(this.left).map_or(UPLOAD_CHUNK, |l| l.min(UPLOAD_CHUNK));
        this.buf.resize(want, 0);
        let mut rb = tokio::io::ReadBuf::new(&mut this.buf);
        match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut this.file), cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(std::io::Error::new(
                e.kind(),
                io_err("reading", &this.path, e),
            )))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    // The file shrank after its length was sent: the box
                    // sees a short body and refuses it.
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} ended {} bytes early", this.path.display(), this.left),
                    ))));
                }
                let chunk = hyper::body::Bytes::copy_from_slice(rb.filled());
                let n = n as u64;
                this.left = this.left.saturating_sub(n);
                this.done = this.done.saturating_add(n);
                (this.sent)(this.done);
                Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

/// Sends the file at `file` as the body of one call to a service of the
/// paired box (as [`call_service`]: the same pinned HTTPS), streamed with
/// its length announced, `application/octet-stream`. `sent` is told the
/// bytes sent so far, with the file's length first. The answer is JSON, as
/// for [`call_service`].
pub async fn upload_service(
    which: Option<&str>,
    host: Option<&str>,
    port: Option<u16>,
    method: &str,
    path: &str,
    file: &Path,
    mut sent: impl FnMut(u64, u64) + Send + 'static,
) -> Result<serde_json::Value, String> {
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|e| io_err("opening", file, e))?;
    let meta = f.metadata().await.map_err(|e| io_err("reading", file, e))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", file.display()));
    }
    let len = meta.len();
    let reach = Reach::new(which, host, port).await?;
    let tls = tokio::time::timeout(dial::CONNECT_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(&reach.addr)
            .await
            .map_err(|e| format!("cannot reach {}: {e}", reach.addr))?;
        let name = rustls::pki_types::ServerName::try_from(reach.server_name.clone())
            .map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(reach.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", reach.addr))
    })
    .await
    .map_err(|_| {
        format!(
            "{} did not answer within {:?}",
            reach.addr,
            dial::CONNECT_TIMEOUT
        )
    })??;
    reach.reached()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sent(0, len);
    let body = FileBody {
        file: f,
        path: file.to_owned(),
        left: len,
        done: 0,
        buf: Vec::new(),
        sent: Box::new(move |done| sent(done, len)),
    };
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", &reach.server_name)
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .body(body)
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("sending {}: {e}", file.display()))?;
    let status = resp.status().as_u16();
    let answer = http_body_util::Limited::new(resp.into_body(), ANSWER_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    let answer = serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null);
    if status / 100 != 2 {
        return Err(explain(status, &answer));
    }
    Ok(answer)
}

/// Largest answer read after an upload: the box answers a few fields.
const ANSWER_LIMIT: usize = 1 << 20;

/// A box found on the LAN.
pub struct Found {
    pub box_id: String,
    pub host: String,
    pub addresses: Vec<std::net::IpAddr>,
    pub port: u16,
}

/// The address (`IP:PORT`) of the box `box_id` if it announces itself
/// within `seconds`.
fn discover_one(box_id: &str, seconds: u64) -> Result<Option<String>, String> {
    Ok(discover(seconds)?
        .into_iter()
        .find(|f| f.box_id == box_id)
        .and_then(|f| {
            let ip = f
                .addresses
                .iter()
                .find(|a| a.is_ipv4())
                .or(f.addresses.first())?;
            Some(std::net::SocketAddr::new(*ip, f.port).to_string())
        }))
}

/// `cloudlet discover`: the boxes that announce `_cloudlet._tcp` over mDNS
/// within `seconds` (on `$CLOUDLET_MDNS_INTERFACE` only, when set).
pub fn discover(seconds: u64) -> Result<Vec<Found>, String> {
    use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent};
    let mdns = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    if let Ok(i) = std::env::var("CLOUDLET_MDNS_INTERFACE") {
        mdns.disable_interface(IfKind::All)
            .map_err(|e| e.to_string())?;
        mdns.enable_interface(i.as_str())
            .map_err(|e| e.to_string())?;
    }
    let events = mdns
        .browse("_cloudlet._tcp.local.")
        .map_err(|e| format!("mDNS: {e}"))?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
        let Ok(event) = events.recv_timeout(left) else {
            break;
        };
        if let ServiceEvent::ServiceResolved(s) = event {
            let Some(id) = s.get_property_val_str("id") else {
                continue;
            };
            let mut addresses: Vec<std::net::IpAddr> =
                s.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
            addresses.sort();
            found.insert(
                id.to_owned(),
                Found {
                    box_id: id.to_owned(),
                    host: s.get_hostname().trim_end_matches('.').to_owned(),
                    addresses,
                    port: s.get_port(),
                },
            );
        }
    }
    let _ = mdns.shutdown();
    Ok(found.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body;
    use std::sync::Mutex;

    /// A body over a file of `len` patterned bytes that claims `claimed`,
    /// and what its progress callback was told.
    async fn body_of(
        dir: &Path,
        len: usize,
        claimed: u64,
    ) -> (FileBody, Vec<u8>, Arc<Mutex<Vec<u64>>>) {
        let path = dir.join("bundle");
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let body = FileBody {
            file: tokio::fs::File::open(&path).await.unwrap(),
            path,
            left: claimed,
            done: 0,
            buf: Vec::new(),
            sent: Box::new(move |done| t.lock().unwrap().push(done)),
        };
        (body, bytes, told)
    }

    #[tokio::test]
    async fn a_file_body_sends_the_whole_file_in_bounded_chunks_and_reports_each() {
        let dir = tempfile::tempdir().unwrap();
        let len = 2 * UPLOAD_CHUNK + 1234;
        let (mut body, bytes, told) = body_of(dir.path(), len, len as u64).await;
        assert_eq!(body.size_hint().exact(), Some(len as u64));
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(
                !data.is_empty() && data.len() <= UPLOAD_CHUNK,
                "{}",
                data.len()
            );
            got.extend_from_slice(&data);
        }
        assert!(body.is_end_stream());
        assert_eq!(got, bytes);
        let told = told.lock().unwrap().clone();
        assert!(told.len() >= 3, "{told:?}");
        assert!(told.windows(2).all(|w| w[0] < w[1]), "{told:?}");
        assert_eq!(told.last(), Some(&(len as u64)));
    }

    #[tokio::test]
    async fn a_file_shorter_than_announced_fails_the_body() {
        let dir = tempfile::tempdir().unwrap();
        let (mut body, _, _) = body_of(dir.path(), 1000, 1010).await;
        let mut sent = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => sent += f.into_data().unwrap().len(),
                Some(Err(e)) => break e,
                None => panic!("the body ended after {sent} bytes without an error"),
            }
        };
        assert_eq!(sent, 1000);
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("10 bytes early"), "{err}");
    }

    #[tokio::test]
    async fn a_file_longer_than_announced_sends_only_what_was_announced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut body, bytes, _) = body_of(dir.path(), 5000, 4000).await;
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(got, bytes[..4000]);
    }
}
