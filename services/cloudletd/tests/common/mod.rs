//! Starting a real `cloudletd` service for the black-box tests: on a free
//! loopback port, its state under a temporary data directory, its log kept.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running service, as a test needs it.
pub struct Spawned {
    pub child: Child,
    pub addr: SocketAddr,
    /// The service's access token (its credential until pairing).
    pub token: String,
    /// Every line the service logged so far (each test binary compiles this
    /// module; not every one reads the log).
    #[allow(dead_code)]
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts `cloudletd SERVICE` with its state under `data`, the extra
/// environment `env`, and (if given) at most `open_files` descriptors to
/// start with, as a box's default of 1024 would be.
pub fn spawn(service: &str, data: &Path, env: &[(&str, &str)], open_files: Option<u64>) -> Spawned {
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
    let mut child = cmd
        .args([service, "--listen", "127.0.0.1:0"])
        .env("CLOUDLET_DATA", data)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting cloudletd {service}: {e}"));
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line.split("addr=").nth(1) {
                let _ = tx.send(a.trim().to_owned());
            }
            lines.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the service says where it listens")
        .parse()
        .unwrap();
    let token = std::fs::read_to_string(data.join(service).join("access-token"))
        .unwrap()
        .trim()
        .to_owned();
    Spawned {
        child,
        addr,
        token,
        log,
    }
}
