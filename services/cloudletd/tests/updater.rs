//! The real `cloudletd updater` on the host, with a box's slots made of
//! files: a boot directory (the FAT partition: kernels, initramfs, both
//! boot-state copies) and a file standing for the other slot's partition.
//! What a box's init would tell it comes in through the same variables.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloudlet_proto::bootstate::{BootState, OnDisk, Slot, COPY_NAMES};
use cloudlet_testkit::http::{request, Body, Response};
use cloudlet_testkit::mirror::Mirror;
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

/// The other slot's partition, as a file of this size.
const SLOT: u64 = 4 << 20;

fn noise(seed: u64, len: usize) -> Vec<u8> {
    cloudlet_testkit::Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).fill(len)
}

struct Box_ {
    dir: tempfile::TempDir,
    key: SigningKey,
}

impl Box_ {
    /// A box running slot A (committed), slot B empty, trusting `key`.
    fn new() -> Box_ {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for d in ["boot", "keys", "data", "run", "parts"] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        let s = BootState::initial();
        std::fs::write(p.join("boot").join(COPY_NAMES[0]), s.encode()).unwrap();
        let mut older = s.clone();
        older.seq = 0;
        std::fs::write(p.join("boot").join(COPY_NAMES[1]), older.encode()).unwrap();
        std::fs::write(p.join("boot/Image-A"), noise(1, 300_000)).unwrap();
        std::fs::write(p.join("boot/initrd-A"), noise(2, 100_000)).unwrap();
        for slot in ["A", "B"] {
            let f = std::fs::File::create(p.join(format!("slot{slot}.img"))).unwrap();
            f.set_len(SLOT).unwrap();
        }
        std::fs::write(p.join("slotA.img"), noise(3, SLOT as usize)).unwrap();
        let key = SigningKey::from_bytes(&[11u8; 32]);
        std::fs::write(
            p.join("keys/release.pub"),
            format!("{}\n", cloudlet_bundle::public_hex(&key.verifying_key())),
        )
        .unwrap();
        Box_ { dir, key }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn boot_state(&self) -> BootState {
        OnDisk::new(self.path("boot")).read().unwrap().unwrap().1
    }

    /// Bytes of everything slot A is made of, and the boot state's choice.
    fn active(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<Slot>, u32) {
        let s = self.boot_state();
        (
            std::fs::read(self.path("boot/Image-A")).unwrap(),
            std::fs::read(self.path("boot/initrd-A")).unwrap(),
            std::fs::read(self.path("slotA.img")).unwrap(),
            s.order.clone(),
            s.a_left,
        )
    }

    /// A bundle of release `version` for `board` signed by `key` (the
    /// box's own unless given), introducing `introduces`.
    fn bundle(
        &self,
        version: &str,
        board: &str,
        key: Option<&SigningKey>,
        rootfs: usize,
    ) -> Vec<u8> {
        self.bundle_introducing(version, board, key, rootfs, &[])
    }

    fn bundle_introducing(
        &self,
        version: &str,
        board: &str,
        key: Option<&SigningKey>,
        rootfs: usize,
        introduces: &[ed25519_dalek::VerifyingKey],
    ) -> Vec<u8> {
        self.bundle_with(version, board, key, rootfs, introduces, true)
    }

    /// A bundle; without `chunk_index`, one a box can only fetch whole.
    fn bundle_with(
        &self,
        version: &str,
        board: &str,
        key: Option<&SigningKey>,
        rootfs: usize,
        introduces: &[ed25519_dalek::VerifyingKey],
        chunk_index: bool,
    ) -> Vec<u8> {
        let seed = version.bytes().map(u64::from).sum::<u64>();
        let parts: Vec<PathBuf> = [("Image", 310_000), ("initrd", 90_000), ("rootfs", rootfs)]
            .iter()
            .enumerate()
            .map(|(i, (n, len))| {
                let p = self.path(&format!("parts/{n}-{version}"));
                std::fs::write(&p, noise(seed + i as u64 * 7, *len)).unwrap();
                p
            })
            .collect();
        let mut out = Vec::new();
        cloudlet_bundle::create_with(
            &mut out,
            key.unwrap_or(&self.key),
            board,
            version,
            1,
            &[&parts[0], &parts[1], &parts[2]],
            introduces,
            chunk_index,
        )
        .unwrap();
        out
    }

    fn part(&self, name: &str, version: &str) -> Vec<u8> {
        std::fs::read(self.path(&format!("parts/{name}-{version}"))).unwrap()
    }

    /// The updater as init would start it on slot `running`, release `version`.
    fn start(&self, running: &str, version: &str, boot_id: &str) -> Updater {
        self.start_with(running, version, boot_id, false)
    }

    /// [`Box_::start`], over TLS when `tls` (as on a box; for the `cloudlet` command).
    fn start_with(&self, running: &str, version: &str, boot_id: &str, tls: bool) -> Updater {
        let other = if running == "A" { "B" } else { "A" };
        std::fs::write(
            self.path(&format!("release-{version}")),
            format!("VERSION={version}\nBOARD=qemu-virt\n"),
        )
        .unwrap();
        let env = [
            ("CLOUDLET_SLOT", running.to_owned()),
            ("CLOUDLET_BOOT_DIR", self.path("boot").display().to_string()),
            (
                "CLOUDLET_OTHER_SLOT_DEV",
                self.path(&format!("slot{other}.img")).display().to_string(),
            ),
            (
                "CLOUDLET_UPDATE_KEYS",
                self.path("keys").display().to_string(),
            ),
            (
                "CLOUDLET_RELEASE_FILE",
                self.path(&format!("release-{version}"))
                    .display()
                    .to_string(),
            ),
            (
                "CLOUDLET_UPDATE_STATUS",
                self.path("run/status.json").display().to_string(),
            ),
            ("CLOUDLET_BOOT_ID", boot_id.to_owned()),
            ("CLOUDLET_CONTROL_SOCKET", String::new()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Updater {
            s: common::spawn_with("updater", &self.path("data"), &env, None, tls),
        }
    }
}

struct Updater {
    s: common::Spawned,
}

impl Drop for Updater {
    fn drop(&mut self) {
        let _ = self.s.child.kill();
        let _ = self.s.child.wait();
    }
}

impl Updater {
    fn send_as(&self, token: &str, method: &str, path: &str, body: &[u8]) -> Response {
        let auth = format!("Bearer {token}");
        let h = [("Authorization", auth.as_str())];
        let body = if body.is_empty() {
            Body::None
        } else {
            Body::Bytes(body)
        };
        request(self.s.addr, method, path, &h, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let r = self.send_as(&self.s.token, method, path, body);
        let v = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()));
        (r.status, v)
    }

    fn push(&self, bundle: &[u8], query: &str) -> (u16, Value) {
        self.call(
            "PUT",
            &format!("/api/update/bundle?reboot=0{query}"),
            bundle,
        )
    }

    fn status(&self) -> Value {
        let (code, v) = self.call("GET", "/api/update", b"");
        assert_eq!(code, 200, "{v}");
        v
    }

    /// Waits for the last outcome to be of `kind`.
    fn wait_outcome(&self, kind: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.status();
            if v["last"]["kind"] == kind && v["phase"] != "installing" && v["phase"] != "verifying"
            {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {kind} outcome: {v}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn a_pushed_bundle_goes_to_the_other_slot_is_booted_next_and_committed_after_a_healthy_boot() {
    let b = Box_::new();
    let before = b.active();
    let u = b.start("A", "0.1.0", "boot-1");
    let bundle = b.bundle("0.2.0", "qemu-virt", None, 1_000_000);
    let (code, v) = u.push(&bundle, "");
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v,
        json!({"installed": "0.2.0", "slot": "B", "reboot": false})
    );
    // Every part is where slot B's boot reads it.
    assert!(std::fs::read(b.path("boot/Image-B")).unwrap() == b.part("Image", "0.2.0"));
    assert!(std::fs::read(b.path("boot/initrd-B")).unwrap() == b.part("initrd", "0.2.0"));
    let dev = std::fs::read(b.path("slotB.img")).unwrap();
    assert_eq!(dev.len() as u64, SLOT, "the partition changed size");
    assert!(dev[..1_000_000] == b.part("rootfs", "0.2.0")[..]);
    // Slot A is as it was; the boot state tries B first, with A behind it.
    let after = b.active();
    assert!(before.0 == after.0 && before.1 == after.1 && before.2 == after.2);
    let s = b.boot_state();
    assert_eq!(
        (s.order.clone(), s.a_left, s.b_left),
        (vec![Slot::B, Slot::A], 3, 3)
    );
    let st = u.status();
    assert_eq!(st["phase"], "reboot-pending", "{st}");
    assert_eq!(st["last"]["kind"], "installed", "{st}");
    assert_eq!(st["boot"]["other_version"], "0.2.0", "{st}");
    let published: Value =
        serde_json::from_slice(&std::fs::read(b.path("run/status.json")).unwrap()).unwrap();
    assert_eq!(published["last"]["kind"], "installed");
    // A second install before the reboot is refused.
    let (code, v) = u.push(&b.bundle("0.3.0", "qemu-virt", None, 1000), "");
    assert_eq!(code, 409, "{v}");
    drop(u);

    // The reboot: U-Boot counts a try of B; the updater on B sees a trial.
    OnDisk::new(b.path("boot"))
        .update(|s| s.b_left = 2)
        .unwrap();
    let u = b.start("B", "0.2.0", "boot-2");
    let st = u.status();
    assert_eq!(st["phase"], "trial", "{st}");
    assert_eq!(st["boot"]["committed"], false, "{st}");
    // init commits the settled boot (full tries again): the floor rises.
    OnDisk::new(b.path("boot"))
        .update(|s| s.b_left = 3)
        .unwrap();
    let st = u.wait_outcome("committed");
    assert_eq!(st["floor"], "0.2.0", "{st}");
    assert_eq!(st["phase"], "idle", "{st}");
    // The floor holds: 0.1.5 is refused now even though slot A runs 0.1.0.
    let (code, v) = u.push(&b.bundle("0.1.5", "qemu-virt", None, 1000), "");
    assert_eq!(code, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not newer"), "{v}");
}

#[test]
fn bad_bundles_are_refused_with_a_reason_and_the_active_slot_stays_byte_identical() {
    let b = Box_::new();
    let before = b.active();
    let u = b.start("A", "0.1.0", "boot-1");
    let good = b.bundle("0.2.0", "qemu-virt", None, 1_000_000);
    let stranger = SigningKey::from_bytes(&[99u8; 32]);
    let mut corrupt = good.clone();
    let at = good.len() - 1024 - 512 - 100;
    corrupt[at] ^= 0x55;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("corrupted", corrupt, "does not match its hash"),
        (
            "wrong key",
            b.bundle("0.2.0", "qemu-virt", Some(&stranger), 1000),
            "not signed by a key this box trusts",
        ),
        (
            "unsigned",
            b"not a bundle at all, no signature".to_vec(),
            "could not be read",
        ),
        ("truncated", good[..good.len() / 2].to_vec(), "ends after"),
        (
            "wrong board",
            b.bundle("0.2.0", "rpi4", None, 1000),
            "board",
        ),
        (
            "older",
            b.bundle("0.0.9", "qemu-virt", None, 1000),
            "not newer",
        ),
        (
            "equal",
            b.bundle("0.1.0+other", "qemu-virt", None, 1000),
            "not newer",
        ),
        (
            "larger than the slot",
            b.bundle("0.2.1", "qemu-virt", None, SLOT as usize + 1),
            "the slot holds",
        ),
    ];
    for (what, bundle, says) in cases {
        let (code, v) = u.push(&bundle, "");
        assert_eq!(code, 422, "{what}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(says), "{what}: {e}");
        assert!(
            b.active() == before,
            "{what}: slot A or its place in the boot state changed"
        );
        assert_eq!(u.status()["last"]["kind"], "refused", "{what}");
        assert_eq!(b.boot_state().b_left, 0, "{what}: slot B was made bootable");
    }
    // The owner may allow a downgrade explicitly.
    let (code, v) = u.push(
        &b.bundle("0.0.9", "qemu-virt", None, 1000),
        "&allow_downgrade=1",
    );
    assert_eq!(code, 200, "{v}");
    // Another paired device that is not the owner may look, not install.
    let out =
        u.s.registry
            .owner(&["add-device", "phone", "device"])
            .unwrap();
    let phone = out.lines().find_map(|l| l.strip_prefix("token ")).unwrap();
    let r = u.send_as(phone, "PUT", "/api/update/bundle?reboot=0", &good);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(u.send_as(phone, "GET", "/api/update", b"").status, 200);
    assert_eq!(u.send_as("nope", "GET", "/api/update", b"").status, 401);
}

#[test]
fn a_slot_that_used_up_its_tries_is_reported_as_rolled_back_and_the_old_slot_goes_first() {
    let b = Box_::new();
    let u = b.start("A", "0.1.0", "boot-1");
    let (code, v) = u.push(&b.bundle("0.3.0", "qemu-virt", None, 1000), "");
    assert_eq!(code, 200, "{v}");
    drop(u);
    // Three boots of B that never became healthy; U-Boot went back to A.
    OnDisk::new(b.path("boot"))
        .update(|s| s.b_left = 0)
        .unwrap();
    let u = b.start("A", "0.1.0", "boot-5");
    let st = u.status();
    assert_eq!(st["last"]["kind"], "rolled-back", "{st}");
    let msg = st["last"]["message"].as_str().unwrap();
    assert!(msg.contains("0.3.0") && msg.contains("by itself"), "{msg}");
    assert_eq!(st["phase"], "idle", "{st}");
    let s = b.boot_state();
    assert_eq!((s.order.clone(), s.b_left), (vec![Slot::A, Slot::B], 0));
    // A manual rollback to B is refused: it has no tries left.
    let (code, v) = u.call("POST", "/api/update/rollback", b"");
    assert_eq!(code, 409, "{v}");
}

#[test]
fn the_owner_rolls_back_to_the_other_slot_while_it_is_still_good() {
    let b = Box_::new();
    let u = b.start("A", "0.1.0", "boot-1");
    assert_eq!(
        u.push(&b.bundle("0.2.0", "qemu-virt", None, 1000), "").0,
        200
    );
    drop(u);
    OnDisk::new(b.path("boot"))
        .update(|s| s.b_left = 3)
        .unwrap();
    let u = b.start("B", "0.2.0", "boot-2");
    u.wait_outcome("committed");
    let (code, v) = u.call("POST", "/api/update/rollback", b"");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["slot"], "A");
    assert_eq!(b.boot_state().order, vec![Slot::A, Slot::B]);
    let st = u.status();
    assert!(
        st["last"]["message"].as_str().unwrap().contains("0.1.0"),
        "{st}"
    );
}

#[test]
fn a_download_cut_halfway_resumes_with_range_and_installs() {
    let b = Box_::new();
    // No chunk index: the box streams the whole bundle (a delta would fetch ranges anyway).
    let bundle = b.bundle_with("0.2.0", "qemu-virt", None, 2_000_000, &[], false);
    let mirror = Mirror::start().unwrap();
    mirror.cut_next(bundle.len() * 2 / 5);
    mirror.put("/rel/b.cub", bundle);
    let u = b.start("A", "0.1.0", "boot-1");
    let (code, v) = u.call(
        "POST",
        "/api/update/apply",
        json!({"url": mirror.url("/rel/b.cub"), "reboot": false})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(code, 202, "{v}");
    let st = u.wait_outcome("installed");
    assert_eq!(st["last"]["version"], "0.2.0", "{st}");
    let asked = mirror.asked();
    assert!(
        asked
            .iter()
            .any(|a| a.starts_with("/rel/b.cub ") && !a.ends_with(" -")),
        "no Range request after the cut: {asked:?}"
    );
    assert!(
        std::fs::read(b.path("slotB.img")).unwrap()[..2_000_000] == b.part("rootfs", "0.2.0")[..]
    );
}

fn index(key: &SigningKey, bundle: &[u8], version: &str, created: u64, expires: u64) -> Vec<u8> {
    let i = cloudlet_bundle::Index {
        format: cloudlet_bundle::FORMAT,
        board: "qemu-virt".into(),
        version: version.into(),
        url: "b.cub".into(),
        size: bundle.len() as u64,
        blake3: blake3::hash(bundle).to_hex().to_string(),
        created,
        expires,
    };
    cloudlet_bundle::sign_index(key, &i).unwrap().into_bytes()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn the_channel_believes_only_a_signed_fresh_index_and_installs_what_it_names() {
    let b = Box_::new();
    let bundle = b.bundle("0.2.0", "qemu-virt", None, 500_000);
    let mirror = Mirror::start().unwrap();
    mirror.put("/ch/b.cub", bundle.clone());
    let t = now();
    mirror.put(
        "/ch/index",
        index(&b.key, &bundle, "0.2.0", t - 10, t + 3600),
    );
    let u = b.start("A", "0.1.0", "boot-1");
    let body = json!({"url": mirror.url("/ch/index"), "interval_s": 3600, "auto_install": false});
    let (code, v) = u.call("PUT", "/api/update/channel", body.to_string().as_bytes());
    assert_eq!(code, 200, "{v}");
    let check = |install: bool| {
        u.call(
            "POST",
            "/api/update/check",
            json!({"install": install}).to_string().as_bytes(),
        )
    };
    let (code, v) = check(false);
    assert_eq!((code, v["available"].clone()), (200, json!("0.2.0")), "{v}");

    // Expired, signed by a stranger, or older than one already read: not believed.
    mirror.put("/ch/index", index(&b.key, &bundle, "0.2.0", t - 5, t - 1));
    let (code, v) = check(false);
    assert_eq!(code, 502, "{v}");
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    let stranger = SigningKey::from_bytes(&[99u8; 32]);
    mirror.put("/ch/index", index(&stranger, &bundle, "0.2.0", t, t + 3600));
    let (_, v) = check(false);
    assert!(v["error"].as_str().unwrap().contains("not signed"), "{v}");
    mirror.put(
        "/ch/index",
        index(&b.key, &bundle, "0.2.0", t - 100, t + 3600),
    );
    let (_, v) = check(false);
    assert!(v["error"].as_str().unwrap().contains("replay"), "{v}");
    let st = u.status();
    assert!(
        st["channel"]["error"].as_str().unwrap().contains("replay"),
        "{st}"
    );

    // An index whose hash is not the bundle's: the install is refused.
    let mut other = bundle.clone();
    other.truncate(bundle.len() - 1);
    mirror.put("/ch/index", index(&b.key, &other, "0.2.0", t, t + 3600));
    let (code, v) = check(true);
    assert_eq!((code, v["started"].clone()), (200, json!(true)), "{v}");
    let st = u.wait_outcome("refused");
    assert!(
        st["last"]["message"].as_str().unwrap().contains("index"),
        "{st}"
    );
    assert_eq!(b.boot_state().order[0], Slot::A);

    mirror.put(
        "/ch/index",
        index(&b.key, &bundle, "0.2.0", t + 1, t + 3600),
    );
    let (code, v) = check(true);
    assert_eq!((code, v["started"].clone()), (200, json!(true)), "{v}");
    u.wait_outcome("installed");
    assert_eq!(b.boot_state().order[0], Slot::B);
}

#[test]
fn a_new_signing_key_is_trusted_once_a_release_signed_by_the_old_one_introduced_it_and_was_committed(
) {
    let b = Box_::new();
    let new = SigningKey::from_bytes(&[42u8; 32]);
    let u = b.start("A", "0.1.0", "boot-1");
    // Not yet: nothing introduced the new key.
    let (code, _) = u.push(&b.bundle("0.2.0", "qemu-virt", Some(&new), 1000), "");
    assert_eq!(code, 422);
    let (code, v) = u.push(
        &b.bundle_introducing("0.2.0", "qemu-virt", None, 1000, &[new.verifying_key()]),
        "",
    );
    assert_eq!(code, 200, "{v}");
    drop(u);
    OnDisk::new(b.path("boot"))
        .update(|s| s.b_left = 3)
        .unwrap();
    let u = b.start("B", "0.2.0", "boot-2");
    u.wait_outcome("committed");
    let (code, v) = u.push(&b.bundle("0.3.0", "qemu-virt", Some(&new), 1000), "");
    assert_eq!(code, 200, "{v}");
}

#[test]
fn cloudlet_update_pushes_a_bundle_from_a_pc_shows_the_status_and_cancels_the_switch() {
    let b = Box_::new();
    let u = b.start_with("A", "0.1.0", "boot-1", true);
    let config = b.path("pc");
    common::pair_pc(&config, &b.path("data"), &u.s, "owner");
    let file = b.path("v2.cub");
    std::fs::write(&file, b.bundle("0.2.0", "qemu-virt", None, 1_500_000)).unwrap();
    let port = u.s.addr.port().to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["update", "--port", &port];
        all.extend_from_slice(args);
        let out = common::cloudlet(&config, &all);
        (out.status.success(), common::text(&out))
    };
    let (ok, out) = run(&["apply", file.to_str().unwrap(), "--no-reboot"]);
    assert!(ok, "{out}");
    assert!(out.contains("0.2.0") && out.contains('B'), "{out}");
    assert_eq!(b.boot_state().order[0], Slot::B);
    let (ok, out) = run(&["status"]);
    assert!(ok, "{out}");
    assert!(out.contains("0.1.0") && out.contains("installed"), "{out}");
    let (ok, out) = run(&["status", "--json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["phase"], "reboot-pending", "{v}");
    // A refused bundle: a clear message and a failing exit.
    let bad = b.path("old.cub");
    std::fs::write(&bad, b.bundle("0.0.1", "qemu-virt", None, 1000)).unwrap();
    let (ok, out) = run(&["apply", bad.to_str().unwrap(), "--no-reboot"]);
    assert!(!ok, "{out}");
    // Rolling back before the reboot cancels the switch.
    let (ok, out) = run(&["rollback"]);
    assert!(ok, "{out}");
    let s = b.boot_state();
    assert_eq!((s.order[0], s.b_left), (Slot::A, 0));
}
