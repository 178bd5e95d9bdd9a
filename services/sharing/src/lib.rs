//! The sharing service, which also serves the box's web UI. This first cut
//! shows the box's status page (from init's control socket) and `/api/status`;
//! pairing and share links arrive with the sharing issue.

use cloudlet_proto::control::{self, ClockSource, Request, Response, Status};
use cloudlet_runtime::auth::Authenticator;
use cloudlet_runtime::router::Router;
use cloudlet_runtime::{health, json, text, Body, ServiceOptions};
use hyper::{Method, StatusCode};
use std::path::PathBuf;
use std::sync::Arc;

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

/// The status page.
pub fn render(s: &Status) -> String {
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
<h1>{host}</h1><p>Cloudlet {ver}, slot {slot}, {state}.</p>{clock}<p>Storage: {data}</p>{board}\
<table><tr><th>Service</th><th>State</th><th>PID</th><th>Restarts</th><th>Last exit</th></tr>\n{rows}</table></body></html>\n",
        host = esc(&s.hostname),
        ver = esc(&s.version),
        slot = esc(s.slot.as_deref().unwrap_or("?")),
        state = if s.all_ready { "all services ready" } else { "starting" },
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
        Ok(s) => text(StatusCode::OK, "text/html; charset=utf-8", render(&s)),
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

/// The service's routes: `/health` is public; the status page and its JSON
/// need the credential (they tell who the box is and what runs on it).
pub fn routes(auth: Arc<dyn Authenticator>) -> Router {
    Router::new(auth)
        // Public: init and monitoring check liveness without a credential.
        .public(Method::GET, "/health", |_, _| async { health(NAME) })
        .route(Method::GET, "/", |_, _| status_page())
        .route(Method::GET, "/api/status", |_, _| status_json())
}

pub async fn run(opts: ServiceOptions) -> std::io::Result<()> {
    cloudlet_runtime::run_routed(opts, routes).await
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
        let html = render(&s);
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
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(0), "0.0 B");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
