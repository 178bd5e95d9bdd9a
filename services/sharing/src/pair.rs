//! Pairing as the service runs it: the window of [`crate::pairing`] fed by
//! the box's button (init publishes presses; this long-polls for them), by
//! devices asking over TLS (`POST /pair`) and by owners approving
//! (`/api/pairing`), and closed on time.
//!
//! A device asks over a TLS connection with a client certificate: its key
//! is what gets paired, and the code both ends show comes from the session
//! ([`cloudlet_runtime::tls::SessionBinding`]). Its request waits until the
//! window settles it: paired (200, with its device id and the box's ID and
//! key to pin), or refused with the reason.
//!
//! A browser asks through the box's page instead ([`crate::browser`]); it
//! waits in the same window, and what it gets is a token in a cookie.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudlet_proto::control::{self, PairingLed, Request, Response};
use cloudlet_runtime::auth::{Identity as Who, PeerKey};
use cloudlet_runtime::router::RoutedBody;
use cloudlet_runtime::tls::SessionBinding;
use cloudlet_runtime::{json, Body};
use hyper::StatusCode;
use tokio::sync::oneshot;

use crate::browser::BrowserRequest;
use crate::pairing::{self, Action, Credential, Kind, Pending, Refusal, Window};
use crate::registry::{NewDevice, PairedHow, Registry, Role};
use crate::{bus, identity};

/// Largest `POST /pair` body.
pub const PAIR_BODY_LIMIT: u64 = 1024;

/// A device the window paired. (No `Debug`: the token is not to be logged.)
pub(crate) struct Paired {
    /// The answer to its request.
    pub answer: serde_json::Value,
    /// Its id in the registry.
    pub device: String,
    /// The token made for it (a browser's), to give once and forget.
    pub token: Option<String>,
}

/// How a waiting request ends.
pub(crate) type Outcome = Result<Paired, Refusal>;

pub struct Pairing {
    /// init's control socket, to tell the LEDs.
    control: std::path::PathBuf,
    pub(crate) window: Mutex<Window>,
    /// Each waiting request's answer channel, by credential, with the
    /// request's number (a retry from the same device replaces it).
    pub(crate) waiters: Mutex<HashMap<Credential, (u64, oneshot::Sender<Outcome>)>>,
    pub(crate) serial: std::sync::atomic::AtomicU64,
    /// Browser requests, by the hash of their secret id ([`crate::browser`]).
    pub(crate) browsers: Mutex<HashMap<String, BrowserRequest>>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) notifier: Arc<bus::Notifier>,
    pub(crate) identity: Arc<identity::Identity>,
    /// Wakes the timer when the window opens.
    opened: tokio::sync::Notify,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn refusal_status(r: &Refusal) -> StatusCode {
    match r {
        Refusal::Overlap => StatusCode::CONFLICT,
        Refusal::TimedOut => StatusCode::REQUEST_TIMEOUT,
        Refusal::NothingPending => StatusCode::NOT_FOUND,
        Refusal::Replaced => StatusCode::CONFLICT,
        Refusal::WrongCode => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::Closed | Refusal::TooManyWrongCodes => StatusCode::FORBIDDEN,
        Refusal::Registry(_) => StatusCode::CONFLICT,
    }
}

fn refusal_name(r: &Refusal) -> &'static str {
    match r {
        Refusal::Closed => "window_closed",
        Refusal::Overlap => "overlap",
        Refusal::TimedOut => "timed_out",
        Refusal::WrongCode => "wrong_code",
        Refusal::TooManyWrongCodes => "too_many_wrong_codes",
        Refusal::NothingPending => "nothing_pending",
        Refusal::Replaced => "replaced",
        Refusal::Registry(_) => "not_paired",
    }
}

pub(crate) fn refused(r: &Refusal) -> hyper::Response<Body> {
    json(
        refusal_status(r),
        &serde_json::json!({"error": refusal_name(r), "reason": r.to_string()}),
    )
}

