//! The services init runs: the manifest's, minus those whose `only-if`
//! variable init does not have, each with its state directories made and a
//! log buffer. A manifest that cannot be read or parsed means no services
//! (logged; `pid1` then shows an error and never marks the boot good).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Options;
use crate::logbuf::LogBuf;
use crate::manifest::{Manifest, ServiceSpec, DEFAULT_HEALTH_TIMEOUT, DEFAULT_SETTLE};

/// The services to run, in start order, and a log buffer for each.
pub(super) struct Loaded {
    pub services: Vec<ServiceSpec>,
    pub logs: Vec<Arc<Mutex<LogBuf>>>,
    /// How long every service must stay ready before the boot is committed.
    pub settle: Duration,
    /// How long the services may take to become ready, `settle` not
    /// counted, before init gives this boot up.
    pub health_timeout: Duration,
}

/// The services to run (see [`Loaded`]).
pub(super) fn load(opts: &Options, vars: &BTreeMap<String, String>) -> Loaded {
    // A manifest that does not load keeps the defaults: such a boot never
    // commits, so it is given up after the default time.
    let (settle, health_timeout, services) = match load_manifest(&opts.manifest) {
        Some(m) => (m.settle, m.health_timeout, m.services),
        None => (DEFAULT_SETTLE, DEFAULT_HEALTH_TIMEOUT, Vec::new()),
    };
    let services: Vec<_> = services
        .into_iter()
        .filter(|s| match &s.only_if {
            Some(v) => vars.contains_key(v),
            None => true,
        })
        .collect();
    for s in &services {
        prepare_state_dirs(s, &opts.etc);
    }
    let logs = services
        .iter()
        .map(|s| Arc::new(Mutex::new(LogBuf::new(s.log_lines))))
        .collect();
    Loaded {
        services,
        logs,
        settle,
        health_timeout,
    }
}

/// The manifest, or `None` (logged) when it cannot be read or parsed.
fn load_manifest(path: &Path) -> Option<Manifest> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the service manifest; running no services");
            return None;
        }
    };
    match Manifest::parse(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!(path = %path.display(), "{e}; running no services");
            None
        }
    }
}

/// Makes a service's state directories, owned by its user.
fn prepare_state_dirs(s: &ServiceSpec, etc: &Path) {
    let owner = s
        .user
        .as_deref()
        .and_then(|u| crate::users::lookup(etc, u).ok());
    for d in &s.state_dirs {
        if let Err(e) = std::fs::create_dir_all(d) {
            tracing::warn!(service = %s.name, dir = %d.display(), error = %e, "cannot create state dir");
            continue;
        }
        if let Some(u) = &owner {
            let _ = nix::unistd::chown(d, Some(u.uid.into()), Some(u.gid.into()));
        }
    }
}
