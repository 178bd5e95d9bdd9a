//! Helpers for update tests and the update benchmark: releases made from
//! the built image (another version in /etc/cloudlet/release, quick to
//! settle), signed bundles of them, a box that reaches a host mirror, and
//! the updater's API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cloudlet_testkit::http::Body;
use cloudlet_testkit::mirror::Mirror;
use serde_json::{json, Value};

use crate::{edited_rootfs, out_dir, BootOptions, Disk, Vm};

/// The `tcp_pipe` program beside the running test or benchmark (cargo
/// builds a package's binaries for its tests; `scripts/bench` builds it).
pub fn tcp_pipe() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("tcp_pipe")
}

/// The build's signing key (image/bundle.sh's development key unless
/// CLOUDLET_SIGNING_KEY names another).
pub fn signing_key() -> Result<ed25519_dalek::SigningKey> {
    let path = match std::env::var_os("CLOUDLET_SIGNING_KEY") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("CLOUDLET_CACHE")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/cloudlet")))
                .ok_or_else(|| anyhow!("no HOME to find the signing key in"))?;
            cache.join("keys/dev-update.key")
        }
    };
    cloudlet_bundle::load_secret(&path).with_context(|| {
        format!(
            "the build's signing key {} (scripts/build-image makes it)",
            path.display()
        )
    })
}

/// Makes an unpacked root filesystem release `version`, quick to settle;
/// `broken` adds a service that never becomes ready.
pub fn make_release(tree: &Path, version: &str, broken: bool) -> Result<()> {
    std::fs::write(
        tree.join("etc/cloudlet/release"),
        format!("VERSION={version}\nBOARD=qemu-virt\n"),
    )?;
    let path = tree.join("etc/cloudlet/services.toml");
    let text = std::fs::read_to_string(&path)?;
    let mut seen = (false, false);
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("settle = ") {
            out.push_str("settle = \"5s\"\n");
            seen.0 = true;
        } else if line.starts_with("health-timeout = ") {
            out.push_str("health-timeout = \"30s\"\n");
            seen.1 = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if seen != (true, true) {
        bail!("services.toml has no top-level settle and health-timeout lines to shorten");
    }
    if broken {
        out.push_str(
            "\n[[service]]\nname = \"never-ready\"\nexec = [\"/bin/sleep\", \"1000000\"]\n",
        );
    }
    std::fs::write(&path, out)?;
    Ok(())
}

/// A signed bundle of release `version` (the built kernel and initramfs).
pub fn bundle(
    dir: &Path,
    version: &str,
    broken: bool,
    board: &str,
    key: &ed25519_dalek::SigningKey,
) -> Result<Vec<u8>> {
    let v = Variant {
        broken,
        ..Variant::default()
    };
    bundle_with(dir, version, board, key, v)
}

/// How a release differs from the built one besides its version.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    /// A service that never becomes ready.
    pub broken: bool,
    /// `/usr/bin/cloudletd` (every service) rebuilt: one byte in every
    /// 64 KiB changed, so each of its squashfs blocks differs. Not meant
    /// to boot.
    pub rebuilt_services: bool,
    /// Carries a chunk index (a box may fetch only what it lacks).
    pub chunk_index: bool,
}

impl Default for Variant {
    fn default() -> Variant {
        Variant {
            broken: false,
            rebuilt_services: false,
            chunk_index: true,
        }
    }
}

/// A signed bundle of release `version`: the built kernel and initramfs,
/// the built root changed as `v` says.
pub fn bundle_with(
    dir: &Path,
    version: &str,
    board: &str,
    key: &ed25519_dalek::SigningKey,
    v: Variant,
) -> Result<Vec<u8>> {
    let work =
        dir.join(format!("r-{version}-{board}-{v:?}").replace([' ', '{', '}', ':', ','], ""));
    std::fs::create_dir_all(&work)?;
    let rootfs = edited_rootfs(&work, |t| {
        make_release(t, version, v.broken)?;
        if v.rebuilt_services {
            let bin = t.join("usr/bin/cloudletd");
            let mut bytes = std::fs::read(&bin)?;
            for i in (0..bytes.len()).step_by(64 << 10) {
                bytes[i] ^= 0x5a;
            }
            std::fs::write(&bin, bytes)?;
        }
        Ok(())
    })?;
    let out = out_dir();
    let mut bytes = Vec::new();
    cloudlet_bundle::create_with(
        &mut bytes,
        key,
        board,
        version,
        1,
        &[&out.join("Image"), &out.join("initrd"), &rootfs],
        &[],
        v.chunk_index,
    )?;
    Ok(bytes)
}

pub fn boot_options(mirror: &Mirror) -> BootOptions {
    BootOptions {
        guestfwd: Some(format!(
            "tcp:10.0.2.100:80-cmd:{} {}",
            tcp_pipe().display(),
            mirror.addr
        )),
        ..BootOptions::default()
    }
}

/// Where the box finds `path` on the mirror.
pub fn on_box(path: &str) -> String {
    format!("http://10.0.2.100{path}")
}

/// One call to the updater with the owner's credential.
pub fn api(vm: &mut Vm, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
    let auth = format!("Bearer {}", vm.token()?);
    let text = body.map(|b| b.to_string()).unwrap_or_default();
    let r = vm.https(
        "updater",
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        if text.is_empty() {
            Body::None
        } else {
            Body::Bytes(text.as_bytes())
        },
    );
    let r = r.with_context(|| {
        let console = vm.console();
        let tail: String = console
            .chars()
            .skip(console.chars().count().saturating_sub(4000))
            .collect();
        format!("{method} {path} to the updater; the console ends:\n{tail}")
    })?;
    let v = serde_json::from_slice(&r.body)
        .with_context(|| format!("{method} {path}: {}", r.text()))?;
    Ok((r.status, v))
}

