//! The daemon's control socket: one typed request per connection, as one line
//! of JSON, answered by one line of JSON. Root-only (mode 0600, and the
//! peer's uid is checked).

pub mod server;
pub mod status;

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub use status::{NodeStatus, VolumeStatusReport};

/// Longest request or response line accepted.
pub const MESSAGE_MAX_BYTES: usize = 1 << 20;

/// A control request. Each variant says when it is allowed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Bring a configured volume up on this node (as secondary). Allowed when
    /// the volume is configured here, has metadata, and is not attached.
    Attach {
        /// Volume name.
        volume: String,
    },
    /// Take an attached volume down. Demotes it first (see `Secondary`).
    Detach {
        /// Volume name.
        volume: String,
        /// Disconnect the export's users instead of refusing.
        #[serde(default)]
        force: bool,
    },
    /// Make this node the writer. Refused when the connected peer is primary,
    /// or when the local copy is not up to date (unless `force`, which starts
    /// a new data history from this copy).
    Primary {
        /// Volume name.
        volume: String,
        /// Promote an outdated or inconsistent copy.
        #[serde(default)]
        force: bool,
    },
    /// Stop being the writer. Refused while the export is in use (an NBD
    /// client connected, the ublk device mounted or held open exclusively)
    /// or I/O is in flight, unless `force`: then the export's users are
    /// disconnected first (their requests in flight fail).
    Secondary {
        /// Volume name.
        volume: String,
        /// Disconnect the export's users instead of refusing.
        #[serde(default)]
        force: bool,
    },
    /// Compare every chunk with the peer's copy (digests), while the volume
    /// is in use; differing chunks are marked out of sync. Allowed when
    /// connected and in sync, on the primary (or on either node when neither
    /// is primary).
    Verify {
        /// Volume name.
        volume: String,
    },
    /// Copy the chunks marked out of sync to the peer; with `checksum`, only
    /// chunks whose digests differ are sent. Same conditions as `Verify`.
    Resync {
        /// Volume name.
        volume: String,
        /// Exchange digests first and skip equal chunks.
        #[serde(default)]
        checksum: bool,
    },
    /// Report status of one volume or all.
    Status {
        /// Volume name; all when absent.
        #[serde(default)]
        volume: Option<String>,
    },
    /// Resolve a split brain by discarding this node's changes: the node
    /// becomes a full-sync target of its peer.
    Resolve {
        /// Volume name.
        volume: String,
    },
    /// Test and drill only (needs `debug.fault_injection = true`): make the
    /// local disk of the volume fail every I/O from now on.
    FailDisk {
        /// Volume name.
        volume: String,
    },
    /// Test and drill only (needs `debug.fault_injection = true`): the next
    /// local write of at least 8 KiB is torn as by a power cut (its first
    /// half reaches the disk, it never completes).
    TearWrite {
        /// Volume name.
        volume: String,
    },
    /// Test and drill only (needs `debug.fault_injection = true`): every
    /// local write of the volume waits `delay_ms` first (0: normal again).
    SlowDisk {
        /// Volume name.
        volume: String,
        /// Added latency per write.
        delay_ms: u64,
    },
    /// Drill only (needs `debug.fault_injection` and `debug.volatile_cache`):
    /// this node loses power. Every volume's volatile cache keeps a seeded
    /// subset of its writes (the rest is lost), the next start sees another
    /// boot, and the daemon ends at once without answering.
    PowerCut {
        /// Seeds which cached writes survive.
        seed: u64,
    },
}

/// Stable error codes; the CLI maps each to a documented exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Anything not listed below.
    Failed,
    /// The volume is not attached on this node.
    NotAttached,
    /// The local copy is outdated, inconsistent or still being synced.
    Outdated,
    /// No quorum (reserved for the witness).
    NoQuorum,
    /// The peer is primary.
    PeerPrimary,
    /// The two histories diverged.
    Diverged,
    /// I/O still in flight.
    Busy,
    /// The request is malformed or names an unknown volume.
    BadRequest,
    /// The caller may not use the control socket.
    Forbidden,
}

impl ErrorCode {
    /// The CLI exit status for this error.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::Failed => 1,
            ErrorCode::BadRequest => 2,
            ErrorCode::NotAttached => 3,
            ErrorCode::Outdated => 4,
            ErrorCode::NoQuorum => 5,
            ErrorCode::PeerPrimary => 6,
            ErrorCode::Diverged => 7,
            ErrorCode::Busy => 9,
            ErrorCode::Forbidden => 10,
        }
    }
}

/// A control response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok {
        /// What happened, for humans.
        message: String,
    },
    /// Status report.
    Status(NodeStatus),
    /// Refused or failed.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// What went wrong and what to do.
        message: String,
    },
}

/// Errors talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket exists but this user may not open it.
    #[error(
        "permission denied on the control socket {path}: it is for root (and the daemon's `control_group`, if configured); run as root or join that group"
    )]
    Forbidden {
        /// Socket path.
        path: String,
    },
    /// No daemon listening.
    #[error("cannot reach the blkrep daemon at {path}: {source} (is `blkrep daemon` running?)")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// I/O on the socket.
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    /// The answer was not understood.
    #[error("bad answer from the daemon: {0}")]
    BadAnswer(String),
}

/// Sends one request and returns the response.
pub async fn call(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(socket).await.map_err(|source| {
        let path = socket.display().to_string();
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ControlError::Forbidden { path }
        } else {
            ControlError::Connect { path, source }
        }
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadAnswer(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.shutdown().await?;
    let mut reader = BufReader::new(r).take(MESSAGE_MAX_BYTES as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).await?;
    serde_json::from_str(answer.trim_end()).map_err(|e| ControlError::BadAnswer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_garbage() {
        let r = Request::Primary {
            volume: "v".into(),
            force: true,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"primary","volume":"v","force":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let p: Request = serde_json::from_str(r#"{"cmd":"primary","volume":"v"}"#).unwrap();
        assert_eq!(
            p,
            Request::Primary {
                volume: "v".into(),
                force: false
            }
        );
        for bad in [
            r#"{"cmd":"nope"}"#,
            r#"{"cmd":"attach"}"#,
            "not json",
            r#"{"cmd":"attach","volume":"v","x":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
