//! The service manifest: which services init runs, how, and in what order.
//!
//! TOML, kebab-case, unknown fields refused. [`Manifest::parse`] reports every
//! problem it finds at once, not just the first.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// How init learns that a service is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Readiness {
    /// The service writes `READY` to the file descriptor named in `CLOUDLET_READY_FD`.
    Notify,
    /// Ready as soon as it is started.
    Started,
}

/// Where a service's stdin/stdout/stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stdio {
    /// stdin from /dev/null; stdout and stderr into init's log buffer for the service.
    Log,
    /// All three on /dev/console (a debug shell on the serial port).
    Console,
}

fn default_stdio() -> Stdio {
    Stdio::Log
}

/// When init starts a service again after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

fn default_ready() -> Readiness {
    Readiness::Notify
}
fn default_restart() -> RestartPolicy {
    RestartPolicy::Always
}
/// Longest duration a manifest may give: bounds every deadline init
/// computes from one (a year-scale value would overflow `Instant`).
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

fn default_backoff_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_give_up_after() -> u32 {
    5
}
fn default_stable_after() -> Duration {
    Duration::from_secs(30)
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(5)
}

/// One `[[service]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    /// Program and arguments. `$NAME` in an argument is replaced by init's
    /// variable of that name (for example `$CLOUDLET_NET_IFACE`).
    pub exec: Vec<String>,
    /// Services that must be ready before this one starts (and that are stopped after it).
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default = "default_ready")]
    pub ready: Readiness,
    #[serde(default = "default_restart")]
    pub restart: RestartPolicy,
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Failed runs in a row (each shorter than `stable-after`) before init gives up.
    #[serde(default = "default_give_up_after")]
    pub give_up_after: u32,
    /// A run at least this long resets the failure count and the backoff.
    #[serde(default = "default_stable_after", with = "humantime_serde")]
    pub stable_after: Duration,
    /// Time between SIGTERM and SIGKILL when stopping.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// User to run as (a name from /etc/passwd); root when absent.
    pub user: Option<String>,
    pub working_dir: Option<PathBuf>,
    /// Directories init creates (owned by `user`) before the first start.
    #[serde(default)]
    pub state_dirs: Vec<PathBuf>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Lines of output kept for `logs`.
    #[serde(default = "default_log_lines")]
    pub log_lines: usize,
    #[serde(default = "default_stdio")]
    pub stdio: Stdio,
    /// Run only when this variable of init's is set (e.g. a console shell only when a console exists).
    pub only_if: Option<String>,
}

fn default_log_lines() -> usize {
    500
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawManifest {
    /// How long every service must stay ready before the boot is committed.
    #[serde(default = "default_settle", with = "humantime_serde")]
    settle: Duration,
    /// How long after the services start the boot may take to become
    /// ready, before `settle` more, until init reboots it.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    health_timeout: Duration,
    #[serde(default)]
    service: Vec<ServiceSpec>,
}

/// How long every service must stay ready before this boot is marked good,
/// when the manifest does not say.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(60);

fn default_settle() -> Duration {
    DEFAULT_SETTLE
}

/// How long the services may take to become ready (the settling period
/// comes on top) before init gives the boot up, when the manifest does not say.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(300);
/// The shortest `health-timeout`: a slow first boot (making /data, a
/// first-start migration) must not be mistaken for a broken one.
pub const MIN_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest `health-timeout`.
pub const MAX_HEALTH_TIMEOUT: Duration = Duration::from_secs(86_400);

fn default_health_timeout() -> Duration {
    DEFAULT_HEALTH_TIMEOUT
}

/// A parsed, validated manifest with services in start order.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// How long every service must stay ready (the top-level `settle`)
    /// before init marks this boot good.
    pub settle: Duration,
    /// If the boot is not committed within `health-timeout` plus `settle`
    /// of the services starting, init reboots so that the boot loader can
    /// fall back to the other slot ([`crate::health`]).
    pub health_timeout: Duration,
    /// Services sorted so that every service comes after all it depends on.
    pub services: Vec<ServiceSpec>,
}

