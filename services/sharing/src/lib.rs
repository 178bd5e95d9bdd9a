//! The sharing service: devices and people. It keeps the device registry
//! ([`registry`]) and serves it to the other services on the bus ([`bus`]);
//! it serves the box's web UI (the status page, `/api/status`) and the
//! owner's device list (`/api/devices`). Share links arrive with the
//! sharing issue.

pub mod announce;
pub mod browser;
pub mod bus;
pub mod identity;
pub mod join;
pub mod pair;
pub mod pairing;
pub mod provision;
pub mod registry;

use cloudlet_proto::control::{self, ClockSource, Request, Response, Status};
use cloudlet_proto::update::{Phase, UpdateStatus};
use cloudlet_runtime::auth::{AuthError, Authenticator, CheckFuture, Identity, Presented};
use cloudlet_runtime::router::{Params, RoutedBody, Router};
use cloudlet_runtime::{health, json, text, Body, ServiceOptions, Transport};
use hyper::{Method, StatusCode};
use std::path::PathBuf;
use std::sync::Arc;

use registry::{Registry, RegistryError};

/// Seconds since the Unix epoch by the box's clock (0 if it is before 1970).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub const NAME: &str = "sharing";

fn control_socket() -> PathBuf {
    std::env::var_os("CLOUDLET_CONTROL_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| control::SOCKET_PATH.into())
}

async fn status() -> Result<Status, String> {
    let path = control_socket();
    let r = tokio::task::spawn_blocking(move || control::call(&path, &Request::Status))
        .await
        .map_err(|e| e.to_string())?;
    match r.map_err(|e| e.to_string())? {
        Response::Status(s) => Ok(*s),
        Response::Error { message } => Err(message),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '&' => "&amp;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

/// The updater's paragraph of the status page: what runs from which slot,
/// what the updater is doing (with a percent while it writes), and how the
/// last install, check or rollback ended (a rollback flagged).
fn update_line(u: &UpdateStatus) -> String {
    let mut out = format!(
        "<p>Updates: running {} from slot {}",
        esc(&u.version),
        esc(u.slot.as_deref().unwrap_or("?"))
    );
    let doing = match u.phase {
        Phase::Idle => None,
        Phase::Checking => Some("checking for a new release"),
        Phase::Installing => Some("installing"),
        Phase::Verifying => Some("verifying"),
        Phase::RebootPending => Some("a new release boots at the next reboot"),
        Phase::Trial => Some("on trial, not committed yet"),
    };
    if let Some(d) = doing {
        out.push_str("; ");
        out.push_str(d);
        if let (Phase::Installing | Phase::Verifying, Some(p)) = (u.phase, &u.progress) {
            out.push_str(&format!(" {}", esc(&p.part)));
            if p.total > 0 {
                let pc = u128::from(p.done.min(p.total)) * 100 / u128::from(p.total);
                out.push_str(&format!(", {pc}%"));
            }
        }
    }
    out.push('.');
    if let Some(o) = &u.last {
        let what = format!(
            "Last: {}{}{}.",
            esc(&o.kind),
            o.version
                .as_deref()
                .map(|v| format!(" {}", esc(v)))
                .unwrap_or_default(),
            if o.message.is_empty() {
                String::new()
            } else {
                format!(": {}", esc(&o.message))
            }
        );
        if o.kind == "rolled-back" {
            out.push_str(&format!(" <span class=\"warn\">{what}</span>"));
        } else {
            out.push_str(&format!(" {what}"));
        }
    }
    out.push_str("</p>");
    out
}

/// The updater's latest status as it keeps it for this page, if there is
/// one that reads: at `$CLOUDLET_UPDATE_STATUS` when set (where the
/// updater writes it then, for tests off the box), else at its place.
async fn update_status() -> Option<UpdateStatus> {
    let path = std::env::var_os("CLOUDLET_UPDATE_STATUS")
        .map_or_else(|| cloudlet_proto::update::STATUS_PATH.into(), PathBuf::from);
    let bytes = tokio::fs::read(path).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The status page, with the updater's line when `update` is known.
pub fn render(s: &Status, update: Option<&UpdateStatus>) -> String {
    let mut rows = String::new();
    for svc in &s.services {
        rows.push_str(&format!(
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            esc(&svc.name),
            esc(&format!("{:?}", svc.state).to_lowercase()),
            esc(&format!("{:?}", svc.state).to_lowercase()),
            svc.pid.map(|p| p.to_string()).unwrap_or_default(),
            svc.restarts,
            esc(svc.last_exit.as_deref().unwrap_or("")),
        ));
    }
    let clock = match s.clock {
        ClockSource::Unset => "<p class=\"warn\">The clock is not set yet (no network time); times shown may be wrong.</p>",
        _ => "",
    };
    let board = match &s.board {
        Some(b) => format!(
            "<p>Board: {} (LEDs: {}, watchdog {}).</p><ul>{}</ul>",
            esc(&b.name),
            esc(&b.led),
            if b.watchdog { "on" } else { "none" },
            b.power
                .iter()
                .map(|p| format!("<li>{}</li>", esc(p)))
                .collect::<String>()
        ),
        None => String::new(),
    };
    let data = match &s.data {
        Some(d) => format!(
            "{} of {} free{}",
            human(d.free_bytes),
            human(d.size_bytes),
            if d.was_clean {
                ""
            } else {
                " (recovered after an unclean shutdown)"
            }
        ),
        None => "<span class=\"warn\">not mounted</span>".into(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
<title>{host}</title><style>body{{font-family:system-ui,sans-serif;max-width:44em;margin:2em auto;padding:0 1em}}\
table{{border-collapse:collapse;width:100%}}td,th{{text-align:left;padding:.3em;border-bottom:1px solid #ddd}}\
.ready{{color:#070}}.failed,.warn{{color:#b00}}</style></head><body>\
<h1>{host}</h1><p>Cloudlet {ver}, slot {slot}, {state}.</p>{clock}{update}<p>Storage: {data}</p>{board}\
<table><tr><th>Service</th><th>State</th><th>PID</th><th>Restarts</th><th>Last exit</th></tr>\n{rows}</table></body></html>\n",
        host = esc(&s.hostname),
        ver = esc(&s.version),
        slot = esc(s.slot.as_deref().unwrap_or("?")),
        state = if s.all_ready { "all services ready" } else { "starting" },
        update = update.map(update_line).unwrap_or_default(),
    )
}

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

async fn status_page() -> hyper::Response<Body> {
    match status().await {
        Ok(s) => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            render(&s, update_status().await.as_ref()),
        ),
        Err(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("box status unavailable: {e}\n"),
        ),
    }
}

async fn status_json() -> hyper::Response<Body> {
    match status().await {
        Ok(s) => json(StatusCode::OK, &s),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"error": e}),
        ),
    }
}

/// The registry itself as the sharing service's [`Authenticator`]: it asks
/// its own database, no bus in between.
pub struct LocalAuth(pub Arc<Registry>);

impl Authenticator for LocalAuth {
    fn check(&self, p: Presented) -> CheckFuture<'_> {
        let registry = self.0.clone();
        Box::pin(async move {
            let (kind, hash) = match (&p.key, &p.token) {
                (Some(k), _) => ("key", k.clone()),
                (None, Some(t)) => ("token", registry::token_hash(t)),
                (None, None) if p.malformed => return Err(AuthError::Invalid),
                (None, None) => return Err(AuthError::Missing),
            };
            let found = tokio::task::spawn_blocking(move || {
                let d = registry.lookup(kind, &hash)?;
                if let Some(d) = &d {
                    registry.seen(&d.id, now())?;
                }
                Ok::<_, RegistryError>(d)
            })
            .await;
            match found {
                Ok(Ok(Some(d))) => Ok(Identity {
                    device: d.id,
                    name: d.name,
                    role: d.role.as_str().to_owned(),
                }),
                Ok(Ok(None)) => Err(AuthError::Invalid),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "registry");
                    Err(AuthError::Unavailable)
                }
                Err(_) => Err(AuthError::Unavailable),
            }
        })
    }
}

/// The registry, who to tell when it changes, and the box's identity.
#[derive(Clone)]
pub struct Devices {
    pub registry: Arc<Registry>,
    pub notifier: Arc<bus::Notifier>,
    pub identity: Option<Arc<identity::Identity>>,
    pub pairing: Option<Arc<pair::Pairing>>,
    /// This box asking another to pair (box-to-box).
    pub join: Option<Arc<join::Join>>,
}

fn who(req: &hyper::Request<RoutedBody>) -> Option<&Identity> {
    req.extensions().get::<Identity>()
}

fn registry_error(e: RegistryError) -> hyper::Response<Body> {
    let status = match e {
        RegistryError::NoSuchDevice(_) => StatusCode::NOT_FOUND,
        RegistryError::LastOwner | RegistryError::KeyTaken(_) | RegistryError::Full => {
            StatusCode::CONFLICT
        }
        RegistryError::BadName => StatusCode::BAD_REQUEST,
        _ => {
            tracing::error!(error = %e, "registry");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    json(status, &serde_json::json!({"error": e.to_string()}))
}

pub(crate) fn owners_only() -> hyper::Response<Body> {
    json(
        StatusCode::FORBIDDEN,
        &serde_json::json!({"error": "only an owner device may do this"}),
    )
}

impl Devices {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let r = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&r))
            .await
            .map_err(|e| RegistryError::Task(e.to_string()))?
    }

    async fn list(&self, req: hyper::Request<RoutedBody>) -> hyper::Response<Body> {
        let me = who(&req).cloned();
        let id = me.as_ref().map(|i| i.device.clone()).unwrap_or_default();
        let owner = me.as_ref().is_some_and(Identity::is_owner);
        match self.blocking(|r| r.list()).await {
            // Who else may reach the box is the owners' business; a device
            // sees itself.
            Ok(all) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "you": id,
                    "devices": all.into_iter().filter(|d| owner || d.id == id).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => registry_error(e),
        }
    }

    /// `POST /api/pairing/news`: the devices paired since this owner was
    /// last told (then it counts as told of them).
    async fn news(&self, req: hyper::Request<RoutedBody>) -> hyper::Response<Body> {
        let Some(me) = who(&req).filter(|i| i.is_owner()).cloned() else {
            return owners_only();
        };
        match self.blocking(move |r| r.take_news(&me.device)).await {
            Ok(news) => json(StatusCode::OK, &serde_json::json!({ "news": news })),
            Err(e) => registry_error(e),
        }
    }

    async fn revoke(&self, req: hyper::Request<RoutedBody>, p: Params) -> hyper::Response<Body> {
        let Some(me) = who(&req).cloned() else {
            return owners_only();
        };
        let id = p.get("id").unwrap_or_default().to_owned();
        // An owner revokes anyone; any device may revoke itself.
        if !me.is_owner() && me.device != id {
            return owners_only();
        }
        match self.blocking(move |r| r.remove(&id)).await {
            Ok(gone) => {
                tracing::info!(device = %gone.id, name = %gone.name, by = %me.device, "device revoked");
                self.notifier.changed(&gone.id).await;
                json(StatusCode::OK, &serde_json::json!({"revoked": gone}))
            }
            Err(e) => registry_error(e),
        }
    }

    async fn rename(&self, req: hyper::Request<RoutedBody>, p: Params) -> hyper::Response<Body> {
        use http_body_util::BodyExt;
        let Some(me) = who(&req).cloned() else {
            return owners_only();
        };
        let id = p.get("id").unwrap_or_default().to_owned();
        if !me.is_owner() && me.device != id {
            return owners_only();
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": e.to_string()}),
                )
            }
        };
        let name = match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => v.get("name").and_then(|n| n.as_str()).map(str::to_owned),
            Err(_) => None,
        };
        let Some(name) = name else {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "send {\"name\": \"new name\"}"}),
            );
        };
        match self.blocking(move |r| r.rename(&id, &name)).await {
            Ok(d) => {
                self.notifier.changed(&d.id).await;
                json(StatusCode::OK, &d)
            }
            Err(e) => registry_error(e),
        }
    }
}

