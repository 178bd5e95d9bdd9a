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
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, tx.clone(), seq.clone()));
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
            Ok(req) if req.is_privileged() && uid != Some(0) => Response::Error {
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
