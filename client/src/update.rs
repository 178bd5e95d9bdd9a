//! `cloudlet update`: the box's updater service (port 8082), over the
//! pinned HTTPS every `cloudlet` call uses.
//!
//! A bundle file is streamed to `PUT /api/update/bundle` with a progress
//! bar on the bytes sent; the box verifies and writes it as it reads, and
//! answers once the other slot holds it. A URL is handed to
//! `POST /api/update/apply` instead: the box fetches it, and this command
//! follows `GET /api/update` once a second until the install ends.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_proto::update::{Outcome, Phase, UpdateStatus};
use serde_json::{json, Value};

use crate::remote;

/// The updater's port on the box.
pub const PORT: u16 = 8082;

/// How often an install running on the box is looked at.
const POLL: Duration = Duration::from_secs(1);

/// How long an install asked for may take to show on the box before this
/// command stops waiting for it.
const START_WITHIN: Duration = Duration::from_secs(30);

/// How long the box may not answer while an install runs before this
/// command gives up on it.
const LOST_WITHIN: Duration = Duration::from_secs(15);

/// How long the box may take to come back when it reboots into the release
/// it just verified (slow boards, QEMU).
const REBOOT_WITHIN: Duration = Duration::from_secs(300);

/// Where a command finds the box's updater.
pub struct At<'a> {
    pub box_id: Option<&'a str>,
    pub host: Option<&'a str>,
    pub port: u16,
}

impl At<'_> {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        remote::call_service(self.box_id, self.host, Some(self.port), method, path, body).await
    }

    async fn status(&self) -> Result<UpdateStatus, String> {
        let v = self.call("GET", "/api/update", None).await?;
        serde_json::from_value(v)
            .map_err(|e| format!("the updater's status is not what this command understands: {e}"))
    }
}

/// What `cloudlet update apply` installs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A bundle on this computer, sent to the box.
    File(PathBuf),
    /// A bundle the box fetches itself.
    Url(String),
}

impl Source {
    /// An `http://` or `https://` URL (the scheme in any case) is fetched by
    /// the box; anything else names a file here.
    pub fn parse(s: &str) -> Source {
        let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            Source::Url(s.to_owned())
        } else {
            Source::File(PathBuf::from(s))
        }
    }
}

/// How an install is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Install {
    /// Let an older (or the same) release be installed.
    pub allow_downgrade: bool,
    /// Reboot into the new slot once it is written (the box does it).
    pub reboot: bool,
}

