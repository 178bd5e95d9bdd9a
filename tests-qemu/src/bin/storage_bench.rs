//! `cloudlet-storage-bench CLOUDLETD WORKDIR`: the storage service against
//! the raw disk and against `rclone serve webdav`, in one run, on the same
//! filesystem, over loopback.
//!
//! * 1 GiB: one PUT and one GET of the same random file. Raw disk: `dd`
//!   with `conv=fsync` (the service also fsyncs before it answers), and a
//!   read of the written file.
//! * 10,000 small files (1-32 KiB, random): PUT and GET by 4 clients in
//!   parallel. Raw disk: the files written by the same 4 threads with one
//!   `sync` at the end, then read.
//! * 100 photo-sized files (2-8 MiB, random): PUT and GET by 4 clients. Raw
//!   disk: each written and fsynced (file and folder) by the same 4 threads.
//! * Listing: PROPFIND Depth 1 of a 6-entry folder once the store holds
//!   100,000 files; raw disk: `read_dir` and a stat of each entry.
//! * Peak RSS (VmHWM) of each server after its 1 GiB upload.
//!
//! The raw 1 GiB write is `dd bs=16M oflag=direct conv=fsync`: large direct
//! writes, the disk's real limit (a buffered `dd` measured the page cache's
//! write-back, slower than the service itself).
//! 1 GiB reads are the median of three.
//! Before each read the page cache is dropped when this runs as root, so
//! every read comes from the disk; otherwise the table says the cache was warm.
//! Run it through `scripts/bench storage`, which builds what it needs.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cloudlet_testkit::Rng;

const BIG: u64 = 1 << 30;
const SMALL_FILES: usize = 10_000;
const PHOTOS: usize = 100;
/// Files in the store when the small folder is listed.
const STORE_FILES: usize = 100_000;
/// PROPFIND requests timed for the listing row.
const LISTINGS: usize = 200;
const CLIENTS: usize = 4;
const CHUNK: usize = 1 << 20;

/// Where requests go.
#[derive(Clone)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    auth: Option<String>,
    /// The URL path under which files go.
    base: &'static str,
}

struct Server {
    child: Child,
    t: Target,
    /// The device registry our service asks (the sharing service).
    registry: Option<Child>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = &mut self.registry {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

impl Server {
    fn peak_rss_kib(&self) -> Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no VmHWM for {}", self.t.name))
    }
}

impl Target {
    fn head(&self, method: &str, path: &str, len: Option<u64>) -> String {
        let mut h = format!("{method} {}{path} HTTP/1.1\r\nHost: bench\r\n", self.base);
        if let Some(a) = &self.auth {
            h.push_str(&format!("Authorization: {a}\r\n"));
        }
        if let Some(n) = len {
            h.push_str(&format!("Content-Length: {n}\r\n"));
        }
        h.push_str("\r\n");
        h
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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

fn start_cloudlet(bin: &Path, data: &Path) -> Result<Server> {
    // The registry first (the sharing service), and a device paired in it
    // by the owner command, as a host run does. Plain HTTP on loopback, as
    // rclone's server is measured: these figures compare storage engines
    // and leave TLS out.
    let socket = data.join("registry.sock");
    let sharing_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let registry = Command::new(bin)
        .args(["sharing", "--listen", &sharing_addr.to_string(), "--plain"])
        .env("CLOUDLET_DATA", data)
        .env("CLOUDLET_REGISTRY_SOCKET", &socket)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} sharing", bin.display()))?;
    wait_listening(sharing_addr)?;
    let paired = Command::new(bin)
        .args(["sharing", "add-device", "bench", "owner"])
        .env("CLOUDLET_REGISTRY_SOCKET", &socket)
        .output()?;
    let token = String::from_utf8_lossy(&paired.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("token ").map(str::to_owned))
        .with_context(|| format!("add-device: {}", String::from_utf8_lossy(&paired.stderr)))?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(bin)
        .args(["storage", "--listen", &addr.to_string(), "--plain"])
        .env("CLOUDLET_DATA", data)
        .env("CLOUDLET_REGISTRY_SOCKET", &socket)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    wait_listening(addr)?;
    Ok(Server {
        registry: Some(registry),
        child,
        t: Target {
            name: "cloudlet",
            addr,
            auth: Some(format!("Bearer {}", token.trim())),
            base: "/files",
        },
    })
}

fn start_rclone(dir: &Path) -> Result<Server> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new("rclone")
        .args(["serve", "webdav", "--addr", &addr.to_string()])
        .arg(dir)
        .env("RCLONE_CONFIG", "/dev/null")
        .stderr(Stdio::null())
        .spawn()
        .context("starting rclone serve webdav (Debian package rclone)")?;
    wait_listening(addr)?;
    Ok(Server {
        registry: None,
        child,
        t: Target {
            name: "rclone serve webdav",
            addr,
            auth: None,
            base: "",
        },
    })
}

/// Reads a response's head; returns the status and the Content-Length.
fn read_head(r: &mut BufReader<&mut TcpStream>) -> Result<(u16, Option<u64>)> {
    let (status, headers) = cloudlet_testkit::http::read_head(r)?;
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok());
    Ok((status, len))
}

