//! The updater service: installs signed bundles into the other A/B slot,
//! watches the first boots of a new slot until init commits it (every
//! service ready for the settling period), and notices when U-Boot fell back
//! to the old slot.
//!
//! It runs as its own user. init gives that user exactly what an install
//! writes: the boot partition (mounted at `CLOUDLET_BOOT_DIR`, owned by the
//! updater) and the other slot's root partition (`CLOUDLET_OTHER_SLOT_DEV`,
//! chowned to it); the running slot's partition stays root's.
//!
//! Sources: a bundle pushed by a paired owner (`PUT /api/update/bundle`,
//! streamed), a URL the box downloads (`POST /api/update/apply`, resumed
//! with `Range`), and a channel the box polls for a signed, expiring index
//! (`PUT /api/update/channel`, `POST /api/update/check`). Status is
//! `GET /api/update` ([`cloudlet_proto::update::UpdateStatus`]).

pub mod delta;
pub mod fetch;
pub mod install;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudlet_proto::bootstate::{OnDisk, Slot, TRIES};
use cloudlet_proto::control::{self, Request as Control, UpdateLed};
use cloudlet_proto::update::{BootView, ChannelView, Outcome, Phase, Progress, UpdateStatus};
use cloudlet_runtime::auth::{Authenticator, Identity};
use cloudlet_runtime::router::{Params, RoutedBody, Router};
use cloudlet_runtime::{health, json, ServiceOptions};
use ed25519_dalek::VerifyingKey;
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use install::{Ask, InstallError, Release, Target};
use state::{Channel, Pending, Saved, Store};

pub const NAME: &str = "updater";
/// Largest bundle accepted: both slots' parts with room to spare.
pub const BUNDLE_LIMIT: u64 = 1 << 30;
/// Where the running release describes itself (`VERSION=`, `BOARD=`, and
/// optionally `FLOOR=`, the lowest version it lets be installed).
pub const RELEASE_FILE: &str = "/etc/cloudlet/release";
/// How often the boot state is looked at for a commit or a fall-back.
const WATCH_EVERY: Duration = Duration::from_secs(5);
/// The default time between channel checks.
pub const DEFAULT_INTERVAL_S: u64 = 6 * 3600;
/// Before this (2025-01-01) the clock is taken as unset.
const CLOCK_FLOOR: u64 = 1_735_689_600;

/// Everything the updater is told at start.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// `None` off a box (no slot to write): installs are refused with a reason.
    pub target: Option<Target>,
    pub release: Release,
    /// The image's trusted keys (`*.pub`).
    pub keys_dir: PathBuf,
    /// Where the status is published for the web UI.
    pub status_file: Option<PathBuf>,
    /// init's control socket, for the LEDs and the reboot.
    pub control: Option<PathBuf>,
    pub boot_id: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `KEY=value` lines.
pub fn read_release(path: &Path) -> Release {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(key, _)| key.trim() == k)
            .map(|(_, v)| v.trim().trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
    };
    Release {
        version: get("VERSION").unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()),
        board: get("BOARD").unwrap_or_else(|| "unknown".into()),
        floor: get("FLOOR"),
    }
}

