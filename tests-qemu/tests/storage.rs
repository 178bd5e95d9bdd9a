//! Storage on the real box: files uploaded over WebDAV through QEMU's port
//! forward survive the whole machine losing power mid-upload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use cloudlet_testkit::http::{request_tls, Body, Response};
use cloudlet_testkit::Rng;
use cloudlet_tests_qemu::{scaled, BootOptions, Disk, Vm};

/// How a client reaches storage on the box: over TLS, pinning the box.
#[derive(Clone)]
struct Storage {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    name: String,
    auth: String,
}

impl Storage {
    fn of(vm: &mut Vm) -> Result<Storage> {
        let token = vm.token()?;
        let (tls, name) = vm.tls()?;
        Ok(Storage {
            addr: SocketAddr::from(([127, 0, 0, 1], vm.ports["storage"])),
            tls,
            name,
            auth: format!("Bearer {token}"),
        })
    }

    fn request(&self, method: &str, path: &str, body: Body<'_>) -> std::io::Result<Response> {
        let h = [("Authorization", self.auth.as_str())];
        request_tls(self.addr, &self.tls, &self.name, method, path, &h, body)
    }
}

/// Kills QEMU at a random moment while a client uploads, twice, and checks
/// after each boot that every acknowledged file is intact and that the one
/// in flight is whole or absent.
#[test]
fn pulling_the_power_mid_upload_loses_no_acknowledged_file() -> Result<()> {
    let disk = Disk::new("1G")?;
    let mut r = Rng(0x0b0c_5eed);
    let mut acked: Vec<(String, blake3::Hash)> = Vec::new();
    let mut in_flight: Vec<(String, blake3::Hash)> = Vec::new();
    for round in 0..3 {
        let mut vm = Vm::boot(&disk, &BootOptions::default())?;
        vm.wait_ready()?;
        let storage = Storage::of(&mut vm)?;
        for (p, want) in &acked {
            let g = storage.request("GET", p, Body::None)?;
            assert_eq!(g.status, 200, "round {round}: acknowledged {p} lost");
            assert_eq!(blake3::hash(&g.body), *want, "round {round}: {p} damaged");
        }
        for (p, want) in in_flight.drain(..) {
            let g = storage.request("GET", &p, Body::None)?;
            match g.status {
                200 => assert_eq!(blake3::hash(&g.body), want, "round {round}: {p} partial"),
                s => assert_eq!(s, 404, "round {round}: {p}"),
            }
        }
        let tmp = vm.sh("ls /data/storage/tmp | wc -l")?;
        assert_eq!(tmp.trim(), "0", "round {round}: unfinished uploads left");
        if round == 2 {
            break;
        }
        let (tx, rx) = std::sync::mpsc::channel::<(String, blake3::Hash, bool)>();
        let seed = r.next_u64() | 1;
        let client = storage.clone();
        let writer = std::thread::spawn(move || {
            let mut r = Rng(seed);
            for i in 0.. {
                let size = if r.below(3) == 0 {
                    r.below(2000) as usize
                } else {
                    100_000 + r.below(900_000) as usize
                };
                let data = r.fill(size);
                let path = format!("/files/vm{round}-{i}.bin");
                let h = blake3::hash(&data);
                if tx.send((path.clone(), h, false)).is_err() {
                    return;
                }
                let ok = client
                    .request("PUT", &path, Body::Bytes(&data))
                    .is_ok_and(|resp| resp.status == 201);
                if !ok || tx.send((path, h, true)).is_err() {
                    return;
                }
            }
        });
        let kill_at = Instant::now() + scaled(Duration::from_millis(1500 + r.below(3000)));
        let mut pending = None;
        let mut note = |(p, h, done): (String, blake3::Hash, bool)| {
            if done {
                acked.push((p, h));
                pending = None;
            } else {
                pending = Some((p, h));
            }
        };
        while Instant::now() < kill_at {
            if let Ok(m) = rx.recv_timeout(Duration::from_millis(5)) {
                note(m);
            }
        }
        vm.pull_power()?;
        let _ = writer.join();
        for m in rx.try_iter() {
            note(m);
        }
        in_flight.extend(pending);
    }
    eprintln!("{} uploads acknowledged across two power cuts", acked.len());
    assert!(
        acked.len() >= 2,
        "too few uploads to mean anything: {}",
        acked.len()
    );
    Ok(())
}