/// Streams `src` (all of it) as a PUT on a kept-alive connection.
fn put(s: &Target, conn: &mut TcpStream, path: &str, src: &mut dyn Read, len: u64) -> Result<()> {
    conn.write_all(s.head("PUT", path, Some(len)).as_bytes())?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n])?;
    }
    let mut r = BufReader::new(conn);
    let (status, body) = read_head(&mut r)?;
    if let Some(n) = body {
        std::io::copy(&mut (&mut r).take(n), &mut std::io::sink())?;
    }
    if !(200..300).contains(&status) {
        bail!("{}: PUT {path}: {status}", s.name);
    }
    Ok(())
}

/// GETs `path` and throws the bytes away; returns how many came.
fn get(s: &Target, conn: &mut TcpStream, path: &str) -> Result<u64> {
    conn.write_all(s.head("GET", path, None).as_bytes())?;
    let mut r = BufReader::with_capacity(CHUNK, conn);
    let (status, len) = read_head(&mut r)?;
    let len = len.ok_or_else(|| anyhow!("{}: GET {path}: no length", s.name))?;
    let got = std::io::copy(&mut (&mut r).take(len), &mut std::io::sink())?;
    if status != 200 || got != len {
        bail!("{}: GET {path}: {status}, {got} of {len} bytes", s.name);
    }
    Ok(got)
}

fn mkcol(s: &Target, path: &str) -> Result<()> {
    let mut c = connect(s)?;
    c.write_all(s.head("MKCOL", path, Some(0)).as_bytes())?;
    let (status, _) = read_head(&mut BufReader::new(&mut c))?;
    if status != 201 {
        bail!("{}: MKCOL {path}: {status}", s.name);
    }
    Ok(())
}

/// Drops the page cache (as root); false when that is not allowed.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn small_name(i: usize) -> String {
    format!("d{:02}/f{i:05}", i % 50)
}

/// Runs `f(i)` for i in 0..SMALL_FILES on CLIENTS threads.
fn parallel<F>(f: F) -> Result<()>
where
    F: Fn(usize, &mut Option<TcpStream>) -> Result<()> + Send + Sync + 'static,
{
    parallel_n(SMALL_FILES, f)
}

/// Runs `f(i)` for i in 0..count on CLIENTS threads.
fn parallel_n<F>(count: usize, f: F) -> Result<()>
where
    F: Fn(usize, &mut Option<TcpStream>) -> Result<()> + Send + Sync + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, f) = (next.clone(), f.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut conn = None;
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        return Ok(());
                    }
                    f(i, &mut conn)?;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow!("client thread panicked"))??;
    }
    Ok(())
}

fn connect(s: &Target) -> Result<TcpStream> {
    let c = TcpStream::connect(s.addr)?;
    c.set_nodelay(true)?;
    Ok(c)
}