/// Everything wrong with a manifest.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid service manifest:\n  {}", .0.join("\n  "))]
pub struct ManifestError(pub Vec<String>);

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = toml::from_str(text)
            .map_err(|e| ManifestError(vec![e.to_string().trim().to_owned()]))?;
        let mut errors = Vec::new();
        if raw.settle > MAX_DURATION {
            errors.push(format!(
                "settle is longer than {} days",
                MAX_DURATION.as_secs() / 86_400
            ));
        }
        if raw.health_timeout < MIN_HEALTH_TIMEOUT {
            errors.push(format!(
                "health-timeout is shorter than {} s",
                MIN_HEALTH_TIMEOUT.as_secs()
            ));
        }
        if raw.health_timeout > MAX_HEALTH_TIMEOUT {
            errors.push("health-timeout is longer than 1 day".to_owned());
        }
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        for (i, s) in raw.service.iter().enumerate() {
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                errors.push(format!(
                    "service {:?}: name must be letters, digits, '-' or '_'",
                    s.name
                ));
            }
            if by_name.insert(&s.name, i).is_some() {
                errors.push(format!("service {:?} is defined twice", s.name));
            }
            match s.exec.first() {
                None => errors.push(format!("service {:?}: exec is empty", s.name)),
                Some(p) if !p.starts_with('/') => errors.push(format!(
                    "service {:?}: exec program {p:?} must be an absolute path",
                    s.name
                )),
                Some(_) => {}
            }
            for (what, d) in [
                ("backoff-initial", s.backoff_initial),
                ("backoff-max", s.backoff_max),
                ("stable-after", s.stable_after),
                ("stop-timeout", s.stop_timeout),
            ] {
                if d > MAX_DURATION {
                    errors.push(format!(
                        "service {:?}: {what} is longer than {} days",
                        s.name,
                        MAX_DURATION.as_secs() / 86_400
                    ));
                }
            }
            if s.backoff_initial.is_zero() {
                errors.push(format!(
                    "service {:?}: backoff-initial must be more than zero",
                    s.name
                ));
            }
            if s.backoff_max < s.backoff_initial {
                errors.push(format!(
                    "service {:?}: backoff-max is less than backoff-initial",
                    s.name
                ));
            }
            if s.log_lines == 0 {
                errors.push(format!(
                    "service {:?}: log-lines must be at least 1",
                    s.name
                ));
            }
            for d in &s.state_dirs {
                if !d.is_absolute() {
                    errors.push(format!(
                        "service {:?}: state dir {} must be absolute",
                        s.name,
                        d.display()
                    ));
                }
            }
        }
        for s in &raw.service {
            for dep in &s.after {
                if !by_name.contains_key(dep.as_str()) {
                    errors.push(format!(
                        "service {:?}: depends on unknown service {dep:?}",
                        s.name
                    ));
                }
                if dep == &s.name {
                    errors.push(format!("service {:?}: depends on itself", s.name));
                }
            }
        }
        if !errors.is_empty() {
            return Err(ManifestError(errors));
        }
        let order = topo_order(&raw.service).map_err(|cycle| {
            ManifestError(vec![format!(
                "dependency cycle among: {}",
                cycle.join(", ")
            )])
        })?;
        let mut slots: Vec<Option<ServiceSpec>> = raw.service.into_iter().map(Some).collect();
        let services = order
            .into_iter()
            .filter_map(|i| slots.get_mut(i).and_then(Option::take))
            .collect();
        Ok(Manifest {
            settle: raw.settle,
            health_timeout: raw.health_timeout,
            services,
        })
    }
}

