//! The services init runs: the manifest's, minus those whose `only-if`
//! variable init does not have, each with its state directories made and a
//! log buffer. A manifest that cannot be read or parsed means no services
//! (logged; `pid1` then shows an error and never marks the boot good).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::Options;
use crate::logbuf::LogBuf;
use crate::manifest::{Manifest, ServiceSpec};

/// The services to run, in start order, and a log buffer for each.
pub(super) fn load(
    opts: &Options,
    vars: &BTreeMap<String, String>,
) -> (Vec<ServiceSpec>, Vec<Arc<Mutex<LogBuf>>>) {
    let services: Vec<_> = load_manifest(&opts.manifest)
        .map(|m| m.services)
        .unwrap_or_default()
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
    (services, logs)
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