impl Config {
    /// From init's variables (and overrides tests use).
    pub fn from_env(state_dir: &Path) -> Config {
        let target = match (
            env("CLOUDLET_SLOT").and_then(|s| Slot::parse(&s)),
            env("CLOUDLET_BOOT_DIR"),
            env("CLOUDLET_OTHER_SLOT_DEV"),
        ) {
            (Some(running), Some(boot), Some(dev)) => Some(Target {
                boot_dir: boot.into(),
                other_dev: dev.into(),
                running,
                active_dev: env("CLOUDLET_ACTIVE_SLOT_DEV").map(PathBuf::from),
            }),
            _ => None,
        };
        let boot_id = env("CLOUDLET_BOOT_ID").unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        });
        Config {
            state_dir: state_dir.to_owned(),
            target,
            release: read_release(Path::new(
                &env("CLOUDLET_RELEASE_FILE").unwrap_or_else(|| RELEASE_FILE.into()),
            )),
            keys_dir: env("CLOUDLET_UPDATE_KEYS")
                .unwrap_or_else(|| cloudlet_bundle::TRUSTED_KEYS_DIR.into())
                .into(),
            status_file: Some(
                env("CLOUDLET_UPDATE_STATUS")
                    .unwrap_or_else(|| cloudlet_proto::update::STATUS_PATH.into())
                    .into(),
            ),
            control: env("CLOUDLET_CONTROL_SOCKET").map(PathBuf::from),
            boot_id,
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn outcome(kind: &str, version: Option<&str>, message: String) -> Outcome {
    Outcome {
        kind: kind.into(),
        version: version.map(str::to_owned),
        message,
        at: now(),
    }
}

/// An error answer.
fn err(status: StatusCode, message: impl Into<String>) -> Response<cloudlet_runtime::Body> {
    json(status, &json!({"error": message.into()}))
}

pub struct Updater {
    cfg: Config,
    store: Store,
    saved: Mutex<Saved>,
    status: Mutex<UpdateStatus>,
    busy: AtomicBool,
    /// The last channel check's result, for status.
    channel_seen: Mutex<(Option<u64>, Option<String>, Option<String>)>,
}

/// Holds the one install slot; frees it when dropped.
pub struct Busy(Arc<Updater>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

impl Updater {
    pub fn new(cfg: Config) -> Arc<Updater> {
        let store = Store::new(&cfg.state_dir);
        let saved = store.load();
        store.ensure_reserve();
        let status = UpdateStatus {
            version: cfg.release.version.clone(),
            board: cfg.release.board.clone(),
            slot: cfg.target.as_ref().map(|t| t.running.to_string()),
            ..UpdateStatus::default()
        };
        let u = Arc::new(Updater {
            cfg,
            store,
            saved: Mutex::new(saved),
            status: Mutex::new(status),
            busy: AtomicBool::new(false),
            channel_seen: Mutex::new((None, None, None)),
        });
        u.refresh();
        u
    }

    fn saved(&self) -> std::sync::MutexGuard<'_, Saved> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn status_lock(&self) -> std::sync::MutexGuard<'_, UpdateStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, s: &Saved) {
        if let Err(e) = self.store.save(s) {
            tracing::error!(error = %e, "could not keep the updater's state");
        }
    }

    /// Tells init something (the LEDs, a reboot); off a box there is no init.
    fn tell_init(&self, req: Control) {
        let Some(path) = self.cfg.control.clone() else {
            return;
        };
        std::thread::spawn(move || match control::call(&path, &req) {
            Ok(control::Response::Error { message }) => {
                tracing::warn!(?req, "init refused: {message}")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(?req, error = %e, "could not reach init"),
        });
    }

    /// Every key this box trusts: the image's, and those committed releases introduced.
    pub fn trusted(&self) -> Vec<VerifyingKey> {
        let mut keys = Vec::new();
        for dir in [self.cfg.keys_dir.clone(), self.store.keys_dir()] {
            match cloudlet_bundle::load_trusted(&dir) {
                Ok(k) => keys.extend(k),
                Err(cloudlet_bundle::BundleError::Io(e))
                    if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(error = %e, "trusted keys in {}", dir.display()),
            }
        }
        keys
    }

    /// The boot state as seen now, and the commit/fall-back bookkeeping it
    /// implies; publishes the status.
    pub fn refresh(&self) -> UpdateStatus {
        // The state first, then the boot state under it: a switch holds the
        // state across its pending record and its boot-state write, so this
        // never sees one without the other.
        let mut saved = self.saved();
        let boot = self
            .cfg
            .target
            .as_ref()
            .and_then(|t| match OnDisk::new(&t.boot_dir).read() {
                Ok(Some((_, s))) => Some((t.clone(), s)),
                Ok(None) => {
                    tracing::warn!("no valid boot state on {}", t.boot_dir.display());
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the boot state");
                    None
                }
            });
        let before = saved.clone();
        let mut led = None;
        if let Some((t, bs)) = &boot {
            let running = t.running;
            let other = running.other();
            let committed = bs.tries_left(running) == TRIES;
            let first = bs.order.first().copied();
            match saved.pending.clone() {
                Some(p) if p.slot == running.name() && committed => {
                    let raised = raise(&saved.floor, &p.version);
                    saved.floor = raised;
                    if let Err(e) = self.store.add_keys(&p.keys) {
                        tracing::error!(error = %e, "could not keep the keys the release introduced");
                    }
                    saved.slots.insert(running.to_string(), p.version.clone());
                    saved.last = Some(outcome(
                        "committed",
                        Some(&p.version),
                        format!(
                            "version {} in slot {running} came up healthy and is committed",
                            p.version
                        ),
                    ));
                    saved.pending = None;
                    tracing::info!(version = %p.version, slot = %running, "update committed");
                }
                Some(p) if p.slot == running.name() => {
                    // A trial boot: init commits it once it settled.
                }
                Some(p) if p.boot_id == self.cfg.boot_id && first == Some(other) => {
                    // Installed, switched, not rebooted yet.
                }
                Some(p) if first == Some(other) => {
                    // Rebooted since the switch, and not into the new slot:
                    // U-Boot used up its tries and fell back.
                    let msg = format!(
                        "version {} in slot {other} did not come up healthy in its {TRIES} tries; \
                         the box went back to slot {running} (version {}) by itself",
                        p.version, self.cfg.release.version
                    );
                    tracing::error!("{msg}");
                    saved.last = Some(outcome("rolled-back", Some(&p.version), msg));
                    saved.pending = None;
                    led = Some(UpdateLed::RolledBack);
                    if let Err(e) = OnDisk::new(&t.boot_dir).update(|s| {
                        s.order = vec![running, other];
                        s.set_tries_left(other, 0);
                    }) {
                        tracing::error!(error = %e, "could not put the running slot first again");
                    }
                }
                Some(p) => {
                    // The boot state never pointed at the new slot: the
                    // install was cut before its switch.
                    saved.last = Some(outcome(
                        "failed",
                        Some(&p.version),
                        format!(
                            "the install of version {} was interrupted before the switch; slot {running} kept running",
                            p.version
                        ),
                    ));
                    saved.pending = None;
                }
                None => {}
            }
            if saved.pending.is_none() && committed {
                // A fresh image's own version becomes the floor once it is committed.
                saved.floor = raise(&saved.floor, &self.cfg.release.version);
                saved
                    .slots
                    .insert(running.to_string(), self.cfg.release.version.clone());
            }
        }
        if *saved != before {
            self.save(&saved);
        }
        let mut st = self.status_lock();
        st.floor = saved.floor.clone();
        st.last = saved.last.clone();
        st.boot = boot.as_ref().map(|(t, bs)| {
            let other = t.running.other();
            BootView {
                order: bs.order.iter().map(|s| s.to_string()).collect(),
                a_left: bs.a_left,
                b_left: bs.b_left,
                committed: bs.tries_left(t.running) == TRIES,
                other_bootable: bs.tries_left(other) > 0,
                other_version: saved.slots.get(other.name()).cloned(),
            }
        });
        if !matches!(
            st.phase,
            Phase::Installing | Phase::Verifying | Phase::Checking
        ) {
            st.phase = match (&saved.pending, &boot) {
                (Some(p), Some((t, _))) if p.slot == t.running.name() => Phase::Trial,
                (Some(_), _) => Phase::RebootPending,
                _ => Phase::Idle,
            };
            st.progress = None;
        }
        let seen = self
            .channel_seen
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        st.channel = saved.channel.as_ref().map(|c| ChannelView {
            url: c.url.clone(),
            interval_s: c.interval_s,
            auto_install: c.auto_install,
            checked_at: seen.0,
            available: seen.1.clone(),
            error: seen.2.clone(),
        });
        let out = st.clone();
        drop(st);
        drop(saved);
        self.publish(&out);
        if let Some(l) = led {
            self.tell_init(Control::Update { state: l });
        }
        out
    }

    fn publish(&self, st: &UpdateStatus) {
        let Some(path) = &self.cfg.status_file else {
            return;
        };
        let Some(dir) = path.parent().filter(|d| d.is_dir()) else {
            return;
        };
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".status.json.{}.{n}", std::process::id()));
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec(st).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::debug!(error = %e, "publishing the status");
        }
    }

    fn set_progress(&self, phase: Phase, part: &str, done: u64, total: u64) {
        let snapshot = {
            let mut st = self.status_lock();
            st.phase = phase;
            st.progress = Some(Progress {
                part: part.into(),
                done,
                total,
            });
            st.clone()
        };
        if done == total || done % (8 << 20) < (1 << 20) {
            self.publish(&snapshot);
        }
    }

    /// Takes the one install slot, or says why not.
    pub fn take(self: &Arc<Self>) -> Result<Busy, (StatusCode, String)> {
        if self.cfg.target.is_none() {
            return Err((
                StatusCode::CONFLICT,
                "this updater has no other slot to write (not running on a box: \
                 CLOUDLET_SLOT, CLOUDLET_BOOT_DIR and CLOUDLET_OTHER_SLOT_DEV are unset)"
                    .into(),
            ));
        }
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err((
                StatusCode::CONFLICT,
                "an install is already under way".into(),
            ));
        }
        let busy = Busy(self.clone());
        if self.saved().pending.is_some() && self.status_lock().phase == Phase::RebootPending {
            return Err((
                StatusCode::CONFLICT,
                "an installed update waits for its reboot; roll it back first to install another"
                    .into(),
            ));
        }
        // The other slot is the fall-back while this one is on trial:
        // overwriting it would leave a never-committed slot as the only one.
        if let Some(t) = &self.cfg.target {
            let state = OnDisk::new(&t.boot_dir).read().map_err(|e| {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the boot state: {e}"),
                )
            })?;
            match state {
                Some((_, s)) if s.tries_left(t.running) == TRIES => {}
                Some(_) => {
                    return Err((
                        StatusCode::CONFLICT,
                        format!(
                            "slot {} is not committed yet (init commits a boot once every service \
                             stayed ready for its settling period); install after that",
                            t.running
                        ),
                    ))
                }
                None => {
                    return Err((StatusCode::CONFLICT, "no valid boot state".into()));
                }
            }
        }
        Ok(busy)
    }

    /// A whole install from `input` (blocking): writes, verifies, keeps the
    /// pending record, switches the boot state. Returns the version installed.
    pub fn install_blocking(
        self: &Arc<Self>,
        busy: &Busy,
        input: impl std::io::Read,
        ask: Ask,
    ) -> Result<(String, Slot), InstallError> {
        self.install_with(busy, ask, |t, rel, trusted, ask, progress| {
            install::install(t, rel, trusted, input, ask, progress).map(|m| (m, String::new()))
        })
    }

    /// An install whose bytes `write` puts into the other slot (a stream, or
    /// a delta), with the status, LEDs, pending record, switch and outcome
    /// around it. `write` returns the manifest and a note for the outcome.
    pub fn install_with(
        self: &Arc<Self>,
        _busy: &Busy,
        mut ask: Ask,
        write: impl FnOnce(
            &Target,
            &Release,
            &[VerifyingKey],
            &Ask,
            &dyn Fn(&str, u64, u64),
        ) -> Result<(cloudlet_bundle::Manifest, String), InstallError>,
    ) -> Result<(String, Slot), InstallError> {
        let Some(t) = self.cfg.target.clone() else {
            return Err(InstallError::Refused("no slot to write".into()));
        };
        ask.data_floor = self.saved().floor.clone();
        self.set_progress(Phase::Installing, "download", 0, 0);
        self.tell_init(Control::Update {
            state: UpdateLed::Installing,
        });
        let trusted = self.trusted();
        let me = self.clone();
        let progress = move |part: &str, done: u64, total: u64| {
            let phase = if part.starts_with("verify") {
                Phase::Verifying
            } else {
                Phase::Installing
            };
            me.set_progress(phase, part, done, total);
        };
        let result = write(&t, &self.cfg.release, &trusted, &ask, &progress)
            .and_then(|(m, note)| self.switch(&t, &m).map(|()| (m, note)));
        self.tell_init(Control::Update {
            state: UpdateLed::Idle,
        });
        {
            let mut st = self.status_lock();
            st.phase = Phase::Idle;
            st.progress = None;
        }
        let mut saved = self.saved();
        let r = match result {
            Ok((m, note)) => {
                saved.last = Some(outcome(
                    "installed",
                    Some(&m.version),
                    format!(
                        "version {} is in slot {}; the box boots it next{note}",
                        m.version,
                        t.other()
                    ),
                ));
                Ok((m.version, t.other()))
            }
            Err(e) => {
                let kind = match e {
                    InstallError::Refused(_) => "refused",
                    InstallError::Failed(_) => "failed",
                };
                tracing::warn!(error = %e, "install {kind}");
                saved.slots.remove(t.other().name());
                saved.last = Some(outcome(kind, None, e.to_string()));
                Err(e)
            }
        };
        let copy = saved.clone();
        drop(saved);
        self.save(&copy);
        self.refresh();
        r
    }

    /// Keeps the pending record, then points the boot state at the new
    /// slot in one write (the older copy, with the next sequence number).
    fn switch(&self, t: &Target, m: &cloudlet_bundle::Manifest) -> Result<(), InstallError> {
        let other = t.other();
        // Held across both writes: a status refresh in between would judge
        // the pending record against the old boot state.
        let mut saved = self.saved();
        let before = saved.clone();
        saved.pending = Some(Pending {
            slot: other.to_string(),
            version: m.version.clone(),
            keys: m.keys.clone(),
            boot_id: self.cfg.boot_id.clone(),
        });
        saved.slots.insert(other.to_string(), m.version.clone());
        if let Err(e) = self.store.save(&saved) {
            *saved = before;
            return Err(InstallError::Failed(format!(
                "keeping the updater's state: {e}"
            )));
        }
        let switched = OnDisk::new(&t.boot_dir).update(|s| {
            s.order = vec![other, t.running];
            s.set_tries_left(other, TRIES);
        });
        if let Err(e) = switched {
            *saved = before;
            let _ = self.store.save(&saved);
            return Err(InstallError::Failed(format!(
                "switching the boot state: {e}"
            )));
        }
        drop(saved);
        tracing::info!(version = %m.version, slot = %other, "installed; the next boot tries it");
        Ok(())
    }

    /// Asks init to reboot, after `delay` (so an answer can leave first).
    pub fn reboot_soon(self: &Arc<Self>, delay: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            tracing::info!("rebooting into the new slot");
            me.tell_init(Control::Reboot);
        });
    }

    /// Back to the other slot: before a pending reboot, cancels it; after,
    /// boots the other slot if it still can be booted.
    pub fn rollback(self: &Arc<Self>) -> Result<(Slot, bool), (StatusCode, String)> {
        let busy = self.take_for_rollback()?;
        let t = self
            .cfg
            .target
            .clone()
            .ok_or((StatusCode::CONFLICT, "no slots here".to_owned()))?;
        let other = t.other();
        let pending = self.saved().pending.clone();
        let cancel = pending
            .as_ref()
            .is_some_and(|p| p.slot == other.name() && p.boot_id == self.cfg.boot_id);
        let bs = OnDisk::new(&t.boot_dir)
            .read()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map(|(_, s)| s)
            .ok_or((StatusCode::CONFLICT, "no valid boot state".to_owned()))?;
        if !cancel && bs.tries_left(other) == 0 {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "slot {other} cannot be booted (no tries left: empty, overwritten or failed)"
                ),
            ));
        }
        let r = OnDisk::new(&t.boot_dir).update(|s| {
            if cancel {
                s.order = vec![t.running, other];
                s.set_tries_left(other, 0);
            } else {
                s.order = vec![other, t.running];
            }
        });
        r.map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("switching the boot state: {e}"),
            )
        })?;
        let mut saved = self.saved();
        let message = if cancel {
            saved.pending = None;
            format!(
                "the installed update in slot {other} was cancelled; slot {} stays",
                t.running
            )
        } else {
            format!(
                "the owner rolled back to slot {other} (version {})",
                saved
                    .slots
                    .get(other.name())
                    .map_or("unknown", |v| v.as_str())
            )
        };
        saved.last = Some(outcome("rolled-back", None, message));
        let copy = saved.clone();
        drop(saved);
        self.save(&copy);
        drop(busy);
        self.refresh();
        Ok((if cancel { t.running } else { other }, !cancel))
    }

    fn take_for_rollback(self: &Arc<Self>) -> Result<Busy, (StatusCode, String)> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err((StatusCode::CONFLICT, "an install is under way".into()));
        }
        Ok(Busy(self.clone()))
    }

    /// Reads the channel's signed index: the newer release it offers, if any.
    pub async fn check(
        self: &Arc<Self>,
    ) -> Result<Option<(fetch::Url, bundle_ref::Named)>, String> {
        let channel = self
            .saved()
            .channel
            .clone()
            .ok_or("no update channel is set")?;
        let result = self.check_channel(&channel).await;
        let mut seen = self.channel_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.0 = Some(now());
        match &result {
            Ok(found) => {
                seen.1 = found.as_ref().map(|(_, n)| n.version.clone());
                seen.2 = None;
            }
            Err(e) => seen.2 = Some(e.clone()),
        }
        drop(seen);
        self.refresh();
        result
    }

    async fn check_channel(
        self: &Arc<Self>,
        channel: &Channel,
    ) -> Result<Option<(fetch::Url, bundle_ref::Named)>, String> {
        let url = fetch::Url::parse(&channel.url)?;
        let text = fetch::get_small(&url, cloudlet_bundle::INDEX_MAX).await?;
        let index = cloudlet_bundle::verify_index(&text, &self.trusted()).map_err(|e| match e {
            cloudlet_bundle::BundleError::BadSignature => {
                "the channel index is not signed by a key this box trusts".to_owned()
            }
            e => e.to_string(),
        })?;
        let t = now();
        if t < CLOCK_FLOOR {
            return Err("the clock is not set, so the index's expiry cannot be judged".into());
        }
        if index.expires <= t {
            return Err(format!(
                "the channel index expired {} s ago (a mirror may be serving an old release)",
                t.saturating_sub(index.expires)
            ));
        }
        {
            let mut saved = self.saved();
            if index.created < saved.index_created {
                return Err(
                    "the channel index is older than one this box already read (a replay)".into(),
                );
            }
            if index.created > saved.index_created {
                saved.index_created = index.created;
                let copy = saved.clone();
                drop(saved);
                self.save(&copy);
            }
        }
        if index.board != self.cfg.release.board {
            return Err(format!(
                "the channel offers board {:?}, this box is {:?}",
                index.board, self.cfg.release.board
            ));
        }
        let offered = install::parse_version(&index.version)?;
        let running = install::parse_version(&self.cfg.release.version)?;
        let floor = self.saved().floor.clone();
        let above_floor = match floor.as_deref().map(install::parse_version) {
            Some(Ok(f)) => install::newer(&offered, &f),
            _ => true,
        };
        if !install::newer(&offered, &running) || !above_floor {
            return Ok(None);
        }
        let bundle = url.join(&index.url)?;
        Ok(Some((
            bundle,
            bundle_ref::Named {
                version: index.version,
                size: index.size,
                blake3: index.blake3,
            },
        )))
    }

    /// Downloads `url` and installs it, in the background; `whole` when a
    /// signed index named the file.
    pub fn install_url(self: &Arc<Self>, busy: Busy, url: fetch::Url, ask: Ask, reboot: bool) {
        let me = self.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::spawn(async move {
            let job = me.clone();
            let from = url.clone();
            let r = tokio::task::spawn_blocking(move || {
                job.clone()
                    .install_with(&busy, ask, |t, rel, trusted, ask, progress| {
                        job.fetch_and_write(&from, &rt, t, rel, trusted, ask, progress)
                    })
            })
            .await;
            match r {
                Ok(Ok((version, slot))) => {
                    tracing::info!(%version, %slot, "installed from {url}");
                    if reboot {
                        me.reboot_soon(Duration::from_secs(1));
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "install from {url}"),
                Err(e) => tracing::error!(error = %e, "the install task failed"),
            }
        });
    }

    /// A URL's bundle into the other slot: only the chunks the running
    /// slot lacks when the bundle has a chunk index and the server answers
    /// ranges ([`delta`]), else the whole bundle streamed (resumed with
    /// `Range` after a cut).
    #[allow(clippy::too_many_arguments)]
    fn fetch_and_write(
        self: &Arc<Self>,
        url: &fetch::Url,
        rt: &tokio::runtime::Handle,
        t: &Target,
        rel: &Release,
        trusted: &[VerifyingKey],
        ask: &Ask,
        progress: &dyn Fn(&str, u64, u64),
    ) -> Result<(cloudlet_bundle::Manifest, String), InstallError> {
        match delta::install_delta(t, rel, trusted, url, ask, progress, rt.clone()) {
            Ok(d) => {
                let note = format!(
                    " (delta: fetched {} of the bundle's {} bytes, {:.1}%; {} bytes reused from slot {})",
                    d.fetched_bytes,
                    d.total_bytes,
                    d.fetched_bytes as f64 * 100.0 / d.total_bytes.max(1) as f64,
                    d.reused_bytes,
                    t.running
                );
                tracing::info!("{}", note.trim());
                return Ok((d.manifest, note));
            }
            Err(delta::DeltaOutcome::Install(e)) => return Err(e),
            Err(delta::DeltaOutcome::Unsupported(why)) => {
                tracing::info!("{why}; fetching the whole bundle");
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(fetch::CHANNEL_DEPTH);
        let me = self.clone();
        let limit = ask.whole.as_ref().map_or(BUNDLE_LIMIT, |(size, _)| *size);
        rt.spawn(fetch::download(url.clone(), limit, tx, move |f| {
            // Before the manifest is read, progress is the download's.
            let at_start = me
                .status_lock()
                .progress
                .as_ref()
                .is_some_and(|p| p.part == "download");
            if at_start {
                me.set_progress(Phase::Installing, "download", f.bytes, f.total.unwrap_or(0));
            }
        }));
        install::install(t, rel, trusted, fetch::ChanReader::new(rx), ask, progress)
            .map(|m| (m, " (the whole bundle fetched)".to_owned()))
    }

    /// The channel loop: checks after a random part of the interval, then
    /// every interval plus a random part of a quarter of it, so that boxes do
    /// not all ask the mirror at once; installs what it finds when asked to.
    pub async fn poll_channel(self: Arc<Self>) {
        let mut first = true;
        loop {
            let interval = self
                .saved()
                .channel
                .as_ref()
                .map_or(DEFAULT_INTERVAL_S, |c| c.interval_s.max(10));
            let wait = if first {
                jitter(interval.min(600))
            } else {
                interval.saturating_add(jitter(interval / 4))
            };
            first = false;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            let Some(channel) = self.saved().channel.clone() else {
                continue;
            };
            match self.check().await {
                Ok(Some((url, named))) if channel.auto_install => {
                    if let Ok(busy) = self.take() {
                        tracing::info!(version = %named.version, "the channel offers a newer release; installing");
                        let ask = Ask {
                            whole: Some((named.size, named.blake3)),
                            expect_version: Some(named.version.clone()),
                            ..Ask::default()
                        };
                        self.install_url(busy, url, ask, true);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "channel check"),
            }
        }
    }
}

/// What a channel index names.
pub mod bundle_ref {
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Named {
        pub version: String,
        pub size: u64,
        pub blake3: String,
    }
}

/// A random number of seconds below `max` (0 when `max` is 0).
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let r = cloudlet_runtime::random::<8>().map_or(0, u64::from_le_bytes);
    r % max
}

/// The floor after `version` was committed: the higher of the two.
fn raise(floor: &Option<String>, version: &str) -> Option<String> {
    let Ok(v) = install::parse_version(version) else {
        return floor.clone();
    };
    match floor.as_deref().map(install::parse_version) {
        Some(Ok(f)) if !install::newer(&v, &f) => floor.clone(),
        _ => Some(version.to_owned()),
    }
}

fn is_owner<B>(req: &Request<B>) -> bool {
    req.extensions()
        .get::<Identity>()
        .is_some_and(Identity::is_owner)
}

fn query_flag<B>(req: &Request<B>, name: &str, default: bool) -> bool {
    let Some(q) = req.uri().query() else {
        return default;
    };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "1"));
        if k == name {
            return matches!(v, "1" | "true" | "yes");
        }
    }
    default
}