/// Withdraws a waiting device whose request ended before an answer (the
/// client went away): it must not be paired behind its back.
struct Waiting<'a> {
    pairing: &'a Pairing,
    key: Credential,
    serial: u64,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Only if this request is still the device's latest: a retry that
        // came meanwhile keeps its place.
        let mut waiters = lock(&self.pairing.waiters);
        if waiters
            .get(&self.key)
            .is_some_and(|(n, _)| *n == self.serial)
        {
            waiters.remove(&self.key);
            drop(waiters);
            lock(&self.pairing.window).withdraw(&self.key);
        }
    }
}

impl Pairing {
    pub fn new(
        control: std::path::PathBuf,
        registry: Arc<Registry>,
        notifier: Arc<bus::Notifier>,
        identity: Arc<identity::Identity>,
    ) -> Arc<Pairing> {
        Arc::new(Pairing {
            control,
            window: Mutex::new(Window::default()),
            waiters: Mutex::new(HashMap::new()),
            browsers: Mutex::new(HashMap::new()),
            serial: std::sync::atomic::AtomicU64::new(0),
            registry,
            notifier,
            identity,
            opened: tokio::sync::Notify::new(),
        })
    }

    /// The box's button was pressed once.
    pub async fn press(self: &Arc<Self>) {
        let has_owner = self.has_owner().await;
        let actions = lock(&self.window).press(Instant::now(), has_owner);
        self.carry_out(actions).await;
    }

    /// The window is open now (a press came less than
    /// [`pairing::WINDOW`] ago and nothing closed it).
    pub fn is_open(&self) -> bool {
        lock(&self.window)
            .deadline()
            .is_some_and(|t| t > Instant::now())
    }

    /// This box paired with a box it asked to: the window closes.
    pub async fn close(self: &Arc<Self>) {
        let actions = lock(&self.window).used();
        self.carry_out(actions).await;
    }

    async fn has_owner(&self) -> bool {
        let r = self.registry.clone();
        tokio::task::spawn_blocking(move || r.has_owner())
            .await
            .ok()
            .and_then(Result::ok)
            // When the registry cannot say, act as if an owner exists: the
            // stricter rule (an owner must approve) never pairs too much.
            .unwrap_or(true)
    }