/// Kahn's algorithm, keeping manifest order among services that are free at
/// the same time. On a cycle, returns the names left over.
fn topo_order(services: &[ServiceSpec]) -> Result<Vec<usize>, Vec<String>> {
    let index: HashMap<&str, usize> = services
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut pending: Vec<usize> = (0..services.len()).collect();
    let mut done = vec![false; services.len()];
    let mut order = Vec::with_capacity(services.len());
    loop {
        let before = pending.len();
        pending.retain(|&i| {
            let ready = services.get(i).is_some_and(|s| {
                s.after.iter().all(|d| {
                    index
                        .get(d.as_str())
                        .is_some_and(|&j| done.get(j).copied().unwrap_or(false))
                })
            });
            if ready {
                if let Some(d) = done.get_mut(i) {
                    *d = true;
                }
                order.push(i);
            }
            !ready
        });
        if pending.is_empty() {
            return Ok(order);
        }
        if pending.len() == before {
            return Err(pending
                .iter()
                .filter_map(|&i| services.get(i))
                .map(|s| s.name.clone())
                .collect());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn durations_past_a_week_are_refused() {
        let text = r#"
            [[service]]
            name = "a"
            exec = ["/bin/a"]
            backoff-initial = "300000000000y"
            backoff-max = "300000000000y"
            stop-timeout = "8days"
        "#;
        let e = Manifest::parse(text).unwrap_err();
        let all = e.0.join("\n");
        assert!(all.contains("backoff-initial is longer"), "{all}");
        assert!(all.contains("stop-timeout is longer"), "{all}");
    }

    #[test]
    fn settle_is_read_from_the_top_level_and_defaults_to_a_minute() {
        let one = "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\n";
        assert_eq!(Manifest::parse(one).unwrap().settle, DEFAULT_SETTLE);
        let m = Manifest::parse(&format!("settle = \"90s\"\n{one}")).unwrap();
        assert_eq!(m.settle, Duration::from_secs(90));
        let zero = Manifest::parse(&format!("settle = \"0s\"\n{one}")).unwrap();
        assert_eq!(zero.settle, Duration::ZERO);
        let e = Manifest::parse(&format!("settle = \"8days\"\n{one}")).unwrap_err();
        assert_eq!(e.0, vec!["settle is longer than 7 days".to_owned()]);
        let e = Manifest::parse(&format!("settle = \"soon\"\n{one}")).unwrap_err();
        assert!(e.0.join("\n").contains("settle"), "{e}");
        let e = Manifest::parse(&format!("settel = \"60s\"\n{one}")).unwrap_err();
        assert!(e.0.join("\n").contains("unknown field"), "{e}");
    }

    #[test]
    fn health_timeout_defaults_to_five_minutes_and_must_be_30_s_to_1_day() {
        let one = "[[service]]\nname = \"a\"\nexec = [\"/bin/a\"]\n";
        assert_eq!(
            Manifest::parse(one).unwrap().health_timeout,
            Duration::from_secs(300)
        );
        for (text, secs) in [("30s", 30), ("10m", 600), ("1day", 86_400)] {
            let m = Manifest::parse(&format!("health-timeout = \"{text}\"\n{one}")).unwrap();
            assert_eq!(m.health_timeout, Duration::from_secs(secs), "{text}");
        }
        let e = Manifest::parse(&format!("health-timeout = \"29s\"\n{one}")).unwrap_err();
        assert_eq!(e.0, vec!["health-timeout is shorter than 30 s".to_owned()]);
        let e = Manifest::parse(&format!("health-timeout = \"1day 1s\"\n{one}")).unwrap_err();
        assert_eq!(e.0, vec!["health-timeout is longer than 1 day".to_owned()]);
        // Reported together with the other errors.
        let e = Manifest::parse(&format!(
            "health-timeout = \"0s\"\nsettle = \"8days\"\n{one}"
        ))
        .unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        let e = Manifest::parse(&format!("health-timeout = \"never\"\n{one}")).unwrap_err();
        assert!(e.0.join("\n").contains("health-timeout"), "{e}");
    }

    #[test]
    fn parses_defaults_and_orders_by_dependency() {
        let m = Manifest::parse(
            r#"
            [[service]]
            name = "web"
            exec = ["/bin/web"]
            after = ["db"]
            backoff-initial = "50ms"

            [[service]]
            name = "db"
            exec = ["/bin/db", "--x"]
            ready = "started"
            user = "db"
            env = { A = "1" }
            "#,
        )
        .unwrap();
        let names: Vec<_> = m.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "web"]);
        assert_eq!(m.services[0].ready, Readiness::Started);
        assert_eq!(m.services[1].ready, Readiness::Notify);
        assert_eq!(m.services[1].backoff_initial, Duration::from_millis(50));
        assert_eq!(m.services[1].give_up_after, 5);
        assert_eq!(m.services[0].env["A"], "1");
    }

    #[test]
    fn reports_every_error_at_once() {
        let err = Manifest::parse(
            r#"
            [[service]]
            name = "a"
            exec = []
            after = ["ghost"]

            [[service]]
            name = "a"
            exec = ["relative"]
            "#,
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
        let text = err.to_string();
        assert!(text.contains("exec is empty"));
        assert!(text.contains("defined twice"));
        assert!(text.contains("unknown service \"ghost\""));
        assert!(text.contains("absolute path"));
    }

    #[test]
    fn refuses_unknown_fields_and_cycles() {
        let err = Manifest::parse("[[service]]\nname=\"a\"\nexec=[\"/a\"]\nrestrat=\"always\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("restrat"), "{err}");
        let err = Manifest::parse(
            "[[service]]\nname=\"a\"\nexec=[\"/a\"]\nafter=[\"b\"]\n[[service]]\nname=\"b\"\nexec=[\"/b\"]\nafter=[\"a\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn bad_duration_is_a_clear_error() {
        let err =
            Manifest::parse("[[service]]\nname=\"a\"\nexec=[\"/a\"]\nstop-timeout=\"soon\"\n")
                .unwrap_err();
        assert!(
            err.to_string().contains("stop-timeout") || err.to_string().contains("soon"),
            "{err}"
        );
    }
}