/// A byte count for people.
fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// How long ago `at` was, seen at `now` (both seconds since the epoch).
fn ago(at: u64, now: u64) -> String {
    if at == 0 {
        return "at an unknown time (the box's clock was not set)".into();
    }
    let Some(d) = now.checked_sub(at) else {
        return "just now".into();
    };
    match d {
        0..60 => format!("{d} s ago"),
        60..3600 => format!("{} min ago", d / 60),
        3600..86400 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

/// A duration in seconds, as a person says it.
fn every(secs: u64) -> String {
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// Percent of `done` in `total`, when there is a total.
fn percent(done: u64, total: u64) -> Option<u64> {
    let pc = u128::from(done.min(total)) * 100 / u128::from(total.max(1));
    (total > 0).then(|| u64::try_from(pc).unwrap_or(100))
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Idle => "idle",
        Phase::Checking => "checking the channel",
        Phase::Installing => "installing",
        Phase::Verifying => "verifying the written slot",
        Phase::RebootPending => "the new release boots at the next reboot",
        Phase::Trial => "on trial: this release is not committed yet",
    }
}

/// Whether the updater is at work on an install or a check.
fn running(p: Phase) -> bool {
    matches!(p, Phase::Checking | Phase::Installing | Phase::Verifying)
}

/// One outcome in words: kind, version, message, when.
fn outcome_line(o: &Outcome, now: u64) -> String {
    let mut out = o.kind.clone();
    if let Some(v) = &o.version {
        out.push(' ');
        out.push_str(v);
    }
    if !o.message.is_empty() {
        out.push_str(": ");
        out.push_str(&o.message);
    }
    out.push_str(&format!(" ({})", ago(o.at, now)));
    out
}

/// The other slot of `slot`.
fn other_slot(slot: &str) -> Option<&'static str> {
    match slot {
        "A" => Some("B"),
        "B" => Some("A"),
        _ => None,
    }
}

/// The slot the box boots next after an install: the first in the boot
/// order when it is not the running one, else the other slot.
fn next_slot(s: &UpdateStatus) -> String {
    let running = s.slot.as_deref();
    s.boot
        .as_ref()
        .and_then(|b| b.order.first())
        .filter(|first| Some(first.as_str()) != running)
        .cloned()
        .or_else(|| running.and_then(other_slot).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// `cloudlet update status`, for people: `now` is the time here, seconds
/// since the epoch (for "5 min ago").
pub fn describe(s: &UpdateStatus, now: u64) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<9}{v}\n"));
    line(
        "version:",
        format!(
            "{} (board {}, slot {})",
            s.version,
            if s.board.is_empty() { "?" } else { &s.board },
            s.slot.as_deref().unwrap_or("?")
        ),
    );
    line(
        "floor:",
        s.floor.clone().unwrap_or_else(|| "none kept yet".into()),
    );
    match &s.boot {
        Some(b) => {
            line(
                "boot:",
                format!(
                    "order {}; tries left A {}, B {}; {}",
                    if b.order.is_empty() {
                        "?".into()
                    } else {
                        b.order.join(",")
                    },
                    b.a_left,
                    b.b_left,
                    if b.committed {
                        "this slot is committed"
                    } else {
                        "this slot is NOT committed"
                    }
                ),
            );
            let slot = s.slot.as_deref().and_then(other_slot).unwrap_or("?");
            line(
                "other:",
                format!(
                    "slot {slot} holds {}, {}",
                    b.other_version.as_deref().unwrap_or("an unknown release"),
                    if b.other_bootable {
                        "bootable (a rollback can go there)"
                    } else {
                        "not bootable"
                    }
                ),
            );
        }
        None => line("boot:", "unknown (no boot state read)".into()),
    }
    let mut phase = phase_name(s.phase).to_owned();
    if let Some(p) = &s.progress {
        phase.push_str(&format!(
            " {}: {} of {}",
            p.part,
            human(p.done),
            human(p.total)
        ));
        if let Some(pc) = percent(p.done, p.total) {
            phase.push_str(&format!(" ({pc}%)"));
        }
    }
    line("phase:", phase);
    line(
        "last:",
        s.last
            .as_ref()
            .map_or_else(|| "nothing yet".into(), |o| outcome_line(o, now)),
    );
    match &s.channel {
        Some(c) => {
            let mut v = format!(
                "{} every {}, {}",
                c.url,
                every(c.interval_s),
                if c.auto_install {
                    "installs by itself"
                } else {
                    "installs when asked"
                }
            );
            match c.checked_at {
                Some(at) => v.push_str(&format!("; checked {}", ago(at, now))),
                None => v.push_str("; not checked yet"),
            }
            if let Some(a) = &c.available {
                v.push_str(&format!("; {a} is available"));
            }
            if let Some(e) = &c.error {
                v.push_str(&format!("; the last check failed: {e}"));
            }
            line("channel:", v);
        }
        None => line("channel:", "none (updates only when pushed)".into()),
    }
    out
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn status(at: &At<'_>, json: bool) -> Result<(), String> {
    if json {
        let v = at.call("GET", "/api/update", None).await?;
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", describe(&at.status().await?, now()));
    }
    Ok(())
}

/// What happens after an install wrote `slot`.
fn installed_line(version: &str, slot: &str, reboot: bool) -> String {
    if reboot {
        format!("installed {version}: the box is rebooting into slot {slot}")
    } else {
        format!(
            "installed {version} into slot {slot}: it boots at the box's next reboot \
             (`cloudlet reboot` on the box)"
        )
    }
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// The progress bar for bytes, `{msg}` naming what they are.
fn bytes_bar(len: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:16} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// `cloudlet update apply FILE`: streams the bundle to the box.
pub async fn apply_file(at: &At<'_>, file: &Path, how: Install) -> Result<String, String> {
    let path = format!(
        "/api/update/bundle?allow_downgrade={}&reboot={}",
        flag(how.allow_downgrade),
        flag(how.reboot)
    );
    let bar = bytes_bar(0);
    bar.set_message("sending");
    let b = bar.clone();
    let answer = remote::upload_service(
        at.box_id,
        at.host,
        Some(at.port),
        "PUT",
        &path,
        file,
        move |done, len| {
            b.set_length(len);
            b.set_position(done);
            if done == len {
                b.set_message("box verifies");
            }
        },
    )
    .await;
    bar.finish_and_clear();
    let answer = answer?;
    let version = answer["installed"].as_str().unwrap_or("?");
    let slot = answer["slot"].as_str().unwrap_or("?");
    let reboot = answer["reboot"].as_bool().unwrap_or(how.reboot);
    Ok(installed_line(version, slot, reboot))
}

/// `cloudlet update apply URL`: the box fetches and installs it.
pub async fn apply_url(at: &At<'_>, url: &str, how: Install) -> Result<String, String> {
    let before = at.status().await?;
    at.call(
        "POST",
        "/api/update/apply",
        Some(json!({
            "url": url,
            "allow_downgrade": how.allow_downgrade,
            "reboot": how.reboot,
        })),
    )
    .await?;
    follow(at, before, how.reboot).await
}

/// What following an install on the box comes to, from one look at it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Not started yet, or still at work.
    Waiting,
    /// Ended with this outcome.
    Ended(Outcome),
    /// Left its work with no new outcome: the phase it is in.
    Left(Phase),
}

/// Where an install stands, given the outcome before it was asked for,
/// whether it was seen at work, and a look at the box now.
fn judge(before: Option<&Outcome>, started: bool, now: &UpdateStatus) -> Seen {
    match &now.last {
        Some(o) if Some(o) != before && !running(now.phase) => Seen::Ended(o.clone()),
        _ if running(now.phase) => Seen::Waiting,
        Some(o) if started => Seen::Ended(o.clone()),
        _ if started => Seen::Left(now.phase),
        _ => Seen::Waiting,
    }
}

/// Follows an install on the box until it ends, with a progress bar;
/// `before` is the box's status from before it was asked for.
async fn follow(at: &At<'_>, before: UpdateStatus, reboot: bool) -> Result<String, String> {
    let bar = bytes_bar(0);
    bar.set_message("starting");
    let asked = std::time::Instant::now();
    let mut started = false;
    let mut last_phase = before.phase;
    // Since when the box has not answered, and whether that is its reboot
    // into the new slot.
    let mut lost_since: Option<std::time::Instant> = None;
    let mut rebooted = false;
    let end = loop {
        tokio::time::sleep(POLL).await;
        let rebooting = reboot && matches!(last_phase, Phase::Verifying | Phase::RebootPending);
        let s = match at.status().await {
            Ok(s) => s,
            Err(e) => {
                let since = *lost_since.get_or_insert_with(std::time::Instant::now);
                if rebooting {
                    bar.set_message("box reboots");
                }
                let allowed = if rebooting {
                    REBOOT_WITHIN
                } else {
                    LOST_WITHIN
                };
                if since.elapsed() < allowed {
                    continue;
                }
                bar.finish_and_clear();
                return Err(format!(
                    "the box stopped answering while {} ({e}); \
                     `cloudlet update status` tells how it ended once it answers again",
                    phase_name(last_phase)
                ));
            }
        };
        rebooted |= lost_since.take().is_some() && rebooting;
        if rebooted && s.version != before.version {
            // It came back running the new release.
            bar.finish_and_clear();
            return Ok(format!(
                "installed {}: the box rebooted into slot {}",
                s.version,
                s.slot.as_deref().unwrap_or("?")
            ));
        }
        last_phase = s.phase;
        if running(s.phase) {
            started = true;
            match &s.progress {
                Some(p) => {
                    bar.set_message(p.part.clone());
                    bar.set_length(p.total);
                    bar.set_position(p.done);
                }
                None => bar.set_message(phase_name(s.phase)),
            }
        }
        match judge(before.last.as_ref(), started || rebooted, &s) {
            Seen::Waiting if !started && asked.elapsed() > START_WITHIN => {
                bar.finish_and_clear();
                return Err(format!(
                    "the box did not start the install within {} s; its last outcome: {}",
                    START_WITHIN.as_secs(),
                    s.last
                        .as_ref()
                        .map_or_else(|| "none".into(), |o| outcome_line(o, now()))
                ));
            }
            Seen::Waiting => continue,
            Seen::Ended(o) => break (o, s),
            Seen::Left(p) => {
                bar.finish_and_clear();
                return Err(format!(
                    "the install ended with no outcome told; the updater is now: {}",
                    phase_name(p)
                ));
            }
        }
    };
    bar.finish_and_clear();
    let (o, s) = end;
    match o.kind.as_str() {
        "installed" if rebooted => Ok(format!(
            "installed {}: the box rebooted into slot {}",
            o.version.as_deref().unwrap_or("?"),
            s.slot.as_deref().unwrap_or("?")
        )),
        "installed" => Ok(installed_line(
            o.version.as_deref().unwrap_or("?"),
            &next_slot(&s),
            reboot,
        )),
        "up-to-date" | "available" | "committed" => Ok(outcome_line(&o, now())),
        _ => Err(outcome_line(&o, now())),
    }
}

/// `cloudlet update check [--install]`.
pub async fn check(at: &At<'_>, install: bool) -> Result<String, String> {
    let before = if install {
        Some(at.status().await?)
    } else {
        None
    };
    let a = at
        .call(
            "POST",
            "/api/update/check",
            Some(json!({"install": install})),
        )
        .await?;
    let current = a["current"].as_str().unwrap_or("?");
    let Some(available) = a["available"].as_str() else {
        return Ok(format!(
            "up to date: the channel offers nothing newer than {current}"
        ));
    };
    // The box tells whether it started installing what it found.
    let started = a["started"].as_bool() != Some(false);
    match before.filter(|_| started) {
        Some(before) => {
            println!("installing {available} (running {current})");
            follow(at, before, true).await
        }
        None => Ok(format!(
            "{available} is available (running {current}): \
             `cloudlet update check --install` installs it"
        )),
    }
}

/// `cloudlet update rollback`.
pub async fn rollback(at: &At<'_>) -> Result<String, String> {
    let a = at.call("POST", "/api/update/rollback", None).await?;
    let slot = a["slot"].as_str().unwrap_or("?");
    Ok(if a["reboot"].as_bool().unwrap_or(false) {
        format!("rolling back: the box is rebooting into slot {slot}")
    } else {
        format!("rolled back: slot {slot} boots at the box's next reboot")
    })
}

/// What `cloudlet update channel` is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelChange {
    /// Show the channel.
    Show,
    /// Remove it: updates only when pushed.
    Remove,
    /// Set it; what is not given keeps its value (or the default, for a new
    /// channel).
    Set {
        url: Option<String>,
        interval_s: Option<u64>,
        no_auto_install: bool,
    },
}

/// The updater's default time between checks.
pub const DEFAULT_INTERVAL_S: u64 = 21600;

/// The body of `PUT /api/update/channel` for `change`, given the channel
/// the box has now (None to show it).
pub fn channel_body(
    change: &ChannelChange,
    now: Option<&cloudlet_proto::update::ChannelView>,
) -> Result<Option<Value>, String> {
    match change {
        ChannelChange::Show => Ok(None),
        ChannelChange::Remove => Ok(Some(json!({"url": null}))),
        ChannelChange::Set {
            url,
            interval_s,
            no_auto_install,
        } => {
            let url = match (url, now) {
                (Some(u), _) => {
                    if !matches!(Source::parse(u), Source::Url(_)) {
                        return Err(format!(
                            "{u:?} is not a channel URL: give it as https://HOST/PATH"
                        ));
                    }
                    u.clone()
                }
                (None, Some(c)) => c.url.clone(),
                (None, None) => return Err(
                    "the box has no update channel: give its URL, `cloudlet update channel URL`"
                        .into(),
                ),
            };
            // A new URL starts from the defaults; changing the rest keeps
            // what the box has.
            let kept = if change_keeps(change) { now } else { None };
            let interval_s = interval_s
                .or(kept.map(|c| c.interval_s))
                .unwrap_or(DEFAULT_INTERVAL_S);
            if interval_s == 0 {
                return Err("--interval must be at least one second".into());
            }
            let auto_install = !no_auto_install && kept.is_none_or(|c| c.auto_install);
            Ok(Some(json!({
                "url": url,
                "interval_s": interval_s,
                "auto_install": auto_install,
            })))
        }
    }
}

/// Whether a change keeps the box's other settings: it names no URL.
fn change_keeps(change: &ChannelChange) -> bool {
    matches!(change, ChannelChange::Set { url: None, .. })
}

/// `cloudlet update channel ...`.
pub async fn channel(at: &At<'_>, change: &ChannelChange) -> Result<(), String> {
    let s = at.status().await?;
    match channel_body(change, s.channel.as_ref())? {
        None => {
            let text = describe(&s, now());
            let line = text
                .lines()
                .find(|l| l.starts_with("channel:"))
                .unwrap_or("channel: ?");
            println!("{line}");
        }
        Some(body) => {
            at.call("PUT", "/api/update/channel", Some(body.clone()))
                .await?;
            match body["url"].as_str() {
                Some(url) => println!(
                    "channel set: {url}, checked every {}, {}",
                    every(body["interval_s"].as_u64().unwrap_or(DEFAULT_INTERVAL_S)),
                    if body["auto_install"].as_bool() == Some(true) {
                        "installing what it offers by itself"
                    } else {
                        "installing only when asked (`cloudlet update check --install`)"
                    }
                ),
                None => println!("channel removed: the box updates only when pushed"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_proto::update::{BootView, ChannelView, Progress};

    fn sample() -> UpdateStatus {
        UpdateStatus {
            version: "0.2.0".into(),
            board: "rpi4".into(),
            slot: Some("A".into()),
            floor: Some("0.1.5".into()),
            boot: Some(BootView {
                order: vec!["A".into(), "B".into()],
                a_left: 3,
                b_left: 0,
                committed: false,
                other_bootable: true,
                other_version: Some("0.1.9".into()),
            }),
            phase: Phase::Installing,
            progress: Some(Progress {
                part: "rootfs.squashfs".into(),
                done: 25 << 20,
                total: 100 << 20,
            }),
            last: Some(Outcome {
                kind: "refused".into(),
                version: Some("0.3.0".into()),
                message: "bad signature".into(),
                at: 1_000_000 - 120,
            }),
            channel: Some(ChannelView {
                url: "https://updates.example/rpi4/index".into(),
                interval_s: 21600,
                auto_install: true,
                checked_at: Some(1_000_000 - 30),
                available: Some("0.3.1".into()),
                error: Some("timed out".into()),
            }),
        }
    }

    #[test]
    fn status_text_states_every_fact_of_the_status() {
        let text = describe(&sample(), 1_000_000);
        for want in [
            "version: 0.2.0 (board rpi4, slot A)",
            "floor:   0.1.5",
            "order A,B; tries left A 3, B 0; this slot is NOT committed",
            "slot B holds 0.1.9, bootable",
            "installing rootfs.squashfs: 25.0 MiB of 100.0 MiB (25%)",
            "last:    refused 0.3.0: bad signature (2 min ago)",
            "https://updates.example/rpi4/index every 6 h, installs by itself",
            "checked 30 s ago",
            "0.3.1 is available",
            "the last check failed: timed out",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }

    #[test]
    fn status_text_of_an_idle_box_without_channel_or_boot_state() {
        let s = UpdateStatus {
            version: "0.1.0".into(),
            board: "qemu-virt".into(),
            ..UpdateStatus::default()
        };
        let text = describe(&s, 5);
        assert!(
            text.contains("version: 0.1.0 (board qemu-virt, slot ?)"),
            "{text}"
        );
        assert!(text.contains("phase:   idle\n"), "{text}");
        assert!(text.contains("last:    nothing yet"), "{text}");
        assert!(text.contains("channel: none"), "{text}");
        assert!(text.contains("boot:    unknown"), "{text}");
        assert!(text.contains("floor:   none kept yet"), "{text}");
    }

    #[test]
    fn an_outcome_from_an_unset_clock_says_so() {
        let o = Outcome {
            kind: "installed".into(),
            version: Some("0.2.0".into()),
            message: String::new(),
            at: 0,
        };
        assert_eq!(
            outcome_line(&o, 1_000),
            "installed 0.2.0 (at an unknown time (the box's clock was not set))"
        );
    }

    #[test]
    fn only_http_and_https_urls_are_fetched_by_the_box() {
        assert_eq!(
            Source::parse("https://u.example/b.cbundle"),
            Source::Url("https://u.example/b.cbundle".into())
        );
        assert_eq!(
            Source::parse("HTTP://u.example/b"),
            Source::Url("HTTP://u.example/b".into())
        );
        assert_eq!(
            Source::parse("out/cloudlet.bundle"),
            Source::File("out/cloudlet.bundle".into())
        );
        assert_eq!(
            Source::parse("ftp://u.example/b"),
            Source::File("ftp://u.example/b".into())
        );
        assert_eq!(Source::parse("http:"), Source::File("http:".into()));
    }

    #[test]
    fn the_next_slot_is_the_first_in_the_boot_order_or_the_other_one() {
        let mut s = sample();
        s.boot.as_mut().unwrap().order = vec!["B".into(), "A".into()];
        assert_eq!(next_slot(&s), "B");
        s.boot = None;
        assert_eq!(next_slot(&s), "B");
        s.slot = Some("B".into());
        assert_eq!(next_slot(&s), "A");
        s.slot = None;
        assert_eq!(next_slot(&s), "?");
    }

    #[test]
    fn an_install_ends_on_a_new_outcome_once_the_work_stops() {
        let old = sample().last;
        let mut now = sample();
        // Still at work, whatever the outcome says.
        assert_eq!(judge(old.as_ref(), false, &now), Seen::Waiting);
        // Stopped with the outcome from before, not seen at work: not started yet.
        now.phase = Phase::Idle;
        assert_eq!(judge(old.as_ref(), false, &now), Seen::Waiting);
        // The same outcome again after it was seen at work: that is its end.
        assert_eq!(
            judge(old.as_ref(), true, &now),
            Seen::Ended(old.clone().unwrap())
        );
        // A new outcome ends it even if the work was never seen.
        let installed = Outcome {
            kind: "installed".into(),
            version: Some("0.3.0".into()),
            message: "written and verified".into(),
            at: 1_000_100,
        };
        now.phase = Phase::RebootPending;
        now.last = Some(installed.clone());
        assert_eq!(judge(old.as_ref(), false, &now), Seen::Ended(installed));
        // Seen at work, stopped, and no outcome at all.
        now.last = None;
        assert_eq!(judge(None, true, &now), Seen::Left(Phase::RebootPending));
    }

    #[test]
    fn the_installed_line_names_the_slot_and_whether_it_reboots() {
        assert_eq!(
            installed_line("0.3.0", "B", true),
            "installed 0.3.0: the box is rebooting into slot B"
        );
        assert!(installed_line("0.3.0", "B", false)
            .contains("into slot B: it boots at the box's next reboot"));
    }

    #[test]
    fn a_channel_change_keeps_what_it_does_not_name() {
        let c = sample().channel.unwrap();
        let only_interval = ChannelChange::Set {
            url: None,
            interval_s: Some(3600),
            no_auto_install: false,
        };
        assert_eq!(
            channel_body(&only_interval, Some(&c)).unwrap(),
            Some(json!({"url": c.url, "interval_s": 3600, "auto_install": true}))
        );
        let new_url = ChannelChange::Set {
            url: Some("https://other.example/index".into()),
            interval_s: None,
            no_auto_install: true,
        };
        assert_eq!(
            channel_body(&new_url, Some(&c)).unwrap(),
            Some(
                json!({"url": "https://other.example/index", "interval_s": 21600, "auto_install": false})
            )
        );
        assert_eq!(
            channel_body(&ChannelChange::Remove, Some(&c)).unwrap(),
            Some(json!({"url": null}))
        );
        assert!(channel_body(&only_interval, None).is_err());
        let not_url = ChannelChange::Set {
            url: Some("index.json".into()),
            interval_s: None,
            no_auto_install: false,
        };
        assert!(channel_body(&not_url, None).is_err());
        let zero = ChannelChange::Set {
            url: Some("https://u.example/i".into()),
            interval_s: Some(0),
            no_auto_install: false,
        };
        assert!(channel_body(&zero, None).is_err());
    }

    #[test]
    fn percent_and_ages_never_overflow() {
        assert_eq!(percent(u64::MAX, u64::MAX), Some(100));
        assert_eq!(percent(5, 0), None);
        assert_eq!(percent(200, 100), Some(100));
        assert_eq!(ago(10, 5), "just now");
        assert_eq!(ago(1, 1 + 3 * 86400), "3 days ago");
    }
}