    /// Does what the window decided: LED news in the log, devices paired,
    /// waiting requests answered.
    pub(crate) async fn carry_out(self: &Arc<Self>, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::WindowOpened => {
                    tracing::info!(seconds = pairing::WINDOW.as_secs(), "pairing window open");
                    self.opened.notify_one();
                    self.led(PairingLed::Open).await;
                }
                Action::WindowClosed => {
                    tracing::info!("pairing window closed");
                    self.led(PairingLed::Closed).await;
                }
                Action::Failed(why) => {
                    tracing::warn!(reason = %why, "pairing failed: nobody was paired");
                    self.led(PairingLed::Failed).await;
                }
                Action::Pair { pending, owner } => {
                    let outcome = self.pair(pending.clone(), owner).await;
                    self.answer(&pending.credential, outcome);
                }
                Action::Refuse { credential, why } => self.answer(&credential, Err(why)),
            }
        }
    }

    /// Tells init what the LEDs are to show, without waiting for it (a slow
    /// init must not hold up pairing; nothing happens without init: a host
    /// run).
    async fn led(&self, state: PairingLed) {
        let path = self.control.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = control::call(&path, &Request::Pairing { state }) {
                tracing::debug!(error = %e, "pairing LED");
            }
        });
    }

    /// Gives a request its answer: to its waiting request if there is one;
    /// a browser's is held for its next wait ([`crate::browser`]).
    fn answer(self: &Arc<Self>, credential: &Credential, outcome: Outcome) {
        let waiter = lock(&self.waiters).remove(credential);
        let unsent = match waiter {
            Some((_, tx)) => tx.send(outcome).err(),
            None => Some(outcome),
        };
        if let (Some(outcome), Credential::Browser(hash)) = (unsent, credential) {
            self.hold(hash, outcome);
        }
    }

    async fn pair(&self, p: Pending, owner: bool) -> Outcome {
        let browser = p.credential.is_browser();
        let role = match (p.kind, owner) {
            (Kind::Box, _) => Role::Box,
            (Kind::Device, true) => Role::Owner,
            (Kind::Device, false) => Role::Device,
        };
        let how = if p.approved {
            PairedHow::ButtonAndOwner
        } else {
            PairedHow::Button
        };
        let r = self.registry.clone();
        // A key is paired as it is; a browser gets a fresh token, kept
        // hashed.
        let new = NewDevice {
            name: p.name.clone(),
            role,
            how,
            key: match &p.credential {
                Credential::Key(k) => Some(k.clone()),
                Credential::Browser(_) => None,
            },
            token: browser,
        };
        let added = tokio::task::spawn_blocking(move || r.add(new)).await;
        match added {
            Ok(Ok((device, token))) => {
                // Every owner sees it in the device list; the log says it too.
                tracing::warn!(
                    device = %device.id,
                    name = %device.name,
                    role = role.as_str(),
                    how = ?how,
                    via = if browser { "browser" } else { "key" },
                    "a new device was paired"
                );
                self.notifier.changed(&device.id).await;
                Ok(Paired {
                    answer: serde_json::json!({
                        "device": device.id,
                        "name": device.name,
                        "role": role.as_str(),
                        "box_id": self.identity.box_id,
                        "box_key": self.identity.key_hash,
                    }),
                    device: device.id,
                    token,
                })
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "pairing: the registry refused the device");
                Err(Refusal::Registry(e.to_string()))
            }
            Err(e) => {
                tracing::error!(error = %e, "pairing");
                Err(Refusal::Registry(e.to_string()))
            }
        }
    }

    /// `POST /pair`: a device asks, over TLS with its own certificate.
    pub async fn request(
        self: &Arc<Self>,
        req: hyper::Request<RoutedBody>,
    ) -> hyper::Response<Body> {
        use http_body_util::BodyExt;
        let key = req.extensions().get::<PeerKey>().map(|k| k.0.clone());
        let from = req
            .extensions()
            .get::<cloudlet_runtime::PeerAddr>()
            .map(|a| a.0.ip());
        let binding = req.extensions().get::<SessionBinding>().copied();
        let (Some(key), Some(binding)) = (key, binding) else {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "needs_client_certificate",
                    "reason": "pairing needs TLS 1.3 with a client certificate: the key in it is what gets paired"}),
            );
        };
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "bad_request", "reason": e.to_string()}),
                )
            }
        };
        let asked: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let name = asked["name"].as_str().unwrap_or("").trim().to_owned();
        let kind = match asked["kind"].as_str() {
            None | Some("device") => Kind::Device,
            Some("box") => Kind::Box,
            Some(other) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "bad_request", "reason": format!("unknown kind {other:?}")}),
                )
            }
        };
        if crate::registry::check_name(&name).is_err() {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad_request", "reason": "send {\"name\": \"what to call this device\"}"}),
            );
        }
        let code = cloudlet_runtime::tls::pairing_code(&binding);
        let (tx, rx) = oneshot::channel();
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.waiters).insert(Credential::Key(key.clone()), (serial, tx));
        let mut waiting = Waiting {
            pairing: self,
            key: Credential::Key(key.clone()),
            serial,
            done: false,
        };
        tracing::info!(name = %name, from = %from.map_or_else(String::new, |a| a.to_string()), "a device asks to pair");
        let actions = lock(&self.window).request(
            Instant::now(),
            Pending {
                credential: Credential::Key(key),
                name,
                kind,
                code,
                pressed: false,
                approved: false,
                from,
            },
        );
        self.carry_out(actions).await;
        let outcome = tokio::time::timeout(pairing::WINDOW + Duration::from_secs(5), rx).await;
        waiting.done = true;
        match outcome {
            Ok(Ok(Ok(paired))) => json(StatusCode::OK, &paired.answer),
            Ok(Ok(Err(why))) => refused(&why),
            // The answer channel was dropped: a newer request from the
            // same key took this one's place.
            Ok(Err(_)) => refused(&Refusal::Replaced),
            Err(_) => refused(&Refusal::TimedOut),
        }
    }

    /// `GET /api/pairing`: what an owner sees to approve.
    pub fn state(&self, who: Option<&Who>) -> hyper::Response<Body> {
        if !who.is_some_and(Who::is_owner) {
            return crate::owners_only();
        }
        let w = lock(&self.window);
        let pending = w.pending().map(|p| {
            serde_json::json!({
                "name": p.name,
                "kind": match (p.kind, &p.credential) {
                    (Kind::Box, _) => "box",
                    (Kind::Device, Credential::Browser(_)) => "browser",
                    (Kind::Device, Credential::Key(_)) => "device",
                },
                // Not the code: the owner is to read it off the new device
                // and type it, or the check against a relay means nothing.
                "pressed": p.pressed,
                "from": p.from.map(|a| a.to_string()),
            })
        });
        json(
            StatusCode::OK,
            &serde_json::json!({"open": w.is_open(), "pending": pending}),
        )
    }

    /// `POST /api/pairing/approve` with `{"code": "123456"}`: an owner
    /// approves the waiting device by the code that device shows.
    pub async fn approve(
        self: &Arc<Self>,
        req: hyper::Request<RoutedBody>,
    ) -> hyper::Response<Body> {
        use http_body_util::BodyExt;
        if !req.extensions().get::<Who>().is_some_and(Who::is_owner) {
            return crate::owners_only();
        }
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let code = body
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["code"].as_str().map(str::to_owned));
        let Some(code) = code else {
            return json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"error": "bad_request", "reason": "send {\"code\": \"the six digits the new device shows\"}"}),
            );
        };
        let result = lock(&self.window).approve(Instant::now(), code.trim());
        match result {
            Ok(actions) => {
                let too_many = actions.contains(&Action::Failed(Refusal::TooManyWrongCodes));
                self.carry_out(actions).await;
                if too_many {
                    refused(&Refusal::TooManyWrongCodes)
                } else {
                    json(StatusCode::OK, &serde_json::json!({"approved": true}))
                }
            }
            Err(why) => refused(&why),
        }
    }

    /// Closes the window when it is due (runs for the service's life).
    pub async fn timer(self: Arc<Self>) {
        loop {
            let due = lock(&self.window).deadline();
            match due {
                Some(t) => {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
                    let actions = lock(&self.window).tick(Instant::now());
                    self.carry_out(actions).await;
                }
                None => self.opened.notified().await,
            }
        }
    }

    /// Follows the box's button presses from init (a long poll on its
    /// control socket) for the service's life; without init (a host run)
    /// it waits for one quietly and presses come from `cloudletd sharing
    /// press`.
    pub async fn follow_button(self: Arc<Self>, socket: std::path::PathBuf) {
        let mut after = None::<u64>;
        loop {
            let path = socket.clone();
            let since = after.unwrap_or(0);
            let wait = if after.is_some() { Some(25_000) } else { None };
            let answer = tokio::task::spawn_blocking(move || {
                control::call(
                    &path,
                    &Request::Events {
                        after: since,
                        wait_ms: wait,
                    },
                )
            })
            .await;
            match answer {
                Ok(Ok(Response::Events { events })) => {
                    let first = after.is_none();
                    for e in &events {
                        after = Some(after.unwrap_or(0).max(e.seq));
                        // Presses from before this service started are history.
                        if !first && e.kind == "short-press" {
                            self.press().await;
                        }
                    }
                    if after.is_none() {
                        after = Some(0);
                    }
                }
                _ => tokio::time::sleep(Duration::from_secs(5)).await,
            }
        }
    }
}