/// The service's routes: `/health` is public; the status page, its JSON and
/// the device list need a paired device (they tell who the box is, what
/// runs on it and who may reach it).
pub fn routes(auth: Arc<dyn Authenticator>, devices: Option<Devices>) -> Router {
    let r = Router::new(auth)
        // Public: init and monitoring check liveness without a credential.
        .public(Method::GET, "/health", |_, _| async { health(NAME) })
        .route(Method::GET, "/", |_, _| status_page())
        .route(Method::GET, "/api/status", |_, _| status_json());
    let Some(d) = devices else { return r };
    let (list, revoke, rename, news) = (d.clone(), d.clone(), d.clone(), d.clone());
    let r = match d.pairing.clone() {
        Some(p) => {
            let (ask, state, approve) = (p.clone(), p.clone(), p.clone());
            let (browser_ask, browser_wait) = (p.clone(), p);
            // Public: the one door for a device that is not paired yet. It
            // pairs nothing without the button (and an owner, once there is
            // one), and needs TLS with the device's own certificate.
            r.public(Method::POST, "/pair", move |req, _| {
                let p = ask.clone();
                async move { p.request(req).await }
            })
            .body_limit(pair::PAIR_BODY_LIMIT)
            // Public: the page a browser pairs through, its script, and the
            // two calls it makes (same-site only; the same window and rules).
            .public(Method::GET, "/pair", |_, _| async { browser::page() })
            .public(Method::GET, "/pair.js", |_, _| async { browser::script() })
            .public(Method::POST, "/pair/browser", move |req, _| {
                let p = browser_ask.clone();
                async move { p.browser_request(req).await }
            })
            .body_limit(pair::PAIR_BODY_LIMIT)
            .public(Method::POST, "/pair/browser/wait", move |req, _| {
                let p = browser_wait.clone();
                async move { p.browser_wait(req).await }
            })
            .body_limit(pair::PAIR_BODY_LIMIT)
            .route(Method::GET, "/api/pairing", move |req, _| {
                let p = state.clone();
                async move { p.state(who(&req)) }
            })
            .route(Method::POST, "/api/pairing/approve", move |req, _| {
                let p = approve.clone();
                async move { p.approve(req).await }
            })
        }
        None => r,
    };
    let r = match d.join.clone() {
        Some(j) => {
            let (start, state) = (j.clone(), j);
            r.route(Method::POST, "/api/pairing/join", move |req, _| {
                let j = start.clone();
                async move { j.start(req).await }
            })
            .body_limit(join::JOIN_BODY_LIMIT)
            .route(Method::GET, "/api/pairing/join", move |req, _| {
                let j = state.clone();
                async move { j.state(who(&req)) }
            })
        }
        None => r,
    };
    let r = match d.identity {
        // Public: the box's identity certificate is what every TLS handshake
        // shows anyway; a person installs it in a browser from here, and a
        // client still checks it against the box ID it was told.
        Some(id) => r.public(Method::GET, "/api/identity", move |_, _| {
            let id = id.clone();
            async move {
                json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "box_id": id.box_id,
                        "key": id.key_hash,
                        "certificate": id.cert_pem(),
                    }),
                )
            }
        }),
        None => r,
    };
    r.route(Method::GET, "/api/devices", move |req, _| {
        let d = list.clone();
        async move { d.list(req).await }
    })
    .route(Method::POST, "/api/pairing/news", move |req, _| {
        let d = news.clone();
        async move { d.news(req).await }
    })
    .route(Method::DELETE, "/api/devices/{id}", move |req, p| {
        let d = revoke.clone();
        async move { d.revoke(req, p).await }
    })
    .route(Method::PUT, "/api/devices/{id}/name", move |req, p| {
        let d = rename.clone();
        async move { d.rename(req, p).await }
    })
}