fn conn(s: &Target, c: &mut Option<TcpStream>) -> Result<TcpStream> {
    match c.take() {
        Some(c) => Ok(c),
        None => connect(s),
    }
}

struct Figures {
    big_put: f64,
    big_get: f64,
    small_put: f64,
    small_get: f64,
    /// Photo-sized files, MiB/s.
    photo_put: f64,
    photo_get: f64,
    /// Listings of a small folder in a large store, per second.
    listings: f64,
    rss_kib: Option<u64>,
    /// Raw disk only: small files with an fsync each.
    small_put_synced: Option<f64>,
}

/// Runs of the 1 GiB reads (the median is reported: reads vary most).
const READ_RUNS: usize = 3;

fn median(mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..READ_RUNS).map(|_| f()).collect::<Result<Vec<_>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[READ_RUNS / 2])
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn bench_server(
    srv: &Server,
    big: &Path,
    small: &Arc<Vec<Vec<u8>>>,
    photos: &Arc<Vec<Vec<u8>>>,
    cold: bool,
) -> Result<Figures> {
    let s = &srv.t;
    let t = Instant::now();
    let mut c = connect(s)?;
    put(s, &mut c, "/big.bin", &mut std::fs::File::open(big)?, BIG)?;
    let big_put = mib_s(BIG, t.elapsed().as_secs_f64());
    let rss_kib = srv.peak_rss_kib().ok();
    let big_get = median(|| {
        if cold {
            drop_caches();
        }
        let t = Instant::now();
        let n = get(s, &mut connect(s)?, "/big.bin")?;
        Ok(mib_s(n, t.elapsed().as_secs_f64()))
    })?;

    for d in 0..50 {
        mkcol(s, &format!("/d{d:02}"))?;
    }
    let t = Instant::now();
    let (s2, data) = (s.clone(), small.clone());
    parallel(move |i, c| {
        let mut k = conn(&s2, c)?;
        let d = &data[i];
        put(
            &s2,
            &mut k,
            &format!("/{}", small_name(i)),
            &mut &d[..],
            d.len() as u64,
        )?;
        *c = Some(k);
        Ok(())
    })?;
    let small_put = SMALL_FILES as f64 / t.elapsed().as_secs_f64();
    if cold {
        drop_caches();
    }
    let t = Instant::now();
    let s2 = s.clone();
    parallel(move |i, c| {
        let mut k = conn(&s2, c)?;
        get(&s2, &mut k, &format!("/{}", small_name(i)))?;
        *c = Some(k);
        Ok(())
    })?;
    let small_get = SMALL_FILES as f64 / t.elapsed().as_secs_f64();

    mkcol(s, "/photos")?;
    let t = Instant::now();
    let (s2, data) = (s.clone(), photos.clone());
    parallel_n(PHOTOS, move |i, c| {
        let mut k = conn(&s2, c)?;
        let d = &data[i];
        put(
            &s2,
            &mut k,
            &format!("/photos/p{i:03}.jpg"),
            &mut &d[..],
            d.len() as u64,
        )?;
        *c = Some(k);
        Ok(())
    })?;
    let photo_put = mib_s(photos_bytes(photos), t.elapsed().as_secs_f64());
    if cold {
        drop_caches();
    }
    let t = Instant::now();
    let s2 = s.clone();
    parallel_n(PHOTOS, move |i, c| {
        let mut k = conn(&s2, c)?;
        get(&s2, &mut k, &format!("/photos/p{i:03}.jpg"))?;
        *c = Some(k);
        Ok(())
    })?;
    let photo_get = mib_s(photos_bytes(photos), t.elapsed().as_secs_f64());

    // The store grows to STORE_FILES files, then a small folder is listed.
    let bulk = STORE_FILES - SMALL_FILES - PHOTOS;
    mkcol(s, "/bulk")?;
    for d in 0..100 {
        mkcol(s, &format!("/bulk/b{d:02}"))?;
    }
    let s2 = s.clone();
    parallel_n(bulk, move |i, c| {
        let mut k = conn(&s2, c)?;
        let body = format!("file {i}");
        put(
            &s2,
            &mut k,
            &format!("/bulk/b{:02}/f{i:06}", i % 100),
            &mut body.as_bytes(),
            body.len() as u64,
        )?;
        *c = Some(k);
        Ok(())
    })?;
    mkcol(s, "/small")?;
    for i in 0..6 {
        put(
            s,
            &mut connect(s)?,
            &format!("/small/f{i}"),
            &mut &b"small"[..],
            5,
        )?;
    }
    let t = Instant::now();
    for _ in 0..LISTINGS {
        let n = propfind_children(s, "/small/")?;
        if n != 7 {
            bail!("{}: PROPFIND /small/ listed {n} resources, not 7", s.name);
        }
    }
    let listings = LISTINGS as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        big_put,
        big_get,
        small_put,
        small_get,
        photo_put,
        photo_get,
        listings,
        rss_kib,
        small_put_synced: None,
    })
}

