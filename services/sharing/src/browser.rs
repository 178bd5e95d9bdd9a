//! Pairing a browser through a page on the box. A browser can neither
//! present a key of its own over TLS nor read the TLS session, so it asks
//! differently and gets a token instead of having a key paired:
//!
//! 1. `GET /pair` (and its script `/pair.js`) is the page: a name and a
//!    Pair button. Both are public and carry a strict CSP ([`CSP`]).
//! 2. `POST /pair/browser` `{"name"}` makes a request: 256 random bits, its
//!    **secret id**, answered to this browser only (202 `{request, code,
//!    box_id}`). The box keeps the id's hash, and puts the request in the
//!    pairing window as any device's ([`crate::pairing`]: the window, the
//!    second press, an owner's approval of the code once there is an
//!    owner, the overlap rule). The six-digit **code** is made from the
//!    secret ([`code_of`]); the page shows it, the box shows it to nobody.
//! 3. `POST /pair/browser/wait` `{"request"}` waits up to [`POLL`] and
//!    answers 202 (still waiting: the page asks again at once), 200 (paired:
//!    the token arrives in this answer only, as the `cloudlet_token` cookie,
//!    HttpOnly, Secure, SameSite=Strict), or the refusal.
//!
//! A browser that goes away in the middle of a wait (the page was closed
//! or reloaded) is withdrawn at once, as a native device is; a request
//! nobody waits on for [`ABANDONED`] is withdrawn too; a pairing whose
//! answer nobody collects within that time is undone (the device is removed
//! again), so no token exists that no browser holds. Both routes also need a same-site request
//! ([`cloudlet_runtime::auth::same_site`]): only the box's page starts a
//! browser pairing, not another site's page the person happens to visit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_runtime::auth::{same_site, TOKEN_COOKIE};
use cloudlet_runtime::registry::token_hash;
use cloudlet_runtime::router::RoutedBody;
use cloudlet_runtime::{json, text, Body};
use hyper::header::{HeaderValue, CACHE_CONTROL, SET_COOKIE};
use hyper::StatusCode;
use tokio::sync::oneshot;

use crate::pair::{lock, refused, Outcome, Paired, Pairing};
use crate::pairing::{Credential, Kind, Pending, Refusal};

/// How long one wait holds before it answers "still waiting".
pub const POLL: Duration = Duration::from_secs(25);
/// A request nobody waits on for this long is withdrawn; an answer nobody
/// collects for this long is dropped (and a pairing in it undone).
pub const ABANDONED: Duration = Duration::from_secs(20);
/// Browser requests kept at once (each window settles one; the rest are
/// answers waiting to be collected).
pub const MAX_REQUESTS: usize = 64;
/// The cookie's life: 400 days, the longest browsers keep one. Revoking
/// the device ends it sooner, on every service.
pub const COOKIE_MAX_AGE: u64 = 400 * 24 * 60 * 60;

/// The page's policy: its script only from the box (no inline script, no
/// eval), requests only to the box, no styles, images, forms or frames
/// from anywhere, and no other page may frame it.
pub const CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const PAGE: &str = include_str!("pair.html");
const SCRIPT: &str = include_str!("pair.js");

/// A browser's request to pair, by the hash of its secret id.
#[derive(Default)]
pub(crate) struct BrowserRequest {
    /// Its answer, when the window settled it while no wait was running.
    held: Option<Outcome>,
    /// Since when no wait runs for it (`None`: one runs now).
    idle_since: Option<Instant>,
}

/// The six digits a browser request shows: made from its secret id, so
/// nobody who has not seen the box's answer to it can tell them.
pub fn code_of(secret: &str) -> String {
    let h = token_hash(&format!("cloudlet browser pairing code\n{secret}"));
    let n = h
        .get(..8)
        .and_then(|x| u32::from_str_radix(x, 16).ok())
        .unwrap_or(0)
        % 1_000_000;
    format!("{n:06}")
}

/// A request's secret id is 64 lower-case hex digits.
fn is_secret(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn bad_request(reason: &str) -> hyper::Response<Body> {
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({"error": "bad_request", "reason": reason}),
    )
}