pub fn status(vm: &mut Vm) -> Result<Value> {
    let (code, v) = api(vm, "GET", "/api/update", None)?;
    if code != 200 {
        bail!("GET /api/update: {code} {v}");
    }
    Ok(v)
}

/// Asks the box to install from `url`, then waits for the install to end;
/// the last outcome.
pub fn apply(vm: &mut Vm, url: &str, reboot: bool) -> Result<Value> {
    let before = status(vm)?["last"].clone();
    let (code, v) = api(
        vm,
        "POST",
        "/api/update/apply",
        Some(json!({"url": url, "reboot": reboot})),
    )?;
    if code != 202 {
        bail!("apply {url}: {code} {v}");
    }
    vm.poll("the install to end", Duration::from_secs(300), |vm| {
        let s = status(vm)?;
        let busy = matches!(s["phase"].as_str(), Some("installing" | "verifying"));
        Ok((!busy && s["last"] != before).then(|| s["last"].clone()))
    })
}

/// Installs `url` with a reboot, and waits for QEMU to end (it runs with
/// `-no-reboot`).
pub fn install_and_reboot(mut vm: Vm, url: &str) -> Result<()> {
    let last = apply(&mut vm, url, true)?;
    if last["kind"] != "installed" {
        bail!("{url} was not installed: {last}");
    }
    vm.wait_exit(Duration::from_secs(90))?;
    Ok(())
}

/// Polls the updater until its last outcome is `kind`; its status then.
pub fn wait_outcome(vm: &mut Vm, kind: &str, timeout: Duration) -> Result<Value> {
    vm.poll(&format!("the updater to report {kind}"), timeout, |vm| {
        let s = status(vm)?;
        Ok((s["last"]["kind"] == kind).then_some(s))
    })
}

/// Boots `disk` up to U-Boot's choice of slot; the VM and that slot.
pub fn boot_slot(disk: &Disk, mirror: &Mirror) -> Result<(Vm, String)> {
    let mut vm = Vm::boot(disk, &boot_options(mirror))?;
    vm.wait_console("cloudlet: booting slot ", Duration::from_secs(60))?;
    let slot = vm
        .console()
        .rsplit("cloudlet: booting slot ")
        .next()
        .and_then(|r| r.chars().next())
        .map(String::from)
        .unwrap_or_default();
    Ok((vm, slot))
}

/// Boots `disk` until every service is ready and init committed the boot
/// (an install needs a committed slot to fall back to); the slot U-Boot chose.
pub fn boot_ready(disk: &Disk, mirror: &Mirror) -> Result<(Vm, String)> {
    let (mut vm, slot) = boot_slot(disk, mirror)?;
    vm.wait_ready()?;
    vm.wait_console("boot marked good", Duration::from_secs(60))?;
    Ok((vm, slot))
}

/// Boots `disk` again and again while U-Boot picks a slot other than
/// `good`: each such boot must show `failing` on the console and then end by
/// itself (within `ends`). Returns the first boot of `good`, ready, and how
/// many boots of the other slot came before it (at most 4 are allowed).
pub fn boot_until_slot(
    disk: &Disk,
    mirror: &Mirror,
    good: &str,
    failing: &str,
    ends: Duration,
) -> Result<(Vm, usize)> {
    let mut others = 0;
    loop {
        let (mut vm, slot) = boot_slot(disk, mirror)?;
        if slot == good {
            vm.wait_ready()?;
            return Ok((vm, others));
        }
        vm.wait_console(failing, Duration::from_secs(180))?;
        vm.wait_exit(ends)?;
        others += 1;
        if others > 4 {
            bail!("the box kept booting slot {slot}, not {good}");
        }
    }
}

/// SHA-256 of what makes slot `slot` (its root partition, kernel and
/// initramfs), as root reads it on the box.
pub fn slot_digest(vm: &mut Vm, slot: &str) -> Result<String> {
    let dev = if slot == "A" {
        "/dev/vda2"
    } else {
        "/dev/vda3"
    };
    vm.sh(&format!(
        "sha256sum {dev} /boot/Image-{slot} /boot/initrd-{slot} | cut -d' ' -f1 | tr '\\n' ' '"
    ))
}

/// A signed bundle of release `version` whose initramfs hangs: its `/init`
/// (busybox's shell) sleeps for ever, so nothing ever takes over the
/// watchdog U-Boot armed, as with a kernel that hangs early.
pub fn hanging_bundle(
    dir: &Path,
    version: &str,
    key: &ed25519_dalek::SigningKey,
) -> Result<Vec<u8>> {
    let work = dir.join(format!("hang-{version}"));
    let tree = work.join("initrd");
    std::fs::create_dir_all(tree.join("bin"))?;
    let rootfs = edited_rootfs(&work, |t| {
        std::fs::copy(t.join("bin/busybox"), tree.join("bin/busybox"))?;
        Ok(())
    })?;
    std::fs::write(
        tree.join("init"),
        "#!/bin/busybox sh\necho 'cloudlet test: this initramfs hangs'\nwhile :; do /bin/busybox sleep 3600; done\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tree.join("init"), std::fs::Permissions::from_mode(0o755))?;
    let initrd = work.join("initrd.cpio");
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 > \"$2\"")
        .arg("sh")
        .arg(&tree)
        .arg(&initrd)
        .status()?;
    if !st.success() {
        bail!("cpio failed: {st}");
    }
    let mut bytes = Vec::new();
    cloudlet_bundle::create(
        &mut bytes,
        key,
        "qemu-virt",
        version,
        1,
        &[&out_dir().join("Image"), &initrd, &rootfs],
    )?;
    Ok(bytes)
}