fn photos_bytes(photos: &[Vec<u8>]) -> u64 {
    photos.iter().map(|p| p.len() as u64).sum()
}

/// PROPFIND Depth 1 on its own connection (read to the end); returns how
/// many resources the answer lists.
fn propfind_children(s: &Target, path: &str) -> Result<usize> {
    let mut c = connect(s)?;
    let mut head = s.head("PROPFIND", path, Some(0));
    head.insert_str(head.len() - 2, "Depth: 1\r\nConnection: close\r\n");
    c.write_all(head.as_bytes())?;
    let mut out = Vec::new();
    c.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    if !text.starts_with("HTTP/1.1 207") {
        bail!(
            "{}: PROPFIND {path}: {}",
            s.name,
            text.lines().next().unwrap_or("")
        );
    }
    Ok(text.matches(":response>").count() / 2)
}

/// The most any server could send here: 1 GiB from memory over loopback,
/// as one HTTP response, read by the same client code.
fn loopback_ceiling() -> Result<f64> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut c, _) = l.accept()?;
        let mut head = [0u8; 1024];
        let _ = c.read(&mut head)?;
        write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n")?;
        let buf = vec![7u8; CHUNK];
        for _ in 0..BIG / CHUNK as u64 {
            c.write_all(&buf)?;
        }
        Ok(())
    });
    let t = Target {
        name: "loopback",
        addr,
        auth: None,
        base: "",
    };
    let start = Instant::now();
    let n = get(&t, &mut connect(&t)?, "/")?;
    let rate = mib_s(n, start.elapsed().as_secs_f64());
    server
        .join()
        .map_err(|_| anyhow!("server thread panicked"))??;
    Ok(rate)
}

