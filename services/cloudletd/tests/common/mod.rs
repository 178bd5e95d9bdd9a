//! Starting a real `cloudletd` service for the black-box tests: on a free
//! loopback port, its state under a temporary data directory, its log kept,
//! with the device registry it asks (a `cloudletd sharing` on the same data
//! directory) and one device paired in it by the owner command.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The sharing service holding the registry of one data directory, and
/// the token of the device the tests pair in it. Stopped when the last
/// service using it is dropped.
pub struct Registry {
    child: Mutex<Child>,
    pub socket: PathBuf,
    pub token: String,
    /// Where the sharing service answers HTTP.
    #[allow(dead_code)]
    pub addr: SocketAddr,
}

impl Registry {
    /// Runs an owner command (`cloudletd sharing ARGS...`) against this
    /// registry; its output, or why it failed.
    #[allow(dead_code)]
    pub fn owner(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .arg("sharing")
            .args(args)
            .env("CLOUDLET_REGISTRY_SOCKET", &self.socket)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Stops the sharing service now (the registry goes away).
    #[allow(dead_code)]
    pub fn stop(&self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }
}

static REGISTRIES: Mutex<Vec<(PathBuf, Weak<Registry>)>> = Mutex::new(Vec::new());

/// Follows a started service's log (its stderr): every line is kept, and
/// the address it says it listens on is returned once it says so.
pub fn follow(child: &mut Child) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let stderr = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line
                .split("addr=")
                .nth(1)
                .and_then(|a| a.split_whitespace().next())
            {
                let _ = tx.send(a.to_owned());
            }
            lines.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the service says where it listens")
        .parse()
        .unwrap();
    (addr, log)
}

/// A sharing service over TLS on its own data directory (the registry,
/// pairing, the web UI), for tests of pairing and of the `cloudlet`
/// command; stopped when dropped. Without init: no button presses but the
/// ones [`Sharing::press`] makes.
#[allow(dead_code)]
pub struct Sharing {
    child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// Every line the service logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Sharing {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(dead_code)]
impl Sharing {
    /// Starts it on `listen` with the extra environment `env`.
    pub fn start(data: &Path, listen: &str, env: &[(&str, &str)]) -> Sharing {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .args(["sharing", "--listen", listen])
            .env("CLOUDLET_DATA", data)
            .env("CLOUDLET_REGISTRY_SOCKET", data.join("registry.sock"))
            .env("CLOUDLET_CONTROL_SOCKET", data.join("no-init.sock"))
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cloudletd sharing");
        let (addr, log) = follow(&mut child);
        Sharing {
            child,
            addr,
            data: data.to_owned(),
            log,
        }
    }

