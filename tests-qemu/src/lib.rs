//! A harness that boots the built Cloudlet image under qemu-system-aarch64
//! through U-Boot, the way a Pi boots it from an SD card.
//!
//! Each [`Vm`] gets a copy-on-write overlay of the image (so tests never touch
//! the built image and can run side by side), its serial console captured into
//! memory, a QMP socket for the power button and keys, and host ports
//! forwarded to the box's HTTP ports. Waits poll with timeouts scaled by
//! `CLOUDLET_TEST_TIMEOUT_SCALE` for slow machines; no bare sleeps.
//! [`update`] has what the update tests and benchmark share.

pub mod update;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The box's HTTP ports, forwarded to free host ports.
pub const GUEST_PORTS: [(&str, u16); 4] = [
    ("sharing", 8080),
    ("storage", 8081),
    ("updater", 8082),
    ("sync", 5984),
];

/// Workspace root (this crate lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The host's `cloudlet` command, built beside the running test binary by
/// `cargo build --bins` at the workspace root
/// (target/debug/deps/TEST-HASH -> target/debug/cloudlet).
pub fn cloudlet_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("cloudlet"))
        .expect("a target directory");
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (cargo build --bins; scripts/test does)",
        p.display()
    );
    p
}

/// Where the built image and U-Boot are.
pub fn out_dir() -> PathBuf {
    std::env::var_os("CLOUDLET_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("out"))
}

/// A timeout scaled for slow machines.
pub fn scaled(d: Duration) -> Duration {
    let k: f64 = std::env::var("CLOUDLET_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    d.mul_f64(k.max(0.1))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Disk size the overlay presents (the image grows /data to fill it).
    pub disk_size: &'static str,
    /// Kernel + initrd to boot directly, skipping U-Boot (the benchmark's floor).
    pub direct_kernel: Option<(PathBuf, PathBuf, String)>,
    pub memory_mib: u32,
    /// A `guestfwd` rule for the box's network (e.g. a host server the box
    /// reaches at 10.0.2.100, through `tcp_pipe`).
    pub guestfwd: Option<String>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            disk_size: "1G",
            direct_kernel: None,
            memory_mib: 512,
            guestfwd: None,
        }
    }
}

/// A disk that outlives one VM, so a test can boot it again.
pub struct Disk {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Disk {
    /// A fresh copy-on-write overlay of the built image.
    pub fn new(size: &str) -> Result<Disk> {
        let image = out_dir().join("cloudlet-qemu-aarch64.img");
        if !image.exists() {
            bail!(
                "{} is missing: build the image first (scripts/build)",
                image.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("cloudlet-vm-").tempdir()?;
        Disk::overlay(dir, &image, size)
    }

    fn overlay(dir: tempfile::TempDir, image: &Path, size: &str) -> Result<Disk> {
        let path = dir.path().join("disk.qcow2");
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(image)
            .arg(&path)
            .arg(size)
            .status()
            .context("running qemu-img (scripts/setup installs it)")?;
        if !st.success() {
            bail!("qemu-img create failed: {st}");
        }
        Ok(Disk { dir, path })
    }

    /// The built image with its root filesystem (slot A) changed by `edit`,
    /// which gets the unpacked root to change: a release that differs from
    /// the one built, as a bad update would bring.
    pub fn with_rootfs(size: &str, edit: impl FnOnce(&Path) -> Result<()>) -> Result<Disk> {
        let dir = tempfile::Builder::new().prefix("cloudlet-vm-").tempdir()?;
        let raw = dir.path().join("image.raw");
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(out_dir().join("cloudlet-qemu-aarch64.img"))
            .arg(&raw))?;
        let fs = edited_rootfs(dir.path(), edit)?;
        let (offset, len) = Disk::partition_of(&raw, 2)?;
        let bytes = std::fs::metadata(&fs)?.len();
        if bytes > len {
            bail!("the changed root ({bytes} bytes) does not fit slot A ({len} bytes)");
        }
        run(Command::new("dd")
            .arg(format!("if={}", fs.display()))
            .arg(format!("of={}", raw.display()))
            .args(["bs=512", "conv=notrunc,fsync", "status=none"])
            .arg(format!("seek={}", offset / 512)))?;
        Disk::overlay(dir, &raw, size)
    }
}

/// The built root filesystem unpacked into `dir`, changed by `edit`, and
/// packed again as the builder packs it; the path of the new squashfs.
pub fn edited_rootfs(dir: &Path, edit: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let tree = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&tree);
    run(Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(&tree)
        .arg(out_dir().join("rootfs.squashfs")))?;
    edit(&tree)?;
    let fs = dir.join("rootfs.squashfs");
    run(Command::new("mksquashfs").arg(&tree).arg(&fs).args([
        "-comp",
        "lz4",
        "-Xhc",
        "-all-root",
        "-noappend",
        "-quiet",
        "-no-progress",
    ]))?;
    std::fs::remove_dir_all(&tree)?;
    Ok(fs)
}

impl Disk {
    /// A disk that `write` makes: it gets the path of a raw image to write
    /// (as `cloudlet flash` writes a card), which is then booted through a
    /// copy-on-write overlay of `size`.
    pub fn written(size: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<Disk> {
        let dir = tempfile::Builder::new().prefix("cloudlet-vm-").tempdir()?;
        let raw = dir.path().join("card.img");
        write(&raw)?;
        Disk::overlay(dir, &raw, size)
    }

    /// This disk as the guest left it, as a raw image at `to` (sparse).
    pub fn to_raw(&self, to: &Path) -> Result<()> {
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&self.path)
            .arg(to))
    }
}

