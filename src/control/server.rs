//! The control socket listener.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{ErrorCode, MESSAGE_MAX_BYTES, Request, Response};

/// How long a client may take to send its request line.
const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves control requests.
pub trait ControlHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, req: Request) -> Pin<Box<dyn Future<Output = Response> + Send + '_>>;
}

/// Who may use the control socket: root, the daemon's own user, and the
/// members of `group` when one is configured.
#[derive(Clone, Copy, Debug)]
pub struct Access {
    /// The daemon's effective uid.
    pub own_uid: u32,
    /// The configured group's gid.
    pub group: Option<u32>,
}

impl Access {
    /// Root only, plus `group` when set.
    pub fn new(group: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        Access { own_uid, group }
    }

    /// Whether the process `pid` running as `uid`/`gid` may send requests.
    fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        let Some(g) = self.group else {
            return false;
        };
        gid == g || pid.is_some_and(|p| supplementary_groups(p).contains(&g))
    }
}

/// The supplementary groups of process `pid` (from /proc; empty if gone).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The gid of a group given by name (from /etc/group) or number.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1)?.parse().ok())?
        })
        .ok_or_else(|| format!("no group named `{name}` in /etc/group"))
}

/// Binds the control socket at `path`, replacing a stale one: mode 0600,
/// or 0660 owned by `group` when one is given.
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
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
    let mode = match group {
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Accepts and serves connections until the listener fails.
pub async fn serve(listener: UnixListener, handler: Arc<dyn ControlHandler>, access: Access) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let h = handler.clone();
        tokio::spawn(async move {
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
