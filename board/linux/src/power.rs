//! Power settings written where the kernel exposes them. Each is reported as
//! applied or unsupported (never silently skipped), so `cloudlet status`
//! shows what the box could and could not do to save power.

use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied { what: String, detail: String },
    Unsupported { what: String, why: String },
}

impl Outcome {
    pub fn line(&self) -> String {
        match self {
            Outcome::Applied { what, detail } => format!("{what}: {detail}"),
            Outcome::Unsupported { what, why } => format!("{what}: unsupported ({why})"),
        }
    }
}

fn applied(what: &str, detail: String) -> Outcome {
    Outcome::Applied {
        what: what.into(),
        detail,
    }
}
fn unsupported(what: &str, why: impl Into<String>) -> Outcome {
    Outcome::Unsupported {
        what: what.into(),
        why: why.into(),
    }
}

fn dirs(p: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(p)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Entries of `p` whose name passes `keep`, sorted.
fn dirs_named(p: &Path, keep: impl Fn(&str) -> bool) -> Vec<std::path::PathBuf> {
    dirs(p)
        .into_iter()
        .filter(|d| d.file_name().is_some_and(|n| keep(&n.to_string_lossy())))
        .collect()
}

/// CPU frequency governor on every policy: the first of `prefer` the kernel offers.
pub fn cpu_governor(sys: &Path, prefer: &[&str]) -> Outcome {
    let policies = dirs_named(&sys.join("devices/system/cpu/cpufreq"), |n| {
        n.starts_with("policy")
    });
    if policies.is_empty() {
        return unsupported("cpu governor", "no cpufreq policies");
    }
    let mut set = Vec::new();
    for p in &policies {
        let avail =
            std::fs::read_to_string(p.join("scaling_available_governors")).unwrap_or_default();
        let Some(g) = prefer
            .iter()
            .find(|g| avail.split_whitespace().any(|a| a == **g))
        else {
            return unsupported(
                "cpu governor",
                format!("none of {prefer:?} offered (have: {})", avail.trim()),
            );
        };
        if let Err(e) = std::fs::write(p.join("scaling_governor"), g) {
            return unsupported("cpu governor", format!("{}: {e}", p.display()));
        }
        set.push(*g);
    }
    set.dedup();
    applied(
        "cpu governor",
        format!("{} on {} policies", set.join(","), policies.len()),
    )
}

/// USB runtime autosuspend on every device that supports it.
pub fn usb_autosuspend(sys: &Path) -> Outcome {
    let mut n = 0;
    for d in dirs(&sys.join("bus/usb/devices")) {
        let control = d.join("power/control");
        if control.exists() && std::fs::write(&control, "auto").is_ok() {
            n += 1;
        }
    }
    if n == 0 {
        unsupported(
            "usb autosuspend",
            "no USB devices with runtime power management",
        )
    } else {
        applied("usb autosuspend", format!("auto on {n} devices"))
    }
}

/// Spin-down of USB/SATA disks through runtime PM: suspend after `idle_ms` idle.
pub fn disk_spindown(sys: &Path, idle_ms: u64) -> Outcome {
    let mut n = 0;
    for d in dirs_named(&sys.join("block"), |n| n.starts_with("sd")) {
        let power = d.join("device/power");
        let ok = std::fs::write(power.join("autosuspend_delay_ms"), idle_ms.to_string()).is_ok()
            && std::fs::write(power.join("control"), "auto").is_ok();
        if ok {
            n += 1;
        }
    }
    if n == 0 {
        unsupported(
            "disk spin-down",
            "no sd* disks with runtime power management",
        )
    } else {
        applied(
            "disk spin-down",
            format!("after {} s idle on {n} disks", idle_ms / 1000),
        )
    }
}

/// HDMI: with KMS, a port with no display has no mode set and its encoder
/// stays disabled, so there is nothing to switch off; a connected display is
/// left on (someone is looking at it). Reported either way.
pub fn hdmi(sys: &Path) -> Outcome {
    let ports = dirs_named(&sys.join("class/drm"), |n| n.contains("HDMI"));
    if ports.is_empty() {
        return unsupported("hdmi off", "no HDMI connectors");
    }
    let connected = ports
        .iter()
        .filter(|p| {
            std::fs::read_to_string(p.join("status")).is_ok_and(|s| s.trim() == "connected")
        })
        .count();
    if connected == 0 {
        applied(
            "hdmi off",
            format!(
                "{} ports, none connected: left disabled (nothing to switch off)",
                ports.len()
            ),
        )
    } else {
        unsupported(
            "hdmi off",
            format!("{connected} display(s) connected: left on"),
        )
    }
}

/// Wi-Fi power saving needs nl80211, which this build does not speak yet.
pub fn wifi(sys: &Path) -> Outcome {
    let wlan = dirs(&sys.join("class/net"))
        .into_iter()
        .any(|p| p.join("wireless").exists());
    if wlan {
        unsupported("wifi power save", "needs nl80211 (not implemented)")
    } else {
        unsupported("wifi power save", "no wireless interface")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn governor_picks_the_first_offered_choice_per_policy() {
        let d = tempfile::tempdir().unwrap();
        file(
            d.path(),
            "devices/system/cpu/cpufreq/policy0/scaling_available_governors",
            "performance powersave ondemand\n",
        );
        file(
            d.path(),
            "devices/system/cpu/cpufreq/policy0/scaling_governor",
            "performance",
        );
        let o = cpu_governor(d.path(), &["schedutil", "ondemand", "powersave"]);
        assert_eq!(
            o,
            Outcome::Applied {
                what: "cpu governor".into(),
                detail: "ondemand on 1 policies".into()
            }
        );
        assert_eq!(
            std::fs::read_to_string(
                d.path()
                    .join("devices/system/cpu/cpufreq/policy0/scaling_governor")
            )
            .unwrap(),
            "ondemand"
        );
        assert!(matches!(
            cpu_governor(d.path(), &["schedutil"]),
            Outcome::Unsupported { .. }
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(cpu_governor(empty.path(), &["ondemand"])
            .line()
            .contains("no cpufreq"));
    }

    #[test]
    fn usb_and_disks() {
        let d = tempfile::tempdir().unwrap();
        file(d.path(), "bus/usb/devices/1-1/power/control", "on");
        file(d.path(), "bus/usb/devices/usb1/power/control", "on");
        file(d.path(), "block/sda/device/power/control", "on");
        file(
            d.path(),
            "block/sda/device/power/autosuspend_delay_ms",
            "-1",
        );
        file(d.path(), "block/mmcblk0/device/power/control", "on");
        assert_eq!(
            usb_autosuspend(d.path()).line(),
            "usb autosuspend: auto on 2 devices"
        );
        assert_eq!(
            disk_spindown(d.path(), 600_000).line(),
            "disk spin-down: after 600 s idle on 1 disks"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("block/sda/device/power/control")).unwrap(),
            "auto"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("block/mmcblk0/device/power/control")).unwrap(),
            "on"
        );
    }

    #[test]
    fn hdmi_and_wifi_report_honestly() {
        let d = tempfile::tempdir().unwrap();
        file(
            d.path(),
            "class/drm/card1-HDMI-A-1/status",
            "disconnected\n",
        );
        file(
            d.path(),
            "class/drm/card1-HDMI-A-2/status",
            "disconnected\n",
        );
        assert!(matches!(hdmi(d.path()), Outcome::Applied { .. }));
        file(d.path(), "class/drm/card1-HDMI-A-2/status", "connected\n");
        assert!(hdmi(d.path()).line().contains("left on"));
        file(d.path(), "class/net/wlan0/wireless/.keep", "");
        assert!(wifi(d.path()).line().contains("nl80211"));
    }
}
