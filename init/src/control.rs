//! The control socket: JSON lines in, JSON lines out. Each request is handed
//! to the main loop, which owns all state; this module only does I/O and the
//! permission check.

use std::path::Path;

use cloudlet_proto::control::{Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Who may send the requests that change the box: root always; the
/// updater user (when the box has one) may also reboot, into the slot it
/// just installed. Every other privileged request stays root's. The LED
/// requests are the updater's (`Update`) and the sharing service's
/// (`Pairing`) when the box has those users, so no other service can show
/// a pairing window or a rollback that is not happening.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    pub updater_uid: Option<u32>,
    pub sharing_uid: Option<u32>,
}

impl Access {
    /// Whether a peer with `uid` (`None`: its credentials are unknown) may send `req`.
    pub fn permits(&self, req: &Request, uid: Option<u32>) -> bool {
        if uid == Some(0) {
            return true;
        }
        let only = |owner: Option<u32>| owner.is_none() || (uid.is_some() && uid == owner);
        match req {
            Request::Update { .. } => only(self.updater_uid),
            Request::Pairing { .. } => only(self.sharing_uid),
            Request::Reboot => uid.is_some() && uid == self.updater_uid,
            other => !other.is_privileged(),
        }
    }
}

pub struct ControlRequest {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    // Anyone local may ask for status; changes are checked per request by uid.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(l)
}

pub async fn serve(
    listener: UnixListener,
    tx: mpsc::UnboundedSender<ControlRequest>,
    seq: tokio::sync::watch::Receiver<u64>,
    access: Access,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, tx.clone(), seq.clone(), access));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Longest wait an `events` request may ask for.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

async fn ask(tx: &mpsc::UnboundedSender<ControlRequest>, request: Request) -> Option<Response> {
    let (otx, orx) = oneshot::channel();
    tx.send(ControlRequest {
        request,
        reply: otx,
    })
    .ok()?;
    Some(orx.await.unwrap_or(Response::Error {
        message: "init is shutting down".into(),
    }))
}

async fn connection(
    stream: UnixStream,
    tx: mpsc::UnboundedSender<ControlRequest>,
    mut seq: tokio::sync::watch::Receiver<u64>,
    access: Access,
) {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    loop {
        let mut line = String::new();
        let n = match AsyncReadExt::take(&mut lines, MAX_REQUEST)
            .read_line(&mut line)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                let _ = reply(
                    &mut w,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                )
                .await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST {
            let _ = reply(
                &mut w,
                &Response::Error {
                    message: "request too long".into(),
                },
            )
            .await;
            return;
        }
        let response = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(req) if !access.permits(&req, uid) => Response::Error {
                message: "permission denied: this request needs root on the box".into(),
            },
            Ok(Request::Events {
                after,
                wait_ms: Some(ms),
            }) => {
                // Long poll: wait here (not in the main loop) until a newer event exists.
                let wait = std::time::Duration::from_millis(ms).min(MAX_WAIT);
                let _ = tokio::time::timeout(wait, seq.wait_for(|s| *s > after)).await;
                match ask(
                    &tx,
                    Request::Events {
                        after,
                        wait_ms: None,
                    },
                )
                .await
                {
                    Some(r) => r,
                    None => return,
                }
            }
            Ok(request) => match ask(&tx, request).await {
                Some(r) => r,
                None => return,
            },
        };
        if reply(&mut w, &response).await.is_err() {
            return;
        }
    }
}

async fn reply(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> std::io::Result<()> {
    let mut text = serde_json::to_string(r)
        .unwrap_or_else(|_| r#"{"result":"error","message":"encoding"}"#.into());
    text.push('\n');
    w.write_all(text.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use cloudlet_proto::control::{PairingLed, UpdateLed};

    use super::*;

    #[test]
    fn the_updater_may_reboot_and_nothing_else_privileged() {
        let access = Access {
            updater_uid: Some(104),
            sharing_uid: Some(102),
        };
        let restart = Request::Restart {
            service: "sync".into(),
        };
        for (uid, may) in [
            (Some(0), true),
            (Some(104), true),
            (Some(101), false),
            (None, false),
        ] {
            assert_eq!(
                access.permits(&Request::Reboot, uid),
                may,
                "reboot by {uid:?}"
            );
        }
        for req in [Request::PowerOff, restart] {
            assert!(access.permits(&req, Some(0)), "{req:?} by root");
            assert!(!access.permits(&req, Some(104)), "{req:?} by the updater");
            assert!(!access.permits(&req, Some(101)), "{req:?} by another user");
        }
        assert!(access.permits(&Request::Status, Some(101)));
        assert!(access.permits(&Request::Status, None));
        let update = Request::Update {
            state: UpdateLed::RolledBack,
        };
        let pairing = Request::Pairing {
            state: PairingLed::Open,
        };
        for (req, owner) in [(update, 104), (pairing, 102)] {
            assert!(access.permits(&req, Some(owner)), "{req:?} by its service");
            assert!(access.permits(&req, Some(0)), "{req:?} by root");
            assert!(!access.permits(&req, Some(101)), "{req:?} by another user");
            assert!(!access.permits(&req, None), "{req:?} without credentials");
            // A box without that user (a host run): anyone, as before.
            assert!(Access::default().permits(&req, Some(101)));
        }
    }

    #[test]
    fn without_an_updater_user_only_root_reboots() {
        let access = Access::default();
        assert!(access.permits(&Request::Reboot, Some(0)));
        assert!(!access.permits(&Request::Reboot, Some(104)));
        assert!(!access.permits(&Request::Reboot, None));
    }
}