async fn read_json(req: Request<RoutedBody>) -> Result<Value, Response<cloudlet_runtime::Body>> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })
}

fn not_owner() -> Response<cloudlet_runtime::Body> {
    err(
        StatusCode::FORBIDDEN,
        "only the box's owner may install, roll back or change the update channel",
    )
}

async fn put_bundle(u: Arc<Updater>, req: Request<RoutedBody>) -> Response<cloudlet_runtime::Body> {
    if !is_owner(&req) {
        return not_owner();
    }
    let busy = match u.take() {
        Ok(b) => b,
        Err((s, m)) => return err(s, m),
    };
    let ask = Ask {
        allow_downgrade: query_flag(&req, "allow_downgrade", false),
        ..Ask::default()
    };
    let reboot = query_flag(&req, "reboot", true);
    let (tx, rx) = tokio::sync::mpsc::channel(fetch::CHANNEL_DEPTH);
    let pump = tokio::spawn(fetch::pump(req.into_body(), tx));
    let job = u.clone();
    let r = tokio::task::spawn_blocking(move || {
        job.install_blocking(&busy, fetch::ChanReader::new(rx), ask)
    })
    .await;
    pump.abort();
    match r {
        Ok(Ok((version, slot))) => {
            if reboot {
                u.reboot_soon(Duration::from_secs(1));
            }
            json(
                StatusCode::OK,
                &json!({"installed": version, "slot": slot.name(), "reboot": reboot}),
            )
        }
        Ok(Err(InstallError::Refused(m))) => err(StatusCode::UNPROCESSABLE_ENTITY, m),
        Ok(Err(InstallError::Failed(m))) => err(StatusCode::INTERNAL_SERVER_ERROR, m),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn post_apply(u: Arc<Updater>, req: Request<RoutedBody>) -> Response<cloudlet_runtime::Body> {
    if !is_owner(&req) {
        return not_owner();
    }
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(url) = body.get("url").and_then(Value::as_str) else {
        return err(
            StatusCode::BAD_REQUEST,
            "expected {\"url\": \"http://...\"}",
        );
    };
    let url = match fetch::Url::parse(url) {
        Ok(u) => u,
        Err(e) => return err(StatusCode::BAD_REQUEST, e),
    };
    let busy = match u.take() {
        Ok(b) => b,
        Err((s, m)) => return err(s, m),
    };
    let ask = Ask {
        allow_downgrade: body.get("allow_downgrade").and_then(Value::as_bool) == Some(true),
        ..Ask::default()
    };
    let reboot = body.get("reboot").and_then(Value::as_bool) != Some(false);
    u.install_url(busy, url, ask, reboot);
    json(StatusCode::ACCEPTED, &json!({"started": true}))
}

async fn post_check(u: Arc<Updater>, req: Request<RoutedBody>) -> Response<cloudlet_runtime::Body> {
    let owner = is_owner(&req);
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let install = body.get("install").and_then(Value::as_bool) == Some(true);
    if install && !owner {
        return not_owner();
    }
    match u.check().await {
        Ok(found) => {
            let available = found.as_ref().map(|(_, n)| n.version.clone());
            let mut started = false;
            if let (true, Some((url, named))) = (install, found) {
                match u.take() {
                    Ok(busy) => {
                        let ask = Ask {
                            whole: Some((named.size, named.blake3)),
                            expect_version: Some(named.version.clone()),
                            ..Ask::default()
                        };
                        u.install_url(busy, url, ask, true);
                        started = true;
                    }
                    Err((s, m)) => return err(s, m),
                }
            }
            json(
                StatusCode::OK,
                &json!({"current": u.cfg.release.version, "available": available, "started": started}),
            )
        }
        Err(e) => err(StatusCode::BAD_GATEWAY, e),
    }
}

async fn put_channel(
    u: Arc<Updater>,
    req: Request<RoutedBody>,
) -> Response<cloudlet_runtime::Body> {
    if !is_owner(&req) {
        return not_owner();
    }
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let channel = match body.get("url") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => {
            if let Err(e) = fetch::Url::parse(url) {
                return err(StatusCode::BAD_REQUEST, e);
            }
            let interval_s = body
                .get("interval_s")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_INTERVAL_S);
            if !(60..=30 * 86400).contains(&interval_s) {
                return err(
                    StatusCode::BAD_REQUEST,
                    "interval_s must be between 60 and 2592000 (30 days)",
                );
            }
            Some(Channel {
                url: url.clone(),
                interval_s,
                auto_install: body.get("auto_install").and_then(Value::as_bool) != Some(false),
            })
        }
        Some(_) => return err(StatusCode::BAD_REQUEST, "url must be a string or null"),
    };
    {
        let mut saved = u.saved();
        saved.channel = channel;
        let copy = saved.clone();
        drop(saved);
        if let Err(e) = u.store.save(&copy) {
            return err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    }
    json(StatusCode::OK, &u.refresh().channel)
}

/// The service's routes: `/health` is public, the rest needs a paired
/// credential; installing, rolling back and the channel need the owner.
pub fn routes(auth: Arc<dyn Authenticator>, u: Arc<Updater>) -> Router {
    let (a, b, c, d) = (u.clone(), u.clone(), u.clone(), u.clone());
    let (e, f, g, h) = (u.clone(), u.clone(), u.clone(), u);
    Router::new(auth)
        // Public: init and monitoring check liveness without a credential.
        .public(Method::GET, "/health", |_, _| async { health(NAME) })
        .route(Method::GET, "/api/version", move |_, _: Params| {
            let u = a.clone();
            async move {
                json(
                    StatusCode::OK,
                    &json!({
                        "version": u.cfg.release.version,
                        "slot": u.cfg.target.as_ref().map(|t| t.running.name()),
                    }),
                )
            }
        })
        .route(Method::GET, "/api/update", move |_, _| {
            let u = b.clone();
            async move {
                let st = tokio::task::spawn_blocking(move || u.refresh()).await;
                match st {
                    Ok(s) => json(StatusCode::OK, &s),
                    Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        })
        .route(Method::PUT, "/api/update/bundle", move |req, _| {
            put_bundle(c.clone(), req)
        })
        .body_limit(BUNDLE_LIMIT)
        .route(Method::POST, "/api/update/apply", move |req, _| {
            post_apply(d.clone(), req)
        })
        .route(Method::POST, "/api/update/check", move |req, _| {
            post_check(e.clone(), req)
        })
        .route(Method::GET, "/api/update/channel", move |_, _| {
            let u = f.clone();
            async move { json(StatusCode::OK, &u.refresh().channel) }
        })
        .route(Method::PUT, "/api/update/channel", move |req, _| {
            put_channel(g.clone(), req)
        })
        .route(Method::POST, "/api/update/rollback", move |req, _| {
            let u = h.clone();
            async move {
                if !is_owner(&req) {
                    return not_owner();
                }
                let r = tokio::task::spawn_blocking({
                    let u = u.clone();
                    move || u.rollback()
                })
                .await;
                match r {
                    Ok(Ok((slot, reboot))) => {
                        if reboot {
                            u.reboot_soon(Duration::from_secs(1));
                        }
                        json(
                            StatusCode::OK,
                            &json!({"slot": slot.name(), "reboot": reboot}),
                        )
                    }
                    Ok(Err((s, m))) => err(s, m),
                    Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
        })
}

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    let cfg = Config::from_env(&opts.state_dir);
    std::fs::create_dir_all(&opts.state_dir)?;
    let u = tokio::task::spawn_blocking(move || Updater::new(cfg))
        .await
        .map_err(std::io::Error::other)?;
    tracing::info!(
        version = %u.cfg.release.version,
        board = %u.cfg.release.board,
        slot = ?u.cfg.target.as_ref().map(|t| t.running),
        "updater"
    );
    // Watch for init's commit of a trial boot (and publish the status).
    let watcher = u.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let w = watcher.clone();
            let _ = tokio::task::spawn_blocking(move || w.refresh()).await;
        }
    });
    tokio::spawn(u.clone().poll_channel());
    cloudlet_runtime::run_routed(opts, move |auth| routes(auth, u)).await
}
