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

pub async fn serve(listener: UnixListener, tx: mpsc::UnboundedSender<ControlRequest>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, tx.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, tx: mpsc::UnboundedSender<ControlRequest>) {
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
            Ok(request) => {
                let (otx, orx) = oneshot::channel();
                if tx
                    .send(ControlRequest {
                        request,
                        reply: otx,
                    })
                    .is_err()
                {
                    return;
                }
                match orx.await {
                    Ok(r) => r,
                    Err(_) => Response::Error {
                        message: "init is shutting down".into(),
                    },
                }
            }
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