fn not_from_the_box() -> hyper::Response<Body> {
    json(
        StatusCode::FORBIDDEN,
        &serde_json::json!({"error": "cross_site",
            "reason": "a browser pairs only through the box's own page (https://<the box>:8080/pair)"}),
    )
}

/// The JSON body of a request, bounded by the route's limit.
async fn body_json(req: hyper::Request<RoutedBody>) -> Option<serde_json::Value> {
    use http_body_util::BodyExt;
    let bytes = req.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

/// The final answer of a browser request: the cookie on success (in this
/// answer only), the reason on refusal.
fn respond(outcome: Outcome) -> hyper::Response<Body> {
    let mut r = match outcome {
        Ok(Paired {
            answer,
            token: Some(token),
            ..
        }) => {
            let mut r = json(StatusCode::OK, &answer);
            let cookie = format!(
                "{TOKEN_COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age={COOKIE_MAX_AGE}"
            );
            match HeaderValue::from_str(&cookie) {
                Ok(v) => {
                    r.headers_mut().insert(SET_COOKIE, v);
                }
                Err(_) => return refused(&Refusal::Registry("bad token".into())),
            }
            r
        }
        Ok(_) => refused(&Refusal::Registry("no token was made".into())),
        // 408 would invite a browser to send the request again by itself.
        Err(Refusal::TimedOut) => {
            let mut r = refused(&Refusal::TimedOut);
            *r.status_mut() = StatusCode::FORBIDDEN;
            r
        }
        Err(why) => refused(&why),
    };
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The headers the page and its script carry.
fn guarded(mut r: hyper::Response<Body>) -> hyper::Response<Body> {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /pair`: the page.
pub fn page() -> hyper::Response<Body> {
    guarded(text(StatusCode::OK, "text/html; charset=utf-8", PAGE))
}

/// `GET /pair.js`: its script.
pub fn script() -> hyper::Response<Body> {
    guarded(text(
        StatusCode::OK,
        "text/javascript; charset=utf-8",
        SCRIPT,
    ))
}

/// A wait's place, cleared when the wait ends without its answer: after
/// [`POLL`] the request is idle (and withdrawn if no wait follows within
/// [`ABANDONED`]); if the browser went away in the middle of a wait (the
/// page was closed or reloaded), the request is withdrawn at once.
struct Wait {
    pairing: Arc<Pairing>,
    hash: String,
    serial: u64,
    rx: Option<oneshot::Receiver<Outcome>>,
    /// The answer was given.
    done: bool,
    /// Dropped mid-wait: the browser is gone.
    left: bool,
}

impl Drop for Wait {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let credential = Credential::Browser(self.hash.clone());
        let ours = {
            let mut w = lock(&self.pairing.waiters);
            let ours = w.get(&credential).is_some_and(|(n, _)| *n == self.serial);
            if ours {
                w.remove(&credential);
            }
            ours
        };
        // An answer sent to this wait that nobody read is kept like one
        // that came while no wait ran.
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(o) = rx.try_recv() {
                self.pairing.hold(&self.hash, o);
            }
        }
        if !ours {
            // A newer wait has the place, or the answer came (kept above).
            return;
        }
        if self.left {
            let gone = lock(&self.pairing.browsers).remove(&self.hash);
            lock(&self.pairing.window).withdraw(&credential);
            tracing::info!("a browser went away while it waited to pair: its request is withdrawn");
            if let Some(Ok(p)) = gone.and_then(|r| r.held) {
                self.pairing.unpair_later(p);
            }
        } else {
            if let Some(r) = lock(&self.pairing.browsers).get_mut(&self.hash) {
                r.idle_since = Some(Instant::now());
            }
            self.pairing.sweep_later(self.hash.clone());
        }
    }
}

impl Pairing {
    /// Keeps an answer for a browser request's next wait, or undoes a
    /// pairing nobody is left to collect.
    pub(crate) fn hold(self: &Arc<Self>, hash: &str, outcome: Outcome) {
        let unheld = {
            let mut b = lock(&self.browsers);
            match b.get_mut(hash) {
                Some(r) => {
                    r.held = Some(outcome);
                    r.idle_since = Some(Instant::now());
                    None
                }
                None => Some(outcome),
            }
        };
        match unheld {
            None => self.sweep_later(hash.to_owned()),
            Some(Ok(p)) => self.unpair_later(p),
            Some(Err(_)) => {}
        }
    }

    /// [`Pairing::unpair`] in a task of its own.
    fn unpair_later(self: &Arc<Self>, p: Paired) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let me = self.clone();
                rt.spawn(async move { me.unpair(p).await });
            }
            Err(_) => {
                tracing::error!(device = %p.device, "a browser pairing nobody collected could not be undone: revoke it")
            }
        }
    }

    /// Looks at a browser request again once [`ABANDONED`] has passed.
    fn sweep_later(self: &Arc<Self>, hash: String) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            tokio::time::sleep(ABANDONED + Duration::from_millis(50)).await;
            me.sweep(&hash).await;
        });
    }

    /// Forgets a browser request that has been idle for [`ABANDONED`]: it
    /// leaves the window, and a pairing held for it is undone.
    async fn sweep(self: &Arc<Self>, hash: &str) {
        let gone = {
            let mut b = lock(&self.browsers);
            let stale = b
                .get(hash)
                .and_then(|r| r.idle_since)
                .is_some_and(|t| t.elapsed() >= ABANDONED);
            if stale {
                b.remove(hash)
            } else {
                None
            }
        };
        let Some(gone) = gone else { return };
        lock(&self.window).withdraw(&Credential::Browser(hash.to_owned()));
        match gone.held {
            Some(Ok(p)) => self.unpair(p).await,
            Some(Err(_)) => {}
            None => tracing::info!("a browser stopped waiting to pair: its request is withdrawn"),
        }
    }

    /// Removes a device paired for a browser that never took its cookie.
    async fn unpair(&self, p: Paired) {
        let r = self.registry.clone();
        let id = p.device.clone();
        let removed = tokio::task::spawn_blocking(move || r.remove(&id)).await;
        match removed {
            Ok(Ok(d)) => {
                tracing::warn!(device = %d.id, name = %d.name, "a browser was paired but never took its cookie: the pairing is undone");
                self.notifier.changed(&d.id).await;
            }
            Ok(Err(e)) => {
                tracing::error!(device = %p.device, error = %e, "undoing a browser pairing nobody collected")
            }
            Err(e) => {
                tracing::error!(device = %p.device, error = %e, "undoing a browser pairing nobody collected")
            }
        }
    }

    /// `POST /pair/browser` `{"name"}`: a browser asks to pair, from the
    /// box's page.
    pub async fn browser_request(
        self: &Arc<Self>,
        req: hyper::Request<RoutedBody>,
    ) -> hyper::Response<Body> {
        if !same_site(req.method(), req.headers()) {
            return not_from_the_box();
        }
        let from = req
            .extensions()
            .get::<cloudlet_runtime::PeerAddr>()
            .map(|a| a.0.ip());
        let name = body_json(req)
            .await
            .and_then(|v| v["name"].as_str().map(|n| n.trim().to_owned()))
            .unwrap_or_default();
        if crate::registry::check_name(&name).is_err() {
            return bad_request(
                "send {\"name\": \"what to call this browser\"} (1 to 64 characters)",
            );
        }
        let secret = match cloudlet_runtime::random::<32>() {
            Ok(b) => hex::encode(b),
            Err(e) => {
                tracing::error!(error = %e, "no random bytes for a pairing request");
                return refused(&Refusal::Registry(e.to_string()));
            }
        };
        let hash = token_hash(&secret);
        let credential = Credential::Browser(hash.clone());
        {
            let mut b = lock(&self.browsers);
            if b.len() >= MAX_REQUESTS {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"error": "busy",
                        "reason": "too many browsers are asking to pair: try again in a minute"}),
                );
            }
            b.insert(
                hash.clone(),
                BrowserRequest {
                    held: None,
                    idle_since: Some(Instant::now()),
                },
            );
        }
        tracing::info!(name = %name, via = "browser", from = %from.map_or_else(String::new, |a| a.to_string()), "a device asks to pair");
        let code = code_of(&secret);
        let actions = lock(&self.window).request(
            Instant::now(),
            Pending {
                credential: credential.clone(),
                name,
                kind: Kind::Device,
                code: code.clone(),
                pressed: false,
                approved: false,
                from,
            },
        );
        self.carry_out(actions).await;
        // Refused at once (no window, an overlap): the answer was held.
        let now = {
            let mut b = lock(&self.browsers);
            match b.get_mut(&hash).and_then(|r| r.held.take()) {
                Some(o) => {
                    b.remove(&hash);
                    Some(o)
                }
                None => None,
            }
        };
        if let Some(outcome) = now {
            return respond(outcome);
        }
        self.sweep_later(hash);
        let mut r = json(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "request": secret,
                "code": code,
                "box_id": self.identity.box_id,
            }),
        );
        r.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }

    /// `POST /pair/browser/wait` `{"request"}`: waits for a browser
    /// request's answer, up to [`POLL`].
    pub async fn browser_wait(
        self: &Arc<Self>,
        req: hyper::Request<RoutedBody>,
    ) -> hyper::Response<Body> {
        if !same_site(req.method(), req.headers()) {
            return not_from_the_box();
        }
        let secret = body_json(req)
            .await
            .and_then(|v| v["request"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if !is_secret(&secret) {
            return bad_request("send {\"request\": \"the id /pair/browser answered\"}");
        }
        let hash = token_hash(&secret);
        let credential = Credential::Browser(hash.clone());
        let take_held = || {
            let mut b = lock(&self.browsers);
            let o = b.get_mut(&hash)?.held.take()?;
            b.remove(&hash);
            Some(o)
        };
        {
            let mut b = lock(&self.browsers);
            let Some(r) = b.get_mut(&hash) else {
                return json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "unknown_request",
                        "reason": "this pairing request is over (it was answered, abandoned, or the box restarted): start again"}),
                );
            };
            r.idle_since = None;
        }
        if let Some(o) = take_held() {
            return respond(o);
        }
        let (tx, rx) = oneshot::channel();
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.waiters).insert(credential, (serial, tx));
        let mut wait = Wait {
            pairing: self.clone(),
            hash: hash.clone(),
            serial,
            rx: Some(rx),
            done: false,
            left: true,
        };
        // An answer that came between the first look and the waiter's
        // place was held: take it now.
        if let Some(o) = take_held() {
            wait.left = false;
            return respond(o);
        }
        let got = match wait.rx.as_mut() {
            Some(rx) => match tokio::time::timeout(POLL, rx).await {
                Ok(Ok(o)) => Some(o),
                // A newer wait for the same request took the place, or
                // the poll ended: either way the browser is still there
                // (an answer that comes now is kept for its next wait).
                Ok(Err(_)) | Err(_) => None,
            },
            None => None,
        };
        match got {
            Some(o) => {
                wait.done = true;
                lock(&self.browsers).remove(&hash);
                respond(o)
            }
            None => {
                wait.left = false;
                drop(wait);
                let mut r = json(StatusCode::ACCEPTED, &serde_json::json!({"waiting": true}));
                r.headers_mut()
                    .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_digits_that_follow_the_secret() {
        let a = "ab".repeat(32);
        let b = "cd".repeat(32);
        assert_eq!(code_of(&a).len(), 6);
        assert!(code_of(&a).bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(code_of(&a), code_of(&a));
        assert_ne!(code_of(&a), code_of(&b));
        assert!(is_secret(&a));
        assert!(!is_secret(&"AB".repeat(32)));
        assert!(!is_secret(&"ab".repeat(31)));
    }

    #[test]
    fn the_page_loads_its_script_from_the_box_and_carries_the_policy() {
        let p = page();
        assert_eq!(p.headers()["content-security-policy"], CSP);
        assert!(PAGE.contains("<script src=\"/pair.js\""));
        // No inline script or style: the policy would refuse them.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert!(!PAGE.contains("<style") && !PAGE.contains("style="));
        assert!(!PAGE.contains("onclick") && !PAGE.contains("onsubmit"));
        assert!(CSP.contains("script-src 'self'") && !CSP.contains("unsafe"));
        assert_eq!(script().headers()["content-security-policy"], CSP);
        // The script never handles the token: the cookie is HttpOnly.
        assert!(!SCRIPT.contains("document.cookie"));
        assert!(!SCRIPT.contains("innerHTML"));
    }
}
