//! The control socket listener.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{ErrorCode, MESSAGE_MAX_BYTES, Request, Response};

/// Serves control requests.
pub trait ControlHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, req: Request) -> Pin<Box<dyn Future<Output = Response> + Send + '_>>;
}

/// Binds the control socket (mode 0600) at `path`, replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another daemon is listening on {}", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts and serves connections until the listener fails.
pub async fn serve(listener: UnixListener, handler: Arc<dyn ControlHandler>) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let h = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, h, own_uid).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

async fn serve_one(
    stream: UnixStream,
    handler: Arc<dyn ControlHandler>,
    own_uid: u32,
) -> std::io::Result<()> {
    let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
    let (r, mut w) = stream.into_split();
    let response = if uid != 0 && uid != own_uid {
        Response::Error {
            code: ErrorCode::BadRequest,
            message: format!("uid {uid} may not use the blkrep control socket"),
        }
    } else {
        let mut reader = BufReader::new(r).take(MESSAGE_MAX_BYTES as u64);
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(_) => match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(req) => handler.handle(req).await,
                Err(e) => Response::Error {
                    code: ErrorCode::BadRequest,
                    message: format!("malformed control request: {e}"),
                },
            },
            Err(e) => Response::Error {
                code: ErrorCode::BadRequest,
                message: format!("unreadable control request: {e}"),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    w.write_all(&out).await
}