/// Runs the service: the box's identity and the registry in its state
/// directory, the registry on the bus at `$CLOUDLET_REGISTRY_SOCKET`
/// (default [`cloudlet_runtime::registry::DEFAULT_SOCKET`]), and the web UI
/// over TLS with a certificate from the identity.
pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    opts.check().map_err(std::io::Error::other)?;
    cloudlet_runtime::check_state_dir(&opts.state_dir)?;
    let dir = opts.state_dir.clone();
    let (registry, identity) = tokio::task::spawn_blocking(move || {
        let r = Registry::open(&dir).map_err(std::io::Error::other)?;
        // What `cloudlet flash` put on the card, before an identity is made.
        provision::at_start(&dir, &r)?;
        let i = identity::Identity::load_or_create(&dir).map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((r, i))
    })
    .await
    .map_err(std::io::Error::other)??;
    tracing::info!(box_id = %identity.box_id, key = %identity.key_hash, "box identity");
    let registry = Arc::new(registry);
    let identity = Arc::new(identity);
    let notifier = Arc::new(bus::Notifier::default());
    let pairing = pair::Pairing::new(
        control_socket(),
        registry.clone(),
        notifier.clone(),
        identity.clone(),
    );
    tokio::spawn(pairing.clone().timer());
    tokio::spawn(pairing.clone().follow_button(control_socket()));
    let socket = cloudlet_runtime::registry::socket_path();
    // Bound before the service reports ready: the others find it there.
    let listener = bus::bind(&socket)?;
    tokio::spawn(bus::serve(
        listener,
        socket,
        bus::Shared {
            registry: registry.clone(),
            notifier: notifier.clone(),
            identity: identity.clone(),
            pairing: pairing.clone(),
        },
    ));
    let transport = if opts.plain {
        tracing::warn!(listen = %opts.listen, "plain HTTP on loopback, no TLS (--plain)");
        Transport::Plain
    } else {
        let (chain, key) = identity
            .issue(&identity::host_names())
            .map_err(std::io::Error::other)?;
        Transport::Tls(
            cloudlet_runtime::tls::server_config(chain, key).map_err(std::io::Error::other)?,
        )
    };
    let mdns = announce::start(&announce::Announcement {
        box_id: &identity.box_id,
        key_hash: &identity.key_hash,
        web: opts.listen,
    });
    let auth: Arc<dyn Authenticator> = Arc::new(LocalAuth(registry.clone()));
    let router = Arc::new(routes(
        auth,
        Some(Devices {
            join: Some(join::Join::new(
                registry.clone(),
                notifier.clone(),
                identity.clone(),
                pairing.clone(),
            )),
            registry,
            notifier,
            identity: Some(identity),
            pairing: Some(pairing),
        }),
    ));
    let served = cloudlet_runtime::run_service(opts, transport, move |req| {
        let router = router.clone();
        async move { router.handle(req).await }
    })
    .await;
    // Says goodbye on the LAN, so browsers forget the box at once.
    if let Some(m) = mdns {
        let _ = m.shutdown();
    }
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudlet_proto::control::{ServiceInfo, ServiceState};

    #[test]
    fn page_escapes_and_flags_an_unset_clock() {
        let s = Status {
            hostname: "cloudlet-<x>".into(),
            version: "0.1.0".into(),
            slot: Some("A".into()),
            clock: ClockSource::Unset,
            data: None,
            all_ready: true,
            uptime_ms: 1,
            init_rss_kib: None,
            boot_commit: None,
            services: vec![ServiceInfo {
                name: "sync".into(),
                state: ServiceState::Ready,
                pid: Some(7),
                restarts: 2,
                last_exit: Some("killed by SIGKILL".into()),
                rss_kib: None,
            }],
            board: Some(cloudlet_proto::control::BoardInfo {
                name: "rpi4".into(),
                led: "pairing".into(),
                watchdog: true,
                power: vec![
                    "cpu governor: ondemand on 1 policies".into(),
                    "wifi power save: unsupported <x>".into(),
                ],
            }),
        };
        let html = render(&s, None);
        assert!(
            html.contains("<p>Board: rpi4 (LEDs: pairing, watchdog on).</p>"),
            "{html}"
        );
        assert!(html.contains("<li>wifi power save: unsupported &lt;x&gt;</li>"));
        assert!(html.contains("cloudlet-&lt;x&gt;"));
        assert!(!html.contains("<x>"));
        assert!(html.contains("clock is not set"));
        assert!(html.contains("<td>sync</td><td class=\"ready\">ready</td><td>7</td><td>2</td><td>killed by SIGKILL</td>"));
        assert!(html.contains("not mounted"));
        assert!(
            !html.contains("Updates:"),
            "no updater status, no line: {html}"
        );
    }

    fn plain_status() -> Status {
        Status {
            hostname: "cloudlet".into(),
            version: "0.2.0".into(),
            slot: Some("B".into()),
            clock: ClockSource::Ntp,
            data: None,
            all_ready: true,
            uptime_ms: 1,
            init_rss_kib: None,
            boot_commit: None,
            services: vec![],
            board: None,
        }
    }

    #[test]
    fn the_update_line_shows_progress_and_escapes_a_hostile_outcome() {
        use cloudlet_proto::update::{Outcome, Progress};
        let u = UpdateStatus {
            version: "0.2.0".into(),
            board: "rpi4".into(),
            slot: Some("B".into()),
            phase: Phase::Installing,
            progress: Some(Progress {
                part: "rootfs.squashfs".into(),
                done: 45,
                total: 100,
            }),
            last: Some(Outcome {
                kind: "refused".into(),
                version: Some("0.3.0<b>".into()),
                message: "<script>alert('x')</script> & \"more\"".into(),
                at: 0,
            }),
            ..UpdateStatus::default()
        };
        let html = render(&plain_status(), Some(&u));
        assert!(
            html.contains("<p>Updates: running 0.2.0 from slot B; installing rootfs.squashfs, 45%. Last: refused 0.3.0&lt;b&gt;: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;more&quot;.</p>"),
            "{html}"
        );
        assert!(!html.contains("<script>"));
        assert!(!html.contains("<b>"));
        let line = update_line(&u);
        assert!(
            !line.contains("warn"),
            "a refusal is not a rollback: {line}"
        );
    }

    #[test]
    fn a_rollback_is_flagged_and_an_idle_updater_shows_no_phase() {
        use cloudlet_proto::update::Outcome;
        let u = UpdateStatus {
            version: "0.1.9".into(),
            slot: Some("A".into()),
            last: Some(Outcome {
                kind: "rolled-back".into(),
                version: Some("0.2.0".into()),
                message: "slot B did not come up healthy".into(),
                at: 0,
            }),
            ..UpdateStatus::default()
        };
        let html = render(&plain_status(), Some(&u));
        assert!(
            html.contains("<p>Updates: running 0.1.9 from slot A. <span class=\"warn\">Last: rolled-back 0.2.0: slot B did not come up healthy.</span></p>"),
            "{html}"
        );
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(0), "0.0 B");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
