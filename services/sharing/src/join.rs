//! A box asking another box to pair with it: the outgoing half of
//! box-to-box pairing (the incoming half is any box's `POST /pair` with
//! `"kind": "box"`, under the window's rules).
//!
//! An owner paired with both boxes drives it (`cloudlet pair-box`):
//!
//! 1. A press on each box opens both windows: the press on this box is its
//!    consent to pair with another, the press on the other is that box's.
//! 2. The owner asks this box to join the other (`POST /api/pairing/join`
//!    with the other box's address and the identity key the owner pinned
//!    for it). This box calls the other's `POST /pair` over TLS 1.3,
//!    presenting its own identity certificate, and checks that the other
//!    shows the pinned key. Both ends derive the six-digit code from that
//!    session; this box tells the owner its code.
//! 3. The owner approves that code on the other box (as for any device once
//!    an owner exists) and a second press there confirms. A relay between
//!    the boxes would hold two sessions with two codes: the other box
//!    refuses the code this box showed.
//! 4. Once the other box says paired (and names the key it showed), this
//!    box adds it to its own registry as a box: both know each other's key.
//!
//! One join at a time; its state is `GET /api/pairing/join`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudlet_runtime::auth::Identity as Who;
use cloudlet_runtime::dial::{self, Check, Conn, FirstContact};
use cloudlet_runtime::router::RoutedBody;
use cloudlet_runtime::{json, Body};
use hyper::StatusCode;
use rustls::pki_types::CertificateDer;
use serde::Serialize;

use crate::registry::{NewDevice, PairedHow, Registry, Role};
use crate::{bus, identity, pair};

/// Largest `POST /api/pairing/join` body.
pub const JOIN_BODY_LIMIT: u64 = 1024;

/// Where a join stands.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JoinState {
    /// Asked; the other box has not settled it yet.
    Waiting,
    /// Both boxes know each other: `device` is the other box's id here.
    Paired { device: String },
    /// The other box refused, or the join failed: why, for a person.
    Refused { reason: String },
}

/// The latest join this box made.
#[derive(Debug, Clone, Serialize)]
pub struct Outgoing {
    pub address: String,
    /// The other box's ID.
    pub box_id: String,
    /// The six digits of the session with it.
    pub code: String,
    #[serde(flatten)]
    pub state: JoinState,
}

pub struct Join {
    latest: Mutex<Option<Outgoing>>,
    registry: Arc<Registry>,
    notifier: Arc<bus::Notifier>,
    identity: Arc<identity::Identity>,
    pairing: Arc<pair::Pairing>,
}