fn bench_raw(
    work: &Path,
    big: &Path,
    small: &Arc<Vec<Vec<u8>>>,
    photos: &Arc<Vec<Vec<u8>>>,
    cold: bool,
) -> Result<Figures> {
    let dst = work.join("raw");
    std::fs::create_dir_all(&dst)?;
    let t = Instant::now();
    let st = Command::new("dd")
        .arg(format!("if={}", big.display()))
        .arg(format!("of={}", dst.join("big.bin").display()))
        .args(["bs=16M", "oflag=direct", "conv=fsync", "status=none"])
        .status()?;
    if !st.success() {
        bail!("dd: {st}");
    }
    let big_put = mib_s(BIG, t.elapsed().as_secs_f64());
    let big_get = median(|| {
        if cold {
            drop_caches();
        }
        let t = Instant::now();
        let mut f = std::fs::File::open(dst.join("big.bin"))?;
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok(mib_s(n, t.elapsed().as_secs_f64()))
    })?;

    for d in 0..50 {
        std::fs::create_dir_all(dst.join(format!("d{d:02}")))?;
    }
    let t = Instant::now();
    {
        let (dst, small) = (dst.clone(), small.clone());
        parallel(move |i, _| Ok(std::fs::write(dst.join(small_name(i)), &small[i])?))?;
        let st = Command::new("sync").status()?;
        if !st.success() {
            bail!("sync: {st}");
        }
    }
    let small_put = SMALL_FILES as f64 / t.elapsed().as_secs_f64();
    // The same files made durable one by one, as an acknowledged upload must
    // be: the file and its folder fsynced before the next.
    let synced = work.join("raw-synced");
    for d in 0..50 {
        std::fs::create_dir_all(synced.join(format!("d{d:02}")))?;
    }
    let t = Instant::now();
    {
        let (synced, small) = (synced.clone(), small.clone());
        parallel(move |i, _| {
            let p = synced.join(small_name(i));
            let mut f = std::fs::File::create(&p)?;
            f.write_all(&small[i])?;
            f.sync_all()?;
            std::fs::File::open(p.parent().unwrap_or(&synced))?.sync_all()?;
            Ok(())
        })?;
    }
    let small_put_synced = SMALL_FILES as f64 / t.elapsed().as_secs_f64();
    if cold {
        drop_caches();
    }
    let t = Instant::now();
    {
        let dst = dst.clone();
        parallel(move |i, _| {
            std::fs::read(dst.join(small_name(i)))?;
            Ok(())
        })?;
    }
    let small_get = SMALL_FILES as f64 / t.elapsed().as_secs_f64();

    let pdir = dst.join("photos");
    std::fs::create_dir_all(&pdir)?;
    let t = Instant::now();
    {
        let (pdir, photos) = (pdir.clone(), photos.clone());
        parallel_n(PHOTOS, move |i, _| {
            let mut f = std::fs::File::create(pdir.join(format!("p{i:03}.jpg")))?;
            f.write_all(&photos[i])?;
            f.sync_all()?;
            std::fs::File::open(&pdir)?.sync_all()?;
            Ok(())
        })?;
    }
    let photo_put = mib_s(photos_bytes(photos), t.elapsed().as_secs_f64());
    if cold {
        drop_caches();
    }
    let t = Instant::now();
    {
        let pdir = pdir.clone();
        parallel_n(PHOTOS, move |i, _| {
            std::fs::read(pdir.join(format!("p{i:03}.jpg")))?;
            Ok(())
        })?;
    }
    let photo_get = mib_s(photos_bytes(photos), t.elapsed().as_secs_f64());
    // A small folder beside the 10,000 files (a raw folder's listing does
    // not depend on its siblings' size, so no 100,000 here).
    let sdir = dst.join("small");
    std::fs::create_dir_all(&sdir)?;
    for i in 0..6 {
        std::fs::write(sdir.join(format!("f{i}")), b"small")?;
    }
    let t = Instant::now();
    for _ in 0..LISTINGS {
        let mut n = 0;
        for e in std::fs::read_dir(&sdir)? {
            e?.metadata()?;
            n += 1;
        }
        if n != 6 {
            bail!("raw: listed {n} files, not 6");
        }
    }
    let listings = LISTINGS as f64 / t.elapsed().as_secs_f64();
    Ok(Figures {
        big_put,
        big_get,
        small_put,
        small_get,
        photo_put,
        photo_get,
        listings,
        rss_kib: None,
        small_put_synced: Some(small_put_synced),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, bin, work] = args.as_slice() else {
        bail!("usage: cloudlet-storage-bench CLOUDLETD WORKDIR");
    };
    let (bin, work) = (PathBuf::from(bin), PathBuf::from(work));
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let cold = drop_caches();

    eprintln!("making the test data (1 GiB file, {SMALL_FILES} small files)");
    let big = work.join("source.bin");
    {
        let mut r = Rng(0xb16);
        let mut f = std::io::BufWriter::with_capacity(CHUNK, std::fs::File::create(&big)?);
        for _ in 0..BIG / CHUNK as u64 {
            f.write_all(&r.fill(CHUNK))?;
        }
        f.flush()?;
    }
    let mut r = Rng(0x5a11);
    let small: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..SMALL_FILES)
            .map(|_| {
                let n = 1024 + r.below(31 * 1024) as usize;
                r.fill(n)
            })
            .collect(),
    );
    let small_mib = small.iter().map(|v| v.len() as u64).sum::<u64>() as f64 / (1 << 20) as f64;
    let photos: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..PHOTOS)
            .map(|_| {
                let n = (2 << 20) + r.below(6 << 20) as usize;
                r.fill(n)
            })
            .collect(),
    );
    let photo_mib = photos_bytes(&photos) as f64 / (1 << 20) as f64;

    let ceiling = median(loopback_ceiling)?;
    eprintln!("raw disk");
    let raw = bench_raw(&work, &big, &small, &photos, cold)?;
    eprintln!("cloudlet storage");
    let ours = {
        let s = start_cloudlet(&bin, &work.join("cloudlet"))?;
        bench_server(&s, &big, &small, &photos, cold)?
    };
    eprintln!("rclone serve webdav");
    let peer = {
        let s = start_rclone(&work.join("rclone"))?;
        bench_server(&s, &big, &small, &photos, cold)?
    };

    let disk = Command::new("df")
        .args(["--output=source,fstype", "-h"])
        .arg(&work)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    println!();
    println!(
        "Storage over loopback on {} ({}); page cache {} before each read; {CLIENTS} clients for small files",
        work.display(),
        disk.split_whitespace().collect::<Vec<_>>().join(" "),
        if cold { "dropped" } else { "NOT dropped (not root)" }
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "", "raw disk", "cloudlet", "rclone", "vs raw", "vs rclone"
    );
    let row = |name: &str, unit: &str, a: f64, b: f64, c: f64| {
        println!(
            "{:<34} {:>12} {:>12} {:>12} {:>8.0}% {:>8.2}x",
            format!("{name} ({unit})"),
            format!("{a:.1}"),
            format!("{b:.1}"),
            format!("{c:.1}"),
            100.0 * b / a,
            b / c
        );
    };
    row(
        "1 GiB PUT",
        "MiB/s",
        raw.big_put,
        ours.big_put,
        peer.big_put,
    );
    row(
        "1 GiB GET",
        "MiB/s",
        raw.big_get,
        ours.big_get,
        peer.big_get,
    );
    row(
        &format!("{SMALL_FILES} files PUT, {small_mib:.0} MiB"),
        "files/s",
        raw.small_put,
        ours.small_put,
        peer.small_put,
    );
    row(
        &format!("{SMALL_FILES} files GET"),
        "files/s",
        raw.small_get,
        ours.small_get,
        peer.small_get,
    );
    row(
        &format!("{PHOTOS} photos PUT, {photo_mib:.0} MiB"),
        "MiB/s",
        raw.photo_put,
        ours.photo_put,
        peer.photo_put,
    );
    row(
        &format!("{PHOTOS} photos GET"),
        "MiB/s",
        raw.photo_get,
        ours.photo_get,
        peer.photo_get,
    );
    row(
        &format!("list 6 of {STORE_FILES} files"),
        "lists/s",
        raw.listings,
        ours.listings,
        peer.listings,
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>8.0}%",
        "  plain socket: 1 GiB from memory",
        format!("{ceiling:.1}"),
        format!("{:.1}", ours.big_get),
        "",
        100.0 * ours.big_get / ceiling
    );
    if let Some(v) = raw.small_put_synced {
        println!(
            "{:<34} {:>12} {:>12} {:>12} {:>8.0}%",
            "  raw, fsync per file (files/s)",
            format!("{v:.1}"),
            format!("{:.1}", ours.small_put),
            "",
            100.0 * ours.small_put / v
        );
    }
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "peak RSS after 1 GiB PUT (KiB)",
        "-",
        ours.rss_kib.map(|v| v.to_string()).unwrap_or("?".into()),
        peer.rss_kib.map(|v| v.to_string()).unwrap_or("?".into())
    );
    println!("goals: 1 GiB PUT and GET >= 80% of raw and faster than rclone; peak RSS < 32768 KiB");
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