    /// The box's button, pressed once (`cloudletd sharing press`).
    pub fn press(&self) {
        let out = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .args(["sharing", "press"])
            .env("CLOUDLET_REGISTRY_SOCKET", self.data.join("registry.sock"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// How many requests to pair have reached the box so far.
    pub fn asks(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("a device asks to pair"))
            .count()
    }

    /// Waits until `n` requests to pair have reached the box in all, so
    /// that a press the test makes next comes after the request.
    pub fn wait_asks(&self, n: usize) {
        for _ in 0..500 {
            if self.asks() >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the box never saw request {n} to pair");
    }

    /// The box's identity certificate (DER), as the service keeps it.
    pub fn identity(&self) -> Vec<u8> {
        std::fs::read(self.data.join("sharing/identity.crt")).unwrap()
    }
}

/// The registry of `data`: the running one, or a new one with a device
/// paired by `cloudletd sharing add-device`.
pub fn registry(data: &Path) -> Arc<Registry> {
    let mut all = REGISTRIES.lock().unwrap();
    all.retain(|(_, w)| w.strong_count() > 0);
    if let Some(r) = all
        .iter()
        .find(|(p, _)| p == data)
        .and_then(|(_, w)| w.upgrade())
    {
        return r;
    }
    let socket = data.join("registry.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
        .args(["sharing", "--listen", "127.0.0.1:0", "--plain"])
        .env("CLOUDLET_DATA", data)
        .env("CLOUDLET_REGISTRY_SOCKET", &socket)
        .stderr(Stdio::piped())
        // Services log to stderr; a process a test fails to stop must not
        // hold the test run's output open (scripts/test pipes it to tee).
        .stdout(Stdio::null())
        .spawn()
        .expect("starting cloudletd sharing");
    let (addr, _) = follow(&mut child);
    let mut r = Registry {
        child: Mutex::new(child),
        socket,
        token: String::new(),
        addr,
    };
    let text = r
        .owner(&["add-device", "tests", "owner"])
        .unwrap_or_else(|e| panic!("add-device: {e}"));
    r.token = text
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .expect("add-device prints a token")
        .to_owned();
    let r = Arc::new(r);
    all.push((data.to_owned(), Arc::downgrade(&r)));
    r
}

/// A running service, as a test needs it.
#[allow(dead_code)]
pub struct Spawned {
    pub child: Child,
    pub addr: SocketAddr,
    /// The token of a device paired in the service's registry.
    #[allow(dead_code)]
    pub token: String,
    /// The registry the service asks; keep it as long as the service.
    pub registry: Arc<Registry>,
    /// Every line the service logged so far (each test binary compiles this
    /// module; not every one reads the log).
    #[allow(dead_code)]
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts `cloudletd SERVICE` with its state under `data`, the extra
/// environment `env`, and (if given) at most `open_files` descriptors to
/// start with, as a box's default of 1024 would be.
#[allow(dead_code)]
pub fn spawn(service: &str, data: &Path, env: &[(&str, &str)], open_files: Option<u64>) -> Spawned {
    spawn_with(service, data, env, open_files, false)
}

#[allow(dead_code)]
/// [`spawn`], over TLS when `tls` (else plain HTTP on loopback, `--plain`,
/// for clients that cannot be given the box's certificate).
pub fn spawn_with(
    service: &str,
    data: &Path,
    env: &[(&str, &str)],
    open_files: Option<u64>,
    tls: bool,
) -> Spawned {
    spawn_on(service, data, env, open_files, tls, "127.0.0.1:0")
}

#[allow(dead_code)]
/// [`spawn_with`] listening on `listen` (a port a test picked, so that
/// another service can be told it before this one starts).
pub fn spawn_on(
    service: &str,
    data: &Path,
    env: &[(&str, &str)],
    open_files: Option<u64>,
    tls: bool,
    listen: &str,
) -> Spawned {
    let mut cmd = match open_files {
        // A shell lowers the limit, then becomes the service (same pid).
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -Sn {n} && exec \"$0\" \"$@\""))
                .arg(env!("CARGO_BIN_EXE_cloudletd"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_cloudletd")),
    };
    let registry = registry(data);
    let mut child = cmd
        .args([service, "--listen", listen])
        .args((!tls).then_some("--plain"))
        .env("CLOUDLET_DATA", data)
        .env("CLOUDLET_REGISTRY_SOCKET", &registry.socket)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        // Services log to stderr; a process a test fails to stop must not
        // hold the test run's output open (scripts/test pipes it to tee).
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting cloudletd {service}: {e}"));
    let (addr, log) = follow(&mut child);
    Spawned {
        child,
        addr,
        token: registry.token.clone(),
        registry,
        log,
    }
}

/// The `cloudlet` binary, built beside `cloudletd` by `cargo build --bins`
/// (scripts/test builds the binaries before the tests).
#[allow(dead_code)]
pub fn cloudlet_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_cloudletd")).with_file_name("cloudlet");
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --bins; scripts/test does)",
        p.display()
    );
    p
}

/// Runs `cloudlet ARGS` as the device whose config is in `config`; mDNS,
/// where a call needs it, stays on this machine (`lo`).
#[allow(dead_code)]
pub fn cloudlet(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(cloudlet_bin())
        .args(args)
        .env("CLOUDLET_CONFIG_DIR", config)
        .env("CLOUDLET_MDNS_INTERFACE", "lo")
        .output()
        .unwrap()
}

/// What a command printed, stdout then stderr.
#[allow(dead_code)]
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A TLS client configuration that pins the box whose identity
/// certificate is `identity` as its only root, presenting a fresh
/// self-signed device key when `with_key`; and the name to ask the box by
/// (its box ID's DNS name).
#[allow(dead_code)]
pub fn pinning_client(
    identity: &rustls::pki_types::CertificateDer<'static>,
    with_key: bool,
) -> (Arc<rustls::ClientConfig>, String) {
    use cloudlet_runtime::tls;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(identity.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = if with_key {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["device".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        b.with_client_auth_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap()
    } else {
        b.with_no_client_auth()
    };
    let spki = tls::spki_of(identity).unwrap();
    (Arc::new(config), tls::box_dns_name(&tls::box_id(&spki)))
}

/// A device key for the `cloudlet` config in `config`, paired in the
/// registry of `data` with `role`; the box (whose sync answers at `addr`)
/// pinned by its identity.
#[allow(dead_code)]
pub fn pair_pc(config: &Path, data: &Path, s: &Spawned, role: &str) {
    use base64_pin::encode;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["pc".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::create_dir_all(config).unwrap();
    std::fs::write(config.join("device.key"), key.serialize_der()).unwrap();
    std::fs::write(config.join("device.crt"), cert.der()).unwrap();
    let hash =
        cloudlet_runtime::tls::key_hash(&cloudlet_runtime::tls::spki_of(cert.der()).unwrap());
    s.registry
        .owner(&["add-device", "pc", role, "--key", &hash])
        .unwrap();

    let identity = std::fs::read(data.join("sharing/identity.crt")).unwrap();
    let spki = cloudlet_runtime::tls::spki_of(&identity.clone().into()).unwrap();
    let boxes = serde_json::json!({
        cloudlet_runtime::tls::box_id(&spki): {
            "addr": s.addr.to_string(),
            "identity": encode(&identity),
            "key": cloudlet_runtime::tls::key_hash(&spki),
            "device": "",
            "role": role,
        }
    });
    std::fs::write(config.join("boxes.json"), boxes.to_string()).unwrap();
}

/// Standard base64 (the tests have no base64 crate of their own).
mod base64_pin {
    pub fn encode(b: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
