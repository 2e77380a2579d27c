//! The control socket listener.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{ErrorCode, MESSAGE_MAX_BYTES, Request, Response};
pub use crate::access::{Access, bind, resolve_group};

/// How long a client may take to send its request line.
const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves control requests.
pub trait ControlHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, req: Request) -> Pin<Box<dyn Future<Output = Response> + Send + '_>>;
}

/// Control connections served at once; more wait in the socket's backlog.
pub const CONNECTIONS_MAX: usize = 64;

/// Warnings about failed accepts.
static ACCEPT_LOG: crate::log_limit::LogLimit =
    crate::log_limit::LogLimit::new(std::time::Duration::from_secs(10));

/// Accepts and serves connections, at most [`CONNECTIONS_MAX`] at once.
pub async fn serve(listener: UnixListener, handler: Arc<dyn ControlHandler>, access: Access) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // (Out of descriptors, say: back off instead of spinning.)
                ACCEPT_LOG.warn(|| format!("control socket: accept failed: {e}"));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let h = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_one(stream, h, access).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

async fn serve_one(
    stream: UnixStream,
    handler: Arc<dyn ControlHandler>,
    access: Access,
) -> std::io::Result<()> {
    let cred = stream.peer_cred().ok();
    let uid = cred.map(|c| c.uid()).unwrap_or(u32::MAX);
    let gid = cred.map(|c| c.gid()).unwrap_or(u32::MAX);
    let pid = cred.and_then(|c| c.pid());
    let (r, mut w) = stream.into_split();
    // The request line is read first (bounded in size and time) so that
    // even a refused client gets the answer instead of a broken pipe.
    let mut reader = BufReader::new(r).take(MESSAGE_MAX_BYTES as u64);
    let mut line = String::new();
    let read = tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line)).await;
    let response = if !access.allows(uid, gid, pid) {
        tracing::warn!("control socket: refused a request from uid {uid}");
        Response::Error {
            code: ErrorCode::Forbidden,
            message: format!(
                "uid {uid} may not use the blkrep control socket (allowed: root{})",
                access
                    .group
                    .map(|g| format!(" and members of group {g}"))
                    .unwrap_or_default()
            ),
        }
    } else {
        match read {
            Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(req) => handler.handle(req).await,
                Err(e) => Response::Error {
                    code: ErrorCode::BadRequest,
                    message: format!("malformed control request: {e}"),
                },
            },
            Ok(Err(e)) => Response::Error {
                code: ErrorCode::BadRequest,
                message: format!("unreadable control request: {e}"),
            },
            Err(_) => Response::Error {
                code: ErrorCode::BadRequest,
                message: format!(
                    "no complete request line within {} s",
                    REQUEST_READ_TIMEOUT.as_secs()
                ),
            },
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    w.write_all(&out).await
}