/// Runs a command to success or says which one failed.
fn run(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("running {what}"))?;
    if !st.success() {
        bail!("{what} failed: {st}");
    }
    Ok(())
}

/// A line the kernel or init logged on the console: `[    1.234] ...`.
fn is_log_line(l: &str) -> bool {
    let t = l.trim_start();
    t.starts_with('[')
        && t.split(']')
            .next()
            .is_some_and(|s| s[1..].trim().parse::<f64>().is_ok())
}

impl Disk {
    /// Byte offset and length of MBR partition `n` (1..=4) of the built image.
    pub fn partition(&self, n: usize) -> Result<(u64, u64)> {
        Disk::partition_of(&out_dir().join("cloudlet-qemu-aarch64.img"), n)
    }

    /// Byte offset and length of MBR partition `n` (1..=4) of a raw image.
    fn partition_of(image: &Path, n: usize) -> Result<(u64, u64)> {
        let mut mbr = [0u8; 512];
        std::fs::File::open(image)?.read_exact(&mut mbr)?;
        let e = 446 + 16 * (n - 1);
        let le = |o: usize| u32::from_le_bytes([mbr[o], mbr[o + 1], mbr[o + 2], mbr[o + 3]]) as u64;
        Ok((le(e + 8) * 512, le(e + 12) * 512))
    }

    /// Writes zeros over `len` bytes at `offset` of this overlay (the image is untouched).
    pub fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let st = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -z {offset} {len}")])
            .arg(&self.path)
            .stdout(Stdio::null())
            .status()
            .context("running qemu-io")?;
        if !st.success() {
            bail!("qemu-io failed: {st}");
        }
        Ok(())
    }
}

pub struct Vm {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Mutex<String>>,
    qmp: Option<BufReader<UnixStream>>,
    pub ports: BTreeMap<&'static str, u16>,
    pub started: Instant,
    marker: u64,
    /// Where in the console text `wait_console` looks from.
    cursor: usize,
    /// Lines from the LED panel, with when they arrived.
    leds: Arc<Mutex<Vec<(Duration, String)>>>,
    /// The token of a device the tests paired on the box (as root, with
    /// `cloudletd sharing add-device`), once asked for.
    token: Option<String>,
    /// A TLS client that pins the box's identity (read from its disk), and
    /// the name that identity gives the box.
    tls: Option<(Arc<rustls::ClientConfig>, String)>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- console ----\n{}\n-----------------", self.console());
        }
    }
}

impl Vm {
    /// Boots `disk` (through U-Boot unless `opts.direct_kernel`). Host ports
    /// are picked free just before QEMU binds them; if another process took
    /// one in between, QEMU exits at once and the boot is tried again.
    pub fn boot(disk: &Disk, opts: &BootOptions) -> Result<Vm> {
        let mut last = None;
        for _ in 0..3 {
            match Vm::boot_once(disk, opts) {
                Ok(vm) => return Ok(vm),
                Err(e) if e.to_string().contains("before its QMP socket opened") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("QEMU did not start")))
    }