/// A join marked `Waiting` before its connection is up: dropped while
/// armed (the request went away), it marks the join refused.
struct Reserved<'a> {
    join: &'a Join,
    armed: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Some(o) = lock(&self.join.latest).as_mut() {
                o.state = JoinState::Refused {
                    reason: "the request that started this join went away".into(),
                };
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn refuse(status: StatusCode, error: &str, reason: &str) -> hyper::Response<Body> {
    json(
        status,
        &serde_json::json!({"error": error, "reason": reason}),
    )
}

/// What the other box answered, for a person.
fn explain(status: u16, body: &serde_json::Value) -> String {
    match body["reason"].as_str() {
        Some(r) => format!("the other box refused: {r}"),
        None => format!("the other box answered {status}"),
    }
}

impl Join {
    pub fn new(
        registry: Arc<Registry>,
        notifier: Arc<bus::Notifier>,
        identity: Arc<identity::Identity>,
        pairing: Arc<pair::Pairing>,
    ) -> Arc<Join> {
        Arc::new(Join {
            latest: Mutex::new(None),
            registry,
            notifier,
            identity,
            pairing,
        })
    }

    /// `GET /api/pairing/join`: the latest join (owners only).
    pub fn state(&self, who: Option<&Who>) -> hyper::Response<Body> {
        if !who.is_some_and(Who::is_owner) {
            return crate::owners_only();
        }
        json(StatusCode::OK, &*lock(&self.latest))
    }

    /// `POST /api/pairing/join` with `{"address": "HOST:PORT", "key": "the
    /// other box's identity key hash", "name": "what to call it here"}`:
    /// asks the other box to pair with this one. Answers 202 with the
    /// other box's ID and the session's code once the other box is waiting.
    pub async fn start(self: &Arc<Self>, req: hyper::Request<RoutedBody>) -> hyper::Response<Body> {
        use http_body_util::BodyExt;
        if !req.extensions().get::<Who>().is_some_and(Who::is_owner) {
            return crate::owners_only();
        }
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let asked: serde_json::Value = body
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let (Some(address), Some(key)) = (asked["address"].as_str(), asked["key"].as_str()) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "send {\"address\": \"HOST:PORT of the other box\", \"key\": \"the other box's key, as pinned when you paired with it\"}",
            );
        };
        let address = dial::with_port(address.trim());
        let key = key.trim().to_ascii_lowercase();
        let name = asked["name"]
            .as_str()
            .map(str::trim)
            .unwrap_or("")
            .to_owned();
        if !name.is_empty() && crate::registry::check_name(&name).is_err() {
            return refuse(StatusCode::BAD_REQUEST, "bad_request", "bad name");
        }
        if key == self.identity.key_hash {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "that is this box's own key",
            );
        }
        if !self.pairing.is_open() {
            return refuse(
                StatusCode::FORBIDDEN,
                "window_closed",
                "this box's pairing window is closed: press its button once, then try again",
            );
        }
        {
            // Checked and taken in one step: two joins at once would each
            // ask the other box, and replace each other there.
            let mut latest = lock(&self.latest);
            if matches!(&*latest, Some(o) if o.state == JoinState::Waiting) {
                return refuse(
                    StatusCode::CONFLICT,
                    "busy",
                    "this box is already asking another box to pair",
                );
            }
            *latest = Some(Outgoing {
                address: address.clone(),
                box_id: String::new(),
                code: String::new(),
                state: JoinState::Waiting,
            });
        }
        // Until the join is handed to its task, an owner hanging up (or a
        // revoked owner cut off) must not leave it `Waiting` for good.
        let mut reserved = Reserved {
            join: self,
            armed: true,
        };
        let reached = self.reach(&address, &key).await;
        reserved.armed = false;
        let (mut conn, box_id) = match reached {
            Ok(c) => c,
            Err((status, error, reason)) => {
                if let Some(o) = lock(&self.latest).as_mut() {
                    o.state = JoinState::Refused {
                        reason: reason.clone(),
                    };
                }
                return refuse(status, error, &reason);
            }
        };
        let outgoing = Outgoing {
            address: address.clone(),
            box_id: box_id.clone(),
            code: conn.code.clone(),
            state: JoinState::Waiting,
        };
        *lock(&self.latest) = Some(outgoing.clone());
        tracing::info!(other = %box_id, address = %address, "asking another box to pair");
        let me = self.clone();
        let name = if name.is_empty() {
            format!("box {box_id}")
        } else {
            name
        };
        tokio::spawn(async move {
            let asked =
                serde_json::json!({"name": format!("box {}", me.identity.box_id), "kind": "box"});
            let waited = tokio::time::timeout(
                crate::pairing::WINDOW + Duration::from_secs(10),
                conn.call("POST", "/pair", Some(asked)),
            )
            .await;
            let state = match waited {
                Ok(Ok((200, body))) if body["box_key"].as_str() == Some(key.as_str()) => {
                    me.add(name, key).await
                }
                Ok(Ok((200, _))) => JoinState::Refused {
                    reason: "the other box named a key other than the one it showed".into(),
                },
                Ok(Ok((status, body))) => JoinState::Refused {
                    reason: explain(status, &body),
                },
                Ok(Err(e)) => JoinState::Refused { reason: e },
                Err(_) => JoinState::Refused {
                    reason: "the other box did not settle the pairing in time".into(),
                },
            };
            match &state {
                JoinState::Paired { device } => {
                    tracing::warn!(other = %box_id, device = %device, "paired with another box")
                }
                JoinState::Refused { reason } => {
                    tracing::warn!(other = %box_id, reason = %reason, "pairing with another box failed")
                }
                JoinState::Waiting => {}
            }
            if let Some(o) = lock(&me.latest).as_mut() {
                o.state = state;
            }
        });
        json(StatusCode::ACCEPTED, &outgoing)
    }

    /// Connects to the box at `address` with this box's identity and checks
    /// that it shows the identity `key`: the connection and its box ID, or
    /// what to answer. What went wrong on the way is logged, not told: the
    /// owner learns that no Cloudlet answered, not what did (this is not a
    /// port scanner).
    async fn reach(
        &self,
        address: &str,
        key: &str,
    ) -> Result<(Conn, String), (StatusCode, &'static str, String)> {
        let unreachable = || {
            (
                StatusCode::BAD_GATEWAY,
                "unreachable",
                format!("no Cloudlet answered at {address}"),
            )
        };
        let (verifier, seen) = FirstContact::new();
        let config = dial::client_config(
            CertificateDer::from(self.identity.cert_der.clone()),
            self.identity.key_der(),
            Check::FirstContact(verifier),
        )
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?;
        // The name only has to be valid for the handshake: the verifier
        // checks the chain against the box ID it shows.
        let conn = match Conn::connect(address, config, "cloudlet".into()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(address = %address, error = %e, "join: cannot reach the other box");
                return Err(unreachable());
            }
        };
        let Some((box_id, cert)) = seen.get() else {
            return Err(unreachable());
        };
        let shown =
            cloudlet_runtime::tls::spki_of(&cert).map(|s| cloudlet_runtime::tls::key_hash(&s));
        if shown.as_deref() != Some(key) {
            tracing::warn!(address = %address, shown = %box_id, "join: the box at that address is not the one pinned");
            return Err((
                StatusCode::CONFLICT,
                "wrong_box",
                format!("the box at {address} ({box_id}) is not the one you pinned: not pairing"),
            ));
        }
        if conn.code.is_empty() {
            tracing::warn!(address = %address, "join: the other box did not speak TLS 1.3");
            return Err(unreachable());
        }
        Ok((conn, box_id))
    }

    /// The other box paired this one: it becomes a box here too, and this
    /// box's window closes (one success closes it). If this box's window
    /// closed meanwhile (its time ran out, or another device paired in it),
    /// the press that consented is spent: the other box is not added, and
    /// the owner is told so (the other box has paired this one: revoke it
    /// there, or press both buttons again).
    async fn add(&self, name: String, key: String) -> JoinState {
        if !self.pairing.is_open() {
            return JoinState::Refused {
                reason: "this box's pairing window closed before the other box confirmed: \
                         the other box paired this one, this box did not pair it; press both \
                         buttons and pair them again"
                    .into(),
            };
        }
        let r = self.registry.clone();
        let new = NewDevice {
            name,
            role: Role::Box,
            how: PairedHow::ButtonAndOwner,
            key: Some(key),
            token: false,
        };
        let added = tokio::task::spawn_blocking(move || r.add(new)).await;
        self.pairing.close().await;
        match added {
            Ok(Ok((device, _))) => {
                self.notifier.changed(&device.id).await;
                JoinState::Paired { device: device.id }
            }
            Ok(Err(e)) => JoinState::Refused {
                reason: format!(
                    "the other box paired this one, but this box could not add it: {e}"
                ),
            },
            Err(e) => JoinState::Refused {
                reason: e.to_string(),
            },
        }
    }
}