    fn boot_once(disk: &Disk, opts: &BootOptions) -> Result<Vm> {
        let out = out_dir();
        let qmp_path = disk
            .dir
            .path()
            .join(format!("qmp-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&qmp_path);
        let led_path = disk
            .dir
            .path()
            .join(format!("leds-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&led_path);
        let mut ports = BTreeMap::new();
        let mut fwd = String::new();
        for (name, guest) in GUEST_PORTS {
            let host = free_port()?;
            ports.insert(name, host);
            fwd.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        let mut cmd = Command::new("qemu-system-aarch64");
        // acpi=off: with firmware and ACPI, QEMU wires the power button to ACPI
        // instead of the PL061 GPIO + gpio-keys a board like the Pi has.
        cmd.args([
            "-M",
            "virt,acpi=off",
            "-cpu",
            "cortex-a72",
            "-m",
            &opts.memory_mib.to_string(),
        ])
        .args([
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2",
            disk.path.display()
        ))
        // restrict=on: the box reaches nothing but the forwarded ports.
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,restrict=on{fwd}{}",
            opts.guestfwd
                .as_ref()
                .map_or(String::new(), |g| format!(",guestfwd={g}"))
        ))
        .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
        // The board: a keyboard whose keys are the button, the LED panel
        // on a virtio-serial port, and a watchdog.
        .args([
            "-device",
            "virtio-keyboard-pci",
            "-device",
            "virtio-serial-pci",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=leds,path={},server=on,wait=off",
            led_path.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=leds,name=cloudlet.leds",
            "-device",
            "i6300esb",
        ]);
        match &opts.direct_kernel {
            Some((kernel, initrd, append)) => {
                cmd.arg("-kernel")
                    .arg(kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .arg("-append")
                    .arg(append);
            }
            None => {
                cmd.arg("-bios").arg(out.join("u-boot.bin"));
            }
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .context("starting qemu-system-aarch64 (scripts/setup installs it)")?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let console = Arc::new(Mutex::new(String::new()));
        let c2 = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut c) = c2.lock() {
                    c.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
                }
            }
        });
        let mut vm = Vm {
            child,
            stdin,
            console,
            qmp: None,
            ports,
            started,
            marker: 0,
            cursor: 0,
            leds: Arc::new(Mutex::new(Vec::new())),
            token: None,
            tls: None,
        };
        vm.connect_qmp(&qmp_path)?;
        vm.connect_leds(&led_path)?;
        Ok(vm)
    }

    fn connect_qmp(&mut self, path: &Path) -> Result<()> {
        let until = Instant::now() + scaled(Duration::from_secs(60));
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(st) = self.child.try_wait()? {
                        bail!("QEMU exited ({st}) before its QMP socket opened");
                    }
                    if Instant::now() > until {
                        return Err(e).context(format!("connecting to QMP at {}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream.set_read_timeout(Some(scaled(Duration::from_secs(30))))?;
        let mut r = BufReader::new(stream);
        let mut greeting = String::new();
        r.read_line(&mut greeting)?;
        if !greeting.contains("QMP") {
            bail!("unexpected QMP greeting: {greeting}");
        }
        self.qmp = Some(r);
        self.qmp(serde_json::json!({"execute": "qmp_capabilities"}))?;
        Ok(())
    }

    fn connect_leds(&mut self, path: &Path) -> Result<()> {
        let until = Instant::now() + scaled(Duration::from_secs(30));
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > until => {
                    return Err(e).with_context(|| format!("LED panel at {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let leds = self.leds.clone();
        let started = self.started;
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut l) = leds.lock() {
                    l.push((started.elapsed(), line.trim().to_owned()));
                }
            }
        });
        Ok(())
    }

    /// Everything the LED panel reported: (time since QEMU start, "status on").
    pub fn leds(&self) -> Vec<(Duration, String)> {
        self.leds.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Presses (`true`) or releases the board's button (a key of the virtio keyboard).
    pub fn button(&mut self, down: bool) -> Result<()> {
        self.qmp(serde_json::json!({
            "execute": "input-send-event",
            "arguments": {"events": [{"type": "key", "data": {"down": down, "key": {"type": "qcode", "data": "ret"}}}]}
        }))
        .map(|_| ())
    }

    /// A press held for `ms`.
    pub fn press(&mut self, ms: u64) -> Result<()> {
        self.button(true)?;
        std::thread::sleep(Duration::from_millis(ms));
        self.button(false)
    }

    /// Runs one QMP command and returns its `return` value.
    pub fn qmp(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value> {
        let r = self
            .qmp
            .as_mut()
            .ok_or_else(|| anyhow!("QMP not connected"))?;
        let mut line = cmd.to_string();
        line.push('\n');
        r.get_mut().write_all(line.as_bytes())?;
        loop {
            let mut answer = String::new();
            if r.read_line(&mut answer)? == 0 {
                bail!("QMP closed");
            }
            let v: serde_json::Value = serde_json::from_str(&answer)?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                bail!("QMP error: {err}");
            }
            // Asynchronous events (POWERDOWN, SHUTDOWN, ...) are skipped.
        }
    }

    /// Everything the serial console printed so far.
    pub fn console(&self) -> String {
        self.console.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Waits until `needle` appears on the console after the last match;
    /// returns the time since QEMU started.
    pub fn wait_console(&mut self, needle: &str, timeout: Duration) -> Result<Duration> {
        let until = Instant::now() + scaled(timeout);
        loop {
            let text = self.console();
            if let Some(i) = text.get(self.cursor..).and_then(|t| t.find(needle)) {
                self.cursor += i + needle.len();
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!("QEMU exited ({st}) before the console showed {needle:?}");
            }
            if Instant::now() > until {
                let tail: String = text
                    .chars()
                    .rev()
                    .take(3000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!(
                    "timed out after {:?} waiting for {needle:?} on the console; it ends:\n{tail}",
                    scaled(timeout)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for init's "all services ready".
    pub fn wait_ready(&mut self) -> Result<Duration> {
        self.wait_console("all services ready", Duration::from_secs(180))
    }

    /// Runs a command in the box's console shell and returns its output and exit code.
    pub fn shell(&mut self, cmd: &str) -> Result<(String, i32)> {
        self.marker += 1;
        let n = self.marker;
        // The quotes keep the echoed command line from matching the markers.
        let line = format!("echo '@@B''{n}@@'; {cmd}; echo \"@@E{n} $?\"'@@'\n");
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.flush()?;
        let begin = format!("@@B{n}@@\n");
        let end = format!("@@E{n} ");
        let until = Instant::now() + scaled(Duration::from_secs(60));
        loop {
            let text = self.console();
            if let Some(b) = text.find(&begin) {
                let after = &text[b + begin.len()..];
                if let Some(e) = after.find(&end) {
                    // init's and the kernel's log lines share the console: drop them.
                    let out: String = after[..e]
                        .lines()
                        .filter(|l| !is_log_line(l))
                        .map(|l| format!("{l}\n"))
                        .collect();
                    let code: i32 = after[e + end.len()..]
                        .split("@@")
                        .next()
                        .and_then(|c| c.trim().parse().ok())
                        .ok_or_else(|| anyhow!("bad exit marker"))?;
                    return Ok((out, code));
                }
            }
            if Instant::now() > until {
                bail!("shell command {cmd:?} did not finish");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types a command on the console without waiting for it to finish: for
    /// commands that take the box down (the shell itself is stopped, and may
    /// never print its end marker).
    pub fn type_line(&mut self, cmd: &str) -> Result<()> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes())?;
        Ok(self.stdin.flush()?)
    }

    /// Runs a shell command that must succeed; returns its output.
    pub fn sh(&mut self, cmd: &str) -> Result<String> {
        let (out, code) = self.shell(cmd)?;
        if code != 0 {
            bail!("{cmd:?} exited {code}: {out}");
        }
        Ok(out)
    }

    /// The box's status (init's, through the web UI's `/api/status`).
    pub fn status(&mut self) -> Result<cloudlet_proto::control::Status> {
        let (code, body) = self.http_get_private("sharing", "/api/status")?;
        if code != 200 {
            bail!("/api/status answered {code}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("parsing status {body:?}"))
    }

    /// Polls `f` until it returns `Some`.
    pub fn poll<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&mut Vm) -> Result<Option<T>>,
    ) -> Result<T> {
        let until = Instant::now() + scaled(timeout);
        loop {
            if let Some(v) = f(self)? {
                return Ok(v);
            }
            if Instant::now() > until {
                bail!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An HTTPS GET to a box service through its forwarded port: (status, body).
    pub fn http_get(&mut self, service: &str, path: &str) -> Result<(u16, String)> {
        self.http_get_auth(service, path, None)
    }

    /// A TLS client that trusts the box's identity and nothing else, read
    /// from the box's disk as root (as a client that paired would have it),
    /// and the name to give the box.
    pub fn tls(&mut self) -> Result<(Arc<rustls::ClientConfig>, String)> {
        if let Some(t) = &self.tls {
            return Ok(t.clone());
        }
        let hex = self.sh("od -An -v -tx1 /data/sharing/identity.crt")?;
        let der: Vec<u8> = hex
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| anyhow!("identity.crt as hex: {e}"))?;
        let cert = rustls::pki_types::CertificateDer::from(der);
        let spki = cloudlet_runtime::tls::spki_of(&cert)
            .ok_or_else(|| anyhow!("the box's identity certificate does not parse"))?;
        let name = cloudlet_runtime::tls::box_dns_name(&cloudlet_runtime::tls::box_id(&spki));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert)?;
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(cloudlet_runtime::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        self.tls = Some((config.clone(), name.clone()));
        Ok((config, name))
    }

    /// One HTTPS request to a box service through its forwarded port,
    /// pinning the box's identity ([`Vm::tls`]).
    pub fn https(
        &mut self,
        service: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: cloudlet_testkit::http::Body<'_>,
    ) -> Result<cloudlet_testkit::http::Response> {
        let port = *self
            .ports
            .get(service)
            .ok_or_else(|| anyhow!("no port for {service}"))?;
        let (config, name) = self.tls()?;
        Ok(cloudlet_testkit::http::request_tls(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            &config,
            &name,
            method,
            path,
            headers,
            body,
        )?)
    }

    /// The credential of a device paired on the box by root on the console
    /// (`cloudletd sharing add-device`, as the README tells a person with
    /// the box in hand), kept until it stops working.
    pub fn token(&mut self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let out = self.sh("cloudletd sharing add-device qemu-tests owner")?;
        let t = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("token "))
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("add-device printed no token: {out:?}"))?;
        if t.len() != 64 {
            bail!("not a token: {t:?}");
        }
        self.token = Some(t.clone());
        Ok(t)
    }

    /// [`Vm::http_get`] with a paired device's credential (paired again if
    /// the box forgot it, as after a factory reset).
    pub fn http_get_private(&mut self, service: &str, path: &str) -> Result<(u16, String)> {
        for _ in 0..2 {
            let auth = format!("Bearer {}", self.token()?);
            let (code, body) = self.http_get_auth(service, path, Some(&auth))?;
            if code != 401 {
                return Ok((code, body));
            }
            self.token = None;
        }
        bail!("{service} refuses a device paired on the box for {path}")
    }

    /// [`Vm::http_get`] with an `Authorization` header.
    pub fn http_get_auth(
        &mut self,
        service: &str,
        path: &str,
        auth: Option<&str>,
    ) -> Result<(u16, String)> {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let r = self.https(
            service,
            "GET",
            path,
            &headers,
            cloudlet_testkit::http::Body::None,
        )?;
        Ok((r.status, r.text()))
    }

    /// Presses the power button (QMP `system_powerdown`).
    pub fn power_button(&mut self) -> Result<()> {
        self.qmp(serde_json::json!({"execute": "system_powerdown"}))
            .map(|_| ())
    }

    /// Presses the power button and waits for the box to power off.
    pub fn power_off(&mut self) -> Result<std::process::ExitStatus> {
        self.power_button()?;
        self.wait_exit(Duration::from_secs(60))
    }

    /// Waits for QEMU to exit by itself (the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let until = Instant::now() + scaled(timeout);
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > until {
                bail!("the box did not power off within {:?}", scaled(timeout));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pulls the power: QEMU is killed with no warning to the guest.
    pub fn pull_power(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
